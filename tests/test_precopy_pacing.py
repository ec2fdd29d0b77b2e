"""The qemu-precopy relay's pacing decisions (replicator.source.precopy), without QEMU: the
send buffer of QEMU's end of the socket pair, and when a backlog begins and ends. The real
QEMU blocking on that buffer is tested in test_vmm_qemu; the relay end to end in
test_precopy_qemu and the crash and round-trip suites."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from types import SimpleNamespace

from replicator.config import StreamConfig
from replicator.source.precopy import SPIN_ROUNDS, PrecopyStream

from .conftest import wait_until


def make_stream(**stream) -> PrecopyStream:
    cfg = SimpleNamespace(stream=dataclasses.replace(StreamConfig(), **stream))
    return PrecopyStream(SimpleNamespace(cfg=cfg), throttle=None)


def sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def test_qemu_end_gets_a_small_send_buffer_only_while_idle():
    stream = make_stream()
    ours, theirs = socket.socketpair()
    observer = theirs.dup()                      # the same socket, as QEMU's duplicate is
    with ours, theirs, observer:
        default = sndbuf(theirs)
        stream._qpeer, stream._qpeer_default = theirs, default
        stream._pace_qemu(True)
        # The kernel doubles what is set (its bookkeeping); 4 KiB is the configured default.
        assert sndbuf(theirs) == 2 * 4096 < default
        stream._pace_qemu(True)
        assert sndbuf(theirs) == 2 * 4096
        stream._pace_qemu(False)
        assert sndbuf(theirs) == default
        stream._pace_qemu(True)
        stream.begin_switch()                    # the switch drains at full speed, to EOF
        assert sndbuf(observer) == default and stream.switching.is_set()
        assert stream._qpeer is None and theirs.fileno() == -1


def test_send_buffer_left_alone_when_configured_off():
    stream = make_stream(precopy_send_buffer=0)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        default = sndbuf(theirs)
        stream._qpeer, stream._qpeer_default = theirs, default
        stream._pace_qemu(True)
        assert sndbuf(theirs) == default


def test_backlog_begins_on_a_large_remainder_and_ends_when_qemu_spins_again():
    stream = make_stream(precopy_backlog=1 << 20)
    stream._backlog = False
    assert stream._judge_backlog(remaining=(1 << 20) + 1, syncs=50) is True
    # Idle and little left: QEMU blocked on its buffer syncs little, and that is no backlog
    # (the pump's drains decide; a drain that does not end turns to backlog).
    stream._backlog = False
    assert stream._judge_backlog(remaining=4096, syncs=0) is False
    # In a backlog, a QEMU still inside a pass (few syncs) keeps it; one that finishes pass
    # after pass has caught up.
    stream._backlog = True
    assert stream._judge_backlog(remaining=4096, syncs=1) is True
    assert stream._judge_backlog(remaining=4096, syncs=4) is False


def _run_pump(stream: PrecopyStream, theirs: socket.socket, *writes: bytes
              ) -> tuple[asyncio.Task, list[tuple[bytes, int, int]]]:
    """Start the pump on a stand-in for QEMU's stream. QEMU has written ``writes[0]`` and
    writes each next one once the relay has sent a chunk on (an ``E`` ends a RAM round). The
    list gets each chunk with QEMU's send buffer when it was parsed and when it was sent."""
    later = list(writes[1:])
    theirs.sendall(writes[0])
    seen: list[tuple[bytes, int, int]] = []
    parsed: list[int] = []

    def parse(chunk):
        parsed.append(sndbuf(theirs))
        stream.iterations += bytes(chunk).count(b"E")
        return bytes(chunk)

    async def relay(_link, _sid, _n, data):
        seen.append((data, parsed[-1], sndbuf(theirs)))
        if later:
            theirs.sendall(later.pop(0))
    stream._parse, stream._relay = parse, relay
    return asyncio.create_task(stream._pump(None, 1)), seen


def _plug(stream: PrecopyStream, ours: socket.socket, theirs: socket.socket, backlog: bool):
    ours.setblocking(False)
    stream._qsock, stream._qpeer, stream._qpeer_default = ours, theirs, sndbuf(theirs)
    stream._backlog, stream.qemu_info = backlog, {"status": "active"}
    stream._pace_qemu(not backlog)


