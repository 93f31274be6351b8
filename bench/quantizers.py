"""`python -m bench.quantizers`: three int8 post-training static quantizers, measured side by side.

Issue 13 asks for whichever tool gives the best speed at the least accuracy loss on this CPU:

- `qdq`: ONNX Runtime's quantize_static, QDQ format (training/onnx_export.py's quantize_graph, the
  `python -m training quantize` tool), run with onnxruntime (`qdq-ort`) and with OpenVINO (`qdq-ov`);
- `nncf`: OpenVINO's NNCF, nncf.quantize on the OpenVINO model read from the fp32 ONNX export, saved
  as IR and run with OpenVINO (`pip install 'convserve[quantize-nncf]'`);
- `pt2e`: torch.export + prepare_pt2e with the X86InductorQuantizer + convert_pt2e (torchao's PT2E,
  which torch.ao.quantization's PT2E moved to; `pip install 'convserve[quantize-pt2e]'`), run eager
  (`pt2e-eager`) and compiled by inductor with freezing (`pt2e-inductor`, with `fp32-inductor`
  beside it: how much is int8 and how much is the compiler).

All calibrate on the same images: for a trained convnet `--calibration-images` of its training split
as `training quantize` draws them (training/onnx_export.py quantize_data), else the first half of the
benchmark images. Per variant: the quantization time (in its own process, nothing else running),
model-only images/s at batch 1 and --max-batch-size on --threads (every variant in a worker process
of its own, as `bench backends` does and for the same reasons, asked in alternating rounds; medians),
top-1 agreement with torch fp32 on the other half of the benchmark images, and for a trained
checkpoint the validation top-1 on its data set's validation split.

    python -m bench.quantizers --out FILE [--archs convnet,resnet18] [--trained-checkpoint F]
"""

from __future__ import annotations

import os

# Before torch is imported (libgomp reads its environment once, when it is loaded): see bench/__main__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.backend_worker import WorkerProcess, measure, top1

log = logging.getLogger("bench.quantizers")
ARCHS = {"convnet": "small64", "resnet18": "photo640"}
# name -> (tool, runtime, precision); the first is the reference every ratio and agreement is against
VARIANTS: dict[str, tuple[str, str, str]] = {
    "fp32-torch": ("-", "torch", "fp32"),
    "fp32-ort": ("-", "onnxruntime", "fp32"),
    "fp32-ov": ("-", "openvino", "fp32"),
    "qdq-ort": ("onnxruntime quantize_static (QDQ)", "onnxruntime", "int8"),
    "qdq-ov": ("onnxruntime quantize_static (QDQ)", "openvino", "int8"),
    "nncf-ov": ("nncf.quantize", "openvino", "int8"),
    "pt2e-eager": ("torchao PT2E, X86InductorQuantizer", "torch eager", "int8"),
    "fp32-inductor": ("-", "torch inductor", "fp32"),
    "pt2e-inductor": ("torchao PT2E, X86InductorQuantizer", "torch inductor", "int8"),
}
COMPILED = ("fp32-inductor", "pt2e-inductor")
NEEDS = {"nncf-ov": "nncf", "pt2e-eager": "torchao", "pt2e-inductor": "torchao"}
EXTRAS = {"nncf": "quantize-nncf", "torchao": "quantize-pt2e"}


# ---------------------------------------------------------------- worker side (one variant)


