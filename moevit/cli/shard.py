"""``moevit data shard``: write one split of a folder dataset as WebDataset shards (see ``writer.py``).

moevit data shard --dataset imagenet --root /data/imagenet --split train --out /data/shards/imagenet/train
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moevit.data.shards.layout import DATASET_TASK_TYPES
from moevit.data.shards.writer import DEFAULT_SHARD_SIZE, write_shards


def cmd_data_shard(args: argparse.Namespace) -> int:
    try:
        summary = write_shards(args.dataset, args.root, args.split, args.out, shard_size=args.shard_size)
    except FileExistsError as err:
        print(f"moevit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def add_shard_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``shard`` under the ``moevit data`` command group and returns its parser."""
    shard = subparsers.add_parser(
        "shard", help="write one split of an ImageNet/COCO/ADE20K folder dataset as WebDataset tar shards"
    )
    shard.add_argument("--dataset", required=True, choices=sorted(DATASET_TASK_TYPES))
    shard.add_argument("--root", required=True, type=Path, help="dataset root, as the folder reader takes it")
    shard.add_argument("--split", required=True, help="train or val (training/validation accepted)")
    shard.add_argument(
        "--out", required=True, type=Path, help="new or empty directory for this split's shards"
    )
    shard.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="samples per shard; use at least one shard per rank x DataLoader worker",
    )
    shard.set_defaults(func=cmd_data_shard)
    return shard
