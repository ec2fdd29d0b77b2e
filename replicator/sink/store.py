"""The shadow store: the sink's durable, verified copy of the domain's RAM.

Layout under ``<state_dir>/<domain>/``::

    layout.json     regions (name, size, page size) and the store's format version
    <region>.img    the shadow image; for QEMU it is the shadow VM's mem-path
    manifest        snapshot of every page's xxh3-64 + the epoch it is valid for
    journal         per-epoch deltas appended since the snapshot (checksummed records)
    state.json      acked epoch, clean-shutdown flag, kernel boot id, handed-over flag

Write path: a verified batch is first *announced* in the journal (its pages become "unknown"),
then written into the image; at the epoch's end the images are fsync'd, the real hashes are
journaled and fsync'd, and only then is the epoch acknowledged. Replaying the journal after a
crash therefore never claims a hash the image might not hold: pages caught mid-write come back
as unknown and the source sends them again. If the machine itself rebooted without a clean
shutdown, un-fsync'd announcements may be lost too, so the images are re-hashed instead.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ..config import PAGE_SIZE
from ..durable import atomic_write, fsync_dir
from ..errors import StoreError
from ..pagefile import CHUNK_PAGES, digest_hashes, hash_file
from .store_adopt import AdoptImage
from ..wire.messages import RegionInfo
from ..wire.pages import ZERO_HASH, DecodedBatch

log = logging.getLogger(__name__)

FORMAT = 1
UNKNOWN = np.uint64(0)          # hash of a page in an unknown state (never a real xxh3 here)
_REC = struct.Struct("<4sQII")  # magic, epoch, region index (or COMMIT), count
_MAGIC = b"RJ01"
_COMMIT = 0xFFFFFFFF
_ANNOUNCE_FLAG = 0x80000000      # region index flag: hashes are UNKNOWN (pages about to change)
_SNAP_MAGIC = b"RPLMAN01"


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    """This boot's ID, or "" when it cannot be read (then every unclean store is re-hashed)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError as exc:
        log.warning("cannot read the boot ID (%s): %s; a store left unclean is re-hashed",
                    _BOOT_ID, exc.strerror or exc)
        return ""


def _store_error(what: str, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"shadow store is full while {what} ({exc.filename or ''}): free space "
                          f"in the state directory; replication will retry")
    return StoreError(f"shadow store failed while {what}: {exc.strerror or exc}")


@dataclass
class _Region:
    info: RegionInfo
    index: int
    path: Path
    fd: int
    hashes: np.ndarray
    written: bool = False

    @property
    def npages(self) -> int:
        return self.info.size // PAGE_SIZE


