"""replicator.aio.wait_for: the one timeout helper the daemon uses (see its module docstring)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from replicator.aio import wait_for

ROOT = Path(__file__).resolve().parent.parent


async def _cancel_as_result_arrives(waiter) -> asyncio.Task:
    """A task awaiting ``waiter(fut)`` is cancelled in the very iteration ``fut`` completes:
    the race a libvirt passthrough command (an executor future) lost in CI."""
    fut = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(waiter(fut))
    for _ in range(3):
        await asyncio.sleep(0)              # the task (and wait_for's inner task) now wait
    fut.set_result("answer")
    task.cancel()
    return task


async def test_a_cancel_that_arrives_with_the_result_is_kept():
    task = await _cancel_as_result_arrives(lambda fut: wait_for(fut, 10))
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_asyncio_wait_for_loses_that_cancel_before_python_3_12():
    # Why the helper exists: on 3.11 the same race through asyncio.wait_for returns the
    # result (3.12 rebuilt wait_for on asyncio.timeout, as the helper is).
    task = await _cancel_as_result_arrives(lambda fut: asyncio.wait_for(fut, 10))
    if sys.version_info < (3, 12):
        assert await task == "answer"
    else:
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_times_out_and_cancels_what_it_waited_for():
    fut = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_for(fut, 0.05)
    assert fut.cancelled()
    assert await wait_for(asyncio.sleep(0, "done"), None) == "done"
    assert await wait_for(asyncio.sleep(0.01, "done"), 5) == "done"


def test_the_daemon_never_uses_asyncio_wait_for():
    uses = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "replicator").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\basyncio\.wait_for\(", line) and p.name != "aio.py"]
    assert not uses, f"use replicator.aio.wait_for instead: {uses}"
