"""Sample dicts whose content a transform's output can be checked against, shared by the transform tests."""

from __future__ import annotations

import torch
from torchvision import tv_tensors


def rectangle_sample(width: int, height: int, box: list[float], label: int = 7) -> dict:
    """A detection sample: black image with a white rectangle exactly under ``box`` (XYXY, integer pixels),
    labelled ``label``."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = (int(value) for value in box)
    image[:, y1:y2, x1:x2] = 255
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes([box], format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([label]),
        "image_id": 1,
        "key": "train2017/000000000001",
    }
