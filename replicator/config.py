"""Configuration: TOML in, validated frozen dataclasses out.

Every table maps onto one dataclass. Unknown keys are rejected with the file, the dotted key
and the problem, because a typo in a replication config (``bandwith_limit``) that is silently
ignored is worse than a daemon that refuses to start.

Sizes accept integers (bytes) or strings with a unit: ``"512MiB"``, ``"1G"``, ``"100MB"``.
Rates accept the same, per second: ``"50MB"`` means 50,000,000 bytes per second.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .wire.messages import SAFE_NAME

PAGE_SIZE = 4096

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, key: str = "size", path: str | None = None) -> int:
    """Parse ``512MiB`` / ``1G`` / ``4096`` into bytes."""
    if isinstance(value, bool):
        raise ConfigError("expected a size, got a boolean", path=path, key=key)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("must not be negative", path=path, key=key)
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            number = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if number != float("inf"):
                return int(number)
        raise ConfigError(f"cannot parse size {value!r} (examples: 4096, '512MiB', '1G')",
                          path=path, key=key)
    raise ConfigError(f"expected a size, got {type(value).__name__}", path=path, key=key)


def parse_address(value: str, *, key: str, path: str | None = None) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` allowed)."""
    m = re.match(r"^\[?([^\]]+?)\]?:(\d+)$", value or "")
    if not m or not (0 <= int(m.group(2)) <= 65535):
        raise ConfigError(f"expected host:port, got {value!r}", path=path, key=key)
    return m.group(1), int(m.group(2))


# ----------------------------------------------------------------------------------------------
# Schema

@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Who this node is."""
    name: str = dataclasses.field(default_factory=lambda: os.uname().nodename)
    # The domain's initial home ("source") or standby ("sink"). Only the first start reads it:
    # from then on where the domain runs follows the switches (see replicator.placement).
    role: Literal["source", "sink"] = "source"
    state_dir: Path = Path("/var/lib/replicator")
    identity_dir: Path | None = None        # key + certificate; default <state_dir>/identity


@dataclass(frozen=True, slots=True)
class RegionConfig:
    """One RAM region of a ``file`` domain: a file written by some other process."""
    name: str
    path: Path
    size: int = 0          # 0: take the file's size at start-up


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """A disk image of this host. On the source: the VM's disk. On the sink: its own copy of
    the source's disk at the same position (created, sparse, if missing), which the laptop's
    VM runs on after a switch. ``auto``: the format the file's header shows (qcow2 magic, else
    raw; a copy still to be created takes the source's format); an explicit format is safer."""
    path: Path
    format: Literal["auto", "raw", "qcow2"] = "auto"


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """A QEMU domain. The desktop VM is attached by QMP socket or launched from this spec.

    On a sink this is the VM the laptop runs: every file its QEMU opens comes from here (or the
    state dir), never from the source. The source's RAM size, vCPUs, machine and CPU model must
    equal what is set here; what is left unset (0 or "") is taken from the source, as those
    name no file."""
    qmp_socket: Path | None = None          # attach to a running VM (source)
    launch: bool = False                    # launch the VM ourselves from the fields below
    ram_size: int = 0                       # 0: 512 MiB when launching; a sink: the source's
    ram_path: Path | None = None            # shared file backing guest RAM (memory-backend-file)
    vcpus: int = 0                          # 0: 1 when launching; a sink: the source's
    accel: Literal["tcg", "kvm", "auto"] = "auto"
    machine: str = ""                       # "": q35 when launching; a sink: the source's
    cpu_model: str = ""                     # "": the accel's default; a sink: the source's
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[DiskConfig, ...] = ()      # "/path" or {path = "/path", format = "qcow2"}
    serial_log: Path | None = None


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """A domain libvirt manages (virt-manager, GNOME Boxes, cockpit): replicator finds its RAM,
    vCPUs, machine, disks and RAM file through libvirt and uses libvirt's QMP passthrough for
    what libvirt does not offer. On the laptop the domain is defined from the desktop's XML
    with the laptop's paths (``domain.qemu.disks``) when it is not defined there yet."""
    uri: str = "qemu:///system"
    name: str = ""                          # the libvirt domain on this host; "": domain.name


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """The domain (VM) being replicated."""
    name: str = "vm"
    driver: Literal["file", "qemu", "libvirt"] = "file"
    # auto: qemu-precopy for QEMU domains (no O(RAM) step in the switch), scan otherwise.
    tracker: Literal["auto", "scan", "qemu-precopy"] = "auto"
    regions: tuple[RegionConfig, ...] = ()
    pause_command: tuple[str, ...] = ()
    resume_command: tuple[str, ...] = ()
    pid_file: Path | None = None            # file driver: pause/resume by SIGSTOP/SIGCONT
    # A sink refuses a source offering more guest RAM (all regions together) than this; a QEMU
    # domain whose qemu.ram_size is set must offer exactly that.
    max_ram_size: int = 64 * 1024**3
    qemu: QemuConfig = field(default_factory=QemuConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)

    @property
    def is_qemu(self) -> bool:
        """A QEMU VM (launched/attached by replicator, or libvirt's): device state, QMP."""
        return self.driver in ("qemu", "libvirt")

    @property
    def libvirt_name(self) -> str:
        return self.libvirt.name or self.name


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """How pages travel."""
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    zstd_level: int = 1
    batch_pages: int = 256
    max_frame_bytes: int = 64 * 1024**2
    bandwidth_limit: int = 0                # bytes per second on the wire; 0 = unlimited
    scan_interval_min: float = 0.05         # seconds between scan rounds (adaptive within)
    scan_interval_max: float = 1.0
    scan_max_duty: float = 0.5              # scanning uses at most this share of one core
    max_inflight_epochs: int = 4            # epochs sent but not yet acknowledged
    reconnect_delay: float = 0.5
    # qemu-precopy pacing: with little to send QEMU busy-loops on dirty-bitmap syncs, so the
    # relay drains its socket once per interval when idle (QEMU blocks on a small send buffer
    # in between) and continuously when there is a backlog.
    precopy_burst: float = 0.1              # longest idle drain; still busy after it: backlog
    precopy_interval: float = 0.25          # seconds between idle drains
    precopy_backlog: int = 4 * 1024 * 1024  # QEMU's ram.remaining above this: drain nonstop
    precopy_send_buffer: int = 4096         # SO_SNDBUF of QEMU's end (0: the kernel's default)
    disk_interval: float = 1.0              # seconds between disk rounds (dirty-bitmap pulls)


