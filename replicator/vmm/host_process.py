"""The operating-system side of one QEMU: its pid, exit, stderr file and launch record.

:class:`~replicator.vmm.qemu.QemuProcess` speaks QMP; it holds a :class:`HostProcess` for what it
needs to know about the process itself, however it got hold of it: launched (an asyncio
subprocess), adopted after a daemon restart (pid from its launch record) or attached to (pid
from the QMP socket's ``SO_PEERCRED``, see :func:`socket_peer_pid`). Also here:
:func:`clear_stale_socket`, which checks a QMP socket file before a launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import struct
import time
from pathlib import Path

from replicator.aio import wait_for
from replicator.errors import QemuError
from replicator.vmm.launch_record import LaunchRecord, process_start_ticks

__all__ = ["HostProcess", "clear_stale_socket", "socket_peer_pid", "pid_alive"]

_STDERR_TAIL = 16 * 1024


class HostProcess:
    """One QEMU process as the OS sees it. ``name`` only labels error messages.

    ``proc`` is set for a QEMU this run started, ``pid`` whenever it is known. ``stderr_log``
    (a QEMU we launched or adopted) is the file QEMU's stderr goes to; ``record_path`` its
    launch record, removed once the process is gone.
    """

    def __init__(self, name: str, proc: asyncio.subprocess.Process | None, pid: int | None):
        self.name = name
        self.proc = proc
        self.pid = pid
        self.record_path: Path | None = None
        self._stderr_log: Path | None = None
        self._stderr_start = 0

    @property
    def returncode(self) -> int | None:
        """Exit status of a QEMU we launched, once it exited (``None`` otherwise)."""
        return self.proc.returncode if self.proc is not None else None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        if self.pid is None:
            return True  # unknown; assume alive
        return pid_alive(self.pid)

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait until QEMU has exited; return its exit status (``None`` if not our child).

        Raises :class:`QemuError` on timeout.
        """
        try:
            if self.proc is not None:
                rc = await wait_for(self.proc.wait(), timeout)
                await self.stderr_settled()
                return rc
            if self.pid is None:
                raise QemuError(f"pid of {self.name} unknown; cannot wait for it to exit")
            deadline = None if timeout is None else time.monotonic() + timeout
            while pid_alive(self.pid):
                if deadline is not None and time.monotonic() >= deadline:
                    raise asyncio.TimeoutError
                await asyncio.sleep(0.02)
            return None
        except asyncio.TimeoutError:
            raise QemuError(f"QEMU {self.name} did not exit within {timeout:g}s") from None

    async def kill(self) -> int | None:
        """SIGKILL QEMU (if still running) and wait for it; returns its exit status if known."""
        if self.pid is None:
            raise QemuError(f"pid of {self.name} unknown; cannot kill it")
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return await self.wait_exit(timeout=30)

    async def end_failed_launch(self) -> None:
        """Kill a QEMU we just started that never answered, and let it finish its stderr."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                await self.proc.wait()
        await self.stderr_settled()

    def forget_record(self) -> None:
        """QEMU is gone: its launch record must not make a later run adopt a recycled pid."""
        if self.record_path is not None and not self.alive():
            LaunchRecord.clear(self.record_path)

    # -- stderr ---------------------------------------------------------------------------------

    def use_stderr_log(self, path: Path) -> None:
        """QEMU's stderr file: :meth:`stderr_tail` reads what it wrote from now on."""
        self._stderr_log = path
        self._stderr_start = path.stat().st_size if path.exists() else 0

    def stderr_tail(self) -> str:
        """The last ~16 KiB QEMU wrote to stderr (launched QEMUs only)."""
        if self._stderr_log is None:
            return ""
        try:
            with open(self._stderr_log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self._stderr_start, size - _STDERR_TAIL)
                f.seek(start)
                return f.read(size - start).decode("utf-8", "replace")
        except OSError:
            return ""

    async def stderr_settled(self, grace: float = 0.5) -> None:
        """Give an exiting QEMU a moment to finish writing its reason to the stderr file."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(asyncio.shield(self.proc.wait()), min(grace, 0.05))
        else:
            await asyncio.sleep(0)

    def stderr_suffix(self) -> str:
        """``"; QEMU stderr: ..."`` (its last 20 lines) for an error message, or ``""``."""
        tail = self.stderr_tail().strip()
        if not tail:
            return ""
        lines = tail.splitlines()[-20:]
        return "; QEMU stderr: " + " | ".join(lines)


def clear_stale_socket(path: Path) -> None:
    """Remove a leftover socket file, refusing if a live process still listens on it."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise QemuError(f"QMP socket {path} is in use by a running process; refusing to start another")


def socket_peer_pid(path: Path) -> int | None:
    """Pid of the process listening on unix socket ``path`` (``SO_PEERCRED``), if it can be had."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _, _ = struct.unpack("3i", creds)
        return pid or None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise QemuError(f"no QEMU listening on {path}: {exc.strerror}") from exc
        return None
    finally:
        s.close()


def pid_alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None      # None: gone, or a zombie
