"""Tests of replicator.vmm.migration_stream/_editor: the sans-I/O precopy stream parser and editor.

Three kinds of input:

* synthetic streams built here (:class:`StreamBuilder`, byte layout as in
  ``/work/shared/reference/qemu-migration-stream.md``), for exact events, every refusal and the
  rarely seen layouts (x-ignore-shared addresses, postcopy page sizes, footer-less sections);
* two small real QEMU 10.0.2 captures in ``tests/data`` (with QEMU's own ``query-migrate``
  figures), so that the byte-exact checks run without QEMU;
* fresh captures from a real QEMU (``qemu`` mark): a 256 MiB guest migrated to a file while
  stopped and while running, counted against ``query-migrate``, edited (pages the destination
  already holds dropped) and loaded into a destination QEMU whose RAM must end byte-identical.

The ``qemu`` tests need ``qemu-system-x86_64`` and FAIL (never skip) without it; they run at
most two QEMUs at a time and kill every QEMU they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import ProtocolError
from replicator.vmm.migration_editor import PrecopyEditor
from replicator.vmm.migration_format import (
    Command,
    DeviceStateBegin,
    Header,
    Opaque,
    PageKind,
    PageRecord,
    PrecopyStreamError,
    RamBlock,
    RamBlocks,
    RamEos,
    SectionBegin,
    SectionEnd,
    SectionKind,
)
from replicator.vmm.migration_stream import PrecopyParser
from replicator.vmm.qemu import QemuProcess
from replicator.vmm.spec import VmSpec

from .conftest import ROOT

HERE = Path(__file__).parent
DATA = HERE / "data"
GUEST = ROOT / "build" / "guest"
PAGE = 4096
MiB = 1024 * 1024

# --- a synthetic stream builder ----------------------------------------------------------------

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_XBZRLE, F_HOOK, F_COMPRESS, F_MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200


def be16(x: int) -> bytes:
    return struct.pack(">H", x)


def be32(x: int) -> bytes:
    return struct.pack(">I", x)


def be64(x: int) -> bytes:
    return struct.pack(">Q", x)


def name8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return bytes([len(b)]) + b


def page_bytes(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


class StreamBuilder:
    """Builds a precopy stream the way QEMU 10 writes one, remembering what it wrote."""

    def __init__(self, *, caps: tuple[str, ...] = (), uuid_: bytes | None = None,
                 page_bits: int | None = None, machine: str = "pc-q35-10.0",
                 footers: bool = True):
        self.buf = bytearray()
        self.footers = footers
        self.page_size = 1 << (page_bits or 12)
        self.ignore_shared = "x-ignore-shared" in caps
        self.last_block: str | None = None
        self.pages: list[tuple[str, int, bytes | None]] = []   # (block, index, data|None)
        self.ram_id = 1
        self.buf += be32(0x5145564D) + be32(3) + b"\x07" + be32(len(machine)) + machine.encode()
        if page_bits is not None:
            self.buf += b"\x05" + name8("configuration/target-page-bits") + be32(1)
            self.buf += be32(page_bits)
        if caps:
            self.buf += b"\x05" + name8("configuration/capabilities") + be32(1) + be32(len(caps))
            for c in caps:
                self.buf += name8(c)
        if uuid_ is not None:
            self.buf += b"\x05" + name8("configuration/uuid") + be32(1) + uuid_

    def command(self, cmd: int, data: bytes = b"") -> StreamBuilder:
        self.buf += b"\x08" + be16(cmd) + be16(len(data)) + data
        return self

    def footer(self, sid: int | None = None) -> None:
        if self.footers:
            self.buf += b"\x7e" + be32(self.ram_id if sid is None else sid)

    def ram_start(self, blocks: list[tuple], *, postcopy_sizes: bool = False) -> StreamBuilder:
        """blocks: (name, used_length[, page_size][, addr]) as the stream will carry them."""
        self.buf += b"\x01" + be32(self.ram_id) + name8("ram") + be32(0) + be32(4)
        total = sum(b[1] for b in blocks)
        self.buf += be64(total | F_MEM_SIZE)
        for b in blocks:
            self.buf += name8(b[0]) + be64(b[1])
            rest = list(b[2:])
            if postcopy_sizes and rest and rest[0] is not None:
                self.buf += be64(rest[0])
            if postcopy_sizes:
                rest = rest[1:]
            if self.ignore_shared:
                self.buf += be64(rest[0])
        self.buf += be64(F_EOS)
        self.footer()
        return self

    def part(self, end: bool = False) -> StreamBuilder:
        self.buf += (b"\x03" if end else b"\x02") + be32(self.ram_id)
        return self

    def page(self, block: str, index: int, data: bytes | None) -> StreamBuilder:
        flags = F_PAGE if data is not None else F_ZERO
        word = index * self.page_size | flags
        if block == self.last_block:
            self.buf += be64(word | F_CONTINUE)
        else:
            self.buf += be64(word) + name8(block)
        self.buf += data if data is not None else b"\x00"
        self.last_block = block
        self.pages.append((block, index, data))
        return self

    def eos(self) -> StreamBuilder:
        self.buf += be64(F_EOS)
        self.footer()
        return self

    def raw(self, data: bytes) -> StreamBuilder:
        self.buf += data
        return self

    def device_state(self, seed: int = 7) -> bytes:
        """Something like device state + EOF + VMDESCRIPTION (bytes a parser must not read)."""
        r = random.Random(seed)
        dev = bytearray()
        for i in range(5):
            body = bytes(r.choice([0x00, 0x01, 0x02, 0x08, 0x7E, 0xFF, r.randrange(256)])
                         for _ in range(r.randrange(1, 300)))
            dev += b"\x04" + be32(2 + i) + name8(f"dev{i}") + be32(0) + be32(1) + body
            dev += b"\x7e" + be32(2 + i)
        desc = json.dumps({"page_size": 4096, "devices": []}).encode()
        dev += b"\x00" + b"\x06" + be32(len(desc)) + desc
        self.buf += dev
        return bytes(dev)

    def bytes(self) -> bytes:
        return bytes(self.buf)


BLOCKS = [("ram0", 64 * PAGE, 0), ("pc.bios", 4 * PAGE, 0xFFFC0000), ("/rom@etc/acpi/rsdp", PAGE, 0)]


def standard_stream(*, caps: tuple[str, ...] = (), footers: bool = True,
                    blocks: list[tuple] = BLOCKS) -> tuple[StreamBuilder, bytes]:
    """header, OPEN_RETURN_PATH, PING, RAM setup, two PARTs, SWITCHOVER_START, END, devices."""
    b = StreamBuilder(caps=caps, footers=footers)
    b.command(1).command(2, be32(1))
    b.ram_start([bl if "x-ignore-shared" in caps else bl[:2] for bl in blocks])
    b.part()
    for i in range(6):
        b.page("ram0", i, page_bytes(i) if i % 3 else None)
    b.page("pc.bios", 0, page_bytes(100)).page("pc.bios", 1, None)
    b.page("ram0", 10, page_bytes(10)).page("ram0", 11, page_bytes(11))
    b.eos()
    b.part()   # the first record continues the block of the previous section
    b.page("ram0", 12, page_bytes(12)).page("ram0", 1, page_bytes(1001))
    b.page("/rom@etc/acpi/rsdp", 0, page_bytes(200)).page("ram0", 63, page_bytes(63))
    b.eos()
    b.command(11)
    b.part(end=True).page("ram0", 2, page_bytes(2002)).page("ram0", 3, None).eos()
    dev = b.device_state()
    return b, dev


def normalise(events) -> list:
    """Events as comparable values; Opaque runs merged (their split depends on the chunking)."""
    out: list = []
    for ev in events:
        if isinstance(ev, Opaque):
            data = bytes(ev.data)
            if out and isinstance(out[-1], list) and out[-1][1] + len(out[-1][2]) == ev.offset:
                out[-1][2] += data
            else:
                out.append(["opaque", ev.offset, bytearray(data)])
        elif isinstance(ev, PageRecord):
            out.append(("page", ev.offset, ev.block, ev.index, ev.kind,
                        None if ev.data is None else bytes(ev.data), ev.continued, ev.dropped))
        else:
            out.append(ev)
    return [tuple(x) if isinstance(x, list) else x for x in out]


def feed_chunks(target, data: bytes, sizes) -> list:
    """Feed ``data`` in chunks of the given sizes (cycled); return all events (or outputs)."""
    results = []
    pos = 0
    it = itertools.cycle(sizes) if isinstance(sizes, (list, tuple)) else iter(sizes)
    while pos < len(data):
        n = next(it)
        results.append(target.feed(data[pos:pos + n]))
        pos += n
    return results


def parse_all(data: bytes, sizes=None, **kw) -> tuple[PrecopyParser, list]:
    p = PrecopyParser(**kw)
    events = []
    for evs in feed_chunks(p, data, sizes or [len(data) or 1]):
        events += evs
    return p, events


def random_sizes(seed: int, small: bool = False):
    r = random.Random(seed)
    while True:
        k = r.random()
        if small or k < 0.3:
            yield r.randint(1, 16)
        elif k < 0.6:
            yield r.randint(1, 5000)
        else:
            yield r.randint(1, 300_000)


def apply_stream(data: bytes, ram: dict | None = None, **kw) -> dict:
    """What a destination's RAM holds after loading ``data``: {(block, index): bytes}."""
    ram = dict(ram or {})
    _, events = parse_all(data, **kw)
    for ev in events:
        if isinstance(ev, PageRecord):
            ram[(ev.block, ev.index)] = bytes(PAGE) if ev.data is None else bytes(ev.data)
    return ram


