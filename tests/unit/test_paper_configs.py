"""The ready configs for the real datasets (configs/paper/): each loads and validates under the strict schema,
builds its full-size model on the meta device (no memory, no data), and is sized by `moevit plan`. Training on
one of them at true resolution is tests/e2e/test_paper_rehearsal.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moevit.cli import main
from moevit.config import load_config
from moevit.factory import build_model
from moevit.models.flops import count_parameters

PAPER_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "paper").glob("*.yaml"))
HETERO = [path for path in PAPER_CONFIGS if path.stem.endswith("_hetero")]


def test_the_paper_configs_are_there():
    names = {path.stem for path in PAPER_CONFIGS}
    assert {"moevit_s16_hetero", "moevit_b16_hetero", "dense_s16_hetero", "dense_b16_hetero"} <= names
    assert {"imagenet_s16", "coco_s16", "ade20k_s16"} <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_config_loads_and_builds_on_meta(path):
    cfg = load_config(path)
    for task in cfg.tasks.values():
        task.data.transform_settings()  # every transforms section is its format's
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 20_000_000  # full size, not shrunk


@pytest.mark.parametrize("path", HETERO, ids=lambda path: path.stem)
def test_moe_and_dense_twins_cost_the_same_per_token(path):
    """Each joint MoE config and its dense baseline have equal active FLOPs per token in the MLPs:
    top_k x expert_hidden == the dense MLP width."""
    cfg = load_config(path)
    with torch.device("meta"):
        backbone = build_model(cfg).backbone
    if path.stem.startswith("moevit_"):
        moe = cfg.model.moe
        dense_width = int(backbone.embed_dim * 4)
        assert moe.top_k * moe.expert_hidden == dense_width
        assert moe.layers == "all" and moe.num_experts == 16
        twin = load_config(path.with_name(path.name.replace("moevit_", "dense_")))
        assert twin.model.name == cfg.model.name and twin.train.steps == cfg.train.steps
        active = count_parameters(backbone)["active_per_token"]
        assert set(active) == set(cfg.tasks) and min(active.values()) < count_parameters(backbone)["total"]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_plan_sizes_every_paper_config(path, capsys):
    gpus = 64 if "b16" in path.stem else 8
    assert main(["plan", str(path), "--gpus", str(gpus), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = load_config(path)
    assert set(plan["tasks"]) == set(cfg.tasks)
