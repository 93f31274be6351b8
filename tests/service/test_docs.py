"""docs/serving.md lists every setting and every error code the service can answer with."""

from __future__ import annotations

from pathlib import Path

from service.errors import ERROR_CODES
from service.http_errors import SERVICE_ERROR_CODES
from service.settings import Settings, flag_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_every_setting_and_error_code_is_documented() -> None:
    text = DOC.read_text()
    for name in Settings.model_fields:
        assert f"`{flag_name(name)}`" in text and f"`CONVSERVE_{name.upper()}`" in text, name
    for code, entry in ERROR_CODES.items():
        assert f"| `{code}` | {entry.status} |" in text, code
    for code, (status, _) in SERVICE_ERROR_CODES.items():
        assert f"| `{code}` | {status} |" in text, code