# --- synthetic: events ----------------------------------------------------------------------------

def test_error_is_a_protocol_error():
    assert issubclass(PrecopyStreamError, ProtocolError)


def test_synthetic_stream_events():
    b, dev = standard_stream()
    data = b.bytes()
    p, events = parse_all(data)
    p.finish()

    assert isinstance(events[0], Header)
    assert events[0].offset == 0 and events[0].page_size == 4096
    assert events[0].header.machine == "pc-q35-10.0" and events[0].header.capabilities == set()
    cmds = [e for e in events if isinstance(e, Command)]
    assert [(c.name, c.data) for c in cmds] == [
        ("OPEN_RETURN_PATH", b""), ("PING", be32(1)), ("SWITCHOVER_START", b"")]
    [blocks] = [e for e in events if isinstance(e, RamBlocks)]
    assert blocks.total_bytes == 69 * PAGE
    assert blocks.blocks == (RamBlock("ram0", 64 * PAGE), RamBlock("pc.bios", 4 * PAGE),
                             RamBlock("/rom@etc/acpi/rsdp", PAGE))
    assert p.blocks["pc.bios"].pages() == 4

    pages = [e for e in events if isinstance(e, PageRecord)]
    assert [(e.block, e.index, None if e.data is None else bytes(e.data)) for e in pages] == b.pages
    assert [e.kind for e in pages[:3]] == [PageKind.ZERO, PageKind.PAGE, PageKind.PAGE]
    # CONTINUE exactly where the builder (like QEMU) used it, also across a section boundary
    assert [e.continued for e in pages] == [
        False, True, True, True, True, True, False, True, False, True,   # PART 1
        True, True, False, False,                                        # PART 2
        True, True]                                                      # END
    for e in pages:
        assert data[e.offset:e.offset + 8] == be64(e.index * PAGE | (F_PAGE if e.data is not None
                                                                    else F_ZERO)
                                                   | (F_CONTINUE if e.continued else 0))

    kinds = [(type(e).__name__, getattr(e, "kind", None)) for e in events
             if isinstance(e, (SectionBegin, RamEos, SectionEnd))]
    S, P, E = SectionKind.START, SectionKind.PART, SectionKind.END
    assert kinds == [("SectionBegin", S), ("RamEos", S), ("SectionEnd", S),
                     ("SectionBegin", P), ("RamEos", P), ("SectionEnd", P),
                     ("SectionBegin", P), ("RamEos", P), ("SectionEnd", P),
                     ("SectionBegin", E), ("RamEos", E), ("SectionEnd", E)]
    eos = [e for e in events if isinstance(e, RamEos)]
    assert [e.iteration for e in eos] == [0, 1, 2, 2]
    assert [(e.normal_pages, e.zero_pages) for e in eos] == [(0, 0), (7, 3), (11, 3), (12, 4)]
    assert all(e.footer for e in events if isinstance(e, SectionEnd))
    start = next(e for e in events if isinstance(e, SectionBegin))
    assert (start.idstr, start.instance_id, start.version_id, start.section_id) == ("ram", 0, 4, 1)

    [dsb] = [e for e in events if isinstance(e, DeviceStateBegin)]
    assert dsb.offset == len(data) - len(dev)
    opaque = b"".join(bytes(e.data) for e in events if isinstance(e, Opaque))
    assert opaque == dev
    st_ = p.stats()
    assert (st_.normal_pages, st_.zero_pages, st_.iterations, st_.commands) == (12, 4, 2, 3)
    assert st_.bytes_consumed == p.position == len(data) and st_.device_state


