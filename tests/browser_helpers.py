"""Load a page in a real headless Chromium and report what a person would see go wrong.

Talks the Chrome DevTools Protocol over its websocket with the standard library only (a minimal
RFC 6455 client: masked text frames out, text / continuation / ping / close frames in). Chromium runs
with a fresh profile, no background networking, and every host name resolving to nothing, so a page
that reached for the network would show it as a failed request.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1280,2000")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class WebSocket:
    def __init__(self, url: str, timeout: float) -> None:
        rest = url.removeprefix("ws://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            response += chunk
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class PageCheck:
    images: list[dict[str, Any]]  # src (first 40 characters), complete, naturalWidth, naturalHeight
    errors: list[str]  # console errors, exceptions, failed loads, policy violations
    requests: list[str] = field(default_factory=list)  # every URL the page asked for (data: URLs shortened)
    screenshot: bytes = b""


CHECK_IMAGES = ("JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 40), "
                "complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight})))")


class Chromium:
    """One headless browser for a test; ``check(path)`` opens a page in a fresh tab."""

    def __init__(self, binary: str, profile: Path, timeout: float = 90.0) -> None:
        self.timeout = timeout
        profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None:
                raise RuntimeError(f"{binary} exited with {self.process.returncode} before opening DevTools")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{binary} did not open its DevTools port in {timeout:.0f} s")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def _new_tab(self) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        with opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read())["webSocketDebuggerUrl"]

    def check(self, page: Path, screenshot: bool = False) -> PageCheck:
        ws = WebSocket(self._new_tab(), self.timeout)
        events: list[dict[str, Any]] = []
        ids = iter(range(1, 1_000_000))

        def call(method: str, **params: Any) -> dict[str, Any]:
            message_id = next(ids)
            ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv())
                if message.get("id") == message_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})
                events.append(message)

        def wait_for(method: str) -> None:
            deadline = time.monotonic() + self.timeout
            while not any(e.get("method") == method for e in events):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {method} within {self.timeout:.0f} s")
                events.append(json.loads(ws.recv()))

        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                call(f"{domain}.enable")
            call("Page.navigate", url=page.resolve().as_uri())
            wait_for("Page.loadEventFired")
            result = call("Runtime.evaluate", expression=CHECK_IMAGES, returnByValue=True)
            images = json.loads(result["result"]["value"])
            shot = base64.b64decode(call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
                                    ) if screenshot else b""
        finally:
            ws.close()
        return PageCheck(images, _errors(events), _requests(events), shot)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": " + " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
        elif method == "Network.loadingFailed":
            errors.append(f"failed load: {params.get('errorText')} {params.get('blockedReason', '')}".strip())
    return errors


def _requests(events: list[dict[str, Any]]) -> list[str]:
    urls = [event["params"]["request"]["url"] for event in events if event.get("method") == "Network.requestWillBeSent"]
    return [url[:40] if url.startswith("data:") else url for url in urls]
