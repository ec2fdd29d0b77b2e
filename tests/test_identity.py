"""A node's identity files (replicator.identity), through the real CLI and daemon.

The node ID is the hash of node.crt, and the peer pins it: the files are created once, and a
missing or damaged one is refused with a way out, never silently replaced by a new identity.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.identity import Identity

from .conftest import ROOT
from .test_faults import daemons, free_port, sink_table  # noqa: F401  (fixture)


def replicator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path]:
    """(config file, identity dir) of a sink paired with some source."""
    peer = Identity.load_or_create(tmp_path / "peer", "desktop").node_id
    cfg = tmp_path / "laptop.toml"
    cfg.write_text(f'[node]\nname = "laptop"\nrole = "sink"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[domain]\nname = "vm1"\n[peer]\nid = "{peer}"\n')
    return cfg, tmp_path / "state" / "identity"


def node_id(cfg: Path) -> str:
    res = replicator("id", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def refused(cfg: Path) -> str:
    """`replicator id` must fail with a message, not a traceback; returns the message."""
    res = replicator("id", "-c", str(cfg))
    assert res.returncode == 2 and not res.stdout, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("replicator: "), res.stderr
    return res.stderr


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_identity_is_created_once_private_and_stable(node):
    cfg, ident = node
    first = node_id(cfg)
    assert node_id(cfg) == first
    for name in ("node.key", "node.crt"):
        assert stat.S_IMODE(os.stat(ident / name).st_mode) == 0o600
    assert sorted(p.name for p in ident.iterdir()) == ["node.crt", "node.key"]


def test_missing_certificate_is_refused_not_replaced(node):
    cfg, ident = node
    old = node_id(cfg)
    (ident / "node.crt").unlink()
    key = (ident / "node.key").read_bytes()
    msg = refused(cfg)
    assert f"{ident / 'node.crt'} is missing" in msg and str(ident / "node.key") in msg, msg
    assert "change this node's ID" in msg and "replicator pair" in msg, msg
    assert snapshot(ident) == {"node.key": key}, "the identity files were touched"
    # The way out the message names: remove the key on purpose -> a new identity.
    (ident / "node.key").unlink()
    assert node_id(cfg) != old


def test_missing_key_is_refused_naming_the_id_it_held(node):
    cfg, ident = node
    old = node_id(cfg)
    (ident / "node.key").unlink()
    cert = (ident / "node.crt").read_bytes()
    msg = refused(cfg)
    assert f"{ident / 'node.key'} is missing" in msg and old in msg, msg
    assert "Restore node.key" in msg and "replicator pair" in msg, msg
    assert snapshot(ident) == {"node.crt": cert}


@pytest.mark.parametrize("damage", ["empty-cert", "garbage-cert", "empty-key", "garbage-key",
                                    "key-of-another-node", "cert-is-a-directory"])
def test_damaged_identity_files_are_refused_with_the_file_named(node, tmp_path, damage):
    cfg, ident = node
    old = node_id(cfg)
    what, name = {"empty-cert": (b"", "node.crt"), "garbage-cert": (b"-----BEGIN", "node.crt"),
                  "empty-key": (b"", "node.key"), "garbage-key": (b"\x00" * 64, "node.key"),
                  "key-of-another-node": (None, "node.key"),
                  "cert-is-a-directory": (None, "node.crt")}[damage]
    path = ident / name
    if damage == "key-of-another-node":
        other = Identity.load_or_create(tmp_path / "other", "laptop")
        path.write_bytes(other.key_path.read_bytes())
    elif damage == "cert-is-a-directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(what)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in ident.iterdir()}
    msg = refused(cfg)
    assert str(path) in msg and "replicator pair" in msg, msg
    if damage == "key-of-another-node":
        assert old in msg and "is not the key of" in msg, msg
    after = {p.name: (p.read_bytes() if p.is_file() else None) for p in ident.iterdir()}
    assert after == before, "the identity files were touched"


def test_daemon_without_its_certificate_refuses_to_start(tmp_path, daemons):
    peer = Identity.load_or_create(tmp_path / "peer", "desktop").node_id
    d = daemons("sink", tmp_path, sink_table(tmp_path, free_port(), peer))
    ident = d.state_dir / "identity"
    Identity.load_or_create(ident, "laptop")
    (ident / "node.crt").unlink()
    d.start()
    try:
        rc = d.proc.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon started without its certificate:\n"
                             + d.log.read_text()[-3000:]) from None
    log = d.log.read_text()
    assert rc == 2, log
    assert f"{ident / 'node.crt'} is missing" in log and "replicator pair" in log, log
    assert "Traceback" not in log, log
    assert not (ident / "node.crt").exists()




async def test_insecure_plaintext_is_warned_about_at_every_start(tmp_path, daemons):
    table = sink_table(tmp_path, free_port(), "")
    table["peer"] = {**table["peer"], "insecure_plaintext": True}
    del table["peer"]["id"]
    d = daemons("sink", tmp_path, table)
    for start in (1, 2):
        d.start()
        await d.wait_api()
        d.terminate()
        lines = [ln for ln in d.log.read_text().splitlines() if "insecure_plaintext" in ln]
        assert len(lines) == start, d.log.read_text()
        assert all(" WARNING " in ln and "INSECURE" in ln and str(d.config) in ln
                   and "neither encrypted nor authenticated" in ln for ln in lines), lines
