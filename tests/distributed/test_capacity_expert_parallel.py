"""The expert capacity bound under expert parallelism: 2 ranks, ep_size 2, gloo, no DeepSpeed engine.

Every token prefers experts 2 and 3, both on rank 1: dropless, rank 1 would receive every slot of
both ranks. With the bound, each rank drops its overflow before the exchange, so rank 1 receives at
most (its 2 experts) x (each source rank's capacity); outputs and gradients equal the single-process
capacity-bounded layer on the rank's own tokens.
"""

from __future__ import annotations

import copy
import math
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-6
NUM_EXPERTS, TOP_K, DIM, HIDDEN = 4, 2, 8, 16
TOKENS = (8, 6)  # per rank
CAPACITY_FACTOR = 1.0


def _capacity(tokens: int) -> int:
    return math.ceil(CAPACITY_FACTOR * tokens * TOP_K / NUM_EXPERTS)


def _skewed_layer():
    from moevit.layers.moe_mlp import MoEMlp

    torch.manual_seed(1)
    layer = MoEMlp(DIM, HIDDEN, NUM_EXPERTS, TOP_K, tasks=["a"], capacity_factor=CAPACITY_FACTOR)
    with torch.no_grad():
        gate = layer.router.gates["a"].weight
        gate.normal_(std=0.1)
        gate[2:] += 1.0  # inputs near +3 everywhere: experts 2 and 3 win for every token
    return layer


def _record_received_rows(sharded_experts, received: list[int]) -> None:
    """Wraps the rank's local expert run, which sees exactly the rows this rank received."""
    run = sharded_experts._run_local_experts

    def counting(x_SD, counts):
        received.append(x_SD.shape[0])
        return run(x_SD, counts)

    sharded_experts._run_local_experts = counting


def capacity_worker() -> dict:
    import torch.distributed as dist

    from moevit.config.schema import Config, ParallelConfig, TaskConfig
    from moevit.parallel.expert_parallel import apply_expert_parallel
    from moevit.parallel.setup import initialize_distributed

    cfg = Config(
        tasks={"a": TaskConfig(type="classification", num_classes=3)}, parallel=ParallelConfig(ep_size=2)
    )
    env = initialize_distributed(cfg, timeout=timedelta(seconds=60))
    reference = _skewed_layer()
    sharded = copy.deepcopy(reference)
    apply_expert_parallel(sharded, ep_size=2)
    received: list[int] = []
    _record_received_rows(sharded.experts, received)

    torch.manual_seed(300 + env.rank)
    x = torch.randn(1, TOKENS[env.rank], DIM) + 3.0
    weight = torch.randn_like(x)
    outputs = {}
    for label, model in (("reference", reference), ("sharded", sharded)):
        x_in = x.clone().requires_grad_()
        y, routing = model(x_in, "a")
        (y * weight).sum().backward()
        outputs[label] = (y.detach(), x_in.grad, routing)
    ref_expert_grads = {name: p.grad.clone() for name, p in reference.experts.named_parameters()}
    for grad in ref_expert_grads.values():
        dist.all_reduce(grad)  # an expert's gradient collects the kept rows of every rank
    first = sharded.experts.ep_rank * 2
    expert_diffs = {
        name: max(
            (getattr(e, name).grad - ref_expert_grads[name][first + i]).abs().max().item()
            for i, e in enumerate(sharded.experts.local_experts)
        )
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    }
    routing = outputs["sharded"][2]
    result = {
        "received_rows": received[0],
        "dropped_slots": routing.dropped_slots,
        "dropless_slots_to_rank1": int(routing.counts_E[2:].sum()),
        "y": (outputs["sharded"][0] - outputs["reference"][0]).abs().max().item(),
        "x_grad": (outputs["sharded"][1] - outputs["reference"][1]).abs().max().item(),
        "reference_dropped": outputs["reference"][2].dropped_slots,
        **expert_diffs,
    }
    dist.destroy_process_group()
    return result


def test_capacity_bounds_the_rows_each_rank_receives_and_matches_single_process(run_workers):
    per_rank = run_workers(capacity_worker, world_size=2, timeout_s=120)
    rank1_bound = sum(2 * _capacity(tokens) for tokens in TOKENS)  # 2 local experts x each source's capacity
    dropless_rank1 = sum(r["dropless_slots_to_rank1"] for r in per_rank)
    assert dropless_rank1 == sum(TOKENS) * TOP_K  # the skew works: dropless, rank 1 gets every slot
    assert per_rank[1]["received_rows"] <= rank1_bound < dropless_rank1
    assert per_rank[0]["received_rows"] <= rank1_bound
    for rank, result in enumerate(per_rank):
        assert result["dropped_slots"] == result["reference_dropped"] > 0
        for quantity in ("y", "x_grad", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            assert result[quantity] <= TOLERANCE, f"rank {rank}: {quantity} differs by {result[quantity]:.3g}"


def train_worker(config: dict) -> None:
    from moevit.config import build_config
    from moevit.config.schema import Config
    from moevit.train.loop import run_training

    run_training(build_config(Config, config))


@pytest.mark.slow
def test_a_bounded_run_from_the_config_logs_its_dropped_slots(tmp_path, synth_root, tiny_config, run_workers):
    import json

    config = tiny_config(
        synth_root,
        tmp_path / "run",
        datasets={"shapes": "imagenet"},
        model={"moe": {"capacity_factor": 0.5}},
        train={"steps": 2, "eval_every": 2, "eval_batches": 1},
        parallel={"ep_size": 2},
    )
    run_workers(train_worker, 2, 150, config=config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_records = [line for line in lines if line["split"] == "train" and line["task"] == "shapes"]
    assert [record["step"] for record in step_records] == [1, 2]
    for record in step_records:
        fractions = {key: value for key, value in record.items() if key.startswith("dropped_fraction/")}
        assert fractions and record["dropped_slots"] > 0
        # Factor 0.5: a layer keeps at most E x ceil(0.5 S / E) < S / 2 + E of its S slots per rank and
        # task forward (E = 4 here, S in the hundreds), whatever the routing: at least ~48% drop.
        assert all(0.4 <= value < 1 for value in fractions.values()), fractions
