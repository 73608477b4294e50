"""Pruning (issue 6): keep-all and never-selected-expert pruning are bit-exact, manifests round-trip and
are checked, budgets hold against the extracted model's own counts, criteria keep what they say."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moevit.artifacts.model_dir import Manifest, ManifestError, load_pruned, read_manifest
from moevit.config import build_config
from moevit.config.schema import Config
from moevit.factory import build_model
from moevit.finetune.model import renamed_backbone
from moevit.models.flops import analytic_flops
from moevit.prune.cost import PlanCost
from moevit.prune.criteria import Criterion, select_experts
from moevit.prune.extract import extract, make_manifest, write_pruned
from moevit.prune.run import reference_model
from moevit.prune.source import Source
from moevit.prune.usage import count_routing

TASKS = ("cls", "seg")
# ViTDet-style windows (issue 15): 3x3 windows pad the 4x4 grid, block 3 attends globally. Pruning must be
# as exact on a windowed model, and the pruned model windowed the same way.
WINDOWED = {"window_size": 3, "global_blocks": [3]}
WINDOWS = pytest.mark.parametrize("window", [{}, WINDOWED], ids=["global", "windowed"])


def make_cfg(window: dict | None = None, **moe) -> Config:
    data = {
        "model": {
            "name": "moevit_debug",
            "depth": 4,
            **(window or {}),
            "moe": {"num_experts": 6, "top_k": 2, "task_embedding": True, **moe},
        },
        "tasks": {
            "cls": {"type": "classification", "num_classes": 7},
            "seg": {"type": "segmentation", "num_classes": 3, "head_options": {"channels": 16}},
        },
    }
    return build_config(Config, data)


def trained_like(cfg: Config, seed: int = 0):
    """Random gates, selection biases (as a calibrated run has) and a strong task embedding, as after
    training: routing is uneven and task-specific, and some experts are never selected by a task (the
    embedding pulls its tokens one way)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for _, router in model.backbone.routers():
            for gate in router.gates.values():
                gate.weight.normal_(std=0.5)
                gate.selection_bias.normal_(std=0.5)
        for embedding in model.backbone.task_embed.values():
            embedding.normal_(std=3.0)
    return model


