"""The sink half of the qemu-precopy relay takes compressed chunks (PrecopyData codec/raw_len)
and refuses lying ones before anything reaches the shadow (a unit test: a socket pair stands
in for the shadow QEMU's incoming socket)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import zstandard

from replicator.errors import MalformedFrame, ProtocolError
from replicator.sink.precopy import PrecopySink
from replicator.vmm.migration_stream import PrecopyParser
from replicator.vmm.spec import RAM_BACKEND_ID
from replicator.wire import messages as m

HEADER = b"QEVM\x00\x00\x00\x03"          # the stream's magic and version: nothing else yet


@pytest.fixture
def sink():
    receiver = SimpleNamespace(disconnect_handler=None, precopy_handler=None,
                               store=SimpleNamespace(regions={RAM_BACKEND_ID: SimpleNamespace(
                                   hashes=np.zeros(16, dtype=np.uint64))}))
    s = PrecopySink(receiver, SimpleNamespace(shadow=SimpleNamespace()))
    ours, shadow = socket.socketpair()
    ours.setblocking(False)
    shadow.settimeout(1)
    s.session, s._qsock, s._parser = 5, ours, PrecopyParser()
    yield s, shadow
    ours.close()
    shadow.close()


LINK = SimpleNamespace(max_frame=1 << 20)


async def test_a_compressed_chunk_reaches_the_shadow_as_it_left_qemu(sink):
    s, shadow = sink
    await s.handle(m.PrecopyData(5, "zstd", len(HEADER), zstandard.compress(HEADER)), LINK)
    await s.handle(m.PrecopyData(5, "none", 0, b""), LINK)
    assert shadow.recv(100) == HEADER


@pytest.mark.parametrize("msg, error, match", [
    (m.PrecopyData(5, "none", 9, HEADER), MalformedFrame, "raw_len"),
    (m.PrecopyData(5, "zstd", 8, zstandard.compress(bytes(1 << 16))), MalformedFrame,
     "declares more"),
    (m.PrecopyData(5, "zstd", 8, b"not zstd"), MalformedFrame, "zstd payload"),
    (m.PrecopyData(5, "gzip", 8, HEADER), MalformedFrame, "unknown codec"),
    (m.PrecopyData(5, "none", 2 << 20, HEADER), ProtocolError, "exceeds the frame limit"),
    (m.PrecopyData(4, "none", 8, HEADER), ProtocolError, "session 4"),
])
async def test_lying_chunks_are_refused_before_the_shadow_sees_a_byte(sink, msg, error, match):
    s, shadow = sink
    with pytest.raises(error, match=match):
        await s.handle(msg, LINK)
    shadow.setblocking(False)
    with pytest.raises(BlockingIOError):
        shadow.recv(100)
