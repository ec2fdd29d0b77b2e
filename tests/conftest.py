"""Shared fixtures: RAM files in /dev/shm, a dirtying workload, an in-process source/sink pair."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from replicator.config import Config, load_config
from replicator.node import SinkNode, SourceNode

HERE = Path(__file__).parent
ROOT = HERE.parent
GUEST = ROOT / "build" / "guest"


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """The project's test guest (kernel, initramfs), built by deploy/build-guest.sh if missing."""
    kernel, initrd = GUEST / "vmlinux", GUEST / "initramfs.cpio.gz"
    if not kernel.exists():
        subprocess.run(["bash", str(ROOT / "deploy" / "build-guest.sh"), str(GUEST)], check=True)
    return kernel, initrd


@pytest.fixture
def shm_dir():
    """A scratch directory in /dev/shm (tmpfs, like real guest RAM files)."""
    d = Path("/dev/shm") / f"replicator-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    kill_strays(d)
    shutil.rmtree(d, ignore_errors=True)


def kill_strays(d: Path) -> None:
    """SIGKILL every process whose command line names ``d``: a VM outlives its daemon by design
    (a daemon stop or crash leaves it running for the next start to adopt)."""
    import os
    import signal
    mark = str(d).encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if mark in (p / "cmdline").read_bytes():
                os.kill(int(p.name), signal.SIGKILL)
        except OSError:
            pass


class Workload:
    """tests/workload.py in a subprocess: a RAM file dirtied at a set rate."""

    def __init__(self, path: Path, size: int, rate: float, fill: float = 0.75):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "workload.py"), str(path), str(size), str(rate),
             str(fill)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", f"workload did not start: {line!r}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def workload():
    started: list[Workload] = []

    def start(path: Path, size: int, rate: float, fill: float = 0.75) -> Workload:
        w = Workload(path, size, rate, fill)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def pair_ids(source_state: Path, sink_state: Path) -> tuple[str, str]:
    """Create both nodes' identities (as on first run) and return (source ID, sink ID)."""
    from replicator.identity import Identity
    src = Identity.load_or_create(source_state / "identity", "desktop")
    snk = Identity.load_or_create(sink_state / "identity", "laptop")
    return src.node_id, snk.node_id


def file_configs(d: Path, *, domain: str = "vm1", pid: int | None = None,
                 stream: dict | None = None, sink_listen: str = "127.0.0.1:0",
                 source_extra: dict | None = None) -> tuple[Config, Config]:
    """Configs for a file domain at d/ram replicated into d/sink (sink port chosen later)."""
    dom: dict[str, Any] = {"name": domain, "regions": [{"name": "ram0", "path": str(d / "ram")}]}
    if pid is not None:
        (d / "wl.pid").write_text(str(pid))
        dom["pid_file"] = str(d / "wl.pid")
    source_id, sink_id = pair_ids(d / "source", d / "sink")
    sink = load_config({"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "sink")},
                        "domain": {"name": domain},
                        "peer": {"listen": sink_listen, "id": source_id},
                        "stream": stream or {}})
    src = {"node": {"name": "desktop", "role": "source", "state_dir": str(d / "source")},
           "domain": dom, "peer": {"address": "127.0.0.1:1", "id": sink_id},
           "stream": stream or {}}
    src.update(source_extra or {})
    return sink, load_config(src)


@dataclass
class Pair:
    """A source and a sink node in this process, talking over 127.0.0.1."""
    d: Path
    sink_cfg: Config
    source_cfg: Config
    sink: SinkNode | None = None
    source: SourceNode | None = None
    port: int = 0
    extra: dict = field(default_factory=dict)

    async def start_sink(self) -> SinkNode:
        cfg = self.sink_cfg
        if self.port:
            from dataclasses import replace
            cfg = replace(cfg, peer=replace(cfg.peer, listen=f"127.0.0.1:{self.port}"))
        self.sink = SinkNode(cfg)
        await self.sink.start()
        self.port = self.sink.address[1]
        return self.sink

    async def start_source(self) -> SourceNode:
        from dataclasses import replace
        cfg = replace(self.source_cfg,
                      peer=replace(self.source_cfg.peer, address=f"127.0.0.1:{self.port}"))
        self.source = SourceNode(cfg)
        await self.source.start()
        return self.source

    async def wait_connected(self, timeout: float = 20) -> None:
        assert self.source is not None
        await asyncio.wait_for(self.source.rep.connected.wait(), timeout)

    async def stop(self) -> None:
        if self.source is not None:
            await self.source.stop()
            self.source = None
        if self.sink is not None:
            await self.sink.stop()
            self.sink = None


@pytest.fixture
async def pair_factory():
    pairs: list[Pair] = []

    async def make(d: Path, **kw: Any) -> Pair:
        sink_cfg, source_cfg = file_configs(d, **kw)
        p = Pair(d, sink_cfg, source_cfg)
        pairs.append(p)
        await p.start_sink()
        await p.start_source()
        await p.wait_connected()
        return p

    yield make
    for p in pairs:
        await p.stop()


async def wait_until(cond, timeout: float = 60, what: str = "condition",
                     interval: float = 0.05) -> None:
    """Poll ``cond`` (a function, possibly async) until true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ok = cond()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def files_equal(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 22), fb.read(1 << 22)
            if x != y:
                return False
            if not x:
                return True
