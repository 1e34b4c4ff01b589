"""report.html in a real browser: headless Chromium loads the page, and the test checks through the
DevTools protocol that it logged no console error or failed load and that every image decoded,
then saves a full-page screenshot.

The DevTools protocol runs over ``--remote-debugging-pipe`` (NUL-separated JSON on file
descriptors 3 and 4), so the test needs only the standard library: no websocket client and no
Playwright. Skipped when Chromium is absent (.ci/run installs Debian's ``chromium``). Set
RFBENCH_SCREENSHOT=path.png to keep a copy of the screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_report_synthetic import SMALL, make_run

from rfbench.report.html import render_report

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


class Chromium:
    """A headless Chromium driven over the DevTools pipe (a few CDP calls, standard library only)."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="rfbench-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; move our ends above 10 first so
        # the dup2 below cannot clobber one with the other.
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire_fds():  # runs in the child between fork and exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.stderr = open(os.path.join(self.profile, "stderr.log"), "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
            close_fds=False, preexec_fn=wire_fds,
        )
        os.close(child_r)
        os.close(child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                self.stderr.seek(0)
                tail = self.stderr.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"Chromium closed the DevTools pipe; stderr tail:\n{tail}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def wait_for(self, predicate) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if predicate(msg):
                return msg
            self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self.wait_for(lambda m, i=self._id: m.get("id") == i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=15)
        except Exception:
            self.proc.kill()  # only the process this test started
            self.proc.wait(timeout=15)
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                os.close(fd)
            self.stderr.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def load_and_check(page: Path, screenshot: Path, width: int = 1280) -> dict:
    """Open ``page``; return console errors, failed loads, broken images and the screenshot size."""
    browser = Chromium(CHROMIUM)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            browser.call(domain, session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        # Every <img> must have finished loading and decoded to a non-empty bitmap.
        broken = browser.call("Runtime.evaluate", {
            "expression": "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                          ".map(i => i.getAttribute('src').slice(0, 80))",
            "returnByValue": True}, session)["result"]["value"]
        n_images = browser.call("Runtime.evaluate", {"expression": "document.images.length",
                                                     "returnByValue": True}, session)["result"]["value"]
        height = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
        height = int(min(height, 30000))
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        console_errors = [
            " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
            for e in browser.events
            if e.get("method") == "Runtime.consoleAPICalled"
            and e["params"].get("type") in ("error", "assert")
        ]
        console_errors += [e["params"]["exceptionDetails"].get("text", "exception")
                           for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        log_errors = [f"{e['params']['entry'].get('text')} {e['params']['entry'].get('url', '')}"
                      for e in browser.events
                      if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"]
        return {"console": console_errors, "log": log_errors, "broken": broken, "images": n_images,
                "height": height}
    finally:
        browser.close()


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (install Debian's `chromium`; .ci/run does) - "
                             "the headless check of report.html cannot run")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    run = make_run(base / "run", **SMALL)
    page, figures = render_report(run, base / "report", svg=False, dpi=80)
    return page, [f for f in figures if hasattr(f, "files")]


@needs_chromium
def test_report_page_loads_cleanly_in_chromium(report, tmp_path):
    page, figures = report
    shot = tmp_path / "report.png"
    result = load_and_check(page, shot)
    assert result["console"] == [], result["console"]
    assert result["log"] == [], result["log"]
    assert result["broken"] == [], result["broken"]
    assert result["images"] == len(figures) >= 6
    # The screenshot is a real full-page PNG: the signature, and taller than one screen.
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    assert result["height"] > 3000
    if os.environ.get("RFBENCH_SCREENSHOT"):
        shutil.copy(shot, os.environ["RFBENCH_SCREENSHOT"])


@needs_chromium
def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    """The checker itself can fail: a page with a missing image and a script error is flagged."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><body><h1>bad</h1><img src="figures/missing.png">'
                    '<script>console.error("boom")</script></body></html>')
    result = load_and_check(page, tmp_path / "bad.png")
    assert result["broken"] == ["figures/missing.png"]
    assert any("boom" in c for c in result["console"])
    assert any("missing.png" in line for line in result["log"])
