"""Task-conditioned top-k routing: one gate per task over experts shared by all tasks.

Mod-Squad (Chen et al., CVPR 2023) and M3ViT give every task its own linear gate in every MoE
layer; the experts are shared. Gate logits are computed in fp32 because bf16 softmax over logits that
differ by little flips top-k choices between otherwise identical runs.

Initialisation and jitter (routing that cannot collapse at the start). A zero gate ties every expert, so
top-k picks the same k experts for every token (topk breaks ties by index): one expert pair takes the
whole load, and with upcycled (identical) experts no gradient ever breaks the tie. Gates therefore start
from N(0, gate_init_std^2) (default `DEFAULT_GATE_INIT_STD`, timm's ViT init std for linear layers: on
LayerNorm'd tokens the logits start with std 0.02 sqrt(D), 0.28 to 0.55 for D = 192 to 768, near
Switch's width-independent sqrt(0.1) = 0.32, so the k selected weights start near 1/k). Top-k is
invariant to the gate's scale, so the std sets how soft the start is, not how balanced (what balance
the init gives depends on the data; measured in docs/model.md, "Initial routing"). Optionally,
in training mode only, the router input is multiplied by noise uniform in [1 - jitter, 1 + jitter]
(Switch Transformer's input jitter), drawn from torch's default generator, which training seeds and
checkpoints; evaluation never jitters. The experts see the input unjittered. What the init cannot do,
balance tokens that share a component, a per-expert selection bias does: added to the logits for the
top-k choice only, zeros until a training run calibrates it before step 1 (moevit.train.router_calibration).

The k selected probabilities are renormalised to sum to one. Consequence the pruner relies on:
dropping an expert that a token did not select leaves that token's output unchanged. To make that
hold bit for bit, not only mathematically, each expert's logit is its own matrix-vector product (a
matmul over all E gate rows picks kernels by E, so its columns change in the last bit when rows are
removed), top-k selects on the logits plus each expert's own selection bias, and the weights are the
softmax over the k selected logits (equal to the renormalised probabilities, without the full
softmax's denominator). (With k = 1 the renormalised weight is always 1, so the gate learns only from
the auxiliary losses; use k >= 2 when the task loss should shape routing.)

A task may be restricted to the first n experts of the layer (`task_experts`; continual learning,
moevit.continual): its gate has n rows, so its logits, top-k choices and weights are those of a layer
with n experts, bit for bit, and it never routes to the experts added after them. Its routing
record is padded with zeros to the layer's E, so every task's record has the same width. A pruned
model may leave such a task fewer than K experts (moevit.prune); it then routes to all n of them,
as a pruned layer with fewer than K experts does for every task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_GATE_INIT_STD = 0.02  # the model's default gate initialisation (see the module doc)


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
    routable_experts: int | None = None  # experts the task may use (the first n); None: all E
    # Slots left out by the layer's expert capacity bound (moevit.layers.capacity); None: dropless layer.
    # The fields above are the router's decision before any drop.
    dropped_slots: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_idx_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_sum_E.shape[0]

    @property
    def num_routable(self) -> int:
        """Experts this task can route to (what a balanced load is measured against)."""
        return self.num_experts if self.routable_experts is None else self.routable_experts

    def busiest_over_mean(self) -> float:
        """This pass's busiest expert load over the mean load (see `busiest_over_mean`)."""
        return busiest_over_mean(self.counts_E, self.num_routable)


def busiest_over_mean(counts_E: torch.Tensor, num_routable: int | None = None) -> float:
    """The busiest expert's routed slots over the mean over the experts the task can reach (the first
    `num_routable`, default all): 1.0 is an even load, E / K the collapse where every token picks the same K
    experts. What bounds an expert's (and, under expert parallelism, a rank's) tokens in a step. 0.0 when
    nothing was routed."""
    counts = counts_E[: num_routable or counts_E.shape[0]].double()
    total = counts.sum().item()
    return counts.max().item() * counts.shape[0] / total if total else 0.0


