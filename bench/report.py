"""The Markdown report: machine, versions, settings, one table per scenario, targets, modes, start-up."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
from pathlib import Path
from typing import Any

NAN = float("nan")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    ident: dict[str, str] = {}  # cpu family/model: "AMD EPYC" alone does not say Zen 3 or Zen 4
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("cpu family", "model") and key not in ident:
                ident[key] = line.split(":", 1)[1].strip()
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = float("nan")
    with contextlib.suppress(ValueError, OSError):
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in ("torch", "torchvision", "pillow", "numpy", "fastapi", "starlette", "uvicorn", "uvloop",
                "httptools", "python-multipart", "scikit-image"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "-"
    try:
        from PIL import features

        versions["libjpeg-turbo"] = "yes" if features.check_feature("libjpeg_turbo") else "no"
    except Exception:
        versions["libjpeg-turbo"] = "?"
    if ident:
        cpu += " (" + ", ".join(f"{k} {v}" for k, v in ident.items()) + ")"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "isa": " ".join(sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                          "amx_tile", "avx512_vnni", "avx512_fp16"})),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "device": device_description(device),
        "versions": versions,
        "loadavg_start": _loadavg(),
        "service_sources": sources_digest("service"),
    }


def sources_digest(package: str) -> str:
    """sha256 (12 hex) over the package's .py files, so a table can be tied to the code it measured."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def device_description(device: str) -> str:
    """What the benchmark ran on: the GPU's own name (torch.cuda.get_device_name), not the CPU's."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    dev = torch.device(device)
    major, minor = torch.cuda.get_device_capability(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    return f"{device}: {torch.cuda.get_device_name(dev)} (sm_{major}{minor}, {total / 2**30:.0f} GiB)"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _f(v: float, digits: int = 1) -> str:
    return "-" if v != v else f"{v:.{digits}f}"  # NaN -> "-"


def _by(summaries: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(s["server"], s["concurrency"]): s for s in summaries}


def paired(sc: dict[str, Any], c: int, key: str, num: str = "service", den: str = "baseline") -> float:
    """Median over rounds of num/den, each round's two runs taken back to back: on a shared machine
    this cancels most of the drift that a ratio of separate medians keeps."""
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    for r in sc["runs"]:
        if r["concurrency"] == c:
            rounds.setdefault(r["round"], {})[r["server"]] = r
    ratios = [d[num][key] / d[den][key] for d in rounds.values() if num in d and den in d and d[den][key]]
    return statistics.median(ratios) if ratios else float("nan")


def _round_shares(sc: dict[str, Any], c: int, server: str) -> list[float]:
    """Per round: the server's req/s over the bound measured in the same round."""
    bounds = sc["bound"]["runs"]
    return [r["rps"] / bounds[r["round"]] for r in sc["runs"]
            if r["server"] == server and r["concurrency"] == c and r["round"] < len(bounds)]


def of_bound(sc: dict[str, Any], c: int, server: str = "service") -> float:
    """Median over rounds of the server's req/s over the bound measured in the same round."""
    ratios = _round_shares(sc, c, server)
    return statistics.median(ratios) if ratios else float("nan")


def _pairs_at(sc: dict[str, Any], c: int) -> list[dict[str, float]]:
    """The extra back-to-back pairs (bench.run.bound_pairs) if they ran at c clients."""
    extra = sc.get("bound_pairs", {})
    return list(extra.get("pairs", [])) if extra.get("clients") == c else []


def of_bound_with_pairs(sc: dict[str, Any], c: int) -> tuple[float, list[float], int]:
    """The service's share of the bound at c clients over the rounds and the extra back-to-back
    pairs run at c (bench.run.bound_pairs): (median, every ratio with the rounds' first, extra pairs)."""
    ratios = _round_shares(sc, c, "service")
    pairs = _pairs_at(sc, c)
    ratios += [p["service"] / p["bound"] for p in pairs if p["bound"]]
    return (statistics.median(ratios) if ratios else float("nan")), ratios, len(pairs)


