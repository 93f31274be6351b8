"""Agreement of reduced-precision and compiled modes with fp32, measured through the service itself.

Every benchmark image is sent to each server with `?probabilities=all`; the whole softmax vectors are
compared with the fp32 server's: top-1 agreement (fraction of images whose arg-max class is the same)
and the largest absolute probability difference over all images and classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bench.loadgen import build_request, load
from bench.measure import HOST, PREDICT
from bench.servers import Server


@dataclass
class Agreement:
    variant: str
    images: int
    top1_agreement: float  # 0..1
    max_prob_diff: float
    mean_top1_prob_diff: float


def probabilities(server: Server, bodies: list[bytes], content_type: str = "image/jpeg") -> list[list[float]]:
    path = PREDICT + "?probabilities=all&top_k=1"
    reqs = [build_request(HOST, server.port, path, b, content_type) for b in bodies]
    res = load(HOST, server.port, reqs, concurrency=4, total=len(reqs), keep_bodies=True)
    if res.errors:
        raise RuntimeError(f"{server.name}: {res.errors} of {len(reqs)} agreement requests failed: "
                           f"{res.statuses}")
    return [json.loads(b)["probabilities"] for b in res.bodies]


def compare(variant: str, reference: list[list[float]], other: list[list[float]]) -> Agreement:
    same = 0
    max_diff = 0.0
    top1_diffs = []
    for ref, oth in zip(reference, other, strict=True):
        r1 = max(range(len(ref)), key=ref.__getitem__)
        o1 = max(range(len(oth)), key=oth.__getitem__)
        same += r1 == o1
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ref, oth, strict=True)))
        top1_diffs.append(abs(ref[r1] - oth[r1]))
    n = len(reference)
    return Agreement(variant, n, same / max(1, n), max_diff, sum(top1_diffs) / max(1, n))
