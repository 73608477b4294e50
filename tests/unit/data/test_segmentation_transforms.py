"""mmsegmentation's ADE20K pipeline, checked against its documented semantics (mmseg is not installable).

Golden values are worked by hand from mmcv's ``imrescale`` and mmseg's ``RandomCrop``; the photometric
distortion is compared, draw for draw, with a per-pixel NumPy re-implementation of mmseg's
``PhotoMetricDistortion`` on OpenCV's documented 8-bit HSV conversion (no OpenCV here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from moevit.config.schema import Ade20kTransforms
from moevit.data.seeding import seeded_rngs
from moevit.data.transforms import build_transforms
from moevit.data.transforms import segmentation as seg


def _sample(image: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "key": "images/training/x"}


def _striped(height: int, width: int) -> dict:
    """Mask class 1 on the left half, 0 on the right; the image white exactly where the mask is 1."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[:, : width // 2] = 1
    return _sample((mask * 255).expand(3, height, width).clone(), mask)


# ---------------------------------------------------------------- RandomResize


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        # r = 1.25: target (2560, 640); 683 x 512 (W x H) is bound by its short edge: 640 / 512 = 1.25.
        (512, 683, (640, 854)),
        # A 3000 x 500 panorama is bound by its long edge: 2560 / 3000, so 500 -> 426.67 -> 427.
        (500, 3000, (427, 2560)),
    ],
)
def test_random_resize_factor_is_mmcv_imrescale(monkeypatch, height, width, expected):
    monkeypatch.setattr(np.random, "random_sample", lambda: 0.5)  # r = 0.5 + 0.5 x (2.0 - 0.5) = 1.25
    resize = seg.RandomResize((2048, 512), (0.5, 2.0))
    out = resize(
        _sample(
            torch.zeros(3, height, width, dtype=torch.uint8), torch.zeros(height, width, dtype=torch.uint8)
        )
    )
    assert tuple(out["image"].shape[-2:]) == expected == tuple(out["mask"].shape)


def test_rescaled_size_rounds_half_up_and_ignores_the_order_of_scale():
    assert seg.rescaled_size(512, 683, (2048, 512)) == (512, 683)
    assert seg.rescaled_size(512, 683, (512, 2048)) == (512, 683)
    assert seg.rescaled_size(3, 5, (2, 1)) == (1, 2)  # factor 1/3: 1.67 -> 2 (half up), 1.0 -> 1


def test_random_resize_uses_nearest_for_the_mask():
    torch.manual_seed(0)
    mask = torch.randint(0, 3, (30, 40), dtype=torch.uint8)
    mask[0, 0] = 255
    np.random.seed(3)
    out = seg.RandomResize((160, 40), (0.5, 2.0))(_sample(torch.zeros(3, 30, 40, dtype=torch.uint8), mask))
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 255} and out["mask"].dtype == torch.uint8
    assert out["image"].dtype == torch.uint8


# ---------------------------------------------------------------- RandomCrop with cat_max_ratio


def _replayed_windows(
    seed: int, height: int, width: int, crop: int, draws: int
) -> list[tuple[int, int, int, int]]:
    """The first `draws` windows mmseg would draw from np.random seeded with `seed`."""
    np.random.seed(seed)
    windows = []
    for _ in range(draws):
        top = np.random.randint(0, max(height - crop, 0) + 1)
        left = np.random.randint(0, max(width - crop, 0) + 1)
        windows.append((top, top + crop, left, left + crop))
    return windows


def test_crop_gives_up_after_ten_checks_and_takes_the_eleventh_window():
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[90:, 90:] = 1  # at most 100 of a crop's 2500 pixels: one class always covers >= 96 %
    crop = seg.RandomCrop(50, cat_max_ratio=0.75)
    np.random.seed(7)
    window = crop.window(mask)
    after = np.random.random_sample()
    expected = _replayed_windows(7, 100, 100, 50, draws=11)
    assert window == expected[-1]
    assert after == np.random.random_sample()  # exactly 11 windows (22 draws) were taken, no more


