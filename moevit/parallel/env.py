"""Where this process sits in the job: rank, local rank, world size and the rendezvous address.

Launchers describe a process through environment variables, tried in this order:

1. torchrun and `deepspeed` set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. They win
   over SLURM's variables, so `torchrun` started inside a SLURM allocation behaves as usual.
2. A task started by `srun` (one process per device) has SLURM_PROCID (global rank),
   SLURM_LOCALID (rank on its node), SLURM_NTASKS (world size) and SLURM_STEP_ID. The master is
   the first host of the step's compressed node list (`node[01-04,07]`, parsed here, no
   `scontrol` needed); the port is MASTER_PORT if set, else derived from SLURM_JOB_ID, so every
   task of the job computes the same one and two jobs sharing a node rarely collide. The batch
   script itself also carries SLURM_PROCID=0 and SLURM_NTASKS, but no SLURM_STEP_ID: it is not a
   task, so a `moevit train --nproc N` typed there runs N local processes under torchrun.
3. A process started without a launcher is rank 0 of a world of 1, rendezvousing with itself on
   MASTER_PORT if set, else on a free port (so that two single-process runs on one machine do
   not collide).

Nothing here starts a process group; `moevit.parallel.setup.initialize_distributed` does.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PLACEMENT_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
SINGLE_PROCESS_ADDR = "127.0.0.1"
SLURM_TASK_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID")
# The step's nodes first: `srun -N 1` inside a 4-node job rendezvouses on the step's first node.
SLURM_NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# Below Linux's ephemeral range (32768-60999), where outgoing connections take their ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class DistributedEnv:
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this node: which device to use
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environment(self) -> dict[str, str]:
        """The torchrun variables describing this process (what torch's env:// rendezvous reads)."""
        values = (self.rank, self.local_rank, self.world_size, self.master_addr, self.master_port)
        return {name: str(value) for name, value in zip(TORCHRUN_VARIABLES, values)}


def detect_environment(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """This process's place in the job, read from launcher variables (default: `os.environ`).

    Raises ValueError when the torchrun variables are set only in part or hold bad values,
    naming the variables, so a broken launch fails before any rendezvous waits.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in PLACEMENT_VARIABLES):
        return _from_torchrun(environ)
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        return _from_slurm(environ)
    port = _port(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else _free_port()
    return DistributedEnv(0, 0, 1, environ.get("MASTER_ADDR", SINGLE_PROCESS_ADDR), port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SINGLE_PROCESS_ADDR, 0))
        return sock.getsockname()[1]


def _integer(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def _port(text: str) -> int:
    port = _integer({"MASTER_PORT": text}, "MASTER_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port")
    return port


def _from_torchrun(environ: Mapping[str, str]) -> DistributedEnv:
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ValueError(
            f"launcher environment incomplete: {present} are set but {missing} are not "
            f"(torchrun and deepspeed set all of {list(TORCHRUN_VARIABLES)})"
        )
    env = DistributedEnv(
        rank=_integer(environ, "RANK"),
        local_rank=_integer(environ, "LOCAL_RANK"),
        world_size=_integer(environ, "WORLD_SIZE"),
        master_addr=environ["MASTER_ADDR"],
        master_port=_port(environ["MASTER_PORT"]),
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} must lie in [0, WORLD_SIZE={env.world_size})")
    if not 0 <= env.local_rank <= env.rank:
        raise ValueError(f"LOCAL_RANK={env.local_rank} must lie in [0, RANK={env.rank}]")
    return env


def _from_slurm(environ: Mapping[str, str]) -> DistributedEnv:
    missing = [name for name in SLURM_TASK_VARIABLES if name not in environ]
    nodelists = [environ[name] for name in SLURM_NODELIST_VARIABLES if name in environ]
    if not nodelists:
        missing.append(" or ".join(SLURM_NODELIST_VARIABLES))
    if missing:
        raise ValueError(f"SLURM task environment incomplete: {missing} not set (is this an srun task?)")
    job_id = _integer(environ, "SLURM_JOB_ID")
    if "MASTER_PORT" in environ:
        port = _port(environ["MASTER_PORT"])
    else:
        port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    hosts = expand_nodelist(nodelists[0])
    env = DistributedEnv(
        rank=_integer(environ, "SLURM_PROCID"),
        local_rank=_integer(environ, "SLURM_LOCALID"),
        world_size=_integer(environ, "SLURM_NTASKS"),
        master_addr=environ.get("MASTER_ADDR", hosts[0]),
        master_port=port,
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"SLURM_PROCID={env.rank} must lie in [0, SLURM_NTASKS={env.world_size})")
    if not 0 <= env.local_rank <= env.rank:
        raise ValueError(f"SLURM_LOCALID={env.local_rank} must lie in [0, SLURM_PROCID={env.rank}]")
    return env


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM compressed node list, in order (what `scontrol show hostnames` prints).

    `node[01-03,07],gpu-a[1-2]` -> node01 node02 node03 node07 gpu-a1 gpu-a2. Zero padding of a
    range's first number is kept; several bracket groups in one name expand as their product
    (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2). Raises ValueError naming the list if it is malformed.
    """
    hosts = [host for item in _split_top_level(nodelist) for host in _expand_item(item, nodelist)]
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, nodelist: str) -> list[str]:
    literals = _BRACKETS.split(item)[::2]  # text between bracket groups
    groups = [_expand_ranges(body, nodelist) for body in _BRACKETS.findall(item)]
    if any("[" in text or "]" in text for text in literals):
        raise ValueError(f"SLURM node list {nodelist!r}: bad brackets in {item!r}")
    hosts = []
    for numbers in itertools.product(*groups):
        parts = [literals[0]]
        for number, literal in zip(numbers, literals[1:]):
            parts += [number, literal]
        hosts.append("".join(parts))
    return hosts


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """`01-03,7` -> ["01", "02", "03", "7"]."""
    numbers = []
    for part in body.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last or first).isdigit() or int(last or first) < int(first):
            raise ValueError(f"SLURM node list {nodelist!r}: bad range {part!r} in [{body}]")
        width = len(first)
        numbers += [str(n).zfill(width) for n in range(int(first), int(last or first) + 1)]
    return numbers
