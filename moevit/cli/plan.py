"""`moevit plan CONFIG [dotted.key=value ...] [--gpus N] [--json]`: size a job before submitting it.

Thin: moevit.train.plan builds the report (parameters, GFLOPs, tokens, activation memory, epochs).
"""

from __future__ import annotations

import argparse


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan",
        help="per task: parameters, GFLOPs, tokens per step, activation memory per GPU, epochs covered",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=90000")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs of the job (world size)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.set_defaults(func=cmd_plan)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from moevit.config import load_config
    from moevit.train.plan import run_plan

    cfg = load_config(args.config, args.overrides)
    print(run_plan(cfg, args.gpus, as_json=args.json, source=args.config))
    return 0
