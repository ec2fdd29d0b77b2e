"""The ``qemu-precopy`` tracker: QEMU's own dirty log, through a migration held open.

The source QEMU migrates (precopy, ``return-path`` + ``switchover-ack``) into one end of a socket
pair passed to it with ``getfd``; the relay reads the other end and forwards the stream over the
replication link to the sink, which feeds a shadow QEMU and relays the return path back —
except the shadow's SWITCHOVER_ACK, which it withholds until "switch now". Precopy therefore
never completes on its own: QEMU keeps sending exactly the pages the guest dirties (KVM's dirty
log, or TCG's), and a switch costs only the last delta plus the device state, with no O(RAM)
scan in the downtime.

Pacing: with nothing to send, QEMU re-syncs its dirty bitmap in a busy loop and re-sends hot
pages (74.5% of a core for an idle guest, measured; ~1000 syncs/s with the socket's default
send buffer even when read only every 250 ms). The relay drains the socket continuously while
QEMU has a backlog; when idle it gives QEMU's end a 4 KiB send buffer and drains it once every
250 ms, so QEMU blocks after a few syncs (~20/s measured) and each drain carries one pass of
what the guest dirtied meanwhile, a page written many times travelling once.

Resume: after a link loss both migrations fail and the source VM keeps running. The next session
starts a new migration; its bulk pass would resend all RAM, so the relay drops every PAGE record
whose content the shadow already holds (the sink's manifest, plus the last content forwarded for
pages still in flight), repairing QEMU's CONTINUE shorthand on the next kept record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import xxhash

from ..aio import wait_for
from ..config import PAGE_SIZE
from ..errors import DomainError, PeerError, ProtocolError, QemuError
from ..link import Link
from ..wire import messages as m
from ..wire.codec import encode
from ..wire.pages import ZERO_HASH, Compressor
from ..vmm.migration_editor import PrecopyEditor
from ..vmm.migration_format import PageKind, PageRecord, RamEos
from ..vmm.spec import RAM_BACKEND_ID
from . import precopy_switch
from .converge import Throttle
from .ledger import LagSnapshot

if TYPE_CHECKING:
    from .sender import SourceReplicator
    from .switch import Switcher, SwitchProgress, SwitchReport

log = logging.getLogger(__name__)

_hash = xxhash.xxh3_64_intdigest
RECV_CHUNK = 1 << 20


#: RAM rounds ended within one read of QEMU's socket that show a backlog is over. QEMU ends a
#: round when its dirty bitmap is exhausted or after 50 ms (checked every 64 pages), so while
#: it has a real backlog a round carries at least 64 pages, and a read (at most the socket's
#: send buffer, ~200 KiB) holds few round ends; a QEMU that has caught up ends one per sync.
SPIN_ROUNDS = 8

#: Migration states a held-open precopy reaches only once the VM is stopped.
_FINISHING = ("pre-switchover", "device", "completed")


class PrecopyStream:
    """Relays a held-open QEMU precopy migration to the sink (see the module docstring)."""

    kind = "qemu-precopy"

    def __init__(self, rep: SourceReplicator, throttle: Throttle):
        self.rep = rep
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
        #: How idle drains ended: QEMU's socket empty, two RAM rounds read, or the burst's
        #: time up (a backlog).
        self.drains = {"empty": 0, "rounds": 0, "burst": 0}
        #: Backlogs entered (the first pass of each session included), and their time in all.
        self.backlogs = 0
        self.backlog_seconds = 0.0
        self._backlog_since: float | None = None
        self._backlog = True
        # When QEMU last had nothing queued for the shadow. Kept across sessions: a new
        # session proves nothing until it caught up again.
        self._caught_up_at: float | None = None
        self._last_lag = 0
        self._qsock: socket.socket | None = None
        # Our hold on QEMU's end of the socket pair: its send buffer is small while idle (QEMU
        # blocks instead of spinning) and the kernel's default while there is a backlog.
        self._qpeer: socket.socket | None = None
        self._qpeer_default = 0
        self._qpeer_small = False
        self._editor: PrecopyEditor | None = None
        self._buf = bytearray(RECV_CHUNK)
        # What leaves the relay is compressed like page batches (a chunk that does not shrink,
        # a guest's random or encrypted pages, travels as it is).
        self._compressor = Compressor(rep.cfg.stream.compression, rep.cfg.stream.zstd_level)
        #: QEMU's guest throttling, armed with each held-open migration (the switch's too).
        self.throttle = throttle

    # --- page bookkeeping (runs inside the editor, per record) ---------------------------------

    @property
    def _ram_block(self) -> str:
        # QEMU's name for the guest RAM block: "ram0" for a VM replicator launched, libvirt's
        # "pc.ram" for its domains. The region is called "ram0" on the wire either way.
        return getattr(self.rep.driver, "ram_block", RAM_BACKEND_ID)

    def _drop_page(self, block: str, index: int, data: memoryview | bytes | None) -> bool:
        if block != self._ram_block:
            return False
        shipped = self.rep.ledger.regions[RAM_BACKEND_ID].shipped
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

    async def start(self, link: Link) -> list[asyncio.Task]:
        """Ask the sink for a shadow listening for the stream, then start the migration."""
        rep = self.rep
        self.session_no += 1
        sid = self.session_no
        self.switching.clear()
        self.qemu_info = {}                       # figures of the previous migration are void
        self.pacing = "backlog"                   # the first pass
        self.backlogs += 1
        self._backlog_since = time.monotonic()
        self._backlog = True
        await link.send(m.PrecopyStart(sid))
        ready = await rep.next_response(m.PrecopyReady, 60)
        if ready.session != sid:
            raise ProtocolError("sink is ready for another precopy session")
        await self._start_migration()
        log.info("relaying QEMU's precopy migration of %s to %s (session %d)",
                 rep.cfg.domain.name, rep.sink_node, sid)
        return [asyncio.create_task(self._pump(link, sid), name="precopy-pump"),
                asyncio.create_task(self._poll_qemu(), name="precopy-poll")]

    async def stop(self) -> None:
        self._end_backlog(time.monotonic())
        await self._stop_migration()

    def _end_backlog(self, now: float) -> None:
        """Add the backlog under way (if any) to ``backlog_seconds``."""
        if self.pacing == "backlog" and self._backlog_since is not None:
            self.backlog_seconds += now - self._backlog_since
        self._backlog_since = None

    async def session_ended(self) -> None:
        pass

    async def _start_migration(self) -> None:
        await self._wait_running()
        # QEMU writes into one end of a socket pair, passed to it as a descriptor; the relay
        # reads the other, and keeps a handle on QEMU's end to size its send buffer (see
        # _pace_qemu).
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._qpeer_default = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            self._qpeer_small = False
            proc = self.rep.driver.proc
            # auto-converge can only be switched on before a migration starts.
            await self.throttle.arm()
            name = await proc.pass_fd(theirs.fileno(), "precopy")
            try:
                # With disks, QEMU waits in pre-switchover (guest stopped, disks still active)
                # so the switch can send the last disk delta before QEMU inactivates them.
                await proc.start_precopy(f"fd:{name}",
                                         pause_before_switchover=self.rep.disks is not None)
            except Exception:
                with contextlib.suppress(Exception):
                    await proc.execute("closefd", {"fdname": name})   # QEMU never took it
                raise
        except BaseException:
            ours.close()
            theirs.close()
            raise
        ours.setblocking(False)
        self._qsock = ours
        self._qpeer = theirs
        self._editor = PrecopyEditor(self._drop_page)

    def _pace_qemu(self, idle: bool) -> None:
        """Idle, between the relay's drains: give QEMU's end a small send buffer
        (``stream.precopy_send_buffer``), so its migration loop blocks after a few dirty syncs
        instead of re-syncing about a thousand times a second (under KVM each sync also
        write-protects guest RAM again). Otherwise (a drain, a backlog, the switch) the
        kernel's default: bulk reads, fewer frames. Growing the buffer wakes a blocked QEMU."""
        small = self.rep.cfg.stream.precopy_send_buffer
        if self._qpeer is None or not small or self._qpeer_small == idle:
            return
        # The kernel doubles what is set (bookkeeping overhead); the default was read as is.
        self._qpeer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                               small if idle else self._qpeer_default // 2)
        self._qpeer_small = idle

    def begin_switch(self) -> None:
        """The switch drains QEMU's socket to the end: full buffer, and QEMU's own close of its
        end is then the relay's end of stream."""
        self._pace_qemu(False)
        self.switching.set()
        self._release_qemu_end()

    def _release_qemu_end(self) -> None:
        if self._qpeer is not None:
            self._qpeer.close()
            self._qpeer = None

    async def _wait_running(self) -> None:
        """A held-open migration of a paused VM completes at once (no switchover ack is
        needed when it is stopped): start one only while the VM runs."""
        proc = self.rep.driver.proc
        told = False
        while (state := await proc.status()) != "running":
            if not told:
                log.info("domain %s is %s: the precopy relay waits until it runs", proc.name,
                         state)
                told = True
            await asyncio.sleep(0.5)

    async def _stop_migration(self) -> None:
        """End of a session: close QEMU's stream; an unfinished migration fails, the VM runs on."""
        self._release_qemu_end()
        if self._qsock is not None:
            self._qsock.close()
            self._qsock = None
        proc = self.rep.driver.proc
        with contextlib.suppress(QemuError, asyncio.TimeoutError):
            info = await proc.query_migrate()
            if info.get("status") not in ("completed", "failed", "cancelled", "none", None):
                await proc.execute("migrate_cancel")
        await self.throttle.undo()           # `replicator pause` leaves QEMU as it was
        settle = getattr(self.rep.driver, "after_interference", None)
        if settle is not None:
            with contextlib.suppress(QemuError, DomainError):
                await settle()

    # --- the stream ------------------------------------------------------------------------------

    def _parse(self, chunk: memoryview) -> bytes:
        """Run a chunk of QEMU's stream through the editor (dropping pages the shadow holds)
        and count what it carried; returns what is to be relayed."""
        assert self._editor is not None
        out, events = self._editor.feed(chunk)
        for ev in events:
            if isinstance(ev, PageRecord):
                if ev.block != self._ram_block:
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
        return b"".join(out)

    async def _relay(self, link: Link, sid: int, raw_len: int, data: bytes) -> None:
        """Send what ``_parse`` kept of ``raw_len`` bytes of QEMU's stream to the sink."""
        if data:
            t0 = time.monotonic()
            codec, payload = self._compressor.pack(data)
            n = await link.send_frame(encode(m.PrecopyData(sid, codec, len(data), payload)))
            self.relayed_bytes += len(data)
            self.rep.ledger.record_sent(raw_len, n, time.monotonic() - t0)
            mt = self.rep.metrics
            mt.sent_bytes.labels("raw").inc(raw_len)
            mt.sent_bytes.labels("wire").inc(n)

    async def _pump(self, link: Link, sid: int) -> None:
        """QEMU -> sink, paced.

        Backlog (the first pass, a guest dirtying faster than one drain a tick carries): read
        QEMU's socket nonstop. Idle: every ``precopy_interval`` drain what QEMU queued since the
        last tick, then leave it blocked on its small send buffer. Each drain lets QEMU finish
        the round it is in, sync its dirty bitmap and send what the guest dirtied since, so a
        page written many times within a tick travels once; the drain ends after a second RAM
        round (or when the socket is empty), and QEMU blocks again after a few syncs instead of
        spinning through them. A drain still busy after ``precopy_burst`` means QEMU has more
        than a tick's worth: backlog, until QEMU spins again (the poll).
        """
        s = self.rep.cfg.stream
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
                await self._relay(link, sid, n, self._parse(memoryview(self._buf)[:n]))
                continue
            if self._backlog or not self.qemu_info:
                if self.pacing != "backlog":
                    self.backlogs += 1
                    self._backlog_since = time.monotonic()
                self.pacing = "backlog"
                self._pace_qemu(False)
                n = await loop.sock_recv_into(sock, self._buf)
                if n == 0:
                    break
                rounds = self.iterations
                data = self._parse(memoryview(self._buf)[:n])
                if self.iterations - rounds >= SPIN_ROUNDS and self.qemu_info:
                    # QEMU has caught up and only re-syncs, a round of a few pages per sync:
                    # pace it now. The next poll would say so too, but by then QEMU has spun
                    # through thousands of syncs.
                    self._backlog = False
                    self._pace_qemu(True)
                await self._relay(link, sid, n, data)
                continue
            t0 = time.monotonic()
            self._end_backlog(t0)
            self.pacing = "idle"
            passes = self.iterations
            ended = ""
            # QEMU's first round carries what the guest wrote since the last tick: it goes with
            # the full buffer. From its end on the small one again, so a QEMU with little left
            # re-syncs only a few times before it blocks (see _pace_qemu).
            self._pace_qemu(False)
            while time.monotonic() - t0 < s.precopy_burst:
                try:
                    n = sock.recv_into(self._buf)
                except BlockingIOError:
                    ended = "empty"
                    break
                if n == 0:
                    return
                data = self._parse(memoryview(self._buf)[:n])
                if self.iterations > passes:
                    # At once, not after the send: until then QEMU re-syncs freely.
                    self._pace_qemu(True)
                await self._relay(link, sid, n, data)
                if self.iterations - passes >= 2:
                    # Two RAM rounds ended (QEMU ends one at least every ~50 ms, so not
                    # necessarily a whole pass: what is left goes next tick, and
                    # ram.remaining, the lag in bytes, shows it). Read on and QEMU mostly
                    # spins (a re-sync per few pages), which never leaves the socket empty.
                    ended = "rounds"
                    break
                await asyncio.sleep(0)             # the loop's other work goes on meanwhile
            # Small again: what QEMU queued meanwhile waits in the socket for the next tick.
            self._pace_qemu(True)
            self.drains[ended or "burst"] += 1
            if not ended:
                self._backlog = True
                continue
            # QEMU had nothing more, or finished its rounds: treated as caught up (lag in
            # seconds); what a round left behind is in ram.remaining (lag in bytes).
            self._caught_up_at = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self.switching.wait(), s.precopy_interval)

    async def on_message(self, msg: Any) -> bool:
        if isinstance(msg, m.PrecopyReturn):
            # The shadow's return path, in order, back into the source QEMU's socket.
            if msg.session == self.session_no and self._qsock is not None:
                await asyncio.get_running_loop().sock_sendall(self._qsock, msg.data)
            return True
        return False

    async def _poll_qemu(self) -> None:
        proc = self.rep.driver.proc
        last_syncs = 0
        while True:
            with contextlib.suppress(QemuError, asyncio.TimeoutError):
                self.qemu_info = await proc.query_migrate()
                status = self.qemu_info.get("status")
                if status in ("failed", "cancelled"):
                    raise PeerError(f"QEMU's precopy migration {status}: "
                                    f"{self.qemu_info.get('error-desc', '')}")
                if status in _FINISHING and not self.switching.is_set():
                    # Someone paused the VM (virt-manager's Pause, a guest that stopped on an
                    # I/O error): a stopped VM needs no switchover ack, so QEMU went on to
                    # finish the migration. End this session (cancelling it gives the VM back
                    # paused, so its user can resume it); the next waits until it runs.
                    raise PeerError(f"the domain was paused outside replicator (QEMU's held-"
                                    f"open migration went on to {status!r}); replication "
                                    "continues once it runs again")
                ram = self.qemu_info.get("ram", {})
                syncs = int(ram.get("dirty-sync-count") or 0)
                self._backlog = self._judge_backlog(int(ram.get("remaining") or 0),
                                                    syncs - last_syncs)
                last_syncs = syncs
            await asyncio.sleep(self.rep.cfg.stream.precopy_interval)

    def _judge_backlog(self, remaining: int, syncs: int) -> bool:
        """Does QEMU have real work queued (drain nonstop) or is it only re-syncing (pace)?

        ``ram.remaining`` counts what QEMU's last dirty sync found and has not sent yet: above
        ``precopy_backlog`` it is a backlog. Below, while idle, the pump's drains decide (one
        that does not end within ``precopy_burst`` turns to backlog). A backlog is over once
        QEMU finishes passes again, several per interval: it has caught up and only re-syncs.
        """
        if remaining > self.rep.cfg.stream.precopy_backlog:
            return True
        if not self._backlog:
            return False
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
            "drains": dict(self.drains), "backlogs": self.backlogs,
            "backlog_seconds": round(self.backlog_seconds, 3),
        }

    @property
    def streaming(self) -> bool:
        """A session is up and QEMU's held-open migration flows into the shadow."""
        return (self.rep.connected.is_set() and self._qsock is not None
                and self.qemu_info.get("status") == "active")

    def lag_snapshot(self) -> LagSnapshot:
        ledger, link = self.rep.ledger, self.rep.link
        ram = self.qemu_info.get("ram", {})
        now = time.monotonic()
        dirty = float(ram.get("dirty-pages-rate") or 0) * PAGE_SIZE
        since = self._caught_up_at if self._caught_up_at is not None else ledger.created_at
        stale = max(0.0, now - since)
        if self.streaming:
            buffered = 0
            if link is not None and link.writer.transport is not None:
                buffered = link.writer.transport.get_write_buffer_size()
            lag = int(ram.get("remaining") or 0) + buffered
            self._last_lag = lag
            # As for the scan tracker: in sync when what QEMU found dirty is with the shadow
            # within a second (QEMU had no backlog that recently); a guest that keeps
            # dirtying memory always leaves some bytes in QEMU's queue.
            in_sync = stale <= 1.0
        else:
            # No live migration: what QEMU last reported is void.
            lag = ledger.unproven_lag(self._last_lag, dirty, stale)
            in_sync = False
        link_rate = ledger.link_rate or 100e6
        estimate = (lag + dirty * self.rep.cfg.stream.precopy_interval) / link_rate + 0.02
        return LagSnapshot(
            lag_pages=lag // PAGE_SIZE, lag_bytes=lag, lag_seconds=stale, dirty_rate=dirty,
            throughput=ledger.wire_rate.tick(now), link_rate=ledger.link_rate,
            wire_ratio=1.0, switch_estimate=estimate, acked_epoch=ledger.acked_epoch,
            sent_epoch=ledger.sent_epoch, round_seconds=0.0, in_sync=in_sync)

    def publish(self) -> None:
        mt = self.rep.metrics
        for state in ("idle", "backlog", "switching"):
            mt.precopy_pacing.labels(state).set(1 if self.pacing == state else 0)

    # --- switch (precopy_switch) ---------------------------------------------------------------

    async def hand_over(self, sw: Switcher, report: SwitchReport,
                        progress: SwitchProgress) -> None:
        await precopy_switch.hand_over(self, sw, report, progress)

    async def roll_back(self, sw: Switcher, report: SwitchReport, paused: bool,
                        reason: str) -> None:
        await precopy_switch.roll_back(self, sw, report, reason)

    def switch_ended(self) -> None:
        pass

    async def close(self) -> None:
        pass
