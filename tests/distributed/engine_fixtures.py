"""The tiny two-task model, config and data shared by the engine tests and their references.

Imported by test files in the parent process and by their worker functions in each rank.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from moevit.config.schema import Config, OptimConfig, ParallelConfig, TaskConfig, TrainConfig
from moevit.layers.aux_losses import load_balance_loss
from moevit.models.multitask import MultiTaskModel

TASK_CLASSES = {"a": 5, "b": 3}
IMAGE_SIZE = 32
GLOBAL_BATCH = 8  # images per task and step, split evenly over the ranks
BALANCE_WEIGHT = 0.01
GROUP_TIMEOUT = timedelta(seconds=60)  # a mismatched collective fails instead of hanging


def make_config(
    ep_size: int, zero_stage: int, steps: int, grad_clip: float = 0.05, layer_decay: float = 1.0
) -> Config:
    """Small grad_clip on purpose: clipping is active in every step, so the global norm matters."""
    tasks = {name: TaskConfig(type="classification", num_classes=n) for name, n in TASK_CLASSES.items()}
    optim = OptimConfig(
        lr=2e-3, min_lr=1e-4, weight_decay=0.05, warmup_steps=2, grad_clip=grad_clip, layer_decay=layer_decay
    )
    return Config(
        tasks=tasks,
        train=TrainConfig(steps=steps, optim=optim),
        parallel=ParallelConfig(ep_size=ep_size, zero_stage=zero_stage),
    )


def make_model(seed: int = 0) -> MultiTaskModel:
    """moevit_debug (4 experts, top-2, MoE on blocks 1 and 3) with a classification head per task.

    Gates start random instead of zero: with zero gates every expert ties and top-k always
    picks the same two, so half the experts would never see a row.
    """
    from moevit.heads import build_head
    from moevit.models import create_model

    torch.manual_seed(seed)
    backbone = create_model("moevit_debug", tasks=list(TASK_CLASSES))
    for _, router in backbone.routers():
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5)
    heads = {name: build_head("classification", n, backbone, IMAGE_SIZE) for name, n in TASK_CLASSES.items()}
    return MultiTaskModel(backbone, heads)


def tasks_of_step(step: int) -> list[str]:
    """Both tasks on even steps, only "a" on odd ones: "b"'s head and routers sit idle then."""
    return list(TASK_CLASSES) if step % 2 == 0 else ["a"]


def global_batch(step: int, task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + (0 if task == "a" else 1))
    images = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, TASK_CLASSES[task], (GLOBAL_BATCH,), generator=generator)
    return {"images": images, "labels": labels}


def rank_batch(step: int, task: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    per_rank = GLOBAL_BATCH // world_size
    return {
        key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in global_batch(step, task).items()
    }


def step_loss(model, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's objective of one step: task losses plus the load-balance loss of each task's routing.
    The batches go where the model is (a GPU under NCCL: benchmarks/gpu_check.py runs this check there)."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for task in tasks_of_step(step):
        batch = {key: value.to(device) for key, value in rank_batch(step, task, rank, world_size).items()}
        out = model(task, batch)
        total = total + out.losses["loss"] + BALANCE_WEIGHT * load_balance_loss(list(out.routing.values()))
    return total
