"""The checkpoint round-trips exactly and refuses every broken file with one CheckpointError."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    META_KEY,
    CheckpointError,
    CheckpointMeta,
    content_sha256,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from model.preprocess import Preprocess
from model.registry import build_model

LABELS = ["circle", "square", "triangle"]


def _meta(**kw) -> CheckpointMeta:
    base = dict(
        arch="convnet",
        labels=list(LABELS),
        preprocess=Preprocess(size=32).to_dict(),
        training={"dataset": "shapes", "epochs": 2, "best": {"val_acc": 0.9}},
        name="tiny",
    )
    base.update(kw)
    return CheckpointMeta(**base)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("convnet", 3, 3, 32)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, _meta())
    return path, model


def test_round_trip_is_bit_identical(saved) -> None:
    path, model = saved
    loaded = load_checkpoint(path)
    for (name, a), (name2, b) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(a, b)
    expected = _meta()
    expected.weights_sha256 = loaded.meta.weights_sha256
    expected.content_sha256 = loaded.meta.content_sha256
    assert loaded.meta == expected
    assert loaded.meta.format_version == 2 and len(loaded.meta.content_sha256) == 64
    assert len(loaded.meta.weights_sha256) == 64
    assert loaded.meta.input_shape == (3, 32, 32)
    assert not loaded.model.training
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed away


def test_metadata_is_plain_json_in_the_header(saved) -> None:
    path, _ = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"][META_KEY])
    assert meta["labels"] == LABELS and meta["num_classes"] == 3 and meta["format_version"] == 2
    assert meta["input_shape"] == [3, 32, 32]


def test_truncated_file(saved) -> None:
    path, _ = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
            load_checkpoint(path)


def test_corrupt_weights_fail_the_digest(saved) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def _rewrite_meta(path: Path, model: torch.nn.Module, resign: bool = True, **changes) -> None:
    """Write a file whose metadata is changed after hashing, as a foreign tool might. resign=True
    recomputes content_sha256 over the edited metadata (a tool that knows the format: the checks
    after the digest are what is tested); resign=False is a hand edit of the header."""
    from safetensors.torch import save_file

    meta = json.loads(read_meta(path).to_json())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if not (k in changes and v is None)}  # a change to None drops it
    if resign and "content_sha256" not in changes:
        known = {k: v for k, v in meta.items() if k in CheckpointMeta.__dataclass_fields__}
        meta["content_sha256"] = content_sha256(CheckpointMeta(**known))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={META_KEY: json.dumps(meta)},
    )


@pytest.mark.parametrize("digest", ["", None])
def test_checkpoint_without_a_digest_is_refused(saved, digest: str | None) -> None:
    """An empty or missing weights_sha256 used to skip verification without a word."""
    path, model = saved
    _rewrite_meta(path, model, weights_sha256=digest)  # None: the key is dropped
    with pytest.raises(CheckpointError, match="no weights_sha256, so the weights cannot be verified"):
        load_checkpoint(path)
    # the explicit opt-out still loads it, for inspecting a hand-made file
    loaded = load_checkpoint(path, verify=False)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "edit",
    [
        {"labels": ["square", "circle", "triangle"]},  # two classes swapped: every answer mislabelled
        {"preprocess": Preprocess(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).to_dict()},
        {"name": "someone-else", "training": {"dataset": "other"}},
    ],
)
def test_edited_metadata_of_a_v2_file_is_refused(saved, edit: dict) -> None:
    """Before format_version 2 the digest covered the weights only: swapped labels or a changed
    mean/std loaded silently and served wrong answers."""
    path, model = saved
    _rewrite_meta(path, model, resign=False, **edit)
    with pytest.raises(CheckpointError, match=r"metadata \(labels, preprocessing, ...\) does not match"):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False).meta.labels == edit.get("labels", LABELS)


def test_v2_file_without_a_content_digest_is_refused(saved) -> None:
    path, model = saved
    _rewrite_meta(path, model, content_sha256=None)
    with pytest.raises(CheckpointError, match="has no content_sha256"):
        load_checkpoint(path)


def test_version_1_file_still_loads(saved) -> None:
    """A file written before format_version 2 (no content_sha256) loads with the weights-only check;
    its corrupt weights are still refused."""
    path, model = saved
    _rewrite_meta(path, model, format_version=1, content_sha256=None)
    loaded = load_checkpoint(path)
    assert loaded.meta.format_version == 1 and loaded.meta.labels == LABELS
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_the_file_is_read_once(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One open and one read yield metadata, weights and the file digest: the file is swapped for
    another checkpoint right after the first open, so any second read (in Python or in safetensors'
    Rust code) would see other labels, other weights or another digest."""
    import builtins
    import hashlib
    import io

    path, model = saved
    original = path.read_bytes()
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_checkpoint(other, build_model("convnet", 3, 3, 32), _meta(labels=["x", "y", "z"]))
    opens: list[str] = []
    real_open = builtins.open

    def open_then_swap(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_open(file, *args, **kwargs)
        if str(file) == str(path):
            opens.append(str(file))
            if len(opens) == 1:
                other.replace(path)  # the open handle keeps the original inode
        return handle

    monkeypatch.setattr(builtins, "open", open_then_swap)
    monkeypatch.setattr(io, "open", open_then_swap)
    loaded = load_checkpoint(path)
    assert opens == [str(path)]
    assert loaded.meta.labels == LABELS
    assert loaded.sha256 == hashlib.sha256(original).hexdigest()
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_unknown_format_version(saved) -> None:
    path, model = saved
    _rewrite_meta(path, model, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def test_wrong_class_count(saved) -> None:
    path, model = saved
    _rewrite_meta(path, model, labels=["a", "b"], num_classes=2)
    with pytest.raises(CheckpointError, match="do not fit architecture 'convnet' with 2 classes"):
        load_checkpoint(path)
    _rewrite_meta(path, model, num_classes=7)
    with pytest.raises(CheckpointError, match="num_classes=7 but lists 2 labels"):
        load_checkpoint(path)


def test_weights_architecture_mismatch(saved) -> None:
    path, model = saved
    _rewrite_meta(path, model, arch="vgg_small")
    with pytest.raises(CheckpointError, match="do not fit architecture 'vgg_small'"):
        load_checkpoint(path)
    _rewrite_meta(path, model, arch="alexnet")
    with pytest.raises(CheckpointError, match="unknown architecture 'alexnet'"):
        load_checkpoint(path)


def test_not_a_file_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_checkpoint(empty)


def test_save_refuses_label_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="3 outputs but 2 labels"):
        save_checkpoint(tmp_path / "x.safetensors", build_model("convnet", 3), _meta(labels=["a", "b"]))


class _Payload:
    """Unpickling this would create a file: proof that the payload ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


@pytest.mark.parametrize("style", ["pickle", "torch.save"])
def test_pickle_checkpoint_is_refused_and_never_runs(tmp_path: Path, style: str) -> None:
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "model.pt"
    if style == "pickle":
        bad.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=4))
    else:
        torch.save({"state_dict": _Payload(marker)}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle-based PyTorch file"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="pickle-based"):
        read_meta(bad)
    assert not marker.exists()


def test_safetensors_without_our_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="without convserve metadata"):
        load_checkpoint(path)
