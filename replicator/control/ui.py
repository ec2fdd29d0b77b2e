"""``replicator ui``: open the status page logged in, with a one-time link from the daemon.

The link goes to the browser through a private 0600 file that redirects to it, as Jupyter does:
a command line (xdg-open, the browser's own) is readable by every local user, a file in the
user's runtime directory is not. Without a display, or with --print, it is printed.
"""

from __future__ import annotations

import html
import os
import stat
import sys
import tempfile
import webbrowser
from pathlib import Path

from ..errors import ReplicatorError

_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


def browser_base(url: str) -> str:
    """The API's base URL as a browser should open it (a wildcard listen address is no
    address to connect to: use loopback)."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    return f"{scheme}://{_WILDCARD_HOSTS.get(host, host)}:{port}"


def _private_dir() -> Path:
    """A directory only this user can read: $XDG_RUNTIME_DIR, or one made in the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [Path(runtime)] if runtime else []
    candidates.append(Path(tempfile.gettempdir()) / f"replicator-ui-{os.getuid()}")
    for d in candidates:
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return d
    raise ReplicatorError("no private directory for the login page (set XDG_RUNTIME_DIR to a "
                          "0700 directory), or use `replicator ui --print`")


def redirect_file(link: str) -> Path:
    """A 0600 HTML file that sends the browser on to `link` (overwritten on every run)."""
    path = _private_dir() / "replicator-ui.html"
    href = html.escape(link, quote=True)
    text = (f'<!doctype html>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="refresh" content="0;url={href}">\n'
            f'<title>replicator</title>\n<p><a href="{href}">Open the replicator status page</a>'
            f'</p>\n')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    return path


def _has_display() -> bool:
    if sys.platform == "darwin":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show(link: str, expires_in: float, print_only: bool = False) -> int:
    """Open `link` in the user's browser, or print it (and say why)."""
    when = f"{round(expires_in / 60)} minutes" if expires_in >= 120 else f"{expires_in:g} s"
    why = "--print" if print_only else None
    if why is None and not _has_display():        # e.g. over ssh, or under sudo
        why = "no display"
    if why is None:
        page = redirect_file(link)
        if webbrowser.open(page.as_uri()):
            print(f"opened the status page in your browser (the login works once, within "
                  f"{when}; run `replicator ui` again for a new one)", file=sys.stderr)
            return 0
        why = "no browser found"
    print(f"open this link in a browser on this host ({why}); it logs you in once, within "
          f"{when}:", file=sys.stderr)
    print(link, flush=True)
    return 0
