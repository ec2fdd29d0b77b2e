"""Who may talk to the control API from a browser: Host check, login links, sessions.

* Host: a web page whose name is rebound to 127.0.0.1 (DNS rebinding) would send its own name in
  the Host header; only this node's names are served over TCP (a unix socket is not reachable
  from a browser, its 0600 mode is the check).
* Login: ``replicator ui`` trades the bearer token for a one-time link (random, single use, two
  minutes); opening it sets an HttpOnly, SameSite=Strict session cookie. Sessions live in this
  process only: a restart logs everybody out.
* CSRF: a call authenticated by the cookie must also carry the page's own Origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from typing import Iterable

LOGIN_LINK_SECONDS = 120
SESSION_SECONDS = 12 * 3600
MAX_LOGIN_LINKS = 16          # outstanding links; the oldest go first
MAX_SESSIONS = 64

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def host_name(value: str) -> str | None:
    """The name in a Host header (``name``, ``name:port``, ``[v6]:port``), lower case and without
    a trailing dot; None if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    name = name.removesuffix(".")
    if not name or not all(c.isalnum() or c in "-._" for c in name) or not name.isascii():
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which Host headers a TCP listener serves: localhost names, the address it listens on, the
    configured extra names; with a wildcard listen address also any IP literal (a rebound page
    always has a name, never an address)."""

    def __init__(self, listen: str, extra: Iterable[str] = ()) -> None:
        self.unix = listen.startswith("unix:")
        host = "" if self.unix else listen.rpartition(":")[0].strip("[]").lower()
        self.wildcard = host in _WILDCARDS
        self.names = set(LOCAL_NAMES) | {h.strip("[]").lower().removesuffix(".") for h in extra}
        if not self.wildcard:
            self.names.add(host)

    def allows(self, header: str | None) -> bool:
        if self.unix or header is None:      # browsers always send Host; other clients may not
            return True
        name = host_name(header)
        if name is None:
            return False
        return name in self.names or (self.wildcard and _is_ip(name))

    def describe(self) -> str:
        names = sorted(self.names) + (["any IP address"] if self.wildcard else [])
        return ", ".join(names)


class Sessions:
    """One-time login links and the sessions they open, in memory."""

    def __init__(self, token: str) -> None:
        # Per node (each has its own token), so two daemons on one host keep separate cookies;
        # a hash of a 256-bit secret tells nothing about it.
        digest = hashlib.sha256(b"replicator session cookie\0" + token.encode()).hexdigest()
        self.cookie_name = "replicator-" + digest[:12]
        self._links: dict[str, float] = {}       # nonce -> expiry (monotonic)
        self._sessions: dict[str, float] = {}    # session id -> expiry (monotonic)

    def new_link(self) -> str:
        now = time.monotonic()
        _prune(self._links, now, MAX_LOGIN_LINKS - 1)
        nonce = secrets.token_urlsafe(32)
        self._links[nonce] = now + LOGIN_LINK_SECONDS
        return nonce

    def redeem(self, nonce: str) -> tuple[str | None, str]:
        """(new session id, "") for a valid link, consuming it; else (None, why not)."""
        now = time.monotonic()
        expiry = self._links.pop(nonce, None) if nonce else None
        if expiry is None:
            return None, "this login link is not valid (each one works once)"
        if expiry < now:
            return None, "this login link has expired (they last two minutes)"
        _prune(self._sessions, now, MAX_SESSIONS - 1)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + SESSION_SECONDS
        return sid, ""

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        expiry = self._sessions.get(sid)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._sessions[sid]
            return False
        return True


def _prune(table: dict[str, float], now: float, keep: int) -> None:
    """Drop expired entries, then the oldest beyond `keep` (dicts keep insertion order)."""
    for key in [k for k, exp in table.items() if exp < now]:
        del table[key]
    while len(table) > keep:
        del table[next(iter(table))]


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that any header value can go through (non-ASCII included)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's Origin is the page this Host serves (http://host[:port])."""
    if not origin or not host:
        return False
    return origin.lower() == "http://" + host.strip().lower()
