"""COCO 2017 object detection read through pycocotools: ``root/{train,val}2017/*.jpg`` and
``root/annotations/instances_{train,val}2017.json`` (format: https://cocodataset.org/#format-data).

COCO's 80 category ids run from 1 to 90 with gaps; labels are their positions among the sorted ids
(``cat_id_to_label`` / ``label_to_cat_id`` map both ways, the latter for writing results in COCO's ids).
Training targets leave crowd regions out and drop boxes under 1 px after clipping; evaluation reads the
original JSON through ``coco`` / ``annotation_file``, where COCOeval treats crowd regions as "ignore".
Images without annotations stay in the dataset with empty targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from moevit.data.decode import clip_coco_box, coco_target_from_annotations, decode_image
from moevit.data.errors import CorruptSampleError, DatasetLayoutError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val"}
EXPECTED_LAYOUT = "ROOT/{train,val}2017/*.jpg and ROOT/annotations/instances_{train,val}2017.json"


def resolve_split(split: str) -> str:
    """Maps "train"/"training" and "val"/"validation" to COCO's split name; anything else is a ValueError."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown COCO split {split!r}; expected one of {sorted(SPLIT_NAMES)}")
    return SPLIT_NAMES[split]


def _load_coco(annotation_file: Path) -> COCO:
    # Imported here, not at module level: importing moevit.data (collate, transforms) must not need
    # pycocotools where no COCO file is read (benchmarks/gpu_check.py on a bare GPU machine).
    from pycocotools.coco import COCO

    try:
        # pycocotools prints progress to stdout; keep it out of training logs.
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as err:
        raise DatasetLayoutError(
            f"{annotation_file} is not a COCO instances file ({type(err).__name__}: {err})"
        ) from err


class CocoDetection(Dataset):
    """Detection samples ``{"image", "boxes", "labels", "image_id", "key"}`` from COCO 2017.

    Args:
        root: folder holding ``{split}2017/`` and ``annotations/``.
        split: "train" or "val" ("training"/"validation" are accepted too).

    Attributes:
        coco: the pycocotools ``COCO`` object of the annotation file (for COCOeval).
        annotation_file: path of ``instances_{split}2017.json``.
        classes: category names in label order.
        label_to_cat_id: label -> COCO category id.
        cat_id_to_label: COCO category id -> label.
        image_ids: COCO image ids in sample order (sorted).
        num_degenerate_boxes: non-crowd boxes dropped for being under 1 px after clipping (or outside).
        num_crowd_boxes: crowd annotations left out of training targets.

    Raises:
        DatasetLayoutError: missing image folder or annotation file, invalid JSON, no categories, an
            image record without size, or an annotation with an unknown image or category id.
    """

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        self.split = resolve_split(split)
        self.image_dir = self.root / f"{self.split}2017"
        self.annotation_file = self.root / "annotations" / f"instances_{self.split}2017.json"
        for required in (self.root, self.image_dir, self.annotation_file):
            if not required.exists():
                raise DatasetLayoutError(f"COCO path {required} not found; expected {EXPECTED_LAYOUT}")
        self.coco = _load_coco(self.annotation_file)
        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda category: category["id"])
        if not categories:
            raise DatasetLayoutError(f"{self.annotation_file} lists no categories")
        self.label_to_cat_id = [category["id"] for category in categories]
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(self.label_to_cat_id)}
        self.classes = [category["name"] for category in categories]
        self.image_ids = sorted(self.coco.getImgIds())
        self._check_image_records()
        self.num_degenerate_boxes, self.num_crowd_boxes = self._count_excluded_boxes()
        logger.info(
            "COCO %s: %d images, %d crowd boxes excluded, %d degenerate boxes dropped",
            self.split,
            len(self.image_ids),
            self.num_crowd_boxes,
            self.num_degenerate_boxes,
        )

    def _check_image_records(self) -> None:
        for image_id in self.image_ids:
            record = self.coco.imgs[image_id]
            missing = [field for field in ("file_name", "width", "height") if field not in record]
            if missing:
                raise DatasetLayoutError(f"{self.annotation_file}: image {image_id} lacks {missing}")

    def _count_excluded_boxes(self) -> tuple[int, int]:
        num_degenerate = num_crowd = 0
        for ann in self.coco.dataset.get("annotations", []):
            where = f"{self.annotation_file}: annotation {ann.get('id')}"
            if ann["image_id"] not in self.coco.imgs:
                raise DatasetLayoutError(f"{where} refers to unknown image id {ann['image_id']}")
            if ann["category_id"] not in self.cat_id_to_label:
                raise DatasetLayoutError(f"{where} has unknown category id {ann['category_id']}")
            if ann.get("iscrowd", 0):
                num_crowd += 1
                continue
            record = self.coco.imgs[ann["image_id"]]
            if clip_coco_box(ann["bbox"], record["width"], record["height"]) is None:
                num_degenerate += 1
        return num_degenerate, num_crowd

    def labels_to_cat_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels -> COCO category ids (for detections written in COCO's results format)."""
        return torch.tensor(self.label_to_cat_id, dtype=torch.int64, device=labels.device)[labels]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        record = self.coco.imgs[image_id]
        path = self.image_dir / record["file_name"]
        image = decode_image(path)
        width, height = record["width"], record["height"]
        if tuple(image.shape[-2:]) != (height, width):
            raise CorruptSampleError(
                path, f"image is {image.shape[-1]}x{image.shape[-2]} but the annotation says {width}x{height}"
            )
        target = coco_target_from_annotations(
            self.coco.imgToAnns[image_id], width, height, self.cat_id_to_label
        )
        return {
            "image": image,
            "boxes": target.boxes,
            "labels": target.labels,
            "image_id": image_id,
            "key": f"{self.split}2017/{os.path.splitext(record['file_name'])[0]}",
        }
