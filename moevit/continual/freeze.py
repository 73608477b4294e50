"""Freezing that really freezes: what a continual run trains, and nothing else.

Mod-Squad's fine-tuning "froze" modules by setting a plain attribute (`module.requires_grad = False`:
nothing froze), and AdamW's decoupled weight decay moves a weight whose gradient is zero. Here a frozen
parameter has requires_grad False, so it gets no gradient, and moevit.parallel.engine's optimizer groups
leave it out: no update, no weight decay, no optimizer state.

Trainable in a continual run: the gates, heads and task embeddings of `continual.train_tasks`, and the
experts from index `continual.frozen_experts` on; everything else is frozen unless
`continual.train_shared` (patch embedding, attention, norms, dense MLPs, attention experts).

Experts of one layer are stacked in one (E, ...) tensor (moevit.layers.experts), and a slice cannot have
its own requires_grad. The layer records its frozen experts (`GroupedExperts.frozen_experts`); training
always runs experts through the expert-parallel wrapper (moevit.parallel.expert_parallel, ep_size 1
included), which gives every expert its own parameters and creates the recorded ones with requires_grad
False. That is exact (each old expert is a separate, untouched tensor) where a gradient mask on the
stacked tensor would still leave the slice inside a decayed optimizer group. So `freeze_for_continual`
runs on the single-device model, before expert parallelism is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from moevit.layers.experts import GroupedExperts
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.param_names import task_of


def freeze_for_continual(
    model: nn.Module, train_tasks: Sequence[str], frozen_experts: int, train_shared: bool = False
) -> dict[str, int]:
    """Sets requires_grad on every parameter of a single-device `MultiTaskModel`; returns the counts.

    Args:
        model: the model, before expert parallelism is applied.
        train_tasks: tasks whose gates, heads and task embeddings train.
        frozen_experts: experts 0..n-1 of every MoE MLP layer stay frozen.
        train_shared: also train the weights all tasks share.
    """
    expert_modules: dict[str, GroupedExperts] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEMlp):
            if not isinstance(module.experts, GroupedExperts):
                raise ValueError(
                    f"{name}: its experts are already sharded ({type(module.experts).__name__}); "
                    "freeze the single-device model, then apply expert parallelism"
                )
            expert_modules[f"{name}.experts"] = module.experts
    for experts in expert_modules.values():
        experts.frozen_experts = frozenset(range(min(frozen_experts, experts.num_experts)))
        trainable = frozen_experts < experts.num_experts
        for param in experts.parameters():
            param.requires_grad_(trainable)
    owned = {id(p) for experts in expert_modules.values() for p in experts.parameters()}
    train = set(train_tasks)
    for name, param in model.named_parameters():
        if id(param) in owned:
            continue
        task = task_of(name)
        param.requires_grad_(task in train if task is not None else train_shared)
    return parameter_counts(model)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable", "total"} parameters; frozen experts inside a stacked tensor count as frozen."""
    total = trainable = 0
    partly_frozen = {
        id(p): len(m.frozen_experts) / m.num_experts
        for m in model.modules()
        if isinstance(m, GroupedExperts) and m.frozen_experts
        for p in m.parameters()
    }
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += round(param.numel() * (1 - partly_frozen.get(id(param), 0.0)))
    return {"trainable": trainable, "total": total}
