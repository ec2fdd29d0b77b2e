"""QEMU domains that libvirt manages, reached through libvirt (``libvirt-python``).

libvirt owns such a VM's QMP socket (QMP takes one client), so everything replicator says to
QEMU goes through libvirt: lifecycle by libvirt's own API (start paused, resume, destroy, so
that ``virsh``/virt-manager see the truth), and the QMP commands libvirt has no API for (the
held-open precopy, dirty bitmaps, NBD exports, ``x-ignore-shared`` device state) through its
QMP passthrough, ``virDomainQemuMonitorCommand``. libvirt marks a domain that got such commands
"tainted: custom monitor control commands issued"; that is expected and documented.

* :class:`LibvirtHost`: one connection. libvirt's calls block, so they run in a small thread
  pool; its events (QMP events, lifecycle) arrive on libvirt's default event loop, run by one
  thread per process, and are handed to asyncio with ``call_soon_threadsafe``.
* :class:`LibvirtQemu`: the QEMU of one domain, offering what :class:`~.qemu.QemuProcess`
  offers (``execute``, events, ``stop``/``cont``, the migration operations). QEMU cannot open
  replicator's files (it runs as libvirt's user, confined), so migration channels are file
  descriptors passed with the command (``virDomainQemuMonitorCommandWithFiles`` + ``getfd``).

Why libvirt-python from PyPI and not Debian's ``python3-libvirt``: the daemon runs in its own
venv on whatever Python the host has; the PyPI sdist builds against the host's libvirt
(``libvirt-dev``) and is pinned in ``pyproject.toml`` like every other dependency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from replicator.aio import wait_for
from replicator.errors import DomainError, QemuError
from replicator.vmm.qemu import QemuProcess, _Origin
from replicator.vmm.qmp_events import QmpCommandError

log = logging.getLogger(__name__)

__all__ = ["LibvirtHost", "LibvirtQemu", "LibvirtError", "libvirt_modules", "keep_file"]

#: Where libvirt's QEMU driver keeps pid files and per-domain logs (system instance).
PID_DIR = Path("/run/libvirt/qemu")
LOG_DIR = Path("/var/log/libvirt/qemu")


class LibvirtError(DomainError):
    """libvirt refused or failed a call (its own message included)."""


def libvirt_modules() -> tuple[Any, Any]:
    """``(libvirt, libvirt_qemu)``, imported on first use: only libvirt domains need them."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as exc:
        raise DomainError(
            "driver = \"libvirt\" needs the libvirt Python binding: install the package with "
            "its libvirt extra (pip install 'replicator[libvirt]', which builds libvirt-python "
            f"against the host's libvirt-dev) ({exc})") from None
    return libvirt, libvirt_qemu


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt delivers events (and keepalives) only while an event loop runs; registered once
    per process, before the first connection, and run by a daemon thread."""
    global _event_loop_started
    libvirt, _ = libvirt_modules()
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; ours carry them in exceptions.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.error("libvirt's event loop failed; events stop")
                    return

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


_hosts: dict[str, "LibvirtHost"] = {}


class LibvirtHost:
    """One connection to libvirt (``uri``), its blocking calls run off the asyncio loop."""

    def __init__(self, uri: str, conn: Any, pool: concurrent.futures.ThreadPoolExecutor):
        self.uri = uri
        self.conn = conn
        self._pool = pool
        #: The QEMUs attached through this connection (marked gone if it closes).
        self.attached: weakref.WeakSet[LibvirtQemu] = weakref.WeakSet()
        self.libvirt, self.libvirt_qemu = libvirt_modules()

    @classmethod
    async def open(cls, uri: str) -> LibvirtHost:
        """The process's connection to ``uri`` (one per URI, shared by both halves of a node:
        the shadow's QEMU becomes the source's domain after a switch)."""
        if uri in _hosts:
            return _hosts[uri]
        libvirt, _ = libvirt_modules()
        _start_event_loop()
        pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="libvirt")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(pool, libvirt.open, uri)
        except libvirt.libvirtError as exc:
            pool.shutdown(wait=False)
            raise LibvirtError(f"cannot connect to libvirt at {uri}: {exc} (is libvirtd "
                               "running, and may this user use it?)") from None
        host = _hosts[uri] = cls(uri, conn, pool)

        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            # libvirtd restarted (a package upgrade) or the keepalive gave up: this connection
            # is dead. The next open() connects anew; every QEMU attached through this one is
            # treated as gone, so its users attach again (the domains themselves run on).
            if _hosts.get(uri) is host:
                del _hosts[uri]
            for qemu in list(host.attached):
                qemu._gone = True
            log.warning("the connection to libvirt (%s) closed (reason %d); reconnecting",
                        uri, reason)

        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(on_close, None)
        return host

    async def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the blocking libvirt call ``fn(*args)`` in the pool; its libvirt error becomes a
        :class:`LibvirtError` saying ``what`` failed."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except self.libvirt.libvirtError as exc:
            raise LibvirtError(f"libvirt ({self.uri}): {what} failed: {exc}") from None

    async def lookup(self, name: str) -> Any | None:
        """The domain ``name``, or ``None`` when libvirt does not know it."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self.conn.lookupByName, name)
        except self.libvirt.libvirtError as exc:
            if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtError(f"libvirt ({self.uri}): looking up {name!r} failed: {exc}") from None

    async def close(self) -> None:
        """Shared and cheap to keep: it stays open for the life of the process."""


