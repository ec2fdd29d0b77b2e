"""Tests of replicator.vmm.qemu: pure helpers, and the QMP layer against a real QEMU (TCG).

The ``qemu`` tests need ``qemu-system-x86_64`` and FAIL (never skip) without it. They run at most
two QEMUs at a time and kill every QEMU they start.

To prove that the switch preserves a running guest without needing a Linux kernel, the switch
tests boot ``TICK_GUEST``: a 160-byte multiboot image (QEMU's ``-kernel`` loads multiboot images
itself) that counts in guest RAM and prints ``TICK <counter as 8 hex digits>`` on the first
serial port after each increment. Its code and counter live in guest RAM, so after a switch the
shadow's serial log continues the source's count exactly when the shadow's RAM is the source's.
Source (GNU as, ``as --32``; ``ld -m elf_i386 -Ttext=0x100000 --oformat binary``)::

        .code32
    header: .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)   # multiboot, a.out kludge
            .long header, header, 0, 0, entry    # header/load addr, load/bss end (whole file), entry
    entry:  cli
            mov  $0x80000, %esp
    next:   incl counter
            mov  $msg, %esi
    1:      lodsb
            test %al, %al
            jz   2f
            call putc
            jmp  1b
    2:      mov  counter, %edx
            mov  $8, %ecx
    3:      rol  $4, %edx              # print the counter as 8 hex digits
            mov  %edx, %eax
            and  $0xf, %eax
            mov  hexdig(%eax), %al
            call putc
            loop 3b
            mov  $0x0a, %al
            call putc
            mov  delay, %ecx           # busy-wait
    4:      dec  %ecx
            jnz  4b
            jmp  next
    putc:   push %edx                  # wait for THR empty (LSR bit 5), then write COM1
            push %eax
            mov  $0x3fd, %dx
    5:      in   %dx, %al
            test $0x20, %al
            jz   5b
            pop  %eax
            mov  $0x3f8, %dx
            out  %al, %dx
            pop  %edx
            ret
    msg:    .asciz "TICK "
    hexdig: .ascii "0123456789abcdef"
            .balign 4
    delay:  .long 5000000              # offset 0x98
    counter: .long 0                   # offset 0x9c
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from qemu.qmp import message as qmp_message

from replicator.errors import DomainError, QemuError
from replicator.vmm import (
    DEVICE_STATE_CAPABILITIES,
    InvalidVmSpec,
    MigrationStreamError,
    QemuProcess,
    QmpCommandError,
    VmSpec,
    build_argv,
    parse_stream_header,
    stream_capabilities,
)
from replicator.vmm.disks import DiskSpec, check_image, probe_format, query_disks

MiB = 1024 * 1024
RAM = 128 * MiB

TICK_GUEST = bytes.fromhex(
    "02b0ad1b00000100fe4f51e400001000"
    "00001000000000000000000020001000"
    "fabc00000800ff059c001000be820010"
    "00ac84c07407e834000000ebf48b159c"
    "001000b908000000c1c20489d083e00f"
    "8a8088001000e814000000e2ebb00ae8"
    "0b0000008b0d980010004975fdebb752"
    "5066bafd03eca82074fb5866baf803ee"
    "5ac35449434b20003031323334353637"
    "3839616263646566404b4c0000000000"
)
TICK_DELAY_OFFSET = 0x98
TICK_RE = re.compile(rb"TICK ([0-9a-f]{8})\n")


# --- helpers ---------------------------------------------------------------------------------

def header_bytes(machine: str = "pc-q35-10.0", caps: tuple[str, ...] | None = None,
                 uuid_bytes: bytes | None = None, page_bits: int | None = None) -> bytes:
    """A migration stream header + CONFIGURATION section, as QEMU 10 writes it."""
    out = struct.pack(">II", 0x5145564D, 3) + b"\x07"
    out += struct.pack(">I", len(machine)) + machine.encode()

    def sub(name: str, body: bytes) -> bytes:
        return b"\x05" + bytes([len(name)]) + name.encode() + struct.pack(">I", 1) + body

    if page_bits is not None:
        out += sub("configuration/target-page-bits", struct.pack(">I", page_bits))
    if caps is not None:
        body = struct.pack(">I", len(caps)) + b"".join(bytes([len(c)]) + c.encode() for c in caps)
        out += sub("configuration/capabilities", body)
    if uuid_bytes is not None:
        out += sub("configuration/uuid", uuid_bytes)
    # what follows in a real stream: QEMU_VM_SECTION_START for "ram"
    return out + b"\x01\x00\x00\x00\x01\x03ram"


def tick_values(log: bytes) -> list[int]:
    return [int(m.group(1), 16) for m in TICK_RE.finditer(log)]


async def wait_for_ticks(path: Path, at_least: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        values = tick_values(path.read_bytes()) if path.exists() else []
        if len(values) >= at_least:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(values)} TICK lines in {path} after {timeout}s")
        await asyncio.sleep(0.05)


# --- pure: VmSpec / build_argv -----------------------------------------------------------------

def test_vmspec_defaults_and_cpu_model(tmp_path):
    spec = VmSpec(name="vm1", ram_bytes=RAM, ram_path=str(tmp_path / "ram"))
    assert spec.ram_path == tmp_path / "ram" and isinstance(spec.ram_path, Path)
    assert spec.accel == "tcg" and spec.effective_cpu_model == "max"
    assert VmSpec("vm1", RAM, tmp_path / "r", accel="kvm").effective_cpu_model == "host"
    assert VmSpec("vm1", RAM, tmp_path / "r", accel="kvm", cpu_model="Skylake-Server").effective_cpu_model == "Skylake-Server"
    disks = VmSpec("vm1", RAM, tmp_path / "r", disks=[(str(tmp_path / "d"), "qcow2")]).disks
    assert disks == (DiskSpec(tmp_path / "d", "qcow2"),) and isinstance(disks[0].path, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, field", [
    (dict(name="bad name"), "name"),
    (dict(name=""), "name"),
    (dict(name="-x"), "name"),
    (dict(ram_bytes=RAM + 1), "ram_bytes"),
    (dict(ram_bytes=8 * MiB), "ram_bytes"),
    (dict(ram_bytes=True), "ram_bytes"),
    (dict(vcpus=0), "vcpus"),
    (dict(accel="xen"), "accel"),
    (dict(cpu_model="max,+foo"), "cpu_model"),
    (dict(cpu_model="max -device x"), "cpu_model"),
    (dict(kernel="/k", append="a\nb"), "append"),
    (dict(initrd="/i"), "kernel"),
    (dict(disks="/one/path"), "disks"),
    (dict(disks=["/no/format"]), r"disks\[0\]"),        # a format is never assumed
    (dict(disks=[("/d", "vmdk")]), r"disks\[0\]"),
    (dict(disks=[("/d\0x", "raw")]), r"disks\[0\]"),
    (dict(machine="q35,accel=kvm"), "machine"),
    (dict(uuid="not-a-uuid"), "uuid"),
    (dict(ram_path=None), "ram_path"),
])
def test_vmspec_rejects_invalid(kwargs, field):
    base = dict(name="vm", ram_bytes=RAM, ram_path="/dev/shm/ram")
    base.update(kwargs)
    with pytest.raises(InvalidVmSpec, match=rf"VmSpec\.{field}") as info:
        VmSpec(**base)
    assert isinstance(info.value, QemuError) and isinstance(info.value, DomainError)
    assert isinstance(info.value, ValueError)


def test_build_argv_source_and_shadow(tmp_path):
    spec = VmSpec(
        name="src", ram_bytes=RAM, ram_path=tmp_path / "ram,1", vcpus=2,
        kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", append="console=ttyS0 quiet",
        disks=(DiskSpec(tmp_path / "a,b.img", "raw"), DiskSpec(tmp_path / "c.qcow2", "qcow2")),
        serial_log=tmp_path / "serial.log",
        uuid="12345678-1234-5678-1234-567812345678",
    )
    argv = build_argv(spec, tmp_path / "q.sock", incoming=None, paused=False)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-smp") + 1] == "2"
    # commas in option values are doubled
    assert f"memory-backend-file,id=ram0,size={RAM},mem-path={tmp_path}/ram,,1,share=on" in argv
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=ram0"
    # The serial log is appended to (a VM coming back after a round trip writes on)
    chardevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-chardev"]
    assert f"file,id=serial0,path={tmp_path}/serial.log,append=on" in chardevs
    assert argv[argv.index("-serial") + 1] == "chardev:serial0"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"
    assert argv[argv.index("-uuid") + 1] == "12345678-1234-5678-1234-567812345678"
    # Each disk: a JSON -blockdev (path verbatim, explicit format, qcow2 without a backing file
    # from its header) and a virtio-blk device on it, in order.
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs == [
        {"driver": "raw", "node-name": "disk0",
         "file": {"driver": "file", "filename": f"{tmp_path}/a,b.img", "node-name": "disk0-file"}},
        {"driver": "qcow2", "node-name": "disk1", "backing": None,
         "file": {"driver": "file", "filename": f"{tmp_path}/c.qcow2",
                  "node-name": "disk1-file"}}]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices == ["virtio-blk-pci,drive=disk0,id=disk0-dev",
                       "virtio-blk-pci,drive=disk1,id=disk1-dev"]
    assert "-drive" not in argv
    assert any(a.startswith("socket,id=qmp0,path=") and "server=on,wait=off" in a for a in argv)
    assert "-S" not in argv and "-incoming" not in argv

    assert "-S" in build_argv(spec, tmp_path / "q.sock", paused=True)
    shadow = build_argv(spec, tmp_path / "q.sock", incoming="defer")
    assert shadow[shadow.index("-incoming") + 1] == "defer" and "-S" in shadow

    kvm = build_argv(VmSpec("k", RAM, tmp_path / "r", accel="kvm"), tmp_path / "q.sock")
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"
    assert "-serial" not in kvm and "-kernel" not in kvm and "-blockdev" not in kvm


def test_build_argv_rejects_bad_incoming_and_long_socket(tmp_path):
    spec = VmSpec("vm", RAM, tmp_path / "r")
    with pytest.raises(InvalidVmSpec):
        build_argv(spec, tmp_path / "q.sock", incoming="tcp:0:4444")
    with pytest.raises(InvalidVmSpec, match="socket"):
        build_argv(spec, "/tmp/" + "x" * 120)


# --- disk images: format probe and header checks (images made by qemu-img) ---------------------

def qemu_img(*args: str) -> None:
    exe = shutil.which("qemu-img")
    assert exe, "qemu-img is not installed (deploy/install-deps.sh installs qemu-utils)"
    subprocess.run([exe, *args], check=True, capture_output=True)


def test_probe_format_and_image_checks(tmp_path):
    raw, q2 = tmp_path / "a.img", tmp_path / "b.qcow2"
    raw.write_bytes(b"\0" * MiB)
    qemu_img("create", "-f", "qcow2", str(q2), "16M")
    assert probe_format(raw) == "raw" and probe_format(q2) == "qcow2"
    check_image(DiskSpec(raw, "raw"))
    check_image(DiskSpec(q2, "qcow2"))
    with pytest.raises(QemuError, match="is a qcow2 image but is to be attached as raw"):
        check_image(DiskSpec(q2, "raw"))
    with pytest.raises(QemuError, match="not a qcow2 image"):
        check_image(DiskSpec(raw, "qcow2"))
    with pytest.raises(QemuError, match="cannot read disk"):
        probe_format(tmp_path / "missing.img")


def test_image_naming_other_files_is_refused(tmp_path):
    """A qcow2 header can name a backing file or an external data file: host paths chosen by
    whoever wrote the image (on shared storage, the peer)."""
    secret = tmp_path / "node.key"
    secret.write_bytes(b"k" * 4096)
    backed, data_file = tmp_path / "backed.qcow2", tmp_path / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(backed), "16M")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}",
             str(data_file), "16M")
    with pytest.raises(QemuError, match="backing file"):
        check_image(DiskSpec(backed, "qcow2"))
    with pytest.raises(QemuError, match="external data file"):
        check_image(DiskSpec(data_file, "qcow2"))


# --- pure: stream header -----------------------------------------------------------------------

def test_stream_capabilities_parses_configuration_section():
    assert stream_capabilities(header_bytes(caps=("x-ignore-shared",))) == {"x-ignore-shared"}
    assert stream_capabilities(header_bytes(caps=("x-ignore-shared", "mapped-ram"))) == {
        "x-ignore-shared", "mapped-ram"}
    assert stream_capabilities(header_bytes(caps=None)) == set()
    assert stream_capabilities(header_bytes(caps=())) == set()
    u = uuid.uuid4().bytes
    hdr = parse_stream_header(header_bytes(caps=("x-ignore-shared",), uuid_bytes=u, page_bits=12))
    assert hdr.machine == "pc-q35-10.0" and hdr.version == 3
    assert hdr.capabilities == {"x-ignore-shared"} and hdr.uuid == u
    assert parse_stream_header(header_bytes(uuid_bytes=u)).capabilities == frozenset()


@pytest.mark.parametrize("data, match", [
    (b"", "truncated"),
    (b"QEVM", "truncated"),
    (b"XXXX\x00\x00\x00\x03\x07", "magic"),
    (struct.pack(">II", 0x5145564D, 2) + b"\x07", "version"),
    (struct.pack(">II", 0x5145564D, 3) + b"\x01", "CONFIGURATION"),
    (header_bytes(caps=("x-ignore-shared",))[:40], "truncated"),
    (struct.pack(">II", 0x5145564D, 3) + b"\x07\x00\x00\x00\x02q\xff", "non-ASCII"),
    (struct.pack(">II", 0x5145564D, 3) + b"\x07\x00\x00\x00\x01q\x05\x03abc\x00\x00\x00\x01",
     "unknown CONFIGURATION subsection"),
])
def test_stream_capabilities_rejects_garbage(data, match):
    with pytest.raises(MigrationStreamError, match=match):
        stream_capabilities(data)


# --- real QEMU ---------------------------------------------------------------------------------

@pytest.fixture
def qemu_bin() -> str | None:
    """The emulator's path. Tests check it themselves (``need_qemu``) so that a missing QEMU
    shows as a FAILED test, not as a fixture error or a skip."""
    return shutil.which("qemu-system-x86_64")


def need_qemu(path: str | None) -> None:
    assert path, "qemu-system-x86_64 is not installed (or not in PATH); the qemu tests need it"


@pytest.fixture
def ramdir(tmp_path):
    """Guest RAM files on tmpfs when available (as in production), removed afterwards."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        d = base / f"replicator-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        d = tmp_path / "ram"
        d.mkdir()
        yield d


