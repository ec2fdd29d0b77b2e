"""The qemu-precopy tracker end to end on real QEMU (TCG here).

QEMU's own migration is held open (the shadow's SWITCHOVER_ACK withheld) and relayed to the
shadow; a switch costs only the last delta. Also: resume after a link loss without resending
RAM, and rollback when the sink dies before the commit.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from replicator.config import load_config
from replicator.node import SinkNode, SourceNode
from replicator.guestlog import counters
from replicator.pagefile import hash_file
from replicator.vmm.spec import RAM_BACKEND_ID
from replicator.errors import SwitchError

from .conftest import pair_ids
from .conftest import wait_until
from .test_switch_qemu import RAM, assert_continues, qemu_table, start_sink_daemon, stop_nodes

pytestmark = pytest.mark.qemu


def sink_cfg(d: Path, guest, listen: str = "127.0.0.1:0"):
    source_id, _ = pair_ids(d / "desk", d / "lap")
    return load_config({"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
                        "domain": {"name": "vm", "driver": "qemu", "qemu": qemu_table(guest)},
                        "peer": {"listen": listen, "id": source_id, "timeout": 5.0}})


def source_cfg(d: Path, guest, port: int):
    _, sink_id = pair_ids(d / "desk", d / "lap")
    return load_config({
        "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
        "domain": {"name": "vm", "driver": "qemu", "tracker": "qemu-precopy",
                   "qemu": qemu_table(guest, launch=True, ram_path=str(d / "desk-ram"),
                                      serial_log=str(d / "desk.log"))},
        "peer": {"address": f"127.0.0.1:{port}", "id": sink_id, "timeout": 5.0},
        "stream": {"reconnect_delay": 0.2}})


async def start_pair(d: Path, guest) -> tuple[SinkNode, SourceNode]:
    sink = SinkNode(sink_cfg(d, guest))
    await sink.start()
    source = SourceNode(source_cfg(d, guest, sink.address[1]))
    await source.start()
    await wait_until(lambda: len(counters(d / "desk.log")) >= 2, 90, "the guest's counter")
    # The guest fills half its RAM after boot; byte counts below assume that is done.
    await wait_until(lambda: b"FILLED" in (d / "desk.log").read_bytes(), 90, "the guest's fill")
    await asyncio.wait_for(source.rep.connected.wait(), 30)
    return sink, source


async def stop_pair(sink: SinkNode, source: SourceNode) -> None:
    await stop_nodes(source, sink)


def pages_not_relayed(source: SourceNode) -> int:
    """Pages of the desktop's RAM whose content the relay has not forwarded (or dropped as
    held by the shadow) yet."""
    region = source.rep.ledger.regions[RAM_BACKEND_ID]
    with open(region.region.path, "rb") as f:
        current = hash_file(f.fileno(), region.region.size)
    return int(np.count_nonzero(current != region.shipped))


async def bulk_done(source: SourceNode) -> None:
    """QEMU's first pass (and its re-send of what the guest's fill dirtied meanwhile) went
    through: the relay paces, and all but the guest's last few writes passed it. Neither
    QEMU's sync count nor one idle drain says so alone: QEMU syncs many times during its
    first pass, and ``remaining`` is 0 for a moment between a pass and the sync that finds
    the pages written meanwhile (CI saw a test take that for the end of the bulk pass)."""
    rep = source.rep
    await wait_until(lambda: rep.qemu_info.get("ram", {}).get("dirty-sync-count", 0) >= 3
                     and rep.pacing == "idle"
                     and pages_not_relayed(source) < 4 * 1024 * 1024 // 4096,
                     120, "the bulk pass to finish", interval=0.5)


@pytest.mark.parametrize("mode", ["live", "stop"])
async def test_precopy_held_open_then_switch_continues_counter(shm_dir, guest, mode):
    sink, source = await start_pair(shm_dir, guest)
    try:
        rep = source.rep
        await bulk_done(source)
        if mode == "stop":
            # `replicator pause`: the held-open migration ends (QEMU allows hotplug etc. again),
            # the VM runs on; `resume` starts a new migration that drops what the shadow holds.
            await source.pause_replication()
            assert (await source.driver.proc.query_migrate())["status"] in ("cancelled", "failed")
            assert await source.driver.proc.status() == "running"
            with pytest.raises(Exception, match="paused"):
                await source.switch("stop")
            dropped = rep.pages_dropped
            await source.resume_replication()
            await wait_until(lambda: rep.session_no >= 2 and rep.connected.is_set(), 60,
                             "replication to resume")
            await bulk_done(source)
            assert rep.pages_dropped - dropped > (RAM // 4096) // 8   # guest-dependent, as below
        # Held open: precopy stays active (the ACK is withheld) while the guest keeps running.
        hold = 90 if mode == "live" else 5
        await asyncio.sleep(hold)
        assert rep.qemu_info["status"] == "active"
        assert await source.driver.proc.status() == "running"
        assert rep.stream_bytes > 100 * 1024 * 1024          # the bulk pass went through us
        result = await source.switch(mode)
        assert result["result"] == "ok" and result["shadow_verified"]
        before = counters(shm_dir / "desk.log")[-1]
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
        assert await source.driver.proc.status() == "postmigrate"
        assert await sink.switch_handler.shadow.proc.status() == "running"
        # Only the last delta moved while the guest was paused.
        assert result["final_delta_bytes"] < RAM // 4
    finally:
        await stop_pair(sink, source)


async def test_precopy_resume_after_link_loss_forwards_far_less_than_ram(shm_dir, guest):
    sink, source = await start_pair(shm_dir, guest)
    try:
        rep = source.rep
        await bulk_done(source)
        first = rep.relayed_bytes
        port = sink.address[1]
        # The link drops: the sink goes away; both migrations fail; the desktop VM runs on.
        await sink.stop()
        await wait_until(lambda: not rep.connected.is_set(), 20, "the link to drop")
        assert await source.driver.proc.status() == "running"
        n = len(counters(shm_dir / "desk.log"))
        await wait_until(lambda: len(counters(shm_dir / "desk.log")) > n + 1, 10, "guest runs")
        # Back: a new migration whose bulk pass is mostly dropped (the shadow holds it).
        cfg = sink_cfg(shm_dir, guest, listen=f"127.0.0.1:{port}")
        sink = SinkNode(cfg)
        await sink.start()
        t0 = asyncio.get_running_loop().time()
        dropped0, relayed0 = rep.pages_dropped, rep.relayed_bytes
        await wait_until(lambda: rep.session_no >= 2 and rep.connected.is_set(), 60, "resume")
        await bulk_done(source)
        resent = rep.relayed_bytes - relayed0
        dropped = rep.pages_dropped - dropped0
        took = asyncio.get_running_loop().time() - t0
        print(f"first pass {first / 2**20:.1f} MiB; resumed in {took:.1f} s: "
              f"{resent / 2**20:.1f} MiB relayed, "
              f"{dropped} pages dropped, {rep.pages_forwarded} forwarded in all, "
              f"{rep.iterations} RAM rounds, QEMU {rep.qemu_info.get('ram')}")
        # How many pages the guest holds (and so can be dropped) depends on its memory use;
        # the requirement is that the resumed bulk pass forwards far less than the first one.
        assert dropped * 4096 > RAM // 8, f"only {dropped} pages dropped"
        assert resent < first / 3, f"resume forwarded {resent} bytes, first pass {first}"
        result = await source.switch("stop")
        assert result["result"] == "ok"
        before = counters(shm_dir / "desk.log")[-1]
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
    finally:
        await stop_pair(sink, source)


async def test_precopy_rollback_when_sink_dies_before_commit(shm_dir, guest):
    """kill -9 of the sink daemon once the shadow loaded the stream: the desktop runs on."""
    d = shm_dir
    proc = None
    source = None
    try:
        proc, port = await start_sink_daemon(d, guest, timeout=5.0)
        source = SourceNode(source_cfg(d, guest, port))
        await source.start()
        await wait_until(lambda: len(counters(d / "desk.log")) >= 2, 90, "the guest's counter")
        await asyncio.wait_for(source.rep.connected.wait(), 30)
        await bulk_done(source)
        real_expect = source.switcher._expect

        async def expect_then_kill(report, step):
            reply = await real_expect(report, step)
            if step == "loaded":
                proc.send_signal(signal.SIGKILL)     # the laptop vanishes before the commit
                proc.wait()
            return reply

        source.switcher._expect = expect_then_kill
        with pytest.raises(SwitchError) as exc:
            await source.switch("live")
        assert exc.value.rolled_back
        assert await source.driver.proc.status() == "running"
        assert not (d / "desk" / "vm" / "handed-over.json").exists()
        n = len(counters(d / "desk.log"))
        await wait_until(lambda: len(counters(d / "desk.log")) > n + 1, 10,
                         "the desktop guest to keep counting")
        # The orphaned shadow loaded the state but never ran.
        shadow_log = d / "lap" / "vm" / "shadow-serial.log"
        assert counters(shadow_log) == []
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(d / "lap" / "vm")], check=False)
        if source is not None:
            await source.stop()
