"""The GPU check: one short run that measures moevit on a CUDA device and says what it could not.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json        # on a GPU machine, <= 4 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke --out smoke.json  # CI: the same code, tiny, on CPU

Runs from the source tree without installing moevit, on torch >= 2.11, and needs only torch, timm,
torchvision and moevit's pure-Python dependencies: DeepSpeed, pycocotools, webdataset and fvcore are
used only where installed (the GPU machines this is meant for have none of them). Parts, in order:

- environment: torch, device, which optional packages exist, and that importing what this script uses
  imported none of them;
- train_step_bf16: a full three-task training step (moevit.train.step.MultiTaskStep: ImageNet, COCO and
  ADE20K batches through backbone and heads, the auxiliary MoE losses, one backward, clipping, AdamW)
  of configs/paper/moevit_s16_hetero.yaml's ViT-S/16 MoE (16 experts, MoE in every block) at top-2
  with experts of width 4D/2 (equal active FLOPs to the dense MLP), at 224 px, under bf16 autocast,
  against the dense ViT-S/16 of the same config (`model.moe.layers=none`); each of moevit's expert
  paths (`model.moe.expert_impl` loop / grouped) that the layer accepts, and where DeepSpeed is
  installed the first of them in the expert-parallel wrapper at ep_size 1 (what `moevit train` runs,
  "-ep1"). Per contender: median step
  time, its ratio to dense, MFU (moevit.train.mfu, the training monitor's function, against the
  device's dense bf16 peak) and peak memory (torch.cuda.max_memory_allocated, weights to activations);
- fp16_loss_scaling: a few fp16 steps of the same model with torch.amp.GradScaler's loss scaling (the
  scale, the losses, the skipped steps), and where DeepSpeed is installed the DeepSpeed engine's own
  fp16 path (its dynamic loss scaler, moevit.parallel.precision) on the parity check's small model;
- tf32: an fp32 matmul with TF32 off and on (moevit.parallel.precision.enable_tf32), time and error;
- pinned_non_blocking: a training batch in pinned memory copied with moevit's move_batch
  (non_blocking on CUDA), how long the host waited against the whole copy, and that the copy is exact;
- moe_layer: benchmarks/moe_layer.py on the device in bf16, once per expert path: moevit's layer vs a
  dense MLP of equal active FLOPs vs DeepSpeed's stock MoE layer (skipped where DeepSpeed is missing);
- nccl_parity: with 2+ GPUs and DeepSpeed, EP=2 over NCCL against EP=1 for 10 steps, as
  tests/distributed/test_engine_parity.py checks over gloo; with one GPU it says so and measures nothing
  (the CPU smoke runs the same code over gloo).

Every part is guarded: an exception is recorded (type, message, traceback tail) and the next part runs.
The JSON is rewritten after every part, so a run cut off by a time limit still reports what finished.
Each part's "status" is "ok", "failed: <why>" (it ran and a check did not hold), "error" (it raised),
"skipped: <why>" or "pending" (not reached).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

# Passive OpenMP waiting: see benchmarks/moe_layer.py (the CPU smoke shares CI's cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from step_helpers import LocalEngine, active_gflops, equal_flops_overrides, training_batch  # noqa: E402

from moevit.config import load_config  # noqa: E402
from moevit.data.collate import copies_asynchronously, move_batch  # noqa: E402
from moevit.data.multitask import StepPlan, TaskBatch  # noqa: E402
from moevit.factory import build_model  # noqa: E402
from moevit.layers.experts import grouped_mm_refusal  # noqa: E402
from moevit.layers.moe_mlp import MoEMlp  # noqa: E402
from moevit.parallel.precision import enable_tf32  # noqa: E402
from moevit.train.mfu import (  # noqa: E402
    device_peak_tflops,
    forward_gflops_per_image,
    model_flops_utilization,
    precision_name,
    tf32_matmuls_enabled,
    training_flops,
)
from moevit.train.step import MultiTaskStep  # noqa: E402

OPTIONAL_PACKAGES = ("deepspeed", "pycocotools", "webdataset", "fvcore")
EXPERT_IMPLS = ("loop", "grouped")
PARTS = (
    "environment",
    "train_step_bf16",
    "fp16_loss_scaling",
    "tf32",
    "pinned_non_blocking",
    "moe_layer",
    "nccl_parity",
)
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "paper" / "moevit_s16_hetero.yaml"
# EP=2 against EP=1 (fp32, TF32 off): tests/distributed/test_engine_parity.py's tolerance
PARITY_TOLERANCE = 1e-5
TASKS = ("imagenet", "coco", "ade20k")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a mode runs: the GPU check at full size, or the CPU smoke at a tiny one."""

    device: str
    dtype: torch.dtype  # of the train step's autocast
    image_size: int
    batch_size: int  # per task
    warmup: int
    steps: int
    fp16_steps: int
    model_overrides: tuple[str, ...]
    matmul_size: int
    moe_layer_argv: tuple[str, ...]
    parity_steps: int


