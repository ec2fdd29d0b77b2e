"""The round trip: the VM comes home with only the delta, against QEMU migrating it back in full.

Run from the repository root, as root (network namespaces, tc)::

    .venv/bin/python -m bench.roundtrip [--quick] [--out bench/RESULTS-roundtrip.md]

Per cell (link x guest RAM x RAM dirty rate; a qcow2 disk the guest also writes) and tracker:
two real daemons configured both ways, initial sync, live switch to the laptop, the VM stays
there while the laptop streams it back, live switch back. What the desktop kept and the guest
at the hand-over back are fingerprinted while a daemon holds at the fault checkpoint
``peer-shadow-ready``; sent back = the laptop's wire counters. Then QEMU, the same guest
migrated lap -> desk in full with its disk (``bench.disks``' NBD mirror + migrate) after the
same stay. bench/README.md describes every figure. The table and a final JSON line go to
stdout, the report to ``--out``; everything runs in a private directory in /dev/shm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare import (GUEST, MiB, PEER_PORT, PROFILES, QEMU_PORT, ROOT, Cell, CounterWatch,
                           Ctx, Net, Reaper, _ms, _ratio, api, append_line, brief, counters,
                           dirty_values, end_pair, filled_mib, free_port, guarded, loadavg, log,
                           machine_facts, pair_configs, run_main, start_daemon, switch_watched,
                           wait_for)
from bench.disks import (NBD_PORT, _disks_copied, copy_image, disk_rates, keep_serials,
                         make_image)
from replicator.demo_trip import _disk_blocks, _ram_hashes
from replicator.vmm.disks import DiskSpec
from replicator.vmm.qemu import QemuProcess
from replicator.vmm.spec import VmSpec, build_argv
from tests.netns import DESK_ADDR

PAGE = 4096
BLOCK = 64 * 1024
HOLD = "peer-shadow-ready"


@dataclasses.dataclass(frozen=True)
class TripCell:
    profile: str
    ram_mib: int
    dirty: float            # guest RAM dirtying, MiB/s
    stay: float             # seconds the VM runs on the laptop before it comes home
    disk_mib: int           # qcow2 virtual size
    data_mib: int           # incompressible data in it before the VM starts
    disk_rate: float = 1    # guest disk writes, MiB/s

    tag = property(lambda c: f"{c.profile}-{c.ram_mib}m-d{c.dirty:g}-stay{c.stay:g}")
    ram = property(lambda c: Cell(c.profile, c.ram_mib, c.dirty))
    append = property(lambda c: append_line(c.ram) + (
        f" diskdirty={c.disk_rate:g}" if c.disk_rate else ""))


QUICK = [TripCell("lan1g", 512, 2, 20, 256, 128)]
FULL = [TripCell("lan1g", 1024, d, 60, 1024, 256) for d in (2, 20)]


# --- measuring ----------------------------------------------------------------------------------

def link_bytes(net: Net) -> dict[str, int] | None:
    """Bytes through the desk end of the veth so far: ``to_lap`` (its tx), ``to_desk`` (rx)."""
    if not net.hosts:
        return None
    out = subprocess.run(["ip", "-n", net.hosts.desk, "-s", "-j", "link", "show", "dev",
                          net.hosts.desk_if], check=True, capture_output=True, text=True)
    st = json.loads(out.stdout)[0]["stats64"]
    return {"to_lap": int(st["tx"]["bytes"]), "to_desk": int(st["rx"]["bytes"])}


def differing(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


async def fingerprint(faults: Path, ram: Path, disk: Path, scratch: Path,
                      timeout: float = 120) -> tuple[np.ndarray, np.ndarray, float]:
    """Once a daemon holds at ``peer-shadow-ready``: its RAM file's and disk's hashes."""
    await wait_for(lambda: (faults / f"at-{HOLD}").exists(), timeout,
                   f"a daemon to hold at {HOLD}", 0.05)
    t0 = time.monotonic()
    r = await asyncio.to_thread(_ram_hashes, ram)
    d = await asyncio.to_thread(_disk_blocks, disk, scratch)      # as the demo measures
    return r, d, round(time.monotonic() - t0, 1)


def release(faults: Path) -> None:
    (faults / f"block-{HOLD}").unlink(missing_ok=True)
    (faults / f"at-{HOLD}").unlink(missing_ok=True)


async def sent_wire(sock: Path) -> dict[str, int]:
    """What a daemon sent over its life, wire bytes: RAM pages and disk blocks (/metrics)."""
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get("http://localhost/metrics") as r:
            lines = (await r.text()).splitlines()
    ram = sum(float(ln.split()[-1]) for ln in lines
              if ln.startswith('replicator_sent_bytes_total{kind="wire"}'))
    disk = sum(float(ln.split()[-1]) for ln in lines
               if ln.startswith("replicator_disk_sent_bytes_total{") and 'kind="wire"' in ln)
    return {"ram": int(ram), "disk": int(disk), "total": int(ram + disk)}


def median(v: list[float]) -> float | None:
    return round(statistics.median(v), 1) if v else None


# --- replicator: there and back ---------------------------------------------------------------

def both_ways(ctx: Ctx, net: Net, cell: TripCell, d: Path, disk: Path) -> Any:
    """``bench.compare``'s pair, made peers: the desktop listens too, the laptop knows where,
    both run the same tracker; the desktop's disk is a qcow2 (inline table)."""
    pair = pair_configs(ctx, cell.ram, net, d, append=cell.append,
                        desk_qemu={"disks": [str(disk)]})
    back = f"{DESK_ADDR}:{PEER_PORT}" if net.hosts else f"127.0.0.1:{free_port()}"
    desk, lap = d / "desk.toml", d / "lap.toml"
    listed = f"disks = {json.dumps([str(disk)])}"
    text = desk.read_text()
    assert listed in text and "\n[peer]\n" in text
    desk.write_text(text.replace(listed, f'disks = [{{path = {json.dumps(str(disk))}, '
                                         f'format = "qcow2"}}]')
                    .replace("\n[peer]\n", f"\n[peer]\nlisten = {json.dumps(back)}\n"))
    text = lap.read_text()
    assert 'tracker = "scan"' in text and "\n[peer]\n" in text and "[stream]" not in text
    lap.write_text(text.replace('tracker = "scan"', f"tracker = {json.dumps(ctx.tracker)}")
                   .replace("\n[peer]\n", f"\n[peer]\naddress = {json.dumps(back)}\n")
                   + "\n[stream]\nreconnect_delay = 0.1\n")
    return pair