def test_x_ignore_shared_uuid_and_no_footers():
    u = uuid.uuid4().bytes
    b = StreamBuilder(caps=("x-ignore-shared",), uuid_=u, footers=False)
    b.ram_start(BLOCKS)
    b.part().page("pc.bios", 3, page_bytes(3)).eos()
    b.part(end=True).page("pc.bios", 2, None).eos()
    b.device_state()
    p, events = parse_all(b.bytes())
    p.finish()
    assert events[0].header.capabilities == {"x-ignore-shared"} and events[0].header.uuid == u
    [blocks] = [e for e in events if isinstance(e, RamBlocks)]
    assert [(x.idstr, x.addr) for x in blocks.blocks] == [
        ("ram0", 0), ("pc.bios", 0xFFFC0000), ("/rom@etc/acpi/rsdp", 0)]
    assert [e.footer for e in events if isinstance(e, SectionEnd)] == [False, False, False]
    assert p.normal_pages == 1 and p.zero_pages == 1


def test_target_page_bits():
    b = StreamBuilder(page_bits=14)
    b.ram_start([("ram0", 4 * 16384)]).part(end=True)
    b.page("ram0", 3, page_bytes(1, 16384)).eos().device_state()
    p, events = parse_all(b.bytes())
    assert events[0].page_size == 16384
    [pg] = [e for e in events if isinstance(e, PageRecord)]
    assert pg.index == 3 and bytes(pg.data) == page_bytes(1, 16384)


def advise(summary: int) -> bytes:
    return be64(summary) + be64(4096)


@pytest.mark.parametrize("hint", [False, True])
def test_postcopy_page_sizes(hint):
    """With postcopy-ram a block whose page size differs from the host's carries it."""
    b = StreamBuilder()
    b.command(1).command(3, advise(4096 | 2 * MiB))
    blocks = [("ram0", 8 * MiB, 2 * MiB), ("pc.bios", 4 * PAGE, None), ("big", 4 * MiB, 2 * MiB)]
    b.ram_start(blocks, postcopy_sizes=True)
    b.part(end=True).page("big", 5, page_bytes(5)).eos().device_state()
    kw = {"block_page_sizes": {"ram0": 2 * MiB, "big": 2 * MiB}} if hint else {}
    p, events = parse_all(b.bytes(), **kw)
    p.finish()
    [rb] = [e for e in events if isinstance(e, RamBlocks)]
    assert [(x.idstr, x.page_size) for x in rb.blocks] == [
        ("ram0", 2 * MiB), ("pc.bios", None), ("big", 2 * MiB)]
    assert [e.index for e in events if isinstance(e, PageRecord)] == [5]


def test_postcopy_without_huge_pages_has_no_page_size_fields():
    b = StreamBuilder()
    b.command(3, advise(4096)).ram_start([("ram0", 8 * PAGE), ("x", PAGE)])
    b.part(end=True).page("x", 0, None).eos().device_state()
    p, events = parse_all(b.bytes())
    p.finish()
    assert [x.page_size for x in p.blocks.values()] == [None, None]


def test_postcopy_huge_pages_with_ignore_shared_needs_hint():
    b = StreamBuilder(caps=("x-ignore-shared",))
    b.command(3, advise(4096 | 2 * MiB))
    b.ram_start([("ram0", 8 * MiB, 2 * MiB, 0), ("pc.bios", 4 * PAGE, None, 0xFFFC0000)],
                postcopy_sizes=True)
    b.part(end=True).page("pc.bios", 1, None).eos().device_state()
    with pytest.raises(PrecopyStreamError, match="block_page_sizes"):
        parse_all(b.bytes())
    p, events = parse_all(b.bytes(), block_page_sizes={"ram0": 2 * MiB})
    p.finish()
    assert [(x.page_size, x.addr) for x in p.blocks.values()] == [
        (2 * MiB, 0), (None, 0xFFFC0000)]


def test_packaged_command_is_passed_through():
    b = StreamBuilder()
    b.ram_start([("ram0", 8 * PAGE)]).part().page("ram0", 1, page_bytes(1)).eos()
    inner = b"\x04" + be32(9) + name8("dev") + be32(0) + be32(1) + b"\x08\x7e\x00" * 5
    b.command(7, be32(len(inner))).raw(inner)
    b.command(4).command(5)
    b.part(end=True).page("ram0", 2, page_bytes(2)).eos().device_state()
    for sizes in ([10**9], [1], [3, 7, 1, 4096]):
        p, events = parse_all(b.bytes(), sizes=sizes)
        p.finish()
        names = [e.name for e in events if isinstance(e, Command)]
        assert names == ["PACKAGED", "POSTCOPY_LISTEN", "POSTCOPY_RUN"]
        first_dsb = next(i for i, e in enumerate(events) if isinstance(e, DeviceStateBegin))
        packaged = b"".join(bytes(e.data) for e in events[:first_dsb] if isinstance(e, Opaque))
        assert packaged == inner
        assert [e.index for e in events if isinstance(e, PageRecord)] == [1, 2]


