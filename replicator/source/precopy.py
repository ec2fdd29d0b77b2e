"""The ``qemu-precopy`` tracker: QEMU's own dirty log, through a migration held open.

The source QEMU migrates (precopy, ``return-path`` + ``switchover-ack``) into a unix socket this
relay listens on. The relay forwards the stream over the replication link to the sink, which
feeds a shadow QEMU and relays the return path back — except the shadow's SWITCHOVER_ACK, which
it withholds until "switch now". Precopy therefore never completes on its own: QEMU keeps
sending exactly the pages the guest dirties (KVM's dirty log, or TCG's), and a switch costs only
the last delta plus the device state, with no O(RAM) scan in the downtime.

Pacing: with nothing to send, QEMU re-syncs its dirty bitmap in a busy loop and re-sends hot
pages (74.5% of a core for an idle guest, measured). The relay drains the socket continuously
while QEMU has a backlog and in short bursts when idle (1 ms every 250 ms by default), which lets
the socket fill and QEMU block on it instead of spinning.

Resume: after a link loss both migrations fail and the source VM keeps running. The next session
starts a new migration; its bulk pass would resend all RAM, so the relay drops every PAGE record
whose content the shadow already holds (the sink's manifest, plus the last content forwarded for
pages still in flight), repairing QEMU's CONTINUE shorthand on the next kept record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import xxhash

from ..config import PAGE_SIZE, Config
from ..errors import PeerError, ProtocolError, QemuError, SwitchError
from ..faults import checkpoint
from ..pagefile import digest_hashes
from ..link import Link
from ..metrics import Metrics
from ..wire import messages as m
from ..wire.pages import ZERO_HASH
from ..vmm.migration_editor import PrecopyEditor
from ..vmm.migration_format import PageKind, PageRecord, RamEos
from ..vmm.qmp_events import QmpEvent
from ..vmm.spec import RAM_BACKEND_ID
from .converge import Deadlines, Throttle
from .driver import Region
from .ledger import LagSnapshot
from .sender import SourceReplicator
from .switch import Switcher, SwitchReport, _Progress
from .tracker import DirtyTracker, Round

log = logging.getLogger(__name__)

_hash = xxhash.xxh3_64_intdigest
RECV_CHUNK = 1 << 20


class PrecopyTracker(DirtyTracker):
    """Placeholder in the tracker slot: dirty pages arrive inside QEMU's stream, not by rounds."""

    async def round(self, ledger: Any) -> Round:
        raise ProtocolError("the qemu-precopy tracker has no scan rounds")


