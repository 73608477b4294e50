"""`model.init` (issue 16, item 1): one loader for timm files (.pth, .safetensors, .npz), MAE checkpoints
and moevit run/model dirs, with upcycling, position-embedding resampling, a report and one-line errors.

Every checkpoint is written here: a tiny timm VisionTransformer with moevit_debug's shape (32 px,
patch 8, width 64, 4 blocks, 2 heads), saved with torch / safetensors, and in the Google JAX `.npz`
layout that timm's npz loader reads (written with numpy by `save_jax_npz`, the inverse of that loader).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from moevit.artifacts.init import REPORT_FILE, apply_init
from moevit.artifacts.model_dir import WEIGHTS_FILE
from moevit.config import build_config
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.factory import build_model

TASKS = {"cls": {"type": "classification", "num_classes": 10}}
MOE_BLOCKS = (1, 3)  # moevit_debug: every other block, 4 experts each


def tiny_vit(img_size: int = 32, mlp_ratio: float = 4.0, num_classes: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=mlp_ratio,
        num_classes=num_classes,
    )  # fmt: skip
    with torch.no_grad():  # timm zero-initialises some tensors (biases, cls token): make every one tell
        for param in vit.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return vit.eval()


def make_model(init: str | None = None, num_classes: int = 10, **model):
    cfg = build_config(
        Config,
        {
            "model": {"name": "moevit_debug", **({"init": init} if init else {}), **model},
            "tasks": {"cls": {**TASKS["cls"], "num_classes": num_classes}},
        },
    )
    torch.manual_seed(1)
    return build_model(cfg), cfg


def save_jax_npz(vit: VisionTransformer, path) -> None:
    """`vit` in the original ViT .npz layout (what timm's `_load_weights` reads), written with numpy."""
    w, heads = {}, vit.blocks[0].attn.num_heads
    D = vit.embed_dim
    w["embedding/kernel"] = vit.patch_embed.proj.weight.permute(2, 3, 1, 0)  # OIHW -> HWIO
    w["embedding/bias"] = vit.patch_embed.proj.bias
    w["cls"] = vit.cls_token
    w["Transformer/posembed_input/pos_embedding"] = vit.pos_embed
    w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"] = vit.norm.weight, vit.norm.bias
    for i, block in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = block.norm1.weight, block.norm1.bias
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = block.norm2.weight, block.norm2.bias
        qkv_w, qkv_b = block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = weight.T.reshape(D, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(heads, -1)
        out = block.attn.proj.weight.reshape(D, heads, -1).permute(1, 2, 0)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = out
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = block.attn.proj.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = fc.weight.T, fc.bias
    np.savez(path, **{key: value.detach().numpy() for key, value in w.items()})


def assert_upcycled_from(model, vit) -> None:
    """Every dense tensor in place, and every expert of an MoE block a copy of that block's dense MLP."""
    state, dense = model.backbone.state_dict(), vit.state_dict()
    for key, value in dense.items():
        if key.startswith("head."):
            continue
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        if block in MOE_BLOCKS and ".mlp." in key:
            stacked = state[
                key.replace("mlp.fc1.", "mlp.experts.fc1_").replace("mlp.fc2.", "mlp.experts.fc2_")
            ]
            assert stacked.shape[0] == 4 and all(torch.equal(e, value) for e in stacked), key
        else:
            assert torch.allclose(state[key], value, atol=1e-6), key


GATE_PARTS = ("weight", "selection_bias")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_a_timm_vit_file_upcycles_into_the_moe(tmp_path, suffix):
    vit = tiny_vit()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(vit.state_dict(), path)
    elif suffix == ".safetensors":
        save_file(vit.state_dict(), str(path))
    else:
        save_jax_npz(vit, path)
    model, _ = make_model()
    report = apply_init(model, path)
    assert_upcycled_from(model, vit)
    assert report.kind == "timm"
    parts = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    expected = [f"backbone.blocks.{i}.mlp.experts.{part}" for i in MOE_BLOCKS for part in parts]
    assert sorted(report.upcycled) == sorted(expected)
    # New in the MoE: the gates (weights and selection biases), the head. Left over: the classifier (not in
    # an .npz read without one).
    assert sorted(report.missing) == sorted(
        [f"backbone.blocks.{i}.mlp.router.gates.cls.{part}" for i in MOE_BLOCKS for part in GATE_PARTS]
        + [key for key in model.state_dict() if key.startswith("heads.")]
    )
    assert sorted(report.unexpected) == (
        [] if suffix == ".npz" else ["backbone.head.bias", "backbone.head.weight"]
    )
    assert len(report.loaded) + len(report.missing) == len(model.state_dict())


def test_an_mae_checkpoint_loads_its_encoder_and_reports_its_decoder(tmp_path):
    vit = tiny_vit()
    encoder = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    decoder = {
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_embed.weight": torch.zeros(32, 64),
        "decoder_pos_embed": torch.zeros(1, 17, 32),
        "decoder_blocks.0.norm1.weight": torch.ones(32),
        "decoder_pred.weight": torch.zeros(192, 32),
    }
    torch.save({"model": {**encoder, **decoder}, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    model, _ = make_model()
    report = apply_init(model, tmp_path / "mae_pretrain.pth")
    assert_upcycled_from(model, vit)
    assert sorted(report.unexpected) == sorted(f"backbone.{key}" for key in decoder)


def test_expert_noise_breaks_the_copies_reproducibly_and_keeps_the_biases(tmp_path):
    vit = tiny_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    experts = []
    for seed in (3, 3, 4):
        model, _ = make_model()
        apply_init(model, tmp_path / "vit.pth", expert_noise=0.1, seed=seed)
        experts.append(model.backbone.blocks[1].mlp.experts)
    dense = vit.blocks[1].mlp.fc1
    noise = experts[0].fc1_weight - dense.weight
    assert noise.abs().min() > 0 and not torch.equal(noise[0], noise[1])  # every copy moved, differently
    assert noise.std().item() == pytest.approx(0.1 * dense.weight.std().item(), rel=0.1)
    assert torch.equal(experts[0].fc1_weight, experts[1].fc1_weight)  # one seed, one draw (every rank)
    assert not torch.equal(experts[0].fc1_weight, experts[2].fc1_weight)
    assert all(torch.equal(bias, dense.bias) for bias in experts[0].fc1_bias)


def save(vit: VisionTransformer, path) -> None:
    if path.suffix == ".npz":
        save_jax_npz(vit, path)
    else:
        torch.save(vit.state_dict(), path)


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_the_position_embedding_is_resampled_to_the_models_grid(tmp_path, suffix):
    vit = tiny_vit(img_size=48)  # a 6x6 grid; the model's is 4x4
    save(vit, tmp_path / f"vit48{suffix}")
    model, _ = make_model()
    report = apply_init(model, tmp_path / f"vit48{suffix}")
    assert report.resampled == {"backbone.pos_embed": [[1, 37, 64], [1, 17, 64]]}
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(model.backbone.pos_embed, expected)
    assert torch.equal(model.backbone.pos_embed[:, :1], vit.pos_embed[:, :1])  # the class slot as it was


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_a_shape_mismatch_is_refused_naming_the_tensor(tmp_path, suffix):
    path = tmp_path / f"narrow{suffix}"
    save(tiny_vit(mlp_ratio=2.0), path)
    model, _ = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        apply_init(model, path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.init {path}: ")
    assert (
        "tensor backbone.blocks.0.mlp.fc1.weight has shape [128, 64], the model expects [256, 64]" in message
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("absent.pth", None, "no such file or directory"),
        ("garbage.pth", b"not a checkpoint at all", "cannot read it"),
        ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "cannot read it"),
        ("weights.ckpt", b"", "unknown file type '.ckpt'"),
        ("emptydir", "dir", "neither a model dir"),
    ],
)
def test_a_bad_path_is_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        apply_init(make_model()[0], path)
    assert expected in str(err.value) and "\n" not in str(err.value)


class Tampered:  # any Python object a tensors-only load must refuse to build
    pass


def test_a_file_with_python_objects_is_refused_by_weights_only(tmp_path):
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}, "args": Tampered()}, tmp_path / "t.pth")
    with pytest.raises(ConfigError, match="cannot read it: .*weights_only") as err:
        apply_init(make_model()[0], tmp_path / "t.pth")
    assert "\n" not in str(err.value)


