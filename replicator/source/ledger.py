"""What the source knows about the sink's copy, and how far behind it is.

Per region the ledger holds ``shipped``: the xxh3 of every page as the sink will hold it once
everything already sent has landed, and ``pending``: pages a tracker found changed that are not
sent yet. A page found changed again while pending is not queued twice (coalescing), and the
sender reads its content at send time, so it always goes with its newest content.

The ledger also keeps the epochs in flight and derives lag from them: pages and bytes changed but
not yet durable on the sink, and the age of the oldest such change.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..config import PAGE_SIZE
from ..wire.pages import ZERO_HASH
from .driver import Region

class RegionLedger:
    def __init__(self, region: Region):
        self.region = region
        self.npages = region.npages
        self.shipped = np.full(self.npages, ZERO_HASH, dtype=np.uint64)
        self.pending = np.zeros(self.npages, dtype=bool)


@dataclass(slots=True)
class EpochInfo:
    epoch: int
    detected_at: float        # monotonic time the round that found these pages started
    pages: int                # pages queued by the round (still counted until acked)
    sent: bool = False


@dataclass(frozen=True, slots=True)
class LagSnapshot:
    """The numbers the control API and metrics publish."""
    lag_pages: int
    lag_bytes: int
    lag_seconds: float
    dirty_rate: float                 # bytes/s
    throughput: float                 # wire bytes/s, recent
    link_rate: float                  # best sustained wire bytes/s seen (capacity estimate)
    wire_ratio: float                 # wire bytes per raw byte sent
    switch_estimate: float            # seconds of downtime if paused now
    acked_epoch: int
    sent_epoch: int
    round_seconds: float
    in_sync: bool


class _Rate:
    """Exponentially weighted rate over fixed ticks."""

    def __init__(self, tau: float = 2.0):
        self.tau = tau
        self.value = 0.0
        self._acc = 0.0
        self._t0 = time.monotonic()

    def add(self, n: float) -> None:
        self._acc += n

    def tick(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        dt = now - self._t0
        if dt >= 0.25:
            inst = self._acc / dt
            a = min(1.0, dt / self.tau)
            self.value += a * (inst - self.value)
            self._acc = 0.0
            self._t0 = now
        return self.value


@dataclass
class Ledger:
    regions: dict[str, RegionLedger] = field(default_factory=dict)
    epochs: OrderedDict[int, EpochInfo] = field(default_factory=OrderedDict)
    pending_pages: int = 0
    inflight_pages: int = 0
    acked_epoch: int = 0
    sent_epoch: int = 0
    last_round_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.dirty_rate = _Rate()
        self.wire_rate = _Rate()
        self.link_rate = 0.0
        self.raw_sent = 0
        self.wire_sent = 0
        self._busy_bytes = 0
        self._busy_time = 0.0
        self._baseline_round = True
        # "In sync" is a fact proven by an acknowledgement, never a default: ``proven_at`` is
        # when the last acked round started (everything dirtied before it is durable on the
        # sink), and after every (re)connect nothing is proven until the first round that
        # compared against the sink's manifest is acked.
        self.created_at = time.monotonic()
        self.proven_at: float | None = None
        self.baseline_acked = False
        self._baseline_epoch = 0

    @classmethod
    def for_regions(cls, regions: list[Region]) -> "Ledger":
        return cls(regions={r.name: RegionLedger(r) for r in regions})

    # --- session boundaries ------------------------------------------------------------------

    def reset_to_sink(self, manifests: dict[str, np.ndarray], acked_epoch: int) -> None:
        """A (re)connected sink told us what it holds: that is now the truth."""
        for name, rl in self.regions.items():
            rl.shipped[:] = manifests[name]
            rl.pending[:] = False
        self.epochs.clear()
        self.pending_pages = self.inflight_pages = 0
        self.acked_epoch = self.sent_epoch = acked_epoch
        self._baseline_round = True
        self.baseline_acked = False
        self._baseline_epoch = 0

    # --- tracker side --------------------------------------------------------------------------

    def add_round(self, epoch: int, started: float, duration: float,
                  dirty: dict[str, np.ndarray], interval: float) -> int:
        """Record a tracker round: mark its pages pending. Returns the number queued."""
        n = 0
        for name, idx in dirty.items():
            if len(idx):
                self.regions[name].pending[idx] = True
                n += len(idx)
        self.pending_pages += n
        self.epochs[epoch] = EpochInfo(epoch, started, n)
        if not self._baseline_epoch:
            self._baseline_epoch = epoch
        self.last_round_seconds = duration
        if self._baseline_round:
            # The first round after (re)connecting finds everything the sink lacks, which says
            # nothing about how fast the guest dirties memory.
            self._baseline_round = False
            self.dirty_rate = _Rate()
        else:
            self.dirty_rate.add(n * PAGE_SIZE)
        return n

    # --- sender side ---------------------------------------------------------------------------

    def take_pending(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Pages among ``idx`` still pending (not superseded by a reset); clears them."""
        rl = self.regions[name]
        keep = idx[rl.pending[idx]]
        rl.pending[keep] = False
        self.pending_pages -= len(keep)
        self.inflight_pages += len(keep)
        return keep

    def record_sent(self, raw: int, wire: int, busy_seconds: float) -> None:
        self.raw_sent += raw
        self.wire_sent += wire
        self.wire_rate.add(wire)
        self._busy_bytes += wire
        self._busy_time += busy_seconds
        if self._busy_time >= 0.2:
            rate = self._busy_bytes / self._busy_time
            # Capacity estimate: follow increases at once, decreases slowly.
            self.link_rate = rate if rate > self.link_rate else 0.8 * self.link_rate + 0.2 * rate
            self._busy_bytes = 0
            self._busy_time = 0.0

    def epoch_sent(self, epoch: int) -> None:
        info = self.epochs.get(epoch)
        if info is not None:
            info.sent = True
        self.sent_epoch = max(self.sent_epoch, epoch)

    def acked(self, epoch: int) -> None:
        while self.epochs and next(iter(self.epochs)) <= epoch:
            _, info = self.epochs.popitem(last=False)
            self.inflight_pages -= info.pages
            if self._baseline_epoch and info.epoch >= self._baseline_epoch:
                self.baseline_acked = True
                self.proven_at = max(self.proven_at or 0.0, info.detected_at)
        self.inflight_pages = max(self.inflight_pages, 0)
        self.acked_epoch = max(self.acked_epoch, epoch)

    def unacked_epochs(self) -> int:
        return sum(1 for e in self.epochs.values() if e.sent)

    # --- lag -----------------------------------------------------------------------------------

    def unproven_seconds(self, now: float) -> float:
        """Seconds since the shadow was last proven to hold everything (or since we started)."""
        return max(0.0, now - (self.proven_at if self.proven_at is not None
                               else self.created_at))

    def unproven_lag(self, known: int, dirty_rate: float, seconds: float) -> int:
        """Bytes behind when nothing is proven: unknown, never zero. What is known to be
        unsent, or what the guest dirtied since the last proof, at least one page, at most
        all of RAM."""
        total = sum(rl.npages for rl in self.regions.values()) * PAGE_SIZE
        return min(total, max(known, PAGE_SIZE, int(dirty_rate * seconds)))

    def snapshot(self, now: float | None = None, device_state_bytes: int = 300_000,
                 streaming: bool = True) -> LagSnapshot:
        """Lag figures. ``streaming``: a session is up; without one nothing is in sync and the
        lag is the time since the last proof, with bytes estimated from the dirty rate."""
        now = time.monotonic() if now is None else now
        lag_pages = self.pending_pages + self.inflight_pages
        dirty = self.dirty_rate.tick(now)
        proven = streaming and self.baseline_acked
        if proven:
            oldest = next((e.detected_at for e in self.epochs.values() if e.pages), None)
            lag_seconds = max(0.0, now - oldest) if oldest is not None else 0.0
        else:
            lag_seconds = self.unproven_seconds(now)
            lag_pages = self.unproven_lag(lag_pages * PAGE_SIZE, dirty, lag_seconds) // PAGE_SIZE
        thr = self.wire_rate.tick(now)
        ratio = (self.wire_sent / self.raw_sent) if self.raw_sent else 1.0
        link = self.link_rate or thr or 100e6
        # A switch now: pause, one more round (about as long as the last), send what is
        # behind plus what the guest dirtied meanwhile, then the device state.
        backlog = lag_pages * PAGE_SIZE + dirty * self.last_round_seconds
        estimate = self.last_round_seconds + (backlog * ratio + device_state_bytes) / link
        return LagSnapshot(
            lag_pages=lag_pages, lag_bytes=lag_pages * PAGE_SIZE, lag_seconds=lag_seconds,
            dirty_rate=dirty, throughput=thr, link_rate=self.link_rate, wire_ratio=ratio,
            switch_estimate=estimate, acked_epoch=self.acked_epoch, sent_epoch=self.sent_epoch,
            round_seconds=self.last_round_seconds,
            # "In sync": everything the tracker found is durable on the sink within a second
            # (a running guest always dirties something, so "nothing left" never holds).
            in_sync=proven and lag_seconds <= 1.0,
        )
