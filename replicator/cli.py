"""Command line: ``replicator run | status | switch | ui | demo`` and friends."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .control.client import request as _request
from .errors import ReplicatorError

DEFAULT_CONFIG = "/etc/replicator/replicator.toml"


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(coro)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- API client ----------------------------------------------------------------------------------

def _api_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(base url, token) from --url/--token-file or the config file."""
    url = args.url
    token_file = args.token_file
    if url is None or token_file is None:
        from .config import load_config
        cfg = load_config(args.config)
        listen = cfg.control.listen
        url = url or (listen if listen.startswith("unix:") else f"http://{listen}")
        token_file = token_file or str(cfg.control.token_file
                                       or Path(cfg.node.state_dir) / "api-token")
    token = None
    try:
        token = Path(token_file).read_text().strip()
    except OSError:
        pass
    return url, token


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f}"


def format_status(st: dict) -> str:
    """One-screen human view of /api/v1/status."""
    lines = [f"{st.get('role', '?')} {st.get('node', '')}  domain {st.get('domain', '')}"]
    place = st.get("placement")
    if place:
        where = "runs HERE" if place.get("here") else "runs on the peer"
        pending = f", switch {place['pending']}" if place.get("pending") else ""
        lines.append(f"  domain    {where} (generation {place.get('generation', 0)}"
                     f"{', started by hand' if place.get('forced') else ''}{pending}); "
                     f"{'both ways' if st.get('two_way') else 'one way'}")
    if st.get("split_brain"):
        lines.append(f"  {st['split_brain']['message']}")
    if st.get("domain_problem"):
        lines.append(f"  NOT REPLICATING: {st['domain_problem']}")
    peer = st.get("peer") or {}
    state = "connected" if peer.get("connected") else f"DISCONNECTED {peer.get('error', '')}"
    lines.append(f"  peer      {peer.get('node') or peer.get('address', '')}: {state}")
    if st.get("role") == "source":
        lag = st.get("lag") or {}
        ram = st.get("ram_bytes") or 1
        synced = max(0.0, 1 - (lag.get("bytes", 0) / ram))
        bar = "#" * int(synced * 30) + "-" * (30 - int(synced * 30))
        lines.append(f"  sync      [{bar}] {synced * 100:5.1f}%  "
                     f"{'IN SYNC' if st.get('in_sync') else 'catching up'}")
        lines.append(f"  lag       {_human_bytes(lag.get('bytes', 0))}, {lag.get('pages', 0)} "
                     f"pages, {lag.get('seconds', 0):.2f} s")
        lines.append(f"  dirty     {_human_bytes(st.get('dirty_rate_bytes_per_second', 0))}/s   "
                     f"link {_human_bytes(st.get('throughput_bytes_per_second', 0))}/s")
        lines.append(f"  switch    ~{st.get('switch_estimate_seconds', 0) * 1000:.0f} ms "
                     f"predicted downtime")
        lines += [_source_disk_line(d) for d in st.get("disks") or []]
        if st.get("handed_over"):
            lines.append("  HANDED OVER: the domain runs on the peer")
        cur = st.get("switch")
        if cur:
            lines.append(f"  switching {cur['mode']} mode: {cur['phase']}")
        last = st.get("last_switch")
        if last:
            lines.append(f"  last      {last['result']} ({last['mode']}): downtime "
                         f"{last.get('downtime_ms') or 0:.1f} ms, total "
                         f"{last.get('time_to_switch_ms') or 0:.1f} ms"
                         f"{'; ' + _switch_path(last) if last.get('path') else ''} "
                         f"{last.get('message', '')}")
            if st.get("disks") or _has_disk_figures(last):
                lines.append(f"            {_switch_disks(last)}")
    else:
        lines.append(f"  shadow    epoch {st.get('acked_epoch')}, "
                     f"{_human_bytes(st.get('ram_bytes') or 0)}; "
                     f"{'RUNS THE DOMAIN' if st.get('runs_domain') else 'paused standby'}")
        lines += [_sink_disk_line(d) for d in st.get("disks") or []]
    return "\n".join(lines)


def _disk_head(d: dict) -> str:
    return (f"  disk {d.get('index', '?'):<4} {d.get('path', '?')} ({d.get('format', '?')}, "
            f"{_human_bytes(d.get('size_bytes') or 0)})")


