"""Run a node from its config: the node (:class:`~replicator.peer.PeerNode`, both halves),
the control API, metrics publishing, signals, and systemd's READY/WATCHDOG/STOPPING.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

from .aio import wait_for
from .config import Config
from .control.api import load_or_create_token, start_api
from .errors import ConfigError
from .peer import PeerNode

log = logging.getLogger(__name__)


def sd_notify(state: str) -> None:
    """Send a notification to systemd if we were started with NOTIFY_SOCKET (else no-op)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


def make_node(cfg: Config) -> PeerNode:
    """The node for ``cfg``: both halves, the domain's placement choosing which one works."""
    return PeerNode(cfg)


async def serve(cfg: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run a node until cancelled or SIGTERM/SIGINT; SIGHUP reloads the bandwidth cap."""
    import signal

    from .config import load_config

    node = make_node(cfg)
    node.metrics.bandwidth_limit.set(cfg.stream.bandwidth_limit)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        # First: a start that hangs (libvirt, QEMU) is what one wants to see into.
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_stacks)
    await node.start()
    token_file = cfg.control.token_file or Path(cfg.node.state_dir) / "api-token"
    token = load_or_create_token(Path(token_file))
    runner, url = await start_api(node, cfg.control.listen, token, token_file=token_file,
                                  allowed_hosts=cfg.control.allowed_hosts)
    log.info("%s node %s: control API on %s", node.role, cfg.node.name, url)
    # Tools (and tests with port 0) find the API here.
    url_file = Path(cfg.node.state_dir) / "api-url"
    url_file.parent.mkdir(parents=True, exist_ok=True)
    url_file.write_text(url + "\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        if cfg.source_path is None or node.rep is None:
            log.info("reload: nothing to apply live on this node (restart to apply config "
                     "changes)")
            return
        try:
            new = load_config(cfg.source_path)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            return
        node.rep.limiter.rate = new.stream.bandwidth_limit
        node.metrics.bandwidth_limit.set(new.stream.bandwidth_limit)
        log.info("reloaded: bandwidth_limit=%d bytes/s", new.stream.bandwidth_limit)
        same = dataclasses.replace(new, stream=dataclasses.replace(
            new.stream, bandwidth_limit=cfg.stream.bandwidth_limit))
        if same != cfg:
            log.warning("reload: only stream.bandwidth_limit is applied live; restart the "
                        "daemon for the other changes")

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload)
    sd_notify("READY=1\nSTATUS=replicating")
    if ready is not None:
        ready.set()
    watchdog = float(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
    last_ping = 0.0
    try:
        while not stop.is_set():
            node.publish()
            now = time.monotonic()
            if watchdog and now - last_ping >= watchdog / 2:
                sd_notify("WATCHDOG=1")
                last_ping = now
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(stop.wait(), 0.5)
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping")
        await runner.cleanup()
        await node.stop(leave_domain_running=True)


def _await_chain(coro: object) -> list[str]:
    """The frames of ``coro`` and of everything it awaits, outermost first, then what the
    innermost waits on (a future, a task). ``Task.print_stack`` shows only the outermost
    coroutine's frame, which says nothing about where a stuck task waits."""
    lines: list[str] = []
    for _ in range(64):
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is None:
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, '
                     f"in {frame.f_code.co_name}")
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    if coro is not None:
        lines.append(f"  awaiting {coro!r}"[:300])
    return lines


def log_stacks() -> None:
    """SIGUSR1: log where every asyncio task and thread is (a daemon that seems stuck says
    what it waits for, without a debugger on the user's host)."""
    import io
    import sys
    import threading
    import traceback

    out = io.StringIO()
    tasks = asyncio.all_tasks()
    out.write(f"SIGUSR1: {len(tasks)} asyncio task(s), {threading.active_count()} thread(s)\n")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"--- task {task.get_name()}\n")
        out.writelines(line + "\n" for line in _await_chain(task.get_coro()))
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, ident)}\n")
        out.write("".join(traceback.format_stack(frame, limit=12)))
    log.warning("%s", out.getvalue())


__all__ = ["log_stacks", "make_node", "serve", "sd_notify"]
