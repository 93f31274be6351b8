"""`python -m service` / `convserve-serve`: flags (or CONVSERVE_* variables) -> Settings -> uvicorn.

One worker process by design: it holds one model and one batcher; scale with replicas.
`python -m service prepare [the same flags]` does a first start's one-off work and exits
(service/prepare.py).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import types
import typing
from typing import Any

from pydantic import SecretStr

from service.settings import ENV_PREFIX, Settings, SettingsError, flag_name, load_settings


def _arg_kwargs(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _arg_kwargs(args[0])
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arg_kwargs(args[0])
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": annotation, "metavar": "N"}
    if annotation is SecretStr:
        return {"type": str, "metavar": "KEY"}
    return {"type": str}


PREPARE = "prepare"
DESCRIPTIONS = {
    "": f"Serve a convserve checkpoint over HTTP (`python -m service {PREPARE} --help`: a first start's "
    "one-off work, done ahead of serving).",
    PREPARE: "Export the checkpoint, time --runtime auto's candidate against torch and keep the "
    "decision for the server (service/prepare.py), then exit. Give it the server's own settings.",
}


def build_parser(command: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m service {command}".strip(),
        description=f"{DESCRIPTIONS[command]} Every flag can also be set with the environment variable "
        f"{ENV_PREFIX}<FLAG_NAME> (e.g. {ENV_PREFIX}MAX_BATCH_SIZE); flags win.",
    )
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if field.is_required() else f" (default: {default or 'unset'})"
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=argparse.SUPPRESS,  # unset flags fall back to the environment, then the default
            help=f"{field.description}{shown}; env {ENV_PREFIX}{name.upper()}",
            **_arg_kwargs(field.annotation),
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = PREPARE if argv[:1] == [PREPARE] else ""
    args = vars(build_parser(command).parse_args(argv[1:] if command else argv))
    try:
        settings = load_settings(**args)
    except SettingsError as e:
        print(f"convserve-serve: {e}", file=sys.stderr)
        return 2

    import uvicorn  # after argument parsing: --help stays fast

    from model.checkpoint import CheckpointError
    from service.app import create_app
    from service.http_server import ConvserveHttpProtocol, DrainingServer
    from service.runtimes import RuntimeUnavailable, preflight

    try:  # the header only: a wrong file fails here in a line, not in a start-up traceback
        preflight(settings.checkpoint, settings.runtime)
    except RuntimeUnavailable as e:
        print(f"convserve-serve: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"convserve-serve: cannot serve --checkpoint: {e}", file=sys.stderr)
        return 2
    if command == PREPARE:
        from service import prepare

        return prepare.main(settings)

    # Everything imported so far (~225k objects: modules, classes, functions) lives as long as the
    # process. Moved out of the collector's view, every full collection gets ~4x cheaper: the one
    # before ready (service.memory: 0.6 -> 0.15 s for resnet18 on a shared machine) and the ones while
    # serving alike. Only here, in the process's own entry point: an embedder keeps its collector.
    gc.freeze()
    app = create_app(settings)
    # uvicorn re-raises the signal that stopped it after a graceful shutdown, so by default the
    # process would die "by SIGTERM". The drain has finished by then: make that a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,  # create_app configured logging (text or JSON)
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.grace_period_s) or 1,
        server_header=False,
        # httptools underneath, plus header limits and the per-connection drain state
        http=ConvserveHttpProtocol,
    )
    server = DrainingServer(config)  # hands its listeners to the drain (closed after drain_delay_s)
    server.run()
    if not server.started:
        return 3  # uvicorn's STARTUP_FAILURE: the port could not be bound or the lifespan failed
    failed = getattr(app.state, "convserve", None) and app.state.convserve.failed
    if failed:
        print(f"convserve-serve: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
