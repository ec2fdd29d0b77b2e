"""Disk images of a QEMU VM: their format, checked on this host, and read from a running QEMU.

A disk's format decides how QEMU interprets the file: a qcow2 image opened as ``raw`` shows the
guest the container (and its writes corrupt the image); a raw image opened as ``qcow2`` lets
whoever wrote its first bytes choose further files for QEMU to open (backing file, external
data file). So a format is never assumed: it comes from the config, or from the file's magic
(raw is what has no known magic), and the shadow cross-checks it with what the source's running
QEMU reports (:func:`query_disks`).

Only self-contained images are used: a qcow2 header naming a backing file or an external data
file is refused (:func:`check_image`), and :func:`~replicator.vmm.spec.build_argv` opens qcow2
with ``backing: null``, because those names are host paths chosen by whoever can write the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

from replicator.errors import QemuError

#: Formats replicator gives QEMU (``-blockdev driver=...``).
DISK_FORMATS = ("raw", "qcow2")

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One disk of a :class:`~replicator.vmm.spec.VmSpec`: an image and its format."""

    path: Path
    format: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise QemuError(f"disk path must be a path, not {type(self.path).__name__}")
        object.__setattr__(self, "path", Path(self.path))
        text = str(self.path)
        if not text or "\0" in text or "\n" in text:
            raise QemuError(f"invalid disk path {text!r}")
        if self.format not in DISK_FORMATS:
            raise QemuError(f"disk {text}: format {self.format!r} must be one of "
                            f"{', '.join(DISK_FORMATS)}")


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """A disk as a running QEMU has it open (``query-block``)."""

    path: str
    format: str
    node: str


def probe_format(path: str | os.PathLike[str]) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw`` (QEMU's own rule for these
    two formats). Raises :class:`QemuError` when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise QemuError(f"cannot read disk {path} to find its format: "
                        f"{exc.strerror or exc}") from None
    return "qcow2" if magic == _QCOW2_MAGIC else "raw"


def check_image(disk: DiskSpec) -> None:
    """Refuse an image whose header names other host files, or that is not of its format.

    For qcow2: the header must carry the qcow2 magic and name neither a backing file nor an
    external data file (QEMU would open those paths; on shared storage the peer can write
    them). For raw: the file must not start with the qcow2 magic (it would be a qcow2 image
    that the config or the peer calls raw).
    """
    try:
        with open(disk.path, "rb") as f:
            head = f.read(104)
    except OSError as exc:
        raise QemuError(f"cannot read disk {disk.path}: {exc.strerror or exc}") from None
    is_qcow2 = head[:4] == _QCOW2_MAGIC
    if disk.format == "raw":
        if is_qcow2:
            raise QemuError(f"disk {disk.path} is a qcow2 image but is to be attached as raw")
        return
    if not is_qcow2 or len(head) < 72:
        raise QemuError(f"disk {disk.path} is not a qcow2 image (no qcow2 header)")
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    if backing_offset:
        raise QemuError(f"disk {disk.path}: qcow2 images with a backing file are not supported "
                        "(the backing file's path would come from the image, not the config)")
    if version >= 3 and len(head) >= 80:
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise QemuError(f"disk {disk.path}: qcow2 images with an external data file are "
                            "not supported (its path would come from the image, not the config)")


def blockdev(disk: DiskSpec, node: str) -> dict[str, Any]:
    """The ``-blockdev`` tree for ``disk``: format node ``node`` over file node ``node-file``."""
    tree: dict[str, Any] = {
        "driver": disk.format, "node-name": node,
        "file": {"driver": "file", "filename": str(disk.path), "node-name": f"{node}-file"},
    }
    if disk.format == "qcow2":
        tree["backing"] = None      # never a path from the image header
    return tree


def _plain_filename(name: str) -> str:
    """The image's file name: QEMU reports ``json:{...}`` when options changed how it opened
    the image (e.g. ``backing: null`` over a header that names a backing file)."""
    if not name.startswith("json:"):
        return name
    try:
        node = json.loads(name[5:])
    except ValueError:
        return name
    while isinstance(node, dict):
        if isinstance(node.get("filename"), str):
            return node["filename"]
        node = node.get("file")
    return name


async def query_disks(proc: Any) -> list[DiskInfo]:
    """Every disk image a running QEMU has attached, with the format QEMU opened it as and its
    format node's name (``query-block``; drives without a medium are skipped). ``proc`` is a
    :class:`~replicator.vmm.qemu.QemuProcess`."""
    out: list[DiskInfo] = []
    for dev in await proc.execute("query-block"):
        inserted = dev.get("inserted")
        if not inserted:
            continue
        image = inserted.get("image") or {}
        out.append(DiskInfo(path=_plain_filename(str(image.get("filename")
                                                     or inserted.get("file", ""))),
                            format=str(image.get("format") or inserted.get("drv", "")),
                            node=str(inserted.get("node-name", ""))))
    return out