def _copy_state(d: dict) -> str:
    """streaming, or a first copy / full compare with how far it got."""
    copy = d.get("copy") or "unknown"
    if copy == "streaming":
        return "streaming"
    what = {"initial": "first copy", "compare": "comparing every block"}.get(copy, copy)
    if copy in ("initial", "compare"):
        what += f" {(d.get('progress') or 0) * 100:.1f}%"
    return what


def _source_disk_line(d: dict) -> str:
    lag = d.get("lag") or {}
    return (f"{_disk_head(d)}: {_copy_state(d)}; lag {_human_bytes(lag.get('bytes', 0))}, "
            f"{lag.get('blocks', 0)} blocks, {lag.get('seconds', 0):.2f} s")


def _sink_disk_line(d: dict) -> str:
    return (f"{_disk_head(d)}: generation {d.get('generation', 0)}, "
            f"{_human_bytes(d.get('written_bytes') or 0)} written, writer "
            f"{d.get('writer', '?')}")


def _has_disk_figures(report: dict) -> bool:
    return bool(report.get("disks_verified") or report.get("disk_final_delta_bytes"))


def _switch_disks(report: dict) -> str:
    """The disks' part of a switch report: "disks: final delta 1.0 MiB, verified"."""
    verified = "verified" if report.get("disks_verified") else "NOT verified"
    return (f"disks: final delta {_human_bytes(report.get('disk_final_delta_bytes') or 0)}, "
            f"{verified}")


def _switch_path(report: dict) -> str:
    """How a switch ended: "path live", "path throttled (auto-converge, up to 70% CPU)",
    "path stopped (after the deadlines; no throttle here)"."""
    path = report.get("path") or "?"
    throttle = report.get("throttle") or ""
    if not throttle:
        return f"path {path}"
    what = "no throttle here" if throttle == "none" else throttle
    if report.get("throttle_percent"):
        what += f", up to {report['throttle_percent']}% CPU"
    when = "after the deadlines; " if path == "stopped" else ""
    return f"path {path} ({when}{what})"


# --- commands ------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import serve
    cfg = load_config(args.config)
    _setup_logging(args.verbose)
    try:
        _run_async(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url, _ = _api_target(args)

    async def once() -> dict:
        code, data = await _request("GET", url, "/api/v1/status", timeout=10)
        if code != 200:
            raise ReplicatorError(data.get("error", f"HTTP {code}"))
        return data

    async def run() -> int:
        if not args.watch:
            data = await once()
            print(json.dumps(data, indent=2) if args.json else format_status(data))
            return 0
        while True:
            try:
                text = format_status(await once())
            except (OSError, ReplicatorError) as exc:
                text = f"cannot reach {url}: {exc}"
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + text + "\n")
            sys.stdout.flush()
            await asyncio.sleep(args.interval)

    try:
        return _run_async(run())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        raise ReplicatorError(f"cannot reach the daemon at {url}: {exc}") from None


def _api_with_token(args: argparse.Namespace) -> tuple[str, str]:
    """(url, token) for a state-changing call; refuses early without a token."""
    url, token = _api_target(args)
    if not token:
        raise ReplicatorError("no API token (use --token-file or run as a user who can read it)")
    return url, token


def cmd_switch(args: argparse.Namespace) -> int:
    url, token = _api_with_token(args)

    async def run() -> int:
        async def progress() -> None:
            while True:
                await asyncio.sleep(0.5)
                try:
                    _, st = await _request("GET", url, "/api/v1/status", timeout=5)
                except OSError:
                    continue
                cur = st.get("switch")
                if cur:
                    print(f"  ... {cur['phase']}", file=sys.stderr, flush=True)

        watcher = asyncio.create_task(progress())
        try:
            code, data = await _request("POST", url, "/api/v1/switch", token,
                                        {"mode": args.mode})
        finally:
            watcher.cancel()
        if code == 200 and data.get("requested_here") and not args.json:
            print(f"switched ({data['mode']}): the domain runs HERE now, brought from "
                  f"{data.get('peer') or 'the peer'} in {data['time_to_switch_ms']:.1f} ms")
            return 0
        if code == 200:
            print(json.dumps(data) if args.json else
                  f"switched ({data['mode']}): the domain runs on {data.get('peer') or 'the peer'}"
                  f"; downtime {data['downtime_ms']:.1f} ms, time to switch "
                  f"{data['time_to_switch_ms']:.1f} ms; {_switch_path(data)}"
                  f"{'; ' + _switch_disks(data) if _has_disk_figures(data) else ''}")
            return 0
        print(f"switch failed (HTTP {code}): {data.get('error')}", file=sys.stderr)
        return 1

    try:
        return _run_async(run())
    except OSError as exc:
        raise ReplicatorError(f"cannot reach the daemon at {url}: {exc}") from None


