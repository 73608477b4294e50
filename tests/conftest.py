"""Shared test settings and fixtures.

One thread per process keeps timings stable on the 2-core CI machine. Users' single-process commands
(`moevit prune`, `moevit eval`, `moevit expand`, `moevit train --nproc 1`) run at torch's default thread
count instead (torchrun sets one thread per process for `--nproc N > 1`), where a matmul may split its
work differently: a test marked `bit_exact` runs at both counts (`torch_threads`), so a bit-exactness
promise is checked under the setting users run too.

`tiny_config` is the one builder of the tiny training configs that the end-to-end, fault, distributed
and SLURM tests train on, and `synth_root` holds the tiny synthetic data they read, written once per
session. Both are fixtures so that every test directory reaches them under `--import-mode=importlib`
without importing this file; the builder is only called in the parent process (test bodies and
fixtures), never in a worker of `run_workers`, whose fresh process imports nothing from here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

DEFAULT_THREADS = torch.get_num_threads()  # read before the line below: what a user's process runs with
torch.set_num_threads(1)

# The tiny synthetic datasets, by their directory under the synthetic root: (task type, classes, format).
TINY_DATASETS = {
    "imagenet": ("classification", 10, "imagenet"),
    "coco": ("detection", 5, "coco"),
    "ade20k": ("segmentation", 5, "ade20k"),
    "downstream": ("classification", 10, "imagenet"),  # moevit.data.synth.downstream, ImageNet layout
}
TINY_BATCH_SIZES = {"imagenet": 8, "coco": 2, "ade20k": 2, "downstream": 8}


def merge(base: Mapping, overrides: Mapping) -> dict:
    """A deep copy of `base` with `overrides` merged in, as a JSON merge patch (RFC 7386) does: mappings
    merge key by key, None removes the key (so the schema's default applies), anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            merged[key] = merge(merged[key] if isinstance(merged.get(key), Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_tiny_config(
    data_root: str | Path,
    output_dir: str | Path | None = None,
    *,
    datasets: Sequence[str] | Mapping[str, str] = ("imagenet", "coco", "ade20k"),
    image_size: int = 32,
    batch_sizes: Mapping[str, int] | None = None,
    **sections,
) -> dict:
    """A tiny training config as a plain dict (what YAML dumping and `build_config(Config, d)` take).

    moevit_debug (4 experts per MoE layer, top-2) trains 2 steps, logging every step, with num_workers 0,
    one task per dataset of `data_root` (the layout `write_synthetic_datasets` and `write_downstream`
    write; see TINY_DATASETS for each task's type and classes):

    - `datasets`: dataset names (each task is named after its dataset), or {task: dataset} (two
      classification tasks on one dataset: {"shapes": "imagenet", "objects": "imagenet"});
    - `batch_sizes`: {task: batch size}, for tasks whose size differs from TINY_BATCH_SIZES;
    - `output_dir`: left out of the config when None;
    - `sections` (model=..., tasks=..., train=..., parallel=..., ...): merged over the result by `merge`,
      e.g. train={"steps": 8}, tasks={"ade20k": {"head_options": {"channels": 16}}}, model=None.
    """
    if not isinstance(datasets, Mapping):
        datasets = {name: name for name in datasets}
    batch_sizes = dict(batch_sizes or {})
    if set(batch_sizes) - set(datasets):
        raise ValueError(f"batch sizes for unknown tasks {sorted(set(batch_sizes) - set(datasets))}")
    tasks = {}
    for task, dataset in datasets.items():
        task_type, num_classes, data_format = TINY_DATASETS[dataset]
        data = {
            "format": data_format,
            "root": str(Path(data_root) / dataset),
            "image_size": image_size,
            "batch_size": batch_sizes.get(task, TINY_BATCH_SIZES[dataset]),
        }
        tasks[task] = {"type": task_type, "num_classes": num_classes, "data": data}
    config = {
        "model": {"name": "moevit_debug"},
        "tasks": tasks,
        "train": {"steps": 2, "log_every": 1, "num_workers": 0},
    }
    if output_dir is not None:
        config["output_dir"] = str(output_dir)
    return merge(config, sections)


def pytest_generate_tests(metafunc):
    """Tests marked `bit_exact` run once per thread count, one (the suite's) and torch's default, and
    once per expert path (model.moe.expert_impl's loop and grouped GEMM): the promise holds on each.
    The values are plain parameters (`torch_threads`, `expert_path`); `_bit_exact_variant` applies them."""
    if metafunc.definition.get_closest_marker("bit_exact") is None:
        return
    counts = sorted({1, DEFAULT_THREADS})
    for name, values, ids in (
        ("torch_threads", counts, [f"threads{n}" for n in counts]),
        ("expert_path", ["loop", "grouped"], None),
    ):
        if name not in metafunc.fixturenames:
            metafunc.fixturenames.append(name)
        metafunc.parametrize(name, values, ids=ids)


@pytest.fixture(autouse=True)
def _bit_exact_variant(request, monkeypatch):
    """Runs a `bit_exact` test body with its `torch_threads` intra-op threads and its `expert_path` as
    what "auto" (every model's default) picks on the CPU; the suite's one thread afterwards."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "expert_path" in params:
        from moevit.layers import experts

        monkeypatch.setitem(experts.AUTO_IMPL, "cpu", params["expert_path"])
    if "torch_threads" not in params:
        yield
        return
    torch.set_num_threads(params["torch_threads"])
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    """The builder `build_tiny_config(data_root, output_dir=None, *, datasets, image_size, batch_sizes,
    **sections) -> dict`."""
    return build_tiny_config


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The tiny synthetic datasets (imagenet, coco, ade20k and downstream), written once per session.

    Shared by every test that reads them: a test that corrupts or truncates files copies the tree first.
    """
    from moevit.data.synth import write_synthetic_datasets  # here: collecting the unit tests needs none
    from moevit.data.synth.downstream import write_downstream

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_datasets(root, size="tiny")
    write_downstream(root, size="tiny")
    return root
