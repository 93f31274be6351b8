"""Outside tools for tests: skip visibly on a laptop without them, fail in CI where they must exist."""

from __future__ import annotations

import os
import shutil
import sys

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """Return the tool's path; skip (or fail when CI is set) if it is not installed."""
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path:
        return path
    reason = f"{name!r} is not installed (CI installs it with scripts/ci-tools.sh)"
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this check may not be skipped")
    pytest.skip(reason)
