"""ViTDet-style windowed attention (issue 15): windows keep tokens apart, padding works, a window covering
the grid is global attention, global blocks mix everything, routing and gradients are as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moevit
from moevit.config import build_config
from moevit.config.schema import Config
from moevit.factory import build_model
from moevit.models.block import TaskBlock

DIM, HEADS = 64, 2
PATCH = 8  # moevit_debug: 32 px images are a 4 x 4 patch grid


def model(**overrides):
    torch.manual_seed(0)
    return moevit.create_model("moevit_debug", tasks=["a", "b"], **overrides).eval()


def block(window_size: int) -> TaskBlock:
    torch.manual_seed(0)
    return TaskBlock(DIM, HEADS, window_size=window_size).eval()


def tokens(prefix: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(2, prefix + grid[0] * grid[1], DIM, generator=torch.Generator().manual_seed(seed))


def grid_index(prefix: int, grid: tuple[int, int], row: int, col: int) -> int:
    return prefix + row * grid[1] + col


def explicit_windows(blk: TaskBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The windowed block written out window by window, to check the reshaping against."""
    w = blk.window_size
    prefix = x.shape[1] - grid[0] * grid[1]
    h = blk.norm1(x)
    patches = h[:, prefix:].reshape(x.shape[0], *grid, DIM)
    pad_h, pad_w = -grid[0] % w, -grid[1] % w
    padded = F.pad(patches, (0, 0, 0, pad_w, 0, pad_h))  # zeros after norm1, as ViTDet pads
    out = torch.empty_like(padded)
    for r in range(0, padded.shape[1], w):
        for c in range(0, padded.shape[2], w):
            window = padded[:, r : r + w, c : c + w].reshape(x.shape[0], w * w, DIM)
            out[:, r : r + w, c : c + w] = blk.attn(window).reshape(x.shape[0], w, w, DIM)
    attended = out[:, : grid[0], : grid[1]].reshape(x.shape[0], -1, DIM)
    if prefix:
        attended = torch.cat([blk.attn(h[:, :prefix]), attended], dim=1)
    x = x + attended
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize(
    "grid, window, prefix",
    [((4, 4), 2, 1), ((4, 4), 3, 1), ((5, 3), 2, 0), ((3, 7), 4, 1)],  # all but the first pad the grid
)
def test_windowed_block_equals_attention_run_window_by_window(grid, window, prefix):
    blk = block(window)
    x = tokens(prefix, grid)
    with torch.no_grad():
        got, routing = blk(x, "a", grid)
        torch.testing.assert_close(got, explicit_windows(blk, x, grid), rtol=1e-5, atol=1e-6)
    assert got.shape == x.shape and routing == {}


@pytest.mark.parametrize("grid, window", [((4, 4), 2), ((5, 3), 2), ((4, 4), 3)])
def test_a_token_changes_only_its_own_window(grid, window):
    blk = block(window)
    x = tokens(1, grid)
    moved = x.clone()
    moved[:, grid_index(1, grid, 0, 0)] = tokens(0, (1, 1), seed=9)[0, 0]  # a token of window (0, 0)
    with torch.no_grad():
        before, _ = blk(x, "a", grid)
        after, _ = blk(moved, "a", grid)
    changed = (after - before).abs().amax(dim=(0, 2)) > 1e-4
    expected = torch.zeros(x.shape[1], dtype=torch.bool)
    for row in range(grid[0]):
        for col in range(grid[1]):
            expected[grid_index(1, grid, row, col)] = row < window and col < window
    assert changed.tolist() == expected.tolist()  # the class token (index 0) does not move either


def test_prefix_tokens_attend_among_themselves_in_a_windowed_block():
    blk, same_weights_global = block(2), block(0)
    grid = (4, 4)
    x = tokens(1, grid)
    moved = x.clone()
    moved[:, 0] = tokens(0, (1, 1), seed=9)[0, 0]
    with torch.no_grad():
        windowed, _ = blk(x, "a", grid)
        alone, _ = same_weights_global(x[:, :1], "a")  # the class token as a sequence of its own
        after, _ = blk(moved, "a", grid)
    torch.testing.assert_close(windowed[:, :1], alone, rtol=0, atol=1e-6)
    assert torch.equal(after[:, 1:], windowed[:, 1:])  # patch tokens never see it


