"""Unit tests for replicator.config: TOML loading, conversion and validation."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from replicator.config import (Config, ConfigError, DiskConfig, DomainConfig, RegionConfig,
                               load_config, parse_address, parse_size)
from replicator.errors import ReplicatorError
from replicator.identity import format_id

FULL = """
[node]
name = "alpha"
role = "source"
state_dir = "/srv/replicator"
identity_dir = "/etc/replicator/identity"

[domain]
name = "desk-1"
driver = "file"
tracker = "scan"
pause_command = ["/usr/bin/vmctl", "pause"]
resume_command = ["/usr/bin/vmctl", "resume"]
pid_file = "/run/vm.pid"

[[domain.regions]]
name = "ram"
path = "/dev/shm/ram"
size = "512MiB"

[[domain.regions]]
name = "vram.0"
path = "/dev/shm/vram"
size = 8192

[domain.qemu]
qmp_socket = "/run/qmp.sock"
launch = true
ram_size = "1G"
ram_path = "/dev/shm/guest"
vcpus = 2
accel = "kvm"
cpu_model = "host"
machine = "pc-q35-10.0"
kernel = "/boot/vmlinuz"
append = "console=ttyS0"
disks = ["/var/lib/a.qcow2", "/var/lib/b.qcow2"]

[stream]
compression = "lz4"
zstd_level = 3
batch_pages = 128
max_frame_bytes = "16MiB"
bandwidth_limit = "50MB"
scan_interval_min = 0.1
scan_interval_max = 2
max_inflight_epochs = 8
reconnect_delay = 1.5

[peer]
address = "10.0.0.2:7400"
listen = "[::]:7400"
id = "PEER_ID"
insecure_plaintext = false