class Model:
    """uint8 images -> logits through one variant's `run` (a float batch -> logits), with the same
    normalisation for every variant. A batch of a size not in `sizes` is padded up to the next one
    (or split at the largest): a compiled variant then only ever sees the sizes it was warmed up on."""

    def __init__(self, pre: Any, run: Callable[[torch.Tensor], torch.Tensor], sizes: list[int]) -> None:
        self.pre, self.run, self.sizes = pre, run, sorted(sizes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        from service.optimize import bucket

        n, size = x.shape[0], bucket(x.shape[0], self.sizes)
        if n > size:
            return torch.cat([self.logits(x[i : i + size]) for i in range(0, n, size)])
        if n < size:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        with torch.inference_mode():
            return torch.as_tensor(self.run(x))[:n].float()

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self.logits(self.pre.normalize(torch.stack(images)))


def _service_runtime(runtime: str, path: Path, cache: Path, compile: str = "off") -> Any:
    """The service's own backend on a checkpoint or int8 ONNX file (probe-checked, as served)."""
    from model.checkpoint import file_sha256
    from service.runtimes import build_runtime, load_source

    return build_runtime(runtime, load_source(path), torch.device("cpu"), sha256=file_sha256(path),
                         compile=compile, cache_dir=cache)


def quantize_qdq(loaded: Any, calib: list[torch.Tensor], probe: torch.Tensor, ckpt: Path, out: Path) -> None:
    """training/onnx_export.py's quantize_graph, written with metadata as `bench backends` does."""
    from model.onnx_file import artifact_props, set_metadata
    from training.onnx_export import BatchReader, file_sha256, quantize_graph

    pre = loaded.preprocess
    graph = quantize_graph(loaded.model, pre.input_shape, BatchReader(calib))
    props = artifact_props(file_sha256(ckpt), "int8", loaded.model, pre, probe)
    out.write_bytes(set_metadata(graph, loaded.meta, props))


def quantize_nncf(loaded: Any, calib: list[torch.Tensor], out: Path) -> None:
    """The fp32 ONNX export read by OpenVINO, nncf.quantize with its defaults (preset PERFORMANCE:
    symmetric int8, fast bias correction) on one image per calibration item (NNCF counts
    subset_size in items: every calibration image is used), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    from model.onnx_file import export_onnx

    fp32 = out.with_suffix(".fp32.onnx")
    fp32.write_bytes(export_onnx(loaded.model, loaded.preprocess.input_shape))
    model = ov.Core().read_model(str(fp32))
    items = [img.unsqueeze(0) for batch in calib for img in batch]
    dataset = nncf.Dataset(items, lambda x: x.numpy())
    quantized = nncf.quantize(model, dataset, subset_size=len(items))
    ov.save_model(quantized, str(out), compress_to_fp16=False)  # int8 weights; the rest stays fp32


def quantize_pt2e(loaded: Any, calib: list[torch.Tensor]) -> torch.nn.Module:
    """torch.export (dynamic batch) -> prepare_pt2e(X86InductorQuantizer, its default static config:
    per-channel int8 weights, uint8 activations) -> calibrate -> convert_pt2e."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = loaded.model.float().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        # strict (dynamo) capture: after the non-strict default the quantizer fails on resnet18
        # ("Input partition has more than one output node"; likely the BasicBlock's one ReLU module,
        # called twice, seen as one partition).
        exported = torch.export.export(model, (calib[0][:2],), dynamic_shapes=({0: batch},),
                                       strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)  # type: ignore[arg-type]
        for x in calib:
            prepared(x)
        return convert_pt2e(prepared)


def build(variant: str, ckpt: Path, data: dict[str, Any], workdir: Path) -> tuple[Any, dict[str, Any]]:
    """The variant's float batch -> logits callable, and what its making took."""
    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    calib, info = data["calib"], {}
    cache = workdir / "cache"
    qdq = workdir / f"{ckpt.stem}.int8.onnx"
    start = time.perf_counter()
    if variant in ("fp32-torch", "fp32-ort", "fp32-ov"):
        return _service_runtime(VARIANTS[variant][1], ckpt, cache).run, info
    if variant == "qdq-ort":
        quantize_qdq(loaded, calib, data["probe"], ckpt, qdq)
        info["quantize_s"] = time.perf_counter() - start
        info["file_mb"] = qdq.stat().st_size / 1e6
        return _service_runtime("onnxruntime", qdq, cache).run, info
    if variant == "qdq-ov":  # the file qdq-ort wrote (started before it)
        return _service_runtime("openvino", qdq, cache).run, info
    if variant == "nncf-ov":
        from service.runtimes.openvino import OpenVinoRuntime

        xml = workdir / f"{ckpt.stem}.nncf.xml"
        quantize_nncf(loaded, calib, xml)
        info["quantize_s"] = time.perf_counter() - start
        info["file_mb"] = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6
        return OpenVinoRuntime(xml, "int8").run, info  # the service's OpenVINO settings
    import torch._inductor.config as inductor_config

    # Freezing: weights become constants inductor can prepack (oneDNN's int8 convolutions need it).
    inductor_config.freezing = True
    if variant == "fp32-inductor":
        return _service_runtime("torch", ckpt, cache, compile="compile").run, info
    converted = quantize_pt2e(loaded, calib)
    info["quantize_s"] = time.perf_counter() - start
    if variant == "pt2e-eager":
        return converted, info
    return torch.compile(converted, dynamic=False), info


def serve(args: argparse.Namespace, out: Any) -> None:
    from model.checkpoint import load_checkpoint
    from service.optimize import allow_graphs

    torch.set_num_threads(args.threads)  # quantization and runs alike
    sizes = [int(s) for s in args.sizes.split(",")]
    data = torch.load(args.data)
    allow_graphs(len(sizes))
    start = time.perf_counter()
    run, info = build(args.variant, args.checkpoint, data, args.workdir)
    model = Model(load_checkpoint(args.checkpoint).preprocess, run, sizes)
    warm = time.perf_counter()
    for b in sizes:  # a compiled variant compiles here, one graph per size
        for _ in range(2):
            model.forward((data["images"] * b)[:b])
    info |= {"ready": True, "load_s": warm - start, "warmup_s": time.perf_counter() - warm,
             "rss_mb": _rss_mb(), "torch_threads": torch.get_num_threads()}
    print(json.dumps(info), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("top1"):
            answer: dict[str, Any] = {"top1": top1(model, list(data["eval"]), max(sizes))}
        elif req.get("val"):
            answer = {"pred": [int(i) for i in model.logits(data["val_x"]).argmax(dim=1).tolist()]}
        else:
            answer = measure(model, list(data["images"]), int(req["batch"]), float(req["min_s"]))
        print(json.dumps(answer), file=out, flush=True)


def _rss_mb() -> float:
    from bench.servers import rss_mb

    return rss_mb(os.getpid())


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quantizers worker")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="torch.save'd images, eval, calib[, val_x]")
    p.add_argument("--workdir", type=Path, required=True, help="int8 files and the export cache")
    p.add_argument("--sizes", default="1,16")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol keeps stdout (backend_worker.py)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(args, out)
    return 0


# ---------------------------------------------------------------- benchmark side


def available(variants: list[str]) -> tuple[list[str], dict[str, str]]:
    """The variants whose tool is installed, and why each other one was skipped."""
    import importlib.util

    keep, skipped = [], {}
    for v in variants:
        module = NEEDS.get(v)
        if module and importlib.util.find_spec(module) is None:
            skipped[v] = f"{module} is not installed (pip install 'convserve[{EXTRAS[module]}]')"
        else:
            keep.append(v)
    return keep, skipped


def calibration(arch: str, prep: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """For a trained checkpoint: calibration batches of its training split as `training quantize`
    draws them and its validation split (inputs and mapped targets); else the benchmark images. The
    probe (the int8 file's start-up check) is three of the calibration images, as in `quantize`."""
    from torch.utils.data import DataLoader

    from model.onnx_file import PROBE_SIZE
    from training.onnx_export import quantize_data, uint8_image

    if not prep["loaded"].meta.training.get("data"):
        return {"calib": prep["calib"], "probe": torch.stack(prep["images"][:PROBE_SIZE]),
                "calibration": f"{len(prep['images']) // 2} benchmark images"}
    qd = quantize_data(prep["checkpoint"], None, n, seed)
    pre = qd.loaded.preprocess
    probe = torch.stack([uint8_image(qd.train, i, pre) for i in qd.picked[:PROBE_SIZE]])
    calib = [x for x, _ in DataLoader(qd.calibration(), 32)]
    xs, ys = zip(*DataLoader(qd.val, 256), strict=True)
    y = torch.cat(ys).tolist()
    targets = [qd.mapping[t] for t in y] if qd.mapping else y
    return {"calib": calib, "probe": probe, "val_x": torch.cat(xs), "val_y": targets,
            "calibration": f"{len(qd.picked)} images of {qd.data}'s training split (seed {seed})"}


def compare(arch: str, prep: dict[str, Any], variants: list[str], sizes: list[int], threads: int,
            rounds: int, min_s: float, workdir: Path, calib_n: int, seed: int) -> dict[str, Any]:
    from bench.backends import alternate

    cal = calibration(arch, prep, calib_n, seed)
    data = {"images": prep["images"], "eval": prep["eval"], "calib": cal["calib"], "probe": cal["probe"]}
    if "val_x" in cal:
        data["val_x"] = cal["val_x"]
    path = workdir / f"{arch}-data.pt"
    torch.save(data, path)
    workers: dict[str, WorkerProcess] = {}
    ready: dict[str, dict[str, Any]] = {}
    try:
        for v in variants:  # one at a time: each quantizes with the machine to itself
            argv = ["bench.quantizers", "worker", "--variant", v, "--checkpoint", str(prep["checkpoint"]),
                    "--data", str(path), "--workdir", str(workdir), "--sizes", ",".join(map(str, sizes)),
                    "--threads", str(threads)]
            workers[v] = WorkerProcess(argv, workdir / "logs" / f"quantizers-{arch}-{v}.log")
            try:
                ready[v] = workers[v].wait_ready()
            except RuntimeError as e:  # one tool failing on a model is a result, not the end of the run
                log.warning("%s %s failed: %s", arch, v, e)
                ready[v] = {"error": str(e).splitlines()[0] + " " + str(e).strip().splitlines()[-1]}
                workers.pop(v).close()
                continue
            workers[v].settle()
            log.info("%s %s ready: %s", arch, v, {k: ready[v][k] for k in ready[v] if k.endswith("_s")})
        top = {v: w.ask({"top1": True})["top1"] for v, w in workers.items()}
        val = {v: w.ask({"val": True})["pred"] for v, w in workers.items()} if "val_x" in data else {}
        rates, _ = alternate(workers, sizes, rounds, min_s)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    ref = variants[0]
    for v in variants:
        tool, runtime, precision = VARIANTS[v]
        row: dict[str, Any] = {"arch": arch, "variant": v, "tool": tool, "runtime": runtime,
                               "precision": precision, **{k: x for k, x in ready[v].items() if k != "ready"}}
        if v in workers:
            row["images_per_s"] = {b: statistics.median(rates[(v, b)]) for b in sizes}
            row["rounds"] = {b: rates[(v, b)] for b in sizes}
            row["vs_fp32_torch"] = {b: row["images_per_s"][b] / statistics.median(rates[(ref, b)])
                                    for b in sizes}
            row["agreement"] = sum(a == b for a, b in zip(top[v], top[ref], strict=True)) / len(top[ref])
            if val:
                row["val_top1"] = sum(p == t for p, t in zip(val[v], cal["val_y"], strict=True)) / len(
                    cal["val_y"])
                row["val_agreement"] = sum(a == b for a, b in zip(val[v], val[ref], strict=True)) / len(
                    val[ref])
        rows.append(row)
    return {"arch": arch, "calibration": cal["calibration"], "eval_images": len(prep["eval"]),
            "val_images": len(cal.get("val_y", [])), "rows": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def render(result: dict[str, Any]) -> str:
    """The Markdown report: one table over every model, then the settings and the machine."""
    sizes = result["sizes"]
    head = ["model", "variant", "tool", "runtime"]
    head += [f"b{b} img/s (x fp32 torch)" for b in sizes]
    head += ["agreement", "val top-1", "quantize s", "warm-up s", "file MB"]
    lines = [f"command: `{result['command']}` ({result.get('minutes', float('nan')):.1f} min)",
             f"CPU: {result['cpu']}, {result['threads']} thread(s), load average {result.get('load', '?')} "
             "(shared machine)", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model in result["models"]:
        for r in model["rows"]:
            cells = [r["arch"], r["variant"], r["tool"], r["runtime"]]
            if "error" in r:
                cells += ["failed: " + r["error"][:80]] + [""] * (len(head) - 5)
            else:
                ips, ratio = r["images_per_s"], r["vs_fp32_torch"]
                cells += [f"{ips[b]:.1f} ({ratio[b]:.2f})" for b in sizes]
                cells += [_pct(r.get("agreement")), _pct(r.get("val_top1")), _num(r.get("quantize_s")),
                          _num(r.get("warmup_s")), _num(r.get("file_mb"), ".2f")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for model in result["models"]:
        val = f", validation top-1 on {model['val_images']} images" if model["val_images"] else ""
        lines.append(f"- {model['arch']}: calibrated on {model['calibration']}; agreement with fp32 torch "
                     f"on {model['eval_images']} benchmark images{val}.")
    for v, why in result.get("skipped", {}).items():
        lines.append(f"- {v} skipped: {why}")
    if result.get("sizes_mb"):
        lines.append("- installed size (what the extra adds to this environment): " + ", ".join(
            f"{extra} {mb:.0f} MB" for extra, mb in result["sizes_mb"].items()))
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}")
    return "\n".join(lines) + "\n"


def installed_mb(roots: list[str]) -> float:
    """MB of `roots` and what they need that the base install does not bring (bench/image_size.py)."""
    from bench.image_size import _find, canonical, closure, dist_size, requirements

    base_root = _find("convserve")
    base = closure(requirements(base_root), _find) if base_root else {"torch"}
    names = closure([canonical(r) for r in roots], _find) - base
    return sum(dist_size(d) for n in names if (d := _find(n)) is not None) / 1e6


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnxruntime", "openvino", "nncf", "torchao"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quantizers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Markdown report (raw JSON beside it)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated: convnet, resnet18")
    p.add_argument("--trained-checkpoint", type=Path, help="a trained convnet (default: runs/default/...)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, fp32-torch first")
    p.add_argument("--compile-archs", default="convnet",
                   help="models that get the inductor variants (each compile takes minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--calibration-images", type=int, default=512, help="of a trained model's training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", type=Path, help="folder for the generated benchmark images")
    p.add_argument("--workdir", type=Path, help="int8 files, logs (default: a temp folder, removed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bench.backends import bench_images
    from bench.inputs import generate
    from bench.report import machine_info
    from bench.servers import REPO

    began = time.perf_counter()
    trained = args.trained_checkpoint or REPO / "runs" / "default" / "model.safetensors"
    variants, skipped = available(args.variants.split(","))
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantizers-")))
        workdir.mkdir(parents=True, exist_ok=True)
        sets = generate(args.inputs or workdir / "inputs", args.seed, quick=False)
        sizes = sorted({1, args.max_batch_size})
        machine = machine_info()
        tools = sorted({NEEDS[v] for v in variants if v in NEEDS})
        result: dict[str, Any] = {
            "command": "python -m bench.quantizers " + " ".join(argv), "sizes": sizes,
            "threads": args.threads, "cpu": f"{machine['cpu']}, {machine['isa']}", "models": [],
            "skipped": skipped, "versions": versions(),
            "sizes_mb": {EXTRAS[m]: installed_mb([m]) for m in tools},
        }
        loads = [os.getloadavg()[0]]
        for arch in args.archs.split(","):
            checkpoint = trained if trained.is_file() else None
            prep = bench_images(arch, workdir, sets[ARCHS[arch]].load(), checkpoint)
            mine = [v for v in variants if v not in COMPILED or arch in args.compile_archs.split(",")]
            result["models"].append(compare(arch, prep, mine, sizes, args.threads, args.rounds,
                                            args.min_seconds, workdir, args.calibration_images, args.seed))
            loads.append(os.getloadavg()[0])
    result["load"] = f"{min(loads):.1f}-{max(loads):.1f} (1-min, sampled per model)"
    result["minutes"] = (time.perf_counter() - began) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
