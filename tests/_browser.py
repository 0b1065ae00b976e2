"""Render an HTML file in headless Chromium through the DevTools protocol (no extra package).

Chromium is started with ``--remote-debugging-pipe``: DevTools messages are JSON texts ended
by a NUL byte, written to the browser's file descriptor 3 and read from its descriptor 4, so
no websocket client is needed. :func:`render` loads a page and returns what the report test
checks: every image's natural size, console errors, uncaught exceptions, failed loads and,
optionally, a PNG screenshot.

Command line (to refresh the screenshot in the docs)::

    python tests/_browser.py skrtl_demo_report/report.html --screenshot docs/img/report.png
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["BrowserError", "find_chromium", "render"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 48), "
    "width: i.naturalWidth, height: i.naturalHeight, complete: i.complete})))"
)


class BrowserError(RuntimeError):
    """The browser could not be started or did not answer in time."""


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary: ``$SKRTL_CHROMIUM``, else the first on ``PATH``."""
    env = os.environ.get("SKRTL_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """The DevTools protocol over the browser's pipe: commands, answers and events."""

    def __init__(self, binary: str, profile: str, timeout: float):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # the pipe ends arrive as the shell's stdin / stdout, which it moves to the
        # descriptors 3 and 4 Chromium expects (no clash with any descriptor of this process)
        script = 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null'
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", script, binary, *args],
            stdin=to_browser_r,
            stdout=from_browser_w,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time.")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("the browser closed its DevTools pipe (did it start?).")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send a command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, method: str, session: str | None = None) -> dict:
        """Wait for an event (one already received counts)."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass


def render(
    path: str | os.PathLike,
    *,
    screenshot: str | os.PathLike | None = None,
    width: int = 1100,
    height: int = 1400,
    binary: str | None = None,
    timeout: float = 60.0,
    anchor: str | None = None,
) -> dict:
    """Load an HTML file in headless Chromium and report what loaded and what went wrong.

    Returns
    -------
    dict
        ``images``: ``[{src, width, height, complete}]`` (natural sizes); ``console_errors``:
        console messages of level error; ``exceptions``: uncaught JavaScript exceptions;
        ``log_errors``: browser log entries of level error (failed loads, blocked content);
        ``title``; ``page_height``.

    The screenshot shows ``width`` x ``height`` pixels from the top of the page, or from the
    element with id ``anchor``.
    """
    binary = binary or find_chromium()
    if binary is None:
        raise BrowserError("no Chromium binary found (install chromium or set SKRTL_CHROMIUM).")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="skrtl-chromium-") as profile:
        tools = _DevTools(binary, profile, timeout)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log"):
                tools.send(f"{domain}.enable", session=session)
            tools.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            tools.send("Page.navigate", {"url": url}, session=session)
            tools.wait_for("Page.loadEventFired", session=session)

            def evaluate(expr: str):
                res = tools.send(
                    "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session
                )
                return res["result"].get("value")

            images = json.loads(evaluate(_IMAGES_JS))
            title = evaluate("document.title")
            page_height = int(evaluate("document.documentElement.scrollHeight"))
            if screenshot is not None:
                top = 0
                if anchor is not None:
                    top = int(evaluate(f"document.getElementById({json.dumps(anchor)}).offsetTop"))
                shot = tools.send(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": top, "width": width, "height": height, "scale": 1},
                    },
                    session=session,
                )
                import base64

                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            events = list(tools.events)
        finally:
            tools.close()
    console = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled"
        and e["params"].get("type") in ("error", "assert")
    ]
    exceptions = [
        e["params"]["exceptionDetails"].get("text", "")
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
    ]
    log_errors = [
        e["params"]["entry"].get("text", "")
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
    ]
    return {
        "images": images,
        "console_errors": console,
        "exceptions": exceptions,
        "log_errors": log_errors,
        "title": title,
        "page_height": page_height,
    }


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Render an HTML file in headless Chromium.")
    parser.add_argument("html")
    parser.add_argument("--screenshot", default=None, help="PNG of the top of the page")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1400)
    parser.add_argument("--scale-to", type=int, default=None, help="resize the PNG to this width")
    parser.add_argument("--anchor", default=None, help="screenshot from this element id")
    args = parser.parse_args(argv)
    out = render(
        args.html,
        screenshot=args.screenshot,
        width=args.width,
        height=args.height,
        anchor=args.anchor,
    )
    if args.screenshot and args.scale_to:
        from PIL import Image

        img = Image.open(args.screenshot).convert("RGB")
        h = round(img.height * args.scale_to / img.width)
        img = img.resize((args.scale_to, h), Image.LANCZOS).quantize(colors=128)
        img.save(args.screenshot, optimize=True)
    print(json.dumps({k: v for k, v in out.items() if k != "images"}, indent=2))
    print(f"{len(out['images'])} images, {sum(i['width'] > 0 for i in out['images'])} loaded")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
