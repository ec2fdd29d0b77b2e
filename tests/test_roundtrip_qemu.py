"""The round trip: the VM goes to the laptop and comes home with only the delta.

Two real daemons (``replicator run``) configured both ways, a real QEMU guest (TCG) with a
qcow2 disk, launched by the desktop daemon. Each switch moves the guest; the host it left ends
its paused VM and keeps its RAM file and disk as the new shadow, so the way back sends only
what the guest changed meanwhile. The guest's own checks (``COUNTER`` goes on, ``MEMCHECK``
passes, ``DISKCHECK`` passes) run on whichever host it is on.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from replicator.guestlog import counters, diskchecks
from replicator.pagefile import CHUNK_PAGES, hash_file

from .conftest import wait_until
from .test_crash_qemu import MiB, RAM, Pair, memchecks
from .test_faults import daemons  # noqa: F401  (fixture)

pytestmark = pytest.mark.qemu


def page_hashes(path: Path) -> np.ndarray:
    import os
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_file(fd, RAM, bytearray(CHUNK_PAGES * 4096))
    finally:
        os.close(fd)


class RoundTrip(Pair):
    """A :class:`Pair` whose daemons are peers: the domain moves both ways."""

    def __init__(self, d: Path, guest, daemons, tracker: str):
        # The guest checks its disk too (each round verifies what the last one wrote).
        super().__init__(d, guest, daemons, tracker, both_ways=True, append=" diskcheck=1")
        self.hosts = {"desktop": self.src, "laptop": self.snk}

    def ram(self, host: str) -> Path:
        return self.d / "desk-ram" if host == "desktop" else self.d / "lap" / "vm" / "ram0.img"

    async def wait_in_sync(self, host: str, timeout: float = 180) -> dict:
        dm = self.hosts[host]
        last: dict = {}

        async def ok() -> bool:
            last.clear()
            last.update(await dm.status())
            return bool(last.get("in_sync"))
        await wait_until(ok, timeout, f"{host} to report in_sync")
        return last

    async def check_disk(self, host: str) -> None:
        """The guest's disk check passes again on ``host`` (on that host's disk)."""
        path = self.log(host)
        n = len(diskchecks(path))
        await wait_until(lambda: len(diskchecks(path)) >= n + 2, 60, f"disk checks on {host}")
        assert all(ok for ok, _ in diskchecks(path)), diskchecks(path)[-4:]

    async def switch_from(self, host: str, mode: str) -> dict:
        from replicator.cli import _request
        dm = self.hosts[host]
        code, body = await _request("POST", dm.url, "/api/v1/switch", self.token(dm),
                                    {"mode": mode}, timeout=180)
        assert code == 200, body
        return body


@pytest.mark.parametrize("tracker", ["scan", "qemu-precopy"])
async def test_three_round_trips_send_only_the_delta(shm_dir, guest, daemons, tracker):
    trip = RoundTrip(shm_dir, guest, daemons, tracker)
    # Hold the desktop once it made its RAM and disk the shadow, before the laptop streams
    # into them: the test keeps a copy of what the desktop still holds of the guest.
    block = trip.faults / "block-peer-shadow-ready"
    try:
        await trip.start()
        for n in range(3):
            await trip.wait_in_sync("desktop")
            block.touch()
            there = await trip.switch_from("desktop", "live" if n % 2 == 0 else "stop")
            assert there["result"] == "ok", there
            await trip.check_guest("laptop")
            await trip.check_disk("laptop")
            await wait_until(lambda: (trip.faults / "at-peer-shadow-ready").exists(), 60,
                             "the desktop to make its RAM and disk the shadow")
            kept_ram = page_hashes(trip.ram("desktop"))
            kept_disk = shm_dir / "kept-disk.qcow2"
            shutil.copyfile(trip.disk, kept_disk)
            block.unlink()
            (trip.faults / "at-peer-shadow-ready").unlink()
            t_switch = time.monotonic()
            # The laptop now streams back; give the guest a while there.
            st = await trip.wait_in_sync("laptop")
            # What crossed the link (qemu-precopy: after the pages the desktop holds dropped).
            before = st["sent_bytes"]["wire"]
            await asyncio.sleep(5)
            st = await trip.wait_in_sync("laptop")
            sent = st["sent_bytes"]["wire"]
            # "Switch now" works from either host: the second time it is pressed at home.
            back = await trip.switch_from("desktop" if n == 1 else "laptop",
                                          "live" if n % 2 == 0 else "stop")
            assert back["result"] == "ok", back
            await trip.check_guest("desktop")
            await trip.check_disk("desktop")
            # What the guest changed while away: pages of the desktop's RAM image now (equal
            # to the laptop's at the switch back) that differ from what it kept.
            changed_pages = int(np.count_nonzero(page_hashes(trip.ram("desktop")) != kept_ram))
            print(f"\nround trip {n + 1} ({tracker}): {time.monotonic() - t_switch:.1f} s on the "
                  f"laptop; changed {changed_pages * 4096 / MiB:.1f} MiB, sent back "
                  f"{sent / MiB:.1f} MiB (in sync after {before / MiB:.1f} MiB); "
                  f"back downtime {back.get('downtime_ms')} ms")
            assert changed_pages > 0
            # Only the delta, never a full copy. The guest rewrites pages while it runs, so
            # later rounds re-send some; QEMU's precopy re-sends the pages dirtied during its
            # first pass as well (issue 14), hence its looser bound.
            assert sent < RAM // 2, sent
            factor = 1.2 if tracker == "scan" else 3.0
            assert before <= factor * changed_pages * 4096 + 4 * MiB, (before, changed_pages)
            # The switch compared the disks' digests (the guest writes on at once, so the files
            # differ a moment later); the guest's own disk check passed on each host.
            if n != 1:
                assert back["disks_verified"] is True, back
        for p in (trip.desk_log, trip.lap_log):
            assert memchecks(p)[1] == 0
            checks = diskchecks(p)
            assert checks and all(ok for ok, _ in checks), (p.name, checks)
        seq = counters(trip.desk_log)
        assert seq[-1] > 0
    except BaseException:
        trip.dump_logs()
        raise
    finally:
        block.unlink(missing_ok=True)
        trip.stop()


async def test_split_brain_is_refused_and_resolved_by_discarding_one_copy(shm_dir, guest,
                                                                          daemons):
    """The desktop goes off (daemon and VM killed), the laptop is started by hand, then the
    desktop comes back and boots its VM too: both ran since they last agreed. Neither copy is
    merged into the other; both hosts say so; `discard-here` on the desktop makes it the
    laptop's shadow again, after a full compare."""
    import os
    import signal
    import subprocess
    import sys

    trip = RoundTrip(shm_dir, guest, daemons, "scan")
    try:
        await trip.start()
        desk_pid = (await trip.src.status())["qemu_pid"]
        trip.src.kill9()
        os.kill(desk_pid, signal.SIGKILL)
        from replicator.cli import _request
        code, body = await _request("POST", trip.snk.url, "/api/v1/takeover",
                                    trip.token(trip.snk), {"force": True}, timeout=60)
        assert code == 200, body
        await wait_until(lambda: len(counters(trip.lap_log)) >= 2, 120, "the laptop's boot")
        trip.src.start()                     # launch = true: it boots its own VM again
        await trip.src.wait_api(90)

        async def both_refuse() -> bool:
            a, b = await trip.src.status(), await trip.snk.status()
            return "split_brain" in a and "split_brain" in b
        await wait_until(both_refuse, 60, "both hosts to report the split brain")
        desk, lap = await trip.src.status(), await trip.snk.status()
        for st in (desk, lap):
            msg = st["split_brain"]["message"]
            assert "SPLIT BRAIN" in msg and "started by hand" in msg and "discard-here" in msg
            assert st["in_sync"] is False
        assert desk["split_brain"]["newer"] == "peer" and lap["split_brain"]["newer"] == "here"
        assert sorted(await trip.runners()) == ["desktop", "laptop"]   # nothing was merged
        # A switch is refused while it lasts.
        code, body = await _request("POST", trip.src.url, "/api/v1/switch",
                                    trip.token(trip.src), {"mode": "stop"}, timeout=60)
        assert code != 200 and "SPLIT BRAIN" in body["error"], body
        # Keep the laptop's copy: the CLI on the desktop.
        cfg = trip.src.config
        out = subprocess.run([sys.executable, "-m", "replicator.cli", "discard-here", "-c",
                              str(cfg), "--url", trip.src.url], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        await wait_until(lambda: _runs(trip, ["laptop"]), 60, "only the laptop to run it")
        st = await trip.wait_in_sync("laptop")
        assert "split_brain" not in st
        await trip.check_guest("laptop")
    except BaseException:
        trip.dump_logs()
        raise
    finally:
        trip.stop()


async def _runs(trip: RoundTrip, hosts: list[str]) -> bool:
    return sorted(await trip.runners()) == hosts
