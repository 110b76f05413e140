"""The Krita plug-in example, without Krita: installed as its ``install.py`` does, its editor-free part
(pixels to PNG, which layer is before, the call, the report) run against a real ``idc-lite serve``."""

from __future__ import annotations

import filecmp
import importlib
import io
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_support import EXAMPLES, ROOT, LocalServer, free_port  # noqa: E402

from idc_lite.serve.config import ServeConfig  # noqa: E402

PLUGIN = ROOT / "examples" / "krita-plugin"


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    """``idc_lite_caption.logic`` from a pykrita folder written by the plug-in's installer."""
    target = tmp_path_factory.mktemp("pykrita")
    run = subprocess.run([sys.executable, str(PLUGIN / "install.py"), "--target", str(target)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (target / "idc_lite_caption.desktop").is_file()
    copied = target / "idc_lite_caption" / "idc_lite_client.py"
    assert filecmp.cmp(copied, ROOT / "idc_lite" / "serve" / "client.py", shallow=False)  # copied as is
    sys.path.insert(0, str(target))
    try:
        yield importlib.import_module("idc_lite_caption.logic")
    finally:
        sys.path.remove(str(target))
        for name in [n for n in sys.modules if n.startswith("idc_lite_caption")]:
            del sys.modules[name]


def layer(logic, path, name, index=0, order="BGRA"):
    """A layer as Krita hands it over: 8-bit pixels, B, G, R, A."""
    from PIL import Image

    rgba = np.asarray(Image.open(path).convert("RGBA"))
    pixels = rgba[..., [2, 1, 0, 3]] if order == "BGRA" else rgba
    return logic.Image(name, rgba.shape[1], rgba.shape[0], pixels.tobytes(), order, index)


def test_pixels_become_the_same_picture_as_png(logic):
    from PIL import Image

    image = layer(logic, EXAMPLES / "after" / "color.png", "after")
    decoded = Image.open(io.BytesIO(logic.encode_png(image)))
    assert decoded.mode == "RGBA" and decoded.size == (image.width, image.height)
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(EXAMPLES / "after" / "color.png").convert("RGBA")))
    with pytest.raises(logic.PluginError, match="8-bit RGBA"):
        logic.encode_png(logic.Image("deep", 2, 2, b"\0" * 32, "RGBA/U16"))
    with pytest.raises(logic.PluginError, match="convert the image"):
        logic.encode_png(logic.Image("short", 4, 4, b"\0" * 10))


def test_the_plugin_reports_the_servers_caption_or_what_to_do(logic):
    from idc_lite import Captioner

    captioner = Captioner()
    names = ("add", "remove")
    expected = {n: captioner.describe(EXAMPLES / "before" / f"{n}.png", EXAMPLES / "after" / f"{n}.png").caption
                for n in names}
    with LocalServer(ServeConfig(port=free_port()), lambda: captioner) as server:
        server.wait_ready()
        describer = logic.ChangeDescriber(logic.Client(server.url))
        # two layers, handed over in any order: the lower one is "before"
        before = layer(logic, EXAMPLES / "before" / "add.png", "Background", index=0)
        after = layer(logic, EXAMPLES / "after" / "add.png", "Paint", index=1)
        report = describer.describe_layers([after, before])
        assert report.ok and report.caption == expected["add"]
        assert report.text.startswith("Background → Paint: " + expected["add"])
        assert not describer.describe_layers([before]).ok
        assert "exactly two layers" in describer.describe_layers([before, after, after]).text
        # a remembered image, then the image as it is now
        assert not describer.describe_since(after).ok
        assert describer.remember(layer(logic, EXAMPLES / "before" / "remove.png", "image", order="RGBA")).ok
        report = describer.describe_since(layer(logic, EXAMPLES / "after" / "remove.png", "image"))
        assert report.ok and report.caption == expected["remove"]
        # a layer whose pixels do not fit its size is reported, not raised; so is a refusal by the service
        assert "convert the image" in describer.describe(logic.Image("odd", 20, 20, b""), after).text
        tiny = logic.Image("dot", 1, 1, b"\0\0\0\xff")
        report = describer.describe(tiny, tiny)
        assert report.ok or "refused" in report.text
    with LocalServer(ServeConfig(port=free_port(), token="k"), lambda: captioner) as server:
        report = logic.ChangeDescriber(logic.Client(server.url)).describe(before, after)
        assert not report.ok and logic.TOKEN_VARIABLE in report.text
        with_token = logic.ChangeDescriber(logic.Client(server.url, token="k"))
        assert with_token.describe(before, after).caption == expected["add"]
    report = logic.ChangeDescriber(logic.Client(f"http://127.0.0.1:{free_port()}")).describe(before, after)
    assert not report.ok and "idc-lite serve" in report.text


def test_the_plugin_reads_its_server_and_token_from_the_environment(logic, monkeypatch):
    monkeypatch.setenv(logic.URL_VARIABLE, "http://127.0.0.1:9999/")
    monkeypatch.setenv(logic.TOKEN_VARIABLE, "t0k")
    client = logic.ChangeDescriber().client
    assert (client.url, client.token) == ("http://127.0.0.1:9999", "t0k")
