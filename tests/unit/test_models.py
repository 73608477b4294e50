"""Registered variants, feature maps, upcycling from timm, import hygiene."""

import subprocess
import sys

import pytest
import timm
import torch

import moevit
from moevit.models.placement import resolve_moe_layers
from moevit.models.upcycle import load_timm_vit, max_upcycling_error

TASKS = ["imagenet", "coco", "ade20k"]


@pytest.mark.parametrize("name", moevit.list_models())
def test_every_variant_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    # Real widths and depths; small images and 4 experts (stacked expert tensors make the code
    # path independent of E) keep moevit_base at ~130M instead of ~540M parameters on CPU.
    model = moevit.create_model(
        name, tasks=TASKS, img_size=32, patch_size=8, num_experts=4, task_embedding=True
    )
    model.set_force_balanced_routing(True)
    images = torch.randn(2, 3, 32, 32)
    loss = sum(model.forward_features(images, task).square().mean() for task in TASKS)
    # Gates only see gradients through the routing weights, which a loss on the features reaches.
    loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_variants_reject_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        moevit.create_model("moevit_debug", tasks=["a"], num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown model"):
        moevit.create_model("moevit_huge", tasks=["a"])
    with pytest.raises(ValueError, match="repeat"):
        moevit.create_model("moevit_debug", tasks=["a", "a"])


def test_feature_maps_and_position_embedding_resampling():
    model = moevit.create_model("moevit_debug", tasks=["a"])  # 32 px, patch 8 -> 4x4 grid
    tokens, maps = model.forward_intermediates(torch.randn(2, 3, 48, 64), "a", indices=[0, -1])
    assert tokens.shape == (2, 1 + 6 * 8, 64)
    assert [m.shape for m in maps] == [(2, 64, 6, 8), (2, 64, 6, 8)]
    out = model.forward_backbone(torch.randn(1, 3, 32, 32), "a")
    assert list(out.routing) == ["blocks.1.mlp", "blocks.3.mlp"]


def test_moe_placement_forms():
    assert resolve_moe_layers("every:2", 6) == [1, 3, 5]
    assert resolve_moe_layers("last:2", 6) == [4, 5]
    assert resolve_moe_layers([0, -1], 6) == [0, 5]
    assert resolve_moe_layers("none", 6) == []
    for bad in ("every:0", "sometimes", [6], [1, 1]):
        with pytest.raises(ValueError):
            resolve_moe_layers(bad, 6)


def test_a_state_dict_with_the_old_gate_usage_counters_still_loads():
    # Files written before 2026-12-06 hold an int64 `usage` buffer per gate; the gates drop it on load.
    model = moevit.create_model("moevit_debug", tasks=["a", "b"])
    state = model.state_dict()
    old = {
        **state,
        **{k.replace(".weight", ".usage"): torch.ones(4, dtype=torch.int64) for k in state if ".gates." in k},
    }
    assert len(old) > len(state)
    model.load_state_dict(old)  # strict
    assert set(model.state_dict()) == set(state)


@pytest.mark.parametrize("moe_layers", ["every:2", "all"])
def test_upcycled_model_matches_dense_vit_for_every_task(moe_layers):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    model = moevit.upcycle_timm_vit(
        vit, num_experts=4, top_k=2, tasks=TASKS, moe_layers=moe_layers, task_embedding=True
    ).eval()
    for _, router in model.routers():  # non-zero gates: equivalence must not rely on uniform routing
        for gate in router.gates.values():
            torch.nn.init.normal_(gate.weight)
    assert max_upcycling_error(vit, model, torch.randn(2, 3, 224, 224)) < 1e-5


def test_upcycling_from_a_local_timm_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit_tiny.pth"
    torch.save(dense.state_dict(), path)
    vit = load_timm_vit("vit_tiny_patch16_224", path).eval()
    model = moevit.upcycle_timm_vit(vit, num_experts=2, top_k=1, tasks=["a"]).eval()
    assert max_upcycling_error(dense.eval(), model, torch.randn(1, 3, 224, 224)) < 1e-5
    with pytest.raises(FileNotFoundError, match="not found"):
        load_timm_vit("vit_tiny_patch16_224", tmp_path / "missing.pth")


def test_upcycling_refuses_unsupported_vits():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4)
    with pytest.raises(ValueError, match="register tokens"):
        moevit.upcycle_timm_vit(vit, 2, 1, ["a"])


def test_importing_models_does_not_import_deepspeed():
    code = "import sys, moevit, moevit.models, moevit.layers; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
