"""`python -m bench protocols`: /v2 binary requests vs /v1 raw bodies, same images, same clients.

One service process answers both; the two protocols alternate per round (and per concurrency), so
they share the machine's conditions, and the table gives the /v2 : /v1 throughput ratio of each
round's pair. A /v2 request carries the same file as the /v1 raw body, in one BYTES element with
the binary tensor data extension, and asks for the probabilities as binary FP32 (tritonclient's
default form).
"""

from __future__ import annotations

import json
import logging
import statistics
import struct
from pathlib import Path
from typing import Any

from bench.inputs import ImageSet
from bench.loadgen import build_request, load
from bench.measure import HOST, PREDICT
from bench.servers import http_get, service_server

log = logging.getLogger(__name__)


def v2_body(image: bytes) -> tuple[bytes, int]:
    """An infer body with one image as a binary BYTES element, and its JSON header's length."""
    blob = struct.pack("<I", len(image)) + image
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }, separators=(",", ":")).encode()
    return header + blob, len(header)


def v2_request(port: int, model: str, image: bytes) -> bytes:
    body, header_length = v2_body(image)
    req = build_request(HOST, port, f"/v2/models/{model}/infer", body, "application/octet-stream")
    head, _, rest = req.partition(b"\r\n\r\n")  # add the extension's header to the pre-built request
    return head + b"\r\nInference-Header-Content-Length: %d\r\n\r\n" % header_length + rest


def compare(ckpt: Path, images: ImageSet, env: dict[str, str], logs: Path, requests_at: dict[int, int],
            rounds: int) -> dict[str, Any]:
    server = service_server(ckpt, env, logs).start()
    try:
        model = json.loads(http_get(server.port, "/v1/model")[1])["name"]
        files = images.load()
        reqs = {"v1": [build_request(HOST, server.port, PREDICT, b, "image/jpeg") for b in files],
                "v2": [v2_request(server.port, model, b) for b in files]}
        rows: dict[int, dict[str, list[float]]] = {c: {"v1": [], "v2": [], "ratio": []} for c in requests_at}
        errors = 0
        for rnd in range(rounds):
            order = ["v1", "v2"] if rnd % 2 == 0 else ["v2", "v1"]
            for c, total in requests_at.items():
                rps: dict[str, float] = {}
                for proto in order:
                    load(HOST, server.port, reqs[proto], c, min(total, max(2 * c, 8)))  # warm
                    res = load(HOST, server.port, reqs[proto], c, total)
                    errors += res.errors
                    rps[proto] = res.rps
                    rows[c][proto].append(res.rps)
                    log.info("  %s c=%-3d %7.1f req/s  p50 %.1f ms  errors %d", proto, c, res.rps,
                             res.p50_ms, res.errors)
                rows[c]["ratio"].append(rps["v2"] / max(rps["v1"], 1e-9))
        return {"images": images.name, "rounds": rounds, "errors": errors,
                "rows": {c: {k: statistics.median(v) for k, v in r.items()} | {"ratios": r["ratio"]}
                         for c, r in rows.items()}}
    finally:
        server.stop()


def render(res: dict[str, Any], what: str, command: str) -> str:
    lines = [f"# /v2 binary vs /v1 raw bodies ({what})", "", f"Command: `{command}`", "",
             "| Concurrency | /v1 req/s | /v2 req/s | /v2 : /v1 (median of rounds) | per round |",
             "|---|---|---|---|---|"]
    for c, r in res["rows"].items():
        per = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {c} | {r['v1']:.1f} | {r['v2']:.1f} | {r['ratio']:.2f} | {per} |")
    lines += ["", f"Rounds: {res['rounds']}; errors: {res['errors']}.", ""]
    return "\n".join(lines)
