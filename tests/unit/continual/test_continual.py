"""Continual learning (issue 7), single process: restricted routers are bit-exact, expansion keeps the old
tasks' outputs bit-identical, and freezing really freezes (no gradient, outside the optimizer, unchanged
by AdamW's weight decay) while the new task's parameters train."""

from __future__ import annotations

import json

import pytest
import torch

from moevit.artifacts.model_dir import load_pruned
from moevit.config import build_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.continual.expand import (
    build_expanded,
    check_old_tasks_unchanged,
    expanded_config,
    experts_per_layer,
    new_task_config,
    rank_experts,
)
from moevit.continual.freeze import freeze_for_continual
from moevit.factory import build_model
from moevit.layers.aux_losses import load_balance_loss
from moevit.layers.router import TaskRouter
from moevit.models.param_names import task_of as task_of_parameter
from moevit.parallel.engine import optimizer_param_groups
from moevit.parallel.expert_parallel import apply_expert_parallel
from moevit.prune.criteria import Criterion, select_experts
from moevit.prune.extract import extract, restricted_tasks, write_pruned

SIZE = 32


def make_cfg(ep_size: int = 1, window: dict | None = None) -> Config:
    def data(fmt):
        return {"format": fmt, "root": "unused", "image_size": SIZE, "batch_size": 4}

    return build_config(
        Config,
        {
            "model": {"name": "moevit_debug", **(window or {}), "moe": {"task_embedding": True}},
            "tasks": {
                "cls": {"type": "classification", "num_classes": 3, "data": data("imagenet")},
                "seg": {
                    "type": "segmentation",
                    "num_classes": 4,
                    "data": data("ade20k"),
                    "head_options": {"channels": 16},
                },
            },
            "parallel": {"ep_size": ep_size},
        },
    )


# Every test runs on a global and on a ViTDet-windowed model (issue 15: 3x3 windows pad the 4x4 grid,
# block 3 attends globally): expansion, freezing and the model directory must keep windows as they are.
@pytest.fixture(
    scope="module", params=[{}, {"window_size": 3, "global_blocks": [3]}], ids=["global", "windowed"]
)
def source(request):
    cfg = make_cfg(window=request.param)
    torch.manual_seed(0)
    model = build_model(cfg)
    with (
        torch.no_grad()
    ):  # trained-looking gates, selection biases and embeddings: routing that depends on them
        for name, param in model.state_dict(keep_vars=True).items():
            if ".gates." in name or "task_embed" in name:
                param.normal_()
    return cfg, model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


def expand(source, new_experts: int = 2, init: str = "copy"):
    cfg, model, state = source
    old = experts_per_layer(model)
    new_cfg = expanded_config(
        cfg, old, "new", new_task_config("classification", 5, "unused", SIZE, 4), new_experts, "x"
    )
    # No usage recorded: every expert ties, so copies start from the lowest ids.
    zeros = {layer: dict.fromkeys(cfg.tasks, [0] * old) for layer in model.backbone.mlp_layers()}
    usage = zeros if init == "copy" else None
    expanded, copied_from = build_expanded(new_cfg, model, state, "new", new_experts, init, usage)
    return new_cfg, expanded, copied_from


@pytest.mark.bit_exact
def test_restricted_router_is_bit_identical_and_never_reaches_new_experts():
    torch.manual_seed(1)
    x = torch.randn(50, 16)
    small = TaskRouter(16, 4, 2, ["a"])
    large = TaskRouter(16, 7, 2, ["a", "b"], task_experts={"a": 4})
    with torch.no_grad():
        small.gates["a"].weight.normal_()
        large.gates["a"].weight.copy_(small.gates["a"].weight)
        large.gates["b"].weight.normal_()
    before, after = small(x, "a"), large(x, "a")
    assert torch.equal(before.expert_idx_TK, after.expert_idx_TK)
    assert torch.equal(before.weights_TK, after.weights_TK)
    assert torch.equal(before.z_loss, after.z_loss)
    assert torch.equal(after.probs_sum_E[:4], before.probs_sum_E) and not after.probs_sum_E[4:].any()
    assert after.counts_E.shape == (7,) and not after.counts_E[4:].any()
    assert torch.equal(load_balance_loss([before]), load_balance_loss([after]))
    large.force_balanced = True
    assert int(large(x, "a").expert_idx_TK.max()) == 3
    assert int(large(x, "b").expert_idx_TK.max()) == 6
    # Fewer routable experts than top_k (a pruned model can leave a task that): it routes to all of them.
    one = TaskRouter(16, 4, 2, ["a"], task_experts={"a": 1})(x, "a")
    assert one.expert_idx_TK.shape == (50, 1) and not one.expert_idx_TK.any()
    assert torch.equal(one.weights_TK, torch.ones(50, 1))
    for bad in (0, 5):
        with pytest.raises(ValueError, match="task_experts"):
            TaskRouter(16, 4, 2, ["a"], task_experts={"a": bad})
    with pytest.raises(ValueError, match="not tasks"):
        TaskRouter(16, 4, 2, ["a"], task_experts={"z": 2})


