"""`moevit finetune CONFIG --init DIR --mode head|router+head|full [--from-task T] [key=value ...]`

Trains the config's single classification task (e.g. configs/finetune_downstream.yaml on the
synthetic downstream set) starting from a pruned model directory, or from a training checkpoint for
the unpruned baseline, with the training loop of `moevit train` (one process, no expert
parallelism: a pruned model's layers keep different expert counts). The config's `model` section is
not used: the architecture is the init's. Writes, in output_dir, the usual run files plus

    model/           the fine-tuned model as a standalone directory (manifest.json, model.pt): `moevit eval`
    finetune.json    mode, trainable and total parameters, backbone GFLOPs, the final val metrics
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("finetune", help="fine-tune a pruned (or full) model on a downstream task")
    parser.add_argument("config", help="YAML config with one classification task")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument(
        "--init", required=True, help="a pruned model dir (moevit prune), or a run/checkpoint dir"
    )
    parser.add_argument("--mode", required=True, choices=["head", "router+head", "full"], help="what trains")
    parser.add_argument(
        "--from-task", help="whose routers the downstream task reuses (default: the init's only task)"
    )
    parser.set_defaults(func=cmd_finetune)
    return parser


def cmd_finetune(args: argparse.Namespace) -> int:
    from moevit.artifacts.run_dir import check_output_dir
    from moevit.config import load_config
    from moevit.config.errors import ConfigError
    from moevit.finetune.export import export_finetuned
    from moevit.finetune.model import build_finetune_model, freeze
    from moevit.models.flops import analytic_flops
    from moevit.parallel.env import detect_environment
    from moevit.parallel.expert_parallel import apply_expert_parallel
    from moevit.train.loop import run_training

    cfg = load_config(args.config, args.overrides)
    if cfg.model.init is not None:  # the architecture and weights are --init's; model.init would clash
        raise ConfigError(args.config, "'model.init' is not used by fine-tuning: its start is --init")
    if detect_environment().world_size > 1:
        raise ConfigError("moevit finetune", "runs in one process; start it without a launcher")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_size=1))
    for name, task in cfg.tasks.items():
        if task.data is None or not Path(task.data.root).is_dir():
            where = "no data" if task.data is None else f"{task.data.root} is not a directory"
            raise ConfigError(args.config, f"'tasks.{name}.data': {where}")
    check_output_dir(cfg, None)
    try:
        model, manifest = build_finetune_model(cfg, args.init, args.from_task)
    except (ValueError, KeyError) as err:
        print(f"moevit finetune: error: {err}", file=sys.stderr)
        return 2
    ((task, task_cfg),) = cfg.tasks.items()
    gflops = analytic_flops(model.backbone, task_cfg.data.image_size, task)["gflops"]
    # Shard (trivially: ep_size 1) before freezing: the engine would do it later, and the sharded experts
    # are new Parameters, which would otherwise come back trainable.
    apply_expert_parallel(model, 1)
    counts = freeze(model, args.mode)
    metrics = run_training(cfg, source=args.config, model=model)
    if not metrics:  # a signal stopped training before the last step (moevit.train.preemption)
        print(
            f"moevit finetune: stopped before the last step; no model/ or finetune.json written in "
            f"{cfg.output_dir} (fine-tuning does not resume: run it again)",
            file=sys.stderr,
        )
        return 1
    export_finetuned(Path(cfg.output_dir), manifest)
    result = {
        "mode": args.mode,
        "init": args.init,
        "params_trainable": counts["trainable"],
        "params_total": counts["total"],
        "gflops": gflops,
        "metrics": metrics[task],
    }
    (Path(cfg.output_dir) / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0
