"""Per-task, per-layer, per-expert usage from a calibration pass; training counters are read by
moevit.artifacts.usage.

Usage is plain data, `{layer: {task: [slots per expert]}}` for the MoE MLP layers ("blocks.<i>.mlp"),
so both sources look the same to the criteria:

- counters: what the training loop counted, read back by moevit.artifacts.usage (a moving average of
  each task's routed slots; older runs: the last window between evaluations).
- calibration (`calibrate_usage`): N batches of a task's data through the model in eval mode, one
  process, no DeepSpeed. Images use the deterministic eval transforms; batches are drawn from a seeded
  shuffle of the split, so N small still covers the classes (folder datasets are sorted by class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler

from moevit.artifacts.usage import Usage, add_usage
from moevit.config.schema import Config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.models.moe_vit import MoEViT
from moevit.models.param_names import is_mlp_layer


# --------------------------------------------------------------------------------------- calibration
def count_routing(backbone: MoEViT, batches: Iterable[tuple[str, torch.Tensor]]) -> Usage:
    """Routed slots per expert of every MoE MLP layer over (task, images) batches; eval mode, no grad."""
    was_training = backbone.training
    backbone.eval()
    usage: Usage = {}
    try:
        with torch.no_grad():
            for task, images in batches:
                routing = backbone.forward_backbone(images, task).routing
                step = {
                    layer: {task: r.counts_E.tolist()} for layer, r in routing.items() if is_mlp_layer(layer)
                }
                usage = add_usage(usage, step)
    finally:
        backbone.train(was_training)
    return usage


def calibration_batches(
    cfg: Config, task: str, num_batches: int, split: str = "train", seed: int = 0, patch_size: int = 1
) -> Iterable[tuple[str, torch.Tensor]]:
    """`num_batches` batches of `task`'s `split` ("train" or "val") with eval transforms, seeded shuffle;
    `patch_size`: the backbone's, which segmentation's variable-size images are cut to."""
    task_cfg = cfg.tasks[task]
    if task_cfg.data is None:
        raise ValueError(f"task {task!r} has no dataset (tasks.{task}.data) to calibrate on")
    if split not in ("train", "val"):
        raise ValueError(f"calibration split must be 'train' or 'val', got {split!r}")
    split_name = task_cfg.data.train_split if split == "train" else task_cfg.data.val_split
    # train=False: the deterministic eval transforms, read from whichever split was asked for.
    dataset = build_dataset(
        task_cfg.type, dataclasses.replace(task_cfg.data, val_split=split_name), train=False
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=task_cfg.data.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        collate_fn=collate_for_task(task_cfg.type),
        num_workers=0,
    )
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        images = batch["images"]
        if "image_sizes" in batch:
            # Segmentation eval batches hold images of their own (resized) sizes, padded: route only the
            # region every image covers, cut to whole patches, so no padding token is counted.
            height, width = batch["image_sizes"].min(dim=0).values.tolist()
            images = images[
                ..., : max(height // patch_size, 1) * patch_size, : max(width // patch_size, 1) * patch_size
            ]
        yield task, images


def calibrate_usage(
    backbone: MoEViT, cfg: Config, tasks: Sequence[str], num_batches: int, split: str = "train"
) -> Usage:
    """Usage of each task over `num_batches` of its own data (see `calibration_batches`)."""
    if num_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {num_batches}")
    usage: Usage = {}
    for task in tasks:
        usage = add_usage(
            usage,
            count_routing(
                backbone, calibration_batches(cfg, task, num_batches, split, patch_size=backbone.patch_size)
            ),
        )
    return usage
