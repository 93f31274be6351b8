"""--watch-checkpoint under traffic: the trainer replaces the checkpoint file atomically and the
replica reloads by itself; a corrupt replacement is refused and logged, the old model keeps serving."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import images
from tests.conftest import LiveServer, make_checkpoint, run_server
from tests.service.test_reload import Traffic

OK = 'convserve_reloads_total{result="ok",trigger="watch"}'
REFUSED = 'convserve_reloads_total{result="refused",trigger="watch"}'


def replace_atomically(target: Path, data: bytes) -> None:
    """As a trainer writes its checkpoint: a temp file in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


@pytest.fixture
def served(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "model.safetensors", version="1")


@pytest.fixture
def server(served: Path, tmp_path: Path) -> Iterator[LiveServer]:
    with run_server(
        served, tmp_path, watch_checkpoint="true", watch_interval_s=0.2, max_batch_size=4, warmup="max"
    ) as s:
        yield s


def test_a_replaced_checkpoint_is_served_and_a_corrupt_one_refused(
    server: LiveServer, served: Path, tmp_path: Path
) -> None:
    v2 = make_checkpoint(tmp_path / "staging" / "v2.safetensors", seed=1, version="2")
    before = server.metrics()
    assert before[OK] == 0 and before[REFUSED] == 0

    with Traffic(server.url, clients=2) as traffic:
        traffic.wait_for_requests(10)
        replace_atomically(served, v2.read_bytes())
        server.wait_for(lambda: server.client.get("/v1/model").json()["version"] == "2", "version 2")
        traffic.wait_for_requests(10)

        corrupt = v2.read_bytes()[:-100]  # a truncated file: the header promises more than is there
        replace_atomically(served, corrupt)
        server.wait_for(lambda: server.metrics()[REFUSED] == 1, "the corrupt file refused")
        traffic.wait_for_requests(10)
        assert server.client.get("/v1/model").json()["version"] == "2"  # the old model keeps serving

    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])
    assert {"1", "2"} <= set(traffic.versions)
    r = server.client.post("/v1/predict", content=images.jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["model"]["version"] == "2"
    log = server.log_text()
    assert f"watch: refused the new file {served}" in log, log[-2000:]

    # the same bad file is not retried on every poll: still one refusal after several polls
    time.sleep(1.0)  # five polls at 0.2 s (a lower bound on polls, not a timing assertion)
    assert server.log_text().count("watch: refused") == 1
    m = server.metrics()
    assert m[OK] == 1 and m[REFUSED] == 1

    # the file briefly missing is logged and retried; the good file coming back is picked up
    served.unlink()
    server.wait_for(lambda: f"watch: cannot stat {served}" in server.log_text(), "the missing-file warning")
    v3 = make_checkpoint(tmp_path / "staging" / "v3.safetensors", version="3")
    replace_atomically(served, v3.read_bytes())
    server.wait_for(lambda: server.client.get("/v1/model").json()["version"] == "3", "version 3")
    assert server.metrics()[OK] == 2
