"""A small client for a node's control API (HTTP over TCP or a unix socket).

Used by the CLI, the demo, the benchmarks and the tests; it imports nothing of the node.
"""

from __future__ import annotations

from typing import Any


async def request(method: str, url: str, path: str, token: str | None = None,
                  body: dict | None = None, timeout: float = 600) -> tuple[int, Any]:
    """One API call; returns the HTTP status and the decoded JSON answer (or ``{"error":
    text}`` when the answer is not JSON)."""
    import aiohttp
    connector = None
    base = url
    if url.startswith("unix:"):
        connector = aiohttp.UnixConnector(path=url[5:])
        base = "http://localhost"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.request(method, base + path, json=body, headers=headers) as r:
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {"error": await r.text()}
            return r.status, data
