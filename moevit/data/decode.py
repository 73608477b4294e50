"""Decoding shared by the folder readers and the webdataset shard readers.

Every function here takes either a path or the raw bytes of the original file, so a folder reader
(which opens files) and a shard reader (which holds the same files' bytes from a tar member) produce
identical samples.

- ``decode_image``: any image Pillow can identify, decoded by content rather than by extension
  (ImageNet holds one PNG named ``.JPEG``, a few CMYK JPEGs and many grayscale ones), always returned
  as ``tv_tensors.Image`` uint8 RGB of shape (3, H, W).
- ``coco_target_from_annotations``: COCO ``instances_*.json`` annotations of one image to XYXY boxes
  and contiguous labels, dropping crowd regions and boxes smaller than 1 px after clipping
  (COCO format: https://cocodataset.org/#format-data).
- ``ade20k_mask_from_png``: an ADE20K SceneParsing label PNG (0 = "other", 1..150 = classes) to a
  ``tv_tensors.Mask``, with mmsegmentation's ``reduce_zero_label`` (0 -> 255 ignore, k -> k - 1).

Unreadable input raises ``CorruptSampleError`` naming the file.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from moevit.config.labels import IGNORE_INDEX
from moevit.data.errors import CorruptSampleError

ADE20K_NUM_CLASSES = 150

ImageSource = bytes | bytearray | memoryview | str | os.PathLike

# Pillow signals damaged files with several exception types, depending on the plugin and on where the
# damage is (header, entropy-coded data, chunk table).
_PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return os.fspath(source)


def _read_pixels(source: ImageSource, name: str, to_rgb: bool) -> np.ndarray:
    """Fully decodes an image into a writable array, so truncation surfaces here and not in a transform."""
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        with Image.open(stream) as image:
            image.load()
            if to_rgb and image.mode != "RGB":
                image = image.convert("RGB")
            return np.array(image)
    except FileNotFoundError:
        raise CorruptSampleError(name, "file not found") from None
    except _PIL_READ_ERRORS as err:
        raise CorruptSampleError(name, f"cannot decode image ({type(err).__name__}: {err})") from err


def decode_image(source: ImageSource, name: str | None = None) -> tv_tensors.Image:
    """Decodes an image file (path or bytes) to a uint8 RGB ``tv_tensors.Image`` of shape (3, H, W).

    The format is detected from the content, so a PNG stored as ``.JPEG`` decodes. CMYK (Pillow undoes
    Adobe's inverted CMYK), grayscale, palette and alpha images are converted to RGB. ``name`` is what
    errors report when ``source`` is bytes (e.g. the shard key).
    """
    pixels = _read_pixels(source, _source_name(source, name), to_rgb=True)
    return tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())


def apply_reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label``: 0 -> 255 (ignore), k -> k - 1, 255 stays 255 (uint8)."""
    reduced = mask.astype(np.uint8, copy=True)
    reduced[reduced == 0] = IGNORE_INDEX
    reduced -= 1
    reduced[reduced == IGNORE_INDEX - 1] = IGNORE_INDEX
    return reduced


def ade20k_mask_from_png(
    source: ImageSource,
    reduce_zero_label: bool = True,
    num_classes: int = ADE20K_NUM_CLASSES,
    name: str | None = None,
) -> tv_tensors.Mask:
    """Decodes an ADE20K label PNG (path or bytes) to a ``tv_tensors.Mask`` (H, W) uint8.

    Args:
        source: path or bytes of a single-channel PNG whose pixel values are class indices.
        reduce_zero_label: apply mmsegmentation's reduce_zero_label: stored 0 ("other") becomes 255
            (ignore) and 1..num_classes become 0..num_classes-1. Without it the stored values must
            already be in [0, num_classes) or 255.
        num_classes: number of classes after reduction (150 for ADE20K SceneParsing).
        name: what errors report when ``source`` is bytes.

    Values outside the valid range (other than 255) raise ``CorruptSampleError``: such a label would
    index past the classifier and fail far from its cause.
    """
    name = _source_name(source, name)
    labels = _read_pixels(source, name, to_rgb=False)
    if labels.ndim != 2:
        raise CorruptSampleError(
            name, f"label PNG must have one channel of class indices, got shape {labels.shape}"
        )
    highest_valid = num_classes if reduce_zero_label else num_classes - 1
    invalid = (labels > highest_valid) & (labels != IGNORE_INDEX)
    if invalid.any():
        bad_values = np.unique(labels[invalid])[:8].tolist()
        raise CorruptSampleError(
            name, f"label values {bad_values} outside [0, {highest_valid}] and {IGNORE_INDEX}"
        )
    labels = apply_reduce_zero_label(labels) if reduce_zero_label else labels.astype(np.uint8)
    return tv_tensors.Mask(torch.from_numpy(labels))


class CocoTarget(NamedTuple):
    """Training target of one COCO image: XYXY boxes, contiguous labels, and how many boxes were dropped."""

    boxes: tv_tensors.BoundingBoxes
    labels: torch.Tensor
    num_degenerate: int


def clip_coco_box(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x, y, w, h]`` to XYXY clipped to the image; None when under 1 px wide or tall after clipping.

    A box wholly outside the image clips to negative extent and is therefore None as well.
    """
    if len(bbox) != 4:
        raise ValueError(f"COCO bbox must be [x, y, width, height], got {list(bbox)}")
    x, y, box_width, box_height = (float(value) for value in bbox)
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + box_width, float(width)), min(y + box_height, float(height))
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return x1, y1, x2, y2


def coco_target_from_annotations(
    anns: Iterable[Mapping], width: int, height: int, cat_id_to_label: Mapping[int, int]
) -> CocoTarget:
    """Turns the COCO annotations of one image into its training target.

    Args:
        anns: the image's annotation dicts as in ``instances_*.json`` (``bbox``, ``category_id``,
            optional ``iscrowd``).
        width: image width in pixels from the image record.
        height: image height in pixels from the image record.
        cat_id_to_label: COCO category id (int) -> contiguous label in [0, C).

    Crowd annotations (``iscrowd=1``) are left out: they mark regions, not instances, and COCOeval
    treats them as "ignore" from the original JSON. Degenerate boxes are dropped and counted.
    """
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    num_degenerate = 0
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        category_id = ann["category_id"]
        if category_id not in cat_id_to_label:
            raise ValueError(
                f"annotation {ann.get('id')} has category_id {category_id}, not among the categories"
            )
        box = clip_coco_box(ann["bbox"], width, height)
        if box is None:
            num_degenerate += 1
            continue
        boxes.append(box)
        labels.append(cat_id_to_label[category_id])
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return CocoTarget(
        boxes=tv_tensors.BoundingBoxes(box_tensor, format="XYXY", canvas_size=(height, width)),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_degenerate=num_degenerate,
    )
