"""The qemu-precopy relay's pacing decisions (replicator.source.precopy), without QEMU: the
send buffer of QEMU's end of the socket pair, and when a backlog begins and ends. The real
QEMU blocking on that buffer is tested in test_vmm_qemu; the relay end to end in
test_precopy_qemu and the crash and round-trip suites."""

from __future__ import annotations

import dataclasses
import socket
from types import SimpleNamespace

from replicator.config import StreamConfig
from replicator.source.precopy import PrecopyStream


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
