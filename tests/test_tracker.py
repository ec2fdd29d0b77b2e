"""Unit tests for page files, the scan tracker, the ledger and the file driver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from replicator import pagefile
from replicator.config import DomainConfig, RegionConfig
from replicator.errors import DomainError
from replicator.pagefile import data_extents, digest_hashes, hash_file, read_pages
from replicator.source.driver import FileDriver, Region
from replicator.source.ledger import Ledger
from replicator.source.tracker import ScanTracker
from replicator.wire.pages import PAGE_SIZE, ZERO_HASH, ZERO_PAGE, hash_pages


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(PAGE_SIZE)


def h(content: bytes) -> int:
    return xxhash.xxh3_64_intdigest(content)


def sparse_file(path: Path, npages: int, pages: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(npages * PAGE_SIZE)
        for p, c in pages.items():
            f.seek(p * PAGE_SIZE)
            f.write(c)
    return path


def expected_hashes(npages: int, pages: dict[int, bytes]) -> np.ndarray:
    out = np.full(npages, ZERO_HASH, dtype=np.uint64)
    for p, c in pages.items():
        out[p] = h(c)
    return out


# ----------------------------------------------------------------------------------------------
# pagefile


def test_data_extents_of_sparse_file(tmp_path):
    path = sparse_file(tmp_path / "ram", 64, {3: page(3), 10: page(10), 11: page(11),
                                              63: page(63)})
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = data_extents(fd, 64 * PAGE_SIZE)
    finally:
        os.close(fd)
    assert ext == [(3 * PAGE_SIZE, 4 * PAGE_SIZE), (10 * PAGE_SIZE, 12 * PAGE_SIZE),
                   (63 * PAGE_SIZE, 64 * PAGE_SIZE)]


def test_data_extents_page_aligned_for_partial_writes(tmp_path):
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(16 * PAGE_SIZE)
        f.seek(5 * PAGE_SIZE + 100)
        f.write(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = data_extents(fd, 16 * PAGE_SIZE)
    finally:
        os.close(fd)
    assert ext == [(5 * PAGE_SIZE, 6 * PAGE_SIZE)]


def test_data_extents_empty_and_clipped(tmp_path):
    path = sparse_file(tmp_path / "ram", 32, {})
    fd = os.open(path, os.O_RDONLY)
    try:
        assert data_extents(fd, 32 * PAGE_SIZE) == []
        assert data_extents(fd, 0) == []
    finally:
        os.close(fd)
    path2 = sparse_file(tmp_path / "ram2", 32, {20: page(1), 30: page(2)})
    fd = os.open(path2, os.O_RDONLY)
    try:
        # Only the first 25 pages are asked for: the extent at page 30 is beyond.
        assert data_extents(fd, 25 * PAGE_SIZE) == [(20 * PAGE_SIZE, 21 * PAGE_SIZE)]
    finally:
        os.close(fd)


def test_hash_file_sparse(tmp_path, monkeypatch):
    pages = {0: page(0), 3: page(3), 4: ZERO_PAGE, 10: page(10), 11: page(11), 63: page(63)}
    path = sparse_file(tmp_path / "ram", 64, pages)
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd, buffers, offset, *args):
        n = real(fd, buffers, offset, *args)
        reads.append((offset, n))
        return n

    monkeypatch.setattr(pagefile.os, "preadv", spy)
    fd = os.open(path, os.O_RDONLY)
    try:
        hashes = hash_file(fd, 64 * PAGE_SIZE)
    finally:
        os.close(fd)
    assert hashes.dtype == np.uint64 and hashes.shape == (64,)
    assert np.array_equal(hashes, expected_hashes(64, pages))
    assert (hashes[[1, 2, 5, 6, 62]] == ZERO_HASH).all()
    # Only the written extents were read; the holes were never touched.
    read_bytes = sum(n for _, n in reads)
    assert read_bytes <= 7 * PAGE_SIZE
    for off, n in reads:
        first, last = off // PAGE_SIZE, (off + n - 1) // PAGE_SIZE
        assert set(range(first, last + 1)) <= {0, 3, 4, 10, 11, 63}, (off, n)


def test_hash_file_larger_than_buffer(tmp_path):
    rng = np.random.default_rng(1)
    data = bytearray(rng.bytes(40 * PAGE_SIZE))
    data[7 * PAGE_SIZE:8 * PAGE_SIZE] = ZERO_PAGE
    path = tmp_path / "ram"
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        out = hash_file(fd, 40 * PAGE_SIZE, bytearray(3 * PAGE_SIZE))   # 3-page reads
    finally:
        os.close(fd)
    assert np.array_equal(out, hash_pages(data, 40))


def test_hash_file_short_file_and_partial_last_page(tmp_path):
    path = tmp_path / "ram"
    tail = b"\x01" * 100
    path.write_bytes(page(0) + page(1) + tail)            # 2 pages and 100 bytes
    fd = os.open(path, os.O_RDONLY)
    try:
        out = hash_file(fd, 6 * PAGE_SIZE)               # asks for more than the file holds
    finally:
        os.close(fd)
    assert out.tolist() == [h(page(0)), h(page(1)), h(tail + bytes(PAGE_SIZE - 100)),
                            ZERO_HASH, ZERO_HASH, ZERO_HASH]


def test_read_pages_runs_and_past_eof(tmp_path):
    path = sparse_file(tmp_path / "ram", 8, {p: page(p) for p in range(8)})
    with open(path, "r+b") as f:
        f.truncate(6 * PAGE_SIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"\xff" * 16 * PAGE_SIZE)
        idx = np.array([0, 1, 2, 5, 6, 7])
        mv = read_pages(fd, idx, buf)
        assert len(mv) == 6 * PAGE_SIZE
        assert bytes(mv) == page(0) + page(1) + page(2) + page(5) + ZERO_PAGE + ZERO_PAGE
        assert len(read_pages(fd, np.array([], dtype=np.int64), buf)) == 0
    finally:
        os.close(fd)


def test_digest_hashes():
    a = np.array([1, 2, 3], dtype=np.uint64)
    assert digest_hashes(a) == digest_hashes(a.copy())
    assert len(digest_hashes(a)) == 16
    assert digest_hashes(a) != digest_hashes(np.array([1, 2, 4], dtype=np.uint64))


# ----------------------------------------------------------------------------------------------
# scan tracker


NPAGES = 32


@pytest.fixture
def ram(tmp_path):
    pages = {p: page(p) for p in (0, 1, 5, 6, 7, 20, 31)} | {8: ZERO_PAGE}
    path = sparse_file(tmp_path / "ram", NPAGES, pages)
    vpages = {2: page(102)}
    vpath = sparse_file(tmp_path / "vram", 4, vpages)
    regions = [Region("ram", path, NPAGES * PAGE_SIZE), Region("vram", vpath, 4 * PAGE_SIZE)]
    return regions, {"ram": pages, "vram": vpages}


def modify(path: Path, pages: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for p, c in pages.items():
            f.seek(p * PAGE_SIZE)
            f.write(c)


def ship(ledger: Ledger, region: str, idx: np.ndarray, hashes: np.ndarray) -> None:
    """What the sender does with a round's pages: take them and record what it sent."""
    taken = ledger.take_pending(region, idx)
    ledger.regions[region].shipped[taken] = hashes[taken]


