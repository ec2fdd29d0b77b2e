"""A small asyncio layer over one QEMU process (``qemu-system-x86_64``), used by both sides.

The source side *attaches* to the production VM's QMP socket; the sink side *launches* the
paused shadow. Both then talk QMP through :class:`QemuProcess`, which adds three things on top of
``qemu.qmp``:

* errors: every failure is a :class:`~replicator.errors.QemuError` that carries QEMU's own message
  (and, for a process we launched, the tail of its stderr, where QEMU explains most failures);
* events: every QMP event is timestamped on arrival (:mod:`replicator.vmm.qmp_events`), so the
  switch can measure downtime from the source's ``STOP`` to the shadow's ``RESUME``;
  :meth:`QemuProcess.wait_event` waits for one by name;
* a lifecycle: :meth:`~QemuProcess.launch`, :meth:`~QemuProcess.adopt` (a QEMU an earlier run of
  the daemon launched) or :meth:`~QemuProcess.attach`; :meth:`~QemuProcess.quit`,
  :meth:`~QemuProcess.kill`, :meth:`~QemuProcess.close`, :meth:`~QemuProcess.detach`.

The process itself (pid, exit, stderr file, launch record) is a
:class:`~replicator.vmm.host_process.HostProcess`; the migration operations (the switch's
device-state hand-over, the relayed precopy) are a :class:`~replicator.vmm.migration.QemuMigration`
(``.migration``), whose methods :class:`QemuProcess` offers under the same names.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError

from replicator.aio import wait_for
from replicator.errors import QemuError
from replicator.vmm.host_process import HostProcess, clear_stale_socket, socket_peer_pid
from replicator.vmm.launch_record import LaunchRecord
from replicator.vmm.migration import (DeviceStateLoad, DeviceStateSave, QemuMigration,
                                      file_channel)
from replicator.vmm.qmp_events import QmpCommandError, QmpEvent, QmpEventLog, QuietQMPClient
from replicator.vmm.spec import VmSpec, build_argv

__all__ = ["QemuProcess"]


class _Origin(enum.Enum):
    LAUNCHED = "launched"
    ATTACHED = "attached"


class QemuProcess:
    """One QEMU, reached over QMP; either launched by us or attached to.

    Create with :meth:`launch` or :meth:`attach`, never directly. Use as an async context manager
    (or call :meth:`close`): leaving it disconnects QMP and kills a QEMU *we launched* that still
    runs; an attached QEMU is left alone.
    """

    def __init__(self, *, qmp_socket: Path, spec: VmSpec | None, workdir: Path | None,
                 proc: asyncio.subprocess.Process | None, pid: int | None, origin: _Origin):
        self.qmp_socket = qmp_socket
        self.spec = spec
        self.workdir = workdir
        self._origin = origin
        self.host = HostProcess(self.name, proc, pid)
        """The OS process: pid, exit status, stderr file, launch record."""
        self._qmp = QuietQMPClient(spec.name if spec else "replicator")
        self._event_log = QmpEventLog(self._qmp)
        self.migration = QemuMigration(self)
        """Migration operations (also offered as methods of this class, by the same names)."""
        self._closed = False
        self._fd_lock = asyncio.Lock()
        self._fd_serial = 0

    # -- construction ---------------------------------------------------------------------

    @classmethod
    async def launch(
        cls,
        spec: VmSpec,
        workdir: str | os.PathLike[str],
        incoming: str | None = None,
        paused: bool = False,
        *,
        connect_timeout: float = 30.0,
    ) -> QemuProcess:
        """Start QEMU for ``spec`` and connect to its QMP socket ``<workdir>/<name>.qmp``.

        QEMU's stderr is kept (tail in memory, all of it in ``<workdir>/<name>.stderr.log``).
        ``incoming="defer"`` starts a shadow (``-incoming defer -S``). Raises :class:`QemuError`
        if QEMU cannot be started, exits before QMP answers (the message includes its stderr), or
        QMP does not answer within ``connect_timeout`` seconds (QEMU is then killed).
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        qmp_socket = workdir / f"{spec.name}.qmp"
        argv = build_argv(spec, qmp_socket, incoming=incoming, paused=paused)
        clear_stale_socket(qmp_socket)
        stderr_log = workdir / f"{spec.name}.stderr.log"
        try:
            # stderr goes straight to a file, not a pipe: QEMU must outlive a crashed daemon
            # (systemd KillMode=process) without writing into a pipe nobody reads.
            with open(stderr_log, "ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
        except OSError as exc:
            raise QemuError(f"cannot start {spec.qemu_binary}: {exc}") from exc
        self = cls(qmp_socket=qmp_socket, spec=spec, workdir=workdir, proc=proc, pid=proc.pid,
                   origin=_Origin.LAUNCHED)
        self.host.use_stderr_log(stderr_log)
        try:
            await self._connect_launched(connect_timeout)
        except BaseException:
            await self._disconnect_quietly()
            await self.host.end_failed_launch()
            raise
        self.host.record_path = LaunchRecord.path_for(workdir, spec.name)
        LaunchRecord.for_process(proc.pid, qmp_socket, argv).save(self.host.record_path)
        return self

    @classmethod
    async def adopt(
        cls,
        name: str,
        workdir: str | os.PathLike[str],
        *,
        spec: VmSpec | None = None,
        incoming: str | None = None,
        paused: bool = False,
        timeout: float = 10.0,
    ) -> QemuProcess | None:
        """Reconnect to the QEMU ``name`` an earlier run of this daemon launched in ``workdir``,
        if it still runs; ``None`` when there is none (a stale record is removed).

        The process must be the recorded one (same boot, pid, start time, command line). With
        ``spec``, its command line must also be what :meth:`launch` would run now; a QEMU of an
        earlier run with another command line (the config changed while it ran) is refused
        with :class:`QemuError`, never killed: it may be the user's running VM. The adopted
        process counts as launched by us (:meth:`close` ends it).
        """
        workdir = Path(workdir)
        record_path = LaunchRecord.path_for(workdir, name)
        record = LaunchRecord.load(record_path)
        if record is None or not record.alive():
            if record is not None:
                LaunchRecord.clear(record_path)
            return None
        if spec is not None:
            want = build_argv(spec, workdir / f"{name}.qmp", incoming=incoming, paused=paused)
            if list(record.argv) != want:
                raise QemuError(
                    f"QEMU pid {record.pid}, started by an earlier run for {name!r}, still runs "
                    f"with another command line than the config gives now; stop it or restore "
                    f"the config (recorded: {' '.join(record.argv)})")
        self = cls(qmp_socket=Path(record.qmp_socket), spec=spec, workdir=workdir, proc=None,
                   pid=record.pid, origin=_Origin.LAUNCHED)
        self.host.use_stderr_log(workdir / f"{name}.stderr.log")
        self.host.record_path = record_path
        try:
            await wait_for(self._qmp.connect(str(self.qmp_socket)), timeout)
        except (QMPError, OSError, asyncio.TimeoutError) as exc:
            await self._disconnect_quietly()
            raise QemuError(f"cannot reconnect to QEMU pid {record.pid} at {self.qmp_socket}: "
                            f"{exc or type(exc).__name__}") from None
        return self

    @classmethod
    async def attach(
        cls,
        qmp_socket: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> QemuProcess:
        """Connect to an already running QEMU's QMP unix socket.

        The QEMU's pid is learned from the socket (``SO_PEERCRED``) so that :meth:`kill` and
        :meth:`wait_exit` work. ``workdir`` is where :meth:`load_device_state` writes streams given
        as bytes (default: the system temp directory). Raises :class:`QemuError` if nothing
        answers within ``timeout`` (QMP serves one client at a time: another client holding the
        socket looks like a hang).
        """
        path = Path(qmp_socket)
        pid = socket_peer_pid(path)
        self = cls(qmp_socket=path, spec=None, workdir=Path(workdir) if workdir else None,
                   proc=None, pid=pid, origin=_Origin.ATTACHED)
        try:
            await wait_for(self._qmp.connect(str(path)), timeout)
        except asyncio.TimeoutError:
            await self._disconnect_quietly()
            raise QemuError(
                f"QMP at {path} did not answer within {timeout:g}s (is another client connected?)"
            ) from None
        except (QMPError, OSError) as exc:
            await self._disconnect_quietly()
            raise QemuError(f"cannot connect to QMP at {path}: {exc}") from exc
        return self

    async def _connect_launched(self, timeout: float) -> None:
        proc = self.host.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            if proc.returncode is not None:
                await self.host.stderr_settled()
                raise QemuError(
                    f"QEMU for {self.name!r} exited with status {proc.returncode} before QMP "
                    f"answered{self.host.stderr_suffix()}"
                )
            if time.monotonic() >= deadline:
                raise QemuError(
                    f"QEMU for {self.name!r} did not answer on {self.qmp_socket} within "
                    f"{timeout:g}s (last error: {last_exc}){self.host.stderr_suffix()}"
                )
            if self.qmp_socket.exists():
                try:
                    remaining = max(0.1, deadline - time.monotonic())
                    await wait_for(self._qmp.connect(str(self.qmp_socket)), remaining)
                    return
                except (QMPError, OSError, asyncio.TimeoutError) as exc:
                    last_exc = exc
                    await self._disconnect_quietly()
            await asyncio.sleep(0.02)

    # -- identity / process ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else str(self.qmp_socket)

    @property
    def pid(self) -> int | None:
        return self.host.pid

    @property
    def returncode(self) -> int | None:
        """Exit status of a QEMU we launched, once it exited (``None`` otherwise)."""
        return self.host.returncode

    @property
    def launched(self) -> bool:
        return self._origin is _Origin.LAUNCHED

    def stderr_tail(self) -> str:
        """The last ~16 KiB QEMU wrote to stderr (launched QEMUs only)."""
        return self.host.stderr_tail()

    async def raise_if_exited(self, doing: str) -> None:
        """Raise :class:`QemuError` (with QEMU's stderr) if QEMU has exited while ``doing``."""
        if not self.host.alive():
            await self.host.stderr_settled()
            raise QemuError(f"QEMU {self.name} exited while {doing}{self.host.stderr_suffix()}")

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait until QEMU has exited; return its exit status (``None`` for an attached QEMU).

        Raises :class:`QemuError` on timeout.
        """
        return await self.host.wait_exit(timeout)

    async def kill(self) -> int | None:
        """SIGKILL QEMU (if still running) and wait for it; returns its exit status if known."""
        rc = await self.host.kill()
        await self._disconnect_quietly()
        self.host.forget_record()
        return rc

    async def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to exit (QMP ``quit``), wait for it; kill it if it does not exit in time."""
        if self.host.alive():
            try:
                await wait_for(self._qmp.execute("quit"), timeout)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass  # QEMU may hang up before or instead of answering
        await self._disconnect_quietly()
        if self.host.pid is None:
            return None
        try:
            rc = await self.wait_exit(timeout)
        except QemuError:
            return await self.kill()
        self.host.forget_record()
        return rc

    async def close(self) -> None:
        """Disconnect QMP; kill QEMU if we launched it and it still runs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.launched and self.host.alive():
                await self.kill()
        finally:
            await self._disconnect_quietly()
            self.host.forget_record()
            self._event_log.cancel_waiters()

    async def detach(self) -> None:
        """Disconnect QMP and leave QEMU running (its launch record stays, so the next run of
        the daemon adopts it). For a daemon that stops while its VM must go on."""
        if self._closed:
            return
        self._closed = True
        await self._disconnect_quietly()
        self._event_log.cancel_waiters()

    async def __aenter__(self) -> QemuProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- QMP --------------------------------------------------------------------------------

    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, *,
                      timeout: float | None = 30.0) -> Any:
        """Run one QMP command and return its result.

        Raises :class:`QmpCommandError` (a :class:`QemuError`) carrying QEMU's message when QEMU
        answers with an error, and :class:`QemuError` when the connection is lost or the answer
        does not come within ``timeout`` seconds.
        """
        try:
            return await wait_for(self._qmp.execute(cmd, dict(args) if args else None), timeout)
        except ExecuteError as exc:
            raise QmpCommandError(
                f"QEMU {self.name}: {cmd} failed: {exc}", command=cmd,
                error_class=exc.error_class, desc=str(exc),
            ) from None
        except asyncio.TimeoutError:
            raise QemuError(f"QEMU {self.name}: no answer to {cmd} within {timeout:g}s") from None
        except (QMPError, OSError, EOFError) as exc:
            await self.host.stderr_settled()
            state = "exited" if not self.host.alive() else "unreachable"
            raise QemuError(
                f"QEMU {self.name}: {cmd} failed, QEMU {state} "
                f"({type(exc).__name__}: {exc}){self.host.stderr_suffix()}"
            ) from exc

    async def status(self) -> str:
        """QEMU's run state from ``query-status``: ``running``, ``paused``, ``inmigrate``,
        ``postmigrate``, ``finish-migrate``, ``shutdown``, ``internal-error``, ..."""
        return (await self.execute("query-status"))["status"]

    async def stop(self, *, timeout: float = 10.0) -> QmpEvent | None:
        """Pause the guest's CPUs; return the ``STOP`` event (``None`` if it was not running)."""
        mark = self.event_mark()
        was = await self.status()
        await self.execute("stop")
        if was != "running":
            return None
        return await self.wait_event("STOP", timeout=timeout, after=mark)

    async def cont(self, *, timeout: float = 10.0, allow_postmigrate: bool = False) -> QmpEvent | None:
        """Resume the guest; return the ``RESUME`` event (``None`` if it was already running).

        Refuses (:class:`QemuError`) a shadow still waiting for its device state (``inmigrate``:
        QEMU would silently start it as soon as *any* migration arrives) and, unless
        ``allow_postmigrate`` (a deliberate rollback), a VM that handed itself over
        (``postmigrate``), so that two copies never run at once by accident.
        """
        was = await self.status()
        if was == "running":
            return None
        if was == "inmigrate":
            raise QemuError(f"QEMU {self.name} has not loaded its device state yet; not resuming")
        if was == "postmigrate" and not allow_postmigrate:
            raise QemuError(
                f"QEMU {self.name} handed its state over (postmigrate); not resuming it "
                "(pass allow_postmigrate=True to roll back)"
            )
        mark = self.event_mark()
        await self.execute("cont")
        return await self.wait_event("RESUME", timeout=timeout, after=mark)

    # -- events (kept by a QmpEventLog) --------------------------------------------------------

    def event_mark(self) -> int:
        """A marker for "events from now on": pass it as ``after`` to :meth:`wait_event`.

        Take the mark *before* issuing the command whose event you want, so a fast event is
        not missed.
        """
        return self._event_log.mark()

    @property
    def events(self) -> tuple[QmpEvent, ...]:
        """The most recent events received (up to 512), oldest first."""
        return self._event_log.recent

    def last_event(self, name: str) -> QmpEvent | None:
        """The most recent event called ``name``, if any was received."""
        return self._event_log.last(name)

    @property
    def last_stop(self) -> QmpEvent | None:
        """The latest ``STOP`` event (guest paused); its times start the switch's downtime."""
        return self._event_log.last("STOP")

    @property
    def last_resume(self) -> QmpEvent | None:
        """The latest ``RESUME`` event (guest running); its times end the switch's downtime."""
        return self._event_log.last("RESUME")

    async def wait_event(
        self,
        name: str,
        *,
        timeout: float,
        after: int | None = None,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent:
        """Wait for the QMP event ``name`` (optionally also satisfying ``match``).

        With ``after`` (from :meth:`event_mark`), an event already received after that mark is
        returned at once; without it only events arriving from now on count. Raises
        :class:`QemuError` on timeout, or if QEMU exits meanwhile.
        """
        return await self._event_log.wait(name, timeout=timeout, after=after, match=match,
                                          owner=self.name, check=self.raise_if_exited)

    # -- migration: see replicator.vmm.migration.QemuMigration for what each one does ------------

    async def set_migrate_capabilities(self, caps: Mapping[str, bool]) -> dict[str, bool]:
        return await self.migration.set_migrate_capabilities(caps)

    async def start_precopy(self, uri: str, *, pause_before_switchover: bool = False) -> None:
        await self.migration.start_precopy(uri, pause_before_switchover=pause_before_switchover)

    async def start_precopy_incoming(self, uri: str) -> None:
        await self.migration.start_precopy_incoming(uri)

    async def open_precopy_incoming(self, sock_path: Path) -> socket.socket:
        return await self.migration.open_precopy_incoming(sock_path)

    async def pass_fd(self, fd: int, prefix: str = "replicator") -> str:
        """Give QEMU a duplicate of ``fd`` under a fresh name (QMP ``getfd``), for a command
        that takes ``fd:<name>``. Serialized: QEMU names the descriptor it received last."""
        async with self._fd_lock:
            self._fd_serial += 1
            fdname = f"{prefix}{self._fd_serial}"
            self._qmp.send_fd_scm(fd)
            await self.execute("getfd", {"fdname": fdname})
        return fdname

    # -- how migration channels reach this QEMU (a libvirt domain passes descriptors) --------

    async def migration_channel(self, path: Path, *, write: bool) -> dict[str, Any]:
        """The channel for a device-state stream in the file ``path``: QEMU opens it."""
        return file_channel(path)

    async def listen_address(self, sock_path: Path) -> dict[str, Any]:
        """QMP's legacy SocketAddress for a server of QEMU's on ``sock_path``."""
        return {"type": "unix", "data": {"path": str(sock_path)}}

    async def listen_done(self, started: bool) -> None:
        """The server :meth:`listen_address` was for started (or not: one ran already)."""

    async def incoming_endpoint(self, sock_path: Path) -> tuple[str, socket.socket | None]:
        """QEMU listens on ``sock_path`` (the caller connects); no socket of ours yet."""
        return f"unix:{sock_path}", None

    async def query_migrate(self) -> dict[str, Any]:
        return await self.migration.query_migrate()

    async def shared_ram_backends(self) -> dict[str, str]:
        return await self.migration.shared_ram_backends()

    async def prepare_save(self) -> None:
        await self.migration.prepare_save()

    async def save_device_state(self, dest: str | os.PathLike[str], *,
                                timeout: float = 60.0) -> DeviceStateSave:
        return await self.migration.save_device_state(dest, timeout=timeout)

    async def prepare_load(self, *, ignore_shared: bool = True) -> None:
        await self.migration.prepare_load(ignore_shared=ignore_shared)

    async def load_device_state(self, src: str | os.PathLike[str] | bytes,
                                **options: Any) -> DeviceStateLoad:
        return await self.migration.load_device_state(src, **options)

    async def _wait_migration(self, timeout: float, what: str) -> dict[str, Any]:
        # Kept for replicator.sink.precopy; new code calls migration.wait_completed.
        return await self.migration.wait_completed(timeout, what)

    # -- internals ----------------------------------------------------------------------------

    async def _disconnect_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()

