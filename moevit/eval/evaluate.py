"""Evaluate a multi-task model on each task's validation split: top-1/top-5, COCO box AP, mIoU/aAcc.

For each task: build the val split (``build_dataset(..., train=False)``: the deterministic eval
transforms), give this rank its padded ordered share (moevit.eval.distributed), run
``model.predict(task, batch)`` batch by batch (segmentation: window by window at the original
resolution, moevit.eval.segmentation_inference), record per-sample results, merge the ranks' records
without repeats and compute. Every rank runs the same number of batches per task, in the same task
order, so expert-parallel all-to-alls stay matched; every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moevit.config.schema import Config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task, move_batch, pins_memory
from moevit.data.workers import ignore_stop_signals
from moevit.eval.classification import ClassificationMetric
from moevit.eval.coco import CocoMetric
from moevit.eval.distributed import DedupedMetric, padded_rank_indices, rank_batches
from moevit.eval.segmentation import SegmentationMetric
from moevit.eval.segmentation_inference import SegmentationInference, segment_batch

logger = logging.getLogger(__name__)


def reader_attribute(dataset: Dataset, name: str) -> Any:
    """``name`` of the reader inside wrapper datasets (``SkipCorrupt``, ``TransformedDataset``)."""
    current = dataset
    while current is not None:
        if name in vars(current) or hasattr(type(current), name):
            return getattr(current, name)
        # vars(): SkipCorrupt forwards unknown attributes, so getattr would not tell wrapper from reader.
        current = vars(current).get("dataset")
    raise AttributeError(f"no dataset in the wrappers of {type(dataset).__name__} has an attribute {name!r}")


def build_metric(task_type: str, num_classes: int, dataset: Dataset) -> DedupedMetric:
    """The metric of a task type; detection reads the ground truth from the dataset's COCO reader."""
    if task_type == "classification":
        return ClassificationMetric()
    if task_type == "detection":
        label_to_cat_id = reader_attribute(dataset, "label_to_cat_id")
        if len(label_to_cat_id) != num_classes:
            raise ValueError(
                f"the detection task has num_classes={num_classes}, but its COCO annotation file "
                f"{reader_attribute(dataset, 'annotation_file')} lists {len(label_to_cat_id)} categories"
            )
        return CocoMetric(reader_attribute(dataset, "coco"), label_to_cat_id)
    if task_type == "segmentation":
        return SegmentationMetric(num_classes)
    raise ValueError(f"unknown task type {task_type!r}; expected classification, detection or segmentation")


def _prepare_task(cfg: Config, task: str) -> tuple[Dataset, DedupedMetric]:
    """The task's val split and its empty metric; layout and config errors surface here."""
    task_cfg = cfg.tasks[task]
    if task_cfg.data is None:
        raise ValueError(f"task {task!r} has no dataset (tasks.{task}.data) to evaluate on")
    dataset = build_dataset(task_cfg.type, task_cfg.data, train=False)
    return dataset, build_metric(task_cfg.type, task_cfg.num_classes, dataset)


def _segmentation_predictor(model: nn.Module, task: str, task_cfg) -> Callable[[dict], list[torch.Tensor]]:
    """Batch -> per-image logits at the original mask size (``whole`` / ``slide``, mmseg's protocol)."""
    backbone = getattr(model, "backbone", None)  # inputs are padded to its patch size; stand-ins have none
    inference = SegmentationInference.from_settings(
        task_cfg.data.transform_settings(),
        task_cfg.data.image_size,
        getattr(backbone, "patch_size", 1),
        task_cfg.data.batch_size,
    )

    def predict(batch: dict) -> list[torch.Tensor]:
        return segment_batch(
            lambda images: model.predict(task, {"images": images}),
            batch["images"],
            batch["image_sizes"],
            batch["mask_sizes"],
            inference,
        )

    return predict