@pytest.mark.bit_exact
def test_expansion_keeps_old_tasks_bit_identical(source):
    cfg, model, state = source
    new_cfg, expanded, copied_from = expand(source)
    assert new_cfg.model.moe.num_experts == 6 and new_cfg.continual.frozen_experts == 4
    assert new_cfg.continual.task_experts == {"cls": 4, "seg": 4} and new_cfg.continual.train_tasks == ["new"]
    check_old_tasks_unchanged(model, expanded, {"cls": SIZE, "seg": SIZE})  # raises when not bit-identical
    for layer, ids in copied_from.items():
        key = f"backbone.{layer}.experts.fc1_weight"
        weights = expanded.state_dict()[key]
        assert torch.equal(weights[:4], state[key]) and torch.equal(weights[4:], state[key][ids])
        assert expanded.state_dict()[f"backbone.{layer}.router.gates.new.weight"].shape[0] == 6
        assert expanded.state_dict()[f"backbone.{layer}.router.gates.cls.weight"].shape[0] == 4
    _, fresh, _ = expand(source, init="fresh")
    key = "backbone.blocks.1.mlp.experts.fc1_weight"
    assert not any(
        torch.equal(fresh.state_dict()[key][4 + j], state[key][e]) for j in range(2) for e in range(4)
    )


def test_expansion_refuses_bad_requests(source):
    cfg, model, _ = source
    task = new_task_config("classification", 5, None, SIZE, 4)
    with pytest.raises(ConfigError, match="not divisible by parallel.ep_size=2"):
        expanded_config(make_cfg(ep_size=2), 4, "new", task, 1, "x")
    with pytest.raises(ValueError, match="already has that task"):
        expanded_config(cfg, 4, "cls", task, 2, "x")
    with pytest.raises(ValueError, match="must not change"):
        expanded_config(cfg, 4, "new", task, 2, "x", ["model.moe.num_experts=8"])
    assert rank_experts({"a": [1, 5, 0, 5], "b": [0, 0, 0, 0]}, 4) == [1, 3, 0, 2]


@pytest.mark.bit_exact
def test_freezing_really_freezes_under_adamw_weight_decay(source):
    new_cfg, model, _ = expand(source)
    freeze_for_continual(model, ["new"], new_cfg.continual.frozen_experts)
    apply_expert_parallel(model, 1)  # as the engine does: every expert its own parameters
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        task_of_parameter(name) == "new" or ".deepspeed_experts.4." in name or ".deepspeed_experts.5." in name
        for name in trainable
    )
    assert "backbone.task_embed.new" in trainable
    groups = optimizer_param_groups(model, weight_decay=0.5)
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert in_optimizer == {id(params[name]) for name in trainable}
    frozen = {name: p.detach().clone() for name, p in params.items() if name not in trainable}
    before_new = {name: params[name].detach().clone() for name in trainable}
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.eval()
        old_out = {task: model.predict(task, {"images": images}) for task in ("cls",)}
        model.train()

    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    batch = {"images": images, "labels": torch.tensor([0, 1, 2, 4])}
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        out = model("new", batch)
        loss = out.losses["loss"] + load_balance_loss(list(out.routing.values()))
        loss.backward()
        assert all(params[name].grad is None for name in frozen)
        optimizer.step()

    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    changed = {name for name in trainable if not torch.equal(params[name], before_new[name])}
    assert any(".deepspeed_experts.4." in n for n in changed) and "heads.new.fc.weight" in changed
    assert any(".gates.new." in n for n in changed)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.predict("cls", {"images": images}), old_out["cls"])


