"""`moevit plan` and the one count of epochs covered (moevit.data.coverage) it shares with the training start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moevit.cli import main
from moevit.config.loader import build_config
from moevit.config.schema import Config
from moevit.data.build import READERS
from moevit.data.coverage import NOMINAL_TRAIN_SIZES, epochs_covered
from moevit.data.schedule import build_schedule
from moevit.factory import build_model
from moevit.train.activation_memory import (
    Windows,
    backbone_bytes,
    saved_activation_bytes,
    task_activation_bytes,
)
from moevit.train.loader import build_train_loader
from moevit.train.loop import coverage_lines
from moevit.train.plan import build_meta_model, plan_report

WORLD = 4


def config_of(raw: dict) -> Config:
    return build_config(Config, raw, source="<test>")


def train_sizes(cfg: Config) -> dict[str, int]:
    """Train-split lengths read straight from the readers, independently of moevit.data.coverage."""
    return {
        name: len(READERS[t.data.format](t.data.root, t.data.train_split)) for name, t in cfg.tasks.items()
    }


def test_all_covers_every_step_of_every_task(tiny_config, synth_root):
    cfg = config_of(tiny_config(synth_root, train={"steps": 30}))
    sizes = train_sizes(cfg)
    coverage = epochs_covered(cfg, WORLD)
    for name, task in cfg.tasks.items():
        assert coverage[name].steps == 30
        assert coverage[name].samples == task.data.batch_size * WORLD * 30
        assert coverage[name].dataset_size.images == sizes[name]
        assert not coverage[name].dataset_size.nominal
        assert coverage[name].epochs == pytest.approx(task.data.batch_size * WORLD * 30 / sizes[name])


def test_round_robin_trains_each_task_every_third_step(tiny_config, synth_root):
    cfg = config_of(tiny_config(synth_root, train={"steps": 31, "sampling": {"strategy": "round_robin"}}))
    coverage = epochs_covered(cfg, WORLD)
    # Steps 0..30 cycle imagenet, coco, ade20k: the first task gets the one left over.
    assert [coverage[t].steps for t in ("imagenet", "coco", "ade20k")] == [11, 10, 10]
    sizes = train_sizes(cfg)
    batch = cfg.tasks["coco"].data.batch_size
    assert coverage["coco"].epochs == pytest.approx(batch * WORLD * 10 / sizes["coco"])


def test_weighted_follows_the_expected_ratios(tiny_config, synth_root):
    ratios = {"imagenet": 6.0, "coco": 3.0, "ade20k": 1.0}
    steps = 20_000
    sampling = {"strategy": "weighted", "ratios": ratios}
    cfg = config_of(tiny_config(synth_root, train={"steps": steps, "sampling": sampling}))
    coverage = epochs_covered(cfg, WORLD)
    assert sum(c.steps for c in coverage.values()) == steps  # one task per step
    for name, ratio in ratios.items():
        p = ratio / sum(ratios.values())
        # The seeded draw of the run, within 4 binomial standard deviations of p x steps.
        assert abs(coverage[name].steps - p * steps) < 4 * (steps * p * (1 - p)) ** 0.5
    schedule = build_schedule(cfg, train_sizes(cfg))
    assert {n: c.steps for n, c in coverage.items()} == schedule.task_counts(steps)


def test_weighted_by_temperature_uses_the_dataset_sizes(tiny_config, synth_root):
    sampling = {"strategy": "weighted", "temperature": 1.0}  # p_t proportional to the dataset size
    cfg = config_of(tiny_config(synth_root, train={"steps": 20_000, "sampling": sampling}))
    sizes = train_sizes(cfg)
    coverage = epochs_covered(cfg, 1)
    total = sum(sizes.values())
    for name, size in sizes.items():
        assert coverage[name].steps / 20_000 == pytest.approx(size / total, abs=0.02)


def test_missing_roots_fall_back_to_the_published_sizes(tiny_config, tmp_path):
    cfg = config_of(tiny_config(tmp_path / "absent", train={"steps": 1000}))
    coverage = epochs_covered(cfg, 8)
    for name, task in cfg.tasks.items():
        assert coverage[name].dataset_size.nominal
        assert coverage[name].dataset_size.images == NOMINAL_TRAIN_SIZES[task.data.format]
    assert coverage["imagenet"].epochs == pytest.approx(8 * 8 * 1000 / 1_281_167)
    assert "nominal" in coverage["coco"].describe("coco")


def test_the_training_start_logs_the_same_epochs(tiny_config, synth_root):
    cfg = config_of(tiny_config(synth_root, train={"steps": 50, "sampling": {"strategy": "round_robin"}}))
    loader = build_train_loader(cfg, rank=0, world_size=2)
    lines = coverage_lines(cfg, loader, 2)
    expected = epochs_covered(cfg, 2)
    assert lines == [f"epochs covered by 50 steps: {c.describe(t)}" for t, c in expected.items()]
    # The numbers themselves: 17 of 50 round-robin steps train imagenet, 8 images a rank, 2 ranks.
    epochs = 8 * 2 * 17 / train_sizes(cfg)["imagenet"]
    assert lines[0].startswith(f"epochs covered by 50 steps: imagenet: {epochs:.2f} epochs of ")


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_plan_prints_a_table_and_json(tiny_config, synth_root, tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(synth_root, train={"steps": 40}))
    assert main(["plan", config, "--gpus", "2"]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header[:3] == ["task", "image", "batch/GPU"] and "epochs" in header
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["imagenet", "coco", "ade20k"]

    assert main(["plan", config, "train.steps=80", "--gpus", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == 2 and report["steps"] == 80
    cfg = config_of(tiny_config(synth_root, train={"steps": 80}))
    for name, row in report["tasks"].items():
        assert row["epochs"] == pytest.approx(epochs_covered(cfg, 2)[name].epochs)
        assert row["tokens_per_step_global"] == 2 * row["tokens_per_step_per_gpu"]
        assert row["tokens_per_step_per_gpu"] == row["batch_per_gpu"] * (1 + (32 // 8) ** 2)
    memories = [row["activation_gib_per_gpu"] for row in report["tasks"].values()]
    assert report["totals"]["activation_gib_per_gpu_per_step"] == pytest.approx(sum(memories))  # "all"


def test_a_bad_config_path_is_a_one_line_error(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moevit: error:") and "missing.yaml" in err[0]


def test_gpus_the_expert_groups_do_not_divide_are_refused(tiny_config, synth_root, tmp_path, capsys):
    raw = tiny_config(synth_root, parallel={"ep_size": 2})
    assert main(["plan", write_config(tmp_path / "ep2.yaml", raw), "--gpus", "3"]) == 2
    assert "does not divide the world size 3" in capsys.readouterr().err


VIT_B16 = {
    "model": {
        "name": "moevit_base",
        "moe": {"num_experts": 16, "top_k": 4, "expert_hidden": 768, "layers": "all", "task_embedding": True},
    },
    "tasks": {
        "imagenet": {
            "type": "classification",
            "num_classes": 1000,
            "data": {"format": "imagenet", "root": "/absent/imagenet", "image_size": 224, "batch_size": 128},
        },
        "coco": {
            "type": "detection",
            "num_classes": 80,
            "data": {"format": "coco", "root": "/absent/coco", "image_size": 1024, "batch_size": 2},
        },
        "ade20k": {
            "type": "segmentation",
            "num_classes": 150,
            "data": {"format": "ade20k", "root": "/absent/ade20k", "image_size": 512, "batch_size": 8},
        },
    },
    "train": {"steps": 90_000},
}


def test_a_vit_b16_plan_on_64_gpus_is_built_on_meta_in_seconds():
    cfg = config_of(VIT_B16)
    model = build_meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    started = time.perf_counter()
    report = plan_report(cfg, 64)
    # Seconds: real ViT-B weights would take ~1 GB and a long initialisation.
    assert time.perf_counter() - started < 10
    imagenet = report["tasks"]["imagenet"]
    # Top-4 of 16 experts of width 768 = the dense 3072-wide MLP: ViT-B/16's 86M active parameters.
    assert imagenet["params_active_per_token"] == pytest.approx(86.5e6, rel=0.02)
    assert imagenet["tokens_per_step_global"] == 128 * 197 * 64
    assert imagenet["epochs"] == pytest.approx(128 * 64 * 90_000 / 1_281_167)
    assert imagenet["dataset_size_nominal"]
    assert report["precision"] == "bf16"


def test_activation_estimate_scales_with_batch_and_windows():
    cfg = config_of(VIT_B16)
    model = build_meta_model(cfg)
    head = model.heads["coco"]
    one = task_activation_bytes(model.backbone, head, (1024, 1024), 1, "bf16")
    four = task_activation_bytes(model.backbone, head, (1024, 1024), 4, "bf16")
    assert four["total"] == 4 * one["total"]
    fp32 = task_activation_bytes(model.backbone, head, (1024, 1024), 1, "fp32")
    assert one["total"] < fp32["total"] < 2 * one["total"]  # norms, routers and the focal loss stay fp32
    # 64 x 64 tokens in 16 x 16 windows: no padding, the same tensors as global attention (the memory of
    # fused attention is linear in the tokens); a 62 x 62 grid pads back up to 64 x 64.
    windows = Windows(16, (2, 5, 8, 11))
    plain = backbone_bytes(model.backbone, (1024, 1024), "bf16")
    assert backbone_bytes(model.backbone, (1024, 1024), "bf16", windows) == plain
    padded = backbone_bytes(model.backbone, (992, 992), "bf16", windows)
    unpadded = backbone_bytes(model.backbone, (992, 992), "bf16")
    assert padded["attention"] > unpadded["attention"] and padded["mlp"] == unpadded["mlp"]


@pytest.mark.parametrize("moe_layers", ["all", "none"])
def test_backbone_estimate_matches_the_tensors_autograd_saves(tiny_config, synth_root, moe_layers):
    """fp32 on CPU: the estimate against the bytes autograd really keeps (each storage once, weights out)."""
    raw = tiny_config(synth_root, model={"moe": {"layers": moe_layers}}, image_size=64)
    cfg = config_of(raw)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randn(2, 3, 64, 64, requires_grad=False)
    with saved_activation_bytes(model) as saved:
        out = model.backbone.forward_backbone(images, "imagenet", ())
    out.tokens.sum().backward()
    estimate = 2 * sum(backbone_bytes(model.backbone, (64, 64), "fp32").values())
    assert estimate == pytest.approx(sum(saved.values()), rel=0.15)


def test_task_estimate_matches_the_tensors_autograd_saves(tiny_config, synth_root):
    """Backbone + head + loss of every task on a real training batch (fp32, CPU), within 10%."""
    cfg = config_of(
        tiny_config(synth_root, image_size=64, batch_sizes={"imagenet": 2, "coco": 2, "ade20k": 2})
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for task, batch in next(build_train_loader(cfg, rank=0, world_size=1)):
        with saved_activation_bytes(model) as saved:
            model(task, batch).losses["loss"].backward()
        images = batch["images"]
        estimate = task_activation_bytes(
            model.backbone, model.heads[task], tuple(images.shape[-2:]), images.shape[0], "fp32"
        )
        assert estimate["total"] == pytest.approx(sum(saved.values()), rel=0.10), task


def test_plan_json_is_clean_on_stdout_in_a_fresh_process():
    """A fresh `moevit plan --json` prints only JSON on stdout: sizing a job imports no DeepSpeed (whose
    import logs a warning to stdout)."""
    command = [
        sys.executable,
        "-m",
        "moevit.cli",
        "plan",
        str(Path(__file__).parents[2] / "configs/paper/moevit_b16_hetero.yaml"),
        "--gpus",
        "64",
    ]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpus"] == 64