def closed_loop_shares(sc: dict[str, Any], c: int) -> tuple[float, float]:
    """Over the rounds and the extra pairs at c clients: medians of the service's req/s over the
    in-process closed loop of c clients (the HTTP cost), and of that loop over the bound (what c
    clients' few images in flight cost without HTTP). NaN where the closed loop was not run."""
    loops = sc["bound"].get("closed_loop_runs", [])
    svc, loop = [], []
    for r in sc["runs"]:
        if r["server"] == "service" and r["concurrency"] == c and r["round"] < len(loops):
            svc.append(r["rps"] / loops[r["round"]])
            loop.append(loops[r["round"]] / sc["bound"]["runs"][r["round"]])
    for p in _pairs_at(sc, c):
        if p["bound"] and p.get("closed_loop"):
            svc.append(p["service"] / p["closed_loop"])
            loop.append(p["closed_loop"] / p["bound"])
    svc, loop = [x for x in svc if x == x], [x for x in loop if x == x]  # NaN: no loop that run
    nan = float("nan")
    return (statistics.median(svc) if svc else nan), (statistics.median(loop) if loop else nan)


def cpu_ratio(sc: dict[str, Any], c: int) -> float:
    """Baseline CPU per request over the service's: how much less work the service does per answer."""
    by = _by(sc["summaries"])
    s, b = by.get(("service", c)), by.get(("baseline", c))
    return b["server_cpu_ms"] / s["server_cpu_ms"] if s and b and s["server_cpu_ms"] else float("nan")


def server_precision(sc: dict[str, Any], server: str) -> str:
    """What a server's model ran in: the service's (auto: its choice), the baseline's fp32."""
    return str(sc.get("service_precision", "fp32")) if server == "service" else "fp32"


def peak_share(sc: dict[str, Any], server: str, rps: float) -> tuple[float, float]:
    """(achieved GFLOP/s = images/s x GFLOP/image, its share of the GEMM peak at the server's
    precision); NaNs when the run has no peak (CUDA, or a report from before the column)."""
    peak = sc.get("peak")
    if not peak:
        return NAN, NAN
    peaks = peak["peak_gflops"]
    top = peaks.get(server_precision(sc, server)) or peaks["fp32"]
    achieved = rps * peak["gflop_per_image"]  # one image per request
    return achieved, achieved / top if top else NAN


def share_cell(sc: dict[str, Any], server: str, rps: float) -> str:
    share = peak_share(sc, server, rps)[1]
    return "-" if share != share else f"{100 * share:.1f}% {server_precision(sc, server)}"


def limit_line(sc: dict[str, Any]) -> str:
    """What the physical-limit columns are measured against, below each scenario's table."""
    peak = sc.get("peak")
    if not peak:
        return "Physical limit: not measured (no GEMM peak in this run)."
    p, g = peak["peak_gflops"], peak["gflop_per_image"]
    prec = server_precision(sc, "service")
    top = p.get(prec) or p["fp32"]
    bf16 = "not measured (no bf16 hardware)" if p.get("bf16") is None else _f(p["bf16"], 0)
    return (f"Physical limit: peak of a {peak['matmul_n']}^3 matmul or a 3x3 convolution, the better, on "
            f"{peak['threads']} thread(s) (the service's "
            f"batch count), same run: fp32 {_f(p['fp32'], 0)}, bf16 {bf16} GFLOP/s; the model "
            f"does {g:.3f} GFLOP per image (2 FLOPs per multiply-add), so the {prec} peak allows at most "
            f"{_f(top / g if g else NAN)} images/s. `GFLOP/s` = req/s x GFLOP/image, `% of peak` its share "
            "of the peak at the server's precision (the baseline: fp32).")


