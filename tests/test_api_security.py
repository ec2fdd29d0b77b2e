"""The control API against hostile or sloppy clients, over real HTTP on 127.0.0.1.

Raw requests (exact bytes: bad bodies, non-ASCII headers, foreign Host headers) go through a
socket; the login flow uses aiohttp's client with a cookie jar, as a browser keeps cookies. The
last tests run the real daemon and the real ``replicator ui`` command in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from replicator.control import security
from replicator.control.api import start_api

from .conftest import pair_ids

TOKEN = "s3cret-token-for-tests"
MiB = 1024 * 1024


class StubNode:
    """The API's view of a daemon; records switches so a test sees whether one started."""

    def __init__(self) -> None:
        self.switches: list[str] = []
        self.paused = 0
        self.metrics = self

    def exposition(self) -> bytes:
        return b"replicator_up 1\n"

    def status(self) -> dict:
        return {"role": "source", "node": "desktop", "domain": "vm1"}

    async def switch(self, mode: str) -> dict:
        self.switches.append(mode)
        return {"mode": mode, "peer": "laptop", "downtime_ms": 1.0, "time_to_switch_ms": 2.0}

    async def pause_replication(self) -> dict:
        self.paused += 1
        return {"replication": "paused"}


@contextlib.asynccontextmanager
async def serving(listen: str = "127.0.0.1:0", **kw: Any) -> AsyncIterator[tuple[str, StubNode]]:
    node = StubNode()
    runner, url = await start_api(node, listen, TOKEN, **kw)
    try:
        yield url, node
    finally:
        await runner.cleanup()


async def raw(url: str, method: str, path: str, headers: list[tuple[str, bytes]] | None = None,
              body: bytes = b"", host: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with exactly these header bytes; (status, headers, body).

    host=None sends the URL's own host:port; b"" leaves the Host header out."""
    if url.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(url[5:])
        hostport = b"localhost"
    else:
        hostport = url.split("//", 1)[1].encode()
        h, _, p = hostport.decode().rpartition(":")
        reader, writer = await asyncio.open_connection(h.strip("[]"), int(p))
    lines = [f"{method} {path} HTTP/1.1".encode()]
    host = hostport if host is None else host
    if host:
        lines.append(b"Host: " + host)
    for k, v in headers or []:
        lines.append(k.encode() + b": " + v)
    lines += [b"Connection: close", b"Content-Length: %d" % len(body), b"", b""]
    writer.write(b"\r\n".join(lines) + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    first, *hdrs = head.decode("latin-1").split("\r\n")
    out: dict[str, str] = {}
    for line in hdrs:
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), v.strip())
    return int(first.split()[1]), out, rest


AUTH = [("Authorization", b"Bearer " + TOKEN.encode()), ("Content-Type", b"application/json")]


# --- request bodies and tokens ------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"[1]", b'"live"', b"null", b"1", b"true", b"\xff\xfe{}",
                                  b'{"mode": "live"', b'{"mode": 1}', b'{"mode": "fast"}',
                                  b'{"mdoe": "stop"}', b"NaN"])
async def test_switch_body_that_is_not_a_json_object_with_a_mode_is_400(body):
    async with serving() as (url, node):
        status, _, reply = await raw(url, "POST", "/api/v1/switch", AUTH, body)
        assert status == 400, (status, reply)
        err = json.loads(reply)["error"]
        assert "Traceback" not in err and len(err) < 300, err
        assert node.switches == []                      # nothing started, not even "live"


async def test_switch_body_empty_means_live_and_an_object_chooses_the_mode():
    async with serving() as (url, node):
        assert (await raw(url, "POST", "/api/v1/switch", AUTH, b""))[0] == 200
        assert (await raw(url, "POST", "/api/v1/switch", AUTH, b'{"mode": "stop"}'))[0] == 200
        assert (await raw(url, "POST", "/api/v1/switch", AUTH, b"{}"))[0] == 200
        assert node.switches == ["live", "stop", "live"]


@pytest.mark.parametrize("given", ["Bearer t\u00f6ken".encode("latin-1"),
                                   "Bearer t\u00f6ken".encode(), b"Bearer \xff\xfe",
                                   ("Bearer " + TOKEN + "\u00e9").encode()])
