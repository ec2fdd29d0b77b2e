"""Operating replicator: metrics lint, alert rules, a real Prometheus running every dashboard and
alert query against a live pair, the systemd units, sd_notify and SIGHUP of the real daemon,
and the example configs.

Real tools only: promtool, prometheus and systemd-analyze (deploy/install-deps.sh installs
them). A missing tool FAILS these tests; nothing here is skipped.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest

from replicator.cli import _human_bytes
from replicator.config import load_config
from replicator.control.api import start_api
from replicator.errors import SwitchError

from .conftest import pair_ids, wait_until
from .test_disks_qemu import DISK, hmp_write, make_disk, start_pair, wait_disk_synced
from .test_switch_qemu import stop_nodes

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DEPLOY = ROOT / "deploy"
DASHBOARD = GRAFANA / "replicator-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
MiB = 1024 * 1024
# Disk metrics have series only where a domain has disks: the file-domain pair below has none,
# so panels and rules on them are run against a real QEMU pair with a disk instead.
DISK_METRIC = "replicator_disk_"
# Likewise the QEMU's process figures: a file domain has no QEMU.
QEMU_METRIC = "replicator_qemu_"

# What the dashboard's Grafana variables become when the queries run here (scrape every 1s).
BUILTIN_VARS = {"__rate_interval": "5s", "__interval": "2s", "__range": "1m",
                "__range_s": "60", "__interval_ms": "2000"}


def tool(name: str) -> str:
    """Path of a required system tool; a missing one fails the test (it is not optional)."""
    path = shutil.which(name)
    assert path, (f"{name} is not installed: run deploy/install-deps.sh (Debian packages "
                  f"prometheus and systemd)")
    return path


def replicator_exe() -> Path:
    exe = Path(sys.executable).parent / "replicator"
    assert exe.exists(), f"{exe} missing: pip install -e . in the venv"
    return exe


async def run(*argv: str, stdin: bytes | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run a command without blocking the event loop (the live pair keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# A live pair (in this process) with both control APIs serving /metrics

async def _publish_forever(pair: Any) -> None:
    # What serve() does every 0.5 s: refresh the lag gauges from the ledger.
    while True:
        if pair.source is not None:
            pair.source.publish()
        await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def live_pair(shm_dir: Path, workload: Any, pair_factory: Any
                    ) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    """A replicating pair: 16 MiB file domain dirtied at 2 MB/s; yields (pair, role -> URL)."""
    wl = workload(shm_dir / "ram", 16 * MiB, rate=2e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    runners = []
    urls = {}
    publisher = asyncio.create_task(_publish_forever(pair))
    try:
        for role, node in (("source", pair.source), ("sink", pair.sink)):
            runner, url = await start_api(node, "127.0.0.1:0", "test-token")
            runners.append(runner)
            urls[role] = url
        yield pair, urls
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        for runner in runners:
            await runner.cleanup()


async def failed_switch(pair: Any) -> None:
    """A stop-mode switch refused at verify (one shadow page hash is wrong): rolled back.

    The page is in the unfilled half of the RAM file, which the workload never writes, so the
    hash is restored afterwards and a later switch verifies.
    """
    hashes = pair.sink.receiver.store.regions["ram0"].hashes
    page = len(hashes) - 1
    hashes[page] ^= np.uint64(1)
    try:
        with pytest.raises(SwitchError) as exc:
            await pair.source.switch("stop")
        assert exc.value.rolled_back
    finally:
        hashes[page] ^= np.uint64(1)
    assert await pair.source.driver.is_running()


async def good_switch(pair: Any) -> dict:
    result = await pair.source.switch("live")
    assert result["result"] == "ok" and result["shadow_verified"], result
    return result


async def http_get(url: str, **params: str) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.get(url, params=params or None) as r:
            body = await r.read()
            assert r.status == 200, f"GET {url} {params}: HTTP {r.status}: {body[:500]!r}"
            ctype = r.headers.get("Content-Type", "")
            return json.loads(body) if "json" in ctype else body


# ---------------------------------------------------------------------------------------------
# promtool

async def test_promtool_check_metrics_on_live_scrape(shm_dir, workload, pair_factory):
    promtool = tool("promtool")
    async with live_pair(shm_dir, workload, pair_factory) as (pair, urls):
        # Both switch results, so every labelled family has series in the scrape.
        await failed_switch(pair)
        await good_switch(pair)
        pair.source.publish()
        for role, url in urls.items():
            body = await http_get(url + "/metrics")
            text = body.decode()
            assert f'replicator_build_info{{domain="vm1",role="{role}"' in text
            if role == "source":
                for needle in ('replicator_switches_total{mode="stop",result="rolled_back"} 1.0',
                               'replicator_switches_total{mode="live",result="ok"} 1.0',
                               'replicator_switch_downtime_seconds_bucket{le="+Inf",mode="live"} 1.0',
                               'replicator_sent_bytes_total{kind="wire"}'):
                    assert needle in text, f"{needle} not in the source's /metrics"
            # The daemon's own process (both daemons run in this one); no QEMU here.
            for needle in ("\nprocess_cpu_seconds_total ", "\nprocess_resident_memory_bytes ",
                           "\nprocess_open_fds "):
                assert needle in text, f"{needle.strip()} not in the {role}'s /metrics"
            assert QEMU_METRIC not in text, text
            st = await http_get(url + "/api/v1/status")
            assert st["cpu"]["daemon"]["pid"] == os.getpid(), st["cpu"]
            assert st["cpu"]["daemon"]["cpu_seconds"] > 0 and "qemu" not in st["cpu"], st["cpu"]
            rc, out, err = await run(promtool, "check", "metrics", stdin=body)
            assert (rc, out, err) == (0, "", ""), \
                f"promtool check metrics on the {role}'s /metrics:\n{out}{err}"


def test_promtool_check_and_unit_test_alert_rules():
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout, r.stdout
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    # When each alert fires and when it must stay quiet (synthetic series).
    r = subprocess.run([promtool, "test", "rules", str(GRAFANA / "alerts_test.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# The dashboard: static checks

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += all_panels(p.get("panels", []))       # collapsed rows keep theirs inside
    return out


def dashboard_targets(dash: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in all_panels(dash["panels"]) for t in p.get("targets", [])
            if t.get("expr")]


def substitute(expr: str, variables: list[str]) -> str:
    """Replace Grafana variables: built-ins by intervals, template variables by '.*'."""
    values = dict(BUILTIN_VARS, **{v: ".*" for v in variables})

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return values[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)
    assert "$" not in out, out
    return out


def test_dashboard_is_importable_and_provisionable():
    dash = dashboard()
    assert dash["uid"] == "replicator-overview" and dash.get("id") is None
    tvars = dash["templating"]["list"]
    ds = [v for v in tvars if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds] == [("DS_PROMETHEUS", "prometheus")]
    names = {v["name"] for v in tvars}
    assert {"job", "domain", "instance"} <= names
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert t.get("legendFormat"), f"panel {p['title']!r}: give series friendly names"
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dash))
    for metric in ("replicator_lag_bytes", "replicator_lag_seconds",
                   "replicator_dirty_rate_bytes_per_second",
                   "replicator_link_throughput_bytes_per_second",
                   "replicator_switch_estimate_seconds", "replicator_switches_total",
                   "replicator_switch_downtime_seconds_bucket",
                   "replicator_last_switch_downtime_seconds", "replicator_peer_connected",
                   "replicator_reconnects_total", "replicator_sent_bytes_total",
                   "replicator_pages_sent_total", "replicator_round_duration_seconds_bucket",
                   "replicator_disk_lag_bytes", "replicator_disk_lag_blocks",
                   "replicator_disk_lag_seconds", "replicator_disk_sent_bytes_total",
                   "replicator_disk_written_bytes_total", "replicator_disk_size_bytes",
                   "process_cpu_seconds_total", "replicator_qemu_process_cpu_seconds_total"):
        assert metric in exprs, f"no panel shows {metric}"
    # Provisioning examples point at this dashboard's datasource type and a dashboards folder.
    dsy = (GRAFANA / "provisioning" / "datasource.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", dsy, re.M) and re.search(r"type: prometheus", dsy)
    dby = (GRAFANA / "provisioning" / "dashboards.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", dby, re.M) and re.search(r"type: file", dby)
    assert re.search(r"path: /\S+", dby)


# ---------------------------------------------------------------------------------------------
# A real Prometheus against a live pair

class Prometheus:
    def __init__(self, base: str):
        self.base = base

    async def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = await http_get(self.base + "/api/v1/query", **params)
        assert data["status"] == "success", (expr, data)
        assert data["data"]["resultType"] == "vector", (expr, data["data"]["resultType"])
        return data["data"]["result"]

    async def wait(self, what: str, cond, timeout: float = 30, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, AssertionError):
                last = await cond()
                if last:
                    return last
            await asyncio.sleep(interval)
        raise AssertionError(f"Prometheus: {what} not reached in {timeout}s (last: {last})")

    async def scraped(self, selector: str, n: int, series: int = 1) -> None:
        """Wait until `series` series of `selector` have at least n samples in the last minute."""
        async def enough():
            res = await self.query(f"count_over_time({selector}[1m]) >= {n}")
            return len(res) >= series
        await self.wait(f"{n} scrapes of {selector}", enough)

    async def seen_for(self, expr: str, seconds: int) -> None:
        """Wait until `expr` has returned series for `seconds` 1s-steps (~ that many scrapes)."""
        async def enough():
            return await self.query(f"count_over_time(({expr})[1m:1s]) >= {seconds}")
        await self.wait(f"{expr} for {seconds}s", enough)


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, targets: list[str]) -> AsyncIterator[Prometheus]:
    exe = tool("prometheus")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "replicator",
                            "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config, indent=1))
    proc = None
    log = tmp / "prometheus.log"
    try:
        for _attempt in range(3):
            port = free_port()
            with open(log, "ab") as logf:
                proc = await asyncio.create_subprocess_exec(
                    exe, f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h", "--log.level=warn",
                    stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    env=dict(os.environ, GOMAXPROCS="1"))
            prom = Prometheus(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.returncode is None:
                with contextlib.suppress(aiohttp.ClientError, AssertionError, ValueError):
                    await http_get(prom.base + "/-/ready")
                    break
                await asyncio.sleep(0.2)
            else:
                if proc.returncode is None:
                    raise AssertionError("prometheus not ready in 30s:\n" + log.read_text())
                continue            # exited (port taken by someone else?): try another port
            break
        else:
            raise AssertionError("prometheus did not start:\n" + log.read_text())
        yield prom
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def strip_threshold(expr: str) -> str:
    """`<signal> <op> <number>` -> `<signal>` (the shape grafana/alerts.yml promises)."""
    m = re.fullmatch(r"(.*\S)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[\d.]+(?:e[-+]?\d+)?",
                     expr.strip(), re.S)
    assert m, f"alert expr is not '<signal> <op> <threshold>': {expr}"
    return m.group(1)


async def test_prometheus_runs_every_dashboard_and_alert_query(shm_dir, workload, pair_factory,
                                                               tmp_path):
    dash = dashboard()
    variables = [v["name"] for v in dash["templating"]["list"] if v["type"] != "datasource"]
    async with live_pair(shm_dir, workload, pair_factory) as (pair, urls):
        targets = [u.removeprefix("http://") for u in urls.values()]
        async with prometheus(tmp_path, targets) as prom:
            bi = 'replicator_build_info{job="replicator"}'
            await prom.scraped(bi, 3, series=2)
            active = (await http_get(prom.base + "/api/v1/targets"))["data"]["activeTargets"]
            assert sorted(t["health"] for t in active) == ["up", "up"], active

            # A failed switch first (rolled back: the source keeps replicating) ...
            await failed_switch(pair)
            await prom.seen_for('replicator_switches_total{result="rolled_back"} > 0', 3)
            t_mid = time.time()

            # ... every rule evaluates cleanly, and the failed switch fires its alert.
            async def rules_evaluated():
                data = await http_get(prom.base + "/api/v1/rules")
                rules = [r for g in data["data"]["groups"] for r in g["rules"]]
                return rules if rules and all(r["health"] != "unknown" for r in rules) else None
            rules = await prom.wait("all rules evaluated", rules_evaluated)
            assert len(rules) == 7, [r["name"] for r in rules]
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not bad, f"rules failing to evaluate: {bad}"

            async def switch_failed_firing():
                data = await http_get(prom.base + "/api/v1/alerts")
                return [a for a in data["data"]["alerts"]
                        if a["labels"]["alertname"] == "ReplicatorSwitchFailed"
                        and a["state"] == "firing"]
            firing = await prom.wait("ReplicatorSwitchFailed firing", switch_failed_firing)
            assert firing[0]["labels"]["result"] == "rolled_back"
            assert firing[0]["labels"]["domain"] == "vm1"

            # Each alert's signal (its expr without the threshold) has series on a healthy,
            # connected pair; the thresholded exprs are quiet except the failed switch.
            checked_alerts = {}
            for r in rules:
                if DISK_METRIC in r["query"]:
                    continue            # no disks here: see test_disk_metrics_...
                signal_expr = strip_threshold(r["query"])
                res = await prom.query(signal_expr, at=t_mid)
                assert res, f"alert {r['name']}: signal returns no series: {signal_expr}"
                checked_alerts[r["name"]] = (signal_expr, len(res))
                fired = await prom.query(r["query"], at=t_mid)
                if r["name"] == "ReplicatorSwitchFailed":
                    assert fired, r["query"]
                elif r["name"] in ("ReplicatorStandbyNotReady", "ReplicatorDown",
                                   "ReplicatorStoreErrors"):
                    assert not fired, (r["name"], fired)

            # While the workload runs, the replication panels show it working.
            for title in ("Guest dirty rate vs link throughput", "Sent bytes: raw vs wire"):
                for t in next(p for p in dash["panels"] if p["title"] == title)["targets"]:
                    res = await prom.query(substitute(t["expr"], variables), at=t_mid)
                    assert res and all(float(s["value"][1]) > 0 for s in res), (title, res)

            # Then a successful switch, scraped a few times.
            report = await good_switch(pair)
            await prom.seen_for('replicator_switches_total{result="ok"} > 0', 3)
            t_end = time.time()

            # Template variables (label_values(selector, label)) resolve to this pair.
            values = {}
            for v in dash["templating"]["list"]:
                if v["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"])
                assert m, f"variable {v['name']}: not a label_values() query: {v['query']}"
                data = await http_get(prom.base + f"/api/v1/label/{m.group(2)}/values",
                                      **{"match[]": substitute(m.group(1), variables)})
                values[v["name"]] = sorted(data["data"])
            assert values == {"job": ["replicator"], "domain": ["vm1"],
                              "instance": sorted(targets)}, values

            # Every dashboard query returns series, and its legend's labels exist on them.
            checked_panels = []
            for panel, t in dashboard_targets(dash):
                if DISK_METRIC in t["expr"] or QEMU_METRIC in t["expr"]:
                    continue            # no disks, no QEMU here: see test_disk_metrics_...
                expr = substitute(t["expr"], variables)
                res = await prom.query(expr, at=t_end)
                assert res, f"panel {panel['title']!r} {t['refId']}: no series for {expr}"
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                    missing = [s["metric"] for s in res if label not in s["metric"]]
                    assert not missing, (f"panel {panel['title']!r}: legend label {label!r} "
                                         f"missing on {missing}")
                checked_panels.append((panel["title"], t["refId"], expr, len(res)))

            # Spot checks that the numbers mean what the panels say.
            by_title = {}
            for title, ref, expr, _ in checked_panels:
                by_title.setdefault(title, []).append(expr)
            res = await prom.query(by_title["Switches in range by result"][0], at=t_end)
            got = {(s["metric"]["mode"], s["metric"]["result"]): float(s["value"][1])
                   for s in res if float(s["value"][1]) > 0}
            assert got == {("stop", "rolled_back"): 1.0, ("live", "ok"): 1.0}, got
            res = await prom.query(by_title["Last switch downtime"][0], at=t_end)
            assert abs(float(res[0]["value"][1]) - report["downtime_ms"] / 1000) < 1e-6
            res = await prom.query(by_title["Switch downtime distribution"][0], at=t_end)
            inf = [s for s in res if s["metric"]["le"] == "+Inf"]
            assert float(inf[0]["value"][1]) == 1.0

    # For the report (pytest -s shows it).
    print("\nalert signals checked:")
    for name, (expr, n) in checked_alerts.items():
        print(f"  {name}: {n} series  <- {expr}")
    print("dashboard queries checked:")
    for title, ref, expr, n in checked_panels:
        print(f"  [{title} / {ref}] {n} series  <- {expr}")


async def cli(*args: str) -> str:
    """The real `replicator` command; its stdout (a non-zero exit fails)."""
    rc, out, err = await run(str(replicator_exe()), *args, timeout=120)
    assert rc == 0, f"replicator {' '.join(args)}: exit {rc}\n{out}{err}"
    return out


async def watch_screen(url: str, want: str) -> str:
    """`replicator status --watch`: the first screen that contains `want` (then stopped)."""
    proc = await asyncio.create_subprocess_exec(
        str(replicator_exe()), "status", "--watch", "--interval", "0.2", "--url", url,
        "--token-file", "/nonexistent", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    screen = ""
    try:
        async def read() -> str:
            buf = ""
            while True:
                chunk = await proc.stdout.read(4096)
                assert chunk, f"status --watch ended; last output:\n{buf[-2000:]}"
                buf += chunk.decode()
                screens = buf.split("\x1b[H\x1b[2J")
                for sc in screens[:-1] if len(screens) > 1 else []:
                    if want in sc:
                        return sc
        screen = await asyncio.wait_for(read(), 60)
    finally:
        proc.terminate()
        await proc.wait()
    return screen


DISK_LINE = re.compile(r"^  disk 0    (?P<path>\S+) \(qcow2, 64\.0 MiB\): (?P<copy>streaming); "
                       r"lag (?P<lag>\d+ B|\d+\.\d (KiB|MiB)), (?P<blocks>\d+) blocks, "
                       r"(?P<secs>\d+\.\d\d) s$", re.M)


@pytest.mark.qemu
async def test_disk_metrics_panels_alert_and_cli_on_a_qemu_disk_pair(shm_dir, guest, tmp_path):
    """A real QEMU guest with a qcow2 disk: the disk metrics pass `promtool check metrics`,
    every disk panel and the disk alert's signal return series in a real Prometheus (with the
    disk's true size and a non-zero throughput after a write), and `replicator status` (plain
    and --watch) and `replicator switch` show the disk's figures and the switch's."""
    promtool = tool("promtool")
    dash = dashboard()
    variables = [v["name"] for v in dash["templating"]["list"] if v["type"] != "datasource"]
    disk = shm_dir / "desk-disk.qcow2"
    make_disk(disk, "qcow2", (0x11, 0, 8 * MiB))
    sink, source = await start_pair(shm_dir, guest, disk, "qcow2", "qemu-precopy")
    copy = shm_dir / "lap" / "vm" / "disk0.qcow2"
    token_file = tmp_path / "api-token"
    token_file.write_text("test-token\n")
    runners = []
    try:
        urls = {}
        for role, node in (("source", source), ("sink", sink)):
            runner, url = await start_api(node, "127.0.0.1:0", "test-token")
            runners.append(runner)
            urls[role] = url
        await wait_disk_synced(source)
        # The lag gauges are set between rounds (the disk task refreshes them after each).
        await wait_until(lambda: b'replicator_disk_lag_seconds{disk="0"}'
                         in source.metrics.exposition(), 30, "the disk lag gauges")

        # The exposition with disk series, linted.
        needles = {"source": ['replicator_disk_size_bytes{disk="0"} 6.7108864e+07',
                              'replicator_disk_sent_bytes_total{disk="0",kind="wire"}',
                              'replicator_disk_sent_bytes_total{disk="0",kind="raw"}',
                              'replicator_disk_lag_bytes{disk="0"}',
                              'replicator_disk_lag_blocks{disk="0"}',
                              'replicator_disk_lag_seconds{disk="0"}'],
                   "sink": ['replicator_disk_written_bytes_total{disk="0"}']}
        for role, url in urls.items():
            # Each daemon's QEMU: the guest's on the source, the shadow on the sink.
            needles[role] += ["\nreplicator_qemu_process_cpu_seconds_total ",
                              "\nreplicator_qemu_process_resident_memory_bytes "]
            body = await http_get(url + "/metrics")
            for needle in needles[role]:
                assert needle in body.decode(), f"{needle} not in the {role}'s /metrics"
            rc, out, err = await run(promtool, "check", "metrics", stdin=body)
            assert (rc, out, err) == (0, "", ""), \
                f"promtool check metrics on the {role}'s /metrics:\n{out}{err}"

        # `replicator status`: a line per disk on both sides.
        out = await cli("status", "--url", urls["source"], "--token-file", str(token_file))
        m = DISK_LINE.search(out)
        assert m and m["path"] == str(disk), out
        assert int(m["blocks"]) >= 0 and float(m["secs"]) >= 0, out
        out = await cli("status", "--url", urls["sink"], "--token-file", str(token_file))
        m = re.search(r"^  disk 0    (\S+) \(qcow2, 64\.0 MiB\): generation (\d+), "
                      r"(\d+\.\d MiB) written, writer running$", out, re.M)
        assert m and m[1] == str(copy) and int(m[2]) >= 1, out
        screen = await watch_screen(urls["source"], "  disk 0 ")
        assert DISK_LINE.search(screen), screen

        async with prometheus(tmp_path, [u.removeprefix("http://") for u in urls.values()]
                              ) as prom:
            await prom.scraped('replicator_disk_size_bytes{disk="0"}', 3)
            await prom.scraped('replicator_disk_written_bytes_total{disk="0"}', 3)
            # A 4 MiB write through the guest's disk: throughput and the sink's writes show it.
            await hmp_write(source, 0x22, 20 * MiB, 4 * MiB)
            await wait_disk_synced(source)
            disk_targets = [(p, t) for p, t in dashboard_targets(dash) if DISK_METRIC in t["expr"]]
            assert {p["title"] for p, _ in disk_targets} == {
                "Disk lag (bytes)", "Disk lag (blocks)", "Disk lag (seconds)",
                "Disk throughput: raw vs wire", "Disk copies written (sink)", "Disk sizes"}
            for panel, t in disk_targets:
                expr = substitute(t["expr"], variables)
                if "rate(" in expr:
                    # Rates are above 0 while the write is within the rate window.
                    async def moving(expr=expr):
                        res = await prom.query(expr)
                        return res if res and all(float(s["value"][1]) > 0 for s in res) \
                            else None
                    res = await prom.wait(f"{panel['title']} > 0", moving)
                else:
                    res = await prom.query(expr)
                assert res, f"panel {panel['title']!r}: no series for {expr}"
                for s in res:
                    assert s["metric"]["disk"] == "0" and s["metric"]["domain"] == "vm", s
                    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]):
                        assert label in s["metric"], (panel["title"], label, s)
                if panel["title"] == "Disk sizes":
                    assert float(res[0]["value"][1]) == DISK
                if panel["title"] == "Disk throughput: raw vs wire":
                    assert sorted(s["metric"]["kind"] for s in res) == ["raw", "wire"], res

            # The QEMUs' CPU: the guest's QEMU on the source and the shadow on the sink.
            qemu_targets = [(p, t) for p, t in dashboard_targets(dash) if QEMU_METRIC in t["expr"]]
            assert [p["title"] for p, _ in qemu_targets] == ["CPU: daemons and their QEMUs"]
            for panel, t in qemu_targets:
                expr = substitute(t["expr"], variables)

                async def both_roles(expr=expr):
                    res = await prom.query(expr)
                    return res if sorted(s["metric"]["role"] for s in res) == ["sink", "source"] \
                        else None
                res = await prom.wait(f"{expr} for both roles", both_roles)
                for s in res:
                    assert float(s["value"][1]) >= 0 and s["metric"]["domain"] == "vm", s
                    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]):
                        assert label in s["metric"], (panel["title"], label, s)

            # The disk alert's signal has the disk's series; a pair keeping up does not fire.
            data = await http_get(prom.base + "/api/v1/rules")
            rule = next(r for g in data["data"]["groups"] for r in g["rules"]
                        if r["name"] == "ReplicatorDiskLagHigh")
            res = await prom.query(strip_threshold(rule["query"]))
            assert [(s["metric"]["disk"], s["metric"]["domain"]) for s in res] == [("0", "vm")]
            assert await prom.query(rule["query"]) == []

        # A stop-mode switch with the CLI: its report and the status show the disks' part.
        out = await cli("switch", "--mode", "stop", "--url", urls["source"],
                        "--token-file", str(token_file))
        report = source.switcher.last
        assert report is not None and report.result == "ok" and report.disks_verified, out
        assert re.search(r"disks: final delta (\d+ B|\d+\.\d (KiB|MiB)), verified$",
                         out.strip()), out
        out = await cli("status", "--url", urls["source"], "--token-file", str(token_file))
        m = re.search(r"^  last      ok \(stop\): .*\n            disks: final delta "
                      r"(\d+ B|\d+\.\d (KiB|MiB)), verified$", out, re.M)
        assert m, out
        assert m[1] == _human_bytes(report.disk_final_delta_bytes), (m[1], report)
    finally:
        for runner in runners:
            await runner.cleanup()
        await stop_nodes(source, sink)


# ---------------------------------------------------------------------------------------------
# systemd units

def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("unit,instance", [("replicator.service", "replicator.service"),
                                           ("replicator@.service", "replicator@work.service")])
def test_systemd_unit_verifies_clean(tmp_path, unit, instance):
    analyze = tool("systemd-analyze")
    text = (DEPLOY / unit).read_text()
    s = unit_settings(text)
    config = "/etc/replicator/%i.toml" if "@" in unit else "/etc/replicator/replicator.toml"
    assert s["ExecStart"] == [f"/usr/bin/replicator run -c {config}"]
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"], "Restart": ["on-failure"],
        "KillMode": ["process"], "User": ["replicator"], "Group": ["replicator"],
        "SupplementaryGroups": ["kvm"], "ConfigurationDirectory": ["replicator"],
        "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"], "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, (key, s.get(key))
    assert s["StateDirectory"] == (["replicator/%i"] if "@" in unit else ["replicator"])
    assert "/dev/shm" in s["ReadWritePaths"]
    assert "/dev/kvm rw" in s["DeviceAllow"]
    # Settings that would break QEMU (or delete guest RAM in /dev/shm) stay off.
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "RemoveIPC", "DynamicUser",
                "PrivateUsers", "ProtectProc"):
        assert key not in s, key

    # systemd-analyze verify checks that ExecStart's binary exists and is executable: the test
    # points it at this venv's replicator (a copy of the unit; the shipped one says
    # /usr/bin/replicator, which deploy/README.md installs or symlinks).
    exe = replicator_exe()
    d = tmp_path / "units"
    d.mkdir()
    (d / unit).write_text(text.replace("/usr/bin/replicator ", f"{exe} "))
    r = subprocess.run([analyze, "verify", str(d / instance)], capture_output=True, text=True,
                       timeout=120, cwd=d)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stdout + r.stderr
    # The hardening keeps the exposure score "OK" (<= 3.0 of 10).
    r = subprocess.run([analyze, "security", "--offline=true", "--threshold=30", "--no-pager",
                        str(d / instance)], capture_output=True, text=True, timeout=120, cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr

    # With the libvirt drop-in (driver = "libvirt"): still clean, root with DAC capabilities.
    drop = d / f"{instance}.d"
    drop.mkdir()
    (drop / "libvirt.conf").write_text((DEPLOY / "libvirt.conf").read_text())
    r = subprocess.run([analyze, "verify", str(d / instance)], capture_output=True, text=True,
                       timeout=120, cwd=d)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stdout + r.stderr
    dropin = unit_settings((DEPLOY / "libvirt.conf").read_text())
    assert dropin["User"] == ["root"] and "CAP_FOWNER" in dropin["CapabilityBoundingSet"][0]
    shutil.rmtree(drop)

    # And verify does catch mistakes (so "clean" above means something).
    (d / unit).write_text(text.replace("/usr/bin/replicator ", f"{exe} ")
                          .replace("ProtectHome=yes", "ProtectHom=yes"))
    r = subprocess.run([analyze, "verify", str(d / instance)], capture_output=True, text=True,
                       timeout=120, cwd=d)
    assert "Unknown key" in r.stderr, r.stderr


def test_sysusers_creates_user_and_kvm_membership(tmp_path):
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    r = subprocess.run([sysusers, f"--root={tmp_path}",
                        str(DEPLOY / "sysusers.d" / "replicator.conf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^replicator:x:\d+:\d+:[^:]*:/var/lib/replicator:/usr/sbin/nologin$",
                     passwd, re.M), passwd
    assert re.search(r"^kvm:x:\d+:(.*,)?replicator(,.*)?$", group, re.M), group
    assert re.search(r"^replicator:x:\d+:", group, re.M), group


# ---------------------------------------------------------------------------------------------
# The real daemon: sd_notify, watchdog, SIGTERM, SIGHUP

class Notifications:
    """A NOTIFY_SOCKET of our own: collects (sender pid, message) like systemd does."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rn-")     # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []

    def wait_for(self, state: str, timeout: float = 20, check: Any = None) -> int:
        """Wait for a datagram with the line `state`; returns the sender's pid.

        `check()` runs between reads (e.g. to fail at once when the daemon died).
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, (pid, msg) in enumerate(self.messages):
                if state in msg.split("\n"):
                    del self.messages[:i + 1]
                    return pid
            left = deadline - time.monotonic()
            assert left > 0, f"no {state} within {timeout}s (got {self.messages})"
            if check is not None:
                check()
            self.sock.settimeout(min(left, 0.5))
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", cdata[:12])[0]
            self.messages.append((pid, data.decode()))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """`replicator run -c FILE` as systemd would start it (NOTIFY_SOCKET, WATCHDOG_USEC)."""

    def __init__(self, config: Path, watchdog_usec: int = 2_000_000):
        self.notify = Notifications()
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path,
                   WATCHDOG_USEC=str(watchdog_usec), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([str(replicator_exe()), "run", "-c", str(config)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_notify(self, state: str, timeout: float = 20) -> int:
        def alive() -> None:
            if self.proc.poll() is not None and state != "STOPPING=1":
                self._reader.join(5)
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {state}:"
                                     f"\n{self.log()}")
        return self.notify.wait_for(state, timeout, alive)

    def wait_log(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in {timeout}s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self.notify.close()
        return self.proc.returncode


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(config: Path, **kw: Any) -> Daemon:
        d = Daemon(config, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def write_configs(d: Path, sink_port: int, bandwidth: str = "10MB") -> tuple[Path, Path]:
    """A paired sink + source (file domain) for real daemons on 127.0.0.1, over TLS."""
    source_id, sink_id = pair_ids(d / "source", d / "sink")
    ram = d / "ram"
    ram.write_bytes(os.urandom(256 * 1024) + bytes(768 * 1024))
    sink = d / "sink.toml"
    sink.write_text(f"""
