"""asyncio helpers the whole daemon relies on.

:func:`wait_for` replaces :func:`asyncio.wait_for` everywhere in replicator. On Python 3.11
``asyncio.wait_for`` loses a cancellation that arrives in the same loop iteration as the
awaited result (CPython gh-86296, fixed in 3.12): the caller gets the result and runs on as
if never cancelled. A polling loop then never ends, and whoever cancelled it and awaits it
waits forever. Seen in CI: a libvirt passthrough command (an executor future) completed just
as a switch cancelled the precopy relay, and the node never turned into the shadow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, raising :class:`TimeoutError` after ``timeout`` seconds (``None``: no
    limit). A cancellation of the caller is never swallowed, even when ``aw`` completes at
    the same moment."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(timeout):
        return await aw


async def finish(fut: asyncio.Future) -> None:
    """Wait until ``fut`` has ended, without cancelling it, and mark its outcome as seen. For a
    worker thread that writes into buffers or files the caller is about to reuse or close,
    awaited while the caller unwinds from another error (which is the one that counts)."""
    await asyncio.wait([fut])
    if not fut.cancelled():
        fut.exception()


__all__ = ["finish", "wait_for"]
