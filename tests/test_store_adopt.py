"""ShadowStore.adopt_image: a region's image moves into a file another program made (libvirt's
RAM file of the shadow domain), and the store keeps a hard link to it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from replicator.errors import StoreError
from replicator.pagefile import data_extents
from replicator.sink.store import ShadowStore
from replicator.wire.messages import RegionInfo
from replicator.wire.pages import (PAGE_SIZE, Compressor, DecodedBatch, decode_batch,
                                   encode_batch, hash_pages)

NPAGES = 16
RAM0 = RegionInfo("ram0", NPAGES * PAGE_SIZE)


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(PAGE_SIZE)


def decoded(contents: dict[int, bytes]) -> DecodedBatch:
    """A verified batch, built the way the receiver gets it (encode_batch -> decode_batch)."""
    order = sorted(contents)
    idx = np.array(order, dtype=np.int64)
    buf = bytearray(b"".join(contents[i] for i in order))
    enc = encode_batch(1, "ram0", idx, memoryview(buf), hash_pages(buf, len(idx)),
                       Compressor("none"))
    return decode_batch(enc.message, NPAGES)


def commit(store: ShadowStore, epoch: int, contents: dict[int, bytes]) -> None:
    store.write_batch("ram0", epoch, decoded(contents))
    store.commit_epoch(epoch)


def expected_image(contents: dict[int, bytes]) -> bytes:
    out = bytearray(RAM0.size)
    for p, c in contents.items():
        out[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = c
    return bytes(out)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fresh_file(path: Path, size: int = RAM0.size) -> Path:
    """An empty (all-hole) file, as QEMU's memory-backend-file makes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, RAM0.size)
    finally:
        os.close(fd)


FIRST = {1: page(1), 2: page(2), 5: page(5), 9: page(9)}


def test_adopt_image(tmp_path: Path):
    before = open_fds()
    root = tmp_path / "state" / "desk"
    store = ShadowStore.open(root, [RAM0])
    image = root / "ram0.img"
    old_fd = -1
    try:
        commit(store, 1, FIRST)
        assert image.read_bytes() == expected_image(FIRST)
        image_extents = extents(image)
        # The store's image is sparse: only the written pages hold data.
        assert sum(e - s for s, e in image_extents) == len(FIRST) * PAGE_SIZE
        old_fd = os.open(image, os.O_RDONLY)     # the image's inode as it was before
        manifest = store.manifest("ram0").copy()

        ram_file = fresh_file(tmp_path / "libvirt" / "ram" / "desk" / "pc.ram")
        copied = store.adopt_image("ram0", ram_file)

        assert copied == len(FIRST) * PAGE_SIZE       # data extents only, not the whole size
        assert ram_file.read_bytes() == expected_image(FIRST)
        assert extents(ram_file) == image_extents       # holes stay holes
        assert os.path.samefile(image, ram_file)
        assert os.stat(image).st_nlink == 2
        assert not (root / "ram0.img.link").exists()
        assert np.array_equal(store.manifest("ram0"), manifest)   # same bytes, same hashes

        # A later batch lands in the adopted file, not in the image's old inode.
        commit(store, 2, {7: page(7), 1: page(11)})
        now = FIRST | {7: page(7), 1: page(11)}
        assert ram_file.read_bytes() == expected_image(now)
        assert os.pread(old_fd, PAGE_SIZE, 7 * PAGE_SIZE) == bytes(PAGE_SIZE)
        assert os.pread(old_fd, PAGE_SIZE, 1 * PAGE_SIZE) == page(1)

        # Adopting the file the image is already: nothing to copy.
        assert store.adopt_image("ram0", ram_file) == 0
        assert store.adopt_image("ram0", image) == 0
        assert os.path.samefile(image, ram_file)

        # libvirt removes its RAM file when the domain stops: the data stays under ram0.img.
        ram_file.unlink()
        assert image.read_bytes() == expected_image(now)
        assert os.stat(image).st_nlink == 1
        commit(store, 3, {15: page(15)})
        now[15] = page(15)
        assert image.read_bytes() == expected_image(now)
    finally:
        if old_fd >= 0:
            os.close(old_fd)
        store.close()
    assert open_fds() == before

    # Reopened, the store finds the adopted data under its own name.
    store = ShadowStore.open(root, [RAM0])
    try:
        assert store.epoch == 3
        with open(image, "rb") as f:
            assert f.read() == expected_image(now)
    finally:
        store.close()
    assert open_fds() == before