def test_freezing_survives_expert_parallel_wrapping_and_refuses_sharded_models(source):
    _, model, _ = expand(source)
    for param in model.backbone.blocks[1].mlp.experts.parameters():  # a plainly frozen stacked tensor
        param.requires_grad_(False)
    apply_expert_parallel(model, 1)
    assert not any(p.requires_grad for p in model.backbone.blocks[1].mlp.experts.parameters())
    with pytest.raises(ValueError, match="freeze the single-device model"):
        freeze_for_continual(model, ["new"], 4)


def test_training_view_keeps_only_the_tasks_that_train(source):
    new_cfg, _, _ = expand(source)
    view = new_cfg.training_view()
    assert list(view.tasks) == ["new"] and list(new_cfg.tasks) == ["cls", "seg", "new"]
    plain = make_cfg()  # no continual section: every task trains, the config is its own view
    assert plain.training_view() is plain


def test_start_continual_loads_the_expansion_and_refuses_a_mismatched_one(source, tmp_path):
    import dataclasses

    from moevit.artifacts.model_dir import WEIGHTS_FILE

    def write_expand_manifest(directory, record):  # the record `moevit expand` wrote before 2026-12-06
        (directory / "expand.json").write_text(
            json.dumps({"format": "moevit-expanded", "version": 1, **record})
        )

    from moevit.continual.start import start_continual

    new_cfg, expanded, _ = expand(source)
    torch.save(expanded.state_dict(), tmp_path / WEIGHTS_FILE)
    spec = dataclasses.replace(new_cfg.continual, init=str(tmp_path))
    cfg = dataclasses.replace(new_cfg, continual=spec)
    write_expand_manifest(tmp_path, {"frozen_experts": 4, "task_experts": {"cls": 4, "seg": 4}})
    torch.manual_seed(5)
    model = build_model(cfg)
    counts = start_continual(model, cfg)
    assert 0 < counts["trainable"] < counts["total"]
    assert all(torch.equal(v, expanded.state_dict()[k]) for k, v in model.state_dict().items())
    write_expand_manifest(tmp_path, {"frozen_experts": 2, "task_experts": {"cls": 4, "seg": 4}})
    with pytest.raises(ConfigError, match="was expanded with"):
        start_continual(build_model(cfg), cfg)
    missing = dataclasses.replace(cfg, continual=dataclasses.replace(spec, init=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="holds no model.pt"):
        start_continual(build_model(missing), missing)


@pytest.mark.bit_exact
def test_an_expanded_model_prunes_for_old_and_new_tasks_together(source, tmp_path):
    """Pruning composes with expansion: the old task reaches only its own experts in the pruned model too."""
    new_cfg, expanded, _ = expand(source)  # 4 old + 2 new experts per layer
    expanded = expanded.eval()
    state = expanded.state_dict()
    layers = expanded.backbone.mlp_layers()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))

    def outputs(model, task):
        with torch.no_grad():
            return model.predict(task, {"images": x})

    keep_all = {name: list(range(layer.num_experts)) for name, layer in layers.items()}
    pruned, manifest = extract(state, new_cfg, expanded.backbone, ["cls", "new"], keep_all)
    assert manifest.task_experts == {"cls": {name: 4 for name in layers}}
    for task in ("cls", "new"):
        assert torch.equal(outputs(pruned, task), outputs(expanded, task))
    write_pruned(tmp_path, pruned, manifest, new_cfg, {})
    loaded, again = load_pruned(tmp_path)
    assert again.task_experts == manifest.task_experts
    assert torch.equal(outputs(loaded, "cls"), outputs(expanded, "cls"))

    # A plan keeping old expert 1 and new expert 5: cls reaches one expert there (top-1 over it).
    plan = {name: [1, 5] for name in layers}
    pruned, manifest = extract(state, new_cfg, expanded.backbone, ["cls", "new"], plan)
    assert manifest.task_experts == {"cls": {name: 1 for name in layers}}
    first = next(iter(pruned.backbone.mlp_layers().values()))
    assert first.router.routable_experts("cls") == 1 and first.router.routable_experts("new") == 2
    # cls computes exactly what a model keeping only expert 1 for it computes: new expert 5, kept for
    # `new`, never reaches it. `new` still routes over both kept experts, so its output changes.
    cls_only, _ = extract(state, new_cfg, expanded.backbone, ["cls"], {name: [1] for name in layers})
    assert torch.equal(outputs(pruned, "cls"), outputs(cls_only, "cls"))
    assert not torch.equal(outputs(pruned, "new"), outputs(expanded, "new"))

    # Criteria judge the old task on the experts it can reach: "keep all" of cls is its 4 old experts.
    usage = {name: {"cls": [5, 1, 1, 1, 0, 0], "new": [0, 0, 0, 0, 3, 4]} for name in layers}
    routable = restricted_tasks(expanded.backbone)
    top_k = {name: 2 for name in layers}
    assert select_experts(usage, ["cls"], top_k, Criterion("all"), routable=routable) == {
        name: [0, 1, 2, 3] for name in layers
    }
    assert select_experts(usage, ["cls", "new"], top_k, Criterion("top", 1), routable=routable) == {
        name: [0, 5] for name in layers
    }
    for only_new in ([4, 5], [5]):  # also a layer left with one (new) expert: a plain MLP cls never trained
        with pytest.raises(ValueError, match="no expert it can route to"):
            extract(state, new_cfg, expanded.backbone, ["cls", "new"], {name: only_new for name in layers})


