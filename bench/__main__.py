"""`python -m bench [--out FILE] [--quick] ...`, `python -m bench soak ...`, `python -m bench startup ...`.

The full run takes 15-23 minutes on 2 cores, by CPU; `--quick` a few seconds' worth of load (15-40 s
in all, mostly server start-up). Results: a Markdown report at --out and the raw numbers
beside it (same name, .json).
"""

from __future__ import annotations

import os

# The service sets OMP_WAIT_POLICY=PASSIVE for itself (service/__init__.py); the baseline and the
# in-process bound inherit this process's environment, so they get the same OpenMP wait policy and
# the comparison is about serving, not about one libgomp variable (spinning costs them up to 9x
# on a shared 2-core machine). An explicit value in the environment wins. Set before the imports
# below: they import torch, and libgomp reads its environment once, when torch loads it (set in
# main(), it came too late for anything torch ran in this process: the matmul peak of `backends`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from bench import backends, inputs, protocols, report, run, servers, soak, startup, trees
from model.device import resolve_device

log = logging.getLogger("bench")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="Markdown report to write (raw JSON beside it)")
    p.add_argument("--inputs", type=Path, help="folder for the generated images (reused when it matches)")
    p.add_argument("--workdir", type=Path, help="checkpoints and server logs (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="input generator seed")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu or cuda:N: the service, baseline and bound all use it")
    p.add_argument("--torch-threads", type=int, default=0, help="0: the service's default")
    p.add_argument("--decode-threads", type=int, default=0, help="0: the service's default (one per core)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, help="CONVSERVE_MAX_BATCH_WAIT_MS (default: service's)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra service setting, e.g. --env warmup=pow2 (repeatable)")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="every scenario (the default command)")
    _common(r)
    r.add_argument("--quick", action="store_true", help="the small model only, a few seconds of load")
    r.add_argument("--rounds", type=int, help="alternating rounds per scenario (default 5, quick 1)")
    r.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    r.add_argument("--only", help="comma-separated scenario keys (resnet18-640, mobilenet-640, "
                                  "resnet18-4000, convnet-64, modes-convnet, modes-resnet18)")
    r.add_argument("--no-variants", action="store_true", help="skip the bf16/compile comparison")
    r.add_argument("--trained-checkpoint", type=Path, help="for agreement (default runs/default/...)")
    s = sub.add_parser("soak", help="20,000 requests against one service; RSS growth")
    _common(s)
    s.add_argument("--requests", type=int, default=20_000)
    s.add_argument("--arch", default="mobilenet_v3_small")
    s.add_argument("--image-set", default="photo640", choices=sorted(inputs.SETS))
    s.add_argument("--concurrency", default="16,64", help="comma-separated; alternates per chunk")
    s.add_argument("--chunk", type=int, default=1000, help="requests between two RSS readings")
    c = sub.add_parser("startup", help="cold start and idle RSS, service vs baseline, alternating rounds")
    _common(c)
    c.add_argument("--archs", default="resnet18,convnet", help="comma-separated architectures")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--service", action="append", default=[], metavar="NAME=DIR",
                   help="another service to compare, run from checkout DIR (e.g. a worktree of main)")
    v = sub.add_parser("protocols", help="/v2 binary vs /v1 raw bodies on one service (ratio per round)")
    _common(v)
    v.add_argument("--arch", default="convnet")
    v.add_argument("--image-set", default="small64", choices=sorted(inputs.SETS))
    v.add_argument("--concurrency", default="1,16", help="comma-separated")
    v.add_argument("--requests", type=int, default=400, help="requests per protocol, concurrency and round")
    v.add_argument("--rounds", type=int, default=3)
    t = sub.add_parser("trees", help="the service from several checkouts and the baseline, one run")
    _common(t)
    t.add_argument("--service", action="append", default=[], metavar="NAME=DIR",
                   help="a service run from checkout DIR (repeatable; the first is the 'before' of the "
                        "ratios; default: this checkout alone)")
    t.add_argument("--arch", default="convnet")
    t.add_argument("--image-set", default="small64", choices=sorted(inputs.SETS))
    t.add_argument("--concurrency", default="1,32", help="comma-separated")
    t.add_argument("--requests", type=int, default=500, help="requests per server, concurrency and round")
    t.add_argument("--rounds", type=int, default=6)
    b = sub.add_parser("backends", help="torch/onnxruntime/openvino, fp32/bf16/int8, side by side")
    _common(b)
    backends.add_arguments(b)
    commands = ("run", "soak", "startup", "backends", "protocols", "trees", "-h", "--help")
    if not argv or argv[0] not in commands:
        argv = ["run", *argv]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    temp = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    servers.compile_bytecode()  # servers start as from an installed package (.pyc files written)
    workdir = args.workdir or temp
    ok = False
    try:
        if args.command == "startup":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            _startup(args, workdir, command)
            ok = True
            return 0
        if args.command == "backends":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            backends.run(args, workdir, command)
            log.info("wrote %s", args.out)
            ok = True
            return 0
        quick = getattr(args, "quick", False) or args.command == "protocols"  # few images suffice
        sets = inputs.generate(args.inputs or temp / "inputs", args.seed, quick=quick)
        extra = dict(kv.split("=", 1) for kv in args.env)
        device = str(resolve_device(args.device))  # one device for every server and the bound
        bs = run.BenchSettings(args.torch_threads, args.decode_threads, args.max_batch_size,
                               args.batch_wait_ms, extra_env=extra, device=device)
        machine = report.machine_info(device)
        settings = {"max_batch_size": bs.max_batch_size,
                    "torch_threads": bs.torch_threads or (
                        "service auto (chosen at warm-up); bound: the service's batch threads (/v1/model); "
                        "baseline torch's default"),
                    "decode_threads": bs.decode_threads or "default (cores)",
                    "max_batch_wait_ms": bs.batch_wait_ms if bs.batch_wait_ms is not None else "default",
                    **extra,
                    # inherited by every server process; decides how torch's OpenMP threads wait
                    "env OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.command == "soak":
            ckpt = _checkpoint(args.arch, workdir)
            concs = [int(c) for c in args.concurrency.split(",")]
            res = soak.soak(ckpt, sets[args.image_set], bs.service_env(), workdir / "logs", args.requests,
                            concs, chunk=args.chunk)
            text = soak.render(res, f"{args.arch}, {args.image_set}", command)
            service_settings = {**bs.service_env(), "env OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
            text += "\nService settings (others: defaults): " + ", ".join(
                f"{k}={v}" for k, v in service_settings.items()) + "\n"
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "soak": res}, indent=1))
        elif args.command == "protocols":
            ckpt = _checkpoint(args.arch, workdir)
            at = {int(c): args.requests for c in args.concurrency.split(",")}
            res = protocols.compare(ckpt, sets[args.image_set], bs.service_env(), workdir / "logs", at,
                                    args.rounds)
            text = protocols.render(res, f"{args.arch}, {args.image_set}", command)
            args.out.write_text(text + f"\nMachine: {machine}\n")
            raw = {"machine": machine, "protocols": res}
            args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
        elif args.command == "trees":
            ckpt = _checkpoint(args.arch, workdir)
            at = {int(c): args.requests for c in args.concurrency.split(",")}
            checkouts = {name: Path(d).resolve() for name, d in (kv.split("=", 1) for kv in args.service)}
            res = trees.compare(ckpt, sets[args.image_set], bs.service_env(), workdir / "logs", checkouts, at,
                                args.rounds, bs.torch_threads)
            args.out.write_text(trees.render(res, f"{args.arch}, {args.image_set}", command, machine))
            args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "trees": res}, indent=1))
        else:
            bs.rounds = args.rounds or (1 if quick else 5)
            bs.scale = args.scale
            settings["rounds"] = bs.rounds
            settings["scale"] = bs.scale
            only = args.only.split(",") if args.only else None
            results = run.run_all(sets, workdir, bs, quick, only, args.trained_checkpoint,
                                  variants=not args.no_variants)
            text = report.render(results, machine, settings, command)
            args.out.write_text(text + "\n".join(startup.scenario_section(results)) + "\n")
            args.out.with_suffix(".json").write_text(
                json.dumps({"machine": machine, "settings": settings, "results": results}, indent=1))
        log.info("wrote %s", args.out)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            log.info("kept %s (logs and checkpoints)", temp)
    return 0


