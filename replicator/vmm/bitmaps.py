"""Dirty-block tracking rounds for a running QEMU's disks, over QMP.

Each disk's format node carries bitmaps named ``<prefix>-<generation>``: exactly one records
guest writes; the others are frozen rounds waiting to be read and acknowledged. A round:
:meth:`DirtyTracking.rotate` (one ``transaction`` for all disks: a new recording bitmap, the old
one frozen, unacknowledged older rounds folded into it), :meth:`~DirtyTracking.export` the
frozen bitmap read-only over QEMU's NBD server (:func:`start_nbd_server`), read the dirty
extents with :class:`replicator.vmm.nbd.NbdClient` through the ``qemu:dirty-bitmap:NAME``
context, :meth:`~DirtyTracking.unexport` and, once the peer holds the data durably,
:meth:`~DirtyTracking.confirm`. The generation is in the name, so a restarted daemon needs no
local state: :meth:`~DirtyTracking.recover` rebuilds from what QEMU lists.

qcow2 (v3) disks get persistent bitmaps, which survive a clean QEMU exit; raw and qcow2 v2
disks only non-persistent ones. After a kill -9 a persistent bitmap is ``inconsistent`` and a
raw disk's is gone: the disk then needs a full hash compare (:class:`Recovery`).

**QEMU 10 aborts** (``bdrv_release_dirty_bitmap_locked: Assertion
!bdrv_dirty_bitmap_busy``) when a node with an exported persistent bitmap is inactivated:
call :meth:`~DirtyTracking.unexport_all` and let it return before migration completes or
device state is saved. Used by :mod:`replicator.source.disks`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from replicator.errors import QemuError
from replicator.vmm.disks import DISK_FORMATS, DiskInfo, query_disks
from replicator.vmm.qemu import QemuProcess

log = logging.getLogger(__name__)

_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,47}$")
_SUN_PATH_MAX = 107


@dataclasses.dataclass(frozen=True)
class Bitmap:
    """One of our bitmaps as QEMU lists it (``count`` in bytes)."""

    node: str
    name: str
    generation: int
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool
    granularity: int
    count: int


@dataclasses.dataclass(frozen=True)
class Export:
    """A read-only NBD export of one disk with one frozen bitmap."""

    id: str
    name: str
    """The NBD export name (for :meth:`NbdClient.connect_unix`)."""
    context: str
    """The meta context that lists the bitmap's dirty extents."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What :meth:`DirtyTracking.recover` found for one disk."""

    node: str
    generation: int
    """The generation now recording."""
    full_compare: bool
    """True when writes may have gone unrecorded: the disk needs a full hash compare."""
    reason: str
    oldest: int = 0
    """The oldest generation whose writes the new bitmap still holds (merged in); writes of
    that generation and later are known. Equals ``generation`` on a fresh start."""


def _desc(exc: QemuError) -> str:
    return str(getattr(exc, "desc", exc))


async def start_nbd_server(proc: QemuProcess, path: str | os.PathLike[str], *,
                           max_connections: int = 4) -> None:
    """Start QEMU's NBD server on the unix socket ``path`` (put it in a 0700 directory).

    QEMU has one NBD server at most: if one runs already (libvirt's, a backup tool's, or ours
    from before a daemon restart: :func:`stop_nbd_server` it), this raises :class:`QemuError`.
    """
    sock = os.fspath(path)
    if not sock or len(os.fsencode(sock)) > _SUN_PATH_MAX:
        raise QemuError(f"NBD socket path {sock!r} is empty or longer than {_SUN_PATH_MAX} bytes")
    try:
        # nbd-server-start takes the legacy address form ("data" wraps the path); a QEMU
        # that cannot reach our directory (libvirt's) gets a listening socket passed instead.
        started = False
        try:
            await proc.execute("nbd-server-start", {
                "addr": await proc.listen_address(Path(sock)),
                "max-connections": max_connections})
            started = True
        finally:
            await proc.listen_done(started)
    except QemuError as exc:
        if "already running" in _desc(exc):
            raise QemuError(f"QEMU {proc.name} already runs an NBD server (QEMU allows one; "
                            "is libvirt or a backup tool using it?); cannot start ours at "
                            f"{sock}") from None
        raise