async def wait_ready(sock: Path, limit: float, what: str) -> tuple[dict, float]:
    """Until the node that runs the VM reports in_sync with every disk streaming, 3 polls in
    a row. Returns its last status and when the streak began."""
    t0, streak, first = time.monotonic(), 0, None
    while True:
        _, st = await api(sock, "GET", "/api/v1/status")
        now = time.monotonic()
        ok = bool(st.get("in_sync")) and _disks_copied(st)
        first = (first or now) if ok else None
        streak = streak + 1 if ok else 0
        if streak >= 3:
            return st, first
        if now - t0 > limit:
            raise TimeoutError(f"{what}: not in sync within {limit:.0f} s (lag {st.get('lag')}, "
                               f"disks {[x.get('copy') for x in st.get('disks') or []]})")
        await asyncio.sleep(0.2)


async def replicator_trip(ctx: Ctx, cell: TripCell, net: Net, image: Path) -> dict[str, Any]:
    d = ctx.work / f"{cell.tag}-rep-{ctx.tracker}"
    disk, faults, scratch = d / "desk-disk.qcow2", d / "faults", d / "scratch.raw"
    pair = both_ways(ctx, net, cell, d, disk)
    faults.mkdir()
    os.environ["REPLICATOR_FAULT_DIR"] = str(faults)       # both daemons inherit it
    copy_image(image, disk)
    lap_ram, lap_disk = pair.lap / "vm" / "ram0.img", pair.lap / "vm" / "disk0.qcow2"
    out: dict[str, Any] = {"tracker": ctx.tracker}
    try:
        await start_daemon(ctx, net, pair, "source")
        out["filled_mib"] = await wait_for(lambda: filled_mib(pair.desk_serial), 180,
                                           "FILLED from the desk guest", 0.2)
        await start_daemon(ctx, net, pair, "sink")
        t0 = time.monotonic()
        limit = 6 * (cell.data_mib + cell.ram_mib) * MiB / (net.profile.rate_bytes or 150e6)
        await wait_ready(pair.desk_sock, limit + 240, "initial sync")
        out["initial_sync_s"] = round(time.monotonic() - t0, 1)
        # There; the desktop holds once its RAM file and disk are the shadow.
        (faults / f"block-{HOLD}").touch()
        there: dict[str, Any] = {}
        await switch_watched(ctx, pair, "live", there, ("result", "downtime_ms"))
        out["there"] = {k: there.get(k) for k in ("downtime_ms", "time_to_switch_ms", "counter")}
        if there.get("error"):
            raise RuntimeError(f"switch to the laptop: {there['error']}")
        t_there, link0 = time.monotonic(), link_bytes(net)
        lap_off = pair.lap_serial.stat().st_size
        kept_ram, kept_disk, out["fingerprint_s"] = await fingerprint(
            faults, d / "desk-ram", disk, scratch)
        release(faults)
        # The stay: the laptop streams back; switch once it is over and the laptop in sync.
        st, t_sync = await wait_ready(pair.lap_sock, cell.stay + 300, "the laptop's way back")
        out["resync_s"] = round(t_sync - t_there, 1)
        out["resync_sent"] = await sent_wire(pair.lap_sock)
        out["resync_precopy"] = st.get("precopy")       # qemu-precopy: pages relayed / dropped
        await asyncio.sleep(max(0.0, t_there + cell.stay - time.monotonic()))
        st, _ = await wait_ready(pair.lap_sock, 180, "the laptop before the switch back")
        before = await sent_wire(pair.lap_sock)
        out["precopy_before_switch"] = st.get("precopy")
        (faults / f"block-{HOLD}").touch()     # now the laptop holds, after the switch back
        seen = len(counters(pair.desk_serial))
        watch = CounterWatch([pair.lap_serial, pair.desk_serial])
        watch.start()
        try:
            await asyncio.sleep(0.7)
            t_back = time.monotonic()
            out["stay_s"] = round(t_back - t_there, 1)
            code, sw = await api(pair.lap_sock, "POST", "/api/v1/switch",
                                 (pair.lap / "api-token").read_text().strip(),
                                 {"mode": "live"}, timeout=600)
            if code != 200 or sw.get("result") != "ok":
                raise RuntimeError(f"switch back answered {code}: {sw}")
            link1 = link_bytes(net)
            out.update({"back_downtime_ms": round(sw["downtime_ms"], 1),
                        "back_time_to_switch_ms": round(sw["time_to_switch_ms"], 1),
                        "back_result": {k: sw.get(k) for k in (
                            "final_delta_pages", "disk_final_delta_bytes", "disks_verified",
                            "device_state_bytes")}})
            await wait_for(lambda: len(counters(pair.desk_serial)) >= seen + 2, 30,
                           "two new COUNTER lines on the desktop")
        finally:
            watch.stop()
        out["back_counter"] = watch.gap(pair.lap_serial, pair.desk_serial)
        # The laptop holds: its RAM file and disk copy are the guest at the hand-over back.
        at_ram, at_disk, _ = await fingerprint(faults, lap_ram, lap_disk, scratch)
        sent = await sent_wire(pair.lap_sock)
        desk_now = await asyncio.to_thread(_ram_hashes, d / "desk-ram")
        release(faults)
        ram_pages, disk_blocks = differing(at_ram, kept_ram), differing(at_disk, kept_disk)
        changed = ram_pages * PAGE + disk_blocks * BLOCK
        out.update({
            "back_sent_bytes": sent["total"], "back_sent": sent,
            "back_sent_before_switch": before, "back_changed_bytes": changed,
            "back_changed": {"ram_bytes": ram_pages * PAGE, "disk_bytes": disk_blocks * BLOCK},
            "ratio": round(sent["total"] / max(changed, 1), 3),
            "guest_dirty_MiBps": median(dirty_values(pair.lap_serial, lap_off)),
            "guest_disk_MiBps": median(disk_rates(pair.lap_serial, lap_off)),
            "link_back": {k: link1[k] - link0[k] for k in link0} if link0 else None,
            # the desktop's RAM now vs the laptop's at its pause: only what the guest rewrote
            # since it resumed at home (both files share one layout, so *changed* is sound)
            "desk_vs_lap_pages_after": differing(desk_now, at_ram)})
        if out["guest_dirty_MiBps"] is not None:
            out["guest_wrote_bytes"] = int((out["guest_dirty_MiBps"] + (
                out["guest_disk_MiBps"] or 0)) * MiB * out["stay_s"])
        # The trip closes: the desktop replicates to the laptop again (not part of the figures).
        t_home = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await wait_ready(pair.desk_sock, 90, "the desktop replicating again")
            out["home_in_sync_s"] = round(time.monotonic() - t_home, 1)
        return out
    finally:
        release(faults)
        keep_serials(ctx, d.name, pair.desk_serial, pair.lap_serial)
        await end_pair(ctx, pair)
        os.environ.pop("REPLICATOR_FAULT_DIR", None)