async def test_non_ascii_bearer_token_is_401(given):
    async with serving() as (url, node):
        for path in ("/api/v1/switch", "/api/v1/pause", "/api/v1/login-link"):
            status, _, reply = await raw(url, "POST", path, [("Authorization", given)], b"{}")
            assert status == 401, (path, status, reply)
            assert "bearer token" in json.loads(reply)["error"]
        assert node.switches == [] and node.paused == 0


# --- Host header (DNS rebinding) and framing ---------------------------------------------------

async def test_foreign_host_header_is_refused_and_local_names_are_served():
    async with serving() as (url, node):
        port = url.rsplit(":", 1)[1].encode()
        for host in (b"evil.example", b"evil.example:" + port, b"127.0.0.1.evil.example",
                     b"localhost.evil.example:" + port, b"10.1.2.3:" + port, b"[::2]",
                     b"127.0.0.1:" + port + b"@evil", b" "):
            for method, path in (("GET", "/"), ("GET", "/api/v1/status"), ("GET", "/metrics"),
                                 ("GET", "/healthz"), ("POST", "/api/v1/switch")):
                status, hdrs, reply = await raw(url, method, path, AUTH, b"{}", host=host)
                assert status == 403, (host, path, status, reply[:200])
                assert b"desktop" not in reply and b"replicator_up" not in reply
                msg = json.loads(reply)["error"]
                assert "Host" in msg and "control.allowed_hosts" in msg, msg
        assert node.switches == []
        for host in (b"127.0.0.1:" + port, b"127.0.0.1", b"localhost", b"LocalHost:" + port,
                     b"localhost.:" + port, b"[::1]:" + port, b"[::1]"):
            status, _, reply = await raw(url, "GET", "/api/v1/status", host=host)
            assert status == 200, (host, status, reply)
            assert json.loads(reply)["node"] == "desktop"


async def test_configured_extra_host_names_are_served():
    async with serving(allowed_hosts=("desktop.lan", "10.0.0.5")) as (url, _):
        for host, want in ((b"desktop.lan:7401", 200), (b"DESKTOP.LAN", 200),
                           (b"10.0.0.5:7401", 200), (b"laptop.lan:7401", 403)):
            assert (await raw(url, "GET", "/metrics", host=host))[0] == want, host


async def test_unix_socket_serves_any_host(tmp_path):
    sock = tmp_path / "api.sock"
    async with serving(f"unix:{sock}") as (url, _):
        status, _, reply = await raw(url, "GET", "/api/v1/status", host=b"whatever.example")
        assert status == 200 and json.loads(reply)["node"] == "desktop"
        assert (await raw(url, "POST", "/api/v1/switch", AUTH, b"{}", host=b"x.example"))[0] == 200


async def test_responses_forbid_framing():
    async with serving() as (url, _):
        for path in ("/", "/api/v1/status"):
            status, hdrs, _ = await raw(url, "GET", path)
            assert status == 200
            csp = [d.strip() for d in hdrs["content-security-policy"].split(";")]
            assert "frame-ancestors 'none'" in csp, csp
            assert hdrs["x-frame-options"] == "DENY"
            assert hdrs["x-content-type-options"] == "nosniff"


# --- one-time login link and session cookie -----------------------------------------------------

def _jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)          # keep cookies for 127.0.0.1, as browsers do


