"""One training step per task of a full-size config on CPU: measured memory and GFLOPs next to `moevit plan`.

    nice python benchmarks/paper_config_step.py CONFIG [dotted.key=value ...] [--tasks a,b] [--json OUT]

Each task runs in a fresh subprocess (so one task's allocations cannot hide another's): the config's
model is built at full size, one training sample at the task's true resolution goes through the
task's real training transforms and collate (batch 1); after a no-grad warm-up forward (thread pools
and kernel caches are set up outside the measurement), one forward and one backward run in fp32
(what `parallel.precision: auto` gives on CPU). Reported per task:

- measured memory, from the process's resident set (/proc/self/statm, sampled every millisecond by a
  thread while the step runs; glibc's mmap threshold is pinned at 64 KiB in the subprocess so freed
  tensors go back to the OS and the resident set follows the live tensors): the growth over the
  resident set just before the forward, at the end of the forward (what the backward starts from:
  the activations) and at the peak of forward + backward (activations, their gradients and the
  parameters' gradients);
- the bytes of the tensors autograd saved for the backward (torch.autograd.graph.saved_tensors_hooks,
  each storage counted once): the quantity the estimate models, measured without the allocator;
- plan's activation estimate for batch 1 in fp32 (moevit.train.activation_memory, the function
  `moevit plan` calls) and its ratio to the end-of-forward growth. The check passes when the
  ratio is within TOLERANCE (estimate / measured in [1 - TOLERANCE, 1 + TOLERANCE]);
- GFLOPs: torch.utils.flop_counter over the forward (2 x multiply-adds of matmuls and convolutions;
  it does not count CPU scaled-dot-product attention), for the whole task (backbone + head) and for
  the backbone alone (a second, no-grad pass), next to plan's analytic counts without the SDPA part
  (the comparable numbers: backbone + head, and backbone) and plan's backbone with it.

Not a test: it takes minutes at full size. Exit status 1 when an estimate misses its tolerance.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TOLERANCE = 0.35


# ------------------------------------------------------------------------------------- one task
class ResidentPeak:
    """The largest resident set seen by a sampling thread since `reset()`, in bytes."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak, self._running = interval_s, 0, True
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def current(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def reset(self) -> None:
        self.peak = self.current()

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._running = False
        self._thread.join()


def measure_task(config: str, overrides: list[str], task: str) -> dict:
    import torch
    from step_helpers import training_batch  # benchmarks/, the script's folder
    from torch.utils.flop_counter import FlopCounterMode

    from moevit.config import load_config
    from moevit.factory import build_model
    from moevit.models.flops import analytic_flops
    from moevit.train.activation_memory import saved_activation_bytes, task_activation_bytes, windows_of
    from moevit.train.head_cost import head_cost

    cfg = load_config(config, overrides)
    spec = cfg.tasks[task]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).train()
    batch = training_batch(spec.type, spec.data, spec.image_size, spec.num_classes)
    side = spec.image_size
    windows = windows_of(cfg.model.window_size, cfg.model.global_blocks)
    estimate = task_activation_bytes(model.backbone, model.heads[task], (side, side), 1, "fp32", windows)
    analytic = analytic_flops(model.backbone, side, task)
    head_gflops = 2 * head_cost(model.heads[task], model.backbone, (side, side), 4).macs / 1e9

    with torch.no_grad():  # warm-up: thread pools and kernel caches are set up outside the measurement
        model(task, batch)
    resident = ResidentPeak()
    gc.collect()
    resident.reset()
    before = resident.current()
    started = time.perf_counter()
    with (
        saved_activation_bytes(model) as saved,
        FlopCounterMode(display=False) as flops,
    ):
        loss = model(task, batch).losses["loss"]
    forward_s = time.perf_counter() - started
    after_forward = resident.current()
    forward_peak = max(resident.peak, after_forward)  # the sampler may not have run since the last growth
    loss.backward()
    step_s = time.perf_counter() - started
    step_peak = max(resident.peak, forward_peak, resident.current())
    resident.stop()
    with torch.no_grad(), FlopCounterMode(display=False) as backbone_flops:
        indices = model.heads[task].feature_indices
        model.backbone.forward_backbone(batch["images"], task, indices if indices is not None else ())
    measured = after_forward - before
    return {
        "task": task,
        "image_size": list(batch["images"].shape[-2:]),
        "params": sum(p.numel() for p in model.parameters()),
        "forward_s": forward_s,
        "step_s": step_s,
        "rss_growth_end_of_forward_bytes": measured,
        "rss_growth_forward_peak_bytes": forward_peak - before,
        "rss_growth_step_peak_bytes": step_peak - before,
        "saved_tensor_bytes": sum(saved.values()),
        "estimate_bytes": estimate["total"],
        "estimate_backbone_bytes": estimate["backbone"],
        "estimate_head_bytes": estimate["head"],
        "estimate_over_measured": estimate["total"] / measured if measured > 0 else float("nan"),
        "gflops_measured_total": flops.get_total_flops() / 1e9,
        "gflops_measured_backbone": backbone_flops.get_total_flops() / 1e9,
        "gflops_plan_backbone": analytic["gflops"],
        "gflops_plan_backbone_without_sdpa": analytic["gflops_without_sdpa"],
        "gflops_plan_head": head_gflops,
    }