async def stop_nbd_server(proc: QemuProcess) -> None:
    """Stop QEMU's NBD server (its exports go with it)."""
    await proc.execute("nbd-server-stop")


class DirtyTracking:
    """Our bitmaps on every disk of one QEMU; all state lives in QEMU.

    ``prefix`` names our bitmaps and exports (``replicator-<pairing>``); ``granularity`` (bytes,
    a power of two >= 512; QEMU's default is 64 KiB) applies to bitmaps added from now on.
    """

    def __init__(self, proc: QemuProcess, prefix: str = "replicator", *,
                 granularity: int | None = None):
        if not _PREFIX_RE.match(prefix):
            raise QemuError(f"bitmap prefix {prefix!r} must be letters, digits or ._- "
                            "(starting with a letter)")
        if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
            raise QemuError(f"bitmap granularity {granularity} must be a power of two >= 512")
        self.proc = proc
        self.prefix = prefix
        self.granularity = granularity

    def name(self, generation: int) -> str:
        return f"{self.prefix}-{generation}"

    def _generation(self, name: str) -> int | None:
        head, _, gen = name.rpartition("-")
        return int(gen) if head == self.prefix and gen.isdigit() else None

    # -- inspection -------------------------------------------------------------------------

    async def disks(self) -> list[DiskInfo]:
        """The QEMU's disks; each must be opened as raw or qcow2 with no filter on top."""
        disks = await query_disks(self.proc)
        for d in disks:
            if d.format not in DISK_FORMATS or not d.node:
                raise QemuError(f"disk {d.path} of QEMU {self.proc.name} is a {d.format!r} "
                                f"node; dirty tracking needs a raw or qcow2 format node")
        return disks

    async def _nodes(self) -> dict[str, dict[str, Any]]:
        nodes = await self.proc.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in nodes if n.get("node-name")}

    async def bitmaps(self) -> dict[str, list[Bitmap]]:
        """Our bitmaps per disk node (oldest generation first); every disk has an entry.

        Raises :class:`QemuError` while a disk is inactive (migrated away, ``postmigrate``):
        its persistent bitmaps are then stored in the image and not listed, yet not lost.
        """
        nodes = await self._nodes()
        out: dict[str, list[Bitmap]] = {}
        for disk in await self.disks():
            node = nodes.get(disk.node)
            if node is None:
                raise QemuError(f"QEMU {self.proc.name} does not list disk node {disk.node}")
            if node.get("active") is False:
                raise QemuError(f"disk node {disk.node} is inactive (migrated away?); its "
                                "bitmaps cannot be inspected until QEMU runs it again")
            mine = []
            for b in node.get("dirty-bitmaps") or []:
                gen = self._generation(str(b.get("name", "")))
                if gen is not None:
                    mine.append(Bitmap(
                        node=disk.node, name=b["name"], generation=gen,
                        recording=bool(b.get("recording")), persistent=bool(b.get("persistent")),
                        busy=bool(b.get("busy")), inconsistent=bool(b.get("inconsistent")),
                        granularity=int(b.get("granularity", 0)), count=int(b.get("count", 0))))
            out[disk.node] = sorted(mine, key=lambda b: b.generation)
        return out

    async def dirty_bytes(self) -> dict[str, int]:
        """Per disk: bytes marked dirty and not yet acknowledged (all our bitmaps' counts; a
        block dirty in two of them counts twice)."""
        return {node: sum(b.count for b in bms) for node, bms in (await self.bitmaps()).items()}

    # -- rounds -----------------------------------------------------------------------------

    def _add(self, node: str, generation: int, persistent: bool,
             granularity: int | None) -> dict[str, Any]:
        data: dict[str, Any] = {"node": node, "name": self.name(generation),
                                "persistent": persistent}
        gran = self.granularity or granularity
        if gran:
            data["granularity"] = gran
        return {"type": "block-dirty-bitmap-add", "data": data}

    async def start(self, generation: int = 1) -> None:
        """Start recording on every disk (before the initial copy): persistent on qcow2,
        non-persistent on raw (and on qcow2 v2, which cannot store bitmaps)."""
        current = await self.bitmaps()
        if any(current.values()):
            raise QemuError(f"QEMU {self.proc.name} already has {self.prefix} bitmaps; "
                            "use recover()")
        await self.add_recording(generation)

    async def add_recording(self, generation: int) -> None:
        """Start a recording bitmap of ``generation`` on every disk, whatever bitmaps of ours
        are there already (a later :meth:`recover` merges them all): persistent on qcow2."""
        for disk in await self.disks():
            action = self._add(disk.node, generation, disk.format == "qcow2", None)
            try:
                await self.proc.execute("block-dirty-bitmap-add", action["data"])
            except QemuError as exc:
                if not action["data"]["persistent"] or "qcow2 v2" not in _desc(exc):
                    raise
                action["data"]["persistent"] = False
                await self.proc.execute("block-dirty-bitmap-add", action["data"])

    async def rotate(self) -> int:
        """Freeze the recording bitmap of every disk and start the next, atomically; older
        unacknowledged rounds are merged into the frozen one. Returns the frozen generation."""
        current = await self.bitmaps()
        if any(b.busy for bms in current.values() for b in bms) and await self._exports():
            # A round cut short can leave its export behind: a cancelled command that was
            # already on its way (libvirt runs each in a thread of its own) may land after the
            # round's cleanup looked. Nothing reads a frozen bitmap between rounds.
            log.warning("QEMU %s: removing a leftover export of a dirty bitmap", self.proc.name)
            await self.unexport_all()
            current = await self.bitmaps()
        actions: list[dict[str, Any]] = []
        frozen_gens = set()
        for node, bms in current.items():
            recording = [b for b in bms if b.recording]
            if len(recording) != 1 or any(b.inconsistent for b in bms):
                raise QemuError(f"disk node {node} has {len(recording)} recording "
                                f"{self.prefix} bitmaps; recover() first")
            if any(b.busy for b in bms):
                raise QemuError(f"disk node {node} has an exported bitmap; unexport first")
            rec = recording[0]
            older = [b.name for b in bms if b is not rec]
            frozen_gens.add(rec.generation)
            actions.append(self._add(node, rec.generation + 1, rec.persistent, rec.granularity))
            actions.append({"type": "block-dirty-bitmap-disable",
                            "data": {"node": node, "name": rec.name}})
            if older:
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": rec.name, "bitmaps": older}})
                actions += [{"type": "block-dirty-bitmap-remove",
                             "data": {"node": node, "name": name}} for name in older]
        if len(frozen_gens) > 1:
            raise QemuError(f"disks record different generations {sorted(frozen_gens)}; "
                            "recover() first")
        if not actions:
            raise QemuError(f"QEMU {self.proc.name} has no disks to track")
        await self.proc.execute("transaction", {"actions": actions})
        return frozen_gens.pop()

    async def export(self, node: str, generation: int) -> Export:
        """Export ``node`` read-only over the NBD server with its frozen bitmap ``generation``.

        The bitmap becomes busy until :meth:`unexport`. Unexport before anything inactivates
        the disk (migration completion, device-state save): QEMU 10 aborts otherwise.
        """
        exp = Export(id=f"{self.prefix}-{node}", name=node,
                     context=f"qemu:dirty-bitmap:{self.name(generation)}")
        await self.proc.execute("block-export-add", {
            "type": "nbd", "id": exp.id, "node-name": node, "name": exp.name,
            "writable": False, "bitmaps": [self.name(generation)]})
        return exp

    async def _exports(self) -> list[str]:
        return [e["id"] for e in await self.proc.execute("query-block-exports")
                if str(e.get("id", "")).startswith(f"{self.prefix}-")]

    async def unexport(self, node: str, *, timeout: float = 10.0) -> None:
        """Remove ``node``'s export (``hard``: close the own client first) and wait until
        QEMU has let it go. Does nothing if it is not exported."""
        await self._delete([f"{self.prefix}-{node}"], timeout)

    async def unexport_all(self, *, timeout: float = 10.0) -> None:
        """Remove all our exports and wait until they are gone; required before migration
        completes or device state is saved (see the module's note on QEMU's abort)."""
        await self._delete(await self._exports(), timeout)

    async def _delete(self, ids: list[str], timeout: float) -> None:
        present = set(await self._exports())
        for export_id in ids:
            if export_id in present:
                await self.proc.execute("block-export-del", {"id": export_id, "mode": "hard"})
        deadline = time.monotonic() + timeout
        while set(ids) & set(await self._exports()):
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU {self.proc.name} still has exports {sorted(ids)} "
                                f"{timeout:g}s after deleting them")
            await asyncio.sleep(0.005)

    async def confirm(self, generation: int) -> None:
        """The round ``generation`` is durable on the peer: remove its bitmaps (unexport
        first: a busy bitmap cannot be removed)."""
        name = self.name(generation)
        actions = [{"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}
                   for node, bms in (await self.bitmaps()).items()
                   if any(b.name == name and not b.recording for b in bms)]
        if actions:
            await self.proc.execute("transaction", {"actions": actions})

    async def recover(self) -> list[Recovery]:
        """Make every disk record into one fresh generation after a daemon or QEMU restart.

        Leftover exports are removed. Consistent bitmaps (recording and unacknowledged frozen
        ones) are merged into the new one: nothing is lost. Inconsistent bitmaps (QEMU killed
        while a persistent bitmap was in use) can only be removed, and a disk with none of our
        bitmaps (raw after a QEMU restart; qcow2 after a kill -9 of the QEMU that added the
        bitmap, since QEMU writes a new bitmap to the image only on a clean exit) cannot tell
        what changed: both get a fresh bitmap and ``full_compare``.
        """
        await self.unexport_all()
        current = await self.bitmaps()
        disks = {d.node: d for d in await self.disks()}
        known = [b.generation for bms in current.values() for b in bms]
        # A fresh lineage starts at a random generation: a peer that holds a generation of an
        # earlier lineage (another image, bitmaps lost) cannot mistake it for one of ours.
        gen = 1 + max(known) if known else secrets.randbelow(1 << 40) + 1
        actions: list[dict[str, Any]] = []
        out: list[Recovery] = []
        for node, bms in current.items():
            if any(b.inconsistent for b in bms):
                for b in bms:       # not in a transaction: an inconsistent bitmap refuses most
                    await self.proc.execute("block-dirty-bitmap-remove",
                                            {"node": node, "name": b.name})
                reason = "dirty bitmap inconsistent (QEMU did not exit cleanly)"
                bms = []
            else:
                reason = ("no dirty bitmap (non-persistent bitmap lost with its QEMU, or "
                          "tracking never started)")
            persistent = any(b.persistent for b in bms) if bms else disks[node].format == "qcow2"
            granularity = bms[-1].granularity if bms else None
            actions.append(self._add(node, gen, persistent, granularity))
            if bms:
                names = [b.name for b in bms]
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": self.name(gen),
                                         "bitmaps": names}})
                actions += [{"type": "block-dirty-bitmap-remove",
                             "data": {"node": node, "name": name}} for name in names]
                reason = f"merged {', '.join(names)}"
            out.append(Recovery(node=node, generation=gen, full_compare=not bms, reason=reason,
                                oldest=min((b.generation for b in bms), default=gen)))
        if actions:
            try:
                await self.proc.execute("transaction", {"actions": actions})
            except QemuError as exc:
                if "qcow2 v2" not in _desc(exc):
                    raise
                for a in actions:   # a qcow2 v2 image: no persistent bitmaps at all
                    if a["type"] == "block-dirty-bitmap-add":
                        a["data"]["persistent"] = False
                await self.proc.execute("transaction", {"actions": actions})
        return out
