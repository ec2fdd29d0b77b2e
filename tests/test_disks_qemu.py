"""Disk replication end to end: a real QEMU guest with a qcow2 or raw disk, the laptop's own copy.

The source disk and the laptop's copy are separate images (no shared storage). Writes come
from inside QEMU (HMP ``qemu-io`` on the guest's virtio-blk backend: the same path a guest
write takes through the block layer, so the dirty bitmaps see it) and from the guest's disk
check where the guest has one. Copies are compared with ``qemu-img compare`` (guest view).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.node import SinkNode, SourceNode
from replicator.guestlog import counters, diskchecks
from replicator.vmm.qemu import QemuProcess

from .conftest import pair_ids, wait_until
from .test_switch_qemu import assert_continues, stop_nodes

pytestmark = pytest.mark.qemu
RAM = 128 * 1024 * 1024
DISK = 64 * 1024 * 1024
MiB = 1024 * 1024


def make_disk(path: Path, fmt: str, *writes: tuple[int, int, int]) -> None:
    """A new image with ``(pattern, offset, length)`` written into it (guest view)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(DISK)], check=True)
    for pattern, off, length in writes:
        subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {off} {length}",
                        str(path)], check=True, capture_output=True)


def same_content(a: Path, b: Path) -> bool:
    """Guest-visible contents equal (-U: the images may be open in QEMU; call
    :func:`flushed` first for an image a running QEMU writes)."""
    r = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                       text=True)
    if r.returncode not in (0, 1):
        raise AssertionError(f"qemu-img compare: {r.stderr.strip()}")
    return r.returncode == 0


async def flushed(source: "SourceNode") -> None:
    """Make the running source QEMU write its image's metadata cache out, so that another
    process reading the file sees what the guest sees."""
    await hmp_io(source, "flush")


def configs(d: Path, guest, disk: Path, fmt: str, tracker: str, *, copy: Path | None = None):
    kernel, initrd = guest
    source_id, sink_id = pair_ids(d / "desk", d / "lap")
    base = {"ram_size": RAM, "accel": "tcg", "kernel": str(kernel), "initrd": str(initrd),
            "append": "console=ttyS0 quiet fill=30 dirty=1"}
    lap_qemu = dict(base)
    if copy is not None:
        lap_qemu["disks"] = [{"path": str(copy), "format": fmt}]
    sink = load_config({"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
                        "domain": {"name": "vm", "driver": "qemu", "qemu": lap_qemu},
                        "peer": {"listen": "127.0.0.1:0", "id": source_id}})

    def source(port: int):
        return load_config({
            "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
            "domain": {"name": "vm", "driver": "qemu", "tracker": tracker, "qemu": {
                **base, "launch": True, "ram_path": str(d / "desk-ram"),
                "serial_log": str(d / "desk.log"),
                "disks": [{"path": str(disk), "format": fmt}]}},
            "peer": {"address": f"127.0.0.1:{port}", "id": sink_id},
            "stream": {"disk_interval": 0.2}})
    return sink, source


async def hmp_io(source: SourceNode, command: str) -> None:
    out = await source.driver.proc.execute("human-monitor-command", {
        "command-line": f'qemu-io -d /machine/peripheral/disk0-dev/virtio-backend "{command}"'})
    # qemu-io prints its report to QEMU's stdout; the monitor returns only errors.
    assert not out.strip(), out


async def hmp_write(source: SourceNode, pattern: int, offset: int, length: int) -> None:
    """A write through the guest's disk device inside the running source QEMU."""
    await hmp_io(source, f"write -P {pattern} {offset} {length}")


def disk_status(source: SourceNode) -> dict:
    return source.status()["disks"][0]


async def wait_disk_synced(source: SourceNode, timeout: float = 90) -> None:
    """The disk's copy is complete and holds every write made before this call: a round
    frozen after now was sent and acknowledged."""
    disks = source.rep.disks
    before = disks.sent_generation

    def synced() -> bool:
        return (disk_status(source)["copy"] == "streaming"
                and disks.acked >= disks.sent_generation > before)
    await wait_until(synced, timeout, "the disk copy to catch up")


async def start_pair(d: Path, guest, disk: Path, fmt: str, tracker: str, **kw
                     ) -> tuple[SinkNode, SourceNode]:
    sink_cfg, source_cfg = configs(d, guest, disk, fmt, tracker, **kw)
    sink = SinkNode(sink_cfg)
    await sink.start()
    source = SourceNode(source_cfg(sink.address[1]))
    await source.start()
    return sink, source


@pytest.mark.parametrize("tracker, fmt, mode", [
    ("scan", "qcow2", "stop"), ("qemu-precopy", "qcow2", "live"),
    ("qemu-precopy", "raw", "stop"), ("scan", "raw", "live")])