@pytest.fixture
async def vms():
    """Every QemuProcess a test appends here is closed (QEMU killed) at the end."""
    started: list[QemuProcess] = []
    yield started
    for vm in started:
        await vm.close()


@pytest.fixture
def tick_guest(tmp_path) -> Path:
    path = tmp_path / "tick.bin"
    path.write_bytes(TICK_GUEST)
    return path


def make_spec(name: str, ramdir: Path, tmp_path: Path, **kw) -> VmSpec:
    return VmSpec(name=name, ram_bytes=RAM, ram_path=ramdir / f"{name}.ram",
                  serial_log=tmp_path / f"{name}.serial", **kw)


async def launch(vms: list, spec: VmSpec, workdir: Path, **kw) -> QemuProcess:
    vm = await QemuProcess.launch(spec, workdir, **kw)
    vms.append(vm)
    return vm


@pytest.mark.qemu
async def test_lifecycle_events_and_errors(qemu_bin, tmp_path, ramdir, vms):
    need_qemu(qemu_bin)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * MiB)
    spec = make_spec("life", ramdir, tmp_path, disks=((disk, "raw"),))  # no kernel: SeaBIOS
    vm = await launch(vms, spec, tmp_path)
    assert vm.launched and vm.pid and vm.returncode is None
    assert await vm.status() == "running"
    assert (ramdir / "life.ram").stat().st_size == RAM

    before = time.monotonic()
    stop = await vm.stop()
    assert stop is not None and stop.name == "STOP" and stop.seq > 0
    assert before <= stop.monotonic <= time.monotonic()
    assert abs(stop.wall - time.time()) < 5 and abs(stop.qemu_wall - stop.wall) < 1
    assert vm.last_stop is stop
    assert await vm.status() == "paused"
    assert await vm.stop() is None  # already paused: no event to wait for

    resume = await vm.cont()
    assert resume is not None and resume.name == "RESUME" and resume.seq > stop.seq
    assert vm.last_resume is resume and await vm.status() == "running"
    assert [e.name for e in vm.events if e.name in ("STOP", "RESUME")][-2:] == ["STOP", "RESUME"]

    with pytest.raises(QemuError, match="no STOP event"):
        await vm.wait_event("STOP", timeout=0.2)

    with pytest.raises(QmpCommandError) as info:
        await vm.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound" and "no-such-command" in str(info.value)
    with pytest.raises(QmpCommandError, match="device-that-does-not-exist"):
        await vm.execute("device_del", {"id": "device-that-does-not-exist"})

    with pytest.raises(QemuError, match="stop"):
        await vm.save_device_state(tmp_path / "dev.mig")  # running VM is refused
    with pytest.raises(QemuError, match="not waiting for an incoming migration"):
        await vm.load_device_state(header_bytes(caps=("x-ignore-shared",)))

    assert await vm.quit() == 0
    with pytest.raises(QemuError):
        await vm.status()


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


