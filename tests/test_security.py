"""What idc-lite trusts and what it checks (docs/security.md), proven the way an attacker would try it.

Artifacts are crafted from copies of the embedded one, downloads come from a fake server on 127.0.0.1
started here (a few requests, then shut down), images and output files are crafted in a temporary
folder. Nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from idc_lite.artifact import MANIFEST, load_manifest, write_manifest
from idc_lite.default_model import default_model_dir
from idc_lite.errors import AdapterError, ArtifactError, DatasetError, InputError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ artifacts
@pytest.fixture
def artifact(tmp_path) -> Path:
    """A private copy of the embedded artifact (regular files, one link each), inside ``tmp_path/box``."""
    return Path(shutil.copytree(default_model_dir(), tmp_path / "box" / "artifact"))


def manifest_of(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def edit_manifest(root: Path, change) -> None:
    """Change the manifest's JSON in place, without re-hashing anything (what a tamperer can do)."""
    data = manifest_of(root)
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def rehash(root: Path) -> None:
    """Re-write the manifest with the hashes of every file now in ``root`` (a consistent forgery)."""
    data = {k: v for k, v in manifest_of(root).items() if k not in ("format", "format_version", "files")}
    write_manifest(root, data)


def captioner(root: Path):
    from idc_lite import Captioner

    return Captioner(root, device="cpu")


def test_an_absolute_encoder_outside_the_artifact_is_refused(artifact):
    outside = artifact.parent / "elsewhere.onnx"
    shutil.copyfile(artifact / "encoder.onnx", outside)
    edit_manifest(artifact, lambda m: m["encoder"].update(file=str(outside)))
    with pytest.raises(ArtifactError, match="leaves the artifact folder"):
        captioner(artifact)


def test_a_decoder_folder_outside_the_artifact_is_refused(artifact):
    shutil.copytree(artifact / "ort-int4", artifact.parent / "ort-int4")
    edit_manifest(artifact, lambda m: m["decoders"]["ort-int4"].update(dir="../ort-int4"))
    with pytest.raises(ArtifactError, match="leaves the artifact folder"):
        captioner(artifact)


def test_a_files_entry_outside_the_artifact_is_refused_without_telling_its_size(artifact):
    secret = artifact.parent / "secret.txt"
    secret.write_text("x" * 4321)
    edit_manifest(artifact, lambda m: m["files"].update({"../secret.txt": {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(ArtifactError) as info:
        load_manifest(artifact)
    assert "leaves the artifact folder" in str(info.value) and "4321" not in str(info.value)


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.update(files={"encoder.onnx": 5}), "not an object"),
    (lambda m: m["files"]["encoder.onnx"].update(size="17245602"), "lacks 'size'"),
    (lambda m: m["files"]["encoder.onnx"].update(sha256="z" * 64), "bad size or sha256"),
    (lambda m: m.update(decoders={"ort-int4": []}), "is not an object"),
    (lambda m: m.update(decoders=[]), "'decoders' is not an object"),
    (lambda m: m["encoder"].update(file=3), "encoder.file is not a path"),
    (lambda m: m["decoders"]["ort-int4"].update(shape={"layers": "2"}), "shape"),
    (lambda m: m["composition"].update(size_policy="diagonal"), "malformed 'composition'"),
    (lambda m: m.update(files=None), "'files' is not an object"),
])
def test_a_malformed_manifest_is_one_artifact_error(artifact, change, problem):
    edit_manifest(artifact, change)
    with pytest.raises(ArtifactError, match=problem) as info:
        load_manifest(artifact)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(artifact))


