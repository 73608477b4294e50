"""Pieces the training-step benchmarks share (train_step.py, paper_config_step.py, gpu_check.py).

Imports nothing optional at module level: gpu_check.py runs them on a GPU machine without DeepSpeed,
pycocotools, webdataset or fvcore, so what needs DeepSpeed (the engine's parameter groups) is imported
where it is used, with a plain fallback.
"""

from __future__ import annotations

import contextlib

import torch

from moevit.factory import build_model
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.flops import analytic_flops

# (H, W) of the synthetic training samples, as in the datasets
SAMPLE_SIZES = {"imagenet": (375, 500), "coco": (480, 640), "ade20k": (512, 683)}


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], str]:
    """(parameter groups, what they are): the engine's groups (moevit.parallel.engine, which needs
    DeepSpeed for its expert split) when DeepSpeed imports, else one group of every trainable parameter.
    The step's cost is the same either way; only the decay of biases and norms differs."""
    try:
        from moevit.parallel.engine import optimizer_param_groups
    except ImportError as err:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}], f"one group ({err.name} not importable)"
    return optimizer_param_groups(model, weight_decay), "the engine's groups"


class LocalEngine:
    """The engine interface MultiTaskStep drives, on one process with torch's AdamW.

    `dtype` bf16 / fp16 runs the forward under torch.autocast as DeepSpeed's `torch_autocast` does
    (parameters, gradients and optimizer state stay fp32); `scaler` (a torch.amp.GradScaler) adds fp16
    loss scaling: the backward runs on the scaled loss, the gradients are unscaled before clipping, and
    a step whose gradients overflowed is skipped and the scale lowered.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optim,
        dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.module = model
        groups, self.param_groups_kind = adamw_param_groups(model, optim.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
        self.grad_clip = optim.grad_clip
        self.dtype = dtype
        self.scaler = scaler

    def autocast(self):
        if self.dtype in (None, torch.float32):
            return contextlib.nullcontext()
        device = next(self.module.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def __call__(self, task, batch):
        with self.autocast():
            return self.module(task, batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def equal_flops_overrides(cfg) -> list[str]:
    """`model.moe.expert_hidden` making K experts cost one dense MLP (mlp_ratio x D)."""
    probe = build_model(cfg).backbone
    moe = next(m for m in probe.modules() if isinstance(m, MoEMlp))
    dense_hidden = int(probe.embed_dim * (cfg.model.mlp_ratio or 4.0))
    if dense_hidden % moe.top_k:
        raise ValueError(f"dense MLP width {dense_hidden} is not divisible by top_k={moe.top_k}")
    return [f"model.moe.expert_hidden={dense_hidden // moe.top_k}"]


def active_gflops(model, cfg) -> float:
    """Forward GFLOPs of the backbone per step: each task's per-image count x its batch size."""
    return sum(
        analytic_flops(model.backbone, task.data.image_size, name)["gflops"] * task.data.batch_size
        for name, task in cfg.tasks.items()
    )


def training_batch(task_type: str, data, image_size: int, num_classes: int, batch_size: int = 1) -> dict:
    """`batch_size` synthetic samples in the reader's format (sample i drawn from seed i) through the
    task's training transforms and collate."""
    from torchvision import tv_tensors

    from moevit.data.collate import collate_for_task
    from moevit.data.transforms import build_transforms

    height, width = SAMPLE_SIZES[data.format]
    samples = []
    for index in range(batch_size):
        generator = torch.Generator().manual_seed(index)
        image = tv_tensors.Image(
            torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        )
        sample: dict = {"image": image, "key": f"benchmark/{index}"}
        if task_type == "classification":
            sample["label"] = index % num_classes
        elif task_type == "detection":
            corners = torch.rand(12, 2, generator=generator) * torch.tensor([width / 2, height / 2])
            sizes = 16 + torch.rand(12, 2, generator=generator) * torch.tensor([width / 2, height / 2])
            boxes = torch.cat([corners, corners + sizes], dim=1)
            sample["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
            sample["labels"] = torch.randint(0, num_classes, (12,), generator=generator)
            sample["image_id"] = index + 1
        else:
            sample["mask"] = tv_tensors.Mask(
                torch.randint(0, num_classes, (height, width), dtype=torch.uint8, generator=generator)
            )
        samples.append(sample)
    transform = build_transforms(
        task_type, True, image_size, data.transform_settings(), crop_scale=data.crop_scale
    )
    torch.manual_seed(0)
    return collate_for_task(task_type)([transform(sample) for sample in samples])
