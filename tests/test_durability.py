"""The sink's state files on a real daemon: what cannot be read is refused, never guessed.

state.json holds ``handed_over`` ("the domain runs here"). Read as "not handed over" after it
became unreadable, a sink would take replication again and could end with the guest on two
hosts; so a real sink daemon refuses the real source, names the file and leaves it alone.
"""

from __future__ import annotations

from .conftest import wait_until
from .test_faults import MiB, _sink_daemon_pair, daemons  # noqa: F401  (fixture)


async def test_sink_daemon_refuses_replication_on_an_unreadable_state_file(
        shm_dir, workload, daemons):
    workload(shm_dir / "ram", 8 * MiB, rate=0, fill=0.5)
    sinkd, pair = await _sink_daemon_pair(shm_dir, daemons)
    state = shm_dir / "sink" / "vm1" / "state.json"
    try:
        assert await pair.source.rep.verify(30)
        await pair.stop()
        sinkd.terminate()
        state.write_bytes(b"")              # what a power loss left of an un-fsync'd rewrite
        sinkd.start()
        await sinkd.wait_api()
        src = await pair.start_source()
        await wait_until(lambda: str(state) in src.rep.last_error, 60,
                         "the sink to refuse the source, naming its state file")
        err = src.rep.last_error
        assert "handed_over" in err and "refuses to replicate or switch" in err, err
        st = await sinkd.status()
        assert str(state) in st["peer"]["error"], st
        assert not st["peer"]["connected"] and st["acked_epoch"] is None, st
        assert not src.rep.connected.is_set() and src.rep.sessions == 0
        assert state.read_bytes() == b"", "the sink rewrote the state it could not read"
        # The message's way out when the domain does not run here: remove the file. The next
        # attempt re-hashes the shadow and replication carries on.
        state.unlink()
        await pair.wait_connected(60)
        assert await pair.source.rep.verify(30)
        assert (await sinkd.status())["runs_domain"] is False
    finally:
        await pair.stop()
        sinkd.terminate()
