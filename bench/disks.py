"""A VM with a disk: replicator's switch against QEMU's own storage migration, same run.

Run from the repository root, as root (network namespaces, tc)::

    .venv/bin/python -m bench.disks [--quick] [--out bench/RESULTS-disks.md]

Every *cell* (link profile x guest disk write rate) boots the same guest (``bench.compare``'s:
RAM filled to 75% and dirtied at 2 MiB/s) with a qcow2 disk holding incompressible data
(4 GiB, 2 GiB written; ``--quick``: 256 MiB, 128 MiB written), the guest rewriting its disk at
the cell's rate (kernel arg ``diskdirty``; its ``DISKDIRTY`` lines report what it achieved),
and runs, one after the other:

1. **QEMU**, non-shared storage as libvirt's ``--copy-storage-all`` does it: the destination
   starts with ``-incoming defer`` on an empty image of the same virtual size and exports it
   writable over NBD (``nbd-server-start`` + ``block-export-add``); the source mirrors its disk
   into it (``blockdev-add`` NBD client + ``blockdev-mirror`` sync=full), waits for
   ``BLOCK_JOB_READY``, migrates RAM (``migrate``, max-bandwidth = the link), and when the
   migration completes cancels the ready mirror (``block-job-cancel``: a point-in-time copy);
   the destination stops its NBD server and resumes. Total = mirror start -> destination
   ``RESUME``; downtime = source ``STOP`` -> destination ``RESUME`` (QMP timestamps).
2. **replicator, RAM only** (once per link profile): ``bench.compare``'s live switch of the
   same guest without a disk, the reference for the downtime a disk may add.
3. **replicator, live** (and **stop** on a fresh pair): two daemons, the desktop VM launched
   with the disk; the sink joins once the guest filled its RAM; wait until every disk's first
   copy is done (``copy == "streaming"``) and the source reports ``in_sync``; a short steady
   window; then ``POST /api/v1/switch``. Time to switch counts from the request.

With a disk write rate, the guest also checks its disk (``diskcheck``): blocks it wrote before
the switch are read back on the destination, so a stale copy shows as ``DISKCHECK FAIL``.
Progress goes to stderr; the table and a final JSON line to stdout; the report (markdown, raw
JSON at the end) to ``--out``. Runs live in a private directory in /dev/shm, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare import (GUEST, MiB, PROFILES, QEMU_PORT, ROOT, SWITCH_KEYS, Cell, CounterWatch,
                           CpuMeter, Ctx, Net, Reaper, _ms, _ratio, api, append_line, brief,
                           counters, dirty_values, end_pair, filled_mib, free_port, guarded,
                           loadavg, log, machine_facts, pair_configs, pct, replicator_switch,
                           run_main, start_daemon, switch_watched, wait_for)
from replicator.vmm.disks import DiskSpec
from replicator.vmm.qemu import QemuProcess
from replicator.vmm.spec import VmSpec, build_argv

DISKDIRTY_RE = re.compile(rb"DISKDIRTY (\d+(?:\.\d+)?)")
DISKCHECK_RE = re.compile(rb"DISKCHECK (OK|FAIL) round=\d+ (?:regions=(\d+)|bad=)")
NBD_PORT = 10809
DISK_KEYS = SWITCH_KEYS + ("disk_final_delta_bytes", "disks_verified", "message")


@dataclasses.dataclass(frozen=True)
class DiskCell:
    profile: str
    disk_mib: int           # virtual size
    data_mib: int           # incompressible data written before the VM starts
    rate: float             # guest disk writes, MiB/s (diskdirty)
    ram_mib: int
    dirty: float = 2        # guest RAM dirtying, MiB/s

    @property
    def tag(self) -> str:
        return f"{self.profile}-disk{self.disk_mib}m-w{self.rate:g}"

    @property
    def ram(self) -> Cell:
        return Cell(self.profile, self.ram_mib, self.dirty)


QUICK = [DiskCell("loopback", 256, 128, 5, 256)]
FULL = [DiskCell(p, 4096, 2048, r, 1024) for p in ("lan1g", "loopback") for r in (0, 5)]


def append(cell: DiskCell, diskcheck: float) -> str:
    extra = f" diskdirty={cell.rate:g}" if cell.rate else ""
    if cell.rate and diskcheck:
        extra += f" diskcheck={diskcheck:g}"
    return append_line(cell.ram) + extra


def disk_rates(path: Path, start: int = 0) -> list[float]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return [float(x) for x in DISKDIRTY_RE.findall(f.read())]
    except FileNotFoundError:
        return []


def diskchecks(path: Path) -> dict[str, int]:
    """The guest's disk-check rounds in a serial log: passed, failed, and the most regions
    one round checked (every 8th round checks every region written so far)."""
    try:
        found = DISKCHECK_RE.findall(path.read_bytes())
    except FileNotFoundError:
        found = []
    return {"ok": sum(ok == b"OK" for ok, _ in found), "fail": sum(ok == b"FAIL" for ok, _ in found),
            "max_regions": max((int(n) for _, n in found if n), default=0)}


async def await_full_check(serial: Path) -> dict[str, int]:
    """Wait (at most 25 s) for a disk-check round that checks every region written so far, on
    the side the VM runs on now: blocks written before the hand-over are read back there."""
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: (lambda c: c["fail"] or c["max_regions"] > 1)(diskchecks(serial)),
                       25, "a full disk check", 0.5)
    return diskchecks(serial)


async def same_disk(a: Path, b: Path) -> bool | str:
    """Guest-visible contents equal (``qemu-img compare``; -U: both may be open in QEMU)."""
    r = await asyncio.to_thread(subprocess.run, ["qemu-img", "compare", "-U", str(a), str(b)],
                                capture_output=True, text=True)
    return r.returncode == 0 if r.returncode in (0, 1) else f"error: {r.stderr.strip()[:200]}"


def keep_serials(ctx: Ctx, name: str, *logs: Path) -> None:
    if ctx.keep_logs:
        (ctx.keep_logs / name).mkdir(parents=True, exist_ok=True)
        for f in logs:
            with contextlib.suppress(OSError):
                shutil.copy(f, ctx.keep_logs / name / f"serial-{f.name}")


def make_image(path: Path, size_mib: int, data_mib: int) -> float:
    """A qcow2 image of ``size_mib`` whose first ``data_mib`` hold random (incompressible)
    data, the rest unallocated. Returns the seconds it took."""
    t0 = time.monotonic()
    raw = path.with_suffix(".raw")
    gen = np.random.SFC64()
    with open(raw, "wb") as f:
        for _ in range(data_mib // 8):
            f.write(gen.random_raw(MiB).tobytes())      # 8 MiB a step
        f.truncate(size_mib * MiB)
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True)
    finally:
        raw.unlink()
    return time.monotonic() - t0


def copy_image(image: Path, to: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(image), str(to)], check=True)


def link_rate(net: Net) -> float:
    return net.profile.rate_bytes or 150e6


# --- QEMU: storage migration over NBD + RAM migration -----------------------------------------

async def qemu_storage_migration(ctx: Ctx, cell: DiskCell, net: Net, image: Path,
                                 diskcheck: float) -> dict[str, Any]:
    d = ctx.work / f"{cell.tag}-qemu"
    (d / "serial").mkdir(parents=True)
    src_img, dst_img = d / "src.qcow2", d / "dst.qcow2"
    copy_image(image, src_img)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst_img),
                    str(cell.disk_mib * MiB)], check=True)
    src_serial, dst_serial = d / "serial" / "src.log", d / "serial" / "dst.log"

    def spec(name: str, serial: Path, img: Path) -> VmSpec:
        return VmSpec(name=name, ram_bytes=cell.ram_mib * MiB, ram_path=d / f"{name}.ram",
                      accel="tcg", kernel=GUEST / "vmlinux", initrd=GUEST / "initramfs.cpio.gz",
                      append=append(cell, diskcheck), disks=(DiskSpec(img, "qcow2"),),
                      serial_log=serial)

    mport, nport = (QEMU_PORT, NBD_PORT) if net.hosts else (free_port(), free_port())
    out: dict[str, Any] = {}
    procs, src, dst = [], None, None
    try:
        for name, host, argv in (
                ("dst", "lap", build_argv(spec("dst", dst_serial, dst_img), d / "dst.qmp",
                                          incoming="defer")),
                ("src", "desk", build_argv(spec("src", src_serial, src_img), d / "src.qmp"))):
            procs.append(ctx.reaper.popen(net.prefix(host) + argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(d / f"{name}.stderr", "wb")))
        await wait_for(lambda: (d / "dst.qmp").exists() and (d / "src.qmp").exists(), 30,
                       "QEMU QMP sockets")
        dst = await QemuProcess.attach(d / "dst.qmp", workdir=d)
        src = await QemuProcess.attach(d / "src.qmp", workdir=d)
        out["filled_mib"] = await wait_for(lambda: filled_mib(src_serial), 180,
                                           "FILLED from the source guest", 0.2)
        if cell.rate:
            await wait_for(lambda: disk_rates(src_serial), 30, "DISKDIRTY from the guest", 0.2)
        # The destination, as libvirt prepares it: NBD server with the empty image writable.
        await dst.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
            "host": net.lap, "port": str(nport)}}})
        await dst.execute("block-export-add", {"type": "nbd", "id": "mig0", "node-name": "disk0",
                                               "name": "disk0", "writable": True})
        await dst.execute("migrate-incoming", {"uri": f"tcp:{net.lap}:{mport}"})
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await src.execute("migrate-set-parameters", {"max-bandwidth": int(net.profile.rate_bytes
                                                                          or 0)})
        watch = CounterWatch([src_serial, dst_serial])
        watch.start()
        try:
            await asyncio.sleep(0.7)
            ms, md = src.event_mark(), dst.event_mark()
            tx0 = net.tx_bytes()
            t0 = time.monotonic()
            await src.execute("blockdev-add", {"driver": "nbd", "node-name": "mig-target",
                                               "server": {"type": "inet", "host": net.lap,
                                                          "port": str(nport)},
                                               "export": "disk0"})
            await src.execute("blockdev-mirror", {"job-id": "mirror0", "device": "disk0",
                                                  "target": "mig-target", "sync": "full"})
            limit = 4 * cell.data_mib * MiB / link_rate(net) + 120
            ready = await src.wait_event("BLOCK_JOB_READY", timeout=limit, after=ms)
            t_ready = time.monotonic()
            out["mirror_ready_ms"] = round((t_ready - t0) * 1000, 1)
            out["mirror_len"] = ready.data.get("len")
            tx_ready = net.tx_bytes()
            await src.execute("migrate", {"uri": f"tcp:{net.lap}:{mport}"})
            ev = await src.wait_event(
                "MIGRATION", timeout=4 * cell.ram_mib * MiB / link_rate(net) + 120, after=ms,
                match=lambda e: e.data.get("status") in ("completed", "failed", "cancelled"))
            info = await src.execute("query-migrate")
            if ev.data["status"] != "completed":
                raise RuntimeError(f"migration {ev.data['status']}: {info.get('error-desc')}")
            # libvirt: once the migration completed (source paused), cancel the ready mirror,
            # which finishes with a point-in-time copy; then the destination stops its NBD
            # server and resumes.
            t_mig = time.monotonic()
            await src.execute("block-job-cancel", {"device": "mirror0"})
            done = await src.wait_event("BLOCK_JOB_COMPLETED", timeout=120, after=ms)
            if done.data.get("error"):
                raise RuntimeError(f"mirror ended with {done.data['error']}")
            t_cancel = time.monotonic()
            await dst.execute("nbd-server-stop")
            await dst.execute("cont")
            resume = await dst.wait_event("RESUME", timeout=60, after=md)
            stop = next(e for e in src.events if e.seq > ms and e.name == "STOP")
            tx1 = net.tx_bytes()
            out.update({
                "total_ms": round((resume.monotonic - t0) * 1000, 1),
                "downtime_ms": round((resume.qemu_wall - stop.qemu_wall) * 1000, 1),
                "migrate_ms": info.get("total-time"),
                "qemu_reported_downtime_ms": info.get("downtime"),
                "cancel_ms": round((t_cancel - t_mig) * 1000, 1),
                "mirror_bytes": done.data.get("offset"),
                "ram_transferred_bytes": (info.get("ram") or {}).get("transferred"),
                "link_bytes": (tx1 - tx0) if tx0 is not None else None,
                "link_bytes_mirror": (tx_ready - tx0) if tx0 is not None else None,
            })
            out["mirror_MBps"] = round(cell.data_mib * MiB / (t_ready - t0) / 1e6, 1)
            await wait_for(lambda: len(counters(dst_serial)) >= 2, 20,
                           "two COUNTER lines on the destination")
        finally:
            watch.stop()
        if cell.rate:
            out["diskcheck_dst"] = await await_full_check(dst_serial)
        else:
            # No guest writes on either side: the destination's image must equal the source's
            # (its QEMU writes its qcow2 metadata out first).
            await dst.execute("human-monitor-command", {
                "command-line": 'qemu-io -d /machine/peripheral/disk0-dev/virtio-backend flush'})
            out["copy_equal"] = await same_disk(src_img, dst_img)
        out["counter"] = watch.gap(src_serial, dst_serial)
        # the migration may be shorter than the guest's 5 s reports: the whole run's
        out["disk_rates"] = disk_rates(src_serial) + disk_rates(dst_serial)
        out["dirty_all"] = dirty_values(src_serial)
        return out
    finally:
        keep_serials(ctx, d.name, src_serial, dst_serial)
        for q in (src, dst):
            if q is not None:
                with contextlib.suppress(Exception):
                    await q.close()
        for p in procs:
            ctx.reaper.stop(p, grace=0)
        shutil.rmtree(d, ignore_errors=True)


# --- replicator with a disk -------------------------------------------------------------------

def _disks_copied(st: dict[str, Any]) -> bool:
    disks = st.get("disks") or []
    return bool(disks) and all(x.get("copy") == "streaming" and x.get("acked_generation", 0) > 0
                               for x in disks)


async def replicator_disk_switch(ctx: Ctx, cell: DiskCell, net: Net, mode: str, image: Path,
                                 window: float, diskcheck: float) -> dict[str, Any]:
    d = ctx.work / f"{cell.tag}-rep-{mode}"
    disk = d / "desk-disk.qcow2"
    pair = pair_configs(ctx, cell.ram, net, d, append=append(cell, diskcheck),
                        desk_qemu={"disks": [str(disk)]})
    # The disk with its format, as an inline table (the configs' tiny TOML writer has none).
    toml = d / "desk.toml"
    listed = f"disks = {json.dumps([str(disk)])}"
    assert listed in toml.read_text()
    toml.write_text(toml.read_text().replace(
        listed, f'disks = [{{path = {json.dumps(str(disk))}, format = "qcow2"}}]'))
    copy_image(image, disk)
    out: dict[str, Any] = {"mode": mode}
    try:
        await start_daemon(ctx, net, pair, "source")
        out["filled_mib"] = await wait_for(lambda: filled_mib(pair.desk_serial), 180,
                                           "FILLED from the desk guest", 0.2)
        await start_daemon(ctx, net, pair, "sink")
        tx0, t_sink = net.tx_bytes(), time.monotonic()
        t_conn = t_disk = None
        streak, last_log = 0, t_sink
        # generous: a loaded 2-core host copies far below the link (and may reconnect)
        limit = 8 * cell.data_mib * MiB / link_rate(net) + 300
        while True:
            _, st = await api(pair.desk_sock, "GET", "/api/v1/status")
            now = time.monotonic()
            if st.get("peer", {}).get("connected") and t_conn is None:
                t_conn = now
            if t_disk is None and _disks_copied(st):
                t_disk = now
                dk = st["disks"]
                out["first_copy_s"] = round(now - (t_conn or t_sink), 2)
                out["first_copy_sent"] = [x["sent_bytes"] for x in dk]
                out["first_copy_MBps"] = round(sum(x["sent_bytes"]["raw"] for x in dk)
                                               / max(now - (t_conn or t_sink), 1e-3) / 1e6, 1)
                if tx0 is not None:
                    out["first_copy_link_bytes"] = net.tx_bytes() - tx0   # RAM sync included
            streak = streak + 1 if (t_disk and st.get("in_sync")) else 0
            if streak >= 3:
                break
            if now - last_log > 15:
                last_log = now
                log(f"  copying: disks {[(x['copy'], round(x['progress'], 2)) for x in st.get('disks', [])]}"
                    f", RAM lag {st.get('lag', {}).get('bytes', 0) / MiB:.0f} MiB")
            if now - t_sink > limit:
                raise TimeoutError(f"first copy / in_sync not within {limit:.0f} s: "
                                   f"disks {st.get('disks')}, lag {st.get('lag')}")
            await asyncio.sleep(0.2)
        out["in_sync_after_s"] = round(now - 0.4 - (t_conn or t_sink), 2)
        if window:
            off = pair.desk_serial.stat().st_size
            meter = CpuMeter({"daemon": pair.source.pid, "qemu": pair.qemu_pid})
            w0, t0 = [x["sent_bytes"]["wire"] for x in st["disks"]], time.monotonic()
            lag_b, lag_s, insync = [], [], 0
            while time.monotonic() - t0 < window:
                await asyncio.sleep(0.2)
                _, st = await api(pair.desk_sock, "GET", "/api/v1/status")
                lag_b.append(sum(x["lag"]["bytes"] for x in st["disks"]))
                lag_s.append(max(x["lag"]["seconds"] for x in st["disks"]))
                insync += bool(st.get("in_sync"))
            dt = time.monotonic() - t0
            wire = sum(x["sent_bytes"]["wire"] for x in st["disks"]) - sum(w0)
            out["disk_steady"] = {
                "seconds": round(dt, 1), "disk_lag_p50_KiB": round(pct(lag_b, 0.5) / 1024, 1),
                "disk_lag_p99_KiB": round(pct(lag_b, 0.99) / 1024, 1),
                "disk_lag_p99_s": round(pct(lag_s, 0.99), 2),
                "in_sync_share": round(insync / max(len(lag_b), 1), 2),
                "disk_wire_MBps": round(wire / dt / 1e6, 2), **{
                    f"{k}_cpu_pct": v for k, v in meter.percent().items()},
                "disk_rates": disk_rates(pair.desk_serial, off)}
        await switch_watched(ctx, pair, mode, out, DISK_KEYS)
        res = out.get("result") or {}
        out["disk_final_delta_bytes"] = res.get("disk_final_delta_bytes")
        out["disks_verified"] = res.get("disks_verified")
        out["disk_rates"] = disk_rates(pair.desk_serial)
        if cell.rate and res:
            out["diskcheck_dst"] = await await_full_check(pair.lap_serial)
        elif res:
            # No guest writes: the laptop's copy must equal the desktop's disk (which its QEMU
            # flushed when it handed the VM over).
            out["copy_equal"] = await same_disk(disk, pair.lap / "vm" / "disk0.qcow2")
        return out
    finally:
        keep_serials(ctx, d.name, pair.desk_serial, pair.lap_serial)
        await end_pair(ctx, pair)


# --- orchestration ----------------------------------------------------------------------------

def _need(cell: DiskCell, modes: list[str]) -> float:
    """Rough seconds a cell takes: its disk data and RAM over the link once per run, plus
    boots, fills and switches (~45 s a run on this machine)."""
    per_run = (cell.data_mib + 0.75 * cell.ram_mib) * MiB / link_rate_of(cell) + 45
    return per_run * (1 + len(modes)) + 50       # + the RAM-only switch


def link_rate_of(cell: DiskCell) -> float:
    return PROFILES[cell.profile].rate_bytes or 150e6


async def run(args: argparse.Namespace, ctx: Ctx, cells: list[DiskCell],
              images: dict[tuple[int, int], Path]) -> tuple[list[dict], dict[str, dict]]:
    results: list[dict[str, Any]] = []
    ram_only: dict[str, dict[str, Any]] = {}
    modes = args.modes.split(",")
    t_start = time.monotonic()
    for pname in dict.fromkeys(c.profile for c in cells):
        net = Net(PROFILES[pname])
        try:
            for cell in (c for c in cells if c.profile == pname):
                res: dict[str, Any] = {"cell": dataclasses.asdict(cell), "tag": cell.tag,
                                       "load_before": loadavg()}
                left = args.budget - (time.monotonic() - t_start)
                if _need(cell, modes) > left:
                    log(f"{cell.tag}: skipped (needs ~{_need(cell, modes):.0f} s, "
                        f"{left:.0f} s left)")
                    res["skipped"] = True
                    results.append(res)
                    continue
                t0 = time.monotonic()
                image = images[(cell.disk_mib, cell.data_mib)]
                if args.ram_only:
                    # Next to each cell: load from elsewhere on the machine drifts.
                    log(f"{cell.tag}: replicator, same guest without a disk (RAM only), live")
                    ram_only[cell.tag] = await guarded("RAM only", replicator_switch(
                        ctx, cell.ram, net, "live", args.window))
                    log(f"  -> {brief(ram_only[cell.tag])}")
                log(f"{cell.tag}: QEMU storage migration (NBD mirror + migrate)")
                res["qemu"] = await guarded("QEMU", qemu_storage_migration(
                    ctx, cell, net, image, args.diskcheck))
                log(f"  -> {brief(res['qemu'])}")
                for mode in modes:
                    if mode != modes[0] and _need(cell, []) > args.budget - (
                            time.monotonic() - t_start):
                        log(f"{cell.tag}: replicator {mode}: skipped for time")
                        continue
                    log(f"{cell.tag}: replicator with the disk, {mode} switch")
                    res[mode] = await guarded(f"replicator {mode}", replicator_disk_switch(
                        ctx, cell, net, mode, image, args.window if mode == "live" else 0,
                        args.diskcheck))
                    log(f"  -> {brief(res[mode])}, first copy "
                        f"{res[mode].get('first_copy_s')} s")
                res["wall_s"] = round(time.monotonic() - t0, 1)
                res["load_after"] = loadavg()
                results.append(res)
                if args.json_dump:
                    Path(args.json_dump).write_text(json.dumps(
                        {"results": results, "ram_only": ram_only}, indent=1))
        finally:
            net.destroy()
    return results, ram_only


# --- report -----------------------------------------------------------------------------------

def _median(v: list[float]) -> float | None:
    return sorted(v)[len(v) // 2] if v else None


def _achieved(r: dict[str, Any]) -> str:
    vals = [x for k in ("qemu", "live", "stop") for x in (r.get(k) or {}).get("disk_rates", [])]
    m = _median(vals)
    set_ = r["cell"]["rate"]
    return f"{set_:g} → {m:.1f}" if m is not None else (f"{set_:g} → no DISKDIRTY lines"
                                                         if set_ else "0")


def _pair(r: dict[str, Any], a: str, b: str) -> str:
    if r.get("error"):
        return "FAILED: " + str(r["error"])[:80]
    return f"{_ms(r.get(a))} / {_ms(r.get(b))}" if r else "—"


def summary(results: list[dict], ram_only: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.get("skipped"):
            rows.append({"cell": r["tag"], "skipped": True})
            continue
        q, lv, sp = (r.get(k) or {} for k in ("qemu", "live", "stop"))
        ro = ram_only.get(r["tag"]) or {}
        row = {"cell": r["tag"], "disk_write_MiBps": _median(
                   [x for k in ("qemu", "live", "stop") for x in (r.get(k) or {}).get(
                       "disk_rates", [])]),
               "qemu_total_ms": q.get("total_ms"), "qemu_downtime_ms": q.get("downtime_ms"),
               "ram_only_downtime_ms": ro.get("downtime_ms"),
               "ram_only_switch_ms": ro.get("time_to_switch_ms")}
        for mode, x in (("live", lv), ("stop", sp)):
            row.update({f"{mode}_switch_ms": x.get("time_to_switch_ms"),
                        f"{mode}_downtime_ms": x.get("downtime_ms"),
                        f"{mode}_first_copy_s": x.get("first_copy_s"),
                        f"{mode}_disk_final_delta_bytes": x.get("disk_final_delta_bytes"),
                        f"{mode}_disks_verified": x.get("disks_verified")})
            if x.get("error"):
                row[f"{mode}_error"] = x["error"]
        if lv.get("time_to_switch_ms") and q.get("total_ms"):
            row["time_ratio_live"] = round(lv["time_to_switch_ms"] / q["total_ms"], 5)
        if lv.get("downtime_ms") is not None and ro.get("downtime_ms") is not None:
            row["downtime_vs_ram_only_ms"] = round(lv["downtime_ms"] - ro["downtime_ms"], 1)
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, judged on the 1 Gbit rows with the 4 GiB disk (what was measured)."""
    g = [r for r in rows if r["cell"].startswith("lan1g-disk4096m") and not r.get("skipped")]
    ratio = [r.get("time_ratio_live") for r in g]
    delta = [r.get("downtime_vs_ram_only_ms") for r in g]
    return {
        "rows": [r["cell"] for r in g],
        "time_ratio_live": ratio,
        "time_to_switch_le_1pct_of_qemu": (all(x is not None and x <= 0.01 for x in ratio)
                                           if g else None),
        "downtime_vs_ram_only_ms": delta,
        "downtime_within_10ms_of_ram_only": (all(x is not None and x <= 10 for x in delta)
                                             if g else None),
    }