def test_adopt_image_twice_retires_each_descriptor(tmp_path: Path):
    """Each start of the shadow domain moves the image again; every old descriptor is closed
    by close()."""
    before = open_fds()
    root = tmp_path / "state" / "desk"
    store = ShadowStore.open(root, [RAM0])
    try:
        commit(store, 1, FIRST)
        first = fresh_file(tmp_path / "ram" / "start1")
        assert store.adopt_image("ram0", first) == len(FIRST) * PAGE_SIZE
        first.unlink()                               # the domain stopped
        second = fresh_file(tmp_path / "ram" / "start2")
        assert store.adopt_image("ram0", second) == len(FIRST) * PAGE_SIZE
        assert os.path.samefile(root / "ram0.img", second)
        assert second.read_bytes() == expected_image(FIRST)
        commit(store, 2, {3: page(3)})
        assert second.read_bytes() == expected_image(FIRST | {3: page(3)})
    finally:
        store.close()
    assert open_fds() == before


def test_adopt_image_grows_an_empty_file(tmp_path: Path):
    root = tmp_path / "state" / "desk"
    store = ShadowStore.open(root, [RAM0])
    try:
        commit(store, 1, FIRST)
        target = fresh_file(tmp_path / "ram" / "pc.ram", size=0)
        assert store.adopt_image("ram0", target) == len(FIRST) * PAGE_SIZE
        assert target.stat().st_size == RAM0.size
        assert target.read_bytes() == expected_image(FIRST)
    finally:
        store.close()


def test_adopt_image_across_filesystems_is_a_store_error(tmp_path: Path, shm_dir: Path):
    """A hard link cannot cross filesystems: a StoreError, and the store goes on with its own
    image (no descriptor leaks)."""
    root = tmp_path / "state" / "desk"
    if os.stat(tmp_path).st_dev == os.stat(shm_dir).st_dev:
        pytest.fail(f"{tmp_path} and {shm_dir} must be on different filesystems")
    before = open_fds()
    store = ShadowStore.open(root, [RAM0])
    try:
        commit(store, 1, FIRST)
        elsewhere = fresh_file(shm_dir / "pc.ram")
        with pytest.raises(StoreError, match="moving region 'ram0'"):
            store.adopt_image("ram0", elsewhere)
        assert not os.path.samefile(root / "ram0.img", elsewhere)
        assert not (root / "ram0.img.link").exists()
        commit(store, 2, {4: page(4)})
        assert (root / "ram0.img").read_bytes() == expected_image(FIRST | {4: page(4)})
    finally:
        store.close()
    assert open_fds() == before


def deleted_files_open(under: Path) -> list[str]:
    """Files under ``under`` this process holds open though no name reaches them any more
    (their blocks stay allocated until the descriptor is closed)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_adopt_image_does_not_hold_replaced_images(tmp_path: Path):
    root = tmp_path / "state" / "desk"
    store = ShadowStore.open(root, [RAM0])
    try:
        commit(store, 1, FIRST)
        previous: Path | None = None
        for start in range(1, 4):
            ram_file = fresh_file(tmp_path / "ram" / f"start{start}")
            store.adopt_image("ram0", ram_file)
            if previous is not None:
                previous.unlink()                    # libvirt removes it when the domain stops
            previous = ram_file
            commit(store, start + 1, {start: page(100 + start)})
        # Past the commit that followed each move no thread can use an old descriptor; at most
        # the latest one may still wait to be closed.
        held = deleted_files_open(tmp_path)
        assert len(held) <= 1, held
    finally:
        store.close()
    assert not deleted_files_open(tmp_path)


def test_pages_written_during_a_threaded_adoption_reach_the_new_image(tmp_path: Path):
    """The libvirt shadow copies in a thread while pages keep arriving: a page written after
    the bulk copy passed it must still be in the new image (finish_adopt copies it again)."""
    root = tmp_path / "state" / "lap"
    store = ShadowStore.open(root, [RAM0])
    try:
        commit(store, 1, FIRST)
        target = fresh_file(tmp_path / "libvirt" / "pc.ram")
        dst = store.begin_adopt("ram0", target)
        assert dst is not None
        copied = store.copy_for_adopt("ram0", dst)          # the bulk copy, done
        late = {1: page(11), 7: page(7)}                      # arrive after it
        commit(store, 2, late)
        store.finish_adopt("ram0", target, dst)
        assert copied == 4 * PAGE_SIZE
        assert target.read_bytes() == expected_image({**FIRST, **late})
        assert os.path.samefile(root / "ram0.img", target)
        commit(store, 3, {3: page(3)})                        # and writes go there now
        assert target.read_bytes() == expected_image({**FIRST, **late, 3: page(3)})
    finally:
        store.close()