def test_real_captures_from_tests_data():
    """Two real QEMU 10.0.2 streams: counts equal QEMU's own query-migrate figures."""
    for name in ("precopy-q35-16m-seabios", "precopy-q35-256m-xignoreshared"):
        data = gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())
        ram = json.loads((DATA / f"{name}.json").read_text())["query-migrate"]["ram"]
        p, events = parse_all(data, sizes=[65536])
        p.finish()
        assert (p.normal_pages, p.zero_pages, p.position) == (
            ram["normal"], ram["duplicate"], ram["transferred"]), name
        assert len(data) == ram["transferred"]
        assert any(isinstance(e, Command) and e.name == "SWITCHOVER_START" for e in events)
        [rb] = [e for e in events if isinstance(e, RamBlocks)]
        assert rb.blocks[0].idstr == "ram0"
        if "xignoreshared" in name:
            assert events[0].header.capabilities == {"x-ignore-shared"}
            assert p.blocks["pc.bios"].addr == 0xFFFC0000 and p.blocks["ram0"].addr == 0
            # ram0 is shared: listed, never sent
            assert not any(isinstance(e, PageRecord) and e.block == "ram0" for e in events)
        else:
            assert rb.total_bytes == ram["total"]
        # chunking does not matter
        _, ev2 = parse_all(data, sizes=random_sizes(len(data)))
        assert normalise(ev2) == normalise(events)
        # the editor without drops is the identity
        ed = PrecopyEditor(lambda *a: False)
        out = b"".join(b"".join(bytes(c) for c in o.out)
                       for o in feed_chunks(ed, data, random_sizes(3)))
        ed.finish()
        assert out == data and ed.bytes_out == ed.bytes_in == len(data)


# --- synthetic: chunking -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_chunk_boundaries_give_the_same_events(seed):
    b, _ = standard_stream(caps=("x-ignore-shared",) if seed % 2 else ())
    data = b.bytes()
    _, whole = parse_all(data)
    _, chunked = parse_all(data, sizes=random_sizes(seed, small=seed < 2))
    assert normalise(chunked) == normalise(whole)


def test_every_split_point_and_bytewise_feeding():
    b, _ = standard_stream()
    data = b.bytes()
    _, whole = parse_all(data)
    ref = normalise(whole)
    for cut in range(len(data) + 1):
        p = PrecopyParser()
        ev = p.feed(data[:cut]) + p.feed(data[cut:])
        p.finish()
        assert normalise(ev) == ref, cut
    _, bytewise = parse_all(data, sizes=[1])
    assert normalise(bytewise) == ref


def test_page_data_is_zero_copy_and_copies_only_when_split():
    b, _ = standard_stream()
    data = b.bytes()
    _, events = parse_all(data)
    pages = [e for e in events if isinstance(e, PageRecord) and e.data is not None]
    assert all(isinstance(e.data, memoryview) and e.data.obj is data for e in pages)
    # split inside the first page: that one is copied, later whole ones are views again
    first = pages[0]
    cut = first.offset + 100
    p = PrecopyParser()
    ev = p.feed(data[:cut]) + p.feed(data[cut:])
    got = [e for e in ev if isinstance(e, PageRecord) and e.data is not None]
    assert isinstance(got[0].data, bytes) and bytes(got[0].data) == bytes(first.data)
    assert isinstance(got[-1].data, memoryview)


def test_finish_rejects_truncated_streams():
    b, _ = standard_stream()
    data = b.bytes()
    dsb = next(e for e in parse_all(data)[1] if isinstance(e, DeviceStateBegin)).offset
    for cut in (0, 5, 30, dsb - 20, dsb - 1):
        p = PrecopyParser()
        p.feed(data[:cut])
        with pytest.raises(PrecopyStreamError, match="ends"):
            p.finish()
    p = PrecopyParser()
    p.feed(data[:dsb + 3])
    p.finish()   # inside the device state: cannot be checked further


# --- synthetic: refusals ---------------------------------------------------------------------------

def _ram_stream(records: bytes, *, caps: tuple[str, ...] = ()) -> bytes:
    b = StreamBuilder(caps=caps)
    b.ram_start([("ram0", 16 * PAGE, 0)] if "x-ignore-shared" in caps else [("ram0", 16 * PAGE)])
    b.part().raw(records)
    return b.bytes()


