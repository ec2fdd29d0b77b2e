"""Unit tests for the sink's shadow store (replicator.sink.store)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xxhash

from replicator.errors import MalformedFrame, StoreError
from replicator.pagefile import digest_hashes, hash_file
from replicator.sink.store import UNKNOWN, ShadowStore
from replicator.wire.messages import PageBatch, RegionInfo
from replicator.wire.pages import (PAGE_SIZE, ZERO_HASH, ZERO_PAGE, Compressor, DecodedBatch,
                                   decode_batch, encode_batch, hash_pages)

RAM = RegionInfo("ram", 64 * PAGE_SIZE)
VRAM = RegionInfo("vram", 16 * PAGE_SIZE)
LAYOUT = [RAM, VRAM]


# ----------------------------------------------------------------------------------------------
# helpers


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(PAGE_SIZE)


def h(content: bytes) -> int:
    return xxhash.xxh3_64_intdigest(content)


def decoded(contents: dict[int, bytes], npages: int) -> DecodedBatch:
    """A verified batch, built the way the receiver gets it (encode_batch -> decode_batch)."""
    order = sorted(contents)
    idx = np.array(order, dtype=np.int64)
    buf = bytearray(b"".join(contents[i] for i in order))
    enc = encode_batch(1, "x", idx, memoryview(buf), hash_pages(buf, len(idx)),
                       Compressor("none"))
    return decode_batch(enc.message, npages)


class Model:
    """What the store should hold after its committed epochs."""

    def __init__(self, layout: list[RegionInfo]):
        self.pages: dict[str, dict[int, bytes]] = {r.name: {} for r in layout}
        self.sizes = {r.name: r.size // PAGE_SIZE for r in layout}
        self.epoch = 0

    def manifest(self, region: str) -> np.ndarray:
        out = np.full(self.sizes[region], ZERO_HASH, dtype=np.uint64)
        for p, c in self.pages[region].items():
            out[p] = h(c)
        return out


def write(store: ShadowStore, region: str, epoch: int, contents: dict[int, bytes]) -> int:
    return store.write_batch(region, epoch, decoded(contents, store.regions[region].npages))


def commit(store: ShadowStore, model: Model, epoch: int,
           batches: list[tuple[str, dict[int, bytes]]]) -> None:
    for region, contents in batches:
        write(store, region, epoch, contents)
    store.commit_epoch(epoch)
    for region, contents in batches:
        model.pages[region].update(contents)
    model.epoch = epoch


def image_hashes(store: ShadowStore, region: str) -> np.ndarray:
    r = store.regions[region]
    with open(r.path, "rb") as f:
        return hash_file(f.fileno(), r.info.size)


def read_page(store: ShadowStore, region: str, p: int) -> bytes:
    with open(store.regions[region].path, "rb") as f:
        f.seek(p * PAGE_SIZE)
        return f.read(PAGE_SIZE).ljust(PAGE_SIZE, b"\0")


def assert_consistent(store: ShadowStore) -> None:
    """No page may claim a hash its image content does not have (UNKNOWN claims nothing)."""
    for name in store.regions:
        man = store.manifest(name)
        actual = image_hashes(store, name)
        known = man != UNKNOWN
        bad = np.flatnonzero(known & (man != actual))
        assert not bad.size, f"region {name}: manifest lies about pages {bad.tolist()[:20]}"


def assert_matches_model(store: ShadowStore, model: Model) -> None:
    assert store.epoch == model.epoch
    for name in store.regions:
        assert np.array_equal(store.manifest(name), model.manifest(name)), name
        for p, c in model.pages[name].items():
            assert read_page(store, name, p) == c


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "vm"


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a small tmpfs of a given size; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(d)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill_up(directory: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\xa5" * (64 * 1024)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        small = b"\xa5" * PAGE_SIZE
        while True:
            try:
                os.write(fd, small)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return path


def journal_slack(store: ShadowStore) -> int:
    """Bytes the journal can still grow without a new page."""
    return (-os.stat(store.root / "journal").st_size) % PAGE_SIZE


# ----------------------------------------------------------------------------------------------
# opening / creating


def test_create_sparse_images(root):
    store = ShadowStore.open(root, LAYOUT)
    try:
        for info in LAYOUT:
            p = root / f"{info.name}.img"
            st = os.stat(p)
            assert st.st_size == info.size
            assert st.st_blocks == 0                       # sparse: nothing allocated
            assert np.array_equal(store.manifest(info.name),
                                  np.full(info.size // PAGE_SIZE, ZERO_HASH, np.uint64))
        assert store.epoch == 0 and store.handed_over is False
        layout = json.loads((root / "layout.json").read_text())
        assert layout["regions"] == [{"name": "ram", "size": RAM.size, "page_size": 4096},
                                     {"name": "vram", "size": VRAM.size, "page_size": 4096}]
        assert ShadowStore.existing_layout(root) == LAYOUT
    finally:
        store.close()
    assert ShadowStore.existing_layout(root.parent / "other") is None


def test_reopen_empty_store(root):
    ShadowStore.open(root, LAYOUT).close()
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.epoch == 0
        assert_matches_model(store, Model(LAYOUT))
    finally:
        store.close()


@pytest.mark.parametrize("other", [
    [RegionInfo("ram", 128 * PAGE_SIZE), VRAM],
    [RegionInfo("ram0", RAM.size), VRAM],
    [RAM],
    [RAM, VRAM, RegionInfo("extra", PAGE_SIZE)],
    [VRAM, RAM],
    [RegionInfo("ram", RAM.size, 8192), VRAM],
], ids=["size", "name", "fewer", "more", "order", "page_size"])
def test_layout_mismatch(root, other):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {3: page(3)})])
    store.close()
    with pytest.raises(StoreError, match="different layout"):
        ShadowStore.open(root, other)
    # The refused open left the store as it was.
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_matches_model(store, model)
        assert os.stat(root / "ram.img").st_size == RAM.size
    finally:
        store.close()


def test_unreadable_layout_is_store_error(root):
    ShadowStore.open(root, LAYOUT).close()
    (root / "layout.json").write_text("{not json")
    with pytest.raises(StoreError):
        ShadowStore.open(root, LAYOUT)


# ----------------------------------------------------------------------------------------------
# write path and recovery


@pytest.mark.parametrize("clean", [True, False])
def test_commit_then_reopen(root, clean):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    assert write(store, "ram", 1, {0: page(1), 1: page(2), 7: ZERO_PAGE}) == 3
    write(store, "vram", 1, {15: page(3)})
    store.commit_epoch(1)
    model.pages["ram"].update({0: page(1), 1: page(2), 7: ZERO_PAGE})
    model.pages["vram"][15] = page(3)
    model.epoch = 1
    assert_matches_model(store, model)
    # Overwrite, zero a page that had data, add new ones.
    commit(store, model, 2, [("ram", {1: ZERO_PAGE, 2: page(4), 63: page(5)}),
                             ("ram", {10: page(6), 11: page(7), 12: page(8)})])
    store.close(clean=clean)

    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_matches_model(store, model)
        assert read_page(store, "ram", 1) == ZERO_PAGE
        assert store.manifest("ram")[1] == ZERO_HASH
        assert_consistent(store)
    finally:
        store.close()


def test_manifest_only_changes_at_commit(root):
    store = ShadowStore.open(root, LAYOUT)
    try:
        model = Model(LAYOUT)
        commit(store, model, 1, [("ram", {5: page(5)})])
        write(store, "ram", 2, {5: page(6), 6: page(7)})
        man = store.manifest("ram")
        assert man[5] == UNKNOWN and man[6] == UNKNOWN      # in flight: unknown, not yet new
        store.commit_epoch(2)
        assert man[5] == h(page(6)) and man[6] == h(page(7))
        assert store.epoch == 2
    finally:
        store.close()


@pytest.mark.parametrize("clean", [False, True])
def test_crash_before_commit_leaves_pages_unknown(root, clean):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {1: page(1), 2: page(2), 3: page(3)}),
                             ("vram", {0: page(9)})])
    # Epoch 2 is written but never committed, then the process dies.
    write(store, "ram", 2, {3: page(33), 4: page(44), 5: ZERO_PAGE})
    write(store, "vram", 2, {1: page(11)})
    store.close(clean=clean)

    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.epoch == 1
        ram = store.manifest("ram")
        for p in (3, 4, 5):
            assert ram[p] == UNKNOWN, p             # the source must send these again
        assert store.manifest("vram")[1] == UNKNOWN
        assert ram[1] == h(page(1)) and ram[2] == h(page(2))
        assert store.manifest("vram")[0] == h(page(9))
        untouched = np.setdiff1d(np.arange(RAM.size // PAGE_SIZE), [1, 2, 3, 4, 5])
        assert (ram[untouched] == ZERO_HASH).all()
        assert_consistent(store)
    finally:
        store.close()


def test_abort_epoch_keeps_pages_unknown(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {4: page(4)})])
    write(store, "ram", 2, {4: page(40), 5: page(50)})
    store.abort_epoch()
    # The next epoch (after a reconnect) must not commit the aborted pages' hashes.
    commit(store, model, 2, [("ram", {6: page(60)})])
    for s in (store, None):
        if s is None:
            store.close(clean=False)
            s = store = ShadowStore.open(root, LAYOUT)
        man = s.manifest("ram")
        assert man[4] == UNKNOWN and man[5] == UNKNOWN
        assert man[6] == h(page(60))
        assert s.epoch == 2
        assert_consistent(s)
    store.close()


def test_commit_is_idempotent(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {4: page(4)})])
    store.commit_epoch(1)
    store.close(clean=False)
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_matches_model(store, model)
    finally:
        store.close()


def _three_epochs_then_cut(root: Path, cut: int, *, reboot: bool = False):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {1: page(1), 2: page(2)})])
    commit(store, model, 2, [("ram", {3: page(3)}), ("vram", {4: page(4)})])
    committed = {k: dict(v) for k, v in model.pages.items()}
    epoch2 = model.epoch
    # Epoch 3 journals: announce (28 + 2*12 = 52 bytes), hashes (52), commit (28).
    commit(store, model, 3, [("ram", {2: page(22), 9: page(9)})])
    store.close(clean=False)
    journal = root / "journal"
    os.truncate(journal, os.stat(journal).st_size - cut)
    if reboot:
        state = json.loads((root / "state.json").read_text())
        state["boot_id"] = "another-boot"
        (root / "state.json").write_text(json.dumps(state))
    return committed, epoch2


# Same boot: a torn tail can only cut records written after the images were touched
# (the announcement is complete before any image write starts), so cuts stay within the
# hashes + commit records (80 bytes).
@pytest.mark.parametrize("cut", [1, 8, 28, 29, 60, 80])
def test_torn_journal_tail(root, cut):
    committed, epoch2 = _three_epochs_then_cut(root, cut)
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.epoch == epoch2
        ram = store.manifest("ram")
        assert ram[1] == h(committed["ram"][1]) and ram[3] == h(committed["ram"][3])
        assert store.manifest("vram")[4] == h(committed["vram"][4])
        # Epoch 3's pages are unknown (or, if re-hashed, their true content): never a stale hash.
        for p in (2, 9):
            assert ram[p] in (UNKNOWN, h(read_page(store, "ram", p))), p
        assert_consistent(store)
    finally:
        store.close()


@pytest.mark.parametrize("cut", [1, 80, 100, 132])
def test_torn_journal_tail_after_reboot(root, cut):
    # After a power loss anything not fsync'd may be gone, announcements included: the images
    # are re-hashed, so the manifest is truthful and earlier epochs keep their pages.
    committed, epoch2 = _three_epochs_then_cut(root, cut, reboot=True)
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.epoch == epoch2
        assert store.manifest("ram")[1] == h(committed["ram"][1])
        assert store.manifest("vram")[4] == h(committed["vram"][4])
        for name in ("ram", "vram"):
            assert np.array_equal(store.manifest(name), image_hashes(store, name))
    finally:
        store.close()


def test_commits_after_a_torn_tail_survive_the_next_crash(root):
    # After recovering from a torn journal tail, new epochs are appended to the journal. They must
    # be found again on the next restart: the garbage tail must not hide them.
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {1: page(1)})])
    commit(store, model, 2, [("ram", {2: page(2)})])
    store.close(clean=False)
    journal = root / "journal"
    os.truncate(journal, os.stat(journal).st_size - 10)    # epoch 2's commit record is torn

    store = ShadowStore.open(root, LAYOUT)
    assert store.epoch == 1
    model.epoch = 1
    del model.pages["ram"][2]
    commit(store, model, 2, [("ram", {2: page(20), 3: page(30)})])
    commit(store, model, 3, [("ram", {1: page(10)})])
    store.close(clean=False)                               # crash again

    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_consistent(store)
        assert store.epoch == 3, "acknowledged epochs were lost"
        assert_matches_model(store, model)
    finally:
        store.close()


def test_corrupt_record_in_the_middle_of_the_journal(root):
    # A damaged record (bit rot) stops the replay; whatever the store then believes, it must not
    # claim hashes for pages whose image content is different.
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {1: page(1), 2: page(2)})])
    size1 = os.stat(root / "journal").st_size
    commit(store, model, 2, [("ram", {3: page(3), 1: page(11)})])
    commit(store, model, 3, [("ram", {4: page(4)})])
    store.close(clean=False)
    data = bytearray((root / "journal").read_bytes())
    data[size1 + 40] ^= 0xFF                               # inside epoch 2's first record
    (root / "journal").write_bytes(bytes(data))

    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_consistent(store)
    finally:
        store.close()


def test_overlapping_zero_and_data_indices_never_corrupt_the_manifest(root):
    # A batch listing the same page both as a zero page and as a data page is malformed. Either
    # decode_batch refuses it, or the store must end up with a manifest that matches the image.
    content = page(7)
    batch = PageBatch(epoch=1, region="ram", codec="none",
                      zero=np.array([5], "<u4").tobytes(), pages=np.array([5], "<u4").tobytes(),
                      hashes=np.array([h(content)], "<u8").tobytes(), raw_len=PAGE_SIZE,
                      payload=content)
    try:
        dec = decode_batch(batch, RAM.size // PAGE_SIZE)
    except MalformedFrame:
        return
    store = ShadowStore.open(root, LAYOUT)
    try:
        store.write_batch("ram", 1, dec)
        store.commit_epoch(1)
        assert_consistent(store)
    finally:
        store.close()


def test_handed_over_persists(root):
    store = ShadowStore.open(root, LAYOUT)
    store.set_handed_over(True)
    store.close(clean=False)
    store = ShadowStore.open(root, LAYOUT)
    assert store.handed_over is True
    store.set_handed_over(False)
    store.close()
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.handed_over is False
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------
# snapshot / compaction


def test_clean_close_writes_snapshot_and_empties_journal(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 4, [("ram", {0: page(0), 9: page(9)})])
    assert os.stat(root / "journal").st_size > 0
    store.close()
    assert os.stat(root / "journal").st_size == 0
    assert (root / "manifest").exists()
    assert json.loads((root / "state.json").read_text())["clean"] is True
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_matches_model(store, model)
    finally:
        store.close()


def test_corrupt_snapshot_is_rebuilt_from_images(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0), 9: page(9)}), ("vram", {2: page(2)})])
    store.close()
    data = bytearray((root / "manifest").read_bytes())
    data[30] ^= 0x01
    (root / "manifest").write_bytes(bytes(data))
    store = ShadowStore.open(root, LAYOUT)
    try:
        for name in ("ram", "vram"):
            assert np.array_equal(store.manifest(name), model.manifest(name))
    finally:
        store.close()


def test_snapshot_compaction_then_reopen(tmpfs):
    # Region of 256 pages: the journal is compacted once it exceeds 256*8 + 1 MiB.
    root = tmpfs("64M") / "vm"
    layout = [RegionInfo("ram", 256 * PAGE_SIZE), RegionInfo("vram", 4 * PAGE_SIZE)]
    n = 256
    variants = []
    for v in range(2):
        buf = bytearray(np.random.default_rng(v).bytes(n * PAGE_SIZE))
        for z in range(v, n, 17):                         # some zero pages too
            buf[z * PAGE_SIZE:(z + 1) * PAGE_SIZE] = ZERO_PAGE
        variants.append((buf, hash_pages(buf, n)))
    idx = np.arange(n, dtype=np.int64)

    def full_batch(v: int) -> DecodedBatch:
        buf, hashes = variants[v]
        enc = encode_batch(1, "ram", idx, memoryview(buf), hashes, Compressor("none"))
        return decode_batch(enc.message, n)

    batches = [full_batch(0), full_batch(1)]
    store = ShadowStore.open(root, layout)
    compacted_at = None
    epoch = 0
    for epoch in range(1, 400):
        store.write_batch("ram", epoch, batches[epoch % 2])
        store.commit_epoch(epoch)
        if (root / "manifest").exists():
            compacted_at = epoch
            break
    assert compacted_at is not None, "the journal was never compacted"
    assert compacted_at > 1
    assert os.stat(root / "journal").st_size == 0
    # A few more epochs go to the (new) journal, then a crash.
    store.write_batch("ram", epoch + 1, batches[(epoch + 1) % 2])
    store.write_batch("vram", epoch + 1, decoded({1: page(1)}, 4))
    store.commit_epoch(epoch + 1)
    store.write_batch("ram", epoch + 2, decoded({3: page(3)}, n))
    store.commit_epoch(epoch + 2)
    expected = variants[(epoch + 1) % 2][1].copy()
    expected[3] = h(page(3))
    store.close(clean=False)

    store = ShadowStore.open(root, layout)
    try:
        assert store.epoch == epoch + 2
        assert np.array_equal(store.manifest("ram"), expected)
        assert store.manifest("vram")[1] == h(page(1))
        assert np.array_equal(image_hashes(store, "ram"), expected)
        assert_consistent(store)
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------
# digests and rehash


def test_digests_equal_for_equal_content(tmp_path):
    stores = [ShadowStore.open(tmp_path / f"s{i}", LAYOUT) for i in range(2)]
    try:
        assert stores[0].digests() == stores[1].digests()
        for i, s in enumerate(stores):
            # Same content reached through different epochs and batchings.
            if i == 0:
                commit(s, Model(LAYOUT), 1, [("ram", {1: page(1), 2: page(2)})])
                commit(s, Model(LAYOUT), 2, [("vram", {3: page(3)})])
            else:
                commit(s, Model(LAYOUT), 5, [("vram", {3: page(3)}), ("ram", {2: page(2)}),
                                             ("ram", {1: page(1)})])
        d0, d1 = stores[0].digests(), stores[1].digests()
        assert d0 == d1
        assert len(d0) == 2 and all(len(d) == 16 for d in d0)
        assert d0[0] == digest_hashes(stores[0].manifest("ram"))
        commit(stores[1], Model(LAYOUT), 6, [("ram", {2: page(22)})])
        d1 = stores[1].digests()
        assert d1[0] != d0[0] and d1[1] == d0[1]
    finally:
        for s in stores:
            s.close()


def test_rehash_reproduces_hashes(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    try:
        commit(store, model, 1, [("ram", {0: page(0), 5: page(5), 6: ZERO_PAGE}),
                                 ("vram", {15: page(15)})])
        before = {n: store.manifest(n).copy() for n in ("ram", "vram")}
        store.rehash()
        for n in ("ram", "vram"):
            assert np.array_equal(store.manifest(n), before[n])
        # Pages in an unknown state get their real hash back.
        write(store, "ram", 2, {7: page(7)})
        store.abort_epoch()
        assert store.manifest("ram")[7] == UNKNOWN
        store.rehash()
        assert store.manifest("ram")[7] == h(page(7))
        assert np.array_equal(store.manifest("ram"), image_hashes(store, "ram"))
    finally:
        store.close()


def test_unclean_shutdown_after_reboot_rehashes(root):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0)})])
    store.close(clean=False)
    # The images changed behind the journal's back (lost un-fsync'd announcements) and the
    # machine rebooted.
    with open(root / "ram.img", "r+b") as f:
        f.seek(8 * PAGE_SIZE)
        f.write(page(8))
    state = json.loads((root / "state.json").read_text())
    state["boot_id"] = "another-boot"
    (root / "state.json").write_text(json.dumps(state))
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.manifest("ram")[8] == h(page(8))
        assert np.array_equal(store.manifest("ram"), image_hashes(store, "ram"))
        assert store.epoch == 1
    finally:
        store.close()


def test_rehashed_manifest_survives_the_next_crash(root):
    # After a reboot the images are re-hashed. If the daemon then crashes (same boot, so no
    # re-hash this time), the store must not fall back to the pre-reboot journal's view.
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0), 8: page(80)})])
    store.close(clean=False)
    with open(root / "ram.img", "r+b") as f:         # un-journaled image change before a reboot
        f.seek(8 * PAGE_SIZE)
        f.write(page(8))
    state = json.loads((root / "state.json").read_text())
    state["boot_id"] = "another-boot"
    (root / "state.json").write_text(json.dumps(state))
    store = ShadowStore.open(root, LAYOUT)
    assert store.manifest("ram")[8] == h(page(8))
    store.close(clean=False)                          # crash again, same boot
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert_consistent(store)
        assert store.epoch == 1
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------
# disk full


def test_open_on_a_full_disk(tmpfs):
    mnt = tmpfs("256k")
    filler = fill_up(mnt)
    with pytest.raises(StoreError, match="full"):
        ShadowStore.open(mnt / "vm", LAYOUT)
    filler.unlink()
    store = ShadowStore.open(mnt / "vm", LAYOUT)
    store.close()


@pytest.mark.parametrize("clean", [False, True])
def test_disk_full_on_write(tmpfs, clean):
    mnt = tmpfs("1M")
    root = mnt / "vm"
    layout = [RegionInfo("ram", 128 * PAGE_SIZE)]
    model = Model(layout)
    store = ShadowStore.open(root, layout)
    commit(store, model, 1, [("ram", {p: page(p) for p in range(10)})])
    filler = fill_up(mnt)
    with pytest.raises(StoreError, match="full") as ei:
        write(store, "ram", 2, {p: page(100 + p) for p in range(50, 60)})
    assert "free space" in str(ei.value)
    store.abort_epoch()
    filler.unlink()
    store.close(clean=clean)

    store = ShadowStore.open(root, layout)
    try:
        assert store.epoch == 1
        man = store.manifest("ram")
        for p in range(10):
            assert man[p] == h(page(p))
            assert read_page(store, "ram", p) == page(p)
        assert_consistent(store)
        # And replication can go on.
        commit(store, model, 2, [("ram", {p: page(200 + p) for p in range(50, 60)})])
        assert_matches_model(store, model)
    finally:
        store.close()


def _pad_journal(store: ShadowStore, model: Model, epoch: int, lo: int, hi: int) -> int:
    """Commit tiny epochs (rewriting an allocated page) until lo <= journal slack < hi."""
    for _ in range(200):
        if lo <= journal_slack(store) < hi:
            return epoch
        epoch += 1
        commit(store, model, epoch, [("ram", {0: page(1000 + epoch)})])
    raise AssertionError("could not position the journal")


@pytest.mark.parametrize("clean", [False, True])
def test_disk_full_mid_batch_keeps_manifest_truthful(tmpfs, clean):
    # The disk fills while a batch is half written: its first pages overwrite allocated pages
    # (they succeed), the later ones need new blocks (ENOSPC). The journal has room for only
    # part of the batch's announcement. After a crash, no page may claim its old hash.
    mnt = tmpfs("1M")
    root = mnt / "vm"
    layout = [RegionInfo("ram", 128 * PAGE_SIZE)]
    model = Model(layout)
    store = ShadowStore.open(root, layout)
    commit(store, model, 1, [("ram", {p: page(p) for p in range(21)})])
    batch = {p: page(500 + p) for p in range(10)} | {p: page(600 + p) for p in range(100, 105)}
    announce = 28 + 12 * len(batch)
    epoch = _pad_journal(store, model, 1, 1, announce)
    filler = fill_up(mnt)
    with pytest.raises(StoreError, match="full"):
        write(store, "ram", epoch + 1, batch)
    store.abort_epoch()
    filler.unlink()
    store.close(clean=clean)

    store = ShadowStore.open(root, layout)
    try:
        assert store.epoch == epoch
        assert store.manifest("ram")[20] == h(page(20))
        assert_consistent(store)
    finally:
        store.close()


def test_disk_full_on_commit_never_acks_a_lost_epoch(tmpfs):
    # The batch fits (it rewrites allocated pages and its announcement fits in the journal), but
    # the commit records do not. commit_epoch must then fail; if it returns, the epoch must be
    # durable.
    mnt = tmpfs("1M")
    root = mnt / "vm"
    layout = [RegionInfo("ram", 128 * PAGE_SIZE)]
    model = Model(layout)
    store = ShadowStore.open(root, layout)
    commit(store, model, 1, [("ram", {p: page(p) for p in range(21)})])
    batch = {p: page(700 + p) for p in range(1, 21)}
    announce = 28 + 12 * len(batch)
    records = announce + 28
    epoch = _pad_journal(store, model, 1, announce, announce + records)
    filler = fill_up(mnt)
    write(store, "ram", epoch + 1, batch)
    try:
        store.commit_epoch(epoch + 1)
    except StoreError as exc:
        assert "full" in str(exc)
        committed = False
        store.abort_epoch()
    else:
        committed = True
    filler.unlink()
    store.close(clean=False)

    store = ShadowStore.open(root, layout)
    try:
        assert_consistent(store)
        if committed:
            assert store.epoch == epoch + 1, "commit_epoch returned but the epoch is not durable"
            model.pages["ram"].update(batch)
            model.epoch = epoch + 1
            assert_matches_model(store, model)
        else:
            assert store.epoch == epoch
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------
# durability of the small files; failing closed on what cannot be read


def test_layout_state_and_manifest_are_fsynced_before_and_after_their_rename(root, monkeypatch):
    # A rename whose data is not on disk yet leaves an empty file after a power loss (an empty
    # layout.json refuses every connection): each file must be fsync'd before its rename and
    # the directory after it.
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = ShadowStore.open(root, LAYOUT)
    store.close()                                     # a clean close writes manifest + state
    monkeypatch.undo()
    directory = os.path.realpath(root)
    for name in ("layout.json", "state.json", "manifest"):
        target = os.path.join(directory, name)
        renames = [i for i, e in enumerate(events) if e == ("replace", target + ".tmp", target)]
        assert renames, f"{name} was not written through a rename: {events}"
        for i in renames:
            before = [e for e in events[:i] if e[0] == "replace" or e == ("fsync", target + ".tmp")]
            assert before and before[-1] == ("fsync", target + ".tmp"), \
                f"{name} renamed before its data was fsync'd: {events[:i + 1]}"
            assert events[i + 1] == ("fsync", directory), \
                f"no directory fsync right after renaming {name}: {events[i:i + 2]}"
    assert json.loads((root / "layout.json").read_text())["regions"][0]["name"] == "ram"


def test_unreadable_boot_id_rehashes_an_unclean_store(root, monkeypatch):
    # Without a boot ID a reboot cannot be ruled out (lost un-fsync'd announcements): re-hash.
    import replicator.sink.store as store_mod
    monkeypatch.setattr(store_mod, "_BOOT_ID", root.parent / "no-such-boot_id")
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0)})])
    store.close(clean=False)
    with open(root / "ram.img", "r+b") as f:          # changed behind the journal's back
        f.seek(8 * PAGE_SIZE)
        f.write(page(8))
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.manifest("ram")[8] == h(page(8))
        assert np.array_equal(store.manifest("ram"), image_hashes(store, "ram"))
        assert store.epoch == 1
    finally:
        store.close()


def _store_files(root: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(root.iterdir())}


@pytest.mark.parametrize("content", ["", "{\"handed_over\": tr", "[1]", "{\"handed_over\": 1}",
                                     None], ids=["empty", "torn", "list", "not-bool", "directory"])
def test_unreadable_state_is_refused_not_read_as_not_handed_over(root, content):
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0)})])
    store.set_handed_over(True)                       # the domain runs on this host
    store.close(clean=False)
    state = root / "state.json"
    state.unlink()
    if content is None:
        state.mkdir()                                 # reading it fails with an OSError
    else:
        state.write_text(content)
    before = _store_files(root)
    with pytest.raises(StoreError) as ei:
        ShadowStore.open(root, LAYOUT)
    msg = str(ei.value)
    assert str(state) in msg and "handed_over" in msg and "refuses" in msg, msg
    assert _store_files(root) == before, "a refused open changed the store"
    # Doing what the message says when the domain runs here keeps the fence.
    if content is None:
        state.rmdir()
    state.write_text('{"handed_over": true}')
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.handed_over is True
        assert_matches_model(store, model)
    finally:
        store.close()


def test_removed_state_file_rehashes_the_images(root):
    # Removing an unreadable state file (the message's advice when the domain does not run
    # here) leaves nothing that vouches for the manifest: the images are re-hashed.
    model = Model(LAYOUT)
    store = ShadowStore.open(root, LAYOUT)
    commit(store, model, 1, [("ram", {0: page(0), 8: page(80)})])
    store.close()
    with open(root / "ram.img", "r+b") as f:
        f.seek(8 * PAGE_SIZE)
        f.write(page(8))
    (root / "state.json").unlink()
    store = ShadowStore.open(root, LAYOUT)
    try:
        assert store.handed_over is False
        assert store.manifest("ram")[8] == h(page(8))
        assert np.array_equal(store.manifest("ram"), image_hashes(store, "ram"))
    finally:
        store.close()