def _checkpoint(arch: str, workdir: Path) -> Path:
    """The random-weight checkpoint soak, protocols and trees serve (ImageNet's 1000 classes; the
    convnet its 10)."""
    classes = 1000 if arch != "convnet" else 10
    return run.make_checkpoint(arch, classes, workdir / "checkpoints" / f"{arch}.safetensors")


def _startup(args: argparse.Namespace, workdir: Path, command: str) -> None:
    """Cold start and idle RSS of each architecture's service and baseline; no images needed."""
    device = str(resolve_device(args.device))
    bs = run.BenchSettings(args.torch_threads, args.decode_threads, args.max_batch_size, args.batch_wait_ms,
                           extra_env=dict(kv.split("=", 1) for kv in args.env), device=device)
    ckpts = {arch: run.make_checkpoint(arch, 10 if arch == "convnet" else 1000,
                                       workdir / "checkpoints" / f"{arch}.safetensors")
             for arch in args.archs.split(",")}
    others = {name: Path(tree).resolve() for name, tree in (kv.split("=", 1) for kv in args.service)}
    for tree in others.values():
        servers.compile_bytecode(tree)
    machine = report.machine_info(device)
    res = startup.measure(ckpts, bs.service_env(), workdir / "logs", args.rounds, bs.torch_threads, device,
                          others)
    machine["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = startup.render(res, command, machine) + f"\nLoad average at end {machine['loadavg_end']}\n"
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "startup": res}, indent=1))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    sys.exit(main())