def cmd_lifecycle(args: argparse.Namespace) -> int:
    url, token = _api_with_token(args)
    try:
        code, data = _run_async(_request("POST", url, f"/api/v1/{args.command}", token))
    except OSError as exc:
        raise ReplicatorError(f"cannot reach the daemon at {url}: {exc}") from None
    if code != 200:
        print(f"{args.command} failed (HTTP {code}): {data.get('error')}", file=sys.stderr)
        return 1
    print(f"replication {data['replication']}")
    return 0


def cmd_placement(args: argparse.Namespace) -> int:
    """takeover --force / discard-here: the two commands that decide where the domain runs
    without the peer's say (a peer gone for good, or a split brain)."""
    if args.command == "takeover":
        if not args.force:
            print("takeover starts the domain here without the peer: only when the peer is gone "
                  "for good (a fresh boot from this host's disks; its RAM is lost). Both hosts "
                  "running it later is a split brain that you must resolve. Add --force.",
                  file=sys.stderr)
            return 2
        path, body = "/api/v1/takeover", {"force": True}
    else:
        path, body = "/api/v1/discard-here", {"confirm": True}
    url, token = _api_with_token(args)
    try:
        code, data = _run_async(_request("POST", url, path, token, body, timeout=120))
    except OSError as exc:
        raise ReplicatorError(f"cannot reach the daemon at {url}: {exc}") from None
    if code != 200:
        print(f"{args.command} failed (HTTP {code}): {data.get('error')}", file=sys.stderr)
        return 1
    print(data.get("message", "done"))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Open the status page logged in: a one-time login link, traded for the API token."""
    from .control import ui
    url, token = _api_with_token(args)
    if url.startswith("unix:"):
        raise ReplicatorError(f"the control API listens on a unix socket ({url[5:]}), which a "
                              "browser cannot open: set control.listen to 127.0.0.1:PORT to "
                              "use the status page, or use `replicator status` and `switch`")
    try:
        code, data = _run_async(_request("POST", url, "/api/v1/login-link", token, timeout=10))
    except OSError as exc:
        raise ReplicatorError(f"cannot reach the daemon at {url}: {exc}") from None
    if code != 200:
        raise ReplicatorError(f"the daemon refused a login link (HTTP {code}): "
                              f"{data.get('error')}")
    return ui.show(ui.browser_base(url) + data["path"], data["expires_in_seconds"], args.print)


def cmd_id(args: argparse.Namespace) -> int:
    from .config import load_config
    from .identity import Identity
    cfg = load_config(args.config)
    directory = cfg.node.identity_dir or Path(cfg.node.state_dir) / "identity"
    print(Identity.load_or_create(Path(directory), cfg.node.name).node_id)
    return 0


def set_peer_id(config_path: Path, peer_id: str) -> None:
    """Record the peer's ID under [peer] in the TOML file, keeping everything else as it is."""
    import re
    text = config_path.read_text() if config_path.exists() else ""
    line = f'id = "{peer_id}"'
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[peer]"), None)
    if start is None:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"[peer]\n{line}\n"
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].lstrip().startswith("[")), len(lines))
        for i in range(start + 1, end):
            if re.match(r"\s*id\s*=", lines[i]):
                lines[i] = line
                break
        else:
            lines.insert(start + 1, line)
        text = "\n".join(lines) + "\n"
    tmp = config_path.with_suffix(config_path.suffix + ".tmp")
    tmp.write_text(text)
    if config_path.exists():
        # Keep owner and mode (e.g. root:replicator 0640): a fresh root:root file may be
        # unreadable for the service user, and the daemon would not start again.
        st = config_path.stat()
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, config_path)


