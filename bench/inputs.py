"""Reproducible benchmark inputs: JPEG sets made from scikit-image's bundled sample photos.

Three sets, each a folder of JPEG files:

    photo640   ~640x480 photos (one in four portrait 480x640): random crops and flips of the samples
    phone4000  4000x3000 phone-size photos: sample content upscaled, plus sensor-like noise so the
               files compress (and decode) like real 12-megapixel photos (several MB each)
    small64    64x64 images for the default small model

The same seed gives byte-identical files (NumPy's PCG64 and Pillow's encoder are deterministic), so
runs on different days feed the servers the same bytes. A folder that already holds the files of the
same generator version and seed is reused as is.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
VERSION = 1
# (name, width, height, count, noise sigma). Noise is what makes upscaled content look like a photo
# to the JPEG encoder: smooth upscales compress 5-10x better than camera output and decode faster.
SETS: dict[str, tuple[int, int, int, float]] = {
    "photo640": (640, 480, 48, 3.0),
    "phone4000": (4000, 3000, 6, 6.0),
    "small64": (64, 64, 64, 2.0),
}
QUICK_COUNTS = {"photo640": 8, "phone4000": 0, "small64": 16}


@dataclass(frozen=True)
class ImageSet:
    name: str
    width: int
    height: int
    paths: tuple[Path, ...]

    def load(self) -> list[bytes]:
        return [p.read_bytes() for p in self.paths]

    @property
    def mean_bytes(self) -> float:
        return sum(p.stat().st_size for p in self.paths) / max(1, len(self.paths))


def _sources() -> dict[str, np.ndarray]:
    """The photographs skimage ships in its wheel (no download), as (H, W, 3) uint8, by name."""
    from skimage import data  # lazy: only the generator needs scikit-image

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "astronaut": data.astronaut,
        "cat": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "hubble": data.hubble_deep_field,
        "tissue": data.immunohistochemistry,
        "retina": data.retina,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
        "motorcycle_right": lambda: data.stereo_motorcycle()[1],
        "camera": lambda: np.stack([data.camera()] * 3, axis=-1),  # grey photos, stored as RGB
        "clock": lambda: np.stack([data.clock()] * 3, axis=-1),
    }
    return {name: np.ascontiguousarray(f()[..., :3]) for name, f in loaders.items()}


def _crop(src: np.ndarray, aspect: float, rng: np.random.Generator) -> np.ndarray:
    """A random crop with the target aspect ratio covering 50-100% of the largest such box."""
    h, w = src.shape[:2]
    bw, bh = (w, round(w / aspect)) if w / h <= aspect else (round(h * aspect), h)
    frac = float(np.sqrt(rng.uniform(0.5, 1.0)))
    cw, ch = max(8, round(bw * frac)), max(8, round(bh * frac))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return src[y : y + ch, x : x + cw]


def make_image(src: np.ndarray, width: int, height: int, noise: float, rng: np.random.Generator) -> bytes:
    """One JPEG: crop, maybe flip, resize to width x height, add noise, encode at quality 85-95."""
    region = _crop(src, width / height, rng)
    if rng.random() < 0.5:
        region = region[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(region)).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16)
    if noise > 0:
        # int16 noise in row blocks: a 4000x3000x3 float64 array would be 288 MB for no benefit
        out = np.empty(arr.shape, dtype=np.uint8)
        for y in range(0, height, 500):
            block = arr[y : y + 500] + rng.normal(0.0, noise, arr[y : y + 500].shape).astype(np.int16)
            out[y : y + 500] = np.clip(block, 0, 255).astype(np.uint8)
    else:
        out = arr.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def generate(root: Path, seed: int = 0, quick: bool = False) -> dict[str, ImageSet]:
    """Write (or reuse) the image sets under `root`; returns them by name."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {name: (QUICK_COUNTS[name] if quick else spec[2]) for name, spec in SETS.items()}
    manifest_path = root / "manifest.json"
    wanted = {"version": VERSION, "seed": seed, "counts": counts}
    sets: dict[str, ImageSet] = {}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == wanted:
        for name, (w, h, _, _) in SETS.items():
            sets[name] = ImageSet(name, w, h, tuple(sorted((root / name).glob("*.jpg"))))
        if all(len(sets[n].paths) == counts[n] for n in SETS):
            return sets
    sources = list(_sources().values())
    for name, (w, h, _, noise) in SETS.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.jpg"):
            old.unlink()
        rng = np.random.default_rng([seed, VERSION, *name.encode()])
        paths: list[Path] = []
        for i in range(counts[name]):
            src = sources[i % len(sources)]
            portrait = name == "photo640" and i % 4 == 3
            data = make_image(src, h if portrait else w, w if portrait else h, noise, rng)
            path = folder / f"{name}_{i:03d}.jpg"
            path.write_bytes(data)
            paths.append(path)
        sets[name] = ImageSet(name, w, h, tuple(paths))
        log.info("inputs: %d x %s in %s", len(paths), name, folder)
    manifest_path.write_text(json.dumps(wanted))
    return sets


def classification_folder(root: Path, per_class: int = 80, seed: int = 1) -> Path:
    """ROOT/<photo>/*.jpg: 64x64 crops labelled by the photo they come from, for a quick real training
    run (`python -m training train --data folder:ROOT`) when no trained checkpoint is at hand. A
    different seed from the benchmark images, so agreement is measured on images it never saw."""
    rng = np.random.default_rng([seed, VERSION, 64])
    for name, src in _sources().items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{i:03d}.jpg").write_bytes(make_image(src, 64, 64, 2.0, rng))
    return root
