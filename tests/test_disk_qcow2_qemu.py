"""A qcow2 disk on shared storage moves with the VM as qcow2, never handed to QEMU as raw.

Real QEMU guests (TCG here): the desktop VM runs with a qcow2 disk (``qemu-img create``), the
laptop's config names the same path (format probed, or given), the switch runs, and the
shadow QEMU is asked (``query-block``) how it opened the disk.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.daemon import SinkNode, SourceNode
from replicator.demo import counters
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


@pytest.mark.parametrize("tracker", ["qemu-precopy", "scan"])
async def test_qcow2_disk_switches_as_qcow2(shm_dir, guest, tracker):
    disk = make_qcow2(shm_dir)
    # The laptop gives the short form (format probed from the file), the desktop an explicit
    # format; the sink also checks both against what the desktop's QEMU reports.
    sink = SinkNode(sink_config(shm_dir, guest, [str(disk)]))
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
        result = await source.switch("stop")
        assert result["result"] == "ok" and result["shadow_verified"]
        before = counters(shm_dir / "desk.log")[-1]
        shadow = sink.switch_handler.shadow
        shadow_log = shm_dir / "lap" / "vm" / "shadow-serial.log"
        await wait_until(lambda: len(counters(shadow_log)) >= 3, 30, "the shadow's counter")
        assert_continues(before, counters(shadow_log))
        assert await shadow.proc.status() == "running"
        lap = await query_disks(shadow.proc)
        assert [(d.path, d.format, d.node) for d in lap] == [(str(disk), "qcow2", "disk0")]
        blocks = await shadow.proc.execute("query-block")
        assert [b["inserted"]["drv"] for b in blocks if b.get("inserted")] == ["qcow2"]
    finally:
        await stop_nodes(source, sink)
    check = qemu_img("check", "-f", "qcow2", str(disk))
    assert check.returncode == 0, check.stdout + check.stderr


async def test_format_disagreement_refused(shm_dir, guest):
    """The laptop's config says raw for the desktop's qcow2 disk: replication is refused with
    both formats named, and no shadow ever opens the image."""
    disk = make_qcow2(shm_dir)
    sink = SinkNode(sink_config(shm_dir, guest, [{"path": str(disk), "format": "raw"}]))
    await sink.start()
    source = SourceNode(source_config(shm_dir, guest, sink.address[1], [str(disk)], "scan"))
    try:
        await source.start()
        rep = source.rep
        await wait_until(lambda: rep.last_error or rep.connected.is_set(), 30, "the Hello")
        assert not rep.connected.is_set()
        assert f"disk {disk}: the source's QEMU has it open as qcow2" in rep.last_error
        assert "this laptop would open it as raw" in rep.last_error
        assert sink.switch_handler.shadow.proc is None
    finally:
        await stop_nodes(source, sink)


async def test_shadow_refuses_a_file_its_header_named_after_the_check(shm_dir, guest,
                                                                      monkeypatch):
    """QEMU re-reads a qcow2 header itself. If a peer rewrote the shared image between our
    header check and the launch to name an external data file (here: simulated by skipping the
    check), the shadow must see the extra file QEMU opened and refuse, with no QEMU left."""
    from replicator.sink.qemu_shadow import QemuShadow
    from replicator.sink.receiver import SinkReceiver
    from replicator.sink.store import ShadowStore
    from replicator.wire.messages import RegionInfo
    from replicator.errors import DomainError
    from replicator.vmm.qemu import RAM_BACKEND_ID

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