@pytest.mark.qemu
async def test_disks_open_in_their_format_and_without_backing_files(qemu_bin, tmp_path, ramdir,
                                                                     vms):
    """query_disks reports what QEMU opened; a qcow2 header's backing file is never opened."""
    need_qemu(qemu_bin)
    secret = tmp_path / "node.key"
    secret.write_bytes(b"k" * 65536)
    raw, q2, backed = tmp_path / "a.img", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    raw.write_bytes(b"\0" * MiB)
    qemu_img("create", "-f", "qcow2", str(q2), "16M")
    # Bypasses check_image on purpose: build_argv alone must keep QEMU off the backing file.
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(backed), "16M")
    spec = make_spec("disks", ramdir, tmp_path,
                     disks=((raw, "raw"), (q2, "qcow2"), (backed, "qcow2")))
    vm = await launch(vms, spec, tmp_path, paused=True)
    got = sorted(await query_disks(vm), key=lambda d: d.node)
    assert [(d.path, d.format, d.node) for d in got] == [
        (str(raw), "raw", "disk0"), (str(q2), "qcow2", "disk1"), (str(backed), "qcow2", "disk2")]
    nodes = await vm.execute("query-named-block-nodes", {"flat": True})
    assert str(secret) not in {n["file"] for n in nodes}
    opened = open_files(vm.pid)
    assert {str(raw), str(q2), str(backed)} <= opened and str(secret) not in opened


