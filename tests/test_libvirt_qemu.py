"""libvirt domains end to end: a real libvirtd (qemu:///system, TCG) runs the project's test
guest with a qcow2 disk; two real daemons (``driver = "libvirt"``) replicate it into a shadow
domain that the laptop's daemon defines from the desktop's XML, switch it, and bring it home.
What libvirt says (``virsh domstate``) is checked at each step, as a user of virt-manager sees it.

Both "hosts" are this machine's one libvirtd, so the laptop's domain has its own name
(``domain.libvirt.name``) and UUID; everything else is as on two machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pytest

from replicator.cli import _request
from replicator.guestlog import counters, diskchecks

from .conftest import pair_ids, wait_until
from .libvirt_env import BASE, TestDomain, cleanup_stale, ensure_libvirtd, virsh
from .test_crash_qemu import memchecks
from .test_faults import Daemon, daemons, free_port  # noqa: F401  (fixture)

pytestmark = pytest.mark.qemu
MiB = 1024 * 1024
APPEND = "console=ttyS0 quiet fill=25 dirty=2 memcheck=3 diskcheck=1 diskdirty=0.5"


def domstate(name: str) -> str:
    return virsh("domstate", name, "--reason", check=False).stdout.strip().splitlines()[0] \
        if virsh("domstate", name, check=False).returncode == 0 else "undefined"


class LibvirtPair:
    """A desktop libvirt domain and two daemons; the laptop's domain is made by replicator."""

    def __init__(self, d: Path, guest, daemons, tracker: str, *, shared_memory: bool = True,
                 append: str = APPEND):
        ensure_libvirtd()
        cleanup_stale("rtest-lv")
        self.d = d
        self.faults = d / "faults"
        self.faults.mkdir(exist_ok=True)
        self.desk = TestDomain("rtest-lv-desk", guest, append=append,
                               shared_memory=shared_memory)
        # The laptop's files: its own kernel/initrd copies and the disk copy replicator makes.
        self.lap_dir = BASE / "rtest-lv-lap"
        subprocess.run(["rm", "-rf", str(self.lap_dir)], check=True)
        self.lap_dir.mkdir(parents=True)
        for f in ("vmlinux", "initramfs.cpio.gz"):
            (self.lap_dir / f).write_bytes((self.desk.dir / f).read_bytes())
        self.disk, self.copy = self.desk.disk, self.lap_dir / "disk0.qcow2"
        self.names = {"desktop": "rtest-lv-desk", "laptop": "rtest-lv-lap"}
        self.desk_log, self.lap_log = self.desk.serial_log, self.lap_dir / "serial.log"
        source_id, sink_id = pair_ids(d / "desk", d / "lap")
        port, back = free_port(), free_port()
        stream = {"reconnect_delay": 0.2}
        self.src: Daemon = daemons("desk", d, {
            "node": {"name": "desktop", "role": "source", "state_dir": str(d / "desk")},
            "domain": {"name": "vm", "driver": "libvirt", "tracker": tracker,
                       "libvirt": {"name": "rtest-lv-desk"},
                       "qemu": {"serial_log": str(self.desk_log),
                                "kernel": str(self.desk.dir / "vmlinux"),
                                "initrd": str(self.desk.dir / "initramfs.cpio.gz"),
                                "disks": [{"path": str(self.desk.disk), "format": "qcow2"}]}},
            "peer": {"address": f"127.0.0.1:{port}", "listen": f"127.0.0.1:{back}",
                     "id": sink_id},
            "stream": stream, "control": {"listen": "127.0.0.1:0"}})
        self.snk: Daemon = daemons("lap", d, {
            "node": {"name": "laptop", "role": "sink", "state_dir": str(d / "lap")},
            "domain": {"name": "vm", "driver": "libvirt", "tracker": tracker,
                       "libvirt": {"name": "rtest-lv-lap"},
                       "qemu": {"serial_log": str(self.lap_log),
                                "kernel": str(self.lap_dir / "vmlinux"),
                                "initrd": str(self.lap_dir / "initramfs.cpio.gz"),
                                "disks": [{"path": str(self.copy), "format": "qcow2"}]}},
            "peer": {"listen": f"127.0.0.1:{port}", "address": f"127.0.0.1:{back}",
                     "id": source_id},
            "stream": stream, "control": {"listen": "127.0.0.1:0"}})
        for dm in (self.src, self.snk):
            dm.env = {"REPLICATOR_FAULT_DIR": str(self.faults)}

    # -- what tests/test_crash_qemu.py's phase walks use --------------------------------------

    def post_switch(self, mode: str) -> asyncio.Task:
        token = (self.src.state_dir / "api-token").read_text().strip()
        return asyncio.get_running_loop().create_task(_request(
            "POST", self.src.url, "/api/v1/switch", token, {"mode": mode}, timeout=120))

    async def runners(self) -> list[str]:
        """Which hosts run the guest: libvirt's word (what virt-manager shows), which must
        agree with the daemons' own."""
        for attempt in range(3):
            daemons = {host for host, dm in (("desktop", self.src), ("laptop", self.snk))
                       if dm.alive and (await dm.status()).get("domain_state") == "running"}
            out = [host for host, name in self.names.items()
                   if domstate(name).startswith("running")]
            if daemons <= set(out):
                return out
            await asyncio.sleep(0.3)          # read a moment apart: a resume in between
        raise AssertionError(f"daemons say {sorted(daemons)} run the guest, libvirt {out}")

    async def wait_replicating(self, timeout: float) -> None:
        await self.wait_in_sync(self.src, timeout)

    def log(self, host: str) -> Path:
        return self.desk_log if host == "desktop" else self.lap_log

    def swap(self) -> None:
        """After a switch both ways: the laptop is the source now (names follow roles)."""
        self.src, self.snk = self.snk, self.src
        self.desk_log, self.lap_log = self.lap_log, self.desk_log
        self.disk, self.copy = self.copy, self.disk
        self.names = {"desktop": self.names["laptop"], "laptop": self.names["desktop"]}

    async def start(self) -> None:
        self.desk.define()
        self.desk.start()
        self.snk.start()
        await self.snk.wait_api()
        self.src.start()
        await self.src.wait_api(90)
        await wait_until(lambda: len(counters(self.desk_log)) >= 2, 120, "the guest's counter")

    async def wait_in_sync(self, dm: Daemon, timeout: float = 180) -> dict:
        seen: dict = {}

        async def ok() -> bool:
            seen.update(await dm.status())
            return bool(seen.get("in_sync"))
        await wait_until(ok, timeout, f"{dm.name} to report in_sync", interval=0.2)
        return seen

    async def switch(self, dm: Daemon, mode: str) -> dict:
        token = (dm.state_dir / "api-token").read_text().strip()
        code, body = await _request("POST", dm.url, "/api/v1/switch", token, {"mode": mode},
                                    timeout=180)
        assert code == 200, body
        return body

    async def check_guest(self, log: Path | str) -> None:
        if isinstance(log, str):
            log = self.log(log)
        n, (ok0, _) = len(counters(log)), memchecks(log)
        await wait_until(lambda: len(counters(log)) >= n + 2, 60, f"the counter in {log.name}")
        await wait_until(lambda: memchecks(log)[0] > ok0, 90, f"a memory check in {log.name}")
        for p in (self.desk_log, self.lap_log):
            if p.exists():
                assert memchecks(p)[1] == 0, f"{p}: the guest's memory check FAILED"
                assert all(ok for ok, _ in diskchecks(p)), f"{p}: the guest's disk check FAILED"

    def dump_logs(self) -> None:
        for dm in (self.src, self.snk):
            before = dm.log.stat().st_size if dm.log.exists() else 0
            dm.log_stacks()
            data = dm.log.read_bytes()
            print(f"\n===== {dm.name} daemon log (tail) =====")
            print("\n".join(data[:before].decode(errors="replace").splitlines()[-80:]))
            if len(data) > before:
                print(f"===== {dm.name} daemon stacks =====\n"
                      + data[before:].decode(errors="replace"))

    def stop(self) -> None:
        for dm in (self.src, self.snk):
            dm.terminate()
        with contextlib.suppress(AssertionError):
            cleanup_stale("rtest-lv")


