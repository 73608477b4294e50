"""Parameters and GFLOPs of a pruned model as a function of how many experts each MoE layer keeps.

The budgets of criteria.py need the cost of many candidate plans, so the cost is computed from a
reference (the source architecture restricted to the kept tasks, all experts) plus, per MoE MLP layer,
the difference between keeping n and all E experts. Per layer, with D the width, H the expert width,
K the top-k, T the kept tasks and n the kept experts (flops.py's conventions: 2 x multiply-adds, per
image, contractions only):

    n >= 2   params  n (2DH + H + D) + T n D            MACs/token  D n + min(K, n) (2DH + D)
    n == 1   params  2DH + H + D  (a plain MLP)         MACs/token  2DH

Tested against `count_parameters` / `analytic_flops` of the extracted model (tests/unit/prune).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moevit.layers.moe_mlp import MoEMlp
from moevit.models.flops import analytic_flops, count_parameters
from moevit.models.multitask import MultiTaskModel


class PlanCost:
    """Args:
    reference: the source architecture for the kept tasks only, every expert kept (weights unused).
    image_sizes: task -> square input side (the task's data.image_size).
    """

    def __init__(self, reference: MultiTaskModel, image_sizes: Mapping[str, int]):
        backbone = reference.backbone
        self.tasks = list(reference.tasks)
        self.image_sizes = dict(image_sizes)
        self.layers: dict[str, MoEMlp] = {
            name: module for name, module in backbone.routed_layers() if isinstance(module, MoEMlp)
        }
        self.full_experts = {name: layer.num_experts for name, layer in self.layers.items()}
        self.base_params = sum(p.numel() for p in reference.parameters())
        self.base_gflops = {
            task: analytic_flops(backbone, image_sizes[task], task)["gflops"] for task in self.tasks
        }
        self.tokens = {
            task: analytic_flops(backbone, image_sizes[task], task)["tokens"] for task in self.tasks
        }
        self.base_active = count_parameters(backbone)["active_per_token"]

    def _layer_params(self, name: str, n: int) -> int:
        experts = self.layers[name].experts
        dim, hidden = experts.dim, experts.hidden
        one_expert = 2 * dim * hidden + hidden + dim
        return one_expert if n == 1 else n * one_expert + len(self.tasks) * n * dim

    def _layer_macs_per_token(self, name: str, n: int) -> int:
        experts, top_k = self.layers[name].experts, self.layers[name].top_k
        dim, hidden = experts.dim, experts.hidden
        if n == 1:
            return 2 * dim * hidden
        return dim * n + min(top_k, n) * (2 * dim * hidden + dim)

    def params(self, kept_counts: Mapping[str, int]) -> int:
        """Total parameters of the pruned model (backbone and the kept tasks' heads)."""
        return self.base_params + sum(
            self._layer_params(name, kept_counts[name]) - self._layer_params(name, self.full_experts[name])
            for name in self.layers
        )

    def gflops(self, kept_counts: Mapping[str, int], tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Backbone GFLOPs per image of each task (heads have no analytic count)."""
        out = {}
        for task in tasks or self.tasks:
            delta = sum(
                self._layer_macs_per_token(name, kept_counts[name])
                - self._layer_macs_per_token(name, self.full_experts[name])
                for name in self.layers
            )
            out[task] = self.base_gflops[task] + 2 * self.tokens[task] * delta / 1e9
        return out