def keep_file(src: Path, dest: Path) -> None:
    """Make ``dest`` another name of ``src``'s data (a hard link, replacing ``dest``), so that
    the data outlives libvirt removing ``src`` when the domain stops."""
    tmp = dest.with_name(dest.name + ".link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError as exc:
        raise DomainError(
            f"cannot keep the VM's RAM file {src} as {dest}: {exc.strerror} (the state dir and "
            "libvirt's memory_backing_dir must be on one file system)") from None
    os.replace(tmp, dest)


def domain_pid(name: str) -> int | None:
    """The QEMU pid libvirt recorded for a running domain (root can read it), else None."""
    try:
        return int((PID_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class LibvirtQemu(QemuProcess):
    """The QEMU of the running libvirt domain ``dom``, driven through ``host``.

    Create with :meth:`attach`. What a :class:`QemuProcess` offers works the same; the QEMU is
    never ended by :meth:`close` (libvirt owns it: :meth:`destroy` asks libvirt to).
    """

    _fd_names = itertools.count(1)

    def __init__(self, host: LibvirtHost, dom: Any, name: str, workdir: Path | None):
        self.domain_name = name
        super().__init__(qmp_socket=Path(f"libvirt:{name}"), spec=None, workdir=workdir,
                         proc=None, pid=domain_pid(name), origin=_Origin.ATTACHED)
        self.lv = host
        self.dom = dom
        self.host.use_stderr_log(LOG_DIR / f"{name}.log")
        self._callbacks: list[tuple[str, int]] = []
        self._gone = False
        #: Commands still running in libvirt's thread whose caller stopped waiting (cancelled,
        #: timed out): the next command waits for them, so it cannot overtake one.
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._pending_listen: tuple[Path, Path, str] | None = None

    @classmethod
    async def attach(cls, host: LibvirtHost, name: str,  # type: ignore[override]
                     workdir: Path | None = None) -> LibvirtQemu:
        """The running (or paused) domain ``name``; raises :class:`DomainError` if libvirt does
        not know it or it is shut off."""
        dom = await host.lookup(name)
        if dom is None:
            raise DomainError(f"libvirt ({host.uri}) has no domain {name!r}")
        if not await host.call("isActive", dom.isActive):
            raise DomainError(f"libvirt domain {name!r} is shut off")
        run_id = await host.call("reading the domain's id", dom.ID)
        self = cls(host, dom, name, workdir)
        host.attached.add(self)
        await self._register_events()
        # A stop (and a new start) before the events were registered would go unnoticed:
        # libvirt numbers each run of a domain, so the run must still be the one we saw.
        if await host.call("reading the domain's id", dom.ID) != run_id:
            await self.close()
            raise DomainError(f"libvirt domain {name!r} stopped while replicator attached to "
                              "it; trying again")
        return self

    @property
    def name(self) -> str:
        return self.domain_name

    @property
    def returncode(self) -> int | None:
        """0 once libvirt said the domain stopped (its exit status is libvirt's to know)."""
        return 0 if self._gone else None

    # -- events ------------------------------------------------------------------------------

    async def _register_events(self) -> None:
        loop = asyncio.get_running_loop()
        lv, lq = self.lv.libvirt, self.lv.libvirt_qemu
        record = self._event_log._record

        def on_qmp(_conn: Any, _dom: Any, event: str, seconds: int, micros: int,
                   details: str | None, _opaque: Any) -> None:
            data = {}
            if details:
                with contextlib.suppress(ValueError):
                    data = json.loads(details)
            msg = {"event": event, "data": data,
                   "timestamp": {"seconds": seconds, "microseconds": micros}}
            with contextlib.suppress(RuntimeError):       # the loop closed meanwhile
                loop.call_soon_threadsafe(record, msg)

        def on_lifecycle(_conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
            if event == lv.VIR_DOMAIN_EVENT_STOPPED:
                self._gone = True
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(record, {"event": "LIBVIRT_LIFECYCLE",
                                                   "data": {"event": event, "detail": detail}})

        qid = await self.lv.call("registering for QMP events", lq.qemuMonitorEventRegister,
                                 self.lv.conn, self.dom, None, on_qmp, None, 0)
        self._callbacks.append(("qmp", qid))
        cid = await self.lv.call("registering for lifecycle events",
                                 self.lv.conn.domainEventRegisterAny, self.dom,
                                 lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
        self._callbacks.append(("lifecycle", cid))

    async def _deregister_events(self) -> None:
        lq = self.lv.libvirt_qemu
        for kind, cb in self._callbacks:
            fn = (lq.qemuMonitorEventDeregister if kind == "qmp"
                  else self.lv.conn.domainEventDeregisterAny)
            with contextlib.suppress(Exception):
                if kind == "qmp":
                    await self.lv.call("deregistering events", fn, self.lv.conn, cb)
                else:
                    await self.lv.call("deregistering events", fn, cb)
        self._callbacks.clear()

    # -- QMP through libvirt ---------------------------------------------------------------------

    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, *,
                      timeout: float | None = 30.0, files: list[int] | None = None) -> Any:
        """One QMP command through libvirt's passthrough (``files``: descriptors passed with it,
        for ``getfd``). Raises :class:`QmpCommandError` with QEMU's message when QEMU refuses,
        :class:`QemuError` when libvirt cannot deliver it (the domain is gone, say)."""
        if self._gone:
            raise QemuError(f"libvirt domain {self.name} stopped (shut down or destroyed); "
                            f"not sending {cmd} to whatever runs under its name now")
        lq = self.lv.libvirt_qemu
        text = json.dumps({"execute": cmd, **({"arguments": dict(args)} if args else {})})
        if files:
            call: Callable[[], Any] = lambda: lq.qemuMonitorCommandWithFiles(
                self.dom, text, files, 0)[0]
        else:
            call = lambda: lq.qemuMonitorCommand(self.dom, text, 0)
        loop = asyncio.get_running_loop()
        if self._abandoned:
            # Over our own QMP socket a cancelled command still reaches QEMU before the next
            # one; here each runs in a pool thread, and a cleanup's query-block-exports once
            # ran before the block-export-add it was cleaning up after (CI, a switch cut
            # short), leaving a bitmap busy for good.
            await asyncio.wait(set(self._abandoned), timeout=timeout)
        fut = loop.run_in_executor(self.lv._pool, call)
        try:
            try:
                reply = await wait_for(asyncio.shield(fut), timeout)
            finally:
                if not fut.done():
                    self._abandoned.add(fut)
                    fut.add_done_callback(self._abandoned.discard)
                    # Retrieve its outcome: an abandoned failure is no "never retrieved" error.
                    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        except asyncio.TimeoutError:
            raise QemuError(f"QEMU {self.name}: no answer to {cmd} within {timeout:g}s "
                            "(through libvirt)") from None
        except self.lv.libvirt.libvirtError as exc:
            raise QemuError(f"QEMU {self.name}: {cmd} failed: libvirt: {exc}") from None
        msg = json.loads(reply)
        if "error" in msg:
            err = msg["error"]
            raise QmpCommandError(f"QEMU {self.name}: {cmd} failed: {err.get('desc')}",
                                  command=cmd, error_class=str(err.get("class")),
                                  desc=str(err.get("desc")))
        return msg.get("return")

    async def pass_fd(self, fd: int, prefix: str = "replicator") -> str:
        """Give QEMU a duplicate of ``fd`` under a fresh name (QMP ``getfd``)."""
        fdname = f"{prefix}{next(self._fd_names)}"
        await self.execute("getfd", {"fdname": fdname}, files=[fd])
        return fdname

    # -- what QemuMigration asks of its VM ---------------------------------------------------

    async def migration_channel(self, path: Path, *, write: bool) -> dict[str, Any]:
        """QEMU cannot open our files: open ``path`` here and pass the descriptor."""
        flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            name = await self.pass_fd(fd, "devstate")
        finally:
            os.close(fd)
        return {"channel-type": "main", "addr": {"transport": "socket", "type": "fd",
                                                 "str": name}}

    async def listen_address(self, sock_path: Path) -> dict[str, Any]:
        """Listen here (in our 0700 directory) and pass QEMU the socket. It is bound beside
        ``sock_path`` and takes that name only once QEMU's server took it (:meth:`listen_done`):
        a server an earlier run started may still listen there, and is then reused."""
        tmp = sock_path.with_name(sock_path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            lsock.listen(8)
            name = await self.pass_fd(lsock.fileno(), "listen")
        finally:
            lsock.close()
        self._pending_listen = (tmp, sock_path, name)
        return {"type": "fd", "data": {"str": name}}

    async def listen_done(self, started: bool) -> None:
        if self._pending_listen is None:
            return
        tmp, sock_path, name = self._pending_listen
        self._pending_listen = None
        if started:
            os.replace(tmp, sock_path)
            return
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with contextlib.suppress(QemuError):
            await self.execute("closefd", {"fdname": name})     # QEMU never took it

    async def incoming_endpoint(self, sock_path: Path) -> tuple[str, socket.socket | None]:
        """A socket pair: QEMU reads one end (passed), the relay writes the other."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            name = await self.pass_fd(theirs.fileno(), "incoming")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return f"fd:{name}", ours

    # -- lifecycle (libvirt owns the process) ------------------------------------------------

    async def is_active(self) -> bool:
        return bool(await self.lv.call("isActive", self.dom.isActive))

    async def raise_if_exited(self, doing: str) -> None:
        if self._gone or not await self.is_active():
            self._gone = True
            raise QemuError(f"libvirt domain {self.name} stopped while {doing}"
                            f"{self.host.stderr_suffix()}")

    async def resume_domain(self) -> None:
        """Resume through libvirt (``virsh resume``) so its state says running."""
        await self.lv.call(f"resuming {self.name}", self.dom.resume)

    async def destroy(self) -> None:
        """End the domain's QEMU through libvirt (``virsh destroy``); the definition stays."""
        await self._deregister_events()
        lv = self.lv.libvirt
        try:
            await asyncio.get_running_loop().run_in_executor(self.lv._pool, self.dom.destroy)
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:   # not running: fine
                raise LibvirtError(f"libvirt ({self.lv.uri}): destroying {self.name} failed: "
                                   f"{exc}") from None
        self._gone = True
        self._closed = True
        self._event_log.cancel_waiters()

    async def kill(self) -> int | None:
        await self.destroy()
        return None

    async def quit(self, timeout: float = 10.0) -> int | None:
        await self.destroy()
        return None

    async def close(self) -> None:
        """Stop listening; the domain stays as it is (libvirt owns it)."""
        if self._closed:
            return
        self._closed = True
        await self._deregister_events()
        self._event_log.cancel_waiters()

    async def detach(self) -> None:
        await self.close()
