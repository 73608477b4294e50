"""Tests for the strict config loader (moevit/config/loader.py) on a small schema defined here."""

# String annotations on purpose: the loader must resolve them with typing.get_type_hints.
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from moevit.config.errors import ConfigError
from moevit.config.loader import apply_overrides, build_config, config_to_dict, load_config, save_config

SOURCE = "configs/demo.yaml"


@dataclass
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2
    layers: list[int] = field(default_factory=lambda: [1, 3])

    def validate(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")


@dataclass
class MoAConfig:
    num_heads: int = 4


@dataclass
class ModelConfig:
    name: str = "moevit_tiny"
    moe: MoEConfig = field(default_factory=MoEConfig)
    use_task_embedding: bool = False
    attention: Literal["dense", "moa"] = "dense"
    moe_blocks: str | list[int] = "every_2"
    moa: MoAConfig | None = None


@dataclass
class TaskConfig:
    kind: Literal["classification", "detection", "segmentation"]
    data_root: Path
    weight: float = 1.0
    image_size: tuple[int, int] = (224, 224)

    def validate(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    steps: int = 10
    warmup: Optional[int] = None  # noqa: UP045 -- the typing.Optional spelling must work too
    betas: tuple[float, ...] = (0.9, 0.999)
    extra: Any = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    out_dir: Path = Path("runs/demo")

    def validate(self) -> None:
        if len(self.tasks) > self.model.moe.num_experts:
            raise ValueError(f"{len(self.tasks)} tasks but only {self.model.moe.num_experts} experts")


CLS_TASK = {"kind": "classification", "data_root": "/data/imagenet"}


def build_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(Config, data, source=SOURCE)
    return str(info.value)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_missing_keys_take_the_dataclass_defaults():
    assert build_config(Config, {}) == Config()


def test_unknown_top_level_key_names_file_and_suggests():
    assert build_error({"modle": {}}) == f"{SOURCE}: unknown key 'modle' (did you mean 'model'?)"


def test_unknown_nested_key_names_dotted_path_and_suggests():
    message = build_error({"model": {"moe": {"topk": 2}}})
    assert message == f"{SOURCE}: unknown key 'model.moe.topk' (did you mean 'top_k'?)"


def test_unknown_key_without_close_match_lists_valid_keys():
    message = build_error({"train": {"zzz": 1}})
    assert "unknown key 'train.zzz' (valid keys: lr, steps, warmup, betas, extra)" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"lr": "abc"}}, "'train.lr' must be float, got str 'abc'"),
        ({"train": {"lr": True}}, "'train.lr' must be float, got bool True"),
        ({"train": {"lr": None}}, "'train.lr' must be float, got null"),
        ({"train": {"steps": 2.5}}, "'train.steps' must be int, got float 2.5"),
        ({"train": {"steps": True}}, "'train.steps' must be int, got bool True"),
        ({"train": {"steps": "10"}}, "'train.steps' must be int, got str '10'"),
        ({"model": {"use_task_embedding": 1}}, "'model.use_task_embedding' must be bool, got int 1"),
        ({"model": {"use_task_embedding": "yes"}}, "'model.use_task_embedding' must be bool, got str 'yes'"),
        ({"model": {"name": 3}}, "'model.name' must be str, got int 3"),
        ({"out_dir": 5}, "'out_dir' must be Path, got int 5"),
        ({"model": [1]}, "'model' must be a ModelConfig mapping, got list [1]"),
        ({"tasks": [CLS_TASK]}, "'tasks' must be dict[str, TaskConfig], got list"),
    ],
)
def test_wrong_scalar_and_container_types_are_named(data, expected):
    message = build_error(data)
    assert message.startswith(f"{SOURCE}: ")
    assert expected in message


def test_float_accepts_ints_and_numeric_strings():
    # YAML 1.1 (PyYAML) reads `lr: 1e-3` as the string '1e-3'.
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}
    train = build_config(Config, {"train": {"lr": "1e-3"}}).train
    assert train.lr == 1e-3
    lr = build_config(Config, {"train": {"lr": 1}}).train.lr
    assert lr == 1.0 and type(lr) is float


def test_literal_violation_lists_allowed_values():
    message = build_error({"model": {"attention": "sparse"}})
    assert message == f"{SOURCE}: 'model.attention' must be one of 'dense', 'moa', got str 'sparse'"


def test_list_element_error_names_the_index():
    message = build_error({"model": {"moe": {"layers": [1, 3, "x"]}}})
    assert message == f"{SOURCE}: 'model.moe.layers[2]' must be int, got str 'x'"
    assert "'model.moe.layers' must be list[int], got int 3" in build_error({"model": {"moe": {"layers": 3}}})