def images(n=6, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def source_of(cfg, model) -> Source:
    return Source(cfg, model, model.state_dict(), run_root=None, tag="test")


def outputs(model, task, x):
    with torch.no_grad():
        out = model.backbone.forward_backbone(x, task)
        return out.tokens, model.predict(task, {"images": x})


@pytest.mark.bit_exact
@WINDOWS
def test_keep_all_gives_identical_outputs(window):
    cfg = make_cfg(window)
    model = trained_like(cfg)
    plan = {name: list(range(layer.num_experts)) for name, layer in model.backbone.mlp_layers().items()}
    pruned, _ = extract(model.state_dict(), cfg, model.backbone, ["cls"], plan)
    x = images()
    for a, b in zip(outputs(model, "cls", x), outputs(pruned, "cls", x)):
        assert torch.equal(a, b)


@pytest.mark.bit_exact
@WINDOWS
@pytest.mark.parametrize("task", TASKS)
def test_removing_never_selected_experts_is_bit_exact_on_the_calibration_set(task, window):
    # top_k=1 and a sharp gate leave several experts unselected; the pruned layers then keep 1..E experts,
    # exercising the top-k clamp and (when one remains) the plain-MLP replacement.
    cfg = make_cfg(window, top_k=1)
    model = trained_like(cfg, seed=3)
    x = images(4)
    usage = count_routing(model.backbone, [(task, x)])
    plan = select_experts(usage, [task], {k: 1 for k in usage}, Criterion("threshold", 0.0))
    assert any(len(ids) < 6 for ids in plan.values()), plan  # something was actually removed
    assert all(all(usage[layer][task][e] > 0 for e in ids) for layer, ids in plan.items())
    pruned, _ = extract(model.state_dict(), cfg, model.backbone, [task], plan)
    for a, b in zip(outputs(model, task, x), outputs(pruned, task, x)):
        assert torch.equal(a, b)


@pytest.mark.bit_exact
def test_removing_unused_experts_with_top2_is_bit_exact():
    cfg = make_cfg()
    model = trained_like(cfg, seed=5)
    x = images(2)
    usage = count_routing(model.backbone, [("seg", x)])
    plan = select_experts(usage, ["seg"], {k: 2 for k in usage}, Criterion("threshold", 0.0))
    pruned, _ = extract(model.state_dict(), cfg, model.backbone, ["seg"], plan)
    assert torch.equal(outputs(model, "seg", x)[1], outputs(pruned, "seg", x)[1])


def test_single_expert_layer_becomes_a_plain_mlp():
    cfg = make_cfg()
    model = trained_like(cfg)
    plan = {name: [2] for name in model.backbone.mlp_layers()}
    pruned, manifest = extract(model.state_dict(), cfg, model.backbone, ["cls"], plan)
    assert not list(pruned.backbone.routed_layers())
    assert manifest.experts_per_block() == {1: 1, 3: 1}
    # Each plain MLP computes what expert 2 computed: every token through that expert alone.
    tokens = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    only_expert_2 = torch.tensor([0, 0, len(tokens), 0, 0, 0])
    with torch.no_grad():
        for name in ("blocks.1.mlp", "blocks.3.mlp"):
            expert = model.backbone.get_submodule(name).experts(tokens, only_expert_2)
            assert torch.equal(pruned.backbone.get_submodule(name)(tokens), expert), name
        prediction = pruned.predict("cls", {"images": images()})
    assert prediction.shape == (6, 7) and torch.isfinite(prediction).all()


@WINDOWS
def test_manifest_round_trip_and_standalone_load(tmp_path, window):
    cfg = make_cfg(window)
    model = trained_like(cfg)
    plan = {"blocks.1.mlp": [0, 4], "blocks.3.mlp": [1, 2, 5]}
    pruned, manifest = extract(
        model.state_dict(), cfg, model.backbone, ["cls", "seg"], plan, criterion="test"
    )
    write_pruned(tmp_path, pruned, manifest, cfg, {})
    again = read_manifest(tmp_path)
    assert (
        again.to_dict()
        == manifest.to_dict()
        == Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).to_dict()
    )
    loaded, _ = load_pruned(tmp_path)
    x = images()
    for task in TASKS:
        assert torch.equal(outputs(loaded, task, x)[1], outputs(pruned, task, x)[1])
    # The manifest carries the window settings, so every rebuild (load, fine-tuning's) is windowed alike.
    assert {k: again.model_args[k] for k in WINDOWED if k in again.model_args} == window
    windows = [block.window_size for block in model.backbone.blocks]
    assert (
        windows
        == [block.window_size for block in loaded.backbone.blocks]
        == ([3, 3, 3, 0] if window else [0] * 4)
    )
    finetuned = renamed_backbone(loaded, again, "cls", "new").eval()
    assert [block.window_size for block in finetuned.blocks] == windows
    with torch.no_grad():
        assert torch.equal(finetuned.forward_features(x, "new"), outputs(loaded, "cls", x)[0])
    # Without DeepSpeed (import blocked) and without the source: a fresh interpreter loads and runs it.
    script = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import torch; from moevit.artifacts.model_dir import load_pruned\n"
        f"m, _ = load_pruned({str(tmp_path)!r})\n"
        "print(tuple(m.predict('cls', {'images': torch.zeros(1, 3, 32, 32)}).shape))\n"
        "assert not any(k.startswith('deepspeed') for k in sys.modules if sys.modules[k] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 7)"


def test_the_manifest_records_the_windows_of_the_model_not_only_of_the_config():
    """A variant whose defaults are windowed would otherwise lose them if it changed: the model decides."""
    windowed = build_model(make_cfg(WINDOWED)).backbone
    plan = {name: list(range(layer.num_experts)) for name, layer in windowed.mlp_layers().items()}
    assert make_manifest(make_cfg(), windowed, ["cls"], plan).model_args["global_blocks"] == [3]
    assert (
        "window_size"
        not in make_manifest(make_cfg(), build_model(make_cfg()).backbone, ["cls"], plan).model_args
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.pop("kept_experts"), "missing field 'kept_experts'"),
        (lambda d: d["kept_experts"].update({"blocks.1.mlp": [3, 1]}), "sorted list"),
        (lambda d: d["kept_experts"].update({"blocks.9.mlp": [0]}), "cannot be built"),
        (lambda d: d["kept_experts"].update({"layer1": [0]}), "not 'blocks.<i>.mlp'"),
        (lambda d: d.update(tasks=["cls", "nope"]), "'heads' must describe exactly the tasks"),
        (lambda d: d.update(task_experts={"cls": {"blocks.1.mlp": 9}}), "'task_experts.cls.blocks.1.mlp'"),
        (lambda d: d.update(task_experts={"zz": {}}), "'task_experts' names 'zz'"),
    ],
)
def test_bad_manifest_gives_a_clear_error(tmp_path, change, message):
    cfg = make_cfg()
    model = trained_like(cfg)
    plan = {"blocks.1.mlp": [0, 4], "blocks.3.mlp": [1, 2]}
    pruned, manifest = extract(model.state_dict(), cfg, model.backbone, ["cls"], plan)
    write_pruned(tmp_path, pruned, manifest, cfg, {})
    data = json.loads((tmp_path / "manifest.json").read_text())
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="manifest.json") as err:
        load_pruned(tmp_path)
    assert message in str(err.value)


