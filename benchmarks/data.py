"""Images per second and resident memory per DataLoader worker of the training data pipelines, per task.

For every task of the config (default configs/demo.yaml: its image and batch sizes), the task's train
split is read the way a run reads it (``MultiTaskLoader`` with this one task: the task's sampler,
per-sample seeded train transforms, corrupt-sample skipping, the task's collate function), with
--workers DataLoader workers, from two sources:

- folder: the dataset in its own layout (``data.storage: folder``);
- shards: the same split written by ``moevit data shard`` (``data.storage: shards``), read by sample
  index from the tar files (``moevit.data.shards.indexed``) in the shard-block order.

Warm-up batches (worker start, file cache) are not timed; the next --batches are, so the figures are
steady-state rates. Runs of the two sources alternate --repeats times; the median rate is reported,
with the workers' resident set size (RSS, mean over the workers, read with psutil after the timed
batches; the main process's with --workers 0). Given a measured demo step time (--step-seconds), it
also prints what the demo consumes per task and each pipeline's rate over it. Not a test: figures are
measured, not asserted. Without --data, synthetic data (--size) is written to a temporary directory.

    python benchmarks/data.py --workers 1 [--data DIR] [--size tiny|small|real] [--step-seconds S] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from moevit.config import load_config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.data.multitask import MultiTaskLoader
from moevit.data.schedule import TaskSchedule
from moevit.data.shards import write_shards
from moevit.data.synth import write_synthetic_datasets

SHARD_SIZE = 64  # several shards per split even on --size small data


def worker_memory_mib() -> tuple[float, float]:
    """Mean (RSS, USS) of this process's DataLoader workers (its children), else its own, in MiB.

    RSS counts the pages a forked worker shares with the main process (torch, the interpreter); USS
    only the ones it alone holds, what each added worker costs."""
    processes = psutil.Process().children() or [psutil.Process()]
    infos = [process.memory_full_info() for process in processes]
    return (
        statistics.mean(info.rss for info in infos) / 2**20,
        statistics.mean(info.uss for info in infos) / 2**20,
    )


def time_batches(loader: MultiTaskLoader, warmup: int, batches: int) -> tuple[float, tuple[float, float]]:
    """(images per second over ``batches`` batches after ``warmup`` untimed ones, worker (RSS, USS) MiB)."""
    for _ in range(warmup):
        next(loader)
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        images += next(loader).batches[0].batch["images"].shape[0]
    elapsed = time.perf_counter() - started
    memory = worker_memory_mib()
    loader.close()  # stops the workers before the next run starts its own
    return images / elapsed, memory


def task_loader(name: str, task, workers: int, seed: int) -> MultiTaskLoader:
    """The task's training stream as a run reads it, alone."""
    return MultiTaskLoader(
        {name: build_dataset(task.type, task.data, train=True)},
        {name: task.data.batch_size},
        {name: collate_for_task(task.type)},
        TaskSchedule((name,), "all", seed=seed),
        seed=seed,
        num_workers=workers,
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
        "--size", default="tiny", choices=["tiny", "small", "real"], help="synthetic size without --data"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per run")
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
            folder_data = dataclasses.replace(task.data, root=str(data_root / task.data.format))
            shard_root = Path(scratch) / "shards" / name
            split = task.data.train_split
            summary = write_shards(task.data.format, folder_data.root, split, shard_root / split, SHARD_SIZE)
            dataset_sizes[name] = summary["num_samples"]
            sources = {
                "folder": dataclasses.replace(task, data=folder_data),
                "shards": dataclasses.replace(
                    task, data=dataclasses.replace(task.data, root=str(shard_root), storage="shards")
                ),
            }
            runs = {source: [] for source in sources}
            for _ in range(args.repeats):
                for source, source_task in sources.items():
                    loader = task_loader(name, source_task, args.workers, cfg.seed)
                    runs[source].append(time_batches(loader, args.warmup, args.batches))
            for pipeline, measured in runs.items():
                rates = [rate for rate, _ in measured]
                rows.append(
                    {
                        "task": name,
                        "pipeline": pipeline,
                        "image_size": task.data.image_size,
                        "batch_size": task.data.batch_size,
                        "warmup_batches": args.warmup,
                        "images_per_s": statistics.median(rates),
                        "min": min(rates),
                        "max": max(rates),
                        "rss_mib_per_worker": statistics.median(memory[0] for _, memory in measured),
                        "uss_mib_per_worker": statistics.median(memory[1] for _, memory in measured),
                    }
                )

    per_worker = max(args.workers, 1)
    probabilities = step_probabilities(cfg, dataset_sizes)
    load = ", ".join(f"{value:.2f}" for value in psutil.getloadavg())
    print(
        f"train pipelines, {args.workers} DataLoader worker(s), {args.batches} timed batches after "
        f"{args.warmup} warm-up, median of {args.repeats}; data: {args.data or f'synthetic {args.size}'}; "
        f"load average {load}"
    )
    header = (
        f"{'task':<10} {'pipeline':<8} {'size':>4} {'batch':>5} {'img/s':>8} {'img/s/worker':>12} "
        f"{'RSS/worker MiB':>14} {'USS/worker MiB':>14}"
    )
    if args.step_seconds:
        header += f" {'demo needs':>10} {'ratio':>6}"
    print(header)
    for row in rows:
        row["images_per_s_per_worker"] = row["images_per_s"] / per_worker
        line = (
            f"{row['task']:<10} {row['pipeline']:<8} {row['image_size']:>4} {row['batch_size']:>5} "
            f"{row['images_per_s']:8.1f} {row['images_per_s_per_worker']:12.1f} {row['rss_mib_per_worker']:14.0f} "
            f"{row['uss_mib_per_worker']:14.0f}"
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
            record = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "rows": rows}
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
