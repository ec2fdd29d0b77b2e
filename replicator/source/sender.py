"""The source side of the stream: connect, learn what the sink has, then stream rounds.

One :class:`SourceReplicator` per domain. It keeps a connection to the sink (reconnecting with
backoff), and on each connection runs three tasks:

* the **scanner** asks the tracker for a round at an adaptive interval (sooner when the guest is
  busy) and queues it; the queue holds one round, so a slow link slows scanning (backpressure);
* the **sender** turns a round into page batches — reading each page at send time so a page
  dirtied twice goes once with its newest content — and ends it with ``EpochEnd``; it keeps at
  most ``max_inflight_epochs`` unacknowledged;
* the **receiver** takes acknowledgements and answers, and notices a silent peer.

:meth:`sync` runs one round now and waits until the sink made it durable; the switch uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import PAGE_SIZE, Config, parse_address
from ..errors import PeerError, PeerRejected, ProtocolError, ReplicatorError
from ..identity import authenticate_to_server, identity_for, pinned_peer
from ..link import Link, RateLimiter
from ..metrics import Metrics
from ..pagefile import read_pages
from ..wire import messages as m
from ..wire.codec import encode
from ..wire.pages import Compressor, encode_batch, hash_pages
from .driver import DomainDriver, Region
from .ledger import Ledger
from .tracker import DirtyTracker, Round

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0


class SourceReplicator:
    """Continuously replicate a domain's RAM to the sink."""

    def __init__(self, cfg: Config, driver: DomainDriver, regions: list[Region],
                 tracker: DirtyTracker, metrics: Metrics | None = None,
                 connect: Callable[[], Any] | None = None, disks: Any = None):
        self.cfg = cfg
        #: The domain's disks (:class:`~replicator.source.disks.DiskReplicator`), or None.
        self.disks = disks
        self.driver = driver
        self.regions = regions
        self.tracker = tracker
        self.metrics = metrics or Metrics("source", cfg.domain.name)
        self.ledger = Ledger.for_regions(regions)
        self.limiter = RateLimiter(cfg.stream.bandwidth_limit)
        self.link: Link | None = None
        self.connected = asyncio.Event()
        self.sink_node = ""
        self.sink_handed_over = False
        #: The placement this node runs the domain at (sent in Hello), and the sink's view of
        #: itself from its Welcome: generation, running since, started by hand.
        self.generation = 0
        self.sink_placement: tuple[int, float, bool] = (0, 0.0, False)
        self.last_error = ""
        self._connect = connect or self._tcp_connect
        self.identity = identity_for(cfg)
        self._pinned = pinned_peer(cfg) if self.identity is not None else ""
        self._ssl = self.identity.client_context() if self.identity is not None else None
        self._compressor = Compressor(cfg.stream.compression, cfg.stream.zstd_level)
        self._fds = {r.name: os.open(r.path, os.O_RDONLY | os.O_CLOEXEC) for r in regions}
        self._buf = bytearray(cfg.stream.batch_pages * PAGE_SIZE)
        self._queue: asyncio.Queue[tuple[int, Round]] = asyncio.Queue(maxsize=1)
        self._round_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._acked = asyncio.Condition()
        self._next_epoch = 1
        # Answers to requests (switch steps, verify): bounded, a peer cannot flood us.
        self._responses: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        self._scanning = asyncio.Event()
        self._scanning.set()
        self._drained = asyncio.Event()          # no round queued or being sent
        self._drained.set()
        self._session_tasks: list[asyncio.Task] = []
        self._last_round: Round | None = None
        self._ping_sent: dict[int, float] = {}
        self.rtt = 0.0
        self.sessions = 0
        self._urgent = False
        self._retry_now = asyncio.Event()
        self.metrics.ram_bytes.set(sum(r.size for r in regions))

    # --- connection management -----------------------------------------------------------------

    async def _tcp_connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = parse_address(self.cfg.peer.address, key="peer.address")
        if self.identity is None:
            return await asyncio.open_connection(host, port, limit=1 << 20)
        return await asyncio.wait_for(asyncio.open_connection(
            host, port, limit=1 << 20, ssl=self._ssl, server_hostname=host), self.cfg.peer.timeout)

    async def run(self) -> None:
        """Keep replicating until cancelled; reconnects after any link or peer failure."""
        base = self.cfg.stream.reconnect_delay
        delay = base
        first = True
        while True:
            try:
                reader, writer = await self._connect()
            except (OSError, asyncio.TimeoutError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                self.last_error = f"cannot reach sink at {self.cfg.peer.address}: {reason}"
                log.warning("%s; retrying in %.1fs", self.last_error, delay)
                await self._wait_retry(delay)
                delay = self._backoff(delay)
                continue
            if not first:
                self.metrics.reconnects.inc()
            first = False
            link = Link(reader, writer, self.cfg.stream.max_frame_bytes, self.limiter)
            sessions = self.sessions
            wait = 0.0
            try:
                await self._session(link)
            except PeerRejected as exc:
                self.last_error = str(exc)
                log.error("sink refused us: %s", exc)
                wait = max(delay, 5.0)
            except (ReplicatorError, asyncio.TimeoutError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("replication link: %s; reconnecting in %.1fs", self.last_error, delay)
                wait = delay
            except Exception as exc:
                # A bug must not end replication for good: log it loudly, then start over.
                self.last_error = f"internal error: {exc!r}"
                log.exception("replication session failed unexpectedly; reconnecting")
                wait = delay
            finally:
                # End the session *before* waiting: whoever waits on it (a switch) must learn
                # at once that the link is gone.
                await self._end_session(link)
            # A session that got through the handshake was a working link: back-off restarts.
            delay = base if self.sessions != sessions else self._backoff(delay)
            await self._wait_retry(wait)

    def _backoff(self, delay: float) -> float:
        if self.urgent:
            return self.cfg.stream.reconnect_delay
        return min(delay * 2, 10.0)

    async def _wait_retry(self, seconds: float) -> None:
        """Sleep before reconnecting; cut short when the domain starts waiting (urgent)."""
        if self.urgent:
            seconds = min(seconds, self.cfg.stream.reconnect_delay)
        self._retry_now.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), seconds)

    @property
    def urgent(self) -> bool:
        """Set while the domain is paused waiting for the sink's word (an ambiguous commit):
        reconnect at the base delay, without backing off, since every second is downtime."""
        return self._urgent

    @urgent.setter
    def urgent(self, value: bool) -> None:
        self._urgent = value
        if value:
            self._retry_now.set()

    async def _end_session(self, link: Link) -> None:
        self.connected.clear()
        self.metrics.peer_connected.set(0)
        if self.disks is not None:
            self.disks.end_session()
        for t in self._session_tasks:
            t.cancel()
        for t in self._session_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._session_tasks.clear()
        self.link = None
        await link.close()
        # Whatever was queued or in flight is re-derived from the sink's manifest next time.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._drained.set()
        async with self._acked:
            self._acked.notify_all()

    async def _handshake(self, link: Link) -> None:
        if self.identity is not None:
            await authenticate_to_server(link, self.identity, self._pinned, self.cfg.peer.timeout)
        hello = m.Hello(
            version=m.PROTOCOL_VERSION, node=self.cfg.node.name, domain=self.cfg.domain.name,
            regions=tuple(m.RegionInfo(r.name, r.size, PAGE_SIZE) for r in self.regions),
            vm=_pack_vm(await self.driver.vm_description()), generation=self.generation)
        await link.send(hello)
        reply = await asyncio.wait_for(link.recv(), self.cfg.peer.timeout)
        if isinstance(reply, m.Reject):
            raise PeerRejected(reply.reason)
        if not isinstance(reply, m.Welcome):
            raise ProtocolError(f"expected Welcome, got {type(reply).__name__}")
        if not 0 <= reply.acked_epoch < 1 << 62:
            raise ProtocolError(f"sink reports an impossible acked epoch {reply.acked_epoch}")
        if reply.version != m.PROTOCOL_VERSION:
            raise PeerRejected(f"sink speaks protocol {reply.version}, we speak "
                               f"{m.PROTOCOL_VERSION}")
        self.sink_node = reply.node
        self.sink_handed_over = reply.handed_over
        self.sink_placement = (reply.generation, reply.running_since, reply.forced)
        self.sessions += 1
        if reply.handed_over:
            raise PeerRejected(f"sink {reply.node} runs the domain now (handed over); "
                               "nothing to replicate")
        manifests = {r.name: np.empty(r.npages, dtype=np.uint64) for r in self.regions}
        filled = {r.name: 0 for r in self.regions}
        while True:
            msg = await asyncio.wait_for(link.recv(), self.cfg.peer.timeout)
            if isinstance(msg, m.ManifestEnd):
                break
            if not isinstance(msg, m.ManifestChunk) or msg.region not in manifests:
                raise ProtocolError(f"unexpected {type(msg).__name__} during manifest exchange")
            arr = np.frombuffer(msg.hashes, dtype="<u8")
            target = manifests[msg.region]
            if msg.first_page < 0 or msg.first_page + len(arr) > len(target):
                raise ProtocolError("manifest chunk beyond the region")
            target[msg.first_page:msg.first_page + len(arr)] = arr
            filled[msg.region] += len(arr)
        for r in self.regions:
            if filled[r.name] != r.npages:
                raise ProtocolError(f"sink sent an incomplete manifest for {r.name!r}")
        self.ledger.reset_to_sink(manifests, reply.acked_epoch)
        self._next_epoch = reply.acked_epoch + 1
        self.metrics.acked_epoch.set(reply.acked_epoch)

    async def _open_session(self, link: Link) -> None:
        """Authenticate, exchange manifests (RAM, then disks), and mark the link up."""
        await self._handshake(link)
        if self.disks is not None:
            await self.disks.open_session(link, self.cfg.peer.timeout)
        self.link = link
        self.last_error = ""
        self.connected.set()
        self.metrics.peer_connected.set(1)

    async def _run_tasks(self) -> None:
        """Wait for the session's tasks; the first failure ends the session."""
        done, _ = await asyncio.wait(self._session_tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()

    async def _session(self, link: Link) -> None:
        await self._open_session(link)
        log.info("replicating %s to %s (sink %s, acked epoch %d)", self.cfg.domain.name,
                 link.peer, self.sink_node, self.ledger.acked_epoch)
        self._session_tasks = [
            asyncio.create_task(self._scan_loop(), name="scanner"),
            asyncio.create_task(self._send_loop(link), name="sender"),
            asyncio.create_task(self._recv_loop(link), name="receiver"),
            asyncio.create_task(self._ping_loop(link), name="pinger"),
        ] + self._disk_tasks(link)
        await self._run_tasks()

    def _disk_tasks(self, link: Link) -> list[asyncio.Task]:
        if self.disks is None:
            return []
        return [asyncio.create_task(self.disks.run(link), name="disks")]

    # --- scanning ----------------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        s = self.cfg.stream
        interval = s.scan_interval_min
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
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
            rnd = await self.tracker.round(self.ledger)
            epoch = self._next_epoch
            self._next_epoch += 1
            prev = self._last_round
            interval = (rnd.started - prev.started) if prev else rnd.duration
            self.ledger.add_round(epoch, rnd.started, rnd.duration, rnd.dirty, interval)
            self._last_round = rnd
            self.metrics.round_seconds.observe(rnd.duration)
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
        if not self.connected.is_set():
            raise PeerError(f"not connected to the sink ({self.last_error or 'connecting'})")
        epoch, rnd = await self._round()
        await self.wait_acked(epoch, timeout)
        return rnd

    async def wait_acked(self, epoch: int, timeout: float | None = None) -> None:
        async def waiter() -> None:
            async with self._acked:
                while self.ledger.acked_epoch < epoch:
                    if not self.connected.is_set():
                        raise PeerError("link to the sink lost while waiting for an ack")
                    await self._acked.wait()
        await asyncio.wait_for(waiter(), timeout)

    # --- sending -------------------------------------------------------------------------------

    def _prepare(self, region: str, idx: np.ndarray, epoch: int) -> tuple[bytes, Any] | None:
        """Read, hash, drop unchanged pages, encode. Runs in a worker thread."""
        rl = self.ledger.regions[region]
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
        batch = self.cfg.stream.batch_pages
        max_inflight = self.cfg.stream.max_inflight_epochs
        while True:
            epoch, rnd = await self._queue.get()
            for region, idx in rnd.dirty.items():
                for i in range(0, len(idx), batch):
                    sub = self.ledger.take_pending(region, idx[i:i + batch])
                    if not len(sub):
                        continue
                    out = await asyncio.to_thread(self._prepare, region, sub, epoch)
                    if out is None:
                        continue
                    frame, enc = out
                    t0 = time.monotonic()
                    await link.send_frame(frame)
                    self._account(enc, len(frame), time.monotonic() - t0)
            await link.send(m.EpochEnd(epoch))
            self.ledger.epoch_sent(epoch)
            if self._queue.empty():
                self._drained.set()
            async with self._acked:
                while self.ledger.unacked_epochs() >= max_inflight:
                    await self._acked.wait()

    def _account(self, enc: Any, wire: int, busy: float) -> None:
        self.ledger.record_sent(enc.raw_bytes, wire, busy)
        mt = self.metrics
        mt.sent_bytes.labels("raw").inc(enc.raw_bytes)
        mt.sent_bytes.labels("wire").inc(wire)
        mt.pages_sent.labels("zero").inc(enc.zero_pages)
        kind = "raw" if enc.message.codec == "none" else "compressed"
        mt.pages_sent.labels(kind).inc(enc.data_pages)

    # --- receiving -----------------------------------------------------------------------------

    async def _recv_loop(self, link: Link) -> None:
        while True:
            try:
                msg = await asyncio.wait_for(link.recv(), self.cfg.peer.timeout)
            except asyncio.TimeoutError:
                raise PeerError(f"no word from the sink for {self.cfg.peer.timeout:g}s") from None
            if isinstance(msg, m.DiskAck) and self.disks is not None:
                await self.disks.on_ack(msg.generation)
                continue
            if await self._on_message(msg):
                continue
            if isinstance(msg, m.Pong):
                sent = self._ping_sent.pop(msg.nonce, None)
                if sent is not None:
                    self.rtt = time.monotonic() - sent
            elif isinstance(msg, m.ErrorMessage):
                raise PeerError(f"sink reported: {msg.message}")
            else:
                try:
                    self._responses.put_nowait(msg)
                except asyncio.QueueFull:
                    raise ProtocolError("the sink sent more answers than were asked for") \
                        from None

    async def _on_message(self, msg: Any) -> bool:
        """Tracker-specific messages from the sink; True when handled."""
        if isinstance(msg, m.Ack):
            async with self._acked:
                self.ledger.acked(msg.epoch)
                self._acked.notify_all()
            self.metrics.acked_epoch.set(msg.epoch)
            return True
        return False

    async def _ping_loop(self, link: Link) -> None:
        nonce = 0
        while True:
            nonce += 1
            self._ping_sent = {k: v for k, v in self._ping_sent.items() if k > nonce - 10}
            self._ping_sent[nonce] = time.monotonic()
            await link.send_frame(encode(m.Ping(nonce)), limited=False)
            await asyncio.sleep(PING_INTERVAL)

    async def request(self, msg: Any, expect: type | tuple[type, ...],
                      timeout: float = 30.0) -> Any:
        """Send ``msg`` and wait for the next answer of type ``expect``."""
        link = self.link
        if link is None:
            raise PeerError("not connected to the sink")
        await link.send_frame(encode(msg), limited=False)
        return await self.next_response(expect, timeout)

    def drop_responses(self) -> None:
        """Forget answers nobody waited for (e.g. from an earlier, failed switch)."""
        while not self._responses.empty():
            self._responses.get_nowait()

    async def next_response(self, expect: type | tuple[type, ...], timeout: float = 30.0) -> Any:
        async def get() -> Any:
            while True:
                if not self.connected.is_set():
                    raise PeerError("link to the sink lost")
                try:
                    msg = await asyncio.wait_for(self._responses.get(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if isinstance(msg, expect):
                    return msg
                log.debug("ignoring unexpected %s", type(msg).__name__)
        return await asyncio.wait_for(get(), timeout)

    async def verify(self, timeout: float = 30.0) -> bool:
        """Full-manifest comparison: does the sink hold exactly what the guest RAM holds now?

        Runs a round (so the sink gets anything still different), then compares the digest of
        the current page hashes with the digest of the sink's manifest.
        """
        rnd = await self.sync(timeout)
        if rnd.pages:
            rnd = await self.sync(timeout)
        nonce = int(time.monotonic() * 1e6)
        reply = await self.request(m.VerifyRequest(nonce), m.VerifyReply, timeout)
        ours = tuple(rnd.digests[r.name] for r in self.regions)
        return rnd.pages == 0 and reply.digests == ours

    # --- status --------------------------------------------------------------------------------

    def lag_snapshot(self) -> Any:
        """Lag as status and metrics show it; nothing is "in sync" without a live session."""
        return self.ledger.snapshot(streaming=self.connected.is_set())

    def publish(self) -> None:
        """Refresh lag gauges from the ledger (called periodically)."""
        snap = self.lag_snapshot()
        mt = self.metrics
        mt.lag_bytes.set(snap.lag_bytes)
        mt.lag_pages.set(snap.lag_pages)
        mt.lag_seconds.set(snap.lag_seconds)
        mt.dirty_rate.set(snap.dirty_rate)
        mt.throughput.set(snap.throughput)
        mt.switch_estimate.set(snap.switch_estimate + self.disk_estimate())
        mt.in_sync.set(1 if snap.in_sync and self.disks_in_sync() else 0)

    def disk_estimate(self) -> float:
        """What the disks add to a switch started now: their unsent bytes on the link (a
        round's QMP and NBD work is a few ms, inside the RAM estimate's margin)."""
        if self.disks is None:
            return 0.0
        return self.disks.lag_bytes / (self.ledger.link_rate or 100e6)

    def disks_in_sync(self) -> bool:
        """Every disk copy complete and its oldest unsent write at most a round or two old."""
        if self.disks is None:
            return True
        return self.connected.is_set() and self.disks.in_sync()

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        await self.tracker.close()


def _pack_vm(desc: dict | None) -> bytes:
    if not desc:
        return b""
    import msgpack
    return msgpack.packb(desc, use_bin_type=True)