@pytest.mark.parametrize("records,match", [
    (be64(F_XBZRLE) + name8("ram0") + b"\x01" + be16(3) + b"abc", "XBZRLE"),
    (be64(F_MULTIFD_FLUSH), "multifd"),
    (be64(F_HOOK), "RDMA"),
    (be64(F_COMPRESS) + name8("ram0"), "COMPRESS"),
    (be64(0x01), "unknown RAM record flags"),
    (be64(F_PAGE | F_ZERO) + name8("ram0"), "unknown RAM record flags"),
    (be64(F_PAGE | F_CONTINUE) + bytes(PAGE), "CONTINUE but no previous block"),
    (be64(F_PAGE) + name8("ram1") + bytes(PAGE), "unknown block"),
    (be64(16 * PAGE | F_PAGE) + name8("ram0") + bytes(PAGE), "beyond block"),
    (be64(F_ZERO) + name8("ram0") + b"\x05", "fill byte"),
    (be64(F_MEM_SIZE | PAGE), "MEM_SIZE record outside"),
    (be64(F_EOS) + b"\x7e" + be32(9), "footer for section 9"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x02" + be32(5), "not the RAM section"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x01" + be32(2) + name8("vfio") + be32(0) + be32(1),
     "iterative section 'vfio'"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x01" + be32(2) + name8("ram") + be32(0) + be32(4),
     "second RAM START"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x04" + be32(2) + name8("virtio-mem") + be32(0)
     + be32(1), "before the RAM END"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x08" + be16(12) + be16(0), "unknown migration command"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x08" + be16(2) + be16(3) + b"abc", "PING with length"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x09", "unknown section type"),
    (be64(F_EOS) + b"\x7e" + be32(1) + b"\x07", "second CONFIGURATION"),
])
def test_refusals(records, match):
    data = _ram_stream(records)
    p = PrecopyParser()
    with pytest.raises(PrecopyStreamError, match=match) as info:
        p.feed(data)
    assert info.value.offset is not None and 0 <= info.value.offset < len(data)
    # the parser is poisoned afterwards
    with pytest.raises(PrecopyStreamError, match=match):
        p.feed(b"")
    with pytest.raises(PrecopyStreamError, match=match):
        p.finish()


@pytest.mark.parametrize("data,match", [
    (b"QEVX", "not a QEMU migration stream"),
    (b"\x00", "not a QEMU migration stream"),
    (be32(0x5145564D) + be32(2) + b"\x07" + be32(1) + b"m\x00", "version 2"),
    (be32(0x5145564D) + be32(3) + b"\x01" + be32(1) + b"m\x00", "no CONFIGURATION"),
    (be32(0x5145564D) + be32(3) + b"\x07" + be32(1) + b"m" + b"\x05" + name8("configuration/x")
     + be32(1) + b"\x00", "unknown CONFIGURATION subsection"),
])
def test_bad_headers(data, match):
    with pytest.raises(PrecopyStreamError, match=match):
        PrecopyParser().feed(data)


def test_mapped_ram_is_refused_at_the_header():
    b = StreamBuilder(caps=("mapped-ram",))
    b.raw(b"\x01")
    with pytest.raises(PrecopyStreamError, match="mapped-ram"):
        PrecopyParser().feed(b.bytes())


def test_multifd_setup_section_is_refused():
    # QEMU 10 with multifd writes MULTIFD_FLUSH right after the block list
    b = StreamBuilder()
    b.buf += b"\x01" + be32(1) + name8("ram") + be32(0) + be32(4) + be64(PAGE | F_MEM_SIZE)
    b.buf += name8("ram0") + be64(PAGE) + be64(F_MULTIFD_FLUSH) + be64(F_EOS)
    with pytest.raises(PrecopyStreamError, match="multifd"):
        PrecopyParser().feed(b.bytes())


# --- editor ----------------------------------------------------------------------------------------

def edit(data: bytes, drop, sizes=None) -> tuple[PrecopyEditor, bytes, list]:
    ed = PrecopyEditor(drop)
    out = bytearray()
    events = []
    for o in feed_chunks(ed, data, sizes or [len(data)]):
        for c in o.out:
            out += c
        events += o.events
    ed.finish()
    return ed, bytes(out), events


def test_editor_identity_synthetic():
    b, _ = standard_stream()
    data = b.bytes()
    for sizes in ([len(data)], [1], random_sizes(5)):
        ed, out, events = edit(data, lambda *a: False, sizes)
        assert out == data
        assert ed.dropped_pages == 0 and ed.fixed_records == 0
        assert ed.bytes_in == ed.bytes_out == len(data)
    ed, out, _ = edit(data, None)
    assert out == data


def policy_edit(seed: int) -> int:
    """The tracker's policy on random destinations: the destination starts with the final
    content of a random set of pages (always including the pages of records that name their
    block); a record is dropped iff the destination will hold exactly its content at that point.
    Loading the edited stream must give the same RAM as loading the original."""
    b, dev = standard_stream(caps=("x-ignore-shared",) if seed % 2 else ())
    data = b.bytes()
    _, events = parse_all(data)
    pages = [e for e in events if isinstance(e, PageRecord)]
    expected = apply_stream(data)
    r = random.Random(seed)
    init = {k: v for k, v in expected.items() if r.random() < 0.6}
    init.update({(e.block, e.index): expected[(e.block, e.index)]
                 for e in pages if not e.continued})
    held = dict(init)
    asked: list[tuple] = []

    def drop(block, index, data_):
        content = bytes(PAGE) if data_ is None else bytes(data_)
        asked.append((block, index, None if data_ is None else content))
        if held.get((block, index)) == content:
            return True
        held[(block, index)] = content
        return False

    ed, out, out_events = edit(data, drop, random_sizes(seed))
    assert asked == b.pages                         # asked for every record, in order
    dropped = [e.dropped for e in out_events if isinstance(e, PageRecord)]
    assert len(dropped) == len(pages) and sum(dropped) == ed.dropped_pages > 0
    assert apply_stream(out, init) == expected
    # every kept record is attributed to the right block, named where needed
    _, out_ev = parse_all(out)
    kept_in = [e for e, d in zip(pages, dropped) if not d]
    kept_out = [e for e in out_ev if isinstance(e, PageRecord)]
    assert [(e.block, e.index, e.kind) for e in kept_out] == [
        (e.block, e.index, e.kind) for e in kept_in]
    fixed = [o for i, o in zip(kept_in, kept_out) if i.continued and not o.continued]
    assert not any(o.continued and not i.continued for i, o in zip(kept_in, kept_out))
    assert len(fixed) == ed.fixed_records
    # output size: input - dropped records + one idstr per fixed record
    assert len(out) == len(data) - ed.dropped_bytes + sum(1 + len(o.block) for o in fixed)
    assert b"".join(bytes(e.data) for e in out_ev if isinstance(e, Opaque)) == dev
    return ed.fixed_records


@pytest.mark.parametrize("seed", range(8))
def test_editor_drops_and_fixes_continue(seed):
    policy_edit(seed)


def test_editor_policy_fixes_happen():
    assert sum(policy_edit(seed) for seed in range(8)) > 0


def test_editor_fix_across_sections():
    """The record naming ram0 is the last of a PART; the next kept ram0 record (CONTINUE) is in
    the next section: it must be rewritten to name ram0."""
    b = StreamBuilder()
    b.ram_start([("ram0", 8 * PAGE), ("pc.bios", 2 * PAGE)])
    b.part().page("pc.bios", 0, page_bytes(1)).page("ram0", 1, page_bytes(2)).eos()
    b.part(end=True).page("ram0", 2, page_bytes(3)).eos()
    b.device_state()
    data = b.bytes()
    ed, out, _ = edit(data, lambda blk, idx, d: (blk, idx) == ("ram0", 1))
    assert ed.fixed_records == 1 and ed.dropped_pages == 1
    _, ev = parse_all(out)
    pg = [e for e in ev if isinstance(e, PageRecord)]
    assert [(e.block, e.index, e.continued) for e in pg] == [
        ("pc.bios", 0, False), ("ram0", 2, False)]
    assert len(out) == len(data) - (8 + 5 + PAGE) + 5
    # dropping the pc.bios record too: ram0's record is then named by the fix, nothing else
    ed, out, _ = edit(data, lambda blk, idx, d: blk == "pc.bios" or idx == 1)
    assert ed.fixed_records == 1
    assert apply_stream(out, {("pc.bios", 0): page_bytes(1), ("ram0", 1): page_bytes(2)}) == \
        apply_stream(data)


def test_editor_drop_zero_records_and_flush():
    b, _ = standard_stream()
    data = b.bytes()
    ed, out, _ = edit(data, lambda blk, idx, d: d is None)
    assert ed.dropped_pages == 4
    held = {(blk, i): bytes(PAGE) for blk, i, d in b.pages if d is None}
    assert apply_stream(out, held) == apply_stream(data)
    # a truncated stream: the held-back tail is released unchanged by flush()
    ed = PrecopyEditor()
    o = ed.feed(data[:1000])
    assert b"".join(bytes(c) for c in o.out) + ed.flush() == data[:1000]


# --- hypothesis: garbage and mutations ----------------------------------------------------------

def _only_stream_errors(data: bytes, sizes=None, editor: bool = False) -> None:
    target = PrecopyEditor(lambda b, i, d: i % 2 == 0) if editor else PrecopyParser()
    try:
        feed_chunks(target, data, sizes or [max(1, len(data))])
        target.finish()
    except PrecopyStreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_raise_only_stream_errors(data):
    _only_stream_errors(data)


_VALID_HEAD = StreamBuilder(caps=("x-ignore-shared",)).bytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.booleans())
def test_random_bytes_after_a_valid_header(data, prefix_ram_start):
    head = _VALID_HEAD
    if prefix_ram_start:
        head = _ram_stream(b"", caps=("x-ignore-shared",))
    _only_stream_errors(head + data)


