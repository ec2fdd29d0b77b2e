"""Fault injection on a real pair: daemons killed with SIGKILL, a full disk, wrong peers.

Daemons that get killed run as real subprocesses (``python -m replicator.cli run -c x.toml``);
their peer runs in this process so the test can read its ledger and metrics directly. Nothing
here asserts on timing: waits are generous polls that fail only when a condition never holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from replicator.cli import _request
from replicator.config import PAGE_SIZE, load_config
from replicator.identity import Identity, authenticate_to_server
from replicator.link import Link
from replicator.pagefile import digest_hashes, hash_file
from replicator.sink.store import UNKNOWN, ShadowStore
from replicator.wire import messages as m

from .conftest import ROOT, Pair, file_configs, files_equal, pair_ids, wait_until

MiB = 1024 * 1024
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# helpers


def to_toml(d: dict, prefix: str = "") -> str:
    """TOML for the configs here: tables, arrays of tables, scalars and lists of scalars."""
    import json
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + to_toml(v, name + ".")
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_state(pid: int) -> str:
    """The one-letter state from /proc/<pid>/stat ('R', 'S', 'T' = stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def change_pages(path: Path, pages: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for p, data in pages.items():
            assert len(data) == PAGE_SIZE
            os.pwrite(fd, data, p * PAGE_SIZE)
    finally:
        os.close(fd)


def read_page(path: Path, p: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(p * PAGE_SIZE)
        return f.read(PAGE_SIZE)


def file_hashes(path: Path, size: int) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_file(fd, size)
    finally:
        os.close(fd)


def counter(metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


class Daemon:
    """``replicator run`` in a subprocess, found through the api-url file in its state dir."""

    def __init__(self, name: str, d: Path, table: dict):
        self.name = name
        self.state_dir = Path(table["node"]["state_dir"])
        self.config = d / f"{name}.toml"
        self.config.write_text(to_toml(table))
        load_config(self.config)                    # fail here, not in the child, on a bad config
        self.log = d / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0
        self.env: dict[str, str] = {}           # extra environment (e.g. fault injection)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "api-url").unlink()
        self.starts += 1
        with open(self.log, "ab") as logf:
            logf.write(f"\n===== start #{self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replicator.cli", "run", "-c", str(self.config)],
                cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})

    async def wait_api(self, timeout: float = 60) -> None:
        url_file = self.state_dir / "api-url"

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} daemon exited ({self.proc.returncode}):\n"
                                     + self.log.read_text()[-3000:])
            return url_file.exists() and url_file.read_text().endswith("\n")
        await wait_until(up, timeout, f"the {self.name} daemon's API")
        self.url = url_file.read_text().strip()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def status(self) -> dict:
        code, st = await _request("GET", self.url, "/api/v1/status", timeout=10)
        assert code == 200, st
        return st

    async def metric(self, name: str) -> float:
        import aiohttp
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(self.url + "/metrics") as r:
                text = await r.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def log_stacks(self) -> None:
        """Ask a live daemon to log its tasks' and threads' stacks (SIGUSR1), for a failure's
        log dump."""
        if self.alive:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def make(name: str, d: Path, table: dict) -> Daemon:
        dm = Daemon(name, d, table)
        started.append(dm)
        return dm

    yield make
    for dm in started:
        dm.cleanup()


def sink_table(d: Path, port: int, source_id: str, domain: str = "vm1") -> dict:
    return {"node": {"name": "laptop", "role": "sink", "state_dir": str(d / "sink")},
            "domain": {"name": domain},
            "peer": {"listen": f"127.0.0.1:{port}", "id": source_id},
            "control": {"listen": "127.0.0.1:0"}}


def source_table(d: Path, port: int, sink_id: str, *, pid_file: Path | None = None,
                 domain: str = "vm1") -> dict:
    dom: dict[str, Any] = {"name": domain,
                           "regions": [{"name": "ram0", "path": str(d / "ram")}]}
    if pid_file is not None:
        dom["pid_file"] = str(pid_file)
    return {"node": {"name": "desktop", "role": "source", "state_dir": str(d / "source")},
            "domain": dom,
            "peer": {"address": f"127.0.0.1:{port}", "id": sink_id},
            "control": {"listen": "127.0.0.1:0"}}