def test_unknown_task_and_bad_plan_are_refused():
    cfg = make_cfg()
    model = trained_like(cfg)
    plan = {"blocks.1.mlp": [0], "blocks.3.mlp": [1]}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['det'\]"):
        extract(model.state_dict(), cfg, model.backbone, ["det"], plan)
    with pytest.raises(ValueError, match="not a non-empty sorted subset of 0..5"):
        extract(model.state_dict(), cfg, model.backbone, ["cls"], {"blocks.1.mlp": [6], "blocks.3.mlp": [1]})
    with pytest.raises(ValueError, match="no usage of task 'seg'"):
        select_experts({"blocks.1.mlp": {"cls": [1, 2]}}, ["seg"], {"blocks.1.mlp": 2}, Criterion("top", 1))


def test_criteria_keep_what_they_say():
    usage = {"blocks.1.mlp": {"a": [50, 30, 15, 5, 0, 0], "b": [0, 0, 0, 10, 80, 10]}}
    k = {"blocks.1.mlp": 2}
    assert select_experts(usage, ["a"], k, Criterion("top", 2)) == {"blocks.1.mlp": [0, 1]}
    assert select_experts(usage, ["a"], k, Criterion("mass", 0.8)) == {"blocks.1.mlp": [0, 1]}
    assert select_experts(usage, ["a"], k, Criterion("mass", 0.81)) == {"blocks.1.mlp": [0, 1, 2]}
    # share % > 3 / 2 = 1.5 %: experts 0-3
    assert select_experts(usage, ["a"], k, Criterion("threshold", 3)) == {"blocks.1.mlp": [0, 1, 2, 3]}
    # threshold 100: none passes, fall back to the top-2
    assert select_experts(usage, ["a"], k, Criterion("threshold", 100)) == {"blocks.1.mlp": [0, 1]}
    # several tasks: the union
    assert select_experts(usage, ["a", "b"], k, Criterion("top", 1)) == {"blocks.1.mlp": [0, 4]}


@WINDOWS
@pytest.mark.parametrize("kind", ["params", "gflops"])
def test_budgets_are_respected_by_the_extracted_model(kind, window):
    cfg = make_cfg(window)
    model = trained_like(cfg)
    usage = count_routing(model.backbone, [("cls", images(8))])
    source = source_of(cfg, model)
    cost = PlanCost(reference_model(source, ["cls"]), {"cls": 224, "seg": 224})
    full = {name: 6 for name in usage}
    full_cost = cost.params(full) if kind == "params" else cost.gflops(full)["cls"]
    fn = cost.params if kind == "params" else (lambda counts: cost.gflops(counts)["cls"])
    smallest = fn({name: 1 for name in usage})
    budget = (smallest + full_cost) / 2  # GFLOPs shrink little: only the router and layers under top_k
    plan = select_experts(usage, ["cls"], {n: 2 for n in usage}, Criterion(kind, budget), fn)
    pruned, _ = extract(model.state_dict(), cfg, model.backbone, ["cls"], plan)
    counts = {name: len(ids) for name, ids in plan.items()}
    # The cost model is exact: it matches the extracted model's own counts.
    assert cost.params(counts) == sum(p.numel() for p in pruned.parameters())
    assert cost.gflops(counts)["cls"] == pytest.approx(
        analytic_flops(pruned.backbone, 224, "cls")["gflops"], rel=1e-12
    )
    measured = (
        cost.params(counts) if kind == "params" else analytic_flops(pruned.backbone, 224, "cls")["gflops"]
    )
    assert measured <= budget
    # and it is not trivially small: adding any next expert would break the budget or none is left
    with pytest.raises(ValueError, match="below the smallest pruned model"):
        select_experts(usage, ["cls"], {n: 2 for n in usage}, Criterion(kind, full_cost * 1e-3), fn)
