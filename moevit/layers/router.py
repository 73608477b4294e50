"""Task-conditioned top-k routing: one gate per task over experts shared by all tasks.

Mod-Squad (Chen et al., CVPR 2023) and M3ViT give every task its own linear gate in every MoE
layer; the experts are shared. Gates are zero-initialised (uniform routing at the start) and
computed in fp32 because bf16 softmax over logits that differ by little flips top-k choices
between otherwise identical runs.

The k selected probabilities are renormalised to sum to one. Consequence the pruner relies on:
dropping an expert that a token did not select leaves that token's output unchanged. (With
k = 1 the renormalised weight is always 1, so the gate learns only from the auxiliary losses;
use k >= 2 when the task loss should shape routing.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One MoE layer's routing decision for one forward pass of one task.

    Shapes use suffixes: T tokens, K experts per token, E experts.
    """

    task: str
    expert_idx_TK: torch.Tensor  # int64, the experts each token uses
    weights_TK: torch.Tensor  # fp32, renormalised gate weights (differentiable)
    probs_sum_E: torch.Tensor  # fp32, full softmax summed over tokens (differentiable): MI and balance losses
    counts_E: torch.Tensor  # int64, tokens routed to each expert (each of the K slots counts once)
    z_loss: torch.Tensor  # fp32 scalar, mean squared log-partition of the gate logits

    @property
    def num_tokens(self) -> int:
        return self.expert_idx_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_sum_E.shape[0]


class TaskGate(nn.Module):
    """A task's gate in one MoE layer, with the usage counter that the pruner reads.

    Args:
        dim: token width.
        num_experts: experts the gate scores.
    """

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim))
        # int64 so that `model.to(torch.bfloat16)` (DeepSpeed's bf16 mode) cannot round the counts.
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, num_experts={self.weight.shape[0]}"


class TaskRouter(nn.Module):
    """Top-k routing with one zero-initialised gate per task.

    Args:
        dim: token width.
        num_experts: experts shared by all tasks (E).
        top_k: experts per token (K).
        tasks: task names; each gets its own gate.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, tasks: Sequence[str]):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gates = nn.ModuleDict({task: TaskGate(dim, num_experts) for task in tasks})
        # Tests flip this so every expert receives tokens (and every parameter a gradient).
        self.force_balanced = False

    @property
    def tasks(self) -> list[str]:
        return list(self.gates.keys())

    def forward(self, x_TD: torch.Tensor, task: str) -> Routing:
        if task not in self.gates:
            raise KeyError(f"no router for task {task!r}; this layer routes {self.tasks}")
        gate = self.gates[task]
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), gate.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            if self.force_balanced:
                expert_idx_TK = self._balanced_assignment(x_TD.shape[0], x_TD.device)
                selected_TK = probs_TE.gather(1, expert_idx_TK)
            else:
                selected_TK, expert_idx_TK = probs_TE.topk(self.top_k, dim=-1)
            weights_TK = selected_TK / selected_TK.sum(dim=-1, keepdim=True)
            z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        counts_E = torch.bincount(expert_idx_TK.flatten(), minlength=self.num_experts)
        if self.training:
            gate.usage += counts_E
        return Routing(
            task=task,
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            probs_sum_E=probs_TE.sum(dim=0),
            counts_E=counts_E,
            z_loss=z_loss,
        )

    def _balanced_assignment(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Token t uses experts (t, t+1, ..., t+K-1) mod E: every expert gets tokens once T >= E."""
        token = torch.arange(num_tokens, device=device)[:, None]
        slot = torch.arange(self.top_k, device=device)[None, :]
        return (token + slot) % self.num_experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"
