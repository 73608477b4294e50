"""Training-step time of a config at a given expert-parallel size, on fixed batches.

Run under a launcher, once per ep_size, with the same global batch:

    torchrun --standalone --nproc-per-node 2 benchmarks/ep_step_time.py configs/demo.yaml --ep-size 1
    torchrun --standalone --nproc-per-node 2 benchmarks/ep_step_time.py configs/demo.yaml --ep-size 2

The first step plan is reused for every step, so data loading is not timed; prints one JSON line
(median and min seconds per step). `--profile` prints torch.profiler's top operators instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moevit.config import load_config
from moevit.parallel.collectives import barrier, is_main_process
from moevit.parallel.engine import build_engine
from moevit.parallel.env import detect_environment
from moevit.parallel.setup import device_for, initialize_distributed
from moevit.train.loader import build_train_loader
from moevit.train.preflight import build_checked_model
from moevit.train.step import MultiTaskStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(args.config, [f"parallel.ep_size={args.ep_size}", "train.num_workers=0"])
    model = build_checked_model(cfg, detect_environment().world_size, args.config)
    env = initialize_distributed(cfg)
    engine = build_engine(model, cfg, env)
    loader = build_train_loader(cfg, env.rank, env.world_size)
    plan = next(loader)
    step = MultiTaskStep(
        engine, list(cfg.tasks), cfg.aux_loss, loader.expected_ratios(), env.world_size, device_for(env)
    )
    weights = dict.fromkeys(cfg.tasks, 1.0)
    for _ in range(args.warmup):
        step(plan, weights)
    barrier()

    times = []

    def timed_steps() -> None:
        for _ in range(args.steps):
            started = time.perf_counter()
            step(plan, weights)
            times.append(time.perf_counter() - started)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            timed_steps()
        if is_main_process():
            print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    else:
        timed_steps()
    if is_main_process():
        images = sum(batch["images"].shape[0] for _, batch in plan) * env.world_size
        print(
            json.dumps(
                {
                    "config": args.config,
                    "ep_size": args.ep_size,
                    "world_size": env.world_size,
                    "images_per_step": images,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                }
            )
        )


if __name__ == "__main__":
    main()
