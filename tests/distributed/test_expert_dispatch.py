"""Expert-parallel dispatch alone (no DeepSpeed engine): 2 ranks, ep_size 2, against single-device experts.

Each rank holds the full single-device experts as the reference and a sharded copy. Outputs and
input gradients must match the reference on the rank's own rows; a sharded expert's gradient
must equal the reference gradient summed over ranks (its rows came from both).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-6
NUM_EXPERTS, DIM, HIDDEN = 4, 8, 16

# Rows per global expert on (rank 0, rank 1); rank 1 owns experts 2 and 3.
COUNT_CASES = {
    "uneven": ([3, 0, 2, 1], [1, 4, 0, 2]),
    "rank1_receives_nothing": ([2, 3, 0, 0], [1, 1, 0, 0]),
    "rank0_has_no_rows": ([0, 0, 0, 0], [2, 0, 3, 1]),
}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _sharded_expert_grads(sharded) -> dict[str, torch.Tensor]:
    """(local experts, ...) gradient stacks of an ExpertParallelExperts, named like GroupedExperts."""
    from moevit.parallel.expert_parallel import EXPERT_PARAMS

    return {
        name: torch.stack([getattr(e, name).grad for e in sharded.local_experts]) for name in EXPERT_PARAMS
    }


def _expert_case(counts_by_rank, rank: int, ep_rank: int) -> dict[str, float]:
    import torch.distributed as dist

    from moevit.layers.experts import GroupedExperts
    from moevit.parallel.expert_parallel import ExpertParallelExperts

    torch.manual_seed(0)
    reference = GroupedExperts(NUM_EXPERTS, DIM, HIDDEN)
    with torch.no_grad():  # non-zero biases, so bias gradients and their routing are checked too
        reference.fc1_bias.normal_()
        reference.fc2_bias.normal_()
    torch.manual_seed(100 + rank)  # each rank its own rows
    counts_E = torch.tensor(counts_by_rank[rank])
    x = torch.randn(int(counts_E.sum()), DIM)
    weight = torch.randn(int(counts_E.sum()), DIM)

    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref, counts_E)
    if len(x):
        (y_ref * weight).sum().backward()
        ref_grads = {name: grad.clone() for name, grad in _grads(reference).items()}
    else:  # GroupedExperts returns a constant for no rows: no graph, zero gradients
        ref_grads = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for grad in ref_grads.values():
        dist.all_reduce(grad)  # an expert's gradient collects rows of every rank

    sharded = ExpertParallelExperts(copy.deepcopy(reference), ep_size=2, ep_rank=ep_rank)
    x_ep = x.clone().requires_grad_()
    y_ep = sharded(x_ep, counts_E)
    (y_ep * weight).sum().backward()
    first = ep_rank * 2
    diffs = {"y": (y_ep - y_ref).abs().max().item() if len(x) else 0.0}
    diffs["x_grad"] = (x_ep.grad - x_ref.grad).abs().max().item() if len(x) else 0.0
    for name, grad in _sharded_expert_grads(sharded).items():
        diffs[name] = (grad - ref_grads[name][first : first + 2]).abs().max().item()
    return diffs


def _ep_group():
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group("ep_size_2")


def _moe_mlp_case(rank: int) -> dict[str, float]:
    """A whole MoEMlp with its router; ranks see different token counts (5 and 3)."""
    import torch.distributed as dist

    from moevit.layers.moe_mlp import MoEMlp
    from moevit.parallel.expert_parallel import apply_expert_parallel

    torch.manual_seed(1)
    reference = MoEMlp(DIM, HIDDEN, NUM_EXPERTS, top_k=2, tasks=["a"])
    with torch.no_grad():
        reference.router.gates["a"].weight.normal_()  # zero-initialised gates would tie every expert
    sharded = copy.deepcopy(reference)
    apply_expert_parallel(sharded, ep_size=2)
    sharded = copy.deepcopy(sharded)  # a sharded model copies (e.g. for an EMA): no process group inside
    torch.manual_seed(200 + rank)
    x = torch.randn(1, 5 if rank == 0 else 3, DIM)
    weight = torch.randn_like(x)

    outputs = {}
    for label, model in (("reference", reference), ("sharded", sharded)):
        x_in = x.clone().requires_grad_()
        y, routing = model(x_in, "a")
        ((y * weight).sum() + routing.probs_sum_E.sum()).backward()
        outputs[label] = (y.detach(), x_in.grad)
    ref_expert_grads = {name: p.grad.clone() for name, p in reference.experts.named_parameters()}
    for grad in ref_expert_grads.values():
        dist.all_reduce(grad)
    first = sharded.experts.ep_rank * 2
    diffs = {
        "y": (outputs["sharded"][0] - outputs["reference"][0]).abs().max().item(),
        "x_grad": (outputs["sharded"][1] - outputs["reference"][1]).abs().max().item(),
        "gate_grad": (sharded.router.gates["a"].weight.grad - reference.router.gates["a"].weight.grad)
        .abs()
        .max()
        .item(),
    }
    for name, grad in _sharded_expert_grads(sharded.experts).items():
        diffs[name] = (grad - ref_expert_grads[name][first : first + 2]).abs().max().item()
    return diffs


def dispatch_worker() -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from moevit.config.schema import Config, ParallelConfig, TaskConfig
    from moevit.parallel.setup import initialize_distributed

    cfg = Config(
        tasks={"a": TaskConfig(type="classification", num_classes=3)}, parallel=ParallelConfig(ep_size=2)
    )
    env = initialize_distributed(cfg, timeout=timedelta(seconds=60))
    ep_rank = dist.get_rank(_ep_group())
    results = {name: _expert_case(counts, env.rank, ep_rank) for name, counts in COUNT_CASES.items()}
    results["moe_mlp"] = _moe_mlp_case(env.rank)
    dist.destroy_process_group()
    return results


def test_expert_parallel_dispatch_matches_single_device(run_workers):
    per_rank = run_workers(dispatch_worker, world_size=2, timeout_s=120)
    for rank, results in enumerate(per_rank):
        assert set(results) == {*COUNT_CASES, "moe_mlp"}
        for case, diffs in results.items():
            for quantity, diff in diffs.items():
                assert diff <= TOLERANCE, f"rank {rank}, case {case}: {quantity} differs by {diff:.3g}"
