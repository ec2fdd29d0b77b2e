"""The local control API: health, status, metrics, and the switch button.

Binds 127.0.0.1 by default (or a 0600 unix socket). Reading is open to whoever can reach the
socket; anything that changes state needs the bearer token from the node's 0600 token file.
Errors are JSON objects with a message a person understands.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from ..errors import ConfigError, ReplicatorError, SwitchError, SwitchInProgress

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


def make_app(node: Node, token: str, token_file: str | None = None) -> web.Application:
    app = web.Application()

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        body = node.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def status(request: web.Request) -> web.Response:
        st = node.status()
        if token_file:
            # Where the token is (never the token itself): the status page shows it as a hint.
            st["api"] = {"token_file": token_file}
        probe = getattr(node, "domain_state", None)
        if probe is not None:
            try:
                st["domain_state"] = await asyncio.wait_for(probe(), 2)
            except (ReplicatorError, asyncio.TimeoutError, OSError) as exc:
                st["domain_state"] = f"unknown ({exc or 'timeout'})"
        return web.json_response(st)

    async def switch(request: web.Request) -> web.Response:
        if not authorized(request):
            return _error(401, "missing or wrong bearer token (see the node's token file)")
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON")
        mode = (body or {}).get("mode", "live")
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
            if not authorized(request):
                return _error(401, "missing or wrong bearer token (see the node's token file)")
            action = getattr(node, name, None)
            if action is None:
                return _error(400, "this node has no replication to pause or resume")
            try:
                return web.json_response(await action())
            except ReplicatorError as exc:
                return _error(409, str(exc))
        return handler

    async def index(request: web.Request) -> web.StreamResponse:
        page = STATIC / "index.html"
        if page.exists():
            return web.FileResponse(page)
        return web.Response(text="replicator\n")

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/switch", switch)
    app.router.add_post("/api/v1/pause", lifecycle("pause_replication"))
    app.router.add_post("/api/v1/resume", lifecycle("resume_replication"))
    if STATIC.is_dir():
        app.router.add_static("/static/", STATIC)
    return app


async def start_api(node: Node, listen: str, token: str, *,
                    token_file: str | Path | None = None) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner and the URL it listens on."""
    runner = web.AppRunner(make_app(node, token, str(token_file) if token_file else None),
                           access_log=None)
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
    return runner, f"http://{sock[0]}:{sock[1]}"
