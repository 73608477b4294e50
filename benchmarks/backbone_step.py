"""Forward+backward time of moevit backbones against timm's dense ViT on the same input.

Alternating runs in one process, so machine noise hits every contender alike; prints medians,
spread and the ratio to the dense ViT. Not a test: speed targets are measured, not asserted.

    python benchmarks/backbone_step.py --threads 2 --batch 8 --repeats 10 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import moevit

TASKS = ["imagenet", "coco", "ade20k"]


def contenders() -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (model, takes_task)."""
    return {
        "timm vit_tiny_patch16_224 (dense)": (
            timm.create_model("vit_tiny_patch16_224", num_classes=0),
            False,
        ),
        # 8 full-width experts, top-2: MoE MLPs do twice the dense MLP's work (1.26x the ViT's FLOPs)
        "moevit_tiny (E8 k2, full-width experts)": (moevit.create_model("moevit_tiny", tasks=TASKS), True),
        # experts of width 4D/k: the same active FLOPs as the dense ViT, plus routing
        "moevit_tiny (E8 k2, equal active FLOPs)": (
            moevit.create_model("moevit_tiny", tasks=TASKS, expert_hidden=384),
            True,
        ),
    }


def step(model: torch.nn.Module, takes_task: bool, images: torch.Tensor) -> float:
    started = time.perf_counter()
    features = model.forward_features(images, "imagenet") if takes_task else model.forward_features(images)
    features.float().mean().backward()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = contenders()
    images = torch.randn(args.batch, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(args.warmup + args.repeats):
        for name, (model, takes_task) in models.items():
            elapsed = step(model.train(), takes_task, images)
            if round_ >= args.warmup:
                times[name].append(elapsed)
    reference = statistics.median(next(iter(times.values())))
    rows = []
    print(
        f"forward+backward, batch {args.batch}x3x224x224, {args.threads} threads, {args.repeats} alternating runs"
    )
    print(f"{'model':<42} {'median s':>9} {'min':>7} {'max':>7} {'vs dense':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "model": name,
                "median_s": median,
                "min_s": min(samples),
                "max_s": max(samples),
                "ratio_to_dense": median / reference,
            }
        )
        print(f"{name:<42} {median:9.3f} {min(samples):7.3f} {max(samples):7.3f} {median / reference:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
