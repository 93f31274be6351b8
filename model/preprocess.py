"""Image preprocessing: the only place that knows image size, resize policy, channels and mean/std.

Training evaluation and serving both build their transform from the checkpoint's stored `Preprocess`,
and both open files through `open_image`, so the service sees exactly the tensors the model was
evaluated on. The pipeline is split in two halves so the server can batch cheaply:

    open_image / prepare : bytes -> PIL image (first frame, reduced-scale JPEG decode, EXIF, channels)
    to_uint8             : PIL image -> (C, H, W) uint8, geometry only (resize / crop / pad)
    normalize            : (..., C, H, W) uint8 on any device -> float, (x/255 - mean) / std

`eval_transform()` is those composed; the service runs `normalize` on a whole batch on the device.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

Mode = Literal["center_crop", "squash", "letterbox"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Pillow formats the service decodes. Here, not in service/, so training can refuse the same files:
# a model trained on a format the service rejects would get 415 for the very images it learned from.
# (Pillow's JPEG opener may report "MPO" for a JPEG with a multi-picture index; it is still a JPEG.)
SERVED_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input. Stored in every checkpoint."""

    size: int = 64  # the model's square input side
    resize: int | None = None  # center_crop: short side is resized to this, then cropped to `size`
    mode: Mode = "center_crop"
    interpolation: Interpolation = "bilinear"
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...] = (0.5,)  # one value per channel, or one for all
    std: tuple[float, ...] = (0.5,)
    fill: int = 0  # letterbox padding, grey level 0-255
    alpha_background: int = 255  # transparent pixels are composited over this grey level (white)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preprocess.size must be a positive integer, got {self.size!r}")
        resize = self.size if self.resize is None else self.resize
        if not isinstance(resize, int) or resize < self.size:
            raise ValueError(f"preprocess.resize ({resize!r}) must be an integer >= size ({self.size})")
        if self.mode not in ("center_crop", "squash", "letterbox"):
            raise ValueError(f"preprocess.mode must be center_crop, squash or letterbox, not {self.mode!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocess.interpolation must be one of {sorted(_RESAMPLE)}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {self.channels!r}")
        mean = _per_channel(self.mean, self.channels, "mean")
        std = _per_channel(self.std, self.channels, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"preprocess.std must be positive, got {std}")
        for name, value in (("fill", self.fill), ("alpha_background", self.alpha_background)):
            if not 0 <= value <= 255:
                raise ValueError(f"preprocess.{name} must be in 0..255, got {value}")
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    # ---- (de)serialisation: the checkpoint stores to_dict() as JSON -------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def pil_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    # ---- step 1: decode-side preparation -----------------------------------------------------------
    def draft(self, img: Image.Image) -> None:
        """Ask the JPEG decoder for a reduced-scale decode (1/2, 1/4, 1/8) when the geometry below
        would shrink the image at least that much anyway: a 12-megapixel photo then costs a fraction
        of a full decode. Must run before the pixels are loaded; a no-op for other formats."""
        if img.format not in ("JPEG", "MPO"):  # MPO: a JPEG with a multi-picture index (camera previews)
            return
        w, h = img.size
        img.draft(self.pil_mode, self._needed_source_size(w, h))

    def _needed_source_size(self, w: int, h: int) -> tuple[int, int]:
        """The smallest (w, h) that still gives the geometry step every pixel it samples at full detail."""
        if self.mode == "center_crop":
            scale = (self.resize or self.size) / min(w, h)
        elif self.mode == "letterbox":
            scale = self.size / max(w, h)
        else:  # squash scales each axis on its own: both must stay >= size
            scale = max(self.size / w, self.size / h)
        scale = min(scale, 1.0)
        return (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))

    def to_channels(self, img: Image.Image) -> Image.Image:
        """Any Pillow mode -> 'RGB' or 'L'. Alpha is composited over `alpha_background`; 16-bit and
        float images are scaled into 0-255 rather than clipped (Pillow's convert would clip)."""
        if img.mode == self.pil_mode and "transparency" not in img.info:
            return img
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            img = _high_depth_to_l(img)
        elif img.mode in ("P", "L", "RGB") and "transparency" in img.info:
            img = img.convert("RGBA")  # palette alpha or a tRNS colour key: transparent like any alpha
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (self.alpha_background,) * 3 + (255,))
            img = Image.alpha_composite(bg, rgba)
        if img.mode in ("LAB", "HSV"):
            img = img.convert("RGB")  # Pillow has no direct LAB/HSV -> L conversion
        return img.convert(self.pil_mode)

    def prepare(self, img: Image.Image) -> Image.Image:
        """Freshly opened image -> decoded, upright, in the model's channels."""
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame is the image
        self.draft(img)
        # exif_transpose copies the whole image even when there is nothing to do; ask first.
        if img.getexif().get(0x0112, 1) != 1:  # 0x0112: the EXIF Orientation tag
            img = ImageOps.exif_transpose(img) or img
        return self.to_channels(img)

    # ---- step 2: geometry ---------------------------------------------------------------------------
    def resize_image(self, img: Image.Image) -> Image.Image:
        """Resize/crop/pad to size x size. For center_crop the crop box is resampled directly from the
        source, which gives the same pixels as resize-then-crop at a fraction of the work."""
        img = self.to_channels(img)
        w, h = img.size
        s = self.size
        resample = _RESAMPLE[self.interpolation]
        if self.mode == "squash":
            return img.resize((s, s), resample)
        if self.mode == "letterbox":
            scale = s / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            canvas = Image.new(img.mode, (s, s), self.fill if img.mode == "L" else (self.fill,) * 3)
            canvas.paste(img.resize((nw, nh), resample), ((s - nw) // 2, (s - nh) // 2))
            return canvas
        r = self.resize or s
        scale = r / min(w, h)
        rw, rh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = round((rw - s) / 2), round((rh - s) / 2)  # torchvision CenterCrop's rounding
        box = (left * w / rw, top * h / rh, (left + s) * w / rw, (top + s) * h / rh)
        return img.resize((s, s), resample, box=box)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> (C, H, W) uint8 tensor after the geometry step."""
        return _pil_to_uint8(self.resize_image(img))

    # ---- step 3: normalisation (batched, on the device) ---------------------------------------------
    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., C, H, W) uint8 -> normalised float. Works on CPU or GPU tensors alike."""
        # The per-channel constants are built once per device (not per batch), and the arithmetic
        # runs in place on the one float copy: x * 1/(255 std) - mean/std, in float32 as before.
        scale, shift = _affine(self.mean, self.std, batch.device)
        out = batch.to(torch.float32, copy=True)
        out.mul_(scale).sub_(shift)
        return out.to(dtype)

    def eval_transform(self) -> EvalTransform:
        """PIL image -> normalised (C, H, W) float tensor, as the model saw it in evaluation."""
        return EvalTransform(self)

    def train_transform(self, augment: Augment) -> TrainTransform:
        """Training: the eval geometry plus the configured augmentations. For center_crop a random
        resized crop replaces the eval geometry; for squash and letterbox it crops inside it."""
        from torchvision.transforms import v2  # lazy: serving never needs it

        ops: list[Any] = []
        if augment.random_resized_crop:
            crop = v2.RandomResizedCrop(
                self.size, scale=augment.random_resized_crop, interpolation=_RESAMPLE[self.interpolation]
            )
            if self.mode == "center_crop":
                ops.append(crop)  # crops the source directly; unchanged, recorded runs depend on it
            else:
                # Cropping the source would drop letterbox's bars and squash's whole-image aspect, so
                # training would see other geometry than eval/serving: crop the size x size canvas.
                ops += [self.resize_image, crop]
        else:
            ops.append(self.resize_image)
        if augment.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(augment.hflip))
        if augment.rotation > 0:
            ops.append(v2.RandomRotation(augment.rotation, fill=self.fill))
        if any(augment.color_jitter):
            b, c, s, h = augment.color_jitter
            ops.append(v2.ColorJitter(b, c, s, h))
        return TrainTransform(self, v2.Compose(ops))


# The transforms are module-level classes, not closures, so data sets holding them pickle: DataLoader
# workers started with spawn or forkserver (macOS's default; Linux's from Python 3.14) receive the
# data set pickled, and a nested function cannot be.
@dataclass(frozen=True)
class EvalTransform:
    """`Preprocess.eval_transform()`: PIL image -> normalised (C, H, W) float tensor."""

    preprocess: Preprocess

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.preprocess.normalize(self.preprocess.to_uint8(img))


@dataclass(frozen=True)
class TrainTransform:
    """`Preprocess.train_transform(augment)`: channels, then the augmentation pipeline, then normalise.
    The pipeline may hold `preprocess.resize_image`; a bound method pickles with its instance."""

    preprocess: Preprocess
    pipeline: Callable[[Image.Image], Image.Image]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pre = self.preprocess
        return pre.normalize(_pil_to_uint8(self.pipeline(pre.to_channels(img))))


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation. Each is off when zero / None."""

    random_resized_crop: tuple[float, float] | None = (0.7, 1.0)  # area fraction range
    hflip: float = 0.5
    rotation: float = 10.0  # degrees
    color_jitter: tuple[float, float, float, float] = field(default=(0.2, 0.2, 0.2, 0.02))

    @classmethod
    def none(cls) -> Augment:
        return cls(random_resized_crop=None, hflip=0.0, rotation=0.0, color_jitter=(0.0, 0.0, 0.0, 0.0))


@functools.lru_cache(maxsize=64)
def _affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 1, 1) float32 scale and shift for `normalize`, cached per (mean, std, device)."""
    with torch.inference_mode(False):  # ordinary tensors: usable inside and outside inference mode
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
        shift = torch.tensor(
            [m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32, device=device
        )
    return scale.view(-1, 1, 1), shift.view(-1, 1, 1)


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    arr = np.array(img, dtype=np.uint8)  # (H, W) or (H, W, C); a writable copy torch can own
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _per_channel(values: tuple[float, ...] | list[float], channels: int, name: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        return vals * channels
    if len(vals) != channels:
        raise ValueError(f"preprocess.{name} needs 1 or {channels} values, got {len(vals)}")
    return vals


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit 'L'. Integers are scaled by their type's range
    (16-bit: /257); floats are taken as 0-1 when they fit there, else as 0-255."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
    elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
        top = 65535.0
    else:
        top = 255.0
    arr = np.nan_to_num(arr, nan=0.0) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def open_image(
    src: bytes | str | Path | BinaryIO, preprocess: Preprocess, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Open and prepare an image file the way serving does (used by training evaluation too).
    `formats` restricts the Pillow openers tried (e.g. SERVED_FORMATS); None tries every one."""
    fp: Any = io.BytesIO(src) if isinstance(src, bytes) else src
    img = Image.open(fp, formats=formats)
    return preprocess.prepare(img)
