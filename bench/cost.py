"""The cost of staying warm (issue 14): CPU, wire bytes and stream throughput, in one run.

Run from the repository root, as root unless ``--profile 0`` (py-spy attaches to the daemon)::

    .venv/bin/python -m bench.cost [--quick | --ci] [--out bench/RESULTS-cost.md] [--label before]

1. **Stream over loopback**: bench/stream.py's initial sync of a fully random region (source in
   this process, sink in a child, 127.0.0.1), plaintext and TLS, the default compression, against
   a raw TCP ``sendfile`` of the same file in the same run (the ratio's baseline).
2. **VM runs** for tracker qemu-precopy and scan, guest idle (``dirty=0``) and dirtying 2 MiB/s
   (``dirty=2``), each on a fresh boot of the test guest (``fill=75``, TCG) launched by a real
   source daemon (bench/compare.py's pair, TLS, 127.0.0.1). *Baseline*: once the guest printed
   ``FILLED`` and before the sink daemon starts, i.e. with no replication at all (the source only
   retries its connection), the same QEMU process's CPU over a window. Then the sink joins; once
   the initial sync settled, a window of the same length: source daemon and QEMU CPU, the sink
   side's CPU, wire bytes, the guest's own ``DIRTY`` figures, lag from ``/api/v1/status``,
   QEMU's dirty-bitmap syncs (the precopy status) or scan rounds (``/metrics``). Then
   replication is paused and a second baseline window runs.
   overhead = daemon + (QEMU - mean of the two baselines' QEMU), in % of one core.
3. **Profile**: ``py-spy record`` of the source daemon for ``--profile`` seconds in the busy
   qemu-precopy state (after its window, so it does not disturb the figures); top 15 by own time.

Prints the report (markdown) on stdout, writes it to ``--out`` when given, and ends stdout with
one JSON line of the headline figures. Progress goes to stderr. Everything runs in a private
directory under /dev/shm that is removed at the end; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stream as st
from bench.compare import (MiB, PAGE, PROFILES, Cell, CpuMeter, Ctx, Net, Reaper, api,
                           children_named, cpu_seconds, dirty_values, end_pair, filled_mib,
                           guarded, loadavg, machine_facts, pair_configs, pct, round_stats,
                           run_main, start_daemon, wait_for)
from replicator.config import StreamConfig

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"idle_overhead_core_pct": ("≤", 2), "busy_overhead_core_pct": ("≤", 8),
         "wire_bytes_per_dirtied_page": ("≤", 4096), "tls_loopback_MBps": ("≥", 1000),
         "lag_p99_ms": ("≤", 1000)}


@dataclasses.dataclass(frozen=True)
class Mode:
    ram_mib: int         # guest RAM
    window: float        # seconds, each baseline and replicating window
    stream_mib: int      # region of the loopback stream test
    profile: float       # py-spy seconds (0: no profile)
    reps: int            # stream transfers per variant (the best is reported)
    wait_quiet: float    # seconds to wait for a quiet machine at start


MODES = {"full": Mode(1024, 20, 1024, 20, 2, 60), "quick": Mode(512, 12, 512, 20, 1, 30),
         "ci": Mode(256, 6, 64, 0, 1, 10)}


def log(msg: str) -> None:
    print(f"[cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. the stream over loopback ----------------------------------------------------------------

async def stream_section(mode: Mode, work: Path) -> dict[str, Any]:
    """Raw TCP, replicator plaintext, replicator TLS over 127.0.0.1, interleaved ``reps`` times."""
    d = work / "stream"
    d.mkdir()
    size = mode.stream_mib * MiB
    ram = d / "ram"
    st.make_region(ram, size, 1.0, 1)           # incompressible, no holes: like a filled guest
    pairing = st.make_pairing(d)
    codec = StreamConfig().compression
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], "plain": [], "tls": []}
    for i in range(mode.reps):
        log(f"stream: raw TCP sendfile of {mode.stream_mib} MiB ({i + 1}/{mode.reps})")
        r = await asyncio.to_thread(st.raw_tcp_copy, ram, d / "raw-copy")
        (d / "raw-copy").unlink(missing_ok=True)
        runs["raw"].append(r)
        for link, pair in (("plain", None), ("tls", pairing)):
            log(f"stream: replicator initial sync, {link}, compression={codec} ({i + 1})")
            x = await st.stream_once(ram, size, codec, d, False, True, pair)
            if not x["verified"]:
                raise RuntimeError(f"{link} stream: the sink's copy did not verify")
            runs[link].append(x)
    ram.unlink()
    out: dict[str, Any] = {"region_MiB": mode.stream_mib, "compression": codec}
    for k, xs in runs.items():
        best = min(xs, key=lambda x: x["seconds"])
        out[k] = {"MBps": round(size / best["seconds"] / 1e6, 1),
                  "seconds": [round(x["seconds"], 3) for x in xs],
                  "src_cpu_s": round(best["src_cpu"], 2), "sink_cpu_s": round(best["sink_cpu"], 2),
                  **({"wire_per_raw": round(best["wire"] / best["raw"], 3)}
                     if "wire" in best else {})}
    for k in ("plain", "tls"):
        out[k]["vs_raw"] = round(out[k]["MBps"] / out["raw"]["MBps"], 3)
    return out


# --- 2. the VM runs -----------------------------------------------------------------------------

async def status(sock: Path) -> dict[str, Any]:
    return (await api(sock, "GET", "/api/v1/status"))[1]


async def window(pair: Any, seconds: float, poll: float, replicating: bool) -> dict[str, Any]:
    """CPU of every process of the pair, the guest's DIRTY figures, wire bytes and (replicating)
    lag over ``seconds``; /api/v1/status is polled every ``poll`` s in both kinds of window."""
    off = pair.desk_serial.stat().st_size
    pids = {"daemon": pair.source.pid, "qemu": pair.qemu_pid}
    if replicating:
        pids["sink"] = pair.sink.pid
        pids["shadow"] = (children_named(pair.sink.pid, "qemu") or [None])[0]
    meter = CpuMeter(pids)
    busy0, self0 = st.busy_seconds(), st.cpu_seconds()
    s0 = await status(pair.desk_sock)
    r0 = await round_stats(pair.desk_sock)
    t0 = time.monotonic()
    lag_s: list[float] = []
    lag_b: list[float] = []
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(poll)
        s1 = await status(pair.desk_sock)
        if replicating:
            lag_s.append(s1["lag"]["seconds"])
            lag_b.append(s1["lag"]["bytes"])
    r1 = await round_stats(pair.desk_sock)
    dt = time.monotonic() - t0
    cpu = meter.percent()
    ours = sum(cpu_seconds(p) - meter.c0[k] for k, p in meter.pids.items())
    others = st.busy_seconds() - busy0 - ours - (st.cpu_seconds() - self0)
    w: dict[str, Any] = {"seconds": round(dt, 1), "cpu_pct": cpu,
                         "others_core_pct": round(100 * others / dt, 1)}
    dirty = dirty_values(pair.desk_serial, off)
    w["dirty_lines"] = dirty
    if not dirty:      # a short window may hold no DIRTY line (one per ~5 s): the latest ones
        dirty = dirty_values(pair.desk_serial)[-2:]
        w["dirty_from_before_window"] = True
    w["guest_dirty_MiBps"] = round(statistics.fmean(dirty), 2) if dirty else 0.0
    if not replicating:
        return w
    wire = s1["sent_bytes"]["wire"] - s0["sent_bytes"]["wire"]
    raw = s1["sent_bytes"]["raw"] - s0["sent_bytes"]["raw"]
    dirtied = w["guest_dirty_MiBps"] * MiB * dt / PAGE
    w.update({"wire_bytes": wire, "raw_bytes": raw, "wire_kBps": round(wire / dt / 1e3, 2),
              "dirtied_pages": round(dirtied), "samples": len(lag_s),
              "lag_p50_ms": round(pct(lag_s, 0.5) * 1000, 1),
              "lag_p99_ms": round(pct(lag_s, 0.99) * 1000, 1),
              "lag_p99_KiB": round(pct(lag_b, 0.99) / 1024, 1)})
    pre0, pre1 = s0.get("precopy"), s1.get("precopy")
    if pre0 and pre1:
        w["syncs_per_s"] = round(((pre1["dirty_sync_count"] or 0)
                                  - (pre0["dirty_sync_count"] or 0)) / dt, 2)
        sent_pages = pre1["pages_forwarded"] - pre0["pages_forwarded"]
        if "drains" in pre0 and "drains" in pre1:
            # How the relay's idle drains ended in the window (burst: turned to backlog).
            w["drains"] = {k: pre1["drains"][k] - pre0["drains"].get(k, 0)
                           for k in pre1["drains"]}
            w["drains"]["backlogs"] = pre1.get("backlogs", 0) - pre0.get("backlogs", 0)
            w["drains"]["backlog_s"] = round(pre1.get("backlog_seconds", 0)
                                             - pre0.get("backlog_seconds", 0), 2)
    else:
        w["scans_per_s"] = round((r1[0] - r0[0]) / dt, 2)
        sent_pages = raw / PAGE
    if dirtied >= 1:
        w["wire_bytes_per_dirtied_page"] = round(wire / dirtied)
        w["pages_sent_per_dirtied_page"] = round(sent_pages / dirtied, 2)
    if sent_pages >= 1:
        w["wire_bytes_per_sent_page"] = round(wire / sent_pages)
    return w


async def settle(sock: Path, fill_mib: int, dirty: float, limit: float) -> float:
    """Seconds until the initial sync settled: everything filled went over and the lag stayed
    small (in sync, or an acknowledged epoch and under max(8 MiB, 2 s of dirtying)) for 0.6 s."""
    t0, streak = time.monotonic(), 0
    thresh = max(8 * MiB, 2 * dirty * MiB)
    while streak < 3:
        if time.monotonic() - t0 > limit:
            raise TimeoutError(f"initial sync not settled within {limit:.0f} s")
        await asyncio.sleep(0.2)
        s = await status(sock)
        lag = (s.get("lag") or {}).get("bytes", 1 << 62)
        ok = ((s.get("peer") or {}).get("connected")
              and s.get("sent_bytes", {}).get("wire", 0) >= 0.9 * fill_mib * MiB
              and (s.get("in_sync") or (s.get("acked_epoch", 0) >= 2 and lag <= thresh)))
        streak = streak + 1 if ok else 0
    return round(time.monotonic() - t0 - 0.4, 1)


async def py_spy(pid: int, seconds: float, work: Path, rate: int = 100) -> dict[str, Any]:
    """Sample a Python process (all threads); the top 15 functions by own time. Blocking mode:
    py-spy pauses the process for each sample (--nonblocking misattributes frames on 3.11)."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        raise RuntimeError(f"{exe} missing: .venv/bin/pip install py-spy")
    raw = work / f"py-spy-{pid}.txt"
    p = await asyncio.create_subprocess_exec(
        str(exe), "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate",
        str(rate), "--format", "raw", "--full-filenames",
        "--output", str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await p.communicate()
    if p.returncode or not raw.exists():
        raise RuntimeError(f"py-spy failed ({p.returncode}): {err.decode()[-500:]}")
    own: collections.Counter[str] = collections.Counter()
    callers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: collections.Counter[str] = collections.Counter()
    project = str(ROOT / "replicator") + "/"
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [FRAME_RE.match(f).groups() for f in stack.split(";")]
        leaf = _frame(frames[-1])
        own[leaf] += int(n)
        # who asked for a standard-library leaf: the nearest frame outside the standard library
        if _stdlib(frames[-1][1]):
            up = next((f for f in reversed(frames) if not _stdlib(f[1])), None)
            if up is not None:
                callers[leaf][_frame(up, line=True)] += int(n)
        for name in {_frame(f) for f in frames if f[1].startswith(project)}:
            incl[name] += int(n)
    total = sum(own.values())
    full = rate * round(seconds)

    def entry(f: str, n: int) -> dict[str, Any]:
        return {"function": f, "samples": n, "share_pct": round(100 * n / total, 1),
                "core_pct": round(100 * n / full, 2)}
    return {"seconds": round(seconds), "rate_hz": rate, "samples": total,
            "active_core_pct": round(100 * total / full, 1),
            "top": [{**entry(f, n), "called_from": [c for c, _ in callers[f].most_common(2)]}
                    for f, n in own.most_common(15)],
            "inclusive": [entry(f, n) for f, n in incl.most_common(16) if n < total][:12]}


FRAME_RE = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def _stdlib(path: str) -> bool:
    return bool(re.search(r"/lib/python3\.\d+/", path)) and "site-packages" not in path


def _frame(f: tuple[str, str, str | None], line: bool = False) -> str:
    """'func (short/path.py)': paths shortened to the package (``--full-filenames`` paths)."""
    func, path, lineno = f
    path = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", path).removeprefix(f"{ROOT}/")
    return f"{func} ({path}{f':{lineno}' if line and lineno else ''})"


async def vm_run(ctx: Ctx, mode: Mode, dirty: float, poll: float,
                 profile_s: float) -> dict[str, Any]:
    """One boot: baseline window (no sink), initial sync, replicating window, maybe py-spy,
    then a baseline window with replication paused."""
    cell = Cell("loopback", mode.ram_mib, dirty)
    net = Net(PROFILES["loopback"])
    pair = pair_configs(ctx, cell, net, ctx.work / f"{ctx.tracker}-d{dirty:g}")
    out: dict[str, Any] = {"tracker": ctx.tracker, "dirty_set": dirty, "ram_mib": mode.ram_mib,
                           "load_before": loadavg()}
    try:
        t0 = time.monotonic()
        await start_daemon(ctx, net, pair, "source")
        if pair.qemu_pid is None:
            raise RuntimeError("the source daemon's QEMU was not found")
        out["filled_mib"] = fill = await wait_for(lambda: filled_mib(pair.desk_serial), 300,
                                                  "FILLED from the guest", 0.2)
        out["boot_fill_s"] = round(time.monotonic() - t0, 1)
        await asyncio.sleep(2.0)      # the dirtier starts after FILLED
        log(f"  baseline window {mode.window:g} s (no sink, no replication)")
        out["baseline"] = await window(pair, mode.window, poll, False)
        await start_daemon(ctx, net, pair, "sink")
        out["initial_sync_s"] = await settle(pair.desk_sock, fill, dirty, 60 + mode.ram_mib / 10)
        await asyncio.sleep(2.0)
        log(f"  replicating window {mode.window:g} s (initial sync {out['initial_sync_s']} s)")
        w = out["replicating"] = await window(pair, mode.window, poll, True)
        if profile_s:
            log(f"  py-spy on the source daemon for {profile_s:g} s")
            out["profile"] = await py_spy(pair.source.pid, profile_s, ctx.work)
        # A second baseline with replication paused (the held-open migration ended, the peer
        # still connected): the guest's own CPU drifts by a point or more over a run, as much
        # as the idle overhead itself, so the overhead is taken against both baselines' mean.
        code, body = await api(pair.desk_sock, "POST", "/api/v1/pause", pair.token)
        if code != 200:
            raise RuntimeError(f"pausing replication failed: {code} {body}")
        await asyncio.sleep(3.0)
        log(f"  baseline window {mode.window:g} s (replication paused)")
        out["baseline_paused"] = await window(pair, mode.window, poll, False)
        base_q = statistics.fmean([out["baseline"]["cpu_pct"]["qemu"],
                                   out["baseline_paused"]["cpu_pct"]["qemu"]])
        out["overhead_core_pct"] = round(w["cpu_pct"]["daemon"] + w["cpu_pct"]["qemu"] - base_q, 1)
        out["qemu_vs_baseline"] = round(w["cpu_pct"]["qemu"] / base_q, 2) if base_q else None
    finally:
        await end_pair(ctx, pair)
        out["load_after"] = loadavg()
    return out


# --- orchestration ------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace, mode: Mode, name: str) -> dict[str, Any]:
    facts = machine_facts()
    quiet = st.wait_quiet(args.wait_quiet if args.wait_quiet is not None else mode.wait_quiet)
    busy = int(re.match(r"(\d+)%", quiet).group(1))
    facts["busy_at_start"] = quiet
    if busy >= 15:
        log(f"WARNING: THE MACHINE IS BUSY ({quiet}): CPU figures will be inflated")
        if args.strict:
            raise SystemExit(f"refusing to run: {quiet} (--strict)")
    work = Path(tempfile.mkdtemp(prefix="rpl-cost-", dir="/dev/shm"))
    ctx = Ctx(work, Reaper(work))
    res: dict[str, Any] = {"mode": name, "facts": facts, "runs": []}
    t_start = time.monotonic()
    try:
        with st.Interference() as it:    # stream children are reaped: "others" is exact here
            res["stream"] = await guarded("stream", stream_section(mode, work))
        res["stream"]["others"] = it.line()
        for tracker in args.trackers.split(","):
            for dirty in (0.0, 2.0):
                log(f"{tracker}, {mode.ram_mib} MiB guest, dirty={dirty:g}")
                prof = args.profile if args.profile is not None else mode.profile
                run = await guarded(f"{tracker} dirty={dirty:g}", vm_run(
                    dataclasses.replace(ctx, tracker=tracker), mode, dirty, args.poll,
                    prof if (tracker == "qemu-precopy" and dirty) else 0))
                res["runs"].append({"tracker": tracker, "dirty_set": dirty, **run})
    finally:
        ctx.reaper.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    facts["load_at_end"] = loadavg()
    facts["runtime_s"] = round(time.monotonic() - t_start, 1)
    return res


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The final JSON line: issue 14's five keys (qemu-precopy rows), then the rest."""
    def run(tracker: str, dirty: float) -> dict[str, Any]:
        return next((r for r in res["runs"] if r["tracker"] == tracker
                     and r["dirty_set"] == dirty), {})
    s = res.get("stream") or {}
    out: dict[str, Any] = {}
    for tracker, prefix in (("qemu-precopy", ""), ("scan", "scan_")):
        idle, busy = run(tracker, 0.0), run(tracker, 2.0)
        if not (idle or busy):
            continue
        bw = busy.get("replicating") or {}
        out[prefix + "idle_overhead_core_pct"] = idle.get("overhead_core_pct")
        out[prefix + "busy_overhead_core_pct"] = busy.get("overhead_core_pct")
        out[prefix + "wire_bytes_per_dirtied_page"] = bw.get("wire_bytes_per_dirtied_page")
        if not prefix:
            out["loopback_MBps"] = (s.get("plain") or {}).get("MBps")
            out["tls_loopback_MBps"] = (s.get("tls") or {}).get("MBps")
            out["raw_tcp_MBps"] = (s.get("raw") or {}).get("MBps")
        for k in ("lag_p50_ms", "lag_p99_ms", "pages_sent_per_dirtied_page",
                  "wire_bytes_per_sent_page"):
            out[prefix + k] = bw.get(k)
        # What the idle guest (its kernel) writes: it travels in the busy window too, on top
        # of the dirtier's pages (see the notes on wire bytes per dirtied page).
        out[prefix + "idle_wire_kBps"] = (idle.get("replicating") or {}).get("wire_kBps")
        rate = "syncs_per_s" if not prefix else "scans_per_s"
        for label, r in (("idle", idle), ("busy", busy)):
            w = r.get("replicating") or {}
            out[f"{prefix}{rate}_{label}"] = w.get(rate)
            if "drains" in w:
                out[f"drains_{label}"] = w["drains"]
            cpu = w.get("cpu_pct") or {}
            out[f"{prefix}cpu_pct_{label}"] = {**cpu, "baseline_qemu": (
                (r.get("baseline") or {}).get("cpu_pct") or {}).get("qemu"),
                "paused_qemu": ((r.get("baseline_paused") or {}).get("cpu_pct") or {}).get("qemu"),
                "paused_daemon": ((r.get("baseline_paused") or {}).get("cpu_pct") or {}).get(
                    "daemon")}
    f = res["facts"]
    out.update({"mode": res["mode"], "load_at_start": f["load_at_start"],
                "load_at_end": f.get("load_at_end"), "busy_at_start": f["busy_at_start"],
                "errors": [f"{r['tracker']} d{r['dirty_set']:g}: {r['error'][-300:]}"
                           for r in res["runs"] if r.get("error")]
                + ([f"stream: {s['error'][-300:]}"] if s.get("error") else [])})
    return out


def _head(*cols: str) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _f(v: Any, unit: str = "") -> str:
    return "—" if v is None else f"{v:g}{unit}"


def render(res: dict[str, Any], head: dict[str, Any], label: str, argv: str) -> str:
    f, s = res["facts"], res.get("stream") or {}
    tag = f" ({label})" if label else ""
    L = [f"# The cost of staying warm{tag}", "",
         f"Generated by `.venv/bin/python -m bench.cost {argv}`; mode `{res['mode']}`. Every "
         "figure was measured in this run. CPU is in % of one core (/proc/<pid>/stat "
         "utime+stime over the window).", "", "## Machine", "", "| fact | value |", "|---|---|"]
    for k in ("date", "cores", "cpu", "mem_GiB", "kernel", "qemu", "accel", "python", "commit",
              "busy_at_start"):
        L.append(f"| {k} | {f.get(k)} |")
    L += [f"| load average 1/5/15 at start / end | {f['load_at_start']} / {f.get('load_at_end')} |",
          f"| runtime | {f.get('runtime_s', 0) / 60:.1f} min |", "",
          "The machine is shared with other jobs (2 cores): each window's *others* column is the "
          "CPU the rest of the machine used meanwhile (all busy time minus this bench's "
          "processes).", "", f"## Against issue 14's goals{tag}", "",
          ] + _head("figure (qemu-precopy)", "this run", "goal")
    for k, (op, goal) in GOALS.items():
        L.append(f"| {k} | {_f(head.get(k))} | {op} {goal} |")
    L += ["", f"## CPU and wire while staying warm{tag}", ""] + _head(
        "tracker", "guest", "source QEMU, no replication (baseline: before / paused)",
        "source daemon, no peer / paused",
        "source QEMU, replicating (× baseline)", "source daemon, replicating",
        "**overhead** (daemon + QEMU − baseline)", "sink daemon + shadow QEMU",
        "wire (raw pages sent)", "wire B / dirtied page (pages sent / dirtied)",
        "QEMU dirty syncs/s (scan rounds/s)", "lag p50 / p99", "guest DIRTY MiB/s base / repl.",
        "initial sync", "others base / repl.")
    for r in res["runs"]:
        g = f"{r.get('ram_mib', '?')} MiB, dirty={r['dirty_set']:g}"
        if r.get("error"):
            L.append(f"| {r['tracker']} | {g} | FAILED: {r['error'][-200:]} |" + " |" * 12)
            continue
        b, w = r["baseline"], r["replicating"]
        bc, wc = b["cpu_pct"], w["cpu_pct"]
        pc = (r.get("baseline_paused") or {}).get("cpu_pct") or {}
        rate = (_f(w.get("syncs_per_s")) if "syncs_per_s" in w else f"({_f(w.get('scans_per_s'))})")
        wpp = (f"{w['wire_bytes_per_dirtied_page']} ({w['pages_sent_per_dirtied_page']})"
               if "wire_bytes_per_dirtied_page" in w else "— (idle)")
        pages = w["raw_bytes"] / PAGE / w["seconds"]
        L.append("| " + " | ".join([
            r["tracker"], g, f"{bc['qemu']}% / {_f(pc.get('qemu'), '%')}",
            f"{bc['daemon']}% / {_f(pc.get('daemon'), '%')}",
            f"{wc['qemu']}% (×{_f(r.get('qemu_vs_baseline'))})", f"{wc['daemon']}%",
            f"**{r['overhead_core_pct']}%**", f"{wc['sink']}% + {_f(wc.get('shadow'), '%')}",
            f"{w['wire_kBps']:.0f} kB/s ({pages:.0f}/s)", wpp, rate,
            f"{w['lag_p50_ms']} / {w['lag_p99_ms']} ms",
            f"{b['guest_dirty_MiBps']} / {w['guest_dirty_MiBps']}", f"{r['initial_sync_s']} s",
            f"{b['others_core_pct']}% / {w['others_core_pct']}%"]) + " |")
    L += ["", f"## The stream over loopback{tag}", ""]
    if s.get("error") or not s:
        L.append(f"FAILED: {s.get('error')}")
    else:
        L += [f"A {s['region_MiB']} MiB fully random region (no zero pages), 127.0.0.1. "
              "Replicator: bench/stream.py's initial sync (source in the bench process, sink in a "
              f"child; scan, compression={s['compression']}, sink writes and fdatasyncs); raw: "
              "`sendfile` into a child that writes the file. MB/s = region / seconds (best of "
              f"the runs listed). {s.get('others', '')}", ""] + _head(
                  "transfer", "MB/s", "× raw TCP", "seconds (all runs)", "source CPU s",
                  "sink CPU s")
        for k, name in (("raw", "raw TCP (baseline)"), ("plain", "replicator, plaintext"),
                        ("tls", "replicator, TLS 1.3")):
            x = s[k]
            L.append(f"| {name} | {x['MBps']} | {x.get('vs_raw', 1.0)} | {x['seconds']} | "
                     f"{x['src_cpu_s']} | {x['sink_cpu_s']} |")
    for r in res["runs"]:
        p = r.get("profile")
        if p:
            L += ["", f"## Profile{tag}", "",
                  f"py-spy record of the source daemon ({r['tracker']}, guest dirtying "
                  f"{r['dirty_set']:g} MiB/s, after its window), {p['seconds']} s at "
                  f"{p['rate_hz']} Hz, all threads, idle samples excluded: {p['samples']} "
                  f"samples = {p['active_core_pct']}% of one core active. Own time (leaf frame):",
                  ""] + _head("#", "function (file)", "samples", "share", "% of a core",
                              "called from (stdlib leaf: nearest caller outside the stdlib)")
            for i, t in enumerate(p["top"], 1):
                L.append(f"| {i} | `{t['function']}` | {t['samples']} | {t['share_pct']}% | "
                         f"{t['core_pct']}% | {', '.join(f'`{c}`' for c in t['called_from'])} |")
            L += ["", "Inclusive time of replicator's own functions (in the sample's stack; "
                  "entry points present in every sample left out):", ""] + _head(
                      "function", "samples", "share", "% of a core")
            L += [f"| `{t['function']}` | {t['samples']} | {t['share_pct']}% | {t['core_pct']}% |"
                  for t in p["inclusive"]]
    L += ["", NOTES, "", "## Final JSON line", "", "```json", json.dumps(head), "```", "",
          "<details><summary>Raw results</summary>", "", "```json", json.dumps(res, indent=1),
          "```", "", "</details>", ""]
    return "\n".join(L)


NOTES = """## Notes

* **Baseline**: the same QEMU process before the sink joined (the source daemon launched it and
  only retries its connection; no migration, no scan), and again after the replicating window
  with replication paused (`POST /api/v1/pause`: the held-open migration or the scan ended, the
  peer still connected). Its CPU is the guest's own cost under TCG, and it drifts by a point or
  more within a run: the overhead is taken against the mean of the two. The daemon's CPU in
  those windows (status polls of this bench included) is shown apart.
* **TCG distorts the source QEMU's figures**: its CPU mostly measures emulation, and a
  dirty-bitmap sync under TCG resets the software TLB's dirty tracking rather than
  write-protecting guest pages as KVM does. The syncs per second carry over to KVM, where each
  sync write-protects the guest's RAM again (faults on the next writes), so fewer syncs also
  mean a faster guest there.
* **Syncs per second** come from `/api/v1/status` `precopy.dirty_sync_count`, which is the
  daemon's own last `query-migrate` (polled every `stream.precopy_interval`, 0.25 s): the
  window's delta is exact to within one poll.
* **Wire bytes per dirtied page** = wire bytes the source sent in the window (status
  `sent_bytes.wire`, after compression, before TLS) / (guest's mean `DIRTY` MiB/s × window /
  4 KiB). The pages sent / dirtied figure counts pages QEMU's stream carried (precopy: records
  forwarded; scan: raw bytes / 4 KiB). The dirtier rewrites whole pages with fresh pseudo-random
  bytes (`deploy/guest/guestload.c`), walking through its area, so each dirtied page carries
  4096 bytes that no compression or coalescing can save: 4096 plus the records' headers is the
  floor. What the guest's kernel writes meanwhile (`idle_wire_kBps`, the idle window's wire rate)
  travels on top and counts against the dirtier's pages; `wire_bytes_per_sent_page` is the
  wire per page the stream carried.
* **Lag** percentiles come from polling `/api/v1/status` during the window, so p99 is about the
  maximum of the samples. The polls cost the daemon a little CPU; the no-peer daemon figure
  includes the same polling.
* Both sides run on this one 2-core machine, so the sink daemon and shadow QEMU compete with the
  source for the cores; their CPU is shown but not counted in the overhead."""


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="512 MiB guest, 12 s windows (~4 min)")
    g.add_argument("--ci", action="store_true", help="256 MiB guest, 6 s windows (~3 min)")
    ap.add_argument("--out", help="also write the report (markdown) here")
    ap.add_argument("--label", default="", help="tag for headings, e.g. before / after")
    ap.add_argument("--trackers", default="qemu-precopy,scan", help="comma list")
    ap.add_argument("--poll", type=float, default=0.5, help="status poll interval in windows")
    ap.add_argument("--profile", type=float, help="py-spy seconds (20; --ci: 0 = none)")
    ap.add_argument("--wait-quiet", type=float, help="wait up to S s for a quiet machine")
    ap.add_argument("--strict", action="store_true", help="refuse to run on a busy machine")
    args = ap.parse_args()
    name = "ci" if args.ci else "quick" if args.quick else "full"
    if (args.profile if args.profile is not None else MODES[name].profile) and os.geteuid():
        print("bench.cost --profile needs root (py-spy attaches to the daemon)", file=sys.stderr)
        return 2
    import uvloop          # like the daemons: the stream section's source runs in this process
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    res = run_main(main_async(args, MODES[name], name))
    if not isinstance(res, dict):
        return int(res)
    head = headline(res)
    text = render(res, head, args.label, " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")
    print(text.split("\n## Final JSON line")[0])
    print(json.dumps(head), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
