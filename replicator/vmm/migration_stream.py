"""Sans-I/O parser and editor for QEMU's precopy migration stream (the main channel).

A future ``qemu-precopy`` dirty tracker relays the stream a running QEMU sends when it migrates
(``migrate``) to the paused shadow QEMU on the other host. This module understands that stream
well enough to

* see every guest-RAM page record as it passes (:class:`PrecopyParser`), with the RAM block, the
  page index and, for normal pages, the 4096 bytes themselves;
* forward it byte-exactly except for PAGE records the shadow already holds
  (:class:`PrecopyEditor`), repairing the ``CONTINUE`` shorthand so that the destination still
  knows which block every kept record belongs to.

Neither class does any I/O: feed them bytes in chunks of any size (a chunk boundary may fall
anywhere, inside a page or a be64 header); they return what they found (events) and, for the
editor, the bytes to forward.

Stream layout (QEMU 10; see ``/work/shared/reference/qemu-migration-stream.md``; all integers
big-endian)::

    header        be32 "QEVM", be32 3, 0x07 CONFIGURATION (be32 n + machine, subsections)
    commands      0x08 be16 cmd, be16 len, data      (OPEN_RETURN_PATH, PING, SWITCHOVER_START ..)
    RAM setup     0x01 START id "ram" instance version | MEM_SIZE + block list ... EOS | 0x7E id
    RAM passes    0x02 PART id | ZERO / PAGE records ... EOS | 0x7E id           (repeated)
    RAM final     0x03 END id  | ZERO / PAGE records ... EOS | 0x7E id
    device state  0x04 FULL sections, 0x00 EOF, 0x06 VMDESCRIPTION    <- passed through opaquely

RAM records are ``be64 offset | flags`` (flags in the bits below the target page size):
ZERO ``[u8 n + idstr] + u8 0``, PAGE ``[u8 n + idstr] + page``; the idstr is omitted when the
CONTINUE flag (0x20) says "same block as the previous record". Device state has no length
prefix, so nothing after the RAM END section can be parsed without QEMU's vmstate
descriptions: it is reported and forwarded as opaque bytes.

Refused with :class:`PrecopyStreamError` (this module cannot see or rewrite their pages):
``mapped-ram`` (listed in the header), ``multifd`` (MULTIFD_FLUSH records), ``xbzrle`` (XBZRLE
records), RDMA (HOOK records), iterative sections other than ``"ram"`` (VFIO, dirty bitmaps)
and device sections sent before RAM (``early_setup`` devices such as virtio-mem).

Zero-copy contract: a normal page's ``data`` (and an :class:`Opaque` event's ``data``, and the
editor's output chunks) is usually a ``memoryview`` into the buffer passed to ``feed``; it stays
valid as long as that buffer is not modified. Feed ``bytes`` (immutable) or copy what you keep
(``bytes(ev.data)``). Parts of records that straddle two ``feed`` calls are copied into
``bytes``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Union

from replicator.errors import ProtocolError
from replicator.vmm.qemu import MigrationStreamError, StreamHeader, parse_stream_header

__all__ = [
    "PrecopyStreamError",
    "PageKind",
    "SectionKind",
    "RamBlock",
    "Header",
    "Command",
    "SectionBegin",
    "RamBlocks",
    "PageRecord",
    "RamEos",
    "SectionEnd",
    "DeviceStateBegin",
    "Opaque",
    "Event",
    "PrecopyStats",
    "PrecopyParser",
    "EditorOutput",
    "PrecopyEditor",
    "COMMAND_NAMES",
]


class PrecopyStreamError(ProtocolError):
    """The precopy stream is malformed, or uses a feature this parser refuses.

    ``offset`` is the stream offset (bytes from the start) of the record at fault, when known.
    Once raised, the parser (or editor) is unusable: every later ``feed`` raises it again.
    """

    def __init__(self, message: str, *, offset: int | None = None):
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (stream offset {offset})")


# --- stream constants ----------------------------------------------------------------------

_QEVM_MAGIC = 0x5145564D
_QEVM_MAGIC_BYTES = b"QEVM"
_FILE_VERSION = 3

_SEC_EOF = 0x00
_SEC_START = 0x01
_SEC_PART = 0x02
_SEC_END = 0x03
_SEC_FULL = 0x04
_SUBSECTION = 0x05
_SEC_VMDESCRIPTION = 0x06               # after EOF; only ever inside the opaque tail
_SEC_CONFIGURATION = 0x07
_SEC_COMMAND = 0x08
_SEC_FOOTER = 0x7E

_RAM_IDSTR = b"ram"
_RAM_VERSION = 4

_F_OBSOLETE_FULL = 0x01                 # not sent since QEMU 1.x: refused as unknown
_F_ZERO = 0x02
_F_MEM_SIZE = 0x04
_F_PAGE = 0x08
_F_EOS = 0x10
_F_CONTINUE = 0x20
_F_XBZRLE = 0x40
_F_HOOK = 0x80
_F_COMPRESS_PAGE = 0x100
_F_MULTIFD_FLUSH = 0x200

_CMD_PACKAGED = 7
_CMD_POSTCOPY_ADVISE = 3

#: QEMU's migration commands (``MIG_CMD_*`` in migration/savevm.c): number -> (name, payload
#: length or ``None`` for variable).
_COMMANDS: dict[int, tuple[str, int | None]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", None),
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", None),
    7: ("PACKAGED", 4),
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", None),
    11: ("SWITCHOVER_START", 0),
}
COMMAND_NAMES: Mapping[int, str] = {k: v[0] for k, v in _COMMANDS.items()}

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_CMD_HDR = struct.Struct(">BHH")        # 0x08, cmd, len
_SEC_ID = struct.Struct(">BI")          # type, section id
_INST_VER = struct.Struct(">II")        # instance id, version id
_FOOTER = struct.Struct(">BI")          # 0x7E, section id

_DEFAULT_PAGE_BITS = 12                 # x86 (no target-page-bits subsection)
_MAX_PAGE_BITS = 24                     # sanity bound for target-page-bits
_APPEND = 16384                         # bytes moved into the carry buffer per step


# --- events ----------------------------------------------------------------------------------

class PageKind(enum.Enum):
    ZERO = "zero"
    PAGE = "page"


class SectionKind(enum.Enum):
    START = "start"
    PART = "part"
    END = "end"
    FULL = "full"


_SECTION_KINDS = {_SEC_START: SectionKind.START, _SEC_PART: SectionKind.PART,
                  _SEC_END: SectionKind.END, _SEC_FULL: SectionKind.FULL}


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAM block as listed in the MEM_SIZE record of the RAM setup section."""

    idstr: str
    """QEMU's block name: the memory backend id for ``memory-backend-*`` RAM (``ram0``), else
    e.g. ``pc.bios`` or ``/rom@etc/acpi/tables``."""
    used_length: int
    page_size: int | None = None
    """The block's host page size, sent only with postcopy-ram when it differs from the source's
    host page size (huge pages)."""
    addr: int | None = None
    """The block's guest-physical (memory-region) address, sent only with ``x-ignore-shared``."""

    def pages(self, page_size: int = 4096) -> int:
        """Number of target pages in the block (``page_size`` = the stream's target page size)."""
        return -(-self.used_length // page_size)


@dataclass(frozen=True, slots=True)
class Header:
    """Stream header and CONFIGURATION section (always the first event)."""

    offset: int
    length: int
    header: StreamHeader
    page_size: int
    """Target page size: 4096 unless a ``target-page-bits`` subsection says otherwise."""


@dataclass(frozen=True, slots=True)
class Command:
    """A ``QEMU_VM_COMMAND`` record. For PACKAGED, the packaged sub-stream that follows (``be32``
    length in ``data``) is reported as :class:`Opaque` events."""

    offset: int
    cmd: int
    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SectionBegin:
    """A section header. ``idstr``/``instance_id``/``version_id`` only for START and FULL."""

    offset: int
    kind: SectionKind
    section_id: int
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """The MEM_SIZE record of the RAM setup section with its block list."""

    offset: int
    total_bytes: int
    blocks: tuple[RamBlock, ...]


@dataclass(slots=True)
class PageRecord:
    """One ZERO or PAGE record of guest RAM.

    ``index`` is the page index in the block (offset / page size). ``data`` is the page content
    for PAGE (a memoryview or bytes, see the module's zero-copy contract), ``None`` for ZERO.
    ``continued`` is true when the record used the CONTINUE shorthand (no idstr). ``dropped``
    is set by :class:`PrecopyEditor` when the record was not forwarded.
    """

    offset: int
    block: str
    index: int
    kind: PageKind
    data: memoryview | bytes | None
    continued: bool
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class RamEos:
    """End of one RAM section body (the EOS record).

    For a PART section this is the end of one precopy iteration (one ``ram_save_iterate`` call:
    QEMU sends a PART whenever its rate limit or ~50 ms time slice is used up, so several PARTs
    may belong to one dirty-bitmap sync round). ``iteration`` counts the PART bodies finished
    so far (0 for the START body). Counters are totals since the start of the stream.
    """

    offset: int
    kind: SectionKind
    section_id: int
    iteration: int
    normal_pages: int
    zero_pages: int
    bytes_consumed: int


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """End of a RAM section: its footer (``0x7E`` + id), or, for streams without footers (old
    machine types), the point after the EOS record."""

    offset: int
    kind: SectionKind
    section_id: int
    footer: bool


@dataclass(frozen=True, slots=True)
class DeviceStateBegin:
    """Everything from ``offset`` on is device state + EOF + VMDESCRIPTION: reported as
    :class:`Opaque` only."""

    offset: int


@dataclass(frozen=True, slots=True)
class Opaque:
    """Bytes passed through without interpretation (device state, a PACKAGED sub-stream)."""

    offset: int
    data: memoryview | bytes


Event = Union[Header, Command, SectionBegin, RamBlocks, PageRecord, RamEos, SectionEnd,
              DeviceStateBegin, Opaque]


@dataclass(frozen=True, slots=True)
class PrecopyStats:
    bytes_consumed: int
    """Stream bytes parsed (and, in opaque mode, passed through) so far."""
    normal_pages: int
    """PAGE records (QEMU's ``ram.normal``)."""
    zero_pages: int
    """ZERO records (QEMU's ``ram.duplicate``)."""
    iterations: int
    """RAM PART sections finished."""
    commands: int
    device_state: bool
    """True once the RAM END section was passed (the rest is opaque)."""


# --- the parser --------------------------------------------------------------------------------

_ST_HEADER = 0
_ST_TOP = 1
_ST_RAM = 2
_ST_MEMSIZE = 3
_ST_AFTER_EOS = 4
_ST_PACKAGED = 5
_ST_OPAQUE = 6

_NEED = None  # "not enough bytes yet" marker used by the unit parsers


class PrecopyParser:
    """Incremental, sans-I/O parser of QEMU's precopy migration main channel.

    ``feed(data)`` returns the events completed by ``data`` (see :data:`Event`); bytes of an
    incomplete record are kept until the next ``feed``. Raises :class:`PrecopyStreamError` on a
    malformed or unsupported stream. Call :meth:`finish` at the end of the stream.

    ``block_page_sizes`` ({idstr: page size}) is needed only for streams with postcopy-ram,
    huge-page blocks and ``x-ignore-shared`` together (there the stream alone cannot tell where
    a block's page-size field is); ``host_page_size`` is the source's host page size.
    """

    def __init__(self, *, block_page_sizes: Mapping[str, int] | None = None,
                 host_page_size: int = 4096):
        self._state = _ST_HEADER
        self._carry = bytearray()        # unparsed bytes of an incomplete record
        self._consumed = 0               # absolute offset of the first unparsed byte
        self._error: PrecopyStreamError | None = None
        self._block_page_sizes = dict(block_page_sizes) if block_page_sizes else None
        self._host_page_size = host_page_size

        self.header: StreamHeader | None = None
        self.page_size = 1 << _DEFAULT_PAGE_BITS
        self._flag_mask = self.page_size - 1
        self.blocks: dict[str, RamBlock] = {}
        self._blocks_by_raw: dict[bytes, RamBlock] = {}
        self._ignore_shared = False
        self._postcopy_summary: int | None = None   # from POSTCOPY_ADVISE (postcopy-ram)

        self._ram_section_id: int | None = None
        self._section_kind: SectionKind | None = None
        self._section_id = 0
        self._memsize_left = 0
        self._memsize_offset = 0
        self._memsize_total = 0
        self._memsize_list: list[RamBlock] = []
        self._packaged_left = 0
        self._last_block: RamBlock | None = None     # QEMU's "last block" for CONTINUE

        self.normal_pages = 0
        self.zero_pages = 0
        self.iterations = 0
        self.commands = 0
        self.device_state = False

        # Editor hooks (set by PrecopyEditor): drop decision, output list, and the block the
        # destination will believe is "last" (differs from _last_block after drops).
        self._drop: Callable[[str, int, memoryview | bytes | None], bool] | None = None
        self._out: list[memoryview | bytes] | None = None
        self._dst_last_block: RamBlock | None = None
        self.dropped_pages = 0
        self.dropped_bytes = 0
        self.fixed_records = 0

    # -- public ---------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Bytes of the stream fully parsed so far (the offset of the first unparsed byte)."""
        return self._consumed

    @property
    def pending(self) -> int:
        """Bytes fed but not yet parsed (the start of an incomplete record)."""
        return len(self._carry)

    def stats(self) -> PrecopyStats:
        return PrecopyStats(bytes_consumed=self._consumed, normal_pages=self.normal_pages,
                            zero_pages=self.zero_pages, iterations=self.iterations,
                            commands=self.commands, device_state=self.device_state)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data`` (the next bytes of the stream); return the events it completed."""
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        events: list[Event] = []
        try:
            self._feed(view, events)
        except PrecopyStreamError as exc:
            self._error = exc
            raise
        except BaseException as exc:
            # e.g. the editor's drop callback raised: the record in progress is half-counted.
            self._error = PrecopyStreamError(f"parsing aborted by {exc!r}",
                                             offset=self._consumed)
            raise
        return events

    def finish(self) -> None:
        """Declare the end of the stream: raises :class:`PrecopyStreamError` unless the stream
        ended after the RAM END section (in the device state, which cannot be checked further)
        and no partial record is pending."""
        if self._error is not None:
            raise self._error
        if self._carry:
            self._error = PrecopyStreamError(
                f"stream ends inside a record ({len(self._carry)} bytes pending)",
                offset=self._consumed)
            raise self._error
        if self._state != _ST_OPAQUE:
            self._error = PrecopyStreamError("stream ends before the RAM END section",
                                             offset=self._consumed)
            raise self._error

    # -- chunk handling -------------------------------------------------------------------

    def _feed(self, view: memoryview, events: list[Event]) -> None:
        n = len(view)
        i = 0
        carry = self._carry
        if carry:
            # Complete the straddling record(s) by moving bounded steps of the new chunk into
            # the carry buffer; as soon as everything that was carried is parsed, go on in the
            # chunk itself (zero-copy).
            while i < n:
                old = len(carry)
                take = min(n - i, _APPEND)
                carry += view[i:i + take]
                i += take
                with memoryview(carry) as cv:
                    pos = self._run(cv, 0, len(carry), events, True)
                if pos >= old:
                    i -= len(carry) - pos
                    carry.clear()
                    break
                del carry[:pos]
            if carry:
                return
        if i < n:
            pos = self._run(view, i, n, events, False)
            if pos < n:
                carry += view[pos:]

    # -- the state machine ----------------------------------------------------------------

    def _fail(self, msg: str, offset: int) -> PrecopyStreamError:
        return PrecopyStreamError(msg, offset=offset)

    def _run(self, v: memoryview, pos: int, end: int, events: list[Event], copy: bool) -> int:
        """Parse complete units from ``v[pos:end]``; return the position after the last one.

        ``copy``: ``v`` is the carry buffer (about to change), so nothing handed out may keep
        a view of it.
        """
        base = self._consumed - pos        # absolute offset of v[0]
        out = self._out
        emit = pos                         # editor: v[emit:pos] is still to be forwarded
        try:
            while pos < end:
                st = self._state
                if st == _ST_RAM:
                    newpos, emit = self._run_ram(v, pos, end, events, copy, base, emit)
                    if newpos is _NEED:
                        break
                    pos = newpos
                elif st == _ST_OPAQUE:
                    data = v[pos:end]
                    events.append(Opaque(base + pos, bytes(data) if copy else data))
                    pos = end
                elif st == _ST_TOP:
                    newpos = self._parse_top(v, pos, end, events, base)
                    if newpos is _NEED:
                        break
                    pos = newpos
                elif st == _ST_AFTER_EOS:
                    newpos = self._parse_after_eos(v, pos, end, events, base)
                    if newpos is _NEED:
                        break
                    pos = newpos
                elif st == _ST_MEMSIZE:
                    newpos = self._parse_block_entry(v, pos, end, events, base)
                    if newpos is _NEED:
                        break
                    pos = newpos
                elif st == _ST_PACKAGED:
                    take = min(end - pos, self._packaged_left)
                    data = v[pos:pos + take]
                    events.append(Opaque(base + pos, bytes(data) if copy else data))
                    pos += take
                    self._packaged_left -= take
                    if not self._packaged_left:
                        self._state = _ST_TOP
                else:  # _ST_HEADER
                    newpos = self._parse_header(v, pos, end, events, base)
                    if newpos is _NEED:
                        break
                    pos = newpos
        finally:
            self._consumed = base + pos
            if out is not None and pos > emit:
                chunk = v[emit:pos]
                out.append(bytes(chunk) if copy else chunk)
        return pos

    def _run_ram(self, v: memoryview, pos: int, end: int, events: list[Event], copy: bool,
                 base: int, emit: int) -> tuple[int | None, int]:
        """Parse RAM records until the body's EOS or until the data runs out.

        Returns (new position or _NEED when not even one record was complete, new emit)."""
        page_size = self.page_size
        mask = self._flag_mask
        unpack64 = _BE64.unpack_from
        blocks = self._blocks_by_raw
        drop = self._drop
        out = self._out
        append = events.append
        progressed = False
        while True:
            if end - pos < 8:
                break
            (word,) = unpack64(v, pos)
            flags = word & mask
            addr = word ^ flags
            kind = flags & ~_F_CONTINUE
            if kind == _F_PAGE or kind == _F_ZERO:
                p = pos + 8
                if flags & _F_CONTINUE:
                    block = self._last_block
                    if block is None:
                        raise self._fail("RAM record with CONTINUE but no previous block",
                                         base + pos)
                    continued = True
                else:
                    if p >= end:
                        break
                    n = v[p]
                    if end - p <= n:
                        break
                    raw = bytes(v[p + 1:p + 1 + n])
                    block = blocks.get(raw)
                    if block is None:
                        raise self._fail(f"RAM record for unknown block {raw!r}", base + pos)
                    p += 1 + n
                    continued = False
                if kind == _F_PAGE:
                    if end - p < page_size:
                        break
                    data = v[p:p + page_size]
                    if copy:
                        data = bytes(data)
                    p += page_size
                    pkind = PageKind.PAGE
                else:
                    if p >= end:
                        break
                    if v[p] != 0:
                        raise self._fail(f"ZERO record with fill byte {v[p]:#04x}", base + pos)
                    data = None
                    p += 1
                    pkind = PageKind.ZERO
                if addr >= block.used_length:
                    raise self._fail(
                        f"RAM record offset {addr:#x} beyond block {block.idstr!r} "
                        f"({block.used_length:#x} bytes)", base + pos)
                ev = PageRecord(base + pos, block.idstr, addr // page_size, pkind, data,
                                continued)
                self._last_block = block
                if data is None:
                    self.zero_pages += 1
                else:
                    self.normal_pages += 1
                if out is not None:
                    if drop is not None and drop(block.idstr, ev.index, data):
                        ev.dropped = True
                        self.dropped_pages += 1
                        self.dropped_bytes += p - pos
                        if pos > emit:
                            chunk = v[emit:pos]
                            out.append(bytes(chunk) if copy else chunk)
                        emit = p
                    else:
                        if continued and self._dst_last_block is not block:
                            # The record that named this block for the destination was
                            # dropped: name it here.
                            if pos > emit:
                                chunk = v[emit:pos]
                                out.append(bytes(chunk) if copy else chunk)
                            out.append(self._named_header(word, block))
                            emit = pos + 8
                            self.fixed_records += 1
                        self._dst_last_block = block
                append(ev)
                pos = p
                progressed = True
                continue
            if kind == _F_EOS:
                pos += 8
                sk = self._section_kind
                if sk is SectionKind.PART:
                    self.iterations += 1
                append(RamEos(base + pos - 8, sk, self._section_id, self.iterations,
                              self.normal_pages, self.zero_pages, base + pos))
                self._state = _ST_AFTER_EOS
                return pos, emit
            if kind == _F_MEM_SIZE:
                if flags & _F_CONTINUE:
                    raise self._fail("MEM_SIZE record with CONTINUE", base + pos)
                if self._section_kind is not SectionKind.START:
                    raise self._fail("MEM_SIZE record outside the RAM setup section", base + pos)
                self._memsize_offset = base + pos
                self._memsize_total = addr
                self._memsize_left = addr
                self._memsize_list = []
                pos += 8
                if addr == 0:
                    self._finish_memsize(events)
                else:
                    self._state = _ST_MEMSIZE
                return pos, emit
            raise self._unsupported_flags(flags, base + pos)
        return (pos if progressed else _NEED), emit

    def _named_header(self, word: int, block: RamBlock) -> bytes:
        raw = block.idstr.encode("latin-1")
        return _BE64.pack(word & ~_F_CONTINUE) + bytes((len(raw),)) + raw

    def _unsupported_flags(self, flags: int, offset: int) -> PrecopyStreamError:
        kind = flags & ~_F_CONTINUE
        if kind & _F_XBZRLE:
            return self._fail("XBZRLE page record: the xbzrle capability is not supported "
                              "(its pages are deltas against a cache)", offset)
        if kind & _F_MULTIFD_FLUSH:
            return self._fail("MULTIFD_FLUSH record: multifd streams are not supported "
                              "(their pages travel on other channels)", offset)
        if kind & _F_HOOK:
            return self._fail("RAM_SAVE_FLAG_HOOK record: RDMA migration is not supported",
                              offset)
        if kind & _F_COMPRESS_PAGE:
            return self._fail("COMPRESS_PAGE record: compressed migration (removed in QEMU 9.1) "
                              "is not supported", offset)
        return self._fail(f"unknown RAM record flags {flags:#x}", offset)

    # -- header ---------------------------------------------------------------------------

    def _parse_header(self, v: memoryview, pos: int, end: int, events: list[Event],
                      base: int) -> int | None:
        avail = end - pos
        # Fail fast on something that is not a migration stream at all.
        probe = bytes(v[pos:pos + min(avail, 4)])
        if probe != _QEVM_MAGIC_BYTES[:len(probe)]:
            raise self._fail(f"not a QEMU migration stream (starts with {probe.hex()})",
                             base + pos)
        if avail < 13:
            return _NEED
        magic, version, kind, mlen = struct.unpack_from(">IIBI", v, pos)
        assert magic == _QEVM_MAGIC
        if version != _FILE_VERSION:
            raise self._fail(f"unsupported migration stream version {version}", base + pos)
        if kind != _SEC_CONFIGURATION:
            raise self._fail(f"stream has no CONFIGURATION section (section type {kind:#04x})",
                             base + pos + 8)
        if mlen > 255:
            raise self._fail(f"implausible machine name length {mlen}", base + pos + 9)
        q = pos + 13 + mlen
        page_bits = _DEFAULT_PAGE_BITS
        # Subsections have no terminator: the CONFIGURATION section ends at the first byte that
        # is not 0x05, so one byte of look-ahead is needed.
        while True:
            if q >= end:
                return _NEED
            if v[q] != _SUBSECTION:
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
                (count,) = _BE32.unpack_from(v, q)
                if count > 64:
                    raise self._fail(f"implausible capability count {count}", base + q)
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
                (page_bits,) = _BE32.unpack_from(v, q)
                if not _DEFAULT_PAGE_BITS <= page_bits <= _MAX_PAGE_BITS:
                    raise self._fail(f"unsupported target-page-bits {page_bits}", base + q)
                q += 4
            elif leaf == b"uuid":
                q += 16
                if q > end:
                    return _NEED
            else:
                raise self._fail(f"unknown CONFIGURATION subsection {name!r}", base + q)
        try:
            header = parse_stream_header(bytes(v[pos:q]))
        except MigrationStreamError as exc:
            raise self._fail(f"bad stream header: {exc}", base + pos) from None
        if "mapped-ram" in header.capabilities:
            raise self._fail("mapped-ram stream: its pages are not on the main channel "
                             "(not supported)", base + pos)
        self.header = header
        self._ignore_shared = "x-ignore-shared" in header.capabilities
        self.page_size = 1 << page_bits
        self._flag_mask = self.page_size - 1
        events.append(Header(base + pos, q - pos, header, self.page_size))
        self._state = _ST_TOP
        return q

    # -- top level ------------------------------------------------------------------------

    def _parse_top(self, v: memoryview, pos: int, end: int, events: list[Event],
                   base: int) -> int | None:
        kind = v[pos]
        avail = end - pos
        if kind == _SEC_PART or kind == _SEC_END:
            if avail < 5:
                return _NEED
            (_, sid) = _SEC_ID.unpack_from(v, pos)
            if self._ram_section_id is None or sid != self._ram_section_id:
                raise self._fail(
                    f"{_SECTION_KINDS[kind].name} of section {sid}, which is not the RAM section "
                    "(iterative sections other than RAM are not supported)", base + pos)
            sk = _SECTION_KINDS[kind]
            events.append(SectionBegin(base + pos, sk, sid))
            self._section_kind = sk
            self._section_id = sid
            self._state = _ST_RAM
            return pos + 5
        if kind == _SEC_COMMAND:
            if avail < 5:
                return _NEED
            (_, cmd, length) = _CMD_HDR.unpack_from(v, pos)
            spec = _COMMANDS.get(cmd)
            if spec is None:
                raise self._fail(f"unknown migration command {cmd}", base + pos)
            name, want = spec
            if want is not None and length != want:
                raise self._fail(f"command {name} with length {length} (expected {want})",
                                 base + pos)
            if avail < 5 + length:
                return _NEED
            data = bytes(v[pos + 5:pos + 5 + length])
            self.commands += 1
            events.append(Command(base + pos, cmd, name, data))
            if cmd == _CMD_POSTCOPY_ADVISE and length == 16:
                self._postcopy_summary = _BE64.unpack_from(data, 0)[0]
            if cmd == _CMD_PACKAGED:
                (self._packaged_left,) = _BE32.unpack(data)
                if self._packaged_left:
                    self._state = _ST_PACKAGED
            return pos + 5 + length
        if kind == _SEC_START or kind == _SEC_FULL:
            if avail < 6:
                return _NEED
            n = v[pos + 5]
            if avail < 6 + n + 8:
                return _NEED
            (_, sid) = _SEC_ID.unpack_from(v, pos)
            raw = bytes(v[pos + 6:pos + 6 + n])
            instance, version = _INST_VER.unpack_from(v, pos + 6 + n)
            idstr = raw.decode("latin-1")
            if kind == _SEC_FULL:
                raise self._fail(
                    f"device section {idstr!r} before the RAM END section (early-setup devices "
                    "such as virtio-mem are not supported: device state cannot be skipped)",
                    base + pos)
            if raw != _RAM_IDSTR:
                raise self._fail(f"iterative section {idstr!r} is not supported (only RAM; "
                                 "its records carry no length)", base + pos)
            if self._ram_section_id is not None:
                raise self._fail("second RAM START section", base + pos)
            if version != _RAM_VERSION:
                raise self._fail(f"RAM section version {version} (expected {_RAM_VERSION})",
                                 base + pos)
            self._ram_section_id = sid
            self._section_kind = SectionKind.START
            self._section_id = sid
            events.append(SectionBegin(base + pos, SectionKind.START, sid, idstr, instance,
                                       version))
            self._state = _ST_RAM
            return pos + 6 + n + 8
        if kind == _SEC_EOF:
            # A stream without (or before) RAM END: whatever follows is opaque.
            self._enter_device_state(events, base + pos)
            return pos
        if kind == _SEC_CONFIGURATION:
            raise self._fail("second CONFIGURATION section", base + pos)
        raise self._fail(f"unknown section type {kind:#04x}", base + pos)

    def _parse_after_eos(self, v: memoryview, pos: int, end: int, events: list[Event],
                         base: int) -> int | None:
        sk = self._section_kind
        sid = self._section_id
        if v[pos] == _SEC_FOOTER:
            if end - pos < 5:
                return _NEED
            (_, fid) = _FOOTER.unpack_from(v, pos)
            if fid != sid:
                raise self._fail(f"section footer for section {fid} closes section {sid}",
                                 base + pos)
            events.append(SectionEnd(base + pos, sk, sid, True))
            pos += 5
        else:
            events.append(SectionEnd(base + pos, sk, sid, False))
        if sk is SectionKind.END:
            self._enter_device_state(events, base + pos)
        else:
            self._state = _ST_TOP
        return pos

    def _enter_device_state(self, events: list[Event], offset: int) -> None:
        self.device_state = True
        self._state = _ST_OPAQUE
        events.append(DeviceStateBegin(offset))

    # -- MEM_SIZE block list ----------------------------------------------------------------

    def _parse_block_entry(self, v: memoryview, pos: int, end: int, events: list[Event],
                           base: int) -> int | None:
        if end - pos < 1:
            return _NEED
        n = v[pos]
        if n == 0:
            raise self._fail("RAM block with an empty name in the MEM_SIZE list", base + pos)
        q = pos + 1 + n + 8
        if end < q:
            return _NEED
        raw = bytes(v[pos + 1:pos + 1 + n])
        (used,) = _BE64.unpack_from(v, pos + 1 + n)
        if used > self._memsize_left:
            raise self._fail(
                f"RAM block {raw!r} ({used:#x} bytes) overruns the MEM_SIZE total "
                f"({self._memsize_total:#x})", base + pos)
        if raw in self._blocks_by_raw or any(b.idstr.encode("latin-1") == raw
                                             for b in self._memsize_list):
            raise self._fail(f"RAM block {raw!r} listed twice", base + pos)
        idstr = raw.decode("latin-1")
        last = used == self._memsize_left
        has_ps = self._has_page_size(idstr, v, q, end, last, base + pos)
        if has_ps is _NEED:
            return _NEED
        page_size = None
        if has_ps:
            if end - q < 8:
                return _NEED
            (page_size,) = _BE64.unpack_from(v, q)
            q += 8
        addr = None
        if self._ignore_shared:
            if end - q < 8:
                return _NEED
            (addr,) = _BE64.unpack_from(v, q)
            q += 8
        self._memsize_list.append(RamBlock(idstr, used, page_size, addr))
        self._memsize_left -= used
        if not self._memsize_left:
            self._finish_memsize(events)
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
            raise self._fail(
                "postcopy stream with huge-page RAM blocks and x-ignore-shared: pass "
                "block_page_sizes so the block list can be parsed", offset)
        # Without x-ignore-shared the next field after used_length is either the page size (a
        # be64 power of two, so its first byte is 0 and its low 12 bits are clear) or what
        # follows the entry: the next entry's name length (never 0) or, after the last entry, a
        # RAM record (never without flags).
        if last:
            if end - q < 8:
                return _NEED
            (word,) = _BE64.unpack_from(v, q)
            return word != 0 and word & (word - 1) == 0 and not word & 0xFFF
        if q >= end:
            return _NEED
        return v[q] == 0

    def _finish_memsize(self, events: list[Event]) -> None:
        for b in self._memsize_list:
            raw = b.idstr.encode("latin-1")
            self.blocks[b.idstr] = b
            self._blocks_by_raw[raw] = b
        events.append(RamBlocks(self._memsize_offset, self._memsize_total,
                                tuple(self._memsize_list)))
        self._memsize_list = []
        self._state = _ST_RAM


# --- the editor ----------------------------------------------------------------------------------

class EditorOutput(NamedTuple):
    """What :meth:`PrecopyEditor.feed` returns."""

    out: list[memoryview | bytes]
    """Byte chunks to forward, in order (``writelines``-ready)."""
    events: list[Event]
    """The parser's events for the same input (dropped records have ``dropped`` set)."""


DropPage = Callable[[str, int, Union[memoryview, bytes, None]], bool]


class PrecopyEditor:
    """Re-emits a precopy stream byte-exactly, except for the page records ``drop_page`` drops.

    ``drop_page(block, index, data) -> bool`` is asked for every page record, in stream order,
    while the record is parsed: ``data`` is the content of a PAGE record (see the module's
    zero-copy contract) or ``None`` for a ZERO record. Returning true removes the whole record
    from the output, e.g. when the destination already holds exactly this content. Compare
    against the last content *forwarded* for the page (it may still be in flight, and a later
    record of the same page may differ), not against the destination's RAM as it is now; ZERO
    records are offered too so that such bookkeeping sees every record in order.

    A dropped record may have been the one naming its block (no CONTINUE flag); QEMU's
    receiver remembers the last named block, so the editor tracks the block the destination
    will believe is current and, when a kept CONTINUE record would be attributed to the wrong
    block, rewrites its header: CONTINUE cleared and the block's idstr inserted. With nothing
    dropped, the output is the input, byte for byte.

    Output lags input by at most one incomplete record (held until its end arrives);
    :meth:`flush` releases such a tail unchanged at the end of a truncated stream.
    """

    def __init__(self, drop_page: DropPage | None = None, **parser_kwargs):
        self.parser = PrecopyParser(**parser_kwargs)
        self.parser._drop = drop_page
        self.parser._out = []
        self.bytes_in = 0
        self.bytes_out = 0

    def feed(self, data: bytes | bytearray | memoryview) -> EditorOutput:
        out: list[memoryview | bytes] = []
        self.parser._out = out
        view = memoryview(data)
        self.bytes_in += view.nbytes
        events = self.parser.feed(view)
        self.bytes_out += sum(len(c) for c in out)
        return EditorOutput(out, events)

    def flush(self) -> bytes:
        """Bytes held back (an incomplete record), unchanged; empty at a record boundary."""
        tail = bytes(self.parser._carry)
        self.bytes_out += len(tail)
        return tail

    def finish(self) -> None:
        """Same check as :meth:`PrecopyParser.finish`."""
        self.parser.finish()

    @property
    def dropped_pages(self) -> int:
        return self.parser.dropped_pages

    @property
    def dropped_bytes(self) -> int:
        """Input bytes removed (whole page records)."""
        return self.parser.dropped_bytes

    @property
    def fixed_records(self) -> int:
        """Kept CONTINUE records rewritten to name their block."""
        return self.parser.fixed_records