def test_crop_retries_until_no_class_covers_cat_max_ratio():
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[:, 50:] = 1  # a crop at x is acceptable iff max(x, 50 - x) / 50 < 0.75: x in 13..37
    crop = seg.RandomCrop(50, cat_max_ratio=0.75)
    retried = False
    for seed in range(20):
        np.random.seed(seed)
        window = crop.window(mask)
        replay = _replayed_windows(seed, 100, 100, 50, draws=11)
        first_good = next(w for w in replay if 13 <= w[2] <= 37)
        assert window == first_good and 13 <= window[2] <= 37
        retried |= replay[0] != first_good
    assert retried, "some seed must have needed a retry"


def test_crop_counts_no_ignored_pixels_and_ratio_one_draws_once():
    mask = torch.full((60, 60), 255, dtype=torch.uint8)
    mask[:, :30] = 4  # one class and ignore: never acceptable (ignore is not a class)
    assert not seg.crop_is_acceptable(mask, 0.99)
    mask[:, 50:] = 2
    assert seg.crop_is_acceptable(mask, 0.8)  # shares 30/40 = 0.75 < 0.8 and 10/40
    assert not seg.crop_is_acceptable(mask, 0.75)
    np.random.seed(1)
    window = seg.RandomCrop(20, cat_max_ratio=1.0).window(torch.zeros(60, 60, dtype=torch.uint8))
    after = np.random.random_sample()
    assert window == _replayed_windows(1, 60, 60, 20, draws=1)[0]
    assert after == np.random.random_sample()


def test_crop_of_a_small_image_is_clipped_and_padded_with_ignore():
    transform = build_transforms(
        "segmentation", True, 32, Ade20kTransforms(ratio_range=(0.5, 0.5), hflip=0.0)
    )
    out = transform(_striped(24, 40))  # r = 0.5: target (64, 16): 24 x 40 -> 16 x 27
    mask, image = out["mask"], out["image"]
    assert tuple(mask.shape) == (32, 32) and tuple(image.shape) == (3, 32, 32)
    assert mask[16:].eq(255).all() and mask[:, 27:].eq(255).all() and mask[:16, :27].ne(255).all()
    # mmseg pads after normalizing: the padding is 0, the mean colour, not black.
    assert image[:, 16:].eq(0).all() and image[:, :, 27:].eq(0).all()


# ---------------------------------------------------------------- flip


def test_flip_keeps_image_and_mask_aligned():
    np.random.seed(0)
    flipped = seg.RandomFlip(1.0)(_striped(8, 10))
    assert flipped["mask"][:, 5:].eq(1).all() and flipped["mask"][:, :5].eq(0).all()
    assert torch.equal(flipped["image"][0] == 255, flipped["mask"] == 1)
    assert seg.RandomFlip(0.0)(_striped(8, 10))["mask"][:, :5].eq(1).all()


def test_train_pipeline_keeps_mask_aligned_with_the_image():
    settings = Ade20kTransforms(cat_max_ratio=0.75, photometric_distortion=False)
    transform = build_transforms("segmentation", True, 32, settings)
    flips = set()
    for seed in range(10):
        with seeded_rngs(seed):
            out = transform(_striped(30, 48))
        mask, white = out["mask"], (out["image"] > 1.0).all(dim=0)
        valid = mask != 255
        # Image (bilinear) and mask (nearest) may disagree on the boundary column only.
        agreement = (white == (mask == 1))[valid].float().mean().item()
        assert agreement > 0.9, f"seed {seed}: image and mask disagree on {1 - agreement:.0%} of pixels"
        row = mask[0][mask[0] != 255]
        if {0, 1} <= set(row.tolist()):  # class 1 ends up on the right only when flipped
            flips.add(bool(row[0] == 0))
    assert flips == {True, False}


def test_train_draws_depend_only_on_the_seed():
    settings = Ade20kTransforms(cat_max_ratio=0.75, photometric_distortion=True)
    transform = build_transforms("segmentation", True, 32, settings)
    generator = torch.Generator().manual_seed(0)
    sample = _sample(
        torch.randint(0, 256, (3, 40, 56), generator=generator, dtype=torch.uint8),
        torch.randint(0, 4, (40, 56), generator=generator, dtype=torch.uint8),
    )
    runs = []
    for seed in (5, 5, 6):
        with seeded_rngs(seed):
            runs.append(transform(dict(sample)))
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["mask"], runs[1]["mask"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])


