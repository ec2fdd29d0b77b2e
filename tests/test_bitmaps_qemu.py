"""Dirty-bitmap rounds on a real QEMU (TCG, ``-S``, no guest): a qcow2 and a raw disk.

"Guest" writes go through the virtio device with HMP ``qemu-io -d <qdev path>`` so that the
bitmaps see them; the frozen round is read back with our NBD client. qemu-img comes from
qemu-utils; a missing tool fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.errors import QemuError
from replicator.vmm.bitmaps import DirtyTracking, start_nbd_server
from replicator.vmm.disks import DiskSpec
from replicator.vmm.nbd import STATE_DIRTY, Extent, NbdClient
from replicator.vmm import VmSpec
from replicator.vmm.qemu import QemuProcess

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
GRAN = 64 * KiB
QCOW2, RAW = "disk0", "disk1"          # format node names replicator's launcher gives


def make_disks(d: Path) -> tuple[DiskSpec, DiskSpec]:
    exe = shutil.which("qemu-img")
    assert exe, "qemu-img is not installed (deploy/install-deps.sh installs qemu-utils)"
    subprocess.run([exe, "create", "-f", "qcow2", str(d / "q.qcow2"), "16M"], check=True,
                   capture_output=True)
    subprocess.run([exe, "create", "-f", "raw", str(d / "r.raw"), "16M"], check=True,
                   capture_output=True)
    return DiskSpec(d / "q.qcow2", "qcow2"), DiskSpec(d / "r.raw", "raw")


async def launch(d: Path) -> QemuProcess:
    if not (d / "q.qcow2").exists():
        make_disks(d)
    spec = VmSpec(name="bm", ram_bytes=32 * MiB, ram_path=d / "ram",
                  disks=(DiskSpec(d / "q.qcow2", "qcow2"), DiskSpec(d / "r.raw", "raw")))
    return await QemuProcess.launch(spec, d, paused=True)


async def guest_write(proc: QemuProcess, node: str, offset: int, length: int, byte: int) -> None:
    out = await proc.execute("human-monitor-command", {"command-line":
        f'qemu-io -d /machine/peripheral/{node}-dev/virtio-backend '
        f'"write -P {byte:#x} {offset} {length}"'})
    # qemu-io's report goes to QEMU's stdout; HMP answers only with an error, if any.
    assert out.strip() == "" or f"wrote {length}/{length} bytes" in out, out


def chunks(offset: int, length: int) -> set[int]:
    """The granularity chunks a write marks dirty."""
    return set(range(offset // GRAN * GRAN, offset + length, GRAN))


def dirty_chunks(extents: list[Extent]) -> set[int]:
    out = set()
    for e in extents:
        if e.flags & STATE_DIRTY:
            assert e.offset % GRAN == 0 and e.length % GRAN == 0, e
            out |= set(range(e.offset, e.offset + e.length, GRAN))
    return out


async def test_round_exports_exactly_the_written_ranges(shm_dir):
    proc = await launch(shm_dir)
    async with proc:
        track = DirtyTracking(proc, "replicator-t")
        await track.start()
        bms = await track.bitmaps()
        assert [(b.name, b.recording, b.persistent) for b in bms[QCOW2]] == [
            ("replicator-t-1", True, True)]
        assert [(b.name, b.recording, b.persistent) for b in bms[RAW]] == [
            ("replicator-t-1", True, False)]          # raw: non-persistent
        writes = {QCOW2: [(MiB + 4 * KiB, 4 * KiB, 0x11), (3 * MiB, GRAN, 0x22),
                          (5 * MiB + 32 * KiB, 128 * KiB, 0x33)],
                  RAW: [(2 * MiB, 4 * KiB, 0x44), (9 * MiB - 512, 1024, 0x55)]}
        model = {node: bytearray(16 * MiB) for node in writes}
        for node, ws in writes.items():
            for off, n, byte in ws:
                await guest_write(proc, node, off, n, byte)
                model[node][off:off + n] = bytes([byte]) * n
        gen = await track.rotate()
        assert gen == 1
        await guest_write(proc, QCOW2, 7 * MiB, 4 * KiB, 0x66)     # lands in round 2

        sock = shm_dir / "nbd.sock"
        await start_nbd_server(proc, sock)
        with pytest.raises(QemuError, match="already runs an NBD server"):
            await start_nbd_server(proc, shm_dir / "second.sock")
        for node, ws in writes.items():
            exp = await track.export(node, gen)
            async with await NbdClient.connect_unix(
                    sock, exp.name, contexts=["base:allocation", exp.context], timeout=10) as c:
                dirty = (await c.extents())[exp.context]
                want = set().union(*(chunks(off, n) for off, n, _ in ws))
                assert dirty_chunks(dirty) == want
                assert sum(e.length for e in dirty) == c.size
                for chunk in sorted(want):
                    assert bytes(await c.read(chunk, GRAN)) == model[node][chunk:chunk + GRAN]
            with pytest.raises(QemuError, match="in use"):
                await track.confirm(gen)           # busy while exported
        assert len(await proc.execute("query-block-exports")) == 2
        await track.unexport_all()
        assert await proc.execute("query-block-exports") == []
        await track.confirm(gen)
        bms = await track.bitmaps()
        assert [(b.generation, b.recording) for b in bms[QCOW2]] == [(2, True)]
        assert (await track.dirty_bytes()) == {QCOW2: GRAN, RAW: 0}

        # A round cut short left its export behind: the next rotation removes it (before, the
        # busy bitmap refused every later round) and folds the unread round in.
        left = await track.rotate()
        await track.export(QCOW2, left)
        assert await track.rotate() == left + 1
        assert await proc.execute("query-block-exports") == []
        bms = await track.bitmaps()
        assert [(b.generation, b.recording) for b in bms[QCOW2]] == [(left + 1, False),
                                                                     (left + 2, True)]
        assert (await track.dirty_bytes())[QCOW2] == GRAN


async def test_clean_quit_keeps_qcow2_rounds_raw_needs_compare(shm_dir):
    proc = await launch(shm_dir)
    async with proc:
        track = DirtyTracking(proc, "rp")
        await track.start()
        await guest_write(proc, QCOW2, 0, 4 * KiB, 1)
        await guest_write(proc, RAW, 0, 4 * KiB, 1)
        assert await track.rotate() == 1
        await guest_write(proc, QCOW2, 2 * MiB, 4 * KiB, 2)
        # Round 1 was never confirmed: the next rotation folds it into the frozen round 2.
        assert await track.rotate() == 2
        bms = await track.bitmaps()
        assert [(b.generation, b.recording, b.count) for b in bms[QCOW2]] == [
            (2, False, 2 * GRAN), (3, True, 0)]
        await guest_write(proc, QCOW2, 4 * MiB, 4 * KiB, 3)
        await proc.quit()
    proc = await launch(shm_dir)
    async with proc:
        track = DirtyTracking(proc, "rp")
        assert (await track.bitmaps())[RAW] == []                  # non-persistent: gone
        found = {r.node: r for r in await track.recover()}
        assert not found[QCOW2].full_compare and found[QCOW2].generation == 4
        assert "rp-2" in found[QCOW2].reason and "rp-3" in found[QCOW2].reason
        assert found[RAW].full_compare and "no dirty bitmap" in found[RAW].reason
        bms = await track.bitmaps()
        assert [(b.generation, b.recording, b.persistent, b.count) for b in bms[QCOW2]] == [
            (4, True, True, 3 * GRAN)]                  # every unacknowledged write kept
        assert [(b.generation, b.recording, b.persistent) for b in bms[RAW]] == [
            (4, True, False)]


async def test_kill_9_makes_qcow2_bitmap_inconsistent(shm_dir):
    proc = await launch(shm_dir)
    async with proc:
        track = DirtyTracking(proc, "rp")
        await track.start()
        await proc.quit()
    # QEMU stores a new persistent bitmap only on a clean exit; one loaded from the image is
    # marked in-use there, which a kill -9 leaves behind.
    proc = await launch(shm_dir)
    async with proc:
        await guest_write(proc, QCOW2, 0, 4 * KiB, 1)
        await proc.kill()
    proc = await launch(shm_dir)
    async with proc:
        track = DirtyTracking(proc, "rp")
        bms = await track.bitmaps()
        assert [(b.name, b.inconsistent) for b in bms[QCOW2]] == [("rp-1", True)]
        with pytest.raises(QemuError, match="recover"):
            await track.rotate()
        found = {r.node: r for r in await track.recover()}
        assert found[QCOW2].full_compare and "inconsistent" in found[QCOW2].reason
        assert found[RAW].full_compare
        bms = await track.bitmaps()
        assert [(b.name, b.recording, b.inconsistent, b.persistent) for b in bms[QCOW2]] == [
            ("rp-2", True, False, True)]
        await guest_write(proc, QCOW2, 0, 4 * KiB, 2)
        assert await track.rotate() == 2
        assert (await track.dirty_bytes())[QCOW2] == GRAN


async def test_kill_9_in_the_first_session_loses_the_bitmap(shm_dir):
    proc = await launch(shm_dir)
    async with proc:
        await DirtyTracking(proc, "rp").start()
        await proc.kill()
    proc = await launch(shm_dir)
    async with proc:
        found = {r.node: r for r in await DirtyTracking(proc, "rp").recover()}
        assert found[QCOW2].full_compare and "no dirty bitmap" in found[QCOW2].reason
