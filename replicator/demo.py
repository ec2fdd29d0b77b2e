"""``replicator demo``: a desktop VM and its laptop shadow on this machine, end to end.

Starts two real daemons (``replicator run``) on 127.0.0.1 — the "desktop" launches a QEMU guest
whose RAM is a shared file, the "laptop" keeps the shadow — shows the live lag while they
replicate, presses "switch now" through the control API, shows the guest's counter continuing
on the laptop's VM, and prints a report (``--json``: one final JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import parse_size
from .errors import ReplicatorError
from .guestlog import counters, diskchecks, fmt_bytes

REPO = Path(__file__).resolve().parent.parent


def ensure_guest(guest_dir: Path) -> tuple[Path, Path]:
    kernel, initrd = guest_dir / "vmlinux", guest_dir / "initramfs.cpio.gz"
    if not (kernel.exists() and initrd.exists()):
        script = REPO / "deploy" / "build-guest.sh"
        if not script.exists():
            raise ReplicatorError(f"test guest missing in {guest_dir} and no {script} to build it")
        print(f"building the test guest into {guest_dir} ...", flush=True)
        subprocess.run(["bash", str(script), str(guest_dir)], check=True)
    return kernel, initrd


def _disk_cell(disks: list[dict] | None) -> str:
    """The demo's disk columns: lag and copy state of the first disk."""
    if not disks:
        return ""
    d = disks[0]
    state = d["copy"] if d["copy"] == "streaming" else f"{d['copy']} {d['progress']:.0%}"
    return f"{fmt_bytes(d['lag']['bytes']):>9} {state:>10}"


