"""Peak memory of a run, per process, for the run's report.

CPU: the resident set's high-water mark (`getrusage`, which Linux reports in KiB). GPU: the most
memory PyTorch's caching allocator handed out on this process's device. The loop reports the
largest value over ranks, the figure that decides whether a job fits a node, in
`<run dir>/resources.json` (not in metrics.jsonl, whose lines are reproducible run to run).
"""

from __future__ import annotations

import resource

import torch

from moevit.parallel.collectives import all_gather_objects

RESOURCES_FILE = "resources.json"


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak memory in MiB: ``peak_rss_mib``, and ``peak_gpu_mib`` on CUDA."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def peak_memory_over_ranks(device: torch.device) -> dict[str, float]:
    """The largest of every rank's `peak_memory_mib` (every rank must call this)."""
    per_rank = all_gather_objects(peak_memory_mib(device))
    return {key: round(max(values[key] for values in per_rank), 1) for key in per_rank[0]}
