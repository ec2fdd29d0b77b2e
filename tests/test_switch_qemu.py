"""End-to-end switches of a real QEMU guest (TCG here): desktop VM -> laptop shadow.

The guest prints ``COUNTER n`` every 0.5 s; after a switch the shadow's console must continue
the count (a reboot would restart it at 0; stale RAM would jump back or panic).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.node import SinkNode, SourceNode
from replicator.guestlog import counters
from replicator.errors import SwitchError
from replicator.vmm.qemu import QemuProcess

from .conftest import ROOT, pair_ids, wait_until

pytestmark = pytest.mark.qemu
RAM = 256 * 1024 * 1024


def qemu_table(guest: tuple[Path, Path], **extra) -> dict:
    kernel, initrd = guest
    return {"ram_size": RAM, "accel": "tcg", "kernel": str(kernel), "initrd": str(initrd),
            "append": "console=ttyS0 quiet fill=50 dirty=2", **extra}


def sink_config(d: Path, guest, listen: str = "127.0.0.1:0"):
    source_id, _ = pair_ids(d / "desk", d / "lap")
    return load_config({"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
                        "domain": {"name": "vm", "driver": "qemu", "qemu": qemu_table(guest)},
                        "peer": {"listen": listen, "id": source_id}})


def source_config(d: Path, guest, port: int):
    _, sink_id = pair_ids(d / "desk", d / "lap")
    return load_config({
        "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
        "domain": {"name": "vm", "driver": "qemu", "tracker": "scan", "qemu": qemu_table(
            guest, launch=True, ram_path=str(d / "desk-ram"), serial_log=str(d / "desk.log"))},
        "peer": {"address": f"127.0.0.1:{port}", "id": sink_id}})


async def boot_and_sync(source: SourceNode, d: Path) -> None:
    await wait_until(lambda: len(counters(d / "desk.log")) >= 2, 90, "the guest's counter")
    await asyncio.wait_for(source.rep.connected.wait(), 30)
    await wait_until(lambda: source.rep.ledger.acked_epoch >= 2, 60, "first acked epochs")


async def start_sink_daemon(d: Path, guest, timeout: float | None = None
                            ) -> tuple[subprocess.Popen, int]:
    """A real sink daemon (`replicator run`) for d/lap, paired with d/desk; returns its port."""
    from replicator.cli import _request
    from replicator.demo import _toml
    cfg = sink_config(d, guest)
    peer = {"listen": "127.0.0.1:0", "id": cfg.peer.id}
    if timeout is not None:
        peer["timeout"] = timeout
    (d / "lap.toml").write_text(_toml({
        "node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
        "domain": {"name": "vm", "driver": "qemu", "qemu": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in qemu_table(guest).items()}},
        "peer": peer, "control": {"listen": "127.0.0.1:0"}}))
    proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "run", "-c",
                             str(d / "lap.toml")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(d / "lap.err", "wb"))
    await wait_until(lambda: (d / "lap" / "api-url").exists(), 30, "sink daemon")
    _, st = await _request("GET", (d / "lap" / "api-url").read_text().strip(), "/api/v1/status")
    return proc, int(st["listen"].rsplit(":", 1)[1])


async def stop_nodes(source: SourceNode, sink: SinkNode) -> None:
    """Stop both nodes and every QEMU they started, even if stopping one of them fails."""
    shadow = sink.switch_handler.shadow
    try:
        await source.stop()
    finally:
        try:
            await sink.stop()
        finally:
            if shadow.proc is not None and shadow.proc.returncode is None:
                await shadow.proc.kill()


def assert_continues(before: int, after: list[int]) -> None:
    assert after, "the shadow printed no COUNTER after the switch"
    assert after[0] == before + 1, f"desktop stopped at {before}, shadow went on at {after[0]}"
    assert after == list(range(after[0], after[0] + len(after))), after


@pytest.mark.parametrize("mode", ["live", "stop"])
async def test_counter_continues_after_switch(shm_dir, guest, mode):
    sink = SinkNode(sink_config(shm_dir, guest))
    await sink.start()
    source = SourceNode(source_config(shm_dir, guest, sink.address[1]))
    try:
        await source.start()
        await boot_and_sync(source, shm_dir)
        result = await source.switch(mode)
        assert result["result"] == "ok" and result["shadow_verified"]
        before = counters(shm_dir / "desk.log")[-1]
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
        # Exactly one runs: the desktop is paused for good, the laptop runs.
        assert await source.driver.proc.status() == "postmigrate"
        assert await sink.switch_handler.shadow.proc.status() == "running"
        assert result["downtime_ms"] > 0
        assert result["time_to_switch_ms"] >= result["downtime_ms"]
    finally:
        await stop_nodes(source, sink)


async def test_switch_refused_when_shadow_not_verified(shm_dir, guest):
    sink = SinkNode(sink_config(shm_dir, guest))
    await sink.start()
    source = SourceNode(source_config(shm_dir, guest, sink.address[1]))
    try:
        await source.start()
        await boot_and_sync(source, shm_dir)
        sink.receiver.store.regions["ram0"].hashes[1234] ^= 1    # shadow no longer trusted
        shadow = sink.switch_handler.shadow
        with pytest.raises(SwitchError, match="differs from the source"):
            await source.switch("stop")
        assert await source.driver.proc.status() == "running"
        # The sink discards the shadow that took part in the failed switch (a fresh one may be
        # pre-started for the next attempt); none of them ever ran.
        await wait_until(lambda: sink.switch_handler.aborts >= 1, 10, "the sink to abort")
        assert not shadow.running
        if shadow.proc is not None:
            assert await shadow.proc.status() in ("inmigrate", "prelaunch", "paused")
        n = len(counters(shm_dir / "desk.log"))
        await wait_until(lambda: len(counters(shm_dir / "desk.log")) > n + 1, 10,
                         "the desktop guest to keep counting")
    finally:
        await stop_nodes(source, sink)


async def test_rollback_when_sink_dies_before_commit(shm_dir, guest):
    """kill -9 of the sink daemon after the device state went out: the desktop resumes."""
    proc = None
    source = None
    try:
        proc, port = await start_sink_daemon(shm_dir, guest)
        source = SourceNode(source_config(shm_dir, guest, port))
        await source.start()
        await boot_and_sync(source, shm_dir)
        real_save = source.driver.save_device_state

        async def save_then_kill_sink() -> bytes:
            data = await real_save()
            proc.send_signal(signal.SIGKILL)       # the laptop vanishes mid-switch
            proc.wait()
            return data

        source.driver.save_device_state = save_then_kill_sink
        with pytest.raises(SwitchError) as exc:
            await source.switch("live")
        assert exc.value.rolled_back
        assert await source.driver.proc.status() == "running"
        assert not (shm_dir / "desk" / "vm" / "handed-over.json").exists()
        n = len(counters(shm_dir / "desk.log"))
        await wait_until(lambda: len(counters(shm_dir / "desk.log")) > n + 1, 10,
                         "the desktop guest to keep counting")
        # The orphaned shadow never ran.
        qmp = shm_dir / "lap" / "vm" / "vm.qmp"
        if qmp.exists():
            try:
                shadow = await QemuProcess.attach(qmp, timeout=5)
            except Exception:
                shadow = None
            if shadow is not None:
                assert await shadow.status() in ("inmigrate", "paused", "prelaunch")
                await shadow.kill()
                await shadow.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if source is not None:
            await source.stop()
