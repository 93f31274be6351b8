"""Data sets for training and evaluation, built with model.preprocess transforms only.

`--data` names one of: shapes (built in, generated), digits (scikit-learn's bundled 8x8 digits),
folder:PATH (class sub-folders), cifar10:ROOT and mnist:ROOT (torchvision's loaders, download=False).
Validation images always go through `Preprocess.eval_transform()`, the transform the service uses;
training images through `Preprocess.train_transform(augment)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from model.preprocess import Augment, Preprocess, open_image
from training import shapes
from training.config import ConfigError, TrainConfig
from training.folder import load_folder, split_digest, stratified_split

log = logging.getLogger(__name__)
KINDS = ("shapes", "digits", "folder", "cifar10", "mnist")
Sample = tuple[torch.Tensor, int]


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise ConfigError(
                f"unknown data set {text!r}; use shapes, digits, folder:PATH, cifar10:ROOT or mnist:ROOT"
            )
        if kind in ("shapes", "digits"):
            if rest:
                raise ConfigError(f"--data {kind} takes no path")
            return cls(kind)
        if not rest:
            raise ConfigError(f"--data {kind} needs a path: {kind}:PATH")
        return cls(kind, Path(rest).expanduser())

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


# What each data set looks best at for our own CNNs (torchvision models keep their ImageNet input).
_NATIVE: dict[str, dict[str, Any]] = {
    "shapes": {"size": 64, "resize": 64, "channels": 3},
    "digits": {"size": 32, "resize": 32, "mode": "squash", "channels": 1, "interpolation": "bilinear"},
    "mnist": {"size": 32, "resize": 32, "mode": "squash", "channels": 1},
    "cifar10": {
        "size": 32,
        "resize": 32,
        "mode": "squash",
        "channels": 3,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
    },
}
_NO_FLIP = Augment(random_resized_crop=(0.8, 1.0), hflip=0.0, rotation=10.0, color_jitter=(0.0,) * 4)
_AUGMENT: dict[str, Augment] = {
    "shapes": Augment.none(),  # the generator already varies position, size, rotation and colour
    "digits": _NO_FLIP,  # a flipped digit is a different (or no) digit
    "mnist": _NO_FLIP,
    "cifar10": Augment(
        random_resized_crop=(0.6, 1.0), hflip=0.5, rotation=0.0, color_jitter=(0.1,) * 3 + (0.0,)
    ),
    "folder": Augment(),
}


def resolve_preprocess(spec: DataSpec, base: Preprocess, cfg: TrainConfig, own_cnn: bool) -> Preprocess:
    """arch default < the data set's native input (our CNNs only) < config file < --image-size/--channels."""
    d = base.to_dict()
    if own_cnn:
        _merge(d, _NATIVE.get(spec.kind, {}))
    _merge(d, cfg.preprocess or {})
    if cfg.image_size is not None and cfg.image_size != d["size"]:
        _merge(d, {"size": cfg.image_size})  # resize follows, as for a config layer's size
    if cfg.channels is not None:
        _merge(d, {"channels": cfg.channels})
    try:
        return Preprocess.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"preprocessing: {e}") from None


def _merge(d: dict[str, Any], layer: dict[str, Any]) -> None:
    """Update preprocessing fields; per-channel statistics from a lower layer cannot carry over to a
    different channel count, so then their average is used (unless this layer gives its own)."""
    channels = layer.get("channels", d["channels"])
    if channels != d["channels"]:
        for key in ("mean", "std"):
            if key not in layer and len(d[key]) not in (1, channels):
                d[key] = [float(np.mean(d[key]))]
    if "size" in layer and "resize" not in layer:
        # A new size alone keeps the inherited framing: an inherited resize left as it was would crop a
        # smaller share of the image (resnet18 at size 128 with resize 256: the central quarter), or
        # fall below the size (our CNNs' resize 64 at size 96) and fail validation.
        layer = {**layer, "resize": _scaled_resize(d, layer["size"])}
    d.update(layer)