async def test_first_round_finds_all_nonzero_pages(ram):
    regions, content = ram
    tracker = ScanTracker(regions)
    try:
        ledger = Ledger.for_regions(regions)
        rnd = await tracker.round(ledger)
        assert rnd.dirty["ram"].tolist() == [0, 1, 5, 6, 7, 20, 31]    # page 8 is all zero
        assert rnd.dirty["vram"].tolist() == [2]
        assert rnd.pages == 8
        assert rnd.scanned_bytes == (NPAGES + 4) * PAGE_SIZE
        assert rnd.duration >= 0
        assert rnd.digests["ram"] == digest_hashes(expected_hashes(NPAGES, content["ram"]))
        assert rnd.digests["vram"] == digest_hashes(expected_hashes(4, content["vram"]))
    finally:
        await tracker.close()


async def test_rounds_after_shipping(ram):
    regions, content = ram
    tracker = ScanTracker(regions)
    try:
        ledger = Ledger.for_regions(regions)
        rnd = await tracker.round(ledger)
        ledger.add_round(1, rnd.started, rnd.duration, rnd.dirty, 0.1)
        cur = {"ram": expected_hashes(NPAGES, content["ram"]),
               "vram": expected_hashes(4, content["vram"])}
        for name, idx in rnd.dirty.items():
            ship(ledger, name, idx, cur[name])
        ledger.epoch_sent(1)
        ledger.acked(1)

        # Nothing changed: nothing found.
        rnd = await tracker.round(ledger)
        assert rnd.pages == 0
        assert all(len(v) == 0 for v in rnd.dirty.values())

        # Three pages change (one of them from data to zero, one hole gets data).
        modify(regions[0].path, {5: page(55), 20: ZERO_PAGE, 13: page(13)})
        rnd = await tracker.round(ledger)
        assert rnd.dirty["ram"].tolist() == [5, 13, 20]
        assert rnd.dirty["vram"].tolist() == []

        # Rewriting a page with the content the sink already has is not a change.
        modify(regions[0].path, {0: content["ram"][0]})
        rnd2 = await tracker.round(ledger)
        assert rnd2.dirty["ram"].tolist() == [5, 13, 20]
    finally:
        await tracker.close()


