"""`moevit expand`: grow a trained checkpoint by N experts per MoE layer and one new task.

    moevit expand --checkpoint CKPT --new-task NAME --head {classification,detection,segmentation}
                  --num-classes C --new-experts N --out DIR [--expert-init copy|fresh]
                  [--data-root DIR --image-size S --batch-size B] [--config FILE] [--settings FILE]
                  [dotted.key=value ...]

Writes DIR, a standalone model directory (moevit.artifacts.model_dir): model.pt, config.yaml and
manifest.json, whose "continual" section records what was done. Then train the new task
from it, with the old tasks frozen and evaluated alongside:

    moevit train DIR/config.yaml --nproc 2 output_dir=runs/continual [train.steps=...]

`--settings FILE` merges a file's training sections (train, aux_loss, parallel, output_dir, seed) into the
written config; dotted overrides then change any of it (the new task's head_options, train.steps, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADS = ("classification", "detection", "segmentation")


def add_expand_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "expand", help="add experts and a new task to a trained checkpoint (old tasks stay bit-identical)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run dir (its newest checkpoint) or a checkpoint dir"
    )
    parser.add_argument("--new-task", required=True, help="name of the new task")
    parser.add_argument("--head", required=True, choices=HEADS, help="the new task's head")
    parser.add_argument("--num-classes", required=True, type=int, help="the new task's classes")
    parser.add_argument("--new-experts", required=True, type=int, help="experts added to every MoE MLP layer")
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--expert-init",
        default="copy",
        choices=["copy", "fresh"],
        help="new experts start as copies of the most used old experts (default) or freshly initialised",
    )
    parser.add_argument(
        "--data-root", help="the new task's dataset (format follows --head: imagenet/coco/ade20k)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="the new task's image size (default: model.img_size)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="the new task's batch size per process")
    parser.add_argument("--config", help="the source config (default: the run dir's config.yaml)")
    parser.add_argument(
        "--settings",
        help="YAML whose train/aux_loss/parallel/output_dir/seed sections go into the written config "
        "(e.g. configs/continual_downstream.yaml)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides of the written config, e.g. train.steps=150"
    )
    parser.set_defaults(func=cmd_expand)
    return parser


def cmd_expand(args: argparse.Namespace) -> int:
    from moevit.artifacts.model_dir import ManifestError
    from moevit.continual.run import run_expand

    if args.out.exists() and any(args.out.iterdir()):
        print(f"moevit expand: error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        manifest = run_expand(
            checkpoint=args.checkpoint,
            config=args.config,
            task=args.new_task,
            head=args.head,
            num_classes=args.num_classes,
            new_experts=args.new_experts,
            out_dir=args.out,
            expert_init=args.expert_init,
            data_root=args.data_root,
            image_size=args.image_size,
            batch_size=args.batch_size,
            overrides=args.overrides,
            settings=args.settings,
        )
    except (ValueError, KeyError, ManifestError) as err:
        print(f"moevit expand: error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                k: manifest[k]
                for k in ("new_task", "experts_before", "experts_after", "params_trainable", "params_total")
            }
        )
    )
    print(f"wrote {args.out}; train the new task with: moevit train {args.out / 'config.yaml'} --nproc N")
    return 0
