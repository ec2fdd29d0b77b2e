"""Assemble a running node (source or sink) from its config, and run it.

The daemon owns the pieces: driver -> tracker -> replicator -> switcher on the source; receiver
-> store -> switch -> shadow on the sink; the control API on both. It publishes metrics
periodically and talks to systemd (READY/WATCHDOG/STOPPING) when started by it.
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
from typing import Any

from .config import Config
from .control.api import load_or_create_token, start_api
from .errors import ConfigError, HandedOver, ReplicatorError
from .metrics import Metrics

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


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(),
                  exc_info=task.exception())


class SourceNode:
    """The desktop side: replicates its domain and performs switches."""

    role = "source"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics("source", cfg.domain.name)
        self.driver: Any = None
        self.rep: Any = None
        self.switcher: Any = None
        self._task: asyncio.Task | None = None
        self._paused = False

    async def start(self) -> None:
        from .source.driver import FileDriver
        from .source.sender import SourceReplicator
        from .source.switch import HandoverState, Switcher
        from .source.tracker import ScanTracker

        cfg = self.cfg
        if cfg.domain.driver == "file":
            self.driver = FileDriver(cfg.domain)
        else:
            from .source.qemu_driver import QemuDriver
            self.driver = await QemuDriver.create(cfg)
        regions = await self.driver.regions()
        disks = None
        if cfg.domain.driver == "qemu":
            from .source import disks as source_disks
            from .wire.pages import Compressor
            disks = await source_disks.create(
                cfg, self.driver, self.metrics,
                Compressor(cfg.stream.compression, cfg.stream.zstd_level))
        state = HandoverState(Path(cfg.node.state_dir) / cfg.domain.name / "handed-over.json")
        switcher_cls: type = Switcher
        if cfg.domain.tracker == "qemu-precopy":
            if cfg.domain.driver != "qemu":
                raise ConfigError("the qemu-precopy tracker needs driver = \"qemu\"",
                                  path=cfg.source_path, key="domain.tracker")
            from .source.precopy import PrecopyReplicator, PrecopySwitcher
            self.rep = PrecopyReplicator(cfg, self.driver, regions, self.metrics, disks=disks)
            switcher_cls = PrecopySwitcher
        else:
            self.rep = SourceReplicator(cfg, self.driver, regions, ScanTracker(regions),
                                        self.metrics, disks=disks)
        self.switcher = switcher_cls(self.rep, self.driver, state,
                                     target_downtime=cfg.switch.target_downtime,
                                     step_timeout=cfg.switch.step_timeout)
        if self.switcher.interrupted:
            # Killed mid-switch before the commit: this host still owns the domain.
            await self.switcher.settle_interrupted()
        if self.switcher.pending_commit:
            # Restarted while a commit's outcome was unknown: reconnect only to ask the sink.
            self._task = asyncio.create_task(self.rep.run(), name="replicate")
            self._task.add_done_callback(_log_crash)
            self._resolver = asyncio.create_task(self.switcher.resolve_pending(), name="resolve")
            self._resolver.add_done_callback(_log_crash)
            return
        if self.switcher.handed_over:
            self.metrics.handed_over.set(1)
            log.warning("domain %s was handed over to %s; not replicating (and never resuming "
                        "it here)", cfg.domain.name, (state.load() or {}).get("peer", "the peer"))
            return
        self._task = asyncio.create_task(self.rep.run(), name="replicate")
        self._task.add_done_callback(_log_crash)

    def publish(self) -> None:
        if self.rep is not None:
            self.rep.publish()

    def status(self) -> dict:
        out: dict[str, Any] = {"role": "source", "node": self.cfg.node.name,
                               "domain": self.cfg.domain.name, "time": time.time()}
        rep = self.rep
        if rep is None:
            return out
        snap = rep.lag_snapshot()
        pre = getattr(rep, "precopy_status", None)
        if pre is not None:
            out["tracker"] = "qemu-precopy"
            out["precopy"] = pre()
        else:
            out["tracker"] = "scan"
        out.update({
            "peer": {"address": self.cfg.peer.address, "node": rep.sink_node,
                     "connected": rep.connected.is_set(), "error": rep.last_error,
                     "rtt_seconds": rep.rtt},
            "ram_bytes": sum(r.size for r in rep.regions),
            "lag": {"bytes": snap.lag_bytes, "pages": snap.lag_pages, "seconds": snap.lag_seconds},
            "dirty_rate_bytes_per_second": snap.dirty_rate,
            "throughput_bytes_per_second": snap.throughput,
            "link_rate_bytes_per_second": snap.link_rate,
            "switch_estimate_seconds": snap.switch_estimate + rep.disk_estimate(),
            "acked_epoch": snap.acked_epoch,
            "in_sync": snap.in_sync and rep.disks_in_sync(),
            "disks": rep.disks.status() if rep.disks is not None else [],
            "sent_bytes": {"raw": rep.ledger.raw_sent, "wire": rep.ledger.wire_sent},
            "handed_over": self.switcher.handed_over,
            "qemu_pid": getattr(getattr(self.driver, "proc", None), "pid", None),
            "replication_paused": self._paused,
            "switch": (self.switcher.current.to_dict() if self.switcher.current else None),
            "last_switch": (self.switcher.last.to_dict() if self.switcher.last else None),
        })
        return out

    @property
    def replication_paused(self) -> bool:
        return self._paused

    async def pause_replication(self) -> dict:
        """Stop replicating (for qemu-precopy: end the held-open migration, so QEMU allows
        hotplug, snapshots or another migration). The VM keeps running; a switch is refused."""
        if self.switcher is None or self.switcher.handed_over:
            raise ReplicatorError("nothing to pause: the domain was handed over")
        if self.switcher.current is not None:
            raise ReplicatorError("a switch is in progress")
        self._paused = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        log.info("replication paused by request; the VM keeps running, unprotected")
        return {"replication": "paused"}

    async def resume_replication(self) -> dict:
        """Start replicating again; only pages that differ from the shadow are sent."""
        if self.switcher is None or self.switcher.handed_over:
            raise ReplicatorError("nothing to resume: the domain was handed over")
        self._paused = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.rep.run(), name="replicate")
            self._task.add_done_callback(_log_crash)
        log.info("replication resumed")
        return {"replication": "running"}

    async def domain_state(self) -> str | None:
        """The VM's run state here (QMP for QEMU), for status and tests."""
        if self.driver is None:
            return None
        proc = getattr(self.driver, "proc", None)
        if proc is not None:
            return await proc.status()
        return "running" if await self.driver.is_running() else "paused"

    async def switch(self, mode: str) -> dict:
        if self._paused:
            raise ReplicatorError("replication is paused (replicator resume first)")
        report = await self.switcher.switch(mode)
        # Handed over: stop replicating; the sink refuses us from now on anyway.
        if self._task is not None:
            self._task.cancel()
        return report.to_dict()

    async def stop(self, leave_domain_running: bool = False) -> None:
        """Stop replicating. ``leave_domain_running``: a VM this daemon launched goes on (a
        service stop or restart must not power off the user's VM; the next start adopts it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.rep is not None:
            await self.rep.close()
        if self.driver is not None:
            await self.driver.close(leave_running=leave_domain_running)


class SinkNode:
    """The laptop side: keeps the shadow and takes over on a switch."""

    role = "sink"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics("sink", cfg.domain.name)
        self.receiver: Any = None
        self.switch_handler: Any = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        from .sink.receiver import SinkReceiver
        from .sink.switch import NullShadow, SinkSwitch

        self.receiver = SinkReceiver(self.cfg, self.metrics)
        if self.cfg.domain.driver == "qemu":
            from .sink.qemu_shadow import QemuShadow
            shadow: Any = QemuShadow(self.cfg, self.receiver)
        else:
            shadow = NullShadow()
        self.switch_handler = SinkSwitch(self.receiver, shadow)
        if self.cfg.domain.driver == "qemu":
            from .sink.precopy import PrecopySink
            self.precopy = PrecopySink(self.receiver, self.switch_handler)
        await self._recover()
        self.address = await self.receiver.start()
        if self.cfg.domain.driver == "qemu":
            self._prestart = asyncio.create_task(self._prestart_shadow(), name="prestart")
            self._prestart.add_done_callback(_log_crash)

    async def _recover(self) -> None:
        """Open the shadow store an earlier run left (so "runs here" is known before anyone
        connects) and settle that run's shadow QEMU: adopt the domain if it was committed
        here, end a mere shadow otherwise."""
        from .sink.store import ShadowStore

        rec = self.receiver
        try:
            layout = ShadowStore.existing_layout(rec.root)
            if layout is None:
                return
            rec.store = await asyncio.to_thread(ShadowStore.open, rec.root, layout)
        except ReplicatorError as exc:
            rec.last_error = str(exc)
            log.error("cannot open the shadow store: %s", exc)
            return
        if rec.store.handed_over:
            self.metrics.handed_over.set(1)
        recover = getattr(self.switch_handler.shadow, "recover", None)
        if recover is not None:
            await recover(rec.store.handed_over)

    async def _prestart_shadow(self) -> None:
        """Start the shadow (paused, waiting) once replication is under way, so a switch does
        not pay for launching QEMU. The precopy relay starts its own shadow per session."""
        rec, shadow = self.receiver, self.switch_handler.shadow
        while True:
            await asyncio.sleep(1.0)
            store = rec.store
            if (rec.connected.is_set() and rec.stream_kind == "scan" and store is not None
                    and store.epoch >= 1 and not store.handed_over and shadow.proc is None):
                try:
                    await shadow.prepare(rec.vm_description)
                except ReplicatorError as exc:
                    log.warning("could not pre-start the shadow (will retry at switch): %s", exc)
                    await asyncio.sleep(30)

    def publish(self) -> None:
        pass

    def status(self) -> dict:
        rec = self.receiver
        store = rec.store if rec else None
        return {
            "role": "sink", "node": self.cfg.node.name, "domain": self.cfg.domain.name,
            "time": time.time(),
            "listen": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "peer": {"node": rec.source_node if rec else "",
                     "connected": bool(rec and rec.connected.is_set()),
                     "error": rec.last_error if rec else ""},
            "acked_epoch": store.epoch if store else None,
            "ram_bytes": sum(r.info.size for r in store.regions.values()) if store else None,
            "runs_domain": bool(store and store.handed_over),
            "disks": rec.disks.status() if rec else [],
            "shadow": self.switch_handler.shadow.status() if self.switch_handler else {},
            "last_switch": self.switch_handler.last_result if self.switch_handler else None,
        }

    async def domain_state(self) -> str | None:
        shadow = self.switch_handler.shadow if self.switch_handler else None
        proc = getattr(shadow, "proc", None)
        if proc is not None and proc.returncode is None:
            return await proc.status()
        if shadow is not None and getattr(shadow, "running", False):
            return "running"
        return None

    async def switch(self, mode: str) -> dict:
        raise ReplicatorError("switches are started on the source (the host running the VM)")

    async def stop(self, leave_domain_running: bool = False) -> None:
        # A shadow that runs the domain always outlives the daemon (QemuShadow.close).
        task = getattr(self, "_prestart", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.switch_handler is not None:
            await self.switch_handler.shadow.close()
        if self.receiver is not None:
            await self.receiver.stop()


def make_node(cfg: Config) -> SourceNode | SinkNode:
    return SourceNode(cfg) if cfg.node.role == "source" else SinkNode(cfg)


async def serve(cfg: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run a node until cancelled or SIGTERM/SIGINT; SIGHUP reloads the bandwidth cap."""
    import signal

    from .config import load_config

    node = make_node(cfg)
    node.metrics.bandwidth_limit.set(cfg.stream.bandwidth_limit)
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
        if cfg.source_path is None or not isinstance(node, SourceNode) or node.rep is None:
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
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping")
        await runner.cleanup()
        await node.stop(leave_domain_running=True)


__all__ = ["SourceNode", "SinkNode", "make_node", "serve", "sd_notify", "HandedOver"]