async def test_pending_pages_are_not_reported_again(ram):
    regions, content = ram
    tracker = ScanTracker(regions)
    try:
        ledger = Ledger.for_regions(regions)
        rnd = await tracker.round(ledger)
        ledger.add_round(1, rnd.started, rnd.duration, rnd.dirty, 0.1)
        assert ledger.pending_pages == 8
        # Not yet sent; the guest writes to some of the same pages and to a new one.
        modify(regions[0].path, {0: page(1000), 1: page(1001), 2: page(1002)})
        rnd2 = await tracker.round(ledger)
        assert rnd2.dirty["ram"].tolist() == [2]          # 0 and 1 are already queued
        assert rnd2.dirty["vram"].tolist() == []
        ledger.add_round(2, rnd2.started, rnd2.duration, rnd2.dirty, 0.1)
        assert ledger.pending_pages == 9
        # Once taken by the sender (and shipped with the newest content) they are tracked again.
        cur = expected_hashes(NPAGES, content["ram"] | {0: page(1000), 1: page(1001),
                                                        2: page(1002)})
        ship(ledger, "ram", np.array([0, 1]), cur)
        modify(regions[0].path, {1: page(2001)})
        rnd3 = await tracker.round(ledger)
        assert rnd3.dirty["ram"].tolist() == [1]
    finally:
        await tracker.close()


async def test_tracker_after_reset_to_sink(ram):
    regions, content = ram
    tracker = ScanTracker(regions)
    try:
        ledger = Ledger.for_regions(regions)
        # The sink already holds everything except page 7 (unknown there) and page 31 (stale).
        man = expected_hashes(NPAGES, content["ram"])
        man[7] = 0
        man[31] = h(page(9999))
        ledger.reset_to_sink({"ram": man, "vram": expected_hashes(4, content["vram"])}, 41)
        rnd = await tracker.round(ledger)
        assert rnd.dirty["ram"].tolist() == [7, 31]
        assert rnd.dirty["vram"].tolist() == []
        assert ledger.acked_epoch == 41 and ledger.sent_epoch == 41
    finally:
        await tracker.close()


# ----------------------------------------------------------------------------------------------
# ledger lag accounting


def _ledger() -> Ledger:
    return Ledger.for_regions([Region("ram", Path("/nonexistent"), 64 * PAGE_SIZE),
                               Region("vram", Path("/nonexistent"), 8 * PAGE_SIZE)])


