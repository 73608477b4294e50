"""Auxiliary MoE losses, computed from `Routing` records returned by the forward pass.

- load balance (Switch Transformer, Fedus et al. 2021; GShard): E * sum_e f_e * P_e, where f_e is
  the fraction of routed rows that went to expert e and P_e the mean router probability of e.
  It equals 1 when routing is uniform.
- router z-loss (ST-MoE, Zoph et al. 2022): mean squared log-partition of the gate logits; keeps
  logits small so the fp32 softmax stays well conditioned.
- task-expert mutual information (Mod-Squad, Chen et al. 2023):
  L = -sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e))), with P(t,e) built from router probabilities
  summed over task t's tokens. Minimising it balances overall expert use (high H(E)) while
  making each task's use sparse (low H(E|T)).

The MI statistics are sums, so they can be all-reduced across ranks before the loss. Because
ranks see different tasks (heterogeneous data), the task marginal should be the real sampling
ratio of the tasks, not the token counts that happen to be in this batch: pass `task_prior_T`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moevit.layers.router import Routing


def load_balance_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """Mean over layers of E * sum_e f_e P_e (1.0 when balanced)."""
    losses = []
    for r in routings:
        rows_fraction_E = r.counts_E.float() / r.counts_E.sum().clamp(min=1)
        mean_prob_E = r.probs_sum_E / max(r.num_tokens, 1)
        # Balanced means over the experts the task can reach (all E unless it is restricted).
        losses.append(r.num_routable * (rows_fraction_E * mean_prob_E).sum())
    return torch.stack(losses).mean()


def router_z_loss(routings: Sequence[Routing]) -> torch.Tensor:
    return torch.stack([r.z_loss for r in routings]).mean()


def mutual_information_loss(
    probs_sum_TE: torch.Tensor, task_prior_T: torch.Tensor | None = None, eps: float = 1e-9
) -> torch.Tensor:
    """Negative task-expert mutual information for one MoE layer.

    Args:
        probs_sum_TE: A[t, e], router probability mass that task t's tokens gave expert e.
        task_prior_T: P(t), the real task sampling ratio. When given, P(t, e) = P(t) * A[t, e] /
            sum_e A[t, e]; otherwise P(t, e) = A / A.sum(). Tasks with no tokens (zero rows)
            are left out either way.
        eps: guards the logarithms against empty cells.
    """
    A = probs_sum_TE.float()
    row_mass_T = A.sum(dim=1)
    present_T = row_mass_T > 0
    A, row_mass_T = A[present_T], row_mass_T[present_T]
    if task_prior_T is None:
        joint_TE = A / A.sum()
    else:
        prior_T = task_prior_T.to(A)[present_T]
        joint_TE = (prior_T / prior_T.sum())[:, None] * A / row_mass_T[:, None]
    p_task_T = joint_TE.sum(dim=1, keepdim=True)
    p_expert_E = joint_TE.sum(dim=0, keepdim=True)
    mutual_information = (
        joint_TE * (torch.log(joint_TE + eps) - torch.log(p_task_T * p_expert_E + eps))
    ).sum()
    return -mutual_information


def task_expert_matrices(
    routings_by_task: Mapping[str, Sequence[Routing]], tasks: Sequence[str]
) -> list[torch.Tensor]:
    """Per MoE layer, the (tasks, experts) matrix A[t, e] = probs_sum_E of task t.

    Tasks absent from `routings_by_task` get zero rows (they did not train this step).
    """
    present = [routings for routings in routings_by_task.values() if routings]
    if not present:
        raise ValueError("no routing records: nothing was routed")
    num_layers = len(present[0])
    matrices = []
    for layer in range(num_layers):
        reference = present[0][layer].probs_sum_E
        layer_rows = []
        for task in tasks:
            routings = routings_by_task.get(task)
            layer_rows.append(routings[layer].probs_sum_E if routings else torch.zeros_like(reference))
        matrices.append(torch.stack(layer_rows))
    return matrices


def mean_mutual_information_loss(
    matrices_TE: Sequence[torch.Tensor], task_prior_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Mutual-information loss averaged over MoE layers (each layer has its own experts)."""
    return torch.stack([mutual_information_loss(m, task_prior_T) for m in matrices_TE]).mean()