_VALID = standard_stream()[0].bytes()
_VALID_XIS = standard_stream(caps=("x-ignore-shared",))[0].bytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_streams_raise_only_stream_errors(d):
    data = bytearray(d.draw(st.sampled_from([_VALID, _VALID_XIS])))
    for _ in range(d.draw(st.integers(1, 4))):
        op = d.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = d.draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << d.draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = d.draw(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x7E, 0xFF]))
        elif op == "cut":
            del data[pos:]
            if not data:
                break
        elif op == "insert":
            data[pos:pos] = d.draw(st.binary(min_size=1, max_size=20))
        else:
            del data[pos:pos + d.draw(st.integers(1, 20))]
            if not data:
                break
    sizes = d.draw(st.lists(st.integers(1, 5000), min_size=1, max_size=8))
    _only_stream_errors(bytes(data), sizes=sizes, editor=d.draw(st.booleans()))


# --- real QEMU ---------------------------------------------------------------------------------------

def need_qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    assert path, "qemu-system-x86_64 is not installed (or not in PATH); the qemu tests need it"
    assert (GUEST / "vmlinux").exists(), f"test guest missing in {GUEST} (make guest)"
    return path


def guest_spec(name: str, ram_path: Path, serial: Path) -> VmSpec:
    return VmSpec(name=name, ram_bytes=256 * MiB, ram_path=ram_path, kernel=GUEST / "vmlinux",
                  initrd=GUEST / "initramfs.cpio.gz",
                  append="console=ttyS0 quiet fill=50 dirty=5", serial_log=serial)


def counters(log: Path) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(x) for x in re.findall(rb"COUNTER (\d+)", log.read_bytes())]
    return []


async def wait_counter(log: Path, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = counters(log)
        if c and c[-1] > above:
            return c[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no COUNTER above {above} in {log} within {timeout}s: {counters(log)}")


MIGRATE_CAPS = {"events": True, "x-ignore-shared": False, "return-path": False,
                "switchover-ack": False, "multifd": False, "xbzrle": False,
                "postcopy-ram": False, "mapped-ram": False}


async def migrate_to_file(vm: QemuProcess, path: Path, timeout: float = 120) -> dict:
    await vm.set_migrate_capabilities(MIGRATE_CAPS)
    await vm.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "file", "filename": str(path), "offset": 0}}]})
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.execute("query-migrate")
        if info.get("status") == "completed":
            return info
        assert info.get("status") not in ("failed", "cancelled"), info
        assert time.monotonic() < deadline, f"migration not done in {timeout}s: {info}"
        await asyncio.sleep(0.02)


@dataclass
class Capture:
    name: str
    stream: Path
    info: dict
    ram: Path              # the source RAM file as the stream leaves it (the expected result)
    last_counter: int


@dataclass
class Captures:
    error: BaseException | None = None
    items: dict[str, Capture] = field(default_factory=dict)
    ramdir: Path | None = None

    def get(self, name: str) -> Capture:
        need_qemu()
        if self.error is not None:
            raise AssertionError(f"capturing a stream from QEMU failed: {self.error!r}") \
                from self.error
        return self.items[name]


async def _capture(work: Path, ramdir: Path) -> dict[str, Capture]:
    items = {}
    serial = work / "src.serial"
    async with await QemuProcess.launch(guest_spec("pcsrc", ramdir / "src.ram", serial),
                                        work) as src:
        await wait_counter(serial, 3, 120)
        # 1. the guest stopped: one deterministic stream of every page once
        await src.stop()
        n = counters(serial)[-1]
        info = await migrate_to_file(src, work / "stopped.mig")
        shutil.copyfile(ramdir / "src.ram", ramdir / "stopped.ram")
        items["stopped"] = Capture("stopped", work / "stopped.mig", info, ramdir / "stopped.ram", n)
        # 2. the guest running (and dirtying): several passes, pages re-sent
        await src.cont(allow_postmigrate=True)
        n = await wait_counter(serial, n + 2, 30)
        info = await migrate_to_file(src, work / "running.mig")
        assert await src.status() == "postmigrate"
        items["running"] = Capture("running", work / "running.mig", info, ramdir / "src.ram",
                                   counters(serial)[-1])
    return items


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """Streams captured once per module from one source QEMU (killed before the tests run)."""
    caps = Captures()
    work = tmp_path_factory.mktemp("precopy")
    if shutil.which("qemu-system-x86_64") is None or not (GUEST / "vmlinux").exists():
        caps.error = AssertionError("no QEMU or no test guest")
        yield caps
        return
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else work
    caps.ramdir = base / f"replicator-precopy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    caps.ramdir.mkdir()
    try:
        caps.items = asyncio.run(_capture(work, caps.ramdir))
    except BaseException as exc:  # reported by every test that needs a capture
        caps.error = exc
    yield caps
    shutil.rmtree(caps.ramdir, ignore_errors=True)


def _event_digest(events, h) -> None:
    for ev in events:
        if isinstance(ev, PageRecord):
            h.update(repr((ev.offset, ev.block, ev.index, ev.kind.value, ev.continued)).encode())
            if ev.data is not None:
                h.update(ev.data)
        elif isinstance(ev, Opaque):
            h.update(ev.data)   # offsets differ with chunking; the bytes do not
        else:
            h.update(repr(ev).encode())


