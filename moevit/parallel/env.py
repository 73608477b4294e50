"""Where this process sits in the job: rank, local rank, world size and the rendezvous address.

Launchers describe a process through environment variables. torchrun and `deepspeed` set
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a process started without a
launcher is rank 0 of a world of 1, rendezvousing with itself on MASTER_PORT if set, else on a
free port (so that two single-process runs on one machine do not collide). Cluster schedulers
use their own variables (SLURM: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of
the node list): their mapping belongs in `detect_environment`, tried before the
single-process fallback.

Nothing here starts a process group; `moevit.parallel.setup.initialize_distributed` does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PLACEMENT_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
SINGLE_PROCESS_ADDR = "127.0.0.1"


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