[control]
listen = "unix:/run/replicator.sock"
token_file = "/etc/replicator/token"
allowed_hosts = ["desktop.lan", "10.0.0.1", "[fd00::1]"]
"""

MINIMAL = """
[[domain.regions]]
name = "ram"
path = "/dev/shm/ram"
"""


def write(tmp_path: Path, text: str, name: str = "replicator.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def expect_error(tmp_path: Path, text: str, key: str | None, *fragments: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    err = ei.value
    msg = str(err)
    assert str(p) in msg and err.path == str(p)
    if key is not None:
        assert err.key == key
        assert f"{key}: " in msg
    for frag in fragments:
        assert frag in msg, msg
    return err


# --- a full valid file ----------------------------------------------------------------------


PEER_ID = format_id(b"a certificate")


def test_full_config(tmp_path):
    p = write(tmp_path, FULL.replace("PEER_ID", PEER_ID))
    cfg = load_config(p)
    assert cfg.source_path == str(p)
    assert cfg.node.name == "alpha" and cfg.node.role == "source"
    assert cfg.node.state_dir == Path("/srv/replicator")
    assert cfg.node.identity_dir == Path("/etc/replicator/identity")
    d = cfg.domain
    assert d.name == "desk-1" and d.driver == "file" and d.tracker == "scan"
    assert d.pause_command == ("/usr/bin/vmctl", "pause")
    assert d.resume_command == ("/usr/bin/vmctl", "resume")
    assert d.pid_file == Path("/run/vm.pid")
    assert d.regions == (RegionConfig("ram", Path("/dev/shm/ram"), 512 * 1024**2),
                         RegionConfig("vram.0", Path("/dev/shm/vram"), 8192))
    q = d.qemu
    assert q.qmp_socket == Path("/run/qmp.sock") and q.launch is True
    assert q.ram_size == 1000**3 and q.ram_path == Path("/dev/shm/guest")
    assert q.vcpus == 2 and q.accel == "kvm" and q.cpu_model == "host"
    assert q.kernel == Path("/boot/vmlinuz") and q.initrd is None
    assert q.append == "console=ttyS0"
    assert q.machine == "pc-q35-10.0"
    assert q.disks == (DiskConfig(Path("/var/lib/a.qcow2"), "auto"),
                       DiskConfig(Path("/var/lib/b.qcow2"), "auto"))
    s = cfg.stream
    assert s.compression == "lz4" and s.zstd_level == 3 and s.batch_pages == 128
    assert s.max_frame_bytes == 16 * 1024**2 and s.bandwidth_limit == 50_000_000
    assert s.scan_interval_min == 0.1
    assert s.scan_interval_max == 2.0 and type(s.scan_interval_max) is float
    assert s.max_inflight_epochs == 8 and s.reconnect_delay == 1.5
    assert cfg.peer.address == "10.0.0.2:7400" and cfg.peer.listen == "[::]:7400"
    assert cfg.peer.id == PEER_ID and cfg.peer.insecure_plaintext is False
    assert cfg.control.listen == "unix:/run/replicator.sock"
    assert cfg.control.token_file == Path("/etc/replicator/token")
    assert cfg.control.allowed_hosts == ("desktop.lan", "10.0.0.1", "[fd00::1]")


def test_defaults_from_minimal_file(tmp_path):
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.node.role == "source" and cfg.node.name == os.uname().nodename
    assert cfg.domain.regions == (RegionConfig("ram", Path("/dev/shm/ram"), 0),)
    assert cfg.stream.compression == "zstd" and cfg.stream.batch_pages == 256
    assert cfg.stream.max_frame_bytes == 64 * 1024**2
    # Unset (0 / ""): a launching source uses 512 MiB, 1 vCPU, q35; a sink takes the source's.
    q = cfg.domain.qemu
    assert q.ram_size == 0 and q.vcpus == 0 and q.machine == "" and q.cpu_model == ""
    assert cfg.domain.max_ram_size == 64 * 1024**3
    assert cfg.peer.address == "127.0.0.1:7400"


def test_load_from_dict_has_no_source_path():
    cfg = load_config({"domain": {"regions": [{"name": "ram", "path": "/x"}]}})
    assert cfg.source_path is None
    with pytest.raises(ConfigError) as ei:
        load_config({"stream": {"bandwith_limit": 1}})
    assert ei.value.path is None and ei.value.key == "stream.bandwith_limit"


def test_config_is_frozen(tmp_path):
    cfg = load_text(tmp_path, MINIMAL)
    with pytest.raises(Exception):
        cfg.stream.batch_pages = 1  # type: ignore[misc]


# --- unknown keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,key", [
    (MINIMAL + "[stream]\nbandwith_limit = \"10MB\"\n", "stream.bandwith_limit"),
    (MINIMAL + "[streams]\nbatch_pages = 1\n", "streams"),
    ("typo = 1\n" + MINIMAL, "typo"),
    ("source_path = \"/etc/x\"\n" + MINIMAL, "source_path"),
    ("[[domain.regions]]\nname = \"ram\"\npath = \"/x\"\nsise = 4096\n",
     "domain.regions[0].sise"),
    (MINIMAL + "[[domain.regions]]\nname = \"b\"\npath = \"/y\"\nbogus = 1\n",
     "domain.regions[1].bogus"),
    (MINIMAL + "[domain.qemu]\nvcpu = 2\n", "domain.qemu.vcpu"),
])
def test_unknown_key_rejected_with_dotted_key_and_path(tmp_path, text, key):
    expect_error(tmp_path, text, key, "unknown key")


def test_unknown_key_lists_known_keys(tmp_path):
    err = expect_error(tmp_path, MINIMAL + "[stream]\nbandwith_limit = 1\n",
                       "stream.bandwith_limit")
    assert "bandwidth_limit" in str(err)


# --- wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize("text,key", [
    (MINIMAL + "[stream]\nbatch_pages = \"128\"\n", "stream.batch_pages"),
    (MINIMAL + "[stream]\nbatch_pages = 1.5\n", "stream.batch_pages"),
    (MINIMAL + "[stream]\nbatch_pages = true\n", "stream.batch_pages"),
    (MINIMAL + "[stream]\nscan_interval_min = \"fast\"\n", "stream.scan_interval_min"),
    (MINIMAL + "[stream]\nscan_interval_min = true\n", "stream.scan_interval_min"),
    (MINIMAL + "[domain.qemu]\nlaunch = \"yes\"\n", "domain.qemu.launch"),
    (MINIMAL + "[domain.qemu]\nlaunch = 1\n", "domain.qemu.launch"),
    (MINIMAL + "[domain.qemu]\ncpu_model = 3\n", "domain.qemu.cpu_model"),
    (MINIMAL + "[domain.qemu]\nkernel = \"\"\n", "domain.qemu.kernel"),
    (MINIMAL + "[domain.qemu]\nkernel = 5\n", "domain.qemu.kernel"),
    (MINIMAL + "[domain.qemu]\ndisks = \"/a.qcow2\"\n", "domain.qemu.disks"),
    (MINIMAL + "[domain.qemu]\ndisks = [\"/a\", 2]\n", "domain.qemu.disks[1]"),
    (MINIMAL + "[domain]\npause_command = \"kill -STOP 1\"\n", "domain.pause_command"),
    (MINIMAL + "[domain]\npid_file = []\n", "domain.pid_file"),
    ("stream = 5\n" + MINIMAL, "stream"),
    ("[domain]\nregions = {name = \"ram\", path = \"/x\"}\n", "domain.regions"),
    ("[domain]\nregions = [\"ram\"]\n", "domain.regions[0]"),
    (MINIMAL + "[node]\nname = 7\n", "node.name"),
])
def test_wrong_types(tmp_path, text, key):
    expect_error(tmp_path, text, key)


def test_missing_required_region_field(tmp_path):
    expect_error(tmp_path, "[[domain.regions]]\nname = \"ram\"\n", "domain.regions[0]",
                 "incomplete")


# --- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("\"512MiB\"", 512 * 1024**2),
    ("\"1G\"", 1000**3),
    ("\"1GiB\"", 1024**3),
    ("\"100MB\"", 100 * 1000**2),
    ("\"4k\"", 4000),
    ("\"8KiB\"", 8192),
    ("\" 2 mib \"", 2 * 1024**2),
    ("\"1.5GiB\"", 3 * 512 * 1024**2),
    ("\"4096\"", 4096),
    ("\"4096b\"", 4096),
    ("1073741824", 1024**3),
    ("0", 0),
    ("\"1TiB\"", 1024**4),
])
def test_sizes(tmp_path, value, expected):
    cfg = load_text(tmp_path, MINIMAL + f"[stream]\nbandwidth_limit = {value}\n")
    assert cfg.stream.bandwidth_limit == expected
    assert type(cfg.stream.bandwidth_limit) is int


def test_rate_is_a_size_per_second(tmp_path):
    cfg = load_text(tmp_path, MINIMAL + "[stream]\nbandwidth_limit = \"50MB\"\n")
    assert cfg.stream.bandwidth_limit == 50_000_000


def test_region_size_parsed(tmp_path):
    cfg = load_text(tmp_path, "[[domain.regions]]\nname = \"r\"\npath = \"/x\"\nsize = \"64KiB\"\n")
    assert cfg.domain.regions[0].size == 65536


@pytest.mark.parametrize("value", ["\"lots\"", "\"12XB\"", "\"-1G\"", "-4096", "true",
                                   "1.5", "\"1e9\"", "\"\"", "\"G\"", "[1]"])
def test_bad_sizes(tmp_path, value):
    expect_error(tmp_path, MINIMAL + f"[stream]\nmax_frame_bytes = {value}\n",
                 "stream.max_frame_bytes")


def test_parse_size_direct():
    assert parse_size(7) == 7
    assert parse_size("3 MiB") == 3 * 1024**2
    with pytest.raises(ConfigError):
        parse_size(True)
    with pytest.raises(ConfigError):
        parse_size(None)  # type: ignore[arg-type]


def test_parse_size_absurd_number_is_a_config_error():
    # A size string with hundreds of digits is a typo; it must be refused as a ConfigError, not
    # crash the loader with an OverflowError (float('9'*400) is inf).
    with pytest.raises(ConfigError):
        parse_size("9" * 400, key="stream.max_frame_bytes")


def test_absurd_size_in_file_is_a_config_error(tmp_path):
    expect_error(tmp_path, MINIMAL + "[stream]\nbandwidth_limit = \"" + "9" * 400 + "MB\"\n",
                 "stream.bandwidth_limit")


# --- enums ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,key", [
    (MINIMAL + "[stream]\ncompression = \"gzip\"\n", "stream.compression"),
    (MINIMAL + "[stream]\ncompression = \"ZSTD\"\n", "stream.compression"),
    (MINIMAL + "[node]\nrole = \"primary\"\n", "node.role"),
    (MINIMAL + "[domain]\ndriver = \"xen\"\n", "domain.driver"),
    (MINIMAL + "[domain]\ntracker = \"dirty-log\"\n", "domain.tracker"),
    (MINIMAL + "[domain.qemu]\naccel = \"hvf\"\n", "domain.qemu.accel"),
    (MINIMAL + "[domain.qemu]\naccel = 1\n", "domain.qemu.accel"),
])
def test_bad_enum(tmp_path, text, key):
    err = expect_error(tmp_path, text, key, "must be one of")
    if key == "stream.compression":
        assert "'zstd'" in str(err) and "'lz4'" in str(err) and "'none'" in str(err)


# --- addresses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("peer.address", "localhost"),
    ("peer.address", "localhost:"),
    ("peer.address", ":7400"),
    ("peer.address", "host:65536"),
    ("peer.address", "host:port"),
    ("peer.listen", "0.0.0.0:-1"),
    ("control.listen", "localhost:99999"),
])
def test_bad_address(tmp_path, key, value):
    table, field = key.split(".")
    expect_error(tmp_path, MINIMAL + f"[{table}]\n{field} = \"{value}\"\n", key, "host:port")


def test_peer_addresses_one_way_and_both_ways(tmp_path):
    """The address a node's initial role needs defaults as before; the other one stays unset
    (one way) unless named; both named: the domain can come back (the round trip)."""
    src = load_text(tmp_path, MINIMAL)
    assert (src.peer.address, src.peer.listen) == ("127.0.0.1:7400", "")
    sink = load_config({"node": {"role": "sink"}})
    assert (sink.peer.address, sink.peer.listen) == ("", "127.0.0.1:7400")
    both = load_text(tmp_path, MINIMAL + '[peer]\naddress = "198.18.0.2:7400"\n'
                     'listen = "198.18.0.1:7400"\n')
    assert (both.peer.address, both.peer.listen) == ("198.18.0.2:7400", "198.18.0.1:7400")


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:7400", ("127.0.0.1", 7400)),
    ("[::1]:9", ("::1", 9)),
    ("sink.example:65535", ("sink.example", 65535)),
])
def test_parse_address(value, expected):
    assert parse_address(value, key="peer.address") == expected


def test_unix_control_socket_skips_address_check(tmp_path):
    cfg = load_text(tmp_path, MINIMAL + "[control]\nlisten = \"unix:/run/r.sock\"\n")
    assert cfg.control.listen == "unix:/run/r.sock"


@pytest.mark.parametrize("value", ["desktop.lan:7401", "http://desktop.lan", "desktop.lan/",
                                   "-x.lan", "a b", "", "desktop..lan"])
def test_bad_allowed_host(tmp_path, value):
    expect_error(tmp_path, MINIMAL + f"[control]\nallowed_hosts = [\"ok.lan\", \"{value}\"]\n",
                 "control.allowed_hosts[1]", "not a host name or IP address", repr(value))


def test_allowed_hosts_default_empty_and_must_be_a_list(tmp_path):
    assert load_text(tmp_path, MINIMAL).control.allowed_hosts == ()
    expect_error(tmp_path, MINIMAL + "[control]\nallowed_hosts = \"desktop.lan\"\n",
                 "control.allowed_hosts", "expected a list")


@pytest.mark.parametrize("value", [
    "ABCD",                                    # too short
    "0" * 52,                                  # right length, not base32
    "A" * 53,
])
def test_bad_peer_id(tmp_path, value):
    expect_error(tmp_path, MINIMAL + f"[peer]\nid = \"{value}\"\n", "peer.id", "node ID")


def test_peer_id_accepted_in_any_case_without_dashes(tmp_path):
    raw = PEER_ID.replace("-", "").lower()
    cfg = load_text(tmp_path, MINIMAL + f"[peer]\nid = \"{raw}\"\n")
    assert cfg.peer.id == raw


def test_insecure_plaintext_must_be_a_bool(tmp_path):
    expect_error(tmp_path, MINIMAL + "[peer]\ninsecure_plaintext = \"yes\"\n",
                 "peer.insecure_plaintext")


def test_peer_timeout_and_switch_table(tmp_path):
    cfg = load_text(tmp_path, MINIMAL + "[peer]\ntimeout = 3\n"
                    "[switch]\ntarget_downtime = 0.2\nstep_timeout = 30\n")
    assert cfg.peer.timeout == 3.0
    assert cfg.switch.target_downtime == 0.2 and cfg.switch.step_timeout == 30.0


def test_switch_deadlines_and_throttle(tmp_path):
    cfg = load_text(tmp_path, MINIMAL)
    sw = cfg.switch
    assert (sw.live_deadline, sw.live_deadline_min, sw.live_deadline_factor) == (0.0, 5.0, 4.0)
    assert (sw.throttle, sw.throttle_time) == ("auto", 10.0)
    assert (sw.throttle_initial, sw.throttle_increment) == (30, 20)
    cfg = load_text(tmp_path, MINIMAL + "[switch]\nlive_deadline = 3\nlive_deadline_min = 2\n"
                    "live_deadline_factor = 8\nthrottle = \"auto-converge\"\n"
                    "throttle_time = 0\nthrottle_initial = 50\nthrottle_increment = 25\n")
    sw = cfg.switch
    assert sw.live_deadline == 3.0 and type(sw.live_deadline) is float
    assert (sw.live_deadline_min, sw.live_deadline_factor) == (2.0, 8.0)
    assert (sw.throttle, sw.throttle_time) == ("auto-converge", 0.0)
    assert (sw.throttle_initial, sw.throttle_increment) == (50, 25)


def test_switch_deadline_derived_from_estimate():
    from replicator.config import SwitchConfig
    from replicator.source.converge import deadlines
    sw = SwitchConfig(live_deadline_min=5, live_deadline_factor=4, throttle_time=10)
    assert deadlines(sw, 0.02) == (d := deadlines(sw, 1.0)) and (d.live, d.stop) == (5, 15)
    assert (deadlines(sw, 3.0).live, deadlines(sw, 3.0).stop) == (12, 22)
    explicit = SwitchConfig(live_deadline=2, throttle_time=1)
    assert (deadlines(explicit, 100).live, deadlines(explicit, 100).stop) == (2, 3)


@pytest.mark.parametrize("text,key", [
    ("live_deadline = -1", "switch.live_deadline"),
    ("throttle_time = -0.5", "switch.throttle_time"),
    ("live_deadline_min = 0", "switch.live_deadline_min"),
    ("live_deadline_factor = 0", "switch.live_deadline_factor"),
    ("throttle = \"cgroup\"", "switch.throttle"),
    ("throttle_initial = 0", "switch.throttle_initial"),
    ("throttle_initial = 100", "switch.throttle_initial"),
    ("throttle_increment = 0", "switch.throttle_increment"),
    ("live_deadlines = 3", "switch.live_deadlines"),
])
def test_bad_switch_deadlines_and_throttle(tmp_path, text, key):
    expect_error(tmp_path, MINIMAL + f"[switch]\n{text}\n", key)


def test_peer_timeout_at_least_one_second(tmp_path):
    expect_error(tmp_path, MINIMAL + "[peer]\ntimeout = 0.5\n", "peer.timeout")


def test_unauthenticated_connection_limits(tmp_path):
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.peer.handshake_timeout == 5.0
    assert (cfg.peer.max_unauthenticated, cfg.peer.max_unauthenticated_per_address) == (64, 32)
    cfg = load_text(tmp_path, MINIMAL + "[peer]\nhandshake_timeout = 2\nmax_unauthenticated = 8"
                    "\nmax_unauthenticated_per_address = 8\n")
    assert cfg.peer.handshake_timeout == 2.0 and type(cfg.peer.handshake_timeout) is float
    assert (cfg.peer.max_unauthenticated, cfg.peer.max_unauthenticated_per_address) == (8, 8)


@pytest.mark.parametrize("text,key", [
    ("handshake_timeout = 0.1", "peer.handshake_timeout"),
    ("handshake_timeout = 1000", "peer.handshake_timeout"),
    ("max_unauthenticated = 0", "peer.max_unauthenticated"),
    ("max_unauthenticated_per_address = 0", "peer.max_unauthenticated_per_address"),
    ("max_unauthenticated = 8\nmax_unauthenticated_per_address = 9",
     "peer.max_unauthenticated_per_address"),
    ("max_unauthenticated = \"many\"", "peer.max_unauthenticated"),
])
def test_bad_unauthenticated_connection_limits(tmp_path, text, key):
    expect_error(tmp_path, MINIMAL + f"[peer]\n{text}\n", key)


@pytest.mark.parametrize("field,value", [
    ("step_timeout", "0"), ("step_timeout", "-1"),
    ("target_downtime", "0"), ("target_downtime", "-0.05"),
])
def test_switch_values_must_be_positive(tmp_path, field, value):
    # The error names the offending dotted key, not just its table.
    expect_error(tmp_path, MINIMAL + f"[switch]\n{field} = {value}\n", f"switch.{field}")


# --- files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and "not found" in str(ei.value)
    assert isinstance(ei.value, ReplicatorError)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("text", [
    "[stream\nbatch_pages = 1\n",
    "[stream]\nbatch_pages = \n",
    "[stream]\nbatch_pages = 1\nbatch_pages = 2\n",      # duplicate key
    "[[domain.regions]]\nname = 'a\n",
])
def test_invalid_toml(tmp_path, text):
    expect_error(tmp_path, text, None, "not valid TOML")


def test_non_utf8_file_is_a_config_error(tmp_path):
    # A config saved in Latin-1 must produce a ConfigError naming the file, not a traceback
    # (tomllib raises UnicodeDecodeError, which is neither OSError nor TOMLDecodeError).
    p = tmp_path / "latin1.toml"
    p.write_bytes(MINIMAL.encode() + b"[node]\nname = \"caf\xe9\"\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value)


# --- validation rules (_validate) --------------------------------------------------------------------


def test_duplicate_region_names(tmp_path):
    text = ("[[domain.regions]]\nname = \"ram\"\npath = \"/a\"\n"
            "[[domain.regions]]\nname = \"vram\"\npath = \"/b\"\n"
            "[[domain.regions]]\nname = \"ram\"\npath = \"/c\"\n")
    expect_error(tmp_path, text, "domain.regions[2].name", "duplicate", "'ram'")


@pytest.mark.parametrize("name", ["", "-ram", ".ram", "ram/0", "ram 0", "r" * 65, "räm"])
def test_bad_region_name(tmp_path, name):
    expect_error(tmp_path, f"[[domain.regions]]\nname = \"{name}\"\npath = \"/a\"\n",
                 "domain.regions[0].name")


def test_region_name_of_64_chars_is_fine(tmp_path):
    cfg = load_text(tmp_path, f"[[domain.regions]]\nname = \"{'r' * 64}\"\npath = \"/a\"\n")
    assert cfg.domain.regions[0].name == "r" * 64


@pytest.mark.parametrize("size", ["4097", "\"1000\"", "\"1G\""])
def test_region_size_not_page_multiple(tmp_path, size):
    expect_error(tmp_path, f"[[domain.regions]]\nname = \"r\"\npath = \"/a\"\nsize = {size}\n",
                 "domain.regions[0].size", "multiple of 4096")


@pytest.mark.parametrize("name", ["", "vm/1", "-vm", "v" * 65, "vm 1"])
def test_bad_domain_name(tmp_path, name):
    expect_error(tmp_path, MINIMAL + f"[domain]\nname = \"{name}\"\n", "domain.name")


def test_file_source_needs_regions(tmp_path):
    expect_error(tmp_path, "[node]\nrole = \"source\"\n", "domain.regions", "at least one region")


def test_file_sink_needs_no_regions(tmp_path):
    cfg = load_text(tmp_path, "[node]\nrole = \"sink\"\n")
    assert cfg.node.role == "sink" and cfg.domain.regions == ()


def test_qemu_domain_needs_no_regions(tmp_path):
    cfg = load_text(tmp_path, "[domain]\ndriver = \"qemu\"\n")
    assert cfg.domain.driver == "qemu"


@pytest.mark.parametrize("ram", ["\"1000MB\"", "4097"])
def test_qemu_ram_size_page_multiple(tmp_path, ram):
    expect_error(tmp_path, f"[domain]\ndriver = \"qemu\"\n[domain.qemu]\nram_size = {ram}\n",
                 "domain.qemu.ram_size", "multiple of 4096")


def test_qemu_ram_size_not_checked_for_file_driver(tmp_path):
    cfg = load_text(tmp_path, MINIMAL + "[domain.qemu]\nram_size = 4097\n")
    assert cfg.domain.qemu.ram_size == 4097


@pytest.mark.parametrize("stream,key", [
    ("batch_pages = 0", "stream.batch_pages"),
    ("batch_pages = 4097", "stream.batch_pages"),
    ("batch_pages = -1", "stream.batch_pages"),
    ("batch_pages = 256\nmax_frame_bytes = \"2MiB\"\nzstd_level = 0", "stream.zstd_level"),
    ("zstd_level = 20", "stream.zstd_level"),
    ("batch_pages = 256\nmax_frame_bytes = 2097151", "stream.max_frame_bytes"),
    ("batch_pages = 4096\nmax_frame_bytes = \"16MiB\"", "stream.max_frame_bytes"),
    ("scan_interval_min = 0", "stream.scan_interval_max"),
    ("scan_interval_min = -0.5", "stream.scan_interval_max"),
    ("scan_interval_min = 2.0\nscan_interval_max = 1.0", "stream.scan_interval_max"),
    ("max_inflight_epochs = 0", "stream.max_inflight_epochs"),
    ("precopy_send_buffer = 4095", "stream.precopy_send_buffer"),
    ("precopy_burst = 0.001", "stream.precopy_burst"),
    ("precopy_burst = 0.5\nprecopy_interval = 0.25", "stream.precopy_burst"),
    ("precopy_interval = 0", "stream.precopy_interval"),
    ("precopy_send_buffer = \"65MiB\"", "stream.precopy_send_buffer"),
])
def test_stream_rules(tmp_path, stream, key):
    expect_error(tmp_path, MINIMAL + "[stream]\n" + stream + "\n", key)


@pytest.mark.parametrize("stream", [
    "batch_pages = 1\nmax_frame_bytes = 8192",
    "batch_pages = 256\nmax_frame_bytes = 2097152",
    "batch_pages = 4096\nmax_frame_bytes = \"32MiB\"",
    "zstd_level = 1", "zstd_level = 19",
    "scan_interval_min = 0.5\nscan_interval_max = 0.5",
    "max_inflight_epochs = 1",
    "precopy_send_buffer = 0", "precopy_send_buffer = \"4KiB\"",
    "precopy_burst = 0.01", "precopy_burst = 0.25",
    "precopy_send_buffer = \"64MiB\"",
])
def test_stream_rule_boundaries_accepted(tmp_path, stream):
    load_text(tmp_path, MINIMAL + "[stream]\n" + stream + "\n")


def test_config_error_attributes():
    err = ConfigError("boom", path="/etc/r.toml", key="stream.x")
    assert str(err) == "/etc/r.toml: stream.x: boom"
    assert err.path == "/etc/r.toml" and err.key == "stream.x"
    assert str(ConfigError("boom")) == "boom"


def test_dataclass_defaults_are_valid():
    # The defaults alone (plus one region) pass validation: nothing in the schema contradicts it.
    cfg = load_config({"domain": {"regions": [{"name": "ram", "path": "/x"}]}})
    assert isinstance(cfg.domain, DomainConfig)


# --- QEMU domain: disks, names, counts -----------------------------------------------------------

QEMU_SINK = "[node]\nrole = \"sink\"\n[domain]\ndriver = \"qemu\"\n"


def test_disks_short_form_and_tables(tmp_path):
    short = load_text(tmp_path, QEMU_SINK + "[domain.qemu]\ndisks = [\"/srv/vm/a.img\"]\n")
    assert short.domain.qemu.disks == (DiskConfig(Path("/srv/vm/a.img"), "auto"),)
    inline = load_text(tmp_path, QEMU_SINK + "[domain.qemu]\ndisks = [\"/srv/a.img\", "
                       "{path = \"/srv/b.qcow2\", format = \"qcow2\"}]\n")
    assert inline.domain.qemu.disks == (DiskConfig(Path("/srv/a.img"), "auto"),
                                        DiskConfig(Path("/srv/b.qcow2"), "qcow2"))
    tables = load_text(tmp_path, QEMU_SINK + textwrap.dedent("""\
        [[domain.qemu.disks]]
        path = "/srv/vm/work.qcow2"
        format = "qcow2"
        [[domain.qemu.disks]]
        path = "/srv/vm/data.img"
        format = "raw"
        """))
    assert tables.domain.qemu.disks == (DiskConfig(Path("/srv/vm/work.qcow2"), "qcow2"),
                                        DiskConfig(Path("/srv/vm/data.img"), "raw"))


@pytest.mark.parametrize("disks,key,problem", [
    ('[{path = "/a.img", format = "vmdk"}]', "domain.qemu.disks[0].format", "must be one of"),
    ('[{path = "/a.img", fromat = "raw"}]', "domain.qemu.disks[0].fromat", "unknown key"),
    ('[{format = "raw"}]', "domain.qemu.disks[0]", "incomplete"),
    ('["vm/a.img"]', "domain.qemu.disks[0].path", "absolute"),
    ('["/a.img", {path = "/a.img", format = "raw"}]', "domain.qemu.disks[1].path", "twice"),
    ('["/a\\u0000b"]', "domain.qemu.disks[0].path", "NUL"),
])
def test_bad_disks(tmp_path, disks, key, problem):
    expect_error(tmp_path, QEMU_SINK + f"[domain.qemu]\ndisks = {disks}\n", key, problem)


@pytest.mark.parametrize("key,value", [
    ("machine", "q35,accel=kvm"), ("machine", "-q35"), ("cpu_model", "max,+vmx"),
    ("cpu_model", "host -device x"),
])
def test_machine_and_cpu_model_are_plain_names(tmp_path, key, value):
    expect_error(tmp_path, QEMU_SINK + f"[domain.qemu]\n{key} = \"{value}\"\n",
                 f"domain.qemu.{key}", "not a plain name")


@pytest.mark.parametrize("vcpus", [-1, 256])
def test_vcpus_range(tmp_path, vcpus):
    expect_error(tmp_path, QEMU_SINK + f"[domain.qemu]\nvcpus = {vcpus}\n",
                 "domain.qemu.vcpus", "between 1 and 255")


def test_max_ram_size(tmp_path):
    cfg = load_text(tmp_path, QEMU_SINK + "max_ram_size = \"16GiB\"\n")
    assert cfg.domain.max_ram_size == 16 * 1024**3
    expect_error(tmp_path, QEMU_SINK + "max_ram_size = 0\n", "domain.max_ram_size",
                 "at least one page")


def test_nul_in_names_refused(tmp_path):
    expect_error(tmp_path, '[domain]\nname = "vm\\u0000x"\n' + MINIMAL, "domain.name")
    expect_error(tmp_path, '[[domain.regions]]\nname = "ram\\u0000"\npath = "/x"\n',
                 "domain.regions[0].name")


def test_libvirt_domain_config(tmp_path):
    cfg = load_config({"node": {"role": "source", "state_dir": str(tmp_path)},
                       "domain": {"name": "work", "driver": "libvirt",
                                  "libvirt": {"name": "win11"}}})
    assert cfg.domain.is_qemu and cfg.domain.libvirt_name == "win11"
    assert cfg.domain.tracker == "qemu-precopy"              # auto for a QEMU domain
    assert cfg.domain.libvirt.uri == "qemu:///system"
    with pytest.raises(ConfigError, match="domain.libvirt.uri"):
        load_config({"domain": {"driver": "libvirt", "libvirt": {"uri": "xen:///system"}}})
    with pytest.raises(ConfigError, match="launch, qmp_socket and ram_path"):
        load_config({"domain": {"driver": "libvirt", "qemu": {"launch": True}}})