# --- QEMU: the same guest back in full ----------------------------------------------------------

async def qemu_back(ctx: Ctx, cell: TripCell, net: Net, image: Path) -> dict[str, Any]:
    """The same guest and image on the laptop side for the stay, then migrated to the desk
    side with its disk as libvirt's --copy-storage-all does (bench.disks)."""
    d = ctx.work / f"{cell.tag}-qemu"
    (d / "serial").mkdir(parents=True)
    copy_image(image, d / "lap.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "desk.qcow2"),
                    str(cell.disk_mib * MiB)], check=True)
    src_serial, dst_serial = d / "serial" / "lap.log", d / "serial" / "desk.log"
    mport, nport = (QEMU_PORT, NBD_PORT) if net.hosts else (free_port(), free_port())
    rate = net.profile.rate_bytes or 150e6
    out: dict[str, Any] = {}
    procs, qmps = [], []
    try:
        for name, extra in (("desk", {"incoming": "defer"}), ("lap", {})):
            spec = VmSpec(name=name, ram_bytes=cell.ram_mib * MiB, ram_path=d / f"{name}.ram",
                          accel="tcg", kernel=GUEST / "vmlinux",
                          initrd=GUEST / "initramfs.cpio.gz", append=cell.append,
                          disks=(DiskSpec(d / f"{name}.qcow2", "qcow2"),),
                          serial_log=d / "serial" / f"{name}.log")
            procs.append(ctx.reaper.popen(
                net.prefix(name) + build_argv(spec, d / f"{name}.qmp", **extra),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(d / f"{name}.stderr", "wb")))
            await wait_for(lambda: (d / f"{name}.qmp").exists(), 30, "a QMP socket")
            qmps.append(await QemuProcess.attach(d / f"{name}.qmp", workdir=d))
        dst, src = qmps
        out["filled_mib"] = await wait_for(lambda: filled_mib(src_serial), 180,
                                           "FILLED from the laptop's guest", 0.2)
        t_filled = time.monotonic()
        await asyncio.sleep(cell.stay)               # the same stay on the laptop
        nbd = {"type": "inet", "host": net.desk, "port": str(nport)}
        await dst.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
            k: v for k, v in nbd.items() if k != "type"}}})
        await dst.execute("block-export-add", {"type": "nbd", "id": "mig0", "node-name": "disk0",
                                               "name": "disk0", "writable": True})
        await dst.execute("migrate-incoming", {"uri": f"tcp:{net.desk}:{mport}"})
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await src.execute("migrate-set-parameters", {"max-bandwidth": int(
            net.profile.rate_bytes or 0)})
        watch = CounterWatch([src_serial, dst_serial])
        watch.start()
        try:
            await asyncio.sleep(0.7)
            out["stay_s"] = round(time.monotonic() - t_filled, 1)
            ms, md = src.event_mark(), dst.event_mark()
            link0, t0 = link_bytes(net), time.monotonic()
            await src.execute("blockdev-add", {"driver": "nbd", "node-name": "mig-target",
                                               "server": nbd, "export": "disk0"})
            await src.execute("blockdev-mirror", {"job-id": "mirror0", "device": "disk0",
                                                  "target": "mig-target", "sync": "full"})
            await src.wait_event("BLOCK_JOB_READY", timeout=4 * cell.disk_mib * MiB / rate + 120,
                                 after=ms)
            out["mirror_ready_ms"] = round((time.monotonic() - t0) * 1000, 1)
            await src.execute("migrate", {"uri": f"tcp:{net.desk}:{mport}"})
            ev = await src.wait_event(
                "MIGRATION", timeout=4 * cell.ram_mib * MiB / rate + 120, after=ms,
                match=lambda e: e.data.get("status") in ("completed", "failed", "cancelled"))
            info = await src.execute("query-migrate")
            if ev.data["status"] != "completed":
                raise RuntimeError(f"migration {ev.data['status']}: {info.get('error-desc')}")
            # completed (source paused): the ready mirror ends with a point-in-time copy
            await src.execute("block-job-cancel", {"device": "mirror0"})
            done = await src.wait_event("BLOCK_JOB_COMPLETED", timeout=120, after=ms)
            if done.data.get("error"):
                raise RuntimeError(f"mirror ended with {done.data['error']}")
            await dst.execute("nbd-server-stop")
            await dst.execute("cont")
            resume = await dst.wait_event("RESUME", timeout=60, after=md)
            stop = next(e for e in src.events if e.seq > ms and e.name == "STOP")
            link1 = link_bytes(net)
            out.update({
                "total_ms": round((resume.monotonic - t0) * 1000, 1),
                "downtime_ms": round((resume.qemu_wall - stop.qemu_wall) * 1000, 1),
                "migrate_ms": info.get("total-time"),
                "qemu_reported_downtime_ms": info.get("downtime"),
                "ram_transferred_bytes": (info.get("ram") or {}).get("transferred"),
                "mirror_offset_bytes": done.data.get("offset"),
                "link_bytes": link1["to_desk"] - link0["to_desk"] if link0 else None})
            await wait_for(lambda: len(counters(dst_serial)) >= 2, 20,
                           "two COUNTER lines on the desktop")
        finally:
            watch.stop()
        out["counter"] = watch.gap(src_serial, dst_serial)
        out["guest_dirty_MiBps"] = median(dirty_values(src_serial))
        out["guest_disk_MiBps"] = median(disk_rates(src_serial))
        return out
    finally:
        keep_serials(ctx, d.name, src_serial, dst_serial)
        for q in qmps:
            with contextlib.suppress(Exception):
                await q.close()
        for p in procs:
            ctx.reaper.stop(p, grace=0)
        shutil.rmtree(d, ignore_errors=True)


