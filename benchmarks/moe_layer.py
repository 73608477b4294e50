"""Forward+backward time of moevit's MoE MLP against a dense MLP and DeepSpeed's stock MoE layer.

For each configuration (E experts, top-k) four contenders run alternately in one process, so
machine noise hits them alike:

- (a) moevit's `MoEMlp`: dropless, task-routed (one task's gate), sorted expert matmuls, once per
  expert path (`model.moe.expert_impl`, moevit.layers.experts): "a loop" (one GEMM per expert) and
  "a grouped" (`torch._grouped_mm`), the same weights in both;
- (b) a dense timm `Mlp` with hidden width k x expert hidden: the same active FLOPs;
- (c) DeepSpeed's `deepspeed.moe.layer.MoE` with its defaults and capacity factor 1.25 (drops tokens
  over capacity; its experts compute capacity-padded buffers); left out, and said so, where DeepSpeed
  is not installed.

Gates get random weights (a zero-initialised gate sends every token to the same k experts), the
same ones in (a) and (c), so both route alike. One timed run is forward + backward of the layer on
a fixed (T, D) input that requires grad, with a fixed output gradient. Prints medians, spread and
the ratios a/b and a/c per expert path, both of medians and as the median of each round's own
ratio. Not a test: speed targets are measured, not asserted.

    python benchmarks/moe_layer.py --threads 2 --repeats 9 [--json OUT] [--profile E:K[:IMPL]]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass

# On a shared machine, OpenMP threads that spin while waiting (libgomp's default) burn the time
# slices their partner thread needs: a 2-thread parallel region then costs milliseconds, which
# punishes layers made of many mid-sized kernels far more than one big matmul. Passive waiting
# measures the layers, not the scheduler. Must be set before torch loads libgomp; export
# OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from timm.layers import Mlp  # noqa: E402

from moevit.layers import MoEMlp  # noqa: E402

TASK = "bench"
EXPERT_PATHS = ("loop", "grouped")


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    dim: int
    expert_hidden: int
    num_experts: int
    top_k: int


def parse_shapes(args: argparse.Namespace) -> list[Shape]:
    shapes = []
    for spec in args.configs.split(","):
        experts, top_k = (int(v) for v in spec.split(":"))
        shapes.append(
            Shape(f"E{experts}/k{top_k}", args.tokens, args.dim, args.expert_hidden, experts, top_k)
        )
    if args.vit_b:
        # ViT-B/16 widths (D 768, MLP 3072) with moevit_base's routing (E16, top-2)
        shapes.append(Shape("ViT-B E16/k2", args.tokens, 768, 3072, 16, 2))
    return shapes


def deepspeed_moe_class():
    """DeepSpeed's stock MoE layer, or None where DeepSpeed is not installed (the GPU check's machine)."""
    try:
        from deepspeed.moe.layer import MoE
    except ImportError:
        return None
    return MoE


def build_contenders(shape: Shape, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    moe = MoEMlp(shape.dim, shape.expert_hidden, shape.num_experts, shape.top_k, [TASK])
    gate_weight = torch.randn(shape.num_experts, shape.dim) * shape.dim**-0.5
    with torch.no_grad():
        moe.router.gates[TASK].weight.copy_(gate_weight)
    moes = {}
    for path in EXPERT_PATHS:
        moes[f"a {path}"] = copy.deepcopy(moe).train()
        moes[f"a {path}"].experts.expert_impl = path
    dense = Mlp(shape.dim, shape.top_k * shape.expert_hidden)
    contenders = {**moes, "b dense": dense.train()}
    MoE = deepspeed_moe_class()
    if MoE is None:
        return contenders
    deepspeed_moe = MoE(
        hidden_size=shape.dim,
        expert=Mlp(shape.dim, shape.expert_hidden),
        num_experts=shape.num_experts,
        k=shape.top_k,
        capacity_factor=1.25,
        eval_capacity_factor=1.25,
    )
    with torch.no_grad():
        deepspeed_moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight)
    return {**contenders, "c deepspeed": deepspeed_moe.train()}


def compute_dtype(name: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16}[name]


def run_once(
    name: str, module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None = None
) -> float:
    if x.is_cuda:  # time the layer's kernels, not only their launch
        torch.cuda.synchronize(x.device)
    started = time.perf_counter()
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
        if name.startswith("a"):
            y = module(x, TASK)[0]
        elif name.startswith("c"):
            y = module(x)[0]
        else:
            y = module(x)
    y.backward(grad.to(y.dtype))
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    elapsed = time.perf_counter() - started
    module.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed


def routing_imbalance(moe: MoEMlp, x: torch.Tensor) -> float:
    """Rows of the busiest expert over the mean: what a capacity factor has to absorb."""
    with torch.no_grad():
        counts = moe.router(x, TASK).counts_E.float()
    return float(counts.max() / counts.mean())


def measure(shape: Shape, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), compute_dtype(args.dtype)
    contenders = {name: module.to(device) for name, module in build_contenders(shape, args.seed).items()}
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(shape.tokens, shape.dim, generator=generator).to(device).requires_grad_(True)
    grad = torch.randn(shape.tokens, shape.dim, generator=generator).to(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.warmup + args.repeats):
        for name, module in contenders.items():
            elapsed = run_once(name, module, x, grad, dtype)
            if round_ >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    ratios = {}
    for path in EXPERT_PATHS:
        a = f"a {path}"
        for other, name in (("b", "b dense"), ("c", "c deepspeed"), ("loop", "a loop")):
            if name == a or name not in times:
                continue
            ratios[f"{path}_over_{other}"] = medians[a] / medians[name]
            # Ratios within each round (runs seconds apart) follow the machine's load less than medians do.
            ratios[f"{path}_over_{other}_paired"] = statistics.median(
                t / o for t, o in zip(times[a], times[name])
            )
    return {
        "config": shape.name,
        **{k: v for k, v in vars(shape).items() if k != "name"},
        "imbalance": routing_imbalance(contenders["a loop"], x),
        "times_s": times,
        "median_s": medians,
        **ratios,
    }


def profile(shape: Shape, path: str, args: argparse.Namespace) -> None:
    """torch.profiler's top operators for moevit's layer alone (after warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    contenders = build_contenders(shape, args.seed)
    moe = contenders[f"a {path}"]
    x = torch.randn(shape.tokens, shape.dim).requires_grad_(True)
    grad = torch.randn(shape.tokens, shape.dim)
    for _ in range(2):
        run_once("a", moe, x, grad)
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.repeats):
            run_once("a", moe, x, grad)
    print(f"profile of moevit {shape.name}, expert path {path}, {args.repeats} runs")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=3152, help="T: 16 images x 197 tokens")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--expert-hidden", type=int, default=1536)
    parser.add_argument("--configs", default="8:1,16:2,32:4", help="E:k,...")
    parser.add_argument("--vit-b", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", default=None, metavar="E:K[:PATH]", help="profile moevit at E:k (path loop) and exit"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: under autocast")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-layer creation banner

    if args.profile:
        experts, top_k, *path = args.profile.split(":")
        experts, top_k = int(experts), int(top_k)
        shape = Shape(f"E{experts}/k{top_k}", args.tokens, args.dim, args.expert_hidden, experts, top_k)
        profile(shape, path[0] if path else "loop", args)
        return {}

    load_before = os.getloadavg()
    rows = [measure(shape, args) for shape in parse_shapes(args)]
    load_after = os.getloadavg()
    print(
        f"forward+backward, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{args.repeats} alternating runs (after {args.warmup} warm-up); "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    names = [f"a {path}" for path in EXPERT_PATHS] + ["b dense", "c deepspeed"]
    names = [name for name in names if name in rows[0]["times_s"]] if rows else names
    print(
        f"{'config':<13} {'T x D':>10} {'H':>5} {'imbal':>5} "
        + " ".join(f"{name + ' s':>19}" for name in names)
        + " ratios (median; paired)"
    )
    for row in rows:
        cells = []
        for name in names:
            samples = row["times_s"][name]
            cells.append(f"{row['median_s'][name]:.3f} ({min(samples):.3f}-{max(samples):.3f})")
        ratios = " ".join(
            f"{key.replace('_over_', '/')} {row[key]:.2f} ({row[key + '_paired']:.2f})"
            for key in row
            if "_over_" in key and not key.endswith("_paired")
        )
        print(
            f"{row['config']:<13} {row['tokens']:>5}x{row['dim']:<4} {row['expert_hidden']:>5} "
            f"{row['imbalance']:5.2f} " + " ".join(f"{cell:>19}" for cell in cells) + f" {ratios}"
        )
    result = {
        "args": vars(args),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "deepspeed": "measured" if deepspeed_moe_class() else "skipped: deepspeed not installed",
        "load_average_before_after": [load_before[0], load_after[0]],
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
