"""The replication protocol's messages: frozen dataclasses, no I/O.

Every message has a small integer ``TYPE``; the codec puts it first in the frame. Field types are
checked on decode against the annotations, so a hostile peer cannot smuggle a dict where bytes
are expected. Page indices travel as little-endian ``uint32`` arrays and page hashes as
little-endian ``uint64`` arrays packed into ``bytes``: one msgpack object per batch, not per page.

Conversation (source connects, sink listens; TLS 1.3 with pinned IDs, see ``identity``)::

    sink   -> AuthChallenge         fresh nonce; the source already pinned the sink's certificate
    source -> AuthProof             its certificate + signature: the sink pins the source's ID
    source -> Hello                 layout of the domain, protocol version
    sink   -> Welcome | Reject      acked epoch; followed by ManifestChunk* + ManifestEnd
    source -> PageBatch* EpochEnd   repeated; each EpochEnd is answered by Ack once durable
    either -> Ping / Pong           liveness and round-trip time
    source -> VerifyRequest         sink answers VerifyReply with a digest of its manifest
    source -> DiskOpen              the domain's disks (after the manifest exchange, if any)
    sink   -> DiskManifest* DiskOpened   its copies' block hashes and acknowledged generations
    source -> DiskBatch* DiskRoundEnd    changed blocks of one round; answered by DiskAck
    switch messages: see replicator.source.switch / replicator.sink.switch
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..errors import MalformedFrame

#: 2: Hello/Welcome carry the placement generation (the round trip, split-brain refusal).
#: 3: PrecopyData is compressed (codec, raw_len).
PROTOCOL_VERSION = 3

#: Domain and region names (they become file names on the sink): 1-64 of letters, digits and
#: ``._-``, not starting with ``._-``. Config validation uses the same rule.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise MalformedFrame(f"{what} {value!r} is not allowed (1-64 letters, digits, '.', '_', "
                             "'-', not starting with '.', '_' or '-')")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """One RAM region of the domain: name, size in bytes, page size."""
    name: str
    size: int
    page_size: int = 4096

    def __post_init__(self) -> None:
        _check_name("region name", self.name)


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[int] = 1
    version: int
    node: str
    domain: str
    regions: tuple[RegionInfo, ...]
    vm: bytes = b""          # msgpack'd VM description: the sink checks it, never trusts it
    generation: int = 0      # the source's placement generation (switches it has seen)

    def __post_init__(self) -> None:
        _check_name("domain name", self.domain)


@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[int] = 2
    version: int
    node: str
    acked_epoch: int
    handed_over: bool = False   # the domain runs here, at the node that answers
    generation: int = 0         # the answering node's placement generation
    running_since: float = 0.0  # when the domain started running here (handed_over), epoch s
    forced: bool = False        # it was started here by hand (replicator takeover --force)


@dataclass(frozen=True, slots=True)
class Reject:
    TYPE: ClassVar[int] = 3
    reason: str


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    """Part of the sink's per-page hash table for one region (uint64 LE array)."""
    TYPE: ClassVar[int] = 4
    region: str
    first_page: int
    hashes: bytes


@dataclass(frozen=True, slots=True)
class ManifestEnd:
    TYPE: ClassVar[int] = 5


@dataclass(frozen=True, slots=True)
class PageBatch:
    """Changed pages of one region.

    ``zero``: uint32 indices of all-zero pages (no payload). ``pages``: uint32 indices of the
    others, ``hashes`` their xxh3-64 (uint64), ``payload`` their contents concatenated in that
    order, compressed with ``codec`` into ``raw_len`` bytes before compression.
    """
    TYPE: ClassVar[int] = 6
    epoch: int
    region: str
    codec: str
    zero: bytes
    pages: bytes
    hashes: bytes
    raw_len: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class EpochEnd:
    TYPE: ClassVar[int] = 7
    epoch: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The sink made every page up to and including ``epoch`` durable."""
    TYPE: ClassVar[int] = 8
    epoch: int


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = 9
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[int] = 10
    nonce: int


@dataclass(frozen=True, slots=True)
class VerifyRequest:
    TYPE: ClassVar[int] = 11
    nonce: int


@dataclass(frozen=True, slots=True)
class VerifyReply:
    """Digest (xxh3-128 of the uint64 hash array) of each region's manifest."""
    TYPE: ClassVar[int] = 12
    nonce: int
    epoch: int
    digests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """A fatal error; the sender closes the connection after it."""
    TYPE: ClassVar[int] = 13
    message: str


# --- switch ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SwitchPrepare:
    """Source asks the sink to get the shadow ready (started, disks reachable)."""
    TYPE: ClassVar[int] = 20
    switch_id: str
    mode: str


@dataclass(frozen=True, slots=True)
class SwitchReady:
    TYPE: ClassVar[int] = 21
    switch_id: str


