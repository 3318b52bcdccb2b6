"""Open a local HTML file in headless Chromium and report what a user's browser would see.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
separated by NUL bytes on file descriptors 3 and 4, as Puppeteer does), so no websocket client, port
or extra Python package is needed.
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
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Run inside the page after it loaded: what the checks need, as one JSON-able value.
_PAGE_FACTS = """(() => ({
  images: Array.from(document.images).map(im => ({alt: im.alt, complete: im.complete,
                                                  naturalWidth: im.naturalWidth})),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  title: document.title,
  height: Math.ceil(document.documentElement.scrollHeight),
  width: Math.ceil(document.documentElement.scrollWidth),
}))()"""


def find_chromium() -> str | None:
    """The Chromium binary: $PRISM_RAY_CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("PRISM_RAY_CHROMIUM")
    if explicit:
        return explicit
    return next((p for name in CANDIDATES if (p := shutil.which(name))), None)


@dataclass
class PageReport:
    """What loading the page produced."""

    console_errors: list[str] = field(default_factory=list)  # console.error, uncaught exceptions, log errors
    images: list[dict] = field(default_factory=list)  # {alt, complete, naturalWidth} per <img>
    ids: list[str] = field(default_factory=list)
    title: str = ""
    width: int = 0  # of the whole document (CSS pixels), in a `width`-wide window
    screenshot: bytes = b""  # PNG of the whole page


class _Pipe:
    """A DevTools session over Chromium's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0
    ):
        """Send one command and wait for its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        """Wait for an event (or take one already received)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def drain(self, seconds: float) -> None:
        """Collect events for `seconds` (late console errors)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._message(deadline))
        except TimeoutError:
            pass


def _high_fd(fd: int) -> int:
    """A copy of `fd` numbered >= 10 (placing it on 3 or 4 in the child must not clobber the other)."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


def open_page(html_path: Path, chromium: str, *, width: int = 1280, timeout: float = 60.0) -> PageReport:
    """Load `html_path` from disk (file://) in a fresh headless Chromium and collect a PageReport."""
    to_child_r, to_child_w = map(_high_fd, os.pipe())  # we write commands, Chromium reads fd 3
    from_child_r, from_child_w = map(_high_fd, os.pipe())  # Chromium writes fd 4, we read

    with tempfile.TemporaryDirectory(prefix="prism-chromium-") as profile:
        args = [
            chromium,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "about:blank",
        ]
        # bash puts our pipe ends on fds 3 and 4 and execs Chromium: no fd juggling after fork here.
        wrapper = ["bash", "-c", f'exec "$@" 3<&{to_child_r} 4>&{from_child_w}', "bash"]
        proc = subprocess.Popen(
            wrapper + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_child_r, from_child_w),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        pipe = _Pipe(proc, to_child_w, from_child_r)
        try:
            return _inspect(pipe, html_path, width, timeout)
        finally:
            try:
                pipe.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_child_w)
            os.close(from_child_r)


def _inspect(pipe: _Pipe, html_path: Path, width: int, timeout: float) -> PageReport:
    target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        pipe.call(f"{domain}.enable", session=session)
    pipe.events.clear()
    pipe.call("Page.navigate", {"url": html_path.resolve().as_uri()}, session=session)
    pipe.wait_for("Page.loadEventFired", timeout=timeout)
    pipe.drain(0.5)
    facts = pipe.call(
        "Runtime.evaluate", {"expression": _PAGE_FACTS, "returnByValue": True}, session=session
    )["result"]["value"]
    height = min(max(facts["height"], 100), 16000)
    pipe.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    shot = pipe.call(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session
    )
    report = PageReport(
        images=facts["images"],
        ids=facts["ids"],
        title=facts["title"],
        screenshot=base64.b64decode(shot["data"]),
    )
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            report.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            report.console_errors.append(f"{params['entry']['source']}: {params['entry']['text']}")
    return report