def _toml(d: dict[str, Any], prefix: str = "") -> str:
    """Tiny TOML writer for the demo's configs (tables of scalars and lists)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + _toml(v, name + ".")
    return out


class Daemon:
    def __init__(self, name: str, config: Path, state_dir: Path, log: Path):
        self.name = name
        self.config = config
        self.state_dir = state_dir
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.token = ""

    def start(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator.cli", "run", "-c", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=str(REPO),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    async def wait_api(self, timeout: float = 60) -> None:
        url_file = self.state_dir / "api-url"
        end = time.monotonic() + timeout
        while not url_file.exists():
            if self.proc and self.proc.poll() is not None:
                raise ReplicatorError(f"{self.name} daemon exited; see {self.log}:\n"
                                      + self.log.read_text()[-2000:])
            if time.monotonic() > end:
                raise ReplicatorError(f"{self.name} daemon did not start; see {self.log}")
            await asyncio.sleep(0.1)
        self.url = url_file.read_text().strip()
        self.token = (self.state_dir / "api-token").read_text().strip()

    async def request(self, method: str, path: str, body: dict | None = None,
                      timeout: float = 600) -> tuple[int, Any]:
        from .control.client import request as _request
        return await _request(method, self.url, path, self.token, body, timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def stop_pair(source: Daemon | None, sink: Daemon) -> None:
    """Stop both daemons and end every VM either launched (VMs outlive their daemons by
    design; after a round trip either host may run one), found by their launch records."""
    for dm in (source, sink):
        if dm is not None:
            dm.stop()
    for dm in (source, sink):
        if dm is None:
            continue
        for rec in dm.state_dir.glob("*/*.launch.json"):
            try:
                os.kill(int(json.loads(rec.read_text())["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_demo(args: argparse.Namespace) -> dict:
    ram = parse_size(args.ram)
    guest_dir = Path(args.guest_dir) if getattr(args, "guest_dir", None) else REPO / "build" / "guest"
    kernel, initrd = ensure_guest(guest_dir)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="replicator-demo-",
                                                                          dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    desk, lap = work / "desktop", work / "laptop"
    desk.mkdir(exist_ok=True)
    lap.mkdir(exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    accel = getattr(args, "accel", "tcg")
    disk_size = parse_size(args.disk or "0")
    append = f"console=ttyS0 quiet fill={args.fill} dirty={args.dirty:g}"
    disk = desk / "disk.qcow2"
    if disk_size:
        # A small qcow2 disk the guest checks (each round verifies the last one's writes) and
        # writes to: it travels to the laptop's own copy with the VM.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(disk_size)],
                       check=True)
        append += f" diskcheck=1 diskdirty={args.disk_dirty:g}"
    qemu = {"ram_size": ram, "vcpus": 1, "accel": accel, "kernel": str(kernel),
            "initrd": str(initrd), "append": append}
    # Pairing, as `replicator id` + `replicator pair` would do on two machines.
    from .identity import Identity
    desk_id = Identity.load_or_create(desk / "identity", "desktop").node_id
    lap_id = Identity.load_or_create(lap / "identity", "laptop").node_id
    round_trip = getattr(args, "round_trip", False)
    # Both ways: each node listens (the host without the VM keeps its shadow) and knows the
    # other's address (the host with the VM streams to it).
    desk_listen = f"127.0.0.1:{_free_port()}" if round_trip else ""
    lap_peer = {"listen": f"127.0.0.1:{_free_port()}" if round_trip else "127.0.0.1:0",
                "id": desk_id, **({"address": desk_listen} if round_trip else {})}
    lap_cfg = {
        "node": {"name": "laptop", "role": "sink", "state_dir": str(lap)},
        "domain": {"name": "demo", "driver": "qemu", "tracker": args.tracker,
                   "qemu": {**qemu, "serial_log": str(lap / "serial.log")}},
        "peer": lap_peer, "control": {"listen": "127.0.0.1:0"},
    }
    (work / "laptop.toml").write_text(_toml(lap_cfg))
    sink = Daemon("laptop", work / "laptop.toml", lap, work / "laptop.log")
    source: Daemon | None = None
    result: dict[str, Any] = {"ram_bytes": ram, "mode": args.mode, "tracker": args.tracker}
    try:
        say(f"replicator demo: {ram >> 20} MiB guest ({accel.upper()}), fill {args.fill}%, "
            f"dirtying {args.dirty:g} MiB/s, tracker {args.tracker}; work dir {work}")
        sink.start()
        await sink.wait_api()
        _, st = await sink.request("GET", "/api/v1/status")
        desk_cfg = {
            "node": {"name": "desktop", "role": "source", "state_dir": str(desk)},
            "domain": {"name": "demo", "driver": "qemu", "tracker": args.tracker, "qemu": {
                **qemu, "launch": True, "ram_path": str(desk / "guest-ram"),
                "serial_log": str(desk / "serial.log"),
                # A plain path: its format is read from the image (the demo made it qcow2).
                "disks": [str(disk)] if disk_size else []}},
            "peer": {"address": st["listen"], "id": lap_id,
                     **({"listen": desk_listen} if round_trip else {})},
            "control": {"listen": "127.0.0.1:0"},
        }
        (work / "desktop.toml").write_text(_toml(desk_cfg))
        source = Daemon("desktop", work / "desktop.toml", desk, work / "desktop.log")
        faults = work / "faults"
        if round_trip:
            # The desktop holds for a moment once it made its RAM and disk the shadow, so that
            # the demo can fingerprint what it kept (to count what the guest changes away).
            faults.mkdir(exist_ok=True)
            (faults / "block-peer-shadow-ready").touch()
        source.start({"REPLICATOR_FAULT_DIR": str(faults)} if round_trip else None)
        await source.wait_api(120)
        say(f"desktop daemon {source.url}  laptop daemon {sink.url} (sink on {st['listen']})")
        say(f"paired over TLS: desktop {desk_id[:14]}...  laptop {lap_id[:14]}...")
        serial = desk / "serial.log"
        t0 = time.monotonic()
        while not counters(serial):
            if time.monotonic() - t0 > 120:
                raise ReplicatorError("the desktop guest printed no COUNTER within 120 s")
            await asyncio.sleep(0.2)
        say(f"desktop guest is up (COUNTER {counters(serial)[-1]} after "
            f"{time.monotonic() - t0:.1f} s); replicating:")
        say(f"{'t':>5}  {'lag':>10} {'pages':>7} {'lag s':>6}  {'dirty/s':>10}  "
            f"{'link/s':>10}  {'est. downtime':>13}  sync  {'disk lag':>9} {'disk copy':>10}")
        t_rep = time.monotonic()
        st = {}
        while True:
            await asyncio.sleep(1.0)
            _, st = await source.request("GET", "/api/v1/status")
            lag = st.get("lag") or {}
            say(f"{time.monotonic() - t_rep:5.1f}  {fmt_bytes(lag.get('bytes', 0)):>10} "
                f"{lag.get('pages', 0):>7} {lag.get('seconds', 0):6.2f}  "
                f"{fmt_bytes(st.get('dirty_rate_bytes_per_second', 0)):>10}  "
                f"{fmt_bytes(st.get('throughput_bytes_per_second', 0)):>10}  "
                f"{st.get('switch_estimate_seconds', 0) * 1000:10.0f} ms  "
                f"{'yes' if st.get('in_sync') else 'no ':<4}  " + _disk_cell(st.get("disks")))
            elapsed = time.monotonic() - t_rep
            pre = st.get("precopy") or {}
            going = st.get("acked_epoch", 0) > 0 or (pre.get("dirty_sync_count") or 0) >= 2
            # A switch waits for the disks' first copy (it is refused until then).
            going = going and all(d["copy"] == "streaming" for d in st.get("disks") or [])
            if elapsed >= args.replicate_seconds and going:
                break
            if elapsed > args.replicate_seconds + 120:
                raise ReplicatorError("replication did not get going; see the daemon logs")
        result["sent_bytes_before_switch"] = st["sent_bytes"]["wire"]
        before = counters(serial)
        say(f"switch now ({args.mode} mode); the desktop guest's counter is at {before[-1]}")
        code, sw = await source.request("POST", "/api/v1/switch", {"mode": args.mode})
        if code != 200:
            raise ReplicatorError(f"switch failed: {sw.get('error')}")
        counter_before = counters(serial)[-1]
        shadow_serial = lap / "serial.log"
        t_wait = time.monotonic()
        while len(counters(shadow_serial)) < 3 and time.monotonic() - t_wait < 30:
            await asyncio.sleep(0.2)
        after = counters(shadow_serial)
        _, st_src = await source.request("GET", "/api/v1/status")
        _, st_sink = await sink.request("GET", "/api/v1/status")
        result.update({
            "sent_bytes": st_src["sent_bytes"]["wire"],   # (the node's counters, either half)
            "raw_bytes": st_src["sent_bytes"]["raw"],
            "downtime_ms": round(sw["downtime_ms"], 2),
            "time_to_switch_ms": round(sw["time_to_switch_ms"], 2),
            "final_delta_pages": sw["final_delta_pages"],
            "catchup_rounds": sw["catchup_rounds"],
            "device_state_bytes": sw["device_state_bytes"],
            "counter_before": counter_before,
            "counter_after": after[0] if after else None,
            "counter_continues": bool(after) and after[0] == counter_before + 1
                                 and after == list(range(after[0], after[0] + len(after))),
            "shadow_verified": sw["shadow_verified"],
            "desktop_handed_over": st_src["handed_over"],
            "laptop_runs_domain": st_sink["runs_domain"],
        })
        disks_ok = True
        if disk_size:
            # Both ways the desktop is the shadow by now: its figures from before the switch.
            d_src = (st_src.get("disks") or st["disks"])[0]
            # The laptop's guest checks its disk again (the rounds after the switch verify
            # what was written before it, on the copy).
            t_wait = time.monotonic()
            while len(diskchecks(shadow_serial)) < 3 and time.monotonic() - t_wait < 30:
                await asyncio.sleep(0.2)
            checks = diskchecks(serial) + diskchecks(shadow_serial)
            result.update({
                "disk_bytes": d_src["size_bytes"],
                "disk_sent_bytes": d_src["sent_bytes"]["wire"],
                "disk_final_delta_bytes": sw["disk_final_delta_bytes"],
                "disk_verified": sw["disks_verified"],
                "disk_checks_ok": sum(1 for ok, _ in checks if ok),
                "disk_checks_failed": sum(1 for ok, _ in checks if not ok),
                "disk_checks_on_laptop": len(diskchecks(shadow_serial)),
            })
            disks_ok = (sw["disks_verified"] and not result["disk_checks_failed"]
                        and result["disk_checks_on_laptop"] > 0)
        say("")
        say("report")
        say(f"  guest RAM             {fmt_bytes(ram)}")
        say(f"  sent (wire / raw)     {fmt_bytes(result['sent_bytes'])} / "
            f"{fmt_bytes(result['raw_bytes'])}")
        rounds = ("QEMU dirty-log syncs while held open" if args.tracker == "qemu-precopy"
                  else "catch-up rounds")
        say(f"  mode                  {args.mode}, tracker {args.tracker} "
            f"({sw['catchup_rounds']} {rounds})")
        say(f"  final delta           {sw['final_delta_pages']} pages, device state "
            f"{fmt_bytes(sw['device_state_bytes'])}")
        say(f"  downtime              {sw['downtime_ms']:.1f} ms (desktop paused -> laptop "
            f"running)")
        say(f"  time to switch        {sw['time_to_switch_ms']:.1f} ms (request -> running)")
        say(f"  shadow verified       {sw['shadow_verified']}")
        if disk_size:
            say(f"  disk                  {fmt_bytes(disk_size)} qcow2, sent "
                f"{fmt_bytes(result['disk_sent_bytes'])}, final delta "
                f"{fmt_bytes(result['disk_final_delta_bytes'])}, copy verified "
                f"{result['disk_verified']}")
            say(f"  guest disk checks     {result['disk_checks_ok']} OK, "
                f"{result['disk_checks_failed']} FAILED ({result['disk_checks_on_laptop']} on "
                "the laptop, on its copy)")
        say(f"  counter               desktop stopped at {counter_before}, laptop went on "
            f"with {after[:5]}")
        say(f"  desktop handed over   {st_src['handed_over']}; laptop runs the domain: "
            f"{st_sink['runs_domain']}")
        ok = (result["counter_continues"] and st_src["handed_over"] and st_sink["runs_domain"]
              and disks_ok)
        say("  RESULT                " + ("the VM moved and kept running" if ok else "FAILED"))
        if round_trip and ok:
            from .demo_trip import come_home
            ok = await come_home(args, say, result, source, sink, work, disk if disk_size
                                 else None)
        result["ok"] = ok
        return result
    finally:
        await stop_pair(source, sink)
        if not args.workdir and not getattr(args, "keep", False):
            shutil.rmtree(work, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    try:
        import uvloop
        result = uvloop.run(run_demo(args))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run_demo(args))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1