@pytest.fixture
def lv_pair(tmp_path, guest, daemons):
    made: list[LibvirtPair] = []

    def make(tracker: str, **kw) -> LibvirtPair:
        pair = LibvirtPair(tmp_path, guest, daemons, tracker, **kw)
        made.append(pair)
        return pair
    yield make
    for pair in made:
        pair.stop()


@pytest.mark.parametrize("tracker", ["qemu-precopy", "scan"])
async def test_libvirt_domain_switches_and_comes_home(lv_pair, tracker):
    pair = lv_pair(tracker)
    try:
        await pair.start()
        st = await pair.wait_in_sync(pair.src)
        # The laptop defined its own domain from the desktop's XML; the shadow waits paused.
        assert "rtest-lv-lap" in virsh("list", "--all", "--name").stdout
        assert domstate("rtest-lv-desk") == "running (booted)"
        assert domstate("rtest-lv-lap").startswith("paused")
        lap_xml = virsh("dumpxml", "--inactive", "rtest-lv-lap").stdout
        assert str(pair.copy) in lap_xml and str(pair.desk.disk) not in lap_xml
        assert "qemu:commandline" not in lap_xml          # -incoming only in the live run
        there = await pair.switch(pair.src, "live")
        print("\nswitch report:", there)
        assert there["result"] == "ok", there
        assert domstate("rtest-lv-lap") == "running (unpaused)"
        await pair.check_guest(pair.lap_log)
        await wait_until(lambda: domstate("rtest-lv-desk").startswith("paused"), 60,
                         "the desktop's domain to become the shadow")
        # The way home: only the delta, pressed on the laptop.
        st = await pair.wait_in_sync(pair.snk)
        sent = st["sent_bytes"]["wire"]
        back = await pair.switch(pair.snk, "stop")
        assert back["result"] == "ok", back
        assert domstate("rtest-lv-desk") == "running (unpaused)"
        await pair.check_guest(pair.desk_log)
        await wait_until(lambda: domstate("rtest-lv-lap").startswith("paused"), 60,
                         "the laptop's domain to become the shadow again")
        print(f"\nlibvirt {tracker}: there {there['downtime_ms']} ms downtime; back "
              f"{back['downtime_ms']} ms after sending {sent / MiB:.1f} MiB back")
        assert sent < 128 * MiB, sent                     # 256 MiB guest: never a full copy
    except BaseException:
        pair.dump_logs()
        raise