async def _one_drain(stream: PrecopyStream, *writes: bytes) -> list[tuple[bytes, int, int]]:
    """Run the pump for one idle drain (see _run_pump)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        _plug(stream, ours, theirs, backlog=False)
        pump, seen = _run_pump(stream, theirs, *writes)
        try:
            await wait_until(lambda: sum(stream.drains.values()) == 1, 5, "one drain")
        finally:
            pump.cancel()
        assert sndbuf(theirs) == 2 * 4096            # small again between ticks
        stream._qpeer = None
        return seen


DEFAULT = sndbuf(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
SMALL = 2 * 4096


async def test_an_idle_drain_reads_qemus_first_round_with_the_full_buffer():
    stream = make_stream(precopy_interval=5.0)
    # A tick's worth queued, QEMU's round still going: read with the full buffer (with the
    # small one a busy tick's hundreds of pages went one per read and outlasted the drain).
    seen = await _one_drain(stream, b"p" * 3000)
    assert seen == [(b"p" * 3000, DEFAULT, DEFAULT)]
    assert stream.drains == {"empty": 1, "rounds": 0, "burst": 0}
    # Once QEMU's first round has ended the buffer is small again, so a QEMU with little left
    # re-syncs only a few times before it blocks; a second round ends the drain.
    stream = make_stream(precopy_interval=5.0)
    seen = await _one_drain(stream, b"p" * 3000 + b"E", b"q" * 10, b"E", b"never read")
    assert seen == [(b"p" * 3000 + b"E", DEFAULT, SMALL), (b"q" * 10, SMALL, SMALL),
                    (b"E", SMALL, SMALL)]
    assert stream.drains == {"empty": 0, "rounds": 1, "burst": 0}


async def test_the_buffer_shrinks_as_soon_as_a_round_ends_not_after_the_send():
    # While the relay sends a chunk on (compression, TLS, a slow link) a QEMU on the full
    # buffer re-syncs freely: the round's end is acted on as soon as it is parsed.
    stream = make_stream(precopy_interval=5.0)
    seen = await _one_drain(stream, b"p" * 100, b"p" * 50 + b"E", b"E")
    assert [(parsed, sent) for _, parsed, sent in seen] == [
        (DEFAULT, DEFAULT), (DEFAULT, SMALL), (SMALL, SMALL)]


async def test_a_backlog_ends_at_once_when_qemu_reads_as_caught_up():
    # QEMU's rounds carry at least 64 pages while it has a backlog; many round ends in one
    # read mean it re-syncs and finds little: paced from that read on, not at the next poll.
    stream = make_stream(precopy_interval=5.0)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        _plug(stream, ours, theirs, backlog=True)
        spin = b"E" * SPIN_ROUNDS
        pump, seen = _run_pump(stream, theirs, b"p" * 3000 + b"E" * (SPIN_ROUNDS - 1), spin,
                               b"q")
        try:
            await wait_until(lambda: sum(stream.drains.values()) == 1, 5, "an idle drain")
        finally:
            pump.cancel()
        stream._qpeer = None
    # A read with fewer round ends stays in the backlog, on the full buffer.
    assert seen[0] == (b"p" * 3000 + b"E" * (SPIN_ROUNDS - 1), DEFAULT, DEFAULT)
    assert seen[1] == (spin, DEFAULT, SMALL)
    assert stream._backlog is False and stream.pacing == "idle"
    assert stream.backlogs == 1 and stream.backlog_seconds > 0
    # The idle drain that follows reads what QEMU queued meanwhile.
    assert seen[2][0] == b"q" and stream.drains["empty"] == 1


async def test_backlog_time_is_counted_until_the_first_idle_drain():
    stream = make_stream(precopy_interval=5.0)
    stream.pacing, stream.backlogs = "backlog", 1
    stream._backlog_since = time.monotonic() - 1.0      # a first pass that took a second
    await _one_drain(stream, b"p" * 100)
    assert stream.pacing == "idle" and stream.backlogs == 1
    assert 1.0 <= stream.backlog_seconds < 3.0
    status = stream.precopy_status()
    assert status["backlogs"] == 1 and status["drains"]["empty"] == 1
