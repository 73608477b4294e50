"""Drawing primitives of the synthetic datasets: shape polygons, textures, colours, smooth fields and noise.

Vocabularies shared by the synthetic datasets: SHAPES (outlines), TEXTURES (fills) and hues
(spec.HUE_FAMILIES, drawn by `hue_shades`).
Images are float32 arrays (H, W, 3) in [0, 255] until `to_uint8`. Every random choice is drawn from
the numpy Generator passed in, so a picture is a pure function of that generator's seed.
"""

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "dots")

# Outlines inside the unit box [-0.5, 0.5]^2, image axes (y points down), so `size` is the box side.
_CIRCLE_ANGLES = np.linspace(0, 2 * np.pi, 32, endpoint=False)  # a 32-gon is within 0.11 px of a 44 px circle
_CROSS_ARM = 1 / 6  # half the arm width: arms a third of the size stay >= 5 px wide on a 16 px cross
_UNIT_POLYGONS = {
    "circle": 0.5 * np.stack([np.cos(_CIRCLE_ANGLES), np.sin(_CIRCLE_ANGLES)], axis=1),
    "square": np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "triangle": np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
    "cross": np.array(
        [
            [-_CROSS_ARM, -0.5],
            [_CROSS_ARM, -0.5],
            [_CROSS_ARM, -_CROSS_ARM],
            [0.5, -_CROSS_ARM],
            [0.5, _CROSS_ARM],
            [_CROSS_ARM, _CROSS_ARM],
            [_CROSS_ARM, 0.5],
            [-_CROSS_ARM, 0.5],
            [-_CROSS_ARM, _CROSS_ARM],
            [-0.5, _CROSS_ARM],
            [-0.5, -_CROSS_ARM],
            [-_CROSS_ARM, -_CROSS_ARM],
        ]
    ),
    "diamond": np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]]),
}

# Texture scales in pixels: at least 3 px per stripe, cell or dot so that JPEG, an 8 px patch and a
# 0.5x rescale in augmentation still leave the pattern visible; at most 10 px so that a 16 px object
# still shows it.
_STRIPE_PERIOD = (6.0, 10.0)
_CHECKER_CELL = (4.0, 6.0)
_DOT_SPACING = (6.0, 9.0)
_DOT_RADIUS = (1.5, 2.5)

# Rasterising at 4x and averaging gives anti-aliased edges, like a photographed object.
_SUPERSAMPLE = 4