# ---------------------------------------------------------------------------------------- parent
def run_in_subprocess(config: str, overrides: list[str], task: str) -> dict:
    # A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, config, *overrides, "--one-task", task]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{task}: the measuring subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict]) -> str:
    mib = 2**20
    header = (
        f"{'task':<10} {'image':>9} {'fwd s':>6} {'step s':>6} {'RSS fwd end':>11} {'RSS fwd peak':>12} "
        f"{'RSS step peak':>13} {'saved':>9} {'plan est.':>9} {'est/meas':>8} {'check':>5} "
        f"{'GFLOPs all':>10} {'plan all -sdpa':>14} {'GFLOPs bb':>9} {'plan bb -sdpa':>13} {'plan bb':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ok = abs(r["estimate_over_measured"] - 1) <= TOLERANCE
        lines.append(
            f"{r['task']:<10} {'{}x{}'.format(*r['image_size']):>9} {r['forward_s']:>6.1f} {r['step_s']:>6.1f} "
            f"{r['rss_growth_end_of_forward_bytes'] / mib:>8.0f}MiB {r['rss_growth_forward_peak_bytes'] / mib:>9.0f}MiB "
            f"{r['rss_growth_step_peak_bytes'] / mib:>10.0f}MiB {r['saved_tensor_bytes'] / mib:>6.0f}MiB "
            f"{r['estimate_bytes'] / mib:>6.0f}MiB {r['estimate_over_measured']:>8.2f} {'ok' if ok else 'MISS':>5} "
            f"{r['gflops_measured_total']:>10.1f} "
            f"{r['gflops_plan_backbone_without_sdpa'] + r['gflops_plan_head']:>14.1f} {r['gflops_measured_backbone']:>9.1f} "
            f"{r['gflops_plan_backbone_without_sdpa']:>13.1f} {r['gflops_plan_backbone']:>8.1f}"
        )
    lines.append(
        f"check: plan's fp32 batch-1 activation estimate within +-{TOLERANCE:.0%} of the RSS growth at the end "
        "of the forward. GFLOPs: forward, 2 x multiply-adds; 'bb' = backbone; torch's counter skips CPU SDPA, "
        "so compare 'GFLOPs all' with 'plan all -sdpa' (backbone + head) and 'GFLOPs bb' with 'plan bb -sdpa'."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task of the config)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one-task", help=argparse.SUPPRESS)  # the subprocess's entry
    args = parser.parse_args()
    if args.one_task:
        print(json.dumps(measure_task(args.config, args.overrides, args.one_task)))
        return 0
    from moevit.config import load_config

    cfg = load_config(args.config, args.overrides)
    tasks = args.tasks.split(",") if args.tasks else list(cfg.tasks)
    rows = []
    for task in tasks:
        rows.append(run_in_subprocess(args.config, args.overrides, task))
        print(f"measured {task}", file=sys.stderr, flush=True)
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return int(any(abs(r["estimate_over_measured"] - 1) > TOLERANCE for r in rows))


if __name__ == "__main__":
    raise SystemExit(main())