def cmd_pair(args: argparse.Namespace) -> int:
    from .config import load_config
    from .identity import normalize_id
    peer_id = normalize_id(args.peer_id)
    path = Path(args.config)
    load_config(path)                      # refuse to edit a file that is already broken
    set_peer_id(path, peer_id)
    load_config(path)
    print(f"paired with {peer_id} (recorded in {path}); restart the daemon "
          "(systemctl restart replicator)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main
    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replicator",
                                description="Warm-standby replication of a running VM with a "
                                            "one-button switch.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", default=os.environ.get("REPLICATOR_CONFIG",
                                                                  DEFAULT_CONFIG),
                        help=f"config file (default {DEFAULT_CONFIG})")

    def with_api(sp: argparse.ArgumentParser) -> None:
        with_config(sp)
        sp.add_argument("--url", help="control API URL (default: from the config)")
        sp.add_argument("--token-file", help="API token file (default: from the config)")

    sp = sub.add_parser("run", help="run the daemon (source or sink, per the config)")
    with_config(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("doctor", help="check the config and the domain (libvirt: its XML) and "
                                       "say what to fix; changes nothing")
    with_config(sp)
    sp.set_defaults(func=lambda args: __import__("replicator.doctor", fromlist=["run"]).run(
        args.config))

    sp = sub.add_parser("id", help="print this node's ID (creating its key on first use)")
    with_config(sp)
    sp.set_defaults(func=cmd_id)

    sp = sub.add_parser("pair", help="record the peer's ID; only that peer is accepted")
    with_config(sp)
    sp.add_argument("peer_id", help="the ID `replicator id` printed on the peer")
    sp.set_defaults(func=cmd_pair)

    sp = sub.add_parser("status", help="show replication state")
    with_api(sp)
    sp.add_argument("--watch", action="store_true", help="refresh continuously")
    sp.add_argument("--interval", type=float, default=1.0)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("switch", help="move the domain now: to the peer, or here from the "
                                       "peer when it runs there (both ways)")
    with_api(sp)
    sp.add_argument("--mode", choices=("live", "stop"), default="live",
                    help="live: catch up while running, then a short pause; "
                         "stop: pause at once (least total time)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_switch)

    sp = sub.add_parser("pause", help="stop replicating (qemu-precopy: end the held-open "
                                      "migration so QEMU allows hotplug/snapshots); the VM runs "
                                      "on, unprotected")
    with_api(sp)
    sp.set_defaults(func=cmd_lifecycle)

    sp = sub.add_parser("resume", help="replicate again; only pages that differ are sent")
    with_api(sp)
    sp.set_defaults(func=cmd_lifecycle)

    sp = sub.add_parser("takeover", help="start the domain here without the peer (it is gone "
                                         "for good): a fresh boot from this host's disks")
    with_api(sp)
    sp.add_argument("--force", action="store_true", help="yes, without the peer")
    sp.set_defaults(func=cmd_placement)

    sp = sub.add_parser("discard-here", help="split brain: stop the domain here and discard "
                                             "this host's copy; it becomes the shadow of the "
                                             "peer's (after a full compare)")
    with_api(sp)
    sp.set_defaults(func=cmd_placement)

    sp = sub.add_parser("ui", help="open the status page in a browser, logged in (a one-time "
                                   "link; no token to paste)")
    with_api(sp)
    sp.add_argument("--print", action="store_true",
                    help="print the link instead of opening a browser")
    sp.set_defaults(func=cmd_ui)

    sp = sub.add_parser("demo", help="desktop VM + laptop shadow on this machine: replicate, "
                                     "switch, report")
    sp.add_argument("--ram", default="512MiB", help="guest RAM (default 512MiB)")
    sp.add_argument("--mode", choices=("live", "stop"), default="live")
    sp.add_argument("--tracker", choices=("scan", "qemu-precopy"), default="qemu-precopy",
                    help="how dirty pages are found (default qemu-precopy)")
    sp.add_argument("--dirty", type=float, default=5.0, help="guest dirty rate, MB/s")
    sp.add_argument("--fill", type=int, default=50, help="percent of guest RAM filled")
    sp.add_argument("--disk", default="64MiB",
                    help="size of the guest's qcow2 disk, which travels with it (0: none)")
    sp.add_argument("--disk-dirty", type=float, default=1.0,
                    help="guest disk write rate, MiB/s (besides its disk check)")
    sp.add_argument("--replicate-seconds", type=float, default=8.0)
    sp.add_argument("--round-trip", action="store_true",
                    help="then bring the VM home: the laptop streams it back, switch back")
    sp.add_argument("--away-seconds", type=float, default=10.0,
                    help="with --round-trip: how long the VM runs on the laptop")
    sp.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                    help="tcg works everywhere; kvm where guests really run under it")
    sp.add_argument("--guest-dir", default=None, help="test guest (default build/guest)")
    sp.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    sp.add_argument("--keep", action="store_true", help="keep the temp dir")
    sp.add_argument("--json", action="store_true", help="print a final JSON line")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ReplicatorError as exc:
        print(f"replicator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