def shape_polygon(
    shape: str, size: float, angle_deg: float, center_xy: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """Vertices (K, 2) as (x, y) pixel coordinates of `shape`, `size` px wide before rotation."""
    if shape not in _UNIT_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return _UNIT_POLYGONS[shape] @ rotation.T * size + np.asarray(center_xy, dtype=np.float64)


def random_translation(
    polygon: np.ndarray, height: int, width: int, rng: np.random.Generator, margin: float = 1.0
) -> np.ndarray:
    """`polygon` moved to a uniformly random place inside the image, at least `margin` px from the border."""
    low = margin - polygon.min(axis=0)
    high = np.array([width, height]) - margin - polygon.max(axis=0)
    if np.any(high < low):
        raise ValueError(
            f"a polygon spanning {np.ptp(polygon, axis=0)} px does not fit a {height}x{width} image"
        )
    return polygon + rng.uniform(low, high)


def polygon_area(polygon: np.ndarray) -> float:
    """Area of a simple polygon (shoelace formula)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of the polygon, pixel (i, j) being the square [j, j+1) x [i, i+1).

    PIL also fills the fine pixels the outline passes through, so edges are up to 1/4 px generous.
    """
    canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon * _SUPERSAMPLE], fill=255)
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def texture(
    name: str, height: int, width: int, colors: Sequence[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """A (H, W, 3) canvas filled with texture `name` in two colors, random scale and phase.

    The pattern is in image coordinates (stripes stay horizontal when a shape rotates), so the
    texture of a region can be told from any patch inside it.
    """
    # Pixel-center coordinates as a column and a row: patterns are built by broadcasting them.
    ys, xs = np.ogrid[0:height, 0:width]
    ys, xs = ys + 0.5, xs + 0.5
    if name == "solid":
        pattern = np.zeros((height, width), dtype=bool)
    elif name in ("hstripes", "vstripes"):
        period = rng.uniform(*_STRIPE_PERIOD)
        coordinate = ys if name == "hstripes" else xs
        pattern = np.broadcast_to(
            (coordinate + rng.uniform(0, period)) % period < period / 2, (height, width)
        )
    elif name == "checker":
        cell = rng.uniform(*_CHECKER_CELL)
        offset_x, offset_y = rng.uniform(0, 2 * cell, size=2)
        pattern = (np.floor((xs + offset_x) / cell) + np.floor((ys + offset_y) / cell)) % 2 == 1
    elif name == "dots":
        spacing, radius = rng.uniform(*_DOT_SPACING), rng.uniform(*_DOT_RADIUS)
        offset_x, offset_y = rng.uniform(0, spacing, size=2)
        dx = (xs + offset_x) % spacing - spacing / 2
        dy = (ys + offset_y) % spacing - spacing / 2
        pattern = dx**2 + dy**2 < radius**2
    else:
        raise ValueError(f"unknown texture {name!r}; expected one of {TEXTURES}")
    return np.where(pattern[..., None], np.asarray(colors[1], np.float32), np.asarray(colors[0], np.float32))


def distinct_color(rng: np.random.Generator, avoid: Sequence[np.ndarray], min_distance: float) -> np.ndarray:
    """A random RGB color at least `min_distance` (Euclidean, 0..255 scale) from every color in `avoid`."""
    for _ in range(1000):
        color = rng.uniform(0, 255, size=3)
        if all(np.linalg.norm(color - other) >= min_distance for other in avoid):
            return color
    raise RuntimeError(f"no color {min_distance} away from {len(avoid)} colors after 1000 draws")


def hue_shades(rng: np.random.Generator, hue_deg: float, jitter_deg: float) -> list[np.ndarray]:
    """Two RGB colours (0..255) of one saturated hue within +-`jitter_deg` of `hue_deg`: a light
    shade and a dark one, so that every texture drawn with them shows its pattern."""
    hue = (hue_deg + rng.uniform(-jitter_deg, jitter_deg)) % 360 / 360
    saturation = rng.uniform(0.6, 1.0)
    values = (rng.uniform(0.8, 1.0), rng.uniform(0.4, 0.6))
    return [np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255 for value in values]


def neutral_color(rng: np.random.Generator) -> np.ndarray:
    """A near-grey RGB colour (channels within +-15 of a grey level in 60..200): a background whose
    own hue never competes with the object's."""
    return rng.uniform(60, 200) + rng.uniform(-15, 15, size=3)


def smooth_field(height: int, width: int, rng: np.random.Generator, grid: int = 3) -> np.ndarray:
    """A smooth random field (H, W) in [-1, 1]: a `grid` x `grid` random lattice, bilinearly upsampled."""
    lattice = Image.fromarray(rng.uniform(-1, 1, size=(grid, grid)).astype(np.float32))
    return np.asarray(lattice.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def smooth_background(
    height: int, width: int, rng: np.random.Generator, base_color: np.ndarray, variation: float
) -> np.ndarray:
    """A (H, W, 3) canvas: `base_color` with a slow color gradient of +-`variation` per channel."""
    channels = [smooth_field(height, width, rng) for _ in range(3)]
    return np.asarray(base_color, np.float32) + variation * np.stack(channels, axis=-1)


def region_map(
    height: int, width: int, num_regions: int, rng: np.random.Generator, warp_px: float = 6.0
) -> np.ndarray:
    """Region index (H, W) in [0, num_regions): Voronoi cells of random seeds whose borders are bent
    by a smooth displacement of up to `warp_px`, so that they are not straight lines."""
    seeds = rng.uniform((0, 0), (width, height), size=(num_regions, 2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    xs = xs + warp_px * smooth_field(height, width, rng, grid=4)
    ys = ys + warp_px * smooth_field(height, width, rng, grid=4)
    squared_distance = (xs[..., None] - seeds[:, 0]) ** 2 + (ys[..., None] - seeds[:, 1]) ** 2
    return squared_distance.argmin(axis=-1)


def composite(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`layer` over `canvas` with coverage `alpha` (H, W)."""
    return canvas + (layer - canvas) * alpha[..., None]


def to_uint8(canvas: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Add Gaussian pixel noise (sensor-like), round and clip to uint8."""
    noisy = canvas + rng.normal(0.0, noise_std, size=canvas.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def paint_polygon(
    canvas: np.ndarray,
    polygon: np.ndarray,
    texture_name: str,
    colors: Sequence[np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Composite `polygon` filled with a texture onto `canvas` (H, W, 3) in place, rasterising and
    texturing only the polygon's pixel bounding box: a full-resolution image with 20 objects would
    otherwise rasterise the whole image 20 times. The texture's random phase makes box-local pattern
    coordinates as likely as image ones.

    Returns:
        the coverage (h, w) inside the box, and the box as (rows, columns) slices of the canvas.
    """
    height, width = canvas.shape[:2]
    x0, y0 = np.maximum(np.floor(polygon.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(polygon.max(axis=0)).astype(int), (width, height))
    box = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    alpha = rasterize(polygon - (x0, y0), int(y1 - y0), int(x1 - x0))
    fill = texture(texture_name, int(y1 - y0), int(x1 - x0), colors, rng)
    canvas[box] = composite(canvas[box], fill, alpha)
    return alpha, box
