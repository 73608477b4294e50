"""A real one-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd of Debian's
`slurm-wlm` and `munge`, run as root from a private directory, stopped by pid.

    cluster = OneNodeCluster.start()    # installs the packages with apt-get when missing
    cluster.env                          # os.environ + SLURM_CONF: pass it to sbatch/squeue/scontrol
    cluster.stop()

Nothing system-wide is touched besides the apt packages: slurm.conf, the munge key and socket, the
state, spool, pid and log files all live in one temporary directory, the daemons listen on free
ports, and they run in the foreground as children of this process (`-D`/`-F`), so their pids are
known and `stop` ends exactly them. Jobs inherit the submitting environment (sbatch --export=ALL),
hence the caller's HOME, virtual environment and caches.

For a manual session: `python tests/slurm/cluster.py` starts one, prints `export SLURM_CONF=...`
and stops it on Enter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
INSTALL_TIMEOUT_S = 900
READY_TIMEOUT_S = 60


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be set up on this machine at all (not root, no apt-get): tests skip."""


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when any of their programs is missing."""
    if all(shutil.which(program) for program in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it with apt-get needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        raise RuntimeError(f"after installing {PACKAGES}, {missing} are still not on PATH")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=moevit-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups: plain process tracking and no task binding work in containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Trust this file's CPU count over slurmd's hardware probe (virtual machines report odd topologies).
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# SIGTERM -> SIGKILL grace for cancelled and requeued jobs; finished jobs stay visible to scontrol.
KillWait=15
MinJobAge=900
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class OneNodeCluster:
    root: Path
    node: str
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path | None = None) -> OneNodeCluster:
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test cluster runs its daemons as root (SlurmUser=root)")
        # Short path: the munge socket path must fit a sockaddr_un (108 bytes).
        root = Path(root or tempfile.mkdtemp(prefix="moevit-slurm-"))
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged wants its socket directory searchable by everyone
        node = socket.gethostname().split(".")[0]
        # The tests run 2 tasks of 1 CPU each; a 1-CPU machine is declared as 2 (no binding: task/none).
        cpus = max(len(os.sched_getaffinity(0)), 2)
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, node, cpus, _free_port(), _free_port()))
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        cluster = cls(root, node, env)
        try:
            cluster._spawn(
                "munged",
                ["munged", "-F", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                 f"--log-file={root}/log/munged.log", f"--pid-file={root}/munged.pid",
                 f"--seed-file={root}/munged.seed"],
            )  # fmt: skip
            cluster._wait_for(lambda: (root / "munge.socket").exists(), "munged's socket")
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
            cluster._spawn("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", node])
            cluster._wait_for(cluster._node_idle, f"node {node} idle in sinfo")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.daemons[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            dead = {name: p.returncode for name, p in self.daemons.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                reason = f"daemons exited: {dead}" if dead else f"not ready after {READY_TIMEOUT_S} s"
                raise RuntimeError(f"SLURM test cluster: waiting for {what}: {reason}\n{self.logs()}")
            time.sleep(0.5)

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False)
        return done.stdout.strip() == "idle"

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end slurmd, slurmctld and munged by pid (TERM, then KILL)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    cluster = OneNodeCluster.start()
    print(f"export SLURM_CONF={cluster.root}/slurm.conf   # node {cluster.node}; logs in {cluster.root}/log")
    try:
        input("press Enter to stop the cluster\n")
    finally:
        cluster.stop()