class RunWatch:
    """Samples the workload ("the VM") and the source driver: it must never be stopped."""

    def __init__(self, pid: int, driver: Any = None):
        self.pid = pid
        self.driver = driver
        self.samples = 0
        self.violations: list[str] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            try:
                st = proc_state(self.pid)
            except OSError:
                st = "gone"
            running = True
            if self.driver is not None:
                running = await self.driver.is_running()
            if st in ("T", "t", "Z", "X", "gone") or not running:
                self.violations.append(f"state {st}, driver.is_running={running}")
            self.samples += 1
            await asyncio.sleep(0.05)

    def __enter__(self) -> "RunWatch":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()

    def check(self) -> None:
        assert self.samples > 0
        assert not self.violations, (f"the VM was stopped/paused {len(self.violations)} times "
                                     f"out of {self.samples} samples: {self.violations[:3]}")


# ------------------------------------------------------------------------------------------------
# 1. kill -9 of the sink daemon


async def _sink_daemon_pair(d: Path, daemons, **kw) -> tuple[Daemon, Pair]:
    port = free_port()
    sink_cfg, source_cfg = file_configs(d, **kw)
    source_id, _ = pair_ids(d / "source", d / "sink")
    sinkd = daemons("sink", d, sink_table(d, port, source_id))
    sinkd.start()
    await sinkd.wait_api()
    pair = Pair(d, sink_cfg, source_cfg, port=port)
    await pair.start_source()
    await pair.wait_connected(60)
    return sinkd, pair


async def test_sink_kill9_in_steady_state_resends_exactly_the_changed_pages(
        shm_dir, workload, daemons):
    ram = 64 * MiB
    wl = workload(shm_dir / "ram", ram, rate=2e6, fill=0.75)
    sinkd, pair = await _sink_daemon_pair(shm_dir, daemons)
    try:
        rep = pair.source.rep
        await wait_until(lambda: rep.ledger.raw_sent >= 48 * MiB, 120, "the first full copy")
        wl.pause()                                   # steady state: nothing changes any more
        assert await rep.verify(60)
        acked = rep.ledger.acked_epoch
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
        st = await sinkd.status()
        assert st["peer"]["connected"] and st["acked_epoch"] >= acked
        base = rep.ledger.raw_sent

        sinkd.kill9()
        await wait_until(lambda: not rep.connected.is_set(), 60, "the source to notice")
        # While the sink is down, exactly N pages change: new random content in the filled
        # part, previously zero pages beyond it, and data pages that become all zero.
        rng = np.random.default_rng(42)
        filled = rng.choice(12288, size=40, replace=False).tolist()
        beyond = rng.choice(np.arange(12288, 16384), size=9, replace=False).tolist()
        zeroed = [p for p in rng.choice(12288, size=8, replace=False).tolist()
                  if p not in filled][:4]
        changes = {p: rng.bytes(PAGE_SIZE) for p in filled + beyond}
        changes.update({p: bytes(PAGE_SIZE) for p in zeroed})
        for p in zeroed:
            assert read_page(shm_dir / "ram", p) != bytes(PAGE_SIZE)
        for p in beyond:
            assert read_page(shm_dir / "ram", p) == bytes(PAGE_SIZE)
        n = len(changes)
        change_pages(shm_dir / "ram", changes)

        sinkd.start()                               # same port, same state dir
        await sinkd.wait_api()
        await pair.wait_connected(60)
        assert await rep.verify(60)
        resent = rep.ledger.raw_sent - base
        assert resent == n * PAGE_SIZE, (f"resent {resent} bytes ({resent / PAGE_SIZE:.1f} "
                                         f"pages) after the sink's kill -9; only the {n} "
                                         f"changed pages should go again")
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
        st = await sinkd.status()
        assert st["peer"]["connected"] and st["peer"]["node"] == "desktop"
    finally:
        await pair.stop()
        sinkd.terminate()


