"""Daemons killed at every phase of a switch, with the VM they launched still running.

This is what systemd does with the shipped unit (``KillMode=process``, ``Restart=on-failure``,
``WatchdogSec``): the daemon dies (SIGKILL, or SIGABRT from a watchdog abort), its QEMU keeps
running, and a new daemon starts with the same config. Both daemons run as real subprocesses
(`replicator run`) with a real QEMU guest (TCG) launched by the desktop daemon; the laptop
daemon runs the shadow QEMU. The guest prints ``COUNTER n`` every 0.5 s and checks its own
memory (``MEMCHECK OK/FAIL``).

After each kill and restart: exactly one host runs the guest (never none, never two), its
counter goes on and its memory check passes, and replication runs again. The fault
checkpoints (``replicator.faults``) hold a daemon at an exact phase so the kill lands there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.cli import _request
from replicator.guestlog import counters

from .conftest import pair_ids, wait_until
from .test_disks_qemu import same_content
from .test_faults import Daemon, daemons, free_port  # noqa: F401  (fixture)

pytestmark = pytest.mark.qemu
MiB = 1024 * 1024
RAM = 256 * MiB
#: The issue's bound: within this many seconds of the restart exactly one host runs the guest.
SETTLE_SECONDS = 10.0


def memchecks(path: Path) -> tuple[int, int]:
    """(passes OK, passes FAILed) the guest reported on its console."""
    from replicator.guestlog import memchecks as parse
    results = parse(path)
    return sum(1 for ok, _ in results if ok), sum(1 for ok, _ in results if not ok)


class Pair:
    """Desktop and laptop daemons for one QEMU domain, with a shared fault directory."""

    def __init__(self, d: Path, guest: tuple[Path, Path], daemons, tracker: str,
                 both_ways: bool = False, append: str = ""):
        kernel, initrd = guest
        self.d = d
        self.faults = d / "faults"
        self.faults.mkdir()
        source_id, sink_id = pair_ids(d / "desk", d / "lap")
        port = free_port()
        # Both ways (the round trip): the laptop connects back to the desktop's listener.
        back = {"listen": f"127.0.0.1:{free_port()}"} if both_ways else {}
        qemu = {"ram_size": RAM, "accel": "tcg", "kernel": str(kernel), "initrd": str(initrd),
                "append": "console=ttyS0 quiet fill=25 dirty=2 memcheck=3" + append}
        stream = {"reconnect_delay": 0.2}
        self.desk_log = d / "desk-serial.log"
        self.lap_log = d / "lap-serial.log"
        # A qcow2 disk with data on it travels too; the laptop's copy is in its state dir.
        self.disk = d / "desk-disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), "64M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", str(self.disk)],
                       check=True, capture_output=True)
        self.copy = d / "lap" / "vm" / "disk0.qcow2"
        self.src: Daemon = daemons("desk", d, {
            "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
            "domain": {"name": "vm", "driver": "qemu", "tracker": tracker,
                       "qemu": {**qemu, "launch": True, "ram_path": str(d / "desk-ram"),
                                "serial_log": str(self.desk_log),
                                "disks": [{"path": str(self.disk), "format": "qcow2"}]}},
            "peer": {"address": f"127.0.0.1:{port}", "id": sink_id, **back},
            "stream": stream, "control": {"listen": "127.0.0.1:0"}})
        self.snk: Daemon = daemons("lap", d, {
            "node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
            "domain": {"name": "vm", "driver": "qemu", "tracker": tracker,
                       "qemu": {**qemu, "serial_log": str(self.lap_log)}},
            "peer": {"listen": f"127.0.0.1:{port}", "id": source_id,
                     **({"address": back["listen"]} if both_ways else {})},
            "stream": stream, "control": {"listen": "127.0.0.1:0"}})
        for dm in (self.src, self.snk):
            dm.env = {"REPLICATOR_FAULT_DIR": str(self.faults)}

    async def start(self) -> None:
        self.snk.start()
        await self.snk.wait_api()
        self.src.start()
        await self.src.wait_api(90)
        await wait_until(lambda: len(counters(self.desk_log)) >= 2, 120, "the guest's counter")
        await self.wait_replicating(180)

    async def wait_replicating(self, timeout: float) -> None:
        """Replication proven again: the desktop reports in_sync (an ack, not a default)."""
        async def ok() -> bool:
            st = await self.src.status()
            return bool(st.get("in_sync"))
        await wait_until(ok, timeout, "the source to report in_sync")

    async def runners(self) -> list[str]:
        """Which hosts run the guest right now (QEMU's own run state, through each daemon)."""
        out = []
        for name, dm in (("desktop", self.src), ("laptop", self.snk)):
            st = await dm.status()
            if st.get("domain_state") == "running":
                out.append(name)
        return out

    def dump_logs(self) -> None:
        for dm in (self.src, self.snk):
            print(f"\n===== {dm.name} daemon log (tail) =====")
            print("\n".join(dm.log.read_text(errors="replace").splitlines()[-60:]))

    def stop(self) -> None:
        """Stop both daemons, then every QEMU either of them launched (the shadow that runs
        the domain outlives its daemon on purpose)."""
        import json
        import os
        for dm in (self.src, self.snk):
            dm.terminate()
        for rec in self.d.glob("*/vm/*.launch.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.kill(int(json.loads(rec.read_text())["pid"]), signal.SIGKILL)

    def swap(self) -> None:
        """After a switch both ways: the laptop is the source now. Every name here follows the
        roles ("desktop" = the host that runs the guest before the next switch)."""
        self.src, self.snk = self.snk, self.src
        self.desk_log, self.lap_log = self.lap_log, self.desk_log
        self.disk, self.copy = self.copy, self.disk

    def token(self, dm: Daemon) -> str:
        return (dm.state_dir / "api-token").read_text().strip()

    def post_switch(self, mode: str) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(_request(
            "POST", self.src.url, "/api/v1/switch", self.token(self.src), {"mode": mode},
            timeout=120))

    def log(self, host: str) -> Path:
        return self.desk_log if host == "desktop" else self.lap_log

    async def check_guest(self, host: str) -> None:
        """The guest runs on ``host``: its counter goes on and its memory check passes."""
        path = self.log(host)
        n, (ok0, _) = len(counters(path)), memchecks(path)
        await wait_until(lambda: len(counters(path)) >= n + 2, 60, f"the counter on {host}")
        await wait_until(lambda: memchecks(path)[0] > ok0, 90, f"a memory check on {host}")
        seq = counters(path)
        assert seq[-1] > seq[-2], seq[-5:]
        for p in (self.desk_log, self.lap_log):
            assert memchecks(p)[1] == 0, f"{p.name}: the guest's memory check FAILED"


async def _crash(pair: Pair, *, victim: str, hold: str | None, mode: str,
                 sig: int = signal.SIGKILL) -> str:
    """Hold a switch at checkpoint ``hold`` (None: steady state), kill the ``victim`` daemon
    there, restart it, and return the host that runs the guest once things settled."""
    dm = pair.src if victim == "desktop" else pair.snk
    task = None
    if hold is not None:
        block = pair.faults / f"block-{hold}"
        block.touch()
        task = pair.post_switch(mode)
        await wait_until(lambda: (pair.faults / f"at-{hold}").exists(), 120,
                         f"the switch to reach {hold}")
    assert dm.proc is not None
    dm.proc.send_signal(sig)
    dm.proc.wait()
    if hold is not None:
        block.unlink()
        (pair.faults / f"at-{hold}").unlink()
    if victim == "laptop" and hold is None:
        # The laptop stays down a while: the desktop must not claim a standby it has not got.
        await asyncio.sleep(3)
        st = await pair.src.status()
        assert not st["in_sync"], st
        assert st["lag"]["seconds"] > 1.0 and st["lag"]["bytes"] > 0, st["lag"]
    if task is not None:
        with pytest.raises(Exception) if victim == "desktop" else _anything():
            await asyncio.wait_for(task, 120)
    dm.start()
    await dm.wait_api(60)
    t0 = time.monotonic()
    settled: list[str] = []

    async def one_runs() -> bool:
        settled[:] = await pair.runners()
        return len(settled) == 1
    await wait_until(one_runs, SETTLE_SECONDS, f"exactly one host to run the guest after "
                     f"killing the {victim} at {hold or 'steady state'}")
    print(f"\n{victim} killed at {hold or 'steady state'} ({mode}): {settled[0]} runs the guest "
          f"{time.monotonic() - t0:.1f} s after the restart")
    # And it stays that way: never two.
    for _ in range(10):
        assert len(await pair.runners()) == 1
        await asyncio.sleep(0.2)
    return settled[0]


class _anything:
    """Context manager: the switch request may succeed or fail; either is fine."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


async def _sent_raw(pair: Pair) -> int:
    # What crossed the link (for qemu-precopy, "raw" counts QEMU's stream before the pages
    # the shadow already holds are dropped).
    return int((await pair.src.status())["sent_bytes"]["wire"])


async def _expect_rollback(pair: Pair, *, victim: str, hold: str | None, mode: str,
                           sig: int = signal.SIGKILL) -> None:
    before = await _sent_raw(pair) if victim == "laptop" else 0
    # The desktop's session count goes on across the laptop's restart, and starts again with
    # its own.
    session = (await pair.src.status()).get("precopy", {}).get("session")
    if session is not None and victim == "desktop":
        session = 0
    host = await _crash(pair, victim=victim, hold=hold, mode=mode, sig=sig)
    assert host == "desktop", f"killed the {victim} at {hold}: the guest moved to {host}"
    t0 = time.monotonic()
    await pair.wait_replicating(120)
    if session is not None:
        # qemu-precopy: the re-send is the new migration's first pass, done once it paces.
        async def first_pass_done() -> bool:
            pre = (await pair.src.status()).get("precopy", {})
            return pre.get("session", 0) > session and pre.get("pacing") == "idle"
        await wait_until(first_pass_done, 120, "the new precopy session's first pass")
    # Counted up to the proof of replication only: the guest check below waits up to 90 s
    # for a memory check, and the steady stream meanwhile is no re-send (CI saw 142 MiB
    # counted when that wait was inside the window).
    resent = await _sent_raw(pair) - before
    print(f"  replication proven again {time.monotonic() - t0:.1f} s later; "
          f"{resent / MiB:.1f} MiB re-sent (guest RAM {RAM // MiB} MiB)")
    # Only what changed goes again, not the whole RAM.
    assert resent < RAM // 2, f"{resent} bytes re-sent after the restart"
    await pair.check_guest("desktop")


@pytest.mark.parametrize("tracker,mode", [("scan", "live"), ("qemu-precopy", "stop")])
async def test_desktop_daemon_killed_at_each_switch_phase(shm_dir, guest, daemons, tracker,
                                                          mode):
    await with_pair(shm_dir, guest, daemons, tracker,
                    lambda pair: _source_killed_at_each_phase(pair, mode))


async def with_pair(shm_dir: Path, guest, daemons, tracker: str, body, *,
                    back: bool = False) -> None:
    """Start a pair (``back``: both ways, the guest on the laptop first), run ``body(pair)``,
    dump the daemons' logs if it fails, and stop everything."""
    pair = Pair(shm_dir, guest, daemons, tracker, both_ways=back)
    try:
        await pair.start()
        if back:
            await way_back(pair)
        await body(pair)
    except BaseException:
        pair.dump_logs()
        raise
    finally:
        pair.stop()


async def way_back(pair: Pair) -> None:
    """Both ways: switch to the laptop, wait until it streams back, and swap the roles."""
    code, body = await pair.post_switch("live")
    assert code == 200 and body["result"] == "ok", body
    pair.swap()
    await pair.wait_replicating(180)


@pytest.mark.parametrize("tracker,mode", [("qemu-precopy", "live")])
async def test_laptop_daemon_killed_at_each_phase_of_the_switch_back(shm_dir, guest, daemons,
                                                                     tracker, mode):
    """The way home: the laptop runs the guest and streams it back; its daemon is killed at
    every phase of the switch back."""
    await with_pair(shm_dir, guest, daemons, tracker,
                    lambda pair: _source_killed_at_each_phase(pair, mode), back=True)


@pytest.mark.parametrize("tracker,mode", [("scan", "stop")])
async def test_desktop_daemon_killed_at_each_phase_of_the_switch_back(shm_dir, guest, daemons,
                                                                      tracker, mode):
    """The way home, the receiving end: the desktop keeps the shadow; its daemon is killed at
    every phase of the switch back."""
    await with_pair(shm_dir, guest, daemons, tracker,
                    lambda pair: _sink_killed_at_each_phase(pair, mode), back=True)


async def _source_killed_at_each_phase(pair: Pair, mode: str) -> None:
    # `systemctl restart` (SIGTERM, KillMode=process): the VM goes on, no reboot.
    before = counters(pair.desk_log)[-1]
    await _expect_rollback(pair, victim="desktop", hold=None, mode=mode,
                           sig=signal.SIGTERM)
    after = counters(pair.desk_log)
    assert after[after.index(before):] == list(range(before, after[-1] + 1)), \
        "the desktop VM restarted (or skipped) across a daemon restart"
    # A watchdog abort (SIGABRT) in steady state.
    await _expect_rollback(pair, victim="desktop", hold=None, mode=mode,
                           sig=signal.SIGABRT)
    for hold in ("source-before-pause", "source-paused", "source-final-delta",
                 "source-disk-delta", "source-device-sent", "source-committing"):
        await _expect_rollback(pair, victim="desktop", hold=hold, mode=mode)
    # Killed after the laptop committed and answered: the laptop runs it, the desktop
    # learns so from the laptop when it comes back, and never resumes.
    host = await _crash(pair, victim="desktop", hold="source-committed", mode=mode)
    assert host == "laptop"
    await pair.check_guest("laptop")
    assert same_content(pair.disk, pair.copy), "the laptop runs on a stale disk copy"
    st = await pair.src.status()
    assert st["handed_over"] is True and st["domain_state"] != "running", st


@pytest.mark.parametrize("tracker,mode", [("scan", "stop"), ("qemu-precopy", "live")])
async def test_laptop_daemon_killed_at_each_switch_phase(shm_dir, guest, daemons, tracker,
                                                         mode):
    await with_pair(shm_dir, guest, daemons, tracker,
                    lambda pair: _sink_killed_at_each_phase(pair, mode))


async def _sink_killed_at_each_phase(pair: Pair, mode: str) -> None:
    await _expect_rollback(pair, victim="laptop", hold=None, mode=mode)
    for hold in ("source-before-pause", "source-paused", "source-final-delta",
                 "source-disk-delta", "sink-disks-released", "source-device-sent"):
        await _expect_rollback(pair, victim="laptop", hold=hold, mode=mode)
    # Killed after persisting the commit but before resuming the shadow: the restarted
    # laptop adopts its QEMU and resumes it; the desktop, whose commit answer was lost,
    # learns it from the laptop.
    host = await _crash(pair, victim="laptop", hold="sink-commit-persisted", mode=mode)
    assert host == "laptop"
    await pair.check_guest("laptop")
    assert same_content(pair.disk, pair.copy), "the laptop runs on a stale disk copy"
    await wait_until(lambda: _handed_over(pair), 30, "the desktop to learn the outcome")


async def _handed_over(pair: Pair) -> bool:
    st = await pair.src.status()
    return bool(st.get("handed_over"))
