"""The self-describing checkpoint: one safetensors file, weights plus JSON metadata.

Loading never unpickles anything: safetensors holds raw tensors and a JSON header, so nothing in the
file can run. Every way a file can be wrong raises `CheckpointError` with a message naming it.

Loading reads the file once (one open, one read): the bytes read are hashed (the file's SHA-256, the
service's model identity), parsed (metadata) and viewed as tensors, so a file replaced mid-load can
never yield metadata from one version and weights from another.

Digests. `weights_sha256` covers tensor names, dtypes, shapes and bytes (format_version 1 and 2).
format_version 2 adds `content_sha256`: the SHA-256 of the canonical metadata JSON (every field but
`content_sha256` itself, weights_sha256 included), so an edited label, preprocessing, name or
training record is refused like a corrupt weight. Version 1 files (weights-only check: their
metadata was never covered) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from model import safetensors_bytes
from model.architectures import output_classes
from model.preprocess import Preprocess
from model.registry import build_model

FORMAT_VERSION = 2  # 2: content_sha256 covers the metadata too
READABLE_VERSIONS = (1, 2)
META_KEY = "convserve"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container
_PICKLE_MAGIC = b"\x80"  # pickle protocol 2+ opcode PROTO


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


@dataclass
class CheckpointMeta:
    arch: str
    labels: list[str]
    preprocess: dict[str, Any]
    arch_config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # data set, epochs, best metrics, date, torch
    # temperature scaling fitted on the validation split (docs/calibration.md); empty: raw softmax
    calibration: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # human name shown by the service; defaults to the file stem
    version: str = "1"
    weights_sha256: str = ""  # filled in by save_checkpoint
    format_version: int = FORMAT_VERSION
    content_sha256: str = ""  # format_version 2: metadata + weights (see content_sha256())

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return Preprocess.from_dict(self.preprocess).input_shape

    def to_json(self) -> str:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        d["input_shape"] = list(self.input_shape)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint metadata is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise CheckpointError("checkpoint metadata must be a JSON object")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"unknown checkpoint format_version {version!r}; this convserve reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade convserve, or re-export the checkpoint)"
            )
        for key, kind in (("arch", str), ("labels", list), ("preprocess", dict)):
            if not isinstance(d.get(key), kind):
                raise CheckpointError(
                    f"checkpoint metadata field {key!r} is missing or not a {kind.__name__}"
                )
        num = d.pop("num_classes", None)
        d.pop("input_shape", None)
        if num is not None and num != len(d["labels"]):
            raise CheckpointError(f"checkpoint says num_classes={num} but lists {len(d['labels'])} labels")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Loaded:
    meta: CheckpointMeta
    model: nn.Module  # eval mode, on the CPU
    path: Path
    sha256: str = ""  # of the file's bytes, as read by load_checkpoint

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta.preprocess)


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, read in 1 MiB blocks (for files not read through load_checkpoint)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes, independent of file layout and metadata."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_sha256(meta: CheckpointMeta) -> str:
    """Digest of the metadata as parsed (every field except content_sha256; weights_sha256 is one of
    them, so this covers the weights too). Canonical JSON (sorted keys, fixed separators), so the
    file's own formatting of the header does not matter; unknown keys are ignored on load and so are
    not covered."""
    d = asdict(meta)
    d.pop("content_sha256")
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> CheckpointMeta:
    """Write atomically: readers (a service reloading) never see half a file."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if output_classes(model) != meta.num_classes:
        raise CheckpointError(f"model has {output_classes(model)} outputs but {meta.num_classes} labels")
    Preprocess.from_dict(meta.preprocess)  # refuse to write preprocessing we could not read back
    meta.weights_sha256 = weights_sha256(state)
    meta.format_version = FORMAT_VERSION
    meta.content_sha256 = content_sha256(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={META_KEY: meta.to_json()})
    # safetensors writes 0600 whatever the umask; a container's non-root user must be able to read it.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return meta


