"""Training jobs on a real SLURM cluster (issue 8): `moevit submit --cpu` renders the project's own
slurm/train.sbatch, sbatch queues it, srun starts 2 gloo processes (EP=2) on the tiny synthetic data.

1. A job runs to the end and writes its metrics.
2. A second job with the same config gets USR2 mid-run (`scancel --signal=USR2`, what
   `#SBATCH --signal=USR2@120` does before the time limit): the ranks checkpoint, rank 0 requeues the
   job, the requeued job resumes from that checkpoint, and every logged value equals the first job's
   bit for bit.

slurmctld holds a requeued job for ~2 minutes (its begin time is set ahead); the test moves the begin
time back to now instead of waiting. Together ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from moevit.parallel.checkpoint import find_latest_checkpoint
from moevit.train.throughput import WALL_CLOCK_FIELDS

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 16
SIGNAL_AFTER_STEP = 3
JOB_TIMEOUT_S = 420
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, synth_root, tiny_config):
    root = tmp_path_factory.mktemp("slurm-train")
    config = tiny_config(
        synth_root,  # output_dir: set by each submission
        datasets={"shapes": "imagenet", "objects": "imagenet"},
        batch_sizes={"objects": 4},
        aux_loss={"mutual_information": 0.1},
        # One DataLoader worker per task, as real jobs run: scancel and the requeue meet live workers, and
        # resume stays exact (augmentation is seeded per sample, moevit.data.seeding).
        train={"steps": STEPS, "checkpoint_every": 4, "eval_batches": 1, "num_workers": 1},
        parallel={"ep_size": 2},
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(cluster, config_file, output_dir) -> str:
    """`moevit submit --cpu --tasks-per-node 2`; returns the job id."""
    command = [sys.executable, "-m", "moevit.cli", "submit", str(config_file), "--cpu", "--tasks-per-node",
               "2", "--time", "00:15:00", f"output_dir={output_dir}"]  # fmt: skip
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"moevit submit failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    match = re.search(r"submitted batch job (\d+)", done.stdout)
    assert match, done.stdout
    return match[1]


def job_log(output_dir, job_id) -> str:
    path = output_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log)"


def wait_until(condition, what: str, cluster, output_dir, job_id, timeout_s=JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        state = cluster.job(job_id).get("JobState")
        if time.monotonic() > deadline or (state in FINAL_STATES and not condition()):
            pytest.fail(
                f"job {job_id} ({state}): gave up waiting for {what}\n"
                f"--- job log ---\n{job_log(output_dir, job_id)[-6000:]}\n{cluster.logs()}"
            )
        time.sleep(0.2)


def wait_for_end(cluster, output_dir, job_id) -> dict[str, str]:
    def ended():
        job = cluster.job(job_id)
        return job if job["JobState"] in FINAL_STATES else None

    return wait_until(ended, "the end of the job", cluster, output_dir, job_id)


def records(output_dir) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in WALL_CLOCK_FIELDS} for line in lines]


@pytest.fixture(scope="module")
def straight_run(slurm_cluster, config_file):
    """The uninterrupted job: (run dir, job id, final scontrol record)."""
    output_dir = config_file.parent / "straight"
    job_id = submit(slurm_cluster, config_file, output_dir)
    job = wait_for_end(slurm_cluster, output_dir, job_id)
    return output_dir, job_id, job


def test_sbatch_template_trains_two_processes_to_the_end(slurm_cluster, straight_run):
    output_dir, job_id, job = straight_run
    log = job_log(output_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-6000:]
    assert f"on {slurm_cluster.node}: 1 node(s) x 2 task(s)" in log
    assert (output_dir / "submit.sbatch").read_text().count("srun --kill-on-bad-exit=1 ") == 1
    logged = records(output_dir)
    totals = [r for r in logged if r["split"] == "train" and r["task"] is None]
    assert [r["step"] for r in totals] == list(range(1, STEPS + 1))
    assert all(r["total_loss"] > 0 for r in totals)
    evals = {r["task"]: r for r in logged if r["split"] == "eval"}
    assert set(evals) == {"shapes", "objects"} and all(0 <= r["top1"] <= 1 for r in evals.values())
    assert (output_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_usr2_checkpoints_requeues_and_resumes_to_the_same_losses(slurm_cluster, config_file, straight_run):
    output_dir = config_file.parent / "preempted"
    job_id = submit(slurm_cluster, config_file, output_dir)

    def trained_a_few_steps():
        return any(r["step"] >= SIGNAL_AFTER_STEP for r in records(output_dir))

    wait_until(trained_a_few_steps, f"step {SIGNAL_AFTER_STEP}", slurm_cluster, output_dir, job_id)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)

    def requeued():
        job = slurm_cluster.job(job_id)
        return job["JobState"] == "PENDING" and job["Restarts"] == "1"

    wait_until(requeued, "the requeue", slurm_cluster, output_dir, job_id)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # skip the requeue hold
    job = wait_for_end(slurm_cluster, output_dir, job_id)

    log = job_log(output_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-6000:]
    stopped = re.search(r"SIGUSR2 received: checkpoint at step (\d+) saved, requeueing the job", log)
    assert stopped, log[-6000:]
    step = int(stopped[1])
    assert SIGNAL_AFTER_STEP <= step < STEPS
    assert f"checkpoints/step_{step:08d} at step {step}" in log  # "resumed from <run>/checkpoints/..."
    assert "restart 1" in log
    assert records(output_dir) == records(straight_run[0])  # every step's losses and the final eval


def test_scancel_sigterm_saves_a_complete_checkpoint_and_exits(slurm_cluster, config_file):
    output_dir = config_file.parent / "cancelled"
    job_id = submit(slurm_cluster, config_file, output_dir)

    def trained_a_few_steps():
        return any(r["step"] >= SIGNAL_AFTER_STEP for r in records(output_dir))

    wait_until(trained_a_few_steps, f"step {SIGNAL_AFTER_STEP}", slurm_cluster, output_dir, job_id)
    slurm_cluster.run("scancel", job_id)  # SIGTERM to every task; SIGKILL follows after KillWait
    job = wait_for_end(slurm_cluster, output_dir, job_id)

    log = job_log(output_dir, job_id)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", log[-6000:]
    stopped = re.search(r"SIGTERM received: checkpoint at step (\d+) saved, exiting", log)
    assert stopped, log[-6000:]
    tag = f"step_{int(stopped[1]):08d}"
    checkpoints = output_dir / "checkpoints"
    assert find_latest_checkpoint(output_dir) == tag == (checkpoints / "latest").read_text()
    assert all((path / "complete.json").is_file() for path in checkpoints.glob("step_*"))
    assert not list(checkpoints.rglob("*.tmp")), "a half-written file was left behind"
