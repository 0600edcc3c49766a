"""Render a report in headless Chromium over the DevTools protocol: console errors, sections, images, screenshot.

Used by the browser test and by ``lvd report --screenshot``. Needs the ``chromium`` binary (Debian: ``apt-get
install chromium chromium-driver``) and the ``websockets`` client (installed with Prefect). Nothing is fetched
from the network: the browser starts with background networking off and a fresh profile.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.storage import atomic_write_bytes

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio"]  # fmt: skip
CHECK_PAGE = """(() => {
  const imgs = [...document.images];
  return {
    sections: [...document.querySelectorAll('section')].map(s => ({id: s.id, title: s.querySelector('h2')?.textContent,
      text: s.innerText.length, missing: s.querySelectorAll('p.missing').length})),
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
    height: document.documentElement.scrollHeight,
  };
})()"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class Rendered:
    console_errors: list[str]
    sections: list[dict[str, Any]]
    images: int
    broken_images: list[str]
    screenshot: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)


class _Session:
    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        if any(e.get("method") == event for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == event:
                return
        raise TimeoutError(f"no {event} within {timeout} s")


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.exceptionThrown":
            out.append("exception: " + p.get("exceptionDetails", {}).get("text", ""))
        elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')}")
    return out


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with code {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def _targets(port: int, timeout: float) -> list[dict[str, Any]]:
    """DevTools targets, over a plain HTTP connection: urllib would go through whatever opener the process installed
    (the ingest stage installs one that refuses non-image content types)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/json/list")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def render(html: Path, screenshot: Path | None = None, width: int = 1280, timeout: float = 90) -> Rendered:
    """Load ``html`` in a fresh headless Chromium; report console errors, sections, images; optional full-page PNG."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="lvd-chromium-")
    try:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", f"--window-size={width},900",
               "about:blank"]  # fmt: skip
        # its own session, so that the helpers it starts (renderer, GPU, crash handler) can be stopped as one group
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            port = _devtools_port(Path(profile), proc, timeout)
            target = next(t for t in _targets(port, timeout) if t.get("type") == "page")
            s = _Session(target["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log"):
                s.call(f"{domain}.enable")
            s.call("Page.navigate", url=Path(html).resolve().as_uri())
            s.wait_for("Page.loadEventFired", timeout)
            page = s.call("Runtime.evaluate", expression=CHECK_PAGE, returnByValue=True)["result"]["value"]
            shot = None
            if screenshot is not None:
                s.call("Emulation.setDeviceMetricsOverride", width=width, height=int(page["height"]), deviceScaleFactor=1,
                       mobile=False)  # fmt: skip
                data = s.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, timeout=timeout)["data"]
                shot = Path(screenshot)
                atomic_write_bytes(shot, base64.b64decode(data))  # a reader never sees a half-written PNG
            time.sleep(0.2)  # late console messages
            s.call("Runtime.evaluate", expression="1")
            s.ws.close()
            return Rendered(_console_errors(s.events), page["sections"], page["images"], page["broken"], shot, s.events)
        finally:
            _stop(proc)
    finally:
        _remove_profile(Path(profile))


def _stop(proc: subprocess.Popen) -> None:
    """Stop the browser (SIGTERM first, so it shuts down cleanly), then any helper process that outlived it."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # the group is gone when no helper is left
        os.killpg(proc.pid, signal.SIGKILL)


def _remove_profile(profile: Path, timeout: float = 10) -> None:
    """Delete the throw-away profile. A helper can still be flushing into it for a moment after the browser exits
    ('Directory not empty' from a plain rmtree), so retry until it is gone or ``timeout`` passes."""
    # Chromium keeps its singleton socket in a folder of its own under TMPDIR (a short path: sockets have a length
    # limit), linked from the profile; it is not always removed on exit.
    link = profile / "SingletonSocket"
    if link.is_symlink() and (sock_dir := Path(os.readlink(link)).parent).name.startswith("org.chromium."):
        shutil.rmtree(sock_dir, ignore_errors=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(profile)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
