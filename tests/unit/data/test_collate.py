"""Collate functions: batch dict layout, dtypes, and the summed skip count."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from moevit.data.collate import collate_for_task
from moevit.data.transforms import build_transforms


def _image() -> tv_tensors.Image:
    return tv_tensors.Image(torch.randn(3, 8, 8))


def test_classification_batch():
    samples = [
        {"image": _image(), "label": 4, "key": "a", "num_skipped": 2},
        {"image": _image(), "label": 0, "key": "b"},
    ]
    batch = collate_for_task("classification")(samples)
    assert type(batch["images"]) is torch.Tensor and tuple(batch["images"].shape) == (2, 3, 8, 8)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [4, 0]
    assert batch["num_skipped"] == 2 and batch["keys"] == ["a", "b"]


def test_detection_batch_keeps_per_image_targets():
    boxes = tv_tensors.BoundingBoxes([[1.0, 2.0, 5.0, 6.0]], format="XYXY", canvas_size=(8, 8))
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(8, 8))
    geometry = {"valid_size": (8, 6), "original_size": (16, 12), "scale": (0.5, 0.5)}
    samples = [
        {"image": _image(), "boxes": boxes, "labels": torch.tensor([3]), "image_id": 139, "num_skipped": 1},
        {"image": _image(), "boxes": empty, "labels": torch.zeros(0, dtype=torch.int64), "image_id": 285},
    ]
    samples = [{**sample, **geometry} for sample in samples]
    batch = collate_for_task("detection")(samples)
    assert tuple(batch["images"].shape) == (2, 3, 8, 8)
    assert batch["image_ids"] == [139, 285] and batch["num_skipped"] == 1
    assert batch["image_sizes"] == [(8, 6)] * 2 and batch["original_sizes"] == [(16, 12)] * 2
    assert batch["scales"] == [(0.5, 0.5)] * 2
    first, second = batch["targets"]
    assert type(first["boxes"]) is torch.Tensor and first["boxes"].tolist() == [[1.0, 2.0, 5.0, 6.0]]
    assert first["labels"].dtype == torch.int64 and first["labels"].tolist() == [3]
    assert tuple(second["boxes"].shape) == (0, 4) and tuple(second["labels"].shape) == (0,)


def test_detection_images_of_different_aspect_ratios_pad_to_one_canvas_with_their_valid_extents():
    transform = build_transforms("detection", train=False, image_size=32)
    sizes = [(64, 16), (20, 40), (48, 48)]  # (height, width): portrait, landscape, square
    samples = []
    for image_id, (height, width) in enumerate(sizes):
        box = tv_tensors.BoundingBoxes(
            [[0.0, 0.0, width, height]], format="XYXY", canvas_size=(height, width)
        )
        image = tv_tensors.Image(torch.full((3, height, width), 255, dtype=torch.uint8))
        samples.append(
            transform({"image": image, "boxes": box, "labels": torch.tensor([0]), "image_id": image_id})
        )
    batch = collate_for_task("detection")(samples)
    assert tuple(batch["images"].shape) == (3, 3, 32, 32)
    assert batch["image_sizes"] == [(32, 8), (16, 32), (32, 32)]
    assert batch["original_sizes"] == sizes and batch["scales"] == [(0.5, 0.5), (0.8, 0.8), (2 / 3, 2 / 3)]
    for image, (height, width), target in zip(batch["images"], batch["image_sizes"], batch["targets"]):
        # The white image fills exactly its valid extent; the padding is 0 (the mean colour).
        white = (image > 1.0).all(dim=0)
        assert white[:height, :width].all() and not white[height:].any() and not white[:, width:].any()
        assert image[:, height:].eq(0).all() and image[:, :, width:].eq(0).all()
        assert target["boxes"].tolist() == [[0.0, 0.0, float(width), float(height)]]


def test_detection_sample_without_its_geometry_is_a_clear_error():
    boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(8, 8))
    sample = {"image": _image(), "boxes": boxes, "labels": torch.zeros(0), "image_id": 1, "key": "val2017/1"}
    with pytest.raises(KeyError, match="'val2017/1' has no 'valid_size'.*build_transforms"):
        collate_for_task("detection")([sample])


def test_segmentation_batch_masks_are_int64():
    mask = tv_tensors.Mask(torch.full((8, 8), 255, dtype=torch.uint8))
    batch = collate_for_task("segmentation")([{"image": _image(), "mask": mask}] * 3)
    assert batch["masks"].dtype == torch.int64 and tuple(batch["masks"].shape) == (3, 8, 8)
    assert batch["masks"].eq(255).all() and batch["num_skipped"] == 0
    assert batch["image_sizes"].tolist() == batch["mask_sizes"].tolist() == [[8, 8]] * 3


def test_segmentation_pads_images_and_masks_of_different_sizes_and_keeps_their_sizes():
    small = {
        "image": tv_tensors.Image(torch.ones(3, 4, 6)),
        "mask": tv_tensors.Mask(torch.ones(5, 7, dtype=torch.uint8)),
    }
    large = {
        "image": tv_tensors.Image(torch.ones(3, 6, 5)),
        "mask": tv_tensors.Mask(torch.zeros(9, 3, dtype=torch.uint8)),
    }
    batch = collate_for_task("segmentation")([small, large])
    assert tuple(batch["images"].shape) == (2, 3, 6, 6) and tuple(batch["masks"].shape) == (2, 9, 7)
    assert batch["image_sizes"].tolist() == [[4, 6], [6, 5]] and batch["mask_sizes"].tolist() == [
        [5, 7],
        [9, 3],
    ]
    assert batch["images"][0, :, 4:].eq(0).all() and batch["images"][0, :, :4].eq(1).all()
    assert batch["images"][1, :, :, 5:].eq(0).all()
    assert batch["masks"][0, 5:].eq(255).all() and batch["masks"][0, :5].eq(1).all()
    assert batch["masks"][1, :, 3:].eq(255).all() and batch["masks"][1, :, :3].eq(0).all()


def test_images_of_different_sizes_get_a_clear_error():
    samples = [
        {"image": _image(), "label": 0, "key": "a"},
        {"image": tv_tensors.Image(torch.randn(3, 4, 4)), "label": 1, "key": "b"},
    ]
    with pytest.raises(ValueError, match="cannot stack images of shapes .*build_transforms"):
        collate_for_task("classification")(samples)


def test_unknown_task_type_is_rejected():
    with pytest.raises(ValueError, match="unknown task type 'depth'"):
        collate_for_task("depth")