def _scaled_resize(d: dict[str, Any], size: Any) -> Any:
    """`d`'s resize scaled by size / d["size"], never below size. Where a value is not a positive int
    the old resize is kept, so Preprocess validation names the bad value rather than this arithmetic."""
    old, resize = d["size"], d.get("resize") or d["size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (size, old, resize)):
        return d.get("resize")
    return max(size, round(resize * size / old))


def resolve_augment(spec: DataSpec, cfg: TrainConfig) -> Augment:
    aug = _AUGMENT[spec.kind]
    if cfg.crop_scale is not None:
        aug = replace(aug, random_resized_crop=(cfg.crop_scale, 1.0) if cfg.crop_scale > 0 else None)
    if cfg.hflip is not None:
        aug = replace(aug, hflip=cfg.hflip)
    if cfg.rotation is not None:
        aug = replace(aug, rotation=cfg.rotation)
    if cfg.jitter is not None:
        aug = replace(aug, color_jitter=(cfg.jitter, cfg.jitter, cfg.jitter, min(0.5, cfg.jitter / 10)))
    return aug


class ImageDataset(Dataset[Sample]):
    """A sized map-style data set of (normalised image tensor, class index)."""

    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)


class CachedImages(ImageDataset):
    """Images whose transform is deterministic: geometry is done once, normalisation per item."""

    def __init__(self, images: list[Image.Image] | np.ndarray, targets: list[int], preprocess: Preprocess):
        self.pixels = torch.stack([preprocess.to_uint8(_pil(im)) for im in images])  # (N, C, H, W) uint8
        self.targets = [int(t) for t in targets]
        self.preprocess = preprocess

    def __getitem__(self, i: int) -> Sample:
        return self.preprocess.normalize(self.pixels[i]), self.targets[i]


