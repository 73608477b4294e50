"""moevit.parallel pieces that need no process group: ep_size 1 sharding, optimizer groups, LR
schedule, checkpoint discovery and RNG state."""

import copy
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moevit.models import create_model
from moevit.models.param_names import split_expert_key
from moevit.parallel.checkpoint import (
    COMPLETE_FILE,
    POINTER_FILE,
    _remove_old_checkpoints,
    capture_rng_state,
    checkpoint_root,
    find_latest_checkpoint,
    restore_rng_state,
    tag_for_step,
)
from moevit.parallel.engine import optimizer_param_groups, warmup_cosine_factor
from moevit.parallel.expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    gather_single_device_state_dict,
)


def _backbone():
    torch.manual_seed(0)
    model = create_model("moevit_debug", tasks=["a", "b"])
    for _, router in model.routers():
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight, std=0.5)
    return model


def test_ep_size_1_wrapper_computes_what_the_single_device_model_does():
    reference = _backbone()
    sharded = copy.deepcopy(reference)
    apply_expert_parallel(sharded, ep_size=1)
    assert sum(isinstance(m, ExpertParallelExperts) for m in sharded.modules()) == 2
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for model in (reference, sharded):
        tokens = model.forward_features(images, "a")
        tokens.square().mean().backward()
        outputs.append(tokens)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    expert_grad = reference.blocks[1].mlp.experts.fc1_weight.grad
    shard = sharded.blocks[1].mlp.experts
    for e, expert in enumerate(shard.local_experts):
        torch.testing.assert_close(expert.fc1_weight.grad, expert_grad[e], rtol=0, atol=1e-7)
        assert expert.fc1_weight.allreduce is False and expert.fc1_weight.group_name == "ep_size_1"


def test_gathered_state_dict_is_the_single_device_layout_and_a_copy():
    reference = _backbone()
    sharded = copy.deepcopy(reference)
    apply_expert_parallel(sharded, ep_size=1)
    apply_expert_parallel(sharded, ep_size=1)  # idempotent
    with pytest.raises(ValueError, match="already sharded with ep_size=1"):
        apply_expert_parallel(sharded, ep_size=2)
    gathered = gather_single_device_state_dict(sharded)
    assert gathered.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(gathered[key], value), key
    gathered["pos_embed"].add_(1.0)
    assert not torch.equal(gathered["pos_embed"], sharded.pos_embed)


def test_expert_keys_follow_deepspeeds_layout():
    sharded = _backbone()
    apply_expert_parallel(sharded, ep_size=1)
    keys = [k for k in sharded.state_dict() if "blocks.1.mlp.experts" in k]
    assert "blocks.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.3.fc2_bias" in keys
    assert split_expert_key(keys[0])[0] == "blocks.1.mlp.experts"
    assert split_expert_key("blocks.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.3.fc2_bias") == (
        "blocks.1.mlp.experts",
        3,
        "fc2_bias",
    )
    assert split_expert_key("blocks.1.mlp.router.gates.a.weight") is None


def test_optimizer_groups_split_decay_and_experts_the_deepspeed_way():
    model = _backbone()
    apply_expert_parallel(model, ep_size=1)
    groups = optimizer_param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["name"], g.get("moe", False), g["weight_decay"]) for g in groups] == [
        ("decay", False, 0.05),
        ("no_decay", False, 0.0),
        ("ep_size_1", True, 0.05),
        ("ep_size_1", True, 0.0),
    ]
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter exactly once
    by_group = [{names[id(p)] for p in g["params"]} for g in groups]
    assert "pos_embed" in by_group[1] and "cls_token" in by_group[1] and "norm.weight" in by_group[1]
    assert all(n.endswith("_weight") for n in by_group[2]) and all(n.endswith("_bias") for n in by_group[3])
    assert all(getattr(p, "allreduce", True) is False for g in groups[2:] for p in g["params"])


def test_warmup_then_cosine_to_the_minimum():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20:] == [pytest.approx(0.1)] * 5
    assert warmup_cosine_factor(0, 0, 10, 0.0) == 1.0
    assert math.isclose(warmup_cosine_factor(5, 0, 10, 0.0), 0.5)


def _make_checkpoint(run_dir, step, complete=True):
    directory = checkpoint_root(run_dir) / tag_for_step(step)
    directory.mkdir(parents=True)
    if complete:
        (directory / COMPLETE_FILE).write_text(json.dumps({"step": step}))


def test_find_latest_checkpoint_reads_the_pointer_and_ignores_incomplete_ones(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    _make_checkpoint(tmp_path, 100)
    _make_checkpoint(tmp_path, 200)
    _make_checkpoint(tmp_path, 300, complete=False)  # interrupted save
    assert find_latest_checkpoint(tmp_path) == "step_00000200"  # no pointer: newest complete
    pointer = checkpoint_root(tmp_path) / POINTER_FILE
    pointer.write_text("step_00000100")
    assert find_latest_checkpoint(tmp_path) == "step_00000100"  # the pointer wins
    for broken in ("step_00000300", "../elsewhere", ""):
        pointer.write_text(broken)
        assert find_latest_checkpoint(tmp_path) == "step_00000200"


def test_pruning_keeps_the_newest_complete_ones_up_to_the_saved_step(tmp_path):
    for step in (100, 130, 150, 200):  # 200: left by a run that was later resumed from 100
        _make_checkpoint(tmp_path, step)
    for step in (120, 250):
        _make_checkpoint(tmp_path, step, complete=False)
    _remove_old_checkpoints(checkpoint_root(tmp_path), newest_step=150, keep_last=2)
    remaining = sorted(p.name for p in checkpoint_root(tmp_path).iterdir())
    assert remaining == ["step_00000130", "step_00000150", "step_00000200", "step_00000250"]


def test_rng_state_is_json_and_round_trips():
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    restore_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_starting_the_process_group_on_cpu_compiles_no_deepspeed_op(tmp_path):
    # DeepSpeed would JIT-build its inference all-reduce op here (~100 s on a fresh machine).
    script = (
        "from moevit.config import load_config\n"
        "from moevit.parallel.setup import initialize_distributed\n"
        "initialize_distributed(load_config('configs/demo.yaml', ['parallel.ep_size=1']))\n"
    )
    extensions = tmp_path / "torch_extensions"
    env = dict(
        os.environ,
        TORCH_EXTENSIONS_DIR=str(extensions),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], env=env, cwd=repo, check=True, timeout=120)
    assert not extensions.exists() or not any(extensions.iterdir())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
