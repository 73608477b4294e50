"""The optional Weights & Biases sink (moevit.train.wandb_sink), against a stub `wandb` module (the package is
not installed here): used only when asked for, refused before training when asked for but missing."""

import sys
import types

import pytest

from moevit.config import build_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.train.preflight import build_checked_model
from moevit.train.wandb_sink import WandbSink, check_wandb_available


def stub_wandb() -> types.ModuleType:
    """A `wandb` module recording init's arguments and its run's log and finish calls."""
    module = types.ModuleType("wandb")
    module.calls = []

    class Run:
        def log(self, values, step=None):
            module.calls.append(("log", values, step))

        def finish(self):
            module.calls.append(("finish",))

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        return Run()

    module.init = init
    return module


def config(tiny_config, synth_root, tmp_path, **wandb) -> Config:
    return build_config(
        Config,
        tiny_config(synth_root, tmp_path / "run", datasets=["imagenet"], train={"wandb": wandb}),
    )


def test_the_sink_logs_to_a_wandb_run(tiny_config, synth_root, tmp_path, monkeypatch):
    stub = stub_wandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    cfg = config(tiny_config, synth_root, tmp_path, enabled=True, project="p", name="n", mode="online")
    check_wandb_available(cfg)  # the stub counts as installed
    sink = WandbSink(cfg, tmp_path / "run")
    sink.log({"train/mfu": 0.3}, step=5)
    sink.close()
    (_, init), log, finish = stub.calls
    assert {k: init[k] for k in ("project", "name", "mode", "dir")} == {
        "project": "p",
        "name": "n",
        "mode": "online",
        "dir": str(tmp_path / "run"),
    }
    assert init["config"]["train"]["wandb"]["project"] == "p"  # the whole config, for the run's page
    assert log == ("log", {"train/mfu": 0.3}, 5) and finish == ("finish",)


def test_asking_for_wandb_without_the_package_is_a_config_error(
    tiny_config, synth_root, tmp_path, monkeypatch
):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    cfg = config(tiny_config, synth_root, tmp_path, enabled=True)
    with pytest.raises(ConfigError, match=r"train\.wandb\.enabled.*wandb package is not installed") as err:
        build_checked_model(cfg, world_size=1, source="run.yaml")  # the preflight of train and submit
    assert "\n" not in str(err.value) and "run.yaml" in str(err.value)
    check_wandb_available(config(tiny_config, synth_root, tmp_path))  # off by default: nothing needed


def test_the_wandb_section_is_strict(tiny_config, synth_root, tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        config(tiny_config, synth_root, tmp_path, mode="cloud")
    with pytest.raises(ConfigError, match="project"):
        config(tiny_config, synth_root, tmp_path, project="")
