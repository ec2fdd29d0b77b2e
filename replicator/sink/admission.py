"""Connections to the sink before they authenticate: how many, for how long, and why refused.

Anyone who can reach the sink's port can open connections faster than anything else happens
on the laptop. Until a connection has proven the paired source's ID it is *pending*: it costs a
socket, a TLS session and buffers. So pending connections are capped in total and per address
(IPv6: per /64) and must authenticate within ``peer.handshake_timeout``. At a cap a new
connection is still taken and the oldest pending one of the busiest address is closed instead:
idle connections cannot lock the paired source out (it needs a slot for a few milliseconds),
and an address that floods evicts its own connections first. Every refusal is counted by reason
and logged with its reason, rate-limited so that a flood does not become a log flood.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import ssl
import time

from ..errors import FrameTooLarge, LinkClosed, PeerRejected, ProtocolError, ReplicatorError
from ..metrics import Metrics

log = logging.getLogger("replicator.sink.receiver")

LOG_BURST = 10            # refusal lines per window; the rest is summed up once per window
LOG_WINDOW = 10.0


def address_key(peername: object) -> str:
    """What the per-address cap counts by: the IP, or the /64 of an IPv6 address."""
    host = str(peername[0] if isinstance(peername, tuple) and peername else peername)
    if ":" not in host:
        return host                  # IPv4 as the kernel wrote it: already one per address
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Pending:
    """One connection that has not authenticated yet."""

    __slots__ = ("key", "peer", "task", "since", "evicted")

    def __init__(self, key: str, peer: str, task: asyncio.Task | None):
        self.key = key
        self.peer = peer
        self.task = task
        self.since = time.monotonic()
        self.evicted: tuple[str, str] | None = None      # (reason, text) once evicted


class Admission:
    """The caps on pending connections; refusal accounting and logging."""

    def __init__(self, total: int, per_address: int, metrics: Metrics):
        self.total = total
        self.per_address = per_address
        self.metrics = metrics
        self._by_key: dict[str, list[Pending]] = {}
        self._count = 0
        self._logged = 0
        self._window_start = float("-inf")
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._flush_handle: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        return self._count

    def admit(self, peername: object, peer: str) -> Pending:
        """Take a new connection (the calling task), evicting another at a cap."""
        key = address_key(peername)
        group = self._by_key.get(key, [])
        if len(group) >= self.per_address:
            self._evict(group[0], "address_limit",
                        f"closed as the oldest of {len(group)} unauthenticated connections from "
                        f"{key} (peer.max_unauthenticated_per_address)")
        elif self._count >= self.total:
            busiest = max(self._by_key.values(), key=lambda g: (len(g), -g[0].since))
            self._evict(busiest[0], "total_limit",
                        f"closed as the oldest connection of the address with the most of "
                        f"{self._count} unauthenticated connections (peer.max_unauthenticated)")
        p = Pending(key, peer, asyncio.current_task())
        self._by_key.setdefault(key, []).append(p)
        self._count += 1
        self.metrics.unauthenticated.set(self._count)
        return p

    def release(self, p: Pending) -> None:
        """The connection authenticated or ended: it no longer counts."""
        group = self._by_key.get(p.key)
        if group is None or p not in group:
            return
        group.remove(p)
        if not group:
            del self._by_key[p.key]
        self._count -= 1
        self.metrics.unauthenticated.set(self._count)

    def _evict(self, p: Pending, reason: str, text: str) -> None:
        self.release(p)
        p.evicted = (reason, text)
        if p.task is not None:
            p.task.cancel()          # its handler sees p.evicted, logs and closes

    # --- refusals --------------------------------------------------------------------------------

    @staticmethod
    def classify(exc: BaseException, tls_done: bool, timeout: float) -> tuple[str, str]:
        """(metric reason, log text) for a connection that failed before authenticating."""
        if isinstance(exc, TimeoutError):
            if not tls_done:
                return "timeout", f"no TLS handshake within {timeout:g} s"
            return "timeout", f"did not authenticate within {timeout:g} s of connecting"
        if not tls_done:
            what = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (
                str(exc) or type(exc).__name__)
            return "tls", f"TLS handshake failed: {what}"
        if isinstance(exc, FrameTooLarge):
            return "too_large", str(exc)
        if isinstance(exc, ProtocolError):
            return "malformed", f"malformed frame before authentication: {exc}"
        if isinstance(exc, LinkClosed):
            return "closed", f"closed the connection before authenticating ({exc})"
        if isinstance(exc, PeerRejected):
            return "not_paired", str(exc)
        if isinstance(exc, ReplicatorError):
            return "bad_proof", str(exc)
        if isinstance(exc, OSError):
            return "closed", f"connection lost before authenticating: {exc.strerror or exc!r}"
        return "error", f"unexpected {exc!r} before authentication"

    def refused(self, p: Pending, reason: str, text: str) -> str:
        """Count and log one refusal; returns the log line."""
        self.metrics.unauthenticated_refused.labels(reason).inc()
        line = f"refused {p.peer}: {text}"
        now = time.monotonic()
        if now - self._window_start >= LOG_WINDOW:
            self._flush()
            self._window_start, self._logged = now, 0
        if self._logged < LOG_BURST:
            self._logged += 1
            log.warning("%s", line)
        else:
            if not self._suppressed:
                loop = asyncio.get_running_loop()
                self._flush_handle = loop.call_later(
                    max(0.0, self._window_start + LOG_WINDOW - now), self._flush)
            self._suppressed[reason] += 1
        return line

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._suppressed:
            total = sum(self._suppressed.values())
            why = ", ".join(f"{r} {n}" for r, n in self._suppressed.most_common())
            log.warning("refused %d more unauthenticated connections in %g s, not logged one "
                        "by one (by reason: %s; see replicator_unauthenticated_refused_total)",
                        total, LOG_WINDOW, why)
            self._suppressed.clear()

    def close(self) -> None:
        """The sink stops: end every pending connection's handler."""
        self._flush()
        for group in list(self._by_key.values()):
            for p in group:
                if p.task is not None:
                    p.task.cancel()
