"""Expert parallelism: each rank of an expert-parallel group holds a contiguous shard of experts.

`apply_expert_parallel(model, ep_size)` swaps every `MoEMlp.experts` (a `GroupedExperts`
holding all E experts) for an `ExpertParallelExperts` holding this rank's E/P experts, with the
same call signature: forward(x_SD sorted by global expert, counts_E) -> y_SD in the same order.
The model code stays single-device; the router, dispatch and combine run locally as before.

Exchange (variable sizes; GShard/DeepSpeed-MoE style). It moves the rows the layer's plan holds: all of
them when dropless, only the kept ones under an expert capacity bound (moevit.layers.capacity), which
the layer applies to its local routing before calling this module, so a rank receives at most
(its experts) x (each source rank's capacity) rows and this module needs no capacity logic of its own:
1. per-expert row counts go to the rank owning each expert (`all_to_all_single`, L per rank);
2. rows go the same way (`all_to_all_single` with split sizes = rows per destination rank)
   inside an autograd Function whose backward is the reverse exchange;
3. received rows are grouped by source rank, then local expert; they are permuted to be
   grouped by local expert, run through the local experts (`moevit.layers.experts.grouped_mlp` on
   the per-expert parameters: the single-device model's expert function and `expert_impl`, so one
   choice of expert path serves both), permuted back and returned by a
   second exchange. One `all_to_all_single` buffer moves the contiguous per-rank blocks without
   splitting them into tensors (gloo lacked the list form `all_to_all` before recent torch).
Every rank runs every collective, also with zero rows to send or receive, and the local experts
run as one autograd node whatever their row counts, so each rank's autograd graph has the same
shape (same backward collectives, same gradient hooks in the same order) and every trainable expert
parameter gets a gradient (zeros when it saw no rows).

Registration with DeepSpeed (the decision, and why). DeepSpeed's engine treats a model as MoE
only when a module is an instance of `deepspeed.moe.layer.MoE` (runtime/engine.py,
`_configure_distributed_model`): only then does it reduce expert gradients over the
expert-data-parallel group (`_reduce_expert_gradients`; without it, parameters marked
`allreduce=False` even raise a KeyError in `_get_gradients_for_reduction`), give ZeRO the
expert groups, and write expert checkpoints per global expert. DeepSpeed's own MoE cannot host
our layer (its gate has no task input, it drops tokens by capacity), so `ExpertParallelExperts`
subclasses `MoE` without running `MoE.__init__` and provides what the engine reads:
`num_experts`, `num_local_experts`, `ep_size`, `expert_group_name`, a no-op
`set_deepspeed_parallelism` (groups come from `moevit.parallel.setup`), and the parameter
layout DeepSpeed's MoE checkpoint code parses: `deepspeed_moe.experts.deepspeed_experts.<i>.*`
(a `deepspeed.moe.experts.Experts`, which also sets `allreduce=False` and
`group_name="ep_size_<P>"` on each expert's parameters). Consequences:
- gradients: dense ones averaged over all ranks; expert ones summed over the expert-data-
  parallel group and divided by the world size (DeepSpeed keeps the value independent of P),
  so P=1 and P=2 train the same model;
- checkpoints: `engine.save_checkpoint` writes one file per (MoE layer, global expert),
  `layer_<l>_expert_<g>_mp_rank_00_model_states.pt`, whatever P is, so expert weights load at
  another ep_size; optimizer state stays per rank (DeepSpeed does not reshard it);
- state_dict names under the engine differ from the single-device model's stacked
  `experts.fc1_weight` (E, H, D): `experts.deepspeed_moe.experts.deepspeed_experts.<i>.fc1_weight`
  (H, D) with i local. `gather_single_device_state_dict` rebuilds the single-device names;
- one ep_size per process: DeepSpeed picks the largest existing group for MoE checkpoints.
The wrapper is used for ep_size 1 too (no collectives then), so checkpoints and parameter
groups look the same at every ep_size.

Mixture-of-attention-heads layers (moevit.layers.moe_attention) keep their head experts
replicated on every rank: they are dense parameters here, averaged over all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from moevit.layers.experts import GroupedExperts, grouped_mlp
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.param_names import PER_EXPERT_INFIX
from moevit.parallel.setup import expert_group_name

EXPERT_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


class ExpertMlp(nn.Module):
    """One expert, fc1 -> act -> fc2, with `GroupedExperts`' parameter names and (out, in) layout.

    Args:
        dim: input and output width (D).
        hidden: hidden width (H).
        act: the activation module.
        bias: whether both linears have biases.
    """

    def __init__(self, dim: int, hidden: int, act: nn.Module, bias: bool):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(hidden, dim))
        self.fc2_weight = nn.Parameter(torch.empty(dim, hidden))
        self.fc1_bias = nn.Parameter(torch.empty(hidden)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This expert alone (a reference; the wrapper runs all its experts through `grouped_mlp`)."""
        return F.linear(self.act(F.linear(x, self.fc1_weight, self.fc1_bias)), self.fc2_weight, self.fc2_bias)


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `send_splits` go to the group's ranks; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group
        )
        return grad_in, None, None, None


