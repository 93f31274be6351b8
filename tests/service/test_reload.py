"""POST /v1/model/reload under concurrent traffic: good files swap in, bad ones are refused, and no
request fails either way."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.conftest import LiveServer, make_checkpoint, run_server

KEY = "test-admin-key"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(
        tiny_checkpoint, tmp_path_factory.mktemp("reload"), admin_api_key=KEY, max_batch_size=4
    ) as s:
        yield s


class Traffic:
    """Clients posting images in a loop until stopped; records every status and model version."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]
        self._lock = threading.Lock()

    def _loop(self) -> None:
        jpg = images.jpeg()
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/v1/predict", content=jpg, headers={"Content-Type": "image/jpeg"})
                except httpx.HTTPError as e:
                    with self._lock:
                        self.errors.append(repr(e))
                    continue
                with self._lock:
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.versions.append(r.json()["model"]["version"])
                    else:
                        self.errors.append(r.text)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait_for_requests(self, n: int) -> None:
        """Let at least n more requests complete (a ceiling, not a timing assumption)."""
        target = sum(self.statuses.values()) + n
        deadline = time.monotonic() + 60
        while sum(self.statuses.values()) < target:
            assert time.monotonic() < deadline, f"traffic stalled: {self.statuses}, {self.errors[:3]}"
            time.sleep(0.01)


def _reload(server: LiveServer, body: dict[str, str] | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return server.client.post("/v1/model/reload", json=body, headers=headers)


def test_reload_needs_the_key(server: LiveServer) -> None:
    missing = _reload(server, key=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong = _reload(server, key="guess")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"


def test_reload_good_and_bad_files_under_traffic(server: LiveServer, tmp_path: Path) -> None:
    v2 = make_checkpoint(tmp_path / "v2.safetensors", seed=1, version="2")
    # a new input size and new classes: requests decoded for the old model must still finish
    labels = [f"class{i}" for i in range(9)]
    v3 = make_checkpoint(tmp_path / "v3.safetensors", seed=2, version="3", size=48, labels=labels)
    not_safetensors = tmp_path / "photo.safetensors"
    not_safetensors.write_bytes(images.jpeg())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(v2.read_bytes()[:-100])

    with Traffic(server.url) as traffic:
        traffic.wait_for_requests(20)
        r = _reload(server, {"checkpoint": str(v2)})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "2" and r.json()["previous"]["version"] == "1"
        traffic.wait_for_requests(20)

        for bad, words in [
            (not_safetensors, "not a readable safetensors file"),
            (truncated, str(truncated)),
            (tmp_path / "missing.safetensors", "cannot read checkpoint"),
        ]:
            r = _reload(server, {"checkpoint": str(bad)})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_checkpoint" and words in err["message"], err
            assert server.client.get("/v1/model").json()["version"] == "2"  # the old model keeps serving
        traffic.wait_for_requests(20)

        r = _reload(server, {"checkpoint": str(v3)})
        assert r.status_code == 200, r.text
        traffic.wait_for_requests(20)

    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])
    assert {"1", "2", "3"} <= set(traffic.versions)
    model = server.client.get("/v1/model").json()
    assert model["classes"] == labels and model["input_size"]["height"] == 48
    m = server.metrics()
    info = (
        'convserve_model_info{architecture="convnet",device="cpu",name="tiny",precision="fp32",version="3"}'
    )
    assert info in m
    assert not any(k.startswith("convserve_model_info") and 'version="1"' in k for k in m)
    # the new model's labels exist from the swap on (requests the old model finished keep their labels)
    assert all(f'convserve_predictions_total{{label="{x}"}}' in m for x in labels)
    # every API reload is counted by its outcome (v2 and v3 swapped in, three files refused)
    assert m['convserve_reloads_total{result="ok",trigger="api"}'] == 2
    assert m['convserve_reloads_total{result="refused",trigger="api"}'] == 3
    assert m['convserve_reloads_total{result="ok",trigger="watch"}'] == 0  # not watching here

    # no body: reload the configured checkpoint (version 1)
    r = _reload(server)
    assert r.status_code == 200 and r.json()["model"]["version"] == "1"
