"""QEMU's precopy migration stream (the main channel): its format, as the parser reports it.

Here: the stream's wire constants, :class:`PrecopyStreamError`, and the events the parser
reports (one dataclass per kind of record; :data:`Event` is any of them). The parser is
:mod:`replicator.vmm.migration_stream`, its header and RAM-block-list scanners are
:mod:`replicator.vmm.migration_preamble`, the editor that drops page records is
:mod:`replicator.vmm.migration_editor`.

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
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from replicator.errors import ProtocolError
from replicator.vmm.stream_header import StreamHeader

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
    "COMMAND_NAMES",
    "unsupported_flags_error",
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

QEVM_MAGIC = 0x5145564D
QEVM_MAGIC_BYTES = b"QEVM"
FILE_VERSION = 3

SEC_EOF = 0x00
SEC_START = 0x01
SEC_PART = 0x02
SEC_END = 0x03
SEC_FULL = 0x04
SUBSECTION = 0x05
SEC_VMDESCRIPTION = 0x06               # after EOF; only ever inside the opaque tail
SEC_CONFIGURATION = 0x07
SEC_COMMAND = 0x08
SEC_FOOTER = 0x7E

RAM_IDSTR = b"ram"
RAM_VERSION = 4

F_OBSOLETE_FULL = 0x01                 # not sent since QEMU 1.x: refused as unknown
F_ZERO = 0x02
F_MEM_SIZE = 0x04
F_PAGE = 0x08
F_EOS = 0x10
F_CONTINUE = 0x20
F_XBZRLE = 0x40
F_HOOK = 0x80
F_COMPRESS_PAGE = 0x100
F_MULTIFD_FLUSH = 0x200

CMD_PACKAGED = 7
CMD_POSTCOPY_ADVISE = 3

#: QEMU's migration commands (``MIG_CMD_*`` in migration/savevm.c): number -> (name, payload
#: length or ``None`` for variable).
COMMANDS: dict[int, tuple[str, int | None]] = {
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
COMMAND_NAMES: Mapping[int, str] = {k: v[0] for k, v in COMMANDS.items()}

BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
CMD_HDR = struct.Struct(">BHH")        # 0x08, cmd, len
SEC_ID = struct.Struct(">BI")          # type, section id
INST_VER = struct.Struct(">II")        # instance id, version id
FOOTER = struct.Struct(">BI")          # 0x7E, section id

DEFAULT_PAGE_BITS = 12                 # x86 (no target-page-bits subsection)
MAX_PAGE_BITS = 24                     # sanity bound for target-page-bits


# --- events ----------------------------------------------------------------------------------

class PageKind(enum.Enum):
    ZERO = "zero"
    PAGE = "page"


class SectionKind(enum.Enum):
    START = "start"
    PART = "part"
    END = "end"
    FULL = "full"


SECTION_KINDS = {SEC_START: SectionKind.START, SEC_PART: SectionKind.PART,
                  SEC_END: SectionKind.END, SEC_FULL: SectionKind.FULL}


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


def unsupported_flags_error(flags: int, offset: int) -> PrecopyStreamError:
    """The error for a RAM record whose ``flags`` name no record this parser handles."""
    kind = flags & ~F_CONTINUE
    if kind & F_XBZRLE:
        msg = ("XBZRLE page record: the xbzrle capability is not supported "
               "(its pages are deltas against a cache)")
    elif kind & F_MULTIFD_FLUSH:
        msg = ("MULTIFD_FLUSH record: multifd streams are not supported "
               "(their pages travel on other channels)")
    elif kind & F_HOOK:
        msg = "RAM_SAVE_FLAG_HOOK record: RDMA migration is not supported"
    elif kind & F_COMPRESS_PAGE:
        msg = ("COMPRESS_PAGE record: compressed migration (removed in QEMU 9.1) "
               "is not supported")
    else:
        msg = f"unknown RAM record flags {flags:#x}"
    return PrecopyStreamError(msg, offset=offset)
