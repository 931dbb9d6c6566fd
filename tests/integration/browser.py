"""Headless Chromium for tests: Debian's chromium driven over the DevTools protocol on a pipe.

A pipe rather than --remote-debugging-port: no port to pick or collide on, and nothing
listening on the machine while a test runs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB
    "--window-size=1280,900",
)


def _above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class DevTools:
    """The Chrome DevTools Protocol over --remote-debugging-pipe: fd 3 in, fd 4 out.

    A pipe rather than --remote-debugging-port: no port to pick or collide on, and nothing
    listening on the machine while the test runs.
    """

    def __init__(self, binary: str, user_data_dir: Path, log: Path) -> None:
        browser_in, self._send = os.pipe()
        self._receive, browser_out = os.pipe()
        # bash moves the pipe ends to the fd numbers Chromium expects; preexec_fn could too,
        # but it is not safe in a process that runs threads (Ray's driver does). The ends are
        # first moved to 10 and up, so that the redirections cannot clobber each other (a
        # fresh process gets 3-6 from os.pipe()).
        browser_in, browser_out = _above_9(browser_in), _above_9(browser_out)
        script = f'exec "$0" "$@" 3<&{browser_in} 4>&{browser_out} {browser_in}<&- {browser_out}>&-'
        with log.open("wb") as log_file:
            self.process = subprocess.Popen(
                ["bash", "-c", script, binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
                 "--remote-debugging-pipe", "about:blank"],
                pass_fds=(browser_in, browser_out), stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        os.close(browser_in)
        os.close(browser_out)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict[str, Any]] = []

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
        timeout_s: float = 60.0,
    ) -> dict[str, Any]:  # fmt: skip
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._send, data) :]
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, *, since: int = 0, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first ``method`` event at or after ``self.events[since]``, waiting for it.

        ``since`` matters with one browser for many pages: an earlier page's load event must
        not count as this one's.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events[since:]:
                if event.get("method") == method:
                    return event
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._receive], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._receive, 1 << 16)
            if not chunk:
                raise EOFError(f"Chromium exited with {self.process.wait()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
            self.call("Browser.close", timeout_s=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._send)
        os.close(self._receive)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[DevTools]:
    binary = shutil.which("chromium")
    if binary is None:  # an error, not a skip: a browser test that silently tests nothing
        pytest.fail("chromium is not installed: apt-get install -y chromium (scripts/test does)")
    browser = DevTools(binary, tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        yield browser
    finally:
        browser.close()


class Page:
    """One page opened in the browser: evaluate scripts, take screenshots, list problems."""

    def __init__(self, browser: DevTools, url: str) -> None:
        self.browser = browser
        targets = browser.call("Target.getTargets")["targetInfos"]
        target = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=self.session)
        loads_from = len(browser.events)
        browser.call("Page.navigate", {"url": url}, session=self.session)
        browser.wait_for("Page.loadEventFired", since=loads_from)

    def evaluate(self, expression: str) -> Any:
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
        )
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def screenshot(self, path: Path) -> bytes:
        shot = self.browser.call("Page.captureScreenshot", {"format": "png"}, session=self.session)
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    def problems(self) -> list[dict[str, Any]]:
        """Script exceptions, console errors and error log entries seen so far."""
        return [
            event for event in self.browser.events
            if event.get("method") == "Runtime.exceptionThrown"
            or (event.get("method") == "Log.entryAdded"
                and event["params"]["entry"]["level"] == "error")
            or (event.get("method") == "Runtime.consoleAPICalled"
                and event["params"]["type"] in ("error", "assert"))
        ]  # fmt: skip

    def requested_schemes(self) -> set[str]:
        """The URL schemes of every request the page made (file:, data:, http:, ...)."""
        return {
            event["params"]["request"]["url"].split(":", 1)[0]
            for event in self.browser.events
            if event.get("method") == "Network.requestWillBeSent"
        }


# JavaScript statements for the body of an async function: scroll through the page a screen
# at a time as a reader would, so lazy images load as they come into view, and wait (20 s at
# most) until every image has loaded or failed. Leaves `images` and `settle` defined.
SCROLL_UNTIL_IMAGES_SETTLE = """\
  const images = Array.from(document.images);
  const settle = () => new Promise((done) => requestAnimationFrame(() => setTimeout(done, 20)));
  for (let y = 0; y <= document.documentElement.scrollHeight; y += innerHeight / 2) {
    scrollTo(0, y);
    await settle();
  }
  const deadline = Date.now() + 20000;
  while (images.some((image) => !image.complete) && Date.now() < deadline) await settle();
"""

# The above, then say which images loaded.
IMAGES_LOADED = (
    """
(async () => {
"""
    + SCROLL_UNTIL_IMAGES_SETTLE
    + """  scrollTo(0, 0);
  await settle();
  return {
    images: images.length,
    loaded: images.filter((image) => image.complete && image.naturalWidth > 0).length,
    notLoaded: images.filter((image) => !(image.complete && image.naturalWidth > 0))
      .map((image) => image.alt),
  };
})()
"""
)