GPU = Settings(
    device="cuda",
    dtype=torch.bfloat16,
    image_size=224,
    batch_size=64,
    warmup=3,
    steps=10,
    fp16_steps=6,
    model_overrides=(),  # the paper config's ViT-S/16: D 384, 12 blocks, 16 experts, heads 256 / 512 wide
    matmul_size=8192,
    # ViT-S/16's MLP widths at equal active FLOPs (expert hidden 4D/k = 768 at top-2), 64 images of 197 tokens
    moe_layer_argv=("--tokens", "12608", "--dim", "384", "--expert-hidden", "768", "--no-vit-b")
    + ("--configs", "8:1,16:2,32:4", "--repeats", "20", "--warmup", "3"),
    parity_steps=10,
)
CPU_SMOKE = Settings(
    device="cpu",
    dtype=torch.float32,  # CPUs without bf16 units emulate it, far too slowly for a smoke test
    image_size=64,
    batch_size=2,
    warmup=1,
    steps=2,
    fp16_steps=2,
    # the paper rehearsal's shrinking (tests/e2e/test_paper_rehearsal.py), smaller still
    model_overrides=(
        "model.embed_dim=64",
        "model.depth=4",
        "model.num_heads=2",
        "model.window_size=4",
        "model.global_blocks=[1, 3]",
        "model.drop_path_rate=0.0",
        "model.moe.num_experts=4",
        "tasks.coco.head_options.out_channels=32",
        "tasks.coco.head_options.extra_levels=0",  # P3-P5: the 64 px image has no stride-64/128 level
        "tasks.ade20k.head_options.channels=32",
    ),
    matmul_size=64,
    moe_layer_argv=("--tokens", "64", "--dim", "16", "--expert-hidden", "32", "--no-vit-b")
    + ("--configs", "4:2", "--repeats", "2", "--warmup", "1", "--threads", "1"),
    parity_steps=2,
)


