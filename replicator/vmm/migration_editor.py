"""Sans-I/O editor of QEMU's precopy migration stream: forward it minus the pages not needed.

:class:`PrecopyEditor` re-emits the stream a migrating QEMU sends byte-exactly, except for PAGE
records the shadow already holds, repairing the ``CONTINUE`` shorthand so that the destination
still knows which block every kept record belongs to. It does no I/O: feed it chunks of any
size; it returns the bytes to forward and the parser's events
(:class:`~replicator.vmm.migration_stream.PrecopyParser`, whose zero-copy contract applies to
the output chunks too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Union

from replicator.vmm.migration_format import Event
from replicator.vmm.migration_stream import PrecopyParser

__all__ = ["EditorOutput", "DropPage", "PrecopyEditor"]


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
