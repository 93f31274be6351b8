"""The README (or the docs/ page of its capability) lists every setting and error code the service
can answer with."""

from __future__ import annotations

from pathlib import Path

from service.errors import ERROR_CODES
from service.http_errors import SERVICE_ERROR_CODES
from service.settings import Settings, flag_name

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "README.md"


def _docs_text() -> str:
    """README plus docs/*.md: a capability's settings and codes may live in its own page."""
    return "\n".join(p.read_text() for p in [DOC, *sorted((ROOT / "docs").glob("*.md"))])


def test_every_setting_and_error_code_is_documented() -> None:
    text = _docs_text()
    for name in Settings.model_fields:
        assert f"`{flag_name(name)}`" in text and f"`CONVSERVE_{name.upper()}`" in text, name
    for code, entry in ERROR_CODES.items():
        assert f"| `{code}` | {entry.status} |" in text, code
    for code, (status, _) in SERVICE_ERROR_CODES.items():
        assert f"| `{code}` | {status} |" in text, code