@dataclass(frozen=True, slots=True)
class SwitchVerify:
    """The source is paused and every page is sent: compare the full manifest digests."""
    TYPE: ClassVar[int] = 22
    switch_id: str
    epoch: int
    digests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A chunk of the QEMU device-state migration stream (x-ignore-shared)."""
    TYPE: ClassVar[int] = 23
    switch_id: str
    offset: int
    data: bytes
    last: bool


@dataclass(frozen=True, slots=True)
class SwitchCommit:
    """Point of no return: the sink will run the domain; the source must never resume it."""
    TYPE: ClassVar[int] = 24
    switch_id: str


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """Sink's answer to a switch step: ``ok`` or the reason it refused."""
    TYPE: ClassVar[int] = 25
    switch_id: str
    step: str
    ok: bool
    message: str = ""
    resumed_at: float = 0.0   # sink wall clock when the shadow ran (for downtime)


@dataclass(frozen=True, slots=True)
class SwitchAbort:
    TYPE: ClassVar[int] = 26
    switch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SwitchRequest:
    """The sink asks for a switch to itself ("switch now" pressed on the host that keeps the
    shadow); the source runs it as if pressed there, and may refuse."""
    TYPE: ClassVar[int] = 28
    mode: str


# --- authentication (inside TLS, before Hello) ------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """Sink -> source: prove you hold the key of the paired source's certificate."""
    TYPE: ClassVar[int] = 30
    nonce: bytes
    server_id: str


@dataclass(frozen=True, slots=True)
class AuthProof:
    """Source -> sink: its certificate and a signature over the nonce and both IDs."""
    TYPE: ClassVar[int] = 31
    cert: bytes
    signature: bytes


# --- qemu-precopy relay --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PrecopyStart:
    """Source -> sink: start a shadow listening for a relayed precopy migration."""
    TYPE: ClassVar[int] = 40
    session: int


@dataclass(frozen=True, slots=True)
class PrecopyReady:
    TYPE: ClassVar[int] = 41
    session: int


@dataclass(frozen=True, slots=True)
class PrecopyData:
    """A chunk of the (edited) migration main channel, in stream order: ``raw_len`` bytes,
    compressed with ``codec`` into ``data`` (``"none"``: ``data`` is the chunk itself)."""
    TYPE: ClassVar[int] = 42
    session: int
    codec: str
    raw_len: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PrecopyReturn:
    """Sink -> source: return-path messages from the shadow, in order."""
    TYPE: ClassVar[int] = 43
    session: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SwitchRelease:
    """Source -> sink (live switch): release the withheld SWITCHOVER_ACK."""
    TYPE: ClassVar[int] = 44
    switch_id: str


# --- disks ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of the domain as the guest sees it: virtual size and replication block size."""
    index: int
    size: int
    format: str
    block_size: int


@dataclass(frozen=True, slots=True)
class DiskOpen:
    """Source -> sink: the domain's disks, in the order the guest sees them."""
    TYPE: ClassVar[int] = 50
    disks: tuple[DiskInfo, ...]


@dataclass(frozen=True, slots=True)
class DiskManifest:
    """Part of the sink's block-hash table of one disk's copy (uint64 LE array)."""
    TYPE: ClassVar[int] = 51
    disk: int
    first_block: int
    hashes: bytes


@dataclass(frozen=True, slots=True)
class DiskOpened:
    """Sink -> source, after the manifests: per disk, the generation the copy holds
    everything up to (0: unknown, the source must compare every block)."""
    TYPE: ClassVar[int] = 52
    generations: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DiskBatch:
    """Changed blocks of one disk, like :class:`PageBatch`: ``zero`` (uint32 block indices,
    no payload), ``blocks`` + ``hashes`` (xxh3-64) + ``payload`` (compressed with ``codec``
    into ``raw_len`` bytes)."""
    TYPE: ClassVar[int] = 53
    generation: int
    disk: int
    codec: str
    zero: bytes
    blocks: bytes
    hashes: bytes
    raw_len: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class DiskRoundEnd:
    """Every block of round ``generation`` is sent; the sink flushes and answers DiskAck."""
    TYPE: ClassVar[int] = 54
    generation: int


@dataclass(frozen=True, slots=True)
class DiskAck:
    """The sink made every block up to round ``generation`` durable."""
    TYPE: ClassVar[int] = 55
    generation: int


@dataclass(frozen=True, slots=True)
class SwitchDisks:
    """The source is paused and its last disk round acknowledged: compare each copy's
    block-hash digest; the sink then stops writing the copies (the shadow may open them)."""
    TYPE: ClassVar[int] = 27
    switch_id: str
    digests: tuple[bytes, ...]


MESSAGE_TYPES: tuple[type, ...] = (
    Hello, Welcome, Reject, ManifestChunk, ManifestEnd, PageBatch, EpochEnd, Ack, Ping, Pong,
    VerifyRequest, VerifyReply, ErrorMessage, SwitchPrepare, SwitchReady, SwitchVerify,
    DeviceState, SwitchCommit, SwitchResult, SwitchAbort, AuthChallenge, AuthProof,
    PrecopyStart, PrecopyReady, PrecopyData, PrecopyReturn, SwitchRelease,
    DiskOpen, DiskManifest, DiskOpened, DiskBatch, DiskRoundEnd, DiskAck, SwitchDisks,
    SwitchRequest,
)