def scenario_table(sc: dict[str, Any]) -> list[str]:
    by = _by(sc["summaries"])
    lines = [
        "| clients | server | req/s | x baseline | % of bound | p50 ms | p90 ms | p99 ms | p99/p50 | errors "
        "| RSS MiB before → after | CPU ms/req | CPU x baseline | client CPU ms/req | other load (cores) "
        "| GFLOP/s | % of peak |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted({k[1] for k in by}):
        for name in ("service", "baseline"):
            s = by.get((name, c))
            if s is None:
                continue
            svc = name == "service"
            lines.append(
                f"| {c} | {name} | {_f(s['rps'])} | {_f(paired(sc, c, 'rps'), 2) if svc else '1'} "
                f"| {_f(100 * of_bound(sc, c, name), 0)}% "
                f"| {_f(s['p50_ms'])} | {_f(s['p90_ms'])} | {_f(s['p99_ms'])} "
                f"| {_f(s['p99_ms'] / s['p50_ms'] if s['p50_ms'] else float('nan'), 2)} | {s['errors']} "
                f"| {_f(s['rss_before_mb'], 0)} → {_f(s['rss_after_mb'], 0)} | {_f(s['server_cpu_ms'])} "
                f"| {_f(cpu_ratio(sc, c), 2) if svc else '1'} "
                f"| {_f(s['client_cpu_ms'], 2)} | {_f(s['other_cores'], 2)} "
                f"| {_f(peak_share(sc, name, s['rps'])[0])} | {share_cell(sc, name, s['rps'])} |"
            )
    b = sc["bound"]
    lines.append(
        f"\nIn-process bound: **{_f(b['images_per_s'])} images/s**, {_f(b.get('cpu_ms_per_image', NAN))} CPU "
        f"ms/image (batch {b['batch']}, {b['decode_threads']} decode threads, {b['torch_threads']} torch "
        f"threads, {b.get('runtime', 'torch')} {b['precision']}; median of {len(b['runs'])} runs of "
        f"{b['count']} images, one per round "
        f"between the server runs: {', '.join(_f(r) for r in b['runs'])}). Decode alone "
        f"{_f(b.get('decode_only_per_s', NAN))} images/s, inference alone "
        f"{_f(b.get('infer_only_per_s', NAN))} images/s."
        + (f" Closed loop of {b['closed_loop_clients']} clients (at most that many images in flight, the "
           f"service's batching, no HTTP): {_f(b['closed_loop_per_s'])} images/s."
           if "closed_loop_per_s" in b else "")
    )
    lines.append("\n" + limit_line(sc))
    if sc.get("service_runtime_choice"):  # /v1/model runtime_choice.reason (bench/run.py)
        lines.append(f"\nThe service's runtime: {sc['service_runtime_choice']}.")
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets that this run measured."""
    out: list[tuple[str, str, bool | None]] = []
    scs = results["scenarios"]

    def get(key: str, server: str, c: int) -> dict[str, Any] | None:
        return _by(scs[key]["summaries"]).get((server, c)) if key in scs else None

    def ratio_target(key: str, c: int, want: float, label: str) -> None:
        s, b = get(key, "service", c), get(key, "baseline", c)
        if s and b:
            r = paired(scs[key], c, "rps")
            out.append((f"{label}: ≥ {want}x baseline",
                        f"{r:.2f}x ({s['rps']:.1f} vs {b['rps']:.1f} req/s; CPU per request "
                        f"{cpu_ratio(scs[key], c):.2f}x less)", r >= want))

    ratio_target("resnet18-640", 16, 1.8, "resnet18 640x480, 16 clients")
    s = get("resnet18-640", "service", 16)
    if s:
        sc = scs["resnet18-640"]
        share, ratios, extra = of_bound_with_pairs(sc, 16)
        cpu = sc["bound"].get("cpu_ms_per_image", NAN) / s["server_cpu_ms"]
        of_loop, loop_share = closed_loop_shares(sc, 16)
        out.append(("resnet18 640x480, 16 clients: ≥ 90% of the in-process bound",
                    f"{100 * share:.0f}%, median of {len(ratios)} back-to-back pairs ({len(ratios) - extra} "
                    f"rounds + {extra} extra; per pair {', '.join(f'{100 * x:.0f}' for x in ratios)}); bound "
                    f"{sc['bound']['images_per_s']:.1f}/s; bound CPU per image / service CPU per request = "
                    f"{100 * cpu:.0f}%; the in-process closed loop of 16 clients (no HTTP) reaches "
                    f"{100 * loop_share:.0f}% of the bound, the service {100 * of_loop:.0f}% of that loop",
                    share >= 0.9))
        r = s["p99_ms"] / s["p50_ms"]
        out.append(("resnet18 640x480, 16 clients: p99 ≤ 1.5x p50",
                    f"{r:.2f}x ({s['p99_ms']:.0f} / {s['p50_ms']:.0f} ms)", r <= 1.5))
    ratio_target("mobilenet-640", 16, 2.5, "mobilenet_v3_small 640x480, 16 clients")
    for key in scs:
        s, b = get(key, "service", 1), get(key, "baseline", 1)
        if s and b:
            r = paired(scs[key], 1, "p50_ms")
            out.append((f"{key}, 1 client: p50 no worse than baseline",
                        f"{s['p50_ms']:.1f} vs {b['p50_ms']:.1f} ms (paired ratio {r:.2f})", r <= 1.0))
    ratio_target("resnet18-4000", 16, 2.0, "resnet18 4000x3000, 16 clients")
    ratio_target("convnet-64", 32, 2.0, "convnet 64x64, 32 clients")
    errors = sum(s["errors"] for sc in scs.values() for s in sc["summaries"] if s["server"] == "service")
    out.append(("no failed requests (service)", str(errors), errors == 0))
    return out


def sc_images(results: dict[str, Any]) -> str:
    for var in results.get("variants", []):
        for a in var.get("agreement", []):
            return str(a["images"])
    return "?"


def render(results: dict[str, Any], machine: dict[str, Any], settings: dict[str, Any], command: str) -> str:
    v = machine["versions"]
    lines = [
        "# convserve benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, device {machine['device']}  ",
        f"Python {machine['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  ",
        f"service/ sources sha256 {machine.get('service_sources', '?')}  ",
        f"Load average at start {machine['loadavg_start']}, at end {_loadavg()}; "
        f"wall time {results.get('wall_s', 0) / 60:.1f} min  ",
        "Settings (service, baseline and in-process bound alike): "
        + ", ".join(f"{k}={val}" for k, val in settings.items()),
        "",
        "Each row: medians over rounds; in every round the servers run back to back (order swapped each "
        "round) and the in-process bound runs once. `x baseline` and `% of bound` are medians of the "
        "per-round ratios. `CPU ms/req` is the server process's CPU time per answered request "
        "(/proc/PID/stat), `CPU x baseline` the baseline's CPU per request over the service's: on a "
        "shared machine it is the steadier measure of how much work each server does per answer. "
        "`other load` = cores busy with processes other than the server and the load generator.",
    ]
    for key, sc in results["scenarios"].items():
        lines += ["", f"## {sc['title']} (`{key}`, mean file {sc['image_mean_kib']:.0f} KiB)", ""]
        lines += scenario_table(sc)
        starts = ", ".join(f"{n} {_f(i['cold_start_s'])} s / {_f(i['idle_rss_mb'], 0)} MiB"
                           for n, i in sc["servers"].items())
        lines.append(f"Cold start (spawn → ready) / idle RSS: {starts}.")
    if results.get("variants"):
        lines += ["", "## Reduced precision and compiled mode", ""]
        t = results.get("trained_checkpoint")
        if t:
            acc = f"{100 * t['val_top1']:.1f}%" if isinstance(t.get("val_top1"), float) else "?"
            lines.append(f"Agreement with fp32 is measured on a trained checkpoint: {t['arch']}, "
                         f"{t['classes']} classes, trained on `{t['data']}`, validation top-1 {acc} "
                         f"(`{t['path']}`), over the {sc_images(results)} benchmark 64x64 images, "
                         "every class probability compared.")
        lines += ["", "| model | clients | mode | req/s | x fp32 | p50 ms | p99 ms | cold start s "
                  "| idle RSS MiB | top-1 agreement | max prob diff |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for var in results["variants"]:
            by = _by(var["summaries"])
            ref = by.get(("fp32", var["concurrency"]))
            agree = {a["variant"]: a for a in var.get("agreement", [])}
            for name in ("fp32", "bf16", "trace", "compile"):
                s = by.get((name, var["concurrency"]))
                if not s or not ref:
                    continue
                a = agree.get(name)
                info = var["servers"][name]
                lines.append(
                    f"| {var['key']} | {var['concurrency']} | {name} | {_f(s['rps'])} | "
                    f"{_f(s['rps'] / ref['rps'], 2)} | {_f(s['p50_ms'])} | {_f(s['p99_ms'])} | "
                    f"{_f(info['cold_start_s'])} | {_f(info['idle_rss_mb'], 0)} | "
                    + (f"{100 * a['top1_agreement']:.1f}% of {a['images']} | {a['max_prob_diff']:.2e} |"
                       if a else ("reference | reference |" if name == "fp32" else "- | - |"))
                )
        for var in results["variants"]:
            for name, why in var.get("skipped", {}).items():
                lines.append(f"\n{var['key']}: {name} not run: {why}.")
    lines += ["", "## Targets (issue 5)", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(results):
        lines.append(f"| {name} | {measured} | {'yes' if met else 'NO' if met is not None else '-'} |")
    return "\n".join(lines) + "\n"