class PrecopyReplicator(SourceReplicator):
    """Relays a held-open QEMU precopy migration to the sink."""

    def __init__(self, cfg: Config, driver: Any, regions: list[Region],
                 metrics: Metrics | None = None, disks: Any = None):
        super().__init__(cfg, driver, regions, PrecopyTracker(), metrics, disks=disks)
        self.sock_path = Path(cfg.node.state_dir) / cfg.domain.name / "precopy.sock"
        self.session_no = 0
        self.pacing = "idle"
        self.qemu_info: dict[str, Any] = {}
        self.switching = asyncio.Event()           # drain continuously (switch under way)
        self.pages_forwarded = 0
        self.pages_dropped = 0
        self.zero_records = 0
        self.iterations = 0
        self.relayed_bytes = 0
        self.stream_bytes = 0
        self.device_state_offset = 0
        self._backlog = True
        # When QEMU last had nothing queued for the shadow. Kept across sessions: a new
        # session proves nothing until it caught up again.
        self._caught_up_at: float | None = None
        self._last_lag = 0
        self._qsock: socket.socket | None = None
        self._editor: PrecopyEditor | None = None
        self._buf = bytearray(RECV_CHUNK)
        self.throttle = Throttle(driver.proc, cfg.switch)

    # --- page bookkeeping (runs inside the editor, per record) ---------------------------------

    def _drop_page(self, block: str, index: int, data: memoryview | bytes | None) -> bool:
        if block != RAM_BACKEND_ID:
            return False
        shipped = self.ledger.regions[RAM_BACKEND_ID].shipped
        if index >= len(shipped):
            raise ProtocolError(f"page {index} beyond the {block} region")
        if data is None:
            shipped[index] = ZERO_HASH
            return False
        h = _hash(data)
        if shipped[index] == h:
            return True                  # the shadow holds (or will hold) exactly this page
        shipped[index] = h
        return False

    # --- session -------------------------------------------------------------------------------

    async def _session(self, link: Link) -> None:
        await self._open_session(link)
        self.session_no += 1
        sid = self.session_no
        self.switching.clear()
        self.qemu_info = {}                       # figures of the previous migration are void
        self.pacing = "backlog"
        self._backlog = True
        self._session_tasks = [
            asyncio.create_task(self._recv_loop(link), name="receiver"),
            asyncio.create_task(self._ping_loop(link), name="pinger"),
        ]
        try:
            await link.send(m.PrecopyStart(sid))
            ready = await self.next_response(m.PrecopyReady, 60)
            if ready.session != sid:
                raise ProtocolError("sink is ready for another precopy session")
            await self._start_migration()
            log.info("relaying QEMU's precopy migration of %s to %s (session %d)",
                     self.cfg.domain.name, self.sink_node, sid)
            self._session_tasks += [
                asyncio.create_task(self._pump(link, sid), name="precopy-pump"),
                asyncio.create_task(self._poll_qemu(), name="precopy-poll"),
            ] + self._disk_tasks(link)
            await self._run_tasks()
        finally:
            await self._stop_migration()

    async def _start_migration(self) -> None:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.sock_path))
            os.chmod(self.sock_path, 0o600)
            listener.listen(1)
            listener.setblocking(False)
            # auto-converge can only be switched on before a migration starts.
            await self.throttle.arm()
            # With disks, QEMU waits in pre-switchover (guest stopped, disks still active) so
            # the switch can send the last disk delta before QEMU inactivates them.
            await self.driver.proc.start_precopy(f"unix:{self.sock_path}",
                                                 pause_before_switchover=self.disks is not None)
            loop = asyncio.get_running_loop()
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
        conn.setblocking(False)
        self._qsock = conn
        self._editor = PrecopyEditor(self._drop_page)

    async def _stop_migration(self) -> None:
        """End of a session: close QEMU's stream; an unfinished migration fails, the VM runs on."""
        if self._qsock is not None:
            self._qsock.close()
            self._qsock = None
        proc = getattr(self.driver, "proc", None)
        if proc is None:
            return
        with contextlib.suppress(QemuError, asyncio.TimeoutError):
            info = await proc.query_migrate()
            if info.get("status") not in ("completed", "failed", "cancelled", "none", None):
                await proc.execute("migrate_cancel")
        await self.throttle.undo()           # `replicator pause` leaves QEMU as it was

    # --- the stream ------------------------------------------------------------------------------

    async def _forward(self, link: Link, sid: int, chunk: memoryview) -> None:
        assert self._editor is not None
        out, events = self._editor.feed(chunk)
        for ev in events:
            if isinstance(ev, PageRecord):
                if ev.block != RAM_BACKEND_ID:
                    continue
                if ev.kind is PageKind.ZERO:
                    self.zero_records += 1
                elif ev.dropped:
                    self.pages_dropped += 1
                else:
                    self.pages_forwarded += 1
            elif isinstance(ev, RamEos):
                self.iterations += 1
            elif type(ev).__name__ == "DeviceStateBegin":
                self.device_state_offset = ev.offset
        self.stream_bytes += len(chunk)
        data = b"".join(out)
        if data:
            t0 = time.monotonic()
            n = await link.send_frame(_encode(m.PrecopyData(sid, data)))
            self.relayed_bytes += len(data)
            self.ledger.record_sent(len(chunk), n, time.monotonic() - t0)
            mt = self.metrics
            mt.sent_bytes.labels("raw").inc(len(chunk))
            mt.sent_bytes.labels("wire").inc(n)

    async def _pump(self, link: Link, sid: int) -> None:
        """QEMU -> sink, paced."""
        s = self.cfg.stream
        loop = asyncio.get_running_loop()
        assert self._qsock is not None
        sock = self._qsock
        while True:
            if self.switching.is_set():
                # Everything QEMU has, as fast as the link takes it.
                self.pacing = "switching"
                n = await loop.sock_recv_into(sock, self._buf)
                if n == 0:
                    break
                await self._forward(link, sid, memoryview(self._buf)[:n])
                continue
            t0 = time.monotonic()
            got = 0
            drained = False
            while time.monotonic() - t0 < s.precopy_burst or got == 0:
                try:
                    n = sock.recv_into(self._buf)
                except BlockingIOError:
                    drained = True
                    break
                if n == 0:
                    return
                got += n
                await self._forward(link, sid, memoryview(self._buf)[:n])
            if self._backlog or not self.qemu_info:
                # Bulk pass or heavy dirtying: keep QEMU's socket drained.
                self.pacing = "backlog"
                if drained:
                    n = await loop.sock_recv_into(sock, self._buf)
                    if n == 0:
                        break
                    await self._forward(link, sid, memoryview(self._buf)[:n])
                continue
            # QEMU has no real backlog: what is still in flight is at most one interval old.
            self.pacing = "idle"
            self._caught_up_at = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.switching.wait(), s.precopy_interval)

    async def _on_message(self, msg: Any) -> bool:
        if isinstance(msg, m.PrecopyReturn):
            # The shadow's return path, in order, back into the source QEMU's socket.
            if msg.session == self.session_no and self._qsock is not None:
                await asyncio.get_running_loop().sock_sendall(self._qsock, msg.data)
            return True
        return False

    async def _poll_qemu(self) -> None:
        proc = self.driver.proc
        last_syncs, last_bytes = 0, self.stream_bytes
        while True:
            with contextlib.suppress(QemuError, asyncio.TimeoutError):
                self.qemu_info = await proc.query_migrate()
                if self.qemu_info.get("status") in ("failed", "cancelled"):
                    raise PeerError(f"QEMU's precopy migration {self.qemu_info['status']}: "
                                    f"{self.qemu_info.get('error-desc', '')}")
                ram = self.qemu_info.get("ram", {})
                syncs = int(ram.get("dirty-sync-count") or 0)
                self._backlog = self._judge_backlog(int(ram.get("remaining") or 0),
                                                    syncs - last_syncs,
                                                    self.stream_bytes - last_bytes)
                last_syncs, last_bytes = syncs, self.stream_bytes
            await asyncio.sleep(self.cfg.stream.precopy_interval)

    def _judge_backlog(self, remaining: int, syncs: int, streamed: int) -> bool:
        """Does QEMU have real work queued (drain nonstop) or is it only spinning (pace)?

        ``ram.remaining`` counts only what QEMU's last bitmap sync found, and a QEMU blocked on
        our socket does not sync, so it understates the backlog. The telling sign is the sync
        count: a QEMU with little to send finishes passes and re-syncs, over and over; one that
        streamed bytes through a whole interval without finishing a single pass has a backlog.
        """
        if remaining > self.cfg.stream.precopy_backlog:
            return True
        if not self._backlog:
            return syncs == 0 and streamed > 0
        return syncs < 4

    # --- status --------------------------------------------------------------------------------

    def precopy_status(self) -> dict[str, Any]:
        ram = self.qemu_info.get("ram", {})
        return {
            "session": self.session_no, "pacing": self.pacing,
            "qemu_status": self.qemu_info.get("status"),
            "remaining_bytes": ram.get("remaining"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "pages_forwarded": self.pages_forwarded, "pages_dropped": self.pages_dropped,
            "zero_records": self.zero_records, "iterations": self.iterations,
            "stream_bytes": self.stream_bytes, "relayed_bytes": self.relayed_bytes,
        }

    @property
    def streaming(self) -> bool:
        """A session is up and QEMU's held-open migration flows into the shadow."""
        return (self.connected.is_set() and self._qsock is not None
                and self.qemu_info.get("status") == "active")

    def lag_snapshot(self) -> LagSnapshot:
        ram = self.qemu_info.get("ram", {})
        now = time.monotonic()
        dirty = float(ram.get("dirty-pages-rate") or 0) * PAGE_SIZE
        since = self._caught_up_at if self._caught_up_at is not None else self.ledger.created_at
        stale = max(0.0, now - since)
        if self.streaming:
            buffered = 0
            if self.link is not None and self.link.writer.transport is not None:
                buffered = self.link.writer.transport.get_write_buffer_size()
            lag = int(ram.get("remaining") or 0) + buffered
            self._last_lag = lag
            # As for the scan tracker: in sync when what QEMU found dirty is with the shadow
            # within a second (QEMU had no backlog that recently); a guest that keeps
            # dirtying memory always leaves some bytes in QEMU's queue.
            in_sync = stale <= 1.0
        else:
            # No live migration: what QEMU last reported is void.
            lag = self.ledger.unproven_lag(self._last_lag, dirty, stale)
            in_sync = False
        link_rate = self.ledger.link_rate or 100e6
        estimate = (lag + dirty * self.cfg.stream.precopy_interval) / link_rate + 0.02
        return LagSnapshot(
            lag_pages=lag // PAGE_SIZE, lag_bytes=lag, lag_seconds=stale, dirty_rate=dirty,
            throughput=self.ledger.wire_rate.tick(now), link_rate=self.ledger.link_rate,
            wire_ratio=1.0, switch_estimate=estimate, acked_epoch=self.ledger.acked_epoch,
            sent_epoch=self.ledger.sent_epoch, round_seconds=0.0, in_sync=in_sync)

    def publish(self) -> None:
        super().publish()                       # lag gauges, from lag_snapshot() above
        mt = self.metrics
        for state in ("idle", "backlog", "switching"):
            mt.precopy_pacing.labels(state).set(1 if self.pacing == state else 0)


def _encode(msg: Any) -> bytes:
    from ..wire.codec import encode
    return encode(msg)


class PrecopySwitcher(Switcher):
    """Switch for the precopy relay: QEMU sends the last delta and the device state itself.

    Live: the sink releases the withheld SWITCHOVER_ACK; QEMU stops the guest once its
    remaining dirty pages fit and sends them plus the device state. Stop: we stop the guest and
    QEMU completes at once. Either way the shadow loads the stream, the manifests (kept current
    on both sides as the stream passed) are compared by digest, and the commit follows as for
    any switch.
    """

    rep: PrecopyReplicator

    async def _hand_over_memory(self, report: SwitchReport, ctx: _Progress) -> None:
        rep = self.rep
        proc = self.driver.proc
        live = report.mode == "live"
        if live:
            dl = self._deadlines(report)
            # Once the ACK is out QEMU pauses the guest as soon as what is left fits its
            # downtime-limit: never longer than our target (stop mode pauses at once).
            await self.throttle.set_downtime_limit(self.target_downtime)
        await self._catch_up_disks(report)
        mark = proc.event_mark()
        rep.switching.set()                       # drain QEMU's socket continuously
        await checkpoint("source-before-pause")
        report.phase = "final-delta"
        if live:
            await self._step_nowait(m.SwitchRelease(report.switch_id))
        else:
            report.path = "stopped"
            ctx.wall_pause = time.time()
            ctx.t_pause = time.monotonic()
            await self.driver.pause()
        ctx.paused = True
        await checkpoint("source-paused")
        def records() -> int:
            return rep.pages_forwarded + rep.zero_records + rep.pages_dropped

        before = records()
        if live:
            stop = await self._converge(report, ctx, mark, dl)
            before = records()
            ctx.wall_pause = stop.qemu_wall or stop.wall
            ctx.t_pause = stop.monotonic
        if rep.disks is not None:
            # QEMU waits in pre-switchover with the guest stopped and its disks still active:
            # the last disk delta goes now, then QEMU may inactivate them and complete.
            await self._await_migration_status(report, "pre-switchover")
            await self._hand_over_disks(report)
            await proc.execute("migrate-continue", {"state": "pre-switchover"})
            report.phase = "final-delta"
        # The guest is paused: QEMU sends what is left, then the device state.
        remaining = int((await proc.query_migrate()).get("ram", {}).get("remaining") or 0)
        await self._expect_within(report, "loaded", self._drain_timeout(remaining))
        # QEMU on the source completes once the shadow's SHUT came back through the relay;
        # only then can a lost link no longer make it resume the guest by itself.
        report.phase = "source-complete"
        deadline = time.monotonic() + self.step_timeout
        while (info := await proc.query_migrate()).get("status") != "completed":
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise SwitchError(f"source QEMU's migration ended {info.get('status')!r}")
            await asyncio.sleep(0.002)
        report.final_delta_pages = records() - before
        report.final_delta_bytes = report.final_delta_pages * PAGE_SIZE
        # "Rounds" here are QEMU's dirty-bitmap syncs while the migration was held open.
        report.catchup_rounds = int(info.get("ram", {}).get("dirty-sync-count") or 0)
        report.device_state_bytes = max(0, rep.stream_bytes - rep.device_state_offset)
        await checkpoint("source-final-delta")
        report.phase = "verify"
        shipped = rep.ledger.regions[RAM_BACKEND_ID].shipped
        await self._step(report, m.SwitchVerify(report.switch_id, rep.session_no,
                                                (digest_hashes(shipped),)), "verify")
        report.shadow_verified = True
        await checkpoint("source-device-sent")

    async def _await_migration_status(self, report: SwitchReport, status: str) -> None:
        proc = self.driver.proc
        deadline = time.monotonic() + self.step_timeout
        while (info := await proc.query_migrate()).get("status") != status:
            if info.get("status") in ("failed", "cancelled", "completed", "none"):
                raise SwitchError(f"source QEMU's migration ended {info.get('status')!r} "
                                  f"before {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise SwitchError(f"source QEMU's migration did not reach {status} within "
                                  f"{self.step_timeout:g}s")
            await asyncio.sleep(0.001)

    async def _converge(self, report: SwitchReport, ctx: _Progress, mark: int,
                        dl: Deadlines) -> QmpEvent:
        """Live, after the ACK went out: wait for QEMU to pause the guest by itself; past the
        live deadline throttle the guest, past the stop deadline pause it ourselves (QEMU then
        sends the rest, as in stop mode). Returns the STOP event that began the downtime."""
        proc = self.driver.proc
        stop = await self._await_stop(report, mark, ctx.t_request + dl.live)
        if stop is None and await self._escalate(report, migrating=True):
            report.path = "throttled"
            stop = await self._await_stop(report, mark, ctx.t_request + dl.stop)
        if stop is None:
            report.path = "stopped"
            log.warning("switch %s: no convergence within %.1f s; pausing the guest to send "
                        "the rest", report.switch_id, time.monotonic() - ctx.t_request)
            await self.driver.pause()
            # The first STOP since the release, ours or QEMU's own (they may cross).
            stop = await proc.wait_event("STOP", timeout=self.step_timeout, after=mark)
        elif not report.path:
            report.path = "live"
        return stop

    async def _await_stop(self, report: SwitchReport, mark: int, until: float
                          ) -> QmpEvent | None:
        """The guest's STOP since ``mark``, or None once ``until`` (monotonic) passed."""
        proc = self.driver.proc
        while (left := until - time.monotonic()) > 0:
            with contextlib.suppress(QemuError):      # no STOP yet; the query tells the rest
                return await proc.wait_event("STOP", timeout=min(0.5, left), after=mark)
            info = await proc.query_migrate()
            if info.get("status") in ("failed", "cancelled", "none"):
                raise SwitchError(f"source QEMU's migration ended {info.get('status')!r}: "
                                  f"{info.get('error-desc', '')}")
            pct = int(info.get("cpu-throttle-percentage") or 0)
            report.throttle_percent = max(report.throttle_percent, pct)
            await self.throttle.ramp(pct)
            if not self.rep.connected.is_set():
                raise PeerError("link to the sink lost")
        return None

    async def _step_nowait(self, msg: object) -> None:
        link = self.rep.link
        if link is None:
            raise PeerError("link to the sink lost")
        await link.send(msg)

    async def _rollback(self, report: SwitchReport, paused: bool, reason: str) -> None:
        log.warning("switch %s failed at %s: %s; rolling back", report.switch_id, report.phase,
                    reason)
        rep = self.rep
        rep.switching.clear()
        link = rep.link
        if link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.send(m.SwitchAbort(report.switch_id, reason)), 2)
        proc = self.driver.proc
        with contextlib.suppress(QemuError):
            info = await proc.query_migrate()
            if info.get("status") not in ("completed", "failed", "cancelled", "none"):
                await proc.execute("migrate_cancel")   # also ends auto-converge's throttle
        # Wherever QEMU left it (stopped for the switch, postmigrate after completing), the
        # sink never committed: this host runs the domain.
        for _ in range(200):
            state = await proc.status()
            if state == "running":
                break
            if state not in ("finish-migrate",):
                with contextlib.suppress(QemuError):
                    await proc.cont(allow_postmigrate=True)
            await asyncio.sleep(0.01)
        log.info("switch %s: domain resumed here", report.switch_id)
        await self.throttle.undo()
        # The relayed stream is spent: start a new session (and migration) from scratch.
        if link is not None:
            await link.close()
