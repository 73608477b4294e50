"""Images per second of the data pipelines at the demo's resolution, per DataLoader worker.

For every task of the config (default configs/demo.yaml: its image and batch sizes), two training
pipelines run in a DataLoader with --workers workers:

- folder: the folder reader + train transforms + corrupt-sample skipping (``build_dataset``), batched by
  the resumable sampler and the task's collate function, as ``MultiTaskLoader`` runs it;
- shards: the same split written as WebDataset shards, read by ``ShardPipeline`` (resampled shards,
  shuffle buffer, the same transforms and collate function).

Warm-up batches (worker start, file cache and, for shards, filling the shuffle buffer, during which
webdataset reads two raw samples per sample it yields) are not timed; the next --batches are, so the
figures are steady-state rates. Runs of the two pipelines alternate --repeats times; the median is
reported. Given a measured demo step time (--step-seconds), it also prints what the demo consumes per
task (the schedule's probability that a step trains the task x its batch size / step time) and each
pipeline's rate over it. Not a test: figures are measured, not asserted. Without --data, synthetic
data (--size) is written to a temporary directory.

    python benchmarks/data.py --workers 1 [--data DIR] [--size tiny|small] [--step-seconds S] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moevit.config import load_config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.data.sampler import ResumableBatchSampler, ResumableDistributedSampler
from moevit.data.schedule import TaskSchedule
from moevit.data.shards import build_shard_pipeline, write_shards
from moevit.data.shards.reader import DEFAULT_SHUFFLE_BUFFER
from moevit.data.synth import write_synthetic_datasets

SHARD_SIZE = 256


def time_batches(loader: Iterable[dict], warmup: int, batches: int) -> float:
    """Images per second over ``batches`` batches of a fresh loader, after ``warmup`` untimed ones."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        images += next(iterator)["images"].shape[0]
    elapsed = time.perf_counter() - started
    del iterator  # stops the workers before the next run starts its own
    return images / elapsed


def folder_loader(task, workers: int, seed: int) -> DataLoader:
    dataset = build_dataset(task.type, task.data, train=True)
    sampler = ResumableDistributedSampler(len(dataset), seed=seed)
    return DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(sampler, task.data.batch_size),
        collate_fn=collate_for_task(task.type),
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )


def shard_loader(task, shard_dir: Path, workers: int, seed: int, num_batches: int) -> DataLoader:
    return build_shard_pipeline(
        shard_dir,
        task.type,
        task.data.image_size,
        task.data.batch_size,
        train=True,
        num_workers=workers,
        seed=seed,
        batches_per_epoch=num_batches,
    )


def step_probabilities(cfg, dataset_sizes: dict[str, int]) -> dict[str, float]:
    """Probability that a training step trains each task, from the config's sampling strategy."""
    sampling = cfg.train.sampling
    options = {}
    if sampling.ratios is not None:
        options["ratios"] = sampling.ratios
    elif sampling.temperature is not None:
        options.update(dataset_sizes=dataset_sizes, temperature=sampling.temperature)
    return TaskSchedule(list(cfg.tasks), sampling.strategy, **options).step_probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument(
        "--data", type=Path, default=None, help="synthetic data root (imagenet/, coco/, ade20k/)"
    )
    parser.add_argument(
        "--size", default="tiny", choices=["tiny", "small"], help="synthetic size without --data"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed batches; default: enough to fill the shuffle buffers",
    )
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=None, help="measured demo step time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)

    with tempfile.TemporaryDirectory(prefix="moevit-data-bench-") as scratch:
        data_root = args.data
        if data_root is None:
            data_root = Path(scratch) / "synth"
            write_synthetic_datasets(data_root, seed=0, size=args.size)
        rows, dataset_sizes = [], {}
        for name, task in cfg.tasks.items():
            task = dataclasses.replace(
                task, data=dataclasses.replace(task.data, root=str(data_root / task.data.format))
            )
            shard_dir = Path(scratch) / "shards" / name
            summary = write_shards(
                task.data.format, task.data.root, task.data.train_split, shard_dir, SHARD_SIZE
            )
            dataset_sizes[name] = summary["num_samples"]
            warmup = args.warmup
            if warmup is None:
                warmup = 2 + -(-DEFAULT_SHUFFLE_BUFFER * max(args.workers, 1) // task.data.batch_size)
            runs = {"folder": [], "shards": []}
            for _ in range(args.repeats):
                folder = folder_loader(task, args.workers, cfg.seed)
                runs["folder"].append(time_batches(folder, warmup, args.batches))
                shards = shard_loader(task, shard_dir, args.workers, cfg.seed, warmup + args.batches)
                runs["shards"].append(time_batches(shards, warmup, args.batches))
            for pipeline, rates in runs.items():
                rows.append(
                    {
                        "task": name,
                        "pipeline": pipeline,
                        "image_size": task.data.image_size,
                        "batch_size": task.data.batch_size,
                        "warmup_batches": warmup,
                        "images_per_s": statistics.median(rates),
                        "min": min(rates),
                        "max": max(rates),
                    }
                )

    per_worker = max(args.workers, 1)
    probabilities = step_probabilities(cfg, dataset_sizes)
    print(
        f"train pipelines, {args.workers} DataLoader worker(s), {args.batches} timed batches after "
        f"warm-up, median of {args.repeats}; data: {args.data or f'synthetic {args.size}'}"
    )
    header = f"{'task':<10} {'pipeline':<8} {'size':>4} {'batch':>5} {'img/s':>8} {'img/s/worker':>12}"
    if args.step_seconds:
        header += f" {'demo needs':>10} {'ratio':>6}"
    print(header)
    for row in rows:
        row["images_per_s_per_worker"] = row["images_per_s"] / per_worker
        line = (
            f"{row['task']:<10} {row['pipeline']:<8} {row['image_size']:>4} {row['batch_size']:>5} "
            f"{row['images_per_s']:8.1f} {row['images_per_s_per_worker']:12.1f}"
        )
        if args.step_seconds:
            needed = probabilities[row["task"]] * row["batch_size"] / args.step_seconds
            row["demo_images_per_s"], row["ratio"] = needed, row["images_per_s"] / needed
            line += f" {needed:10.1f} {row['ratio']:5.1f}x"
        print(line)
    if args.step_seconds:
        print(
            f"demo consumption: schedule {cfg.train.sampling.strategy!r}, step {args.step_seconds} s; "
            "ratio > 1 means the loader keeps up"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
