"""`moevit ckpt`: checkpoint tools, mounted by the top-level CLI.

    moevit ckpt reshard CKPT --ep-size N [--world-size W] --out RUN_DIR

CKPT is a checkpoint directory (`<run>/checkpoints/<tag>`) or a run dir (its newest complete
checkpoint). The result is the newest checkpoint of RUN_DIR; continue with
`moevit train CONFIG parallel.ep_size=N output_dir=RUN_DIR --nproc W --resume auto`.
The library (moevit.parallel.reshard, which imports DeepSpeed) loads only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_ckpt_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("ckpt", help="checkpoint tools (resharding across ep_size)")
    commands = parser.add_subparsers(dest="ckpt_command", required=True)
    reshard = commands.add_parser(
        "reshard", help="rewrite a checkpoint (weights, optimizer, client state) for another ep_size"
    )
    reshard.add_argument(
        "checkpoint", type=Path, help="a checkpoint dir or a run dir (its newest checkpoint)"
    )
    reshard.add_argument("--ep-size", type=int, required=True, help="expert-parallel size to reshard to")
    reshard.add_argument(
        "--world-size", type=int, help="processes the resumed run will use (default: the ep size)"
    )
    reshard.add_argument("--out", type=Path, required=True, help="run dir that receives the checkpoint")
    reshard.set_defaults(func=cmd_reshard)
    return parser


def cmd_reshard(args: argparse.Namespace) -> int:
    from moevit.artifacts.checkpoints import resolve_checkpoint
    from moevit.parallel.reshard import ReshardError, reshard_checkpoint, summarize
    from moevit.train.state import reshard_client_states

    source = resolve_checkpoint(args.checkpoint, "moevit ckpt reshard")  # ConfigError: exit 2 in main
    try:
        target, notes = reshard_checkpoint(
            source.directory, args.ep_size, args.out, reshard_client_states, args.world_size
        )
    except (ReshardError, FileNotFoundError) as err:
        print(f"moevit: error: {err}", file=sys.stderr)
        return 2
    print(summarize(target, notes))
    return 0
