"""Transforms keep boxes and masks aligned with the image; eval transforms are deterministic."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from transform_samples import rectangle_sample

from moevit.data.seeding import seeded_rngs
from moevit.data.transforms import build_transforms


def _segmentation_sample(width: int, height: int) -> dict:
    """Mask with class 1 on the left half, 0 on the right; the image is white exactly where the mask is 1."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[:, : width // 2] = 1
    image = (mask * 255).expand(3, height, width).clone()
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "key": "images/training/x"}


def _white(image: torch.Tensor) -> torch.Tensor:
    """Pixels that were white before ImageNet normalization (normalized value > 1 in every channel)."""
    return (image > 1.0).all(dim=0)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("task_type", ["classification", "detection", "segmentation"])
def test_output_is_normalized_float_square(task_type, train):
    torch.manual_seed(0)
    sample = {
        "classification": {
            "image": tv_tensors.Image(torch.full((3, 30, 50), 128, dtype=torch.uint8)),
            "label": 3,
        },
        "detection": rectangle_sample(50, 30, [10.0, 5.0, 30.0, 20.0]),
        "segmentation": _segmentation_sample(50, 30),
    }[task_type]
    out = build_transforms(task_type, train=train, image_size=24)(sample)
    # Segmentation eval keeps the aspect ratio (mmseg's protocol): 30 x 50 fits (96, 24) as 24 x 40.
    expected = (3, 24, 40) if task_type == "segmentation" and not train else (3, 24, 24)
    assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == expected
    if task_type == "classification":
        assert out["label"] == 3
        # mid-gray (128/255) normalized with the red channel's mean and std
        assert out["image"][0].mean().item() == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-4)
    if task_type == "segmentation":  # eval keeps the original mask for the metric
        assert out["mask"].dtype == torch.uint8 and tuple(out["mask"].shape) == (
            (24, 24) if train else (30, 50)
        )


def test_detection_flip_moves_the_box_with_the_image():
    # image_size equals the input size, so the only geometric change is the random flip.
    box = [2.0, 4.0, 10.0, 12.0]
    transform = build_transforms("detection", train=True, image_size=32)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(rectangle_sample(32, 32, box))
        out_box = out["boxes"][0].tolist()
        seen.add(tuple(out_box))
        rows, cols = torch.nonzero(_white(out["image"]), as_tuple=True)
        assert [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1] == out_box
        assert out["labels"].tolist() == [7]
    assert seen == {(2.0, 4.0, 10.0, 12.0), (22.0, 4.0, 30.0, 12.0)}


def test_detection_resize_scales_boxes_and_drops_those_under_one_pixel():
    sample = rectangle_sample(100, 50, [20.0, 10.0, 60.0, 40.0])
    sample["boxes"] = tv_tensors.BoundingBoxes(
        [[20.0, 10.0, 60.0, 40.0], [0.0, 0.0, 4.0, 50.0]], format="XYXY", canvas_size=(50, 100)
    )
    sample["labels"] = torch.tensor([7, 8])
    out = build_transforms("detection", train=False, image_size=20)(sample)
    # The longest side fits 20 px, keeping the aspect ratio: both axes scale by 0.2, the image covers
    # the top 10 rows of the 20 px canvas, and the 4 px wide box becomes 0.8 px and is dropped with its label.
    assert out["boxes"].tolist() == [[4.0, 2.0, 12.0, 8.0]]
    assert out["labels"].tolist() == [7]
    assert tuple(out["boxes"].canvas_size) == (20, 20) and out["valid_size"] == (10, 20)


def test_segmentation_train_keeps_mask_aligned_and_pads_with_ignore():
    transform = build_transforms("segmentation", train=True, image_size=32)
    padded_seen = False
    for seed in range(8):
        with seeded_rngs(seed):  # mmseg's draws come from NumPy's generator
            out = transform(_segmentation_sample(40, 24))
        mask, white = out["mask"], _white(out["image"])
        assert set(mask.unique().tolist()) <= {0, 1, 255}
        # Image (bilinear) and mask (nearest) may differ on the one boundary column only.
        agreement = (white == (mask == 1)).float().mean().item()
        assert agreement > 0.9, f"seed {seed}: image and mask disagree on {1 - agreement:.0%} of pixels"
        padded_seen |= bool((mask == 255).any())
    assert padded_seen, "scales below 1 must pad the crop with the ignore label"


@pytest.mark.parametrize("task_type", ["classification", "detection", "segmentation"])
def test_eval_transforms_are_deterministic(task_type):
    sample = {
        "classification": {"image": tv_tensors.Image(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8))},
        "detection": rectangle_sample(50, 30, [10.0, 5.0, 30.0, 20.0]),
        "segmentation": _segmentation_sample(50, 30),
    }[task_type]
    transform = build_transforms(task_type, train=False, image_size=24)
    torch.manual_seed(0)
    first = transform(dict(sample))
    torch.manual_seed(1)
    second = transform(dict(sample))
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key


def test_segmentation_eval_keeps_the_mask_at_its_original_size():
    out = build_transforms("segmentation", train=False, image_size=16)(_segmentation_sample(40, 24))
    assert tuple(out["image"].shape) == (3, 16, 27)  # fits (64, 16) keeping the aspect ratio
    assert torch.equal(out["mask"], _segmentation_sample(40, 24)["mask"])


def test_unknown_task_type_is_rejected():
    with pytest.raises(ValueError, match="unknown task type 'depth'"):
        build_transforms("depth", train=True, image_size=32)