async def test_sink_kill9_while_the_vm_dirties_memory(shm_dir, workload, daemons):
    ram = 64 * MiB
    wl = workload(shm_dir / "ram", ram, rate=2e6, fill=0.75)
    sinkd, pair = await _sink_daemon_pair(shm_dir, daemons)
    try:
        rep = pair.source.rep
        await wait_until(lambda: rep.ledger.raw_sent >= 48 * MiB
                         and rep.ledger.snapshot().lag_bytes < 8 * MiB, 120,
                         "the first full copy")
        # Kill right as a batch goes out: pages are in flight, epochs unacknowledged.
        before = rep.ledger.raw_sent
        await wait_until(lambda: rep.ledger.raw_sent > before, 30, "pages in flight",
                         interval=0.005)
        base = rep.ledger.raw_sent
        sinkd.kill9()
        await wait_until(lambda: not rep.connected.is_set(), 60, "the source to notice")
        sinkd.start()
        await sinkd.wait_api()
        await pair.wait_connected(60)
        wl.pause()
        for _ in range(10):                           # the pause lands between two rounds
            if await rep.verify(60):
                break
        else:
            raise AssertionError("the shadow never verified after the workload paused")
        resent = rep.ledger.raw_sent - base
        print(f"\nresent after kill -9 under load: {resent / MiB:.1f} MiB of "
              f"{ram / MiB:.0f} MiB RAM")
        assert resent < ram // 4, f"resent {resent / MiB:.1f} MiB: close to a full copy"
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    finally:
        await pair.stop()
        sinkd.terminate()


# ------------------------------------------------------------------------------------------------
# 2. kill -9 of the source daemon: the VM keeps running