# ---------------------------------------------------------------- eval


def test_eval_resizes_the_image_to_fit_scale_and_keeps_the_mask_original():
    out = build_transforms("segmentation", False, 16, Ade20kTransforms())(_striped(24, 40))
    # scale (64, 16): factor min(64 / 40, 16 / 24) = 2/3 -> 16 x 26.67 -> 16 x 27
    assert tuple(out["image"].shape) == (3, 16, 27) and out["image"].dtype == torch.float32
    assert torch.equal(out["mask"], _striped(24, 40)["mask"])
    out = build_transforms("segmentation", False, 16, Ade20kTransforms(scale=(400, 48)))(_striped(24, 40))
    assert tuple(out["image"].shape) == (3, 48, 80)


# ---------------------------------------------------------------- photometric distortion


def _reference_rgb_to_hsv(red: int, green: int, blue: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit RGB -> HSV (H in [0, 180)) for one pixel, with its 12-bit fixed-point divisions."""
    value, low = max(red, green, blue), min(red, green, blue)
    diff = value - low
    s_table = 0 if value == 0 else round((255 << 12) / value)
    h_table = 0 if diff == 0 else round((180 << 12) / (6 * diff))
    saturation = (diff * s_table + (1 << 11)) >> 12
    if value == red:
        hue = green - blue
    elif value == green:
        hue = blue - red + 2 * diff
    else:
        hue = red - green + 4 * diff
    hue = (hue * h_table + (1 << 11)) >> 12
    return (hue + 180 if hue < 0 else hue), saturation, value


def _reference_hsv_to_rgb(hue: int, saturation: int, value: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit HSV -> RGB for one pixel: the hexcone in float32, rounded half to even."""
    f32 = np.float32
    s, v = f32(saturation) * f32(1 / 255), f32(value) * f32(1 / 255)
    h = np.fmod(f32(hue) * f32(6 / 180), f32(6))
    sector = int(np.floor(h))
    f = h - f32(sector)
    p, q, t = v * (f32(1) - s), v * (f32(1) - s * f), v * (f32(1) - s * (f32(1) - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][sector]
    return tuple(int(np.clip(np.rint(c * f32(255)), 0, 255)) for c in rgb)


def _reference_convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _reference_hsv_map(image: np.ndarray, change) -> np.ndarray:
    out = np.empty_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            hsv = list(_reference_rgb_to_hsv(*(int(c) for c in image[y, x])))
            out[y, x] = _reference_hsv_to_rgb(*change(hsv))
    return out


def _reference_photometric(image: np.ndarray, steps: list[str]) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 RGB array, drawing from np.random as mmseg."""
    if np.random.randint(2):
        image = _reference_convert(image, beta=np.random.uniform(-32, 32))
        steps.append("brightness")
    mode = np.random.randint(2)
    steps.append(f"mode{mode}")

    def contrast(image):
        if np.random.randint(2):
            steps.append("contrast")
            return _reference_convert(image, alpha=np.random.uniform(0.5, 1.5))
        return image

    if mode == 1:
        image = contrast(image)
    if np.random.randint(2):
        alpha = np.random.uniform(0.5, 1.5)
        image = _reference_hsv_map(
            image, lambda hsv: (hsv[0], int(_reference_convert(np.array(hsv[1]), alpha)), hsv[2])
        )
        steps.append("saturation")
    if np.random.randint(2):
        delta = np.random.randint(-18, 18)
        image = _reference_hsv_map(image, lambda hsv: ((hsv[0] + delta) % 180, hsv[1], hsv[2]))
        steps.append("hue")
    if mode == 0:
        image = contrast(image)
    return image


def test_hsv_of_primary_colours_is_opencvs():
    pixels = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 128, 128], [0, 0, 0]])
    hsv = seg.rgb_to_hsv_u8(pixels.T.reshape(3, 1, 6).to(torch.uint8))[:, 0].T.tolist()
    assert hsv == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [30, 255, 255], [0, 0, 128], [0, 0, 0]]
    assert torch.equal(
        seg.hsv_to_rgb_u8(torch.tensor(hsv).T.reshape(3, 1, 6)), pixels.T.reshape(3, 1, 6).to(torch.uint8)
    )


def test_hsv_round_trip_matches_the_per_pixel_reference():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 30), generator=generator, dtype=torch.uint8)
    hsv = seg.rgb_to_hsv_u8(image)
    pixels = image.permute(1, 2, 0).reshape(-1, 3).tolist()
    assert hsv.permute(1, 2, 0).reshape(-1, 3).tolist() == [list(_reference_rgb_to_hsv(*p)) for p in pixels]
    back = seg.hsv_to_rgb_u8(hsv).permute(1, 2, 0).reshape(-1, 3).tolist()
    assert back == [list(_reference_hsv_to_rgb(*_reference_rgb_to_hsv(*p))) for p in pixels]


def test_photometric_distortion_equals_mmseg_formulas_draw_for_draw():
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 6, 7), generator=generator, dtype=torch.uint8)
    image[:, 0, :3] = torch.tensor([[0, 255, 250], [0, 255, 3], [0, 255, 9]])  # clipping at both ends
    distortion = seg.PhotoMetricDistortion()
    seen: set[str] = set()
    for seed in range(16):
        np.random.seed(seed)
        ours = distortion(_sample(image, torch.zeros(6, 7, dtype=torch.uint8)))
        ours_state = np.random.random_sample()
        np.random.seed(seed)
        steps: list[str] = []
        expected = _reference_photometric(image.permute(1, 2, 0).numpy().copy(), steps)
        assert np.random.random_sample() == ours_state, f"seed {seed}: a different number of draws"
        assert ours["image"].permute(1, 2, 0).numpy().tolist() == expected.tolist(), f"seed {seed}: {steps}"
        assert ours["image"].dtype == torch.uint8 and torch.equal(
            ours["mask"], torch.zeros(6, 7, dtype=torch.uint8)
        )
        seen.update(steps)
    assert seen == {"brightness", "mode0", "mode1", "contrast", "saturation", "hue"}


def test_photometric_distortion_draws_mmsegs_ranges_in_mmsegs_order(monkeypatch):
    calls = []

    def randint(*args):
        calls.append(("randint", *args))
        return 1 if args == (2,) else -18

    def uniform(*args):
        calls.append(("uniform", *args))
        return float(args[0])

    monkeypatch.setattr(np.random, "randint", randint)
    monkeypatch.setattr(np.random, "uniform", uniform)
    image = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    out = seg.PhotoMetricDistortion()(_sample(image, torch.zeros(2, 2, dtype=torch.uint8)))
    assert calls == [
        ("randint", 2), ("uniform", -32, 32),  # brightness
        ("randint", 2),  # mode 1: contrast first
        ("randint", 2), ("uniform", 0.5, 1.5),  # contrast
        ("randint", 2), ("uniform", 0.5, 1.5),  # saturation
        ("randint", 2), ("randint", -18, 18),  # hue
    ]  # fmt: skip
    assert out["image"].eq(34).all()  # grey: (100 - 32) x 0.5, saturation and hue leave it grey


def test_photometric_distortion_refuses_a_float_image():
    with pytest.raises(ValueError, match="PhotoMetricDistortion: expected a uint8"):
        seg.PhotoMetricDistortion()(_sample(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.uint8)))


# ---------------------------------------------------------------- settings


def _config(transforms: dict):
    from moevit.config import Config, build_config

    data = {"format": "ade20k", "root": "x", "image_size": 64, "batch_size": 2, "transforms": transforms}
    return build_config(
        Config,
        {
            "model": {"name": "moevit_debug"},
            "tasks": {"seg": {"type": "segmentation", "num_classes": 5, "data": data}},
        },
    )


def test_settings_from_yaml_and_bad_values_named():
    from moevit.config.errors import ConfigError

    settings = _config({"scale": [2048, 512], "cat_max_ratio": 0.75, "eval_mode": "slide"}).tasks["seg"].data
    assert settings.transform_settings().scale == (2048, 512)
    for transforms, message in (
        ({"cat_max_ration": 0.75}, "unknown key 'cat_max_ration'"),
        ({"cat_max_ratio": 0.0}, r"cat_max_ratio must be in \(0, 1\]"),
        ({"eval_mode": "tiles"}, "eval_mode"),
        ({"slide_stride": 65}, "slide_stride 65 exceeds image_size 64"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(transforms)
