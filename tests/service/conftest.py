"""One server with the tiny model for the predict and bad-input tests (started once per session)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, run_server
from tests.service.helpers import MAX_PIXELS, MAX_UPLOAD


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("predict"),
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        default_top_k=3,
        max_batch_wait_ms=20,
        cors_origins="http://example.test",
    ) as s:
        yield s
