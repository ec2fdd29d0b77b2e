"""replicator's "switch now" against QEMU's own live migration, same guest, same link, same run.

Run from the repository root, as root (network namespaces, tc)::

    .venv/bin/python -m bench.compare [--quick] [--out bench/RESULTS.md]

For every *cell* (link profile x guest RAM x dirty rate) it runs, one after the other:

1. **QEMU (a)**, precopy as a user runs it: default ``downtime-limit`` (300 ms),
   ``max-bandwidth`` = the link rate (loopback: 0 = unlimited). The destination QEMU is started
   with ``-incoming tcp:<lap address>:<port>`` under ``ip netns exec`` in the "lap" namespace,
   its RAM on a ``memory-backend-file`` (like the shadow). Before migrating, the source QEMU's
   CPU is sampled for a while: the **no-replication baseline** of the same guest.
2. **QEMU (b)**, QEMU's best tuning for the link: multifd, 2 channels, zstd compression,
   ``max-bandwidth`` 0 (the link limits). Multifd has to be enabled on the destination before it
   listens, so this destination starts with ``-incoming defer`` and then ``migrate-incoming`` on
   the same lap address.
   For both: total time = ``query-migrate`` ``total-time``; downtime = the destination's
   ``RESUME`` event minus the source's ``STOP`` event (QMP timestamps, one host clock).
3. **replicator, live switch**: two real daemons (``replicator run``), the sink in the lap
   namespace, the source in the desk namespace launching the VM, tracker ``scan``, TLS. The
   sink joins once the guest printed ``FILLED`` (the source retries until then), so the initial
   sync is the same bulk copy of a filled guest that QEMU's migration makes (time and rate are
   reported). After the initial sync settles, the source's ``/api/v1/status`` is polled every 200 ms for the
   steady-state window: lag p50/p99, source daemon and source QEMU CPU (``/proc/<pid>/stat``),
   wire bytes per dirtied page (dirtied = the guest's own ``DIRTY`` figure). Then
   ``POST /api/v1/switch {"mode": "live"}``.
4. **replicator, stop switch** on a fresh pair (new state, new VM): sync, then a ``stop`` switch.

Cross-check of every downtime: the guest prints ``COUNTER n`` every 0.5 s on absolute deadlines
of its own clock, which stands still while the VM is paused (TCG stops the virtual clock and
migration carries it over). So (host time of the destination's first line) - (host time of the
source's last line) - 0.5 s ~ downtime. Lines are time-stamped by an inotify watcher. The QEMU
rows calibrate this method against their QMP event timestamps.

Profiles: ``lan1g`` (tbf 1gbit), ``wifi`` (300mbit), ``lan100m`` (100mbit): two namespaces joined
by veth (desk 198.18.0.1, lap 198.18.0.2; ``tests/netns.py``), and ``loopback`` (127.0.0.1, no
namespaces, no shaping). Progress goes to stderr; the report (markdown, raw JSON at the end) to
``--out``. Everything runs under a private directory in /dev/shm that is removed at the end;
every QEMU and daemon started is killed and the namespaces are removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from replicator.cli import _request  # noqa: E402
from replicator.demo import _toml  # noqa: E402
from replicator.guestlog import counters
from replicator.identity import Identity  # noqa: E402
from replicator.vmm.qemu import QemuProcess  # noqa: E402
from replicator.vmm.spec import VmSpec, build_argv  # noqa: E402
from tests.netns import DESK_ADDR, LAP_ADDR, TwoHosts  # noqa: E402

MiB = 1024 * 1024
PAGE = 4096
GUEST = ROOT / "build" / "guest"
# not the DISKDIRTY lines of a guest that also writes its disk
DIRTY_RE = re.compile(rb"(?<!DISK)DIRTY (\d+(?:\.\d+)?)")
FILLED_RE = re.compile(rb"FILLED (\d+)")
FILL_PCT = 75
QEMU_PORT = 4444
PEER_PORT = 7400
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- what to run ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    rate: str | None            # tc tbf rate; None = loopback
    rate_bytes: float | None    # bytes/s
    desc: str


PROFILES = {
    "lan1g": Profile("lan1g", "1gbit", 125e6, "veth + tbf 1gbit, desk 198.18.0.1 -> lap 198.18.0.2"),
    "wifi": Profile("wifi", "300mbit", 37.5e6, "veth + tbf 300mbit, desk 198.18.0.1 -> lap 198.18.0.2"),
    "lan100m": Profile("lan100m", "100mbit", 12.5e6,
                       "veth + tbf 100mbit, desk 198.18.0.1 -> lap 198.18.0.2"),
    "loopback": Profile("loopback", None, None, "127.0.0.1, no namespaces, no shaping"),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    profile: str
    ram_mib: int
    dirty: float
    fill: float = 0             # percent of RAM the guest fills (and rewrites); 0: FILL_PCT

    @property
    def tag(self) -> str:
        return f"{self.profile}-{self.ram_mib}m-d{self.dirty:g}" + (
            f"-f{self.fill:g}" if self.fill else "")

    @property
    def fill_pct(self) -> float:
        return self.fill or FILL_PCT


# Quick: 512 MiB, lan1g + loopback, dirty=2.
QUICK = [Cell("lan1g", 512, 2), Cell("loopback", 512, 2)]
# Full: chosen to fit 30 minutes on this 2-core TCG machine (every cell costs about four copies
# of the filled RAM over its link, plus ~70 s of boots, fills, windows and switches). Sizes are
# swept on lan1g, dirty rates at 1 GiB on lan1g and 512 MiB on wifi and loopback, links at
# 512 MiB / dirty=2 (plus 1 GiB on wifi). Cells that would break the time budget are skipped
# and reported as such.
FULL = [   # interleaved across profiles, so that other load on the machine spreads over all
    Cell("lan1g", 512, 2), Cell("wifi", 512, 2), Cell("loopback", 512, 2),
    Cell("lan100m", 512, 2), Cell("lan1g", 1024, 0), Cell("wifi", 1024, 2),
    Cell("loopback", 512, 20), Cell("lan1g", 1024, 2), Cell("wifi", 512, 20),
    Cell("loopback", 1024, 2), Cell("lan1g", 1024, 20), Cell("lan1g", 2048, 2),
]


# --- process bookkeeping ------------------------------------------------------------------------

class Reaper:
    """Every process this benchmark starts, so that all of them die with it."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 20.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(p)

    def kill_pid(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.pids.discard(pid)

    def strays(self) -> list[int]:
        """Processes whose command line names our private work directory (ours, nobody else's)."""
        mark = str(self.work).encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if mark in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
        return found

    def kill_all(self) -> None:
        for p in list(self.procs):
            self.stop(p, grace=10)
        for pid in list(self.pids):
            self.kill_pid(pid)
        for pid in self.strays():
            self.kill_pid(pid)


# --- small measurement helpers ------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    rest = raw[raw.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


class CpuMeter:
    def __init__(self, pids: dict[str, int | None]):
        self.pids = {k: v for k, v in pids.items() if v}
        self.t0 = time.monotonic()
        self.c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def percent(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        return {k: round(100 * (cpu_seconds(p) - self.c0[k]) / dt, 1) for k, p in self.pids.items()}


def children_named(pid: int, comm_prefix: str) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for c in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{c}/comm").read_text().startswith(comm_prefix):
                        out.append(int(c))
    return out


def dirty_values(path: Path, start: int = 0) -> list[float]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return [float(x) for x in DIRTY_RE.findall(f.read())]
    except FileNotFoundError:
        return []


def filled_mib(path: Path) -> int | None:
    try:
        m = FILLED_RE.search(path.read_bytes())
    except FileNotFoundError:
        return None
    return int(m.group(1)) if m else None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CounterWatch(threading.Thread):
    """Stamps (host wall clock) every COUNTER line appended to some serial logs, via inotify.

    Each log should sit in a directory of its own (every write to that directory wakes us).
    """

    IN_MODIFY, IN_CREATE = 0x2, 0x100

    def __init__(self, paths: list[Path]):
        super().__init__(daemon=True)
        self.paths = paths
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for d in {p.parent for p in paths}:
            d.mkdir(parents=True, exist_ok=True)
            if self.libc.inotify_add_watch(self.fd, bytes(d), self.IN_MODIFY | self.IN_CREATE) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
        self.offsets = {p: (p.stat().st_size if p.exists() else 0) for p in paths}
        self.partial = {p: b"" for p in paths}
        self.lines: dict[Path, list[tuple[float, int]]] = {p: [] for p in paths}
        self._stop_r, self._stop_w = os.pipe()

    def _scan(self, now: float) -> None:
        for p in self.paths:
            try:
                with open(p, "rb") as f:
                    f.seek(self.offsets[p])
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            self.offsets[p] += len(data)
            buf = self.partial[p] + data
            *done, self.partial[p] = buf.split(b"\n")
            for line in done:
                m = re.search(rb"COUNTER (\d+)", line)
                if m:
                    self.lines[p].append((now, int(m.group(1))))

    def run(self) -> None:
        while True:
            r, _, _ = select.select([self.fd, self._stop_r], [], [], 1.0)
            if self._stop_r in r:
                break
            if self.fd in r:
                now = time.time()
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.fd, 65536):
                        pass
                self._scan(now)
        self._scan(time.time())

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def gap(self, src: Path, dst: Path) -> dict[str, Any]:
        """Counter hand-over: last line on src, first on dst, the downtime that implies."""
        s, d = self.lines[src], self.lines[dst]
        if not d:
            return {"ok": False, "why": "no COUNTER on the destination"}
        before = [x for x in s if x[0] <= d[0][0]]
        if not before:
            return {"ok": False, "why": "no COUNTER on the source during the watch"}
        (ts, ns), (td, nd) = before[-1], d[0]
        return {"ok": nd == ns + 1, "src_last": ns, "dst_first": nd,
                "downtime_ms": round((td - ts - 0.5) * 1000, 1)}


# --- the link -----------------------------------------------------------------------------------

class Net:
    """One link profile: two namespaces with tbf (via tests/netns.py), or plain loopback."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.hosts = TwoHosts.create(profile.rate) if profile.rate else None

    @property
    def desk(self) -> str:
        return DESK_ADDR if self.hosts else "127.0.0.1"

    @property
    def lap(self) -> str:
        return LAP_ADDR if self.hosts else "127.0.0.1"

    def prefix(self, host: str) -> list[str]:
        return self.hosts.exec_prefix(host) if self.hosts else []

    def tx_bytes(self) -> int | None:
        """Bytes the desk end of the veth sent (all traffic desk -> lap, with TCP/IP/TLS)."""
        if not self.hosts:
            return None
        out = subprocess.run(["ip", "-n", self.hosts.desk, "-s", "-j", "link", "show", "dev",
                              self.hosts.desk_if], check=True, capture_output=True, text=True)
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])

    def destroy(self) -> None:
        if self.hosts:
            self.hosts.destroy()


# --- waiting ------------------------------------------------------------------------------------

async def wait_for(cond, timeout: float, what: str, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not within {timeout:g} s")
        await asyncio.sleep(interval)


def append_line(cell: Cell) -> str:
    return f"console=ttyS0 quiet fill={cell.fill_pct:g} dirty={cell.dirty:g}"


def copy_estimate(cell: Cell, profile: Profile) -> float:
    """Seconds one copy of the filled RAM should take on this link (loopback: ~150 MB/s)."""
    rate = profile.rate_bytes or 150e6
    return cell.ram_mib * MiB * cell.fill_pct / 100 / (rate * 0.93)


# --- QEMU's own migration -----------------------------------------------------------------------

async def qemu_migration(ctx: "Ctx", cell: Cell, net: Net, variant: str,
                         baseline_seconds: float) -> dict[str, Any]:
    d = ctx.work / f"{cell.tag}-qemu-{variant}"
    (d / "serial").mkdir(parents=True)
    kernel, initrd = GUEST / "vmlinux", GUEST / "initramfs.cpio.gz"
    ram = cell.ram_mib * MiB
    src_serial, dst_serial = d / "serial" / "src.log", d / "serial" / "dst.log"

    def spec(name: str, serial: Path) -> VmSpec:
        return VmSpec(name=name, ram_bytes=ram, ram_path=d / f"{name}.ram", accel="tcg",
                      kernel=kernel, initrd=initrd, append=append_line(cell), serial_log=serial)

    port = QEMU_PORT if net.hosts else free_port()
    uri = f"tcp:{net.lap}:{port}"
    dst_incoming = uri if variant == "default" else "defer"
    src_argv = net.prefix("desk") + build_argv(spec("src", src_serial), d / "src.qmp")
    dst_argv = net.prefix("lap") + build_argv(spec("dst", dst_serial), d / "dst.qmp") + [
        "-incoming", dst_incoming]
    out: dict[str, Any] = {"variant": variant, "uri": uri}
    procs = []
    src = dst = None
    try:
        for name, argv in (("dst", dst_argv), ("src", src_argv)):
            procs.append(ctx.reaper.popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(d / f"{name}.stderr", "wb")))
        await wait_for(lambda: (d / "dst.qmp").exists() and (d / "src.qmp").exists(), 30,
                       "QEMU QMP sockets")
        dst = await QemuProcess.attach(d / "dst.qmp", workdir=d)
        src = await QemuProcess.attach(d / "src.qmp", workdir=d)
        t_boot = time.monotonic()
        out["filled_mib"] = await wait_for(lambda: filled_mib(src_serial), 180,
                                           "FILLED from the source guest", 0.2)
        out["fill_seconds_after_start"] = round(time.monotonic() - t_boot, 1)
        if baseline_seconds:
            # No replication, no migration: what the guest alone costs its QEMU.
            await asyncio.sleep(1.0)
            off = src_serial.stat().st_size
            meter = CpuMeter({"qemu": src.pid})
            await asyncio.sleep(baseline_seconds)
            out["baseline_qemu_cpu_pct"] = meter.percent()["qemu"]
            out["baseline_dirty"] = dirty_values(src_serial, off)
        if variant == "default":
            await src.execute("migrate-set-parameters",
                              {"max-bandwidth": int(net.profile.rate_bytes or 0)})
        else:
            for q in (src, dst):
                await q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "multifd", "state": True}]})
                await q.execute("migrate-set-parameters", {
                    "multifd-channels": 2, "multifd-compression": "zstd"})
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await dst.execute("migrate-incoming", {"uri": uri})
        params = await src.execute("query-migrate-parameters")
        out["params"] = {k: params.get(k) for k in (
            "downtime-limit", "max-bandwidth", "multifd-channels", "multifd-compression")}
        watch = CounterWatch([src_serial, dst_serial])
        watch.start()
        try:
            await asyncio.sleep(0.7)
            mark_s, mark_d = src.event_mark(), dst.event_mark()
            tx0 = net.tx_bytes()
            t0 = time.monotonic()
            await src.execute("migrate", {"uri": uri})
            limit = 4 * copy_estimate(cell, net.profile) + 60
            info: dict[str, Any] = {}
            while True:
                info = await src.execute("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > limit:
                    await src.execute("migrate_cancel")
                    out["error"] = f"did not converge within {limit:.0f} s"
                    break
                await asyncio.sleep(0.2)
            out["status"] = info.get("status")
            if info.get("status") == "completed":
                resume = await dst.wait_event("RESUME", timeout=60, after=mark_d)
                stop = next(e for e in src.events if e.seq > mark_s and e.name == "STOP")
                out["downtime_ms"] = round((resume.qemu_wall - stop.qemu_wall) * 1000, 1)
                out["qemu_reported_downtime_ms"] = info.get("downtime")
                out["total_ms"] = info.get("total-time")
                out["migrate_to_resume_ms"] = round((resume.monotonic - t0) * 1000, 1)
                ramst = info.get("ram") or {}
                out["transferred_bytes"] = ramst.get("transferred")
                out["dirty_syncs"] = ramst.get("dirty-sync-count")
                out["throughput_MBps"] = round(
                    ramst.get("transferred", 0) / max(info.get("total-time", 1), 1) / 1000, 1)
                tx1 = net.tx_bytes()
                if tx0 is not None and tx1 is not None:
                    out["link_bytes"] = tx1 - tx0
                await wait_for(lambda: len(counters(dst_serial)) >= 2, 20,
                               "two COUNTER lines on the destination")
            else:
                out.setdefault("error", f"migration {info.get('status')}: "
                                        f"{info.get('error-desc', '')}")
                out["last_info"] = {k: info.get(k) for k in ("status", "total-time", "ram")}
        finally:
            watch.stop()
        out["counter"] = watch.gap(src_serial, dst_serial)
        out["dirty_all"] = dirty_values(src_serial)
        return out
    finally:
        for q in (src, dst):
            if q is not None:
                with contextlib.suppress(Exception):
                    await q.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            with contextlib.suppress(ValueError):
                ctx.reaper.procs.remove(p)
        shutil.rmtree(d, ignore_errors=True)


# --- replicator ---------------------------------------------------------------------------------

async def api(sock: Path, method: str, path: str, token: str | None = None,
              body: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
    return await _request(method, f"unix:{sock}", path, token, body, timeout)


async def round_stats(sock: Path) -> tuple[float, float]:
    """(count, total seconds) of the source's dirty-tracking rounds, from its /metrics."""
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get("http://localhost/metrics") as r:
            text = await r.text()
    vals = {}
    for line in text.splitlines():
        for k in ("count", "sum"):
            if line.startswith(f"replicator_round_duration_seconds_{k} "):
                vals[k] = float(line.split()[1])
    return vals.get("count", 0.0), vals.get("sum", 0.0)


@dataclasses.dataclass
class Pair:
    """One replicator run: two daemons (the source launching the VM), their files and API."""
    d: Path
    listen: str
    source: subprocess.Popen | None = None
    sink: subprocess.Popen | None = None
    token: str = ""
    qemu_pid: int | None = None
    shadow_pid: int | None = None

    desk = property(lambda self: self.d / "desk")
    lap = property(lambda self: self.d / "lap")
    desk_serial = property(lambda self: self.d / "serial-desk" / "desk.log")
    lap_serial = property(lambda self: self.d / "serial-lap" / "shadow.log")
    desk_sock = property(lambda self: self.d / "desk.sock")
    lap_sock = property(lambda self: self.d / "lap.sock")


def pair_configs(ctx: "Ctx", cell: Cell, net: Net, d: Path, *, append: str | None = None,
                 desk_qemu: dict[str, Any] | None = None,
                 stream: dict[str, Any] | None = None) -> Pair:
    """Write both daemons' configs under ``d``. ``append``/``desk_qemu``/``stream``: a caller's
    kernel command line, extra ``domain.qemu`` keys of the desktop VM, extra ``stream`` keys."""
    pair = Pair(d, "")
    for p in (pair.desk, pair.lap, pair.desk_serial.parent, pair.lap_serial.parent):
        p.mkdir(parents=True)
    desk_id = Identity.load_or_create(pair.desk / "identity", "desktop").node_id
    lap_id = Identity.load_or_create(pair.lap / "identity", "laptop").node_id
    q = {"ram_size": cell.ram_mib * MiB, "vcpus": 1, "accel": "tcg",
         "kernel": str(GUEST / "vmlinux"), "initrd": str(GUEST / "initramfs.cpio.gz"),
         "append": append or append_line(cell)}
    # The sink listens on a fixed address: it joins only once the guest has filled its RAM.
    pair.listen = listen = f"{LAP_ADDR}:{PEER_PORT}" if net.hosts else f"127.0.0.1:{free_port()}"
    (d / "lap.toml").write_text(_toml({
        "node": {"name": "laptop", "role": "sink", "state_dir": str(pair.lap)},
        "domain": {"name": "vm", "driver": "qemu", "tracker": "scan",
                   "qemu": {**q, "serial_log": str(pair.lap_serial)}},
        "peer": {"listen": listen, "id": desk_id},
        "control": {"listen": f"unix:{pair.lap_sock}"}}))
    (d / "desk.toml").write_text(_toml({
        "node": {"name": "desktop", "role": "source", "state_dir": str(pair.desk)},
        "domain": {"name": "vm", "driver": "qemu", "tracker": ctx.tracker, "qemu": {
            **q, "launch": True, "ram_path": str(d / "desk-ram"),
            "serial_log": str(pair.desk_serial), **(desk_qemu or {})}},
        # A short first retry delay: the source keeps trying until the sink joins.
        "stream": {"reconnect_delay": 0.1, **(stream or {})},
        "peer": {"address": listen, "id": lap_id},
        "control": {"listen": f"unix:{pair.desk_sock}"}}))
    return pair


async def start_daemon(ctx: "Ctx", net: Net, pair: Pair, role: str) -> None:
    """Start the ``source`` (desk namespace; it launches the VM) or the ``sink`` (lap) and
    wait for its control socket."""
    host, sock = ("desk", pair.desk_sock) if role == "source" else ("lap", pair.lap_sock)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    verbose = ["-v"] if ctx.verbose else []
    p = ctx.reaper.popen(
        net.prefix(host) + [sys.executable, "-m", "replicator.cli", *verbose, "run", "-c",
                            str(pair.d / f"{host}.toml")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(pair.d / f"{host}.log", "wb"))
    setattr(pair, role, p)
    await wait_for(lambda: sock.exists() or p.poll() is not None,
                   90 if role == "source" else 60, f"{role} daemon")
    if p.poll() is not None:
        raise RuntimeError(f"{role} daemon exited: " + (pair.d / f"{host}.log").read_text()[-1500:])
    if role == "source":
        pair.token = (pair.desk / "api-token").read_text().strip()
        pair.qemu_pid = (children_named(p.pid, "qemu") or [None])[0]


SWITCH_KEYS = ("result", "downtime_ms", "time_to_switch_ms", "catchup_rounds",
               "final_delta_pages", "final_delta_bytes", "device_state_bytes",
               "shadow_verified", "path", "throttle", "throttle_percent",
               "live_deadline_s", "stop_deadline_s")


async def switch_watched(ctx: "Ctx", pair: Pair, mode: str, out: dict[str, Any],
                         keys: tuple[str, ...] = SWITCH_KEYS) -> None:
    """POST /api/v1/switch, watched through the guest's counter; the report's ``keys``, the
    counter gap and both sides' state after it go into ``out``."""
    desk_sock, lap_sock = pair.desk_sock, pair.lap_sock
    desk_serial, lap_serial = pair.desk_serial, pair.lap_serial
    watch = CounterWatch([desk_serial, lap_serial])
    watch.start()
    try:
        await asyncio.sleep(0.7)
        rs0 = await round_stats(desk_sock)
        t0 = time.monotonic()
        code, res = await api(desk_sock, "POST", "/api/v1/switch", pair.token, {"mode": mode},
                              timeout=600)
        with contextlib.suppress(Exception):
            rs1 = await round_stats(desk_sock)
            # rounds that ran during the switch (catch-up + final, maybe one in flight)
            out["switch_rounds"] = int(rs1[0] - rs0[0])
            out["switch_rounds_ms"] = round(1000 * (rs1[1] - rs0[1]), 1)
        out["api_seconds"] = round(time.monotonic() - t0, 3)
        out["http"] = code
        if code != 200:
            out["error"] = f"switch answered {code}: {res}"
        else:
            out["result"] = {k: res.get(k) for k in keys}
            out["downtime_ms"] = round(res["downtime_ms"], 1)
            out["time_to_switch_ms"] = round(res["time_to_switch_ms"], 1)
            await wait_for(lambda: len(counters(lap_serial)) >= 2, 30,
                           "two COUNTER lines on the laptop's VM")
    finally:
        watch.stop()
    out["counter"] = watch.gap(desk_serial, lap_serial)
    # The source's own prediction before the pause (its INFO log line; live mode only).
    pred = re.findall(rb"predicted final delta ([0-9.]+) ms", (pair.d / "desk.log").read_bytes())
    out["predicted_downtime_ms"] = float(pred[-1]) if pred else None
    _, sst = await api(lap_sock, "GET", "/api/v1/status")
    pair.shadow_pid = (sst.get("shadow") or {}).get("pid")
    if pair.shadow_pid:
        ctx.reaper.pids.add(pair.shadow_pid)
    _, dst = await api(desk_sock, "GET", "/api/v1/status")
    out["handed_over"] = dst.get("handed_over")
    out["runs_on_laptop"] = sst.get("runs_domain")
    out["laptop_domain_state"] = sst.get("domain_state")
    out["total_wire_bytes"] = dst.get("sent_bytes", {}).get("wire")
    out["dirty_all"] = dirty_values(desk_serial)


async def end_pair(ctx: "Ctx", pair: Pair) -> None:
    """Stop both daemons, the laptop's VM and anything else of this run; keep logs if asked;
    remove the run's directory."""
    d, sink = pair.d, pair.sink
    if pair.shadow_pid is None and sink is not None and sink.poll() is None:
        with contextlib.suppress(Exception):
            _, sst = await api(pair.lap_sock, "GET", "/api/v1/status", timeout=5)
            pair.shadow_pid = (sst.get("shadow") or {}).get("pid")
    for p in (pair.source, sink):
        if p is not None:
            ctx.reaper.stop(p)
    if pair.shadow_pid:
        ctx.reaper.kill_pid(pair.shadow_pid)
    for pid in ctx.reaper.strays():
        with contextlib.suppress(OSError):
            if str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                ctx.reaper.kill_pid(pid)
    if ctx.keep_logs:
        keep = ctx.keep_logs / d.name
        keep.mkdir(parents=True, exist_ok=True)
        for f in ("desk.log", "lap.log"):
            with contextlib.suppress(OSError):
                shutil.copy(d / f, keep / f)
    shutil.rmtree(d, ignore_errors=True)


async def replicator_switch(ctx: "Ctx", cell: Cell, net: Net, mode: str,
                            window: float) -> dict[str, Any]:
    pair = pair_configs(ctx, cell, net, ctx.work / f"{cell.tag}-rep-{mode}")
    desk_serial, desk_sock = pair.desk_serial, pair.desk_sock
    out: dict[str, Any] = {"mode": mode}
    try:
        t_start = time.monotonic()
        await start_daemon(ctx, net, pair, "source")
        source, qemu_pid = pair.source, pair.qemu_pid
        out["qemu_pid_found"] = qemu_pid is not None
        out["filled_mib"] = fill = await wait_for(lambda: filled_mib(desk_serial), 180,
                                                  "FILLED from the desk guest", 0.2)
        out["filled_after_start_s"] = round(time.monotonic() - t_start, 1)
        await start_daemon(ctx, net, pair, "sink")
        t_sink = time.monotonic()
        # Initial sync (the same bulk copy QEMU's migration makes): settled once everything the
        # guest filled went over and the lag stayed small for 0.6 s.
        thresh = max(8 * MiB, 2 * cell.dirty * MiB)
        busy = cell.dirty * MiB >= 0.5 * (net.profile.rate_bytes or 150e6)
        if busy:
            # A guest near or past the link never gets much closer than its rewritten area
            # (and a held-open precopy migration never gets "in sync").
            thresh = max(thresh, fill * MiB)
        samples: list[tuple[float, int]] = []
        streak = 0
        t_conn = None
        limit = 4 * copy_estimate(cell, net.profile) + 90
        st: dict[str, Any] = {}
        while True:
            _, st = await api(desk_sock, "GET", "/api/v1/status")
            now = time.monotonic()
            wire = st.get("sent_bytes", {}).get("wire", 0)
            samples.append((now, wire))
            connected = st.get("peer", {}).get("connected")
            if connected and t_conn is None:
                t_conn = now
            lag = (st.get("lag") or {}).get("bytes", 1 << 62)
            proven = st.get("acked_epoch", 0) >= 2 or (busy and ctx.tracker == "qemu-precopy")
            small = st.get("in_sync") or (proven and lag <= thresh)
            streak = streak + 1 if (connected and small and wire >= 0.9 * fill * MiB) else 0
            if streak >= 3:
                break
            if now - t_sink > limit:
                raise TimeoutError(f"initial sync not settled within {limit:.0f} s "
                                   f"(lag {lag} bytes, wire {wire}, {st.get('peer')})")
            await asyncio.sleep(0.2)
        out["sink_joined_to_connected_s"] = round((t_conn or now) - t_sink, 2)
        # 3 samples of 0.2 s confirmed it: settled at the first of them
        out["initial_sync_s"] = round(now - 0.4 - (t_conn or t_sink), 2)
        lo = next((s for s in samples if s[1] >= 0.1 * fill * MiB), None)
        hi = next((s for s in samples if s[1] >= 0.9 * fill * MiB), None)
        if lo and hi and hi[0] > lo[0]:
            out["sync_MBps"] = round((hi[1] - lo[1]) / (hi[0] - lo[0]) / 1e6, 1)
            out["sync_span_s"] = round(hi[0] - lo[0], 2)
        out["sync_wire_bytes"] = st["sent_bytes"]["wire"]
        if window:
            # Steady state: lag, CPU, bytes per dirtied page.
            off = desk_serial.stat().st_size
            meter = CpuMeter({"daemon": source.pid, "qemu": qemu_pid})
            tx0, w0 = net.tx_bytes(), st["sent_bytes"]
            r0 = await round_stats(desk_sock)
            t0 = time.monotonic()
            lag_s, lag_b, insync = [], [], 0
            while time.monotonic() - t0 < window:
                await asyncio.sleep(0.2)
                _, st = await api(desk_sock, "GET", "/api/v1/status")
                lag_s.append(st["lag"]["seconds"])
                lag_b.append(st["lag"]["bytes"])
                insync += bool(st.get("in_sync"))
            dt = time.monotonic() - t0
            cpu = meter.percent()
            r1 = await round_stats(desk_sock)
            tx1, w1 = net.tx_bytes(), st["sent_bytes"]
            dirty = dirty_values(desk_serial, off)
            rate = statistics.median(dirty) if dirty else None
            wire, raw = w1["wire"] - w0["wire"], w1["raw"] - w0["raw"]
            steady = {
                "seconds": round(dt, 1), "samples": len(lag_s),
                "lag_p50_ms": round(pct(lag_s, 0.5) * 1000, 1),
                "lag_p99_ms": round(pct(lag_s, 0.99) * 1000, 1),
                "lag_p50_KiB": round(pct(lag_b, 0.5) / 1024, 1),
                "lag_p99_KiB": round(pct(lag_b, 0.99) / 1024, 1),
                "in_sync_share": round(insync / max(len(lag_s), 1), 2),
                "daemon_cpu_pct": cpu.get("daemon"), "qemu_cpu_pct": cpu.get("qemu"),
                "wire_bytes": wire, "raw_bytes": raw,
                "wire_MBps": round(wire / dt / 1e6, 3),
                "guest_dirty_MiBps": rate, "dirty_lines": dirty,
                "link_bytes": (tx1 - tx0) if tx0 is not None else None,
                "status_dirty_rate_MiBps": round(st["dirty_rate_bytes_per_second"] / MiB, 2),
                "scan_rounds_per_s": round((r1[0] - r0[0]) / dt, 2),
                "scan_round_mean_ms": (round(1000 * (r1[1] - r0[1]) / (r1[0] - r0[0]), 1)
                                       if r1[0] > r0[0] else None),
            }
            if rate:
                dirtied_pages = rate * MiB * dt / PAGE
                steady["dirtied_pages"] = round(dirtied_pages)
                steady["wire_bytes_per_dirtied_page"] = round(wire / dirtied_pages)
                steady["pages_sent_per_dirtied_page"] = round(raw / PAGE / dirtied_pages, 3)
                if steady["link_bytes"] is not None:
                    steady["link_bytes_per_dirtied_page"] = round(steady["link_bytes"]
                                                                  / dirtied_pages)
            out["steady"] = steady
        else:
            await asyncio.sleep(2.0)
        await switch_watched(ctx, pair, mode, out)
        return out
    finally:
        await end_pair(ctx, pair)


# --- orchestration ------------------------------------------------------------------------------

@dataclasses.dataclass
class Ctx:
    work: Path
    reaper: Reaper
    keep_logs: Path | None = None
    verbose: bool = False
    tracker: str = "scan"


async def guarded(what: str, coro) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        res = await coro
    except Exception as exc:  # one failed run must not sink the whole benchmark
        log(f"  {what} FAILED: {type(exc).__name__}: {exc}")
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def run_cell(ctx: Ctx, cell: Cell, net: Net, window: float,
                   baseline: float) -> dict[str, Any]:
    res: dict[str, Any] = {"cell": dataclasses.asdict(cell), "load_before": loadavg()}
    t0 = time.monotonic()
    log(f"{cell.tag}: QEMU (a) precopy, default downtime-limit, max-bandwidth = link")
    res["qemu_a"] = await guarded("QEMU (a)", qemu_migration(ctx, cell, net, "default", baseline))
    log(f"  -> {brief(res['qemu_a'])}")
    log(f"{cell.tag}: QEMU (b) multifd 2 channels + zstd")
    res["qemu_b"] = await guarded("QEMU (b)", qemu_migration(ctx, cell, net, "multifd", 0))
    log(f"  -> {brief(res['qemu_b'])}")
    log(f"{cell.tag}: replicator, live switch after {window:g} s of steady state")
    res["rep_live"] = await guarded("replicator live",
                                    replicator_switch(ctx, cell, net, "live", window))
    log(f"  -> {brief(res['rep_live'])}")
    log(f"{cell.tag}: replicator, stop switch (fresh pair)")
    res["rep_stop"] = await guarded("replicator stop",
                                    replicator_switch(ctx, cell, net, "stop", 0))
    log(f"  -> {brief(res['rep_stop'])}")
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["load_after"] = loadavg()
    return res


def brief(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"ERROR {r['error']} ({r.get('wall_s')} s)"
    parts = []
    if "total_ms" in r:
        parts.append(f"total {r['total_ms']} ms")
    if "time_to_switch_ms" in r:
        parts.append(f"time to switch {r['time_to_switch_ms']} ms")
    if "downtime_ms" in r:
        parts.append(f"downtime {r['downtime_ms']} ms")
    c = r.get("counter") or {}
    if "downtime_ms" in c:
        parts.append(f"counter gap {c['downtime_ms']} ms, continuous {c['ok']}")
    if "steady" in r:
        s = r["steady"]
        parts.append(f"lag p50/p99 {s['lag_p50_ms']}/{s['lag_p99_ms']} ms, daemon CPU "
                     f"{s['daemon_cpu_pct']}%, QEMU CPU {s['qemu_cpu_pct']}%")
    parts.append(f"({r.get('wall_s')} s)")
    return ", ".join(parts)


def machine_facts() -> dict[str, Any]:
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "cpu": model,
        "mem_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(), "qemu": qv, "accel": "tcg (KVM does not run guests here)",
        "python": platform.python_version(),
        "commit": commit + (" (+ uncommitted changes in the tree)" if dirty else ""),
        "load_at_start": loadavg(),
    }


# --- report -------------------------------------------------------------------------------------

def _ms(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "—"
    r = a / b
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}"


def _cell_dirty(res: dict[str, Any]) -> str:
    vals = []
    for k in ("qemu_a", "qemu_b", "rep_live", "rep_stop"):
        vals += (res.get(k) or {}).get("dirty_all") or []
    st = (res.get("rep_live") or {}).get("steady") or {}
    set_ = res["cell"]["dirty"]
    if not vals:
        return f"{set_:g} → no DIRTY lines" if set_ else "0 (idle)"
    med = statistics.median(vals)
    s = f"{set_:g} → {med:.1f}"
    if st.get("guest_dirty_MiBps") is not None:
        s += f" (window {st['guest_dirty_MiBps']:.1f})"
    return s


def _fill(res: dict[str, Any]) -> str:
    f = next((res[k].get("filled_mib") for k in ("qemu_a", "qemu_b", "rep_live", "rep_stop")
              if (res.get(k) or {}).get("filled_mib")), None)
    return f"{f} MiB" if f else "—"


def _qemu_cell(r: dict[str, Any]) -> tuple[str, str]:
    if r.get("error"):
        return ("FAILED: " + str(r["error"])[:60], "—")
    return _ms(r.get("total_ms")), _ms(r.get("downtime_ms"))


def _rep_cell(r: dict[str, Any]) -> tuple[str, str]:
    if r.get("error"):
        return ("FAILED: " + str(r["error"])[:60], "—")
    return _ms(r.get("time_to_switch_ms")), _ms(r.get("downtime_ms"))


def render(facts: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace,
           runtime: float, skipped: list[Cell]) -> str:
    L: list[str] = []
    w = L.append
    w("# replicator vs QEMU live migration: same guest, same link, same run")
    w("")
    w(f"Generated by `.venv/bin/python -m bench.compare{' --quick' if args.quick else ''}` "
      f"(bench/compare.py). Every figure below was measured in this run; nothing is copied in.")
    w("")
    w("## Machine")
    w("")
    w("| fact | value |")
    w("|---|---|")
    for k in ("date", "cores", "cpu", "mem_GiB", "kernel", "qemu", "accel", "python", "commit"):
        w(f"| {k} | {facts[k]} |")
    w(f"| load average (1/5/15 min) at start / end | {facts['load_at_start']} / "
      f"{facts.get('load_at_end')} |")
    w(f"| benchmark runtime | {runtime / 60:.1f} min ({len(results)} cells"
      f"{f', {len(skipped)} skipped for time' if skipped else ''}) |")
    w("")
    w("## How to read the tables")
    w("")
    w("* **QEMU (a)**: precopy as a user runs it (downtime-limit 300 ms default, max-bandwidth = "
      "link rate; loopback: unlimited). **QEMU (b)**: multifd, 2 channels, zstd, max-bandwidth "
      "unlimited. *total* = `query-migrate` total-time; *downtime* = destination `RESUME` − "
      "source `STOP` (QMP event timestamps, one host clock). The destination runs in the lap "
      "namespace with `-incoming` on 198.18.0.2 and RAM on a memory-backend-file.")
    w("* **replicator live / stop**: two real daemons (sink in the lap namespace, source in the "
      f"desk namespace, TLS, tracker `{args.tracker}`); *switch* = the switch result's "
      "time_to_switch_ms "
      "(request → running on the laptop); *downtime* = its downtime_ms (source pause → the "
      "sink's QEMU `RESUME` timestamp). Stop mode runs on a fresh pair.")
    w("* **Ratios** are replicator / QEMU: downtime ratio = replicator downtime / QEMU downtime; "
      "time ratio = replicator time-to-switch / QEMU total migration time. Below 1 means "
      "replicator is better. The replicator's initial sync (a full copy, like QEMU's; the sink "
      "joins once the guest has filled its RAM) happened before, in the background, while the "
      "VM ran: that is the product's claim.")
    w("* **dirty MiB/s**: the setting → the guest's own `DIRTY` reports (median over the cell; "
      "\"window\" = during replicator's steady-state window).")
    w("* **counter gap**: independent cross-check of each downtime from the guest's 0.5 s "
      "`COUNTER` lines (host time of the first line on the destination − last on the source − "
      "0.5 s, inotify time stamps); ✓ = the counter continued n → n+1. *source's prediction* "
      "= the downtime the source daemon predicted after its last catch-up round (its log).")
    w("* Cells ran interleaved across profiles; each row's cell wall time and the machine's load "
      "average before → after it are in the cross-check table (other jobs shared the machine).")
    w("")
    by_profile: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_profile.setdefault(r["cell"]["profile"], []).append(r)
    for pname in [p for p in PROFILES if p in by_profile]:
        rows = sorted(by_profile[pname], key=lambda r: (r["cell"]["ram_mib"], r["cell"]["dirty"]))
        prof = PROFILES[pname]
        w(f"## {pname}: {prof.desc}")
        w("")
        w("### Switch vs migration")
        w("")
        w("| guest | fill | dirty MiB/s | QEMU (a) total | QEMU (a) downtime | QEMU (b) total | "
          "QEMU (b) downtime | repl. live switch | repl. live downtime | repl. stop switch | "
          "repl. stop downtime | downtime ratio live/a · live/b | time ratio live/a · live/b | "
          "downtime ratio stop/a · stop/b | time ratio stop/a · stop/b |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, b, lv, sp = (r.get(k) or {} for k in ("qemu_a", "qemu_b", "rep_live", "rep_stop"))
            cells = [f"{r['cell']['ram_mib']} MiB", _fill(r), _cell_dirty(r), *_qemu_cell(a),
                     *_qemu_cell(b), *_rep_cell(lv), *_rep_cell(sp)]
            for rep in (lv, sp):
                cells.append(f"{_ratio(rep.get('downtime_ms'), a.get('downtime_ms'))} · "
                             f"{_ratio(rep.get('downtime_ms'), b.get('downtime_ms'))}")
                cells.append(f"{_ratio(rep.get('time_to_switch_ms'), a.get('total_ms'))} · "
                             f"{_ratio(rep.get('time_to_switch_ms'), b.get('total_ms'))}")
            # reorder: live dt, live time, stop dt, stop time already in that order
            w("| " + " | ".join(cells) + " |")
        w("")
        w("### replicator steady state (before the live switch) and switch details")
        w("")
        w("| guest | dirty MiB/s | initial sync (full copy): time, rate (% of link), live pair / "
          "stop pair | QEMU (a) migration: time, rate | lag p50 / p99 | "
          "lag p50 / p99 KiB | source daemon CPU (scan rounds/s × mean scan) | "
          "source QEMU CPU (no-repl. baseline) | "
          "wire B / dirtied page (link B) | live: catch-up rounds, final delta, time before the "
          "pause, scans during the switch | stop: final delta, time before the pause, scans | "
          "device state |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, lv, sp = (r.get(k) or {} for k in ("qemu_a", "rep_live", "rep_stop"))
            s = lv.get("steady") or {}
            link = prof.rate_bytes

            def rate(v: Any) -> str:
                if v is None:
                    return "—"
                return f"{v:.1f} MB/s" + (f" ({100 * v * 1e6 / link:.0f}%)" if link else "")

            def sync(x: dict[str, Any]) -> str:
                if x.get("initial_sync_s") is None:
                    return "—"
                return f"{x['initial_sync_s']:.1f} s, {rate(x.get('sync_MBps'))}"
            sync_s = f"{sync(lv)} / {sync(sp)}"
            qa_s = (f"{_ms(a.get('total_ms'))}, {rate(a.get('throughput_MBps'))}"
                    if a.get("total_ms") else "—")
            wpp = s.get("wire_bytes_per_dirtied_page")
            lpp = s.get("link_bytes_per_dirtied_page")
            wpp_s = "— (idle: " + f"{s.get('wire_MBps', 0) * 1000:.1f} kB/s wire)" \
                if wpp is None and s else ("—" if wpp is None else
                                           f"{wpp}" + (f" ({lpp})" if lpp is not None else ""))
            lres, sres = lv.get("result") or {}, sp.get("result") or {}
            w("| " + " | ".join([
                f"{r['cell']['ram_mib']} MiB", _cell_dirty(r), sync_s, qa_s,
                f"{_ms(s.get('lag_p50_ms'))} / {_ms(s.get('lag_p99_ms'))}" if s else "—",
                f"{s.get('lag_p50_KiB')} / {s.get('lag_p99_KiB')}" if s else "—",
                (f"{s.get('daemon_cpu_pct')}% ({s.get('scan_rounds_per_s')} scans/s × "
                 f"{_ms(s.get('scan_round_mean_ms'))})" if s else "—"),
                (f"{s.get('qemu_cpu_pct')}% ({a.get('baseline_qemu_cpu_pct')}%)" if s else "—"),
                wpp_s,
                (f"{lres.get('catchup_rounds')}, {lres.get('final_delta_pages')} pages; "
                 f"{_ms(lv['time_to_switch_ms'] - lv['downtime_ms'])} before the pause; "
                 f"{lv.get('switch_rounds')} scans = {_ms(lv.get('switch_rounds_ms'))}"
                 if lres else "—"),
                (f"{sres.get('final_delta_pages')} pages; "
                 f"{_ms(sp['time_to_switch_ms'] - sp['downtime_ms'])} before the pause; "
                 f"{sp.get('switch_rounds')} scans = {_ms(sp.get('switch_rounds_ms'))}"
                 if sres else "—"),
                (f"{(lres.get('device_state_bytes') or 0) / 1024:.0f} KiB" if lres else "—"),
            ]) + " |")
        w("")
        w("### Cross-checks")
        w("")
        w("| guest | dirty set | QEMU (a): event downtime / counter gap / QEMU's own | "
          "QEMU (b): event / counter / own | repl. live: API / counter gap / source's prediction | "
          "repl. stop: API / counter gap | QEMU (a) sent, dirty syncs | QEMU (b) sent | "
          "repl. total wire (live pair) | cell wall time |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, b, lv, sp = (r.get(k) or {} for k in ("qemu_a", "qemu_b", "rep_live", "rep_stop"))

            def cg(x: dict[str, Any]) -> str:
                c = x.get("counter") or {}
                if "downtime_ms" not in c:
                    return c.get("why", "—")
                return f"{_ms(c['downtime_ms'])} {'✓' if c.get('ok') else '✗ ' + str(c)}"

            def mb(v: Any) -> str:
                return "—" if v is None else f"{v / MiB:.0f} MiB"
            w("| " + " | ".join([
                f"{r['cell']['ram_mib']} MiB", f"{r['cell']['dirty']:g}",
                f"{_ms(a.get('downtime_ms'))} / {cg(a)} / {_ms(a.get('qemu_reported_downtime_ms'))}",
                f"{_ms(b.get('downtime_ms'))} / {cg(b)} / {_ms(b.get('qemu_reported_downtime_ms'))}",
                f"{_ms(lv.get('downtime_ms'))} / {cg(lv)} / {_ms(lv.get('predicted_downtime_ms'))}",
                f"{_ms(sp.get('downtime_ms'))} / {cg(sp)}",
                f"{mb(a.get('transferred_bytes'))}, {a.get('dirty_syncs', '—')}",
                mb(b.get("transferred_bytes")), mb(lv.get("total_wire_bytes")),
                f"{r.get('wall_s')} s (load {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f})",
            ]) + " |")
        w("")
        errs = [(r["cell"], k, r[k]["error"]) for r in rows
                for k in ("qemu_a", "qemu_b", "rep_live", "rep_stop")
                if (r.get(k) or {}).get("error")]
        if errs:
            w("Failures in this profile:")
            w("")
            for c, k, e in errs:
                w(f"* {c['ram_mib']} MiB dirty={c['dirty']:g}, {k}: {e}")
            w("")
    if skipped:
        w("## Skipped for the time budget")
        w("")
        for c in skipped:
            w(f"* {c.tag}")
        w("")
    w(NOTES)
    w("")
    w("<details><summary>Raw results (JSON)</summary>")
    w("")
    w("```json")
    w(json.dumps({"facts": facts, "results": results}, indent=1))
    w("```")
    w("")
    w("</details>")
    return "\n".join(L) + "\n"


NOTES = """## What this machine limits

* **2 cores, shared**: source QEMU, destination/shadow QEMU, both daemons (Python), TLS, the
  tbf qdisc and this script all share two cores, and other jobs ran on the machine at the same
  time (see the load averages). Every CPU-bound figure — replicator's sync throughput on
  loopback, QEMU's loopback throughput, multifd+zstd (zstd on incompressible pages costs CPU
  and gains nothing), and the fixed costs inside each switch (QMP round trips, QEMU start of
  the shadow, hashing the final round) — would be lower on a real desktop and laptop, and the
  two sides would not compete for the same cores.
* **TCG**: the guests are emulated. The guest's own dirtier reaches its setting here (see the
  DIRTY reports), but a TCG vCPU is far slower than a KVM one, so the source QEMU's CPU share
  mostly measures emulation, and a KVM guest could dirty RAM much faster than any rate here.
* **No netem**: tbf shapes the rate only; there is no latency or loss. Over a real Wi-Fi link
  with a few ms of RTT, every round trip inside a switch (prepare, verify, device state,
  commit) adds its RTT to replicator's downtime and time-to-switch, and QEMU's downtime gains
  its final flush + the destination's return path.
* **Loopback flatters QEMU's downtime**: QEMU does not apply max-bandwidth during
  stop-and-copy, and loopback moves the last pages at memory speed; compare downtimes on the
  shaped links.
* **Everything on tmpfs**: the shadow store and the destination's RAM file live in /dev/shm
  here; a laptop's SSD would add the store's fsync per epoch to replicator's catch-up and
  final delta (QEMU's destination writes RAM without fsync).
* **Lag percentiles** come from polling `/api/v1/status` every 200 ms for the steady-state
  window, so p99 is essentially the maximum of a few dozen samples.
"""


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench.compare needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    if not (GUEST / "vmlinux").exists():
        subprocess.run(["bash", str(ROOT / "deploy" / "build-guest.sh"), str(GUEST)], check=True)
    if args.cells:
        cells = []
        for spec in args.cells.split(","):
            p, ram, dirty = spec.split(":")
            cells.append(Cell(p, int(ram), float(dirty)))
    else:
        cells = QUICK if args.quick else FULL
    window = args.window if args.window is not None else (10.0 if args.quick else 12.0)
    baseline = 6.0
    budget = args.budget if args.budget is not None else (290 if args.quick else 1740)
    work = Path(tempfile.mkdtemp(prefix="rpl-compare-", dir="/dev/shm"))
    ctx = Ctx(work, Reaper(work), Path(args.keep_logs) if args.keep_logs else None,
              args.verbose_daemons, args.tracker)
    facts = machine_facts()
    results: list[dict[str, Any]] = []
    skipped: list[Cell] = []
    t_start = time.monotonic()
    log(f"{len(cells)} cells, steady window {window:g} s, budget {budget:.0f} s; work dir {work}")
    try:
        for c in cells:
            elapsed = time.monotonic() - t_start
            # a cell costs about four copies of its RAM over the link plus ~70 s of boots,
            # fills, windows and switches
            need = 4 * copy_estimate(c, PROFILES[c.profile]) + 70 + window
            if elapsed + need > budget:
                log(f"{c.tag}: skipped (needs ~{need:.0f} s, {budget - elapsed:.0f} s left)")
                skipped.append(c)
                continue
            net = Net(PROFILES[c.profile])
            try:
                res = await run_cell(ctx, c, net, window, baseline)
            finally:
                net.destroy()
            results.append(res)
            if args.json_dump:
                Path(args.json_dump).write_text(json.dumps(
                    {"facts": facts, "results": results}, indent=1))
            log(f"{c.tag}: done in {res['wall_s']} s "
                f"(total {(time.monotonic() - t_start) / 60:.1f} min)")
    finally:
        ctx.reaper.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    runtime = time.monotonic() - t_start
    facts["load_at_end"] = loadavg()
    facts["runtime_s"] = round(runtime, 1)
    text = render(facts, results, args, runtime, skipped)
    if args.out is None and args.quick:
        sys.stdout.write(text)
        log(f"done after {runtime / 60:.1f} min")
    else:
        out = Path(args.out or ROOT / "bench" / "RESULTS.md")
        out.write_text(text)
        log(f"wrote {out} after {runtime / 60:.1f} min")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="512 MiB, lan1g + loopback, dirty=2 only (about 5 minutes)")
    ap.add_argument("--out", help="markdown report (default: bench/RESULTS.md; with --quick: "
                                  "stdout, so a quick run never replaces the full results)")
    ap.add_argument("--cells", help="custom list, e.g. lan1g:512:2,loopback:1024:20")
    ap.add_argument("--tracker", choices=("scan", "qemu-precopy"), default="scan",
                    help="replicator's dirty tracker for the replicator rows (default scan)")
    ap.add_argument("--window", type=float, help="steady-state window, seconds (10 quick, 12 full)")
    ap.add_argument("--budget", type=float,
                    help="skip cells that would end after this many seconds (290 quick, 1740 full)")
    ap.add_argument("--json-dump", help="also write the raw results here after every cell")
    ap.add_argument("--keep-logs", help="copy the daemons' logs of every run into this directory")
    ap.add_argument("--verbose-daemons", action="store_true",
                    help="run the daemons with -v (diagnosis only: debug logging costs time)")
    args = ap.parse_args()

    return run_main(main_async(args))


def run_main(coro: Any) -> int:
    """Run a benchmark's main coroutine; SIGTERM and Ctrl-C stop it (everything it started is
    stopped by its own cleanup) with exit status 130."""
    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