@pytest.mark.qemu
async def test_launch_failure_reports_qemu_stderr(qemu_bin, tmp_path, ramdir, vms):
    need_qemu(qemu_bin)
    spec = make_spec("bad", ramdir, tmp_path, machine="no-such-machine")
    t0 = time.monotonic()
    with pytest.raises(QemuError, match=r"exited with status 1 .*no-such-machine"):
        await launch(vms, spec, tmp_path)
    assert time.monotonic() - t0 < 20


@pytest.mark.qemu
async def test_attach_to_running_qemu(qemu_bin, tmp_path, ramdir, vms):
    need_qemu(qemu_bin)
    spec = make_spec("prod", ramdir, tmp_path)
    sock = tmp_path / "prod.qmp"
    proc = await asyncio.create_subprocess_exec(
        *build_argv(spec, sock), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(500):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        vm = await QemuProcess.attach(sock)
        vms.append(vm)
        assert not vm.launched and vm.pid == proc.pid
        assert await vm.status() == "running"
        await vm.stop()
        assert await vm.status() == "paused"
        await vm.close()  # attached: QMP closed, QEMU left running
        assert proc.returncode is None
        vm = await QemuProcess.attach(sock)
        vms.append(vm)
        assert await vm.status() == "paused"
        assert await vm.quit() is None  # exit code of a process we did not start is unknown
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with pytest.raises(QemuError, match="no QEMU listening"):
        await QemuProcess.attach(tmp_path / "nothing.qmp")


async def start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks: int = 10) -> QemuProcess:
    src = await launch(vms, make_spec("src", ramdir, tmp_path, kernel=tick_guest), tmp_path)
    await wait_for_ticks(tmp_path / "src.serial", ticks)
    return src


