"""The source side of the stream: connect, learn what the sink has, then stream.

One :class:`SourceReplicator` per domain. It keeps a connection to the sink (reconnecting with
backoff); on each connection it authenticates, exchanges the RAM manifests (and the disks'),
then runs the domain's tracker :class:`~replicator.source.stream.Stream` (scan rounds or the
held-open QEMU migration), the disks, a **receiver** that takes acknowledgements and answers
and notices a silent peer, and a pinger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..aio import wait_for
from ..config import PAGE_SIZE, Config, parse_address
from ..errors import PeerError, PeerRejected, ProtocolError, ReplicatorError
from ..identity import authenticate_to_server, identity_for, pinned_peer
from ..link import Link, RateLimiter
from ..metrics import Metrics
from ..wire import messages as m
from ..wire.codec import encode
from .driver import DomainDriver, Region
from .ledger import LagSnapshot, Ledger
from .scan import ScanStream
from .stream import Stream
from .tracker import DirtyTracker

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0


class SourceReplicator:
    """Continuously replicate a domain's RAM to the sink.

    ``tracker``: the scan tracker's rounds (a :class:`ScanStream` streams them); or ``stream``:
    builds the domain's :class:`Stream` for this replicator (the qemu-precopy relay).
    """

    def __init__(self, cfg: Config, driver: DomainDriver, regions: list[Region],
                 tracker: DirtyTracker | None = None, metrics: Metrics | None = None,
                 connect: Callable[[], Any] | None = None, disks: Any = None, *,
                 stream: Callable[[SourceReplicator], Stream] | None = None):
        self.cfg = cfg
        #: The domain's disks (:class:`~replicator.source.disks.DiskReplicator`), or None.
        self.disks = disks
        self.driver = driver
        self.regions = regions
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
        #: Called with the mode when the sink asks for a switch (the node starts it).
        self.on_switch_request: Callable[[str], None] | None = None
        self._connect = connect or self._tcp_connect
        self.identity = identity_for(cfg)
        self._pinned = pinned_peer(cfg) if self.identity is not None else ""
        self._ssl = self.identity.client_context() if self.identity is not None else None
        # Answers to requests (switch steps, verify): bounded, a peer cannot flood us.
        self._responses: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        self._session_tasks: list[asyncio.Task] = []
        self._ping_sent: dict[int, float] = {}
        self.rtt = 0.0
        self.sessions = 0
        self._urgent = False
        self._retry_now = asyncio.Event()
        self.metrics.ram_bytes.set(sum(r.size for r in regions))
        if stream is None:
            if tracker is None:
                raise TypeError("SourceReplicator needs a tracker or a stream")
            self.stream: Stream = ScanStream(self, tracker)
        else:
            self.stream = stream(self)

    def __getattr__(self, name: str) -> Any:
        # What only one tracker has (the scan stream's sync, verify and wait_acked; the relay's
        # figures: qemu_info, pacing, session_no, ...) reads through to the stream. Only called
        # for names the replicator itself lacks.
        stream = self.__dict__.get("stream")
        if stream is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(stream, name)

    # --- connection management -----------------------------------------------------------------

    async def _tcp_connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = parse_address(self.cfg.peer.address, key="peer.address")
        if self.identity is None:
            return await asyncio.open_connection(host, port, limit=1 << 20)
        return await wait_for(asyncio.open_connection(
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
                if self.sink_handed_over and self.sink_placement[0] < self.generation:
                    # The peer ran the domain a generation ago and has not turned around
                    # yet (it just handed the domain over): ask again soon.
                    log.info("the peer still turns around after the switch; retrying")
                    wait = delay
                else:
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
            await wait_for(self._retry_now.wait(), seconds)

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
        await self.stream.session_ended()

    async def _handshake(self, link: Link) -> None:
        if self.identity is not None:
            await authenticate_to_server(link, self.identity, self._pinned, self.cfg.peer.timeout)
        hello = m.Hello(
            version=m.PROTOCOL_VERSION, node=self.cfg.node.name, domain=self.cfg.domain.name,
            regions=tuple(m.RegionInfo(r.name, r.size, PAGE_SIZE) for r in self.regions),
            vm=_pack_vm(await self.driver.vm_description()), generation=self.generation)
        await link.send(hello)
        reply = await wait_for(link.recv(), self.cfg.peer.timeout)
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
            msg = await wait_for(link.recv(), self.cfg.peer.timeout)
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
        self._session_tasks = [
            asyncio.create_task(self._recv_loop(link), name="receiver"),
            asyncio.create_task(self._ping_loop(link), name="pinger"),
        ]
        try:
            self._session_tasks += await self.stream.start(link)
            self._session_tasks += self._disk_tasks(link)
            await self._run_tasks()
        finally:
            await self.stream.stop()

    def _disk_tasks(self, link: Link) -> list[asyncio.Task]:
        if self.disks is None:
            return []
        return [asyncio.create_task(self.disks.run(link), name="disks")]

    # --- receiving -----------------------------------------------------------------------------

    async def _recv_loop(self, link: Link) -> None:
        while True:
            try:
                msg = await wait_for(link.recv(), self.cfg.peer.timeout)
            except asyncio.TimeoutError:
                raise PeerError(f"no word from the sink for {self.cfg.peer.timeout:g}s") from None
            if isinstance(msg, m.DiskAck) and self.disks is not None:
                await self.disks.on_ack(msg.generation)
                continue
            if await self.stream.on_message(msg):
                continue
            if isinstance(msg, m.Pong):
                sent = self._ping_sent.pop(msg.nonce, None)
                if sent is not None:
                    self.rtt = time.monotonic() - sent
            elif isinstance(msg, m.ErrorMessage):
                raise PeerError(f"sink reported: {msg.message}")
            elif isinstance(msg, m.SwitchRequest):
                # "Switch now" pressed on the sink's host: run it as if pressed here.
                if self.on_switch_request is None or msg.mode not in ("live", "stop"):
                    log.warning("ignoring a switch request from the sink (%r)", msg.mode)
                else:
                    log.info("the sink asks for a switch (%s mode)", msg.mode)
                    self.on_switch_request(msg.mode)
            else:
                try:
                    self._responses.put_nowait(msg)
                except asyncio.QueueFull:
                    raise ProtocolError("the sink sent more answers than were asked for") \
                        from None

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
                    msg = await wait_for(self._responses.get(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if isinstance(msg, expect):
                    return msg
                log.debug("ignoring unexpected %s", type(msg).__name__)
        return await wait_for(get(), timeout)

    # --- status --------------------------------------------------------------------------------

    def lag_snapshot(self) -> LagSnapshot:
        """Lag as status and metrics show it, as the tracker's stream sees it."""
        return self.stream.lag_snapshot()

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
        self.stream.publish()

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
        await self.stream.close()


def _pack_vm(desc: dict | None) -> bytes:
    if not desc:
        return b""
    import msgpack
    return msgpack.packb(desc, use_bin_type=True)
