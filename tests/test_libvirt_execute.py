"""LibvirtQemu.execute: commands through libvirt's QMP passthrough keep their order even when
a caller stops waiting for one (a unit test with a stand-in for libvirt's module)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import types

import pytest

from replicator.errors import QemuError
from replicator.vmm.libvirt import LibvirtQemu


class _Passthrough:
    """libvirt_qemu's qemuMonitorCommand: records the order commands reach "QEMU"; the first
    ``block-export-add`` is held until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.done: list[str] = []
        self.lock = threading.Lock()

    def qemuMonitorCommand(self, _dom, text: str, _flags: int) -> str:
        cmd = json.loads(text)["execute"]
        if cmd == "block-export-add":
            self.release.wait(10)
        with self.lock:
            self.done.append(cmd)
        return json.dumps({"return": {}})


@pytest.fixture
def qemu(tmp_path):
    pool = concurrent.futures.ThreadPoolExecutor(4)
    passthrough = _Passthrough()
    host = types.SimpleNamespace(
        _pool=pool, libvirt_qemu=passthrough,
        libvirt=types.SimpleNamespace(libvirtError=type("libvirtError", (Exception,), {})))
    q = LibvirtQemu(host, object(), "ordered", tmp_path)
    yield q, passthrough
    passthrough.release.set()
    pool.shutdown(wait=True)


async def test_a_cancelled_command_is_not_overtaken_by_the_next(qemu):
    q, passthrough = qemu
    adding = asyncio.create_task(q.execute("block-export-add"))
    await asyncio.sleep(0.1)               # in libvirt's thread now, held
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    query = asyncio.create_task(q.execute("query-block-exports"))
    await asyncio.sleep(0.2)
    assert not query.done(), "the next command went out while the cancelled one was in flight"
    passthrough.release.set()
    await asyncio.wait_for(query, 5)
    assert passthrough.done == ["block-export-add", "query-block-exports"]


async def test_a_timed_out_command_is_not_overtaken_either(qemu):
    q, passthrough = qemu
    with pytest.raises(QemuError, match="no answer to block-export-add within 0.1s"):
        await q.execute("block-export-add", timeout=0.1)
    query = asyncio.create_task(q.execute("query-block-exports"))
    await asyncio.sleep(0.2)
    assert not query.done()
    passthrough.release.set()
    await asyncio.wait_for(query, 5)
    assert passthrough.done == ["block-export-add", "query-block-exports"]


async def test_commands_run_concurrently_when_none_was_abandoned(qemu):
    q, passthrough = qemu
    adding = asyncio.create_task(q.execute("block-export-add"))
    await asyncio.sleep(0.1)
    # A second caller's command is independent of the first: it does not wait for it.
    await asyncio.wait_for(q.execute("query-status"), 5)
    assert passthrough.done == ["query-status"]
    passthrough.release.set()
    await asyncio.wait_for(adding, 5)
