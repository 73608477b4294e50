"""Segmentation inference at the original resolution (mmseg's whole / slide protocol) and its metric.

Stand-in models with known outputs: a per-pixel function of the input (so slide and whole must agree),
and one that depends on the window (checked against mmseg's slide loop written out in the test).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from moevit.eval import segmentation_inference as inference_module
from moevit.eval.segmentation import SegmentationMetric
from moevit.eval.segmentation_inference import (
    SegmentationInference,
    default_stride,
    plan_forwards,
    segment_batch,
    slide_windows,
)

NUM_CLASSES = 4


class PerPixelModel:
    """Logits = a fixed 1x1 convolution of the input: each pixel's logits depend on that pixel only."""

    def __init__(self, size_divisor: int = 1) -> None:
        self.weight = torch.randn(NUM_CLASSES, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        self.size_divisor = size_divisor
        self.input_shapes: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2] % self.size_divisor == 0 and images.shape[-1] % self.size_divisor == 0
        self.input_shapes.append(tuple(images.shape))
        return F.conv2d(images, self.weight)


def _batch(sizes: list[tuple[int, int]], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `sizes`, padded with 0 at the bottom / right as collate_segmentation pads them."""
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    for index, (h, w) in enumerate(sizes):
        images[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
    return images, torch.tensor(sizes)


def test_slide_grid_is_mmsegs():
    assert default_stride(512) == 341
    # ADE20K's typical 512 x 683 at crop 512, stride 341: w_grids = (683 - 512 + 340) // 341 + 1 = 2,
    # the second window shifted back to end at the edge.
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert [x1 for _, _, x1, _ in slide_windows(512, 2048, 512, 341)] == [0, 341, 682, 1023, 1364, 1536]
    assert slide_windows(300, 200, 512, 341) == [(0, 300, 0, 200)]  # smaller than the window: the image
    assert len(slide_windows(700, 700, 512, 341)) == 4


def test_slide_equals_whole_for_a_per_pixel_model():
    generator = torch.Generator().manual_seed(1)
    sizes = [(20, 31), (13, 9), (26, 26)]
    images, image_sizes = _batch(sizes, generator)
    mask_sizes = torch.tensor([(40, 62), (13, 9), (52, 50)])
    model = PerPixelModel(size_divisor=4)
    slide = SegmentationInference("slide", crop=12, stride=8, size_divisor=4, max_batch=5)
    whole = SegmentationInference("whole", crop=12, stride=8, size_divisor=4, max_batch=5)
    slid = segment_batch(model, images, image_sizes, mask_sizes, slide)
    assert len(model.input_shapes) > 3  # windows, not whole images
    wholes = segment_batch(model, images, image_sizes, mask_sizes, whole)
    for index, ((h, w), original) in enumerate(zip(sizes, mask_sizes.tolist())):
        direct = F.conv2d(images[index : index + 1, :, :h, :w], model.weight)
        expected = F.interpolate(direct, size=tuple(original), mode="bilinear", align_corners=False)[0]
        assert slid[index].shape == (NUM_CLASSES, *original)
        torch.testing.assert_close(slid[index], expected)
        torch.testing.assert_close(wholes[index], expected)


def test_slide_averages_overlaps_as_mmsegs_loop():
    """A model whose output depends on where the window is: logits = the window's mean + column index."""

    def model(images: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(images.shape[-1], dtype=torch.float32).expand(*images.shape[-2:])
        return images.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, *images.shape[-2:]) + columns

    generator = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 10, 23, generator=generator)
    crop, stride = 8, 5
    # mmseg's slide_inference, written out.
    h_grids = max(10 - crop + stride - 1, 0) // stride + 1
    w_grids = max(23 - crop + stride - 1, 0) // stride + 1
    total, count = torch.zeros(1, 2, 10, 23), torch.zeros(1, 1, 10, 23)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * stride + crop, 10), min(w_idx * stride + crop, 23)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            total[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    expected = (total / count)[0]
    settings = SegmentationInference("slide", crop=crop, stride=stride, max_batch=2)
    (got,) = segment_batch(model, image, torch.tensor([(10, 23)]), torch.tensor([(10, 23)]), settings)
    torch.testing.assert_close(got, expected)


def test_forwards_group_windows_of_one_padded_shape():
    windows = [[(0, 8, 0, 8), (0, 8, 4, 12)], [(0, 7, 0, 6)], [(0, 8, 0, 8)]]
    jobs = plan_forwards(windows, size_divisor=4, max_batch=2)
    # (8, 8) x 4 windows (the 7 x 6 one pads to 8 x 8 too) in chunks of 2.
    assert jobs == [[(0, (0, 8, 0, 8)), (0, (0, 8, 4, 12))], [(1, (0, 7, 0, 6)), (2, (0, 8, 0, 8))]]
    assert len(plan_forwards(windows, size_divisor=1, max_batch=8)) == 2


def test_a_rank_with_fewer_windows_runs_throwaway_forwards(monkeypatch):
    model = PerPixelModel()
    images, image_sizes = _batch([(6, 7)], torch.Generator().manual_seed(3))
    settings = SegmentationInference("whole", crop=8, stride=5)
    alone = segment_batch(model, images, image_sizes, image_sizes, settings)
    monkeypatch.setattr(inference_module, "agreed_forward_count", lambda count, device: count + 2)
    model.input_shapes.clear()
    padded = segment_batch(model, images, image_sizes, image_sizes, settings)
    assert model.input_shapes == [(1, 3, 6, 7), (1, 3, 8, 8), (1, 3, 8, 8)]
    torch.testing.assert_close(padded, alone)  # the throwaway logits are dropped


def test_bad_settings_and_outputs_are_refused():
    with pytest.raises(ValueError, match="slide_stride 9 exceeds the window 8"):
        SegmentationInference("slide", crop=8, stride=9)
    with pytest.raises(ValueError, match="eval_mode must be 'whole' or 'slide'"):
        SegmentationInference("tiles", crop=8, stride=4)
    images, sizes = _batch([(4, 4)], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected \\(N, C, H, W\\) logits at the input size"):
        segment_batch(lambda x: x[:, :, :2], images, sizes, sizes, SegmentationInference("whole", 4, 4))


# ---------------------------------------------------------------- the metric at the original size


def test_metric_is_computed_at_each_images_original_size():
    # Two images of different original sizes, masks padded with 255 as collate pads them.
    label_a = torch.tensor([[0, 0, 1], [1, 2, 2]])
    label_b = torch.tensor([[3], [3], [0]])
    masks = torch.full((2, 3, 3), 255)
    masks[0, :2, :3], masks[1, :3, :1] = label_a, label_b
    pred_a, pred_b = torch.tensor([[0, 1, 1], [1, 2, 0]]), torch.tensor([[3], [0], [0]])
    logits = [F.one_hot(p, NUM_CLASSES).permute(2, 0, 1).float() for p in (pred_a, pred_b)]
    batch = {"masks": masks, "mask_sizes": torch.tensor([[2, 3], [3, 1]]), "keys": ["a", "b"]}
    metric = SegmentationMetric(NUM_CLASSES)
    metric.update(logits, batch)
    # Worked by hand over the 6 + 3 pixels of the original masks.
    intersect, predicted, labelled = metric.total_areas()
    assert intersect.tolist() == [2, 2, 1, 1] and predicted.tolist() == [4, 3, 1, 1]
    assert labelled.tolist() == [3, 2, 2, 2]
    with pytest.raises(ValueError, match=r"original size \(2, 3\)\) does not match its logits \(3, 3\)"):
        metric.update([torch.zeros(NUM_CLASSES, 3, 3), logits[1]], batch)


def test_logits_resized_back_meet_the_original_mask():
    """End to end: a model that reads the label off the pixel, on an image shrunk by the eval resize,
    scores 1 once its logits are resized back to the original mask (block edges on even pixels)."""
    label = torch.zeros(16, 24, dtype=torch.int64)
    label[:, 8:], label[8:, 16:] = 1, 2
    image = (label.float() * 10)[None].expand(3, -1, -1)
    shrunk = F.interpolate(image[None], size=(8, 12), mode="bilinear", align_corners=False)

    def model(images: torch.Tensor) -> torch.Tensor:
        return (
            F.one_hot((images[:, 0] / 10).round().long().clamp(0, 2), NUM_CLASSES).permute(0, 3, 1, 2).float()
        )

    settings = SegmentationInference("slide", crop=6, stride=4, size_divisor=4)
    logits = segment_batch(model, shrunk, torch.tensor([(8, 12)]), torch.tensor([(16, 24)]), settings)
    metric = SegmentationMetric(NUM_CLASSES)
    metric.update(logits, {"masks": label[None], "keys": ["x"]})
    assert metric.compute()["aAcc"] == 1.0


# ---------------------------------------------------------------- two ranks agree on the forward count


def _gloo_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = PerPixelModel()
        # Rank 0 holds one small image (1 window), rank 1 a wide one (3 windows).
        sizes = [(6, 6)] if rank == 0 else [(8, 20)]
        images, image_sizes = _batch(sizes, torch.Generator().manual_seed(rank))
        settings = SegmentationInference("slide", crop=8, stride=6)
        logits = segment_batch(model, images, image_sizes, image_sizes, settings)
        torch.save((model.input_shapes, logits), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_gloo_ranks_run_the_same_number_of_forwards(tmp_path):
    mp.start_processes(
        _gloo_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork", join=True
    )
    (shapes_0, logits_0), (shapes_1, _) = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert len(shapes_0) == len(shapes_1) == 3
    assert shapes_0 == [(1, 3, 6, 6), (1, 3, 8, 8), (1, 3, 8, 8)]  # one real forward, two throwaway
    assert logits_0[0].shape == (NUM_CLASSES, 6, 6)
