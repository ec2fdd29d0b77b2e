"""The ``scan`` tracker's stream: rounds of changed pages, sent as batches, acknowledged by epoch.

On each session two tasks run next to the replicator's receiver:

* the **scanner** asks the tracker for a round at an adaptive interval (sooner when the guest is
  busy) and queues it; the queue holds one round, so a slow link slows scanning (backpressure);
* the **sender** turns a round into page batches — reading each page at send time so a page
  dirtied twice goes once with its newest content — and ends it with ``EpochEnd``; it keeps at
  most ``max_inflight_epochs`` unacknowledged.

:meth:`ScanStream.sync` runs one round now and waits until the sink made it durable; the switch
uses it: catch up while the guest runs, pause, send the last round, verify, device state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..aio import finish, wait_for
from ..config import PAGE_SIZE
from ..errors import PeerError
from ..faults import checkpoint
from ..link import Link
from ..pagefile import read_pages
from ..wire import messages as m
from ..wire.codec import encode
from ..wire.pages import Compressor, encode_batch, hash_pages
from .ledger import LagSnapshot
from .tracker import DirtyTracker, Round

if TYPE_CHECKING:
    from .sender import SourceReplicator
    from .switch import Switcher, SwitchProgress, SwitchReport

log = logging.getLogger(__name__)

DEVICE_CHUNK = 1 << 20
CATCHUP_MAX_ROUNDS = 20


class ScanStream:
    """Streams a :class:`DirtyTracker`'s rounds (see the module docstring)."""

    kind = "scan"

    def __init__(self, rep: SourceReplicator, tracker: DirtyTracker):
        self.rep = rep
        self.tracker = tracker
        cfg = rep.cfg
        self._compressor = Compressor(cfg.stream.compression, cfg.stream.zstd_level)
        self._fds = {r.name: os.open(r.path, os.O_RDONLY | os.O_CLOEXEC) for r in rep.regions}
        self._buf = bytearray(cfg.stream.batch_pages * PAGE_SIZE)
        self._queue: asyncio.Queue[tuple[int, Round]] = asyncio.Queue(maxsize=1)
        self._round_lock = asyncio.Lock()
        self._acked = asyncio.Condition()
        self._next_epoch = 1
        self._scanning = asyncio.Event()
        self._scanning.set()
        self._drained = asyncio.Event()          # no round queued or being sent
        self._drained.set()
        self._last_round: Round | None = None

    # --- session -------------------------------------------------------------------------------

    async def start(self, link: Link) -> list[asyncio.Task]:
        ledger = self.rep.ledger
        self._next_epoch = ledger.acked_epoch + 1
        log.info("replicating %s to %s (sink %s, acked epoch %d)", self.rep.cfg.domain.name,
                 link.peer, self.rep.sink_node, ledger.acked_epoch)
        return [asyncio.create_task(self._scan_loop(), name="scanner"),
                asyncio.create_task(self._send_loop(link), name="sender")]

    async def stop(self) -> None:
        pass

    async def session_ended(self) -> None:
        # Whatever was queued or in flight is re-derived from the sink's manifest next time.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._drained.set()
        async with self._acked:
            self._acked.notify_all()

    async def on_message(self, msg: Any) -> bool:
        if isinstance(msg, m.Ack):
            async with self._acked:
                self.rep.ledger.acked(msg.epoch)
                self._acked.notify_all()
            self.rep.metrics.acked_epoch.set(msg.epoch)
            return True
        return False

    # --- scanning ------------------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        s = self.rep.cfg.stream
        interval = s.scan_interval_min
        while True:
            await asyncio.sleep(interval)
            await self._scanning.wait()
            # A new round while the last one's pages are still going out would only re-read
            # RAM to find pages already queued: wait until the sender caught up.
            await self._drained.wait()
            _, rnd = await self._round()
            # Busy guest: scan again soon; quiet guest: back off (scans cost CPU).
            interval = s.scan_interval_min if rnd.pages else min(interval * 1.5,
                                                                 s.scan_interval_max)
            # A Linux guest always dirties a few pages, so the back-off above rarely engages:
            # rest long enough that scanning uses at most scan_max_duty of a core.
            interval = max(interval, rnd.duration * (1 / s.scan_max_duty - 1))

    async def _round(self) -> tuple[int, Round]:
        async with self._round_lock:
            ledger = self.rep.ledger
            rnd = await self.tracker.round(ledger)
            epoch = self._next_epoch
            self._next_epoch += 1
            prev = self._last_round
            interval = (rnd.started - prev.started) if prev else rnd.duration
            ledger.add_round(epoch, rnd.started, rnd.duration, rnd.dirty, interval)
            self._last_round = rnd
            self.rep.metrics.round_seconds.observe(rnd.duration)
            if rnd.pages:
                self._drained.clear()
            await self._queue.put((epoch, rnd))
            return epoch, rnd

    async def pause_scanning(self) -> None:
        """Stop the periodic scanner (rounds still run through :meth:`sync`) and wait until a
        round it already started is queued, so that scan is not paid while the VM is paused."""
        self._scanning.clear()
        async with self._round_lock:
            pass

    def resume_scanning(self) -> None:
        self._scanning.set()

    async def sync(self, timeout: float | None = None) -> Round:
        """Run one round now and wait until the sink acknowledged it (and everything before)."""
        rep = self.rep
        if not rep.connected.is_set():
            raise PeerError(f"not connected to the sink ({rep.last_error or 'connecting'})")
        epoch, rnd = await self._round()
        await self.wait_acked(epoch, timeout)
        return rnd

    async def wait_acked(self, epoch: int, timeout: float | None = None) -> None:
        async def waiter() -> None:
            async with self._acked:
                while self.rep.ledger.acked_epoch < epoch:
                    if not self.rep.connected.is_set():
                        raise PeerError("link to the sink lost while waiting for an ack")
                    await self._acked.wait()
        await wait_for(waiter(), timeout)

    async def verify(self, timeout: float = 30.0) -> bool:
        """Full-manifest comparison: does the sink hold exactly what the guest RAM holds now?

        Runs a round (so the sink gets anything still different), then compares the digest of
        the current page hashes with the digest of the sink's manifest.
        """
        rnd = await self.sync(timeout)
        if rnd.pages:
            rnd = await self.sync(timeout)
        nonce = int(time.monotonic() * 1e6)
        reply = await self.rep.request(m.VerifyRequest(nonce), m.VerifyReply, timeout)
        ours = tuple(rnd.digests[r.name] for r in self.rep.regions)
        return rnd.pages == 0 and reply.digests == ours

    # --- sending -------------------------------------------------------------------------------

    def _prepare(self, region: str, idx: np.ndarray, epoch: int) -> tuple[bytes, Any] | None:
        """Read, hash, drop unchanged pages, encode. Runs in a worker thread."""
        rl = self.rep.ledger.regions[region]
        mv = read_pages(self._fds[region], idx, self._buf)
        hashes = hash_pages(mv, len(idx))
        changed = hashes != rl.shipped[idx]
        if not changed.any():
            return None
        if not changed.all():
            arr = np.frombuffer(self._buf, dtype=np.uint8,
                                count=len(idx) * PAGE_SIZE).reshape(len(idx), PAGE_SIZE)
            sel = np.flatnonzero(changed)
            arr[:len(sel)] = arr[sel]         # compact in place, order preserved
            idx, hashes = idx[sel], hashes[sel]
            mv = memoryview(self._buf)[:len(idx) * PAGE_SIZE]
        enc = encode_batch(epoch, region, idx, mv, hashes, self._compressor)
        rl.shipped[idx] = hashes
        return encode(enc.message), enc

    async def _send_loop(self, link: Link) -> None:
        ledger = self.rep.ledger
        batch = self.rep.cfg.stream.batch_pages
        max_inflight = self.rep.cfg.stream.max_inflight_epochs
        while True:
            epoch, rnd = await self._queue.get()
            # One batch ahead: the next is read, hashed and compressed in a thread while this
            # one is encrypted and sent on the loop (both mostly outside the GIL).
            pending: asyncio.Future | None = None
            try:
                for region, idx in rnd.dirty.items():
                    for i in range(0, len(idx), batch):
                        sub = ledger.take_pending(region, idx[i:i + batch])
                        if not len(sub):
                            continue
                        # The previous batch's thread is done before the next one starts
                        # (they share the read buffer); its frame goes out meanwhile.
                        prev = await asyncio.shield(pending) if pending is not None else None
                        pending = asyncio.ensure_future(
                            asyncio.to_thread(self._prepare, region, sub, epoch))
                        await self._send_prepared(link, prev)
                if pending is not None:
                    prev, pending = await asyncio.shield(pending), None
                    await self._send_prepared(link, prev)
            finally:
                if pending is not None:
                    # The thread fills the read buffer and the ledger: let it end first
                    # (shielded above, so a cancel did not cut it loose).
                    await finish(pending)
            await link.send(m.EpochEnd(epoch))
            ledger.epoch_sent(epoch)
            if self._queue.empty():
                self._drained.set()
            async with self._acked:
                while ledger.unacked_epochs() >= max_inflight:
                    await self._acked.wait()

    async def _send_prepared(self, link: Link, out: tuple[bytes, Any] | None) -> None:
        if out is None:
            return
        frame, enc = out
        t0 = time.monotonic()
        await link.send_frame(frame)
        self._account(enc, len(frame), time.monotonic() - t0)

    def _account(self, enc: Any, wire: int, busy: float) -> None:
        self.rep.ledger.record_sent(enc.raw_bytes, wire, busy)
        mt = self.rep.metrics
        mt.sent_bytes.labels("raw").inc(enc.raw_bytes)
        mt.sent_bytes.labels("wire").inc(wire)
        mt.pages_sent.labels("zero").inc(enc.zero_pages)
        kind = "raw" if enc.message.codec == "none" else "compressed"
        mt.pages_sent.labels(kind).inc(enc.data_pages)

    # --- status --------------------------------------------------------------------------------

    def lag_snapshot(self) -> LagSnapshot:
        """Nothing is "in sync" without a live session."""
        return self.rep.ledger.snapshot(streaming=self.rep.connected.is_set())

    def publish(self) -> None:
        pass

    # --- switch --------------------------------------------------------------------------------

    async def hand_over(self, sw: Switcher, report: SwitchReport,
                        progress: SwitchProgress) -> None:
        """Catch up (live), pause, final delta, verify, disks, device state."""
        await sw.driver.prepare_switch()
        await self.pause_scanning()
        report.path = "stopped"
        if report.mode == "live":
            await self._catch_up(sw, report, progress)
        await sw.catch_up_disks(report)
        await checkpoint("source-before-pause")
        report.phase = "pause"
        await sw.pause_guest(progress)
        await checkpoint("source-paused")
        report.phase = "final-delta"
        # Paused, the guest dirties nothing more: what is left takes its time on the link.
        rnd = await self.sync(sw.drain_timeout(self.lag_snapshot().lag_bytes))
        report.final_delta_pages = rnd.pages
        report.final_delta_bytes = rnd.pages * PAGE_SIZE
        await checkpoint("source-final-delta")
        report.phase = "verify"
        digests = tuple(rnd.digests[r.name] for r in self.rep.regions)
        await sw.step(report, m.SwitchVerify(report.switch_id, self.rep.ledger.acked_epoch,
                                             digests), "verify")
        report.shadow_verified = True
        await sw.hand_over_disks(report)
        report.phase = "device-state"
        data = await sw.driver.save_device_state()
        report.device_state_bytes = len(data)
        link = self.rep.link
        if link is None:
            raise PeerError("link lost before the device state was sent")
        for off in range(0, max(len(data), 1), DEVICE_CHUNK):
            chunk = data[off:off + DEVICE_CHUNK]
            await link.send(m.DeviceState(report.switch_id, off, chunk,
                                          off + DEVICE_CHUNK >= len(data)))
        await sw.expect(report, "device")
        await checkpoint("source-device-sent")

    async def _catch_up(self, sw: Switcher, report: SwitchReport,
                        progress: SwitchProgress) -> None:
        """Live: rounds while the guest runs, until the predicted final delta fits the target
        downtime; past the live deadline throttle the guest, past the stop deadline give up
        (the pause then sends the rest)."""
        report.phase = "catch-up"
        dl = sw.deadlines_for(report)
        throttled = False
        for _ in range(CATCHUP_MAX_ROUNDS):
            left = progress.t_request + (dl.stop if throttled else dl.live) - time.monotonic()
            if left <= 0:
                if throttled or not await sw.escalate(report, migrating=False):
                    log.warning("switch %s: no convergence within %.1f s; stop mode",
                                report.switch_id, time.monotonic() - progress.t_request)
                    break
                throttled = True
                continue
            try:
                rnd = await self.sync(left)
            except asyncio.TimeoutError:
                continue                  # the deadline passed during this round
            report.catchup_rounds += 1
            snap = self.rep.ledger.snapshot()
            # The next round finds what the guest dirtied since this one scanned, which a
            # round behind a backlog (its pages counted once, sent late) understates.
            since = time.monotonic() - rnd.started
            behind = max(rnd.pages * PAGE_SIZE, snap.dirty_rate * since)
            predicted = snap.round_seconds + behind * snap.wire_ratio / sw.link_rate()
            log.info("switch %s: catch-up round %d found %d pages; predicted final "
                     "delta %.1f ms", report.switch_id, report.catchup_rounds,
                     rnd.pages, predicted * 1000)
            if predicted <= sw.target_downtime + snap.round_seconds:
                report.path = "throttled" if throttled else "live"
                break

    async def roll_back(self, sw: Switcher, report: SwitchReport, paused: bool,
                        reason: str) -> None:
        await sw.abort(report, reason)
        if paused:
            await sw.driver.resume()
            log.info("switch %s: domain resumed here", report.switch_id)
        if sw.throttle is not None:
            await sw.throttle.undo()

    def switch_ended(self) -> None:
        self.resume_scanning()

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        await self.tracker.close()
