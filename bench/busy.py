"""Busy guests: replicator's time to switch and downtime at dirty rates of 0.5x, 1x and 3x the link.

Run from the repository root, as root (network namespaces, tc)::

    .venv/bin/python -m bench.busy [--profile lan100m] [--ram 512] [--fill 10]
                                  [--out bench/RESULTS-busy.md]

For each tracker (``qemu-precopy``, ``scan``) and each dirty rate, a live switch and a stop
switch, each on a fresh pair of real daemons over a shaped link (``bench.compare`` does the
runs: same guest, namespaces, counter cross-check). The guest fills ``--fill`` percent of its
RAM and rewrites that area at the dirty rate. Past the link rate a live switch cannot converge
by itself: the table shows the path it took (live / throttled / stopped, the switch config's
defaults: live deadline max(5 s, 4 x estimate), 10 s throttled) and what it cost against stop
mode on the same guest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import (GUEST, MiB, PROFILES, ROOT, Cell, Ctx, Net, Reaper, _ms, brief,
                           guarded, loadavg, log, machine_facts, replicator_switch, run_main)


async def run(args: argparse.Namespace, work: Path, reaper: Reaper) -> list[dict[str, Any]]:
    profile = PROFILES[args.profile]
    link_mib = (profile.rate_bytes or 150e6) / MiB
    results: list[dict[str, Any]] = []
    for tracker in args.trackers.split(","):
        ctx = Ctx(work, reaper, Path(args.keep_logs) if args.keep_logs else None, False, tracker)
        for mult in (float(x) for x in args.multiples.split(",")):
            cell = Cell(profile.name, args.ram, round(mult * link_mib, 1), args.fill)
            res: dict[str, Any] = {"tracker": tracker, "multiple": mult,
                                   "cell": {"ram_mib": cell.ram_mib, "dirty": cell.dirty,
                                            "fill": cell.fill, "profile": cell.profile}}
            net = Net(profile)
            try:
                for mode in ("live", "stop"):
                    log(f"{tracker} {cell.tag} ({mult:g}x the link): {mode} switch")
                    res[mode] = await guarded(f"{tracker} {mode}", replicator_switch(
                        ctx, cell, net, mode, args.window if mode == "live" else 0))
                    log(f"  -> {brief(res[mode])}")
            finally:
                net.destroy()
            results.append(res)
            if args.json_dump:
                Path(args.json_dump).write_text(json.dumps(results, indent=1))
    return results


def _path(r: dict[str, Any]) -> str:
    res = r.get("result") or {}
    if r.get("error") or not res:
        return f"error: {str(r.get('error'))[:60]}"
    path, throttle = res.get("path") or "?", res.get("throttle") or ""
    if throttle:
        what = "no throttle" if throttle == "none" else throttle
        if res.get("throttle_percent"):
            what += f" {res['throttle_percent']}%"
        path += f" ({what})"
    return path


def _dirty(r: dict[str, Any]) -> str:
    vals = (r.get("live") or {}).get("dirty_all") or []
    return f"{sorted(vals)[len(vals) // 2]:g}" if vals else "?"


def render(facts: dict[str, Any], results: list[dict[str, Any]],
           args: argparse.Namespace, runtime: float) -> str:
    p = PROFILES[args.profile]
    lines = [
        "# replicator: switching a busy guest",
        "",
        f"Link {p.name} ({p.desc}); guest {args.ram} MiB, rewriting {args.fill:g}% of its RAM "
        "at 0.5x, 1x and 3x the link rate (`python -m bench.busy`). Live switches use the "
        "default switch config: live until max(5 s, 4 x the estimate), then QEMU's throttle "
        "for 10 s, then stop mode. Time to switch = request to running on the laptop; "
        "downtime = desktop paused to laptop running.",
        "",
        f"Machine: {facts['cores']} cores ({facts['cpu']}), {facts['qemu']}, {facts['accel']}; "
        f"commit {facts['commit']}; load {facts['load_at_start']} at start, "
        f"{facts.get('load_at_end')} at the end; {runtime / 60:.1f} min.",
        "",
        "| tracker | dirty (x link) | guest's own DIRTY MiB/s | live: path | live: switch / "
        "downtime | stop: switch / downtime |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        live, stop = r.get("live") or {}, r.get("stop") or {}
        lines.append(
            f"| {r['tracker']} | {r['cell']['dirty']:g} MiB/s ({r['multiple']:g}x) | {_dirty(r)} "
            f"| {_path(live)} | {_ms(live.get('time_to_switch_ms'))} / "
            f"{_ms(live.get('downtime_ms'))} | {_ms(stop.get('time_to_switch_ms'))} / "
            f"{_ms(stop.get('downtime_ms'))} |")
    lines += ["", "Raw results:", "", "```json",
              json.dumps({"facts": facts, "results": results}, indent=1), "```", ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench.busy needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    if not (GUEST / "vmlinux").exists():
        print(f"no test guest in {GUEST} (make guest)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="rpl-busy-", dir="/dev/shm"))
    reaper = Reaper(work)
    facts = machine_facts()
    t0 = time.monotonic()
    try:
        results = await run(args, work, reaper)
    finally:
        reaper.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    runtime = time.monotonic() - t0
    facts["load_at_end"] = loadavg()
    out = Path(args.out or ROOT / "bench" / "RESULTS-busy.md")
    out.write_text(render(facts, results, args, runtime))
    log(f"wrote {out} after {runtime / 60:.1f} min")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.busy", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="lan100m")
    ap.add_argument("--ram", type=int, default=512, help="guest RAM, MiB (default 512)")
    ap.add_argument("--fill", type=float, default=10,
                    help="percent of RAM the guest fills and rewrites (default 10)")
    ap.add_argument("--multiples", default="0.5,1,3",
                    help="dirty rates as multiples of the link rate (default 0.5,1,3)")
    ap.add_argument("--trackers", default="qemu-precopy,scan")
    ap.add_argument("--window", type=float, default=5.0,
                    help="steady state before the live switch, seconds (default 5)")
    ap.add_argument("--out", help="markdown report (default bench/RESULTS-busy.md)")
    ap.add_argument("--json-dump", help="also write the raw results here after every cell")
    ap.add_argument("--keep-logs", help="copy the daemons' logs of every run into this directory")
    args = ap.parse_args()

    return run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