def _parse_file(path: Path, sizes) -> tuple[PrecopyParser, bytes, list]:
    data = path.read_bytes()
    p = PrecopyParser()
    h = hashlib.sha256()
    other = []
    pos = 0
    it = iter(sizes)
    while pos < len(data):
        n = next(it)
        evs = p.feed(data[pos:pos + n])
        pos += n
        _event_digest(evs, h)
        other += [e for e in evs if not isinstance(e, (PageRecord, Opaque))]
    p.finish()
    return p, h.digest(), other


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["stopped", "running"])
def test_counts_match_query_migrate(captures, which):
    cap = captures.get(which)
    ram = cap.info["ram"]
    data = cap.stream.read_bytes()
    p = PrecopyParser()
    chunk = 65536
    t = time.perf_counter()
    events = []
    for i in range(0, len(data), chunk):
        events += [e for e in p.feed(data[i:i + chunk]) if not isinstance(e, PageRecord)]
    dt = time.perf_counter() - t
    p.finish()
    print(f"\n{which}: {len(data)} B, normal {p.normal_pages} (QEMU {ram['normal']}), "
          f"zero {p.zero_pages} (QEMU {ram['duplicate']}), bytes {p.position} "
          f"(QEMU transferred {ram['transferred']}), {p.iterations} PART sections, "
          f"{ram['dirty-sync-count']} dirty syncs; parsed at {len(data) / dt / 1e6:.0f} MB/s")
    assert p.normal_pages == ram["normal"]
    assert p.zero_pages == ram["duplicate"]
    assert p.position == len(data) == ram["transferred"]
    assert p.normal_pages * PAGE == ram["normal-bytes"]
    [rb] = [e for e in events if isinstance(e, RamBlocks)]
    assert rb.total_bytes == ram["total"]
    assert p.blocks["ram0"].used_length == 256 * MiB
    order = [type(e).__name__ for e in events if not isinstance(e, Opaque)]
    assert order[:2] == ["Header", "SectionBegin"] and order[-1] == "DeviceStateBegin"
    assert [e.name for e in events if isinstance(e, Command)] == ["SWITCHOVER_START"]
    assert p.iterations >= 1
    assert len(data) / dt > 100e6, "parsing is far slower than expected (per-byte Python?)"


@pytest.mark.qemu
def test_parse_throughput(captures):
    cap = captures.get("running")
    data = cap.stream.read_bytes()
    for chunk in (4096 + 13, 65536, 1 << 20):
        best = 0.0
        for _ in range(2):
            p = PrecopyParser()
            mv = memoryview(data)
            t = time.perf_counter()
            for i in range(0, len(data), chunk):
                p.feed(mv[i:i + chunk])
            best = max(best, len(data) / (time.perf_counter() - t))
        ed = PrecopyEditor(lambda b, i, d: False)
        t = time.perf_counter()
        for i in range(0, len(data), chunk):
            ed.feed(mv[i:i + chunk])
        ed_rate = len(data) / (time.perf_counter() - t)
        print(f"\nchunk {chunk}: parser {best / 1e6:.0f} MB/s, editor {ed_rate / 1e6:.0f} MB/s")


@pytest.mark.qemu
def test_chunk_fuzz_and_identity_on_real_stream(captures):
    cap = captures.get("running")
    p1, d1, other1 = _parse_file(cap.stream, iter(lambda: 65536, None))
    p2, d2, other2 = _parse_file(cap.stream, random_sizes(11))
    assert d1 == d2 and other1 == other2
    assert (p1.normal_pages, p1.zero_pages) == (p2.normal_pages, p2.zero_pages)

    data = cap.stream.read_bytes()
    ed = PrecopyEditor(lambda b, i, d: False)
    h = hashlib.sha256()
    for o in feed_chunks(ed, data, random_sizes(12)):
        for c in o.out:
            h.update(c)
    ed.finish()
    assert h.digest() == hashlib.sha256(data).digest()
    assert ed.bytes_out == ed.bytes_in == len(data)


def _expected_pages(ram: Path) -> np.ndarray:
    return np.memmap(ram, dtype=np.uint8, mode="r").reshape(-1, PAGE)


def _digest(b) -> bytes:
    return hashlib.blake2b(b, digest_size=16).digest()


ZERO_DIGEST = _digest(bytes(PAGE))


def _shadow_edit(stream: Path, out_path: Path, held: dict[int, bytes]) -> PrecopyEditor:
    """Edit ``stream`` like the qemu-precopy tracker will: drop a ram0 record iff the
    destination will already hold exactly its content (``held``: page -> digest of the content
    it holds, updated with every record forwarded)."""

    def drop(block, index, data):
        if block != "ram0":
            return False
        d = ZERO_DIGEST if data is None else _digest(data)
        if held.get(index) == d:
            return True
        held[index] = d
        return False

    ed = PrecopyEditor(drop)
    with stream.open("rb") as f, out_path.open("wb") as out:
        while chunk := f.read(1 << 20):
            o = ed.feed(chunk)
            out.writelines(o.out)
    ed.finish()
    return ed