class LazyImages(ImageDataset):
    """Images loaded and transformed per access: augmentation, or files too many to hold in memory."""

    def __init__(
        self,
        load: Callable[[int], Image.Image],
        targets: list[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ):
        self.load, self.targets, self.transform = load, [int(t) for t in targets], transform

    def __getitem__(self, i: int) -> Sample:
        return self.transform(self.load(i)), self.targets[i]


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


# LazyImages' loaders are module-level classes, not lambdas, so the data sets pickle: DataLoader workers
# started with spawn or forkserver (macOS's default; Linux's from Python 3.14) get the data set pickled.
class ItemImages:
    """Index -> the i-th in-memory image (PIL, or an array made into one)."""

    def __init__(self, images: Any):
        self.images = images

    def __call__(self, i: int) -> Image.Image:
        return _pil(self.images[i])


class FileImages:
    """Index -> the i-th file, opened and prepared as serving does."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __call__(self, i: int) -> Image.Image:
        return open_image(self.paths[i], self.preprocess)


@dataclass
class DataBundle:
    spec: DataSpec
    labels: list[str]
    train: ImageDataset | None
    val: ImageDataset
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # split_digest of the validation items where they come from files or a pool that also feeds
    # training (digits, folder); None for shapes and the torchvision sets, whose validation images are
    # generated or shipped apart from the training ones.
    val_digest: str | None = None

    @property
    def in_memory(self) -> bool:
        return self.spec.kind != "folder"


def _in_memory(
    images: Any, targets: list[int], pre: Preprocess, transform: Callable[..., torch.Tensor] | None
) -> ImageDataset:
    """Cache when the transform is the eval one (None); otherwise transform each access."""
    if transform is None:
        return CachedImages(images, targets, pre)
    return LazyImages(ItemImages(images), targets, transform)


def load_data(
    spec: DataSpec, pre: Preprocess, augment: Augment | None, cfg: TrainConfig, train: bool = True
) -> DataBundle:
    """The validation split always; the training split too when `train`. `augment=None` means the
    training split uses the eval transform (and is cached in memory where it can be)."""
    train_tf = pre.train_transform(augment) if augment is not None and augment != Augment.none() else None
    if spec.kind == "shapes":
        labels = list(shapes.CLASSES)
        val_x, val_y = shapes.generate(cfg.seed, "val", cfg.val_size)
        val = CachedImages(val_x, val_y.tolist(), pre)
        tr: ImageDataset | None = None
        if train:
            x, y = shapes.generate(cfg.seed, "train", cfg.train_size)
            tr = _in_memory(x, y.tolist(), pre, train_tf)
        return DataBundle(spec, labels, tr, val)
    if spec.kind == "digits":
        images, targets = _digits()
        tr_idx, va_idx = stratified_split(targets, cfg.val_fraction, cfg.seed)
        val = CachedImages(images[va_idx], [targets[i] for i in va_idx], pre)
        tr = _in_memory(images[tr_idx], [targets[i] for i in tr_idx], pre, train_tf) if train else None
        labels = [str(d) for d in range(10)]
        return DataBundle(spec, labels, tr, val, val_digest=split_digest(map(str, va_idx)))
    if spec.kind == "folder":
        assert spec.path is not None
        split = load_folder(spec.path, pre, cfg.val_fraction, cfg.seed)
        folder_val = LazyImages(
            FileImages([p for p, _ in split.val], pre), [t for _, t in split.val], pre.eval_transform()
        )
        tr = None
        if train:
            tr = LazyImages(
                FileImages([p for p, _ in split.train], pre),
                [t for _, t in split.train],
                train_tf or pre.eval_transform(),
            )
        # relative paths: the digest survives moving the folder, not a change to what is in it
        digest = split_digest(
            f"{p.relative_to(spec.path).as_posix()}\t{split.labels[t]}" for p, t in split.val
        )
        return DataBundle(spec, split.labels, tr, folder_val, split.skipped, digest)
    return _torchvision(spec, pre, train_tf, train)


def split_changed(recorded: dict[str, Any], cfg: TrainConfig) -> str:
    """The warning (or error) for a validation split whose digest differs from the recorded one.
    `recorded` holds the training run's settings (seed, val_fraction) to name the likely cause."""
    flags = [
        f"--{k.replace('_', '-')}"
        for k in ("seed", "val_fraction")
        if recorded.get(k, getattr(cfg, k)) != getattr(cfg, k)
    ]
    cause = f"{' and '.join(flags)} changed since training" if flags else "the data changed since training"
    return (
        f"the validation split differs from the one this model was trained with: {cause}, so validation "
        "images may have been trained on; accuracy may be inflated"
    )


def _digits() -> tuple[np.ndarray, list[int]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("--data digits needs scikit-learn: pip install 'convserve[digits]'") from None
    d = load_digits()
    # 0..16 intensities -> 0..255 grey, white digit on black, as 8x8 'L' images
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return images, [int(t) for t in d.target]


def _torchvision(
    spec: DataSpec, pre: Preprocess, train_tf: Callable[..., torch.Tensor] | None, train: bool
) -> DataBundle:
    from torchvision import datasets

    assert spec.path is not None
    cls = datasets.CIFAR10 if spec.kind == "cifar10" else datasets.MNIST
    where = "cifar-10-batches-py/" if spec.kind == "cifar10" else "MNIST/raw/"
    try:
        # download=False always: convserve never fetches data. The loaders give PIL images.
        sets = {
            split: cls(str(spec.path), train=split, download=False)
            for split in ([True, False] if train else [False])
        }
    except RuntimeError as e:
        raise ConfigError(
            f"no {spec.kind} data under {spec.path} ({e}); put the extracted {where} there "
            "(convserve never downloads)"
        ) from None
    labels = [str(c).split(" - ")[0] for c in sets[False].classes]  # MNIST: "0 - zero" -> "0"

    def pil_list(ds: Any) -> list[Image.Image]:
        return [ds[i][0] for i in range(len(ds))]

    val_ds = sets[False]
    val = CachedImages(pil_list(val_ds), [int(t) for t in val_ds.targets], pre)
    tr = None
    if train:
        ds = sets[True]
        tr = _in_memory(pil_list(ds), [int(t) for t in ds.targets], pre, train_tf)
    return DataBundle(spec, labels, tr, val)
