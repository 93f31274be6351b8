"""The built-in `shapes` data set: geometric shapes drawn on the fly, no files needed.

Each image is a function of (seed, split, index) alone, so a data set is identical on every run and
every process for the same seed, and the train and validation splits never share an image.
Shapes get a random colour, size, position and rotation, over a random background colour with a
gradient and Gaussian pixel noise. Classes are balanced: image i has class i mod 7.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Seven shapes that stay distinct at every size and rotation (a half disc was dropped: small ones
# look like triangles).
CLASSES = ("circle", "ring", "triangle", "square", "star", "cross", "arrow")
SIZE = 64
_SS = 4  # supersampling factor: shapes are drawn at 4x and downsampled for anti-aliased edges
_SPLITS = {"train": 0, "val": 1}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 brightness
MIN_CONTRAST = 70.0
_YS, _XS = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)[..., None] / SIZE - 0.5  # (H, W, 1) each


def _polygon(kind: str, r: float) -> list[tuple[float, float]]:
    """Outline points of a shape of circumradius ~r around (0, 0), before rotation."""
    if kind == "triangle":
        return [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 4)[:-1]]
    if kind == "square":
        s = r / math.sqrt(2)
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if kind == "star":  # five points, inner radius 0.4 r
        return [
            (
                (r if i % 2 == 0 else 0.4 * r) * math.cos(i * math.pi / 5),
                (r if i % 2 == 0 else 0.4 * r) * math.sin(i * math.pi / 5),
            )
            for i in range(10)
        ]
    if kind == "cross":  # a plus sign with arms 0.36 r wide
        a, w = r, 0.36 * r
        return [
            (-w, -a),
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
    if kind == "arrow":  # shaft plus head, pointing along +x
        return [
            (-r, -0.22 * r),
            (0.1 * r, -0.22 * r),
            (0.1 * r, -0.65 * r),
            (r, 0),
            (0.1 * r, 0.65 * r),
            (0.1 * r, 0.22 * r),
            (-r, 0.22 * r),
        ]
    raise ValueError(kind)


def _mask(kind: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """An anti-aliased 'L' mask of one shape at (cx, cy), supersampled then reduced."""
    big = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * _SS, cy * _SS, r * _SS
    if kind in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if kind == "ring":
            inner = 0.6 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        points = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in _polygon(kind, r)]
        draw.polygon(points, fill=255)
    return big.reduce(_SS)


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, int]:
    """Image `index` of a split: ((64, 64, 3) uint8, class index)."""
    rng = np.random.default_rng((seed, _SPLITS[split], index))
    label = index % len(CLASSES)
    r = rng.uniform(11, 25)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    mask = _mask(CLASSES[label], cx, cy, r, rng.uniform(0, 2 * math.pi))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)

    background = rng.uniform(0, 255, size=3).astype(np.float32)
    while True:  # the shape must stand out from the background by brightness, whatever the hues
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if abs(float(_LUMA @ (colour - background))) >= MIN_CONTRAST:
            break
    # a linear gradient across the background, so "background" is not one flat colour
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (_XS * math.cos(direction) + _YS * math.sin(direction)) * rng.uniform(-60, 60, size=3).astype(
        np.float32
    )
    image = (background + ramp) * (1 - alpha) + colour * alpha  # (H, W, 3) float32
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(4, 20))
    return np.clip(image, 0, 255, out=image).astype(np.uint8), label


def generate(seed: int, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of a split: ((N, 64, 64, 3) uint8, (N,) int64 labels)."""
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        images[i], labels[i] = render(seed, split, i)
    return images, labels
