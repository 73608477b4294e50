"""Mixture of attention heads (MoA): each token picks its top-k attention heads.

MoA (Zhang et al., "Mixture of Attention Heads: Selecting Attention Heads Per Token", EMNLP
2022), used in Mod-Squad's attention layers (Chen et al., CVPR 2023), treats every attention
head as an expert with its own query projection W_q^e (D -> H) and output projection W_o^e
(H -> D). A task router picks K of the E heads per token; token t's output is

    y_t = sum_{e in topk(t)} w_{t,e} W_o^e softmax(W_q^e x_t . K^T / sqrt(H)) V  +  b_o

Keys and values are one H-wide projection shared by all experts. That is what keeps the layer
sparse: K and V are computed once per token whatever E is, so per-token cost grows with K (a
query, an attention row and an output projection per selected head), not with the number of
experts, and E can grow at the price of parameters only.

Sparse implementation reusing the MoE MLP's pieces: the (token, slot) rows are sorted by expert
(`plan_dispatch`), the query projections run as a grouped matmul, the queries are un-sorted so
each image's N*K queries attend over its N shared keys in one `scaled_dot_product_attention`
call, and the attention outputs are sorted again for the grouped output projections and the
gate-weighted combine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moevit.layers.dispatch import combine, dispatch, plan_dispatch
from moevit.layers.experts import grouped_linear
from moevit.layers.router import DEFAULT_GATE_INIT_STD, Routing, TaskRouter


class MoEAttention(nn.Module):
    """Dropless top-k mixture of attention heads with one router per task and shared K/V.

    Args:
        dim: token width (D).
        num_experts: head experts shared by all tasks (E).
        top_k: head experts per token (K).
        head_dim: width of one head expert and of the shared keys and values (H).
        tasks: task names; each gets a router.
        qkv_bias: biases on the query projections and the shared key/value projection.
        gate_init_std, router_jitter: the router's gate initialisation and training-only input jitter
            (moevit.layers.router).
    """

    routes_tasks = True  # forward takes (x, task) and returns (y, Routing)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        head_dim: int,
        tasks: Sequence[str],
        qkv_bias: bool = True,
        gate_init_std: float = DEFAULT_GATE_INIT_STD,
        router_jitter: float = 0.0,
    ):
        super().__init__()
        self.dim, self.head_dim = dim, head_dim
        self.scale = head_dim**-0.5
        self.router = TaskRouter(
            dim, num_experts, top_k, tasks, gate_init_std=gate_init_std, jitter=router_jitter
        )
        # Stacked (E, out, in) like GroupedExperts: pruning and sharding slice dim 0.
        self.q_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        self.q_bias = nn.Parameter(torch.zeros(num_experts, head_dim)) if qkv_bias else None
        self.kv = nn.Linear(dim, 2 * head_dim, bias=qkv_bias)
        self.o_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        # One output bias for all heads: the gate weights sum to one, so a per-expert bias
        # would only add parameters that the weighted sum mixes back into a single vector.
        self.o_bias = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def reset_parameters(self) -> None:
        # timm's ViT init for its Linear layers, so MoA and dense attention start alike.
        for weight in (self.q_weight, self.kv.weight, self.o_weight):
            nn.init.trunc_normal_(weight, std=0.02)
        for bias in (self.q_bias, self.kv.bias, self.o_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, Routing]:
        """x: (B, N, D) tokens of B images; attention stays within each image."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoEAttention expects (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        batch, num_tokens, _ = x.shape
        x_TD = x.reshape(-1, self.dim)
        routing = self.router(x_TD, task)
        plan = plan_dispatch(routing.expert_idx_TK, self.num_experts)
        counts = plan.counts_E.tolist()

        q_SH = grouped_linear(dispatch(x_TD, plan), counts, self.q_weight, self.q_bias)
        # Un-sort to (token, slot) order: T = B*N tokens are image-major, so the T*K slot rows
        # of image b are exactly rows [b*N*K, (b+1)*N*K) and a view separates the images.
        q_slots = torch.empty_like(q_SH).index_copy(0, plan.sort_order_S, q_SH)
        q_B1QH = q_slots.view(batch, 1, num_tokens * self.top_k, self.head_dim)
        k_BNH, v_BNH = self.kv(x).chunk(2, dim=-1)
        attn_B1QH = F.scaled_dot_product_attention(
            q_B1QH, k_BNH.unsqueeze(1), v_BNH.unsqueeze(1), scale=self.scale
        )

        attn_SH = attn_B1QH.reshape(-1, self.head_dim).index_select(0, plan.sort_order_S)
        o_SD = grouped_linear(attn_SH, counts, self.o_weight, None)
        y_TD = combine(o_SD, routing.weights_TK, plan) + self.o_bias.to(o_SD.dtype)
        return y_TD.view(x.shape), routing

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, head_dim={self.head_dim}"
