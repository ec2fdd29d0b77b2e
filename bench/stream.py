"""Benchmark of the replication stream: scan speed, initial-sync throughput, lag under dirtying.

Run from the repository root::

    .venv/bin/python -m bench.stream [--size 1GiB] [--quick] [--profile [CODEC-LINK]]
        [--loop uvloop] [--codecs none,lz4,zstd,zstd-tls] [--lag-link tls|plain]
        [--batch-pages N] [--exp lazy-scan,mmap-scan,sink-inline] [--wait-quiet S]

Prints markdown tables on stdout (progress goes to stderr):

1. **Scan** -- ScanTracker rounds over a region 75 % random / 25 % holes and fully random; first
   and steady rounds, against in-process baselines (chunked ``np.array_equal`` against a previous
   copy, and per-page xxh3 of an in-memory buffer).
2. **Initial sync** -- source in this process, sink in a child process, real TCP on 127.0.0.1
   (port 0); compression none / lz4 / zstd over plaintext, and zstd over the paired TLS 1.3 link
   (when this checkout has ``replicator.identity``), against a raw ``socket.sendfile`` copy of
   the same file into a file by a child process.
3. **Lag** -- ``tests/workload.py`` dirties the region at 10 / 50 / 200 MB/s; after the initial
   sync the source's ``ledger.snapshot()`` is sampled every 100 ms. Then the workload is paused
   (SIGSTOP) and the time until the sink holds everything is measured, next to the estimate.
4. **Stages** -- single-thread cost of each step a 256-page batch goes through (no sockets).

All files live under a private directory in /dev/shm that is removed at the end. Nothing here is
hard-coded: every number printed is measured in this run. The machine may be shared: each section
reports how much CPU other processes used meanwhile.

``--exp`` applies prototypes of proposed patches inside the bench's own processes only (tracker
subclasses, a SourceReplicator subclass, a patched ``asyncio.to_thread`` in the sink child) to
A/B them; ``replicator/`` itself is never modified.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as _dt
import io
import logging
import os
import platform
import pstats
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from replicator.config import PAGE_SIZE, load_config, parse_size
from replicator.pagefile import CHUNK_PAGES, hash_file, read_pages
from replicator.source.driver import FileDriver, Region
from replicator.source.ledger import Ledger
from replicator.source.tracker import ScanTracker
from replicator.wire.pages import Compressor, decode_batch, encode_batch, hash_pages

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "tests" / "workload.py"
GB = 1e9
MB = 1e6


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busy_seconds() -> float:
    """Core-seconds the whole machine spent busy since boot (from /proc/stat)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU of this process plus its reaped children (all bench children are reaped)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class Interference:
    """CPU used by processes other than this bench and its children over a section."""

    def __enter__(self) -> "Interference":
        self.t0, self.b0, self.o0 = time.monotonic(), busy_seconds(), own_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.monotonic() - self.t0
        self.foreign = max(0.0, (busy_seconds() - self.b0) - (own_seconds() - self.o0))

    def line(self) -> str:
        cores = os.cpu_count() or 1
        return (f"Other processes on this machine used {self.foreign:.1f} core-seconds during "
                f"this section ({self.wall:.0f} s wall, {100 * self.foreign / (self.wall * cores):.0f}"
                f"% of {cores} cores).")


def wait_quiet(limit: float, threshold: float = 0.15) -> str:
    """Wait (up to ``limit`` s) until other processes use under ``threshold`` of the machine."""
    t_end = time.monotonic() + limit
    cores = os.cpu_count() or 1
    while True:
        with Interference() as it:
            time.sleep(1.0)
        share = it.foreign / (it.wall * cores)
        if share < threshold or time.monotonic() >= t_end:
            return f"{100 * share:.0f}% of the machine busy with other processes at start"
        log(f"machine busy ({100 * share:.0f}% by other processes); waiting")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Profiling: cProfile only sees the thread that enabled it, and most work runs in to_thread
# workers, so give every worker thread its own profiler (bench process / sink child only).

