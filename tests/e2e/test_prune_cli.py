"""`moevit prune`, `moevit eval` on a pruned directory, `moevit prune --sweep` and `moevit finetune`, end to
end through the CLI on a 2-step training run on tiny synthetic data (issue 6)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml

from moevit.artifacts.model_dir import load_pruned

pytestmark = [pytest.mark.slow]
TIMEOUT_S = 300


def moevit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moevit.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if ok:
        assert done.returncode == 0, (
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return done


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synth_root, tiny_config):
    root = tmp_path_factory.mktemp("prune")
    config = tiny_config(
        synth_root,
        root / "run",
        datasets=("imagenet", "ade20k"),
        batch_sizes={"ade20k": 4},
        tasks={"ade20k": {"head_options": {"channels": 16}}},
        train={"eval_batches": 2},
    )
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    moevit("train", str(root / "train.yaml"))
    return root


def test_prune_eval_and_errors(run_dir):
    out = run_dir / "pruned"
    done = moevit(
        "prune",
        "--checkpoint",
        str(run_dir / "run"),
        "--task",
        "imagenet",
        "--out",
        str(out),
        "--top",
        "2",
        "--usage",
        "calib",
        "--calib-batches",
        "2",
        "--eval",
    )
    assert "usage: calibration" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["experts_per_layer"] == {"blocks.1.mlp": 2, "blocks.3.mlp": 2}
    assert report["after"]["params_for_tasks"] < report["before"]["params_for_tasks"]
    model, manifest = load_pruned(out)
    assert (
        manifest.tasks == ["imagenet"]
        and sum(p.numel() for p in model.parameters()) == report["after"]["params_model"]
    )
    # moevit eval on the pruned dir reproduces the metrics prune measured
    moevit("eval", str(out / "config.yaml"), "--checkpoint", str(out), "--json", str(run_dir / "m.json"))
    assert json.loads((run_dir / "m.json").read_text()) == report["metrics"]["after"]
    # an unknown task and a bad manifest are clear errors, not tracebacks
    bad = moevit(
        "prune", "--checkpoint", str(run_dir / "run"), "--task", "coco", "--out", str(run_dir / "x"), ok=False
    )
    assert bad.returncode == 2 and "unknown task(s) ['coco']" in bad.stderr and "Traceback" not in bad.stderr
    manifest_file = out / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["kept_experts"]["blocks.1.mlp"] = [0, 0]
    manifest_file.write_text(json.dumps(data))
    bad = moevit("eval", str(out / "config.yaml"), "--checkpoint", str(out), ok=False)
    assert bad.returncode == 2 and "manifest.json" in bad.stderr and "sorted list of distinct" in bad.stderr


def test_sweep_writes_csv_and_plot(run_dir):
    out = run_dir / "sweep"
    moevit(
        "prune",
        "--checkpoint",
        str(run_dir / "run"),
        "--task",
        "ade20k",
        "--out",
        str(out),
        "--sweep",
        "--usage",
        "calib",
        "--calib-batches",
        "1",
    )
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {"criterion", "kept_experts", "params", "ade20k_gflops", "ade20k_mIoU"} <= set(rows[0])
    assert [int(r["params"]) for r in rows] == sorted(int(r["params"]) for r in rows)
    assert int(rows[-1]["kept_experts"]) == 8 and int(rows[0]["kept_experts"]) < 8
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_head_mode_freezes_the_backbone(run_dir, synth_root, tiny_config):
    pruned = run_dir / "pruned_ft"
    moevit(
        "prune",
        "--checkpoint",
        str(run_dir / "run"),
        "--task",
        "imagenet",
        "--out",
        str(pruned),
        "--top",
        "3",
        "--usage",
        "calib",
        "--calib-batches",
        "1",
    )
    config = tiny_config(
        synth_root,
        datasets=("downstream",),
        model=None,  # the backbone comes from --init
        train={"optim": {"warmup_steps": 1}},
        aux_loss={"mutual_information": 0.0},
    )
    (run_dir / "ft.yaml").write_text(yaml.safe_dump(config))
    results = {}
    for mode in ("head", "full"):
        out = run_dir / f"ft_{mode}"
        done = moevit(
            "finetune", str(run_dir / "ft.yaml"), "--init", str(pruned), "--mode", mode, f"output_dir={out}"
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[mode] == json.loads((out / "finetune.json").read_text())
    before, _ = load_pruned(pruned)
    after, manifest = load_pruned(run_dir / "ft_head" / "model")
    assert manifest.tasks == ["downstream"]
    renamed = {k.replace(".imagenet", ".downstream"): v for k, v in before.backbone.state_dict().items()}
    for key, value in after.backbone.state_dict().items():
        if not key.endswith(".usage"):  # usage counters count training tokens, they are not weights
            assert torch.equal(value, renamed[key]), key
    head, full = results["head"], results["full"]
    assert head["params_trainable"] == sum(p.numel() for p in after.heads.parameters())
    assert full["params_trainable"] == full["params_total"] == head["params_total"]
    assert set(head["metrics"]) == {"top1", "top5"}


@pytest.mark.parametrize("usage", ["counters", "auto"])
def test_prune_selects_by_the_training_counters(run_dir, usage):
    """`--usage counters` (and `auto`, which prefers them when the run kept them) selects on the moving
    average of routing the run saved in its checkpoint, not on a calibration pass."""
    from moevit.artifacts.checkpoints import resolve_checkpoint
    from moevit.artifacts.usage import usage_from_run
    from moevit.prune.criteria import Criterion, select_experts

    out = run_dir / f"pruned_{usage}"
    done = moevit(
        "prune", "--checkpoint", str(run_dir / "run"), "--task", "imagenet", "--out", str(out), "--top", "1",
        "--usage", usage,
    )  # fmt: skip
    ref = resolve_checkpoint(run_dir / "run")
    counters, origin = usage_from_run(ref.run_root, ref.tag)
    assert origin.startswith("moving average of the training counts")
    assert f"usage: training counters: {origin}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["usage_source"] == f"training counters: {origin}"
    expected = select_experts(counters, ["imagenet"], {layer: 2 for layer in counters}, Criterion("top", 1))
    assert report["kept_experts"] == expected
    # The busiest expert by the counters, layer by layer: what "top 1" keeps.
    assert expected == {
        layer: [max(range(4), key=lambda e: rows["imagenet"][e])] for layer, rows in counters.items()
    }


def test_finetune_router_and_head_from_a_training_run(run_dir, synth_root, tiny_config):
    """`--init RUN --from-task T --mode router+head`: the downstream task starts from T's routers and task
    embedding in the unpruned run; only they and the head train, every other weight stays the run's."""
    from moevit.artifacts.checkpoints import resolve_checkpoint
    from moevit.config import load_config
    from moevit.finetune.model import build_finetune_model
    from moevit.models.param_names import parse_key
    from moevit.parallel.checkpoint import consolidated_state_dict

    config = tiny_config(
        synth_root,
        datasets=("downstream",),
        model=None,
        train={"optim": {"warmup_steps": 1}},
        aux_loss={"mutual_information": 0.0},
    )
    (run_dir / "ft_run.yaml").write_text(yaml.safe_dump(config))
    ref = resolve_checkpoint(run_dir / "run")
    trained = {k.removeprefix("backbone."): v for k, v in consolidated_state_dict(ref.directory).items()}

    def source_of(key: str, task: str) -> str:  # the run's tensor the downstream one starts from
        return key.replace(".downstream", f".{task}")

    cfg = load_config(str(run_dir / "ft_run.yaml"), [])
    for task in ("imagenet", "ade20k"):  # --from-task picks whose routing the new task inherits
        start, _ = build_finetune_model(cfg, str(run_dir / "run"), task)
        for key, value in start.backbone.state_dict().items():
            if not key.endswith(".usage"):
                assert torch.equal(value, trained[source_of(key, task)]), (task, key)

    out = run_dir / "ft_router_head"
    done = moevit(
        "finetune", str(run_dir / "ft_run.yaml"), "--init", str(run_dir / "run"), "--from-task", "imagenet",
        "--mode", "router+head", f"output_dir={out}",
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after, manifest = load_pruned(out / "model")
    assert result["mode"] == "router+head" and manifest.tasks == ["downstream"]
    routing = {
        k: v
        for k, v in after.backbone.named_parameters()
        if parse_key(k, prefix="").kind in ("gate", "task_embedding")
    }
    assert routing, "the model has routers"
    assert result["params_trainable"] == sum(v.numel() for v in routing.values()) + sum(
        p.numel() for p in after.heads.parameters()
    )
    for key, value in after.backbone.state_dict().items():
        if key.endswith(".usage"):
            continue
        unchanged = torch.equal(value, trained[source_of(key, "imagenet")])
        # Frozen weights kept, every routing tensor trained, and the selection biases of the trained gates
        # calibrated afresh on the new task's images before step 1 (moevit.train.router_calibration).
        assert unchanged == (key not in routing and not key.endswith(".selection_bias")), key
    assert set(result["metrics"]) == {"top1", "top5"}
