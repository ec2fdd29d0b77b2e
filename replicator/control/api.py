"""The local control API: health, status, metrics, and the switch button.

Binds 127.0.0.1 by default (or a 0600 unix socket). Reading is open to whoever can reach the
socket; anything that changes state needs the bearer token from the node's 0600 token file, or a
browser session opened with a one-time link from ``replicator ui`` (see security.py). Over TCP
only this node's own names are served (Host check). Errors are JSON objects with a message a
person understands.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol

from aiohttp import web

from ..aio import wait_for
from ..errors import ConfigError, ReplicatorError, SwitchError, SwitchInProgress
from ..metrics import CpuUse
from . import security

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


class Node(Protocol):
    """What the API needs from a daemon (source or sink)."""
    metrics: Any

    def status(self) -> dict: ...
    async def switch(self, mode: str) -> dict: ...


def load_or_create_token(path: Path) -> str:
    """Read the API token, creating a random one (mode 0600) if the file does not exist."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        if token:
            return token
        # O_EXCL below would fail with a bare FileExistsError; say what is wrong instead.
        raise ConfigError(f"API token file {path} is empty: write a random string into it, "
                          "or remove it to have one created")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


SWITCH_KEYS = frozenset({"mode"})
NO_TOKEN = "missing or wrong bearer token (see the node's token file, or run `replicator ui`)"
# Everything but the page: nothing to run, nothing to frame.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def page_csp(html: str) -> str:
    """The page's policy: its own inline script and style (by hash), requests to itself only,
    and no framing (clickjacking the Switch button)."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(
            hashlib.sha256(b.encode()).digest()).decode() for b in bodies) or "'none'"
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


async def _switch_body(request: web.Request) -> dict | str:
    """The switch request's JSON object (an empty body means the defaults), or why not."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "request body is not UTF-8"
    except (ValueError, RecursionError):
        return "request body is not JSON"
    if not isinstance(body, dict):
        return ('request body must be a JSON object like {"mode": "live"}, not '
                + type(body).__name__)
    unknown = sorted(set(body) - SWITCH_KEYS)
    if unknown:
        return f"unknown key(s) {', '.join(map(repr, unknown))} (known: mode)"
    return body


def qemu_pid(status: dict) -> int | None:
    """The pid of the QEMU a node drives, from its status: the domain's on the source, the
    shadow's on the sink; None for a file domain or before the shadow started."""
    pid = status.get("qemu_pid")
    if pid is None:
        shadow = status.get("shadow")
        pid = shadow.get("pid") if isinstance(shadow, dict) else None
    return pid if isinstance(pid, int) and pid > 0 else None


