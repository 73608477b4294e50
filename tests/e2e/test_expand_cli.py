"""`moevit expand` end to end through the CLI (issue 7): train two tasks with 2 processes and ep_size 2,
expand by a third task and 2 experts per layer, train only the new task (2 processes, ep_size 2), then
check that nothing the old tasks use moved: their eval metrics (during the new task's training and from
`moevit eval`), their outputs on a fixed batch and every old tensor are bit-identical, while the new
task's parameters changed; finally prune tasks out of the expanded run (composition with issue 6).
About 3 minutes on 2 shared CPU cores (three 2-process launches, one expand, three prunes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from moevit.artifacts.model_dir import load_pruned, read_continual_record
from moevit.config import load_config
from moevit.factory import build_model
from moevit.parallel.checkpoint import consolidated_state_dict, find_latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TIMEOUT_S = 300
OLD_TASKS = ("imagenet", "ade20k")


def moevit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moevit.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if ok:
        assert done.returncode == 0, (
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return done


def final_eval(run) -> dict[str, dict[str, float]]:
    """{task: metrics} of the run's evaluation records (the last one per task)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skip = ("step", "split", "task")
    return {r["task"]: {k: v for k, v in r.items() if k not in skip} for r in records if r["split"] == "eval"}


def latest_state(run) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(run / "checkpoints" / find_latest_checkpoint(run))


def model_of(run):
    model = build_model(load_config(run / "config.yaml"))
    model.load_state_dict(latest_state(run))
    return model.eval()


@pytest.mark.timeout(900)
def test_expand_train_new_task_keeps_old_tasks_bit_identical(tmp_path, synth_root, tiny_config):
    config = tiny_config(
        synth_root,
        tmp_path / "base",
        datasets=OLD_TASKS,
        model={"moe": {"task_embedding": True}},  # 4 experts per MoE layer
        batch_sizes={"ade20k": 4},
        tasks={"ade20k": {"head_options": {"channels": 16}}},
        train={"eval_batches": 2},
        parallel={"ep_size": 2},
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    base, expanded, continual = tmp_path / "base", tmp_path / "expanded", tmp_path / "continual"
    moevit("train", str(tmp_path / "base.yaml"), "--nproc", "2")
    expand = [
        "expand",
        "--checkpoint",
        str(base),
        "--new-task",
        "downstream",
        "--head",
        "classification",
        "--num-classes",
        "10",
        "--data-root",
        str(synth_root / "downstream"),
        "--image-size",
        "32",
        "--batch-size",
        "8",
    ]
    # 4 + 1 experts cannot be split over ep_size 2: refused before anything is written
    bad = moevit(*expand, "--new-experts", "1", "--out", str(tmp_path / "bad"), ok=False)
    assert bad.returncode == 2 and "not divisible by parallel.ep_size=2" in bad.stderr
    assert not (tmp_path / "bad").exists()
    overrides = [
        "train.steps=3",
        "train.optim.warmup_steps=1",
        "train.optim.lr=0.01",
        f"output_dir={continual}",
    ]
    moevit(*expand, "--new-experts", "2", "--out", str(expanded), *overrides)
    manifest = read_continual_record(expanded)  # the "continual" section of its manifest.json
    assert manifest["experts_after"] == 6 and manifest["frozen_experts"] == 4
    assert 0 < manifest["params_trainable"] < manifest["params_total"]

    moevit("train", str(expanded / "config.yaml"), "--nproc", "2")  # only the new task trains, ep_size 2
    after = tmp_path / "after.json"
    moevit(
        "eval",
        str(continual / "config.yaml"),
        "--checkpoint",
        str(continual),
        "--nproc",
        "2",
        "--json",
        str(after),
    )
    metrics_before = final_eval(base)  # the base run's evaluation at its last step (same processes, batches)
    metrics_after = json.loads(after.read_text())
    for task in OLD_TASKS:
        assert metrics_after[task] == metrics_before[task], task
    assert set(metrics_after["downstream"]) == {"top1", "top5"}
    records = [json.loads(line) for line in (continual / "metrics.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records if r["split"] == "train"} == {"downstream", None}  # only it trained
    evaluated = final_eval(continual)  # old tasks measured during training too
    assert all(evaluated[task] == metrics_before[task] for task in OLD_TASKS)

    # every tensor of the old model is bit-identical (old experts are the first 4 of the stacked 6)
    old_state, new_state, start = (
        latest_state(base),
        latest_state(continual),
        torch.load(expanded / "model.pt"),
    )
    for key, value in old_state.items():
        now = new_state[key][: value.shape[0]] if ".experts.fc" in key else new_state[key]
        assert torch.equal(now, value), key
    moved = [key for key in start if not torch.equal(start[key], new_state[key])]
    assert any(k.startswith("heads.downstream.") for k in moved) and any(
        ".gates.downstream." in k for k in moved
    )
    assert any(".experts.fc" in k for k in moved) and "backbone.task_embed.downstream" in moved
    assert all("downstream" in k or ".experts.fc" in k for k in moved), moved

    # the old tasks' outputs on a fixed batch: bit-identical
    old_model, new_model = model_of(base), model_of(continual)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task in OLD_TASKS:
            a, b = old_model.predict(task, {"images": images}), new_model.predict(task, {"images": images})
            assert torch.equal(a, b), task

    # composition with pruning: any task out of the expanded run
    calib = ["--usage", "calib", "--calib-batches", "1"]
    moevit(
        "prune",
        "--checkpoint",
        str(continual),
        "--task",
        "downstream",
        "--out",
        str(tmp_path / "p_new"),
        "--top",
        "3",
        *calib,
    )
    moevit(
        "prune",
        "--checkpoint",
        str(continual),
        "--task",
        "imagenet",
        "--out",
        str(tmp_path / "p_old"),
        "--threshold",
        "0",
        *calib,
    )
    pruned_new, manifest_new = load_pruned(tmp_path / "p_new")
    assert manifest_new.tasks == ["downstream"] and all(
        len(ids) == 3 for ids in manifest_new.kept_experts.values()
    )
    pruned_old, manifest_old = load_pruned(tmp_path / "p_old")
    assert all(max(ids) < 4 for ids in manifest_old.kept_experts.values())  # never a new expert

    # old and new task in one pruned model: the old task still reaches only its own 4 experts per layer,
    # so keeping everything leaves both tasks' outputs bit-identical to the expanded run's
    moevit(
        "prune",
        "--checkpoint",
        str(continual),
        "--task",
        "imagenet,downstream",
        "--out",
        str(tmp_path / "p_both"),
        "--keep-all",
        *calib,
    )
    pruned_both, manifest_both = load_pruned(tmp_path / "p_both")
    assert manifest_both.task_experts == {"imagenet": {layer: 4 for layer in manifest_both.kept_experts}}
    with torch.no_grad():
        for task in ("imagenet", "downstream"):
            a, b = new_model.predict(task, {"images": images}), pruned_both.predict(task, {"images": images})
            assert torch.equal(a, b), task
