"""One error tree for everything replicator raises on purpose.

Every error a user can see derives from :class:`ReplicatorError` and carries a message a person
understands. Callers catch the narrowest class they can act on; the daemon's top level catches
``ReplicatorError`` and reports it without a traceback.
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base class of every error replicator raises deliberately."""


class ConfigError(ReplicatorError):
    """The configuration file is unreadable or invalid.

    The message names the file, the key (dotted path) and the problem.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        self.path = path
        self.key = key
        where = ""
        if path:
            where += f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


# --- wire ----------------------------------------------------------------------------------

class ProtocolError(ReplicatorError):
    """The peer sent something that violates the replication protocol."""


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds the configured maximum (rejected before allocation)."""


class MalformedFrame(ProtocolError):
    """A frame could not be decoded into a known message."""


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version this node does not."""


class LayoutMismatch(ProtocolError):
    """The peer's domain (name or RAM region layout) does not match ours."""


class PeerError(ReplicatorError):
    """The peer reported an error, went away, or is not the peer we paired with."""


class PeerRejected(PeerError):
    """The peer refused our handshake; the message carries its reason."""


class LinkClosed(PeerError):
    """The connection to the peer was closed or lost."""


# --- source / sink -------------------------------------------------------------------------

class DomainError(ReplicatorError):
    """The domain (VM) could not be inspected, paused or resumed."""


class QemuError(DomainError):
    """QEMU failed to start, answered QMP with an error, or exited."""


class NbdError(QemuError):
    """An NBD server (QEMU, qemu-nbd) refused us or broke the protocol, or the link to it failed."""


class StoreError(ReplicatorError):
    """The shadow store could not read or write its files (e.g. disk full)."""


class IntegrityError(ReplicatorError):
    """Data failed verification (page hash, manifest or journal checksum)."""


class SwitchError(ReplicatorError):
    """A switch could not be completed; see ``rolled_back`` for where the VM runs."""

    def __init__(self, message: str, *, rolled_back: bool = True):
        self.rolled_back = rolled_back
        super().__init__(message)


class SwitchInProgress(SwitchError):
    """A second switch was requested while one is running."""

    def __init__(self, message: str = "a switch is already in progress"):
        super().__init__(message, rolled_back=False)


class HandedOver(ReplicatorError):
    """This node handed its domain over to the peer and must not resume it."""
