"""COCO transforms at true resolution: large-scale jitter, the eval resize, padding, and the recorded
geometry that maps canvas boxes back to the original image."""

from __future__ import annotations

import pytest
import torch
from transform_samples import rectangle_sample

from moevit.config.schema import CocoTransforms
from moevit.data.coco import CocoDetection
from moevit.data.seeding import seeded_rngs
from moevit.data.transforms import build_transforms
from moevit.data.transforms.detection import boxes_to_original

LSJ = CocoTransforms(scale_range=(0.1, 2.0))


def unflipped(boxes: torch.Tensor, out: dict) -> torch.Tensor:
    """Undoes the horizontal flip, which mirrors boxes inside the valid width."""
    if not out["flipped"]:
        return boxes
    width = out["valid_size"][1]
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def crop_window_in_original(out: dict) -> torch.Tensor:
    """The part of the original image the canvas shows, as an XYXY box in original pixels."""
    height, width = out["valid_size"]
    return boxes_to_original(
        torch.tensor([[0.0, 0.0, width, height]], dtype=torch.float64), out["scale"], out["crop_offset"]
    )[0]


def intersect(box: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.maximum(box[:2], window[:2]), torch.minimum(box[2:], window[2:])])


def white_extent(image: torch.Tensor) -> list[int]:
    """XYXY extent of the pixels that were white before normalization (> 1 in every channel)."""
    rows, cols = torch.nonzero((image > 1.0).all(dim=0), as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_a_coco_box_after_large_scale_jitter_maps_back_to_original_pixels(coco_fixture):
    reader = CocoDetection(coco_fixture.root, "val")
    index = reader.image_ids.index(coco_fixture.annotated_image_id)
    original_boxes, labels = coco_fixture.expected_targets[coco_fixture.annotated_image_id]
    original = dict(zip(labels, torch.tensor(original_boxes, dtype=torch.float64)))
    transform = build_transforms("detection", train=True, image_size=32, settings=LSJ)
    scales, crops, flips, kept = set(), 0, 0, 0
    for position in range(40):
        with seeded_rngs(position):
            out = transform(reader[index])
        assert tuple(out["image"].shape) == (3, 32, 32) and tuple(out["boxes"].canvas_size) == (32, 32)
        assert out["original_size"] == (30, 40)
        scales.add(out["scale"])
        crops += out["crop_offset"] != (0, 0)
        flips += out["flipped"]
        window = crop_window_in_original(out)
        back = boxes_to_original(
            unflipped(out["boxes"].as_subclass(torch.Tensor).double(), out), out["scale"], out["crop_offset"]
        )
        for label, box in zip(out["labels"].tolist(), back):
            # What the canvas shows of the box: the whole box, or the part inside the crop.
            assert box.tolist() == pytest.approx(intersect(original[label], window).tolist(), abs=1.0)
            kept += 1
    assert len(scales) > 20 and crops > 0 and 0 < flips < 40 and kept > 0


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_moves_image_and_box_together(seed):
    box = [40.0, 20.0, 90.0, 60.0]
    transform = build_transforms(
        "detection", train=True, image_size=64, settings=CocoTransforms(scale_range=(0.5, 2.0))
    )
    with seeded_rngs(seed):
        out = transform(rectangle_sample(120, 80, box))
    height, width = out["valid_size"]
    assert out["image"][:, height:].eq(0).all() and out["image"][:, :, width:].eq(0).all()
    (out_box,) = out["boxes"].tolist()
    assert white_extent(out["image"]) == pytest.approx(out_box, abs=1.0)
    back = boxes_to_original(
        unflipped(out["boxes"].as_subclass(torch.Tensor).double(), out), out["scale"], out["crop_offset"]
    )[0]
    assert back.tolist() == pytest.approx(
        intersect(torch.tensor(box, dtype=torch.float64), crop_window_in_original(out)).tolist(), abs=1.0
    )


def test_the_same_seed_draws_the_same_jitter_and_others_differ():
    transform = build_transforms("detection", train=True, image_size=64, settings=LSJ)
    draws = []
    for seed in (3, 3, 4):
        with seeded_rngs(seed):
            out = transform(rectangle_sample(120, 80, [40.0, 20.0, 90.0, 60.0]))
        draws.append((out["valid_size"], out["scale"], out["crop_offset"], out["flipped"], out["image"]))
    assert draws[0][:4] == draws[1][:4] and torch.equal(draws[0][4], draws[1][4])
    assert draws[0][:4] != draws[2][:4]


@pytest.mark.parametrize(
    ("width", "height", "valid"), [(100, 50, (20, 40)), (30, 60, (40, 20)), (40, 40, (40, 40))]
)
def test_eval_resizes_the_longest_side_and_pads_bottom_right(width, height, valid):
    out = build_transforms("detection", train=False, image_size=40)(
        rectangle_sample(width, height, [0.0, 0.0, 10.0, 10.0])
    )
    assert tuple(out["image"].shape) == (3, 40, 40) and out["valid_size"] == valid
    assert out["scale"] == (valid[0] / height, valid[1] / width) and out["crop_offset"] == (0, 0)
    assert not out["flipped"] and out["original_size"] == (height, width)
    assert out["image"][:, valid[0] :].eq(0).all() and out["image"][:, :, valid[1] :].eq(0).all()
    # The top-left box stays at the origin (padding shifts nothing) and is scaled by the image's factor.
    assert out["boxes"][0].tolist() == pytest.approx(
        [0.0, 0.0, 10 * valid[1] / width, 10 * valid[0] / height]
    )


def test_without_jitter_training_fits_pads_and_flips_inside_the_valid_extent():
    transform = build_transforms("detection", train=True, image_size=24)
    seen = set()
    for seed in range(12):
        with seeded_rngs(seed):
            out = transform(rectangle_sample(48, 30, [2.0, 4.0, 10.0, 12.0]))
        assert out["valid_size"] == (15, 24) and out["scale"] == (0.5, 0.5) and out["crop_offset"] == (0, 0)
        assert out["image"][:, 15:].eq(0).all()
        (box,) = out["boxes"].tolist()
        assert white_extent(out["image"]) == pytest.approx(box, abs=1.0)
        seen.add(tuple(box))
    # Mirrored within the 24 px valid width (which here is the canvas width too).
    assert seen == {(1.0, 2.0, 5.0, 6.0), (19.0, 2.0, 23.0, 6.0)}


def test_a_narrow_image_flips_within_its_valid_width_not_the_canvas():
    transform = build_transforms("detection", train=True, image_size=40)
    for seed in range(12):
        with seeded_rngs(seed):
            out = transform(rectangle_sample(20, 40, [2.0, 4.0, 6.0, 12.0]))
        assert out["valid_size"] == (40, 20)
        expected = [14.0, 4.0, 18.0, 12.0] if out["flipped"] else [2.0, 4.0, 6.0, 12.0]
        assert out["boxes"].tolist() == [expected]
        assert white_extent(out["image"]) == expected