def test_tuples_are_built_from_lists_and_fixed_lengths_checked():
    cfg = build_config(
        Config, {"train": {"betas": [0.8, 0.9, 1]}, "tasks": {"a": {**CLS_TASK, "image_size": [8, 16]}}}
    )
    assert cfg.train.betas == (0.8, 0.9, 1.0)
    assert cfg.tasks["a"].image_size == (8, 16)
    message = build_error({"tasks": {"a": {**CLS_TASK, "image_size": [8, 16, 32]}}})
    assert "'tasks.a.image_size' must have 2 items, got 3" in message
    assert "'train.betas[1]' must be float, got str 'x'" in build_error({"train": {"betas": [0.9, "x"]}})


def test_dict_of_dataclasses_builds_each_entry():
    cfg = build_config(
        Config, {"tasks": {"cls": CLS_TASK, "det": {"kind": "detection", "data_root": "coco"}}}
    )
    assert cfg.tasks == {
        "cls": TaskConfig(kind="classification", data_root=Path("/data/imagenet")),
        "det": TaskConfig(kind="detection", data_root=Path("coco")),
    }
    message = build_error({"tasks": {"cls": {**CLS_TASK, "wieght": 2.0}}})
    assert message == f"{SOURCE}: unknown key 'tasks.cls.wieght' (did you mean 'weight'?)"
    assert "'tasks.seg.kind' must be one of" in build_error({"tasks": {"seg": {**CLS_TASK, "kind": "seg"}}})


def test_missing_required_key_is_an_error():
    message = build_error({"tasks": {"det": {"kind": "detection"}}})
    assert message == f"{SOURCE}: missing required key 'tasks.det.data_root'"


def test_unions_try_members_in_order():
    assert build_config(Config, {"model": {"moe_blocks": "last_4"}}).model.moe_blocks == "last_4"
    assert build_config(Config, {"model": {"moe_blocks": [0, 2]}}).model.moe_blocks == [0, 2]
    assert "'model.moe_blocks' must be str | list[int], got int 3" in build_error(
        {"model": {"moe_blocks": 3}}
    )
    # The list member accepted the shape, so its error about the element is the one reported.
    assert "'model.moe_blocks[1]' must be int, got str 'a'" in build_error(
        {"model": {"moe_blocks": [0, "a"]}}
    )
    assert build_config(Config, {"train": {"warmup": None}}).train.warmup is None
    assert build_config(Config, {"train": {"warmup": 5}}).train.warmup == 5
    assert "'train.warmup' must be int | None, got str 'x'" in build_error({"train": {"warmup": "x"}})


def test_optional_dataclass_reports_errors_inside_it():
    assert build_config(Config, {"model": {"moa": None}}).model.moa is None
    assert build_config(Config, {"model": {"moa": {}}}).model.moa == MoAConfig()
    message = build_error({"model": {"moa": {"num_head": 2}}})
    assert message == f"{SOURCE}: unknown key 'model.moa.num_head' (did you mean 'num_heads'?)"
    assert "'model.moa' must be MoAConfig | None, got int 3" in build_error({"model": {"moa": 3}})


def test_any_accepts_everything():
    assert build_config(Config, {"train": {"extra": {"k": [1, "v"]}}}).train.extra == {"k": [1, "v"]}


def test_validate_hooks_are_wrapped_with_node_path_and_source():
    message = build_error({"model": {"moe": {"top_k": 5}}})
    assert message == f"{SOURCE}: model.moe: top_k (5) must be <= num_experts (4)"
    message = build_error({"tasks": {"cls": {**CLS_TASK, "weight": 0}}})
    assert message == f"{SOURCE}: tasks.cls: weight must be > 0, got 0.0"
    tasks = {name: CLS_TASK for name in "abcde"}
    assert build_error({"tasks": tasks}) == f"{SOURCE}: 5 tasks but only 4 experts"


def test_validate_runs_children_before_parents():
    # Both the task entry and the root check fail; the child's error must be the one reported.
    tasks = {name: {**CLS_TASK, "weight": -1} for name in "abcde"}
    assert "tasks.a: weight must be > 0" in build_error({"tasks": tasks})


def test_apply_overrides_parses_values_as_yaml_and_creates_sections():
    data = {"model": {"moe": {"top_k": 1}}}
    overrides = ["model.moe.top_k=2", "model.use_task_embedding=true", "model.moe.layers=[1, 2]"]
    overrides += ["train.warmup=null", "train.lr=1e-3", "model.name=moevit_small", "tasks.cls.weight=0.5"]
    assert apply_overrides(data, overrides) == {
        "model": {"moe": {"top_k": 2, "layers": [1, 2]}, "use_task_embedding": True, "name": "moevit_small"},
        "train": {"warmup": None, "lr": "1e-3"},
        "tasks": {"cls": {"weight": 0.5}},
    }
    assert data == {"model": {"moe": {"top_k": 1}}}, "the input must not be modified"


