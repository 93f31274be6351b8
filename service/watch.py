"""--watch-checkpoint: reload by itself when the file at the checkpoint path is replaced.

Like Triton's poll mode, so a new model reaches every replica without anyone calling each one: the
trainer (or a volume sync) replaces the file atomically (os.replace), and each replica notices on
its next poll and goes through the same validated reload path as POST /v1/model/reload. Polling with
os.stat rather than inotify, because inotify misses changes on network and projected volumes (NFS,
Kubernetes ConfigMap/CSI mounts swap a symlink) and a stat every few seconds costs nothing.

The file is identified by (inode, size, mtime in ns): os.replace gives a new inode even when size
and mtime happen to match. A bad new file is refused and logged while the old model keeps serving,
and that same file is not tried again until it changes again (no reload storm on a broken file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from model.checkpoint import CheckpointError
from service.state import ServiceState

log = logging.getLogger(__name__)
Stamp = tuple[int, int, int]


def stamp(path: Path) -> Stamp:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


async def watch_checkpoint(state: ServiceState, path: Path, interval_s: float, seen: Stamp | None) -> None:
    """Poll `path` every `interval_s`; reload on a change. `seen` is the file that is being served."""
    missing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            # Off the event loop: a stat on a network volume can stall.
            current = await asyncio.to_thread(stamp, path)
        except OSError as e:  # e.g. briefly missing during a non-atomic copy: try again next poll
            if not missing:
                log.warning("watch: cannot stat %s (%s); still serving %s, will retry",
                            path, e.strerror or e, state.predictor.name)
            missing = True
            continue
        if missing:
            log.info("watch: %s is back", path)
            missing = False
        if current == seen:
            continue
        # Not now: warm-up still choosing thread counts, shutting down, or an API reload running.
        # `seen` stays as it is, so the change is picked up on a later poll.
        if not state.ready or state.draining or state.reload_lock.locked():
            continue
        seen = current  # before the reload: a refused file is not retried until it changes again
        await _reload(state, path)


async def _reload(state: ServiceState, path: Path) -> None:
    old = state.predictor
    try:
        _, new = await state.reload(path)
    except CheckpointError as e:
        state.metrics.reloads.labels("watch", "refused").inc()
        log.warning("watch: refused the new file %s, still serving %s: %s", path, old.name, e)
        return
    except Exception as e:  # never let the watcher die: the next change must still be seen
        state.metrics.reloads.labels("watch", "refused").inc()
        log.warning("watch: reload of %s failed, still serving %s: %s", path, old.name, e, exc_info=True)
        return
    state.metrics.reloads.labels("watch", "ok").inc()
    log.info(
        "watch: reloaded %s: %s (%s) -> %s (%s)", path, old.name, old.sha256[:12], new.name, new.sha256[:12]
    )


def start_watching(state: ServiceState) -> asyncio.Task[None] | None:
    """Start the watcher when --watch-checkpoint is set (call right after the start-up load, so the
    stamp taken here is the file just loaded)."""
    settings = state.settings
    if not settings.watch_checkpoint:
        return None
    path = settings.checkpoint
    try:
        seen: Stamp | None = stamp(path)
    except OSError:
        seen = None
    log.info("watching %s for a new checkpoint every %.1fs", path, settings.watch_interval_s)
    return asyncio.create_task(
        watch_checkpoint(state, path, settings.watch_interval_s, seen), name="watch-checkpoint"
    )


async def stop_watching(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