async def test_domain_without_shared_memory_is_refused_with_the_xml_to_add(lv_pair):
    pair = lv_pair("scan", shared_memory=False)
    pair.desk.define()
    pair.desk.start()
    pair.src.start()
    await asyncio.sleep(0)
    await wait_until(lambda: "<access mode='shared'/>" in pair.src.log.read_text(), 60,
                     "the refusal with the XML to add")
    text = pair.src.log.read_text()
    assert "guest RAM is not backed by a file" in text, text[-2000:]
    assert domstate("rtest-lv-desk") == "running (booted)"      # untouched
    assert "<memoryBacking>" not in virsh("dumpxml", "rtest-lv-desk").stdout


async def test_domain_destroyed_and_started_again_in_virsh_during_replication(lv_pair):
    """The user ends the desktop's VM in virt-manager while it replicates, then starts it
    again: no switch happens, the laptop keeps its shadow, and replication comes back on the
    new QEMU (libvirt gives it a new RAM file)."""
    pair = lv_pair("qemu-precopy")
    try:
        await pair.start()
        await pair.wait_in_sync(pair.src)
        virsh("destroy", "rtest-lv-desk")
        await wait_until(lambda: domstate("rtest-lv-desk").startswith("shut off"), 30,
                         "the desktop's domain to be shut off")

        async def noticed() -> bool:
            st = await pair.src.status()
            return st.get("domain_state") != "running" and not st.get("in_sync")
        await wait_until(noticed, 30, "the desktop daemon to notice the domain is gone")
        await asyncio.sleep(3)
        # Never a false switch: the laptop does not run it (its shadow waits, or ended with
        # the relayed migration the desktop's QEMU took with it, and comes back).
        assert not domstate("rtest-lv-lap").startswith("running")
        assert not (await pair.snk.status()).get("runs_domain")
        pair.desk.start()
        st = await pair.wait_in_sync(pair.src, 240)
        assert st.get("domain_state") == "running", st
        assert domstate("rtest-lv-lap").startswith("paused")
    except BaseException:
        pair.dump_logs()
        raise


def test_doctor_names_the_xml_to_add(tmp_path, guest):
    """`replicator doctor` on a libvirt domain without shared memory: the exact XML, nothing
    changed; with it: ok."""
    import sys
    from .test_faults import to_toml
    ensure_libvirtd()
    cleanup_stale("rtest-lv-doc")
    for shared in (False, True):
        dom = TestDomain("rtest-lv-doc", guest, shared_memory=shared, disk_mib=0)
        try:
            dom.define()
            cfg = tmp_path / "doctor.toml"
            cfg.write_text(to_toml({
                "node": {"name": "desktop", "role": "source", "state_dir": str(tmp_path)},
                "domain": {"name": "vm", "driver": "libvirt",
                           "libvirt": {"name": "rtest-lv-doc"}},
                "peer": {"address": "127.0.0.1:7400", "insecure_plaintext": True}}))
            res = subprocess.run([sys.executable, "-m", "replicator.cli", "doctor", "-c",
                                  str(cfg)], capture_output=True, text=True, timeout=60)
            print(res.stdout)
            if shared:
                assert res.returncode == 0, res.stdout + res.stderr
                assert "256 MiB RAM in a shared file" in res.stdout
            else:
                assert res.returncode == 1, res.stdout + res.stderr
                assert "<source type='file'/>" in res.stdout
                assert "<access mode='shared'/>" in res.stdout
                assert "<memoryBacking>" not in dom.dumpxml(inactive=True)
        finally:
            dom.cleanup()


