"""The test guest's own disk check (kernel args ``diskcheck=<s>``, ``diskdirty=<MiB/s>``;
deploy/guest/guestload.c) on a real guest (QEMU, TCG) whose disks are attached the way
replicator attaches them (``VmSpec.disks``: ``-blockdev`` + virtio-blk-pci, /dev/vda inside).

Rounds pass on a raw and on a qcow2 image; blocks damaged in the raw image while the VM is
paused (a stale round, a zero block, a torn block) are named by the guest's next checks, even in
regions written rounds ago; diskdirty writes at about the rate asked, outside the check area;
and a guest without a disk says so.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from replicator.guestlog import counters, diskchecks
from replicator.vmm import QemuProcess, VmSpec
from replicator.vmm.disks import DiskSpec

from .conftest import ROOT, wait_until

MiB = 1024 * 1024
BLOCK = 4096
REGION = MiB
DISK = 64 * MiB
CHECK_AREA = DISK // 2          # the guest checks the first half of a disk under 128 MiB
RAM = 128 * MiB
MAGIC = b"GLDISK01"
HEADER = struct.Struct("<8sIII")  # magic, region, block, round
OK_RE = re.compile(rb"DISKCHECK OK round=(\d+) regions=(\d+)\n")
BLOCK_FAIL_RE = re.compile(rb"DISKCHECK FAIL round=\d+ region=(\d+) block=(\d+) "
                           rb"want_round=(\d+) got_round=(\d+) why=(\w+)\n")
ROUND_FAIL_RE = re.compile(rb"DISKCHECK FAIL round=(\d+) bad=(\d+)\n")
DIRTY_RE = re.compile(rb"DISKDIRTY (\d+\.\d)\n")


def fresh_guest(initrd: Path) -> None:
    for src in (ROOT / "deploy" / "guest" / "guestload.c", ROOT / "deploy" / "build-guest.sh"):
        assert initrd.stat().st_mtime >= src.stat().st_mtime, \
            f"{initrd} is older than {src}: run `make guest`"


def make_disk(d: Path, fmt: str) -> DiskSpec:
    exe = shutil.which("qemu-img")
    assert exe, "qemu-img is not installed (deploy/install-deps.sh installs qemu-utils)"
    path = d / f"disk.{fmt}"
    subprocess.run([exe, "create", "-f", fmt, str(path), str(DISK)], check=True,
                   capture_output=True)
    return DiskSpec(path, fmt)


def guest_spec(guest, shm_dir: Path, tmp_path: Path, args: str,
               disks: tuple[DiskSpec, ...] = ()) -> VmSpec:
    kernel, initrd = guest
    fresh_guest(initrd)
    return VmSpec(name="diskcheck", ram_bytes=RAM, ram_path=shm_dir / "ram", kernel=kernel,
                  initrd=initrd, append=f"console=ttyS0 quiet {args}", disks=disks,
                  serial_log=tmp_path / "serial.log")


def written_regions(fd: int) -> dict[int, int]:
    """Region -> round, for the check-area regions whose every block says that one round wrote
    it there (a region the guest was writing when the VM stopped is left out)."""
    found = {}
    for r in range(CHECK_AREA // REGION):
        data = os.pread(fd, REGION, r * REGION)
        heads = [HEADER.unpack_from(data, b * BLOCK) for b in range(REGION // BLOCK)]
        rounds = {k for _, _, _, k in heads}
        if all(m == MAGIC and reg == r and b == i for i, (m, reg, b, _) in enumerate(heads)) \
                and len(rounds) == 1:
            found[r] = rounds.pop()
    return found


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_guest_diskcheck_rounds_pass_on_a_raw_and_a_qcow2_disk(guest, shm_dir, tmp_path,
                                                                     fmt):
    spec = guest_spec(guest, shm_dir, tmp_path, "diskcheck=1", (make_disk(tmp_path, fmt),))
    log = spec.serial_log
    async with await QemuProcess.launch(spec, tmp_path):
        await wait_until(lambda: len(diskchecks(log)) >= 10, 120, "ten diskcheck rounds",
                         interval=0.5)
    text = log.read_bytes()
    results = diskchecks(log)
    assert all(ok for ok, _ in results), text.decode(errors="replace")
    assert [k for _, k in results] == list(range(1, len(results) + 1))
    checked = {int(m[1]): int(m[2]) for m in OK_RE.finditer(text)}
    # Round 1 has nothing to check yet, later rounds the previous round's region, and round 8
    # every region written so far.
    assert (checked[1], checked[2], checked[7], checked[8], checked[9]) == (0, 1, 1, 8, 1)
    assert b"DISKCHECK FAIL" not in text
    ticks = counters(log)
    assert ticks == list(range(len(ticks)))


@pytest.mark.qemu
async def test_guest_diskcheck_names_blocks_damaged_in_the_image(guest, shm_dir, tmp_path):
    disk = make_disk(tmp_path, "raw")
    spec = guest_spec(guest, shm_dir, tmp_path, "diskcheck=1", (disk,))
    log = spec.serial_log
    async with await QemuProcess.launch(spec, tmp_path) as vm:
        await wait_until(lambda: len(diskchecks(log)) >= 4, 120, "four diskcheck rounds",
                         interval=0.5)
        fd = os.open(disk.path, os.O_RDWR)
        try:
            await vm.stop()
            regions = written_regions(fd)
            assert len(regions) >= 3, regions
            # Round k writes region k-1 (the check walks the disk region by region).
            assert all(r == (k - 1) % (CHECK_AREA // REGION) for r, k in regions.items())
            by_round = sorted(regions, key=regions.get)
            latest, old1, old2 = by_round[-1], by_round[0], by_round[1]

            def block(r: int, b: int) -> int:
                return r * REGION + b * BLOCK

            # Torn: the latest region's block 100 gets other bytes after its header. The next
            # round checks that region.
            torn = os.pread(fd, 16, block(latest, 100) + 2048)
            os.pwrite(fd, bytes(x ^ 0xFF for x in torn), block(latest, 100) + 2048)
            # Never arrived: an old region's block 7 is zeros. Only a check of all regions
            # (every 8th round) looks there again.
            os.pwrite(fd, bytes(BLOCK), block(old1, 7))
            # Stale: another old region's block 9 says an older round wrote it.
            os.pwrite(fd, struct.pack("<I", regions[old2] - 1), block(old2, 9) + 16)
            mark = len(log.read_bytes())
            rounds_before = len(diskchecks(log))
            await vm.cont()
        finally:
            os.close(fd)

        def after() -> bytes:
            return log.read_bytes()[mark:]

        await wait_until(lambda: any(m[2] == b"3" for m in ROUND_FAIL_RE.finditer(after())),
                         120, "a diskcheck round naming the 3 damaged blocks", interval=0.5)

    results = diskchecks(log)
    assert all(ok for ok, _ in results[:rounds_before])
    assert not all(ok for ok, _ in results[rounds_before:])
    assert all(int(m[2]) <= 3 for m in ROUND_FAIL_RE.finditer(after()))
    named = {(int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5].decode())
             for m in BLOCK_FAIL_RE.finditer(after())}
    assert named == {
        (latest, 100, regions[latest], regions[latest], "content"),
        (old1, 7, regions[old1], 0, "magic"),
        (old2, 9, regions[old2], regions[old2] - 1, "round"),
    }, after().decode(errors="replace")


@pytest.mark.qemu
async def test_guest_diskdirty_writes_at_the_rate_asked_outside_the_check_area(
        guest, shm_dir, tmp_path):
    disk = make_disk(tmp_path, "raw")
    spec = guest_spec(guest, shm_dir, tmp_path, "diskcheck=1 diskdirty=5", (disk,))
    log = spec.serial_log
    async with await QemuProcess.launch(spec, tmp_path) as vm:
        await wait_until(lambda: len(DIRTY_RE.findall(log.read_bytes())) >= 3
                         and len(diskchecks(log)) >= 9, 120,
                         "three DISKDIRTY reports and nine diskcheck rounds", interval=0.5)
        await vm.stop()
        image = disk.path.read_bytes()
    text = log.read_bytes()
    rates = [float(x) for x in DIRTY_RE.findall(text)]
    assert all(2.5 <= r <= 7.5 for r in rates), rates      # loose: TCG on a shared host
    # The dirtier never touches the check area (all its rounds pass, the every-8th-round check
    # of all regions included); what it wrote is in the rest of the disk.
    assert all(ok for ok, _ in diskchecks(log)), text.decode(errors="replace")
    blocks = [image[o:o + BLOCK] for o in range(0, DISK, BLOCK)]
    split = CHECK_AREA // BLOCK
    assert all(b.startswith(MAGIC) or not any(b) for b in blocks[:split])
    assert sum(1 for b in blocks[split:] if any(b) and not b.startswith(MAGIC)) > 0


@pytest.mark.qemu
async def test_guest_diskcheck_without_a_disk_says_so(guest, shm_dir, tmp_path):
    spec = guest_spec(guest, shm_dir, tmp_path, "diskcheck=1")
    log = spec.serial_log
    async with await QemuProcess.launch(spec, tmp_path):
        await wait_until(lambda: diskchecks(log), 120, "a diskcheck result", interval=0.5)
        seen_at = counters(log)[-1]
        # Some more counting, to see that nothing else follows.
        await wait_until(lambda: counters(log)[-1] >= seen_at + 6, 60, "more COUNTER lines",
                         interval=0.5)
    assert diskchecks(log) == [(False, 0)]
    assert log.read_bytes().count(b"DISKCHECK FAIL no disk\n") == 1