# --- report -------------------------------------------------------------------------------------

def rows_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell and tracker, QEMU's figures (one run per cell) beside each."""
    rows = []
    for r in results:
        q = r.get("qemu") or {}
        for tracker, rep in (r.get("replicator") or {}).items():
            row = {"cell": r["tag"], "tracker": tracker, **{k: rep.get(k) for k in (
                "back_sent_bytes", "back_changed_bytes", "ratio", "guest_wrote_bytes",
                "back_time_to_switch_ms", "back_downtime_ms", "stay_s", "error")},
                "back_link_bytes": (rep.get("link_back") or {}).get("to_desk"),
                "counter_continues_back": (rep.get("back_counter") or {}).get("ok"),
                **{f"qemu_{k}": q.get(k) for k in ("total_ms", "downtime_ms", "link_bytes",
                                                  "error")}}
            for name, a, b in (("time", "back_time_to_switch_ms", "qemu_total_ms"),
                               ("downtime", "back_downtime_ms", "qemu_downtime_ms"),
                               ("link_bytes", "back_link_bytes", "qemu_link_bytes")):
                if row[a] is not None and row[b]:
                    row[f"{name}_ratio_vs_qemu"] = round(row[a] / row[b], 4)
            rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def _mib(v: Any) -> str:
    return "—" if v is None else f"{v / MiB:.1f} MiB"


