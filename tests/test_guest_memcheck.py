"""The test guest's own memory check (kernel arg ``memcheck=<s>``, deploy/guest/guestload.c).

A real guest (QEMU, TCG) with the check on reports OK passes; then, with the VM paused, pages of
its RAM file are damaged the ways a buggy replicator would (a stale copy of a page, a zero page,
a torn page, another page's bytes) and the guest's next pass must name each of them.

Pages are found from the host by their header (magic, index, generation): the guest's physical
layout is unknown, and the kernel may leave stale copies of a page behind (e.g. after merging
huge pages), so a page counts as live only where the guest was seen rewriting it in place.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import pytest

from replicator.guestlog import memchecks
from replicator.vmm import QemuProcess, VmSpec

from .conftest import ROOT, wait_until

MiB = 1024 * 1024
PAGE = 4096
RAM = 256 * MiB
APPEND = "console=ttyS0 quiet fill=25 dirty=1 memcheck=2"
MAGIC = b"GLPAGE01"
HEADER = struct.Struct("<8sII")  # magic, page index, generation
PAGE_FAIL_RE = re.compile(
    rb"MEMCHECK FAIL page=(\d+) gen=(\d+) hdr_page=(\d+) hdr_gen=(\d+) why=(\w+)\n")
PASS_FAIL_RE = re.compile(rb"MEMCHECK FAIL pass=(\d+) bad=(\d+)\n")


def headers(mm: mmap.mmap) -> dict[int, tuple[int, int]]:
    """Offset -> (page index, generation) of every page in the RAM file that has the header."""
    found = {}
    off = mm.find(MAGIC)
    while off != -1:
        if off % PAGE:
            off = mm.find(MAGIC, off + 1)
            continue
        _, index, gen = HEADER.unpack_from(mm, off)
        found[off] = (index, gen)
        off = mm.find(MAGIC, off + PAGE)
    return found


def fresh_guest(initrd: Path) -> None:
    src = ROOT / "deploy" / "guest" / "guestload.c"
    assert initrd.stat().st_mtime >= src.stat().st_mtime, \
        f"{initrd} is older than {src}: run `make guest`"


@pytest.mark.qemu
async def test_guest_memcheck_passes_then_names_stale_zero_torn_and_moved_pages(
        guest, shm_dir, tmp_path):
    kernel, initrd = guest
    fresh_guest(initrd)
    log = tmp_path / "serial.log"
    spec = VmSpec(name="memcheck", ram_bytes=RAM, ram_path=shm_dir / "ram", kernel=kernel,
                  initrd=initrd, append=APPEND, serial_log=log)
    async with await QemuProcess.launch(spec, tmp_path) as vm:
        await wait_until(lambda: len(memchecks(log)) >= 2, 120, "two memcheck passes",
                         interval=0.5)
        text = log.read_bytes()
        assert all(ok for ok, _ in memchecks(log)), text.decode(errors="replace")
        filled = int(re.search(rb"FILLED (\d+)\n", text)[1])
        npages = int(re.search(rb"MEMCHECK OK pass=1 pages=(\d+)\n", text)[1])
        assert npages * PAGE >> 20 == filled

        with open(spec.ram_path, "r+b") as f, mmap.mmap(f.fileno(), RAM) as mm:
            await vm.stop()
            before = headers(mm)
            assert {i for i, _ in before.values()} >= set(range(npages))
            old = {off: mm[off:off + PAGE] for off in before}
            await vm.cont()

            def rewritten() -> list[tuple[int, int]]:
                """(offset, index) of pages the dirtier rewrote in place since ``before``."""
                return [(off, i) for off, (i, g) in headers(mm).items()
                        if off in before and before[off][0] == i and g > before[off][1]]

            await wait_until(lambda: len(rewritten()) >= 5, 60, "the dirtier to rewrite pages",
                             interval=0.5)
            await vm.stop()
            (stale, i_stale), (zero, i_zero), (torn, i_torn), (moved, i_moved), (donor, _) = \
                sorted(rewritten())[:5]
            gen_stale = HEADER.unpack_from(mm, stale)[2]
            mm[stale:stale + PAGE] = old[stale]                       # an older generation
            mm[zero:zero + PAGE] = bytes(PAGE)                        # never arrived
            mm[torn + PAGE // 2:torn + PAGE] = old[torn][PAGE // 2:]  # half old, half new
            mm[moved:moved + PAGE] = mm[donor:donor + PAGE]           # another page's bytes
            mark = len(log.read_bytes())
            passes_before = len(memchecks(log))
            await vm.cont()

            def after() -> bytes:
                return log.read_bytes()[mark:]

            # A pass under way at `cont` may have passed some of the pages; the next sees all.
            await wait_until(lambda: any(m[2] == b"4" for m in PASS_FAIL_RE.finditer(after())),
                             60, "a memcheck pass naming the 4 damaged pages", interval=0.5)

        results = memchecks(log)
        assert all(ok for ok, _ in results[:passes_before])
        assert results[passes_before:] and not any(ok for ok, _ in results[passes_before:])
        assert all(int(m[2]) <= 4 for m in PASS_FAIL_RE.finditer(after()))
        bad = {int(m[1]): (int(m[2]), int(m[3]), int(m[4]), m[5].decode())
               for m in PAGE_FAIL_RE.finditer(after())}
        assert set(bad) == {i_stale, i_zero, i_torn, i_moved}, after().decode(errors="replace")
        assert bad[i_stale] == (gen_stale, i_stale, before[stale][1], "generation")
        assert bad[i_zero][1:] == (0, 0, "magic")
        assert bad[i_torn][1:] == (i_torn, bad[i_torn][0], "content")
        assert bad[i_moved][1] != i_moved and bad[i_moved][3] == "index"
