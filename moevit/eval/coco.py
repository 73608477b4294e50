"""COCO box AP with pycocotools' COCOeval against the dataset's own annotation JSON.

Detections are written in COCO's results format (https://cocodataset.org/#format-results):
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with the category id mapped back from
the contiguous label (``CocoDetection.label_to_cat_id``; COCO's ids have gaps) and the box in the
ORIGINAL image's pixels. The evaluation transform (moevit.data.transforms.detection) resized each
image, keeping its aspect ratio, to its own size and padded it bottom/right to the batch's square, so
a box predicted in canvas pixels is divided by that image's own resize factors (the batch's
``scales``, one (height, width) pair per image; the padding shifts nothing) and clipped to the
original image, whose size the COCO image record gives (the valid extent divided by the scale is the
original image, so this is also the clip to the valid extent). The batch's ``original_sizes`` must agree
with the record: a mismatch means the batch and the image ids do not belong together.

``COCOeval(iouType="bbox")`` then runs with ``params.imgIds`` restricted to the images evaluated
(``max_batches`` may cover part of the split), so crowd regions are "ignore" and AP is exactly the
official number on those images. Reported: ``bbox_mAP`` (AP@[.5:.95], stats[0]) and ``bbox_mAP_50``
(AP@.5, stats[1]) as fractions. No detections at all gives AP 0 from COCOeval itself: an empty
results set is built directly, because ``COCO.loadRes([])`` fails on ``anns[0]``. COCOeval reports
-1 when the evaluated images hold no non-crowd ground truth; that undefined AP is returned as NaN.
pycocotools prints progress on stdout; it is captured and sent to this module's logger (DEBUG).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from moevit.data.transforms.detection import boxes_to_original
from moevit.eval.distributed import DedupedMetric, sample_ids

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _pycocotools_output_to_log():
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    if captured.getvalue().strip():
        logger.debug("pycocotools:\n%s", captured.getvalue().rstrip())


def _results_coco(coco_gt: COCO, results: list[dict]) -> COCO:
    """The results as a COCO object, as ``loadRes`` builds it, including for an empty list."""
    if results:
        # loadRes adds keys (area, id, iscrowd, segmentation) to the dicts it is given: pass copies.
        return coco_gt.loadRes([dict(result) for result in results])
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def coco_bbox_ap(coco_gt: COCO, results: list[dict], image_ids: Sequence[int]) -> dict[str, float]:
    """``{"bbox_mAP", "bbox_mAP_50"}`` from COCOeval on ``image_ids`` (NaN where COCOeval gives -1)."""
    with _pycocotools_output_to_log():
        evaluator = COCOeval(coco_gt, _results_coco(coco_gt, results), iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    mean_ap, ap_50 = (float(value) for value in evaluator.stats[:2])
    if mean_ap < 0:
        logger.warning("COCO AP undefined: the %d evaluated images hold no non-crowd box", len(image_ids))
    return {
        "bbox_mAP": mean_ap if mean_ap >= 0 else float("nan"),
        "bbox_mAP_50": ap_50 if ap_50 >= 0 else float("nan"),
    }


class CocoMetric(DedupedMetric):
    """COCO box AP ``{"bbox_mAP": ..., "bbox_mAP_50": ...}`` as fractions, over the images evaluated.

    Args:
        coco_gt: the ground truth, the pycocotools ``COCO`` object of the real annotation file
            (``CocoDetection.coco``); it is only read.
        label_to_cat_id: COCO category id of each contiguous label (``CocoDetection.label_to_cat_id``).
    """

    def __init__(self, coco_gt: COCO, label_to_cat_id: Sequence[int]) -> None:
        super().__init__()
        unknown = sorted(set(label_to_cat_id) - set(coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"CocoMetric: category ids {unknown} are not in the ground truth's categories")
        self.coco_gt = coco_gt
        self.label_to_cat_id = list(label_to_cat_id)

    def update(self, detections: Sequence[Mapping[str, torch.Tensor]], batch: Mapping[str, Any]) -> None:
        """Records the detections of the batch's images, identified by ``batch["image_ids"]``.

        Args:
            detections: per image ``{"boxes" (N, 4) XYXY in canvas pixels, "scores" (N,),
                "labels" (N,) in 0..C-1}``.
            batch: a detection batch (moevit.data.collate) with per image ``"image_ids"`` (COCO ids),
                ``"scales"`` (resize factors (height, width) from original to canvas pixels) and
                ``"original_sizes"`` ((H, W) of the original image).
        """
        image_ids = sample_ids(batch, "image_ids", len(detections), "CocoMetric")
        scales = self._per_image(batch, "scales", len(detections))
        original_sizes = self._per_image(batch, "original_sizes", len(detections))
        records = []
        for image_id, detection, scale, original_size in zip(image_ids, detections, scales, original_sizes):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(
                    f"CocoMetric: image id {image_id} is not in the ground-truth annotation file"
                )
            record = self.coco_gt.imgs[image_id]
            if tuple(original_size) != (record["height"], record["width"]):
                raise ValueError(
                    f"CocoMetric: image {image_id} is {record['height']}x{record['width']} (HxW) in the "
                    f"annotation file but {tuple(original_size)} in the batch's original_sizes"
                )
            records.append(self._results(int(image_id), detection, scale, original_size))
        self._add(image_ids, records)

    @staticmethod
    def _per_image(batch: Mapping[str, Any], key: str, count: int) -> list:
        if key not in batch:
            raise KeyError(
                f"CocoMetric: the batch has no {key!r} entry (it has {sorted(batch)}); "
                "collate it with moevit.data.collate.collate_detection after the detection transforms"
            )
        if len(batch[key]) != count:
            raise ValueError(f"CocoMetric: {count} detections but {len(batch[key])} {key}")
        return list(batch[key])

    def _results(
        self,
        image_id: int,
        detection: Mapping[str, torch.Tensor],
        scale: Sequence[float],
        original_size: Sequence[int],
    ) -> list:
        missing = [key for key in ("boxes", "scores", "labels") if key not in detection]
        if missing:
            raise KeyError(f"CocoMetric: the detections of image {image_id} lack {missing}")
        boxes = detection["boxes"].detach().to("cpu", torch.float64)
        scores = detection["scores"].detach().cpu().tolist()
        labels = detection["labels"].detach().cpu().tolist()
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"CocoMetric: image {image_id}: expected boxes (N, 4), scores (N,) and labels (N,), got "
                f"{tuple(boxes.shape)}, {len(scores)} and {len(labels)}"
            )
        bad_labels = sorted({label for label in labels if not 0 <= label < len(self.label_to_cat_id)})
        if bad_labels:
            raise ValueError(
                f"CocoMetric: image {image_id}: labels {bad_labels} outside [0, {len(self.label_to_cat_id)})"
            )
        height, width = original_size
        boxes = boxes_to_original(boxes, scale)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        x1, y1, x2, y2 = boxes.unbind(dim=1)
        xywh = torch.stack([x1, y1, x2 - x1, y2 - y1], dim=1)
        return [
            {"image_id": image_id, "category_id": self.label_to_cat_id[label], "bbox": box, "score": score}
            for box, score, label in zip(xywh.tolist(), scores, labels)
        ]

    def results(self) -> list[dict]:
        """All recorded detections in COCO's results format, ordered by image id."""
        return [result for image_id in sorted(self._records) for result in self._records[image_id]]

    def compute(self) -> dict[str, float]:
        self._check_not_empty()
        return coco_bbox_ap(self.coco_gt, self.results(), list(self._records))
