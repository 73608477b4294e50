"""A two-node SLURM launch simulated on one machine (issue 8, item 5): 4 processes carry the variables
srun gives the tasks of `sbatch --nodes=2 --ntasks-per-node=2` (SLURM_NODEID 0/1, SLURM_PROCID 0-3,
SLURM_LOCALID 0/1, SLURM_NTASKS=4, a two-host node list) and nothing of torchrun's. Through
moevit.parallel.setup.initialize_distributed they must find each other on the first host of the node
list with a real gloo rendezvous, and DeepSpeed's expert-parallel groups (ep_size 2) must be the two
"nodes". ~20 s on 2 cores.

Run as a script, this file is one such task (it reads its place from the environment).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

NODES, TASKS_PER_NODE = 2, 2
TIMEOUT_S = 240


def _job_id_with_free_port() -> int:
    """A job id whose derived port (moevit.parallel.env) is free on this machine."""
    from moevit.parallel.env import SLURM_PORT_BASE, SLURM_PORT_SPAN

    for _ in range(100):
        job_id = random.randrange(10**6)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in the SLURM-derived range")


def task_environment(job_id: int, node: int, local: int) -> dict[str, str]:
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    environ = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    return {
        **environ,
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_NNODES": str(NODES),
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node * TASKS_PER_NODE + local),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS": str(NODES * TASKS_PER_NODE),
        # Only the first host is contacted (the rendezvous); the second stands for the other node.
        "SLURM_JOB_NODELIST": "localhost,simnode1",
        "OMP_NUM_THREADS": "1",
    }


def test_two_simulated_nodes_rendezvous_through_the_slurm_mapping(tmp_path):
    job_id = _job_id_with_free_port()
    processes = []
    for node in range(NODES):
        for local in range(TASKS_PER_NODE):
            out = tmp_path / f"node{node}_local{local}.json"
            log = open(tmp_path / f"node{node}_local{local}.log", "w")
            command = [sys.executable, __file__, str(out)]
            env = task_environment(job_id, node, local)
            processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), out))
            log.close()
    try:
        for process, _ in processes:
            process.wait(timeout=TIMEOUT_S)
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
    logs = "\n".join(f"--- {p.name} ---\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert all(process.returncode == 0 for process, _ in processes), logs
    results = [json.loads(out.read_text()) for _, out in processes]

    port = 20000 + job_id % 10000
    for node in range(NODES):
        for local in range(TASKS_PER_NODE):
            result = results[node * TASKS_PER_NODE + local]
            rank = node * TASKS_PER_NODE + local
            assert result["env"] == [rank, local, NODES * TASKS_PER_NODE, "localhost", port]
            assert result["torch"] == [rank, NODES * TASKS_PER_NODE]
            # Everyone saw every task's node id: 0 + 0 + 1 + 1.
            assert result["node_id_sum"] == TASKS_PER_NODE * sum(range(NODES))
            # Expert-parallel groups are consecutive ranks: here, the tasks of one node.
            assert result["expert_group"] == [node * TASKS_PER_NODE + i for i in range(TASKS_PER_NODE)]


def _task(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moevit.config import build_config
    from moevit.config.schema import Config
    from moevit.parallel.collectives import all_reduce_sum
    from moevit.parallel.setup import expert_group_name, initialize_distributed

    cfg = build_config(
        Config,
        {
            "tasks": {"a": {"type": "classification", "num_classes": 2}},
            "parallel": {"ep_size": TASKS_PER_NODE},
        },
    )
    env = initialize_distributed(cfg)
    node_id_sum = all_reduce_sum(torch.tensor([float(os.environ["SLURM_NODEID"])])).item()
    expert_group = dist.get_process_group_ranks(
        groups._get_expert_parallel_group(expert_group_name(TASKS_PER_NODE))
    )
    result = {
        "env": [env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port],
        "torch": [dist.get_rank(), dist.get_world_size()],
        "node_id_sum": node_id_sum,
        "expert_group": sorted(expert_group),
    }
    out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _task(Path(sys.argv[1]))
