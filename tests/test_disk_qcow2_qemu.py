"""Disk formats: the laptop's copy is opened as what it is, never handed to QEMU as raw.

Real QEMU guests (TCG here): the desktop VM runs with a qcow2 disk (``qemu-img create``), the
laptop's config names its own copy (format probed, or given: the copy's format is the laptop's
choice), the switch runs, and the shadow QEMU is asked (``query-block``) how it opened it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.node import SinkNode, SourceNode
from replicator.guestlog import counters
from replicator.vmm.disks import query_disks

from .conftest import pair_ids, wait_until
from .test_precopy_qemu import bulk_done
from .test_switch_qemu import assert_continues, boot_and_sync, qemu_table, stop_nodes

pytestmark = pytest.mark.qemu


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("qemu-img")
    assert exe, "qemu-img is not installed (deploy/install-deps.sh installs qemu-utils)"
    return subprocess.run([exe, *args], capture_output=True, text=True)


def make_qcow2(d: Path) -> Path:
    disk = d / "work.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "64M").check_returncode()
    return disk


def sink_config(d: Path, guest, disks: list):
    source_id, _ = pair_ids(d / "desk", d / "lap")
    return load_config({"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
                        "domain": {"name": "vm", "driver": "qemu",
                                   "qemu": qemu_table(guest, disks=disks)},
                        "peer": {"listen": "127.0.0.1:0", "id": source_id, "timeout": 5.0}})


def source_config(d: Path, guest, port: int, disks: list, tracker: str):
    _, sink_id = pair_ids(d / "desk", d / "lap")
    return load_config({
        "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
        "domain": {"name": "vm", "driver": "qemu", "tracker": tracker, "qemu": qemu_table(
            guest, launch=True, ram_path=str(d / "desk-ram"), serial_log=str(d / "desk.log"),
            disks=disks)},
        "peer": {"address": f"127.0.0.1:{port}", "id": sink_id, "timeout": 5.0},
        "stream": {"reconnect_delay": 0.2}})


@pytest.mark.parametrize("tracker, copy_format", [("qemu-precopy", None), ("scan", "raw")])
async def test_qcow2_disk_switches_onto_the_laptops_copy(shm_dir, guest, tracker, copy_format):
    disk = make_qcow2(shm_dir)
    # The laptop gives the short form (a new copy takes the desktop disk's format) or its own
    # format (a raw copy of a qcow2 disk: blocks are copied as the guest sees them).
    copy = shm_dir / f"copy.{copy_format or 'qcow2'}"
    laptop_disk = str(copy) if copy_format is None else {"path": str(copy),
                                                          "format": copy_format}
    sink = SinkNode(sink_config(shm_dir, guest, [laptop_disk]))
    await sink.start()
    source = SourceNode(source_config(shm_dir, guest, sink.address[1],
                                      [{"path": str(disk), "format": "qcow2"}], tracker))
    try:
        await source.start()
        desk = await query_disks(source.driver.proc)
        assert [(d.path, d.format) for d in desk] == [(str(disk), "qcow2")]
        if tracker == "scan":
            await boot_and_sync(source, shm_dir)
        else:
            await wait_until(lambda: len(counters(shm_dir / "desk.log")) >= 2, 90, "the counter")
            await asyncio.wait_for(source.rep.connected.wait(), 30)
            await bulk_done(source)
        await wait_until(lambda: source.rep.disks.ready() == "", 60, "the disk's first copy")
        result = await source.switch("stop")
        assert result["result"] == "ok" and result["shadow_verified"]
        assert result["disks_verified"]
        before = counters(shm_dir / "desk.log")[-1]
        shadow = sink.switch_handler.shadow
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
        assert await shadow.proc.status() == "running"
        fmt = copy_format or "qcow2"
        lap = await query_disks(shadow.proc)
        assert [(d.path, d.format, d.node) for d in lap] == [(str(copy), fmt, "disk0")]
        blocks = await shadow.proc.execute("query-block")
        assert [b["inserted"]["drv"] for b in blocks if b.get("inserted")] == [fmt]
    finally:
        await stop_nodes(source, sink)
    for image, fmt in ((disk, "qcow2"), (copy, copy_format or "qcow2")):
        if fmt == "qcow2":
            check = qemu_img("check", "-f", "qcow2", str(image))
            assert check.returncode == 0, check.stdout + check.stderr


async def test_the_desktops_own_disk_is_refused_as_the_copy(shm_dir, guest):
    """A laptop config from the days of shared storage names the desktop's disk itself: it
    is refused with a clear message, and nothing writes into the running VM's disk."""
    disk = make_qcow2(shm_dir)
    sink = SinkNode(sink_config(shm_dir, guest, [str(disk)]))
    await sink.start()
    source = SourceNode(source_config(shm_dir, guest, sink.address[1], [str(disk)], "scan"))
    try:
        await source.start()
        rep = source.rep
        await wait_until(lambda: "own disk" in rep.last_error, 30, "the refusal")
        assert f"this laptop's copy {disk} is the desktop VM's own disk" in rep.last_error
        assert not rep.connected.is_set()
        assert sink.switch_handler.shadow.proc is None
        assert sink.status()["disks"] == []
    finally:
        await stop_nodes(source, sink)
    check = qemu_img("check", "-f", "qcow2", str(disk))
    assert check.returncode == 0, check.stdout + check.stderr


async def test_shadow_refuses_a_file_its_header_named_after_the_check(shm_dir, guest,
                                                                      monkeypatch):
    """QEMU re-reads a qcow2 header itself. If a peer rewrote the shared image between our
    header check and the launch to name an external data file (here: simulated by skipping the
    check), the shadow must see the extra file QEMU opened and refuse, with no QEMU left."""
    from replicator.sink.qemu_shadow import QemuShadow
    from replicator.sink.receiver import SinkReceiver
    from replicator.sink.store import ShadowStore
    from replicator.wire.messages import DiskInfo, RegionInfo
    from replicator.errors import DomainError
    from replicator.vmm.spec import RAM_BACKEND_ID

    from replicator.vmm.qemu import QemuProcess

    secret = shm_dir / "secret.raw"
    secret.write_bytes(b"\0" * (1 << 20))
    disk = shm_dir / "work.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "1M").check_returncode()
    hostile = shm_dir / "hostile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on",
             str(hostile), "1M").check_returncode()
    cfg = sink_config(shm_dir, guest, [{"path": str(disk), "format": "qcow2"}])
    rec = SinkReceiver(cfg)
    ram = cfg.domain.qemu.ram_size
    rec.store = ShadowStore.open(rec.root, [RegionInfo(RAM_BACKEND_ID, ram, 4096)])
    # The receiver holds the copy (as after the source's DiskOpen) and has released it (as
    # at a switch): the shadow opens it.
    await rec.disks.open((DiskInfo(0, 1 << 20, "qcow2", 65536),))
    await rec.disks.verify_and_release(rec.disks.digests())
    shadow = QemuShadow(cfg, rec)
    real_launch = QemuProcess.launch

    async def racing_launch(*args, **kw):
        hostile.replace(disk)          # the header changes after every check of ours
        return await real_launch(*args, **kw)
    monkeypatch.setattr(QemuProcess, "launch", racing_launch)
    try:
        with pytest.raises(DomainError, match="secret.raw"):
            await shadow.prepare(b"")
        assert shadow.proc is None
        assert not list(rec.root.glob("*.launch.json")), "a refused shadow QEMU was left"
    finally:
        if shadow.proc is not None:
            await shadow.proc.kill()
        rec.store.close()