DEFAULT_PEER_ADDRESS = "127.0.0.1:7400"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """The replication link. The host that runs the domain connects to the peer's ``listen``
    address (``address`` here); the other listens. Both set: the domain can move both ways
    (the round trip); a config with only the one its initial role needs moves it one way."""
    address: str = ""                       # where the peer listens ("": never sends)
    listen: str = ""                        # where this node listens ("": never receives)
    id: str = ""                            # the paired peer's node ID (replicator pair)
    timeout: float = 10.0                   # silence after which the link counts as lost
    insecure_plaintext: bool = False        # tests only: no TLS, no authentication
    # Sink: a connection must finish TLS and prove the paired ID within handshake_timeout. At
    # most max_unauthenticated connections (per address: ..._per_address; IPv6: per /64) may be
    # at that stage; a new one beyond that closes the oldest of the busiest address.
    handshake_timeout: float = 5.0
    max_unauthenticated: int = 64
    max_unauthenticated_per_address: int = 32


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    """How switches behave.

    A live switch that has not converged by its live deadline throttles the guest (QEMU's
    dirty-limit or auto-converge) and, if it still has not by the stop deadline (live deadline
    + throttle_time), pauses the guest and sends the rest as stop mode does: it always ends."""
    target_downtime: float = 0.05           # live mode: catch up until the final delta fits;
                                            # also QEMU's downtime-limit (qemu-precopy)
    step_timeout: float = 60.0              # longest wait for one step's answer from the sink
    live_deadline: float = 0.0              # seconds live before escalating; 0: derived,
    live_deadline_min: float = 5.0          #   max(live_deadline_min,
    live_deadline_factor: float = 4.0       #       live_deadline_factor x switch estimate)
    # QEMU's throttle between the deadlines. "auto": dirty-limit where KVM has a dirty ring,
    # else auto-converge (qemu-precopy only: it must be armed when the held-open migration
    # starts, at 1% at most until a switch needs it). "none": straight to stop mode.
    throttle: Literal["auto", "dirty-limit", "auto-converge", "none"] = "auto"
    throttle_time: float = 10.0             # seconds throttled before stop mode (0: none)
    throttle_initial: int = 30              # auto-converge: first CPU throttle, percent
    throttle_increment: int = 20            # auto-converge: added while it does not converge


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The local control API (status, metrics, switch)."""
    listen: str = "127.0.0.1:7401"
    token_file: Path | None = None
    # Host names (no port) the API answers to besides localhost and the listen address, e.g. the
    # name Prometheus scrapes it by; any other Host header is refused (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    source_path: str | None = None


# Keys whose values are sizes or rates (parsed with parse_size).
_SIZE_KEYS = {"size", "ram_size", "max_ram_size", "max_frame_bytes", "bandwidth_limit",
              "precopy_backlog", "precopy_send_buffer"}


# ----------------------------------------------------------------------------------------------
# Loading

def _convert(value: Any, tp: Any, key: str, path: str | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is DiskConfig and isinstance(value, str):
        value = {"path": value}             # the short form: a path, format "auto"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {type(value).__name__}", path=path, key=key)
        return _build(tp, value, key, path)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"must be one of {choices}, got {value!r}", path=path, key=key)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {type(value).__name__}", path=path, key=key)
        return tuple(_convert(v, args[0], f"{key}[{i}]", path) for i, v in enumerate(value))
    if key.rsplit(".", 1)[-1] in _SIZE_KEYS:
        return parse_size(value, key=key, path=path)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError("expected a non-empty path string", path=path, key=key)
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", path=path, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", path=path, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", path=path, key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", path=path, key=key)
        return value
    raise ConfigError(f"unsupported type {tp!r}", path=path, key=key)  # pragma: no cover


def _build(cls: type, table: dict[str, Any], prefix: str, path: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source_path"}
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key (known keys here: {known})", path=path, key=key)
        kwargs[k] = _convert(v, hints[k], key, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"incomplete table: {exc}", path=path, key=prefix or None) from None


def _validate(cfg: Config, path: str | None) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(msg, path=path, key=key)

    s = cfg.stream
    if not 1 <= s.batch_pages <= 4096:
        bad("stream.batch_pages", "must be between 1 and 4096")
    if s.max_frame_bytes < (s.batch_pages * PAGE_SIZE) * 2:
        bad("stream.max_frame_bytes", "must hold at least two batches of pages")
    if not 1 <= s.zstd_level <= 19:
        bad("stream.zstd_level", "must be between 1 and 19")
    if s.scan_interval_min <= 0 or s.scan_interval_max < s.scan_interval_min:
        bad("stream.scan_interval_max", "need 0 < scan_interval_min <= scan_interval_max")
    if not 0 < s.scan_max_duty <= 1:
        bad("stream.scan_max_duty", "must be in (0, 1]")
    if s.max_inflight_epochs < 1:
        bad("stream.max_inflight_epochs", "must be at least 1")
    if not 0.05 <= s.disk_interval <= 60:
        bad("stream.disk_interval", "must be between 0.05 and 60 seconds")
    if not 0 < s.precopy_interval <= 10:
        bad("stream.precopy_interval", "must be more than 0 and at most 10 seconds")
    if not 0.01 <= s.precopy_burst <= s.precopy_interval:
        # An idle drain shorter than QEMU takes to hand over one pass always ends as
        # "backlog": pacing would be off.
        bad("stream.precopy_burst", "must be between 0.01 s and stream.precopy_interval")
    if s.precopy_send_buffer and not 4096 <= s.precopy_send_buffer <= 64 * 1024**2:
        bad("stream.precopy_send_buffer", "must be 0 (the kernel's default) or 4 KiB to 64 MiB")
    if cfg.peer.id:
        from .identity import normalize_id
        try:
            normalize_id(cfg.peer.id)
        except Exception as exc:
            bad("peer.id", str(exc))
    if cfg.peer.timeout < 1:
        bad("peer.timeout", "must be at least 1 second")
    if not 0.5 <= cfg.peer.handshake_timeout <= 300:
        bad("peer.handshake_timeout", "must be between 0.5 and 300 seconds")
    if not 1 <= cfg.peer.max_unauthenticated <= 10_000:
        bad("peer.max_unauthenticated", "must be between 1 and 10000")
    if not 1 <= cfg.peer.max_unauthenticated_per_address <= cfg.peer.max_unauthenticated:
        bad("peer.max_unauthenticated_per_address",
            "must be between 1 and peer.max_unauthenticated")
    if cfg.switch.step_timeout <= 0:
        bad("switch.step_timeout", "must be positive")
    if cfg.switch.target_downtime <= 0:
        bad("switch.target_downtime", "must be positive")
    sw = cfg.switch
    for key in ("live_deadline", "throttle_time"):
        if getattr(sw, key) < 0:
            bad(f"switch.{key}", "must be 0 or more seconds")
    if sw.live_deadline_min <= 0:
        bad("switch.live_deadline_min", "must be positive")
    if sw.live_deadline_factor <= 0:
        bad("switch.live_deadline_factor", "must be positive")
    if not 1 <= sw.throttle_initial <= 99:
        bad("switch.throttle_initial", "must be between 1 and 99 (percent)")
    if not 1 <= sw.throttle_increment <= 100:
        bad("switch.throttle_increment", "must be between 1 and 100 (percent)")
    if cfg.peer.address:
        parse_address(cfg.peer.address, key="peer.address", path=path)
    if cfg.peer.listen:
        parse_address(cfg.peer.listen, key="peer.listen", path=path)
    if not cfg.control.listen.startswith("unix:"):
        parse_address(cfg.control.listen, key="control.listen", path=path)
    for i, h in enumerate(cfg.control.allowed_hosts):
        if not (_HOST_NAME_RE.fullmatch(h) or _is_ip(h.strip("[]"))):
            bad(f"control.allowed_hosts[{i}]", f"{h!r} is not a host name or IP address "
                "(no scheme, port or path: e.g. \"desktop.lan\")")
    d = cfg.domain
    if not SAFE_NAME.fullmatch(d.name):
        bad("domain.name", "use letters, digits, '_', '.', '-' (at most 64, not starting "
            "with '.', '_' or '-')")
    seen = set()
    for i, r in enumerate(d.regions):
        if not SAFE_NAME.fullmatch(r.name):
            bad(f"domain.regions[{i}].name", "use letters, digits, '_', '.', '-' (at most 64, "
                "not starting with '.', '_' or '-')")
        if r.name in seen:
            bad(f"domain.regions[{i}].name", f"duplicate region name {r.name!r}")
        seen.add(r.name)
        if r.size % PAGE_SIZE:
            bad(f"domain.regions[{i}].size", f"must be a multiple of {PAGE_SIZE}")
    if cfg.node.role == "source" and d.driver == "file" and not d.regions:
        bad("domain.regions", "a file domain needs at least one region")
    if d.tracker == "qemu-precopy" and not d.is_qemu:
        bad("domain.tracker", 'qemu-precopy needs driver = "qemu" or "libvirt"')
    if d.driver == "libvirt":
        if not d.libvirt.uri.startswith("qemu"):
            bad("domain.libvirt.uri", f"{d.libvirt.uri!r} is not a QEMU driver URI "
                "(qemu:///system, qemu+ssh://host/system, ...)")
        if d.libvirt.name and not SAFE_NAME.fullmatch(d.libvirt.name):
            bad("domain.libvirt.name", "use letters, digits, '_', '.', '-'")
        if d.qemu.launch or d.qemu.qmp_socket or d.qemu.ram_path:
            bad("domain.qemu", "a libvirt domain is found through libvirt: leave launch, "
                "qmp_socket and ram_path unset")
    if d.driver == "qemu" and d.qemu.ram_size % PAGE_SIZE:
        bad("domain.qemu.ram_size", f"must be a multiple of {PAGE_SIZE}")
    if d.max_ram_size < PAGE_SIZE:
        bad("domain.max_ram_size", "must be at least one page")
    q = d.qemu
    if not 0 <= q.vcpus <= 255:
        bad("domain.qemu.vcpus", "must be between 1 and 255 (0: as the source / 1)")
    for key in ("machine", "cpu_model"):
        value = getattr(q, key)
        if value and not SAFE_NAME.fullmatch(value):
            bad(f"domain.qemu.{key}", f"{value!r} is not a plain name (letters, digits, "
                "'.', '_', '-'; no options)")
    disk_paths: set[Path] = set()
    for i, disk in enumerate(q.disks):
        if "\0" in str(disk.path) or "\n" in str(disk.path):
            bad(f"domain.qemu.disks[{i}].path", "must not contain NUL or newline characters")
        if not disk.path.is_absolute():
            bad(f"domain.qemu.disks[{i}].path", "must be an absolute path")
        if disk.path in disk_paths:
            bad(f"domain.qemu.disks[{i}].path", f"{str(disk.path)!r} is listed twice")
        disk_paths.add(disk.path)


_HOST_NAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _is_ip(value: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def load_config(source: str | os.PathLike[str] | dict[str, Any]) -> Config:
    """Load and validate a config from a TOML file path or an already parsed dict."""
    path: str | None = None
    if isinstance(source, dict):
        table = source
    else:
        path = str(source)
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("file not found", path=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    cfg = _build(Config, table, "", path)
    cfg = dataclasses.replace(cfg, source_path=path)
    peer = cfg.peer
    # The address its initial role needs defaults as it always did; the other one stays
    # unset (a one-way pairing) unless the config names it.
    if cfg.node.role == "source" and not peer.address:
        peer = dataclasses.replace(peer, address=DEFAULT_PEER_ADDRESS)
    elif cfg.node.role == "sink" and not peer.listen:
        peer = dataclasses.replace(peer, listen=DEFAULT_PEER_ADDRESS)
    cfg = dataclasses.replace(cfg, peer=peer)
    _validate(cfg, path)
    if cfg.domain.tracker == "auto":
        chosen = "qemu-precopy" if cfg.domain.is_qemu else "scan"
        cfg = dataclasses.replace(cfg, domain=dataclasses.replace(cfg.domain, tracker=chosen))
    return cfg
