"""Disk copies, sink side: this host's own copy of each of the source's disks.

Each copy is an image of this host (qcow2 or raw; the path from ``domain.qemu.disks`` at the
same position, else ``<state_dir>/<domain>/disk<i>.<format>``), created sparse when missing
and written only through a ``qemu-nbd`` this daemon runs on a 0600 unix socket
(:class:`~replicator.vmm.blockio.QemuNbd`), so QEMU's own code keeps a qcow2 consistent. Every
block is verified against its hash before it is written (:func:`~replicator.wire.blocks.
decode_blocks`).

Durability: ``disk<i>.state.json`` holds the generation the copy is complete up to and a
``clean`` flag, and ``disk<i>.manifest`` every block's hash. The first batch of a round marks
the state unclean; the round's end flushes the copy, writes the manifest and marks it clean at
the new generation, and only then is it acknowledged. A copy found unclean (a crash in the
middle of a round) is re-hashed from its contents and reported at generation 0, so the source
compares every block: nothing acknowledged is trusted without proof.

At a switch the source compares digests (:meth:`DiskCopies.verify`) and the copies are
released: ``qemu-nbd`` flushes and exits, and the shadow QEMU may open them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..durable import atomic_write
from ..errors import LayoutMismatch, NbdError, ProtocolError, QemuError, StoreError
from ..link import Link
from ..metrics import Metrics
from ..vmm.blockio import (QemuNbd, create_image, hash_disk, image_info, write_blocks,
                           zero_blocks)
from ..vmm.disks import DISK_FORMATS, DiskSpec, check_image, probe_format
from ..vmm.nbd import NbdClient
from ..wire import messages as m
from ..wire.blocks import (BLOCK_SIZE, MAX_DISK_BYTES, ZERO_BLOCK_HASH, block_count,
                           decode_blocks, digest)

log = logging.getLogger(__name__)

MANIFEST_CHUNK_BLOCKS = 512 * 1024
#: Batches being written into one copy at a time.
WRITES_IN_FLIGHT = 8
#: Manifest value of a block whose content is not known (never an xxh3 the source sends:
#: a block with this "hash" is always sent again).
UNKNOWN = np.uint64(0)
MAX_DISKS = 16
MAX_GENERATION = 1 << 62


@dataclass
class _Copy:
    index: int
    spec: DiskSpec
    size: int
    nblocks: int
    hashes: np.ndarray
    generation: int
    nbd: QemuNbd
    client: NbdClient | None = None
    dirty: bool = False              # a round is being applied (state says unclean)
    written: int = 0
    writes: list[asyncio.Future] = field(default_factory=list)    # in flight, oldest first


class DiskCopies:
    """The copies of one domain's disks and their writers."""

    def __init__(self, cfg: Config, root: Path, metrics: Metrics):
        self.cfg = cfg
        self.root = root
        self.metrics = metrics
        self.copies: list[_Copy] = []
        self.released = False

    @property
    def opened(self) -> bool:
        return bool(self.copies)

    def specs(self) -> tuple[DiskSpec, ...]:
        """The copies, as the shadow QEMU opens them."""
        return tuple(c.spec for c in self.copies)

    # --- opening ---------------------------------------------------------------------------

    def _path_and_format(self, i: int, src: m.DiskInfo) -> tuple[Path, str]:
        listed = self.cfg.domain.qemu.disks
        if listed:
            d = listed[i]
            fmt = d.format
            if fmt == "auto":
                fmt = probe_format(d.path) if d.path.exists() else src.format
            return d.path, fmt
        return self.root / f"disk{i}.{src.format}", src.format

    def _check_offer(self, disks: tuple[m.DiskInfo, ...]) -> None:
        listed = self.cfg.domain.qemu.disks
        if len(disks) > MAX_DISKS:
            raise LayoutMismatch(f"the source offers {len(disks)} disks, more than {MAX_DISKS}")
        if listed and len(listed) != len(disks):
            raise LayoutMismatch(
                f"the source's VM has {len(disks)} disk(s), this laptop's domain.qemu.disks "
                f"lists {len(listed)} copies; list one copy per disk, in the source's order "
                "(or none: copies then live in the state directory)")
        for i, d in enumerate(disks):
            if d.index != i or d.block_size != BLOCK_SIZE or d.format not in DISK_FORMATS:
                raise LayoutMismatch(f"disk {i}: unsupported layout (index {d.index}, block "
                                     f"size {d.block_size}, format {d.format!r})")
            if not 0 < d.size <= MAX_DISK_BYTES or d.size % 512:
                raise LayoutMismatch(f"disk {i}: impossible size {d.size}")

    async def open(self, disks: tuple[m.DiskInfo, ...],
                   source_paths: tuple[str, ...] = ()) -> None:
        """Get a copy of every offered disk ready to write (creating missing ones).
        ``source_paths``: where the source's QEMU has its disks (its description): a copy may
        not be one of them (a config from the days of shared storage would have the copy
        written into the running VM's own disk)."""
        self._check_offer(disks)
        for i in range(len(disks)):
            path, _ = self._path_and_format(i, disks[i])
            if any(_same_file(path, p) for p in source_paths):
                raise LayoutMismatch(
                    f"disk {i}: this laptop's copy {path} is the desktop VM's own disk (shared "
                    "storage?). replicator copies disks now: give the laptop a path of its own "
                    "in domain.qemu.disks (or leave disks out: copies go to the state dir)")
        if self.copies:
            # Writes of an earlier session must land (or fail, leaving their blocks unknown)
            # before this one's: a stale write landing late would undo a newer one.
            with contextlib.suppress(Exception):
                await self.settle()
            if [(c.size, c.index) for c in self.copies] != [(d.size, d.index) for d in disks]:
                raise LayoutMismatch("the source's disks changed during this daemon's run; "
                                     "restart it")
            await self._start_writers()
            return
        copies = []
        try:
            for i, d in enumerate(disks):
                path, fmt = self._path_and_format(i, d)
                if not path.exists():
                    log.info("disk %d: creating the copy %s (%s, %d MiB, sparse)", i, path, fmt,
                             d.size >> 20)
                    await create_image(path, fmt, d.size)
                spec = DiskSpec(path, fmt)
                check_image(spec)
                info = await image_info(path)
                if info.get("format") != fmt:
                    raise LayoutMismatch(f"disk copy {path} is {info.get('format')}, the config "
                                         f"says {fmt}")
                if int(info.get("virtual-size", -1)) != d.size:
                    raise LayoutMismatch(
                        f"disk copy {path} holds {info.get('virtual-size')} bytes, the source's "
                        f"disk {i} has {d.size}; remove or resize the copy")
                sock = self.root / "nbd" / f"copy{i}.sock"
                copies.append(_Copy(i, spec, d.size, block_count(d.size),
                                    np.empty(0, dtype=np.uint64), 0, QemuNbd(path, fmt, sock)))
            self.copies = copies
            await self._start_writers()
            for c in copies:
                await self._load(c)
        except BaseException:
            self.copies = copies
            await self.close()
            self.copies = []
            raise

    async def _start_writers(self) -> None:
        (self.root / "nbd").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "nbd", 0o700)
        for c in self.copies:
            if c.nbd.running and c.client is not None and not c.client.closed:
                continue
            if c.client is not None:
                await c.client.close()
                c.client = None
            await c.nbd.stop()
            await c.nbd.start()
            c.client = await c.nbd.connect()
        self.released = False

    def _state_path(self, c: _Copy) -> Path:
        return self.root / f"disk{c.index}.state.json"

    def _manifest_path(self, c: _Copy) -> Path:
        return self.root / f"disk{c.index}.manifest"

    async def _load(self, c: _Copy) -> None:
        """The copy's manifest: from disk when its state is clean, else hashed anew."""
        try:
            state = json.loads(self._state_path(c).read_text())
            raw = self._manifest_path(c).read_bytes()
            ok = (state.get("clean") is True and state.get("size") == c.size
                  and state.get("path") == str(c.spec.path) and len(raw) == 8 * c.nblocks)
        except (OSError, ValueError):
            ok, state, raw = False, {}, b""
        if ok:
            c.hashes = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
            c.generation = int(state.get("generation", 0))
            return
        if state:
            log.warning("disk copy %s was left in the middle of a round; hashing it anew "
                        "(the source compares every block)", c.spec.path)
        assert c.client is not None
        c.hashes = await hash_disk(c.client, c.size)
        c.generation = 0
        await asyncio.to_thread(self._persist, c)

    def _persist(self, c: _Copy) -> None:
        try:
            atomic_write(self._manifest_path(c), c.hashes.astype("<u8").tobytes())
            self._write_state(c, clean=True)
        except OSError as exc:
            raise StoreError(f"cannot save the state of disk copy {c.spec.path}: "
                             f"{exc.strerror or exc}") from None

    def _write_state(self, c: _Copy, *, clean: bool) -> None:
        atomic_write(self._state_path(c), json.dumps({
            "generation": c.generation, "clean": clean, "size": c.size,
            "path": str(c.spec.path), "format": c.spec.format}))

    async def send_manifests(self, link: Link) -> None:
        for c in self.copies:
            h = c.hashes
            for first in range(0, max(len(h), 1), MANIFEST_CHUNK_BLOCKS):
                await link.send(m.DiskManifest(
                    c.index, first, h[first:first + MANIFEST_CHUNK_BLOCKS].astype("<u8").tobytes()))
        await link.send(m.DiskOpened(tuple(c.generation for c in self.copies)))

    # --- writing ---------------------------------------------------------------------------

    def _copy(self, index: int) -> _Copy:
        if not self.copies:
            raise ProtocolError("disk data before DiskOpen")
        if self.released:
            raise ProtocolError("disk data after the copies were released for a switch")
        if not 0 <= index < len(self.copies):
            raise ProtocolError(f"batch for unknown disk {index}")
        return self.copies[index]

    async def apply(self, batch: m.DiskBatch) -> int:
        """Verify and write one batch; returns the bytes it covers."""
        c = self._copy(batch.disk)
        if not 0 < batch.generation < MAX_GENERATION:
            raise ProtocolError(f"disk round {batch.generation} is out of range")
        decoded = await asyncio.to_thread(decode_blocks, batch, c.nblocks)
        if not c.dirty:
            # Before the first write of a round: a crash from here on means re-hashing.
            await asyncio.to_thread(self._write_state, c, clean=False)
            c.dirty = True
        assert c.client is not None
        # Written in the background (several batches in flight keep qemu-nbd busy while the
        # next batch is decoded); until a write has landed its blocks are "unknown" in the
        # manifest, so a failed or lost write can never leave a hash the copy does not hold.
        c.hashes[decoded.blocks] = UNKNOWN
        c.hashes[decoded.zero] = UNKNOWN
        while len(c.writes) >= WRITES_IN_FLIGHT:
            await c.writes.pop(0)
        c.writes.append(asyncio.ensure_future(self._write(c, decoded)))
        n = (len(decoded.blocks) + len(decoded.zero)) * BLOCK_SIZE
        c.written += n
        self.metrics.disk_written_bytes.labels(str(c.index)).inc(n)
        return n

    async def _write(self, c: _Copy, decoded: Any) -> None:
        assert c.client is not None
        try:
            if len(decoded.blocks):
                await write_blocks(c.client, decoded.blocks, decoded.data, c.size)
            if len(decoded.zero):
                await zero_blocks(c.client, decoded.zero, c.size)
        except NbdError as exc:
            raise StoreError(f"writing disk copy {c.spec.path} failed: {exc}") from None
        c.hashes[decoded.blocks] = decoded.hashes
        c.hashes[decoded.zero] = _ZERO

    async def settle(self) -> None:
        """Wait for every write in flight (the first failure is raised, after all ended)."""
        failure: BaseException | None = None
        for c in self.copies:
            while c.writes:
                try:
                    await c.writes.pop(0)
                except Exception as exc:  # noqa: BLE001 - re-raised below
                    failure = failure or exc
        if failure is not None:
            raise failure

    async def end_round(self, generation: int) -> None:
        """Make every copy durable and record that it is complete up to ``generation``."""
        if not self.copies or self.released:
            raise ProtocolError("disk round end with no open copies")
        if not 0 < generation < MAX_GENERATION:
            raise ProtocolError(f"disk round {generation} is out of range")
        await self.settle()
        for c in self.copies:
            assert c.client is not None
            try:
                await c.client.flush()
            except NbdError as exc:
                raise StoreError(f"flushing disk copy {c.spec.path} failed: {exc}") from None
            c.generation = generation
            c.dirty = False
            await asyncio.to_thread(self._persist, c)

    # --- switch ----------------------------------------------------------------------------

    def digests(self) -> tuple[bytes, ...]:
        return tuple(digest(c.hashes) for c in self.copies)

    async def verify_and_release(self, digests: tuple[bytes, ...]) -> None:
        """The switch: every copy must equal the source's disk (digest of the block hashes);
        then the writers stop, so that only the shadow QEMU opens the copies."""
        await self.settle()
        ours = self.digests()
        if tuple(digests) != ours:
            bad = [str(c.spec.path) for c, a, b in zip(self.copies, digests, ours) if a != b]
            if len(digests) != len(ours):
                bad = [f"{len(digests)} disks offered, {len(ours)} copies here"]
            raise StoreError(f"disk copies differ from the source: {', '.join(bad)}")
        if any(c.dirty for c in self.copies):
            raise StoreError("a disk round is still being applied")
        await self._stop_writers()
        self.released = True

    async def resume(self) -> None:
        """After an aborted switch: the copies are shadows again, written as before."""
        if self.copies and self.released:
            await self._start_writers()

    async def _stop_writers(self) -> None:
        with contextlib.suppress(Exception):
            await self.settle()
        for c in self.copies:
            if c.client is not None:
                try:
                    await c.client.flush()
                except NbdError:
                    pass
                await c.client.close()
                c.client = None
            await c.nbd.stop()

    async def close(self) -> None:
        try:
            await self._stop_writers()
        except (QemuError, OSError) as exc:
            log.warning("stopping the disk writers: %s", exc)

    def local_specs(self) -> tuple[DiskSpec, ...]:
        """This host's disk copies as they are on disk (the copies of this run, else the
        config's disks, else the copies in the state dir), for booting the domain here."""
        if self.copies:
            return self.specs()
        configured = self.cfg.domain.qemu.disks
        if configured:
            return tuple(DiskSpec(d.path, probe_format(d.path) if d.format == "auto"
                                  else d.format) for d in configured)
        found = []
        for i in range(64):
            for fmt in ("qcow2", "raw"):
                path = self.root / f"disk{i}.{fmt}"
                if path.exists():
                    found.append(DiskSpec(path, fmt))
                    break
            else:
                break
        return tuple(found)

    async def forget(self) -> None:
        """Drop what is known of the copies: this host's VM ran on them, so they are hashed
        anew when the peer next offers its disks."""
        await self.close()
        self.copies = []
        self.forget_files(self.root)

    @staticmethod
    def keep_as_copies(root: Path, disks: list[tuple[str, str, int, np.ndarray]],
                       generation: int) -> None:
        """This host's disks become the copies of the peer's: each (path, format, size,
        block hashes) is what the switch verified equal on both hosts, so it counts as a copy
        at ``generation`` (the round before the one the peer records from)."""
        for i, (path, fmt, size, hashes) in enumerate(disks):
            atomic_write(root / f"disk{i}.manifest", hashes.astype("<u8").tobytes())
            atomic_write(root / f"disk{i}.state.json", json.dumps({
                "generation": generation, "clean": True, "size": size, "path": path,
                "format": fmt}))

    @staticmethod
    def forget_files(root: Path) -> None:
        for path in list(root.glob("disk*.state.json")) + list(root.glob("disk*.manifest")):
            path.unlink(missing_ok=True)

    def status(self) -> list[dict[str, Any]]:
        return [{"index": c.index, "path": str(c.spec.path), "format": c.spec.format,
                 "size_bytes": c.size, "generation": c.generation, "written_bytes": c.written,
                 "writer": "stopped" if self.released else
                 ("running" if c.nbd.running else "down")}
                for c in self.copies]


_ZERO = np.uint64(ZERO_BLOCK_HASH)


def _same_file(ours: Path, theirs: str) -> bool:
    """The same path, or (where both exist here) the same file."""
    if os.path.normpath(str(ours)) == os.path.normpath(theirs):
        return True
    try:
        return os.path.samefile(ours, theirs)
    except OSError:
        return False
