"""The libvirt test environment: a running libvirtd and domains for the project's test guest.

Tests observe libvirt the way a user does, through the ``virsh`` CLI on ``qemu:///system``.
Without systemd as PID 1 (CI, containers) nothing starts the daemons, so `ensure_libvirtd`
starts ``virtlogd`` and ``libvirtd`` by hand when their sockets are absent (or stale) and leaves
running ones alone. `TestDomain` keeps its kernel, initramfs and disk under
``/var/lib/libvirt/images/replicator-tests/<name>/``: libvirt's QEMU runs as ``libvirt-qemu``
and must be able to read them there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

URI = "qemu:///system"
LIBVIRTD_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
LOG_DIR = Path("/var/log/libvirt")
BASE = Path("/var/lib/libvirt/images/replicator-tests")
APPEND = "console=ttyS0 quiet fill=25 dirty=2 memcheck=3"
START_TIMEOUT = 30.0
#: virsh's words for "no such domain" and "not running": fine while tearing down.
_GONE = ("failed to get domain", "Domain not found", "domain is not running",
         "cannot undefine transient domain")


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """``virsh -c qemu:///system ARGS``; on failure (with check) an AssertionError with stderr."""
    cmd = ["virsh", "-c", URI, *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)}: no answer in {timeout:.0f}s") from e
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): "
                             f"{(res.stderr or res.stdout).strip()}")
    return res


# -- the daemons ---------------------------------------------------------------------------

def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"({path}: {e.strerror})"
    return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)


def _accepts(sock: Path) -> bool:
    """Something listens on ``sock`` (a file left by a killed daemon refuses)."""
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _libvirtd_answers() -> subprocess.CompletedProcess | None:
    """None when ``virsh version`` answers (the QEMU driver is loaded), else its result."""
    try:
        res = virsh("version", check=False, timeout=10)
    except AssertionError as e:  # no answer in time
        return subprocess.CompletedProcess([], 1, "", str(e))
    return None if res.returncode == 0 else res


def _start_daemon(name: str) -> None:
    """``<name> -d``: it forks into the background and exits once the child is set up."""
    # /usr/sbin is not on a non-root user's PATH on Debian; the daemons live there.
    exe = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise AssertionError(f"{name} not found: run 'sudo bash deploy/install-deps.sh'")
    if os.geteuid() != 0:
        raise AssertionError(f"{name} is not running and only root can start it for {URI}")
    res = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=START_TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"{exe} -d failed ({res.returncode}): "
                             f"{(res.stderr + res.stdout).strip()}\n{_tail(LOG_DIR / f'{name}.log')}")


@contextlib.contextmanager
def _lock():
    """One process at a time decides whether to start the daemons (parallel test runs)."""
    with open(Path(tempfile.gettempdir()) / "replicator-tests-libvirtd.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_libvirtd() -> None:
    """virtlogd and libvirtd running and ``virsh version`` answering; started if needed.

    Idempotent: running daemons (ours, systemd's, anyone's) are left alone. virtlogd comes
    first: libvirtd hands every QEMU's log to it and ``virsh start`` fails without it.
    """
    with _lock():
        deadline = time.monotonic() + START_TIMEOUT
        if not _accepts(VIRTLOGD_SOCK):
            _start_daemon("virtlogd")
            while not _accepts(VIRTLOGD_SOCK):
                if time.monotonic() > deadline:
                    raise AssertionError(f"virtlogd started but {VIRTLOGD_SOCK} does not accept "
                                         f"after {START_TIMEOUT:.0f}s\n"
                                         f"{_tail(LOG_DIR / 'virtlogd.log')}")
                time.sleep(0.1)
        # libvirtd's own socket is not probed by connecting: an accepted connection closed at
        # once puts an error in its log. A socket that is there but does not answer is stale.
        if not LIBVIRTD_SOCK.exists() or _libvirtd_answers() is not None:
            _start_daemon("libvirtd")
        while (res := _libvirtd_answers()) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"libvirtd does not answer 'virsh -c {URI} version' after "
                    f"{START_TIMEOUT:.0f}s: {(res.stderr or res.stdout).strip()}\n"
                    f"{_tail(LOG_DIR / 'libvirtd.log')}\n{_tail(LOG_DIR / 'virtlogd.log')}")
            time.sleep(0.2)


# -- domains -------------------------------------------------------------------------------

def destroy_and_undefine(name: str) -> None:
    """Stop and forget domain ``name`` with its managed save, NVRAM and metadata; a domain
    that does not exist or does not run is not an error."""
    for args in (("destroy", name),
                 ("undefine", "--managed-save", "--nvram", "--snapshots-metadata",
                  "--checkpoints-metadata", name)):
        res = virsh(*args, check=False)
        if res.returncode != 0 and not any(g in res.stderr for g in _GONE):
            raise AssertionError(f"virsh {' '.join(args)} failed: {res.stderr.strip()}")