def make_app(node: Node, token: str, token_file: str | None = None, *,
             listen: str = "127.0.0.1:0", allowed_hosts: Iterable[str] = ()) -> web.Application:
    hosts = security.HostCheck(listen, allowed_hosts)
    cpu = CpuUse()
    watch_qemu = getattr(getattr(node, "metrics", None), "watch_qemu", None)
    if watch_qemu is not None:
        watch_qemu(lambda: qemu_pid(node.status()))
    sessions = security.Sessions(token)
    refused_hosts: set[str] = set()            # log each refused name once, not per request
    page = STATIC / "index.html"
    page_html = page.read_text() if page.exists() else ""
    csp_page = page_csp(page_html)

    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not hosts.allows(host):
            if len(refused_hosts) < 64 and host not in refused_hosts:
                refused_hosts.add(host or "")
                log.warning("control API: refused a request for Host %r from %s (serving %s; "
                            "add names to control.allowed_hosts)", host, request.remote,
                            hosts.describe())
            resp: web.StreamResponse = _error(
                403, f"Host {host!r} is not a name of this node's control API (it serves "
                     f"{hosts.describe()}); add the name to control.allowed_hosts in the "
                     "config to allow it")
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                resp = exc
        resp.headers.setdefault("Content-Security-Policy", API_CSP)
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    def refusal(request: web.Request) -> web.Response | None:
        """None when the caller may change state; else the answer that says why not."""
        header = request.headers.get("Authorization")
        if header is not None:                 # a bearer client: the token decides alone
            given = header[7:] if header.startswith("Bearer ") else ""
            if given and security.same_secret(given, token):
                return None
            return _error(401, NO_TOKEN)
        if not sessions.valid(request.cookies.get(sessions.cookie_name)):
            return _error(401, NO_TOKEN)
        # The cookie rides along with any request the browser makes, even one another site
        # triggers; only the page itself sends its own origin.
        if not security.same_origin(request.headers.get("Origin"), request.headers.get("Host")):
            return _error(403, "cross-site request refused: a call with the session cookie "
                               "must come from this node's status page (Origin "
                               f"{request.headers.get('Origin')!r})")
        return None

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        body = node.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def status(request: web.Request) -> web.Response:
        st = node.status()
        # Where the token is (never the token itself), and whether this browser is logged in:
        # the status page shows the token field only when it is not.
        st["api"] = {"session": sessions.valid(request.cookies.get(sessions.cookie_name))}
        if token_file:
            st["api"]["token_file"] = token_file
        # What staying warm costs here: this daemon's CPU and its QEMU's, % of one core.
        st["cpu"] = {"daemon": cpu.read(os.getpid())}
        pid = qemu_pid(st)
        if pid is not None:
            st["cpu"]["qemu"] = cpu.read(pid)
        probe = getattr(node, "domain_state", None)
        if probe is not None:
            try:
                st["domain_state"] = await wait_for(probe(), 2)
            except (ReplicatorError, asyncio.TimeoutError, OSError) as exc:
                st["domain_state"] = f"unknown ({exc or 'timeout'})"
        return web.json_response(st)

    async def switch(request: web.Request) -> web.Response:
        refused = refusal(request)
        if refused is not None:
            return refused
        body = await _switch_body(request)
        if isinstance(body, str):
            return _error(400, body)
        mode = body.get("mode", "live")
        if mode not in ("live", "stop"):
            return _error(400, f"mode must be 'live' or 'stop', not {mode!r}")
        try:
            result = await node.switch(mode)
        except SwitchInProgress as exc:
            return _error(409, str(exc))
        except SwitchError as exc:
            return _error(500, str(exc), rolled_back=exc.rolled_back)
        except ReplicatorError as exc:
            return _error(503, str(exc))
        return web.json_response(result)

    def lifecycle(name: str):
        async def handler(request: web.Request) -> web.Response:
            refused = refusal(request)
            if refused is not None:
                return refused
            action = getattr(node, name, None)
            if action is None:
                return _error(400, "this node has no replication to pause or resume")
            try:
                return web.json_response(await action())
            except ReplicatorError as exc:
                return _error(409, str(exc))
        return handler

    def confirmed(name: str, key: str):
        """A dangerous placement action: it needs ``{"<key>": true}`` in the body."""
        async def handler(request: web.Request) -> web.Response:
            refused = refusal(request)
            if refused is not None:
                return refused
            try:
                body = json.loads((await request.read()).decode("utf-8") or "{}")
            except (UnicodeDecodeError, ValueError, RecursionError):
                return _error(400, "request body is not JSON")
            if not isinstance(body, dict) or set(body) - {key} or body.get(key) is not True:
                return _error(400, f'this needs the body {{"{key}": true}}')
            action = getattr(node, name, None)
            if action is None:
                return _error(400, f"this node cannot {name.replace('_', ' ')}")
            try:
                return web.json_response(await action())
            except ReplicatorError as exc:
                return _error(409, str(exc))
        return handler

    async def login_link(request: web.Request) -> web.Response:
        # The bearer token only: a session must not be able to mint more sessions.
        if "Authorization" not in request.headers or refusal(request) is not None:
            return _error(401, NO_TOKEN)
        return web.json_response({"path": "/login?once=" + sessions.new_link(),
                                  "expires_in_seconds": security.LOGIN_LINK_SECONDS})

    async def login(request: web.Request) -> web.Response:
        sid, why = sessions.redeem(request.query.get("once", ""))
        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        if sid is None:
            return web.Response(status=403, headers=headers,
                                text=f"replicator: {why}. Run `replicator ui` on this host for "
                                     "a new one.\n")
        resp = web.Response(status=303, headers={**headers, "Location": "/"})
        # No Max-Age: the cookie ends with the browser; the session itself after 12 hours.
        resp.set_cookie(sessions.cookie_name, sid, path="/", httponly=True, samesite="Strict")
        return resp

    async def index(request: web.Request) -> web.StreamResponse:
        if page_html:
            return web.Response(text=page_html, content_type="text/html",
                                headers={"Content-Security-Policy": csp_page,
                                         "Cache-Control": "no-store"})
        return web.Response(text="replicator\n")

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", index)
    app.router.add_get("/login", login)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/switch", switch)
    app.router.add_post("/api/v1/pause", lifecycle("pause_replication"))
    app.router.add_post("/api/v1/resume", lifecycle("resume_replication"))
    app.router.add_post("/api/v1/takeover", confirmed("takeover", "force"))
    app.router.add_post("/api/v1/discard-here", confirmed("discard_here", "confirm"))
    app.router.add_post("/api/v1/login-link", login_link)
    return app


async def start_api(node: Node, listen: str, token: str, *,
                    token_file: str | Path | None = None,
                    allowed_hosts: Iterable[str] = ()) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner and the URL it listens on."""
    app = make_app(node, token, str(token_file) if token_file else None, listen=listen,
                   allowed_hosts=allowed_hosts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if listen.startswith("unix:"):
        path = listen[5:]
        site = web.UnixSite(runner, path)
        await site.start()
        os.chmod(path, 0o600)
        return runner, listen
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    sock = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    addr = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
    return runner, f"http://{addr}:{sock[1]}"