def test_unlisted_symlinked_hard_linked_or_altered_files_are_refused(artifact, tmp_path):
    extra = artifact / "ort-int4" / "unlisted.onnx.data"
    extra.write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        load_manifest(artifact)
    extra.unlink()

    (artifact / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (artifact / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(ArtifactError, match="symbolic link"):
        load_manifest(artifact)
    (artifact / "tokenizer.json").unlink()

    os.link(tmp_path / "tokenizer.json", artifact / "tokenizer.json")
    with pytest.raises(ArtifactError, match="hard links"):
        load_manifest(artifact)
    (artifact / "tokenizer.json").unlink()

    data = bytearray((tmp_path / "tokenizer.json").read_bytes())
    middle = next(i for i in range(len(data) // 2, len(data)) if data[i] != data[i + 1])
    data[middle], data[middle + 1] = data[middle + 1], data[middle]  # same size, other content
    (artifact / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_manifest(artifact)


def test_the_bare_tokenizer_must_be_listed(artifact):
    """The runtime opens tokenizer.json when the export checked it: the manifest must vouch for it."""
    (artifact / "tokenizer.json").unlink()
    edit_manifest(artifact, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(ArtifactError, match="tokenizer.json: not listed in the manifest's files"):
        load_manifest(artifact)


def _external_encoder(root: Path, location: str, data_file: Path) -> None:
    """Move the encoder's largest initializer into ``data_file``, named in the graph as ``location``."""
    import onnx

    model = onnx.load(str(root / "encoder.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data_file.write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(data_file.stat().st_size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (root / "encoder.onnx").write_bytes(model.SerializeToString())


def test_external_data_outside_the_artifact_is_never_read(artifact):
    """A graph that names data outside its folder is refused, even with a manifest that matches every file.

    The same graph with its data inside the folder (and listed) loads: what is refused is the place.
    """
    inside = artifact.parent / "inside"
    shutil.copytree(artifact, inside)
    _external_encoder(inside, "encoder.data", inside / "encoder.data")
    rehash(inside)
    assert captioner(inside).describe(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)).ok

    _external_encoder(artifact, "../secret.data", artifact.parent / "secret.data")
    rehash(artifact)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it"):
        captioner(artifact)


def test_an_unlisted_external_data_file_is_refused(artifact):
    _external_encoder(artifact, "encoder.data", artifact / "encoder.data")
    edit_manifest(artifact, lambda m: m["files"]["encoder.onnx"].update(
        size=(artifact / "encoder.onnx").stat().st_size,
        sha256=hashlib.sha256((artifact / "encoder.onnx").read_bytes()).hexdigest()))
    with pytest.raises(ArtifactError, match="encoder.data: not listed in the manifest"):
        captioner(artifact)


def test_onnx_runtimes_that_follow_external_data_out_are_refused():
    from idc_lite.artifact import check_onnxruntime

    check_onnxruntime("encoder.onnx")  # the installed one
    with pytest.raises(ArtifactError, match=r"encoder.onnx: not opened with onnxruntime 1.23.2.*>=1.24.1"):
        check_onnxruntime("encoder.onnx", "1.23.2")
    check_onnxruntime("encoder.onnx", "1.24.1")


def test_the_minimum_versions_are_stated_in_pyproject_with_their_reason():
    from idc_lite.artifact import MIN_ONNXRUNTIME

    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    wanted = ".".join(map(str, MIN_ONNXRUNTIME))
    assert f"onnxruntime>={wanted}" in project["dependencies"]
    assert "torch>=2.6" in project["optional-dependencies"]["reference"]
    assert "CVE-2025-32434" in text and "external data" in text


# -------------------------------------------------------------------------------------------- adapters
def _legacy_adapter(folder: Path, payload=None) -> Path:
    import torch

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    torch.save(payload if payload is not None else {"x.lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.bin")
    return folder


class _RunsCode:
    """Unpickling this makes a folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickled_adapter_that_would_run_code_is_refused(tmp_path):
    from idc_lite.adapters import find_adapter, load_adapter_weights

    marker = tmp_path / "code-ran"
    source = find_adapter(_legacy_adapter(tmp_path / "evil", {"x.lora_A.weight": _RunsCode(marker)}))
    with pytest.raises(AdapterError, match="refused: not a plain tensor checkpoint"):
        load_adapter_weights(source)
    assert not marker.exists()


def test_a_torch_with_the_weights_only_bypass_never_unpickles(tmp_path, monkeypatch):
    import torch

    from idc_lite.adapters import find_adapter, load_adapter_weights

    source = find_adapter(_legacy_adapter(tmp_path / "plain"))
    assert load_adapter_weights(source)  # this torch reads it
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(AdapterError, match=r"adapter_model.bin: not read with torch 2.5.1.*CVE-2025-32434"):
        load_adapter_weights(source)


# ------------------------------------------------------------------------------------------- downloads
class FakeGitHub:
    """GitHub's contents API and raw files on 127.0.0.1, with the misbehaviours a hostile server has.

    ``files``: path -> bytes. ``download_urls``: path -> the URL a listing gives instead of ours.
    ``redirects``: path -> where a raw request is sent. ``bad_range``: answer a range request with the
    whole file as a 206 claiming to start at 0.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files, self.download_urls, self.redirects = files, {}, {}
        self.bad_range = False
        self.requests: list[tuple[str, str | None]] = []
        github = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                github.requests.append((self.path, self.headers.get("Range")))
                path = unquote(urlsplit(self.path).path)
                if path.startswith("/repos/"):
                    return self._listing(path.split("/contents/", 1)[1].rstrip("/"))
                if path.startswith("/raw/"):
                    return self._raw(path[len("/raw/"):])
                self.send_error(404)

            def _listing(self, folder):
                entries = {}
                for path in github.files:
                    if path.startswith(folder + "/"):
                        name = path[len(folder) + 1:].split("/")[0]
                        is_dir = "/" in path[len(folder) + 1:]
                        full = f"{folder}/{name}"
                        entries[name] = {"name": name, "path": full, "type": "dir" if is_dir else "file",
                                         "download_url": None if is_dir else
                                         github.download_urls.get(full, f"{github.url}/raw/{full}")}
                if not entries:
                    return self.send_error(404)
                self._send(200, json.dumps(list(entries.values())).encode())

            def _raw(self, path):
                if path in github.redirects:
                    self.send_response(302)
                    self.send_header("Location", github.redirects[path])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                body = github.files.get(path)
                if body is None:
                    return self.send_error(404)
                wanted = self.headers.get("Range")
                if wanted and github.bad_range:
                    return self._send(206, body, f"bytes 0-{len(body) - 1}/{len(body)}")
                if wanted:
                    start = int(wanted.split("=")[1].split("-")[0])
                    if start >= len(body):
                        return self.send_error(416)
                    return self._send(206, body[start:], f"bytes {start}-{len(body) - 1}/{len(body)}")
                self._send(200, body)

            def _send(self, status, body, content_range=None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if content_range:
                    self.send_header("Content-Range", content_range)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


RUN = "code_release/weights/ier/ier_seed_1234.bin.opt"
CONFIG = b'{"peft_type": "LORA", "r": 16, "target_modules": ["q_proj"]}'
WEIGHTS = bytes(range(256)) * 40


def git_blob(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def pinned_recipe():
    """A recipe whose pins are those of the fake server's adapter files."""
    from export.download import Pin
    from export.recipes import Recipe

    return Recipe("test-ier", "ier", "test", {"adapter_config.json": Pin(sha256=hashlib.sha256(CONFIG).hexdigest()),
                                              "adapter_model.bin": Pin(git_blob=git_blob(WEIGHTS))})


@pytest.fixture
def github(monkeypatch, tmp_path):
    server = FakeGitHub({f"{RUN}/adapter_config.json": CONFIG, f"{RUN}/adapter_model.bin": WEIGHTS,
                         "code_release/weights/ier/README.md": b"notes"})
    monkeypatch.setenv("IDC_LITE_GITHUB_API", server.url)
    monkeypatch.setenv("IDC_LITE_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


def test_every_released_adapter_file_is_pinned():
    from export.recipes import ADAPTER_FILES, RECIPES

    config = (ROOT / "tests" / "data" / "blip2idc-ier.adapter_config.json").read_bytes()
    for recipe in RECIPES.values():
        assert set(recipe.pins) == set(ADAPTER_FILES), recipe.name
        assert all(pin.sha256 or pin.git_blob for pin in recipe.pins.values())
    pin = RECIPES["blip2idc-ier"].pins["adapter_config.json"]  # the released file, as kept in tests/data
    assert pin.sha256 == hashlib.sha256(config).hexdigest() and pin.git_blob == git_blob(config)


def test_a_pinned_adapter_is_downloaded_checked_and_checked_again_before_each_use(github):
    from export.recipes import fetch_adapter

    folder = fetch_adapter(pinned_recipe(), progress=False)
    assert (folder / "adapter_model.bin").read_bytes() == WEIGHTS
    count = len(github.requests)
    assert fetch_adapter(pinned_recipe(), progress=False) == folder and len(github.requests) == count

    (folder / "adapter_model.bin").write_bytes(WEIGHTS[:-1] + b"!")  # the cache was changed
    fetch_adapter(pinned_recipe(), progress=False)
    assert (folder / "adapter_model.bin").read_bytes() == WEIGHTS and len(github.requests) > count


def test_other_content_than_the_pinned_one_is_refused(github, tmp_path):
    from export.errors import DownloadError
    from export.recipes import fetch_adapter, get_recipe

    with pytest.raises(DownloadError, match="does not match its pin"):
        fetch_adapter(get_recipe("blip2idc-ier"), progress=False)  # the real pins, other bytes served
    cached = list((tmp_path / "cache").rglob("*"))
    assert not [p for p in cached if p.name in ("adapter_config.json", "adapter_model.bin")]


def test_an_unpinned_download_is_refused(github):
    from export.download import fetch
    from export.errors import DownloadError, ExportError
    from export.recipes import Recipe, fetch_adapter

    with pytest.raises(ExportError, match="no pin for adapter_config.json, adapter_model.bin"):
        fetch_adapter(Recipe("test-ier", "ier", "test"), progress=False)
    with pytest.raises(DownloadError, match="not pinned"):
        fetch(f"{github.url}/raw/{RUN}/adapter_model.bin", Path("unused"), progress=False,
              origins=(github.url,))
    assert not github.requests


def test_file_urls_and_other_origins_in_a_listing_are_refused(github, tmp_path):
    from export.errors import DownloadError
    from export.recipes import fetch_adapter

    secret = tmp_path / "secret"
    secret.write_bytes(WEIGHTS)
    for url in (secret.as_uri(), f"http://127.0.0.2:{github.server.server_address[1]}/raw/{RUN}/adapter_model.bin",
                f"https://example.com/{RUN}/adapter_model.bin"):
        github.download_urls[f"{RUN}/adapter_model.bin"] = url
        with pytest.raises(DownloadError, match="refused: downloads go over https to GitHub only"):
            fetch_adapter(pinned_recipe(), progress=False)
    assert not list((tmp_path / "cache").rglob("adapter_model.bin*"))


def test_a_redirect_to_another_origin_is_not_followed(github, tmp_path):
    from export.errors import DownloadError
    from export.recipes import fetch_adapter

    other = FakeGitHub({f"{RUN}/adapter_model.bin": WEIGHTS})
    try:
        github.redirects[f"{RUN}/adapter_model.bin"] = f"{other.url}/raw/{RUN}/adapter_model.bin"
        with pytest.raises(DownloadError, match="refused"):
            fetch_adapter(pinned_recipe(), progress=False)
        assert other.requests == []
    finally:
        other.close()


def test_an_api_override_must_be_https_or_this_machine(monkeypatch):
    from export.errors import DownloadError
    from export.recipes import fetch_adapter

    for url in ("http://example.com", "file:///etc", "ftp://127.0.0.1/"):
        monkeypatch.setenv("IDC_LITE_GITHUB_API", url)
        with pytest.raises(DownloadError, match="IDC_LITE_GITHUB_API must be an https URL"):
            fetch_adapter(pinned_recipe(), progress=False)


def test_a_partial_download_with_garbage_after_it_is_not_kept(github, tmp_path):
    """HTTP 416 (the partial file is as long as the file, or longer) no longer means "complete"."""
    from export.download import fetch

    dest = tmp_path / "adapter_model.bin"
    dest.with_name(dest.name + ".partial").write_bytes(WEIGHTS + b"garbage")
    fetch(f"{github.url}/raw/{RUN}/adapter_model.bin", dest, git_blob=git_blob(WEIGHTS), progress=False,
          origins=(github.url,))
    assert dest.read_bytes() == WEIGHTS
    assert [r for _, r in github.requests] == [f"bytes={len(WEIGHTS) + 7}-", None]


def test_a_resumed_download_must_start_where_the_partial_file_ends(github, tmp_path):
    from export.download import fetch

    dest = tmp_path / "adapter_model.bin"
    dest.with_name(dest.name + ".partial").write_bytes(WEIGHTS[:1000])
    github.bad_range = True  # a 206 that sends the whole file: appended, it would double the start
    fetch(f"{github.url}/raw/{RUN}/adapter_model.bin", dest, git_blob=git_blob(WEIGHTS), progress=False,
          origins=(github.url,))
    assert dest.read_bytes() == WEIGHTS

    github.bad_range = False
    dest.unlink()
    dest.with_name(dest.name + ".partial").write_bytes(WEIGHTS[:1000])
    fetch(f"{github.url}/raw/{RUN}/adapter_model.bin", dest, git_blob=git_blob(WEIGHTS), progress=False,
          origins=(github.url,))
    assert dest.read_bytes() == WEIGHTS and github.requests[-1][1] == "bytes=1000-"


def test_a_partial_file_that_is_a_symlink_is_never_written_through(github, tmp_path):
    from export.download import fetch

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    dest = tmp_path / "adapter_model.bin"
    dest.with_name(dest.name + ".partial").symlink_to(victim)
    fetch(f"{github.url}/raw/{RUN}/adapter_model.bin", dest, git_blob=git_blob(WEIGHTS), progress=False,
          origins=(github.url,))
    assert victim.read_bytes() == b"keep me" and dest.read_bytes() == WEIGHTS


def test_a_cached_lfs_file_is_checked_through_its_kept_pointer(tmp_path):
    from export.download import Pin, lfs_pointer_path

    content = tmp_path / "adapter_model.bin"
    content.write_bytes(WEIGHTS)
    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(WEIGHTS).hexdigest()}\n"
               f"size {len(WEIGHTS)}\n").encode()
    lfs_pointer_path(content).write_bytes(pointer)
    pin = Pin(git_blob=git_blob(pointer))
    assert pin.matches(content)
    content.write_bytes(WEIGHTS[:-1] + b"!")
    assert not pin.matches(content)


# ---------------------------------------------------------------------------------------------- images
def _png(size=(16, 12), color=(200, 10, 10), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _in_child(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a Python child with at most 1.5 GiB of address space; its stdout."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
    done = subprocess.run([sys.executable, "-c", limit + code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    return done.stdout + done.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
def test_fifos_and_links_to_devices_are_refused_without_reading_them(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.png")
    for name in ("zero.png", "fifo.png"):
        out = _in_child(f"from idc_lite.compose import load_image\n"
                        f"try:\n    load_image({str(tmp_path / name)!r})\nexcept Exception as e:\n"
                        f"    print(type(e).__name__, e)")
        assert f"InputError {tmp_path / name}: is not a regular file" in out, out


def test_a_file_above_the_byte_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from idc_lite.compose import load_image
    from idc_lite.settings import ImageLimits

    path = tmp_path / "big.png"
    path.write_bytes(_png())
    cap = ImageLimits(max_bytes=path.stat().st_size - 1)
    reads = []
    real_open = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: reads.append(a) or real_open(*a, **k))
    with pytest.raises(InputError, match=rf"big.png: \d+ bytes, more than the {cap.max_bytes} an image may be"):
        load_image(path, limits=cap)
    assert not reads
    with pytest.raises(InputError, match=f"more than the {cap.max_bytes}"):
        load_image(path.read_bytes(), limits=cap)
    assert load_image(path).size == (16, 12) and reads


def _png_header(width: int, height: int, bit_depth: int = 16, color_type: int = 0) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and whose pixel data is a few zero bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_a_picture_above_the_pixel_cap_is_refused_before_it_is_decoded(tmp_path):
    from idc_lite.compose import load_image
    from idc_lite.settings import MAX_IMAGE_PIXELS, ImageLimits

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(13000, 13000))  # 169 million 16-bit pixels in a few hundred bytes
    out = _in_child(f"import warnings; warnings.simplefilter('error')\n"
                    f"from idc_lite.compose import load_image\n"
                    f"try:\n    load_image({str(bomb)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)",
                    timeout=30)
    assert "InputError" in out and "too large" in out, out
    assert 4000 * 4000 < MAX_IMAGE_PIXELS < 13000 * 13000
    small = tmp_path / "small.png"
    small.write_bytes(_png((40, 30)))
    with pytest.raises(InputError, match=r"small.png: image too large: 40x30 is 1200 pixels, more than the 1000"):
        load_image(small, limits=ImageLimits(max_pixels=1000))
    with pytest.raises(InputError, match="image too large"):
        load_image(Image.new("RGB", (40, 30)), limits=ImageLimits(max_pixels=1000))


def test_pillows_bomb_warning_is_an_error(tmp_path, monkeypatch):
    import warnings

    from idc_lite.compose import load_image
    from idc_lite.settings import ImageLimits

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns from 1000 pixels, fails from 2000
    path = tmp_path / "warned.png"
    path.write_bytes(_png((40, 30)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping idc-lite fails this test
        with pytest.raises(InputError, match="warned.png: image too large"):
            load_image(path, limits=ImageLimits(max_pixels=1000))
        assert load_image(path, limits=ImageLimits(max_pixels=5000)).size == (40, 30)  # the cap asked for decides


def test_only_the_listed_formats_are_decoded_told_by_content(tmp_path):
    from idc_lite.compose import IMAGE_FORMATS, load_image

    assert set(IMAGE_FORMATS) == {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
    for fmt in IMAGE_FORMATS:
        path = tmp_path / f"{fmt}.png"  # the name says PNG, the content decides
        path.write_bytes(_png(fmt=fmt))
        assert load_image(path).size == (16, 12), fmt
    eps = tmp_path / "eps.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\nshowpage\n")
    ppm = tmp_path / "ppm.png"
    ppm.write_bytes(_png(fmt="PPM"))
    for path in (eps, ppm):
        with pytest.raises(InputError, match="not an image file of an accepted format"):
            load_image(path)


@pytest.mark.parametrize("failure", [MemoryError, IndexError])
def test_a_decoder_failure_is_that_pairs_error_and_the_batch_goes_on(tmp_path, monkeypatch, failure):
    from PIL import BmpImagePlugin

    good, bad = tmp_path / "good.png", tmp_path / "bad.bmp"
    good.write_bytes(_png())
    bad.write_bytes(_png(fmt="BMP"))

    def explode(self):
        raise failure("the decoder gave up")

    monkeypatch.setattr(BmpImagePlugin.BmpImageFile, "load", explode)
    results = list(captioner(default_model_dir()).describe_batch(
        [(good, bad), (good, good)], batch_size=2, on_error="return"))
    assert results[0].error.startswith(f"{bad}: ") and results[1].ok and results[1].caption


# --------------------------------------------------------------------------------------------- outputs
FIELDS = ["id", "before", "after", "caption", "error", "model", "adapter", "backend", "seconds"]


def test_csv_cells_that_would_be_formulas_are_text_and_read_back_exactly(tmp_path):
    import csv

    from idc_lite.results_io import ResultsFile

    out = tmp_path / "results.csv"
    values = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "'quoted", "plain"]
    with ResultsFile(out, FIELDS) as results:
        for i, value in enumerate(values):
            results.write({"id": value, "before": f"{value}.png", "caption": value, "seconds": 0.5})
    rows = list(csv.DictReader(out.open()))
    assert [r["caption"] for r in rows] == ["'" + v for v in values[:-1]] + ["plain"]
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())
    again = ResultsFile(out, FIELDS)
    assert again.done == set(values) and again.records["=HYPERLINK(\"http://x\",\"y\")"]["before"] == values[0] + ".png"


@pytest.mark.parametrize("name, text", [
    ("notes.txt", "my notes\nthe last line, unfinished"),
    ("notes.csv", "a,b\n1,2\nlast"),
    ("other.jsonl", '{"id": "a"}\nnot json'),
    ("single.txt", "one line"),
])
def test_an_output_that_is_not_a_results_file_is_refused_untouched(tmp_path, name, text, capsys):
    from idc_lite.cli import main

    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
        (folder / "x.png").write_bytes(_png())
    out = tmp_path / name
    out.write_text(text)
    with pytest.raises(SystemExit) as info:
        main(["batch", str(before), str(after), "-o", str(out)])
    assert info.value.code == 2 and str(out) in capsys.readouterr().err
    assert out.read_text() == text


def test_a_results_file_cut_mid_record_is_still_resumed(tmp_path):
    from idc_lite.results_io import ResultsFile

    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "a", "caption": "x"}\n{"id": "b", "capt')
    assert ResultsFile(out, FIELDS).done == {"a"} and out.read_text() == '{"id": "a", "caption": "x"}\n'


def test_temporary_files_are_never_written_through_a_planted_symlink(tmp_path):
    from idc_lite.results_io import ResultsFile
    from idc_lite.tools.evaluate import write_report

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "a", "error": "bad image"}\n{"id": "b", "caption": "ok"}\n')
    out.chmod(0o640)
    (tmp_path / "results.jsonl.tmp").symlink_to(victim)
    results = ResultsFile(out, FIELDS)
    results.rewrite_without({"a"})
    assert victim.read_text() == "keep me" and results.done == {"b"}
    assert out.read_text() == '{"id": "b", "caption": "ok"}\n' and (out.stat().st_mode & 0o777) == 0o640

    (tmp_path / "report.json.tmp").symlink_to(victim)
    write_report({"n": 1}, tmp_path / "report.json")
    assert victim.read_text() == "keep me" and json.loads((tmp_path / "report.json").read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.json.tmp", "results.jsonl",
                                                          "results.jsonl.tmp", "victim.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_new_report_gets_the_mode_a_plain_write_would(tmp_path, umask):
    """mkstemp creates 0600; a report written anew must follow the umask like any other file (shared folders)."""
    from idc_lite.tools.evaluate import write_report

    old = os.umask(umask)
    try:
        write_report({"n": 1}, tmp_path / "report.json")
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("reader, content", [
    ("ier", [{"img0": "../outside.png", "img1": "b.png", "sents": ["x"], "uid": "1"}]),
    ("ier", [{"img0": "{abs}", "img1": "b.png", "sents": ["x"], "uid": "1"}]),
    ("spot", [{"img_id": "../outside", "sentences": ["x"]}]),
    ("syned", {"../outside ": ["x"]}),
])
def test_dataset_image_names_stay_inside_the_image_folder(tmp_path, reader, content):
    from idc_lite.tools.datasets import read_ier, read_spot_the_diff, read_syned

    images = tmp_path / "images"
    images.mkdir()
    for name in ("outside.png", "outside_2.png", "outside_input.png", "outside_output.png"):
        (tmp_path / name).write_bytes(_png())
    for name in ("b.png",):
        (images / name).write_bytes(_png())
    text = json.dumps(content).replace("{abs}", str(tmp_path / "outside.png"))
    path = tmp_path / "refs.json"
    path.write_text(text)
    read = {"ier": read_ier, "spot": read_spot_the_diff, "syned": read_syned}[reader]
    with pytest.raises(DatasetError, match="lies outside the image folder"):
        read(path, images)


def test_an_onnx_runtime_that_follows_external_data_out_opens_no_session(monkeypatch):
    import onnxruntime

    from idc_lite.backends.sessions import open_session

    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    with pytest.raises(ArtifactError, match="not opened with onnxruntime 1.23.2"):
        open_session(default_model_dir() / "encoder.onnx", "cpu")


def test_the_image_caps_are_options_of_the_api_and_the_cli(tmp_path, capsys):
    from idc_lite import Captioner, ImageLimits
    from idc_lite.cli import main

    before, after = tmp_path / "before.png", tmp_path / "after.png"
    Image.new("RGB", (64, 64), "white").save(before)
    Image.new("RGB", (64, 64), "black").save(after)
    captioner = Captioner(image_limits=ImageLimits(max_pixels=64 * 64 - 1))
    [result] = captioner.describe_batch([(before, after)], on_error="return")
    assert result.caption is None and "pixels" in result.error and str(before) in result.error
    assert Captioner().describe(before, after).caption
    with pytest.raises(SystemExit) as info:
        main(["describe", str(before), str(after), "--max-image-bytes", "10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {before}") and "bytes" in err[0]


def test_an_export_builds_in_a_folder_of_its_own_never_a_planted_one(tmp_path):
    import stat as stat_module

    from export.build import build_artifact
    from idc_lite.tools.modelgen import build_tiny_model

    model = build_tiny_model(tmp_path / "model", decoder="random")
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "artifact.partial").symlink_to(victim)
    artifact = build_artifact(str(model), tmp_path / "out" / "artifact", decoders=("ort-int4",))
    assert list(victim.iterdir()) == [] and load_manifest(artifact).decoders.keys() == {"ort-int4"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["artifact", "artifact.partial"]
    assert stat_module.S_IMODE(artifact.stat().st_mode) == 0o755
