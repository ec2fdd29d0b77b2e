"""Disk replication, source side: pull rounds of changed blocks from the running QEMU.

Each round (:meth:`DiskReplicator.round`): rotate the disks' dirty bitmaps in one QMP
transaction (:class:`~replicator.vmm.bitmaps.DirtyTracking`), export each disk read-only over
QEMU's NBD server with the frozen bitmap, read the dirty extents (NBD block status, then READ)
on a unix socket of this host, hash every block and send only those whose hash differs from
what the sink holds (its manifest, then what we sent), end the round with ``DiskRoundEnd``;
once the sink made it durable (``DiskAck``) the frozen bitmap is dropped. A round not
acknowledged is folded into the next rotation, so a lost link loses nothing.

When the bitmaps cannot say what changed since the sink's copy was last complete (first copy,
bitmaps lost with an unclean QEMU exit, a raw disk after a QEMU restart, a copy of another
lineage), the round compares every block instead: it reads what ``base:allocation`` does not
report as zero, so holes cost nothing, and still sends only blocks whose hash differs.

Disk traffic stays on this host: QEMU's NBD server listens on a 0600 unix socket in a 0700
directory; blocks reach the peer only inside the authenticated replication link.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ..aio import wait_for
from ..config import Config
from ..errors import PeerError, ProtocolError, QemuError
from ..link import Link
from ..metrics import Metrics
from ..vmm.bitmaps import DirtyTracking, start_nbd_server
from ..vmm.blockio import ALLOCATION, read_blocks, runs, touched
from ..vmm.nbd import STATE_DIRTY, STATE_ZERO, NbdClient
from ..vmm.qemu import QemuProcess
from ..wire import messages as m
from ..wire.blocks import (BLOCK_SIZE, MAX_BATCH_BLOCKS, MAX_DISK_BYTES, ZERO_BLOCK_HASH,
                           block_count, digest, encode_blocks, hash_blocks)
from ..wire.codec import encode
from ..wire.pages import Compressor
from .manifests import receive_manifests

log = logging.getLogger(__name__)

BITMAP_PREFIX = "replicator"
#: Block runs (of up to MAX_BATCH_BLOCKS) read ahead of the one being sent.
READ_AHEAD = 4
#: Longest wait for a reply of the source QEMU's own NBD server.
LOCAL_NBD_TIMEOUT = 120.0
#: How long the sink may take to make a round durable (a first copy's flush can be long).
ACK_TIMEOUT = 300.0


@dataclasses.dataclass
class DiskLag:
    """One disk's figures for status and metrics."""
    index: int
    node: str
    path: str
    format: str
    size: int
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    copy: str = "unknown"            # initial | compare | streaming
    progress: float = 0.0            # of the running full compare
    sent_raw: int = 0
    sent_wire: int = 0
    acked_generation: int = 0

    @property
    def lag_blocks(self) -> int:
        return -(-self.lag_bytes // BLOCK_SIZE)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "path": self.path,
                "format": self.format, "size_bytes": self.size,
                "lag": {"bytes": self.lag_bytes, "blocks": self.lag_blocks,
                        "seconds": self.lag_seconds},
                "copy": self.copy, "progress": self.progress,
                "sent_bytes": {"raw": self.sent_raw, "wire": self.sent_wire},
                "acked_generation": self.acked_generation}


@dataclasses.dataclass
class _Disk:
    info: DiskLag
    nblocks: int
    shipped: np.ndarray              # what the sink holds (its manifest, then what we sent)
    full: bool = True                # the next round compares every block


