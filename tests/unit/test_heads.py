"""Tests for the task heads (moevit/heads): output formats, gradients, losses, input checks."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_iou

from moevit.heads import (
    MultiLevelNeck,
    SimpleFeaturePyramid,
    TaskHead,
    build_head,
    build_mmseg_decode_head,
    evenly_spaced_blocks,
)
from moevit.heads.segmentation import UperNetHead
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel

IMAGE_SIZE = 64
NUM_CLASSES = {"cls": 10, "det": 5, "seg": 6}
TASK_TYPES = {"cls": "classification", "det": "detection", "seg": "segmentation"}
SMALL = {"cls": {}, "det": {"out_channels": 32}, "seg": {"channels": 32}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model(**head_options) -> MultiTaskModel:
    backbone = create_model("moevit_debug", tasks=list(TASK_TYPES), img_size=IMAGE_SIZE)
    heads = {
        task: build_head(
            TASK_TYPES[task],
            NUM_CLASSES[task],
            backbone,
            IMAGE_SIZE,
            **SMALL[task],
            **head_options.get(task, {}),
        )
        for task in TASK_TYPES
    }
    return MultiTaskModel(backbone, heads)


def two_box_target() -> dict:
    return {
        "boxes": torch.tensor([[4.0, 6.0, 28.0, 30.0], [34.0, 30.0, 60.0, 58.0]]),
        "labels": torch.tensor([1, 3]),
    }


def empty_target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def make_batch(task: str, batch_size: int = 2) -> dict:
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    if task == "cls":
        return {"images": images, "labels": torch.arange(batch_size) % NUM_CLASSES["cls"]}
    if task == "det":
        return {"images": images, "targets": [two_box_target()] + [empty_target()] * (batch_size - 1)}
    masks = torch.randint(0, NUM_CLASSES["seg"], (batch_size, IMAGE_SIZE, IMAGE_SIZE))
    masks[:, :8] = 255
    return {"images": images, "masks": masks}


def parameters_without_grad(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def overfit(model: MultiTaskModel, task: str, batch: dict, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(task, batch).losses["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------ all heads
@pytest.mark.parametrize("task", list(TASK_TYPES))
def test_every_head_parameter_gets_a_gradient(task):
    model = make_model()
    head = model.heads[task]
    assert isinstance(head, TaskHead)
    losses = model(task, make_batch(task)).losses
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert parameters_without_grad(head) == []


def test_dense_heads_say_which_blocks_they_read():
    model = make_model()
    assert model.heads["cls"].feature_indices is None
    assert model.heads["det"].feature_indices == [3]  # ViTDet: the last block
    assert model.heads["seg"].feature_indices == [0, 1, 2, 3]
    assert evenly_spaced_blocks(12) == [2, 5, 8, 11]


@pytest.mark.parametrize("task", ["det", "seg"])
def test_dense_head_without_its_maps_is_a_clear_error(task):
    model = make_model()
    batch = make_batch(task)
    out = model.backbone.forward_backbone(batch["images"], task)  # no intermediates requested
    with pytest.raises(ValueError, match="intermediate_indices=head.feature_indices"):
        model.heads[task].forward_loss(out, batch)


def test_build_head_rejects_bad_requests():
    backbone = create_model("moevit_debug", tasks=["seg"], img_size=IMAGE_SIZE)
    with pytest.raises(TypeError, match="does not take option.*'chanels'"):
        build_head("segmentation", 3, backbone, IMAGE_SIZE, chanels=32)
    with pytest.raises(ValueError, match="unknown task type 'depth'"):
        build_head("depth", 3, backbone, IMAGE_SIZE)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        build_head("classification", 3, backbone, 60)
    with pytest.raises(ValueError, match="outside the backbone's 4 blocks"):
        build_head("segmentation", 3, backbone, IMAGE_SIZE, in_indices=[1, 2, 3, 4], channels=32)
    with pytest.raises(ValueError, match="coarsest level has stride 64"):
        build_head("detection", 3, backbone, 16, out_channels=32, scales=(1.0, 0.5, 0.25))


# ------------------------------------------------------------- classification
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_classification_logits(pool):
    model = make_model(cls={"pool": pool})
    batch = make_batch("cls", batch_size=3)
    logits = model.predict("cls", batch)
    assert logits.shape == (3, NUM_CLASSES["cls"])
    loss = model(task="cls", batch=batch).losses["loss"]
    torch.testing.assert_close(loss, F.cross_entropy(model.predict("cls", batch), batch["labels"]))


def test_classification_without_class_token_pools_the_average():
    backbone = create_model("moevit_debug", tasks=["cls"], img_size=IMAGE_SIZE, class_token=False)
    assert build_head("classification", 4, backbone, IMAGE_SIZE).pool == "avg"
    with pytest.raises(ValueError, match="needs a class token"):
        build_head("classification", 4, backbone, IMAGE_SIZE, pool="token")


def test_classification_rejects_labels_out_of_range():
    model = make_model()
    batch = make_batch("cls")
    batch["labels"] = torch.tensor([0, 10])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model("cls", batch)


def test_classification_overfits_a_tiny_batch():
    model = make_model()
    losses = overfit(model, "cls", make_batch("cls", batch_size=4), steps=20, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ detection
def test_detection_trains_on_an_image_without_boxes():
    model = make_model()
    batch = {"images": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), "targets": [empty_target(), empty_target()]}
    losses = model("det", batch).losses
    assert set(losses) == {"loss", "classification", "bbox_regression"}
    assert all(torch.isfinite(value) for value in losses.values())
    # With no object anywhere only the classifier learns ("everything is background").
    assert losses["bbox_regression"] == 0 and losses["classification"] > 0
    losses["loss"].backward()
    assert model.heads["det"].detector.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


def test_detection_predictions_lie_in_the_image_with_contiguous_labels():
    model = make_model(det={"score_thresh": 0.0, "detections_per_img": 50})  # every candidate is returned
    model.eval()
    detections = model.predict("det", make_batch("det", batch_size=3))
    assert len(detections) == 3
    for image_detections in detections:
        boxes, scores, labels = (
            image_detections["boxes"],
            image_detections["scores"],
            image_detections["labels"],
        )
        assert boxes.shape == (50, 4) and scores.shape == (50,) and labels.shape == (50,)
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < NUM_CLASSES["det"]
        assert (boxes >= 0).all() and (boxes <= IMAGE_SIZE).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (scores[:-1] >= scores[1:]).all()


def test_detection_boxes_are_clipped_to_each_images_valid_extent():
    model = make_model(det={"score_thresh": 0.0, "detections_per_img": 200})  # every candidate is returned
    model.eval()
    batch = make_batch("det", batch_size=3)
    valid = [(IMAGE_SIZE, 24), (40, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE)]  # (h, w) inside the 64 px canvas
    unclipped = model.predict("det", batch)
    clipped = model.predict("det", {**batch, "image_sizes": valid})
    for (height, width), before, after in zip(valid, unclipped, clipped):
        boxes = after["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            # Some candidates over the whole canvas reached into what is padding for this image.
            assert (before["boxes"][:, 2] > width).any() or (before["boxes"][:, 3] > height).any()
    assert torch.equal(clipped[2]["boxes"], unclipped[2]["boxes"])  # a full image is unchanged
    with pytest.raises(ValueError, match=r"image_sizes \[\(65, 64\)\] do not fit the 64x64 canvas"):
        model.predict("det", {**batch, "image_sizes": [(65, IMAGE_SIZE), *valid[1:]]})


def test_detection_forward_follows_the_training_flag():
    model = make_model()
    head = model.heads["det"]
    batch = make_batch("det")
    out = model.backbone.forward_backbone(batch["images"], "det", head.feature_indices)
    assert "loss" in head(out.intermediates[0], batch["images"], batch["targets"])
    with pytest.raises(ValueError, match="needs targets"):
        head(out.intermediates[0], batch["images"])
    head.eval()
    assert isinstance(head(out.intermediates[0], batch["images"]), list)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([0])}, "has no area"),
        ({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([5])}, r"\[0, 5\)"),
        (
            {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0, 1])},
            "1 boxes but 2 labels",
        ),
        ({"boxes": torch.tensor([1.0, 1.0, 9.0, 9.0]), "labels": torch.tensor([0])}, r"float \(N, 4\)"),
        ({"labels": torch.tensor([0])}, "no 'boxes' entry"),
    ],
)
def test_detection_rejects_bad_targets(target, message):
    model = make_model()
    batch = {"images": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), "targets": [target]}
    with pytest.raises((ValueError, KeyError), match=message):
        model("det", batch)


def test_detection_overfits_one_image_with_two_boxes():
    model = make_model()
    batch = {"images": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), "targets": [two_box_target()]}
    losses = overfit(model, "det", batch, steps=20, lr=1e-3)
    assert losses[-1] < 0.25 * losses[0], losses
    # The two best detections are the two boxes, in input pixels, with their labels.
    model.eval()
    (detections,) = model.predict("det", batch)
    target = two_box_target()
    iou = box_iou(target["boxes"], detections["boxes"][:2])
    best = iou.argmax(dim=1)
    assert (iou.max(dim=1).values > 0.7).all(), iou
    assert torch.equal(detections["labels"][best], target["labels"])


# --------------------------------------------------------------- segmentation
def test_segmentation_logits_at_input_resolution():
    model = make_model()
    model.eval()
    logits = model.predict("seg", make_batch("seg", batch_size=3))
    assert logits.shape == (3, NUM_CLASSES["seg"], IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("channels", [32, 48, 64])
def test_a_narrow_upernet_trains_on_one_image(channels):
    """Batch 1 in training: the pyramid pooling's 1x1 branch has one pixel per channel, so a GroupNorm
    group needs two channels (32 one-channel groups raised "Expected more than 1 value per channel")."""
    head = UperNetHead(embed_dim=64, num_classes=5, in_indices=[0, 1, 2, 3], channels=channels).train()
    maps = [torch.randn(1, 64, 4, 4) for _ in range(4)]
    logits = head(maps, (32, 32))
    head.loss(logits, torch.randint(0, 5, (1, 32, 32))).backward()
    assert all(
        norm.num_groups * 2 <= norm.num_channels for norm in head.modules() if isinstance(norm, nn.GroupNorm)
    )


def test_segmentation_loss_averages_over_pixels_not_ignored():
    head = make_model().heads["seg"]
    logits = torch.randn(2, NUM_CLASSES["seg"], 8, 8)
    masks = torch.randint(0, NUM_CLASSES["seg"], (2, 8, 8))
    masks[0, :5] = 255
    valid = masks != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], masks[valid])
    torch.testing.assert_close(head.loss(logits, masks), expected)


def test_segmentation_loss_is_zero_when_every_pixel_is_ignored():
    head = make_model().heads["seg"]
    logits = torch.randn(2, NUM_CLASSES["seg"], 8, 8, requires_grad=True)
    loss = head.loss(logits, torch.full((2, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_segmentation_rejects_bad_masks():
    head = make_model().heads["seg"]
    logits = torch.randn(1, NUM_CLASSES["seg"], 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 6\) or be 255, found \[6\]"):
        head.loss(logits, torch.full((1, 8, 8), 6))
    with pytest.raises(ValueError, match="masks must be int64"):
        head.loss(logits, torch.zeros(1, 8, 8, dtype=torch.uint8))


# -------------------------------------------------------------------- pyramid
def test_simple_feature_pyramid_strides_and_widths():
    pyramid = SimpleFeaturePyramid(embed_dim=64, out_channels=32, scales=(4.0, 2.0, 1.0, 0.5), extra_levels=1)
    maps = pyramid(torch.randn(2, 64, 8, 8))
    assert list(maps) == ["0", "1", "2", "3", "4"]
    assert [tuple(m.shape) for m in maps.values()] == [(2, 32, s, s) for s in (32, 16, 8, 4, 2)]
    assert pyramid.out_channels == 32 and pyramid.scales == [4.0, 2.0, 1.0, 0.5, 0.25]


def test_multi_level_neck_keeps_the_width():
    neck = MultiLevelNeck(embed_dim=64, scales=(4.0, 2.0, 1.0, 0.5))
    maps = neck([torch.randn(2, 64, 8, 8) for _ in range(4)])
    assert [tuple(m.shape) for m in maps] == [(2, 64, s, s) for s in (32, 16, 8, 4)]
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        neck([torch.randn(2, 64, 8, 8)])


def test_pyramid_scales_must_be_powers_of_two():
    with pytest.raises(ValueError, match="3.0 is not a power of two"):
        SimpleFeaturePyramid(embed_dim=64, scales=(3.0,))


# ---------------------------------------------------------------------- mmseg
@pytest.mark.skipif(importlib.util.find_spec("mmseg") is not None, reason="mmsegmentation is installed")
def test_mmseg_head_without_the_extra_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"optional `mmseg` extra"):
        build_mmseg_decode_head(
            {"type": "UPerHead", "in_channels": [64] * 4, "channels": 32, "num_classes": 3}
        )