def _expert_major_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """Row order that turns (source rank, local expert) blocks into (local expert, source rank) blocks."""
    num_sources, num_local = counts_PL.shape
    blocks = torch.arange(int(counts_PL.sum()), device=counts_PL.device).split(counts_PL.flatten().tolist())
    return torch.cat([blocks[p * num_local + e] for e in range(num_local) for p in range(num_sources)])


class ExpertParallelExperts(MoE):
    """This rank's shard of a layer's experts, exchanging rows with the other ranks of its group.

    Subclasses DeepSpeed's `MoE` only so that the engine registers it (see the module
    docstring); `MoE.__init__` is deliberately not run.

    Args:
        experts: the single-device experts (all E); this rank's slice of their weights is copied.
        ep_size: ranks sharing one copy of the experts (P); must divide E.
        ep_rank: this rank's index in its expert-parallel group (DeepSpeed's `ep_size_<P>`
            group, which must exist when P > 1); it owns experts [ep_rank * E/P, (ep_rank + 1) * E/P).
    """

    def __init__(self, experts: GroupedExperts, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)
        if experts.num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the layer's {experts.num_experts} experts")
        self.num_experts = experts.num_experts
        self.dim, self.hidden = experts.dim, experts.hidden  # what the FLOP count reads (moevit.train.mfu)
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.expert_impl = experts.expert_impl
        self.num_local_experts = experts.num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False  # read by DeepSpeed's flops profiler
        self.use_residual = False
        template = ExpertMlp(experts.dim, experts.hidden, experts.act, bias=experts.fc1_bias is not None)
        template.to(device=experts.fc1_weight.device, dtype=experts.fc1_weight.dtype)
        self.deepspeed_moe = nn.ModuleDict(
            {"experts": Experts(template, self.num_local_experts, self.expert_group_name)}
        )
        first = ep_rank * self.num_local_experts
        frozen = getattr(experts, "frozen_experts", frozenset())
        with torch.no_grad():
            for i, expert in enumerate(self.local_experts):
                for name in EXPERT_PARAMS:
                    source = getattr(experts, name)
                    if source is not None:
                        param = getattr(expert, name)
                        param.copy_(source[first + i])
                        # The new Parameters would come back trainable: keep a frozen tensor frozen, and
                        # freeze the experts the stacked module records as frozen (moevit.continual).
                        param.requires_grad_(source.requires_grad and first + i not in frozen)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe["experts"].deepspeed_experts

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The expert-parallel group, looked up by name (a module holding it could not be deep-copied)."""
        return None if self.ep_size == 1 else groups._get_expert_parallel_group(self.expert_group_name)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every MoE module; our groups already exist (setup.py)."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "moevit builds expert groups in DeepSpeed's E + D layout; "
                "use_data_before_expert_parallel_ is not supported"
            )

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD: rows sorted by global expert, counts_E[e] of them for expert e -> outputs in that order."""
        if counts_E.numel() != self.num_experts:
            raise ValueError(
                f"counts_E has {counts_E.numel()} entries, the layer has {self.num_experts} experts"
            )
        if self.ep_size == 1:
            return self._run_local_experts(x_SD, counts_E.tolist())
        group = self.group
        send_counts_PL = counts_E.reshape(self.ep_size, self.num_local_experts).contiguous()
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=group)
        send_splits, recv_splits = send_counts_PL.sum(1).tolist(), recv_counts_PL.sum(1).tolist()

        x_recv = _AllToAll.apply(x_SD, recv_splits, send_splits, group)
        to_expert_major = _expert_major_order(recv_counts_PL)
        y_local = self._run_local_experts(
            x_recv.index_select(0, to_expert_major), recv_counts_PL.sum(0).tolist()
        )
        y_recv = y_local.index_select(0, torch.argsort(to_expert_major))
        return _AllToAll.apply(y_recv, send_splits, recv_splits, group)

    def _run_local_experts(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        experts = self.local_experts
        params = [[getattr(expert, name) for expert in experts] for name in EXPERT_PARAMS]
        params = [None if group[0] is None else group for group in params]
        return grouped_mlp(x_SD, counts, *params, experts[0].act, self.expert_impl)

    def extra_repr(self) -> str:
        first = self.ep_rank * self.num_local_experts
        return (
            f"experts {first}..{first + self.num_local_experts - 1} of {self.num_experts}, "
            f"ep_size={self.ep_size}, group={self.expert_group_name}"
        )


def apply_expert_parallel(model: nn.Module, ep_size: int) -> None:
    """Shard the experts of every `MoEMlp` in `model` over expert-parallel groups of `ep_size` ranks.

    Every rank must hold the same full model beforehand (build it from the same seed): each
    keeps its slice, and DeepSpeed broadcasts only dense parameters from rank 0. Needs the
    groups of `moevit.parallel.setup.initialize_distributed` when ep_size > 1. Applying it
    again with the same ep_size does nothing.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoEMlp)]
    for name, module in layers:
        if isinstance(module.experts, ExpertParallelExperts) and module.experts.ep_size != ep_size:
            raise ValueError(
                f"{name} is already sharded with ep_size={module.experts.ep_size}, not {ep_size}"
            )
    unsharded = [module for _, module in layers if not isinstance(module.experts, ExpertParallelExperts)]
    if not unsharded:
        return
    ep_rank = 0
    if ep_size > 1:
        name = expert_group_name(ep_size)
        if (
            not (dist.is_available() and dist.is_initialized())
            or name not in groups._get_expert_parallel_group_dict()
        ):
            raise RuntimeError(
                f"apply_expert_parallel(ep_size={ep_size}) needs the process group and DeepSpeed's "
                f"{name} groups: call moevit.parallel.setup.initialize_distributed first"
            )
        ep_rank = dist.get_rank(groups._get_expert_parallel_group(name))
    for module in unsharded:
        module.experts = ExpertParallelExperts(module.experts, ep_size, ep_rank)


@torch.no_grad()
def gather_single_device_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the unsharded single-device model's state_dict: every expert stacked back as (E, ...).

    A collective over each layer's expert-parallel group when ep_size > 1: all ranks call it.
    """
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, ExpertParallelExperts):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix + PER_EXPERT_INFIX.lstrip("."))]:
            del state[key]
        for param in EXPERT_PARAMS:
            if getattr(module.local_experts[0], param) is None:
                continue
            local = torch.stack([getattr(expert, param) for expert in module.local_experts])
            shards = [local]
            if module.ep_size > 1:
                shards = [torch.empty_like(local) for _ in range(module.ep_size)]
                dist.all_gather(shards, local.contiguous(), group=module.group)
            state[prefix + param] = torch.cat(shards)
    return state