def compute_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward's autocast for a compute dtype (bf16, fp16), as training runs it; none for fp32 / None.

    Under autocast, matmuls and convolutions run in `dtype` while the ops torch keeps in fp32 (softmax,
    norms, losses) and the routers (which disable autocast themselves) stay fp32, so evaluation measures
    the model that training optimised. Images are not cast: autocast casts each op's inputs.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def as_float32(predictions: Any) -> Any:
    """Predictions with their floating tensors in fp32 (nested lists and dicts included), so metric math
    (top-k, box matching, argmax over upsampled logits) never runs in bf16/fp16."""
    if isinstance(predictions, torch.Tensor):
        return predictions.float() if predictions.is_floating_point() else predictions
    if isinstance(predictions, dict):
        return {key: as_float32(value) for key, value in predictions.items()}
    if isinstance(predictions, (list, tuple)):
        return type(predictions)(as_float32(value) for value in predictions)
    return predictions


def _run_task(
    model: nn.Module,
    cfg: Config,
    task: str,
    dataset: Dataset,
    metric: DedupedMetric,
    max_batches: int | None,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    task_cfg = cfg.tasks[task]
    if task_cfg.type == "segmentation":
        predict = _segmentation_predictor(model, task, task_cfg)
    else:
        predict = lambda batch: model.predict(task, batch)  # noqa: E731 (the two branches read alike)
    indices = padded_rank_indices(len(dataset), rank, world_size, getattr(dataset, "shard_sizes", None))
    loader = DataLoader(
        dataset,
        batch_sampler=rank_batches(indices, task_cfg.data.batch_size, max_batches),
        collate_fn=collate_for_task(task_cfg.type),
        num_workers=cfg.train.num_workers,
        worker_init_fn=ignore_stop_signals,  # a SIGTERM during evaluation is the main process's to handle
        # Its own generator: otherwise the loader draws worker seeds from the global torch RNG,
        # and training randomness would depend on how often the run evaluates.
        generator=torch.Generator().manual_seed(0),
        pin_memory=pins_memory(device),  # page-locked batches copy to a GPU asynchronously (move_batch)
    )
    with torch.no_grad():
        for batch in loader:
            batch = move_batch(batch, device)
            with compute_autocast(device, dtype):
                predictions = predict(batch)
            metric.update(as_float32(predictions), batch)
    metric.sync()
    logger.info("evaluated %s on %d distinct samples of %d", task, metric.num_samples, len(dataset))
    return metric.compute()


def evaluate(
    model: nn.Module,
    cfg: Config,
    tasks: Sequence[str] | None = None,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` on the val splits; metric values are fractions in [0, 1].

    Every rank of the job must call it with the same arguments (it runs collectives).

    Args:
        model: has ``predict(task, batch)`` (``MultiTaskModel``, or a DeepSpeed engine's ``module``);
            put in eval mode for the run and returned to its previous mode.
        cfg: the run's config: tasks, their data, ``train.num_workers``.
        tasks: task names to evaluate, in this order (default: all of ``cfg.tasks``).
        max_batches: at most this many batches per task and rank (None: the whole split).
        rank: this process's data-parallel rank.
        world_size: number of ranks sharing the evaluation.
        device: where the batches go (the model's device).
        dtype: the compute dtype of training (moevit.parallel.layout.resolve_precision): bf16 or fp16
            runs each forward under torch.autocast of that dtype, with metrics computed in fp32;
            None or float32 runs plain fp32.
    """
    names = list(cfg.tasks) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in cfg.tasks]
    if unknown:
        raise ValueError(
            f"cannot evaluate unknown task(s) {unknown}; the config's tasks are {list(cfg.tasks)}"
        )
    # Every dataset is opened before the first forward, so a bad path fails before any compute.
    prepared = {name: _prepare_task(cfg, name) for name in names}
    was_training = model.training
    model.eval()
    try:
        return {
            name: _run_task(
                model, cfg, name, *prepared[name], max_batches, rank, world_size, torch.device(device), dtype
            )
            for name in names
        }
    finally:
        model.train(was_training)
