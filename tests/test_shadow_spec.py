"""The laptop decides what its shadow QEMU opens; the source's VM description is only checked.

Real daemons (in-process SourceNode / SinkNode, TLS with pinned IDs over 127.0.0.1) and, where a
shadow starts, a real QEMU. The source is a file domain whose ``vm_description`` is replaced by
a hostile or mismatching one, as a compromised or misconfigured paired desktop could send.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from replicator.config import load_config
from replicator.errors import LayoutMismatch, ProtocolError
from replicator.identity import Identity, authenticate_to_server
from replicator.link import Link
from replicator.sink import vmcheck
from replicator.source.driver import FileDriver
from replicator.wire import messages as m
from replicator.wire.codec import HEADER

from .conftest import Pair, file_configs, pair_ids, wait_until

MiB = 1024 * 1024
RAM = 64 * MiB


# --- pure: the description and the checks ------------------------------------------------------

def pack(desc: dict) -> bytes:
    return msgpack.packb(desc, use_bin_type=True)


def test_parse_description_keeps_values_drops_paths():
    desc = vmcheck.parse_description(pack({
        "machine": "pc-q35-10.0", "ram_bytes": RAM, "vcpus": 2, "cpu_model": "max",
        "uuid": "12345678-1234-5678-1234-567812345678", "kernel": "/etc/shadow",
        "initrd": "/x", "append": "init=/bin/sh", "something_new": 1,
        "disks": ["/srv/a.img", {"path": "/srv/b.qcow2", "format": "qcow2", "node": "n1"}]}))
    assert set(desc) == {"machine", "ram_bytes", "vcpus", "cpu_model", "uuid", "disks"}
    assert desc["disks"] == (vmcheck.DiskInfo("/srv/a.img", "", ""),
                             vmcheck.DiskInfo("/srv/b.qcow2", "qcow2", "n1"))


@pytest.mark.parametrize("desc, what", [
    ({"machine": "q35,accel=kvm"}, "machine"),
    ({"cpu_model": "max -device x"}, "cpu_model"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 256}, "vcpus"),
    ({"ram_bytes": "1G"}, "ram_bytes"),
    ({"uuid": "nope"}, "uuid"),
    ({"disks": "/a"}, "disks"),
    ({"disks": [{"format": "raw"}]}, "disks[0]"),
    ({"disks": [{"path": "/a", "format": 7}]}, "disks[0]"),
    ({"disks": ["/d"] * 65}, "msgpack"),
])
def test_parse_description_refuses_bad_values(desc, what):
    with pytest.raises(ProtocolError, match=what.replace("[", r"\[").replace("]", r"\]")):
        vmcheck.parse_description(pack(desc))


def test_peer_values_laptop_wins_or_refuses():
    q = load_config({"domain": {"driver": "qemu", "qemu": {"vcpus": 2}}}).domain.qemu
    got = vmcheck.peer_values(q, {"vcpus": 2, "machine": "pc-q35-10.0"}, RAM)
    assert got == {"ram_bytes": RAM, "vcpus": 2, "machine": "pc-q35-10.0", "cpu_model": None,
                   "uuid": None}
    assert vmcheck.peer_values(q, {}, RAM)["machine"] == "q35"
    with pytest.raises(LayoutMismatch, match=r"vCPUs: the source's VM has 4, this laptop's "
                                             r"config \(domain.qemu.vcpus\) says 2"):
        vmcheck.peer_values(q, {"vcpus": 4}, RAM)


def test_check_offer_bounds_region_sizes():
    def hello(*sizes: int, names=("ram0",)) -> m.Hello:
        return m.Hello(1, "desk", "vm", tuple(m.RegionInfo(n, z) for n, z in zip(names, sizes)))

    big = 128 * 1024**3                      # above the default max_ram_size (64 GiB)
    qemu_set = load_config({"node": {"role": "sink"}, "domain": {
        "name": "vm", "driver": "qemu", "qemu": {"ram_size": big}}})
    vmcheck.check_offer(qemu_set, hello(big))    # ram_size set: that is the bound
    with pytest.raises(LayoutMismatch, match=r"the source's VM has 64 MiB, .* says 128 GiB"):
        vmcheck.check_offer(qemu_set, hello(RAM))
    qemu_unset = load_config({"node": {"role": "sink"}, "domain": {"name": "vm",
                                                                   "driver": "qemu"}})
    vmcheck.check_offer(qemu_unset, hello(RAM))
    with pytest.raises(LayoutMismatch, match=r"offers 128 GiB .*domain.max_ram_size \(64 GiB\)"):
        vmcheck.check_offer(qemu_unset, hello(big))
    files = load_config({"node": {"role": "sink"}, "domain": {"name": "vm",
                                                              "max_ram_size": "1GiB"}})
    vmcheck.check_offer(files, hello(RAM, RAM, names=("a", "b")))
    with pytest.raises(LayoutMismatch, match=r"offers 1088 MiB"):
        vmcheck.check_offer(files, hello(1024 * MiB, RAM, names=("a", "b")))


# --- real daemons -------------------------------------------------------------------------------

def configs(d: Path, sink_qemu: dict, *, sink_domain: dict | None = None,
            region: str = "ram0", size: int = RAM):
    """A QEMU-domain sink (laptop) and a file-domain source (desktop) offering one region."""
    source_id, sink_id = pair_ids(d / "source", d / "sink")
    with open(d / "ram", "wb") as f:
        f.write(b"replicated page\n" * 256)
        f.truncate(size)
    sink = load_config({
        "node": {"name": "laptop", "role": "sink", "state_dir": str(d / "sink")},
        "domain": {"name": "vm", "driver": "qemu", "qemu": {"accel": "tcg", **sink_qemu},
                   **(sink_domain or {})},
        "peer": {"listen": "127.0.0.1:0", "id": source_id}})
    source = load_config({
        "node": {"name": "desktop", "role": "source", "state_dir": str(d / "source")},
        "domain": {"name": "vm", "regions": [{"name": region, "path": str(d / "ram")}]},
        "peer": {"address": "127.0.0.1:1", "id": sink_id}})
    return Pair(d, sink, source)


def describe_as(monkeypatch, desc: dict[str, Any]) -> None:
    async def vm_description(self) -> dict[str, Any]:
        return desc
    monkeypatch.setattr(FileDriver, "vm_description", vm_description)


async def stop(pair: Pair) -> None:
    shadow = pair.sink.switch_handler.shadow if pair.sink else None
    try:
        await pair.stop()
    finally:
        proc = getattr(shadow, "proc", None)
        if proc is not None and proc.returncode is None:
            await proc.kill()


async def refused(pair: Pair) -> str:
    """Start both; return the sink's reason once the source was refused (fail if it got in)."""
    await pair.start_sink()
    await pair.start_source()
    rep = pair.source.rep
    await wait_until(lambda: rep.last_error or rep.connected.is_set(), 30,
                     "the sink to answer the Hello")
    assert not rep.connected.is_set(), "the sink accepted the source"
    await wait_until(lambda: pair.sink.receiver.last_error, 10, "the sink to log the refusal")
    return rep.last_error


