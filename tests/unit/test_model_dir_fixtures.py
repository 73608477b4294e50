"""Model directories written by earlier versions still load, and mean the same model
(tests/fixtures/model_dirs/README.md): the same tokens within float rounding."""

from pathlib import Path

import torch

from moevit.artifacts.model_dir import load_pruned
from moevit.config import load_config
from moevit.continual.start import start_continual
from moevit.factory import build_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model_dirs"


def assert_same_tokens(model, expected, tasks):
    with torch.no_grad():
        for task in tasks:
            tokens = model.backbone.forward_backbone(expected["images"], task).tokens
            # Within float rounding: the fixture was written with another thread count than the tests use.
            torch.testing.assert_close(tokens, expected[task], rtol=0, atol=1e-6, msg=task)


def test_pruned_v1_loads_and_computes_the_same():
    model, manifest = load_pruned(FIXTURES / "pruned_v1")
    assert manifest.tasks == ["cls"]
    assert_same_tokens(model.eval(), torch.load(FIXTURES / "pruned_v1" / "expected.pt"), ["cls"])


def test_expanded_v1_starts_continual_training_and_computes_the_same():
    directory = FIXTURES / "expanded_v1"
    cfg = load_config(directory / "config.yaml", [f"continual.init={directory}"])
    model = build_model(cfg)
    counts = start_continual(model, cfg)
    assert 0 < counts["trainable"] < counts["total"]
    assert_same_tokens(model.eval(), torch.load(directory / "expected.pt"), ["cls", "seg", "new"])