def selection_counts(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """(E,) int64: how many of the tokens' top-k slots each expert takes when `bias_E` is added to the
    logits for the choice (what the router's forward counts as `counts_E`)."""
    chosen = (logits_TE + bias_E).topk(top_k, dim=-1).indices
    return torch.bincount(chosen.flatten(), minlength=logits_TE.shape[1])


def fit_selection_bias(logits_TE: torch.Tensor, top_k: int, iterations: int = 300) -> torch.Tensor:
    """Per-expert offsets (E,) that, added to `logits_TE` for the top-k choice, give every expert about
    the same number of the T tokens' K slots.

    Tokens of a layer share a common component (and, in one image, near-identical background tokens
    share nearly everything), so the experts whose gate rows align with it win most tokens; a fixed
    offset per expert cancels what the tokens have in common. Fitted the way DeepSeek-V3 balances its
    experts during training (an over-loaded expert's offset goes down, an under-loaded one's up), here
    run to convergence on fixed logits: the step starts at a tenth of the logits' std and shrinks
    geometrically to 1/200 of it over `iterations`, so the offsets settle within a fraction of a logit
    gap. Each iteration is one top-k over the tokens: pass a subsample when there are millions.
    Deterministic (no randomness; ties as `topk` breaks them). Zero-mean: top-k ignores a common shift.
    """
    logits_TE = logits_TE.detach().float()
    num_experts = logits_TE.shape[1]
    even_share = logits_TE.shape[0] * top_k / num_experts
    bias_E = logits_TE.new_zeros(num_experts)
    step = 0.1 * logits_TE.std().item()
    decay = 0.05 ** (1 / max(iterations - 1, 1))
    for _ in range(iterations):
        load_E = selection_counts(logits_TE, bias_E, top_k).float()
        bias_E -= step * (load_E / even_share - 1).clamp(-1, 1)
        step *= decay
    return bias_E - bias_E.mean()


class _ExpertLogits(torch.autograd.Function):
    """Forward: one matrix-vector product per expert, so column e of the logits depends only on row e
    of the weight, bit for bit (a matmul over all E rows picks its kernel by E). Backward: the two
    ordinary matmuls; gradients need no such exactness. (Autograd over a per-expert `F.linear` loop
    instead sums E separate (T, D) input gradients and E zero-padded weight gradients: forward+backward
    at T=3152, D=384, 2 threads took 61/98/191 ms at E8/16/32, this 16/20/31 ms, one matmul 11-18 ms.)"""

    @staticmethod
    def forward(ctx, x_TD, weight_ED):
        logits_ET = x_TD.new_empty(weight_ED.shape[0], x_TD.shape[0])
        for e in range(weight_ED.shape[0]):
            torch.mv(x_TD, weight_ED[e], out=logits_ET[e])
        ctx.save_for_backward(x_TD, weight_ED)
        return logits_ET.t().contiguous()

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, weight_ED = ctx.saved_tensors
        grad_x = grad_TE.mm(weight_ED) if ctx.needs_input_grad[0] else None
        grad_w = grad_TE.t().mm(x_TD) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def expert_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """Gate logits (T, E): column e depends only on row e of the weight, bit for bit, whatever the
    other rows (what makes pruned and restricted routers exact, see module doc)."""
    if torch.jit.is_tracing():  # fvcore's flop counter traces; the tracer cannot record `out=` rows
        return torch.cat([F.linear(x_TD, weight_ED[e : e + 1]) for e in range(weight_ED.shape[0])], dim=1)
    return _ExpertLogits.apply(x_TD.contiguous(), weight_ED.contiguous())


class TaskGate(nn.Module):
    """A task's gate in one MoE layer: one row of weights per expert the task can reach.

    Args:
        dim: token width.
        num_experts: experts the gate scores.
        init_std: std of the normal initial weights (0: zeros, every expert tied).
    """

    def __init__(self, dim: int, num_experts: int, init_std: float = DEFAULT_GATE_INIT_STD):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim))
        # Per-expert offsets added to the logits for the top-k choice only (DeepSeek-V3's balancing bias;
        # moevit.train.router_calibration fits them): the weights of the chosen experts are the softmax of
        # their unbiased logits, so the bias steers which experts are used, never how much each counts.
        # Zeros: the plain top-k. A buffer, not a parameter: no gradient reaches it.
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = DEFAULT_GATE_INIT_STD) -> None:
        """Normal weights of std `init_std` from torch's default generator (0: zeros)."""
        _check_non_negative("gate_init_std", init_std)
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        else:
            nn.init.zeros_(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints and model directories written before 2026-12-06 also hold an int64 `usage` counter
        # per gate; expert usage is now counted once, by the training loop (moevit.train.usage_plots).
        # Dropped here, so those files still load strictly. Files written before 2026-12-07 have no
        # selection bias: they load with zeros, which is the routing they were trained with.
        state_dict.pop(prefix + "usage", None)
        weight = state_dict.get(prefix + "weight")
        if prefix + "selection_bias" not in state_dict and weight is not None:
            state_dict[prefix + "selection_bias"] = weight.new_zeros(weight.shape[0], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, num_experts={self.weight.shape[0]}"


class TaskRouter(nn.Module):
    """Top-k routing with one randomly initialised gate per task.

    Args:
        dim: token width.
        num_experts: experts shared by all tasks (E).
        top_k: experts per token (K).
        tasks: task names; each gets its own gate.
        task_experts: task -> n: that task routes among experts 0..n-1 only (1 <= n <= E), with
            top-min(K, n); tasks not named route among all E (see the module docstring).
        gate_init_std: std of the gates' normal initial weights (module doc; 0: zero gates).
        jitter: training-only multiplicative noise on the router input, uniform in [1 - jitter,
            1 + jitter] (0: off; below 1, so the noise never flips a sign).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        tasks: Sequence[str],
        task_experts: Mapping[str, int] | None = None,
        gate_init_std: float = DEFAULT_GATE_INIT_STD,
        jitter: float = 0.0,
    ):
        super().__init__()
        _check_non_negative("router_jitter", jitter)
        if jitter >= 1:
            raise ValueError(f"router_jitter must be < 1 (noise in [1 - jitter, 1 + jitter]), got {jitter}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        task_experts = dict(task_experts or {})
        unknown = sorted(set(task_experts) - set(tasks))
        if unknown:
            raise ValueError(
                f"task_experts names {unknown}, which are not tasks of this router ({list(tasks)})"
            )
        for task, n in task_experts.items():
            if not 1 <= n <= num_experts:
                raise ValueError(f"task_experts[{task!r}]={n} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = jitter
        self.gates = nn.ModuleDict(
            {task: TaskGate(dim, task_experts.get(task, num_experts), gate_init_std) for task in tasks}
        )
        # Tests flip this so every expert receives tokens (and every parameter a gradient).
        self.force_balanced = False

    @property
    def tasks(self) -> list[str]:
        return list(self.gates.keys())

    def forward(self, x_TD: torch.Tensor, task: str) -> Routing:
        if task not in self.gates:
            raise KeyError(f"no router for task {task!r}; this layer routes {self.tasks}")
        gate = self.gates[task]
        routable = gate.weight.shape[0]  # experts 0..routable-1; fewer than E for a restricted task
        top_k = min(self.top_k, routable)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.jitter > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
            logits_TE = expert_logits(x_TD, gate.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            if self.force_balanced:
                expert_idx_TK = self._balanced_assignment(x_TD.shape[0], x_TD.device, routable, top_k)
                selected_logits_TK = logits_TE.gather(1, expert_idx_TK)
            else:
                expert_idx_TK = (logits_TE + gate.selection_bias.float()).topk(top_k, dim=-1).indices
                selected_logits_TK = logits_TE.gather(1, expert_idx_TK)
            weights_TK = selected_logits_TK.softmax(dim=-1)
            z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        counts_E = torch.bincount(expert_idx_TK.flatten(), minlength=self.num_experts)
        probs_sum_E = probs_TE.sum(dim=0)
        if routable < self.num_experts:  # the experts this task cannot reach got no probability
            probs_sum_E = F.pad(probs_sum_E, (0, self.num_experts - routable))
        return Routing(
            task=task,
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            probs_sum_E=probs_sum_E,
            counts_E=counts_E,
            z_loss=z_loss,
            routable_experts=None if routable == self.num_experts else routable,
        )

    def routable_experts(self, task: str) -> int:
        """How many experts (the first n) `task` routes among."""
        return self.gates[task].weight.shape[0]

    def _balanced_assignment(
        self, num_tokens: int, device: torch.device, routable: int, top_k: int
    ) -> torch.Tensor:
        """Token t uses experts (t, t+1, ..., t+K-1) mod n: every routable expert gets tokens once T >= n."""
        token = torch.arange(num_tokens, device=device)[:, None]
        slot = torch.arange(top_k, device=device)[None, :]
        return (token + slot) % routable

    def extra_repr(self) -> str:
        jitter = f", jitter={self.jitter}" if self.jitter else ""
        return f"num_experts={self.num_experts}, top_k={self.top_k}{jitter}"


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
