"""The tiny models, configs and data shared by the engine tests and their references: a two-task
classification model with a hand-written objective (step_loss), and a three-task model (classification,
detection, segmentation) for the tests that drive the training step itself; RecordingEngine keeps the
gradients the engine reduced.

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


def train_engine(engine, steps: int, rank: int, world_size: int) -> list[float]:
    """`steps` optimizer steps of `step_loss` through `engine`; each step's loss averaged over ranks."""
    from moevit.parallel.collectives import all_reduce_sum

    losses = []
    for step in range(steps):
        loss = step_loss(engine, step, rank, world_size)
        engine.backward(loss)
        engine.step()
        losses.append((all_reduce_sum(loss) / world_size).item())
    return losses


# The three task types, for the tests that drive the real training step (moevit.train.step.MultiTaskStep)
# through the engine: one classification, one detection (RetinaNet) and one segmentation (UperNet) task.
THREE_TASK_TYPES = {"cls": "classification", "det": "detection", "seg": "segmentation"}
THREE_TASK_CLASSES = {"cls": 10, "det": 5, "seg": 6}
THREE_TASK_HEAD_OPTIONS = {"cls": {}, "det": {"out_channels": 32}, "seg": {"channels": 32}}


def make_three_task_config(
    ep_size: int, zero_stage: int, steps: int, grad_accum_steps: int = 1, **optim
) -> Config:
    """The three tasks' config; `optim` replaces OptimConfig fields."""
    tasks = {
        t: TaskConfig(type=kind, num_classes=THREE_TASK_CLASSES[t]) for t, kind in THREE_TASK_TYPES.items()
    }
    return Config(
        tasks=tasks,
        train=TrainConfig(steps=steps, grad_accum_steps=grad_accum_steps, optim=OptimConfig(**optim)),
        parallel=ParallelConfig(ep_size=ep_size, zero_stage=zero_stage),
    )


def make_three_task_model(image_size: int, seg_dropout: float = 0.1, seed: int = 0) -> MultiTaskModel:
    """moevit_debug with a head per task type; `seg_dropout` is the UperNet classifier's dropout."""
    from moevit.heads import build_head
    from moevit.models import create_model

    torch.manual_seed(seed)
    backbone = create_model("moevit_debug", tasks=list(THREE_TASK_TYPES), img_size=image_size)
    for _, router in backbone.routers():  # zero gates tie every expert: MI would have no gradient
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5)
    options = {**THREE_TASK_HEAD_OPTIONS, "seg": {**THREE_TASK_HEAD_OPTIONS["seg"], "dropout": seg_dropout}}
    heads = {
        t: build_head(kind, THREE_TASK_CLASSES[t], backbone, image_size, **options[t])
        for t, kind in THREE_TASK_TYPES.items()
    }
    return MultiTaskModel(backbone, heads)


def three_task_batches(count: int, image_size: int, seed: int) -> dict[str, dict]:
    """`count` images per task. Every segmentation image has the same number of valid (non-ignored)
    pixels: the loss divides by the valid pixels of each forward, so only then does a mean over forwards
    (ranks, accumulation rounds) equal the mean over the whole batch."""
    g = torch.Generator().manual_seed(seed)
    images = {t: torch.randn(count, 3, image_size, image_size, generator=g) for t in THREE_TASK_TYPES}
    targets = []
    for _ in range(count):
        corners = torch.randint(0, image_size // 2, (2,), generator=g).float()
        sides = torch.randint(image_size // 4, image_size // 2, (2,), generator=g).float()
        label = torch.randint(0, THREE_TASK_CLASSES["det"], (1,), generator=g)
        targets.append({"boxes": torch.cat([corners, corners + sides]).unsqueeze(0), "labels": label})
    masks = torch.randint(0, THREE_TASK_CLASSES["seg"], (count, image_size, image_size), generator=g)
    masks[:, : image_size // 8] = 255
    return {
        "cls": {"images": images["cls"], "labels": torch.randint(0, 10, (count,), generator=g)},
        "det": {"images": images["det"], "targets": targets},
        "seg": {"images": images["seg"], "masks": masks},
    }


class RecordingEngine:
    """The DeepSpeed engine, recording the gradients it holds when it takes the optimizer step."""

    def __init__(self, engine):
        self.engine = engine
        self.gradients: dict[str, torch.Tensor] | None = None

    def __call__(self, task, batch):
        return self.engine(task, batch)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.engine.is_gradient_accumulation_boundary():
            partitions = getattr(self.engine.optimizer, "averaged_gradients", None)
            if partitions:  # ZeRO 1 and 2: the reduced gradient partitions, per optimizer group
                self.gradients = {
                    f"group {g}": torch.cat([t.flatten() for t in partitions[g]]) for g in sorted(partitions)
                }
            else:
                self.gradients = {
                    n: p.grad.clone() for n, p in self.engine.module.named_parameters() if p.grad is not None
                }
        self.engine.step()