async def test_what_libvirt_tolerates_while_replication_holds_a_migration_open(lv_pair):
    """libvirt's own operations while qemu-precopy holds QEMU's migration open, and libvirt's
    view of a rolled-back switch. libvirt's save, snapshot and memory dump go through QEMU's
    migration or dump machinery, which is busy: each must be refused cleanly, the VM must keep
    running on the desktop only, and replication must be in sync again afterwards."""
    pair = lv_pair("qemu-precopy")
    outcomes: list[tuple[str, int, str]] = []
    try:
        await pair.start()
        await pair.wait_in_sync(pair.src)
        assert domstate("rtest-lv-desk") == "running (booted)"
        assert domstate("rtest-lv-lap") == "paused (user)"
        save = pair.d / "desk.sav"
        for args in (("save", "rtest-lv-desk", str(save)),
                     ("snapshot-create-as", "rtest-lv-desk", "rtest-snap"),
                     ("dump", "--memory-only", "rtest-lv-desk", str(pair.d / "desk.core")),
                     ("suspend", "rtest-lv-desk"), ("resume", "rtest-lv-desk")):
            res = virsh(*args, check=False, timeout=120)
            if args[0] == "resume":
                # While the VM was paused QEMU went on to finish the held-open migration;
                # replicator cancels it within one poll, then the user's Resume works.
                for _ in range(20):
                    if res.returncode == 0:
                        break
                    await asyncio.sleep(0.5)
                    res = virsh(*args, check=False, timeout=120)
            msg = (res.stderr or res.stdout).strip().splitlines()
            outcomes.append((" ".join(args[:1]), res.returncode, msg[-1] if msg else ""))
            # libvirt's dump pauses the VM first; if QEMU meanwhile went on to finish the
            # held-open migration, libvirt's resume fails ("paused (api error)") and replicator
            # resumes it once it has ended that migration: within a few seconds either way.
            seen = domstate("rtest-lv-desk")
            want = "paused" if args[0] == "suspend" else "running"
            await wait_until(lambda: domstate("rtest-lv-desk").startswith(want), 15,
                             f"the desktop to be {want} after virsh {args[0]} (was {seen})")
            if not seen.startswith(want):
                outcomes.append((f"  (then)", 0, f"{seen} right after, {want} within 15 s"))
            assert not domstate("rtest-lv-lap").startswith("running")
        st = await pair.wait_in_sync(pair.src, 240)
        assert st.get("domain_state") == "running"
        # A switch that rolls back: the laptop's daemon dies while the desktop is paused.
        faults = pair.d / "faults"
        (faults / "block-source-final-delta").touch()
        token = (pair.src.state_dir / "api-token").read_text().strip()
        task = asyncio.create_task(_request("POST", pair.src.url, "/api/v1/switch", token,
                                            {"mode": "live"}, timeout=180))
        await wait_until(lambda: (faults / "at-source-final-delta").exists(), 120,
                         "the switch to hold with the desktop paused")
        held = domstate("rtest-lv-desk")
        pair.snk.kill9()
        (faults / "block-source-final-delta").unlink()
        code, report = await task
        assert code != 200 and report.get("rolled_back"), report
        await wait_until(lambda: domstate("rtest-lv-desk").startswith("running"), 30,
                         "libvirt to say running after the rollback")
        outcomes.append(("(switch rolled back)", 0, f"desktop held paused: {held}; after: "
                         f"{domstate('rtest-lv-desk')}; laptop {domstate('rtest-lv-lap')}"))
        assert not domstate("rtest-lv-lap").startswith("running")
        await pair.check_guest(pair.desk_log)
        pair.snk.start()
        st = await pair.wait_in_sync(pair.src, 240)
        outcomes.append(("(laptop restarted)", 0, f"in sync again; laptop "
                         f"{domstate('rtest-lv-lap')}"))
    except BaseException:
        pair.dump_logs()
        raise
    finally:
        print("\nwhat libvirt did while replication held the migration open:")
        for what, rc, msg in outcomes:
            print(f"  virsh {what:<20} exit {rc}: {msg}")