async def test_disk_travels_with_the_vm(shm_dir, guest, tracker, fmt, mode):
    """First copy (sparse: a 64 MiB disk holding 8 MiB sends about 8 MiB), then streamed
    writes, then a switch: the laptop's VM runs on a copy equal to the desktop's disk."""
    disk = shm_dir / f"desk-disk.{fmt}"
    make_disk(disk, fmt, (0x11, 0, 8 * MiB))
    sink, source = await start_pair(shm_dir, guest, disk, fmt, tracker)
    copy = shm_dir / "lap" / "vm" / f"disk0.{fmt}"
    try:
        await wait_until(lambda: len(counters(shm_dir / "desk.log")) >= 2, 90, "the guest")
        await wait_disk_synced(source)
        await flushed(source)
        first = disk_status(source)["sent_bytes"]["raw"]
        # Only the allocated 8 MiB is read and sent; the 56 MiB hole costs nothing.
        assert 8 * MiB <= first <= 9 * MiB, first
        assert same_content(disk, copy)
        await hmp_write(source, 0x22, 20 * MiB, 3 * MiB)
        await hmp_write(source, 0x33, 60 * MiB, 64 * 1024)
        await wait_disk_synced(source)
        await flushed(source)
        assert same_content(disk, copy)
        assert disk_status(source)["sent_bytes"]["raw"] - first <= 3 * MiB + 2 * 64 * 1024
        # A write just before the switch must be in the copy the laptop's VM runs on.
        await hmp_write(source, 0x44, 30 * MiB, MiB)
        result = await source.switch(mode)
        assert result["result"] == "ok" and result["disks_verified"], result
        before = counters(shm_dir / "desk.log")[-1]
        shadow = sink.switch_handler.shadow
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
        assert await source.driver.proc.status() == "postmigrate"
        assert await shadow.proc.status() == "running"
        assert same_content(disk, copy)
        # The laptop's QEMU runs on its copy, not on the desktop's disk.
        nodes = await shadow.proc.execute("query-named-block-nodes", {"flat": True})
        files = {n.get("file") for n in nodes if n.get("drv") == "file"}
        assert str(copy) in files and str(disk) not in files, files
        assert sink.status()["disks"][0]["writer"] == "stopped"
    finally:
        await stop_nodes(source, sink)


async def test_resume_sends_only_changed_blocks(shm_dir, guest):
    """Link loss, a sink restart and a source daemon restart (VM adopted): each time only the
    blocks written meanwhile are sent again, never the whole disk."""
    disk = shm_dir / "desk-disk.qcow2"
    copy = shm_dir / "copy.qcow2"
    make_disk(disk, "qcow2", (0x11, 0, 16 * MiB))
    sink_cfg, source_cfg = configs(shm_dir, guest, disk, "qcow2", "scan", copy=copy)
    sink = SinkNode(sink_cfg)
    await sink.start()
    port = sink.address[1]
    source = SourceNode(source_cfg(port))
    await source.start()
    try:
        await wait_disk_synced(source)
        await flushed(source)
        assert same_content(disk, copy)

        # 1. Link loss: the sink goes away; the guest writes 2 MiB meanwhile.
        await sink.stop()
        await wait_until(lambda: not source.rep.connected.is_set(), 30, "the link to drop")
        sent = disk_status(source)["sent_bytes"]["raw"]
        await hmp_write(source, 0x55, 32 * MiB, 2 * MiB)
        sink_cfg2, _ = configs(shm_dir, guest, disk, "qcow2", "scan", copy=copy)
        sink = SinkNode(load_config({**_raw(sink_cfg2), "peer": {
            "listen": f"127.0.0.1:{port}", "id": sink_cfg2.peer.id}}))
        await sink.start()
        await wait_disk_synced(source)
        resent = disk_status(source)["sent_bytes"]["raw"] - sent
        assert 2 * MiB <= resent <= 2 * MiB + 128 * 1024, resent
        await flushed(source)
        assert same_content(disk, copy)

        # 2. The source daemon restarts; its QEMU runs on and keeps its dirty bitmaps.
        await source.stop(leave_domain_running=True)
        vm = await QemuProcess.adopt("vm", shm_dir / "desk" / "vm")
        assert vm is not None
        out = await vm.execute("human-monitor-command", {
            "command-line": 'qemu-io -d /machine/peripheral/disk0-dev/virtio-backend '
                            f'"write -P 0x66 {40 * MiB} {MiB}"'})
        assert not out.strip(), out
        await vm.detach()
        source = SourceNode(source_cfg(port))
        await source.start()
        await wait_disk_synced(source)
        resent = disk_status(source)["sent_bytes"]["raw"]
        assert MiB <= resent <= MiB + 128 * 1024, resent
        await flushed(source)
        assert same_content(disk, copy)

        # 3. The laptop crashed in the middle of a round: its copy holds a block its manifest
        # does not know of (here: garbage at 5 MiB) and its state says unclean. The restarted
        # laptop re-hashes the copy and the source repairs exactly that block.
        await sink.stop()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x99 {5 * MiB} 4096",
                        str(copy)], check=True, capture_output=True)
        state = shm_dir / "lap" / "vm" / "disk0.state.json"
        import json
        st = json.loads(state.read_text())
        state.write_text(json.dumps({**st, "clean": False}))
        sent = disk_status(source)["sent_bytes"]["raw"]
        sink = SinkNode(load_config({**_raw(sink_cfg2), "peer": {
            "listen": f"127.0.0.1:{port}", "id": sink_cfg2.peer.id}}))
        await sink.start()
        await wait_disk_synced(source)
        assert disk_status(source)["sent_bytes"]["raw"] - sent == 64 * 1024
        await flushed(source)
        assert same_content(disk, copy)
    finally:
        await stop_nodes(source, sink)


