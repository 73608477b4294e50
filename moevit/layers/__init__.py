"""Single-device MoE building blocks: routing, dispatch, experts, auxiliary losses."""

from moevit.layers.aux_losses import (
    load_balance_loss,
    mean_mutual_information_loss,
    mutual_information_loss,
    router_z_loss,
    task_expert_matrices,
)
from moevit.layers.dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from moevit.layers.experts import GroupedExperts, grouped_linear
from moevit.layers.moe_attention import MoEAttention
from moevit.layers.moe_mlp import MoEMlp
from moevit.layers.router import Routing, TaskGate, TaskRouter

__all__ = [
    "DispatchPlan",
    "GroupedExperts",
    "MoEAttention",
    "MoEMlp",
    "Routing",
    "TaskGate",
    "TaskRouter",
    "combine",
    "dispatch",
    "grouped_linear",
    "load_balance_loss",
    "mean_mutual_information_loss",
    "mutual_information_loss",
    "plan_dispatch",
    "router_z_loss",
    "task_expert_matrices",
]
