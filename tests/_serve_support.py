"""Helpers for the service's tests: real servers on free loopback ports, in this process or in a child.

In-process servers share one warm :class:`idc_lite.Captioner` (the embedded model) and start in a
fraction of a second; child processes run the real command (``python -m idc_lite serve``) for what
only a process shows: its memory, its signals, its exit.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = ("add", "background", "color", "local", "remove", "text")


def example_pairs() -> list[tuple[bytes, bytes]]:
    """The six example pairs of the repository, as PNG bytes."""
    return [((EXAMPLES / "before" / f"{n}.png").read_bytes(), (EXAMPLES / "after" / f"{n}.png").read_bytes())
            for n in NAMES]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request on a fresh connection; ``headers`` may replace Host."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"raw": raw.decode("utf-8", "replace")}
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


class LocalServer:
    """``create_app(config, load)`` served by uvicorn on a thread of this process."""

    def __init__(self, config, load):
        import uvicorn

        from idc_lite.serve.app import create_app

        self.config = config
        self.port = config.port
        self.server = uvicorn.Server(uvicorn.Config(create_app(config, load), host=config.host, port=config.port,
                                                   log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while request(self.port, "GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load")
            time.sleep(0.02)


class ChildServer:
    """``python -m idc_lite serve ARGS`` in a child process, on a free port."""

    def __init__(self, *args: str):
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "idc_lite", "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.decode("utf-8", "replace"))

    def __enter__(self) -> "ChildServer":
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.output))
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
