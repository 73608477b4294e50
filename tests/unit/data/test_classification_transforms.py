"""ImageNet transforms are timm's `create_transform`, used as is, on sample dicts; bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as tv1
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import to_pil_image

from moevit.config import load_config
from moevit.config.errors import ConfigError
from moevit.config.schema import ImageNetTransforms
from moevit.data.seeding import seeded_rngs
from moevit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
RECIPE = ImageNetTransforms(
    hflip=0.5,
    color_jitter=0.4,  # timm turns it off under RandAugment
    auto_augment="rand-m9-mstd0.5-inc1",
    interpolation="bicubic",
    re_prob=0.5,
    re_mode="pixel",
    re_count=2,
    crop_pct=0.9,
)


def _sample(seed: int = 0, width: int = 50, height: int = 30) -> dict:
    pixels = torch.randint(
        0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return {"image": tv_tensors.Image(pixels), "label": 4, "key": "train/n01/x", "num_skipped": 1}


def _pipeline(transform) -> list:
    """The steps of timm's Compose inside our sample-dict adapter."""
    return list(transform.transform.transforms)


def _timm_train(settings: ImageNetTransforms, image_size: int, crop_scale: tuple[float, float]):
    return create_transform(
        image_size,
        is_training=True,
        scale=crop_scale,
        hflip=settings.hflip,
        color_jitter=settings.color_jitter or None,
        auto_augment=settings.auto_augment,
        interpolation=settings.interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        re_prob=settings.re_prob,
        re_mode=settings.re_mode,
        re_count=settings.re_count,
    )


@pytest.mark.parametrize("settings", [ImageNetTransforms(), RECIPE], ids=["defaults", "recipe"])
def test_train_pipeline_draws_what_timm_draws_under_the_same_seed(settings):
    ours = build_transforms("classification", True, 24, settings, crop_scale=(0.25, 1.0))
    reference = _timm_train(settings, 24, (0.25, 1.0))
    outputs = []
    for seed in range(4):
        sample = _sample(seed)
        with seeded_rngs(seed):
            got = ours(sample)
        with seeded_rngs(seed):
            expected = reference(to_pil_image(sample["image"]))
        assert isinstance(got["image"], tv_tensors.Image) and got["image"].dtype == torch.float32
        assert torch.equal(got["image"].as_subclass(torch.Tensor), expected)
        assert {key: got[key] for key in ("label", "key", "num_skipped")} == {
            "label": 4,
            "key": "train/n01/x",
            "num_skipped": 1,
        }
        outputs.append(got["image"])
    assert not torch.equal(outputs[0], outputs[1])  # random, and the seed decides


def test_defaults_are_random_resized_crop_and_flip_only():
    steps = _pipeline(
        build_transforms("classification", True, 24, ImageNetTransforms(), crop_scale=(0.25, 1.0))
    )
    assert [type(step) for step in steps][:2] == [RandomResizedCropAndInterpolation, tv1.RandomHorizontalFlip]
    # then only the tensor conversion and normalization: no colour jitter, policy or erasing
    assert [type(step).__name__ for step in steps[2:]] == ["MaybeToTensor", "Normalize"]
    assert steps[0].scale == (0.25, 1.0) and steps[1].p == 0.5


def test_recipe_settings_reach_timm():
    steps = _pipeline(build_transforms("classification", True, 32, RECIPE, crop_scale=(0.08, 1.0)))
    kinds = [type(step) for step in steps]
    assert RandAugment in kinds and tv1.ColorJitter not in kinds  # timm: no jitter under RandAugment
    policy = steps[kinds.index(RandAugment)]
    assert policy.num_layers == 2 and all(op.magnitude == 9 for op in policy.ops)
    erasing = steps[kinds.index(RandomErasing)]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.5, "pixel", 2)
    assert steps[0].interpolation == tv1.InterpolationMode.BICUBIC


def test_colour_jitter_without_a_policy():
    settings = ImageNetTransforms(color_jitter=0.3)
    steps = _pipeline(build_transforms("classification", True, 24, settings))
    jitter = next(step for step in steps if isinstance(step, tv1.ColorJitter))
    assert jitter.brightness == (0.7, 1.3) and jitter.hue is None


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bilinear"), (1.0, "bicubic")])
def test_eval_is_timms_eval_transform(crop_pct, interpolation):
    settings = ImageNetTransforms(crop_pct=crop_pct, interpolation=interpolation)
    ours = build_transforms("classification", False, 24, settings)
    reference = create_transform(
        24,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    sample = _sample(3)
    got = ours(sample)["image"]
    assert got.shape == (3, 24, 24)
    assert torch.equal(got.as_subclass(torch.Tensor), reference(to_pil_image(sample["image"])))
    # timm's protocol: the shorter side goes to floor(24 / crop_pct) before the center crop
    assert _pipeline(ours)[0].size == int(24 // crop_pct)


def test_non_rgb_uint8_images_are_refused_naming_the_sample():
    transform = build_transforms("classification", True, 24)
    sample = {"image": tv_tensors.Image(torch.rand(3, 30, 50)), "key": "train/n01/float"}
    with pytest.raises(ValueError, match="train/n01/float.*uint8 RGB"):
        transform(sample)


@pytest.mark.parametrize(
    "override, named",
    [
        ("tasks.imagenet.data.transforms.re_probb=0.25", "re_probb"),
        ("tasks.imagenet.data.transforms.re_prob=2", "re_prob"),
        ("tasks.imagenet.data.transforms.re_mode=gray", "re_mode"),
        ("tasks.imagenet.data.transforms.interpolation=lanczos", "interpolation"),
        ("tasks.imagenet.data.transforms.auto_augment=rand-q5", "auto_augment"),
        ("tasks.imagenet.data.transforms.label_smoothing=1.5", "label_smoothing"),
        ("tasks.imagenet.data.transforms.mixup_alpha=-1", "mixup_alpha"),
        ("tasks.imagenet.head_options.label_smoothing=0.1", "label_smoothing"),
    ],
)
def test_bad_transform_settings_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(DEMO_CONFIG, [override])
    assert "tasks.imagenet" in str(caught.value)


def test_mixup_needs_an_even_batch():
    overrides = ["tasks.imagenet.data.transforms.cutmix_alpha=1.0", "tasks.imagenet.data.batch_size=31"]
    with pytest.raises(ConfigError, match="batch_size must be even"):
        load_config(DEMO_CONFIG, overrides)
    cfg = load_config(DEMO_CONFIG, overrides[:1])
    assert cfg.tasks["imagenet"].data.transform_settings().mixes