def _diff_pages(a: Path, b: Path) -> list[int]:
    x = np.memmap(a, dtype=np.uint8, mode="r").reshape(-1, PAGE)
    y = np.memmap(b, dtype=np.uint8, mode="r").reshape(-1, PAGE)
    return list(np.nonzero((x != y).any(axis=1))[0][:20])


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["stopped", "running"])
async def test_edited_stream_loads_into_qemu(captures, which, tmp_path):
    """Drop the pages the destination already holds; the destination QEMU must end with RAM
    byte-identical to the source's, and (stopped capture) the guest must continue counting."""
    cap = captures.get(which)
    expected = _expected_pages(cap.ram)
    npages = expected.shape[0]
    # Pages the destination holds beforehand: a random 40% of ram0, plus the page of every
    # record that named ram0 (so that dropping it forces the CONTINUE fix); the rest is junk.
    _, all_events = parse_all(cap.stream.read_bytes())
    named = {e.index for e in all_events
             if isinstance(e, PageRecord) and e.block == "ram0" and not e.continued}
    rng = np.random.default_rng(5)
    prefilled = set(np.nonzero(rng.random(npages) < 0.4)[0].tolist()) | named
    dst_ram = captures.ramdir / f"dst-{which}.ram"
    junk = np.full((npages, PAGE), 0xA5, dtype=np.uint8)
    idx = np.fromiter(sorted(prefilled), dtype=np.int64)
    junk[idx] = expected[idx]
    junk.tofile(dst_ram)
    del junk
    held = {int(i): _digest(expected[i].tobytes()) for i in idx}

    edited = tmp_path / f"{which}-edited.mig"
    ed = _shadow_edit(cap.stream, edited, held)
    size_in, size_out = cap.stream.stat().st_size, edited.stat().st_size
    print(f"\n{which}: {size_in} B -> {size_out} B, dropped {ed.dropped_pages} records "
          f"({ed.dropped_bytes} B), {ed.fixed_records} CONTINUE fixes")
    assert ed.dropped_pages > 10000
    # only ram0 records are dropped, so only ram0 records get fixed (+ u8 4 + "ram0" each)
    assert size_out == size_in - ed.dropped_bytes + 5 * ed.fixed_records
    if which == "stopped":
        assert ed.fixed_records >= 1
    p, _ = parse_all(edited.read_bytes(), sizes=[1 << 20])
    p.finish()
    assert p.normal_pages + p.zero_pages + ed.dropped_pages == \
        cap.info["ram"]["normal"] + cap.info["ram"]["duplicate"]

    serial = tmp_path / "dst.serial"
    async with await QemuProcess.launch(guest_spec("pcdst", dst_ram, serial), tmp_path,
                                        incoming="defer") as dst:
        loaded = await dst.load_device_state(edited, require_capabilities=frozenset(),
                                             ignore_shared=False, timeout=120)
        assert loaded.status == "paused"
        diff = _diff_pages(dst_ram, cap.ram)
        assert not diff, f"destination RAM differs from the source's at pages {diff}"
        if which == "stopped":
            await dst.cont()
            await wait_counter(serial, cap.last_counter, 30)


def _unix_channel(path: Path) -> dict:
    return {"channel-type": "main",
            "addr": {"transport": "socket", "type": "unix", "path": str(path)}}


async def _wait_completed(vm: QemuProcess, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.execute("query-migrate")
        if info.get("status") == "completed":
            return info
        assert info.get("status") not in ("failed", "cancelled"), (info, vm.stderr_tail())
        assert time.monotonic() < deadline, f"{vm.name}: migration not done: {info}"
        await asyncio.sleep(0.05)


@pytest.mark.qemu
async def test_live_relay_with_return_path(tmp_path):
    """The future tracker in miniature: a running guest migrates over a unix socket to this test,
    which relays the stream through a PrecopyEditor to a destination QEMU (and the return path
    back, untouched). The destination started from a copy of the source's RAM file taken while
    the guest ran; records it already holds are dropped. It must end with the source's RAM and
    continue the guest."""
    need_qemu()
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    ramdir = base / f"replicator-precopy-live-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ramdir.mkdir()
    relay_sock, dst_sock = tmp_path / "relay.sock", tmp_path / "dst-in.sock"
    caps = dict(MIGRATE_CAPS, **{"return-path": True})
    try:
        src_log, dst_log = tmp_path / "src.serial", tmp_path / "dst.serial"
        async with await QemuProcess.launch(guest_spec("livesrc", ramdir / "src.ram", src_log),
                                            tmp_path) as src:
            await wait_counter(src_log, 3, 120)
            shutil.copyfile(ramdir / "src.ram", ramdir / "dst.ram")   # stale by the time it loads
            pre = _expected_pages(ramdir / "dst.ram")
            held = {i: _digest(pre[i].tobytes()) for i in range(pre.shape[0])}
            del pre

            def drop(block, index, data):
                if block != "ram0":
                    return False
                d = ZERO_DIGEST if data is None else _digest(data)
                if held.get(index) == d:
                    return True
                held[index] = d
                return False

            ed = PrecopyEditor(drop)
            commands: list[str] = []
            relay_done: asyncio.Future = asyncio.get_running_loop().create_future()

            async def relay(sr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
                try:
                    dr, dw = await asyncio.open_unix_connection(str(dst_sock))

                    async def down() -> None:
                        while chunk := await sr.read(1 << 18):
                            out, events = ed.feed(chunk)
                            commands.extend(e.name for e in events if isinstance(e, Command))
                            dw.writelines(out)
                            await dw.drain()
                        ed.finish()
                        dw.write_eof()

                    async def up() -> None:
                        while chunk := await dr.read(65536):
                            sw.write(chunk)
                            await sw.drain()

                    await asyncio.gather(down(), up())
                    relay_done.set_result(None)
                except BaseException as exc:
                    if not relay_done.done():
                        relay_done.set_exception(exc)
                    raise
                finally:
                    sw.close()

            server = await asyncio.start_unix_server(relay, str(relay_sock))
            async with server, await QemuProcess.launch(
                    guest_spec("livedst", ramdir / "dst.ram", dst_log), tmp_path,
                    incoming="defer") as dst:
                await dst.set_migrate_capabilities(caps)
                await dst.execute("migrate-incoming", {"channels": [_unix_channel(dst_sock)],
                                                       "exit-on-error": False})
                await src.set_migrate_capabilities(caps)
                await src.execute("migrate", {"channels": [_unix_channel(relay_sock)]})
                info = await _wait_completed(src, 120)
                await asyncio.wait_for(relay_done, 60)
                await _wait_completed(dst, 60)
                assert await dst.status() == "paused"
                assert await src.status() == "postmigrate"
                last = counters(src_log)[-1]
                p = ed.parser
                ram = info["ram"]
                print(f"\nlive relay: {ed.bytes_in} B in -> {ed.bytes_out} B out, dropped "
                      f"{ed.dropped_pages} records, {ed.fixed_records} fixes; normal "
                      f"{p.normal_pages} (QEMU {ram['normal']}), zero {p.zero_pages} "
                      f"(QEMU {ram['duplicate']}), bytes {p.position} (QEMU {ram['transferred']})")
                assert (p.normal_pages, p.zero_pages, p.position) == (
                    ram["normal"], ram["duplicate"], ram["transferred"])
                assert ed.dropped_pages > 10000
                assert commands == ["OPEN_RETURN_PATH", "PING", "SWITCHOVER_START"]
                diff = _diff_pages(ramdir / "dst.ram", ramdir / "src.ram")
                assert not diff, f"destination RAM differs from the source's at pages {diff}"
                await dst.cont()
                await wait_counter(dst_log, last, 30)
    finally:
        shutil.rmtree(ramdir, ignore_errors=True)
