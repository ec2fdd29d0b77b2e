"""Sans-I/O parser of QEMU's precopy migration stream (the main channel).

:class:`PrecopyParser` sees every guest-RAM page record of the stream a migrating QEMU sends,
with its RAM block, page index and, for normal pages, the 4096 bytes themselves. It does no I/O:
feed it chunks of any size (a boundary may fall anywhere, inside a page or a be64 header); it
returns the events found (:mod:`replicator.vmm.migration_format`, which also describes the
stream). The editor built on it is :mod:`replicator.vmm.migration_editor`.

Zero-copy contract: a normal page's ``data`` (and an :class:`Opaque` event's ``data``, and the
editor's output chunks) is usually a ``memoryview`` into the buffer passed to ``feed``; it stays
valid as long as that buffer is not modified. Feed ``bytes`` (immutable) or copy what you keep
(``bytes(ev.data)``). Parts of records that straddle two ``feed`` calls are copied into
``bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from replicator.vmm.migration_format import (BE32, BE64, CMD_HDR, CMD_PACKAGED,
                                             CMD_POSTCOPY_ADVISE, COMMANDS, DEFAULT_PAGE_BITS,
                                             F_CONTINUE, F_EOS, F_MEM_SIZE, F_PAGE, F_ZERO,
                                             FOOTER, INST_VER, RAM_IDSTR, RAM_VERSION,
                                             SEC_COMMAND, SEC_CONFIGURATION, SEC_END, SEC_EOF,
                                             SEC_FOOTER, SEC_FULL, SEC_ID, SEC_PART, SEC_START,
                                             SECTION_KINDS, Command, DeviceStateBegin, Event,
                                             Header, Opaque, PageKind, PageRecord,
                                             PrecopyStats, PrecopyStreamError, RamBlock,
                                             RamBlocks, RamEos, SectionBegin, SectionEnd,
                                             SectionKind, unsupported_flags_error)
from replicator.vmm.migration_preamble import BlockListScanner, scan_header
from replicator.vmm.stream_header import StreamHeader

__all__ = ["PrecopyParser"]

_APPEND = 16384                         # bytes moved into the carry buffer per step

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
        self.page_size = 1 << DEFAULT_PAGE_BITS
        self._flag_mask = self.page_size - 1
        self.blocks: dict[str, RamBlock] = {}
        self._blocks_by_raw: dict[bytes, RamBlock] = {}
        self._ignore_shared = False
        self._postcopy_summary: int | None = None   # from POSTCOPY_ADVISE (postcopy-ram)

        self._ram_section_id: int | None = None
        self._section_kind: SectionKind | None = None
        self._section_id = 0
        self._block_list: BlockListScanner | None = None   # while in the MEM_SIZE list
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
                    assert self._block_list is not None
                    newpos = self._block_list.scan_entry(v, pos, end, base)
                    if newpos is _NEED:
                        break
                    pos = newpos
                    if self._block_list.done:
                        self._finish_memsize(events)
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
        unpack64 = BE64.unpack_from
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
            kind = flags & ~F_CONTINUE
            if kind == F_PAGE or kind == F_ZERO:
                p = pos + 8
                if flags & F_CONTINUE:
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
                if kind == F_PAGE:
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
            if kind == F_EOS:
                pos += 8
                sk = self._section_kind
                if sk is SectionKind.PART:
                    self.iterations += 1
                append(RamEos(base + pos - 8, sk, self._section_id, self.iterations,
                              self.normal_pages, self.zero_pages, base + pos))
                self._state = _ST_AFTER_EOS
                return pos, emit
            if kind == F_MEM_SIZE:
                if flags & F_CONTINUE:
                    raise self._fail("MEM_SIZE record with CONTINUE", base + pos)
                if self._section_kind is not SectionKind.START:
                    raise self._fail("MEM_SIZE record outside the RAM setup section", base + pos)
                self._block_list = BlockListScanner(
                    base + pos, addr, known=self._blocks_by_raw,
                    ignore_shared=self._ignore_shared, postcopy_summary=self._postcopy_summary,
                    block_page_sizes=self._block_page_sizes, host_page_size=self._host_page_size)
                pos += 8
                if addr == 0:
                    self._finish_memsize(events)
                else:
                    self._state = _ST_MEMSIZE
                return pos, emit
            raise unsupported_flags_error(flags, base + pos)
        return (pos if progressed else _NEED), emit

    def _named_header(self, word: int, block: RamBlock) -> bytes:
        raw = block.idstr.encode("latin-1")
        return BE64.pack(word & ~F_CONTINUE) + bytes((len(raw),)) + raw

    # -- header ---------------------------------------------------------------------------

    def _parse_header(self, v: memoryview, pos: int, end: int, events: list[Event],
                      base: int) -> int | None:
        scanned = scan_header(v, pos, end, base)
        if scanned is None:
            return _NEED
        q, header, page_bits = scanned
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
        if kind == SEC_PART or kind == SEC_END:
            if avail < 5:
                return _NEED
            (_, sid) = SEC_ID.unpack_from(v, pos)
            if self._ram_section_id is None or sid != self._ram_section_id:
                raise self._fail(
                    f"{SECTION_KINDS[kind].name} of section {sid}, which is not the RAM section "
                    "(iterative sections other than RAM are not supported)", base + pos)
            sk = SECTION_KINDS[kind]
            events.append(SectionBegin(base + pos, sk, sid))
            self._section_kind = sk
            self._section_id = sid
            self._state = _ST_RAM
            return pos + 5
        if kind == SEC_COMMAND:
            if avail < 5:
                return _NEED
            (_, cmd, length) = CMD_HDR.unpack_from(v, pos)
            spec = COMMANDS.get(cmd)
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
            if cmd == CMD_POSTCOPY_ADVISE and length == 16:
                self._postcopy_summary = BE64.unpack_from(data, 0)[0]
            if cmd == CMD_PACKAGED:
                (self._packaged_left,) = BE32.unpack(data)
                if self._packaged_left:
                    self._state = _ST_PACKAGED
            return pos + 5 + length
        if kind == SEC_START or kind == SEC_FULL:
            if avail < 6:
                return _NEED
            n = v[pos + 5]
            if avail < 6 + n + 8:
                return _NEED
            (_, sid) = SEC_ID.unpack_from(v, pos)
            raw = bytes(v[pos + 6:pos + 6 + n])
            instance, version = INST_VER.unpack_from(v, pos + 6 + n)
            idstr = raw.decode("latin-1")
            if kind == SEC_FULL:
                raise self._fail(
                    f"device section {idstr!r} before the RAM END section (early-setup devices "
                    "such as virtio-mem are not supported: device state cannot be skipped)",
                    base + pos)
            if raw != RAM_IDSTR:
                raise self._fail(f"iterative section {idstr!r} is not supported (only RAM; "
                                 "its records carry no length)", base + pos)
            if self._ram_section_id is not None:
                raise self._fail("second RAM START section", base + pos)
            if version != RAM_VERSION:
                raise self._fail(f"RAM section version {version} (expected {RAM_VERSION})",
                                 base + pos)
            self._ram_section_id = sid
            self._section_kind = SectionKind.START
            self._section_id = sid
            events.append(SectionBegin(base + pos, SectionKind.START, sid, idstr, instance,
                                       version))
            self._state = _ST_RAM
            return pos + 6 + n + 8
        if kind == SEC_EOF:
            # A stream without (or before) RAM END: whatever follows is opaque.
            self._enter_device_state(events, base + pos)
            return pos
        if kind == SEC_CONFIGURATION:
            raise self._fail("second CONFIGURATION section", base + pos)
        raise self._fail(f"unknown section type {kind:#04x}", base + pos)

    def _parse_after_eos(self, v: memoryview, pos: int, end: int, events: list[Event],
                         base: int) -> int | None:
        sk = self._section_kind
        sid = self._section_id
        if v[pos] == SEC_FOOTER:
            if end - pos < 5:
                return _NEED
            (_, fid) = FOOTER.unpack_from(v, pos)
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

    def _finish_memsize(self, events: list[Event]) -> None:
        scanner = self._block_list
        assert scanner is not None
        for b in scanner.blocks:
            raw = b.idstr.encode("latin-1")
            self.blocks[b.idstr] = b
            self._blocks_by_raw[raw] = b
        events.append(RamBlocks(scanner.offset, scanner.total, tuple(scanner.blocks)))
        self._block_list = None
        self._state = _ST_RAM
