"""The status page (control/static/index.html) in a real headless Chromium, on a running pair.

The browser is driven through chromedriver's W3C WebDriver HTTP API with a tiny urllib client
(no selenium). Every WebDriver call runs in a worker thread, so the event loop keeps serving the
replicating pair and the control API the page talks to while the browser waits on them.

Chromium and chromedriver are required: without them these tests fail, they do not skip.
Override their paths with REPLICATOR_CHROMIUM / REPLICATOR_CHROMEDRIVER.

The screenshot (1280x800, pair replicating, before the switch) is always taken and checked; it is
written to docs/status-page.png when that file does not exist yet or REPLICATOR_UPDATE_SCREENSHOT=1
(so ordinary test runs do not dirty the work tree with a new PNG every time).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from replicator.control.api import start_api

from .test_disks_qemu import DISK, make_disk, start_pair, wait_disk_synced
from .test_switch_qemu import stop_nodes

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "status-page.png"
MiB = 1024 * 1024
VIEWPORT = (1280, 800)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"      # W3C web element reference key

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server",
                  "--disable-extensions", "--force-color-profile=srgb", "--hide-scrollbars",
                  "--window-size=%d,%d" % VIEWPORT,
                  # A name an attacker's DNS could rebind to this host, for the Host check test.
                  "--host-resolver-rules=MAP rebind.test 127.0.0.1"]


def _find(env: str, *candidates: str) -> str:
    given = os.environ.get(env)
    if given:
        if not os.access(given, os.X_OK):
            pytest.fail(f"{env}={given} is not an executable")
        return given
    for c in candidates:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"none of {', '.join(candidates)} found (set {env}); the status page tests need "
                "a real Chromium and chromedriver (Debian: apt install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriverError(AssertionError):
    pass


class Browser:
    """A minimal W3C WebDriver client for one chromedriver session."""

    def __init__(self, base: str):
        self.base = base
        self.session = ""
        # Never go through a proxy from the environment: everything here is on 127.0.0.1.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call_sync(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._http.open(req, timeout=timeout) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as exc:
            try:
                err = json.load(exc).get("value", {})
            except ValueError:
                err = {}
            raise WebDriverError(f"{method} {path}: HTTP {exc.code} {err.get('error', '')}: "
                                 f"{str(err.get('message', ''))[:500]}") from None
        return reply.get("value")

    def s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.call_sync, method, self.s(path), body)

    async def get(self, url: str) -> None:
        await self.call("POST", "/url", {"url": url})

    async def current_url(self) -> str:
        return await self.call("GET", "/url")

    async def find(self, css: str) -> str:
        found = await self.call("POST", "/element", {"using": "css selector", "value": css})
        if not isinstance(found, dict) or ELEMENT not in found:
            raise WebDriverError(f"find {css}: unexpected answer {found!r}")
        return found[ELEMENT]

    async def text(self, css: str) -> str:
        return await self.call("GET", f"/element/{await self.find(css)}/text")

    async def attr(self, css: str, name: str) -> str | None:
        return await self.call("GET", f"/element/{await self.find(css)}/attribute/{name}")

    async def displayed(self, css: str) -> bool:
        return await self.call("GET", f"/element/{await self.find(css)}/displayed")

    async def click(self, css: str) -> None:
        await self.call("POST", f"/element/{await self.find(css)}/click", {})

    async def type(self, css: str, value: str) -> None:
        el = await self.find(css)
        await self.call("POST", f"/element/{el}/clear", {})
        await self.call("POST", f"/element/{el}/value", {"text": value})

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def script_errors(self) -> list[str]:
        """Console errors of the page's own code since the last call (not failed requests:
        a refused switch is an HTTP error on purpose)."""
        entries = await self.call("POST", "/se/log", {"type": "browser"})
        return [e["message"] for e in entries
                if e.get("level") == "SEVERE" and e.get("source") != "network"]

    async def screenshot(self) -> bytes:
        return base64.b64decode(await self.call("GET", "/screenshot"))


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (via chromedriver) for the module, viewport exactly 1280x800."""
    chromium = _find("REPLICATOR_CHROMIUM", "/usr/lib/chromium/chromium", "chromium",
                     "chromium-browser", "google-chrome")
    chromedriver = _find("REPLICATOR_CHROMEDRIVER", "chromedriver")
    profile = tempfile.mkdtemp(prefix="replicator-chromium-")
    log = Path(profile + ".chromedriver.log")
    port = _free_port()
    proc = subprocess.Popen([chromedriver, f"--port={port}", f"--log-path={log}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b = Browser(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if b.call_sync("GET", "/status", timeout=2).get("ready"):
                    break
            except (OSError, WebDriverError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromedriver did not start (exit {proc.poll()}); see {log}")
            time.sleep(0.05)
        caps = {"browserName": "chrome", "pageLoadStrategy": "normal",
                "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": chromium,
                                       "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]}}
        try:
            created = b.call_sync("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        except WebDriverError as exc:
            pytest.fail(f"could not start {chromium}: {exc}")
        b.session = created["sessionId"]
        # The window includes some (invisible) browser UI even headless: size it so the
        # viewport, which is what the page and the screenshot see, is exactly 1280x800.
        b.call_sync("POST", b.s("/url"), {"url": "about:blank"})
        for _ in range(3):
            inner = b.call_sync("POST", b.s("/execute/sync"),
                                {"script": "return [innerWidth, innerHeight]", "args": []})
            if tuple(inner) == VIEWPORT:
                break
            rect = b.call_sync("GET", b.s("/window/rect"))
            b.call_sync("POST", b.s("/window/rect"),
                        {"width": rect["width"] + VIEWPORT[0] - inner[0],
                         "height": rect["height"] + VIEWPORT[1] - inner[1]})
        yield b
    finally:
        if b.session:
            with contextlib.suppress(OSError, WebDriverError):
                b.call_sync("DELETE", b.s(""), timeout=10)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
        log.unlink(missing_ok=True)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15,
                     interval: float = 0.1) -> Any:
    """Await check() until it returns something truthy; fail with `what` and the last value."""
    end = asyncio.get_running_loop().time() + timeout
    value: Any = None
    while True:
        try:
            value = await check()
        except WebDriverError as exc:       # e.g. element not rendered yet
            value = exc
        if value and not isinstance(value, Exception):
            return value
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"{what}: not reached in {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


# Whether the API reports where the token file is (see the report on the status page).
API_HAS_TOKEN_FILE = "token_file" in inspect.signature(start_api).parameters


@contextlib.asynccontextmanager
async def api(node: Any, token: str, token_file: Path | None = None):
    kw = {"token_file": token_file} if token_file and API_HAS_TOKEN_FILE else {}
    runner, url = await start_api(node, "127.0.0.1:0", token, **kw)
    try:
        yield url
    finally:
        await runner.cleanup()


async def open_page(browser: Browser, url: str, role: str) -> None:
    await browser.script_errors()                       # start with an empty console log
    await browser.get(url + "/")
    await eventually(lambda: _text_is(browser, "#role", role), f"page shows role {role}")


async def _text_is(browser: Browser, css: str, want: str) -> bool:
    return (await browser.text(css)).strip().lower() == want


BYTES = re.compile(r"^\d+(\.\d)? (B|KiB|MiB|GiB|TiB)$")


async def test_page_shows_live_replication_and_switch_now_moves_the_domain(
        shm_dir, workload, pair_factory, browser, monkeypatch):
    wl = workload(shm_dir / "ram", 32 * MiB, rate=4e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    token = secrets.token_urlsafe(24)
    token_file = shm_dir / "source" / "api-token"
    async with api(pair.source, token, token_file) as url:
        await open_page(browser, url, "source")
        assert await browser.text("#node") == "desktop"
        assert await browser.text("#domain") == "vm1"
        await eventually(lambda: _text_is(browser, "#peer-state", "connected"), "peer connected")
        assert await browser.text("#peer-name") == "laptop"
        assert await browser.attr("#ram-bytes", "data-value") == str(32 * MiB)
        assert await browser.text("#ram-bytes") == "32.0 MiB"
        assert not await browser.displayed("#disks")             # this domain has no disks

        # Live: the page re-polls every second and shows the status' lag numbers each time.
        seen_times: set[str] = set()
        samples: list[tuple[str, ...]] = []
        end = asyncio.get_running_loop().time() + 3.5
        while asyncio.get_running_loop().time() < end or len(seen_times) < 3:
            assert asyncio.get_running_loop().time() < end + 5, "page stopped polling"
            seen_times.add(await browser.attr("#updated", "data-time"))
            samples.append(tuple([await browser.text(c) for c in (
                "#lag-bytes", "#lag-pages", "#lag-seconds", "#dirty-rate", "#throughput",
                "#sync-percent", "#predicted-downtime")]))
            await asyncio.sleep(0.3)
        assert len(seen_times - {""}) >= 3, seen_times
        for lag_bytes, lag_pages, lag_secs, dirty, thr, pct, predicted in samples:
            assert BYTES.match(lag_bytes), lag_bytes
            assert re.fullmatch(r"[\d,]+", lag_pages), lag_pages
            assert re.fullmatch(r"\d+\.\d\d s", lag_secs), lag_secs
            assert BYTES.match(dirty.removesuffix("/s")) and BYTES.match(thr.removesuffix("/s"))
            assert re.fullmatch(r"\d+\.\d %", pct), pct
            assert re.fullmatch(r"\d+\.\d ms|\d+\.\d\d s", predicted), predicted
            assert 0 <= int(lag_pages.replace(",", "")) <= 32 * MiB // 4096
        assert len(set(samples)) > 1, f"the numbers never changed: {samples}"
        st = pair.source.status()
        assert st["peer"]["connected"]
        # This daemon's own CPU (the pair runs in this process); a file domain has no QEMU.
        cpu = await browser.text("#cpu")
        assert re.fullmatch(r"daemon \d+\.\d % of a core", cpu), cpu
        assert float(await browser.attr("#cpu", "data-daemon")) >= 0
        assert await browser.attr("#cpu", "data-qemu") == ""

        # The switch panel: live by default, token field empty, button ready.
        assert await browser.displayed("#switch-button")
        assert await browser.js("return document.querySelector('input[name=mode]:checked')"
                                ".value") == "live"
        assert await browser.attr("#token", "type") == "password"
        hint = await browser.text("#token-file")
        assert hint == (str(token_file) if API_HAS_TOKEN_FILE else "<state_dir>/api-token")
        await eventually(lambda: browser.js("return !document.getElementById("
                                            "'switch-button').disabled"), "button enabled")
        if hasattr(pair.source, "domain_state"):       # the API adds it to the status then
            assert await browser.text("#domain-state") == "running"

        # Screenshot while replicating, before the switch.
        assert tuple(await browser.js("return [innerWidth, innerHeight]")) == (1280, 800)
        png = await browser.screenshot()
        assert png_size(png) == (1280, 800)
        if not SCREENSHOT.exists() or os.environ.get("REPLICATOR_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(png)

        # Slow the first step a little so the polled phase is visible on the page.
        driver = pair.source.driver
        real_prepare = driver.prepare_switch

        async def slow_prepare() -> None:
            await asyncio.sleep(2.5)
            await real_prepare()

        monkeypatch.setattr(driver, "prepare_switch", slow_prepare)

        await browser.type("#token", token)
        await browser.click("#switch-button")
        # Progress: the phase from the polled status (read in one go, so it is consistent).
        phase, why, label = await eventually(lambda: browser.js(
            "const now = document.querySelector('#phases li.now');"
            "return now && [now.textContent, document.getElementById('switch-why').textContent,"
            "               document.getElementById('switch-button').textContent];"),
            "phase shown", timeout=5)
        assert phase in ("prepare", "catch-up", "pause", "final-delta", "verify",
                         "device-state", "commit"), phase
        assert why.startswith("Switching (live mode): " + phase), why
        assert label == "Switching…"
        outcome = await eventually(lambda: _outcome(browser, "ok"), "switch outcome", 30)

        assert pair.source.switcher.handed_over
        assert pair.sink.status()["runs_domain"]
        report = pair.source.switcher.last
        assert report is not None and report.result == "ok" and report.mode == "live"
        m = re.search(r"Downtime (\d+\.\d) ms · time to switch (\d+\.\d) ms", outcome)
        assert m, outcome
        assert abs(float(m[1]) - report.downtime_ms) <= 0.051
        assert abs(float(m[2]) - report.time_to_switch_ms) <= 0.051
        assert "runs on laptop" in outcome

        # The polled status then shows the handover and the last switch.
        await eventually(lambda: _text_is(browser, "#last-result", "switched"), "last switch")
        assert await browser.text("#last-mode") == "live"
        assert float(await browser.attr("#last-downtime", "data-value")) == report.downtime_ms
        assert not await browser.displayed("#last-disks-verified")
        assert not await browser.displayed("#last-disk-delta")
        assert await browser.displayed("#handed-over")
        assert not await browser.displayed("#switch-button")     # nothing left to switch

        # The token lives in this tab's sessionStorage only: not in the URL, storage or cookies.
        assert token not in await browser.current_url()
        assert await browser.js("return sessionStorage.getItem('replicator.api-token')") == token
        assert await browser.js("return localStorage.length + document.cookie.length") == 0
        assert await browser.script_errors() == []


async def _outcome(browser: Browser, kind: str, containing: str = "") -> str | None:
    """The outcome box's text once it is of `kind` (ok/bad/info) and contains `containing`."""
    if (await browser.attr("#outcome", "class") or "").split()[-1:] != [kind]:
        return None
    text = await browser.text("#outcome")
    return text if containing.lower() in text.lower() else None


async def test_wrong_token_and_busy_switch_are_refused_and_sink_page_has_no_button(
        shm_dir, workload, pair_factory, browser):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=1e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    token = secrets.token_urlsafe(24)
    async with api(pair.source, token) as url:
        await open_page(browser, url, "source")
        await eventually(lambda: browser.js("return !document.getElementById("
                                            "'switch-button').disabled"), "button enabled")
        await browser.click("#switch-button")           # no token entered: nothing is sent
        await eventually(lambda: _outcome(browser, "bad", "enter the api token"), "token asked")
        await browser.type("#token", "not-" + token)
        await browser.click("#switch-button")
        await eventually(lambda: _outcome(browser, "bad", "wrong token"), "401 message")
        assert await browser.js("return sessionStorage.getItem('replicator.api-token')") is None
        await asyncio.sleep(0.5)
        assert not pair.source.switcher.handed_over
        assert pair.source.switcher.last is None
        assert not pair.sink.status()["runs_domain"]
        assert await pair.source.driver.is_running()

        # Another switch holds the switcher: the page says so, and still nothing moved.
        async with pair.source.switcher._lock:
            await browser.type("#token", token)
            await browser.click("#switch-button")
            await eventually(lambda: _outcome(browser, "bad", "a switch is already running"),
                             "409 message")
        assert not pair.source.switcher.handed_over and not pair.sink.status()["runs_domain"]
        assert await browser.script_errors() == []

    # The sink's page: its state, no button, and where switches are started.
    async with api(pair.sink, token) as url:
        await open_page(browser, url, "sink")
        await eventually(lambda: _text_is(browser, "#sink-state", "paused standby"),
                         "sink state")
        assert await browser.text("#node") == "laptop"
        assert not await browser.displayed("#switch-button")
        note = await browser.text("#sink-note")
        assert "switches are started on the source" in note.lower(), note
        assert await browser.text("#peer-state") == "connected"
        assert await browser.script_errors() == []


async def test_ui_login_link_logs_the_browser_in_and_the_button_switches_with_the_cookie(
        shm_dir, workload, pair_factory, browser):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=1e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    token = secrets.token_urlsafe(24)
    token_file = shm_dir / "api-token"
    token_file.write_text(token + "\n")
    async with api(pair.source, token, token_file) as url:
        await open_page(browser, url, "source")          # not logged in: the token field shows
        assert await browser.displayed("#token")
        assert not await browser.displayed("#session-note")

        # The real `replicator ui --print`, as a user runs it, trading the token for a link.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "replicator.cli", "ui", "--print", "--url", url,
            "--token-file", str(token_file), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        link = out.decode().strip()
        assert link.startswith(url + "/login?once="), link

        await browser.get(link)                          # redirects to the page, logged in
        assert await browser.current_url() == url + "/"
        await eventually(lambda: browser.displayed("#session-note"), "logged in")
        assert not await browser.displayed("#token")
        cookies = await browser.call("GET", "/cookie")
        assert len(cookies) == 1, cookies
        assert cookies[0]["httpOnly"] is True and cookies[0]["sameSite"] == "Strict", cookies
        assert "expiry" not in cookies[0], cookies       # ends with the browser session
        assert await browser.js("return document.cookie") == ""          # HttpOnly
        assert token not in await browser.current_url()

        await eventually(lambda: browser.js("return !document.getElementById("
                                            "'switch-button').disabled"), "button enabled")
        await browser.click("#switch-button")
        outcome = await eventually(lambda: _outcome(browser, "ok"), "switch outcome", 30)
        assert "runs on laptop" in outcome
        assert pair.source.switcher.handed_over and pair.sink.status()["runs_domain"]
        assert await browser.js("return sessionStorage.length") == 0     # no token anywhere
        assert await browser.script_errors() == []

        # The link worked once.
        await browser.get(link)
        assert "not valid" in await browser.text("body")
        await browser.call("DELETE", "/cookie")


async def test_page_is_not_served_to_a_rebound_name_nor_framed_by_another_site(
        shm_dir, workload, pair_factory, browser):
    wl = workload(shm_dir / "ram", 8 * MiB, rate=1e6, fill=0.5)
    pair = await pair_factory(shm_dir, pid=wl.proc.pid)
    async with api(pair.sink, secrets.token_urlsafe(24)) as url:
        port = url.rsplit(":", 1)[1]
        # DNS rebinding: a site whose name now resolves to 127.0.0.1 reads nothing.
        await browser.get(f"http://rebind.test:{port}/api/v1/status")
        body = await browser.text("body")
        assert "is not a name of this node" in body and "laptop" not in body, body

        # Clickjacking: another origin (another port) framing the page gets it refused.
        async def framing_page(request: web.Request) -> web.Response:
            return web.Response(text=f'<!doctype html><iframe src="{url}/" width=800 '
                                     'height=600></iframe>', content_type="text/html")

        framer = web.Application()
        framer.router.add_get("/", framing_page)
        runner = web.AppRunner(framer, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            fport = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            await browser.call("POST", "/se/log", {"type": "browser"})         # clear the log
            await browser.get(f"http://127.0.0.1:{fport}/")

            async def refused() -> list[str]:
                entries = await browser.call("POST", "/se/log", {"type": "browser"})
                return [e["message"] for e in entries if "frame-ancestors" in e["message"]]
            msgs = await eventually(refused, "framing refused", timeout=10)
            assert "'none'" in msgs[0], msgs
        finally:
            await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# Disks

ROW0 = '#disk-rows tr[data-disk="0"] '


async def _cell(browser: Browser, row: str, cls: str) -> tuple[str, str | None]:
    """(text, data-value) of one disk table cell."""
    css = row + "." + cls
    return (await browser.text(css)).strip(), await browser.attr(css, "data-value")


async def expect_cpu(browser: Browser, css: str, qemu_pid: int) -> None:
    """The page shows the daemon's CPU and that of the QEMU ``qemu_pid`` (a shadow started
    per precopy session may be new: wait for the page to show it)."""
    await eventually(lambda: browser.js(
        "return document.querySelector(arguments[0]).title.endsWith(arguments[1])",
        css, f"QEMU pid {qemu_pid}"), f"{css} shows QEMU pid {qemu_pid}")
    cpu = await browser.text(css)
    assert re.fullmatch(r"daemon \d+\.\d % · QEMU \d+\.\d % of a core", cpu), cpu
    assert float(await browser.attr(css, "data-daemon")) >= 0
    assert float(await browser.attr(css, "data-qemu")) >= 0
    title = await browser.attr(css, "title")
    assert re.fullmatch(rf"CPU time over the last \d+ s; QEMU pid {qemu_pid}", title), title


@pytest.mark.qemu
async def test_page_shows_each_disk_and_the_switch_disk_figures(shm_dir, guest, browser):
    """A real QEMU guest with a qcow2 disk: the source's page has a row with the disk's
    figures, the sink's page its copy's, and after a stop-mode switch from the page the last
    switch shows the disk final delta and that the disks were verified."""
    disk = shm_dir / "desk-disk.qcow2"
    make_disk(disk, "qcow2", (0x11, 0, 8 * MiB))
    sink, source = await start_pair(shm_dir, guest, disk, "qcow2", "qemu-precopy")
    copy = shm_dir / "lap" / "vm" / "disk0.qcow2"
    token = secrets.token_urlsafe(24)
    try:
        await wait_disk_synced(source)
        async with api(source, token) as url:
            await open_page(browser, url, "source")
            await eventually(lambda: _text_is(browser, ROW0 + ".disk-copy", "streaming"),
                             "disk 0 streaming")
            assert await browser.displayed("#disks")
            assert len(await browser.js("return [...document.querySelectorAll("
                                        "'#disk-rows tr')].map((r) => r.dataset.disk)")) == 1
            assert await _cell(browser, ROW0, "disk-path") == (str(disk), None)
            assert await _cell(browser, ROW0, "disk-format") == ("qcow2", None)
            assert await _cell(browser, ROW0, "disk-size") == ("64.0 MiB", str(DISK))
            assert (await browser.attr(ROW0 + ".disk-copy .pill", "class")) == "pill ok"
            lag, raw = await _cell(browser, ROW0, "disk-lag-bytes")
            assert BYTES.match(lag) and int(raw) >= 0, (lag, raw)
            blocks, raw_blocks = await _cell(browser, ROW0, "disk-lag-blocks")
            assert re.fullmatch(r"[\d,]+", blocks) and int(raw_blocks) == -(-int(raw) // 65536)
            behind, _ = await _cell(browser, ROW0, "disk-lag-seconds")
            assert re.fullmatch(r"\d+\.\d\d s", behind), behind
            sent, raw_sent = await _cell(browser, ROW0, "disk-sent")
            assert BYTES.match(sent) and int(raw_sent) > 0, (sent, raw_sent)
            heads = await browser.js("return [...document.querySelectorAll('#disk-head th')]"
                                     ".map((th) => th.textContent)")
            assert heads == ["Disk", "Path", "Format", "Size", "Copy", "Lag", "Blocks",
                             "Behind", "Sent (wire)"], heads
            # The cost of staying warm: the daemon's CPU and its guest's QEMU's.
            await expect_cpu(browser, "#cpu", source.driver.proc.pid)
            assert await browser.script_errors() == []

        async with api(sink, token) as url:
            await open_page(browser, url, "sink")
            await eventually(lambda: _text_is(browser, ROW0 + ".disk-writer", "running"),
                             "the sink's disk writer")
            assert await _cell(browser, ROW0, "disk-path") == (str(copy), None)
            assert await _cell(browser, ROW0, "disk-size") == ("64.0 MiB", str(DISK))
            generation, raw_gen = await _cell(browser, ROW0, "disk-generation")
            assert generation == raw_gen and int(generation) >= 1, generation
            written, raw_written = await _cell(browser, ROW0, "disk-written")
            assert BYTES.match(written) and int(raw_written) >= 8 * MiB, (written, raw_written)
            await expect_cpu(browser, "#sink-cpu", sink.status()["shadow"]["pid"])
            assert await browser.script_errors() == []

        async with api(source, token) as url:
            await open_page(browser, url, "source")
            await eventually(lambda: browser.js("return !document.getElementById("
                                                "'switch-button').disabled"), "button enabled")
            await browser.click("input[name=mode][value=stop]")
            await browser.type("#token", token)
            await browser.click("#switch-button")
            await eventually(lambda: _outcome(browser, "ok"), "switch outcome", 60)
            report = source.switcher.last
            assert report is not None and report.result == "ok" and report.disks_verified
            await eventually(lambda: _text_is(browser, "#last-result", "switched"),
                             "last switch")
            assert await browser.text("#last-mode") == "stop"
            assert await browser.text("#last-disks-verified") == "yes"
            assert await browser.attr("#last-disks-verified", "class") == "res-ok"
            delta = await browser.text("#last-disk-delta")
            assert BYTES.match(delta), delta
            assert await browser.attr("#last-disk-delta", "data-value") == \
                str(report.disk_final_delta_bytes)
            assert await browser.displayed("#disks")      # still listed after the handover
            assert await browser.script_errors() == []
    finally:
        await stop_nodes(source, sink)


class StatusNode:
    """Serves a fixed status dict through the real control API (the page is under test: the
    states shown here last only a moment on a real pair)."""

    def __init__(self, status: dict):
        self._status = status
        self.metrics = None

    def status(self) -> dict:
        return json.loads(json.dumps(self._status))

    async def switch(self, mode: str) -> dict:
        raise AssertionError("no switch in this test")


def _source_disk(index: int, copy: str, progress: float, lag: int, seconds: float) -> dict:
    return {"index": index, "node": f"disk{index}", "path": f"/srv/vm/disk{index}.qcow2",
            "format": "qcow2", "size_bytes": 10 * 1024 * MiB,
            "lag": {"bytes": lag, "blocks": -(-lag // 65536), "seconds": seconds},
            "copy": copy, "progress": progress, "sent_bytes": {"raw": 5 * MiB, "wire": 3 * MiB},
            "acked_generation": 4}


async def test_page_shows_disk_copy_progress_and_sink_writer_state(browser):
    source = {"role": "source", "node": "desktop", "domain": "vm1", "time": time.time(),
              "peer": {"connected": True, "node": "laptop"}, "ram_bytes": 64 * MiB,
              "lag": {"bytes": 0, "pages": 0, "seconds": 0.0}, "in_sync": False,
              "switch_estimate_seconds": 0.05, "handed_over": False,
              "disks": [_source_disk(0, "streaming", 1.0, 0, 0.0),
                        _source_disk(1, "initial", 0.425, 6 * 1024 * MiB, 12.5)],
              "last_switch": {"result": "rolled_back", "mode": "stop", "downtime_ms": 40.0,
                              "time_to_switch_ms": 90.0, "disk_final_delta_bytes": 3 * MiB,
                              "disks_verified": False, "started_at": time.time(),
                              "message": "disk digest mismatch"}}
    async with api(StatusNode(source), "t") as url:
        await open_page(browser, url, "source")
        row1 = '#disk-rows tr[data-disk="1"] '
        await eventually(lambda: _text_is(browser, row1 + ".disk-copy", "first copy 42.5 %"),
                         "disk 1 in its first copy")
        assert await browser.attr(row1 + ".disk-copy .pill", "class") == "pill warn"
        assert await _cell(browser, row1, "disk-copy") == ("first copy 42.5 %", "initial")
        assert await _cell(browser, row1, "disk-size") == ("10.0 GiB", str(10 * 1024 * MiB))
        assert await _cell(browser, row1, "disk-lag-bytes") == ("6.0 GiB", str(6 * 1024 * MiB))
        assert await _cell(browser, row1, "disk-lag-blocks") == ("98,304", "98304")
        assert await _cell(browser, row1, "disk-lag-seconds") == ("12.50 s", "12.5")
        assert await _cell(browser, row1, "disk-sent") == ("3.0 MiB", str(3 * MiB))
        assert await _cell(browser, ROW0, "disk-copy") == ("streaming", "streaming")
        assert await browser.text("#in-sync") == "copying disks"
        assert await browser.text("#last-disks-verified") == "no"
        assert await browser.attr("#last-disks-verified", "class") == "res-bad"
        assert await _text_is(browser, "#last-disk-delta", "3.0 mib")

        # The full compare after lost bitmaps shows the same way.
        source["disks"][1].update(copy="compare", progress=0.9)
        await eventually(lambda: _text_is(browser, row1 + ".disk-copy", "comparing 90.0 %"),
                         "disk 1 comparing")
        # Without disks the section goes away, and so do the last switch's disk lines.
        source["disks"] = []
        del source["last_switch"]["disks_verified"], source["last_switch"]["disk_final_delta_bytes"]
        await eventually(lambda: browser.js("return document.getElementById('disks').hidden"),
                         "disk section hidden")
        assert not await browser.displayed("#last-disks-verified")
        assert await browser.script_errors() == []

    sink = {"role": "sink", "node": "laptop", "domain": "vm1", "time": time.time(),
            "peer": {"connected": False, "node": "desktop", "error": "link lost"},
            "acked_epoch": 7, "ram_bytes": 64 * MiB, "runs_domain": False, "shadow": {},
            "disks": [{"index": 0, "path": "/var/lib/replicator/vm1/disk0.qcow2",
                       "format": "qcow2", "size_bytes": 2 * 1024 * MiB, "generation": 12,
                       "written_bytes": 700 * MiB, "writer": "down"}]}
    async with api(StatusNode(sink), "t") as url:
        await open_page(browser, url, "sink")
        await eventually(lambda: _text_is(browser, ROW0 + ".disk-writer", "down"), "writer")
        assert await browser.attr(ROW0 + ".disk-writer .pill", "class") == "pill bad"
        assert await _cell(browser, ROW0, "disk-generation") == ("12", "12")
        assert await _cell(browser, ROW0, "disk-written") == ("700.0 MiB", str(700 * MiB))
        assert await _cell(browser, ROW0, "disk-size") == ("2.0 GiB", str(2 * 1024 * MiB))
        heads = await browser.js("return [...document.querySelectorAll('#disk-head th')]"
                                 ".map((th) => th.textContent)")
        assert heads == ["Disk", "Path", "Format", "Size", "Generation", "Written", "Writer"]
        assert not await browser.displayed("#last-switch")
        assert await browser.script_errors() == []


class PullNode(StatusNode):
    """A two-way sink: its page's button asks the peer to switch the domain here."""

    def __init__(self, status: dict):
        super().__init__(status)
        self.asked: list[str] = []

    async def switch(self, mode: str) -> dict:
        self.asked.append(mode)
        self._status.update(runs_domain=True)
        return {"result": "ok", "mode": mode, "requested_here": True}


async def test_a_two_way_standby_page_switches_the_domain_here(browser):
    sink = {"role": "sink", "node": "desktop", "domain": "vm1", "time": time.time(),
            "two_way": True, "handed_over": True, "runs_domain": False,
            "peer": {"connected": True, "node": "laptop"}, "acked_epoch": 7,
            "ram_bytes": 64 * MiB, "shadow": {}, "disks": [],
            "placement": {"here": False, "generation": 1}}
    node = PullNode(sink)
    async with api(node, "t") as url:
        await open_page(browser, url, "sink")
        await eventually(lambda: browser.displayed("#switch-button"), "the button")
        assert await browser.text("#switch-button") == "Switch here now"
        assert "brings it here" in await browser.text("#switch-why")
        assert not await browser.displayed("#sink-note")
        await browser.type("#token", "t")
        await browser.click("#switch-button")
        async def asked() -> bool:
            return node.asked == ["live"]
        await eventually(asked, "the page to ask for the switch")
        await eventually(lambda: _text_is(browser, "#switch-why", "the domain runs here."),
                         "the page to show the domain here")
        assert await browser.script_errors() == []
    # One way, the standby still has no button.
    one_way = {**sink, "two_way": False}
    async with api(StatusNode(one_way), "t") as url:
        await open_page(browser, url, "sink")
        assert not await browser.displayed("#switch-form")
