"""Every Prometheus metric replicator exports, defined in one place.

Each daemon owns a :class:`Metrics` with its own registry, so two daemons in one process (tests,
the demo) do not collide. Names carry the ``replicator_`` prefix and base units (bytes, seconds),
except the daemon's own process figures, which keep the names every exporter uses
(``process_cpu_seconds_total``, ...); its QEMU's are ``replicator_qemu_process_*``.

:class:`CpuUse` reads a process's CPU from ``/proc`` for the status API (the cost of staying
warm, as a share of one core).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, generate_latest)
from prometheus_client.metrics_core import Metric

from . import __version__
from .vmm.launch_record import proc_stat

_SWITCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: Why the sink closed a connection before it authenticated (see replicator.sink.admission).
UNAUTHENTICATED_REFUSALS = ("address_limit", "total_limit", "timeout", "tls", "too_large",
                            "malformed", "bad_proof", "not_paired", "closed", "error")
_ROUND_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """All metrics of one daemon."""

    def __init__(self, role: str = "source", domain: str = "vm"):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Info("replicator_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__, "role": role, "domain": domain})
        # The daemon's own CPU, memory and fds (a private registry lacks the default ones), and
        # those of the QEMU it drives once watch_qemu() says which.
        ProcessCollector(registry=r)
        self._qemu_pid: Callable[[], int | None] = lambda: None
        _QemuProcessCollector(lambda: self._qemu_pid(), r)

        # Lag (source view; the sink exports what it knows of it).
        self.lag_bytes = Gauge("replicator_lag_bytes",
                               "Bytes of guest RAM changed but not yet durable on the sink.",
                               registry=r)
        self.lag_pages = Gauge("replicator_lag_pages",
                               "Pages changed but not yet durable on the sink.", registry=r)
        self.lag_seconds = Gauge("replicator_lag_seconds",
                                 "Age of the oldest change not yet durable on the sink.",
                                 registry=r)
        self.dirty_rate = Gauge("replicator_dirty_rate_bytes_per_second",
                                "Rate at which the guest dirties RAM (moving average).",
                                registry=r)
        self.throughput = Gauge("replicator_link_throughput_bytes_per_second",
                                "Wire bytes per second sent to the peer (moving average).",
                                registry=r)
        self.bandwidth_limit = Gauge("replicator_bandwidth_limit_bytes_per_second",
                                     "Configured cap on wire bytes per second (0 = none).",
                                     registry=r)
        self.sent_bytes = Counter("replicator_sent_bytes",
                                  "Page bytes sent: raw (before compression) and wire (framed).",
                                  ["kind"], registry=r)
        self.pages_sent = Counter("replicator_pages_sent",
                                  "Pages sent, by encoding.", ["encoding"], registry=r)
        self.received_bytes = Counter("replicator_received_bytes",
                                      "Wire bytes received from the peer.", registry=r)
        self.pages_written = Counter("replicator_pages_written",
                                     "Pages written into the shadow store.", registry=r)
        self.round_seconds = Histogram("replicator_round_duration_seconds",
                                       "Duration of one dirty-tracking round (scan).",
                                       buckets=_ROUND_BUCKETS, registry=r)
        self.acked_epoch = Gauge("replicator_acked_epoch",
                                 "Last epoch the sink acknowledged as durable.", registry=r)
        self.peer_connected = Gauge("replicator_peer_connected",
                                    "1 while the replication link is up.", registry=r)
        self.reconnects = Counter("replicator_reconnects",
                                  "Times the replication link was re-established.", registry=r)
        self.switch_estimate = Gauge("replicator_switch_estimate_seconds",
                                     "Predicted downtime of a switch started now.", registry=r)
        self.ram_bytes = Gauge("replicator_domain_ram_bytes",
                               "Guest RAM being replicated.", registry=r)
        self.in_sync = Gauge("replicator_in_sync",
                             "1 when the last round found nothing left to send and all is acked.",
                             registry=r)

        # qemu-precopy relay.
        self.precopy_pacing = Gauge("replicator_precopy_pacing",
                                    "1 for the relay's current pacing state (idle bursts, "
                                    "backlog draining, switching).", ["state"], registry=r)

        # Disks (label ``disk``: the disk's position, 0 = the guest's first disk).
        self.disk_lag_bytes = Gauge("replicator_disk_lag_bytes",
                                    "Bytes of a disk written but not yet durable in the peer's "
                                    "copy (during a first copy: what is left to compare).",
                                    ["disk"], registry=r)
        self.disk_lag_blocks = Gauge("replicator_disk_lag_blocks",
                                     "Replication blocks (64 KiB) of a disk not yet durable in "
                                     "the peer's copy.", ["disk"], registry=r)
        self.disk_lag_seconds = Gauge("replicator_disk_lag_seconds",
                                      "Age of the oldest disk write not yet durable in the "
                                      "peer's copy.", ["disk"], registry=r)
        self.disk_sent_bytes = Counter("replicator_disk_sent_bytes",
                                       "Disk block bytes sent: raw (zero blocks included, "
                                       "before compression) and wire (framed).",
                                       ["disk", "kind"], registry=r)
        self.disk_written_bytes = Counter("replicator_disk_written_bytes",
                                          "Bytes written into the disk copies (sink).",
                                          ["disk"], registry=r)
        self.disk_bytes = Gauge("replicator_disk_size_bytes",
                                "Virtual size of each replicated disk.", ["disk"], registry=r)

        # Switches.
        self.switches = Counter("replicator_switches",
                                "Switches attempted, by mode and result.", ["mode", "result"],
                                registry=r)
        self.switch_downtime = Histogram("replicator_switch_downtime_seconds",
                                         "Pause on this host to running on the other.",
                                         ["mode"], buckets=_SWITCH_BUCKETS, registry=r)
        self.switch_duration = Histogram("replicator_switch_duration_seconds",
                                         "Switch request to running on the other host.",
                                         ["mode"], buckets=_SWITCH_BUCKETS, registry=r)
        self.switch_paths = Counter("replicator_switch_paths",
                                    "Successful switches by mode and the path they took: live "
                                    "(converged), throttled (converged once QEMU slowed the "
                                    "guest), stopped (paused to send the rest).",
                                    ["mode", "path"], registry=r)
        self.switch_throttles = Counter("replicator_switch_throttles",
                                        "Live switches past their live deadline, by the "
                                        "throttle used (none: straight to stop mode).",
                                        ["throttle"], registry=r)
        self.last_switch_downtime = Gauge("replicator_last_switch_downtime_seconds",
                                          "Downtime of the most recent successful switch.",
                                          registry=r)
        self.handed_over = Gauge("replicator_handed_over",
                                 "1 when this node handed the domain to its peer.", registry=r)

        # Sink / store.
        self.store_errors = Counter("replicator_store_errors",
                                    "Shadow store write failures (e.g. disk full).", registry=r)
        self.frames_rejected = Counter("replicator_frames_rejected",
                                       "Connections dropped for malformed or hostile frames.",
                                       registry=r)
        self.unauthenticated = Gauge("replicator_unauthenticated_connections",
                                     "Connections to the sink that have not authenticated yet.",
                                     registry=r)
        self.unauthenticated_refused = Counter(
            "replicator_unauthenticated_refused",
            "Connections closed before authenticating, by reason.", ["reason"], registry=r)
        # Export every label combination from the start (at 0): a series that first appears at
        # 1 looks like "no increase" to increase()/rate(), so the first switch (usually the
        # only one of a source's lifetime) would be invisible to dashboards and alerts.
        for mode in ("live", "stop"):
            for result in ("ok", "rolled_back", "unknown"):
                self.switches.labels(mode, result)
            self.switch_downtime.labels(mode)
            self.switch_duration.labels(mode)
        for mode, path in (("live", "live"), ("live", "throttled"), ("live", "stopped"),
                           ("stop", "stopped")):
            self.switch_paths.labels(mode, path)
        for throttle in ("dirty-limit", "auto-converge", "none"):
            self.switch_throttles.labels(throttle)
        for enc in ("zero", "compressed", "raw"):
            self.pages_sent.labels(enc)
        for kind in ("raw", "wire"):
            self.sent_bytes.labels(kind)
        for reason in UNAUTHENTICATED_REFUSALS:
            self.unauthenticated_refused.labels(reason)

    def watch_qemu(self, pid: Callable[[], int | None]) -> None:
        """Export ``replicator_qemu_process_*`` (CPU, memory, fds) of the QEMU whose pid
        ``pid()`` gives at each scrape: the domain's on the source, the shadow on the sink.
        No series while it gives None."""
        self._qemu_pid = pid

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _QemuProcessCollector(ProcessCollector):
    """prometheus_client's process figures for another process, found anew at each scrape."""

    def __init__(self, pid: Callable[[], int | None], registry: CollectorRegistry):
        self._find_pid = pid
        self._scraped: int | None = None
        super().__init__(namespace="replicator_qemu", pid=lambda: str(self._scraped),
                         registry=registry)

    def collect(self) -> Iterable[Metric]:
        try:
            self._scraped = self._find_pid()
        except Exception:                       # a status that cannot answer: no series
            self._scraped = None
        return super().collect() if self._scraped else []



