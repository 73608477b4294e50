"""The segmentation loss under gradient accumulation (docs/training.md, "Gradient accumulation"): it divides
by each round's valid pixels, so G rounds give (1/G) sum_r g_r where one batch gives sum_r (N_r/N) g_r
(g_r: round r's per-pixel mean gradient, N_r its valid pixels). Equal when the N_r are equal; else within
max_r |1/G - N_r/N| * sum_r |g_r|."""

import torch

from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel

IMAGE_SIZE = 64
CLASSES = 6


def make_model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=["seg"], img_size=IMAGE_SIZE)
    head = build_head("segmentation", CLASSES, backbone, IMAGE_SIZE, channels=32, dropout=0.0)
    return MultiTaskModel(backbone, {"seg": head})


def gradient(model: MultiTaskModel, batch: dict) -> torch.Tensor:
    model.zero_grad()
    model("seg", batch).losses["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def batches(ignored_rows: tuple[int, int]) -> tuple[dict, list[dict], list[int]]:
    """One batch of 4 images and its 2 rounds of 2; round r ignores the top ignored_rows[r] rows."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    masks = torch.randint(0, CLASSES, (4, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    for r, rows in enumerate(ignored_rows):
        masks[2 * r : 2 * r + 2, :rows] = 255
    big = {"images": images, "masks": masks}
    rounds = [{key: value[2 * r : 2 * r + 2] for key, value in big.items()} for r in range(2)]
    valid = [int((m["masks"] != 255).sum()) for m in rounds]
    return big, rounds, valid


def test_equal_valid_pixels_per_round_give_the_big_batch_gradient():
    model = make_model()
    big, rounds, valid = batches((8, 8))
    assert valid[0] == valid[1]
    accumulated = sum(gradient(model, batch) for batch in rounds) / 2
    torch.testing.assert_close(accumulated, gradient(model, big), rtol=1e-4, atol=1e-6)


def test_unequal_valid_pixels_weigh_rounds_by_their_share_and_stay_within_the_bound():
    model = make_model()
    big, rounds, valid = batches((4, 40))
    per_round = [gradient(model, batch) for batch in rounds]
    shares = [n / sum(valid) for n in valid]
    accumulated = sum(per_round) / 2
    expected = gradient(model, big)
    # The big batch is the valid-pixel-weighted mean of the rounds' gradients ...
    torch.testing.assert_close(sum(s * g for s, g in zip(shares, per_round)), expected, rtol=1e-4, atol=1e-6)
    # ... so accumulation differs from it, by no more than the stated bound.
    difference = (accumulated - expected).norm()
    bound = max(abs(0.5 - s) for s in shares) * sum(g.norm() for g in per_round)
    assert 0.01 * bound < difference <= bound * (1 + 1e-5)