async def _login_link(s: aiohttp.ClientSession, url: str) -> str:
    async with s.post(url + "/api/v1/login-link",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200, await r.text()
        data = await r.json()
    assert data["expires_in_seconds"] == security.LOGIN_LINK_SECONDS == 120
    assert re.fullmatch(r"/login\?once=[A-Za-z0-9_-]{40,}", data["path"]), data
    return url + data["path"]


async def test_login_link_sets_a_strict_httponly_cookie_once_and_the_cookie_can_switch():
    async with serving() as (url, node), \
            aiohttp.ClientSession(cookie_jar=_jar()) as s:
        origin = {"Origin": url}
        # Minting a link needs the bearer token; the cookie alone does not.
        async with s.post(url + "/api/v1/login-link") as r:
            assert r.status == 401
        link = await _login_link(s, url)
        async with s.get(link, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            cookie = r.headers["Set-Cookie"]
            assert r.headers["Cache-Control"] == "no-store"
        name, _, rest = cookie.partition("=")
        attrs = [a.strip().lower() for a in rest.split(";")[1:]]
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs, cookie
        assert not any(a.startswith(("max-age", "expires")) for a in attrs), cookie
        async with s.get(url + "/api/v1/status") as r:
            assert (await r.json())["api"]["session"] is True
        async with s.post(url + "/api/v1/switch", json={"mode": "stop"}, headers=origin) as r:
            assert r.status == 200, await r.text()
        async with s.post(url + "/api/v1/pause", headers=origin) as r:
            assert r.status == 200, await r.text()
        assert node.switches == ["stop"] and node.paused == 1

        # CSRF: a cookie-authenticated call must come from the page's own origin.
        for hdrs in ({}, {"Origin": "null"}, {"Origin": "http://evil.example"},
                     {"Origin": url.replace("127.0.0.1", "localhost")},
                     {"Origin": url + "0"}):
            async with s.post(url + "/api/v1/switch", json={}, headers=hdrs) as r:
                assert r.status == 403, (hdrs, r.status)
                assert "origin" in (await r.json())["error"].lower()
        # A cookie cannot mint further links either.
        async with s.post(url + "/api/v1/login-link", headers=origin) as r:
            assert r.status == 401
        assert node.switches == ["stop"]

    # The link works once; a browser without the cookie gets nothing.
    async with serving() as (url, node), aiohttp.ClientSession(cookie_jar=_jar()) as s:
        link = await _login_link(s, url)
        async with s.get(link, allow_redirects=False) as r:
            assert r.status == 303
        s.cookie_jar.clear()
        async with s.get(link, allow_redirects=False) as r:
            assert r.status == 403 and "replicator ui" in await r.text()
            assert "Set-Cookie" not in r.headers
        async with s.get(url + "/login?once=forged", allow_redirects=False) as r:
            assert r.status == 403
        async with s.get(url + "/login", allow_redirects=False) as r:
            assert r.status == 403
        async with s.get(url + "/api/v1/status") as r:
            assert (await r.json())["api"]["session"] is False
        async with s.post(url + "/api/v1/switch", json={}, headers={"Origin": url}) as r:
            assert r.status == 401
        # A made-up cookie of the right name is no session.
        name = security.Sessions(TOKEN).cookie_name
        async with s.post(url + "/api/v1/switch", json={}, headers={
                "Origin": url, "Cookie": f"{name}=made-up"}) as r:
            assert r.status == 401
        assert node.switches == []


async def test_login_link_expires(monkeypatch):
    monkeypatch.setattr(security, "LOGIN_LINK_SECONDS", 0.3)
    async with serving() as (url, _), aiohttp.ClientSession(cookie_jar=_jar()) as s:
        async with s.post(url + "/api/v1/login-link",
                          headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            path = (await r.json())["path"]
        await asyncio.sleep(0.5)
        async with s.get(url + path, allow_redirects=False) as r:
            assert r.status == 403 and "expired" in await r.text()


async def test_outstanding_login_links_are_bounded():
    async with serving() as (url, _), aiohttp.ClientSession(cookie_jar=_jar()) as s:
        links = [await _login_link(s, url) for _ in range(security.MAX_LOGIN_LINKS + 5)]
        async with s.get(links[0], allow_redirects=False) as r:
            assert r.status == 403                           # the oldest were dropped
        async with s.get(links[-1], allow_redirects=False) as r:
            assert r.status == 303


# --- the real daemon and the real `replicator ui` -----------------------------------------------

class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "run", "-c",
                                      str(config)], stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def source_daemon(tmp_path):
    """A real source daemon (file domain, no sink reachable) whose API listens on 127.0.0.2."""
    state = tmp_path / "state"
    _, sink_id = pair_ids(state, tmp_path / "sink")
    (tmp_path / "ram").write_bytes(bytes(MiB))
    cfg = tmp_path / "source.toml"
    cfg.write_text(f"""
[node]
name = "desktop-test"
role = "source"
state_dir = "{state}"

[domain]
name = "vm1"
regions = [{{ name = "ram0", path = "{tmp_path / 'ram'}" }}]

[peer]
address = "127.0.0.1:1"
id = "{sink_id}"

[control]
listen = "127.0.0.2:0"
allowed_hosts = ["scrape.example"]
""")
    d = Daemon(cfg, tmp_path / "daemon.log")
    url_file = state / "api-url"
    deadline = time.monotonic() + 30
    while not url_file.exists() or not url_file.read_text().endswith("\n"):
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    yield cfg, url_file.read_text().strip(), state / "api-token", d
    d.stop()


def _ui(cfg: Path, url: str, *extra: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator.cli", "ui", "-c", str(cfg),
                           "--url", url, *extra], capture_output=True, text=True, timeout=60,
                          env=env)


async def test_daemon_host_check_follows_the_config_and_ui_logs_a_browser_in(source_daemon,
                                                                            tmp_path):
    cfg, url, token_file, daemon = source_daemon
    assert url.startswith("http://127.0.0.2:"), url
    port = url.rsplit(":", 1)[1].encode()
    # Prometheus scraping by the listen address or by a configured name; nothing else.
    for host, want in ((b"127.0.0.2:" + port, 200), (b"scrape.example:" + port, 200),
                       (b"localhost:" + port, 200), (b"laptop.example:" + port, 403)):
        status, _, body = await raw(url, "GET", "/metrics", host=host)
        assert status == want, (host, status, body[:200])
        assert (b"replicator_" in body) == (want == 200)

    # `replicator ui --print`: the token file is read, the daemon hands out a one-time link.
    done = await asyncio.to_thread(_ui, cfg, url, "--print")
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert re.fullmatch(re.escape(url) + r"/login\?once=[A-Za-z0-9_-]{40,}", link), done.stdout
    assert "2 minutes" in done.stderr and "once" in done.stderr, done.stderr
    async with aiohttp.ClientSession(cookie_jar=_jar()) as s:
        async with s.post(url + "/api/v1/pause", headers={"Origin": url}) as r:
            assert r.status == 401                      # not logged in yet
        async with s.get(link) as r:                     # follows the redirect to the page
            assert r.status == 200 and str(r.url) == url + "/"
            assert "Switch now" in await r.text()
        async with s.post(url + "/api/v1/pause", headers={"Origin": url}) as r:
            assert r.status == 200 and (await r.json()) == {"replication": "paused"}
        async with s.post(url + "/api/v1/resume", headers={"Origin": url}) as r:
            assert r.status == 200 and (await r.json()) == {"replication": "running"}
    assert "replication paused by request" in daemon.log()

    # Without --print, with a display: the browser ($BROWSER here) gets a private file that
    # redirects to the link, so the one-time link never shows in a process list.
    opened = tmp_path / "opened"
    fake_browser = tmp_path / "browser.sh"
    fake_browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    fake_browser.chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DISPLAY": ":99",
           "BROWSER": f"{fake_browser} %s", "XDG_RUNTIME_DIR": str(runtime)}
    done = await asyncio.to_thread(_ui, cfg, url, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "/login?once=" not in done.stderr, (done.stdout, done.stderr)
    target = opened.read_text()
    assert target.startswith("file://"), target
    page = Path(target[7:])
    assert page.parent == runtime and page.stat().st_mode & 0o777 == 0o600
    m = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', page.read_text())
    assert m, page.read_text()
    async with aiohttp.ClientSession(cookie_jar=_jar()) as s:
        async with s.get(m[1].replace("&amp;", "&")) as r:
            assert r.status == 200 and str(r.url) == url + "/"
        async with s.get(url + "/api/v1/status") as r:
            assert (await r.json())["api"]["session"] is True

    # No display: the link is printed instead.
    env.pop("DISPLAY")
    done = await asyncio.to_thread(_ui, cfg, url, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(url + "/login?once="), done.stdout
    assert "no display" in done.stderr, done.stderr

    # Without a readable token file `ui` says so, and a unix socket is refused with a reason.
    done = await asyncio.to_thread(_ui, cfg, url, "--print", "--token-file",
                                   str(tmp_path / "missing"))
    assert done.returncode == 2 and "no API token" in done.stderr, done.stderr
    done = await asyncio.to_thread(_ui, cfg, "unix:/run/x.sock", "--print")
    assert done.returncode == 2 and "unix socket" in done.stderr, done.stderr
    assert token_file.read_text().strip() not in done.stderr