def test_ledger_lag_accounting():
    ledger = _ledger()
    # Before any proof the lag is counted from the ledger's creation: take that instant as t0,
    # not a later clock reading (which made this test flaky by microseconds).
    t0 = ledger.created_at
    snap = ledger.snapshot(now=t0)
    # Nothing was ever acknowledged: not in sync, and the lag is not claimed to be zero.
    assert snap.in_sync is False and snap.lag_pages >= 1

    n = ledger.add_round(1, t0, 0.01, {"ram": np.array([1, 2, 3, 4]), "vram": np.array([0])},
                         0.05)
    assert n == 5
    snap = ledger.snapshot(now=t0 + 2.0)
    assert snap.lag_pages == 5 and snap.lag_bytes == 5 * PAGE_SIZE
    assert snap.lag_seconds == pytest.approx(2.0)
    assert snap.in_sync is False
    assert ledger.regions["ram"].pending[[1, 2, 3, 4]].all()

    taken = ledger.take_pending("ram", np.array([1, 2, 3, 4]))
    assert taken.tolist() == [1, 2, 3, 4]
    assert ledger.pending_pages == 1 and ledger.inflight_pages == 4
    assert not ledger.regions["ram"].pending.any()
    ledger.take_pending("vram", np.array([0]))
    snap = ledger.snapshot(now=t0 + 3.0)
    assert snap.lag_pages == 5                         # sent is not durable: still behind
    assert snap.lag_seconds == pytest.approx(3.0)

    ledger.epoch_sent(1)
    assert ledger.sent_epoch == 1 and ledger.unacked_epochs() == 1
    snap = ledger.snapshot(now=t0 + 4.0)
    assert snap.lag_pages == 5 and snap.lag_seconds > 0 and snap.sent_epoch == 1

    ledger.acked(1)
    snap = ledger.snapshot(now=t0 + 5.0)
    assert snap.lag_pages == 0 and snap.lag_bytes == 0 and snap.lag_seconds == 0.0
    assert snap.acked_epoch == 1 and ledger.unacked_epochs() == 0
    # In sync means: everything found is durable within a second (a running guest always
    # dirties something, so "the last round found nothing" would never hold).
    assert snap.in_sync is True
    ledger.add_round(2, t0 + 5.0, 0.01, {"ram": np.array([7])}, 0.05)
    assert ledger.snapshot(now=t0 + 5.5).in_sync is True       # behind by half a second
    assert ledger.snapshot(now=t0 + 6.5).in_sync is False      # behind by more than a second


def test_ledger_lag_age_is_the_oldest_unacked_round():
    ledger = _ledger()
    t0 = ledger.created_at               # unproven lag counts from here: no clock skew
    ledger.add_round(1, t0, 0.01, {"ram": np.array([1])}, 0.05)
    ledger.add_round(2, t0 + 1.0, 0.01, {"ram": np.array([2, 3])}, 0.05)
    ledger.add_round(3, t0 + 2.0, 0.01, {"ram": np.array([], dtype=np.int64)}, 0.05)
    assert ledger.snapshot(now=t0 + 10).lag_seconds == pytest.approx(10.0)
    for e, idx in ((1, [1]), (2, [2, 3])):
        ledger.take_pending("ram", np.array(idx))
        ledger.epoch_sent(e)
    ledger.epoch_sent(3)
    assert ledger.unacked_epochs() == 3
    ledger.acked(1)
    snap = ledger.snapshot(now=t0 + 10)
    assert snap.lag_pages == 2 and snap.lag_seconds == pytest.approx(9.0)
    ledger.acked(3)                                    # one ack covers everything before it
    snap = ledger.snapshot(now=t0 + 10)
    assert snap.lag_pages == 0 and snap.lag_seconds == 0.0
    assert ledger.unacked_epochs() == 0 and snap.acked_epoch == 3


