"""Evaluation with the metrics users know: top-1/top-5, COCO box AP (pycocotools), mIoU/aAcc (mmseg's).

Each metric records one result per sample id, so samples repeated by the padded per-rank split are
counted once; `sync()` merges the ranks' records; `compute()` returns fractions in [0, 1].
`evaluate` runs a multi-task model over every task's val split.
"""

from moevit.eval.classification import ClassificationMetric
from moevit.eval.coco import CocoMetric, coco_bbox_ap
from moevit.eval.distributed import DedupedMetric, padded_rank_indices
from moevit.eval.evaluate import build_metric, evaluate
from moevit.eval.segmentation import SegmentationMetric

__all__ = [
    "ClassificationMetric",
    "CocoMetric",
    "DedupedMetric",
    "SegmentationMetric",
    "build_metric",
    "coco_bbox_ap",
    "evaluate",
    "padded_rank_indices",
]
