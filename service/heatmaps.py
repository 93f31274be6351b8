"""Tensors -> PNG bytes for the explanation endpoints: the model's input, heat maps, feature grids."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# A perceptually ordered map (dark blue -> cyan -> yellow -> red), piecewise linear between stops.
_STOPS = np.array(
    [[0.0, 0, 0, 130], [0.25, 0, 110, 255], [0.5, 40, 220, 200], [0.75, 255, 220, 0], [1.0, 220, 20, 0]],
    dtype=np.float32,
)


def png(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", compress_level=1)  # small images: speed over bytes
    return buf.getvalue()


def input_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 model input (before normalisation) -> (H, W, 3) uint8."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def upsample(cam: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(h, w) map in [0, 1] -> (height, width) float32, bilinear."""
    up = F.interpolate(cam[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8 through the colour map."""
    v = np.clip(values, 0, 1)
    out = np.stack([np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    return out.astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured heat map over the image, more where the heat is high."""
    weight = (alpha * (0.3 + 0.7 * heat))[..., None]
    blended = rgb.astype(np.float32) * (1 - weight) + colorize(heat).astype(np.float32) * weight
    return blended.clip(0, 255).astype(np.uint8)


def feature_grid(maps: torch.Tensor, limit: int = 64, scale: int = 1) -> tuple[np.ndarray, int, int]:
    """(C, h, w) -> a grey grid of the first `limit` channels, each scaled to its own min..max, with a
    1-pixel white gap. Returns (image, columns, channels shown)."""
    shown = maps[:limit].float()
    n, h, w = shown.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    lo = shown.amin(dim=(1, 2), keepdim=True)
    hi = shown.amax(dim=(1, 2), keepdim=True)
    grey = ((shown - lo) / (hi - lo).clamp_min(1e-12) * 255).to(torch.uint8).numpy()
    if scale > 1:
        grey = grey.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = grey[i]
    return grid, cols, n