def _sniff(path: Path, head: bytes) -> None:
    # safetensors: a little-endian u64 header length, then the JSON header's "{".
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if not looks_safetensors and (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} looks like a pickle-based PyTorch file (.pt/.pth); convserve only loads safetensors "
            "checkpoints because unpickling can run code. Convert weights you trust with "
            "`python -m training export --arch ARCH --init-weights FILE --out model.safetensors`"
        )
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated ({len(head)} bytes)")


def _cannot_read(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {e.strerror}")


def _meta_from_header(path: Path, buf: bytes | bytearray) -> tuple[CheckpointMeta, dict[str, Any], int]:
    try:
        header, start = safetensors_bytes.parse_header(buf)
        raw = safetensors_bytes.metadata(header).get(META_KEY)
    except ValueError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without convserve metadata; export it first")
    return CheckpointMeta.from_json(raw), header, start


def read_meta(path: Path) -> CheckpointMeta:
    """Read only the metadata (cheap: the JSON header, no tensors; not verified, see load_checkpoint)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(16)
            _sniff(path, head)
            (n,) = struct.unpack("<Q", head[:8])
            f.seek(0)
            buf = f.read(8 + min(n, safetensors_bytes.MAX_HEADER))
    except OSError as e:
        raise _cannot_read(path, e) from None
    return _meta_from_header(path, buf)[0]


def _read_once(path: Path) -> bytearray:
    """The whole file in one open and one read (a bytearray: torch views it without copying)."""
    try:
        with path.open("rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(buf)
    except OSError as e:
        raise _cannot_read(path, e) from None
    del buf[got:]  # shorter than stat said (being truncated): the checks below refuse it
    return buf


def _verify(path: Path, meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> None:
    # save_checkpoint always records the digests, so a missing one means the file was made or edited by
    # something else; skipping the check then would load unverified weights without a word.
    if not meta.weights_sha256:
        raise CheckpointError(
            f"{path}: the metadata has no weights_sha256, so the weights cannot be verified; "
            "re-save it with save_checkpoint (or `python -m training export`)"
        )
    if weights_sha256(state) != meta.weights_sha256:
        raise CheckpointError(f"{path}: weights do not match the recorded SHA-256 (file corrupted?)")
    if meta.format_version < 2:
        return  # version 1 recorded no metadata digest: its labels and preprocessing are unverified
    if not meta.content_sha256:
        raise CheckpointError(
            f"{path}: format_version {meta.format_version} metadata has no content_sha256, so the "
            "metadata cannot be verified; re-save it with save_checkpoint (or `python -m training export`)"
        )
    if content_sha256(meta) != meta.content_sha256:
        raise CheckpointError(
            f"{path}: the metadata (labels, preprocessing, ...) does not match the recorded SHA-256: "
            "it was edited after saving; re-save it with save_checkpoint instead of editing the header"
        )


def load_checkpoint(path: Path, verify: bool = True) -> Loaded:
    """Rebuild the architecture from the metadata and load the weights into it, strictly, from one
    read of the file. verify=False skips the SHA-256 checks (and accepts a file without digests): an
    explicit opt-out for inspecting a damaged or hand-made file, never the default."""
    path = Path(path)
    buf = _read_once(path)
    _sniff(path, bytes(buf[:16]))
    meta, header, start = _meta_from_header(path, buf)
    file_digest = hashlib.sha256(buf).hexdigest()
    try:
        state = safetensors_bytes.tensors(buf, header, start)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights cannot be read (truncated or corrupt?): {e}") from None
    if verify:
        _verify(path, meta, state)
    try:
        pre = Preprocess.from_dict(meta.preprocess)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad preprocessing in metadata: {e}") from None
    if meta.num_classes < 1:
        raise CheckpointError(f"{path}: the checkpoint lists no class labels")
    try:
        model = build_model(meta.arch, meta.num_classes, pre.channels, pre.size, meta.arch_config or None)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot rebuild architecture {meta.arch!r}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)  # copies out of the buffer, which is then dropped
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not fit architecture {meta.arch!r} with {meta.num_classes} classes: "
            + " ".join(line.strip() for line in first[:4])
        ) from None
    model.eval()
    return Loaded(meta=meta, model=model, path=path, sha256=file_digest)
