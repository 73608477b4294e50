"""`moevit train` and `moevit eval`: parsers the top-level CLI mounts, and their multi-process launch.

    moevit train CONFIG [dotted.key=value ...] [--nproc N] [--resume auto|PATH]
    moevit eval  CONFIG --checkpoint PATH [--json OUT] [--nproc N]

With `--nproc N > 1` outside a launcher, the command checks the config for N processes, then re-runs
itself under torchrun (`python -m moevit.cli.local_launch --standalone --nproc-per-node N -m
moevit.cli ...`: torchrun's launcher, exiting with the failed worker's code), so a bad config is refused once, before any worker or process group starts.
Under a launcher (torchrun, `deepspeed --no_local_rank --module moevit.cli`, see launch/), the
launcher's WORLD_SIZE decides and `--nproc` must agree with it or be left out.

`python -m moevit.cli` is the entry point the workers run; it accepts the same two commands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LAUNCH_MODULE = "moevit.cli"


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a config; writes the run dir (output_dir)")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (re-launched under torchrun)")
    parser.add_argument(
        "--resume", help="'auto': the newest complete checkpoint of output_dir; or a run dir / checkpoint dir"
    )
    parser.set_defaults(func=cmd_train)
    return parser


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on every task's val split")
    parser.add_argument("config", help="YAML config file (the run's config.yaml works)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.eval_batches=10")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run dir (its newest checkpoint), a checkpoint dir, or a pruned model dir (moevit prune)",
    )
    parser.add_argument("--json", type=Path, help="write {task: {metric: value}} here")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (re-launched under torchrun)")
    parser.set_defaults(func=cmd_eval)
    return parser


def _relaunch(argv: list[str], nproc: int) -> int:
    """Runs `python -m moevit.cli <argv>` in `nproc` local processes under torchrun; returns the exit
    code of the first worker that failed (2: refused input, 3: non-finite stop), or 0.

    `argv` carries no `--nproc`: torchrun's parser would take it for an abbreviation of its own
    `--nproc-per-node`; the workers read the world size from torchrun's variables instead.
    """
    command = [
        sys.executable,
        "-m",
        "moevit.cli.local_launch",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        LAUNCH_MODULE,
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def _needs_relaunch(nproc: int) -> bool:
    """True outside a launcher with nproc > 1; under one, `--nproc` must match its world size."""
    from moevit.parallel.env import detect_environment

    if nproc < 1:
        raise SystemExit(f"moevit: error: --nproc must be >= 1, got {nproc}")
    launched = detect_environment().world_size
    if launched > 1 and nproc not in (1, launched):
        raise SystemExit(
            f"moevit: error: --nproc {nproc} disagrees with the launcher's world size {launched}"
        )
    return launched == 1 and nproc > 1


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<12} metrics"]
    for task, values in metrics.items():
        lines.append(f"{task:<12} " + "  ".join(f"{name}={value:.4f}" for name, value in values.items()))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from moevit.artifacts.run_dir import check_output_dir
    from moevit.config import load_config
    from moevit.parallel.collectives import is_main_process
    from moevit.parallel.env import detect_environment
    from moevit.parallel.setup import shutdown_distributed
    from moevit.train.loop import run_training
    from moevit.train.preflight import build_checked_model, start_from_init

    cfg = load_config(args.config, args.overrides)
    if _needs_relaunch(args.nproc):
        check_output_dir(cfg, args.resume)
        # model.init is read here too: a bad path or shape is refused once, before any worker starts.
        start_from_init(build_checked_model(cfg, args.nproc, args.config), cfg)
        resume = ["--resume", args.resume] if args.resume else []
        return _relaunch(["train", args.config, *args.overrides, *resume], args.nproc)
    check_output_dir(cfg, args.resume)  # before the model is built, as on a relaunch
    model = build_checked_model(cfg, detect_environment().world_size, args.config)
    if cfg.continual is not None:  # expanded weights in, old tasks frozen, before the engine shards
        from moevit.continual.start import start_continual

        start_continual(model, cfg, args.config)
    metrics = run_training(cfg, args.resume, source=args.config, model=model)
    if is_main_process():
        print(f"run dir: {cfg.output_dir}")
        if metrics:
            print(format_metrics(metrics))
        else:
            print("stopped before the last step: the checkpoint is saved, continue with --resume auto")
    shutdown_distributed()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moevit.artifacts.checkpoints import resolve_checkpoint
    from moevit.config import load_config
    from moevit.parallel.collectives import is_main_process
    from moevit.parallel.setup import shutdown_distributed
    from moevit.train.eval_checkpoint import run_evaluation
    from moevit.train.preflight import build_checked_model

    cfg = load_config(args.config, args.overrides)
    if _needs_relaunch(args.nproc):
        from moevit.artifacts.model_dir import is_pruned_dir

        if not is_pruned_dir(args.checkpoint):  # a pruned model is checked when the workers load it
            resolve_checkpoint(args.checkpoint, "--checkpoint")
            build_checked_model(cfg, args.nproc, args.config)
        output = ["--json", str(args.json)] if args.json else []
        argv = ["eval", args.config, *args.overrides, "--checkpoint", args.checkpoint, *output]
        return _relaunch(argv, args.nproc)
    metrics = run_evaluation(cfg, args.checkpoint, source=args.config)
    if is_main_process():
        print(format_metrics(metrics))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    shutdown_distributed()
    return 0
