"""Config checks before any process group starts, and the run directory they guard."""

import pytest

from moevit.artifacts.run_dir import check_output_dir, prepare_run_dir
from moevit.config import ConfigError, build_config, load_config
from moevit.config.schema import Config
from moevit.train.preflight import build_checked_model


def make_config(tmp_path, **sections):
    (tmp_path / "imagenet").mkdir(exist_ok=True)
    data = {
        "tasks": {
            "shapes": {
                "type": "classification",
                "num_classes": 3,
                "data": {"format": "imagenet", "root": str(tmp_path / "imagenet"), "image_size": 32},
            }
        },
        "model": {"name": "moevit_debug"},  # 4 experts, top-2
        "output_dir": str(tmp_path / "run"),
        **sections,
    }
    return build_config(Config, data)


def test_a_valid_config_gives_its_model(tmp_path):
    model = build_checked_model(make_config(tmp_path), world_size=2)
    assert model.tasks == ["shapes"]


def test_task_without_dataset_is_named(tmp_path):
    cfg = make_config(tmp_path)
    cfg.tasks["shapes"].data = None
    with pytest.raises(ConfigError, match=r"'tasks\.shapes\.data'"):
        build_checked_model(cfg, world_size=1, source="demo.yaml")


def test_missing_data_root_is_named(tmp_path):
    cfg = make_config(tmp_path)
    cfg.tasks["shapes"].data.root = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match=r"'tasks\.shapes\.data\.root'.*typo is not a directory"):
        build_checked_model(cfg, world_size=1)


def test_top_k_above_the_variants_expert_count_is_refused(tmp_path):
    # num_experts comes from the variant (4), so only the built model can tell.
    cfg = make_config(tmp_path, model={"name": "moevit_debug", "moe": {"top_k": 5}})
    with pytest.raises(ConfigError, match="top_k"):
        build_checked_model(cfg, world_size=1)


@pytest.mark.parametrize("ep_size, world_size", [(3, 3), (2, 3)])
def test_ep_size_must_divide_world_size_and_experts(tmp_path, ep_size, world_size):
    # ep 3 does not divide the variant's 4 experts; ep 2 does not divide a world of 3.
    cfg = make_config(tmp_path, parallel={"ep_size": ep_size})
    with pytest.raises(ConfigError, match="parallel.ep_size"):
        build_checked_model(cfg, world_size=world_size)


def test_run_dir_holds_the_resolved_config(tmp_path):
    cfg = make_config(tmp_path)
    run = prepare_run_dir(cfg)
    assert all(path.is_dir() for path in (run.tb, run.checkpoints, run.plots))
    assert load_config(run.config_file) == cfg


def test_fresh_run_into_a_run_dir_with_checkpoints_is_refused(tmp_path):
    cfg = make_config(tmp_path)
    run = prepare_run_dir(cfg)
    check_output_dir(cfg, resume=None)  # empty checkpoints/: fine
    (run.checkpoints / "step_0000010").mkdir()
    with pytest.raises(ConfigError, match="--resume auto"):
        check_output_dir(cfg, resume=None)
    check_output_dir(cfg, resume="auto")
