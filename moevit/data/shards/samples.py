"""Raw shard samples -> the folder readers' sample dicts.

``ShardSampleDecoder`` calls the functions of ``moevit.data.decode`` on the member bytes that
``writer.py`` copied from the original files, with the checks the folder readers make (COCO record
size against the image, ADE20K mask size against the image), so a shard sample equals the folder
sample: same tensors, labels, boxes, masks and key.

A sample that fails to decode raises ``CorruptSampleError``; ``moevit.data.skip.SkipCorrupt`` replaces
and counts it, as for folder files.
"""

from __future__ import annotations

import json

from moevit.data.decode import (
    ADE20K_NUM_CLASSES,
    ade20k_mask_from_png,
    coco_target_from_annotations,
    decode_image,
)
from moevit.data.errors import CorruptSampleError
from moevit.data.shards.layout import ShardInfo, decode_key

MEMBERS = {"imagenet": ("jpg", "cls"), "coco": ("jpg", "json"), "ade20k": ("jpg", "png")}


class ShardSampleDecoder:
    """Decodes one raw WebDataset sample (``{"__key__", "__url__", extension: bytes}``) of a shard directory.

    Args:
        info: the directory's ``_info.json`` content.
        reduce_zero_label: ADE20K only, as ``moevit.data.ade20k.ADE20K``: stored 0 -> 255 (ignore), k -> k - 1.

    Raises (from ``__call__``):
        CorruptSampleError: a member is missing or undecodable, or sizes disagree; the path names the
            shard and the sample key.
    """

    def __init__(self, info: ShardInfo, reduce_zero_label: bool = True) -> None:
        self.dataset = info.dataset
        self.num_labels = len(info.classes)
        self.cat_id_to_label = info.cat_id_to_label if info.dataset == "coco" else {}
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = ADE20K_NUM_CLASSES if reduce_zero_label else ADE20K_NUM_CLASSES + 1

    def __call__(self, raw: dict) -> dict:
        key = decode_key(raw["__key__"])
        name = f"{raw.get('__url__')}:{key}"
        absent = [extension for extension in MEMBERS[self.dataset] if extension not in raw]
        if absent:
            present = sorted(member for member in raw if not member.startswith("__"))
            raise CorruptSampleError(name, f"lacks tar members {absent} (has {present})")
        return getattr(self, f"_{self.dataset}")(raw, key, name)

    def _imagenet(self, raw: dict, key: str, name: str) -> dict:
        try:
            label = int(raw["cls"])
        except ValueError:
            raise CorruptSampleError(name, f"label {raw['cls'][:20]!r} is not an integer") from None
        if not 0 <= label < self.num_labels:
            raise CorruptSampleError(name, f"label {label} outside [0, {self.num_labels})")
        return {"image": decode_image(raw["jpg"], name), "label": label, "key": key}

    def _coco(self, raw: dict, key: str, name: str) -> dict:
        try:
            annotations = json.loads(raw["json"])
            record = annotations["image"]
            width, height, image_id = record["width"], record["height"], record["id"]
            image_annotations = annotations["annotations"]
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptSampleError(
                name, f"unreadable annotation member ({type(err).__name__}: {err})"
            ) from None
        image = decode_image(raw["jpg"], name)
        if tuple(image.shape[-2:]) != (height, width):
            raise CorruptSampleError(
                name, f"image is {image.shape[-1]}x{image.shape[-2]} but the annotation says {width}x{height}"
            )
        target = coco_target_from_annotations(image_annotations, width, height, self.cat_id_to_label)
        return {
            "image": image,
            "boxes": target.boxes,
            "labels": target.labels,
            "image_id": image_id,
            "key": key,
        }

    def _ade20k(self, raw: dict, key: str, name: str) -> dict:
        image = decode_image(raw["jpg"], name)
        mask = ade20k_mask_from_png(raw["png"], self.reduce_zero_label, self.num_classes, name=f"{name}.png")
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise CorruptSampleError(
                name, f"mask is {tuple(mask.shape)} (H, W) but the image is {tuple(image.shape[-2:])}"
            )
        return {"image": image, "mask": mask, "key": key}
