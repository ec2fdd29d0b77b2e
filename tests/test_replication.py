"""Functional tests of the engine: a real source and sink over 127.0.0.1, a dirtying workload."""

from __future__ import annotations

import os

import numpy as np
import pytest

from replicator.config import PAGE_SIZE
from replicator.errors import SwitchError

from .conftest import files_equal, wait_until

MiB = 1024 * 1024


async def test_replicates_under_load_until_shadow_equals_source(shm_dir, workload, pair_factory):
    wl = workload(shm_dir / "ram", 64 * MiB, rate=20e6, fill=0.75)
    pair = await pair_factory(shm_dir)
    rep = pair.source.rep
    # While the workload dirties pages, the stream keeps going: several epochs get acked.
    await wait_until(lambda: rep.ledger.acked_epoch >= 5)
    assert rep.ledger.raw_sent >= 48 * MiB          # at least the filled part went once
    wl.pause()
    assert await rep.verify()
    assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    st = pair.source.status()
    assert st["peer"]["connected"] and st["lag"]["pages"] == 0


async def test_coalesces_and_sends_only_changed_pages(shm_dir, workload, pair_factory):
    wl = workload(shm_dir / "ram", 16 * MiB, rate=0, fill=0.5)
    pair = await pair_factory(shm_dir)
    rep = pair.source.rep
    assert await rep.verify()
    before = rep.ledger.raw_sent
    # Change 10 pages three times each before the next round: each goes once.
    fd = os.open(shm_dir / "ram", os.O_RDWR)
    try:
        for _ in range(3):
            for p in range(100, 110):
                os.pwrite(fd, os.urandom(PAGE_SIZE), p * PAGE_SIZE)
    finally:
        os.close(fd)
    rnd = await rep.sync()
    assert rnd.pages == 10
    assert rep.ledger.raw_sent - before == 10 * PAGE_SIZE
    assert await rep.verify()
    wl.stop()


async def test_sink_restart_resumes_without_full_resend(shm_dir, workload, pair_factory):
    wl = workload(shm_dir / "ram", 64 * MiB, rate=0, fill=0.75)
    pair = await pair_factory(shm_dir)
    rep = pair.source.rep
    assert await rep.verify()
    full = rep.ledger.raw_sent
    assert full >= 48 * MiB
    # Sink goes away; meanwhile 37 pages change; a new sink process state takes over.
    await pair.sink.stop()
    pair.sink = None
    await wait_until(lambda: not rep.connected.is_set())
    fd = os.open(shm_dir / "ram", os.O_RDWR)
    changed = np.random.default_rng(1).choice(16384, size=37, replace=False)
    for p in changed.tolist():
        os.pwrite(fd, os.urandom(PAGE_SIZE), p * PAGE_SIZE)
    os.close(fd)
    await pair.start_sink()            # same state dir, same port
    await pair.wait_connected()
    assert await rep.verify()
    resent = rep.ledger.raw_sent - full
    assert resent == 37 * PAGE_SIZE, f"resent {resent} bytes, expected only the 37 changed pages"
    assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    wl.stop()


async def test_layout_mismatch_is_refused_with_clear_error(shm_dir, workload, pair_factory):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=0, fill=0.5)
    pair = await pair_factory(shm_dir)
    assert await pair.source.rep.verify()
    await pair.source.stop()
    pair.source = None
    # The domain grew: the shadow must not silently accept a different layout.
    os.truncate(shm_dir / "ram", 16 * MiB)
    src = await pair.start_source()
    await wait_until(lambda: "layout mismatch" in src.rep.last_error, timeout=10)
    assert "ram0=8388608" in src.rep.last_error and "ram0=16777216" in src.rep.last_error
    assert not src.rep.connected.is_set()
    wl.stop()


async def test_switch_file_domain_hands_over_and_fences(shm_dir, workload, pair_factory):
    wl = workload(shm_dir / "ram", 32 * MiB, rate=5e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    result = await pair.source.switch("live")
    assert result["result"] == "ok" and result["shadow_verified"]
    assert result["downtime_ms"] > 0 and result["time_to_switch_ms"] >= result["downtime_ms"]
    # Source stays paused (SIGSTOP'd workload), the sink "runs" the domain, and both persist it.
    assert not await pair.source.driver.is_running()
    assert pair.sink.status()["runs_domain"]
    assert (shm_dir / "source" / "vm1" / "handed-over.json").exists()
    assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    with pytest.raises(Exception, match="handed the domain over"):
        await pair.source.switch("live")


async def test_switch_refused_when_shadow_not_verified_rolls_back(shm_dir, workload,
                                                                 pair_factory):
    wl = workload(shm_dir / "ram", 16 * MiB, rate=2e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    assert await pair.source.rep.verify() or True
    # Corrupt the sink's view of one page behind the protocol's back.
    store = pair.sink.receiver.store
    store.regions["ram0"].hashes[5] ^= np.uint64(1)
    with pytest.raises(SwitchError, match="differs from the source") as exc:
        await pair.source.switch("stop")
    assert exc.value.rolled_back
    assert await pair.source.driver.is_running()       # rolled back: runs here again
    assert not pair.sink.status()["runs_domain"]
    assert not (shm_dir / "source" / "vm1" / "handed-over.json").exists()