class ShadowStore(AdoptImage):
    """Per-region shadow images plus a crash-safe per-page manifest."""

    def __init__(self, root: Path, regions: list[RegionInfo],
                 images: dict[str, Path] | None = None):
        self.root = root
        self.regions: dict[str, _Region] = {}
        self.epoch = 0
        self.handed_over = False
        self.generation = 0             # placement generation at which handed_over was set
        self.running_since = 0.0
        self.forced = False
        self._images = dict(images or {})
        self._adopting: dict[str, list[np.ndarray]] = {}     # region -> pages written meanwhile

        self._journal_fd = -1
        self._journal_size = 0
        self._pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._infos = regions

    # --- opening ----------------------------------------------------------------------------

    @staticmethod
    def existing_layout(root: Path) -> list[RegionInfo] | None:
        try:
            data = json.loads((root / "layout.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{root / 'layout.json'} is unreadable ({exc}); remove {root} "
                             f"on the sink to start the shadow over") from None
        try:
            return [RegionInfo(r["name"], r["size"], r.get("page_size", PAGE_SIZE))
                    for r in data["regions"]]
        except (TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"{root / 'layout.json'} is not a store layout ({exc!r}); remove "
                             f"{root} on the sink to start the shadow over") from None

    @classmethod
    def open(cls, root: Path, regions: list[RegionInfo],
             images: dict[str, Path] | None = None) -> "ShadowStore":
        """Open (or create) the store for ``regions``; the layout must match an existing one.
        ``images``: a region's image somewhere else than ``<root>/<region>.img`` (a host's own
        RAM file, which its VM ran on before it handed the domain over)."""
        store = cls(root, regions, images)
        try:
            store._open()
        except OSError as exc:
            store.close(clean=False)
            raise _store_error("opening", exc) from None
        except BaseException:
            store.close(clean=False)
            raise
        return store

    def _open(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)     # the store's own directory entry, too
        state = self._read_state()          # first: an unreadable state must change nothing
        existing = self.existing_layout(self.root)
        if existing is None:
            atomic_write(self.root / "layout.json", json.dumps({"format": FORMAT, "regions": [
                {"name": r.name, "size": r.size, "page_size": r.page_size} for r in self._infos]}))
        elif existing != list(self._infos):
            raise StoreError(f"store {self.root} holds a different layout "
                             f"({_fmt(existing)}) than offered ({_fmt(self._infos)})")
        for i, info in enumerate(self._infos):
            path = self._images.get(info.name) or self.root / f"{info.name}.img"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_size != info.size:
                os.ftruncate(fd, info.size)         # sparse: holes read as zero pages
            self.regions[info.name] = _Region(
                info, i, path, fd, np.full(info.size // PAGE_SIZE, ZERO_HASH, dtype=np.uint64))
        self.handed_over = state.get("handed_over", False)
        self.generation = int(state.get("generation", 1 if self.handed_over else 0))
        self.running_since = float(state.get("running_since", 0.0))
        self.forced = bool(state.get("forced", False))
        self.external_writes = False
        clean = state.get("clean", False)
        # No state but a manifest or journal: the state file was removed (after it was
        # unreadable, say); nothing vouches for the manifest, so rebuild it.
        orphaned = not state and any((self.root / n).exists() for n in ("manifest", "journal"))
        rebuilt = self._load_snapshot()
        if self._replay_journal():
            log.warning("store %s: the journal ends in a damaged record; re-hashing the "
                        "shadow images", self.root)
            self.rehash()
            rebuilt = True
        if state.get("external_writes") and not self.handed_over:
            log.warning("store %s: a relayed migration was writing the images when the sink "
                        "stopped; re-hashing them", self.root)
            self.rehash()
            rebuilt = True
        elif state.get("rehash"):
            log.info("store %s: hashing the images (%s)", self.root, state["rehash"])
            self.rehash()
            rebuilt = True
        elif state and not clean and (not (boot := _boot_id()) or state.get("boot_id") != boot):
            # An unknown boot ID (either one) could hide a reboot: fail closed.
            log.warning("store %s: the machine may have restarted without a clean shutdown; "
                        "re-hashing the shadow images", self.root)
            self.rehash()
            rebuilt = True
        elif orphaned and not rebuilt:
            log.warning("store %s: no state file next to the manifest; re-hashing the shadow "
                        "images", self.root)
            self.rehash()
            rebuilt = True
        self._journal_fd = os.open(self.root / "journal",
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._journal_size = os.fstat(self._journal_fd).st_size
        if rebuilt:
            # Persist the re-hashed manifest and drop the old journal (and any damaged tail):
            # the next restart must neither fall back to the stale view nor append after garbage.
            self.snapshot()
        self._write_state(clean=False)

    # --- state file -----------------------------------------------------------------------

    def _read_state(self) -> dict:
        """The state file, or {} if there is none. Unreadable: refuse (it holds handed_over)."""
        path = self.root / "state.json"
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("handed_over", False),
                                                             bool):
                raise ValueError("not a state record")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # It records whether the domain runs on this host: never guess "it does not".
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(
                f"cannot read {path} ({why}); it records whether the domain runs on this host "
                f"after a switch, so this sink refuses to replicate or switch until it is "
                f"fixed. If the peer's `replicator status` says HANDED OVER, the domain runs "
                f"here: write {{\"handed_over\": true}} into the file; otherwise remove it "
                f"(the shadow is then re-hashed)") from None
        return state

    def _write_state(self, *, clean: bool) -> None:
        atomic_write(self.root / "state.json", json.dumps({
            "epoch": self.epoch, "clean": clean, "boot_id": _boot_id(),
            "handed_over": self.handed_over, "generation": self.generation,
            "running_since": self.running_since, "forced": self.forced,
            "external_writes": getattr(self, "external_writes", False)}))

    @staticmethod
    def forget(root: Path, generation: int) -> None:
        """Start the shadow over on the images as they are: this host's own VM ran on them
        (it just handed the domain over), so no manifest describes them. The next open re-hashes
        them, and the source sends only pages that differ."""
        for name in ("manifest", "journal", "layout.json"):
            (root / name).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        # Unclean with no boot ID: the next open re-hashes whatever the images hold.
        atomic_write(root / "state.json", json.dumps({
            "epoch": 0, "clean": False, "boot_id": "", "handed_over": False,
            "generation": generation, "rehash": "this host's VM ran on them"}))

    def begin_external_writes(self) -> None:
        """Another writer (a shadow QEMU loading a relayed migration) changes the images now.

        Persisted, so that a sink that dies meanwhile re-hashes the images when it restarts.
        """
        self.external_writes = True
        self._write_state(clean=False)

    def end_external_writes(self) -> None:
        """Re-hash the images (the truth after someone else wrote them) and persist that."""
        self.rehash()
        self.snapshot()
        self.external_writes = False
        self._write_state(clean=False)

    def set_handed_over(self, value: bool, *, generation: int | None = None,
                        forced: bool = False) -> None:
        """Persist that the domain now runs here (``value``), from placement ``generation``
        on (fencing survives restarts)."""
        self.handed_over = value
        if generation is not None:
            self.generation = generation
        self.running_since = time.time() if value else 0.0
        self.forced = forced and value
        self._write_state(clean=False)

    # --- manifest snapshot + journal ---------------------------------------------------------

    def _load_snapshot(self) -> bool:
        """Load the snapshot; True if it was unusable and the images were re-hashed instead."""
        path = self.root / "manifest"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        if len(data) < 24 or data[:8] != _SNAP_MAGIC:
            log.warning("store %s: manifest snapshot unreadable; re-hashing images", self.root)
            self.rehash()
            return True
        body, check = data[:-8], struct.unpack("<Q", data[-8:])[0]
        if xxhash.xxh3_64_intdigest(body) != check:
            log.warning("store %s: manifest checksum mismatch; re-hashing images", self.root)
            self.rehash()
            return True
        (self.epoch,) = struct.unpack_from("<Q", body, 8)
        off = 16
        for r in self.regions.values():
            n = r.npages
            r.hashes[:] = np.frombuffer(body, dtype="<u8", count=n, offset=off)
            off += n * 8
        return False

    def _replay_journal(self) -> bool:
        """Apply the journal; True if it ends in a torn or damaged record."""
        try:
            data = (self.root / "journal").read_bytes()
        except FileNotFoundError:
            return False
        by_index = {r.index: r for r in self.regions.values()}
        off = 0
        staged: list[tuple[_Region, np.ndarray, np.ndarray]] = []
        good_end = 0
        while off + _REC.size + 8 <= len(data):
            magic, epoch, ridx, count = _REC.unpack_from(data, off)
            end = off + _REC.size + count * 12 + 8
            if magic != _MAGIC or end > len(data):
                break
            (check,) = struct.unpack_from("<Q", data, end - 8)
            if xxhash.xxh3_64_intdigest(data[off:end - 8]) != check:
                break
            if ridx == _COMMIT:
                for r, idx, h in staged:
                    r.hashes[idx] = h
                staged.clear()
                self.epoch = max(self.epoch, epoch)
            else:
                r = by_index.get(ridx & ~_ANNOUNCE_FLAG)
                if r is None:
                    break
                base = off + _REC.size
                idx = np.frombuffer(data, dtype="<u4", count=count, offset=base).astype(np.int64)
                if idx.size and int(idx.max()) >= r.npages:
                    break
                if ridx & _ANNOUNCE_FLAG:
                    r.hashes[idx] = UNKNOWN        # announced before writing: not trustworthy
                else:
                    h = np.frombuffer(data, dtype="<u8", count=count, offset=base + count * 4)
                    staged.append((r, idx, h.copy()))
            good_end = off = end
        if good_end < len(data):
            log.warning("store %s: ignoring %d bytes of torn journal tail", self.root,
                        len(data) - good_end)
        return good_end < len(data)

    @staticmethod
    def _record(epoch: int, ridx: int, idx: np.ndarray, hashes: np.ndarray) -> bytes:
        body = (_REC.pack(_MAGIC, epoch, ridx, len(idx)) + idx.astype("<u4").tobytes()
                + hashes.astype("<u8").tobytes())
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    def _journal_append(self, data: bytes) -> None:
        start = self._journal_size
        mv = memoryview(data)
        try:
            while mv:                      # os.write may be short (ENOSPC after a partial write)
                mv = mv[os.write(self._journal_fd, mv):]
        except OSError:
            try:                           # never leave a torn record for later ones to follow
                os.ftruncate(self._journal_fd, start)
            except OSError:
                pass
            raise
        self._journal_size = start + len(data)

    def snapshot(self) -> None:
        """Write the full manifest atomically and empty the journal."""
        parts = [_SNAP_MAGIC, struct.pack("<Q", self.epoch)]
        parts += [r.hashes.astype("<u8").tobytes() for r in self.regions.values()]
        body = b"".join(parts)
        atomic_write(self.root / "manifest",
                     body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
        os.ftruncate(self._journal_fd, 0)
        os.fsync(self._journal_fd)
        self._journal_size = 0

    # --- write path ----------------------------------------------------------------------------

    def write_batch(self, region: str, epoch: int, batch: DecodedBatch) -> int:
        """Write a verified batch into the image. Returns pages written."""
        r = self.regions[region]
        idx = np.concatenate([batch.zero, batch.pages]) if batch.zero.size else batch.pages
        if not idx.size:
            return 0
        try:
            self._journal_append(self._record(epoch, r.index | _ANNOUNCE_FLAG, idx,
                                              np.zeros(len(idx), dtype=np.uint64)))
            r.hashes[idx] = UNKNOWN
            r.written = True
            mv = memoryview(batch.data)
            pages = batch.pages
            if pages.size:
                # Coalesce consecutive pages into one pwritev each.
                breaks = np.flatnonzero(np.diff(pages) != 1) + 1
                starts = np.concatenate(([0], breaks))
                ends = np.concatenate((breaks, [len(pages)]))
                for s, e in zip(starts.tolist(), ends.tolist()):
                    off = int(pages[s]) * PAGE_SIZE
                    self._pwrite_all(r.fd, mv[s * PAGE_SIZE:e * PAGE_SIZE], off)
            if batch.zero.size:
                zeros = bytes(PAGE_SIZE)
                for p in batch.zero.tolist():
                    self._pwrite_all(r.fd, zeros, p * PAGE_SIZE)
        except OSError as exc:
            raise _store_error(f"writing region {region!r}", exc) from None
        if region in self._adopting:
            self._adopting[region].append(idx.copy())    # copied again when adopting ends
        staged = self._pending.setdefault(r.index, [])
        if batch.zero.size:
            staged.append((batch.zero, np.full(len(batch.zero), ZERO_HASH, dtype=np.uint64)))
        if pages.size:
            staged.append((pages, batch.hashes))
        return int(idx.size)

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview | bytes, off: int) -> None:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(fd, mv, off)
            mv = mv[n:]
            off += n

    def commit_epoch(self, epoch: int) -> None:
        """Make everything written for ``epoch`` durable, then record it. Idempotent."""
        try:
            for r in self.regions.values():
                if r.written:
                    os.fdatasync(r.fd)
                    r.written = False
            records = []
            by_index = {r.index: r for r in self.regions.values()}
            for ridx, parts in self._pending.items():
                idx = np.concatenate([p[0] for p in parts])
                h = np.concatenate([p[1] for p in parts])
                records.append(self._record(epoch, ridx, idx, h))
            records.append(self._record(epoch, _COMMIT, np.empty(0, np.int64),
                                        np.empty(0, np.uint64)))
            self._journal_append(b"".join(records))
            os.fdatasync(self._journal_fd)
        except OSError as exc:
            raise _store_error(f"committing epoch {epoch}", exc) from None
        for ridx, parts in self._pending.items():
            r = by_index[ridx]
            for idx, h in parts:
                r.hashes[idx] = h
        self._pending.clear()
        self.epoch = epoch
        total_pages = sum(r.npages for r in self.regions.values())
        if self._journal_size > total_pages * 8 + (1 << 20):
            try:
                self.snapshot()
            except OSError as exc:
                raise _store_error("compacting the manifest", exc) from None

    def abort_epoch(self) -> None:
        """Drop uncommitted work: those pages stay UNKNOWN so the source resends them."""
        self._pending.clear()

    # --- verification --------------------------------------------------------------------------

    def manifest(self, region: str) -> np.ndarray:
        return self.regions[region].hashes

    def digests(self) -> tuple[bytes, ...]:
        return tuple(digest_hashes(r.hashes) for r in self.regions.values())

    def rehash(self) -> None:
        """Rebuild every page hash from the images themselves (O(RAM); crash recovery)."""
        buf = bytearray(CHUNK_PAGES * PAGE_SIZE)
        for r in self.regions.values():
            r.hashes[:] = hash_file(r.fd, r.info.size, buf)

    # --- closing ---------------------------------------------------------------------------------

    def close(self, *, clean: bool = True) -> None:
        if clean and self._journal_fd >= 0:
            try:
                self.abort_epoch()
                self.snapshot()
                self._write_state(clean=True)
            except OSError as exc:
                log.error("store %s: clean close failed: %s", self.root, exc)
        for r in self.regions.values():
            if r.fd >= 0:
                os.close(r.fd)
                r.fd = -1

        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1


def _fmt(regions: list[RegionInfo]) -> str:
    return ", ".join(f"{r.name}={r.size}" for r in regions)
