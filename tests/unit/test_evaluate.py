"""`evaluate` end to end on the tiny synthetic datasets: an oracle model must score 1.0 everywhere (which
checks batching, box scaling to the original image and category mapping), every rank of a padded split
runs the same number of batches, a real tiny MultiTaskModel runs, and `sync` merges two gloo ranks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from moevit.config import Config, build_config
from moevit.data.errors import DatasetLayoutError
from moevit.data.synth import write_synthetic_datasets
from moevit.data.synth.spec import ADE20K_CLASSES, COCO_CATEGORY_IDS, IMAGENET_CLASSES
from moevit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moevit.eval import ClassificationMetric, SegmentationMetric, evaluate, padded_rank_indices

TASK_TYPES = {"imagenet": "classification", "coco": "detection", "ade20k": "segmentation"}
NUM_CLASSES = {
    "imagenet": len(IMAGENET_CLASSES),
    "coco": len(COCO_CATEGORY_IDS),
    "ade20k": len(ADE20K_CLASSES),
}
# Detection runs at 64 px on 96 px images, so predicted boxes must be scaled back by 1.5 to match.
IMAGE_SIZES = {"imagenet": 32, "coco": 64, "ade20k": 32}


LABEL_GREY_STEP = 40  # grey level per ADE20K label in the label-encoded val images


def _label_encode_ade20k_val(ade20k_root: Path) -> None:
    """Rewrites the ADE20K val split so that each pixel's grey level is LABEL_GREY_STEP x its raw label
    (lossless PNG bytes under the .jpg names; the reader decodes by content): an oracle can then read
    the ground truth off any window of the resized image. Labels come in 2 x 2 blocks, so the eval
    resize of these 64 px images to 32 px and the logits' resize back are exact."""
    folder = ade20k_root / "ADEChallengeData2016"
    for mask_path in sorted((folder / "annotations" / "validation").glob("*.png")):
        raw = np.array(Image.open(mask_path))[::2, ::2].repeat(2, axis=0).repeat(2, axis=1)
        Image.fromarray(raw).save(mask_path, format="PNG")
        grey = Image.fromarray((raw.astype(np.int64) * LABEL_GREY_STEP).astype(np.uint8)).convert("RGB")
        grey.save(folder / "images" / "validation" / f"{mask_path.stem}.jpg", format="PNG")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_datasets(root, size="tiny")
    _label_encode_ade20k_val(root / "ade20k")
    return root


def make_config(root: Path, batch_size: int = 8) -> Config:
    tasks = {
        name: {
            "type": TASK_TYPES[name],
            "num_classes": NUM_CLASSES[name],
            "data": {
                "format": name,
                "root": str(root / name),
                "image_size": IMAGE_SIZES[name],
                "batch_size": batch_size,
            },
        }
        for name in TASK_TYPES
    }
    return build_config(
        Config, {"model": {"name": "moevit_debug"}, "tasks": tasks, "train": {"num_workers": 0}}
    )