class ThreadProfiler:
    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._local = threading.local()
        self._orig = asyncio.to_thread
        self.main = cProfile.Profile()
        self.profiles.append(self.main)

    def install(self) -> None:
        orig, local, profiles = self._orig, self._local, self.profiles

        async def to_thread(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            def run():  # type: ignore[no-untyped-def]
                p = getattr(local, "p", None)
                if p is None:
                    p = local.p = cProfile.Profile()
                    profiles.append(p)
                p.enable()
                try:
                    return func(*args, **kwargs)
                finally:
                    p.disable()
            return await orig(run)
        asyncio.to_thread = to_thread  # type: ignore[assignment]

    def uninstall(self) -> None:
        asyncio.to_thread = self._orig  # type: ignore[assignment]

    def report(self, title: str, top: int = 14) -> str:
        s = io.StringIO()
        st = pstats.Stats(self.profiles[0], stream=s)
        for p in self.profiles[1:]:
            st.add(p)
        st.sort_stats("tottime").print_stats(top)
        lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
        return f"#### cProfile {title} (all threads, by tottime)\n```\n" + \
            "\n".join(lines[start:]) + "\n```"


# ------------------------------------------------------------------------------------------------
# The link: plaintext, or TLS with pinned IDs when this checkout has replicator.identity

def config_fields(section: str) -> set[str]:
    import dataclasses

    from replicator import config as c
    cls = {"peer": c.PeerConfig, "node": c.NodeConfig}[section]
    return {f.name for f in dataclasses.fields(cls)}


def tls_available() -> bool:
    try:
        import replicator.identity  # noqa: F401
    except ImportError:
        return False
    return {"id", "insecure_plaintext"} <= config_fields("peer") and \
        "identity_dir" in config_fields("node")


def make_pairing(work: Path) -> dict[str, str]:
    """Identities for both ends; returns the --_tls spec of each ('identity_dir|peer_id')."""
    from replicator.identity import Identity
    src = Identity.load_or_create(work / "id-src", "bench-src")
    snk = Identity.load_or_create(work / "id-sink", "bench-sink")
    return {"source": f"{work / 'id-src'}|{snk.node_id}",
            "sink": f"{work / 'id-sink'}|{src.node_id}"}


def link_settings(node: dict[str, Any], peer: dict[str, Any], tls: str | None) -> None:
    """Fill the node/peer tables for a plaintext link (tls None) or a paired TLS link."""
    if tls:
        identity_dir, peer_id = tls.split("|", 1)
        node["identity_dir"] = identity_dir
        peer["id"] = peer_id
    elif "insecure_plaintext" in config_fields("peer"):
        peer["insecure_plaintext"] = True


def shim_plaintext_server() -> None:
    """SinkReceiver.start passes ssl_handshake_timeout even when ssl is None, which asyncio
    rejects (ValueError), so a plaintext sink cannot start. Drop the argument in that case only
    (sink child process only; reported as a bug, replicator/ is not edited)."""
    orig = asyncio.start_server

    async def start_server(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("ssl") is None and kwargs.get("ssl_handshake_timeout") is not None:
            kwargs.pop("ssl_handshake_timeout")
            print("bench: plaintext sink: dropped ssl_handshake_timeout (receiver bug shim)",
                  file=sys.stderr, flush=True)
        return await orig(*args, **kwargs)
    asyncio.start_server = start_server  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# Child processes (entered through hidden command-line flags)

async def _sink_child(state_dir: str, profile_out: str | None, use_uvloop: bool,
                      inline: bool = False, tls: str | None = None) -> None:
    from replicator.sink.receiver import SinkReceiver
    # "source ... closed the link" warnings are expected when a run ends; keep real errors.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    prof = None
    if inline:
        install_inline_to_thread()
    if profile_out:
        prof = ThreadProfiler()
        prof.install()
    if not tls:
        shim_plaintext_server()
    node: dict[str, Any] = {"name": "bench-sink", "role": "sink", "state_dir": state_dir}
    peer: dict[str, Any] = {"listen": "127.0.0.1:0"}
    link_settings(node, peer, tls)
    cfg = load_config({"node": node, "domain": {"name": "vm1"}, "peer": peer})
    sink = SinkReceiver(cfg)
    _, port = await sink.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)
    threading.Thread(target=wait_stdin, daemon=True).start()
    cpu0 = cpu_seconds()
    if prof:
        prof.main.enable()
    print(f"PORT {port}", flush=True)
    await done.wait()
    if prof:
        prof.main.disable()
    cpu = cpu_seconds() - cpu0
    await sink.stop()
    print(f"CPU {cpu:.3f}", flush=True)
    if prof:
        Path(profile_out).write_text(prof.report("sink child"))


def _raw_sink_child(path: str) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    conn, _ = ls.accept()
    cpu0 = cpu_seconds()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        off = 0
        while off < n:
            off += os.write(fd, mv[off:n])
        total += n
    os.fdatasync(fd)              # the shadow store fdatasyncs each epoch; be as durable here
    os.close(fd)
    conn.sendall(b"K")
    conn.close()
    print(f"BYTES {total}", flush=True)
    print(f"CPU {cpu_seconds() - cpu0:.3f}", flush=True)


class Child:
    """A child process that prints ``PORT n`` first and ``CPU s`` when its stdin closes."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.stream", *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"child {args} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.out: dict[str, str] = {}

    def finish(self, timeout: float = 30) -> dict[str, str]:
        try:
            rest, _ = self.proc.communicate("", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        for ln in rest.splitlines():
            k, _, v = ln.partition(" ")
            self.out[k] = v
        return self.out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------
# Region files

def fill_random(path: Path, start: int, end: int, seed: int) -> None:
    """Write incompressible bytes into [start, end) of ``path`` (Philox: fast raw output)."""
    bg = np.random.Philox(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        step = 16 << 20
        for off in range(start, end, step):
            n = min(step, end - off)
            os.pwrite(fd, bg.random_raw(n // 8).tobytes(), off)
    finally:
        os.close(fd)


def make_region(path: Path, size: int, fill: float, seed: int) -> int:
    """A sparse file of ``size`` bytes whose first ``fill`` part is random. Returns data bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    data = (int(size * fill) // PAGE_SIZE) * PAGE_SIZE
    fill_random(path, 0, data, seed)
    return data


def read_whole(path: Path, size: int) -> np.ndarray:
    arr = np.empty(size, dtype=np.uint8)
    mv = memoryview(arr)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            n = os.preadv(fd, [mv[off:off + (64 << 20)]], off)
            if n <= 0:
                mv[off:] = bytes(size - off)
                break
            off += n
    finally:
        os.close(fd)
    return arr


# ------------------------------------------------------------------------------------------------
# 1. Scan

class TimedScan(ScanTracker):
    """ScanTracker that remembers its rounds (wall time around the thread hop included)."""

    def __init__(self, regions: list[Region]):
        super().__init__(regions)
        self.rounds: list[tuple[float, Any]] = []

    async def round(self, ledger: Ledger):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        rnd = await super().round(ledger)
        self.rounds.append((time.monotonic() - t0, rnd))
        return rnd


# --- Experiments (off by default; --exp): prototypes of proposed patches, applied only inside
# this benchmark by subclassing / patching in the bench's own processes. replicator/ is untouched.

EXPERIMENTS: set[str] = set()


class LazyScan(TimedScan):
    """exp lazy-scan: do not start a round while the previous round's pages are still pending.

    Emulates a scan loop that waits for the sender to take the backlog before re-scanning, so a
    full scan is not repeated (and its CPU not taken from the sender) while nothing can be sent.
    """

    async def round(self, ledger: Ledger):  # type: ignore[no-untyped-def]
        while ledger.pending_pages > 0:
            await asyncio.sleep(0.005)
        return await super().round(ledger)


class MmapScan(TimedScan):
    """exp mmap-scan: hash data extents straight from a persistent read-only shared mapping.

    Same hashes and round as ScanTracker._scan, without the preadv copy into a bounce buffer.
    Holes are still skipped (SEEK_DATA), so they are never faulted in (no tmpfs allocation);
    the mapping is kept, so page-table entries are built once, not every round.
    """

    def __init__(self, regions: list[Region]):
        super().__init__(regions)
        import mmap
        self._maps = {r.name: mmap.mmap(self._fds[r.name], r.size, mmap.MAP_SHARED,
                                        mmap.PROT_READ) for r in regions}

    def _scan(self, ledger: Ledger):  # type: ignore[no-untyped-def]
        from replicator.pagefile import data_extents, digest_hashes
        from replicator.source.tracker import Round
        from replicator.wire.pages import ZERO_HASH
        t0 = time.monotonic()
        dirty, digests, scanned = {}, {}, 0
        step = CHUNK_PAGES * PAGE_SIZE
        for r in self.regions:
            fd, mv = self._fds[r.name], memoryview(self._maps[r.name])
            cur = np.full(r.npages, ZERO_HASH, dtype=np.uint64)
            for start, end in data_extents(fd, min(r.size, os.fstat(fd).st_size)):
                for off in range(start, end, step):
                    n = min(step, end - off) // PAGE_SIZE
                    cur[off // PAGE_SIZE:off // PAGE_SIZE + n] = hash_pages(
                        mv[off:off + n * PAGE_SIZE], n)
            mv.release()
            rl = ledger.regions[r.name]
            dirty[r.name] = np.flatnonzero((cur != rl.shipped) & ~rl.pending)
            digests[r.name] = digest_hashes(cur)
            scanned += r.size
        return Round(t0, time.monotonic() - t0, dirty, scanned, digests)

    async def close(self) -> None:
        for m in self._maps.values():
            # A round may still run in its worker thread (cancelled session): then leave the
            # mapping to the garbage collector instead of failing the close.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        await super().close()


def tracker_class() -> type:
    lazy, mm = "lazy-scan" in EXPERIMENTS, "mmap-scan" in EXPERIMENTS
    if lazy and mm:
        return type("LazyMmapScan", (LazyScan, MmapScan), {})
    return LazyScan if lazy else MmapScan if mm else TimedScan


def install_inline_to_thread() -> None:
    """exp sink-inline (sink child only): run to_thread work inline on the event loop thread."""
    async def inline(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        return func(*args, **kwargs)
    asyncio.to_thread = inline  # type: ignore[assignment]


async def scan_tracker_rounds(path: Path, size: int, steady: int,
                              cls: type = TimedScan) -> dict[str, Any]:
    region = Region("ram0", path, size)
    ledger = Ledger.for_regions([region])
    tr = cls([region])
    try:
        first = await tr.round(ledger)
        # The sink caught up: it holds exactly the current hashes (not timed).
        fd = os.open(path, os.O_RDONLY)
        ledger.regions["ram0"].shipped[:] = hash_file(fd, size)
        os.close(fd)
        for _ in range(steady):
            await tr.round(ledger)
    finally:
        await tr.close()
    times = [t for t, _ in tr.rounds]
    return {"first": times[0], "first_dirty": first.pages, "steady": times[1:],
            "steady_dirty": max(r.pages for _, r in tr.rounds[1:]), "scanned": first.scanned_bytes}


def numpy_read_compare(path: Path, prev: np.ndarray, rounds: int) -> list[float]:
    """Read the file in 4 MiB chunks and np.array_equal each against the previous copy."""
    size = len(prev)
    chunk = CHUNK_PAGES * PAGE_SIZE
    buf = np.empty(chunk, dtype=np.uint8)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    out = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            changed = 0
            for off in range(0, size, chunk):
                n = os.preadv(fd, [mv[:min(chunk, size - off)]], off)
                if not np.array_equal(buf[:n], prev[off:off + n]):
                    changed += 1
            out.append(time.perf_counter() - t0)
            assert changed == 0
    finally:
        os.close(fd)
    return out


def numpy_mem_compare(a: np.ndarray, b: np.ndarray, rounds: int) -> list[float]:
    chunk = CHUNK_PAGES * PAGE_SIZE
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for off in range(0, len(a), chunk):
            np.array_equal(a[off:off + chunk], b[off:off + chunk])
        out.append(time.perf_counter() - t0)
    return out


def xxh3_mem(a: np.ndarray, rounds: int) -> list[float]:
    chunk = CHUNK_PAGES * PAGE_SIZE
    mv = memoryview(a)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for off in range(0, len(a), chunk):
            n = min(chunk, len(a) - off)
            hash_pages(mv[off:off + n], n // PAGE_SIZE)
        out.append(time.perf_counter() - t0)
    return out


def bench_scan(path: Path, size: int, data_bytes: int, label: str, steady: int,
               mem_baselines: bool) -> tuple[list[list[Any]], dict[str, float]]:
    log(f"scan: ScanTracker over {label}")
    r = asyncio.run(scan_tracker_rounds(path, size, steady))
    log(f"scan: numpy baselines over {label}")
    prev = read_whole(path, size)                   # "previous copy" of the region
    rc = numpy_read_compare(path, prev, steady)
    base_rc = size / np.median(rc) / GB
    rows = []
    st = float(np.median(r["steady"]))
    tracker_gbs = size / st / GB
    rows.append([f"ScanTracker, {label}", f"{r['first']:.3f}", f"{size / r['first'] / GB:.2f}",
                 f"{st:.3f} ({min(r['steady']):.3f}-{max(r['steady']):.3f})", f"{tracker_gbs:.2f}",
                 f"{data_bytes / st / GB:.2f}", f"{r['first_dirty']:,} / {r['steady_dirty']:,}",
                 f"{tracker_gbs / base_rc:.2f}x"])
    rows.append([f"numpy preadv + array_equal vs previous copy, {label}", "", "",
                 f"{np.median(rc):.3f}", f"{base_rc:.2f}", f"{size / np.median(rc) / GB:.2f}", "",
                 "1.00x"])
    ref: dict[str, float] = {"tracker": tracker_gbs, "read_compare": base_rc}
    if "mmap-scan" in EXPERIMENTS:
        m = asyncio.run(scan_tracker_rounds(path, size, steady, MmapScan))
        mst = float(np.median(m["steady"]))
        rows.insert(1, [f"exp mmap-scan (prototype, bench only), {label}", f"{m['first']:.3f}",
                        f"{size / m['first'] / GB:.2f}",
                        f"{mst:.3f} ({min(m['steady']):.3f}-{max(m['steady']):.3f})",
                        f"{size / mst / GB:.2f}", f"{data_bytes / mst / GB:.2f}",
                        f"{m['first_dirty']:,} / {m['steady_dirty']:,}",
                        f"{size / mst / GB / base_rc:.2f}x"])
    if mem_baselines:
        cur = prev.copy()
        mc = numpy_mem_compare(cur, prev, steady)
        xh = xxh3_mem(cur, steady)
        del cur
        ref["mem_compare"] = size / np.median(mc) / GB
        ref["xxh3"] = size / np.median(xh) / GB
        rows.append([f"numpy array_equal in memory (no I/O), {label}", "", "",
                     f"{np.median(mc):.3f}", f"{ref['mem_compare']:.2f}", "", "",
                     f"{ref['mem_compare'] / base_rc:.2f}x"])
        rows.append([f"per-page xxh3 in memory (hash_pages, no I/O), {label}", "", "",
                     f"{np.median(xh):.3f}", f"{ref['xxh3']:.2f}", "", "",
                     f"{ref['xxh3'] / base_rc:.2f}x"])
    del prev
    return rows, ref


# ------------------------------------------------------------------------------------------------
# 2./3. Streaming

STREAM_OVERRIDES: dict[str, Any] = {}     # --batch-pages etc. (source side; defaults otherwise)


def source_config(ram: Path, port: int, codec: str = "zstd", tls: str | None = None) -> Any:
    node: dict[str, Any] = {"name": "bench-src", "state_dir": str(ram.parent / "src-state")}
    peer: dict[str, Any] = {"address": f"127.0.0.1:{port}"}
    link_settings(node, peer, tls)
    return load_config({"node": node,
                        "domain": {"name": "vm1", "regions": [{"name": "ram0", "path": str(ram)}]},
                        "peer": peer,
                        "stream": {"compression": codec, **STREAM_OVERRIDES}})


class Source:
    """A SourceReplicator running in this process against a sink child."""

    def __init__(self, ram: Path, state: Path, codec: str, sink_profile: Path | None,
                 use_uvloop: bool, pairing: dict[str, str] | None = None):
        from replicator.source.sender import SourceReplicator
        args = ["--_sink", str(state)] + (["--_profile", str(sink_profile)] if sink_profile else [])
        if use_uvloop:
            args += ["--loop", "uvloop"]
        if "sink-inline" in EXPERIMENTS:
            args += ["--_inline"]
        if pairing:
            args += ["--_tls", pairing["sink"]]
        self.sink = Child(args)
        self.cfg = source_config(ram, self.sink.port, codec, pairing["source"] if pairing else None)
        self.ram = ram
        self._cls = SourceReplicator
        self.src: Any = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        drv = FileDriver(self.cfg.domain)
        regions = await drv.regions()
        self.tracker = tracker_class()(regions)
        self.src = self._cls(self.cfg, drv, regions, self.tracker)
        self.task = asyncio.create_task(self.src.run())

    async def initial_sync(self, timeout: float = 300) -> None:
        await asyncio.wait_for(self.src.connected.wait(), 30)
        first_epoch = self.src.ledger.acked_epoch + 1
        await self.src.wait_acked(first_epoch, timeout)

    async def stop(self) -> dict[str, str]:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        try:
            if self.src is not None:
                await self.src.close()
        finally:
            out = await asyncio.to_thread(self.sink.finish)
        return out


def raw_tcp_copy(path: Path, dest: Path) -> dict[str, float]:
    child = Child(["--_raw-sink", str(dest)])
    try:
        cpu0 = cpu_seconds()
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", child.port)) as s, open(path, "rb") as f:
            sent = s.sendfile(f)
            s.shutdown(socket.SHUT_WR)
            ack = s.recv(1)
        t = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
        out = child.finish()
    finally:
        child.kill()
    if ack != b"K" or int(out.get("BYTES", -1)) != sent:
        raise RuntimeError(f"raw copy incomplete: sent {sent}, child says {out}")
    return {"seconds": t, "bytes": sent, "src_cpu": cpu, "sink_cpu": float(out["CPU"])}


async def stream_once(ram: Path, size: int, codec: str, work: Path, profile: bool,
                      use_uvloop: bool, pairing: dict[str, str] | None = None) -> dict[str, Any]:
    link = "tls" if pairing else "plain"
    state = work / f"sink-{codec}-{link}"
    sink_prof = work / f"sink-{codec}-{link}.prof.txt" if profile else None
    prof = None
    if profile:
        prof = ThreadProfiler()
        prof.install()
    s = Source(ram, state, codec, sink_prof, use_uvloop, pairing)
    res: dict[str, Any] = {"codec": codec}
    try:
        cpu0 = cpu_seconds()
        t0 = time.monotonic()
        if prof:
            prof.main.enable()
        await s.start()
        await s.initial_sync()
        res["seconds"] = time.monotonic() - t0
        if prof:
            prof.main.disable()
        res["src_cpu"] = cpu_seconds() - cpu0
        led = s.src.ledger
        res["raw"], res["wire"] = led.raw_sent, led.wire_sent
        first = s.tracker.rounds[0]
        res["scan1"] = first[0]
        res["pages"] = first[1].pages
        res["rounds"] = len(s.tracker.rounds)
        res["verified"] = await s.src.verify(timeout=120)
    finally:
        if prof:
            prof.uninstall()
        out = await s.stop()
        s.sink.kill()
        shutil.rmtree(state, ignore_errors=True)
    res["sink_cpu"] = float(out.get("CPU", "nan"))
    if prof:
        res["profile"] = prof.report(f"source, initial sync, {codec}, {link}")
        if sink_prof and sink_prof.exists():
            res["sink_profile"] = sink_prof.read_text()
    return res


def run_loop(coro: Any, use_uvloop: bool) -> Any:
    return uvloop_run(coro) if use_uvloop else asyncio.run(coro)


def bench_stream(ram: Path, size: int, data_bytes: int, work: Path, profile: str | None,
                 use_uvloop: bool, codecs: tuple[str, ...], pairing: dict[str, str] | None,
                 reps: int) -> tuple[str, list[str]]:
    raws = []
    for i in range(reps + 1 if reps > 1 else 1):
        log(f"stream: raw TCP sendfile baseline ({i + 1})")
        raws.append(raw_tcp_copy(ram, work / "raw-copy.img"))
        (work / "raw-copy.img").unlink(missing_ok=True)
    raw = min(raws, key=lambda r: r["seconds"])
    raw_gbs = size / raw["seconds"] / GB
    rows = [["raw TCP: sendfile -> recv_into+write (whole file)", spread([r["seconds"] for r in raws]),
             f"{raw_gbs:.2f}", f"{raw['bytes'] // PAGE_SIZE / raw['seconds']:,.0f}",
             f"{raw['bytes'] / 2**20:,.0f}", "1.000", f"{raw['src_cpu']:.2f}",
             f"{raw['sink_cpu']:.2f}", "", "", "", "1.00x"]]
    variants = []
    for c in codecs:
        codec, _, link = c.partition("-")
        if link == "tls":
            if pairing is None:
                log(f"skipping {c}: this checkout has no TLS link")
                continue
            variants.append((codec, pairing))
        else:
            variants.append((codec, None))
    profiles = []
    for codec, pair in variants:
        if codec not in ("none", "lz4", "zstd"):
            raise SystemExit(f"unknown codec {codec!r}")
        link = "TLS 1.3" if pair else "plaintext"
        name = f"{codec}-{'tls' if pair else 'plain'}"
        runs = []
        for i in range(reps):
            log(f"stream: initial sync, compression={codec}, {link} ({i + 1}/{reps})")
            runs.append(run_loop(stream_once(ram, size, codec, work, profile == name and i == 0,
                                             use_uvloop, pair), use_uvloop))
        r = min(runs, key=lambda x: x["seconds"])
        gbs = size / r["seconds"] / GB
        rows.append([f"replicator, {link}, compression={codec}",
                     spread([x["seconds"] for x in runs]),
                     f"{gbs:.2f}", f"{r['pages'] / r['seconds']:,.0f}", f"{r['raw'] / 2**20:,.0f}",
                     f"{r['wire'] / r['raw']:.3f}" if r["raw"] else "n/a",
                     f"{r['src_cpu']:.2f}", f"{r['sink_cpu']:.2f}", f"{r['scan1']:.2f}",
                     f"{r['rounds']}", "yes" if all(x["verified"] for x in runs) else "NO",
                     f"{gbs / raw_gbs:.2f}x"])
        for x in runs:
            for k in ("profile", "sink_profile"):
                if k in x:
                    profiles.append(x[k])
    t = table(["transfer", "seconds: best (all runs)", "GB/s of RAM", "data pages/s",
               "MiB sent (raw)", "wire / raw", "source CPU s", "sink CPU s", "first scan s",
               "full scans by the ack", "verified", "vs raw TCP"], rows)
    return t, profiles


def spread(xs: list[float]) -> str:
    best = min(xs)
    return f"{best:.2f}" if len(xs) == 1 else f"{best:.2f} ({', '.join(f'{x:.2f}' for x in xs)})"


def uvloop_run(coro: Any) -> Any:
    import uvloop
    return uvloop.run(coro)


async def lag_once(rate: float, size: int, work: Path, sample_s: float,
                   use_uvloop: bool, pairing: dict[str, str] | None) -> dict[str, Any]:
    path = work / f"wl-{int(rate)}.ram"
    state = work / f"sink-lag-{int(rate)}"
    wl = subprocess.Popen([sys.executable, str(WORKLOAD), str(path), str(size), str(rate)],
                          stdout=subprocess.PIPE, text=True)
    dirty_lines: list[tuple[float, float]] = []
    s: Source | None = None
    res: dict[str, Any] = {"rate": rate}
    try:
        t_fill = time.monotonic()
        # The sink child imports and listens meanwhile (idle until the source connects).
        s = Source(path, state, "zstd", None, use_uvloop, pairing)
        line = await asyncio.to_thread(wl.stdout.readline)
        if not line.startswith("READY"):
            raise RuntimeError(f"workload did not start: {line!r}")
        res["fill_s"] = time.monotonic() - t_fill

        def reader() -> None:
            for ln in wl.stdout:
                if ln.startswith("DIRTY "):
                    dirty_lines.append((time.monotonic(), float(ln.split()[1])))
        threading.Thread(target=reader, daemon=True).start()

        t0 = time.monotonic()
        await s.start()
        await s.initial_sync()
        res["initial_s"] = time.monotonic() - t0
        led = s.src.ledger
        wire0, raw0, t_s0 = led.wire_sent, led.raw_sent, time.monotonic()
        snaps = []
        n = max(1, int(round(sample_s / 0.1)))
        for i in range(n):
            await asyncio.sleep(max(0.0, t_s0 + (i + 1) * 0.1 - time.monotonic()))
            snaps.append(led.snapshot())
        dt = time.monotonic() - t_s0
        res["wire_rate"] = (led.wire_sent - wire0) / dt
        res["raw_rate"] = (led.raw_sent - raw0) / dt
        res["snaps"] = snaps
        res["achieved"] = dirty_lines[-1][1] if dirty_lines else float("nan")
        # A switch-like step: pause the "guest", then one round until the sink holds it all.
        est_now = led.snapshot().switch_estimate
        os.kill(wl.pid, signal.SIGSTOP)
        tp = time.monotonic()
        await s.src.sync(timeout=120)
        res["pause_sync_s"] = time.monotonic() - tp
        res["est_at_pause"] = est_now
        res["verified"] = await s.src.verify(timeout=120)
    finally:
        if wl.poll() is None:
            wl.kill()
            wl.wait()
        if s is not None:
            await s.stop()
            s.sink.kill()
        shutil.rmtree(state, ignore_errors=True)
        path.unlink(missing_ok=True)
    return res


def bench_lag(size: int, work: Path, sample_s: float, use_uvloop: bool,
              pairing: dict[str, str] | None) -> str:
    rows = []
    for rate in (10e6, 50e6, 200e6):
        log(f"lag: workload at {rate / MB:.0f} MB/s (fill first), sample {sample_s:.0f}s")
        r = run_loop(lag_once(rate, size, work, sample_s, use_uvloop, pairing), use_uvloop)
        sn = r["snaps"]
        lag_b = [x.lag_bytes / MB for x in sn]
        lag_s = [x.lag_seconds for x in sn]
        est = [x.switch_estimate for x in sn]
        seen = [x.dirty_rate / MB for x in sn]
        rnd = [x.round_seconds for x in sn]
        link = [x.link_rate / MB for x in sn]
        rows.append([f"{rate / MB:.0f}", f"{r['achieved'] / MB:.1f}",
                     f"{pct(seen, 50):.1f} / {seen[-1]:.1f}",
                     f"{r['initial_s']:.2f}",
                     f"{pct(lag_b, 50):.1f} / {pct(lag_b, 99):.1f}",
                     f"{pct(lag_s, 50):.3f} / {pct(lag_s, 99):.3f}",
                     f"{pct(est, 50):.3f} / {pct(est, 99):.3f}",
                     f"{r['est_at_pause']:.3f} / {r['pause_sync_s']:.3f}",
                     f"{r['wire_rate'] / MB:.1f}", f"{pct(link, 50):,.0f}", f"{pct(rnd, 50):.3f}",
                     f"{len(sn)}", "yes" if r["verified"] else "NO"])
    return table(["target MB/s", "achieved MB/s (workload)", "ledger dirty_rate MB/s p50 / last",
                  "initial sync s", "lag MB p50 / p99", "lag s p50 / p99",
                  "switch est. s p50 / p99", "est. at pause / actual pause->synced s",
                  "wire MB/s", "ledger link_rate MB/s p50", "scan round s p50", "samples",
                  "verified"], rows)


# ------------------------------------------------------------------------------------------------
# 4. Stage costs

def bench_stages(ram: Path, size: int, work: Path, quick: bool) -> str:
    from replicator.sink.store import ShadowStore
    from replicator.wire import messages as m
    from replicator.wire.codec import decode_body, encode
    batch = 256
    total_pages = min((size * 3 // 4) // PAGE_SIZE, (64 if quick else 128) * 2**20 // PAGE_SIZE)
    nb = total_pages // batch
    raw_bytes = nb * batch * PAGE_SIZE
    fd = os.open(ram, os.O_RDONLY)
    buf = bytearray(batch * PAGE_SIZE)
    cols: dict[str, dict[str, float]] = {}
    try:
        for codec in ("none", "lz4", "zstd"):
            comp = Compressor(codec, 1)
            c: dict[str, float] = {k: 0.0 for k in ("read", "hash", "encode_batch", "frame",
                                                    "decode_body", "decode_batch", "write")}
            root = work / f"stage-store-{codec}"
            store = ShadowStore.open(root, [m.RegionInfo("ram0", size)])
            try:
                warm = min(8, nb)
                for b in range(-warm, nb):      # the first `warm` batches are a discarded warm-up
                    idx = np.arange((b % nb) * batch, (b % nb + 1) * batch, dtype=np.int64)
                    t = time.perf_counter()
                    mv = read_pages(fd, idx, buf)
                    t1 = time.perf_counter()
                    h = hash_pages(mv, batch)
                    t2 = time.perf_counter()
                    enc = encode_batch(1, "ram0", idx, mv, h, comp)
                    t3 = time.perf_counter()
                    frame = encode(enc.message)
                    t4 = time.perf_counter()
                    msg = decode_body(memoryview(frame)[4:])
                    t5 = time.perf_counter()
                    dec = decode_batch(msg, size // PAGE_SIZE)
                    t6 = time.perf_counter()
                    store.write_batch("ram0", 1, dec)
                    t7 = time.perf_counter()
                    if b < 0:
                        continue
                    for k, a, z in (("read", t, t1), ("hash", t1, t2), ("encode_batch", t2, t3),
                                    ("frame", t3, t4), ("decode_body", t4, t5),
                                    ("decode_batch", t5, t6), ("write", t6, t7)):
                        c[k] += z - a
                t = time.perf_counter()
                store.commit_epoch(1)
                c["commit"] = time.perf_counter() - t
            finally:
                store.close(clean=False)
                shutil.rmtree(root, ignore_errors=True)
            cols[codec] = c
    finally:
        os.close(fd)
    names = {
        "read": "source: read_pages (preadv)",
        "hash": "source: hash_pages (per-page xxh3, Python loop)",
        "encode_batch": "source: encode_batch (zero check + compress)",
        "frame": "source: codec.encode (msgpack frame)",
        "decode_body": "sink: codec.decode_body (msgpack)",
        "decode_batch": "sink: decode_batch (decompress + re-hash)",
        "write": "sink: store.write_batch (journal + pwrite)",
        "commit": "sink: commit_epoch (fdatasync + journal)",
    }
    rows = []
    for k, label in names.items():
        rows.append([label] + [f"{raw_bytes / cols[c][k] / GB:.2f}" if cols[c][k] > 0 else "n/a"
                               for c in ("none", "lz4", "zstd")])
    src = {c: sum(cols[c][k] for k in ("read", "hash", "encode_batch", "frame")) for c in cols}
    snk = {c: sum(cols[c][k] for k in ("decode_body", "decode_batch", "write", "commit"))
           for c in cols}
    rows.append(["**source total (one thread)**"] +
                [f"**{raw_bytes / src[c] / GB:.2f}**" for c in ("none", "lz4", "zstd")])
    rows.append(["**sink total (one thread)**"] +
                [f"**{raw_bytes / snk[c] / GB:.2f}**" for c in ("none", "lz4", "zstd")])
    return (f"{nb} batches of {batch} random pages ({raw_bytes / 2**20:.0f} MiB), GB/s of raw "
            f"page bytes per stage, one thread, no sockets:\n\n" +
            table(["stage", "none", "lz4", "zstd"], rows))


# ------------------------------------------------------------------------------------------------

def machine_facts() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    import lz4
    import xxhash
    import zstandard
    return (f"Machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"
            f"{', ' + model if model else ''}; kernel {platform.release()}; Python "
            f"{platform.python_version()}; numpy {np.__version__}, xxhash {xxhash.VERSION}, "
            f"zstandard {zstandard.__version__}, lz4 {lz4.__version__}; "
            f"date {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
            f"load average at start {os.getloadavg()[0]:.2f} (other processes share the cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB", help="region size (default 1GiB)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds, 2 s lag samples")
    ap.add_argument("--profile", nargs="?", const="zstd-plain", default=None,
                    metavar="CODEC-LINK", help="cProfile source and sink (all threads) during "
                    "one initial sync, e.g. zstd-plain (default), none-plain, zstd-tls")
    ap.add_argument("--lag-link", choices=("tls", "plain"), default=None,
                    help="link for the lag runs (default: tls when this checkout has it)")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--batch-pages", type=int, default=0,
                    help="override stream.batch_pages (default: the config default)")
    ap.add_argument("--codecs", default="none,lz4,zstd,zstd-tls",
                    help="sync table rows: CODEC (plaintext) or CODEC-tls (TLS 1.3, paired)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="first wait up to S seconds for other processes to go quiet")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                    "scan,stream,lag,stages")
    ap.add_argument("--_sink", help=argparse.SUPPRESS)
    ap.add_argument("--_profile", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-sink", dest="raw_sink", help=argparse.SUPPRESS)
    ap.add_argument("--_inline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_tls", help=argparse.SUPPRESS)
    ap.add_argument("--exp", default="", help="comma list of patch prototypes to apply inside "
                    "the bench: lazy-scan, mmap-scan (source), sink-inline (sink)")
    a = ap.parse_args()
    if a._sink:
        coro = _sink_child(a._sink, a._profile, a.loop == "uvloop", a._inline, a._tls)
        uvloop_run(coro) if a.loop == "uvloop" else asyncio.run(coro)
        return
    if a.raw_sink:
        _raw_sink_child(a.raw_sink)
        return

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    size = parse_size(a.size)
    size -= size % PAGE_SIZE
    skip = set(filter(None, a.skip.split(",")))
    if a.batch_pages:
        STREAM_OVERRIDES["batch_pages"] = a.batch_pages
    has_tls = tls_available()
    lag_link = a.lag_link or ("tls" if has_tls else "plain")
    if lag_link == "tls" and not has_tls:
        ap.error("this checkout has no TLS link (replicator.identity / peer.id)")
    codecs = tuple(filter(None, a.codecs.split(",")))
    EXPERIMENTS.update(filter(None, a.exp.split(",")))
    unknown = EXPERIMENTS - {"lazy-scan", "sink-inline", "mmap-scan"}
    if unknown:
        ap.error(f"unknown --exp {sorted(unknown)}")
    use_uvloop = a.loop == "uvloop"
    steady = 3 if a.quick else 5
    sample_s = 2.0 if a.quick else 5.0
    quiet = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else ""
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-stream-", dir="/dev/shm"))
    out: list[str] = [f"## replicator stream benchmark ({'quick' if a.quick else 'full'}, "
                      f"region {size / 2**30:.2f} GiB, event loop {a.loop}"
                      + (f", batch_pages {a.batch_pages}" if a.batch_pages else "")
                      + (f", EXPERIMENTS {','.join(sorted(EXPERIMENTS))}" if EXPERIMENTS else "")
                      + ")", "", machine_facts() + (f"; {quiet}" if quiet else ""), ""]
    sections: dict[str, tuple[str, Interference]] = {}
    profiles: list[str] = []
    try:
        pairing = make_pairing(work) if has_tls else None
        ram = work / "ram"
        log(f"writing {size / 2**30:.2f} GiB region (75% random, 25% holes) in {work}")
        data = make_region(ram, size, 0.75, 1)
        scan_rows: list[list[Any]] = []
        scan_it = Interference()
        if "scan" not in skip:
            with scan_it:
                rows, _ = bench_scan(ram, size, data, "75% random + 25% holes", steady, False)
            scan_rows += rows
        if "stream" not in skip:
            with Interference() as it:
                tbl, profiles = bench_stream(ram, size, data, work, a.profile, use_uvloop,
                                             codecs, pairing, 1 if a.quick else 2)
            sections["stream"] = (tbl, it)
        if "stages" not in skip:
            with Interference() as it:
                tbl = bench_stages(ram, size, work, a.quick)
            sections["stages"] = (tbl, it)
        if "scan" not in skip:
            log("filling the holes for the fully populated variant")
            fill_random(ram, data, size, 2)
            with Interference() as it2:
                rows, _ = bench_scan(ram, size, size, "100% random", steady, True)
            scan_rows += rows
            scan_it.wall += it2.wall
            scan_it.foreign += it2.foreign
            sections["scan"] = (table(["method", "first round s", "first GB/s (region)",
                                       "steady round s", "steady GB/s (region)",
                                       "steady GB/s (data)", "dirty pages first / steady",
                                       "vs numpy read+compare"], scan_rows), scan_it)
        ram.unlink()
        if "lag" not in skip:
            with Interference() as it:
                tbl = bench_lag(size, work, sample_s, use_uvloop,
                                pairing if lag_link == "tls" else None)
            sections["lag"] = (tbl, it)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if "scan" in sections:
        tbl, it = sections["scan"]
        out += ["### 1. Scan: ScanTracker rounds vs numpy compare (same process)", "",
                f"Region {size / 2**30:.2f} GiB; GB = 1e9 bytes. 'Region GB/s' = region size / "
                f"round time (what matters for lag); 'data GB/s' = bytes actually read (holes are "
                f"skipped by SEEK_DATA). Steady = {steady} rounds after the sink caught up "
                f"(nothing dirty), median (min-max). Ratio is region GB/s against the numpy "
                f"read+compare of the same file. {it.line()}", "", tbl, ""]
    if "stream" in sections:
        tbl, it = sections["stream"]
        reps = 1 if a.quick else 2
        out += ["### 2. Initial full sync over loopback TCP (source here, sink in a child)", "",
                f"Same {size / 2**30:.2f} GiB region (75% random, 25% holes), fresh sink state each "
                f"run. Seconds from SourceReplicator.run() to the Ack of the first epoch (connect, "
                f"manifest, scan, send, sink verify+write+fdatasync). 'GB/s of RAM' = region size "
                f"/ seconds; zero pages/holes are not sent (the sink starts all-zero). 'verified' = "
                f"SourceReplicator.verify() after. CPU s = user+sys during the (best) run: source up "
                f"to the ack, sink for its whole session (includes the small verify round). The raw baseline copies the whole file including holes. Each "
                f"transfer runs {reps} time(s) (raw: {reps + 1 if reps > 1 else 1}); the best is "
                f"reported, all times "
                f"in brackets. {it.line()}", "", tbl, ""]
    if "lag" in sections:
        tbl, it = sections["lag"]
        out += [f"### 3. Lag under dirtying (tests/workload.py, compression zstd, "
                f"{'TLS 1.3' if lag_link == 'tls' else 'plaintext'} link)", "",
                f"The workload refills its own {size / 2**30:.2f} GiB file (75% random), then "
                f"dirties pages walking the filled part; 'achieved' is the last DIRTY line it "
                f"printed (its average since it started dirtying). Samples: ledger.snapshot() "
                f"every 100 ms for {sample_s:.0f} s after the initial sync. Then the workload is "
                f"SIGSTOPped and SourceReplicator.sync() is timed (pause -> sink durable), next to "
                f"the ledger's switch estimate just before the pause. wire MB/s = wire bytes sent "
                f"in the sampling window / window. {it.line()}", "", tbl, ""]
    if "stages" in sections:
        tbl, it = sections["stages"]
        out += ["### 4. Where a batch's time goes (reference)", "", tbl, "", it.line(), ""]
    for p in profiles:
        out += [p, ""]
    out.append(f"Total bench time: {time.monotonic() - t_start:.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
