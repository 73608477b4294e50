"""The evaluation metrics against hand-worked examples, pycocotools run directly, mmseg's IoUMetric, and
the merge of padded per-rank splits (a padded duplicate must not count twice)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

from moevit.data.collate import collate_detection
from moevit.data.transforms import build_transforms
from moevit.eval import (
    ClassificationMetric,
    CocoMetric,
    SegmentationMetric,
    coco_bbox_ap,
    padded_rank_indices,
)
from moevit.eval.distributed import rank_batches

# ---------------------------------------------------------------- classification


def classification_batch(labels: list[int], keys: list[str]) -> dict:
    return {"labels": torch.tensor(labels), "keys": keys}


def test_topk_on_a_hand_worked_example():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2, 0.0, -1.0],  # label 1 ranked first: top-1 and top-5 hit
            [0.5, 0.1, 0.4, 0.3, 0.2, 0.0],  # label 2 ranked second: top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5 ranked sixth: miss
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 1 ranked fifth: top-5 hit only
        ]
    )
    metric = ClassificationMetric()
    metric.update(logits, classification_batch([1, 2, 5, 1], ["a", "b", "c", "d"]))
    assert metric.compute() == {"top1": 0.25, "top5": 0.75}


def test_topk_is_capped_at_the_number_of_classes():
    metric = ClassificationMetric()
    metric.update(torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), classification_batch([2, 2], ["a", "b"]))
    assert metric.compute() == {"top1": 0.5, "top5": 1.0}


def test_a_repeated_key_counts_once_with_its_first_prediction():
    metric = ClassificationMetric(topk=(1,))
    metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), classification_batch([0, 0], ["a", "b"]))
    metric.update(torch.tensor([[0.0, 1.0]]), classification_batch([0], ["a"]))  # "a" again, now wrong
    assert metric.num_samples == 2
    assert metric.compute() == {"top1": 0.5}


def test_classification_rejects_bad_input():
    metric = ClassificationMetric()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metric.update(torch.zeros(1, 3), classification_batch([3], ["a"]))
    with pytest.raises(ValueError, match="2 rows of logits"):
        metric.update(torch.zeros(2, 3), classification_batch([0], ["a"]))
    with pytest.raises(KeyError, match="'keys'"):
        metric.update(torch.zeros(1, 3), {"labels": torch.tensor([0])})
    with pytest.raises(ValueError, match="no sample was evaluated"):
        metric.compute()


# ---------------------------------------------------------------- COCO

INPUT_SIZE = 64  # the square canvas the boxes are predicted in
CATEGORY_IDS = [1, 3, 7]  # gapped, as COCO's
IMAGES = {1: (200, 100), 2: (120, 160), 3: (80, 80), 4: (64, 48)}  # id -> (width, height); 4 has no box
BOXES = [  # (image id, category id, xywh in original pixels, iscrowd)
    (1, 1, [10.0, 10.0, 50.0, 40.0], 0),
    (1, 3, [100.0, 20.0, 60.0, 60.0], 0),
    (2, 7, [5.0, 5.0, 30.0, 100.0], 0),
    (2, 1, [60.0, 80.0, 40.0, 40.0], 0),
    (2, 3, [0.0, 0.0, 120.0, 60.0], 1),
    (3, 3, [20.0, 20.0, 30.0, 30.0], 0),
]


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    data = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, (w, h) in IMAGES.items()
        ],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            for n, (i, c, b, crowd) in enumerate(BOXES)
        ],
    }
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def direct_cocoeval(
    annotation_file: Path, results: list[dict], image_ids: list[int] | None = None
) -> list[float]:
    """AP@[.5:.95] and AP@.5 from COCOeval on the JSON file and a results file, as the COCO API documents."""
    results_file = annotation_file.parent / "results.json"
    results_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(evaluator.stats[0]), float(evaluator.stats[1])]


EVAL_TRANSFORM = build_transforms("detection", train=False, image_size=INPUT_SIZE)


def canvas_batch(per_image: dict[int, list[tuple[int, list[float], float]]]) -> tuple[list[dict], dict]:
    """{image id: [(category id, xywh original pixels, score)]} -> (detections, batch) as the head would
    predict them at INPUT_SIZE: each image and its boxes through the eval transform (its own
    aspect-preserving resize, padded bottom/right to the square), then collated."""
    samples, detections = [], []
    for image_id, predictions in per_image.items():
        width, height = IMAGES[image_id]
        xyxy = [[x, y, x + w, y + h] for _, (x, y, w, h), _ in predictions]
        sample = EVAL_TRANSFORM(
            {
                "image": tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8)),
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                    format="XYXY",
                    canvas_size=(height, width),
                ),
                "labels": torch.tensor([CATEGORY_IDS.index(c) for c, _, _ in predictions], dtype=torch.int64),
                "image_id": image_id,
            }
        )
        assert len(sample["boxes"]) == len(predictions)  # none dropped, so the scores stay aligned
        samples.append(sample)
        scores = torch.tensor([score for *_, score in predictions], dtype=torch.float32)
        detections.append(
            {"boxes": sample["boxes"].as_subclass(torch.Tensor), "scores": scores, "labels": sample["labels"]}
        )
    return detections, collate_detection(samples)


def detection_update(metric: CocoMetric, per_image: dict[int, list[tuple[int, list[float], float]]]) -> None:
    """Feeds {image id: [(category id, xywh original pixels, score)]} as predicted at INPUT_SIZE."""
    metric.update(*canvas_batch(per_image))


def perfect_detections(image_ids) -> dict:
    return {i: [(c, b, 0.9) for j, c, b, crowd in BOXES if j == i and not crowd] for i in image_ids}


def shifted_detections() -> dict:
    detections = {i: [] for i in IMAGES}
    for n, (i, c, (x, y, w, h), crowd) in enumerate(BOXES):
        if not crowd:
            detections[i].append((c, [x + 3.0 + n, y - 2.0, w * 0.9, h * 1.1], 0.3 + 0.1 * n))
    detections[1].append((7, [0.0, 0.0, 30.0, 30.0], 0.95))  # a confident false positive
    detections[4].append((1, [5.0, 5.0, 20.0, 20.0], 0.5))  # on the image without boxes
    return detections


def as_results(per_image: dict) -> list[dict]:
    return [
        {"image_id": i, "category_id": c, "bbox": box, "score": score}
        for i, detections in per_image.items()
        for c, box, score in detections
    ]


def test_perfect_detections_give_ap_one(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, perfect_detections(IMAGES))
    assert metric.compute() == pytest.approx({"bbox_mAP": 1.0, "bbox_mAP_50": 1.0})


def test_results_are_in_original_pixels_with_coco_category_ids(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, shifted_detections())
    expected = as_results(shifted_detections())
    got = metric.results()
    assert [(r["image_id"], r["category_id"], r["score"]) for r in got] == [
        (r["image_id"], r["category_id"], pytest.approx(r["score"])) for r in expected
    ]
    for result, reference in zip(got, expected, strict=True):
        assert result["bbox"] == pytest.approx(reference["bbox"], abs=1e-4)


def test_ap_of_boxes_predicted_at_a_rescaled_resolution_equals_cocoeval_on_the_original_boxes(coco_json):
    # Ground-truth boxes, moved and resized by different amounts, scored, taken to each image's own
    # canvas resolution (0.32x to 1x here, in batches of mixed aspect ratios) and mapped back by CocoMetric.
    detections, batch = canvas_batch(shifted_detections())
    assert batch["image_sizes"] == [(32, 64), (64, 48), (64, 64), (48, 64)]
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    metric.update(detections, batch)
    ours = metric.compute()
    direct = direct_cocoeval(coco_json, as_results(shifted_detections()))
    assert 0.0 < ours["bbox_mAP"] < ours["bbox_mAP_50"] < 1.0
    assert [ours["bbox_mAP"], ours["bbox_mAP_50"]] == pytest.approx(direct, abs=1e-12)
    # Scaling by the batch's input size instead of each image's own scale (the old squash) is wrong.
    squashed = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    squashed.update(
        detections,
        {**batch, "scales": [(INPUT_SIZE / h, INPUT_SIZE / w) for h, w in batch["original_sizes"]]},
    )
    assert squashed.compute()["bbox_mAP"] != pytest.approx(direct[0], abs=1e-3)


def test_boxes_reaching_into_the_padding_are_clipped_to_the_original_image(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    # Image 1 (200 x 100) fills 64 x 32 of the 64 px canvas (scale 0.32); this box crosses into the padding.
    detection = {
        "boxes": torch.tensor([[50.0, 20.0, 70.0, 40.0]]),
        "scores": torch.ones(1),
        "labels": torch.tensor([0]),
    }
    metric.update([detection], {"image_ids": [1], "scales": [(0.32, 0.32)], "original_sizes": [(100, 200)]})
    (result,) = metric.results()
    assert result["bbox"] == pytest.approx([156.25, 62.5, 200 - 156.25, 100 - 62.5])


def test_only_the_evaluated_images_count(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, perfect_detections([1, 3]))
    results = as_results(perfect_detections([1, 3]))
    # Over every image of the file, image 2's boxes would be missed; over those evaluated, nothing is.
    assert direct_cocoeval(coco_json, results)[0] < 1.0
    assert (
        metric.compute()["bbox_mAP"] == pytest.approx(direct_cocoeval(coco_json, results, [1, 3])[0]) == 1.0
    )


def test_no_detections_give_zero_not_a_crash(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, {i: [] for i in IMAGES})
    assert metric.compute() == {"bbox_mAP": 0.0, "bbox_mAP_50": 0.0}


def test_ap_is_nan_when_the_evaluated_images_have_no_box(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, {4: [(1, [5.0, 5.0, 20.0, 20.0], 0.5)]})
    assert all(math.isnan(value) for value in metric.compute().values())


def test_pycocotools_prints_nothing(coco_json, capsys):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    detection_update(metric, shifted_detections())
    metric.compute()
    assert capsys.readouterr().out == ""


def test_coco_rejects_bad_input(coco_json):
    metric = CocoMetric(load_coco(coco_json), CATEGORY_IDS)
    with pytest.raises(ValueError, match="image id 99 is not in the ground-truth"):
        metric.update(
            [
                {
                    "boxes": torch.zeros(0, 4),
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64),
                }
            ],
            {"image_ids": [99], "scales": [(1.0, 1.0)], "original_sizes": [(10, 10)]},
        )
    detections = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}]
    geometry = {"scales": [(1.0, 1.0)], "original_sizes": [(100, 200)]}
    with pytest.raises(ValueError, match=r"labels \[3\] outside \[0, 3\)"):
        metric.update(detections, {"image_ids": [1], **geometry})
    with pytest.raises(KeyError, match="no 'scales' entry"):
        metric.update(detections, {"image_ids": [1], "original_sizes": [(100, 200)]})
    with pytest.raises(ValueError, match=r"100x200 \(HxW\) in the annotation file but \(200, 100\)"):
        metric.update(detections, {"image_ids": [1], "scales": [(1.0, 1.0)], "original_sizes": [(200, 100)]})
    with pytest.raises(ValueError, match=r"category ids \[2\]"):
        CocoMetric(load_coco(coco_json), [1, 2])


# ---------------------------------------------------------------- segmentation

NUM_SEG_CLASSES = 4
IGNORE = 255
# Image A: class 2 is predicted only on an ignored pixel; class 3 appears nowhere.
LABEL_A = [[0, 0, 1], [1, IGNORE, IGNORE]]
PRED_A = [[0, 1, 1], [1, 2, 3]]
LABEL_B = [[2, 2], [0, 1]]
PRED_B = [[2, 0], [0, 0]]


def segmentation_batch(preds: list, labels: list, keys: list[str]) -> tuple[torch.Tensor, dict]:
    pred = torch.tensor(preds)
    logits = torch.nn.functional.one_hot(pred, NUM_SEG_CLASSES).permute(0, 3, 1, 2).float()
    return logits, {"masks": torch.tensor(labels), "keys": keys}


def test_miou_and_aacc_on_a_hand_worked_example():
    metric = SegmentationMetric(NUM_SEG_CLASSES)
    metric.update(*segmentation_batch([PRED_A], [LABEL_A], ["a"]))
    metric.update(*segmentation_batch([PRED_B], [LABEL_B], ["b"]))
    # Totals over both images (ignored pixels dropped): intersect (2, 2, 1, 0), predicted (4, 3, 1, 0),
    # labelled (3, 3, 2, 0) -> union (5, 4, 2, 0) -> IoU (2/5, 2/4, 1/2, NaN).
    iou = metric.per_class_iou()
    assert iou[:3] == pytest.approx([0.4, 0.5, 0.5]) and np.isnan(iou[3])
    assert metric.compute() == pytest.approx({"mIoU": 1.4 / 3, "aAcc": 5 / 8})


def test_miou_sums_areas_over_the_dataset_not_per_image():
    per_image = []
    for pred, label in ((PRED_A, LABEL_A), (PRED_B, LABEL_B)):
        single = SegmentationMetric(NUM_SEG_CLASSES)
        single.update(*segmentation_batch([pred], [label], ["x"]))
        per_image.append(single.compute()["mIoU"])
    # Per image: A (1/2 + 2/3) / 2, B (1/3 + 0 + 1/2) / 3; their mean differs from the dataset's 1.4/3.
    assert per_image == pytest.approx([7 / 12, 5 / 18])
    assert np.mean(per_image) != pytest.approx(1.4 / 3)


def test_everything_ignored_gives_nan_like_mmseg():
    metric = SegmentationMetric(NUM_SEG_CLASSES)
    metric.update(*segmentation_batch([[[0, 1]]], [[[IGNORE, IGNORE]]], ["a"]))
    assert all(math.isnan(value) for value in metric.compute().values())


def test_segmentation_rejects_bad_input():
    metric = SegmentationMetric(NUM_SEG_CLASSES)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 4\) or be 255"):
        metric.update(*segmentation_batch([[[0, 1]]], [[[0, 7]]], ["a"]))
    logits, batch = segmentation_batch([[[0, 1]]], [[[0, 1]]], ["a"])
    with pytest.raises(ValueError, match="does not match its logits"):
        metric.update(logits, {**batch, "masks": torch.zeros(1, 2, 3, dtype=torch.int64)})


def test_equal_to_mmseg_iou_metric():
    pytest.importorskip("mmseg", reason="mmsegmentation (optional extra) is not installed")
    from mmseg.evaluation import IoUMetric

    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    labels = torch.randint(0, num_classes - 1, (5, 12, 10), generator=generator)  # class 5 never labelled
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = IGNORE
    preds = torch.where(torch.rand(labels.shape, generator=generator) < 0.6, labels, 0) % num_classes
    preds[0, 0, 0] = num_classes - 1

    reference = IoUMetric(ignore_index=IGNORE, iou_metrics=["mIoU"])
    reference.dataset_meta = {"classes": [f"class{c}" for c in range(num_classes)]}
    reference.process(
        {},
        [{"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": y[None]}} for p, y in zip(preds, labels)],
    )
    expected = reference.compute_metrics(reference.results)  # percentages rounded to 2 decimals

    ours = SegmentationMetric(num_classes, ignore_index=IGNORE)
    logits = torch.nn.functional.one_hot(preds, num_classes).permute(0, 3, 1, 2).float()
    ours.update(logits, {"masks": labels, "keys": [str(i) for i in range(len(labels))]})
    got = ours.compute()
    assert round(100 * got["mIoU"], 2) == pytest.approx(expected["mIoU"])
    assert round(100 * got["aAcc"], 2) == pytest.approx(expected["aAcc"])


# ---------------------------------------------------------------- padded per-rank splits


def test_padded_rank_split_has_equal_lengths_and_wraps_around():
    splits = [padded_rank_indices(5, rank, 2) for rank in range(2)]
    assert splits == [[0, 2, 4], [1, 3, 0]]  # rank 1's last index repeats sample 0
    batches = [rank_batches(split, batch_size=2, max_batches=None) for split in splits]
    assert [len(b) for b in batches] == [2, 2]
    assert rank_batches(splits[0], batch_size=2, max_batches=1) == [[0, 2]]


def run_ranks(make_metric, update, world_size: int, num_samples: int, batch_size: int = 2):
    """Each simulated rank evaluates its padded split; returns the per-rank metrics."""
    metrics = []
    for rank in range(world_size):
        metric = make_metric()
        for batch in rank_batches(padded_rank_indices(num_samples, rank, world_size), batch_size, None):
            update(metric, batch)
        metrics.append(metric)
    return metrics


def merged(make_metric, rank_metrics):
    result = make_metric()
    for metric in rank_metrics:
        result.merge_state(metric.state_dict())
    return result


def test_classification_padded_duplicate_counts_once():
    # Sample 0 is right, samples 1..4 wrong: top-1 is 1/5; counting rank 1's padded copy would give 2/6.
    labels = torch.tensor([0, 1, 1, 1, 1])
    logits = torch.zeros(5, 3)
    logits[:, 0] = 1.0

    def update(metric, indices):
        metric.update(
            logits[indices], classification_batch(labels[indices].tolist(), [f"k{i}" for i in indices])
        )

    ranks = run_ranks(lambda: ClassificationMetric(topk=(1,)), update, world_size=2, num_samples=5)
    assert sum(m.num_samples for m in ranks) == 6
    result = merged(lambda: ClassificationMetric(topk=(1,)), ranks)
    assert result.num_samples == 5
    assert result.compute() == {"top1": 0.2}


def test_segmentation_padded_duplicate_counts_once():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_SEG_CLASSES, (5, 6, 6), generator=generator)
    logits = torch.randn(5, NUM_SEG_CLASSES, 6, 6, generator=generator)
    logits[0] = torch.nn.functional.one_hot(labels[0], NUM_SEG_CLASSES).permute(2, 0, 1) * 10.0

    def update(metric, indices):
        metric.update(logits[indices], {"masks": labels[indices], "keys": [f"k{i}" for i in indices]})

    def new_metric():
        return SegmentationMetric(NUM_SEG_CLASSES)

    result = merged(new_metric, run_ranks(new_metric, update, world_size=2, num_samples=5))
    single = new_metric()
    update(single, list(range(5)))
    counted_twice = new_metric()
    counted_twice.update(
        logits[[0, 1, 2, 3, 4, 0]], {"masks": labels[[0, 1, 2, 3, 4, 0]], "keys": list("abcdef")}
    )
    assert result.compute() == single.compute()
    assert result.compute()["mIoU"] != pytest.approx(counted_twice.compute()["mIoU"])


def test_coco_padded_duplicates_count_once(coco_json):
    image_ids = sorted(IMAGES)
    shifted = shifted_detections()
    coco_gt = load_coco(coco_json)

    def update(metric, indices):
        detection_update(metric, {image_ids[i]: shifted[image_ids[i]] for i in indices})

    # 4 images over 3 ranks: 6 slots, images 1 and 2 evaluated twice.
    result = merged(
        lambda: CocoMetric(coco_gt, CATEGORY_IDS),
        run_ranks(
            lambda: CocoMetric(coco_gt, CATEGORY_IDS), update, world_size=3, num_samples=4, batch_size=1
        ),
    )
    direct = direct_cocoeval(coco_json, as_results(shifted))
    doubled = coco_bbox_ap(coco_gt, result.results() + as_results({1: shifted[1], 2: shifted[2]}), image_ids)
    assert [result.compute()["bbox_mAP"], result.compute()["bbox_mAP_50"]] == pytest.approx(direct, abs=1e-12)
    assert doubled["bbox_mAP"] != pytest.approx(direct[0])


def test_sync_without_a_process_group_keeps_the_records():
    metric = ClassificationMetric()
    metric.update(torch.tensor([[1.0, 0.0]]), classification_batch([0], ["a"]))
    metric.sync()
    assert metric.num_samples == 1 and metric.compute()["top1"] == 1.0