def _gap(c: dict[str, Any] | None) -> str:
    c = c or {}
    return (f"{_ms(c['downtime_ms'])} {'✓' if c.get('ok') else '✗'}" if "downtime_ms" in c
            else c.get("why", "—"))


def _qemu(q: dict[str, Any]) -> str:
    return (f"FAILED: {str(q['error'])[:80]}" if q.get("error")
            else f"{_ms(q.get('total_ms'))} / {_ms(q.get('downtime_ms'))}")


def _split(total: Any, a: Any, b: Any) -> str:
    return f"{_mib(total)}: {_mib(a)} + {_mib(b)}"


# (header, cell) columns: each cell gets the cell result r, its replicator run x, and QEMU's q
MAIN = [
    ("guest, RAM dirty MiB/s set → on the laptop (disk)", lambda r, x, q: (
        f"{r['cell']['ram_mib']} MiB, {r['cell']['dirty']:g} → {x.get('guest_dirty_MiBps', '—')}"
        f" (disk {r['cell']['disk_rate']:g} → {x.get('guest_disk_MiBps', '—')})")),
    ("tracker", lambda r, x, q: x["tracker"]),
    ("stay", lambda r, x, q: f"{x['stay_s']} s"),
    ("changed while away: RAM + disk", lambda r, x, q: _split(
        x["back_changed_bytes"], x["back_changed"]["ram_bytes"], x["back_changed"]["disk_bytes"])),
    ("sent back: RAM + disk", lambda r, x, q: _split(*(x["back_sent"][k] for k in (
        "total", "ram", "disk")))),
    ("**sent / changed** (goal ≤ 1.2)", lambda r, x, q: f"**{x['ratio']}**"),
    ("back: time to switch / downtime", lambda r, x, q: (
        f"{_ms(x['back_time_to_switch_ms'])} / {_ms(x['back_downtime_ms'])}")),
    ("QEMU back in full: total / downtime", lambda r, x, q: _qemu(q)),
    ("link bytes lap → desk: replicator / QEMU", lambda r, x, q: (
        f"{_mib((x.get('link_back') or {}).get('to_desk'))} / {_mib(q.get('link_bytes'))}")),
    ("vs QEMU: time · downtime · link bytes", lambda r, x, q: " · ".join(
        _ratio(a, b) for a, b in ((x["back_time_to_switch_ms"], q.get("total_ms")),
                                  (x["back_downtime_ms"], q.get("downtime_ms")),
                                  ((x.get("link_back") or {}).get("to_desk"),
                                   q.get("link_bytes"))))),
]
DETAILS = [
    ("cell, tracker", lambda r, x, q: f"{r['tag']}, {x['tracker']}"),
    ("initial sync", lambda r, x, q: f"{x['initial_sync_s']} s"),
    ("there: switch / downtime", lambda r, x, q: (
        f"{_ms(x['there']['time_to_switch_ms'])} / {_ms(x['there']['downtime_ms'])}")),
    ("laptop in sync after the hand-over (sent by then)", lambda r, x, q: (
        f"{x['resync_s']} s ({_mib(x['resync_sent']['total'])})")),
    ("sent back before / during the switch back", lambda r, x, q: (
        f"{_mib(x['back_sent_before_switch']['total'])} / "
        f"{_mib(x['back_sent']['total'] - x['back_sent_before_switch']['total'])}")),
    ("guest wrote while away (its rates × stay)", lambda r, x, q: _mib(
        x.get("guest_wrote_bytes"))),
    ("back: final delta pages, disk delta", lambda r, x, q: (
        f"{x['back_result']['final_delta_pages']}, "
        f"{_mib(x['back_result']['disk_final_delta_bytes'])}")),
    ("counter gap there · back", lambda r, x, q: (
        f"{_gap(x['there'].get('counter'))} · {_gap(x.get('back_counter'))}")),
    ("desktop RAM vs laptop's at its pause", lambda r, x, q: (
        f"{x['desk_vs_lap_pages_after']} pages")),
    ("home in sync again after", lambda r, x, q: f"{x.get('home_in_sync_s', 'not within 90')} s"),
    ("QEMU: mirror ready, RAM sent, QEMU's own downtime, counter gap", lambda r, x, q: (
        f"{_ms(q.get('mirror_ready_ms'))}, {_mib(q.get('ram_transferred_bytes'))}, "
        f"{_ms(q.get('qemu_reported_downtime_ms'))}, {_gap(q.get('counter'))}"
        if q.get("total_ms") else _qemu(q))),
    ("wall (load before → after)", lambda r, x, q: (
        f"{r.get('wall_s')} s ({r['load_before'][0]:.1f} → "
        f"{(r.get('load_after') or [0])[0]:.1f})")),
]