_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float, int] | None:
    """(CPU seconds of all its threads, user + system; seconds since it started; its start
    time in clock ticks since boot) of ``pid`` from /proc, or None when it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        return None
    start = int(fields[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - start / _TICKS
    return (int(fields[11]) + int(fields[12])) / _TICKS, age, start


class CpuUse:
    """The share of one core processes used lately, from /proc samples taken when asked.

    No thread or timer: each :meth:`read` samples the process and compares with the oldest
    sample it kept within the last ``window`` seconds, if that is at least ``min_span`` old;
    otherwise (first read, process new) with the process's start.
    """

    def __init__(self, window: float = 10.0, min_span: float = 1.0):
        self.window = window
        self.min_span = min_span
        # (pid, start ticks) -> (monotonic, cpu seconds) samples, oldest first.
        self._samples: dict[tuple[int, int], deque[tuple[float, float]]] = {}

    def read(self, pid: int) -> dict[str, Any] | None:
        """``{"pid", "cpu_seconds", "percent", "over_seconds"}`` (``percent``: of one core,
        over the last ``over_seconds``), or None when the process is gone."""
        got = process_cpu(pid)
        if got is None:
            return None
        cpu, age, start = got
        now = time.monotonic()
        for key in [k for k, q in self._samples.items() if q[-1][0] < now - 6 * self.window]:
            del self._samples[key]               # processes nobody asked about lately
        kept = self._samples.setdefault((pid, start), deque())
        while len(kept) >= 2 and kept[1][0] <= now - self.window:
            kept.popleft()
        if kept and now - kept[0][0] >= self.min_span:
            span, used = now - kept[0][0], cpu - kept[0][1]
        else:
            span, used = age, cpu
        if not kept or now - kept[-1][0] >= self.min_span / 2:
            kept.append((now, cpu))
        return {"pid": pid, "cpu_seconds": round(cpu, 2),
                "percent": round(100 * used / span, 1) if span > 0 else 0.0,
                "over_seconds": round(span, 1)}
