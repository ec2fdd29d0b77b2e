"""A small asyncio layer over one QEMU process (``qemu-system-x86_64``), used by both sides.

The source side *attaches* to the production VM's QMP socket; the sink side *launches* the
paused shadow. Both then talk QMP through :class:`QemuProcess`, which adds three things on top of
``qemu.qmp``:

* errors: every failure is a :class:`~replicator.errors.QemuError` that carries QEMU's own message
  (and, for a process we launched, the tail of its stderr, where QEMU explains most failures);
* events: every QMP event is timestamped on arrival (``time.monotonic()`` and ``time.time()``,
  plus QEMU's own wall-clock stamp), so the switch can measure downtime from the source's ``STOP``
  to the shadow's ``RESUME``; :meth:`QemuProcess.wait_event` waits for one by name;
* the device-state hand-over used by the switch (:meth:`QemuProcess.save_device_state` on the
  source, :meth:`QemuProcess.load_device_state` on the shadow).

How the switch moves a VM
-------------------------
Guest RAM lives in a file (``memory-backend-file,share=on``) that replicator keeps in sync on the
other host. With the migration capability ``x-ignore-shared`` QEMU does not send the pages of such
a block at all, so a migration of the *paused* source is only the device state plus the small
non-shared blocks (BIOS, option ROMs, ACPI tables): about 290 KB on a q35 guest. The flow is::

    shadow = await QemuProcess.launch(spec, workdir, incoming="defer")   # "inmigrate", -S
    await shadow.prepare_load()                      # optional: capabilities set ahead of time
    await source.prepare_save()                      # optional: checks + capabilities, VM running
    await source.stop()                              # source: STOP event (downtime starts)
    ... replicator's final RAM sync ...
    saved = await source.save_device_state(path)     # source ends in "postmigrate"
    ... ship saved.data to the shadow's host ...
    await shadow.load_device_state(saved.data)       # shadow stays "paused" (-S)
    await shadow.cont()                              # shadow: RESUME event (downtime ends)
    downtime = shadow.last_resume.wall - source.last_stop.wall   # (clocks of two hosts)

QEMU cannot check that the shadow's RAM file really holds the source's RAM: ``x-ignore-shared``
tells it to trust the file. Loading device state over a stale RAM file "succeeds" and the guest
then runs on the wrong memory (measured: a counting guest silently went back in time); making the
RAM identical before the switch is replicator's job.

Facts measured with QEMU 10.0.2 (TCG, q35, 128 MiB guest)
---------------------------------------------------------
* Transport: ``file`` (``migrate``/``migrate-incoming`` with a ``channels`` argument, which takes
  the file name verbatim, no URI escaping). File transport has no return path, so
  ``return-path``/``switchover-ack``/postcopy must be off.
* The stream is ~291 KB (292,082 bytes for a 128 MiB q35 guest); QEMU reports 2 ms for the
  save; the whole stop-to-resume path with both ends prepared takes ~15-25 ms here, most of it
  QMP round trips (``migrate-set-capabilities`` alone takes ~4 ms, hence the ``prepare_*``).
* A ``-S`` VM without ``-incoming`` is in ``prelaunch``, a shadow in ``inmigrate``; after
  ``save_device_state`` the source is in ``postmigrate``.
* Both ends must agree on ``x-ignore-shared``; when they do not, QEMU fails the load with a
  generic ``load of migration failed: Invalid argument`` over QMP and the real reason
  (``Capability x-ignore-shared is off, but received capability is on``) only on stderr.
  :meth:`QemuProcess.load_device_state` therefore reads the capabilities from the stream header
  first (:func:`stream_capabilities`) and refuses a stream without ``x-ignore-shared``.
* A failed incoming migration cannot be retried in the same process ("The incoming migration has
  already been started"): the shadow has to be relaunched. We pass ``exit-on-error: false`` so it
  at least stays alive long enough to be inspected and quit cleanly.
* After a successful load the shadow is ``paused`` (it takes the source's run state, which was
  paused); ``cont`` then emits ``RESUME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import os
import signal
import socket
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from replicator.errors import QemuError
from replicator.vmm.disks import DiskSpec
from replicator.vmm.spec import (QEMU_BINARY, RAM_BACKEND_ID, InvalidVmSpec, VmSpec, build_argv)
from replicator.vmm.stream_header import (MigrationStreamError, StreamHeader, parse_stream_header,
                                          stream_capabilities)
from replicator.vmm.launch_record import LaunchRecord, process_start_ticks

__all__ = [
    "QEMU_BINARY",
    "RAM_BACKEND_ID",
    "DEVICE_STATE_CAPABILITIES",
    "InvalidVmSpec",
    "QmpCommandError",
    "MigrationStreamError",
    "DiskSpec",
    "VmSpec",
    "build_argv",
    "QmpEvent",
    "DeviceStateSave",
    "DeviceStateLoad",
    "StreamHeader",
    "parse_stream_header",
    "stream_capabilities",
    "QemuProcess",
]


#: Capabilities :meth:`QemuProcess.save_device_state` and :meth:`QemuProcess.load_device_state`
#: set on both ends (only those this QEMU knows are sent). ``x-ignore-shared`` skips the RAM that
#: replicator already synced; ``events`` makes QEMU emit MIGRATION events so we wake up without
#: polling. Everything else is forced off because it either needs a return path (which the file
#: transport lacks), moves data off the main stream, or would stall the migration.
DEVICE_STATE_CAPABILITIES: Mapping[str, bool] = {
    "x-ignore-shared": True,
    "events": True,
    "return-path": False,
    "switchover-ack": False,
    "pause-before-switchover": False,
    "postcopy-ram": False,
    "postcopy-preempt": False,
    "postcopy-blocktime": False,
    "multifd": False,
    "mapped-ram": False,
    "xbzrle": False,
    "background-snapshot": False,
    "x-colo": False,
    "zero-copy-send": False,
    "release-ram": False,
    "late-block-activate": False,
}

#: Capabilities of the held-open precopy migration the ``qemu-precopy`` tracker relays: RAM
#: pages travel (no ``x-ignore-shared``), the return path lets the shadow acknowledge, and
#: ``switchover-ack`` lets replicator withhold the shadow's go-ahead until "switch now", so
#: precopy never completes on its own. Formats that move pages off the main channel or change
#: their encoding are off: the relay parses and edits the main channel.
PRECOPY_CAPABILITIES: Mapping[str, bool] = {
    **DEVICE_STATE_CAPABILITIES,
    "x-ignore-shared": False,
    "return-path": True,
    "switchover-ack": True,
}

# Migration states (query-migrate "status") that mean "still going".
_MIGRATION_ACTIVE = {
    "setup", "active", "device", "pre-switchover", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "wait-unplug", "colo", "cancelling",
}
_MIGRATION_FAILED = {"failed", "cancelled"}

_STDERR_TAIL = 16 * 1024
_MiB = 1024 * 1024


# --- errors --------------------------------------------------------------------------------

class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error.

    ``command`` is the QMP command, ``error_class`` QEMU's error class (e.g. ``GenericError``) and
    ``desc`` QEMU's own message.
    """

    def __init__(self, message: str, *, command: str, error_class: str, desc: str):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(message)


