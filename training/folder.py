"""An image folder with one sub-folder per class: find the files, check each decodes, split them.

Layouts: ROOT/train/<class>/* plus ROOT/val/<class>/* (or ROOT/test/), or ROOT/<class>/* which is
split into train and validation by a stratified, seeded draw. Every file is decoded once up front with
the same `open_image` and the same formats the service uses, so a file that cannot be read, or that
the service would refuse (415), is reported (count and first few paths) and skipped here instead of
failing an epoch half-way through or training on images the served model can never be sent.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocess import SERVED_FORMATS, Preprocess, open_image
from training.config import ConfigError

log = logging.getLogger(__name__)
SHOW_FIRST = 5  # how many unreadable paths a report names


@dataclass
class FolderSplit:
    labels: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(class_dir: Path) -> list[Path]:
    """Every non-hidden file below a class folder (nested folders too), sorted for reproducibility."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


def _check(path: Path, preprocess: Preprocess) -> str | None:
    """None when the file decodes like the service would decode it, else the reason it does not."""
    try:
        with path.open("rb") as fh:
            # the service opens client bytes with only these formats' openers (service/decode.py)
            img = open_image(fh, preprocess, formats=SERVED_FORMATS)
            img.load()
        return None
    except Image.UnidentifiedImageError:
        return _unserved(path)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"


def _unserved(path: Path) -> str:
    """Why a file no served format opens is skipped: name its format when any Pillow opener knows it
    (user's own files, so trying every plugin here is fine), so the report says what to convert."""
    try:
        with Image.open(path) as img:
            fmt = img.format
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        fmt = None
    if fmt is None:
        return "not an image format Pillow can decode"
    return f"{fmt} is not a format the service accepts ({', '.join(SERVED_FORMATS)})"


def _scan(
    root: Path,
    labels: list[str] | None,
    preprocess: Preprocess,
    skipped: list[tuple[Path, str]],
    threads: int,
) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = _class_dirs(root)
    if not dirs:
        raise ConfigError(
            f"image folder {root} has no class sub-folders; put images in {root}/<class name>/ "
            "(or in train/<class>/ and val/<class>/)"
        )
    names = [d.name for d in dirs]
    if labels is None:
        labels = names
    else:
        extra = sorted(set(names) - set(labels))
        if extra:
            raise ConfigError(f"{root} has classes {extra} that the training folder lacks; add them there")
    candidates = [(p, labels.index(d.name)) for d in dirs for p in _files(d)]
    # Pillow releases the GIL while decoding, so threads check files in parallel.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(lambda item: _check(item[0], preprocess), candidates))
    items = []
    for (path, label), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            items.append((path, label))
        else:
            skipped.append((path, reason))
    if not items:
        raise ConfigError(
            f"image folder {root} holds no readable images; add image files to its class folders"
        )
    return labels, items


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): each class keeps `fraction` of its items for validation (at least one
    when it has two or more), chosen by a seeded shuffle, so the split is the same on every run."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, val = [], []
    for cls in sorted(by_class):
        idx = rng.permutation(by_class[cls]).tolist()
        n_val = max(1, round(len(idx) * fraction)) if len(idx) >= 2 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def split_digest(keys: Iterable[str]) -> str:
    """SHA-256 over the sorted keys (relative path and label, or index) of a validation set. Recorded
    at training time, so `evaluate` and `--resume` can tell when rebuilding "the same" split from seed
    and fraction gave other images: the draw reshuffles whenever any class gains or loses a file."""
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")  # NUL: no file name contains one
    return h.hexdigest()


def load_folder(
    root: Path, preprocess: Preprocess, val_fraction: float, seed: int, threads: int = 4
) -> FolderSplit:
    if not root.is_dir():
        raise ConfigError(
            f"image folder {root} does not exist; give folder:PATH to a folder of class folders"
        )
    skipped: list[tuple[Path, str]] = []
    val_dir = next((root / n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        labels, train = _scan(root / "train", None, preprocess, skipped, threads)
        _, val = _scan(val_dir, labels, preprocess, skipped, threads)
    else:
        labels, items = _scan(root, None, preprocess, skipped, threads)
        tr, va = stratified_split([t for _, t in items], val_fraction, seed)
        train, val = [items[i] for i in tr], [items[i] for i in va]
    if len(labels) < 2:
        raise ConfigError(f"image folder {root} has only class {labels}; a classifier needs at least two")
    if not val:
        raise ConfigError(f"image folder {root} leaves no validation images; add images or a val/ folder")
    if skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in skipped[:SHOW_FIRST])
        log.warning(
            "skipped %d unreadable file(s) in %s: %s%s",
            len(skipped),
            root,
            shown,
            " ..." if len(skipped) > SHOW_FIRST else "",
        )
    return FolderSplit(labels, train, val, skipped)
