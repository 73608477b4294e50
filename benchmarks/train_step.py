"""Time of a full three-task training step of moevit models against dense ViTs of equal active FLOPs.

One step is what `moevit train` does per step on one process: every task's micro-batch of the
config (configs/demo.yaml: ImageNet, COCO, ADE20K) through backbone and head, the load-balance,
z- and mutual-information losses, one backward, gradient clipping and one AdamW step (the engine's parameter groups).
For each variant (`--models`) three contenders run alternately in one process on the same fixed
step plan (data loading is not timed):

- moe: the variant with experts of width mlp_ratio x D / k, so its active FLOPs equal the dense
  model's (plus routers and the gate-weighted combine; the printed GFLOPs show both);
- moe-ep1: the same model with its experts swapped for the expert-parallel wrapper at ep_size 1, the
  module `moevit train` actually runs (one `ExpertMlp` per expert, DeepSpeed's registration);
- dense: the same config with `model.moe.layers=none`: a timm-style ViT, same heads.

The config's own model overrides (the demo: 64 px, patch 8, depth 6) apply to every variant.
Prints medians, spread and the ratio to dense. Not a test: speed targets are measured, not asserted.

    python benchmarks/train_step.py --threads 2 --models moevit_tiny,moevit_small [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

# Passive OpenMP waiting on a shared machine: see benchmarks/moe_layer.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from step_helpers import LocalEngine, active_gflops, equal_flops_overrides  # noqa: E402

from moevit.config import load_config  # noqa: E402
from moevit.data.synth import write_synthetic_datasets  # noqa: E402
from moevit.factory import build_model  # noqa: E402
from moevit.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from moevit.train.loader import build_train_loader  # noqa: E402
from moevit.train.step import MultiTaskStep  # noqa: E402


def contenders(args: argparse.Namespace, variant: str, data_root: Path) -> tuple[dict, object]:
    base = [f"model.name={variant}", "train.num_workers=0", *args.overrides]
    cfg = load_config(args.config, base)
    base += [f"tasks.{name}.data.root={data_root / task.data.format}" for name, task in cfg.tasks.items()]
    moe_cfg = load_config(args.config, base + equal_flops_overrides(cfg))
    dense_cfg = load_config(args.config, base + ["model.moe.layers=none"])
    torch.manual_seed(0)
    moe = build_model(moe_cfg)
    moe_ep1 = copy.deepcopy(moe)
    apply_expert_parallel(moe_ep1.backbone, 1)
    dense = build_model(dense_cfg)
    return {"moe": (moe, moe_cfg), "moe-ep1": (moe_ep1, moe_cfg), "dense": (dense, dense_cfg)}, moe_cfg


def measure(args: argparse.Namespace, variant: str, data_root: Path) -> dict:
    models, cfg = contenders(args, variant, data_root)
    loader = build_train_loader(cfg, 0, 1)
    plan = next(loader)
    prior = loader.expected_ratios()
    loader.close()
    weights = dict.fromkeys(cfg.tasks, 1.0)
    steps = {}
    for name, (model, model_cfg) in models.items():
        engine = LocalEngine(model.train(), model_cfg.train.optim)
        steps[name] = MultiTaskStep(engine, list(cfg.tasks), cfg.aux_loss, prior, 1, torch.device("cpu"))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.warmup + args.repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step(plan, weights)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    gflops = {name: active_gflops(*models[name]) for name in ("moe", "dense")}
    gflops["moe-ep1"] = gflops["moe"]  # the same model (flops counting reads GroupedExperts)
    return {
        "variant": variant,
        "images_per_step": sum(batch["images"].shape[0] for _, batch in plan),
        "backbone_forward_gflops_per_step": gflops,
        "times_s": times,
        "median_s": medians,
        "ratio_to_dense": {name: medians[name] / medians["dense"] for name in medians},
        # each round's own ratio (runs seconds apart): follows the machine's load less than medians
        "ratio_to_dense_paired": {
            name: statistics.median(t / d for t, d in zip(samples, times["dense"]))
            for name, samples in times.items()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--models", default="moevit_tiny,moevit_small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--synth-size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every contender")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moevit-train-bench-") as scratch:
        data_root = Path(scratch) / "synth"
        write_synthetic_datasets(data_root, seed=0, size=args.synth_size)
        rows = [measure(args, variant, data_root) for variant in args.models.split(",")]
    load_after = os.getloadavg()[0]
    print(
        f"train step (forward+backward+AdamW, 3 tasks), {args.config}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{args.repeats} alternating runs after {args.warmup} warm-up; load average {load_before:.1f} "
        f"before, {load_after:.1f} after"
    )
    print(
        f"{'variant':<13} {'contender':<8} {'images':>6} {'GFLOPs':>7} {'median s':>9} {'spread':>13} {'vs dense':>8} {'paired':>8}"
    )
    for row in rows:
        for name, samples in row["times_s"].items():
            print(
                f"{row['variant']:<13} {name:<8} {row['images_per_step']:>6} "
                f"{row['backbone_forward_gflops_per_step'][name]:7.2f} {row['median_s'][name]:9.3f} "
                f"{min(samples):6.3f}-{max(samples):6.3f} {row['ratio_to_dense'][name]:7.2f}x "
                f"{row['ratio_to_dense_paired'][name]:7.2f}x"
            )
    result = {
        "args": vars(args),
        "torch": torch.__version__,
        "load_average": [load_before, load_after],
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