def test_train_shared_also_trains_the_shared_weights_and_nothing_old(source):
    """continual.train_shared: the shared weights train too (the old tasks' outputs may then change, by
    choice); old experts, old gates, old heads and old task embeddings stay frozen either way."""
    _, expanded, _ = expand(source)
    counts = {}
    for shared in (False, True):
        counts[shared] = freeze_for_continual(expanded, ["new"], frozen_experts=4, train_shared=shared)
        for name, param in expanded.named_parameters():
            task = task_of_parameter(name)
            if task is not None:
                assert param.requires_grad == (task == "new"), name
            elif ".experts." not in name:
                assert param.requires_grad == shared, name
    shared_params = sum(
        p.numel()
        for n, p in expanded.named_parameters()
        if task_of_parameter(n) is None and ".experts." not in n
    )
    assert counts[True]["trainable"] - counts[False]["trainable"] == shared_params > 0


def test_an_expanded_model_is_a_standalone_model_directory(source, tmp_path):
    """`moevit expand` writes the format pruned models use: it rebuilds and loads from its manifest alone,
    and the manifest's "continual" section is what start_continual checks."""
    from moevit.artifacts.model_dir import WEIGHTS_FILE, read_continual_record, write_manifest
    from moevit.prune.extract import make_manifest

    new_cfg, expanded, _ = expand(source)
    every_expert = {
        name: list(range(layer.num_experts)) for name, layer in expanded.backbone.mlp_layers().items()
    }
    record = {"frozen_experts": 4, "task_experts": {"cls": 4, "seg": 4}, "new_task": "new"}
    write_manifest(
        tmp_path,
        make_manifest(new_cfg, expanded.backbone, list(new_cfg.tasks), every_expert, continual=record),
    )
    torch.save(expanded.state_dict(), tmp_path / WEIGHTS_FILE)

    loaded, manifest = load_pruned(tmp_path)
    assert manifest.tasks == ["cls", "seg", "new"] and read_continual_record(tmp_path) == record
    windows = [block.window_size for block in source[1].backbone.blocks]
    assert [block.window_size for block in loaded.backbone.blocks] == windows
    assert [block.window_size for block in expanded.backbone.blocks] == windows
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for task in manifest.tasks:
            expected = expanded.eval().backbone.forward_backbone(images, task)
            got = loaded.backbone.forward_backbone(images, task)
            assert torch.equal(got.tokens, expected.tokens), task


def test_a_run_started_from_model_init_expands_from_its_checkpoint_alone():
    """The expanded config starts from `continual.init`: the source run's `model.init` is dropped (a
    config may not name both starts)."""
    import dataclasses

    cfg = make_cfg()
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, init="vit.pth", init_expert_noise=0.01)
    )
    new_cfg = expanded_config(cfg, 4, "new", new_task_config("classification", 5, "unused", SIZE, 4), 2, "x")
    assert new_cfg.model.init is None and new_cfg.model.init_expert_noise is None
    assert new_cfg.continual.init == "x"