@pytest.mark.parametrize("override", ["model.moe.top_k", "=3", "model..top_k=2", "model.=1", "a=[1"])
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    assert str(info.value).startswith(f"override '{override}': ")


def test_override_through_a_scalar_is_refused():
    with pytest.raises(
        ConfigError, match=r"override 'model.name.x=1': 'model.name' is str 'a', not a mapping"
    ):
        apply_overrides({"model": {"name": "a"}}, ["model.name.x=1"])


def test_load_config_applies_overrides(tmp_path):
    path = write_yaml(tmp_path, "model:\n  moe:\n    top_k: 1\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(
        path, ["model.moe.top_k=2", "tasks.cls.kind=classification", "tasks.cls.data_root=/d"], Config
    )
    assert cfg.model.moe.top_k == 2
    assert cfg.train.lr == 1e-3
    assert cfg.tasks["cls"] == TaskConfig(kind="classification", data_root=Path("/d"))


def test_errors_from_overrides_name_the_override_not_the_file(tmp_path):
    path = write_yaml(tmp_path, "model:\n  moe:\n    top_k: 1\n")
    cases = {
        "model.moe.topk=2": "unknown key 'model.moe.topk' (did you mean 'top_k'?)",
        "modle.moe.top_k=2": "unknown key 'modle' (did you mean 'model'?)",
        "train.lr=abc": "'train.lr' must be float, got str 'abc'",
        "tasks.x.kind=detection": "missing required key 'tasks.x.data_root'",
    }
    for override, problem in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, [override], Config)
        assert str(info.value) == f"override '{override}': {problem}"


def test_file_errors_still_name_the_file_when_overrides_are_given(tmp_path):
    path = write_yaml(tmp_path, "model:\n  moe:\n    topk: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=0.1"], Config)
    assert str(info.value) == f"{path}: unknown key 'model.moe.topk' (did you mean 'top_k'?)"


def test_cross_field_errors_mention_the_overrides_below_the_node(tmp_path):
    path = write_yaml(tmp_path, "model:\n  moe:\n    top_k: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.moe.num_experts=2"], Config)
    message = str(info.value)
    assert (
        message
        == f"{path} (with override 'model.moe.num_experts=2'): model.moe: top_k (4) must be <= num_experts (2)"
    )
    # An override may also repair what the file alone gets wrong: the check runs on the merged config.
    assert load_config(path, ["model.moe.num_experts=8"], Config).model.moe.num_experts == 8


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(
        ConfigError, match=r"nope\.yaml: cannot read config file \(No such file or directory\)"
    ):
        load_config(path, schema_cls=Config)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  name: a\n  moe: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, schema_cls=Config)
    assert str(info.value).startswith(f"{path}:4:")
    assert "invalid YAML" in str(info.value)


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:3: invalid YAML: duplicate key 'lr'$"):
        load_config(path, schema_cls=Config)


@pytest.mark.parametrize(("text", "got"), [("- 1\n- 2\n", "list [1, 2]"), ("", "null"), ("3\n", "int 3")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, schema_cls=Config)
    assert str(info.value) == f"{path}: the top level must be a mapping, got {got}"


def test_save_and_load_round_trip(tmp_path):
    data = {
        "model": {"moe": {"num_experts": 8, "layers": [0, 2, 4]}, "moe_blocks": [1, 3], "attention": "moa"},
        "train": {"lr": "3e-4", "warmup": 2, "betas": [0.9, 0.95]},
        "tasks": {
            "cls": CLS_TASK,
            "seg": {"kind": "segmentation", "data_root": "ade", "image_size": [64, 64]},
        },
        "out_dir": "/tmp/run",
    }
    cfg = build_config(Config, data)
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(path, schema_cls=Config) == cfg
    assert build_config(Config, config_to_dict(cfg)) == cfg
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["model", "train", "tasks", "out_dir"], "dataclass field order, not sorted"
    assert saved["train"]["betas"] == [0.9, 0.95] and saved["out_dir"] == "/tmp/run"


def test_save_is_atomic_when_serialization_fails_midway(tmp_path):
    path = tmp_path / "resolved.yaml"
    save_config(Config(), path)
    before = path.read_text()
    # `out_dir` is the last field, so the dumper has already written the earlier sections when it fails.
    broken = replace(Config(), out_dir=object())
    with pytest.raises(yaml.representer.RepresenterError):
        save_config(broken, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"], "the temporary file must be removed"