def table(results: list[dict], ram_only: dict[str, dict]) -> list[str]:
    L = ["| link | disk (data) | guest disk writes MiB/s: set → achieved | QEMU total / downtime "
         "| repl. first copy: time, rate | repl. live: switch / downtime | repl. stop: switch / "
         "downtime | RAM-only live: switch / downtime | time ratio live / QEMU | live downtime "
         "− RAM-only | final disk delta live · stop | disks verified | the copy, checked on "
         "the destination (QEMU · live · stop) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["cell"]
        if r.get("skipped"):
            L.append(f"| {c['profile']} | {c['disk_mib']} MiB ({c['data_mib']} MiB) | "
                     f"{c['rate']:g} | skipped for the time budget |" + " |" * 9)
            continue
        q, lv, sp = (r.get(k) or {} for k in ("qemu", "live", "stop"))
        ro = ram_only.get(r["tag"]) or {}

        def dc(x: dict[str, Any]) -> str:
            if "copy_equal" in x:
                return {True: "equal", False: "**DIFFERENT**"}.get(x["copy_equal"],
                                                                   str(x["copy_equal"]))
            v = x.get("diskcheck_dst")
            if not v:
                return "—"
            return (f"{v['ok']} ok / {v['fail']} fail" + (", full ✓" if v["max_regions"] > 1
                                                           else ", no full check"))

        def kib(x: dict[str, Any]) -> str:
            v = x.get("disk_final_delta_bytes")
            return "—" if v is None else f"{v / 1024:.0f} KiB"
        first = (f"{lv['first_copy_s']:.1f} s, {lv.get('first_copy_MBps')} MB/s"
                 if lv.get("first_copy_s") is not None else "—")
        delta = (None if lv.get("downtime_ms") is None or ro.get("downtime_ms") is None
                 else lv["downtime_ms"] - ro["downtime_ms"])
        L.append("| " + " | ".join([
            c["profile"], f"{c['disk_mib']} MiB ({c['data_mib']} MiB)", _achieved(r),
            _pair(q, "total_ms", "downtime_ms"), first,
            _pair(lv, "time_to_switch_ms", "downtime_ms"),
            _pair(sp, "time_to_switch_ms", "downtime_ms"),
            _pair(ro, "time_to_switch_ms", "downtime_ms"),
            _ratio(lv.get("time_to_switch_ms"), q.get("total_ms")),
            "—" if delta is None else f"{delta:+.1f} ms",
            f"{kib(lv)} · {kib(sp)}",
            f"{lv.get('disks_verified', '—')} · {sp.get('disks_verified', '—')}",
            f"{dc(q)} · {dc(lv)} · {dc(sp)}"]) + " |")
    return L


def details(results: list[dict]) -> list[str]:
    L = ["| cell | QEMU: mirror ready, migrate, cancel; link bytes (mirror) | QEMU counter gap "
         "| repl. live: in_sync after, first-copy sent raw / wire, link bytes during it | "
         "steady: disk lag p50 / p99, source daemon / QEMU CPU | counter gap live · stop | "
         "cell wall time (load before → after) |",
         "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("skipped"):
            continue
        q, lv, sp = (r.get(k) or {} for k in ("qemu", "live", "stop"))
        s = lv.get("disk_steady") or {}

        def mib(v: Any) -> str:
            return "—" if v is None else f"{v / MiB:.0f} MiB"

        def gap(x: dict[str, Any]) -> str:
            c = x.get("counter") or {}
            return (f"{_ms(c['downtime_ms'])} {'✓' if c.get('ok') else '✗'}"
                    if "downtime_ms" in c else c.get("why", "—"))
        sent = lv.get("first_copy_sent") or []
        L.append("| " + " | ".join([
            r["tag"],
            (f"{_ms(q.get('mirror_ready_ms'))} ({q.get('mirror_MBps')} MB/s), "
             f"{_ms(q.get('migrate_ms'))}, {_ms(q.get('cancel_ms'))}; " + (
                 f"link {mib(q.get('link_bytes'))} ({mib(q.get('link_bytes_mirror'))})"
                 if q.get("link_bytes") is not None else
                 f"QEMU's counts: mirror {mib(q.get('mirror_bytes'))} + RAM "
                 f"{mib(q.get('ram_transferred_bytes'))}") if q.get("total_ms") else "—"),
            gap(q),
            (f"{lv.get('in_sync_after_s')} s, "
             + ", ".join(f"{mib(x['raw'])} / {mib(x['wire'])}" for x in sent)
             + f", link {mib(lv.get('first_copy_link_bytes'))}" if sent else "—"),
            (f"{s['disk_lag_p50_KiB']} / {s['disk_lag_p99_KiB']} KiB, "
             f"{s.get('daemon_cpu_pct')}% / {s.get('qemu_cpu_pct')}%" if s else "—"),
            f"{gap(lv)} · {gap(sp)}",
            f"{r.get('wall_s')} s ({r['load_before'][0]:.1f} → "
            f"{(r.get('load_after') or [0])[0]:.1f})"]) + " |")
    return L


def render(facts: dict[str, Any], results: list[dict], ram_only: dict[str, dict],
           rows: list[dict], args: argparse.Namespace) -> str:
    g = goals(rows)
    L = ["# A VM with a disk: replicator's switch vs QEMU's storage migration", "",
         f"Generated by `.venv/bin/python -m bench.disks{' --quick' if args.quick else ''}` "
         "(bench/disks.py); every figure was measured in this run.", "",
         f"Machine: {facts['cores']} cores ({facts['cpu']}), {facts['mem_GiB']} GiB, "
         f"{facts['qemu']}, {facts['accel']}; commit {facts['commit']}; load "
         f"{facts['load_at_start']} at start, {facts.get('load_at_end')} at the end; "
         f"{facts.get('runtime_s', 0) / 60:.1f} min; tracker `{args.tracker}`.", "",
         "* **QEMU**: non-shared storage as libvirt's `--copy-storage-all` does it (NBD export on "
         "the destination, `blockdev-mirror` sync=full, `migrate` once the mirror is ready, "
         "`block-job-cancel` at completion, `nbd-server-stop`, `cont`). *total* = mirror start "
         "→ destination RESUME; *downtime* = source STOP → destination RESUME (QMP times).",
         "* **replicator**: two daemons, the VM's qcow2 disk replicated into the laptop's own "
         "copy (`stream.disk_interval` 1 s); *switch* = time_to_switch_ms (request → running on "
         "the laptop), *downtime* = downtime_ms; stop mode on a fresh pair. *first copy* = sink "
         "connected → every disk streaming (RAM's initial sync runs at the same time).",
         "* **RAM-only**: the same guest without a disk (`bench.compare`'s live switch), run "
         "next to each cell: the downtime the disk is compared with.",
         "* Guest: RAM filled to 75% and dirtied at 2 MiB/s; disk writes by the guest "
         "(`diskdirty`, O_DIRECT); with writes on, `diskcheck` "
         f"every {args.diskcheck:g} s also writes and reads back 1 MiB (its reads on the "
         "destination catch a stale copy).",
         "* *the copy, checked*: without guest writes, `qemu-img compare` of the source's disk "
         "and the destination's image after the hand-over (*equal*); with writes, the guest's "
         "own disk check on the destination (*full ✓*: a round that re-read every region "
         "written so far, before and after the hand-over). *disks verified* is replicator's "
         "own digest check at the switch.", "",
         *table(results, ram_only), "",
         "## Goals (issue): 1 Gbit, 4 GiB disk", "",
         f"* time to switch ≤ 1/100 of QEMU's total: ratios {g['time_ratio_live']} → "
         f"**{g['time_to_switch_le_1pct_of_qemu']}**",
         f"* downtime within 10 ms of the RAM-only switch: live − RAM-only "
         f"{g['downtime_vs_ram_only_ms']} ms → **{g['downtime_within_10ms_of_ram_only']}**",
         "", "## Details", "", *details(results), "", NOTES,
         *(["## Notes on this run", "", args.note, ""] if getattr(args, "note", "") else []),
         "<details><summary>Raw results (JSON)</summary>", "", "```json",
         json.dumps({"facts": facts, "results": results, "ram_only": ram_only, "summary": rows},
                    indent=1), "```", "", "</details>", ""]
    return "\n".join(L)


NOTES = """## What limits these figures

* **2 cores, shared**: both QEMUs, both daemons, TLS, tbf and this script share two cores, and
  other jobs may run at the same time (see the load averages per cell). The replicator's first
  copy (NBD read, hash, TLS, qemu-nbd write, beside a TCG guest) and the QMP round trips inside
  every switch compete for them; on loopback the copy is CPU-bound.
* **TCG** guests; **tmpfs** for every image (a laptop's SSD adds its flush to each disk round).
* **One sample per row**: a downtime difference of a few ms between two rows is within the
  run-to-run spread here; a failed or odd row is reported as it happened, not re-run.
* The RAM-only switch runs next to each cell (same link, same guest without the disk), so
  drifting load affects both alike as far as possible.
"""


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench.disks needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    if not (GUEST / "vmlinux").exists():
        print(f"no test guest in {GUEST} (make guest)", file=sys.stderr)
        return 2
    cells = QUICK if args.quick else FULL
    if args.profiles:
        cells = [c for c in cells if c.profile in args.profiles.split(",")]
    work = Path(tempfile.mkdtemp(prefix="rpl-disks-", dir="/dev/shm"))
    ctx = Ctx(work, Reaper(work), Path(args.keep_logs) if args.keep_logs else None, False,
              args.tracker)
    facts = machine_facts()
    t0 = time.monotonic()
    try:
        images = {}
        for size, data in dict.fromkeys((c.disk_mib, c.data_mib) for c in cells):
            path = work / f"image-{size}m-{data}m.qcow2"
            secs = make_image(path, size, data)
            log(f"image {path.name}: {size} MiB qcow2, {data} MiB random data, {secs:.1f} s")
            images[(size, data)] = path
        results, ram_only = await run(args, ctx, cells, images)
    finally:
        ctx.reaper.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    facts["load_at_end"] = loadavg()
    facts["runtime_s"] = round(time.monotonic() - t0, 1)
    rows = summary(results, ram_only)
    print("\n".join(table(results, ram_only)))
    text = render(facts, results, ram_only, rows, args)
    out = args.out or (None if args.quick else str(ROOT / "bench" / "RESULTS-disks.md"))
    if out:
        Path(out).write_text(text)
        log(f"wrote {out}")
    log(f"done after {facts['runtime_s'] / 60:.1f} min")
    print(json.dumps({"bench": "disks", "quick": args.quick, "rows": rows,
                      "goals": goals(rows)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB disk with 128 MiB data, loopback, 5 MiB/s writes (minutes)")
    ap.add_argument("--out", help="markdown report (default bench/RESULTS-disks.md; with "
                                  "--quick none: the table goes to stdout)")
    ap.add_argument("--profiles", help="only these link profiles, e.g. lan1g")
    ap.add_argument("--modes", default="live,stop", help="replicator switch modes (live,stop)")
    ap.add_argument("--tracker", choices=("scan", "qemu-precopy"), default="qemu-precopy",
                    help="replicator's RAM tracker (default qemu-precopy, the product default)")
    ap.add_argument("--window", type=float, default=5.0,
                    help="steady state before the live switch, seconds (default 5)")
    ap.add_argument("--diskcheck", type=float, default=2.0,
                    help="guest disk check period in cells with writes (0: off; default 2)")
    ap.add_argument("--no-ram-only", dest="ram_only", action="store_false",
                    help="skip the RAM-only reference switch")
    ap.add_argument("--budget", type=float, default=1800,
                    help="skip cells (and stop rows) that would end after this many seconds")
    ap.add_argument("--json-dump", help="also write the raw results here after every cell")
    ap.add_argument("--keep-logs", help="copy the daemons' and guests' logs of every run here")
    ap.add_argument("--note", default="", help="a paragraph for the report about this run")
    args = ap.parse_args()
    return run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
