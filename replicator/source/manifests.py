"""Receiving the sink's manifests: hash arrays in chunks, assembled and checked.

The sink answers a session's opening with what its copy holds, as chunks of little-endian
``uint64`` hashes (pages of a RAM region, 64 KiB blocks of a disk) and an end message. Both
the RAM and the disk exchange assemble them the same way: every chunk inside its target, every
target filled exactly, anything else a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from ..aio import wait_for
from ..errors import PeerError, PeerRejected, ProtocolError
from ..link import Link
from ..wire import messages as m

#: (message) -> (target key, first index, raw hashes), or None if it is not a chunk.
ChunkOf = Callable[[Any], "tuple[Hashable, int, bytes] | None"]


async def receive_manifests(link: Link, targets: dict[Hashable, np.ndarray], end: type,
                            chunk_of: ChunkOf, timeout: float, what: str) -> Any:
    """Fill ``targets`` from the chunks the sink sends until a message of type ``end``
    (returned). Every target must be filled exactly once over."""
    filled = {key: 0 for key in targets}
    while True:
        msg = await wait_for(link.recv(), timeout)
        if isinstance(msg, end):
            break
        if isinstance(msg, m.Reject):
            raise PeerRejected(msg.reason)
        if isinstance(msg, m.ErrorMessage):
            raise PeerError(f"sink reported: {msg.message}")
        chunk = chunk_of(msg)
        if chunk is None or chunk[0] not in targets:
            raise ProtocolError(f"unexpected {type(msg).__name__} during {what}")
        key, first, raw = chunk
        arr = np.frombuffer(raw, dtype="<u8")
        target = targets[key]
        if first < 0 or first + len(arr) > len(target):
            raise ProtocolError(f"{what}: a chunk beyond its end")
        target[first:first + len(arr)] = arr
        filled[key] += len(arr)
    if any(filled[key] != len(target) for key, target in targets.items()):
        raise ProtocolError(f"the sink's {what} is incomplete")
    return msg