def test_in_sync_needs_a_live_session_and_an_acked_round_after_each_reconnect():
    ledger = _ledger()
    t0 = ledger.created_at               # unproven lag counts from here: no clock skew
    man = {"ram": np.zeros(64, dtype=np.uint64), "vram": np.zeros(8, dtype=np.uint64)}
    ledger.reset_to_sink(man, 0)
    ledger.add_round(1, t0, 0.01, {"ram": np.array([1])}, 0.05)
    ledger.take_pending("ram", np.array([1]))
    ledger.epoch_sent(1)
    ledger.acked(1)
    assert ledger.snapshot(now=t0 + 0.5).in_sync is True
    # The link drops: no session, nothing proven any more; lag grows from the last proof.
    snap = ledger.snapshot(now=t0 + 20, streaming=False)
    assert snap.in_sync is False
    assert snap.lag_seconds == pytest.approx(20.0) and snap.lag_pages >= 1
    # Reconnected: the sink's manifest is the truth, but until a round compared against it
    # is acknowledged, nothing is proven (a dead sink used to look "in sync, zero lag" here).
    ledger.reset_to_sink(man, 1)
    snap = ledger.snapshot(now=t0 + 21)
    assert snap.in_sync is False and snap.lag_seconds == pytest.approx(21.0)
    ledger.add_round(2, t0 + 21, 0.01, {"ram": np.array([], dtype=np.int64)}, 0.05)
    ledger.epoch_sent(2)
    assert ledger.snapshot(now=t0 + 21.2).in_sync is False
    ledger.acked(2)
    snap = ledger.snapshot(now=t0 + 21.3)
    assert snap.in_sync is True and snap.lag_pages == 0 and snap.lag_seconds == 0.0


def test_take_pending_skips_pages_not_pending():
    ledger = _ledger()
    ledger.add_round(1, time.monotonic(), 0.0, {"ram": np.array([1, 2, 3])}, 0.05)
    assert ledger.take_pending("ram", np.array([1, 2])).tolist() == [1, 2]
    # Taking again (or taking pages never queued) takes nothing and counts nothing.
    assert ledger.take_pending("ram", np.array([1, 2, 9])).tolist() == []
    assert ledger.pending_pages == 1 and ledger.inflight_pages == 2


def test_reset_to_sink_clears_lag():
    ledger = _ledger()
    t0 = ledger.created_at               # unproven lag counts from here: no clock skew
    ledger.add_round(5, t0, 0.0, {"ram": np.array([1, 2])}, 0.05)
    ledger.take_pending("ram", np.array([1]))
    ledger.epoch_sent(5)
    man = {"ram": np.arange(64, dtype=np.uint64), "vram": np.zeros(8, dtype=np.uint64)}
    ledger.reset_to_sink(man, 3)
    snap = ledger.snapshot(now=t0 + 1)
    assert snap.acked_epoch == 3 and snap.sent_epoch == 3
    assert not ledger.regions["ram"].pending.any()
    assert np.array_equal(ledger.regions["ram"].shipped, man["ram"])
    assert ledger.unacked_epochs() == 0


# ----------------------------------------------------------------------------------------------
# file driver


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def _wait_state(pid: int, states: set[str]) -> str:
    """Poll /proc until the process reaches one of ``states`` (signals land asynchronously)."""
    deadline = time.monotonic() + 10
    st = _proc_state(pid)
    while st not in states and time.monotonic() < deadline:
        time.sleep(0.005)
        st = _proc_state(pid)
    return st