def domain_names() -> list[str]:
    """Every domain libvirt knows, running or not."""
    return [n for n in virsh("list", "--all", "--name").stdout.split() if n]


def cleanup_stale(prefix: str = "rtest-") -> None:
    """Destroy and undefine leftover domains named ``prefix...`` (from a killed earlier run),
    and their directories under BASE."""
    if not prefix:
        # An empty prefix would take every domain on the machine, the user's own VMs too.
        raise ValueError("cleanup_stale needs a non-empty prefix")
    for name in domain_names():
        if name.startswith(prefix):
            destroy_and_undefine(name)
    if BASE.is_dir():
        for d in BASE.iterdir():
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)


class TestDomain:
    """A libvirt domain (type ``qemu``, TCG) running the project's test guest.

    The constructor prepares its directory (kernel and initramfs copies, a qcow2 disk, the
    serial log's path) and the XML; a leftover domain or directory of the same name from a
    killed run is removed first. Nothing is defined until `define`.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, name: str, guest: tuple[Path, Path], *, ram_mib: int = 256,
                 append: str = APPEND, shared_memory: bool = True, disk_mib: int = 64,
                 disk_data: bool = True):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad domain name {name!r}")
        ensure_libvirtd()
        self.name = name
        self.dir = BASE / name
        destroy_and_undefine(name)
        shutil.rmtree(self.dir, ignore_errors=True)
        # Explicit modes: a restrictive umask must not hide the files from libvirt-qemu.
        for d in (BASE, self.dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        kernel, initrd = guest
        self.kernel, self.initrd = self.dir / "vmlinux", self.dir / "initramfs.cpio.gz"
        for src, dst in ((kernel, self.kernel), (initrd, self.initrd)):
            shutil.copyfile(src, dst)
            dst.chmod(0o644)
        self.disk: Path | None = None
        if disk_mib:
            self.disk = self.dir / "disk0.qcow2"
            _run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), f"{disk_mib}M"])
            if disk_data:
                _run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", str(self.disk)])
            self.disk.chmod(0o644)
        self.serial_log = self.dir / "serial.log"
        self.xml = self._xml(ram_mib, append, shared_memory)

    def _xml(self, ram_mib: int, append: str, shared_memory: bool) -> str:
        backing = ("  <memoryBacking><source type='file'/><access mode='shared'/>"
                   "</memoryBacking>\n") if shared_memory else ""
        disk = (f"    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file={quoteattr(str(self.disk))}/>"
                f"<target dev='vda' bus='virtio'/></disk>\n") if self.disk else ""
        return (
            "<domain type='qemu'>\n"
            f"  <name>{escape(self.name)}</name>\n"
            f"  <memory unit='MiB'>{int(ram_mib)}</memory>\n"
            "  <vcpu>1</vcpu>\n"
            f"{backing}"
            "  <os><type arch='x86_64' machine='q35'>hvm</type>\n"
            f"    <kernel>{escape(str(self.kernel))}</kernel>\n"
            f"    <initrd>{escape(str(self.initrd))}</initrd>\n"
            f"    <cmdline>{escape(append)}</cmdline></os>\n"
            "  <devices>\n"
            f"{disk}"
            f"    <serial type='file'><source path={quoteattr(str(self.serial_log))} "
            "append='on'/><target port='0'/></serial>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n"
            "</domain>\n")

    def define(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix=f"{self.name}-") as f:
            f.write(self.xml)
            f.flush()
            virsh("define", f.name)

    def start(self) -> None:
        res = virsh("start", self.name, check=False, timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"virsh start {self.name} failed: {res.stderr.strip()}\n"
                                 f"{_tail(LOG_DIR / 'qemu' / f'{self.name}.log')}")

    def destroy_and_undefine(self) -> None:
        destroy_and_undefine(self.name)

    def cleanup(self) -> None:
        """The domain gone from libvirt and its directory removed."""
        self.destroy_and_undefine()
        shutil.rmtree(self.dir, ignore_errors=True)

    def state(self) -> str:
        """``virsh domstate``: "running", "paused", "shut off", ..."""
        return _first_line(virsh("domstate", self.name).stdout)

    def domstate_reason(self) -> str:
        """``virsh domstate --reason``: e.g. "running (booted)", "paused (migration)"."""
        return _first_line(virsh("domstate", "--reason", self.name).stdout)

    def dumpxml(self, inactive: bool = False) -> str:
        """The domain's XML as libvirt holds it (live, or with ``inactive`` the persistent)."""
        return virsh("dumpxml", *(["--inactive"] if inactive else []), self.name).stdout


def _first_line(out: str) -> str:
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else ""


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")
