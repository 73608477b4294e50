"""`moevit submit`: check a training config, render slurm/train.sbatch for it and hand it to sbatch.

    moevit submit CONFIG --nodes N --gpus-per-node G [--partition P] [--account A] [--time T]
                  [--profile NAME|PATH] [--dry-run] [dotted.key=value ...]
    moevit submit CONFIG --nodes N --cpu --tasks-per-node K [...]      # CPU nodes: gloo

The config is checked for the job's world size on the submitting machine (datasets, model,
ep_size), so a typo fails now rather than after the job waited in the queue. The rendered script
is kept as `<output_dir>/submit.sbatch`; the job's log is `<output_dir>/slurm-<jobid>.out`.
sbatch passes the submitting shell's environment to the job (HOME, PATH, caches).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from moevit.slurm.sbatch import (
    DEFAULT_TEMPLATE,
    JobLayout,
    load_profile,
    render_sbatch,
    train_command,
)

SCRIPT_NAME = "submit.sbatch"
LOG_NAME = "slurm-%j.out"  # sbatch replaces %j with the job id


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("submit", help="submit a training run to SLURM (slurm/train.sbatch)")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, help="one process per GPU (default: the profile's)")
    parser.add_argument("--cpu", action="store_true", help="CPU-only nodes: gloo, --tasks-per-node processes")
    parser.add_argument("--tasks-per-node", type=int, default=1, help="processes per node with --cpu")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per process (default: the profile's)")
    parser.add_argument("--partition", help="overrides the profile's")
    parser.add_argument("--account", help="overrides the profile's")
    parser.add_argument("--time", help="time limit, e.g. 1-00:00:00 (overrides the profile's)")
    parser.add_argument("--profile", help="slurm/profiles/NAME.yaml or a YAML path (cluster defaults)")
    parser.add_argument("--job-name", help="default: moevit-<output_dir name>")
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="the sbatch template")
    parser.add_argument(
        "--resume", choices=["auto"], help="allow an output_dir that already holds checkpoints (continue it)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    parser.set_defaults(func=cmd_submit)
    return parser


def _layout(args: argparse.Namespace, gpus_per_node: int | None) -> JobLayout:
    if args.cpu:
        if args.gpus_per_node:
            raise SystemExit("moevit: error: --cpu and --gpus-per-node exclude each other")
        return JobLayout(args.nodes, args.tasks_per_node, 0)
    if not gpus_per_node:
        raise SystemExit(
            "moevit: error: give --gpus-per-node G (or a profile with gpus_per_node), or --cpu --tasks-per-node K"
        )
    return JobLayout(args.nodes, gpus_per_node, gpus_per_node)


def cmd_submit(args: argparse.Namespace) -> int:
    from moevit.artifacts.run_dir import check_output_dir
    from moevit.config import load_config
    from moevit.train.preflight import build_checked_model, start_from_init

    try:
        profile = load_profile(args.profile)
        flags = {
            "partition": args.partition,
            "account": args.account,
            "time": args.time,
            "gpus_per_node": args.gpus_per_node,
            "cpus_per_task": args.cpus_per_task,
        }
        profile = dataclasses.replace(profile, **{k: v for k, v in flags.items() if v is not None})
        layout = _layout(args, profile.gpus_per_node)
    except ValueError as err:
        raise SystemExit(f"moevit: error: {err}") from None
    overrides = [*args.overrides, *(["parallel.backend=gloo"] if args.cpu else [])]
    cfg = load_config(args.config, overrides)
    # The submitting machine may have no GPU: check everything but the backend, which the tasks check.
    checked = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend="gloo"))
    start_from_init(build_checked_model(checked, layout.world_size, args.config), checked)  # model.init too
    check_output_dir(cfg, args.resume)

    workdir = Path.cwd()
    output_dir = (workdir / cfg.output_dir).resolve()
    python = profile.python or sys.executable
    try:
        script = render_sbatch(
            args.template.read_text(),
            layout,
            profile,
            train_command(python, Path(args.config).resolve(), overrides),
            args.job_name or f"moevit-{output_dir.name}",
            workdir,
            output_dir / LOG_NAME,
        )
    except (OSError, ValueError) as err:  # a missing or edited template
        raise SystemExit(f"moevit: error: --template {args.template}: {err}") from None
    if args.dry_run:
        print(script, end="")
        return 0
    output_dir.mkdir(parents=True, exist_ok=True)  # sbatch opens the log there before the job starts
    script_path = output_dir / SCRIPT_NAME
    script_path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode:
        print(f"moevit: error: sbatch failed ({done.returncode}): {done.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted batch job {job_id}: {layout.nodes} node(s) x {layout.tasks_per_node} task(s)")
    print(f"log: {output_dir / LOG_NAME.replace('%j', job_id)}")
    return 0