def table(results: list[dict[str, Any]], columns: list = MAIN) -> list[str]:
    L = ["| " + " | ".join(h for h, _ in columns) + " |", "|---" * len(columns) + "|"]
    for r in results:
        q = r.get("qemu") or {}
        for tracker, x in (r.get("replicator") or {}).items():
            if x.get("error"):
                L.append(f"| {r['tag']} | {tracker} | FAILED: {str(x['error'])[:200]} |")
                continue
            L.append("| " + " | ".join(f(r, {"tracker": tracker, **x}, q)
                                       for _, f in columns) + " |")
    return L


def render(facts: dict[str, Any], results: list[dict[str, Any]], rows: list[dict[str, Any]],
           args: argparse.Namespace) -> str:
    c0 = results[0]["cell"] if results else {}
    L = ["# The round trip: the VM comes home with only the delta", "",
         f"Generated by `.venv/bin/python -m bench.roundtrip{' --quick' if args.quick else ''}` "
         "(bench/roundtrip.py); every figure was measured in this run.", "",
         f"Machine: {facts['cores']} cores ({facts['cpu']}), {facts['mem_GiB']} GiB, "
         f"{facts['qemu']}, {facts['accel']}; commit {facts['commit']}; load "
         f"{facts['load_at_start']} at start, {facts.get('load_at_end')} at the end; "
         f"{facts.get('runtime_s', 0) / 60:.1f} min. Link: "
         f"{', '.join(sorted({PROFILES[r['cell']['profile']].desc for r in results}))} "
         "(tbf both ways).", "",
         f"Guest RAM filled 75%, dirtied at the row's rate; a {c0.get('disk_mib')} MiB qcow2 "
         f"disk with {c0.get('data_mib')} MiB of random data, rewritten at the rate in brackets. "
         "*changed* = RAM pages and 64 KiB disk blocks that differ between what the desktop kept "
         "and the guest at the hand-over back; *sent back* = the laptop's RAM + disk wire "
         "counters; *link bytes* = the veth's lap → desk bytes; QEMU: the same guest and image "
         "after the same stay, `blockdev-mirror` + `migrate` lap → desk (one run per row pair). "
         "bench/README.md, section *bench/roundtrip.py*, defines every figure.", "",
         *table(results), "", "## Details", "", *table(results, DETAILS), "", NOTES,
         *(["## Notes on this run", "", args.note, ""] if args.note else []),
         "<details><summary>Raw results (JSON)</summary>", "", "```json",
         json.dumps({"facts": facts, "results": results, "rows": rows}, indent=1), "```", "",
         "</details>", ""]
    return "\n".join(L)


