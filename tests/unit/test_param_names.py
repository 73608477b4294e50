"""The model's state-dict adapter (moevit.models.param_names) against the names real models have: a
renamed module fails here, not in pruning, continual learning or fine-tuning at run time."""

import pytest

from moevit.heads import build_head
from moevit.models import create_model
from moevit.models.multitask import MultiTaskModel
from moevit.models.param_names import (
    ParamName,
    expert_key,
    expert_part_of_dense,
    is_mlp_layer,
    mlp_layer_index,
    parse_key,
    task_of,
    with_task,
)

TASKS = ["cls", "seg"]


def multitask_model() -> MultiTaskModel:
    backbone = create_model("moevit_debug", tasks=TASKS, task_embedding=True, attention_experts=4)
    heads = {task: build_head("classification", 3, backbone, 32) for task in TASKS}
    return MultiTaskModel(backbone, heads)


def test_every_key_of_a_multitask_model_is_classified():
    model = multitask_model()
    names = {key: parse_key(key) for key in model.state_dict()}
    kinds = {name.kind for name in names.values()}
    assert kinds == {"expert", "gate", "task_embedding", "dense_mlp", "head", "other"}
    moe_layers = {name for name, _ in model.backbone.routed_layers() if is_mlp_layer(name)}
    assert {n.layer for n in names.values() if n.kind == "expert"} == moe_layers
    # Each MoE MLP layer has one gate per task; the attention experts' routers are gates too.
    gates = {(n.layer, n.task) for n in names.values() if n.kind == "gate"}
    assert {(layer, task) for layer in moe_layers for task in TASKS} <= gates
    assert any(layer.endswith(".attn") for layer, _ in gates)
    for key, name in names.items():
        if name.kind == "other":
            assert ".router." not in key and "task_embed" not in key and ".experts." not in key, key
        if name.kind in ("gate", "task_embedding", "head"):
            assert name.task in TASKS and task_of(key) == name.task
        else:
            assert task_of(key) is None


def test_names_the_adapter_spells_are_the_models():
    model = multitask_model()
    keys = set(model.state_dict())
    for key in keys:
        name = parse_key(key)
        if name.kind == "expert":
            assert expert_key(name.layer, name.part) == key
        if name.kind in ("gate", "task_embedding"):
            other = "seg" if name.task == "cls" else "cls"
            assert with_task(key, other) in keys  # the same parameter of the other task
        if name.kind == "dense_mlp":  # the same block as an MoE layer stores this linear as
            assert expert_part_of_dense(name.part) in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    bare = set(model.backbone.state_dict())
    assert {key.removeprefix("backbone.") for key in keys if key.startswith("backbone.")} == bare
    assert all(parse_key(key, prefix="") == parse_key(f"backbone.{key}") for key in bare)


def test_layer_names():
    assert mlp_layer_index("blocks.11.mlp") == 11 and is_mlp_layer("blocks.11.mlp")
    assert not is_mlp_layer("blocks.1.attn") and not is_mlp_layer("blocks.1.mlpx")
    with pytest.raises(ValueError, match="not an MLP layer"):
        mlp_layer_index("blocks.1.attn")
    with pytest.raises(ValueError, match="belongs to no task"):
        with_task("backbone.blocks.1.mlp.experts.fc1_weight", "cls")


def test_legacy_usage_counters_are_recognised():
    key = "backbone.blocks.1.mlp.router.gates.cls.usage"  # what files written before 2026-12-06 hold
    assert parse_key(key) == ParamName("gate_usage", "blocks.1.mlp", "cls")
    # Loading drops them (tests/unit/test_models.py); nothing maps them key by key any more.
