"""Each image of a batch gets its own answer: different images in one batch, each checked against a
batch of one of the same image, and the /metrics histograms checked against what was sent.

A row-mapping bug (rows swapped or shifted between the model's output and the requests' futures)
answers every request with *a* valid prediction, so tests that send the same image N times cannot
see it; these send N different images whose answers are far apart. Against the session `server`
(a real uvicorn process)."""

from __future__ import annotations

import io
import itertools
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import images
from tests.conftest import LiveServer

TOL = 1e-5  # float noise between a batch of several and a batch of one (tests.service.helpers.same)
N = 6


def noise_png(seed: int) -> bytes:
    """A 32x32 RGB image of its own (the tiny model's input size: no resampling)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def probabilities(client: httpx.Client, body: bytes) -> list[float]:
    r = client.post(
        "/v1/predict", content=body, headers={"Content-Type": "image/png"}, params={"probabilities": "all"}
    )
    assert r.status_code == 200, r.text
    return list(r.json()["probabilities"])


def distance(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def singles(server: LiveServer) -> tuple[list[bytes], list[list[float]]]:
    """N distinct images and each one's answer as a request (and so a batch) of one."""
    bodies = [noise_png(seed) for seed in range(N)]
    answers = [probabilities(server.client, b) for b in bodies]
    # the premise: any two answers are far apart, so a swapped row cannot pass for the right one
    closest = min(distance(a, b) for a, b in itertools.combinations(answers, 2))
    assert closest > 100 * TOL, f"two test images answer alike ({closest:.2g}): the test would prove nothing"
    return bodies, answers


def test_different_images_in_one_batch_each_get_their_own_answer(
    server: LiveServer, singles: tuple[list[bytes], list[list[float]]]
) -> None:
    bodies, answers = singles
    before = server.metrics()
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(bodies)]
    r = server.client.post("/v1/predict", files=files, params={"probabilities": "all"})
    assert r.status_code == 200, r.text
    after = server.metrics()
    # one request's images are queued together onto an idle worker: one batch of N
    assert after["convserve_batch_size_count"] - before["convserve_batch_size_count"] == 1
    assert after["convserve_batch_size_sum"] - before["convserve_batch_size_sum"] == N
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(range(N))
    for i, (got, want) in enumerate(zip(results, answers, strict=True)):
        assert distance(got["probabilities"], want) < TOL, f"image {i} got another image's answer"
        assert got["predictions"][0]["index"] == int(np.argmax(want))


def test_a_bad_entry_between_good_ones_does_not_shift_their_answers(
    server: LiveServer, singles: tuple[list[bytes], list[list[float]]]
) -> None:
    bodies, answers = singles
    files = [
        ("file", ("0.png", bodies[0], "image/png")),
        ("file", ("bad.jpg", images.truncated_jpeg(), "image/jpeg")),
        ("file", ("1.png", bodies[1], "image/png")),
        ("file", ("2.png", bodies[2], "image/png")),
    ]
    r = server.client.post("/v1/predict", files=files, params={"probabilities": "all"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[1]["error"]["code"] == "corrupt_image"
    for slot, image in ((0, 0), (2, 1), (3, 2)):
        assert distance(results[slot]["probabilities"], answers[image]) < TOL, f"slot {slot}"


def test_concurrent_requests_with_different_images_each_get_their_own_answer(
    server: LiveServer, singles: tuple[list[bytes], list[list[float]]]
) -> None:
    """Separate requests sharing batches: each answer must be its own image's, whichever batch it
    joined (bursts until the metrics show batches larger than one were formed)."""
    bodies, answers = singles

    def one(i: int) -> tuple[int, list[float]]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return i % N, probabilities(c, bodies[i % N])

    for _ in range(10):
        before = server.metrics()
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(one, range(4 * N)))
        for image, probs in got:
            assert distance(probs, answers[image]) < TOL, f"a request for image {image} got another answer"
        after = server.metrics()
        batches = after["convserve_batch_size_count"] - before["convserve_batch_size_count"]
        if batches < 4 * N:  # fewer batches than requests: some batch held several of them
            return
    pytest.fail("24 concurrent requests x 10 never shared a batch")


def test_histograms_hold_what_was_sent(server: LiveServer) -> None:
    """The histogram counts, sums and buckets move by exactly what two known requests imply."""
    before = server.metrics()
    three = server.client.post(
        "/v1/predict", files=[("file", (f"{i}.png", noise_png(10 + i), "image/png")) for i in range(3)]
    )
    one = server.client.post("/v1/predict", content=noise_png(20), headers={"Content-Type": "image/png"})
    assert three.status_code == one.status_code == 200
    after = server.metrics()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    # batch sizes: one batch of 3 and one of 1 (the requests were sequential)
    assert delta("convserve_batch_size_count") == 2
    assert delta("convserve_batch_size_sum") == 4
    assert delta('convserve_batch_size_bucket{le="1.0"}') == 1
    assert delta('convserve_batch_size_bucket{le="2.0"}') == 1
    assert delta('convserve_batch_size_bucket{le="4.0"}') == 2
    assert delta('convserve_batch_size_bucket{le="+Inf"}') == 2
    # top-1 confidence: one observation per image, the very probabilities the answers carried
    tops = [x["predictions"][0]["probability"] for x in three.json()["results"]]
    tops.append(one.json()["predictions"][0]["probability"])
    assert delta("convserve_top1_confidence_count") == 4
    assert delta("convserve_top1_confidence_sum") == pytest.approx(sum(tops), abs=1e-6)
    for le in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        assert delta(f'convserve_top1_confidence_bucket{{le="{le}"}}') == sum(p <= le for p in tops), le
    # per-label predictions follow the top-1 labels
    labels = [x["predictions"][0]["label"] for x in three.json()["results"]]
    labels.append(one.json()["predictions"][0]["label"])
    for label in set(labels):
        assert delta(f'convserve_predictions_total{{label="{label}"}}') == labels.count(label)
    # stages: decode and queue per image, inference per batch, response per request
    for stage, n in (("decode", 4), ("queue", 4), ("inference", 2), ("response", 2)):
        assert delta(f'convserve_stage_duration_seconds_count{{stage="{stage}"}}') == n, stage
    # the request histogram counts the two predict requests (the /metrics reads are their own endpoint)
    assert delta('convserve_request_duration_seconds_count{endpoint="/v1/predict"}') == 2
    # the inference stage's sum is at least the model time the answers reported for their batches
    # (each figure was rounded to 1 µs, hence the slack)
    reported = (three.json()["timing_ms"]["inference"] + one.json()["timing_ms"]["inference"]) / 1000
    assert delta('convserve_stage_duration_seconds_sum{stage="inference"}') >= reported - 2e-6
