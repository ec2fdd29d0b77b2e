"""Moving a shadow image into a file another program made (libvirt's RAM file for a shadow).

A mixin of :class:`~.store.ShadowStore`: it works on the store's regions and is used by the
libvirt shadow, whose QEMU gets a fresh RAM file from libvirt at every start.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import PAGE_SIZE
from ..durable import fsync_dir
from ..pagefile import copy_data, punch_hole

if TYPE_CHECKING:
    from .store import _Region


class AdoptImage:
    """``adopt_image`` and its three steps, for :class:`~.store.ShadowStore`."""

    regions: dict[str, _Region]
    _adopting: dict[str, list[np.ndarray]]
    _pwrite_all: staticmethod                # ShadowStore's

    def adopt_image(self, name: str, path: Path) -> int:
        """Make ``path`` (a fresh, empty file another program created, such as the RAM file
        libvirt gives a shadow domain) region ``name``'s image: the image's data is copied
        into it, the store's own name for the image becomes a hard link to it (so the data
        outlives that program removing ``path``), and writes go there from now on. Returns the
        bytes copied (0 when ``path`` is the image already). In three steps for a caller that
        copies in a thread while pages keep arriving: :meth:`begin_adopt`,
        :meth:`copy_for_adopt` (any thread), :meth:`finish_adopt`."""
        dst = self.begin_adopt(name, path)
        if dst is None:
            return 0
        try:
            copied = self.copy_for_adopt(name, dst)
        except BaseException:
            self.abandon_adopt(name, dst)
            raise
        self.finish_adopt(name, path, dst)
        return copied

    def begin_adopt(self, name: str, path: Path) -> int | None:
        """Open ``path`` for :meth:`adopt_image` and start noting the pages written meanwhile;
        None when it is the image already."""
        r = self.regions[name]
        try:
            if os.path.samefile(path, r.path):
                return None
            dst = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _error(f"moving region {name!r} to {path}", exc) from None
        try:
            if os.fstat(dst).st_size != r.info.size:
                os.ftruncate(dst, r.info.size)
            if os.fstat(dst).st_blocks:
                # Not empty after all (a RAM file left by a crash, say): our holes must read
                # as zero there too.
                punch_hole(dst, 0, r.info.size)
        except OSError as exc:
            os.close(dst)
            raise _error(f"moving region {name!r} to {path}", exc) from None
        self._adopting[name] = []
        return dst

    def copy_for_adopt(self, name: str, dst: int) -> int:
        """The bulk copy (safe in a thread: pages written meanwhile are noted and copied
        again by :meth:`finish_adopt`)."""
        r = self.regions[name]
        try:
            return copy_data(r.fd, dst, r.info.size)
        except OSError as exc:
            raise _error(f"moving region {name!r} (copying it)", exc) from None

    def abandon_adopt(self, name: str, dst: int) -> None:
        self._adopting.pop(name, None)
        os.close(dst)

    def finish_adopt(self, name: str, path: Path, dst: int) -> None:
        """Copy the pages written since :meth:`begin_adopt` again, then switch the image to
        ``path``. Must run where page writes run (no write can come in between)."""
        r = self.regions[name]
        written = self._adopting.pop(name, [])
        try:
            if written:
                for page in np.unique(np.concatenate(written)).tolist():
                    off = page * PAGE_SIZE
                    self._pwrite_all(dst, os.pread(r.fd, PAGE_SIZE, off), off)
            tmp = r.path.with_name(r.path.name + ".link")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(path, tmp)
            os.replace(tmp, r.path)
            fsync_dir(r.path.parent)
            # The region's descriptor number now names the new file (the old file's
            # description is closed by dup2): an epoch's commit fsyncing it in a thread
            # meanwhile syncs one or the other, never a closed descriptor.
            os.dup2(dst, r.fd)
        except OSError as exc:
            raise _error(f"moving region {name!r} to {path}", exc) from None
        finally:
            os.close(dst)


def _error(what: str, exc: OSError) -> Exception:
    from .store import _store_error
    return _store_error(what, exc)