@pytest.mark.qemu
async def test_switch_continues_guest_on_shadow(qemu_bin, tmp_path, ramdir, vms, tick_guest):
    """Full switch: the shadow (RAM = byte copy of the source's) continues the guest exactly."""
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest)

    stop = await src.stop()
    assert stop is not None and await src.status() == "paused"
    # replicator's job, simulated: make the shadow's RAM file identical to the source's
    shutil.copyfile(ramdir / "src.ram", ramdir / "shadow.ram")
    shadow = await launch(vms, make_spec("shadow", ramdir, tmp_path, kernel=tick_guest),
                          tmp_path, incoming="defer")
    assert await shadow.status() == "inmigrate"
    with pytest.raises(QemuError, match="not loaded its device state"):
        await shadow.cont()

    t_stop = time.monotonic()  # the STOP above happened before the RAM copy + shadow launch
    saved = await src.save_device_state(tmp_path / "device.mig")
    assert await src.status() == "postmigrate"
    assert saved.header.capabilities == {"x-ignore-shared"}
    assert saved.header.machine.startswith("pc-q35-")
    assert 100_000 < saved.size < 1_000_000, saved.size  # ~290 KB: no guest RAM in it
    assert saved.info["status"] == "completed"
    assert stream_capabilities(saved.data) == {"x-ignore-shared"}

    loaded = await shadow.load_device_state(saved.data)  # bytes: written under workdir
    assert loaded.status == "paused" and await shadow.status() == "paused"
    resume = await shadow.cont()
    t_resume = time.monotonic()
    assert resume is not None and await shadow.status() == "running"
    # source stays handed over; this layer never resumes it by accident
    assert await src.status() == "postmigrate"
    with pytest.raises(QemuError, match="postmigrate"):
        await src.cont()

    src_log = (tmp_path / "src.serial").read_bytes()
    last_src = tick_values(src_log)[-1]
    shadow_ticks = await wait_for_ticks(tmp_path / "shadow.serial", 5)
    # The serial stream continues byte-exactly: source log + shadow log is one unbroken count.
    combined = tick_values(src_log + (tmp_path / "shadow.serial").read_bytes())
    assert combined == list(range(1, len(combined) + 1))
    assert shadow_ticks[0] in (last_src + 1, last_src + 2)
    assert await src.status() == "postmigrate"

    print(f"\nstream {saved.size} B, save {saved.duration * 1e3:.1f} ms "
          f"(QEMU total {saved.info.get('total-time')} ms), load {loaded.duration * 1e3:.1f} ms, "
          f"save->RESUME {(t_resume - t_stop) * 1e3:.1f} ms, "
          f"source ticks {last_src} -> shadow {shadow_ticks[0]}")


