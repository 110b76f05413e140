"""Recipe downloads against a local server on 127.0.0.1 that speaks GitHub's contents API."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from export.download import Pin, fetch
from export.errors import DownloadError
from export.recipes import ADAPTER_FILES, RECIPES, fetch_adapter, get_recipe
from idc_lite.hashing import file_sha256


class FakeGitHub:
    """Serves ``files`` (path -> bytes) as raw downloads and their folders as contents-API listings."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # send only this many bytes of a body, then hang up
        github = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                github.requests.append((self.path, self.headers.get("Range")))
                parts = urlsplit(self.path)
                if parts.path.startswith("/repos/"):
                    return self._listing(parts.path.split("/contents/", 1)[1])
                if parts.path.startswith("/raw/"):
                    return self._raw(parts.path[len("/raw/"):])
                self.send_error(404)

            def _listing(self, folder):
                from urllib.parse import unquote

                folder = unquote(folder).rstrip("/")
                entries, seen = [], set()
                for path in github.files:
                    if not path.startswith(folder + "/"):
                        continue
                    rest = path[len(folder) + 1:]
                    name = rest.split("/")[0]
                    if name in seen:
                        continue
                    seen.add(name)
                    is_dir = "/" in rest
                    entries.append({"name": name, "path": f"{folder}/{name}", "type": "dir" if is_dir else "file",
                                    "download_url": None if is_dir else f"{github.url}/raw/{folder}/{name}"})
                if not entries:
                    return self.send_error(404)
                self._send(200, json.dumps(entries).encode())

            def _raw(self, path):
                body = github.files.get(path)
                if body is None:
                    return self.send_error(404)
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(body):
                        return self.send_error(416)
                chunk = body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if github.cut_after is not None:
                    self.wfile.write(chunk[: github.cut_after])
                    github.cut_after = None
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(chunk)

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def github(legacy_adapter, monkeypatch, tmp_path):
    recipe = get_recipe("blip2idc-ier")
    run = f"code_release/weights/{recipe.folder}/ier_seed_1234.bin.opt"
    files = {f"{run}/{name}": (legacy_adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.bin")}
    files[f"code_release/weights/{recipe.folder}/README.md"] = b"notes"
    server = FakeGitHub(files)
    # The released adapters are pinned (export/recipes.py); this one is the test's own, so are its pins.
    monkeypatch.setitem(RECIPES, "blip2idc-ier", dataclasses.replace(recipe, pins=_pins(legacy_adapter)))
    monkeypatch.setenv("IDC_LITE_GITHUB_API", server.url)
    monkeypatch.setenv("IDC_LITE_CACHE", str(tmp_path / "cache"))
    yield server, run
    server.close()


def _pins(adapter) -> dict:
    return {name: Pin(sha256=file_sha256(adapter / name)) for name in ADAPTER_FILES}


def test_recipes_cover_the_released_adapters():
    assert set(RECIPES) == {"blip2idc-syned-emu", "blip2idc-syned", "blip2idc-ier", "blip2idc-spot",
                            "blip2idc-clevr-change", "blip2idc-clevr-dc"}
    for recipe in RECIPES.values():
        assert recipe.base == "Salesforce/blip2-opt-2.7b" and len(recipe.commit) == 40


def test_recipe_adapter_is_found_downloaded_and_cached(github, legacy_adapter, tmp_path):
    server, run = github
    folder = fetch_adapter(get_recipe("blip2idc-ier"), progress=False)
    for name in ("adapter_config.json", "adapter_model.bin"):
        assert file_sha256(folder / name) == file_sha256(legacy_adapter / name)
    assert folder == tmp_path / "cache" / "adapters" / "blip2idc-ier" / get_recipe("blip2idc-ier").commit
    count = len(server.requests)
    fetch_adapter(get_recipe("blip2idc-ier"), progress=False)
    assert len(server.requests) == count, "a cached adapter is not downloaded again"


def test_an_interrupted_download_resumes_with_a_range_request(github, tmp_path):
    server, run = github
    url = f"{server.url}/raw/{run}/adapter_model.bin"
    body = server.files[f"{run}/adapter_model.bin"]
    dest = tmp_path / "adapter_model.bin"
    pin = {"sha256": hashlib.sha256(body).hexdigest(), "origins": (server.url,), "progress": False}
    server.cut_after = 1000
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(url, dest, **pin)
    assert not dest.exists() and (tmp_path / "adapter_model.bin.partial").stat().st_size == 1000
    fetch(url, dest, **pin)
    assert dest.read_bytes() == body
    assert server.requests[-1] == (f"/raw/{run}/adapter_model.bin", "bytes=1000-")


def test_sha256_mismatch_and_missing_files_are_errors(github, tmp_path):
    server, run = github
    with pytest.raises(DownloadError, match="does not match its pinned sha256"):
        fetch(f"{server.url}/raw/{run}/adapter_config.json", tmp_path / "c.json", sha256="0" * 64, progress=False,
              origins=(server.url,))
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.json.partial").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/raw/nothing/here.bin", tmp_path / "x.bin", sha256="0" * 64, progress=False,
              origins=(server.url,))
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_adapter(get_recipe("blip2idc-spot"), progress=False)


def test_unreachable_host_says_so(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", sha256="0" * 64, progress=False,
              origins=(f"http://127.0.0.1:{port}",))


def test_export_cli_builds_from_a_recipe(github, tiny_model, legacy_adapter, tmp_path, monkeypatch, capsys):
    """`python -m export build RECIPE` downloads the adapter and builds; the base comes from the recipe."""
    import export.recipes as recipes
    from export.__main__ import main

    monkeypatch.setitem(recipes.RECIPES, "blip2idc-ier", recipes.Recipe(
        "blip2idc-ier", "ier", "test", _pins(legacy_adapter), base=str(tiny_model), base_revision=None))
    with pytest.raises(SystemExit) as info:
        main(["build", "blip2idc-ier", "--out", str(tmp_path / "ier"), "--decoder-precision", "fp32"])
    assert info.value.code in (0, None)
    manifest = json.loads((tmp_path / "ier" / "manifest.json").read_text())
    assert manifest["name"] == "blip2idc-ier" and manifest["provenance"]["adapter"]["layout"] == "legacy"
    with pytest.raises(SystemExit) as info:
        main(["build", "no-such-recipe", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "unknown recipe" in capsys.readouterr().err
