"""Launch records: which QEMU a daemon started, so that a restarted daemon can adopt it.

systemd restarts a crashed daemon with ``KillMode=process``: the QEMU it launched keeps running
(the desktop VM must not die with its replicator) and keeps its QMP socket. The restarted daemon
must reconnect to *that* QEMU instead of refusing to start ("socket in use") or starting a
second one on the same RAM file.

A record is written next to the QMP socket right after launch::

    <workdir>/<name>.launch.json   {"pid", "start_ticks", "qmp_socket", "argv", "boot_id"}

and a process is only ever adopted when all of these still hold: same kernel boot, the pid is
alive with the same start time (pids are reused), and its command line is exactly the recorded
one. Anything else is a different process and is never touched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..durable import atomic_write

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None when the
    process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/pid/stat), or None."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def process_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]]


@dataclass(frozen=True)
class LaunchRecord:
    pid: int
    start_ticks: int
    qmp_socket: str
    argv: tuple[str, ...]
    boot_id: str

    @staticmethod
    def path_for(workdir: Path, name: str) -> Path:
        return Path(workdir) / f"{name}.launch.json"

    @classmethod
    def for_process(cls, pid: int, qmp_socket: Path, argv: list[str]) -> "LaunchRecord":
        return cls(pid, process_start_ticks(pid) or 0, str(qmp_socket), tuple(argv), _boot_id())

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps({
            "pid": self.pid, "start_ticks": self.start_ticks, "qmp_socket": self.qmp_socket,
            "argv": list(self.argv), "boot_id": self.boot_id}).encode())

    @classmethod
    def load(cls, path: Path) -> "LaunchRecord | None":
        """The record at ``path``; None if there is none. A corrupt record is treated as none
        (it can only name a process we would then refuse to touch anyway)."""
        try:
            d = json.loads(path.read_text())
            return cls(int(d["pid"]), int(d["start_ticks"]), str(d["qmp_socket"]),
                       tuple(str(a) for a in d["argv"]), str(d["boot_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable launch record %s: %s", path, exc)
            return None

    def alive(self) -> bool:
        """Is the recorded process still the one we launched (same boot, pid, start, argv)?"""
        if self.boot_id and self.boot_id != _boot_id():
            return False
        if process_start_ticks(self.pid) != self.start_ticks:
            return False
        return process_argv(self.pid) == list(self.argv)

    @staticmethod
    def clear(path: Path) -> None:
        path.unlink(missing_ok=True)
