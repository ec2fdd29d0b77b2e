"""Migration through QMP: the device-state hand-over of the switch and the held-open precopy.

:class:`QemuMigration` holds one :class:`~replicator.vmm.qemu.QemuProcess` and does its
migration work: capabilities, ``query-migrate``, the device-state save (source) and load
(shadow), and starting the precopy the ``qemu-precopy`` tracker relays. Every process has one as
``.migration``; :class:`~replicator.vmm.qemu.QemuProcess` offers the same methods by name.

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
  :meth:`QemuMigration.load_device_state` therefore reads the capabilities from the stream header
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
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replicator.errors import QemuError
from replicator.vmm.qmp_events import QmpCommandError
from replicator.vmm.stream_header import MigrationStreamError, StreamHeader, parse_stream_header

if TYPE_CHECKING:
    from replicator.vmm.qemu import QemuProcess

__all__ = [
    "DEVICE_STATE_CAPABILITIES",
    "PRECOPY_CAPABILITIES",
    "PRECOPY_INCOMING_CAPABILITIES",
    "DeviceStateSave",
    "DeviceStateLoad",
    "QemuMigration",
]

#: Capabilities :meth:`QemuMigration.save_device_state` and :meth:`QemuMigration.load_device_state`
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

#: Capabilities of the held-open precopy migration the ``qemu-precopy`` tracker relays (the
#: source's): RAM pages travel (no ``x-ignore-shared``), the return path lets the shadow
#: acknowledge, and ``switchover-ack`` lets replicator withhold the shadow's go-ahead until
#: "switch now", so precopy never completes on its own. Formats that move pages off the main
#: channel or change their encoding are off: the relay parses and edits the main channel.
#: ``events`` is off: held open, QEMU re-syncs its dirty bitmap hundreds of times a second and
#: would send a ``MIGRATION_PASS`` event for each (measured: ~1/5 of the busy source daemon's
#: CPU); nothing waits for this migration's events, its users poll ``query-migrate``.
#: (QEMU checks only ``x-ignore-shared`` and ``mapped-ram`` for agreement between the ends.)
PRECOPY_CAPABILITIES: Mapping[str, bool] = {
    **DEVICE_STATE_CAPABILITIES,
    "x-ignore-shared": False,
    "return-path": True,
    "switchover-ack": True,
    "events": False,
}

#: The shadow's side of the precopy: as :data:`PRECOPY_CAPABILITIES`, with ``events`` on. An
#: incoming migration sends only its few state changes (no passes), and the switch's wait for
#: the shadow's ``completed`` (:meth:`QemuMigration.wait_completed`) wakes on them instead of
#: its 50 ms poll: that wait is part of the downtime.
PRECOPY_INCOMING_CAPABILITIES: Mapping[str, bool] = {**PRECOPY_CAPABILITIES, "events": True}

# Migration states (query-migrate "status") that mean "still going".
_MIGRATION_ACTIVE = {
    "setup", "active", "device", "pre-switchover", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "wait-unplug", "colo", "cancelling",
}
_MIGRATION_FAILED = {"failed", "cancelled"}


# --- device-state results ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceStateSave:
    """Result of :meth:`QemuMigration.save_device_state`."""

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
    """Result of :meth:`QemuMigration.load_device_state`."""

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


# --- the operations ------------------------------------------------------------------------------

class QemuMigration:
    """The migration operations of one QEMU (``vm``); state: what was prepared for a switch."""

    def __init__(self, vm: QemuProcess):
        self.vm = vm
        self._incoming_files = 0
        self._save_prepared = False
        self._load_prepared: dict[str, bool] | None = None

    @property
    def name(self) -> str:
        return self.vm.name

    async def set_migrate_capabilities(self, caps: Mapping[str, bool]) -> dict[str, bool]:
        """Set migration capabilities, skipping those this QEMU does not know.

        Returns what was set. Raises :class:`QmpCommandError` if QEMU rejects the combination.
        """
        known = {c["capability"] for c in await self.vm.execute("query-migrate-capabilities")}
        wanted = {k: bool(v) for k, v in caps.items() if k in known}
        if "x-ignore-shared" in caps and "x-ignore-shared" not in known:
            raise QemuError(f"QEMU {self.name} does not support the x-ignore-shared capability")
        await self.vm.execute("migrate-set-capabilities", {
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
        current = (await self.vm.execute("query-migrate")).get("status")
        if current in _MIGRATION_ACTIVE:
            raise QemuError(f"QEMU {self.name} already has a migration in state {current!r}")
        await self.set_migrate_capabilities(
            {**PRECOPY_CAPABILITIES, "pause-before-switchover": pause_before_switchover})
        await self.vm.execute("migrate-set-parameters", {"max-bandwidth": 0})
        self._save_prepared = False
        await self.vm.execute("migrate", {"uri": uri})

    async def open_precopy_incoming(self, sock_path: Path) -> socket.socket:
        """Shadow: start the incoming precopy and return the connected socket the relay writes
        the stream into (QEMU listens on ``sock_path``, or, where QEMU cannot reach our files,
        reads a socket pair's end passed to it)."""
        state = await self.vm.status()
        if state != "inmigrate":            # before any descriptor is handed to QEMU
            raise QemuError(f"QEMU {self.name} is {state!r}, not waiting for a migration")
        uri, sock = await self.vm.incoming_endpoint(sock_path)
        try:
            await self.start_precopy_incoming(uri)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if sock is not None:
            return sock
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        for _ in range(200):
            try:
                await loop.sock_connect(sock, str(sock_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)
        sock.close()
        raise QemuError(f"QEMU {self.name} never opened its incoming migration socket")

    async def start_precopy_incoming(self, uri: str) -> None:
        """Shadow (started with ``incoming="defer"``): listen for the relayed precopy stream."""
        state = await self.vm.status()
        if state != "inmigrate":
            raise QemuError(f"QEMU {self.name} is {state!r}, not waiting for a migration")
        await self.set_migrate_capabilities(PRECOPY_INCOMING_CAPABILITIES)
        self._load_prepared = None
        await self.vm.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})

    async def query_migrate(self) -> dict[str, Any]:
        return await self.vm.execute("query-migrate")

    async def shared_ram_backends(self) -> dict[str, str]:
        """Memory backends that ``x-ignore-shared`` skips: ``{id: mem-path}`` of every
        ``share=on`` backend that has a file. Raises :class:`QemuError` if some backend is not
        like that (its RAM would travel in the device-state stream)."""
        result: dict[str, str] = {}
        unshared: list[str] = []
        for dev in await self.vm.execute("query-memdev"):
            dev_id = dev.get("id")
            mem_path = None
            if dev_id and dev.get("share"):
                with contextlib.suppress(QmpCommandError):
                    mem_path = await self.vm.execute(
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
        :meth:`QemuProcess.stop` takes ~10 ms of QMP round trips (``migrate-set-capabilities``
        alone costs ~4 ms) out of the switch's downtime. Whoever changes migration settings after
        this must call it again.
        """
        current = (await self.vm.execute("query-migrate")).get("status")
        if current in _MIGRATION_ACTIVE:
            raise QemuError(f"QEMU {self.name} already has a migration in state {current!r}")
        self._save_prepared = False
        await self.shared_ram_backends()
        await self.set_migrate_capabilities(DEVICE_STATE_CAPABILITIES)
        await self.vm.execute("migrate-set-parameters", {"max-bandwidth": 0})
        self._save_prepared = True

    async def save_device_state(
        self, dest: str | os.PathLike[str], *, timeout: float = 60.0,
    ) -> DeviceStateSave:
        """Source side of a switch: write the paused VM's device state to the file ``dest``.

        The caller must have paused the VM (:meth:`QemuProcess.stop`); this layer never resumes
        it, and on success QEMU leaves it in ``postmigrate``. Guest RAM is *not* in the stream
        (``x-ignore-shared``): it must already be identical in the shadow's RAM file.

        Runs :meth:`prepare_save` unless that was done already, then ``migrate`` to a ``file``
        channel, waits until QEMU reports ``completed`` and reads the stream back. Raises
        :class:`QemuError` if the VM is running, a migration is already active, guest RAM is not
        on a shared file, or the migration fails (the source then stays paused, in the state it
        was; the caller decides whether to :meth:`QemuProcess.cont` it).
        """
        path = Path(dest)
        state = await self.vm.status()
        if state in ("running", "inmigrate"):
            raise QemuError(f"QEMU {self.name} is {state}; stop() it before saving device state")
        if not self._save_prepared:
            await self.prepare_save()
        self._save_prepared = False  # one save per preparation
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        started = time.monotonic()
        channel = await self.vm.migration_channel(path, write=True)
        await self.vm.execute("migrate", {"channels": [channel]})
        info = await self.wait_completed(timeout, "saving device state")
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
        :meth:`QemuProcess.cont`.

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
        state = await self.vm.status()
        if state != "inmigrate":
            raise QemuError(
                f"QEMU {self.name} is {state!r}, not waiting for an incoming migration "
                "(start it with incoming='defer')"
            )
        prior = (await self.vm.execute("query-migrate")).get("status")
        if prior is not None and prior != "none":
            raise QemuError(
                f"QEMU {self.name} already had an incoming migration ({prior!r}); "
                "a shadow loads device state once: relaunch it"
            )
        ignore = "x-ignore-shared" in header.capabilities if ignore_shared is None else ignore_shared
        if self._load_prepared is None or self._load_prepared.get("x-ignore-shared") != ignore:
            await self.prepare_load(ignore_shared=ignore)
        started = time.monotonic()
        channel = await self.vm.migration_channel(path, write=False)
        await self.vm.execute("migrate-incoming", {
            "channels": [channel],
            "exit-on-error": False,
        })
        info = await self.wait_completed(timeout, "loading device state")
        # "completed" is reported as the run state is set; make sure we saw it leave inmigrate.
        deadline = time.monotonic() + timeout
        while (state := await self.vm.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU {self.name} still inmigrate after loading device state")
            await asyncio.sleep(0.005)
        completed = time.monotonic()
        return DeviceStateLoad(path=path, header=header, started=started, completed=completed,
                               status=state, info=info)

    async def wait_completed(self, timeout: float, what: str) -> dict[str, Any]:
        """Wait until ``query-migrate`` says completed (woken by MIGRATION events where the
        ``events`` capability is on, else every 50 ms); raise on failure with QEMU's error and
        stderr."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.vm.event_mark()
            info = await self.vm.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in _MIGRATION_FAILED:
                await self.vm.host.stderr_settled(grace=0.1)
                raise QemuError(
                    f"QEMU {self.name}: {what} failed ({status}): "
                    f"{info.get('error-desc', 'no reason given')}{self.vm.host.stderr_suffix()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuError(f"QEMU {self.name}: {what} not done within {timeout:g}s "
                                f"(migration status {status!r})")
            with contextlib.suppress(QemuError):
                # Any MIGRATION event after our query means: look again. Poll anyway every 50 ms.
                await self.vm.wait_event("MIGRATION", timeout=min(0.05, remaining), after=seen)
            await self.vm.raise_if_exited(what)

    def _incoming_path(self) -> Path:
        base = self.vm.workdir if self.vm.workdir is not None else Path(tempfile.gettempdir())
        self._incoming_files += 1
        stem = self.vm.spec.name if self.vm.spec else f"qemu-{self.vm.pid or os.getpid()}"
        return base / f"{stem}.incoming-{os.getpid()}-{self._incoming_files}.mig"


def file_channel(path: Path) -> dict[str, Any]:
    # The structured form takes the file name verbatim (the "file:" URI form treats ",offset="
    # specially).
    return {"channel-type": "main",
            "addr": {"transport": "file", "filename": str(path), "offset": 0}}
