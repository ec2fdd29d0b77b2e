"""``replicator demo --round-trip``: the way home, after the demo's switch to the laptop.

The desktop, once it handed the VM over, keeps its RAM file and disk as the shadow. The demo
fingerprints what it kept (the desktop daemon holds at a fault checkpoint for that moment),
lets the VM run on the laptop while the laptop streams it back, switches back from the laptop,
and reports what travelled home against what the guest changed while away.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ReplicatorError
from .guestlog import counters, fmt_bytes
from .pagefile import CHUNK_PAGES, hash_file

PAGE = 4096
BLOCK = 64 * 1024


def _ram_hashes(path: Path) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_file(fd, os.fstat(fd).st_size, bytearray(CHUNK_PAGES * PAGE))
    finally:
        os.close(fd)


def _disk_blocks(image: Path, scratch: Path) -> np.ndarray:
    """xxh3 of every 64 KiB block of a disk image's guest-visible content."""
    import xxhash
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(scratch)],
                   check=True)
    try:
        data = np.fromfile(scratch, dtype=np.uint8)
    finally:
        scratch.unlink(missing_ok=True)
    return np.array([xxhash.xxh3_64_intdigest(data[i:i + BLOCK].tobytes())
                     for i in range(0, len(data), BLOCK)], dtype=np.uint64)


async def _metric_sum(daemon: Any, prefix: str, contains: str = "") -> float:
    """Sum of the samples of a daemon's /metrics whose line starts with ``prefix``."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(daemon.url + "/metrics") as r:
            text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


async def come_home(args: Any, say: Callable[..., None], result: dict, desktop: Any,
                    laptop: Any, work: Path, disk: Path | None) -> bool:
    """Run the VM on the laptop a while (streaming back), switch it home, report."""
    faults = work / "faults"
    t0 = time.monotonic()
    while not (faults / "at-peer-shadow-ready").exists():
        if time.monotonic() - t0 > 60:
            raise ReplicatorError("the desktop did not turn into the shadow within 60 s")
        await asyncio.sleep(0.1)
    ram_file = work / "desktop" / "guest-ram"
    kept_ram = await asyncio.to_thread(_ram_hashes, ram_file)
    kept_disk = (await asyncio.to_thread(_disk_blocks, disk, work / "scratch.raw")
                 if disk is not None else None)
    (faults / "block-peer-shadow-ready").unlink()
    say("")
    say("the desktop keeps its RAM file and disk as the shadow now; the laptop streams the VM "
        "back (only what differs):")
    t_away = time.monotonic()
    st: dict = {}
    while True:
        await asyncio.sleep(1.0)
        _, st = await laptop.request("GET", "/api/v1/status")
        lag = st.get("lag") or {}
        say(f"{time.monotonic() - t_away:5.1f}  lag {fmt_bytes(lag.get('bytes', 0)):>10}  "
            f"sent {fmt_bytes((st.get('sent_bytes') or {}).get('wire', 0)):>10}  "
            f"{'in sync' if st.get('in_sync') else 'catching up'}")
        ready = st.get("in_sync") and all(d["copy"] == "streaming" for d in st.get("disks") or [])
        if time.monotonic() - t_away >= args.away_seconds and ready:
            break
        if time.monotonic() - t_away > args.away_seconds + 180:
            raise ReplicatorError("the laptop did not catch up with the desktop; see the logs")
    desk_serial, lap_serial = work / "desktop" / "serial.log", work / "laptop" / "serial.log"
    seen = len(counters(desk_serial))
    say(f"switch back ({args.mode} mode), from the laptop; its counter is at "
        f"{counters(lap_serial)[-1]}")
    code, sw = await laptop.request("POST", "/api/v1/switch", {"mode": args.mode})
    if code != 200:
        raise ReplicatorError(f"switch back failed: {sw.get('error')}")
    counter_before = counters(lap_serial)[-1]
    # Right away: the desktop's RAM file now holds what the laptop's held when it paused.
    changed = int(np.count_nonzero(await asyncio.to_thread(_ram_hashes, ram_file) != kept_ram))
    changed_bytes = changed * PAGE
    if disk is not None and kept_disk is not None:
        now = await asyncio.to_thread(_disk_blocks, disk, work / "scratch.raw")
        changed_bytes += int(np.count_nonzero(now != kept_disk)) * BLOCK
    # Everything the laptop ever sent (it only received before the first switch): RAM pages
    # and disk blocks, the switch's catch-up and final delta included.
    back_sent = int(await _metric_sum(laptop, 'replicator_sent_bytes_total{kind="wire"}')
                    + await _metric_sum(laptop, "replicator_disk_sent_bytes_total{",
                                        'kind="wire"'))
    t_wait = time.monotonic()
    while len(counters(desk_serial)) < seen + 3 and time.monotonic() - t_wait < 30:
        await asyncio.sleep(0.2)
    after = counters(desk_serial)[seen:]
    result.update({
        "back_sent_bytes": back_sent,
        "back_changed_bytes": changed_bytes,
        "back_downtime_ms": round(sw["downtime_ms"], 2),
        "back_time_to_switch_ms": round(sw["time_to_switch_ms"], 2),
        "counter_continues_back": bool(after) and after[0] == counter_before + 1
                                  and after == list(range(after[0], after[0] + len(after))),
    })
    _, st_desk = await desktop.request("GET", "/api/v1/status")
    home = st_desk.get("domain_state") == "running"
    say("")
    say("report, the way back")
    say(f"  changed while away    {fmt_bytes(changed_bytes)} (RAM pages and disk blocks that "
        "differ from what the desktop kept)")
    say(f"  sent back             {fmt_bytes(back_sent)} "
        f"({back_sent / max(changed_bytes, 1):.2f} x what changed)")
    say(f"  downtime              {sw['downtime_ms']:.1f} ms; time to switch "
        f"{sw['time_to_switch_ms']:.1f} ms")
    say(f"  counter               laptop stopped at {counter_before}, desktop went on with "
        f"{after[:5]}")
    ok = result["counter_continues_back"] and home
    say("  RESULT                " + ("the VM came home with only the delta" if ok
                                      else "FAILED"))
    return ok
