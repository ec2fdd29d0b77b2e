"""Link cut during a switch, at each phase, between two test hosts (network namespaces).

Real daemons (``replicator run``) in two namespaces, a real QEMU guest on the desktop, the link
cut with ``ip link set down`` at a checkpoint (``REPLICATOR_FAULT_DIR``). Whatever happens, the
VM must end up running on exactly one host: the source resumes if the sink never committed; if
the sink committed, the source stays paused (and learns the outcome once the link is back).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.cli import _request
from replicator.demo import _toml
from replicator.guestlog import counters

from .conftest import ROOT, pair_ids
from .netns import DESK_ADDR, LAP_ADDR, TwoHosts
from .conftest import wait_until
from .test_switch_qemu import qemu_table

pytestmark = pytest.mark.qemu


@pytest.fixture
def hosts():
    h = TwoHosts.create()
    yield h
    h.destroy()


class DaemonProc:
    def __init__(self, hosts: TwoHosts, host: str, config: Path, faults: Path, log: Path):
        env = {**os.environ, "REPLICATOR_FAULT_DIR": str(faults), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            hosts.exec_prefix(host) + [sys.executable, "-m", "replicator.cli", "run", "-c",
                                       str(config)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def status(sock: Path) -> dict:
    code, st = await _request("GET", f"unix:{sock}", "/api/v1/status", timeout=10)
    assert code == 200, st
    return st


@pytest.mark.parametrize("way", ["there", "back"])
@pytest.mark.parametrize("tracker", ["scan", "qemu-precopy"])
@pytest.mark.parametrize("phase,expect_on", [
    ("source-paused", "desk"),         # before the final delta: the source resumes
    ("sink-disks-released", "desk"),   # disk copies verified and released: the source resumes
    ("source-device-sent", "desk"),    # device state sent, commit lost: the source resumes
    ("sink-committed", "lap"),         # the sink committed: the source stays paused
])
async def test_link_cut_during_switch(shm_dir, hosts, guest, phase, expect_on, tracker, way):
    """``way`` "back": the nodes are peers, the guest went to the laptop first and the link is
    cut during the switch back home (the laptop is the source then)."""
    d = shm_dir
    back = way == "back"
    faults = d / "faults"
    faults.mkdir()
    desk_id, lap_id = pair_ids(d / "desk", d / "lap")
    q = {k: str(v) for k, v in qemu_table(guest).items() if isinstance(v, Path)}
    q.update({k: v for k, v in qemu_table(guest).items() if not isinstance(v, Path)})
    timeouts = {"timeout": 3.0}
    # The VM has a qcow2 disk: it travels (and its copy is released at the switch) too.
    disk = d / "desk-disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    (d / "lap.toml").write_text(_toml({
        "node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
        "domain": {"name": "vm", "driver": "qemu", "tracker": tracker, "qemu": q},
        "peer": {"listen": f"{LAP_ADDR}:7400", "id": desk_id, **timeouts,
                 **({"address": f"{DESK_ADDR}:7400"} if back else {})},
        "switch": {"step_timeout": 15.0},
        "stream": {"reconnect_delay": 0.5},
        "control": {"listen": f"unix:{d / 'lap.sock'}"}}))
    (d / "desk.toml").write_text(_toml({
        "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
        "domain": {"name": "vm", "driver": "qemu", "tracker": tracker, "qemu": {
            **q, "launch": True, "ram_path": str(d / "desk-ram"),
            "serial_log": str(d / "desk.log"),
            "disks": [str(disk)]}},            # format read from the image (qcow2)
        "peer": {"address": f"{LAP_ADDR}:7400", "id": lap_id, **timeouts,
                 **({"listen": f"{DESK_ADDR}:7400"} if back else {})},
        "switch": {"step_timeout": 15.0},
        "stream": {"reconnect_delay": 0.5},
        "control": {"listen": f"unix:{d / 'desk.sock'}"}}))
    sink = DaemonProc(hosts, "lap", d / "lap.toml", faults, d / "lap.log")
    source = None
    try:
        await wait_until(lambda: (d / "lap.sock").exists(), 30, "the sink daemon")
        source = DaemonProc(hosts, "desk", d / "desk.toml", faults, d / "desk.log.err")
        await wait_until(lambda: (d / "desk.sock").exists(), 60, "the source daemon")
        await wait_until(lambda: len(counters(d / "desk.log")) >= 2, 90, "the guest's counter")

        async def synced() -> bool:
            st = await status(d / "desk.sock")
            pre = st.get("precopy") or {}
            return st["peer"]["connected"] and (
                st["acked_epoch"] >= 2 or (pre.get("dirty_sync_count") or 0) >= 2)
        for _ in range(300):
            if await synced():
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("replication did not start")

        # Who switches (the host that runs the guest) and who receives it.
        src, dst = ("lap", "desk") if back else ("desk", "lap")
        logs = {"desk": d / "desk.log", "lap": d / "lap" / "vm" / "shadow-serial.log"}
        if back:
            token = (d / "desk" / "api-token").read_text().strip()
            code, result = await _request("POST", f"unix:{d / 'desk.sock'}", "/api/v1/switch",
                                          token, {"mode": "live"})
            assert code == 200, result

            async def back_in_sync() -> bool:
                st = await status(d / "lap.sock")
                return bool(st.get("in_sync")) and st["peer"]["connected"]
            await wait_until(back_in_sync, 120, "the laptop to stream the guest back")
            expect_on = {"desk": "lap", "lap": "desk"}[expect_on]
        (faults / f"block-{phase}").touch()
        token = (d / src / "api-token").read_text().strip()
        switch = asyncio.create_task(_request("POST", f"unix:{d / f'{src}.sock'}",
                                              "/api/v1/switch", token, {"mode": "live"}))
        await wait_until(lambda: (faults / f"at-{phase}").exists(), 60, f"checkpoint {phase}")
        hosts.link_down()
        (faults / f"block-{phase}").unlink()
        code, result = await asyncio.wait_for(switch, 60)
        assert code != 200, f"switch cannot succeed over a cut link: {result}"
        await asyncio.sleep(1.0)
        hosts.link_up()

        async def settled() -> tuple[str, str]:
            src_st = await status(d / f"{src}.sock")
            dst_st = await status(d / f"{dst}.sock")
            return src_st.get("domain_state") or "none", dst_st.get("domain_state") or "none"
        fence = d / src / "vm" / "handed-over.json"
        end = asyncio.get_running_loop().time() + 60
        while True:
            src_state, dst_state = await settled()
            done = (src_state == "running" and dst_state != "running") if expect_on == src \
                else (src_state != "running" and dst_state == "running"
                      and fence.exists() and "handed-over" in fence.read_text())
            if done:
                break
            assert not (src_state == "running" and dst_state == "running"), "VM runs twice!"
            if asyncio.get_running_loop().time() > end:
                tails = "\n".join(f"--- {n}\n" + "\n".join(
                    ln for ln in (d / n).read_text().splitlines()[-25:])
                    for n in ("desk.log.err", "lap.log"))
                raise AssertionError(f"not settled: {src} {src_state}, {dst} {dst_state}\n"
                                     + tails)
            await asyncio.sleep(0.5)
        # The side that runs keeps counting.
        log = logs[expect_on]
        n = len(counters(log))
        await wait_until(lambda: len(counters(log)) >= n + 2, 15, f"the counter on {expect_on}")
        if expect_on == dst:
            before = counters(logs[src])[-1]
            assert before + 1 in counters(logs[dst]), (before, counters(logs[dst])[-8:])
        else:
            assert not fence.exists() or '"handed-over"' not in fence.read_text()
            # Replication of the disk goes on: a new round reaches the (re-opened) copy.
            sock = d / f"{src}.sock"
            gen = (await status(sock))["disks"][0]["acked_generation"]

            async def disk_rounds() -> bool:
                st = (await status(sock))["disks"][0]
                return st["copy"] == "streaming" and st["acked_generation"] > gen
            await wait_until(disk_rounds, 60, "disk rounds after the rollback")
    finally:
        if source is not None:
            source.stop()
        sink.stop()
        # Every QEMU either daemon launched (a VM outlives its daemon by design).
        for rec in d.glob("*/vm/*.launch.json"):
            try:
                os.kill(int(json.loads(rec.read_text())["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
