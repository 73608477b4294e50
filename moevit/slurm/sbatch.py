"""Rendering the SLURM batch script of a training run from slurm/train.sbatch and a cluster profile.

The template holds `{{name}}` placeholders (bash keeps `$VAR` and `${VAR}` for itself); every
placeholder must be filled and every value must have a placeholder, so a template edited out of
step with this file fails loudly instead of submitting a half-rendered script.

A profile (slurm/profiles/NAME.yaml, or any YAML path) holds what a cluster needs on every job:
partition, account, time limit, GPUs per node, CPUs per task, how GPUs are requested, extra
#SBATCH options and shell lines run before srun (module loads, venv activation). Command-line
flags win over the profile.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"
PROFILE_DIR = REPO_ROOT / "slurm" / "profiles"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class ClusterProfile:
    """What every job on one cluster asks for (see slurm/profiles/example.yaml)."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # sbatch --time, e.g. "1-00:00:00"; None: the partition's default
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    gpu_request: str = "--gpus-per-node={gpus}"  # some clusters want "--gres=gpu:{gpus}"
    sbatch: list[str] = field(default_factory=list)  # extra options, e.g. "--qos=high", "--exclusive"
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda/12.4"
    python: str | None = None  # the interpreter on the compute nodes; None: the one running `moevit submit`


def load_profile(name_or_path: str | None) -> ClusterProfile:
    """A profile from slurm/profiles/<name>.yaml or a YAML path; None gives the empty profile."""
    if name_or_path is None:
        return ClusterProfile()
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ValueError(f"--profile {name_or_path}: no such file, and not one of {known} in {PROFILE_DIR}")
    values = yaml.safe_load(path.read_text()) or {}
    allowed = {f.name for f in fields(ClusterProfile)}
    if not isinstance(values, dict):
        raise ValueError(f"profile {path}: expected a mapping of {sorted(allowed)}")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"profile {path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return ClusterProfile(**values)


@dataclass(frozen=True)
class JobLayout:
    """Processes of the job: `nodes` x `tasks_per_node`, one per GPU (gpus > 0) or CPU-only tasks."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0: CPU mode (gloo)

    def __post_init__(self):
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError(
                f"need --nodes >= 1 and one or more tasks per node, got nodes={self.nodes}, "
                f"tasks_per_node={self.tasks_per_node}, gpus_per_node={self.gpus_per_node}"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def train_command(python: str, config: Path, overrides: list[str]) -> str:
    """What srun starts once per task: the worker entry point, resuming if the run dir has a checkpoint."""
    argv = [python, "-m", "moevit.cli", "train", str(config), "--resume", "auto", *overrides]
    return " ".join(shlex.quote(arg) for arg in argv)


def sbatch_options(layout: JobLayout, profile: ClusterProfile) -> list[str]:
    options = []
    if layout.gpus_per_node:
        options.append(profile.gpu_request.format(gpus=layout.gpus_per_node))
    for name in ("partition", "account", "time"):
        value = getattr(profile, name)
        if value is not None:
            options.append(f"--{name}={value}")
    if profile.cpus_per_task is not None:
        options.append(f"--cpus-per-task={profile.cpus_per_task}")
    return options + list(profile.sbatch)


def render_sbatch(
    template: str,
    layout: JobLayout,
    profile: ClusterProfile,
    command: str,
    job_name: str,
    workdir: Path,
    log: Path,
) -> str:
    """The batch script: `template` with its `{{placeholders}}` filled."""
    values = {
        "job_name": job_name,
        "nodes": str(layout.nodes),
        "tasks_per_node": str(layout.tasks_per_node),
        "workdir": str(workdir),
        "log": str(log),
        "sbatch_options": "\n".join(f"#SBATCH {option}" for option in sbatch_options(layout, profile)),
        "setup": "\n".join(profile.setup),
        "train_command": command,
    }
    used = set(_PLACEHOLDER.findall(template))
    if used != set(values):
        raise ValueError(
            f"sbatch template placeholders {sorted(used)} differ from the values moevit fills "
            f"{sorted(values)}: missing {sorted(set(values) - used)}, unknown {sorted(used - set(values))}"
        )
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)