async def test_source_kill9_vm_keeps_running_and_replication_resumes(shm_dir, workload,
                                                                    daemons):
    ram = 64 * MiB
    wl = workload(shm_dir / "ram", ram, rate=1.5e6, fill=0.75)
    sink_cfg, source_cfg = file_configs(shm_dir, pid=wl.proc.pid)
    _, sink_id = pair_ids(shm_dir / "source", shm_dir / "sink")
    pair = Pair(shm_dir, sink_cfg, source_cfg)
    sink = await pair.start_sink()
    rec = sink.receiver
    srcd = daemons("source", shm_dir, source_table(shm_dir, pair.port, sink_id,
                                                   pid_file=shm_dir / "wl.pid"))
    try:
        srcd.start()
        await srcd.wait_api()
        await wait_until(rec.connected.is_set, 60, "the source daemon to connect")
        await wait_until(lambda: counter(sink.metrics, "replicator_pages_written_total")
                         >= 12288 and rec.store is not None and rec.store.epoch >= 3, 120,
                         "the first full copy")
        st = await srcd.status()
        assert st["peer"]["connected"]

        srcd.kill9()
        # The VM does not depend on the daemon: it keeps running and keeps dirtying memory.
        await wait_until(lambda: not rec.connected.is_set(), 60, "the sink to notice")
        h0 = file_hashes(shm_dir / "ram", ram)
        with RunWatch(wl.proc.pid):
            await asyncio.sleep(1.0)
        assert wl.proc.poll() is None, "the VM died with the source daemon"
        assert proc_state(wl.proc.pid) not in ("T", "t"), "the VM is stopped"
        assert (file_hashes(shm_dir / "ram", ram) != h0).any(), "the VM stopped dirtying"

        written = counter(sink.metrics, "replicator_pages_written_total")
        with RunWatch(wl.proc.pid) as watch:
            srcd.start()
            await srcd.wait_api()
            await wait_until(rec.connected.is_set, 60, "the restarted source to reconnect")

            async def source_says_connected() -> bool:
                st = await srcd.status()
                return st["peer"]["connected"] and st["peer"]["node"] == "laptop"
            await wait_until(source_says_connected, 60, "the source's status to show the sink")
            epoch = rec.store.epoch
            await wait_until(lambda: rec.store.epoch >= epoch + 2, 45,
                             f"epochs acked after the restart (sink: {rec.last_error!r})")
        watch.check()
        wl.pause()

        async def converged() -> bool:
            s = await srcd.status()
            return (s["in_sync"] and s["lag"]["pages"] == 0
                    and files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img"))
        await wait_until(converged, 60, "in_sync and an equal shadow image")
        assert rec.store.digests() == (digest_hashes(file_hashes(shm_dir / "ram", ram)),)
        st = await srcd.status()
        resent = st["sent_bytes"]["raw"]
        rewritten = (counter(sink.metrics, "replicator_pages_written_total") - written)
        print(f"\nafter the source's kill -9: resent {resent / MiB:.1f} MiB, sink rewrote "
              f"{rewritten * PAGE_SIZE / MiB:.1f} MiB of {ram / MiB:.0f} MiB RAM")
        assert 0 < resent < ram // 4, f"the restarted source sent {resent} bytes"
        assert 0 < rewritten * PAGE_SIZE < ram // 4
    finally:
        srcd.terminate()
        await pair.stop()


async def test_source_reconnects_to_a_running_sink(shm_dir, workload, pair_factory):
    """The smallest form of the above: the sink stays up, a source session ends, a new one
    starts (a source restart, or any link blip). Replication must resume."""
    wl = workload(shm_dir / "ram", 8 * MiB, rate=0, fill=0.5)
    pair = await pair_factory(shm_dir)
    assert await pair.source.rep.verify(30)
    await pair.source.stop()
    pair.source = None
    await wait_until(lambda: not pair.sink.receiver._busy.locked(), 30, "the session to end")
    change_pages(shm_dir / "ram", {3: os.urandom(PAGE_SIZE)})
    src = await pair.start_source()
    await pair.wait_connected(30)
    assert await src.rep.verify(30), pair.sink.receiver.last_error
    assert src.rep.ledger.raw_sent == PAGE_SIZE
    assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")


# ------------------------------------------------------------------------------------------------
# 3. the sink's disk fills up


@pytest.fixture
def small_tmpfs():
    mounted: list[Path] = []

    def mount(d: Path, size: str) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(d)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def assert_store_consistent(root: Path, size: int) -> ShadowStore:
    """Reopen the store; every page whose manifest hash is known must match the image."""
    store = ShadowStore.open(root, [m.RegionInfo("ram0", size)])
    man = store.manifest("ram0").copy()
    img = file_hashes(root / "ram0.img", size)
    known = man != UNKNOWN
    lying = np.flatnonzero(known & (man != img))
    if lying.size:
        store.close(clean=False)
        raise AssertionError(f"after reopening, the manifest claims hashes the image does not "
                             f"hold for {lying.size} pages (e.g. {lying[:8].tolist()}); a "
                             f"switch would run those pages stale")
    return store


@pytest.mark.parametrize("stop", ["clean", "crash"])
async def test_sink_disk_full_errors_retries_never_pauses_and_recovers(
        shm_dir, workload, daemons, small_tmpfs, stop):
    ram = 64 * MiB
    small_tmpfs(shm_dir / "sink", "24m")      # before the identity goes in: it lives there too
    wl = workload(shm_dir / "ram", ram, rate=0, fill=1.0)         # 64 MiB of random data
    sinkd, pair = await _sink_daemon_pair(shm_dir, daemons, pid=wl.proc.pid)
    rep = pair.source.rep
    try:
        with RunWatch(wl.proc.pid, pair.source.driver) as watch:
            errors: set[str] = set()

            def saw_full() -> bool:
                if rep.last_error:
                    errors.add(rep.last_error)
                return any("full" in e for e in errors)
            await wait_until(saw_full, 60, "the source to report the sink's full disk")
            sink_errors: set[str] = set()

            async def sink_says_full() -> bool:
                sink_errors.add((await sinkd.status())["peer"]["error"])
                return any("full" in e and "free space" in e for e in sink_errors)
            await wait_until(sink_says_full, 60, "the sink to report its full disk")
            assert any("full" in e for e in errors), errors
            # The source keeps trying, the sink daemon stays up.
            r0 = counter(pair.source.metrics, "replicator_reconnects_total")
            await wait_until(lambda: counter(pair.source.metrics, "replicator_reconnects_total")
                             >= r0 + 2, 120, "the source to retry")
            assert sinkd.alive
            assert await sinkd.metric("replicator_store_errors_total") >= 1
            acked_full = rep.ledger.acked_epoch

            # Space comes back: replication completes by itself.
            res = subprocess.run(["mount", "-o", "remount,size=200m", str(shm_dir / "sink")],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr

            async def verified() -> bool:
                if not rep.connected.is_set():
                    return False
                try:
                    return await rep.verify(60)
                except Exception as exc:                    # noqa: BLE001 - link may drop
                    log.info("verify: %s", exc)
                    return False
            await wait_until(verified, 180, "the shadow to verify after space came back",
                             interval=0.5)
        watch.check()
        assert rep.ledger.acked_epoch > acked_full
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
        acked = rep.ledger.acked_epoch

        if stop == "clean":
            sinkd.terminate()
        else:
            sinkd.kill9()
        await pair.stop()
        store = assert_store_consistent(shm_dir / "sink" / "vm1", ram)
        try:
            assert store.epoch >= acked, (f"the sink acknowledged epoch {acked} but reopened "
                                          f"at epoch {store.epoch}")
            assert store.digests() == (digest_hashes(file_hashes(shm_dir / "ram", ram)),), \
                "acknowledged pages were lost from the manifest"
        finally:
            store.close()
    finally:
        await pair.stop()
        sinkd.terminate()


# ------------------------------------------------------------------------------------------------
# 4. wrong peer, wrong pin, wrong protocol version, wrong layout


def _source_cfg_with(cfg, **node_or_peer):
    node = {k: v for k, v in node_or_peer.items() if k in ("identity_dir", "state_dir")}
    peer = {k: v for k, v in node_or_peer.items() if k in ("id",)}
    return replace(cfg, node=replace(cfg.node, **node), peer=replace(cfg.peer, **peer))


async def test_impostor_source_is_refused_and_named(shm_dir, workload, caplog):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=0, fill=0.5)
    sink_cfg, source_cfg = file_configs(shm_dir)
    source_id, _ = pair_ids(shm_dir / "source", shm_dir / "sink")
    impostor = Identity.load_or_create(shm_dir / "impostor" / "identity", "desktop")
    assert impostor.node_id != source_id
    pair = Pair(shm_dir, sink_cfg, _source_cfg_with(
        source_cfg, identity_dir=shm_dir / "impostor" / "identity",
        state_dir=shm_dir / "impostor"))
    try:
        with caplog.at_level(logging.WARNING, logger="replicator.sink.receiver"):
            sink = await pair.start_sink()
            src = await pair.start_source()
            await wait_until(lambda: impostor.node_id in sink.receiver.last_error, 30,
                             "the sink to name the impostor")
        err = sink.receiver.last_error
        assert "not the paired peer" in err and source_id in err, err
        assert any(impostor.node_id in r.getMessage() for r in caplog.records)
        await asyncio.sleep(1.0)
        assert not src.rep.connected.is_set() and not sink.receiver.connected.is_set()
        assert counter(sink.metrics, "replicator_frames_rejected_total") >= 1
        # Nothing of the shadow was created for it.
        assert sink.receiver.store is None
        assert not (shm_dir / "sink" / "vm1" / "layout.json").exists()
        assert src.rep.ledger.raw_sent == 0
        await pair.stop()

        # The real source, on the same sink state, is accepted.
        pair.source_cfg = source_cfg
        await pair.start_sink()
        await pair.start_source()
        await pair.wait_connected(30)
        assert await pair.source.rep.verify(30)
    finally:
        await pair.stop()


async def test_source_refuses_a_sink_with_the_wrong_id(shm_dir, workload):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=0, fill=0.5)
    sink_cfg, source_cfg = file_configs(shm_dir)
    _, sink_id = pair_ids(shm_dir / "source", shm_dir / "sink")
    other = Identity.load_or_create(shm_dir / "other" / "identity", "laptop").node_id
    pair = Pair(shm_dir, sink_cfg, _source_cfg_with(source_cfg, id=other))
    try:
        sink = await pair.start_sink()
        src = await pair.start_source()
        await wait_until(lambda: sink_id in src.rep.last_error, 30,
                         "the source to name the sink's presented ID")
        err = src.rep.last_error
        assert "presented ID" in err and other in err, err
        await asyncio.sleep(1.0)
        assert not src.rep.connected.is_set() and not sink.receiver.connected.is_set()
        assert src.rep.ledger.raw_sent == 0 and src.rep.sessions == 0
        assert sink.receiver.store is None        # it never got as far as a Hello
    finally:
        await pair.stop()