@pytest.fixture
def sleeper(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    pid_file = tmp_path / "vm.pid"
    pid_file.write_text(f"{proc.pid}\n")
    yield proc, pid_file
    if proc.poll() is None:
        os.kill(proc.pid, 9)
    proc.wait()


async def test_file_driver_pid_file_pause_resume(sleeper):
    proc, pid_file = sleeper
    drv = FileDriver(DomainConfig(pid_file=pid_file))
    assert await drv.is_running() is True
    await drv.pause()
    assert _wait_state(proc.pid, {"T", "t"}) in ("T", "t")
    assert await drv.is_running() is False
    await drv.resume()
    assert _wait_state(proc.pid, {"S", "R"}) in ("S", "R")
    assert await drv.is_running() is True
    assert proc.poll() is None                           # paused and resumed, never killed


async def test_file_driver_dead_process(sleeper):
    proc, pid_file = sleeper
    drv = FileDriver(DomainConfig(pid_file=pid_file))
    proc.kill()
    proc.wait()
    assert await drv.is_running() is False
    with pytest.raises(DomainError):
        await drv.pause()


async def test_file_driver_zombie_is_not_running(sleeper):
    proc, pid_file = sleeper
    drv = FileDriver(DomainConfig(pid_file=pid_file))
    os.kill(proc.pid, 9)                                 # not reaped yet: a zombie
    assert _wait_state(proc.pid, {"Z"}) == "Z"
    assert await drv.is_running() is False


@pytest.mark.parametrize("content", ["", "not-a-pid", "12 13"])
async def test_file_driver_bad_pid_file(tmp_path, content):
    pid_file = tmp_path / "vm.pid"
    pid_file.write_text(content)
    drv = FileDriver(DomainConfig(pid_file=pid_file))
    with pytest.raises(DomainError, match="pid file"):
        await drv.pause()


async def test_file_driver_missing_pid_file(tmp_path):
    drv = FileDriver(DomainConfig(pid_file=tmp_path / "none.pid"))
    with pytest.raises(DomainError):
        await drv.resume()


async def test_file_driver_commands(tmp_path, sleeper):
    proc, pid_file = sleeper
    log = tmp_path / "log"
    cfg = DomainConfig(
        pause_command=("sh", "-c", f"echo pause >> {log}; kill -STOP {proc.pid}"),
        resume_command=("sh", "-c", f"echo resume >> {log}; kill -CONT {proc.pid}"),
    )
    drv = FileDriver(cfg)
    assert await drv.is_running() is True
    await drv.pause()
    assert log.read_text() == "pause\n"
    assert _wait_state(proc.pid, {"T", "t"}) in ("T", "t")
    assert await drv.is_running() is False
    await drv.resume()
    assert log.read_text() == "pause\nresume\n"
    assert _wait_state(proc.pid, {"S", "R"}) in ("S", "R")
    assert await drv.is_running() is True


async def test_file_driver_commands_take_precedence_over_pid_file(tmp_path, sleeper):
    proc, pid_file = sleeper
    log = tmp_path / "log"
    drv = FileDriver(DomainConfig(pause_command=("sh", "-c", f"echo p >> {log}"),
                                  resume_command=("sh", "-c", f"echo r >> {log}"),
                                  pid_file=pid_file))
    await drv.pause()
    await drv.resume()
    assert log.read_text() == "p\nr\n"
    assert _proc_state(proc.pid) in ("S", "R")           # no signal was sent


async def test_file_driver_failing_command(tmp_path):
    drv = FileDriver(DomainConfig(pause_command=("sh", "-c", "echo no such vm >&2; exit 3"),
                                  resume_command=(sys.executable, "-c", "raise SystemExit(4)")))
    with pytest.raises(DomainError) as ei:
        await drv.pause()
    assert "pause" in str(ei.value) and "(3)" in str(ei.value) and "no such vm" in str(ei.value)
    assert await drv.is_running() is True                # a failed pause did not pause
    with pytest.raises(DomainError, match=r"resume command .* failed \(4\)"):
        await drv.resume()


async def test_file_driver_without_means_to_pause():
    drv = FileDriver(DomainConfig())
    with pytest.raises(DomainError, match="cannot pause"):
        await drv.pause()
    with pytest.raises(DomainError, match="cannot resume"):
        await drv.resume()
    assert await drv.is_running() is True


async def test_file_driver_regions(tmp_path):
    a = sparse_file(tmp_path / "a", 8, {})
    b = sparse_file(tmp_path / "b", 16, {})
    drv = FileDriver(DomainConfig(regions=(RegionConfig("ram", a),
                                           RegionConfig("vram", b, 4 * PAGE_SIZE))))
    regions = await drv.regions()
    assert regions == [Region("ram", a, 8 * PAGE_SIZE), Region("vram", b, 4 * PAGE_SIZE)]
    assert [r.npages for r in regions] == [8, 4]


@pytest.mark.parametrize("size", [0, 100, PAGE_SIZE + 1])
async def test_file_driver_region_bad_size(tmp_path, size):
    p = tmp_path / "ram"
    p.write_bytes(b"x" * size)
    drv = FileDriver(DomainConfig(regions=(RegionConfig("ram", p),)))
    with pytest.raises(DomainError, match="multiple"):
        await drv.regions()


async def test_file_driver_region_missing_file(tmp_path):
    drv = FileDriver(DomainConfig(regions=(RegionConfig("ram", tmp_path / "nope"),)))
    with pytest.raises(DomainError, match="cannot stat"):
        await drv.regions()
