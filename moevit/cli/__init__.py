"""`moevit <command>`: a thin front over the library.

Commands import what they need when they run, so `moevit --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"
DEFAULT_DATA_ROOT = "data/synth"


def _load(config: str, overrides: list[str]):
    from moevit.config import load_config

    return load_config(config, overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data (written if missing), then `moevit train` on the demo config in a fresh run dir."""
    from moevit.data.synth import synthetic_data_is_complete, write_synthetic_datasets

    cfg = _load(args.config, args.overrides)  # refuse a bad config before writing any data
    if not synthetic_data_is_complete(args.data, seed=0, size=args.data_size):
        print(f"writing synthetic datasets ({args.data_size}) to {args.data} ...", flush=True)
        write_synthetic_datasets(args.data, seed=0, size=args.data_size)
    # The synthetic datasets live side by side under --data, one folder per format.
    roots = [
        f"tasks.{name}.data.root={Path(args.data) / task.data.format}"
        for name, task in cfg.tasks.items()
        if task.data is not None
    ]
    run_dir = Path(f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    code = main(
        ["train", args.config, *args.overrides, *roots, f"output_dir={run_dir}", "--nproc", str(args.nproc)]
    )
    if code == 0:
        point_latest_demo_at(run_dir)
    return code


def point_latest_demo_at(run_dir: Path, link: Path = Path("runs/demo")) -> None:
    """`runs/demo` -> the newest demo run, so that the README's commands (`--checkpoint runs/demo`) work
    as written. Replaced atomically; a real directory of that name is left alone."""
    if link.exists() and not link.is_symlink():
        print(
            f"{link} is a directory, not a link: left as it is (the demo run is {run_dir})", file=sys.stderr
        )
        return
    staging = link.with_name(f".{link.name}.{run_dir.name}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(run_dir.name)
    staging.replace(link)
    print(f"{link} -> {run_dir}")


def cmd_flops(args: argparse.Namespace) -> int:
    from moevit.factory import build_backbone
    from moevit.models.flops import run_flops

    cfg = _load(args.config, args.overrides)
    image_sizes = {name: task.image_size for name, task in cfg.tasks.items()}
    print(run_flops(build_backbone(cfg), image_sizes, as_json=args.json))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from moevit.data.synth import write_synthetic_datasets
    from moevit.data.synth.downstream import write_downstream

    if args.downstream:  # only the downstream set, next to (and without touching) the other three
        summary = {"downstream": write_downstream(args.out, seed=args.seed, size=args.size)}
    else:
        summary = write_synthetic_datasets(args.out, seed=args.seed, size=args.size)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from moevit.models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moevit.cli.ckpt import add_ckpt_parser
    from moevit.cli.expand import add_expand_parser
    from moevit.cli.finetune import add_finetune_parser
    from moevit.cli.plan import add_plan_parser
    from moevit.cli.prune import add_prune_parser
    from moevit.cli.shard import add_shard_parser
    from moevit.cli.submit import add_submit_parser
    from moevit.cli.train import add_eval_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="moevit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the main job: train and evaluate the demo config on synthetic data"
    )
    demo.add_argument("--config", default=DEFAULT_DEMO_CONFIG)
    demo.add_argument(
        "--data", default=DEFAULT_DATA_ROOT, help="where the synthetic datasets live (written if missing)"
    )
    demo.add_argument("--data-size", default="small", choices=["tiny", "small"])
    demo.add_argument("--nproc", type=int, default=2, help="local processes (the demo config uses ep_size 2)")
    demo.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.moe.top_k=1")
    demo.set_defaults(func=cmd_demo)

    add_train_parser(commands)
    add_eval_parser(commands)
    add_submit_parser(commands)
    add_prune_parser(commands)
    add_finetune_parser(commands)
    add_expand_parser(commands)

    flops = commands.add_parser(
        "flops", help="parameters and per-task active GFLOPs, cross-checked with fvcore"
    )
    flops.add_argument("config")
    flops.add_argument("overrides", nargs="*")
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(func=cmd_flops)
    add_plan_parser(commands)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write the synthetic ImageNet/COCO/ADE20K-format datasets")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "small", "real"],
        help="tiny: tests (seconds); small: the demo; real: a few dozen images per dataset at the real "
        "datasets' sizes and label structure (ImageNet ~500x375, COCO ~640x480 with 80 gapped ids and "
        "crowds, ADE20K ~683x512 with 150 classes), to rehearse configs/paper/ on a CPU",
    )
    synth.add_argument(
        "--downstream",
        action="store_true",
        help="write only OUT/downstream: classification of classes the demo never saw (moevit finetune)",
    )
    synth.set_defaults(func=cmd_data_synth)
    add_shard_parser(data)

    add_ckpt_parser(commands)

    models = commands.add_parser("models", help="list registered model variants")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops collecting the `overrides` positionals at the first flag, so
    # `moevit train cfg.yaml --nproc 2 train.steps=5` would leave `train.steps=5` unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(arg.startswith("-") or "=" not in arg for arg in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from moevit.config.errors import ConfigError
    from moevit.data.errors import DatasetLayoutError
    from moevit.fileio import UnsafeCheckpointError
    from moevit.train.errors import NonFiniteLossError

    try:
        return args.func(args)
    except (ConfigError, DatasetLayoutError, UnsafeCheckpointError) as err:
        return _error_exit(err, 2)
    except NonFiniteLossError as err:  # every rank stops together with this message
        return _error_exit(err, 3)


def _error_exit(err: Exception, code: int) -> int:
    """Prints `moevit: error: ...` and returns `code`, leaving any process group first.

    The line goes out in one write: the ranks of a launch share stderr, and `print`'s separate write of
    the newline let two ranks' messages run into one line. A process group is destroyed here, without
    waiting for the other ranks (a rank may stop alone): left to the interpreter's exit, gloo's teardown
    can abort the process ("terminate called without an active exception", exit 134 instead of `code`).
    """
    sys.stderr.write(f"moevit: error: {err}\n")
    sys.stderr.flush()
    distributed = sys.modules.get("torch.distributed")  # imported only if this process ever used it
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    return code