def test_a_window_covering_the_grid_is_global_attention():
    """Without a class token (ViTDet's choice) one window over the whole 4 x 4 grid is global attention."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = model(class_token=False)
    windowed = model(class_token=False, window_size=4)
    windowed.load_state_dict(plain.state_dict())
    assert all(b.window_size == 4 for b in windowed.blocks)
    with torch.no_grad():
        expected = plain.forward_backbone(images, "a", intermediate_indices=2)
        got = windowed.forward_backbone(images, "a", intermediate_indices=2)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=1e-5, atol=1e-6)
    for a, b in zip(got.intermediates, expected.intermediates):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_global_blocks_attend_globally():
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    moved = images.clone()
    moved[..., :PATCH, :PATCH] += 3.0  # patch (0, 0) only: the patch embedding is one conv step per patch

    def change(m):
        with torch.no_grad():
            before = m.forward_features(images, "a")[0]
            after = m.forward_features(moved, "a")[0]
        return (after - before).abs().amax(dim=-1)  # per token: class token, then the 4 x 4 grid

    windowed = model(window_size=2)
    assert [b.window_size for b in windowed.blocks] == [2, 2, 2, 2]
    far = [grid_index(1, (4, 4), r, c) for r in (2, 3) for c in range(4)] + [0]  # other windows, class token
    near = [grid_index(1, (4, 4), r, c) for r in (0, 1) for c in (0, 1)]
    # Windows all the way down: nothing crosses a window (MoE MLPs act per token, norms too).
    assert change(windowed)[far].max() < 1e-5 and change(windowed)[near].min() > 1e-3

    mixed = model(window_size=2, global_blocks=[2])
    assert [b.window_size for b in mixed.blocks] == [2, 2, 0, 2]
    assert change(mixed).min() > 1e-3  # one global block reaches every token


def test_routing_records_keep_their_shape():
    images = torch.randn(3, 3, 40, 24, generator=torch.Generator().manual_seed(3))  # 5 x 3 grid: padded
    plain, windowed = model(), model(window_size=2, global_blocks=[3])
    with torch.no_grad():
        expected = plain.forward_backbone(images, "b").routing
        got = windowed.forward_backbone(images, "b").routing
    assert list(got) == list(expected) == ["blocks.1.mlp", "blocks.3.mlp"]
    for name, routing in got.items():
        assert routing.num_tokens == expected[name].num_tokens == 3 * (1 + 15)
        assert routing.expert_idx_TK.shape == expected[name].expert_idx_TK.shape
        assert routing.probs_sum_E.shape == expected[name].probs_sum_E.shape


def test_gradients_reach_every_parameter_through_padded_windows():
    m = model(window_size=3, global_blocks=[3]).train()  # 3 x 3 windows on a 4 x 4 grid
    m.set_force_balanced_routing(True)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = sum(m.forward_features(images, task).square().mean() for task in m.tasks)
    loss.backward()
    without_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []
    assert images.grad.abs().sum() > 0


def test_mixture_of_attention_heads_runs_in_global_blocks_only():
    moa = dict(attention_experts=3, attention_top_k=1, attention_head_dim=16)
    m = model(window_size=2, global_blocks=[1, 3], **moa)  # the MoE blocks (1, 3) stay global
    m.forward_features(torch.randn(1, 3, 32, 32), "a")
    with pytest.raises(ValueError, match=r"cannot run in windowed blocks \[3\]"):
        model(window_size=2, global_blocks=[1], **moa)


def test_bad_window_settings_are_refused():
    with pytest.raises(ValueError, match=r"global_blocks \[4, -1\] are not block indices of this 4-block"):
        model(window_size=2, global_blocks=[0, 4, -1])
    with pytest.raises(ValueError, match="window_size must be an int >= 0"):
        model(window_size=-1)
    with pytest.raises(ValueError, match="needs the patch grid"):
        block(2)(tokens(1, (4, 4)), "a")
    cfg = build_config(
        Config,
        {
            "model": {"name": "moevit_debug", "window_size": 2, "global_blocks": [9]},
            "tasks": {"cls": {"type": "classification", "num_classes": 3}},
        },
    )
    with pytest.raises(ValueError, match=r"global_blocks \[9\]"):
        build_model(cfg)
