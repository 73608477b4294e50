"""Launcher environment detection and the layout checks that run before any process group starts."""

import pytest
import torch

from moevit.config.errors import ConfigError
from moevit.config.schema import Config, ParallelConfig, TaskConfig
from moevit.parallel.env import DistributedEnv, detect_environment, expand_nodelist
from moevit.parallel.layout import check_layout, resolve_backend, resolve_precision
from moevit.parallel.setup import device_for

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


# SLURM: what `srun` sets in each task (rank 5 = second task on the second node of a 4-per-node job).
SLURM_TASK = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vm", ["vm"]),
        ("node[01-04,07],gpu-a[1-2]", ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("a.example.org,b", ["a.example.org", "b"]),
        ("r[1-2]n[1-2]-ib", ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]),
    ],
)
def test_compressed_nodelists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node]1[", "n[a-b]", "n[3-1]", "n[1-2", "", ","])
def test_malformed_nodelists_are_refused_naming_the_list(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(nodelist)


def test_srun_task_maps_to_rank_local_rank_world_and_first_host():
    env = detect_environment(SLURM_TASK)
    assert env == DistributedEnv(rank=5, local_rank=1, world_size=8, master_addr="gpu07", master_port=23456)
    # Every task of the job derives the same port; another job gets another one.
    assert detect_environment({**SLURM_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port == 23456
    assert detect_environment({**SLURM_TASK, "SLURM_JOB_ID": "123457"}).master_port == 23457


def test_step_nodelist_and_explicit_master_win():
    step = {**SLURM_TASK, "SLURM_STEP_NODELIST": "gpu08"}
    assert detect_environment(step).master_addr == "gpu08"
    pinned = detect_environment({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (pinned.master_addr, pinned.master_port) == ("10.0.0.1", 29500)


def test_torchrun_variables_win_over_slurm():
    assert detect_environment({**SLURM_TASK, **TORCHRUN}) == detect_environment(TORCHRUN)


def test_the_batch_script_itself_is_not_a_task():
    # sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS but no SLURM_STEP_ID: a single process there.
    batch = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"}
    assert detect_environment(batch).world_size == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"SLURM_NTASKS": None}, r"\['SLURM_NTASKS'\] not set"),
        ({"SLURM_JOB_NODELIST": None}, r"SLURM_STEP_NODELIST or SLURM_JOB_NODELIST or SLURM_NODELIST"),
        ({"SLURM_PROCID": "8"}, r"SLURM_PROCID=8 must lie in \[0, SLURM_NTASKS=8\)"),
        ({"SLURM_LOCALID": "6"}, r"SLURM_LOCALID=6 must lie in \[0, SLURM_PROCID=5\]"),
        ({"SLURM_JOB_ID": "12x"}, "SLURM_JOB_ID='12x' is not an integer"),
    ],
)
def test_bad_slurm_values_are_refused(override, message):
    environ = {**SLURM_TASK, **override}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        detect_environment(environ)