class DiskReplicator:
    """Replicates every disk of one QEMU to the sink over the replication link."""

    def __init__(self, cfg: Config, proc: QemuProcess, metrics: Metrics,
                 compressor: Compressor):
        self.cfg = cfg
        self.proc = proc
        self.metrics = metrics
        self.compressor = compressor
        self.interval = cfg.stream.disk_interval
        self.tracking = DirtyTracking(proc, BITMAP_PREFIX)
        self.sock_dir = Path(cfg.node.state_dir) / cfg.domain.name / "nbd"
        self.sock = self.sock_dir / "source.sock"
        self.disks: list[_Disk] = []
        self.covered_from = 0            # oldest generation whose writes the bitmaps hold
        self.acked = 0
        self.proven_at: float | None = None
        self.sent_generation = 0
        self._lost = True                # bitmaps lost since start: every disk compares first
        self._lock = asyncio.Lock()      # one round at a time
        self._acked = asyncio.Condition()
        self._free = asyncio.Event()     # clear: no periodic rounds (a switch holds them)
        self._free.set()
        self._link: Link | None = None
        self._pending_proof: tuple[int, float] | None = None    # (generation, frozen at)
        self._active = False             # NBD server up, bitmaps recovered
        self._hurry = False
        self._to_confirm: set[int] = set()   # acknowledged rounds whose bitmaps are still there
        self._started = time.monotonic()

    @property
    def enabled(self) -> bool:
        return bool(self.disks)

    # --- set-up ----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Find the disks (works while they are inactive, e.g. after a switch)."""
        found = await self.tracking.disks()
        if not found:
            return
        nodes = {n["node-name"]: n for n in
                 await self.proc.execute("query-named-block-nodes", {"flat": True})}
        disks = []
        for i, d in enumerate(found):
            size = int(nodes[d.node]["image"]["virtual-size"])
            if size > MAX_DISK_BYTES:
                raise QemuError(f"disk {d.path} is larger than {MAX_DISK_BYTES >> 40} TiB")
            self.metrics.disk_bytes.labels(str(i)).set(size)
            disks.append(_Disk(DiskLag(i, d.node, d.path, d.format, size), block_count(size),
                               np.full(block_count(size), ZERO_BLOCK_HASH, dtype=np.uint64)))
        self.disks = disks
        log.info("replicating %d disk(s): %s", len(disks),
                 ", ".join(f"{d.info.path} ({d.info.format}, {d.info.size >> 20} MiB)"
                           for d in disks))

    async def _activate(self) -> None:
        """Start QEMU's NBD server on our socket and make every disk record into one bitmap
        generation (recovering what an earlier run left). Done at the first session, not at
        start-up: a daemon restarted while its VM is paused with inactive disks (in the middle
        of a switch) must start, and learn from the sink who runs the VM, first."""
        if self._active:
            return
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sock_dir, 0o700)
        try:
            await start_nbd_server(self.proc, self.sock)
        except QemuError:
            # A restarted daemon finds the server its earlier run started on the same socket.
            if not await self._our_server_runs():
                raise
            log.info("reusing the NBD server an earlier run started on %s", self.sock)
        recovered = await self.tracking.recover()
        self.covered_from = min(r.oldest for r in recovered)
        self._lost = any(r.full_compare for r in recovered)
        for r in recovered:
            if r.full_compare:
                log.warning("disk node %s: %s; its next round compares every block",
                            r.node, r.reason)
        self._active = True

    async def _our_server_runs(self) -> bool:
        """Does a server listen on our socket (QEMU's NBD server, started by an earlier run
        of this daemon: only we create sockets in our 0700 directory)?"""
        try:
            _, writer = await wait_for(asyncio.open_unix_connection(self.sock), 2)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def describe(self) -> tuple[m.DiskInfo, ...]:
        return tuple(m.DiskInfo(d.info.index, d.info.size, d.info.format, BLOCK_SIZE)
                     for d in self.disks)

    # --- session ---------------------------------------------------------------------------

    async def open_session(self, link: Link, timeout: float) -> None:
        """Tell the sink our disks; take its copies' manifests as the truth."""
        self._link = None
        if not self.disks:
            return
        await self._activate()
        await link.send(m.DiskOpen(self.describe()))
        manifests = {i: np.empty(d.nblocks, dtype=np.uint64) for i, d in enumerate(self.disks)}
        msg = await receive_manifests(
            link, manifests, m.DiskOpened,
            lambda c: (c.disk, c.first_block, c.hashes) if isinstance(c, m.DiskManifest) else None,
            timeout, "disk manifests")
        if len(msg.generations) != len(self.disks):
            raise ProtocolError("the sink sent incomplete disk manifests")
        current = await self._recording_generation()
        for d, manifest, gen in zip(self.disks, manifests.values(), msg.generations):
            d.shipped = manifest
            d.info.acked_generation = gen
            # Only what changed since generation ``gen`` needs sending, if the bitmaps hold
            # every write since then; else compare every block (still sending only changes).
            d.full = (self._lost or gen <= 0 or gen < self.covered_from - 1
                      or gen >= current)
            d.info.copy = ("initial" if gen <= 0 else "compare") if d.full else "streaming"
            if d.full:
                log.info("disk %s: the sink's copy is at generation %d, our bitmaps hold "
                         "%d..%d: comparing every block", d.info.path, gen,
                         self.covered_from, current)
        if not any(d.full for d in self.disks):
            # What the sink holds is acknowledged, whichever run of ours sent it.
            self.acked = max(self.acked, min(msg.generations))
        self._link = link
        self.proven_at = None

    async def _recording_generation(self) -> int:
        for bms in (await self.tracking.bitmaps()).values():
            for b in bms:
                if b.recording:
                    return b.generation
        raise QemuError("no disk records writes (recover() first)")

    def end_session(self) -> None:
        self._link = None

    async def run(self, link: Link) -> None:
        """The session's disk task: a round every ``disk_interval`` (back to back while a
        disk compares every block), and the lag figures in between."""
        while True:
            await self._free.wait()
            if await self.round(link, periodic=True) is not None:
                # One round in flight: the next rotation would only fold this one in again.
                await self.wait_acked(self.sent_generation, ACK_TIMEOUT)
            busy = any(d.full for d in self.disks) or self._hurry
            await asyncio.sleep(0 if busy else self.interval)
            await self.refresh_lag()

    def hurry(self) -> None:
        """Rounds back to back (a switch is coming: the paused round gets only the writes of
        the last one), until :meth:`release`."""
        self._hurry = True

    def hold(self) -> None:
        """No periodic rounds until :meth:`release` (the switch runs its own)."""
        self._free.clear()

    def release(self) -> None:
        self._free.set()
        self._hurry = False

    # --- rounds ----------------------------------------------------------------------------

    async def round(self, link: Link, *, periodic: bool = False) -> int | None:
        """One round: rotate, send what changed, end it. Returns the bytes of changed blocks
        sent (zero blocks count as their size). Does not wait for the acknowledgement.
        ``periodic``: skip it (None) while a switch holds the rounds."""
        async with self._lock:
            if periodic and not self._free.is_set():
                return None
            if self._link is not link:
                raise PeerError("the disk session is not open on this link")
            # Drop the bitmaps of acknowledged rounds here, under the lock: done from the
            # receiver (on the ack) it raced with rotate()'s transaction, which then named a
            # bitmap that was gone ("Dirty bitmap ... not found").
            await self._confirm_acked()
            frozen = await self.tracking.rotate()
            frozen_at = time.monotonic()
            sent = 0
            try:
                for d in self.disks:
                    sent += await self._send_disk(link, d, frozen)
            finally:
                await self.tracking.unexport_all()
            await link.send(m.DiskRoundEnd(frozen))
            self.sent_generation = frozen
            self._pending_proof = (frozen, frozen_at)
            for d in self.disks:
                if d.full:
                    d.full = False
                    d.info.copy = "streaming"
                    d.info.progress = 1.0
            self._lost = False
            return sent

    async def _send_disk(self, link: Link, d: _Disk, generation: int) -> int:
        exp = await self.tracking.export(d.info.node, generation)
        contexts = [ALLOCATION] + ([] if d.full else [exp.context])
        # A local socket to our own QEMU: a slow reply is a busy host, not a lost peer (10 s
        # here reset whole sessions on a loaded machine, first copy and RAM included).
        client = await NbdClient.connect_unix(self.sock, exp.name, contexts=contexts,
                                              timeout=LOCAL_NBD_TIMEOUT)
        try:
            ext = await client.extents()
            zero = touched(ext[ALLOCATION], d.nblocks, lambda f: not f & STATE_ZERO)
            zero = ~zero                       # blocks that are wholly zero: nothing to read
            if d.full:
                wanted = np.ones(d.nblocks, dtype=bool)
            else:
                wanted = touched(ext[exp.context], d.nblocks, lambda f: f & STATE_DIRTY)
            sent = 0
            # Zero blocks: no read; send only where the sink holds something else.
            zeros = np.flatnonzero(wanted & zero & (d.shipped != np.uint64(ZERO_BLOCK_HASH)))
            for i in range(0, len(zeros), MAX_BATCH_BLOCKS):
                idx = zeros[i:i + MAX_BATCH_BLOCKS]
                sent += await self._ship(link, d, generation, idx,
                                         np.full(len(idx), ZERO_BLOCK_HASH, dtype=np.uint64),
                                         None)
            d.shipped[wanted & zero] = ZERO_BLOCK_HASH
            data = wanted & ~zero
            total = max(1, int(data.sum()))
            done = 0

            async def read(first: int, count: int) -> tuple[int, int, memoryview, np.ndarray]:
                view = await read_blocks(client, first, count, d.info.size,
                                         bytearray(count * BLOCK_SIZE))
                return first, count, view, await asyncio.to_thread(hash_blocks, view, count)

            # Reads run ahead of sending (the NBD client keeps several requests in flight),
            # so the disk, the hashing and the link work at the same time.
            todo = iter(runs(data))
            ahead: deque[asyncio.Future] = deque()

            def fill() -> None:
                while len(ahead) < READ_AHEAD and (nxt := next(todo, None)) is not None:
                    ahead.append(asyncio.ensure_future(read(*nxt)))
            fill()
            try:
                while ahead:
                    first, count, view, hashes = await ahead.popleft()
                    fill()
                    idx = np.arange(first, first + count)
                    changed = hashes != d.shipped[idx]
                    if changed.any():
                        sent += await self._ship(link, d, generation, idx[changed],
                                                 hashes[changed], view if changed.all() else
                                                 _compact(view, changed))
                    done += count
                    if d.full:
                        d.info.progress = done / total
            finally:
                for fut in ahead:
                    fut.cancel()
                for fut in ahead:
                    with contextlib.suppress(BaseException):
                        await fut
            return sent
        finally:
            await client.close()

    async def _ship(self, link: Link, d: _Disk, generation: int, idx: np.ndarray,
                    hashes: np.ndarray, view: memoryview | bytes | None) -> int:
        if view is None:
            view = bytes(len(idx) * BLOCK_SIZE)
        enc = await asyncio.to_thread(encode_blocks, generation, d.info.index, idx, view,
                                      hashes, self.compressor)
        frame = encode(enc.message)
        await link.send_frame(frame)
        d.shipped[idx] = hashes
        d.info.sent_raw += enc.raw_bytes
        d.info.sent_wire += len(frame)
        label = str(d.info.index)
        self.metrics.disk_sent_bytes.labels(label, "raw").inc(enc.raw_bytes)
        self.metrics.disk_sent_bytes.labels(label, "wire").inc(len(frame))
        return enc.raw_bytes

    async def on_ack(self, generation: int) -> None:
        """The sink holds every block up to round ``generation``: drop its bitmap."""
        if generation > self.sent_generation:
            raise ProtocolError(f"the sink acknowledged disk round {generation}, which was "
                                f"never sent")
        async with self._acked:
            self.acked = max(self.acked, generation)
            pending = self._pending_proof
            if pending and pending[0] <= generation:
                self.proven_at = pending[1]
            for d in self.disks:
                d.info.acked_generation = self.acked
            self._to_confirm.add(generation)
            self._acked.notify_all()
        self.covered_from = max(self.covered_from, generation + 1)

    async def _confirm_acked(self) -> None:
        """Remove the frozen bitmaps of acknowledged rounds (caller holds the round lock)."""
        for generation in sorted(self._to_confirm):
            await self.tracking.confirm(generation)
            self._to_confirm.discard(generation)

    async def wait_acked(self, generation: int, timeout: float) -> None:
        async def waiter() -> None:
            async with self._acked:
                while self.acked < generation:
                    if self._link is None:
                        raise PeerError("link to the sink lost while waiting for a disk ack")
                    await self._acked.wait()
        await wait_for(waiter(), timeout)

    async def sync(self, link: Link, timeout: float, *, paused: bool = False) -> int:
        """One round now, acknowledged. ``paused``: the guest cannot write (the switch's
        final delta), so when no bitmap counts a write since the last acknowledged round
        there is nothing to send and the round (QMP, NBD, a flush on the sink) is skipped."""
        if paused and not any(d.full for d in self.disks):
            async with self._lock:
                # Wait for a round in flight: once acknowledged its blocks are with the sink.
                pass
            await self.wait_acked(self.sent_generation, timeout)
            bitmaps = await self.tracking.bitmaps()
            if not any(b.count for bms in bitmaps.values() for b in bms
                       if b.generation > self.acked):
                return 0
        sent = await self.round(link) or 0
        await self.wait_acked(self.sent_generation, timeout)
        return sent

    def ready(self) -> str:
        """Why a switch cannot start now ("" when it can): every copy must be complete."""
        for d in self.disks:
            if d.full or d.info.acked_generation <= 0:
                pct = f" ({d.info.progress:.0%})" if d.full else ""
                return f"disk {d.info.path} is still being copied{pct}"
        return ""

    def digests(self) -> tuple[bytes, ...]:
        return tuple(digest(d.shipped) for d in self.disks)

    async def quiesce(self) -> None:
        """Remove our exports: required before QEMU inactivates the disks (migration end,
        device-state save), which aborts QEMU 10 while a persistent bitmap is exported."""
        async with self._lock:
            await self.tracking.unexport_all()

    # --- lag -------------------------------------------------------------------------------

    async def refresh_lag(self) -> None:
        """Per disk: bytes written and not yet durable on the sink (our bitmaps' counts), and
        the age of the oldest of them."""
        try:
            bitmaps = await self.tracking.bitmaps()
        except QemuError:
            return                   # inactive (switched) or busy: keep the last figures
        # Rounds acknowledged but not yet dropped are with the sink already.
        counts = {node: sum(b.count for b in bms if b.generation > self.acked)
                  for node, bms in bitmaps.items()}
        now = time.monotonic()
        streaming = self._link is not None and self.proven_at is not None
        since = self.proven_at if self.proven_at is not None else self._started
        for d in self.disks:
            lag = counts.get(d.info.node, 0)
            if d.full:
                lag = max(lag, int(d.info.size * (1 - d.info.progress)))
            d.info.lag_bytes = lag
            # Nothing written since the last acknowledged round: in sync. Otherwise the age of
            # the oldest write not yet durable there is at most the time since that round.
            d.info.lag_seconds = 0.0 if (lag == 0 and streaming) else max(0.0, now - since)
            mt = self.metrics
            label = str(d.info.index)
            mt.disk_lag_bytes.labels(label).set(d.info.lag_bytes)
            mt.disk_lag_blocks.labels(label).set(d.info.lag_blocks)
            mt.disk_lag_seconds.labels(label).set(d.info.lag_seconds)

    def in_sync(self) -> bool:
        limit = 2 * self.interval + 1.0
        return all(not d.full and d.info.lag_seconds <= limit for d in self.disks)

    @property
    def lag_bytes(self) -> int:
        return sum(d.info.lag_bytes for d in self.disks)

    def status(self) -> list[dict[str, Any]]:
        return [d.info.to_dict() for d in self.disks]


def _compact(view: memoryview, changed: np.ndarray) -> bytes:
    arr = np.frombuffer(view, dtype=np.uint8).reshape(-1, BLOCK_SIZE)
    return arr[changed].tobytes()


async def create(cfg: Config, driver: Any, metrics: Metrics, compressor: Compressor
                 ) -> DiskReplicator | None:
    """A DiskReplicator for a QEMU domain with disks, else None."""
    proc = getattr(driver, "proc", None)
    if proc is None:
        return None
    rep = DiskReplicator(cfg, proc, metrics, compressor)
    await rep.setup()
    return rep if rep.enabled else None