@pytest.mark.qemu
async def test_switch_downtime_stop_to_resume(qemu_bin, tmp_path, ramdir, vms, tick_guest):
    """Measure the switch's downtime: shadow already waiting, source STOP -> RAM copy (stands in
    for replicator's final sync, 128 MiB here) -> device state saved -> loaded -> shadow RESUME.
    Reported both with and without the RAM copy."""
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks=3)
    shadow = await launch(vms, make_spec("shadow", ramdir, tmp_path, kernel=tick_guest),
                          tmp_path, incoming="defer")
    await shadow.prepare_load()
    await src.prepare_save()  # while the guest still runs
    assert await src.status() == "running"
    stop = await src.stop()
    shutil.copyfile(ramdir / "src.ram", ramdir / "shadow.ram")  # "sync" (not part of downtime)
    t_synced = time.monotonic()
    saved = await src.save_device_state(tmp_path / "device.mig")
    await shadow.load_device_state(saved.path)
    resume = await shadow.cont()
    switch_ms = (resume.monotonic - t_synced) * 1e3
    total_ms = (resume.monotonic - stop.monotonic) * 1e3
    assert await shadow.status() == "running" and await src.status() == "postmigrate"
    assert switch_ms < 5000
    await wait_for_ticks(tmp_path / "shadow.serial", 2)
    print(f"\nstream {saved.size} B; synced->RESUME {switch_ms:.1f} ms "
          f"(save {saved.duration * 1e3:.1f} ms); STOP->RESUME incl. 128 MiB copy {total_ms:.1f} ms; "
          f"QEMU wall stamps STOP->RESUME {(resume.qemu_wall - stop.qemu_wall) * 1e3:.1f} ms")


@pytest.mark.qemu
async def test_shadow_with_stale_ram_loads_anyway(qemu_bin, tmp_path, ramdir, vms, tick_guest):
    """QEMU cannot tell that the shadow's RAM is not the source's: with x-ignore-shared it trusts
    the file. Here the shadow's RAM is a copy taken while the source still ran (an out-of-sync
    replica): loading "succeeds", the shadow runs, and the guest silently goes back in time (its
    counter restarts from the stale value). Keeping the RAM file identical is replicator's job.

    A RAM file of zeroes, by contrast, happens to be caught: the x86 'kvm-tpr-opt' (kvmvapic)
    device re-reads its option ROM from guest RAM on load and fails ("error while loading state
    for instance 0x0 of device 'kvm-tpr-opt'"). That is an accident, not a RAM check.
    """
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks=3)
    shutil.copyfile(ramdir / "src.ram", ramdir / "shadow.ram")  # stale: the guest runs on
    stale = tick_values((tmp_path / "src.serial").read_bytes())[-1]
    await wait_for_ticks(tmp_path / "src.serial", stale + 5)
    await src.stop()
    last_src = tick_values((tmp_path / "src.serial").read_bytes())[-1]
    saved = await src.save_device_state(tmp_path / "device.mig")

    # 1. all-zero RAM (a fresh file): the load fails in kvm-tpr-opt, by accident
    zero = await launch(vms, make_spec("zero", ramdir, tmp_path, kernel=tick_guest),
                        tmp_path, incoming="defer")
    with pytest.raises(QemuError, match="error while loading state"):
        await zero.load_device_state(saved.path)
    await zero.quit()

    # 2. stale RAM: loads and runs, on the wrong memory
    shadow = await launch(vms, make_spec("shadow", ramdir, tmp_path, kernel=tick_guest),
                          tmp_path, incoming="defer")
    loaded = await shadow.load_device_state(saved.path)
    assert loaded.status == "paused"
    await shadow.cont()
    assert await shadow.status() == "running" and await src.status() == "postmigrate"
    shadow_ticks = await wait_for_ticks(tmp_path / "shadow.serial", 2)
    assert shadow_ticks[0] <= stale + 2 < last_src + 1, (stale, last_src, shadow_ticks[:3])
    print(f"\nstale RAM: source stopped at {last_src}, shadow resumed counting at "
          f"{shadow_ticks[0]} (stale copy at {stale})")