NOTES = """## How to read it

* **sent / changed** above 1: pages went more than once. The stream is continuous, so a page
  the guest rewrites during the stay may go each time (the test guest's dirtier walks its
  filled area and wraps), while *changed* counts each differing page once; *guest wrote* (its
  DIRTY and DISKDIRTY rates × the stay) is the other yardstick. `qemu-precopy` relays QEMU's
  precopy, which re-sends pages dirtied during its passes (RESULTS-cost.md).
* **desktop RAM vs laptop's at its pause**: only what the guest rewrote since it resumed at
  home: both RAM files share one layout, so *changed* is sound.
* **2 cores, shared, TCG, tmpfs**: both QEMUs, both daemons, TLS and tbf share two cores with
  other jobs (load averages per row); every image and RAM file is in /dev/shm. One sample each.
"""


async def run_cell(ctx: Ctx, cell: TripCell, image: Path,
                   trackers: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {"cell": dataclasses.asdict(cell), "tag": cell.tag,
                           "load_before": loadavg(), "replicator": {}}
    t0 = time.monotonic()
    net = Net(PROFILES[cell.profile])
    try:
        for tracker in trackers:
            log(f"{cell.tag}: replicator ({tracker}) there and back, {cell.stay:g} s away")
            rep = res["replicator"][tracker] = await guarded(
                "replicator", replicator_trip(dataclasses.replace(ctx, tracker=tracker), cell,
                                              net, image))
            log(f"  -> sent back {_mib(rep.get('back_sent_bytes'))}, changed "
                f"{_mib(rep.get('back_changed_bytes'))}, ratio {rep.get('ratio')}; back "
                f"{_ms(rep.get('back_time_to_switch_ms'))} / {_ms(rep.get('back_downtime_ms'))}"
                f" ({rep.get('wall_s')} s)" + (f" ERROR {rep['error']}" if "error" in rep else ""))
        log(f"{cell.tag}: QEMU, the same guest back in full (mirror + migrate)")
        res["qemu"] = await guarded("QEMU", qemu_back(ctx, cell, net, image))
        log(f"  -> {brief(res['qemu'])}")
    finally:
        net.destroy()
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["load_after"] = loadavg()
    return res


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not (GUEST / "vmlinux").exists():
        print(f"bench.roundtrip needs root (network namespaces, tc) and {GUEST} (make guest)",
              file=sys.stderr)
        return 2
    cells = [dataclasses.replace(c, stay=args.stay or c.stay)
             for c in (QUICK if args.quick else FULL)]
    work = Path(tempfile.mkdtemp(prefix="rpl-roundtrip-", dir="/dev/shm"))
    ctx = Ctx(work, Reaper(work), Path(args.keep_logs) if args.keep_logs else None)
    facts = machine_facts()
    t_start = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        images = {}
        for size, data in dict.fromkeys((c.disk_mib, c.data_mib) for c in cells):
            images[(size, data)] = path = work / f"image-{size}m-{data}m.qcow2"
            secs = make_image(path, size, data)
            log(f"image {path.name}: {size} MiB qcow2, {data} MiB random data, {secs:.1f} s")
        for cell in cells:
            results.append(await run_cell(ctx, cell, images[(cell.disk_mib, cell.data_mib)],
                                          args.trackers.split(",")))
            if args.json_dump:
                Path(args.json_dump).write_text(json.dumps(results, indent=1))
    finally:
        ctx.reaper.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    facts["load_at_end"] = loadavg()
    facts["runtime_s"] = round(time.monotonic() - t_start, 1)
    rows = rows_of(results)
    print("\n".join(table(results)))
    out = args.out or (None if args.quick else str(ROOT / "bench" / "RESULTS-roundtrip.md"))
    if out:
        Path(out).write_text(render(facts, results, rows, args))
        log(f"wrote {out}")
    log(f"done after {facts['runtime_s'] / 60:.1f} min")
    goal = {t: all(r.get("ratio") is not None and r["ratio"] <= 1.2 for r in rows
                   if r["tracker"] == t) for t in dict.fromkeys(r["tracker"] for r in rows)}
    print(json.dumps({"bench": "roundtrip", "quick": args.quick, "rows": rows,
                      "goal_sent_le_1_2_changed": goal, "facts": facts}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.roundtrip",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="512 MiB guest, 256 MiB disk, 20 s on the laptop, dirty 2 (~3 min)")
    ap.add_argument("--out", help="markdown report (default bench/RESULTS-roundtrip.md; with "
                                  "--quick none: the table goes to stdout)")
    ap.add_argument("--stay", type=float, help="seconds on the laptop (60; --quick 20)")
    ap.add_argument("--trackers", default="qemu-precopy,scan",
                    help="RAM trackers, one round trip each (default qemu-precopy,scan; "
                         "qemu-precopy is the product default)")
    ap.add_argument("--json-dump", help="also write the raw results here after every cell")
    ap.add_argument("--keep-logs", help="copy the daemons' and guests' logs of every run here")
    ap.add_argument("--note", default="", help="a paragraph for the report about this run")
    return run_main(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
