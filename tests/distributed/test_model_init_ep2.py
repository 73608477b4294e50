"""`model.init` under expert parallelism (issue 16, "done when"): a saved timm ViT starts a 2-process, EP=2
run; every rank loads it before the engine shards the experts, so each rank trains its half of the
upcycled experts, and the consolidated checkpoint holds the dense MLP in every expert. The routing is
calibrated before step 1 (moevit.train.router_calibration): the selection biases are in the checkpoint,
and step 1's expert load is logged for every layer."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.parallel.checkpoint import consolidated_state_dict, find_latest_checkpoint
from moevit.train.loop import run_training

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def train_worker(config: dict) -> None:
    run_training(build_config(Config, config))


def test_a_timm_vit_starts_an_ep2_run(tmp_path, synth_root, tiny_config, run_workers):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=7)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    run = tmp_path / "run"
    config = tiny_config(
        synth_root,
        run,
        datasets=("imagenet",),
        model={"init": str(tmp_path / "vit.pth")},
        # One step at a negligible lr: the checkpoint is still the loaded start, to float precision.
        train={"steps": 1, "optim": {"lr": 1e-12, "min_lr": 0.0}},
        parallel={"ep_size": 2},
    )
    run_workers(train_worker, 2, 150, config=config)

    report = json.loads((run / "init_report.json").read_text())
    assert report["kind"] == "timm" and len(report["upcycled"]) == 8
    trained = consolidated_state_dict(run / "checkpoints" / find_latest_checkpoint(run))
    experts = trained["backbone.blocks.1.mlp.experts.fc1_weight"]
    assert experts.shape[0] == 4  # both ranks' halves, stacked back
    for expert in experts:
        torch.testing.assert_close(expert, vit.blocks[1].mlp.fc1.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["backbone.pos_embed"], vit.pos_embed.detach(), atol=1e-6, rtol=0)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (first,) = [r for r in steps if r.get("split") == "train" and r.get("step") == 1 and r["task"]]
    # Calibrated under EP=2 before step 1 (both ranks forward the same images through both halves of
    # the experts); step 1's load is logged per layer. How even it is at this toy size (E4, 16 images of
    # 17 tokens) is noise; docs/model.md measures the demo's shape.
    biases = {k: v for k, v in trained.items() if k.endswith(".selection_bias")}
    assert len(biases) == 2 and all(bias.abs().max() > 0 for bias in biases.values())
    assert {key for key in first if key.startswith("expert_load/")} == {
        "expert_load/blocks.1.mlp",
        "expert_load/blocks.3.mlp",
    }
