"""The service's web page in a real headless Chromium: load it, upload a pair, read the caption, take a screenshot.

Chromium (Debian's package; ``.ci/run`` installs it) is driven through the DevTools protocol over
``--remote-debugging-pipe``: JSON messages on two pipes, so the test needs the standard library only.
Set ``IDC_LITE_SCREENSHOT_DIR`` to keep the screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_support import EXAMPLES, LocalServer, free_port  # noqa: E402

from idc_lite.serve.config import ServeConfig  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevTools:
    """A browser driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies out, NUL-separated)."""

    def __init__(self, browser: str, profile: str, size=(1100, 820)):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def plumb():  # in the child: the pipes at the fds Chromium reads and writes
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=plumb, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.session = None
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 20, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(method)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no reply from the browser")
            data = os.read(self._in, 1 << 20)
            if not data:
                raise RuntimeError("the browser closed its pipe")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(expression)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)
        os.close(self._out)


def test_the_page_describes_an_uploaded_pair(tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium (apt-get install chromium; .ci/run installs it)")
    from idc_lite import Captioner

    captioner = Captioner()
    before, after = EXAMPLES / "before" / "add.png", EXAMPLES / "after" / "add.png"
    expected = captioner.describe(before, after).caption
    with LocalServer(ServeConfig(port=free_port()), lambda: captioner) as server:
        server.wait_ready()
        tools = DevTools(browser, str(tmp_path / "profile"))
        try:
            page = next(t for t in tools.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            tools.session = tools.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            tools.call("Page.enable")
            tools.call("Runtime.enable")
            tools.call("Page.navigate", url=server.url + "/")
            model_line = tools.wait_for("document.readyState === 'complete' && "
                                        "document.getElementById('model').textContent.startsWith('model ') && "
                                        "document.getElementById('model').textContent")
            assert "idc-lite-demo" in model_line and "ort-int4" in model_line
            root = tools.call("DOM.getDocument")["root"]["nodeId"]
            for side, path in (("before", before), ("after", after)):
                node = tools.call("DOM.querySelector", nodeId=root, selector=f"#{side}")["nodeId"]
                tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
            tools.wait_for("!document.getElementById('describe').disabled")
            for side in ("before", "after"):  # both previews shown (blob: images the page's policy allows)
                assert tools.wait_for(f"document.getElementById('preview-{side}').naturalWidth") == 256
            tools.evaluate("document.getElementById('describe').click()")
            caption = tools.wait_for("document.getElementById('output').dataset.done && "
                                     "document.getElementById('caption').textContent")
            assert caption == expected
            assert tools.evaluate("document.getElementById('error').textContent") == ""
            assert " s in all" in tools.evaluate("document.getElementById('timing').textContent")
            shot = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
        finally:
            tools.close()
    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(shot))
    assert image.size[0] >= 800 and image.size[1] >= 600
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 10  # not a blank page
    keep = os.environ.get("IDC_LITE_SCREENSHOT_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        image.save(os.path.join(keep, "serve-page.png"))