class OracleModel(nn.Module):
    """Predicts each batch's own ground truth, and records which samples it saw (segmentation: the
    window shapes, read off the label-encoded images, since its windows carry no sample ids)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.seen: dict[str, list[list]] = {}

    def predict(self, task: str, batch: dict):
        ids = batch.get("image_ids", batch.get("keys", [tuple(batch["images"].shape)]))
        self.seen.setdefault(task, []).append(list(ids))
        num_classes = self.cfg.tasks[task].num_classes
        if "labels" in batch:
            return nn.functional.one_hot(batch["labels"], num_classes).float()
        if "targets" in batch:
            return [
                {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]}
                for t in batch["targets"]
            ]
        grey = (batch["images"][:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        labels = (grey / LABEL_GREY_STEP).round().long() - 1  # raw label 0 ("other") is ignored
        return (
            nn.functional.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
        )


def test_an_oracle_scores_one_on_every_task(synth_root):
    cfg = make_config(synth_root)
    model = OracleModel(cfg).train()
    results = evaluate(model, cfg)
    assert results == {
        "imagenet": {"top1": 1.0, "top5": 1.0},
        "coco": {"bbox_mAP": pytest.approx(1.0), "bbox_mAP_50": pytest.approx(1.0)},
        "ade20k": {"mIoU": 1.0, "aAcc": 1.0},
    }
    assert model.training  # the previous mode is restored


def test_an_oracle_scores_one_with_slide_windows_at_the_original_resolution(synth_root):
    cfg = make_config(synth_root, batch_size=5)
    data = cfg.tasks["ade20k"].data
    # 64 px images resized to 32 px (scale [128, 32]); slide windows of 16 px at the default stride 10:
    # 3 x 3 windows per image, their logits averaged and resized back to the 64 px masks.
    data.image_size, data.transforms = 16, {"scale": [128, 32], "eval_mode": "slide"}
    model = OracleModel(cfg)
    assert evaluate(model, cfg, tasks=["ade20k"], max_batches=2) == {"ade20k": {"mIoU": 1.0, "aAcc": 1.0}}
    # 5 images x 9 windows of 16 px per batch, at most 5 windows (the batch size) per forward.
    assert [shape for batch in model.seen["ade20k"] for shape in batch] == [(5, 3, 16, 16)] * 18


def test_every_rank_runs_the_same_batches_and_together_they_cover_the_split(synth_root):
    cfg = make_config(synth_root, batch_size=5)
    world_size = 7  # 80 ImageNet and 24 COCO val images: both splits need padding
    models = [OracleModel(cfg) for _ in range(world_size)]
    for rank, model in enumerate(models):
        evaluate(model, cfg, tasks=["imagenet", "coco"], rank=rank, world_size=world_size)
    for task in ("imagenet", "coco"):
        batch_counts = {len(model.seen[task]) for model in models}
        assert len(batch_counts) == 1
        seen = [sample for model in models for batch in model.seen[task] for sample in batch]
        distinct = len(set(seen))
        assert len(seen) == world_size * len(padded_rank_indices(distinct, 0, world_size)) > distinct


def test_max_batches_caps_every_task(synth_root):
    cfg = make_config(synth_root, batch_size=4)
    model = OracleModel(cfg)
    evaluate(model, cfg, max_batches=2)
    assert {task: len(batches) for task, batches in model.seen.items()} == dict.fromkeys(TASK_TYPES, 2)


def test_a_tiny_multitask_model_gives_every_metric(synth_root):
    pytest.importorskip("moevit.heads", reason="moevit.heads (task heads) is not importable yet")
    from moevit.factory import build_model

    cfg = make_config(synth_root)
    torch.manual_seed(0)
    model = build_model(cfg)
    results = evaluate(model, cfg, max_batches=1)
    assert {task: sorted(metrics) for task, metrics in results.items()} == {
        "imagenet": ["top1", "top5"],
        "coco": ["bbox_mAP", "bbox_mAP_50"],
        "ade20k": ["aAcc", "mIoU"],
    }
    assert all(0.0 <= value <= 1.0 for metrics in results.values() for value in metrics.values())
    assert model.training  # built in training mode, evaluated in eval mode, handed back as it came


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_a_tiny_model_segments_images_that_are_not_a_multiple_of_the_patch(synth_root, mode):
    from moevit.factory import build_model

    cfg = make_config(synth_root, batch_size=3)
    # 64 px images fit (148, 37) as 37 px: not a multiple of the 8 px patches, so inputs are padded.
    cfg.tasks["ade20k"].data.transforms = {"scale": [148, 37], "eval_mode": mode}
    torch.manual_seed(0)
    results = evaluate(build_model(cfg), cfg, tasks=["ade20k"], max_batches=1)
    assert all(0.0 <= value <= 1.0 for value in results["ade20k"].values())


def test_unknown_task_and_bad_dataset_fail_before_any_forward(synth_root, tmp_path):
    cfg = make_config(synth_root)
    model = OracleModel(cfg)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['cityscapes'\]"):
        evaluate(model, cfg, tasks=["imagenet", "cityscapes"])
    cfg.tasks["ade20k"].data.root = str(tmp_path / "missing")
    with pytest.raises(DatasetLayoutError):
        evaluate(model, cfg)
    assert model.seen == {}


def _gloo_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank: evaluate its padded share of 5 samples, sync, and save what it computed."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(5, 4, generator=generator)
        labels = torch.randint(0, 4, (5,), generator=generator)
        seg_logits = torch.randn(5, 3, 4, 4, generator=generator)
        masks = torch.randint(0, 3, (5, 4, 4), generator=generator)
        classification, segmentation = ClassificationMetric(), SegmentationMetric(3)
        indices = padded_rank_indices(5, rank, world_size)
        keys = [f"k{i}" for i in indices]
        classification.update(logits[indices], {"labels": labels[indices], "keys": keys})
        segmentation.update(seg_logits[indices], {"masks": masks[indices], "keys": keys})
        classification.sync()
        segmentation.sync()
        counts = (classification.num_samples, segmentation.num_samples)
        torch.save(
            (counts, classification.compute(), segmentation.compute()), os.path.join(out_dir, f"{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_sync_merges_two_gloo_ranks_without_double_counting(tmp_path):
    # fork: a spawned child would have to re-import this test module by name, which pytest's importlib mode hides.
    mp.start_processes(
        _gloo_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork", join=True
    )
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 4, generator=generator), torch.randint(0, 4, (5,), generator=generator)
    seg_logits, masks = (
        torch.randn(5, 3, 4, 4, generator=generator),
        torch.randint(0, 3, (5, 4, 4), generator=generator),
    )
    keys = [f"k{i}" for i in range(5)]
    classification, segmentation = ClassificationMetric(), SegmentationMetric(3)
    classification.update(logits, {"labels": labels, "keys": keys})
    segmentation.update(seg_logits, {"masks": masks, "keys": keys})
    expected = ((5, 5), classification.compute(), segmentation.compute())
    assert [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)] == [expected, expected]


def test_bf16_evaluation_runs_under_autocast_and_scores_like_fp32(synth_root):
    """Evaluation under training's autocast: linear layers compute in bf16, metrics stay close to fp32's
    (a random tiny model has near-tied scores, so a few top-1 or pixel decisions may flip)."""
    from moevit.factory import build_model

    cfg = make_config(synth_root)
    torch.manual_seed(0)
    model = build_model(cfg)
    seen_dtypes = []
    model.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen_dtypes.append(out.dtype))
    fp32 = evaluate(model, cfg, max_batches=2)
    assert set(seen_dtypes) == {torch.float32}
    seen_dtypes.clear()
    bf16 = evaluate(model, cfg, max_batches=2, dtype=torch.bfloat16)
    assert set(seen_dtypes) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the model
    for task, metrics in fp32.items():
        for name, value in metrics.items():  # 16 images per task: 0.07 is about one flipped image
            assert abs(bf16[task][name] - value) <= 0.07, (task, name, value, bf16[task][name])


def test_predictions_reach_the_metrics_in_fp32():
    from moevit.eval.evaluate import as_float32

    predictions = [{"boxes": torch.ones(2, 4, dtype=torch.bfloat16), "labels": torch.tensor([1, 2])}]
    converted = as_float32(predictions)
    assert converted[0]["boxes"].dtype == torch.float32 and converted[0]["labels"].dtype == torch.int64
    assert as_float32(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
