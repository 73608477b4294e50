"""Routing balanced from step 1: each task's per-expert selection biases fitted before the first step.

Random gates break the tie of zero gates, but the tokens of a layer share a component (across images,
and within an image its near-identical background tokens), and the experts whose gate rows align with
it take most of the load: 2.3 to 4.2 x the mean on `moevit_small` at initialisation (docs/model.md,
"Initial routing"). Each gate's `selection_bias` (moevit.layers.router), an offset per expert added to
the logits for the top-k choice only, cancels that shared part: fitted here on images of the task's
own train split, it evens the load from the first step, and the gates' weights, the experts and the
routing weights of the chosen experts stay as they were.

How: for every task whose gates train in this run (a continual run's frozen tasks keep theirs bit for
bit), `images` samples of its train split, drawn by a generator of their own and each augmented under
its own seed (the training stream, its samplers and the global RNGs are untouched), are forwarded in
batches of the task's batch size, in eval mode (no jitter, no dropout) and under the run's autocast.
MoE layer by layer, in forward order: the forward stops at that layer's router, its inputs' logits
are collected, and the bias that evens the load on them is fitted (moevit.layers.router.
fit_selection_bias); the layers after it cannot change those inputs, so one fit per layer suffices.
Every rank draws the same images and runs the same forwards (the expert-parallel all-to-alls of the
earlier layers pair up); rank 0's biases are then broadcast so every rank holds the same bits.

Runs only on a fresh start: a resumed run loads the biases with the model's state.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moevit.data.multitask import MultiTaskLoader
from moevit.data.seeding import derive_seed, seeded_rngs
from moevit.eval.evaluate import compute_autocast
from moevit.layers.router import TaskRouter, busiest_over_mean, fit_selection_bias, selection_counts
from moevit.parallel.collectives import broadcast_from_main

# Tokens per layer the bias is fitted on (at most): the demo's 512 images of 65 to 145 tokens are all used.
FIT_TOKENS = 1 << 17


class _StopForward(Exception):
    """Raised by the collecting hook: nothing after the layer being fitted needs computing."""


@dataclass
class TaskCalibration:
    """One task's calibration: per routed layer, the busiest/mean expert load of the calibration tokens
    with the biases the gate had (zeros on a fresh start) and with the fitted ones."""

    task: str
    images: int
    seconds: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"routing calibrated for {self.task} on {self.images} images in {self.seconds:.1f} s: busiest/mean "
            f"expert load {max(self.before.values()):.2f} -> {max(self.after.values()):.2f} "
            f"(worst of {len(self.after)} layers)"
        )


def calibration_images(loader: MultiTaskLoader, task: str, count: int, seed: int) -> list[torch.Tensor]:
    """`count` (at most the split's size) training images of `task`, batched by its batch size: the same
    images, with the same augmentations, on every rank and in every run of this seed."""
    dataset = loader.dataset(task)
    draw = np.random.default_rng(derive_seed(seed, task, "router calibration"))
    indices = draw.choice(len(dataset), size=min(count, len(dataset)), replace=False)
    images = []
    for index in indices.tolist():
        with seeded_rngs(derive_seed(seed, task, "router calibration", index)):
            images.append(dataset[index]["image"].as_subclass(torch.Tensor))
    batch = loader.batch_sizes[task]
    return [torch.stack(images[start : start + batch]) for start in range(0, len(images), batch)]


def trained_routers(backbone: nn.Module, task: str) -> list[tuple[str, TaskRouter]]:
    """(layer, router) of every routed layer of `backbone` (a MoEViT) whose gate for `task` trains in this
    run, in forward order."""
    return [
        (layer, router)
        for layer, router in backbone.routers()
        if task in router.gates and router.gates[task].weight.requires_grad
    ]


def _collect_logits(
    backbone: nn.Module,
    router: TaskRouter,
    task: str,
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The gate logits (T, n) of `task` at `router` for every token of `batches`, on `device`."""
    gate = router.gates[task]
    collected = []

    def collect(module, args):
        x_TD = args[0]
        with torch.autocast(device_type=x_TD.device.type, enabled=False):  # fp32, as the router scores
            collected.append(x_TD.float() @ gate.weight.float().t())
        raise _StopForward

    handle = router.register_forward_pre_hook(collect)
    try:
        for images in batches:
            with contextlib.suppress(_StopForward), compute_autocast(device, dtype):
                backbone.forward_backbone(images.to(device, non_blocking=True), task)
    finally:
        handle.remove()
    return torch.cat(collected)


@torch.no_grad()
def calibrate_task(
    backbone: nn.Module,
    task: str,
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> TaskCalibration:
    """Fits the selection bias of every trained gate of `task` in `backbone` (a MoEViT, on `device`) on
    image `batches`, layer after layer (module doc), in eval mode. Local: the caller makes ranks agree."""
    started = time.perf_counter()
    result = TaskCalibration(task, sum(batch.shape[0] for batch in batches), 0.0)
    was_training = backbone.training
    backbone.eval()
    try:
        for layer, router in trained_routers(backbone, task):
            gate = router.gates[task]
            logits_TE = _collect_logits(backbone, router, task, batches, device, dtype)
            # Every image's tokens, evenly strided: the fit's top-k per iteration stays cheap at real
            # resolutions (a COCO image has 4096 tokens), and every image still counts.
            logits_TE = logits_TE[:: -(-logits_TE.shape[0] // FIT_TOKENS)]
            top_k = min(router.top_k, logits_TE.shape[1])
            bias_E = fit_selection_bias(logits_TE, top_k)
            before_E = selection_counts(logits_TE, gate.selection_bias.float(), top_k)
            result.before[layer] = busiest_over_mean(before_E)
            result.after[layer] = busiest_over_mean(selection_counts(logits_TE, bias_E, top_k))
            gate.selection_bias.copy_(bias_E.to(gate.selection_bias))
    finally:
        backbone.train(was_training)
    result.seconds = time.perf_counter() - started
    return result


def calibrate_routing(
    model: nn.Module,
    loader: MultiTaskLoader,
    tasks: list[str],
    images: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[TaskCalibration]:
    """Fits the selection bias of every trained gate of `tasks` on every rank (see the module doc); one
    result per task that has such gates.

    Args:
        model: the (possibly expert-parallel) MultiTaskModel, on `device`.
        loader: the run's training loader (its datasets; its stream is not advanced).
        tasks: the tasks to calibrate, in config order (every rank the same).
        images: images per task (0: nothing is done).
        seed: the run's seed.
        dtype: the run's compute dtype (autocast), None or fp32 for none.
    """
    if images <= 0:
        return []
    results = [
        calibrate_task(model.backbone, task, calibration_images(loader, task, images, seed), device, dtype)
        for task in tasks
        if trained_routers(model.backbone, task)
    ]
    _agree_over_ranks(model.backbone, tasks)
    return results


def _agree_over_ranks(backbone: nn.Module, tasks: list[str]) -> None:
    """Rank 0's biases on every rank, in one broadcast (fp32: every backend takes it)."""
    biases = [
        router.gates[task].selection_bias for task in tasks for _, router in trained_routers(backbone, task)
    ]
    if not biases:
        return
    flat = torch.cat([bias.float().flatten() for bias in biases])
    broadcast_from_main(flat)
    for bias, part in zip(biases, flat.split([bias.numel() for bias in biases])):
        bias.copy_(part.view_as(bias))
