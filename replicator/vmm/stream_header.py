"""The start of a QEMU migration stream: header and CONFIGURATION section (no I/O)."""

from __future__ import annotations

import dataclasses
import struct

from replicator.errors import QemuError


class MigrationStreamError(QemuError):
    """A migration stream is malformed, or lacks what the receiving side requires."""


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    """What :func:`parse_stream_header` read from the start of a migration stream."""

    version: int
    machine: str
    """Machine type the source ran (e.g. ``pc-q35-10.0``); the destination must match it."""
    capabilities: frozenset[str]
    """Capabilities listed in the CONFIGURATION section (only those QEMU cross-checks, e.g.
    ``x-ignore-shared``, ``mapped-ram``); empty when the section has none."""
    uuid: bytes | None = None
    """Source VM UUID, present when ``validate-uuid`` is on."""


_QEVM_MAGIC = 0x5145564D
_SECTION_CONFIGURATION = 0x07
_SUBSECTION = 0x05


def parse_stream_header(data: bytes) -> StreamHeader:
    """Parse the header and CONFIGURATION section of a QEMU migration stream.

    Layout (big-endian; see docs/devel/migration in QEMU): be32 ``"QEVM"``, be32 version (3), u8
    0x07, be32 length + machine name, then optional subsections ``{u8 0x05, u8 n, name, be32
    version, fields}``: ``configuration/target-page-bits`` (be32), ``configuration/capabilities``
    (be32 count, ``count`` x {u8 n, name}) and ``configuration/uuid`` (16 bytes).
    Raises :class:`MigrationStreamError` on anything else.
    """
    view = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise MigrationStreamError(f"migration stream truncated in {what} (offset {pos})")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    def be32(what: str) -> int:
        return struct.unpack(">I", take(4, what))[0]

    def u8(what: str) -> int:
        return take(1, what)[0]

    def text(n: int, what: str) -> str:
        raw = bytes(take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MigrationStreamError(f"non-ASCII {what} in migration stream: {raw!r}") from None

    magic = be32("header")
    if magic != _QEVM_MAGIC:
        raise MigrationStreamError(f"not a QEMU migration stream (magic {magic:#010x})")
    version = be32("header")
    if version != 3:
        raise MigrationStreamError(f"unsupported migration stream version {version}")
    kind = u8("section type")
    if kind != _SECTION_CONFIGURATION:
        raise MigrationStreamError(
            f"migration stream has no CONFIGURATION section (found section type {kind:#04x})"
        )
    machine = text(be32("machine name length"), "machine name")
    caps: set[str] = set()
    uuid: bytes | None = None
    while pos < len(view) and view[pos] == _SUBSECTION:
        pos += 1
        name = text(u8("subsection name length"), "subsection name")
        be32(f"{name} version")
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "capabilities":
            for _ in range(be32("capability count")):
                caps.add(text(u8("capability name length"), "capability name"))
        elif leaf == "target-page-bits":
            be32("target-page-bits")
        elif leaf == "uuid":
            uuid = bytes(take(16, "uuid"))
        else:
            # Subsections carry no length, so an unknown one cannot be skipped.
            raise MigrationStreamError(f"unknown CONFIGURATION subsection {name!r}")
    return StreamHeader(version=version, machine=machine, capabilities=frozenset(caps), uuid=uuid)


def stream_capabilities(data: bytes) -> set[str]:
    """Capabilities a migration stream says were on at the source (from its CONFIGURATION section).

    ``{"x-ignore-shared"}`` for a stream made by :meth:`QemuProcess.save_device_state`; an empty
    set for a plain migration stream. Raises :class:`MigrationStreamError` if ``data`` does not
    start with a well-formed header (a few hundred bytes are enough).
    """
    return set(parse_stream_header(data).capabilities)