@pytest.mark.qemu
async def test_capability_mismatch_is_refused(qemu_bin, tmp_path, ramdir, vms, tick_guest):
    """A stream made without x-ignore-shared is refused by our layer before QEMU sees it; if it
    is forced on QEMU anyway, QEMU fails the load and we report its stderr reason."""
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks=2)
    await src.stop()
    # a plain migration stream (RAM included, no capabilities subsection), made by hand
    plain = tmp_path / "plain.mig"
    for cap in ("x-ignore-shared", "events"):
        await src.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": cap, "state": False}]})
    await src.execute("migrate", {"uri": f"file:{plain}"})
    for _ in range(600):
        if (await src.execute("query-migrate")).get("status") == "completed":
            break
        await asyncio.sleep(0.05)
    assert stream_capabilities(plain.read_bytes()[:4096]) == set()
    assert plain.stat().st_size > 500_000  # it carries guest RAM
    await src.quit()

    shutil.copyfile(ramdir / "src.ram", ramdir / "shadow.ram")
    shadow = await launch(vms, make_spec("shadow", ramdir, tmp_path, kernel=tick_guest),
                          tmp_path, incoming="defer")
    with pytest.raises(MigrationStreamError, match="lacks capability x-ignore-shared"):
        await shadow.load_device_state(plain)
    with pytest.raises(MigrationStreamError):
        await shadow.load_device_state(b"not a migration stream")
    # refused before QEMU saw it: the shadow still waits, untouched
    assert await shadow.status() == "inmigrate"
    assert (await shadow.execute("query-migrate")).get("status") in (None, "none")

    # Forced through with mismatching capabilities: QEMU's own check fails the load. The reason
    # it gives over QMP is generic ("Invalid argument"), the real one is on stderr; we report both.
    with pytest.raises(QemuError,
                       match=r"failed.*x-ignore-shared is on, but received capability is off"):
        await shadow.load_device_state(plain, require_capabilities=frozenset(), ignore_shared=True)
    assert await shadow.status() == "inmigrate"  # alive thanks to exit-on-error=false...
    with pytest.raises(QemuError, match="relaunch"):  # ...but it cannot load again
        await shadow.load_device_state(plain, require_capabilities=frozenset())
    await shadow.quit()


@pytest.mark.qemu
async def test_device_state_caps_constant_matches_qemu(qemu_bin, tmp_path, ramdir, vms):
    """Every capability we force is one this QEMU knows (so none is silently skipped)."""
    need_qemu(qemu_bin)
    vm = await launch(vms, make_spec("caps", ramdir, tmp_path), tmp_path, paused=True)
    assert await vm.status() == "prelaunch"  # -S without -incoming: never started yet
    known = {c["capability"] for c in await vm.execute("query-migrate-capabilities")}
    assert set(DEVICE_STATE_CAPABILITIES) <= known
    assert await vm.set_migrate_capabilities(DEVICE_STATE_CAPABILITIES) == dict(DEVICE_STATE_CAPABILITIES)
    assert await vm.shared_ram_backends() == {"ram0": str(ramdir / "caps.ram")}


@pytest.mark.qemu
async def test_held_open_precopy_sends_no_event_per_dirty_sync(qemu_bin, tmp_path, ramdir, vms,
                                                                tick_guest):
    """Held open, the precopy re-syncs QEMU's dirty bitmap hundreds of times a second. With the
    ``events`` capability off none of those syncs becomes a QMP event (``MIGRATION_PASS``, and
    the ``MIGRATION`` state changes) the daemon has to parse; the shadow's incoming side keeps
    ``events`` on (its few state changes wake the switch's wait for ``completed``)."""
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks=3)
    loop = asyncio.get_running_loop()
    sock_path = tmp_path / "precopy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    listener.setblocking(False)
    mark = src.event_mark()
    await src.start_precopy(f"unix:{sock_path}")
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
    listener.close()
    conn.setblocking(False)

    async def drain() -> None:             # a destination that reads and never acknowledges
        while await loop.sock_recv(conn, 1 << 20):
            pass

    drainer = asyncio.create_task(drain())
    try:
        deadline = time.monotonic() + 120
        while True:
            info = await src.query_migrate()
            syncs = int(info.get("ram", {}).get("dirty-sync-count") or 0)
            if syncs >= 50:
                break
            assert info["status"] in ("setup", "active") and time.monotonic() < deadline, info
            await asyncio.sleep(0.05)
        caps = {c["capability"]: c["state"]
                for c in await src.execute("query-migrate-capabilities")}
        assert (caps["events"], caps["switchover-ack"], caps["return-path"]) == \
            (False, True, True)
        names = [e.name for e in src.events if e.seq > mark]
        assert "MIGRATION_PASS" not in names and "MIGRATION" not in names, \
            f"{syncs} dirty syncs, events: {names.count('MIGRATION_PASS')} MIGRATION_PASS, " \
            f"{names.count('MIGRATION')} MIGRATION"
        await src.execute("migrate_cancel")
    finally:
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await drainer
        conn.close()

    shadow = await launch(vms, make_spec("shadow", ramdir, tmp_path), tmp_path, incoming="defer")
    await shadow.start_precopy_incoming(f"unix:{tmp_path / 'incoming.sock'}")
    caps = {c["capability"]: c["state"]
            for c in await shadow.execute("query-migrate-capabilities")}
    assert (caps["events"], caps["switchover-ack"], caps["return-path"]) == (True, True, True)