def test_a_moevit_model_dir_loads_backbone_and_matching_heads_only(tmp_path):
    source, _ = make_model(num_classes=10)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    (tmp_path / "same").mkdir()
    torch.save(source.state_dict(), tmp_path / "same" / WEIGHTS_FILE)
    same, _ = make_model(num_classes=10)
    report = apply_init(same, tmp_path / "same", strict=True)
    assert report.kind == "moevit-model" and not report.missing and not report.unexpected
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())

    other, _ = make_model(num_classes=5)  # another class count: the head starts fresh
    fresh_head = {k: v.clone() for k, v in other.heads["cls"].state_dict().items()}
    report = apply_init(other, tmp_path / "same")
    assert set(report.skipped) == {k for k in source.state_dict() if k.startswith("heads.cls.")}
    assert all(torch.equal(v, fresh_head[k]) for k, v in other.heads["cls"].state_dict().items())
    assert all(
        torch.equal(v, source.backbone.state_dict()[k]) for k, v in other.backbone.state_dict().items()
    )
    with pytest.raises(
        ConfigError, match="do not fit the config's model exactly: .*of another shape \\['heads.cls"
    ):
        apply_init(make_model(num_classes=5)[0], tmp_path / "same", strict=True)


def test_a_dense_moevit_source_upcycles_into_the_moe_model(tmp_path):
    """The issue's upcycling path: a dense moevit run (`model.moe.layers=none`) starts an MoE model, each
    expert of a block a copy of that block's dense MLP; strict loading (continual) refuses it."""
    dense, _ = make_model(moe={"layers": "none"})
    (tmp_path / "dense").mkdir()
    torch.save(dense.state_dict(), tmp_path / "dense" / WEIGHTS_FILE)
    moe, _ = make_model(moe={"layers": "all", "num_experts": 4})
    report = apply_init(moe, tmp_path / "dense")
    assert report.kind == "moevit-model" and report.upcycled and not report.skipped
    source = dense.backbone.state_dict()
    for index in moe.backbone.moe_layer_indices:
        experts = moe.backbone.blocks[index].mlp.experts.state_dict()
        for name, value in experts.items():
            dense_name = f"blocks.{index}.mlp.{name.replace('_weight', '.weight').replace('_bias', '.bias')}"
            assert all(torch.equal(value[e], source[dense_name]) for e in range(4)), name
    assert all(
        key.endswith("gate") or "gate" in key for key in report.missing if key.startswith("backbone.")
    ), report.missing
    with pytest.raises(ConfigError, match="dense MLPs would be upcycled"):
        apply_init(make_model(moe={"layers": "all", "num_experts": 4})[0], tmp_path / "dense", strict=True)


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"init_expert_noise": -0.1, "init": "x.pth"}, "init_expert_noise must be >= 0"),
        ({"init_expert_noise": 0.1}, "init_expert_noise needs init"),
        ({"init": " "}, "init must name a local checkpoint"),
    ],
)
def test_the_config_checks_the_init_keys(model, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(Config, {"model": {"name": "moevit_debug", **model}, "tasks": TASKS})


def test_moevit_train_starts_from_a_timm_file_and_a_run_starts_from_that_run(
    tmp_path, synth_root, tiny_config, capsys
):
    """`moevit train` with model.init=<timm .pth>: 2 steps, report in the run dir; then model.init=<run
    dir> gives a fresh model that run's final weights."""
    from moevit.cli import main
    from moevit.parallel.checkpoint import consolidated_state_dict, find_latest_checkpoint

    vit = tiny_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    run = tmp_path / "run"
    config = tiny_config(
        synth_root, run, datasets=("imagenet",), model={"init": str(tmp_path / "vit.pth"), "init_expert_noise": 0.01}
    )  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    captured = capsys.readouterr()
    assert f"model.init {tmp_path / 'vit.pth'} (timm): " in captured.out + captured.err
    report = yaml.safe_load((run / REPORT_FILE).read_text())  # JSON is YAML
    assert report["kind"] == "timm" and len(report["upcycled"]) == 8 and report["expert_noise"] == 0.01
    assert "backbone.blocks.1.mlp.router.gates.imagenet.weight" in report["missing"]

    trained = consolidated_state_dict(run / "checkpoints" / find_latest_checkpoint(run))
    model = build_model(build_config(Config, {**config, "model": {"name": "moevit_debug"}}))
    report = apply_init(model, run)
    assert report.kind == "moevit-run" and not report.missing and not report.unexpected
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_a_bad_init_stops_moevit_train_before_anything_starts(tmp_path, synth_root, tiny_config, capsys):
    import torch.distributed as dist

    from moevit.cli import main

    torch.save(tiny_vit(mlp_ratio=2.0).state_dict(), tmp_path / "narrow.pth")
    config = tiny_config(
        synth_root, tmp_path / "run", datasets=("imagenet",), model={"init": str(tmp_path / "narrow.pth")}
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("moevit: error: model.init ") and "tensor backbone.blocks.0.mlp.fc1.weight" in error
    )
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_a_bad_init_is_refused_before_a_relaunch_and_by_finetune(tmp_path, monkeypatch, capsys):
    from moevit.cli import main
    from moevit.cli import train as cli

    monkeypatch.setattr(cli, "_relaunch", lambda argv, nproc: pytest.fail(f"launched {nproc} workers"))
    (tmp_path / "data").mkdir()
    data = {"format": "imagenet", "root": str(tmp_path / "data"), "image_size": 32}
    config = {
        "model": {"name": "moevit_debug", "init": str(tmp_path / "nowhere.pth")},
        "tasks": {"cls": {**TASKS["cls"], "data": data}},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--nproc", "2"]) == 2
    assert f"model.init {tmp_path / 'nowhere.pth'}: no such file" in capsys.readouterr().err
    args = ["finetune", str(tmp_path / "cfg.yaml"), "--init", str(tmp_path), "--mode", "head"]
    assert main(args) == 2
    assert "'model.init' is not used by fine-tuning" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_model_init_and_a_continual_section_are_not_both_accepted():
    with pytest.raises(ConfigError, match="'model.init' and 'continual' both"):
        build_config(
            Config,
            {"model": {"name": "moevit_debug", "init": "x.pth"}, "tasks": TASKS, "continual": {"init": "d"}},
        )
