"""Expert weights as stacked tensors and their grouped matmuls.

Each expert is the two-layer MLP of a ViT block (fc1 -> GELU -> fc2). Stacking the E experts'
weights into (E, out, in) tensors keeps per-expert slicing trivial (pruning, expert-parallel
sharding, upcycling all index dim 0) and matches `nn.Linear`'s (out, in) layout, so a dense
`Mlp.fc1.weight` copies into `fc1_weight[e]` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_linear(
    x_SI: torch.Tensor, counts: list[int], weight_EOI: torch.Tensor, bias_EO: torch.Tensor | None
) -> torch.Tensor:
    """Apply expert e's linear map to its block of `counts[e]` consecutive rows of x."""
    outputs = []
    for e, x_block in enumerate(x_SI.split(counts, dim=0)):
        if x_block.shape[0] == 0:
            continue
        bias = None if bias_EO is None else bias_EO[e]
        outputs.append(F.linear(x_block, weight_EOI[e], bias))
    if not outputs:  # no rows at all: still a function of x and the weights, so backward reaches both
        return F.linear(x_SI, weight_EOI[0], None if bias_EO is None else bias_EO[0])
    return torch.cat(outputs, dim=0)


class GroupedExperts(nn.Module):
    """E independent MLP experts applied to expert-sorted rows.

    Args:
        num_experts: experts held by this module (E; a shard of them under expert parallelism).
        dim: input and output width (D).
        hidden: expert hidden width (H).
        act_layer: activation between the two linears.
        bias: whether both linears have biases.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, bias: bool = True
    ):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as timm's ViT init for its Linear layers, so MoE and dense blocks start alike.
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        for bias in (self.fc1_bias, self.fc2_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD holds rows sorted by expert, `counts_E[e]` rows for expert e."""
        counts = counts_E.tolist()
        h_SH = self.act(grouped_linear(x_SD, counts, self.fc1_weight, self.fc1_bias))
        return grouped_linear(h_SH, counts, self.fc2_weight, self.fc2_bias)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
