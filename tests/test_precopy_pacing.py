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
from replicator.source.precopy import PrecopyStream

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


async def _one_drain(stream: PrecopyStream, *writes: bytes) -> list[tuple[bytes, int]]:
    """Run the pump for one idle drain. QEMU has written ``writes[0]`` since the last tick and
    writes each next one once the relay has forwarded a chunk (an ``E`` ends a RAM round).
    Returns each chunk forwarded with QEMU's send buffer at that moment."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        stream._qsock, stream._qpeer, stream._qpeer_default = ours, theirs, sndbuf(theirs)
        stream._backlog, stream.qemu_info = False, {"status": "active"}
        stream._pace_qemu(True)
        later = list(writes[1:])
        theirs.sendall(writes[0])
        seen: list[tuple[bytes, int]] = []

        async def forward(_link, _sid, chunk):
            seen.append((bytes(chunk), sndbuf(theirs)))
            stream.iterations += bytes(chunk).count(b"E")
            if later:
                theirs.sendall(later.pop(0))
        stream._forward = forward
        pump = asyncio.create_task(stream._pump(None, 1))
        try:
            await wait_until(lambda: sum(stream.drains.values()) == 1, 5, "one drain")
        finally:
            pump.cancel()
        assert sndbuf(theirs) == 2 * 4096            # small again between ticks
        stream._qpeer = None
        return seen


async def test_an_idle_drain_reads_qemus_first_round_with_the_full_buffer():
    stream = make_stream(precopy_interval=5.0)
    default = sndbuf(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    # A tick's worth queued, QEMU's round still going: read with the full buffer (with the
    # small one a busy tick's hundreds of pages went one per read and outlasted the drain).
    seen = await _one_drain(stream, b"p" * 3000)
    assert [buf for _, buf in seen] == [default]
    assert stream.drains == {"empty": 1, "rounds": 0, "burst": 0}
    # Once QEMU's first round has ended the buffer is small again, so a QEMU with little left
    # re-syncs only a few times before it blocks; a second round ends the drain.
    stream = make_stream(precopy_interval=5.0)
    seen = await _one_drain(stream, b"p" * 3000 + b"E", b"q" * 10, b"E", b"never read")
    assert [(data, buf) for data, buf in seen] == [
        (b"p" * 3000 + b"E", default), (b"q" * 10, 2 * 4096), (b"E", 2 * 4096)]
    assert stream.drains == {"empty": 0, "rounds": 1, "burst": 0}


async def test_backlog_time_is_counted_until_the_first_idle_drain():
    stream = make_stream(precopy_interval=5.0)
    stream.pacing, stream.backlogs = "backlog", 1
    stream._backlog_since = time.monotonic() - 1.0      # a first pass that took a second
    await _one_drain(stream, b"p" * 100)
    assert stream.pacing == "idle" and stream.backlogs == 1
    assert 1.0 <= stream.backlog_seconds < 3.0
    status = stream.precopy_status()
    assert status["backlogs"] == 1 and status["drains"]["empty"] == 1
