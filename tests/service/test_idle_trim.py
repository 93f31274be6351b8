"""After requests, once idle, the service hands freed heap back to the OS (service/memory.py
trim_when_idle) and counts it: a live service, real requests, the metric read over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests import images
from tests.conftest import LiveServer


def test_an_idle_service_trims_its_heap_after_requests(server: LiveServer) -> None:
    trims = "convserve_memory_trims_total"
    before = server.metrics()[trims]
    body = images.jpeg()
    def post(_: int) -> int:
        return server.client.post("/v1/predict", content=body).status_code

    with ThreadPoolExecutor(8) as pool:  # a small burst, several batches
        codes = list(pool.map(post, range(32)))
    assert codes == [200] * 32
    # once quiet for memory.IDLE_S (1 s), and at most MIN_INTERVAL_S (10 s) after an earlier trim
    # that other tests' requests caused: one more trim
    server.wait_for(lambda: server.metrics()[trims] > before, "a trim once idle", timeout=30)
    assert "convserve_memory_returned_bytes_total" in server.metrics()
