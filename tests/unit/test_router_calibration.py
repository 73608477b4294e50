"""Selection biases (moevit.layers.router) and their calibration before step 1 (moevit.train.router_calibration):
the bias steers the top-k choice and nothing else, the fit evens a skewed load, files without biases load
as plain top-k, calibration leaves frozen gates, the training stream and the global RNGs as they were."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from moevit.artifacts.init import fit_state
from moevit.config import build_config
from moevit.config.schema import Config
from moevit.factory import build_model
from moevit.layers.router import (
    TaskRouter,
    busiest_over_mean,
    expert_logits,
    fit_selection_bias,
    selection_counts,
)
from moevit.models import create_model
from moevit.models.param_names import parse_key, with_task
from moevit.train.loader import build_train_loader
from moevit.train.router_calibration import calibrate_routing, calibrate_task, calibration_images


def load_of(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> float:
    return busiest_over_mean(selection_counts(logits_TE, bias_E, top_k))


def test_the_fit_evens_a_load_that_a_shared_component_skews():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 8, generator=generator) + torch.tensor([3.0, 2.0, 1.0, 0, 0, 0, 0, -1.0])
    assert load_of(logits, torch.zeros(8), 2) > 3.0  # experts 0 and 1 take most tokens
    bias = fit_selection_bias(logits, 2)
    assert load_of(logits, bias, 2) <= 1.05
    assert abs(bias.mean().item()) < 1e-6  # top-k ignores a common shift: kept at zero mean
    assert torch.equal(bias, fit_selection_bias(logits, 2))  # deterministic


def test_the_bias_changes_which_experts_are_chosen_not_their_weights():
    torch.manual_seed(0)
    router = TaskRouter(16, 6, 2, ["a"]).eval()
    x = torch.randn(50, 16)
    plain = router(x, "a")
    logits = expert_logits(x, router.gates["a"].weight)  # the router's own, bit for bit
    top = logits.topk(2, dim=-1)  # zero biases: exactly the plain top-k, values and order
    assert torch.equal(plain.expert_idx_TK, top.indices)
    assert torch.equal(plain.weights_TK, top.values.softmax(dim=-1))
    with torch.no_grad():
        router.gates["a"].selection_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, -5.0]))
    biased = router(x, "a")
    assert (biased.expert_idx_TK == 0).any(dim=1).all()  # every token now picks expert 0
    assert not (biased.expert_idx_TK == 5).any()
    chosen_logits = logits.gather(1, biased.expert_idx_TK)
    torch.testing.assert_close(biased.weights_TK, chosen_logits.softmax(dim=-1))  # unbiased logits
    torch.testing.assert_close(biased.probs_sum_E, plain.probs_sum_E)  # the aux losses see no bias


def test_the_bias_is_a_gate_tensor_to_the_state_dict_names():
    key = "backbone.blocks.1.mlp.router.gates.cls.selection_bias"
    name = parse_key(key)
    assert (name.kind, name.layer, name.task, name.part) == ("gate", "blocks.1.mlp", "cls", "selection_bias")
    assert with_task(key, "det") == "backbone.blocks.1.mlp.router.gates.det.selection_bias"


def test_files_without_selection_biases_load_as_plain_top_k():
    torch.manual_seed(0)
    model = create_model("moevit_debug", tasks=["a"])
    old_file = {k: v for k, v in model.state_dict().items() if not k.endswith("selection_bias")}
    assert len(old_file) < len(model.state_dict())
    for _, router in model.routers():
        router.gates["a"].selection_bias.fill_(1.0)
    model.load_state_dict(old_file)  # strict
    assert all(not router.gates["a"].selection_bias.any() for _, router in model.routers())
    for _, router in model.routers():
        router.gates["a"].selection_bias.fill_(1.0)
    report = fit_state(model, old_file, "--init old.pt", strict=True, prefix="")
    assert not report.missing
    assert all(not router.gates["a"].selection_bias.any() for _, router in model.routers())


def test_calibration_fits_the_trained_gates_only_and_restores_the_mode():
    torch.manual_seed(0)
    model = create_model("moevit_debug", tasks=["a", "b"])
    for _, router in model.routers():
        router.gates["b"].weight.requires_grad_(False)  # a continual run's frozen old task
    model.train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = calibrate_task(model, "a", [images[:4], images[4:]], torch.device("cpu"))
    assert model.training  # calibration ran in eval mode and gave the mode back
    assert calibrate_task(model, "b", [images], torch.device("cpu")).after == {}
    routers = dict(model.routers())
    assert list(result.after) == list(routers)  # every routed layer, in forward order
    for layer, router in routers.items():
        assert result.after[layer] <= result.before[layer]
        assert router.gates["a"].selection_bias.any()
        assert not router.gates["b"].selection_bias.any()
    assert result.describe().startswith("routing calibrated for a on 8 images in ")


@pytest.fixture()
def run_config(synth_root, tiny_config):
    raw = tiny_config(synth_root, datasets=("imagenet", "ade20k"), model={"moe": {"num_experts": 8}})
    return build_config(Config, raw)


def test_calibration_reads_outside_the_training_stream(run_config):
    """Same images for a seed; the loader's first batches, its state and the global RNGs as without it."""
    torch.manual_seed(5)
    model = build_model(run_config)
    plain_loader = build_train_loader(run_config, rank=0, world_size=1)
    loader = build_train_loader(run_config, rank=0, world_size=1)
    first = calibration_images(loader, "imagenet", 6, seed=run_config.seed)
    assert sum(batch.shape[0] for batch in first) == 6
    assert all(a.equal(b) for a, b in zip(first, calibration_images(loader, "imagenet", 6, run_config.seed)))
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    results = calibrate_routing(
        model, loader, ["imagenet", "ade20k"], 6, run_config.seed, torch.device("cpu"), None
    )
    assert [result.task for result in results] == ["imagenet", "ade20k"]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert loader.state_dict() == plain_loader.state_dict()
    for (task, batch), (plain_task, plain_batch) in zip(next(loader), next(plain_loader)):
        assert task == plain_task and torch.equal(batch["images"], plain_batch["images"])
    assert calibrate_routing(model, loader, ["imagenet"], 0, 0, torch.device("cpu"), None) == []


