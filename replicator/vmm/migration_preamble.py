"""The precopy stream's preamble: header + CONFIGURATION, and the RAM setup's block list.

Two scanners :class:`~replicator.vmm.migration_stream.PrecopyParser` runs before the first page
record, both incremental (they return ``None`` until they have the bytes they need):

* :func:`scan_header`: the ``QEVM`` header and CONFIGURATION section (machine name,
  capabilities, target page size);
* :class:`BlockListScanner`: the RAM block list that follows the MEM_SIZE record of the RAM
  setup section, one entry at a time, until the entries add up to MEM_SIZE.

Both raise :class:`~replicator.vmm.migration_format.PrecopyStreamError`; the format is described
in :mod:`replicator.vmm.migration_format`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from replicator.vmm.migration_format import (BE32, BE64, DEFAULT_PAGE_BITS, FILE_VERSION,
                                             MAX_PAGE_BITS, QEVM_MAGIC, QEVM_MAGIC_BYTES,
                                             SEC_CONFIGURATION, SUBSECTION, PrecopyStreamError,
                                             RamBlock)
from replicator.vmm.stream_header import MigrationStreamError, StreamHeader, parse_stream_header

__all__ = ["scan_header", "BlockListScanner"]

_NEED = None  # "not enough bytes yet"


def _fail(msg: str, offset: int) -> PrecopyStreamError:
    return PrecopyStreamError(msg, offset=offset)


def scan_header(v: memoryview, pos: int, end: int,
                base: int) -> tuple[int, StreamHeader, int] | None:
    """Scan the header and CONFIGURATION section at ``v[pos:end]`` (``base``: stream offset of
    ``v[0]``); return (position after it, the parsed header, target page bits), or ``None``
    while more bytes are needed."""
    avail = end - pos
    # Fail fast on something that is not a migration stream at all.
    probe = bytes(v[pos:pos + min(avail, 4)])
    if probe != QEVM_MAGIC_BYTES[:len(probe)]:
        raise _fail(f"not a QEMU migration stream (starts with {probe.hex()})",
                    base + pos)
    if avail < 13:
        return _NEED
    magic, version, kind, mlen = struct.unpack_from(">IIBI", v, pos)
    assert magic == QEVM_MAGIC
    if version != FILE_VERSION:
        raise _fail(f"unsupported migration stream version {version}", base + pos)
    if kind != SEC_CONFIGURATION:
        raise _fail(f"stream has no CONFIGURATION section (section type {kind:#04x})",
                    base + pos + 8)
    if mlen > 255:
        raise _fail(f"implausible machine name length {mlen}", base + pos + 9)
    q = pos + 13 + mlen
    page_bits = DEFAULT_PAGE_BITS
    # Subsections have no terminator: the CONFIGURATION section ends at the first byte that
    # is not 0x05, so one byte of look-ahead is needed.
    while True:
        if q >= end:
            return _NEED
        if v[q] != SUBSECTION:
            break
        if end - q < 2:
            return _NEED
        n = v[q + 1]
        if end - q < 2 + n + 4:
            return _NEED
        name = bytes(v[q + 2:q + 2 + n])
        q += 2 + n + 4
        leaf = name.rsplit(b"/", 1)[-1]
        if leaf == b"capabilities":
            if end - q < 4:
                return _NEED
            (count,) = BE32.unpack_from(v, q)
            if count > 64:
                raise _fail(f"implausible capability count {count}", base + q)
            q += 4
            for _ in range(count):
                if q >= end:
                    return _NEED
                q += 1 + v[q]
                if q > end:
                    return _NEED
        elif leaf == b"target-page-bits":
            if end - q < 4:
                return _NEED
            (page_bits,) = BE32.unpack_from(v, q)
            if not DEFAULT_PAGE_BITS <= page_bits <= MAX_PAGE_BITS:
                raise _fail(f"unsupported target-page-bits {page_bits}", base + q)
            q += 4
        elif leaf == b"uuid":
            q += 16
            if q > end:
                return _NEED
        else:
            raise _fail(f"unknown CONFIGURATION subsection {name!r}", base + q)
    try:
        header = parse_stream_header(bytes(v[pos:q]))
    except MigrationStreamError as exc:
        raise _fail(f"bad stream header: {exc}", base + pos) from None
    if "mapped-ram" in header.capabilities:
        raise _fail("mapped-ram stream: its pages are not on the main channel "
                    "(not supported)", base + pos)
    return q, header, page_bits


class BlockListScanner:
    """The block list after a MEM_SIZE record of ``total`` bytes at stream offset ``offset``.

    Feed it with :meth:`scan_entry` until :attr:`done`; :attr:`blocks` then lists the blocks.
    ``known`` holds the blocks already listed (by raw idstr); ``ignore_shared``,
    ``postcopy_summary`` (the POSTCOPY_ADVISE page-size summary, ``None`` without postcopy),
    ``block_page_sizes`` and ``host_page_size`` say which optional fields an entry has.
    """

    def __init__(self, offset: int, total: int, *, known: Mapping[bytes, RamBlock],
                 ignore_shared: bool, postcopy_summary: int | None,
                 block_page_sizes: Mapping[str, int] | None, host_page_size: int):
        self.offset = offset
        self.total = total
        self.blocks: list[RamBlock] = []
        self._left = total
        self._known = known
        self._ignore_shared = ignore_shared
        self._postcopy_summary = postcopy_summary
        self._block_page_sizes = block_page_sizes
        self._host_page_size = host_page_size

    @property
    def done(self) -> bool:
        return not self._left

    def scan_entry(self, v: memoryview, pos: int, end: int, base: int) -> int | None:
        """Scan one entry at ``v[pos:end]``; return the position after it (``None``: need
        more bytes)."""
        if end - pos < 1:
            return _NEED
        n = v[pos]
        if n == 0:
            raise _fail("RAM block with an empty name in the MEM_SIZE list", base + pos)
        q = pos + 1 + n + 8
        if end < q:
            return _NEED
        raw = bytes(v[pos + 1:pos + 1 + n])
        (used,) = BE64.unpack_from(v, pos + 1 + n)
        if used > self._left:
            raise _fail(
                f"RAM block {raw!r} ({used:#x} bytes) overruns the MEM_SIZE total "
                f"({self.total:#x})", base + pos)
        if raw in self._known or any(b.idstr.encode("latin-1") == raw for b in self.blocks):
            raise _fail(f"RAM block {raw!r} listed twice", base + pos)
        idstr = raw.decode("latin-1")
        last = used == self._left
        has_ps = self._has_page_size(idstr, v, q, end, last, base + pos)
        if has_ps is _NEED:
            return _NEED
        page_size = None
        if has_ps:
            if end - q < 8:
                return _NEED
            (page_size,) = BE64.unpack_from(v, q)
            q += 8
        addr = None
        if self._ignore_shared:
            if end - q < 8:
                return _NEED
            (addr,) = BE64.unpack_from(v, q)
            q += 8
        self.blocks.append(RamBlock(idstr, used, page_size, addr))
        self._left -= used
        return q

    def _has_page_size(self, idstr: str, v: memoryview, q: int, end: int, last: bool,
                       offset: int) -> bool | None:
        """Does this block entry carry a postcopy page-size field at ``v[q]``?

        QEMU writes it when postcopy-ram is on (the stream then has a 16-byte POSTCOPY_ADVISE
        before RAM) and the block's page size differs from the host's.
        """
        summary = self._postcopy_summary
        if summary is None:
            return False
        if self._block_page_sizes is not None:
            return self._block_page_sizes.get(idstr, self._host_page_size) != self._host_page_size
        if summary == self._host_page_size:
            return False          # every block has the host page size
        if self._ignore_shared:
            raise _fail(
                "postcopy stream with huge-page RAM blocks and x-ignore-shared: pass "
                "block_page_sizes so the block list can be parsed", offset)
        # Without x-ignore-shared the next field after used_length is either the page size (a
        # be64 power of two, so its first byte is 0 and its low 12 bits are clear) or what
        # follows the entry: the next entry's name length (never 0) or, after the last entry, a
        # RAM record (never without flags).
        if last:
            if end - q < 8:
                return _NEED
            (word,) = BE64.unpack_from(v, q)
            return word != 0 and word & (word - 1) == 0 and not word & 0xFFF
        if q >= end:
            return _NEED
        return v[q] == 0
