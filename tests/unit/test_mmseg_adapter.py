"""The mmsegmentation decode-head adapter (moevit/heads/mmseg_head.py) with a stand-in mmseg.

mmsegmentation needs mmcv's compiled ops, which no build fits the pinned torch, so the real package is
never installed here. These tests inject minimal `mmseg` and `mmengine` modules into `sys.modules`
holding only what the adapter touches (the MODELS registry, `register_all_modules`, `SegDataSample`,
`PixelData`) and a small decode head with mmseg 1.x's interface (`forward(list of maps)`,
`loss_by_feat(seg_logits, data_samples)`, `align_corners`, `init_weights`). They exercise the adapter's
own logic: the config it completes and checks, the neck it feeds the head, the resizing of the logits,
how masks become data samples, and which of the head's outputs it sums into the loss. They say nothing
about compatibility with the real mmsegmentation, which stays untested.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moevit.heads import MMSegDecodeHead, build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel

IMAGE_SIZE, NUM_CLASSES, IGNORE = 32, 4, 255


class Record:
    """mmengine's PixelData / mmseg's SegDataSample, reduced to keyword fields."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class StandInDecodeHead(nn.Module):
    """A decode head with mmseg's BaseDecodeHead interface: every level projected, resized to the first
    and summed, then classified. Its loss_by_feat returns two losses and a metric, as mmseg's do."""

    built: list = []

    def __init__(self, in_channels, in_index, channels, num_classes, align_corners=False):
        super().__init__()
        self.config = {"in_channels": in_channels, "in_index": in_index, "num_classes": num_classes}
        self.align_corners = align_corners
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.classify = nn.Conv2d(channels, num_classes, 1)
        self.initialised = False
        self.seen_shapes = None
        StandInDecodeHead.built.append(self)

    def init_weights(self):
        self.initialised = True

    def forward(self, inputs):
        self.seen_shapes = [tuple(x.shape) for x in inputs]
        size = inputs[0].shape[-2:]
        fused = sum(
            F.interpolate(conv(inputs[i]), size=size, mode="bilinear", align_corners=self.align_corners)
            for conv, i in zip(self.lateral, self.config["in_index"])
        )
        return self.classify(fused)

    def loss_by_feat(self, seg_logits, data_samples):
        labels = torch.stack([sample.gt_sem_seg.data for sample in data_samples]).squeeze(1)
        logits = F.interpolate(
            seg_logits, labels.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )
        return {
            "loss_ce": F.cross_entropy(logits, labels, ignore_index=IGNORE),
            "loss_aux": 0.25 * logits.square().mean(),
            "acc_seg": torch.tensor(50.0),
        }


@pytest.fixture
def stand_in_mmseg(monkeypatch):
    """Installs the stand-in packages; returns the scopes register_all_modules was called with."""
    scopes = []

    def build(config):
        config = dict(config)
        assert config.pop("type") == "StandInHead", config
        return StandInDecodeHead(**config)

    modules = {
        "mmseg": types.ModuleType("mmseg"),
        "mmseg.registry": types.SimpleNamespace(MODELS=types.SimpleNamespace(build=build)),
        "mmseg.utils": types.SimpleNamespace(
            register_all_modules=lambda init_default_scope: scopes.append(init_default_scope)
        ),
        "mmseg.structures": types.SimpleNamespace(SegDataSample=Record),
        "mmengine": types.ModuleType("mmengine"),
        "mmengine.structures": types.SimpleNamespace(PixelData=Record),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    StandInDecodeHead.built.clear()
    return scopes


def segmentation_model(decode_head: dict) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_model("moevit_debug", tasks=["seg"], img_size=IMAGE_SIZE)
    head = build_head("segmentation", NUM_CLASSES, backbone, IMAGE_SIZE, mmseg_decode_head=decode_head)
    return MultiTaskModel(backbone, {"seg": head})


def test_the_adapter_completes_the_config_and_feeds_the_neck_maps(stand_in_mmseg):
    model = segmentation_model({"type": "StandInHead", "channels": 8, "align_corners": True})
    head = model.heads["seg"]
    assert isinstance(head, MMSegDecodeHead) and stand_in_mmseg == [True]
    (decode_head,) = StandInDecodeHead.built
    embed_dim = model.backbone.embed_dim
    assert decode_head.config == {"in_channels": [embed_dim] * 4, "in_index": [0, 1, 2, 3], "num_classes": 4}
    assert decode_head.initialised  # the config's init_cfg is applied, as mmengine does not at construction

    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        logits = model.predict("seg", {"images": images})
    grid = IMAGE_SIZE // model.backbone.patch_size  # the neck's 4x, 2x, 1x, 0.5x of the patch grid
    assert decode_head.seen_shapes == [(2, embed_dim, s, s) for s in (4 * grid, 2 * grid, grid, grid // 2)]
    assert logits.shape == (2, NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE)
    # The logits are the head's, resized to the images with the head's align_corners.
    with torch.no_grad():
        maps = head.neck(model.backbone.forward_backbone(images, "seg", head.feature_indices).intermediates)
        expected = F.interpolate(
            decode_head(maps), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True
        )
    assert torch.equal(logits, expected)


def test_the_loss_sums_the_heads_losses_and_drops_its_metric(stand_in_mmseg):
    model = segmentation_model({"type": "StandInHead", "channels": 8})
    masks = torch.randint(0, NUM_CLASSES, (2, IMAGE_SIZE, IMAGE_SIZE))
    masks[0, :4] = IGNORE
    losses = model("seg", {"images": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), "masks": masks}).losses
    assert set(losses) == {"loss", "loss_ce", "loss_aux"}  # acc_seg is a metric, not a loss
    assert torch.equal(losses["loss"], losses["loss_ce"] + losses["loss_aux"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.heads["seg"].parameters())  # neck and head train


def test_bad_decode_head_configs_are_refused(stand_in_mmseg):
    with pytest.raises(ValueError, match="decode_head.num_classes=7 but the task has 4 classes"):
        segmentation_model({"type": "StandInHead", "channels": 8, "num_classes": 7})
    with pytest.raises(ValueError, match="needs a 'type'"):
        segmentation_model({"channels": 8})
    with pytest.raises(ValueError, match="must pair up one to one"):
        MMSegDecodeHead(64, NUM_CLASSES, [0, 1], {"type": "StandInHead", "channels": 8})