[node]
name = "laptop-test"
role = "sink"
state_dir = "{d / 'sink'}"

[domain]
name = "vm1"

[peer]
listen = "127.0.0.1:{sink_port}"
id = "{source_id}"

[control]
listen = "127.0.0.1:0"
""")
    source = d / "source.toml"
    source.write_text(source_text(d, sink_port, sink_id, bandwidth))
    return sink, source


def source_text(d: Path, sink_port: int, sink_id: str, bandwidth: str,
                bandwidth_key: str = "bandwidth_limit") -> str:
    return f"""
[node]
name = "desktop-test"
role = "source"
state_dir = "{d / 'source'}"

[domain]
name = "vm1"
regions = [{{ name = "ram0", path = "{d / 'ram'}" }}]

[stream]
{bandwidth_key} = "{bandwidth}"

[peer]
address = "127.0.0.1:{sink_port}"
id = "{sink_id}"

[control]
listen = "127.0.0.1:0"
"""


def api_get(state_dir: Path, path: str) -> Any:
    url = (state_dir / "api-url").read_text().strip()
    with urllib.request.urlopen(url + path, timeout=10) as r:
        body = r.read()
    return json.loads(body) if path.startswith("/api/") else body.decode()


def test_daemon_sd_notify_ready_watchdog_stopping(tmp_path, daemons):
    sink_cfg, _ = write_configs(tmp_path, free_port())
    d = daemons(sink_cfg, watchdog_usec=2_000_000)
    pid = d.wait_notify("READY=1")
    # NotifyAccess=main: the messages must come from the main process itself.
    assert pid == d.proc.pid, (pid, d.proc.pid)
    # READY means serving: the control API answers right away.
    assert api_get(tmp_path / "sink", "/healthz") == "ok\n"
    # WATCHDOG_USEC=2s: a ping at least every second, from the main process.
    t0 = time.monotonic()
    assert d.wait_notify("WATCHDOG=1", timeout=5) == d.proc.pid
    assert d.wait_notify("WATCHDOG=1", timeout=5) == d.proc.pid
    assert time.monotonic() - t0 < 4
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_notify("STOPPING=1", timeout=5) == d.proc.pid
    assert d.proc.wait(timeout=5) == 0, d.log()


def test_daemon_sighup_reloads_bandwidth_limit_and_sigusr1_logs_stacks(tmp_path, daemons):
    port = free_port()
    sink_cfg, source_cfg = write_configs(tmp_path, port, bandwidth="10MB")
    sink = daemons(sink_cfg)
    sink.wait_notify("READY=1")
    source = daemons(source_cfg)
    source.wait_notify("READY=1")
    # The two real daemons pair up over TLS and replicate.
    deadline = time.monotonic() + 30
    while not api_get(tmp_path / "source", "/api/v1/status")["peer"]["connected"]:
        assert time.monotonic() < deadline, source.log() + "\n" + sink.log()
        time.sleep(0.2)

    sink_id = load_config(source_cfg).peer.id
    source_cfg.write_text(source_text(tmp_path, port, sink_id, "20MiB"))
    source.proc.send_signal(signal.SIGHUP)
    source.wait_log(r"reloaded: bandwidth_limit=20971520 bytes/s")

    # A broken file is refused, with the key named, and the daemon keeps running.
    source_cfg.write_text(source_text(tmp_path, port, sink_id, "30MB", "bandwith_limit"))
    source.proc.send_signal(signal.SIGHUP)
    line = source.wait_log(r"reload refused")
    assert "stream.bandwith_limit" in line, line
    assert api_get(tmp_path / "source", "/api/v1/status")["peer"]["connected"]
    assert "reloaded: bandwidth_limit=30000000" not in source.log()

    # SIGUSR1 logs where every task and thread is, and the daemon goes on.
    source.proc.send_signal(signal.SIGUSR1)
    source.wait_log(r"SIGUSR1: \d+ asyncio task")
    assert "--- task" in source.log() and "--- thread MainThread" in source.log(), source.log()
    assert "in _session" in source.log(), source.log()      # the await chain, not its top
    assert api_get(tmp_path / "source", "/api/v1/status")["peer"]["connected"]

    assert source.stop() == 0, source.log()
    assert sink.stop() == 0, sink.log()


# ---------------------------------------------------------------------------------------------
# Example configs

def test_libvirt_example_configs_load():
    desktop = load_config(DEPLOY / "libvirt-desktop.toml.example")
    laptop = load_config(DEPLOY / "libvirt-laptop.toml.example")
    assert desktop.domain.driver == laptop.domain.driver == "libvirt"
    assert desktop.domain.name == laptop.domain.name
    assert desktop.peer.address.rsplit(":", 1)[1] == laptop.peer.listen.rsplit(":", 1)[1]
    assert laptop.peer.address.rsplit(":", 1)[1] == desktop.peer.listen.rsplit(":", 1)[1]
    assert laptop.domain.qemu.disks and not desktop.domain.qemu.disks


def test_example_configs_load_and_fit_the_unit():
    desktop = load_config(DEPLOY / "desktop.toml.example")
    laptop = load_config(DEPLOY / "laptop.toml.example")
    assert (desktop.node.role, laptop.node.role) == ("source", "sink")
    assert desktop.domain.name == laptop.domain.name
    assert desktop.domain.driver == laptop.domain.driver == "qemu"
    assert desktop.domain.qemu.qmp_socket is not None and not desktop.domain.qemu.launch
    # The link: the desktop connects to the port the laptop listens on.
    assert desktop.peer.address.rsplit(":", 1)[1] == laptop.peer.listen.rsplit(":", 1)[1]
    # ... and back: both ways, the round trip.
    assert laptop.peer.address.rsplit(":", 1)[1] == desktop.peer.listen.rsplit(":", 1)[1]
    assert not desktop.peer.insecure_plaintext and not laptop.peer.insecure_plaintext
    # Paths the unit provides: StateDirectory=replicator, ConfigurationDirectory=replicator.
    for cfg in (desktop, laptop):
        assert cfg.node.state_dir == Path("/var/lib/replicator")
        assert cfg.control.token_file == Path("/etc/replicator/api-token")
        assert cfg.control.listen == "127.0.0.1:7401"
    assert desktop.stream.bandwidth_limit == 80_000_000
    # ... and the README's install steps use them.
    readme = (DEPLOY / "README.md").read_text()
    for needle in ("desktop.toml.example", "laptop.toml.example", "replicator pair",
                   "systemctl enable --now replicator", "api-token", "sysusers.d"):
        assert needle in readme, needle