async def _raw_session(port: int, identity: Identity, sink_id: str) -> Link:
    """A TLS connection that authenticates exactly like the real source does."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=identity.client_context(), server_hostname="127.0.0.1",
        limit=1 << 20), 30)
    link = Link(reader, writer, 64 * MiB)
    await authenticate_to_server(link, identity, sink_id, 30)
    return link


async def _until_closed(link: Link, timeout: float = 30) -> list:
    """Read until the peer closes; returns what it sent. Fails if it never closes."""
    got = []

    async def drain() -> None:
        with contextlib.suppress(Exception):
            while True:
                got.append(await link.recv())
    await asyncio.wait_for(drain(), timeout)
    await link.close()
    return got


async def test_version_and_layout_mismatches_get_a_reject_naming_them(shm_dir, workload):
    ram = 8 * MiB
    wl = workload(shm_dir / "ram", ram, rate=0, fill=0.5)
    sink_cfg, source_cfg = file_configs(shm_dir)
    _, sink_id = pair_ids(shm_dir / "source", shm_dir / "sink")
    ident = Identity.load_or_create(shm_dir / "source" / "identity")
    pair = Pair(shm_dir, sink_cfg, source_cfg)
    try:
        # A shadow exists (synced by the real source), then a fresh sink process keeps it.
        await pair.start_sink()
        await pair.start_source()
        await pair.wait_connected(30)
        assert await pair.source.rep.verify(30)
        await pair.stop()
        sink = await pair.start_sink()
        img = (shm_dir / "sink" / "vm1" / "ram0.img").read_bytes()
        cases = [
            (m.Hello(99, "desktop", "vm1", (m.RegionInfo("ram0", ram),)),
             ["protocol version 99", f"speaks {m.PROTOCOL_VERSION}"], "protocol 99"),
            (m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1", (m.RegionInfo("ram0", 2 * ram),)),
             ["layout mismatch", f"ram0={ram}", f"ram0={2 * ram}"], "layout mismatch"),
            (m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1",
                     (m.RegionInfo("ram0", ram), m.RegionInfo("vram", 8192))),
             ["layout mismatch", "vram=8192"], "vram=8192"),
            (m.Hello(m.PROTOCOL_VERSION, "desktop", "other-vm", (m.RegionInfo("ram0", ram),)),
             ["other-vm", "vm1"], "other-vm"),
            (m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1", (m.RegionInfo("ram0", ram, 2048),)),
             ["page size"], "page size"),
        ]
        for hello, words, sink_says in cases:
            await wait_until(lambda: not sink.receiver._busy.locked(), 30, "the last session")
            link = await _raw_session(pair.port, ident, sink_id)
            await link.send(hello)
            got = await _until_closed(link)
            assert got and isinstance(got[0], m.Reject), (hello, got)
            for w in words:
                assert w in got[0].reason, (w, got[0].reason)
            assert len(got) == 1, f"the sink went on after its Reject: {got}"
            assert not sink.receiver.connected.is_set()
            await wait_until(lambda: sink_says in sink.receiver.last_error, 30,
                             f"the sink to record {sink_says!r}")
        # Nothing was touched; the real source carries on with nothing to send.
        assert (shm_dir / "sink" / "vm1" / "ram0.img").read_bytes() == img
        await pair.start_source()
        await pair.wait_connected(30)
        assert await pair.source.rep.verify(30)
        assert pair.source.rep.ledger.raw_sent == 0
    finally:
        await pair.stop()