# --- events ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QmpEvent:
    """One QMP event as received, with the times it arrived."""

    seq: int
    """Arrival order on this connection, from 1 (compare with :meth:`QemuProcess.event_mark`)."""
    name: str
    data: Mapping[str, Any]
    monotonic: float
    """``time.monotonic()`` when the event reached us."""
    wall: float
    """``time.time()`` when the event reached us."""
    qemu_wall: float | None
    """QEMU's own wall-clock stamp of the event (seconds since the epoch), when present."""


class _Recorder(EventListener):
    """Receives every event from the QMP client; records it instead of queueing it.

    Overriding ``accept`` (documented as overridable) lets us stamp events the moment the client
    dispatches them, without an unbounded queue or a consumer task.
    """

    def __init__(self, sink: Callable[[Mapping[str, Any]], None]):
        super().__init__()
        self._sink = sink

    def accept(self, event: Any) -> bool:
        self._sink(event)
        return False


# --- device-state results ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceStateSave:
    """Result of :meth:`QemuProcess.save_device_state`."""

    path: Path
    """File holding the stream."""
    data: bytes
    """The whole stream (what the shadow needs)."""
    header: StreamHeader
    started: float
    """``time.monotonic()`` just before ``migrate`` was issued."""
    completed: float
    """``time.monotonic()`` when QEMU reported ``completed``."""
    info: Mapping[str, Any]
    """QEMU's final ``query-migrate`` answer (``total-time``, ``downtime``, ``ram`` counters)."""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def duration(self) -> float:
        """Seconds from issuing ``migrate`` to seeing it completed."""
        return self.completed - self.started


