"""The two halves every node has: the source (replicates the domain that runs here, performs
switches) and the sink (keeps the shadow of a domain that runs on the peer, takes over on a
switch). :class:`~replicator.peer.PeerNode` composes them; tests also run one half alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, ReplicatorError
from .metrics import Metrics

log = logging.getLogger(__name__)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(),
                  exc_info=task.exception())


class SourceNode:
    """The desktop side: replicates its domain and performs switches."""

    role = "source"

    def __init__(self, cfg: Config, *, metrics: Metrics | None = None, proc: Any = None,
                 generation: int = 0):
        self.cfg = cfg
        self.metrics = metrics or Metrics("source", cfg.domain.name)
        #: A QEMU this node already holds (the shadow that became the domain on commit).
        self._proc = proc
        #: The placement generation the domain runs at here (see :mod:`replicator.placement`).
        self.generation = generation
        self.driver: Any = None
        self.rep: Any = None
        self.switcher: Any = None
        self._task: asyncio.Task | None = None
        self._paused = False

    async def start(self) -> None:
        from .source.converge import Throttle
        from .source.driver import FileDriver
        from .source.sender import SourceReplicator
        from .source.switch import HandoverState, Switcher
        from .source.tracker import ScanTracker

        cfg = self.cfg
        if cfg.domain.driver == "file":
            self.driver = FileDriver(cfg.domain)
        elif cfg.domain.driver == "libvirt":
            from .source.libvirt_driver import LibvirtDriver
            if self._proc is not None:
                self.driver = await LibvirtDriver.from_libvirt_process(cfg, self._proc)
            else:
                self.driver = await LibvirtDriver.create(cfg)
        else:
            from .source.qemu_driver import QemuDriver
            if self._proc is not None:
                self.driver = await QemuDriver.from_process(cfg, self._proc)
            else:
                self.driver = await QemuDriver.create(cfg)
        regions = await self.driver.regions()
        disks = None
        throttle = None
        if cfg.domain.is_qemu:
            from .source import disks as source_disks
            from .wire.pages import Compressor
            disks = await source_disks.create(
                cfg, self.driver, self.metrics,
                Compressor(cfg.stream.compression, cfg.stream.zstd_level))
            throttle = Throttle(self.driver.proc, cfg.switch)
        state = HandoverState(Path(cfg.node.state_dir) / cfg.domain.name / "handed-over.json",
                              self.generation)
        if cfg.domain.tracker == "qemu-precopy":
            if not cfg.domain.is_qemu:
                raise ConfigError("the qemu-precopy tracker needs a QEMU or libvirt domain",
                                  path=cfg.source_path, key="domain.tracker")
            from .source.precopy import PrecopyStream
            self.rep = SourceReplicator(cfg, self.driver, regions, metrics=self.metrics,
                                        disks=disks,
                                        stream=lambda rep: PrecopyStream(rep, throttle))
        else:
            self.rep = SourceReplicator(cfg, self.driver, regions, ScanTracker(regions),
                                        self.metrics, disks=disks)
        self.rep.generation = self.generation
        self.rep.on_switch_request = self._switch_requested
        self.switcher = Switcher(self.rep, self.driver, state, throttle=throttle,
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

    def _switch_requested(self, mode: str) -> None:
        """The sink asked for the switch ("switch now" pressed there): start it here."""
        async def run() -> None:
            try:
                await self.switch(mode)
            except ReplicatorError as exc:
                log.warning("the switch the sink asked for did not happen: %s", exc)
        task = asyncio.create_task(run(), name="requested-switch")
        task.add_done_callback(_log_crash)
        self._requested = task                      # keep a reference while it runs

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

    def __init__(self, cfg: Config, *, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics("sink", cfg.domain.name)
        self.receiver: Any = None
        self.domain_here: Any = None             # set by a PeerNode before start()
        self.placement: Any = None
        self.settle: Any = None
        self.switch_handler: Any = None
        self.address: tuple[str, int] | None = None

    async def start(self, domain_here: bool | None = None) -> None:
        """Listen for the source. ``domain_here`` (a node with both halves): where the node's
        placement says the domain runs, which settles a QEMU an earlier run left; ``None``:
        this store's own record says."""
        from .sink.receiver import SinkReceiver
        from .sink.switch import NullShadow, SinkSwitch

        self.receiver = SinkReceiver(self.cfg, self.metrics)
        # A node with both halves decides whether the domain runs here (see PeerNode).
        if getattr(self, "domain_here", None) is not None:
            self.receiver.domain_here = self.domain_here
            self.receiver.placement = self.placement
            self.receiver.settle = self.settle
        if self.cfg.domain.driver == "libvirt":
            from .sink.libvirt_shadow import LibvirtShadow
            shadow: Any = LibvirtShadow(self.cfg, self.receiver)
        elif self.cfg.domain.driver == "qemu":
            from .sink.qemu_shadow import QemuShadow
            shadow = QemuShadow(self.cfg, self.receiver)
        else:
            shadow = NullShadow()
        self.switch_handler = SinkSwitch(self.receiver, shadow)
        if self.cfg.domain.is_qemu:
            from .sink.precopy import PrecopySink
            self.precopy = PrecopySink(self.receiver, self.switch_handler)
        await self._recover(domain_here)
        self.address = await self.receiver.start()
        if self.cfg.domain.is_qemu:
            self._prestart = asyncio.create_task(self._prestart_shadow(), name="prestart")
            self._prestart.add_done_callback(_log_crash)

    async def _recover(self, domain_here: bool | None) -> None:
        """Open the shadow store an earlier run left (so "runs here" is known before anyone
        connects) and settle that run's shadow QEMU: adopt the domain if it was committed
        here, end a mere shadow otherwise."""
        from .sink.store import ShadowStore

        rec = self.receiver
        recover = getattr(self.switch_handler.shadow, "recover", None)
        try:
            layout = ShadowStore.existing_layout(rec.root)
            if layout is not None:
                rec.store = await asyncio.to_thread(ShadowStore.open, rec.root, layout,
                                                    rec.images)
        except ReplicatorError as exc:
            rec.last_error = str(exc)
            log.error("cannot open the shadow store: %s", exc)
            if domain_here is None:
                return
        if domain_here is None:                      # one half alone: the store decides
            if rec.store is None:
                return
            domain_here = rec.store.handed_over
        elif domain_here:
            return                                   # the node settles the domain's QEMU
        if rec.store is not None and rec.store.handed_over and domain_here:
            self.metrics.handed_over.set(1)
        if recover is not None:
            # Committed here: adopt the QEMU that runs the domain. Runs on the peer: end
            # whatever QEMU an earlier run left here (a shadow, or this host's old VM, paused
            # since it handed the domain over).
            await recover(domain_here)

    async def _prestart_shadow(self) -> None:
        """Start the shadow (paused, waiting) once replication is under way, so a switch does
        not pay for launching QEMU. The precopy relay starts its own shadow per session."""
        rec, shadow = self.receiver, self.switch_handler.shadow
        while True:
            await asyncio.sleep(1.0)
            store = rec.store
            if (rec.connected.is_set() and rec.stream_kind == "scan" and store is not None
                    and store.epoch >= 1 and not store.handed_over
                    and (shadow.proc is None or shadow.proc.returncode is not None)):
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
