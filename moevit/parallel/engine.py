"""The DeepSpeed engine around a multi-task MoE model: optimizer groups, LR schedule, ZeRO, precision.

`build_engine(model, cfg, env)` shards the experts (`apply_expert_parallel`), builds AdamW
parameter groups (no weight decay for biases, norms and the model's `no_weight_decay()`
names; optional layer-wise lr decay, a per-group `lr_scale` the LR schedule multiplies in; expert
parameters split into DeepSpeed's MoE groups with
`split_params_into_different_moe_groups_for_optimizer`, which ZeRO partitions over the
expert-data-parallel group), a linear-warmup + cosine LR schedule stepped by the engine, and
calls `deepspeed.initialize`. Use per optimizer step (or per round of one, moevit.train.step):

    outputs = {task: engine(task, batch) for task, batch in plan}   # model(task, batch) -> TaskOutput
    engine.backward(total_loss)   # one backward over the sum of task and auxiliary losses
    engine.step()                 # reduce, clip, AdamW, LR schedule

Precision (moevit.parallel.precision): fp32; bf16 through DeepSpeed's `torch_autocast` (parameters,
gradients, optimizer state and gradient reduction stay fp32; matmuls and convolutions run in bf16; the
routers force fp32 themselves; batches need no casting); or, on CUDA, fp16 through DeepSpeed's `fp16`
section with dynamic loss scaling (fp16 weights, fp32 master weights in DeepSpeed's optimizer wrapper,
which then also clips: at ZeRO 0 by the norm of the dense gradients only, DeepSpeed's
FP16_UnfusedOptimizer leaving expert gradients out of it; ZeRO 1 and 2 clip by the global norm).

Gradient clipping. ZeRO 1 and 2 compute the exact global norm over partitions. Without ZeRO,
DeepSpeed's `clip_grad_norm_` (runtime/utils.py) averages each rank's local norm, which is
the global norm only when every rank holds the same parameters; with ep_size > 1 ranks hold
different experts, so `build_engine` replaces the engine's `clip_fp32_gradients` with the
exact global norm (dense gradients once, expert gradients summed over the expert-parallel
group), keeping ep_size 1 and ep_size P identical.

The optimizer is torch's AdamW, passed in as a client optimizer (DeepSpeed's FusedAdam needs
a CUDA build; ZeRO 1 and 2 accept torch's AdamW as tested). DeepSpeed's flat-buffer optimizers
give a parameter that had no gradient this step (a task's head or router when that task did
not train) a zero gradient, so AdamW's momentum and weight decay still move it; torch's AdamW
alone would skip it.

DeepSpeed hooks its backward prologue onto tensors it finds in tuple/list/dict forward outputs;
`TaskOutput` is a dataclass, so none are hooked and `engine.backward` alone drives the
reduction (what the multi-forward, single-backward step needs; checked for ZeRO 0, 1 and 2
against a single-process reference in tests/distributed/test_engine_parity.py).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from moevit.models.moe_vit import MoEViT
from moevit.models.param_names import decay_layer
from moevit.parallel.env import DistributedEnv
from moevit.parallel.expert_parallel import apply_expert_parallel
from moevit.parallel.layout import resolve_precision
from moevit.parallel.precision import deepspeed_precision_sections
from moevit.parallel.setup import device_for, expert_group_name

if TYPE_CHECKING:
    from moevit.config.schema import Config, OptimConfig


def optimizer_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: (decay or not) x (layer-decay layer) x (expert or not), each with its `lr_scale`.

    No weight decay (timm's convention) for 1-D parameters (norms), biases (also the stacked (E, H)
    ones of single-device experts and attention experts) and the names in `model.no_weight_decay()`
    (position embedding, class token, task embeddings, gates). Parameters with requires_grad False
    (the continual run's frozen experts) are in no group: no update, no decay, no optimizer state.

    `layer_decay` < 1: BEiT's layer-wise lr decay (moevit.models.param_names.decay_layer numbers the
    layers 0..n+1 of an n-block backbone); a parameter of layer l trains at lr x layer_decay ** (n + 1 - l),
    so the heads and final norm get lr, block 0 lr x layer_decay ** n, the embeddings lr x layer_decay ** (n + 1).
    Groups then carry `layer_id` and are ordered from the top layer down: the first group has the
    full lr, the one the training log reports (`engine.get_lr()[0]`). With layer_decay 1 every layer
    shares a group, so the groups are the two they were before layer decay existed (checkpoints stay
    loadable). Finally DeepSpeed's split moves the expert parameters of every group into a group of
    their own (`moe`: True, named after the expert group), keeping the group's other keys.
    """
    skip_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layer_of = _decay_layer_function(model) if layer_decay < 1 else None
    groups: dict[tuple[int | None, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.endswith("bias") or name in skip_decay)
        layer, scale = None, 1.0
        if layer_of is not None:
            layer, top = layer_of(name)
            scale = layer_decay ** (top - layer)
        if (layer, decays) not in groups:
            kind = "decay" if decays else "no_decay"
            groups[layer, decays] = {
                "name": kind if layer is None else f"layer_{layer}_{kind}",
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": scale,
                **({} if layer is None else {"layer_id": layer}),
            }
        groups[layer, decays]["params"].append(param)
    # Top layer first, the decaying group before the other within a layer (moevit.parallel.reshard
    # relies on that order for the expert groups).
    ordered = [groups[key] for key in sorted(groups, key=lambda key: (-(key[0] or 0), not key[1]))]
    split = split_params_into_different_moe_groups_for_optimizer(ordered)
    return [group for group in split if group["params"]]


def _decay_layer_function(model: nn.Module):
    """name -> (layer, top layer) for the parameters of `model`, a MoEViT or a model holding one."""
    for prefix, module in model.named_modules():
        if isinstance(module, MoEViT):
            prefix, depth = f"{prefix}." if prefix else "", len(module.blocks)
            return lambda name: (decay_layer(name, depth, prefix), depth + 1)
    raise ValueError(f"train.optim.layer_decay < 1 needs a MoEViT backbone; {type(model).__name__} has none")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warmup to 1, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _scaled(factor, lr_scale: float, step: int) -> float:
    return lr_scale * factor(step)


def lr_schedule(optim: OptimConfig, total_steps: int):
    """A callable DeepSpeed turns into the engine's scheduler (stepped and checkpointed by it): each
    group's lr is optim.lr x the warmup-cosine factor x the group's `lr_scale` (layer decay).

    The scales are bound when the scheduler is built, from the groups the config gave, so a resumed
    run follows its config; the lr_scale a checkpoint's groups carry is only a record."""
    factor = functools.partial(
        warmup_cosine_factor,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        min_ratio=optim.min_lr / optim.lr,
    )
    return lambda optimizer: LambdaLR(
        optimizer,
        [functools.partial(_scaled, factor, group.get("lr_scale", 1.0)) for group in optimizer.param_groups],
    )


def deepspeed_config(cfg: Config) -> dict:
    return {
        # The loop feeds its own batches; DeepSpeed only needs a consistent micro-batch count.
        "train_micro_batch_size_per_gpu": 1,
        # Micro-batches per optimizer step: engine.backward divides each by it (moevit.train.step).
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.train.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        **deepspeed_precision_sections(resolve_precision(cfg)),
        "steps_per_print": None,
        "checkpoint": {"tag_validation": "FAIL"},
    }


def build_engine(model: nn.Module, cfg: Config, env: DistributedEnv) -> deepspeed.DeepSpeedEngine:
    """Shard the experts of `model` and wrap it in a DeepSpeed engine (see the module docstring).

    Needs `moevit.parallel.setup.initialize_distributed(cfg)` first; every rank must pass the
    same model (same seed).
    """
    ep_size = cfg.parallel.ep_size
    if (
        not dist.is_initialized()
        or expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict()
    ):
        raise RuntimeError(
            "build_engine needs the process group and expert groups of "
            "moevit.parallel.setup.initialize_distributed(cfg); call it first"
        )
    apply_expert_parallel(model, ep_size)
    model.to(device_for(env))
    optim = cfg.train.optim
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, optim.weight_decay, optim.layer_decay),
        lr=optim.lr,
        betas=tuple(optim.betas),
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_schedule(optim, cfg.train.steps),
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    if cfg.parallel.zero_stage == 0 and ep_size > 1:
        ep_group = groups._get_expert_parallel_group(expert_group_name(ep_size))
        engine.clip_fp32_gradients = functools.partial(clip_gradients_by_global_norm, engine, ep_group)
    return engine


def clip_gradients_by_global_norm(
    engine: deepspeed.DeepSpeedEngine, ep_group: dist.ProcessGroup
) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient when ranks hold different experts.

    Runs after the reduction: dense gradients are equal on all ranks (counted once), expert
    gradients are equal across expert-data-parallel replicas, so their squares are summed over
    the expert-parallel group only. Same coefficient as DeepSpeed and torch: max_norm / (norm + 1e-6).
    """
    params = [p for p in engine.module.parameters() if p.grad is not None]
    dense_sq = torch.zeros((), device=engine.device)
    expert_sq = torch.zeros((), device=engine.device)
    for p in params:
        square = p.grad.detach().float().square().sum()
        if is_moe_param(p):
            expert_sq += square
        else:
            dense_sq += square
    dist.all_reduce(expert_sq, group=ep_group)
    total_norm = (dense_sq + expert_sq).sqrt()
    clip_coef = (engine.gradient_clipping() / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(clip_coef)
    return total_norm