@dataclasses.dataclass(frozen=True)
class DeviceStateLoad:
    """Result of :meth:`QemuProcess.load_device_state`."""

    path: Path
    header: StreamHeader
    started: float
    completed: float
    status: str
    """Run state after loading (``"paused"`` for a shadow started with ``-S``)."""
    info: Mapping[str, Any]

    @property
    def duration(self) -> float:
        return self.completed - self.started


# --- the process -------------------------------------------------------------------------------

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
        self._proc = proc
        self._pid = pid
        self._origin = origin
        self._qmp = QMPClient(spec.name if spec else "replicator")
        self._recorder = _Recorder(self._record)
        self._qmp.register_listener(self._recorder)
        self._seq = 0
        self._events: deque[QmpEvent] = deque(maxlen=512)
        self._last: dict[str, QmpEvent] = {}
        self._waiters: list[tuple[str, Callable[[QmpEvent], bool] | None, asyncio.Future[QmpEvent]]] = []
        self._stderr_log: Path | None = None
        self._stderr_start = 0
        self._record_path: Path | None = None
        self._incoming_files = 0
        self._save_prepared = False
        self._load_prepared: dict[str, bool] | None = None
        self._closed = False

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
        _clear_stale_socket(qmp_socket)
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
        self._use_stderr_log(stderr_log)
        try:
            await self._connect_launched(connect_timeout)
        except BaseException:
            await self._abort_launch()
            raise
        self._record_path = LaunchRecord.path_for(workdir, spec.name)
        LaunchRecord.for_process(proc.pid, qmp_socket, argv).save(self._record_path)
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
        self._use_stderr_log(workdir / f"{name}.stderr.log")
        self._record_path = record_path
        try:
            await asyncio.wait_for(self._qmp.connect(str(self.qmp_socket)), timeout)
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
        pid = _socket_peer_pid(path)
        self = cls(qmp_socket=path, spec=None, workdir=Path(workdir) if workdir else None,
                   proc=None, pid=pid, origin=_Origin.ATTACHED)
        try:
            await asyncio.wait_for(self._qmp.connect(str(path)), timeout)
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
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            if self._proc.returncode is not None:
                await self._stderr_settled()
                raise QemuError(
                    f"QEMU for {self.name!r} exited with status {self._proc.returncode} before QMP "
                    f"answered{self._stderr_suffix()}"
                )
            if time.monotonic() >= deadline:
                raise QemuError(
                    f"QEMU for {self.name!r} did not answer on {self.qmp_socket} within "
                    f"{timeout:g}s (last error: {last_exc}){self._stderr_suffix()}"
                )
            if self.qmp_socket.exists():
                try:
                    remaining = max(0.1, deadline - time.monotonic())
                    await asyncio.wait_for(self._qmp.connect(str(self.qmp_socket)), remaining)
                    return
                except (QMPError, OSError, asyncio.TimeoutError) as exc:
                    last_exc = exc
                    await self._disconnect_quietly()
            await asyncio.sleep(0.02)

    async def _abort_launch(self) -> None:
        await self._disconnect_quietly()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(Exception):
                await self._proc.wait()
        await self._stderr_settled()

    # -- identity / process ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else str(self.qmp_socket)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        """Exit status of a QEMU we launched, once it exited (``None`` otherwise)."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def launched(self) -> bool:
        return self._origin is _Origin.LAUNCHED

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

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        if self._pid is None:
            return True  # unknown; assume alive
        return _pid_alive(self._pid)

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait until QEMU has exited; return its exit status (``None`` for an attached QEMU).

        Raises :class:`QemuError` on timeout.
        """
        try:
            if self._proc is not None:
                rc = await asyncio.wait_for(self._proc.wait(), timeout)
                await self._stderr_settled()
                return rc
            if self._pid is None:
                raise QemuError(f"pid of {self.name} unknown; cannot wait for it to exit")
            deadline = None if timeout is None else time.monotonic() + timeout
            while _pid_alive(self._pid):
                if deadline is not None and time.monotonic() >= deadline:
                    raise asyncio.TimeoutError
                await asyncio.sleep(0.02)
            return None
        except asyncio.TimeoutError:
            raise QemuError(f"QEMU {self.name} did not exit within {timeout:g}s") from None

    async def kill(self) -> int | None:
        """SIGKILL QEMU (if still running) and wait for it; returns its exit status if known."""
        if self._pid is None:
            raise QemuError(f"pid of {self.name} unknown; cannot kill it")
        if self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        rc = await self.wait_exit(timeout=30)
        await self._disconnect_quietly()
        self._forget_record()
        return rc

    def _use_stderr_log(self, path: Path) -> None:
        """QEMU's stderr file: :meth:`stderr_tail` reads what it wrote from now on."""
        self._stderr_log = path
        self._stderr_start = path.stat().st_size if path.exists() else 0

    def _forget_record(self) -> None:
        """QEMU is gone: its launch record must not make a later run adopt a recycled pid."""
        if self._record_path is not None and not self._alive():
            LaunchRecord.clear(self._record_path)

    async def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to exit (QMP ``quit``), wait for it; kill it if it does not exit in time."""
        if self._alive():
            try:
                await asyncio.wait_for(self._qmp.execute("quit"), timeout)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass  # QEMU may hang up before or instead of answering
        await self._disconnect_quietly()
        if self._pid is None:
            return None
        try:
            rc = await self.wait_exit(timeout)
        except QemuError:
            return await self.kill()
        self._forget_record()
        return rc

    async def close(self) -> None:
        """Disconnect QMP; kill QEMU if we launched it and it still runs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.launched and self._alive():
                await self.kill()
        finally:
            await self._disconnect_quietly()
            self._forget_record()
            for _, _, fut in self._waiters:
                if not fut.done():
                    fut.cancel()

    async def detach(self) -> None:
        """Disconnect QMP and leave QEMU running (its launch record stays, so the next run of
        the daemon adopts it). For a daemon that stops while its VM must go on."""
        if self._closed:
            return
        self._closed = True
        await self._disconnect_quietly()
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

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
            return await asyncio.wait_for(self._qmp.execute(cmd, dict(args) if args else None), timeout)
        except ExecuteError as exc:
            raise QmpCommandError(
                f"QEMU {self.name}: {cmd} failed: {exc}", command=cmd,
                error_class=exc.error_class, desc=str(exc),
            ) from None
        except asyncio.TimeoutError:
            raise QemuError(f"QEMU {self.name}: no answer to {cmd} within {timeout:g}s") from None
        except (QMPError, OSError, EOFError) as exc:
            await self._stderr_settled()
            state = "exited" if not self._alive() else "unreachable"
            raise QemuError(
                f"QEMU {self.name}: {cmd} failed, QEMU {state} "
                f"({type(exc).__name__}: {exc}){self._stderr_suffix()}"
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

    # -- events -------------------------------------------------------------------------------

    def _record(self, msg: Mapping[str, Any]) -> None:
        now_m, now_w = time.monotonic(), time.time()
        self._seq += 1
        stamp = msg.get("timestamp") or {}
        qemu_wall = None
        if isinstance(stamp, Mapping) and "seconds" in stamp:
            qemu_wall = stamp["seconds"] + stamp.get("microseconds", 0) / 1e6
        ev = QmpEvent(seq=self._seq, name=str(msg.get("event")), data=dict(msg.get("data") or {}),
                      monotonic=now_m, wall=now_w, qemu_wall=qemu_wall)
        self._events.append(ev)
        self._last[ev.name] = ev
        # The client's default listener would keep every event forever; we do the keeping.
        self._qmp.events.clear()
        for waiter in list(self._waiters):
            name, match, fut = waiter
            if fut.done():
                self._waiters.remove(waiter)
            elif name == ev.name and (match is None or match(ev)):
                fut.set_result(ev)
                self._waiters.remove(waiter)

    def event_mark(self) -> int:
        """A marker for "events from now on": pass it as ``after`` to :meth:`wait_event`.

        Take the mark *before* issuing the command whose event you want, so a fast event is
        not missed.
        """
        return self._seq

    @property
    def events(self) -> tuple[QmpEvent, ...]:
        """The most recent events received (up to 512), oldest first."""
        return tuple(self._events)

    def last_event(self, name: str) -> QmpEvent | None:
        """The most recent event called ``name``, if any was received."""
        return self._last.get(name)

    @property
    def last_stop(self) -> QmpEvent | None:
        """The latest ``STOP`` event (guest paused); its times start the switch's downtime."""
        return self._last.get("STOP")

    @property
    def last_resume(self) -> QmpEvent | None:
        """The latest ``RESUME`` event (guest running); its times end the switch's downtime."""
        return self._last.get("RESUME")

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
        if after is not None:
            for ev in self._events:
                if ev.seq > after and ev.name == name and (match is None or match(ev)):
                    return ev
        fut: asyncio.Future[QmpEvent] = asyncio.get_running_loop().create_future()
        entry = (name, match, fut)
        self._waiters.append(entry)
        try:
            deadline = time.monotonic() + timeout
            while True:
                step = min(0.25, deadline - time.monotonic())
                if step <= 0:
                    raise QemuError(f"QEMU {self.name}: no {name} event within {timeout:g}s")
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), step)
                except asyncio.TimeoutError:
                    if not self._alive():
                        await self._stderr_settled()
                        raise QemuError(
                            f"QEMU {self.name} exited while waiting for {name}{self._stderr_suffix()}"
                        ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if not fut.done():
                fut.cancel()

    # -- device state -------------------------------------------------------------------------

    async def set_migrate_capabilities(self, caps: Mapping[str, bool]) -> dict[str, bool]:
        """Set migration capabilities, skipping those this QEMU does not know.

        Returns what was set. Raises :class:`QmpCommandError` if QEMU rejects the combination.
        """
        known = {c["capability"] for c in await self.execute("query-migrate-capabilities")}
        wanted = {k: bool(v) for k, v in caps.items() if k in known}
        if "x-ignore-shared" in caps and "x-ignore-shared" not in known:
            raise QemuError(f"QEMU {self.name} does not support the x-ignore-shared capability")
        await self.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k, "state": v} for k, v in wanted.items()],
        })
        return wanted

    async def start_precopy(self, uri: str, *, pause_before_switchover: bool = False) -> None:
        """Source: start the held-open precopy migration to ``uri`` (``unix:/path``).

        The replicator relays the stream; QEMU completes only when the shadow's SWITCHOVER_ACK is
        released (or the VM is stopped). ``max-bandwidth`` is lifted: the relay paces QEMU by
        how fast it drains the socket. ``pause_before_switchover``: once the guest is stopped
        QEMU waits in ``pre-switchover`` (disks still active) for ``migrate-continue``.
        """
        current = (await self.execute("query-migrate")).get("status")
        if current in _MIGRATION_ACTIVE:
            raise QemuError(f"QEMU {self.name} already has a migration in state {current!r}")
        await self.set_migrate_capabilities(
            {**PRECOPY_CAPABILITIES, "pause-before-switchover": pause_before_switchover})
        await self.execute("migrate-set-parameters", {"max-bandwidth": 0})
        self._save_prepared = False
        await self.execute("migrate", {"uri": uri})

    async def start_precopy_incoming(self, uri: str) -> None:
        """Shadow (started with ``incoming="defer"``): listen for the relayed precopy stream."""
        state = await self.status()
        if state != "inmigrate":
            raise QemuError(f"QEMU {self.name} is {state!r}, not waiting for a migration")
        await self.set_migrate_capabilities(PRECOPY_CAPABILITIES)
        self._load_prepared = None
        await self.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})

    async def query_migrate(self) -> dict[str, Any]:
        return await self.execute("query-migrate")

    async def shared_ram_backends(self) -> dict[str, str]:
        """Memory backends that ``x-ignore-shared`` skips: ``{id: mem-path}`` of every
        ``share=on`` backend that has a file. Raises :class:`QemuError` if some backend is not
        like that (its RAM would travel in the device-state stream)."""
        result: dict[str, str] = {}
        unshared: list[str] = []
        for dev in await self.execute("query-memdev"):
            dev_id = dev.get("id")
            mem_path = None
            if dev_id and dev.get("share"):
                with contextlib.suppress(QmpCommandError):
                    mem_path = await self.execute(
                        "qom-get", {"path": f"/objects/{dev_id}", "property": "mem-path"})
            if mem_path:
                result[dev_id] = mem_path
            else:
                unshared.append(str(dev_id))
        if unshared or not result:
            raise QemuError(
                f"QEMU {self.name}: guest RAM must be on memory-backend-file with share=on for "
                f"x-ignore-shared; not so: {', '.join(unshared) or 'no memory backend at all'}"
            )
        return result

    async def prepare_save(self) -> None:
        """Get the source ready for :meth:`save_device_state`; may run while the guest runs.

        Checks that no migration is active and that guest RAM is on a shared file (see
        :meth:`shared_ram_backends`), sets :data:`DEVICE_STATE_CAPABILITIES` and
        ``max-bandwidth`` 0 (unlimited: a throttle left over from replication must not slow the
        switch). :meth:`save_device_state` does this itself when it was not done; doing it before
        :meth:`stop` takes ~10 ms of QMP round trips (``migrate-set-capabilities`` alone costs
        ~4 ms) out of the switch's downtime. Whoever changes migration settings after this must
        call it again.
        """
        current = (await self.execute("query-migrate")).get("status")
        if current in _MIGRATION_ACTIVE:
            raise QemuError(f"QEMU {self.name} already has a migration in state {current!r}")
        self._save_prepared = False
        await self.shared_ram_backends()
        await self.set_migrate_capabilities(DEVICE_STATE_CAPABILITIES)
        await self.execute("migrate-set-parameters", {"max-bandwidth": 0})
        self._save_prepared = True

    async def save_device_state(
        self, dest: str | os.PathLike[str], *, timeout: float = 60.0,
    ) -> DeviceStateSave:
        """Source side of a switch: write the paused VM's device state to the file ``dest``.

        The caller must have paused the VM (:meth:`stop`); this layer never resumes it, and on
        success QEMU leaves it in ``postmigrate``. Guest RAM is *not* in the stream
        (``x-ignore-shared``): it must already be identical in the shadow's RAM file.

        Runs :meth:`prepare_save` unless that was done already, then ``migrate`` to a ``file``
        channel, waits until QEMU reports ``completed`` and reads the stream back. Raises
        :class:`QemuError` if the VM is running, a migration is already active, guest RAM is not
        on a shared file, or the migration fails (the source then stays paused, in the state it
        was; the caller decides whether to :meth:`cont` it).
        """
        path = Path(dest)
        state = await self.status()
        if state in ("running", "inmigrate"):
            raise QemuError(f"QEMU {self.name} is {state}; stop() it before saving device state")
        if not self._save_prepared:
            await self.prepare_save()
        self._save_prepared = False  # one save per preparation
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        started = time.monotonic()
        await self.execute("migrate", {"channels": [_file_channel(path)]})
        info = await self._wait_migration(timeout, "saving device state")
        completed = time.monotonic()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise QemuError(f"cannot read device state written to {path}: {exc}") from exc
        header = parse_stream_header(data)
        if "x-ignore-shared" not in header.capabilities:
            raise MigrationStreamError(
                f"device-state stream {path} does not list x-ignore-shared; guest RAM was sent")
        return DeviceStateSave(path=path, data=data, header=header, started=started,
                               completed=completed, info=info)

    async def prepare_load(self, *, ignore_shared: bool = True) -> None:
        """Set the shadow's migration capabilities ahead of :meth:`load_device_state`.

        Call it right after launching the shadow: it takes ~5 ms of QMP round trips out of the
        switch's downtime. :meth:`load_device_state` calls it itself if it was not done, or was
        done with an ``x-ignore-shared`` setting that does not match the stream.
        """
        caps = dict(DEVICE_STATE_CAPABILITIES)
        caps["x-ignore-shared"] = ignore_shared
        self._load_prepared = None
        self._load_prepared = await self.set_migrate_capabilities(caps)

    async def load_device_state(
        self,
        src: str | os.PathLike[str] | bytes,
        *,
        timeout: float = 60.0,
        require_capabilities: frozenset[str] | set[str] = frozenset({"x-ignore-shared"}),
        ignore_shared: bool | None = None,
    ) -> DeviceStateLoad:
        """Shadow side of a switch: load device state into a QEMU started with ``-incoming defer``.

        ``src`` is a stream file, or the stream's bytes (then written to a file in ``workdir``).
        The stream header is checked first: a stream lacking any of ``require_capabilities`` is
        refused with :class:`MigrationStreamError` *before* QEMU sees it (QEMU would fail the load
        and then need a restart). The shadow's capabilities are set to match the stream
        (``ignore_shared`` forces ``x-ignore-shared`` instead; only tests want that), then
        ``migrate-incoming`` (``exit-on-error: false``) reads the file. Returns once QEMU reports
        ``completed`` and has left ``inmigrate``; the VM stays paused, the caller calls
        :meth:`cont`.

        QEMU cannot tell whether the shadow's RAM file matches the source's: a stale or foreign
        file loads "successfully" and the guest runs on whatever the file holds. (An all-zero
        file happens to fail, in the ``kvm-tpr-opt`` device, which re-reads its option ROM from
        guest RAM; that is an accident, not a check.)

        A failed load cannot be retried in the same QEMU: quit it and launch a new shadow.
        """
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            path = self._incoming_path()
            path.write_bytes(data)
            head = data
        else:
            path = Path(src)
            try:
                with path.open("rb") as f:
                    head = f.read(64 * 1024)
            except OSError as exc:
                raise QemuError(f"cannot read device state {path}: {exc}") from exc
        header = parse_stream_header(head)
        missing = set(require_capabilities) - header.capabilities
        if missing:
            raise MigrationStreamError(
                f"device-state stream {path} lacks capabilit{'y' if len(missing) == 1 else 'ies'} "
                f"{', '.join(sorted(missing))} (source migrated without x-ignore-shared?); "
                "refusing to load it"
            )
        for cap in ("mapped-ram", "multifd"):
            if cap in header.capabilities:
                raise MigrationStreamError(f"device-state stream {path} uses {cap}; not supported")
        state = await self.status()
        if state != "inmigrate":
            raise QemuError(
                f"QEMU {self.name} is {state!r}, not waiting for an incoming migration "
                "(start it with incoming='defer')"
            )
        prior = (await self.execute("query-migrate")).get("status")
        if prior is not None and prior != "none":
            raise QemuError(
                f"QEMU {self.name} already had an incoming migration ({prior!r}); "
                "a shadow loads device state once: relaunch it"
            )
        ignore = "x-ignore-shared" in header.capabilities if ignore_shared is None else ignore_shared
        if self._load_prepared is None or self._load_prepared.get("x-ignore-shared") != ignore:
            await self.prepare_load(ignore_shared=ignore)
        started = time.monotonic()
        await self.execute("migrate-incoming", {
            "channels": [_file_channel(path)],
            "exit-on-error": False,
        })
        info = await self._wait_migration(timeout, "loading device state")
        # "completed" is reported as the run state is set; make sure we saw it leave inmigrate.
        deadline = time.monotonic() + timeout
        while (state := await self.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU {self.name} still inmigrate after loading device state")
            await asyncio.sleep(0.005)
        completed = time.monotonic()
        return DeviceStateLoad(path=path, header=header, started=started, completed=completed,
                               status=state, info=info)

    async def _wait_migration(self, timeout: float, what: str) -> dict[str, Any]:
        """Wait until ``query-migrate`` says completed (woken by MIGRATION events); raise on
        failure with QEMU's error and stderr."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.event_mark()
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in _MIGRATION_FAILED:
                await self._stderr_settled(grace=0.1)
                raise QemuError(
                    f"QEMU {self.name}: {what} failed ({status}): "
                    f"{info.get('error-desc', 'no reason given')}{self._stderr_suffix()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuError(f"QEMU {self.name}: {what} not done within {timeout:g}s "
                                f"(migration status {status!r})")
            with contextlib.suppress(QemuError):
                # Any MIGRATION event after our query means: look again. Poll anyway every 50 ms.
                await self.wait_event("MIGRATION", timeout=min(0.05, remaining), after=seen)
            if not self._alive():
                await self._stderr_settled()
                raise QemuError(f"QEMU {self.name} exited while {what}{self._stderr_suffix()}")

    def _incoming_path(self) -> Path:
        base = self.workdir if self.workdir is not None else Path(tempfile.gettempdir())
        self._incoming_files += 1
        stem = self.spec.name if self.spec else f"qemu-{self._pid or os.getpid()}"
        return base / f"{stem}.incoming-{os.getpid()}-{self._incoming_files}.mig"

    # -- internals ----------------------------------------------------------------------------

    async def _stderr_settled(self, grace: float = 0.5) -> None:
        """Give an exiting QEMU a moment to finish writing its reason to the stderr file."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), min(grace, 0.05))
        else:
            await asyncio.sleep(0)

    def _stderr_suffix(self) -> str:
        tail = self.stderr_tail().strip()
        if not tail:
            return ""
        lines = tail.splitlines()[-20:]
        return "; QEMU stderr: " + " | ".join(lines)

    async def _disconnect_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()


def _file_channel(path: Path) -> dict[str, Any]:
    # The structured form takes the file name verbatim (the "file:" URI form treats ",offset="
    # specially).
    return {"channel-type": "main",
            "addr": {"transport": "file", "filename": str(path), "offset": 0}}


def _clear_stale_socket(path: Path) -> None:
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


def _socket_peer_pid(path: Path) -> int | None:
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


def _pid_alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None      # None: gone, or a zombie
