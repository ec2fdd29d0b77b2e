"""Tracker benchmark: ``scan`` vs ``qemu-precopy`` on the same guest, same machine.

    .venv/bin/python -m bench.trackers [--ram 512MiB] [--seconds 10] [--quick]

For each tracker and each guest load (idle, dirtying), two real daemons on 127.0.0.1 replicate
the project's test guest (75% of RAM filled with incompressible data), then:

* source QEMU CPU (% of one core, /proc utime+stime) over a window, against the same guest
  running with no replication at all (the baseline, measured in the same run);
* source daemon CPU;
* staleness: ``lag_seconds`` from the status API, sampled every 200 ms (p50 / p99);
* a live switch: downtime (desktop STOP -> laptop RESUME) and time-to-switch.

Prints a markdown table; nothing here is hard-coded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replicator.config import parse_size
from replicator.demo import REPO, Daemon, _toml, ensure_guest, stop_pair
from replicator.guestlog import counters
from replicator.identity import Identity
from replicator.vmm.qemu import QemuProcess
from replicator.vmm.spec import VmSpec

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def find_qemu(ram_path: Path) -> int:
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(ram_path).encode() in cmd:
            return int(p.name)
    raise RuntimeError(f"no QEMU with {ram_path}")


async def cpu_share(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def wait_line(path: Path, word: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while word.encode() not in (path.read_bytes() if path.exists() else b""):
        if time.monotonic() > end:
            raise RuntimeError(f"guest never printed {word}")
        await asyncio.sleep(0.2)


async def baseline(work: Path, ram: int, kernel: Path, initrd: Path, dirty: float,
                   seconds: float) -> float:
    """Source QEMU CPU with no replication at all."""
    d = work / f"base-{dirty:g}"
    spec = VmSpec(name="base", ram_bytes=ram, ram_path=d / "ram", kernel=kernel, initrd=initrd,
                  append=f"console=ttyS0 quiet fill=75 dirty={dirty:g}", serial_log=d / "serial")
    proc = await QemuProcess.launch(spec, d)
    try:
        await wait_line(d / "serial", "FILLED", 120)
        await asyncio.sleep(2)
        return await cpu_share(proc.pid, seconds)
    finally:
        await proc.close()


async def run_pair(work: Path, ram: int, kernel: Path, initrd: Path, tracker: str,
                   dirty: float, seconds: float) -> dict:
    d = work / f"{tracker}-{dirty:g}"
    desk, lap = d / "desk", d / "lap"
    desk.mkdir(parents=True)
    lap.mkdir()
    desk_id = Identity.load_or_create(desk / "identity").node_id
    lap_id = Identity.load_or_create(lap / "identity").node_id
    qemu = {"ram_size": ram, "accel": "tcg", "kernel": str(kernel), "initrd": str(initrd),
            "append": f"console=ttyS0 quiet fill=75 dirty={dirty:g}"}
    (d / "lap.toml").write_text(_toml({
        "node": {"name": "laptop", "role": "sink", "state_dir": str(lap)},
        "domain": {"name": "vm", "driver": "qemu", "qemu": qemu},
        "peer": {"listen": "127.0.0.1:0", "id": desk_id},
        "control": {"listen": "127.0.0.1:0"}}))
    sink = Daemon("laptop", d / "lap.toml", lap, d / "lap.log")
    sink.start()
    source = None
    try:
        await sink.wait_api()
        _, st = await sink.request("GET", "/api/v1/status")
        (d / "desk.toml").write_text(_toml({
            "node": {"name": "desktop", "role": "source", "state_dir": str(desk)},
            "domain": {"name": "vm", "driver": "qemu", "tracker": tracker, "qemu": {
                **qemu, "launch": True, "ram_path": str(desk / "ram"),
                "serial_log": str(desk / "serial")}},
            "peer": {"address": st["listen"], "id": lap_id},
            "control": {"listen": "127.0.0.1:0"}}))
        source = Daemon("desktop", d / "desk.toml", desk, d / "desk.log")
        source.start()
        await source.wait_api(120)
        await wait_line(desk / "serial", "FILLED", 120)
        # Let the initial sync finish and the guest settle into its steady load.
        end = time.monotonic() + 120
        while time.monotonic() < end:
            _, st = await source.request("GET", "/api/v1/status")
            pre = st.get("precopy") or {}
            if (st.get("acked_epoch", 0) > 3 and st["lag"]["bytes"] < 64 << 20) or \
                    ((pre.get("dirty_sync_count") or 0) >= 3 and pre.get("pacing") == "idle"):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        qpid = find_qemu(desk / "ram")
        dpid = source.proc.pid
        q0, s0, t0 = cpu_seconds(qpid), cpu_seconds(dpid), time.monotonic()
        stale: list[float] = []
        while time.monotonic() - t0 < seconds:
            _, st = await source.request("GET", "/api/v1/status")
            stale.append(st["lag"]["seconds"])
            await asyncio.sleep(0.2)
        dt = time.monotonic() - t0
        qemu_cpu = 100 * (cpu_seconds(qpid) - q0) / dt
        daemon_cpu = 100 * (cpu_seconds(dpid) - s0) / dt
        before = counters(desk / "serial")[-1]
        code, sw = await source.request("POST", "/api/v1/switch", {"mode": "live"})
        if code != 200:
            raise RuntimeError(f"switch failed: {sw}")
        shadow_log = lap / "vm" / "shadow-serial.log"
        end = time.monotonic() + 30
        while len(counters(shadow_log)) < 2 and time.monotonic() < end:
            await asyncio.sleep(0.2)
        after = counters(shadow_log)
        return {"qemu_cpu": qemu_cpu, "daemon_cpu": daemon_cpu,
                "stale_p50": pct(stale, 0.5), "stale_p99": pct(stale, 0.99),
                "downtime_ms": sw["downtime_ms"], "tts_ms": sw["time_to_switch_ms"],
                "final_delta_pages": sw["final_delta_pages"],
                "continues": bool(after) and after[0] == before + 1}
    finally:
        await stop_pair(source, sink)


async def main(args: argparse.Namespace) -> None:
    ram = parse_size(args.ram)
    kernel, initrd = ensure_guest(REPO / "build" / "guest")
    work = Path(tempfile.mkdtemp(prefix="replicator-bench-", dir="/dev/shm"))
    loads = [0.0, 20.0] if not args.quick else [0.0]
    rows = []
    try:
        for dirty in loads:
            base = await baseline(work, ram, kernel, initrd, dirty, args.seconds)
            for tracker in ("scan", "qemu-precopy"):
                r = await run_pair(work, ram, kernel, initrd, tracker, dirty, args.seconds)
                rows.append((dirty, tracker, base, r))
                print(f"  {tracker:13} dirty={dirty:g} MiB/s: {r}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    print(f"\n### Trackers: {ram >> 20} MiB guest, 75% filled, loopback\n")
    print(f"{os.cpu_count()} cores, TCG, {qv}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; CPU windows {args.seconds:g} s.\n")
    print("| guest dirty | tracker | source QEMU CPU (baseline) | daemon CPU | staleness p50 / "
          "p99 | downtime | time to switch | final delta | counter continues |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dirty, tracker, base, r in rows:
        print(f"| {dirty:g} MiB/s | {tracker} | {r['qemu_cpu']:.1f}% ({base:.1f}%) | "
              f"{r['daemon_cpu']:.1f}% | {r['stale_p50']:.2f} / {r['stale_p99']:.2f} s | "
              f"{r['downtime_ms']:.1f} ms | {r['tts_ms']:.1f} ms | {r['final_delta_pages']} pages "
              f"| {r['continues']} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default="512MiB")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args()))
