"""The install resolved a torch that torchvision (and so timm) can run with.

Some machines carry a local `torch 2.13.0+cpu` wheel in pip's find-links; with it torchvision's
compiled ops fail to load. pyproject's `torch>=2.14` keeps pip away from it; this checks the result.
"""

import torch
import torchvision


def test_torchvision_compiled_ops_load_with_installed_torch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_timm_imports():
    import timm

    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0) is not None
