"""Test helper: open a local HTML page in headless Chromium and report what a person would see.

Talks to the browser with the DevTools protocol over a pipe (`--remote-debugging-pipe`: commands on fd 3,
replies and events on fd 4, each message JSON ending in a NUL byte), so no port is opened. Imported by tests
as `from browser import load_page`; also a command that saves a screenshot:

    python tests/browser.py OUT/_report/index.html --screenshot docs/inspect.png
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
_TIMEOUT_S = 60.0
_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => "
    "({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete})))"
)


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@dataclass
class PageReport:
    images: list[dict[str, Any]]  # alt, natural width and height, complete
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    title: str = ""
    screenshot: bytes | None = None


class _DevTools:
    """One Chromium process and a flat DevTools session to one page."""

    def __init__(self, browser: str, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: fd 3 is what we write, fd 4 is what it answers on
            # Move both out of the way first (either may be 3 or 4 already); dup2 makes them inheritable.
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        args += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "--hide-scrollbars", "about:blank"]
        self.proc = subprocess.Popen(
            args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self.events: queue.Queue = queue.Queue()
        self._replies: dict[int, queue.Queue] = {}
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_child, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    self._replies.pop(msg["id"]).put(msg)
                else:
                    self.events.put(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        reply: queue.Queue = queue.Queue()
        self._replies[self._next_id] = reply
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        answer = reply.get(timeout=_TIMEOUT_S)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def wait_for(self, method: str, seen: list[dict]) -> None:
        while True:
            event = self.events.get(timeout=_TIMEOUT_S)
            seen.append(event)
            if event["method"] == method:
                return

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)


def load_page(path: str | Path, screenshot: bool = False, width: int = 1300) -> PageReport:
    """Load `path` from disk (file:// URL), wait for its load event, and report images, errors and title."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory() as profile:
        tools = _DevTools(browser, profile)
        try:
            target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable", session=session)
            metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
            tools.call("Emulation.setDeviceMetricsOverride", metrics, session)
            events: list[dict] = []
            tools.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
            tools.wait_for("Page.loadEventFired", events)
            value = tools.call("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session)
            title = tools.call("Runtime.evaluate", {"expression": "document.title"}, session)["result"][
                "value"
            ]
            shot = None
            if screenshot:
                size = tools.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
                clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
                params = {"format": "png", "captureBeyondViewport": True, "clip": clip}
                shot = base64.b64decode(tools.call("Page.captureScreenshot", params, session)["data"])
            while not tools.events.empty():
                events.append(tools.events.get())
        finally:
            tools.close()
    return PageReport(json.loads(value["result"]["value"]), _errors(events), title, shot)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e["method"] == "Runtime.exceptionThrown":
            out.append("exception: " + p["exceptionDetails"].get("text", ""))
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="load a page in headless Chromium; report images and errors")
    ap.add_argument("page")
    ap.add_argument("--screenshot", help="write a full-page PNG here")
    args = ap.parse_args()
    report = load_page(args.page, screenshot=bool(args.screenshot))
    if args.screenshot:
        Path(args.screenshot).write_bytes(report.screenshot)
    print(json.dumps({"title": report.title, "images": report.images, "errors": report.errors}, indent=1))
    sys.exit(1 if report.errors or any(i["width"] == 0 for i in report.images) else 0)