@pytest.mark.qemu
async def test_precopy_into_a_passed_socket_with_a_small_send_buffer_blocks_qemu(
        qemu_bin, tmp_path, ramdir, vms, tick_guest):
    """The relay's channel: one end of a socket pair, passed with ``getfd`` (SCM_RIGHTS over
    QMP) and given a small send buffer. While nobody reads it, QEMU's held-open migration loop
    blocks on it and stops re-syncing its dirty bitmap (instead of spinning, ~1000 syncs a
    second here); each read lets it go on."""
    need_qemu(qemu_bin)
    src = await start_tick_source(vms, tmp_path, ramdir, tick_guest, ticks=3)
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    name = await src.pass_fd(theirs.fileno(), "precopy")
    theirs.close()
    await src.start_precopy(f"fd:{name}")
    ours.setblocking(False)

    async def syncs() -> int:
        info = await src.query_migrate()
        assert info["status"] in ("setup", "active"), info
        return int(info.get("ram", {}).get("dirty-sync-count") or 0)

    async def drain(seconds: float) -> int:
        got, end = 0, loop.time() + seconds
        while loop.time() < end:
            try:
                got += len(await wait_for_recv(loop, ours, end - loop.time()))
            except TimeoutError:
                break
        return got

    try:
        # The whole of RAM goes first (the first pass); then only what the guest dirties.
        deadline = time.monotonic() + 120
        while await syncs() < 3:
            await drain(0.2)
            assert time.monotonic() < deadline
        await asyncio.sleep(1.0)                # unread: the small buffer fills, QEMU blocks
        held = await syncs()
        await asyncio.sleep(2.0)
        assert await syncs() == held, "QEMU kept syncing with its socket full"
        assert await drain(0.5) > 0
        await asyncio.sleep(0.2)
        assert await syncs() > held, "a read did not let QEMU go on"
        await src.execute("migrate_cancel")
    finally:
        ours.close()


async def wait_for_recv(loop, sock: socket.socket, timeout: float) -> bytes:
    data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), max(timeout, 0.001))
    if not data:
        raise TimeoutError("EOF")
    return data


@pytest.mark.qemu
async def test_qmp_messages_are_formatted_only_for_an_enabled_debug_log(qemu_bin, tmp_path,
                                                                        ramdir, vms, caplog,
                                                                        monkeypatch):
    """qemu.qmp's hooks log every message with an eager ``str(msg)`` (an indented json.dumps);
    ours format one only when the debug log is on, and then log the same lines."""
    need_qemu(qemu_bin)
    formatted: list[str] = []
    real_str = qmp_message.Message.__str__

    def counting_str(msg: qmp_message.Message) -> str:
        formatted.append(real_str(msg))
        return formatted[-1]

    monkeypatch.setattr(qmp_message.Message, "__str__", counting_str)
    vm = await launch(vms, make_spec("quiet", ramdir, tmp_path), tmp_path, paused=True)
    caplog.set_level(logging.INFO, logger="qemu.qmp")
    formatted.clear()
    for _ in range(20):
        assert await vm.status() == "prelaunch"
    assert formatted == []

    caplog.set_level(logging.DEBUG, logger="qemu.qmp")
    caplog.clear()
    assert await vm.status() == "prelaunch"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("qemu.qmp")]
    sent = [ln for ln in lines if ln.startswith("--> ")]
    got = [ln for ln in lines if ln.startswith("<-- ")]
    assert len(sent) == 1 and '"execute": "query-status"' in sent[0], lines
    assert len(got) == 1 and '"status": "prelaunch"' in got[0], lines