# ----------------------------------------------------------------------------------------- report
class Report:
    """The JSON, rewritten (atomically) after every part."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        self.data = {
            "script": "benchmarks/gpu_check.py",
            "mode": mode,
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": False,
            "parts": {name: {"status": "pending"} for name in PARTS},
        }
        self.write()

    def run(self, name: str, part: Callable[[], dict]) -> None:
        started = time.perf_counter()
        try:
            entry = {"status": "ok", **part()}
        except Exception as err:  # noqa: BLE001 - one part's failure must not stop the others
            entry = {
                "status": "error",
                "error": {
                    "type": type(err).__name__,
                    "message": str(err)[:2000],
                    "traceback": traceback.format_exc(limit=8)[-4000:],
                },
            }
        entry["seconds"] = round(time.perf_counter() - started, 3)
        self.data["parts"][name] = entry
        self.write()
        print(
            f"[gpu_check] {name}: {entry['status']} ({entry['seconds']:.1f} s)", file=sys.stderr, flush=True
        )

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(self.path.name + ".tmp")
        scratch.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(scratch, self.path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def installed(package: str) -> bool:
    return (
        importlib.util.find_spec(package) is not None
        if package not in sys.modules
        else bool(sys.modules[package])
    )


def grouped_gemm_support(settings: Settings) -> str:
    """Whether moevit's grouped expert path takes ViT-S/16's expert matmuls on this device in the check's
    dtype: "runs", or why it falls back to the loop (`moevit.layers.experts.grouped_mm_refusal`)."""
    device = torch.device(settings.device)
    x_SD = torch.zeros(16, 384, device=device, dtype=settings.dtype)
    weight_EHD = torch.zeros(2, 768, 384, device=device, dtype=settings.dtype)
    return grouped_mm_refusal(x_SD, settings.dtype, weight_EHD) or "runs"


# -------------------------------------------------------------------------------------- the parts
def environment(settings: Settings) -> dict:
    cuda = torch.cuda.is_available()
    # Nothing above imported them: a GPU machine without them must be able to run this script.
    imported = sorted(name for name in OPTIONAL_PACKAGES if sys.modules.get(name) is not None)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "optional_packages": {name: installed(name) for name in OPTIONAL_PACKAGES},
        "optional_packages_imported_by_this_script": imported,
    }
    if settings.device == "cuda" and not cuda:
        return {"status": "failed: no CUDA device (use --cpu-smoke on a machine without one)", **info}
    info["grouped_gemm"] = grouped_gemm_support(settings)
    if imported:
        return {"status": f"failed: importing moevit's modules imported {imported}", **info}
    return info


def base_overrides(settings: Settings) -> list[str]:
    sizes = [f"tasks.{task}.data.image_size={settings.image_size}" for task in TASKS]
    batches = [f"tasks.{task}.data.batch_size={settings.batch_size}" for task in TASKS]
    # ADE20K's slide inference (eval only) keeps the config's 2/3 overlap; its stride must fit the crop
    stride = f"tasks.ade20k.data.transforms.slide_stride={settings.image_size * 2 // 3}"
    return ["model.moe.top_k=2", "parallel.ep_size=1", "train.num_workers=0", *sizes, *batches, stride]


def check_config(settings: Settings, extra: tuple[str, ...] = ()):
    return load_config(str(CONFIG), [*base_overrides(settings), *settings.model_overrides, *extra])


def model_configs(settings: Settings) -> dict[str, object]:
    """{contender: config}: the MoE model once per expert path (`model.moe.expert_impl`), and dense."""
    overrides = [*base_overrides(settings), *settings.model_overrides]
    moe_overrides = overrides + equal_flops_overrides(check_config(settings))
    configs = {
        f"moe-{impl}": load_config(str(CONFIG), [*moe_overrides, f"model.moe.expert_impl={impl}"])
        for impl in EXPERT_IMPLS
    }
    configs["dense"] = load_config(str(CONFIG), [*overrides, "model.moe.layers=none"])
    return configs


def pinned(batch):
    """The batch with its tensors in page-locked memory (what the training loader's pin_memory gives)."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {key: pinned(value) for key, value in batch.items()}
    if isinstance(batch, list):
        return [pinned(value) for value in batch]
    return batch


@functools.cache
def step_plan(settings: Settings) -> StepPlan:
    """One batch per task through the tasks' real training transforms (on the host, pinned for CUDA);
    made once, for every part."""
    cfg, device = check_config(settings), torch.device(settings.device)
    batches = []
    for name, task in cfg.tasks.items():
        batch = training_batch(task.type, task.data, task.image_size, task.num_classes, task.data.batch_size)
        batches.append(TaskBatch(name, pinned(batch) if device.type == "cuda" else batch))
    return StepPlan(0, tuple(batches))


def build_step(cfg, device: torch.device, dtype: torch.dtype, scaler=None, model=None) -> MultiTaskStep:
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
    engine = LocalEngine(model.to(device).train(), cfg.train.optim, dtype=dtype, scaler=scaler)
    prior = dict.fromkeys(cfg.tasks, 1.0 / len(cfg.tasks))
    return MultiTaskStep(engine, list(cfg.tasks), cfg.aux_loss, prior, 1, device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_contender(
    cfg, plan: StepPlan, settings: Settings, peak_tflops: float | None, expert_parallel: bool = False
) -> dict:
    """Median step time, MFU and peak memory of `cfg`'s model; `expert_parallel`: in the expert-parallel
    wrapper at ep_size 1 (DeepSpeed's MoE layers, what `moevit train` runs), as in train_step.py."""
    device, dtype = torch.device(settings.device), settings.dtype
    reset_memory(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    images = {task: batch["images"].shape[0] for task, batch in plan}
    # counted on the plain model: the analytic count reads moevit's expert layers, not the wrapper's
    flops = training_flops(
        images, forward_gflops_per_image(model, {t: cfg.tasks[t].image_size for t in images})
    )
    backbone_gflops = active_gflops(model, cfg)
    impls = sorted({m.experts.expert_impl for m in model.modules() if isinstance(m, MoEMlp)})
    if expert_parallel:
        from moevit.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model.backbone, 1)
    step = build_step(cfg, device, dtype, model=model)
    weights = dict.fromkeys(cfg.tasks, 1.0)
    times, losses = [], []
    for index in range(settings.warmup + settings.steps):
        synchronize(device)
        started = time.perf_counter()
        result = step(plan, weights)
        synchronize(device)
        if index >= settings.warmup:
            times.append(time.perf_counter() - started)
        losses.append(result.total)
    median = statistics.median(times)
    row = {
        "expert_impl_built": impls or None,
        "param_groups": step.engine.param_groups_kind,
        "backbone_forward_gflops_per_step": backbone_gflops,
        "train_tflop_per_step": flops / 1e12,
        "step_s": times,
        "median_step_s": median,
        "achieved_tflops": flops / median / 1e12,
        "mfu": model_flops_utilization(flops, median, 1, peak_tflops) if peak_tflops else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "losses": losses,
    }
    del model, step
    reset_memory(device)
    if not all(math.isfinite(loss) for loss in losses):
        row["status"] = "failed: non-finite loss"
    return row


def train_step_bf16(settings: Settings) -> dict:
    device = torch.device(settings.device)
    tf32 = enable_tf32(device.type == "cuda")  # as moevit.parallel.setup does for training
    configs = model_configs(settings)
    plan = step_plan(settings)
    precision = precision_name(settings.dtype, tf32_matmuls_enabled())
    if device.type == "cuda":
        found = device_peak_tflops(torch.cuda.get_device_name(device), precision)
        peak, peak_note = (
            (found[1], f"{found[0]} dense {precision}") if found else (None, "device not listed")
        )
    else:
        peak, peak_note = None, "no peak FLOP/s for a CPU: MFU not computed"
    runs = [(name, cfg, False) for name, cfg in configs.items()]
    if installed("deepspeed"):  # the wrapper is DeepSpeed's MoE layer
        first, cfg = next(iter(configs.items()))
        runs.insert(1, (f"{first}-ep1", cfg, True))
    contenders = {}
    for name, cfg, expert_parallel in runs:  # each guarded: one path failing leaves the others' figures
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                contenders[name] = measure_contender(cfg, plan, settings, peak, expert_parallel)
            except Exception as err:  # noqa: BLE001
                contenders[name] = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
        # the grouped path's refusals (it then runs the loop: moevit.layers.experts), so its figure is read right
        fallbacks = sorted({str(w.message) for w in caught if "falling back" in str(w.message)})
        if fallbacks:
            contenders[name]["grouped_fallbacks"] = fallbacks
    dense = contenders["dense"].get("median_step_s")
    for row in contenders.values():
        if dense and "median_step_s" in row:
            row["ratio_to_dense"] = row["median_step_s"] / dense
    failed = [name for name, row in contenders.items() if "status" in row]
    cfg = configs["dense"]
    return {
        **({"status": f"failed: {', '.join(failed)}"} if failed else {}),
        "config": str(CONFIG.relative_to(CONFIG.parents[2])),
        "overrides": [*base_overrides(settings), *settings.model_overrides],
        "image_size": settings.image_size,
        "batch_per_task": settings.batch_size,
        "head_widths": {t: cfg.tasks[t].head_options for t in TASKS if cfg.tasks[t].head_options},
        "dtype": f"{precision} autocast" if settings.dtype != torch.float32 else precision,
        "tf32": tf32,
        "peak_tflops": peak,
        "peak": peak_note,
        "warmup_steps": settings.warmup,
        "timed_steps": settings.steps,
        "contenders": contenders,
    }


def fp16_loss_scaling(settings: Settings) -> dict:
    device = torch.device(settings.device)
    configs = model_configs(settings)
    name, cfg = next(iter(configs.items()))  # the first MoE contender
    plan = step_plan(settings)
    scaler = torch.amp.GradScaler(device.type)
    step = build_step(cfg, device, torch.float16, scaler)
    weights = dict.fromkeys(cfg.tasks, 1.0)
    history = []
    for _ in range(settings.fp16_steps):
        before = scaler.get_scale()
        loss = step(plan, weights).total
        # GradScaler lowers the scale exactly when a step's gradients overflowed and it skipped the update
        history.append({"loss": loss, "scale": before, "skipped": scaler.get_scale() < before})
    updated = sum(not entry["skipped"] for entry in history)
    finite = all(math.isfinite(entry["loss"]) for entry in history)
    failures = [] if finite and updated else [f"GradScaler: finite losses {finite}, updates {updated}"]
    engine = deepspeed_loss_scaling(settings)
    if isinstance(engine, dict) and not engine["updates"]:
        failures.append("DeepSpeed's engine made no update")
    return {
        **({"status": f"failed: {'; '.join(failures)}"} if failures else {}),
        "contender": name,
        "loss_scaler": "torch.amp.GradScaler on the train step's MoE model (LocalEngine, not DeepSpeed's)",
        "steps": history,
        "updates": updated,
        "final_scale": scaler.get_scale(),
        "deepspeed_engine": engine,
    }


def deepspeed_loss_scaling(settings: Settings) -> dict | str:
    """The DeepSpeed engine's own fp16 path (its dynamic loss scaler) on the parity check's small model,
    one rank in a subprocess; where DeepSpeed is missing, why not. The CPU smoke runs that code in fp32
    (DeepSpeed's fp16 needs CUDA): no scaler, the code path only."""
    if not installed("deepspeed"):
        return "skipped: deepspeed not installed"
    cuda = settings.device == "cuda"
    result = run_ranks(
        "deepspeed_fp16", settings.fp16_steps, "nccl" if cuda else "gloo", "fp16" if cuda else "fp32", 1
    )[0]
    result["updates"] = sum(not entry["skipped"] for entry in result["steps"])
    if not cuda:
        result["note"] = "CPU smoke: fp32 over gloo, no loss scaler; the code path only"
    return result


def tf32(settings: Settings) -> dict:
    device = torch.device(settings.device)
    if device.type != "cuda":
        return {
            "status": "skipped: TF32 is a CUDA setting",
            "enable_tf32_on_cpu": enable_tf32(False),  # must be False: CPU numbers stay exact fp32
        }
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    n = settings.matmul_size
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator)
    b = torch.randn(n, n, device=device, generator=generator)
    reference = (a.double() @ b.double()).float()

    def timed() -> tuple[float, float]:
        _ = a @ b  # warm-up (cuBLAS picks its kernel)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(5):
            out = a @ b
        synchronize(device)
        seconds = (time.perf_counter() - started) / 5
        error = ((out - reference).norm() / reference.norm()).item()
        return seconds, error

    try:
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        ieee_s, ieee_error = timed()
        switched = enable_tf32(True)
        on = tf32_matmuls_enabled()
        tf32_s, tf32_error = timed()
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
    ok = switched and on and tf32_s < ieee_s and tf32_error < 1e-2
    return {
        **({} if ok else {"status": "failed: TF32 not on, not faster or too inexact"}),
        "matmul": f"{n}x{n} @ {n}x{n} fp32",
        "ieee": {"seconds": ieee_s, "tflops": 2 * n**3 / ieee_s / 1e12, "relative_error": ieee_error},
        "tf32": {"seconds": tf32_s, "tflops": 2 * n**3 / tf32_s / 1e12, "relative_error": tf32_error},
        "tf32_reported_on": on,
        "speedup": ieee_s / tf32_s,
    }


def pinned_non_blocking(settings: Settings) -> dict:
    device = torch.device(settings.device)
    batch = dict(step_plan(settings).batches[0].batch)  # ImageNet's
    if device.type != "cuda":
        moved = move_batch(batch, device)  # the CPU path: a blocking copy (nothing to pin)
        return {
            "status": "skipped: pinned memory and non_blocking copies need CUDA",
            "copies_asynchronously": copies_asynchronously(device),
            "cpu_move_exact": all(
                torch.equal(moved[k], batch[k]) for k in batch if torch.is_tensor(batch[k])
            ),
        }
    source, batch = batch, {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}  # pageable
    size = sum(v.numel() * v.element_size() for v in source.values() if torch.is_tensor(v))
    move_batch(source, device)  # warm-up: the first copy sets up the stream and staging
    synchronize(device)
    started = time.perf_counter()
    moved = move_batch(source, device)
    host_s = time.perf_counter() - started
    synchronize(device)
    total_s = time.perf_counter() - started
    exact = all(torch.equal(moved[k].cpu(), batch[k]) for k in batch if torch.is_tensor(batch[k]))
    pageable_started = time.perf_counter()
    _ = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    synchronize(device)
    pageable_s = time.perf_counter() - pageable_started
    ok = (
        exact
        and copies_asynchronously(device)
        and all(v.is_pinned() for v in source.values() if torch.is_tensor(v))
    )
    return {
        **({} if ok else {"status": "failed: copy not exact or not asynchronous from pinned memory"}),
        "bytes": size,
        "copies_asynchronously": copies_asynchronously(device),
        "host_wait_s": host_s,
        "copy_done_s": total_s,
        "pinned_gb_per_s": size / total_s / 1e9,
        "pageable_blocking_s": pageable_s,
        "exact": exact,
    }


def moe_layer(settings: Settings) -> dict:
    import moe_layer as benchmark  # benchmarks/moe_layer.py, beside this script: both expert paths

    dtype = "bf16" if settings.device == "cuda" else "fp32"
    argv = [*settings.moe_layer_argv, "--device", settings.device, "--dtype", dtype]
    if "--threads" not in argv:
        argv += ["--threads", str(torch.get_num_threads())]
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-moe-layer-") as scratch,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        out = Path(scratch) / "moe_layer.json"
        benchmark.main([*argv, "--json", str(out)])
        result = json.loads(out.read_text())
    # A grouped call the device refuses runs the loop and warns (moevit.layers.experts): said here, so a
    # "grouped" figure that is really the loop's cannot pass for a measurement of the grouped GEMM.
    fallbacks = sorted({str(w.message) for w in caught if "falling back" in str(w.message)})
    return {
        "argv": argv,
        "dtype": dtype,
        "deepspeed": result["deepspeed"],
        "grouped_fallbacks": fallbacks,
        "rows": result["rows"],
    }


def parity_worker(steps: int, backend: str, precision: str) -> dict:
    """One rank of the EP=1 / EP=2 parity run (tests/distributed/test_engine_parity.py's check, with its
    model, config, data and objective): 10 steps at ZeRO 0 in fp32, TF32 off (the check compares
    algorithms, not TF32's rounding); rank 0's losses and gathered weights per ep_size."""
    import dataclasses as dc

    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, train_engine

    from moevit.parallel.engine import build_engine
    from moevit.parallel.expert_parallel import gather_single_device_state_dict
    from moevit.parallel.setup import ensure_expert_groups, initialize_distributed, shutdown_distributed

    def config(ep_size: int):
        cfg = make_config(ep_size, 0, steps)
        cfg.parallel = dc.replace(cfg.parallel, precision=precision, backend=backend)
        return cfg

    env = initialize_distributed(config(1), timeout=GROUP_TIMEOUT)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    ensure_expert_groups(2)
    runs = {}
    for ep_size in (1, 2):
        engine = build_engine(make_model(), config(ep_size), env)
        losses = train_engine(engine, steps, env.rank, env.world_size)
        final = {k: v.cpu() for k, v in gather_single_device_state_dict(engine.module).items()}
        runs[ep_size] = {"losses": losses, "final": final}
    shutdown_distributed()
    return runs


def deepspeed_fp16_worker(steps: int, backend: str, precision: str) -> dict:
    """One rank training the parity check's two-task model with the DeepSpeed engine at `precision`
    (fp16: DeepSpeed's dynamic loss scaler, moevit.parallel.precision): per step the loss, the scale
    and whether the engine skipped the update on overflow."""
    import dataclasses as dc

    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from engine_fixtures import GROUP_TIMEOUT, make_config, make_model, step_loss

    from moevit.parallel.engine import build_engine
    from moevit.parallel.setup import initialize_distributed, shutdown_distributed

    cfg = make_config(1, 0, steps)
    cfg.parallel = dc.replace(cfg.parallel, precision=precision, backend=backend)
    env = initialize_distributed(cfg, timeout=GROUP_TIMEOUT)
    engine = build_engine(make_model(), cfg, env)
    history = []
    for step in range(steps):
        scale, skipped = getattr(engine.optimizer, "loss_scale", None), engine.skipped_steps
        loss = step_loss(engine, step, env.rank, env.world_size)
        engine.backward(loss)
        engine.step()
        history.append({"loss": loss.item(), "scale": scale, "skipped": engine.skipped_steps > skipped})
    final_scale = getattr(engine.optimizer, "loss_scale", None)
    shutdown_distributed()
    return {"precision": precision, "steps": history, "final_scale": final_scale}


RANK_JOBS = {"parity": parity_worker, "deepspeed_fp16": deepspeed_fp16_worker}


def run_ranks(
    job: str, steps: int, backend: str, precision: str, world_size: int = 2, timeout_s: float = 150
) -> list:
    """Runs RANK_JOBS[job] as `world_size` ranks (this script with --rank-result), torchrun's variables
    set; returns each rank's result, or raises with the failing rank's log tail."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gpu-check-parity-") as scratch:
        procs, logs, results = [], [], []
        for rank in range(world_size):
            env = {
                **os.environ,
                **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)},
                **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
            }
            results.append(Path(scratch) / f"rank{rank}.pt")
            logs.append(Path(scratch) / f"rank{rank}.log")
            command = [sys.executable, __file__, "--rank-result", str(results[-1]), "--rank-job", job]
            command += ["--rank-steps", str(steps), "--rank-backend", backend, "--rank-precision", precision]
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one rank failed: the other would wait on it until the group times out
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        failed = [rank for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            tail = logs[failed[0]].read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{job} rank(s) {failed} failed or timed out after {timeout_s:.0f} s:\n{tail}")
        return [torch.load(path, weights_only=False) for path in results]


def nccl_parity(settings: Settings) -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    smoke = settings.device == "cpu"
    if gpus < 2 and not smoke:
        return {"status": "skipped: one GPU; NCCL parity unmeasured", "gpus": gpus}
    if not installed("deepspeed"):
        return {"status": "skipped: deepspeed not installed; NCCL parity unmeasured", "gpus": gpus}
    # The CPU smoke runs the same code over gloo: it proves the script, not NCCL.
    backend = "gloo" if smoke else "nccl"
    # fp32 with TF32 off (parity_worker): the check compares algorithms, not bf16's or TF32's rounding
    rank0 = run_ranks("parity", settings.parity_steps, backend, "fp32")[0]
    ep1, ep2 = rank0[1], rank0[2]
    loss_difference = max(abs(a - b) for a, b in zip(ep1["losses"], ep2["losses"]))
    weight_difference, weight = max(
        ((ep1["final"][k].float() - ep2["final"][k].float()).abs().max().item(), k)
        for k in ep1["final"]
        if not k.endswith(".usage")  # routers' usage counters count each rank's own tokens
    )
    ok = loss_difference <= PARITY_TOLERANCE and weight_difference <= PARITY_TOLERANCE
    return {
        **({} if ok else {"status": f"failed: EP=2 differs from EP=1 by more than {PARITY_TOLERANCE:g}"}),
        "backend": backend + (" (CPU smoke: NCCL unmeasured)" if smoke else ""),
        "gpus": gpus,
        "steps": settings.parity_steps,
        "losses": {"ep1": ep1["losses"], "ep2": ep2["losses"]},
        "max_loss_difference": loss_difference,
        "max_weight_difference": weight_difference,
        "max_weight_difference_at": weight,
        "tolerance": PARITY_TOLERANCE,
    }


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model on the CPU: the code paths, no figures"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of the parts")
    # one rank of run_ranks: where its result goes, which job, and the job's arguments
    parser.add_argument("--rank-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank-job", choices=sorted(RANK_JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--rank-steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--rank-backend", default="nccl", help=argparse.SUPPRESS)
    parser.add_argument("--rank-precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_result:
        torch.set_num_threads(1)
        job = RANK_JOBS[args.rank_job]
        torch.save(job(args.rank_steps, args.rank_backend, args.rank_precision), args.rank_result)
        return {}
    settings = CPU_SMOKE if args.cpu_smoke else GPU
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared CI machine: more threads only wait on each other
    report = Report(args.out, "cpu-smoke" if args.cpu_smoke else "gpu")
    functions = {name: globals()[name] for name in PARTS}
    for name in args.parts.split(","):
        if name not in functions:
            raise SystemExit(f"--parts: unknown part {name!r}; choose from {', '.join(PARTS)}")
        report.run(name, lambda function=functions[name]: function(settings))
    report.data["finished"] = True
    report.write()
    print(json.dumps({name: part["status"] for name, part in report.data["parts"].items()}, indent=2))
    return report.data


if __name__ == "__main__":
    main()
