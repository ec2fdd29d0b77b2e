"""Domain drivers: what the source knows about the VM it replicates.

A :class:`DomainDriver` lists the RAM regions (each backed by a file the replicator can read),
pauses and resumes the domain, and, for VMMs with device state (QEMU), saves that state at
switch time. The generic :class:`FileDriver` works for any process whose memory is a file: it
is how the engine is tested without a hypervisor, and how a VMM without a driver of its own can
still be replicated (with the user's pause/resume commands).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from ..config import PAGE_SIZE, DomainConfig
from ..errors import DomainError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Region:
    """One RAM region: a name both hosts agree on, its backing file and its size."""
    name: str
    path: Path
    size: int

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE


class DomainDriver(abc.ABC):
    """The source's handle on a domain."""

    @abc.abstractmethod
    async def regions(self) -> list[Region]:
        """RAM regions, in a stable order."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the guest from changing its memory."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Let the guest run again (rollback of a failed switch)."""

    @abc.abstractmethod
    async def is_running(self) -> bool:
        ...

    async def prepare_switch(self) -> None:
        """Work that can happen before the pause (keeps it out of the downtime)."""

    async def save_device_state(self) -> bytes:
        """Device state to hand to the shadow (empty for domains without any)."""
        return b""

    async def vm_description(self) -> dict | None:
        """What the running VM is, for the sink to check its own VM definition against."""
        return None

    async def close(self, leave_running: bool = False) -> None:
        """Release resources; never changes the domain's run state. ``leave_running``: the
        daemon stops or restarts, so a VM it launched itself goes on (the next start adopts
        it); without it such a VM ends with the daemon."""


class FileDriver(DomainDriver):
    """Regions are plain files; pause/resume by commands or by SIGSTOP/SIGCONT to a pid file."""

    def __init__(self, cfg: DomainConfig):
        self.cfg = cfg
        self._paused = False

    async def regions(self) -> list[Region]:
        out = []
        for r in self.cfg.regions:
            try:
                st = os.stat(r.path)
            except OSError as exc:
                raise DomainError(f"region {r.name!r}: cannot stat {r.path}: {exc.strerror}") from None
            size = r.size or st.st_size
            if size <= 0 or size % PAGE_SIZE:
                raise DomainError(f"region {r.name!r}: size {size} is not a positive multiple "
                                  f"of {PAGE_SIZE}")
            out.append(Region(r.name, Path(r.path), size))
        return out

    def _pid(self) -> int:
        assert self.cfg.pid_file is not None
        try:
            return int(Path(self.cfg.pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise DomainError(f"cannot read pid file {self.cfg.pid_file}: {exc}") from None

    async def _run(self, argv: tuple[str, ...], what: str) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise DomainError(f"{what} command {argv[0]} failed ({proc.returncode}): "
                              f"{err.decode(errors='replace').strip()}")

    async def _signal(self, sig: signal.Signals) -> None:
        pid = self._pid()
        try:
            os.kill(pid, sig)
        except OSError as exc:
            raise DomainError(f"cannot send {sig.name} to pid {pid}: {exc.strerror}") from None

    async def pause(self) -> None:
        if self.cfg.pause_command:
            await self._run(self.cfg.pause_command, "pause")
        elif self.cfg.pid_file:
            await self._signal(signal.SIGSTOP)
        else:
            raise DomainError("file domain has neither pause_command nor pid_file: cannot pause")
        self._paused = True

    async def resume(self) -> None:
        if self.cfg.resume_command:
            await self._run(self.cfg.resume_command, "resume")
        elif self.cfg.pid_file:
            await self._signal(signal.SIGCONT)
        else:
            raise DomainError("file domain has neither resume_command nor pid_file: cannot resume")
        self._paused = False

    async def is_running(self) -> bool:
        if self.cfg.pid_file:
            try:
                state = Path(f"/proc/{self._pid()}/stat").read_text().split(")")[-1].split()[0]
            except OSError:
                return False
            return state not in ("T", "t", "Z", "X")
        return not self._paused