@pytest.mark.slow
def test_calibrated_moevit_small_routes_random_inputs_evenly_from_the_start():
    """The issue's figure on random inputs, small enough for the suite: moevit_small (E16 top-2) at 224 px,
    calibrated on 32 images, measured on 16 others (docs/model.md quotes the benchmark's larger batches)."""
    torch.manual_seed(0)
    model = create_model("moevit_small", tasks=["probe"]).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(32, 3, 224, 224, generator=generator)
    held_out = torch.randn(16, 3, 224, 224, generator=generator)
    with torch.no_grad():
        before = model.forward_backbone(held_out, "probe").routing
    calibrate_task(model, "probe", list(calibration.split(16)), torch.device("cpu"))
    with torch.no_grad():
        after = model.forward_backbone(held_out, "probe").routing
    worst_before = max(r.busiest_over_mean() for r in before.values())
    worst_after = max(r.busiest_over_mean() for r in after.values())
    # Measured 2026-12-07: worst layer 1.61 before (layers 1.16 to 1.61), 1.13 after (1.08 to 1.13).
    assert worst_before > 1.5, worst_before
    assert worst_after <= 1.3, worst_after


def test_calibration_runs_under_the_runs_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("moevit_debug", tasks=["a"])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = calibrate_task(model, "a", [images], torch.device("cpu"), torch.bfloat16)
    assert all(result.after[layer] <= result.before[layer] for layer in result.after)
    assert all(router.gates["a"].selection_bias.dtype == torch.float32 for _, router in model.routers())