def secrets(d: Path) -> list[Path]:
    """Laptop files a hostile desktop would like the laptop's QEMU to open."""
    token = d / "sink" / "api-token"
    # Large enough that QEMU would load it as a (bogus) -kernel rather than refuse it early.
    token.write_bytes(os.urandom(256 * 1024))
    token.chmod(0o600)
    key = next((d / "sink" / "identity").glob("*.key"))
    return [token, key]


def proc_view(pid: int) -> tuple[list[str], set[str]]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    opened = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            opened.add(os.readlink(fd))
    return argv, opened


@pytest.mark.qemu
async def test_source_cannot_choose_kernel_or_initrd(shm_dir, monkeypatch):
    """The laptop leaves kernel, vCPUs, machine and CPU model unset: it takes the source's
    vCPUs/machine/CPU model (they name no file), never its kernel, initrd or command line."""
    pair = configs(shm_dir, {})
    token, key = secrets(shm_dir)
    describe_as(monkeypatch, {"ram_bytes": RAM, "vcpus": 2, "machine": "pc-q35-10.0",
                              "cpu_model": "max", "kernel": str(token), "append": "init=/x",
                              "disks": []})
    try:
        await pair.start_sink()
        await pair.start_source()
        await pair.wait_connected()
        shadow = pair.sink.switch_handler.shadow
        await wait_until(lambda: shadow.proc is not None, 30, "the shadow to be pre-started")
        argv, opened = proc_view(shadow.proc.pid)
        assert not [a for a in argv if str(token) in a or str(key) in a], argv
        assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv
        assert str(token) not in opened and str(key) not in opened
        assert argv[argv.index("-smp") + 1] == "2"
        assert argv[argv.index("-machine") + 1].startswith("pc-q35-10.0,")
        assert argv[argv.index("-cpu") + 1] == "max"
        assert await shadow.proc.status() == "inmigrate"
    finally:
        await stop(pair)


async def test_source_cannot_choose_laptop_disks(shm_dir, monkeypatch):
    """A description naming the laptop's node key as a disk: the laptop's QEMU opens only its
    own disk copies (from its config or state dir, matched by position), never a path the
    source names; disks the laptop holds no copies of keep the shadow from starting."""
    pair = configs(shm_dir, {"ram_size": RAM})
    token, key = secrets(shm_dir)
    describe_as(monkeypatch, {"ram_bytes": RAM, "disks": [str(key)]})
    try:
        await pair.start_sink()
        await pair.start_source()
        await pair.wait_connected()
        shadow = pair.sink.switch_handler.shadow
        with pytest.raises(LayoutMismatch, match="the source's QEMU has 1 disk"):
            await shadow.prepare(pair.sink.receiver.vm_description)
        await asyncio.sleep(2.5)                    # the sink pre-starts shadows every second
        assert shadow.proc is None
    finally:
        await stop(pair)


