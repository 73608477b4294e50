"""Launcher environment detection and the layout checks that run before any process group starts."""

import pytest
import torch

from moevit.config.errors import ConfigError
from moevit.config.schema import Config, ParallelConfig, TaskConfig
from moevit.parallel.env import DistributedEnv, detect_environment
from moevit.parallel.setup import check_layout, device_for, resolve_backend, resolve_precision

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29611"}


def _config(**parallel) -> Config:
    return Config(
        tasks={"a": TaskConfig(type="classification", num_classes=3)}, parallel=ParallelConfig(**parallel)
    )


def test_no_launcher_variables_is_a_single_process_on_a_free_or_given_port():
    env = detect_environment({})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr) == (0, 0, 1, "127.0.0.1")
    assert 0 < env.master_port < 65536 and env.is_main
    assert detect_environment({"MASTER_PORT": "29777"}).master_port == 29777


def test_torchrun_variables_are_read_and_round_trip():
    env = detect_environment(TORCHRUN)
    assert env == DistributedEnv(rank=3, local_rank=1, world_size=4, master_addr="node7", master_port=29611)
    assert not env.is_main
    assert env.as_environment() == TORCHRUN


def test_partial_launcher_environment_names_the_missing_variables():
    with pytest.raises(ValueError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\] are not"):
        detect_environment({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "4"}, r"RANK=4 must lie in \[0, WORLD_SIZE=4\)"),
        ({"LOCAL_RANK": "5"}, r"LOCAL_RANK=5 must lie in \[0, RANK=3\]"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_bad_launcher_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        detect_environment({**TORCHRUN, **override})


def test_check_layout_accepts_divisible_layouts():
    check_layout(_config(ep_size=2), world_size=4, num_experts=8)
    check_layout(_config(ep_size=1), world_size=1, num_experts=None)


@pytest.mark.parametrize(
    ("ep_size", "world_size", "num_experts", "message"),
    [
        (3, 4, 6, r"parallel.ep_size=3 does not divide the world size 4"),
        (2, 4, 6, None),
        (4, 4, 6, r"parallel.ep_size=4 does not divide the number of experts per MoE layer \(6\)"),
        (0, 4, 8, r"parallel.ep_size must be >= 1"),
    ],
)
def test_check_layout_names_parallel_ep_size(ep_size, world_size, num_experts, message):
    cfg = _config(ep_size=ep_size)
    if message is None:
        check_layout(cfg, world_size, num_experts)
        return
    with pytest.raises(ConfigError, match=message) as error:
        check_layout(cfg, world_size, num_experts)
    assert error.value.source == "parallel layout"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of nccl")
def test_nccl_without_cuda_is_refused_and_auto_picks_cpu_settings():
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA"):
        check_layout(_config(backend="nccl"), world_size=2, num_experts=4)
    assert resolve_backend(_config()) == "gloo"
    assert resolve_precision(_config()) == torch.float32
    assert device_for(detect_environment({})) == torch.device("cpu")


def test_explicit_precision_is_kept():
    assert resolve_precision(_config(precision="bf16")) == torch.bfloat16
    assert resolve_precision(_config(precision="fp32")) == torch.float32
    assert resolve_backend(_config(backend="gloo")) == "gloo"