def _raw(cfg) -> dict:
    """A config back as the table it came from (enough of it for a restart)."""
    q = cfg.domain.qemu
    return {"node": {"name": cfg.node.name, "role": cfg.node.role,
                     "state_dir": str(cfg.node.state_dir)},
            "domain": {"name": cfg.domain.name, "driver": "qemu", "qemu": {
                "ram_size": q.ram_size, "accel": q.accel, "kernel": str(q.kernel),
                "initrd": str(q.initrd), "append": q.append,
                "disks": [{"path": str(x.path), "format": x.format} for x in q.disks]}}}


@pytest.mark.parametrize("rate, tracker, mode", [
    (0, "scan", "live"), (5, "qemu-precopy", "live"), (5, "scan", "stop"),
    (50, "qemu-precopy", "stop"), (50, "scan", "live"), (50, "qemu-precopy", "live")])
async def test_switch_under_disk_writes(shm_dir, guest, rate, tracker, mode):
    """The guest writes its disk (``diskdirty`` MiB/s) and checks it every second
    (``diskcheck``: each round verifies what the previous one wrote, every 8th all regions).
    After the switch the laptop's guest goes on checking: a single block missing from the
    copy fails its check."""
    disk = shm_dir / "desk-disk.qcow2"
    make_disk(disk, "qcow2")
    sink_cfg, source_cfg = configs(shm_dir, guest, disk, "qcow2", tracker)
    append = f"console=ttyS0 quiet fill=30 dirty=1 diskcheck=0.5 diskdirty={rate}"
    sink_cfg = _with_append(sink_cfg, append)
    sink = SinkNode(sink_cfg)
    await sink.start()
    source = SourceNode(_with_append(source_cfg(sink.address[1]), append))
    await source.start()
    desk_log = shm_dir / "desk.log"
    shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
    try:
        await wait_until(lambda: len(diskchecks(desk_log)) >= 4, 90, "the guest's disk checks")
        await wait_disk_synced(source)
        # RAM in sync (a disk written at 50 MiB/s may be a round or two behind: the switch
        # does not wait for that, it sends the rest).
        await wait_until(lambda: source.rep.lag_snapshot().in_sync, 60, "RAM in sync")
        if rate:
            # Switch while the guest writes (and at least one rate report is out).
            await wait_until(lambda: b"DISKDIRTY" in desk_log.read_bytes(), 30, "DISKDIRTY")
        result = await source.switch(mode)
        assert result["result"] == "ok" and result["disks_verified"], result
        before = diskchecks(desk_log)
        await wait_until(lambda: len([ok for ok, _ in diskchecks(shadow_log)]) >= 10, 60,
                         "disk checks on the laptop")
        after = diskchecks(shadow_log)
        assert all(ok for ok, _ in before), before
        assert all(ok for ok, _ in after), (after, shadow_log.read_text()[-2000:])
        # The laptop's guest went on with the same rounds (no reboot), incl. full sweeps.
        assert after[0][1] == before[-1][1] + 1 or after[0][1] == before[-1][1] + 2, \
            (before[-3:], after[:3])
        if rate:
            achieved = [float(x) for x in re.findall(rb"DISKDIRTY (\d+(?:\.\d+)?)",
                                                      desk_log.read_bytes())]
            print(f"\n{tracker} {mode} at {rate} MiB/s (achieved {achieved[-3:]}): downtime "
                  f"{result['downtime_ms']:.1f} ms, disk final delta "
                  f"{result['disk_final_delta_bytes'] / MiB:.2f} MiB")
    finally:
        await stop_nodes(source, sink)


def _with_append(cfg, append: str):
    import dataclasses
    q = dataclasses.replace(cfg.domain.qemu, append=append)
    return dataclasses.replace(cfg, domain=dataclasses.replace(cfg.domain, qemu=q))