@pytest.mark.parametrize("sink_qemu, sink_domain, region, size, desc, expect", [
    ({"ram_size": RAM}, {}, "ram0", 2 * RAM, {},
     ["RAM size: the source's VM has 128 MiB", "(domain.qemu.ram_size) says 64 MiB"]),
    ({}, {"max_ram_size": "32MiB"}, "ram0", RAM, {},
     ["offers 64 MiB of guest RAM", "domain.max_ram_size (32 MiB)"]),
    ({"vcpus": 2}, {}, "ram0", RAM, {"vcpus": 4},
     ["vCPUs: the source's VM has 4", "(domain.qemu.vcpus) says 2"]),
    ({"machine": "pc-q35-9.2"}, {}, "ram0", RAM, {"machine": "pc-q35-10.0"},
     ["the source's VM has 'pc-q35-10.0'", "(domain.qemu.machine) says 'pc-q35-9.2'"]),
    ({"cpu_model": "max"}, {}, "ram0", RAM, {"cpu_model": "Skylake-Server"},
     ["the source's VM has 'Skylake-Server'", "(domain.qemu.cpu_model) says 'max'"]),
    ({"disks": [{"path": "/srv/copy/a.img", "format": "raw"},
                {"path": "/srv/copy/b.img", "format": "raw"}]}, {}, "ram0", RAM,
     {"disks": [{"path": "/srv/vm/work.img", "format": "qcow2"}]},
     ["the source's QEMU has 1 disk(s)", "domain.qemu.disks lists 2 copies"]),
    ({}, {}, "mem", RAM, {}, ["a QEMU domain has one region 'ram0'", "['mem']"]),
], ids=["ram", "max-ram", "vcpus", "machine", "cpu", "disk-count", "region"])
async def test_mismatch_refused_naming_both(shm_dir, monkeypatch, sink_qemu, sink_domain,
                                            region, size, desc, expect):
    pair = configs(shm_dir, sink_qemu, sink_domain=sink_domain, region=region, size=size)
    describe_as(monkeypatch, {"ram_bytes": size, **desc})
    try:
        reason = await refused(pair)
        for fragment in expect:
            assert fragment in reason, reason
        assert not (shm_dir / "sink" / "vm" / "layout.json").exists()
    finally:
        await stop(pair)


async def test_bad_region_name_does_not_wedge_the_store(shm_dir):
    """A Hello with a NUL byte in a region name is refused when decoded; the store is untouched
    and the real source then replicates (before, the name reached layout.json and every later
    session was refused)."""
    sink_cfg, source_cfg = file_configs(shm_dir, domain="vm1")
    (shm_dir / "ram").write_bytes(b"x" * (4 * MiB))
    pair = Pair(shm_dir, sink_cfg, source_cfg)
    ident = Identity.load_or_create(shm_dir / "source" / "identity", "desktop")
    try:
        await pair.start_sink()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pair.port, ssl=ident.client_context(), server_hostname="127.0.0.1")
        link = Link(reader, writer, 64 * MiB)
        await authenticate_to_server(link, ident, pair.sink.receiver.identity.node_id, 30)
        body = msgpack.packb([m.Hello.TYPE, m.PROTOCOL_VERSION, "desktop", "vm1",
                              [["ram0\x00", 4 * MiB, 4096]], b""], use_bin_type=True)
        await link.send_frame(HEADER.pack(len(body)) + body)
        answer = await asyncio.wait_for(link.recv(), 30)
        assert isinstance(answer, m.ErrorMessage), answer
        assert "region name 'ram0\\x00' is not allowed" in answer.message
        await link.close()
        assert not (shm_dir / "sink" / "vm1" / "layout.json").exists()
        await pair.start_source()
        await pair.wait_connected()
        await wait_until(lambda: pair.source.rep.ledger.acked_epoch >= 1, 30, "an acked epoch")
    finally:
        await stop(pair)


def test_check_offer_refuses_a_libvirt_qemu_mix():
    desc = pack({"ram_bytes": RAM, "libvirt_xml": "<domain type='kvm'/>"})
    hello = m.Hello(1, "desk", "vm", (m.RegionInfo("ram0", RAM),), vm=desc)
    qemu = load_config({"node": {"role": "sink"}, "domain": {"name": "vm", "driver": "qemu"}})
    with pytest.raises(LayoutMismatch, match="both hosts must use the same driver"):
        vmcheck.check_offer(qemu, hello)
    lv = load_config({"node": {"role": "sink"}, "domain": {"name": "vm", "driver": "libvirt"}})
    vmcheck.check_offer(lv, hello)
    plain = m.Hello(1, "desk", "vm", (m.RegionInfo("ram0", RAM),), vm=pack({"ram_bytes": RAM}))
    with pytest.raises(LayoutMismatch, match="not a libvirt domain"):
        vmcheck.check_offer(lv, plain)
