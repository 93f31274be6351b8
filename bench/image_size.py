"""What each backend adds to an image: the installed size of an extra's packages, from this environment.

Measured, not quoted: every file a distribution's RECORD lists (importlib.metadata), summed per
package, over the extra's requirements and theirs (transitively), minus what the base install already
brings. torch's row is the base install itself, since every backend needs torch (export, probe check).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

BACKEND_EXTRAS = {"torch": None, "onnxruntime": "onnx", "openvino": "openvino"}
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_size(dist: md.Distribution) -> int:
    """Bytes of the files the distribution installed (files that are gone count as zero)."""
    total = 0
    for f in dist.files or []:
        with contextlib.suppress(OSError):  # a file that is gone counts as zero
            total += Path(str(dist.locate_file(f))).stat().st_size
    return total


def requirements(dist: md.Distribution, extras: Iterable[str] = ()) -> list[str]:
    """Names of what `dist` needs with these extras, for this interpreter and platform."""
    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            names.append(canonical(req.name))
            names += [f"{canonical(req.name)}[{e}]" for e in req.extras]
    return names


def closure(roots: Iterable[str], find: Callable[[str], md.Distribution | None]) -> set[str]:
    """Names of every installed distribution reachable from `roots` ("name" or "name[extra]")."""
    names: set[str] = set()
    done: set[str] = set()
    todo = list(roots)
    while todo:
        item = todo.pop()
        if item in done:
            continue
        done.add(item)
        name, _, extra = item.partition("[")
        dist = find(name)
        if dist is None:
            continue  # not installed here (another platform's dependency): not in this image
        names.add(canonical(name))
        todo += requirements(dist, [extra.rstrip("]")] if extra else [])
    return names


def _find(name: str) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def backend_sizes(project: str = "convserve",
                  find: Callable[[str], md.Distribution | None] = _find) -> dict[str, dict[str, Any]]:
    """Per backend: MB added to the image and the packages that make it up (name -> MB)."""
    root = find(project)
    if root is None:
        return {}
    base = closure(requirements(root), find)
    out: dict[str, dict[str, Any]] = {}
    for backend, extra in BACKEND_EXTRAS.items():
        names = base if extra is None else closure(requirements(root, [extra]), find) - base
        sizes = {}
        for n in sorted(names):
            dist = find(n)
            if dist is not None:
                sizes[n] = dist_size(dist) / 1e6
        # torch's CUDA wheels bring CUDA libraries a CPU-only image (the CPU wheel index) leaves out
        cuda = sum(mb for n, mb in sizes.items() if n.startswith(CUDA_PREFIXES))
        out[backend] = {"extra": extra, "mb": sum(sizes.values()), "cuda_mb": cuda, "packages": sizes}
    return out
