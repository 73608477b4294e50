"""`moevit prune`: carve task-specific models out of a trained multi-task checkpoint.

    moevit prune --checkpoint CKPT --task T[,T2] --out DIR [criterion] [--usage auto|counters|calib]
                 [--calib-batches N] [--calib-split train|val] [--eval] [dotted.key=value ...]
    moevit prune --checkpoint CKPT --task T --out DIR --sweep

Criteria (one; default --threshold 3, Mod-Squad's): --threshold T, --mass P, --top M,
--budget-params X, --budget-gflops Y, --keep-all. Dotted overrides change the run's config
(e.g. data roots for calibration and --eval).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the command runs: moevit.prune pulls in DeepSpeed
    from moevit.prune.criteria import Criterion


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("prune", help="extract a standalone pruned model for some tasks")
    parser.add_argument(
        "--checkpoint", required=True, help="a run dir (its newest checkpoint) or a checkpoint dir"
    )
    parser.add_argument(
        "--task", required=True, help="task name(s), comma-separated: the union of their experts is kept"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="config file (default: the run dir's config.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. tasks.imagenet.data.root=DIR"
    )
    crit = parser.add_mutually_exclusive_group()
    crit.add_argument("--threshold", type=float, help="keep experts with usage %% > T / top_k (default 3)")
    crit.add_argument("--mass", type=float, help="keep the fewest experts covering this fraction of routing")
    crit.add_argument("--top", type=int, help="keep the M most used experts per layer")
    crit.add_argument("--budget-params", type=float, help="at most this many parameters")
    crit.add_argument("--budget-gflops", type=float, help="at most this many backbone GFLOPs per image")
    crit.add_argument("--keep-all", action="store_true", help="keep every expert (task extraction only)")
    crit.add_argument("--sweep", action="store_true", help="many criteria: sweep.csv and sweep.png in --out")
    parser.add_argument(
        "--usage",
        default="calib",
        choices=["calib", "counters", "auto"],
        help="usage source: a calibration pass of the final model (default), the training counters (a "
        "moving average of each task's routing, train.usage_ema_decay; runs written before it existed: "
        "the last window between evaluations), or auto: counters if present, else calibration",
    )
    parser.add_argument(
        "--calib-batches", type=int, default=20, help="batches per task of the calibration pass"
    )
    parser.add_argument(
        "--calib-split",
        default="train",
        choices=["train", "val"],
        help="calibration data (train: keeps the val split unseen by the selection)",
    )
    parser.add_argument("--eval", action="store_true", help="evaluate the source and pruned models on val")
    parser.set_defaults(func=cmd_prune)
    return parser


def criterion_of(args: argparse.Namespace) -> Criterion:
    from moevit.prune.criteria import Criterion

    for kind, value in (
        ("threshold", args.threshold),
        ("mass", args.mass),
        ("top", args.top),
        ("params", args.budget_params),
        ("gflops", args.budget_gflops),
    ):
        if value is not None:
            criterion = Criterion(kind, float(value))
            criterion.validate()
            return criterion
    return Criterion("all") if args.keep_all else Criterion("threshold", 3.0)


def cmd_prune(args: argparse.Namespace) -> int:
    from moevit.artifacts.model_dir import ManifestError
    from moevit.prune.extract import check_tasks
    from moevit.prune.report import format_report
    from moevit.prune.run import run_prune
    from moevit.prune.source import gather_usage, load_source
    from moevit.prune.sweep import run_sweep

    try:
        criterion = criterion_of(args)
        tasks = [t.strip() for t in args.task.split(",")]
        source = load_source(args.checkpoint, args.config, args.overrides)
        tasks = check_tasks(tasks, source.model.tasks)
        usage, origin = gather_usage(source, tasks, args.usage, args.calib_batches, args.calib_split)
        print(f"usage: {origin}")
        if args.sweep:
            table = run_sweep(source, tasks, usage, args.out)
            for row in table:
                print(json.dumps(row))
            print(f"wrote {args.out}/sweep.csv and {args.out}/sweep.png")
            return 0
        report = run_prune(source, tasks, criterion, usage, origin, args.out, with_metrics=args.eval)
    except (ValueError, KeyError, ManifestError) as err:
        print(f"moevit prune: error: {err}", file=sys.stderr)
        return 2
    print(f"criterion: {criterion}")
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0
