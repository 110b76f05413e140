"""``idc-lite serve``: routes, micro-batching, the safe defaults and reliability, on loopback with the embedded model.

Every server here is real (uvicorn on a free 127.0.0.1 port, in this process or a child) and every
caption is checked against the same pair described alone by :class:`idc_lite.Captioner`. Request
loops are bounded in count and time.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from _serve_support import ROOT, ChildServer, LocalServer, example_pairs, free_port, request  # noqa: E402

from idc_lite.serve.client import Client, ServerError, Unreachable, encode_multipart  # noqa: E402
from idc_lite.serve.config import ServeConfig  # noqa: E402

PAIRS = example_pairs()


@pytest.fixture(scope="module")
def captioner():
    from idc_lite import Captioner

    return Captioner()


@pytest.fixture(scope="module")
def expected(captioner) -> list[str]:
    """Each example pair's caption, described alone, in this process."""
    return [captioner.describe(b, a).caption for b, a in PAIRS]


@pytest.fixture(scope="module")
def server(captioner):
    """One in-process server (default limits, a 1 MB body cap) for the tests that do not change its settings."""
    with LocalServer(ServeConfig(port=free_port(), max_body_mb=1.0, max_wait_ms=20), lambda: captioner) as running:
        running.wait_ready()
        yield running


def multipart(files, fields=None):
    body, content_type = encode_multipart(files, fields)
    return body, {"Content-Type": content_type}


def assert_serving(server, expected):
    """The server still answers a good request correctly."""
    result = Client(server.url).describe(PAIRS[0][0], PAIRS[0][1])
    assert result["caption"] == expected[0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels over a few bytes of data: a decompression bomb."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- routes
def test_describe_returns_the_fields_of_describe_json_and_the_same_caption(server, captioner, expected):
    client = Client(server.url)
    assert client.health()
    info = client.info()
    backend = captioner.backend
    assert (info["model"], info["backend"], info["decoder"], info["device"]) == (
        captioner.model_id, "lite", backend.decoder_name, str(backend.device))
    assert info["limits"]["max_batch"] == 8 and info["limits"]["max_body_bytes"] == 2**20
    result = client.describe(PAIRS[1][0], PAIRS[1][1])
    assert set(result) == set(captioner.describe(*PAIRS[1]).to_dict())
    assert result["caption"] == expected[1] and result["error"] is None
    assert result["before"] == "image" and result["timings"]["batch_size"] >= 1
    # JSON with base64 images (a data: URL too), and generation settings
    body = {"before": base64.b64encode(PAIRS[2][0]).decode(),
            "after": "data:image/png;base64," + base64.b64encode(PAIRS[2][1]).decode()}
    status, data, _ = request(server.port, "POST", "/v1/describe", json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200 and data["caption"] == expected[2]
    from idc_lite import GenerationSettings

    short = captioner.describe(*PAIRS[2], GenerationSettings(max_new_tokens=2)).caption
    assert client.describe(PAIRS[2][0], PAIRS[2][1], max_new_tokens=2)["caption"] == short
    body["generation"] = {"max_new_tokens": 2}
    status, data, _ = request(server.port, "POST", "/v1/describe", json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200 and data["caption"] == short


def test_batch_route_keeps_order_and_reports_a_failed_pair_alone(server, expected):
    pairs = [PAIRS[0], (b"not an image", PAIRS[1][1]), PAIRS[3], (PAIRS[4][0], png_header_only(30000, 30000))]
    results = Client(server.url).describe_batch(pairs)
    assert [r["caption"] for r in results] == [expected[0], None, expected[3], None]
    assert results[1]["error"].startswith("pairs[1].before: not an image file")
    assert results[3]["error"].startswith("pairs[3].after: image too large")
    body = {"pairs": [{"before": base64.b64encode(b).decode(), "after": base64.b64encode(a).decode()}
                      for b, a in PAIRS]}
    status, data, _ = request(server.port, "POST", "/v1/describe/batch", json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200 and [r["caption"] for r in data["results"]] == expected


def test_openapi_docs_and_page(server):
    status, spec, _ = request(server.port, "GET", "/openapi.json")
    assert status == 200
    assert {"/health", "/v1/info", "/v1/describe", "/v1/describe/batch"} <= set(spec["paths"])
    content = spec["paths"]["/v1/describe"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert {"413", "415", "422"} <= set(spec["paths"]["/v1/describe"]["post"]["responses"])
    for path in ("/", "/docs", "/static/app.js", "/static/style.css"):
        status, _, headers = request(server.port, "GET", path)
        assert status == 200, path
        assert "default-src 'self'" in headers["content-security-policy"]
    page = (ROOT / "idc_lite" / "serve" / "static" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from a CDN


def test_micro_batching_gives_each_pair_the_caption_it_gets_alone(captioner, expected):
    config = ServeConfig(port=free_port(), max_batch=8, max_wait_ms=200)
    with LocalServer(config, lambda: captioner) as server:
        server.wait_ready()
        client = Client(server.url)
        jobs = [i % len(PAIRS) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: client.describe(*PAIRS[i]), jobs))
        assert [r["caption"] for r in results] == [expected[i] for i in jobs]
        assert max(r["timings"]["batch_size"] for r in results) > 1
        stats = client.info()["stats"]
        assert stats["pairs"] == 16 and stats["batches"] < 16


def test_health_is_503_while_the_model_loads(captioner):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(20)
        return captioner

    with LocalServer(ServeConfig(port=free_port()), slow_load) as server:
        status, data, headers = request(server.port, "GET", "/health")
        assert (status, data["status"], headers["retry-after"]) == (503, "loading", "1")
        files = multipart([("before", PAIRS[0][0]), ("after", PAIRS[0][1])])
        status, data, _ = request(server.port, "POST", "/v1/describe", *files)
        assert status == 503 and data["error"].startswith("model: still loading")
        assert not Client(server.url).health()
        loaded.set()
        server.wait_ready()


def test_a_model_that_cannot_load_stops_the_command_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "idc_lite", "serve", "--port", str(free_port()), "--model",
                          str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: the model did not load:")


# ----------------------------------------------------------------------------- safe by default
def test_any_host_but_loopback_needs_a_token():
    from idc_lite.errors import OptionError

    with pytest.raises(OptionError, match="--token"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", token="t").token == "t"
    with pytest.raises(OptionError, match="wildcard"):
        ServeConfig(cors_origins=("*",))
    run = subprocess.run([sys.executable, "-m", "idc_lite", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "--token" in run.stderr


def test_token_is_required_for_every_api_request(captioner, expected):
    with LocalServer(ServeConfig(port=free_port(), token="s3cret"), lambda: captioner) as server:
        server.wait_ready = lambda: None
        files = multipart([("before", PAIRS[0][0]), ("after", PAIRS[0][1])])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for method, path, body in (("GET", "/health", None), ("GET", "/v1/info", None),
                                       ("POST", "/v1/describe", files[0])):
                status, data, reply = request(server.port, method, path, body, {**files[1], **headers})
                assert status == 401 and data["error"].startswith("authorization:"), (path, headers)
                assert reply["www-authenticate"] == "Bearer"
        assert request(server.port, "GET", "/")[0] == 200  # the page itself holds nothing
        client = Client(server.url, token="s3cret")
        client.wait_until_ready(20)
        assert client.describe(*PAIRS[0])["caption"] == expected[0]
        with pytest.raises(ServerError) as refused:
            Client(server.url, token="nope").info()
        assert refused.value.status == 401


def test_foreign_host_and_origin_are_refused_and_cors_only_for_given_origins(captioner, expected):
    config = ServeConfig(port=free_port(), cors_origins=("https://editor.example",))
    with LocalServer(config, lambda: captioner) as server:
        server.wait_ready()
        port = server.port
        body, headers = multipart([("before", PAIRS[0][0]), ("after", PAIRS[0][1])])
        for extra, part in (({"Host": "evil.example"}, "host"), ({"Host": f"evil.example:{port}"}, "host"),
                            ({"Host": f"attacker.localhost.example:{port}"}, "host"),
                            ({"Origin": "http://evil.example"}, "origin"), ({"Origin": "null"}, "origin"),
                            ({"Origin": f"http://127.0.0.1:{port + 1}"}, "origin")):
            status, data, reply = request(port, "POST", "/v1/describe", body, {**headers, **extra})
            assert status == 403 and data["error"].startswith(part + ":"), extra
            assert "access-control-allow-origin" not in reply
        # the server's own page, and the origin it was given
        for origin in (f"http://127.0.0.1:{port}", "https://editor.example"):
            status, data, reply = request(port, "POST", "/v1/describe", body, {**headers, "Origin": origin})
            assert status == 200 and data["caption"] == expected[0]
        assert reply["access-control-allow-origin"] == "https://editor.example"
        status, _, reply = request(port, "OPTIONS", "/v1/describe", None, {
            "Origin": "https://editor.example", "Access-Control-Request-Method": "POST"})
        assert status == 204 and reply["access-control-allow-origin"] == "https://editor.example"
        status, _, reply = request(port, "OPTIONS", "/v1/describe", None, {
            "Origin": "https://other.example", "Access-Control-Request-Method": "POST"})
        assert status == 403 and "access-control-allow-origin" not in reply
        status, _, _ = request(port, "GET", "/health", None, {"Host": f"localhost:{port}"})
        assert status == 200


@pytest.mark.parametrize("case", [
    "malformed multipart", "unterminated multipart", "no boundary", "bad json", "bad base64", "text/plain",
    "non-image", "empty image", "decompression bomb", "truncated png", "missing after", "two befores",
    "unknown field", "max_new_tokens 0", "num_beams too many", "body over the cap", "no such route",
])
def test_bad_requests_get_one_line_json_errors_with_their_status(server, expected, case):
    good = [("before", PAIRS[0][0]), ("after", PAIRS[0][1])]
    mp = multipart
    cases = {
        "malformed multipart": (400, "body", b"--xyz\r\nContent-Disposition: form-data; name=before\r\n\r\nab--xyz--",
                                {"Content-Type": "multipart/form-data; boundary=zzz"}),
        "unterminated multipart": (400, "body", mp(good)[0][:-60], mp(good)[1]),
        "no boundary": (400, "content-type", b"x", {"Content-Type": "multipart/form-data"}),
        "bad json": (400, "body", b"{not json", {"Content-Type": "application/json"}),
        "bad base64": (400, "before", b'{"before": "%%%", "after": "AAAA"}', {"Content-Type": "application/json"}),
        "text/plain": (415, "content-type", b"hello", {"Content-Type": "text/plain"}),
        "non-image": (415, "before", *mp([("before", b"GIF89 no, just text"), good[1]])),
        "empty image": (415, "after", *mp([good[0], ("after", b"")])),
        "decompression bomb": (413, "after", *mp([good[0], ("after", png_header_only(30000, 30000))])),
        "truncated png": (422, "before", *mp([("before", PAIRS[0][0][:300]), good[1]])),
        "missing after": (422, "after", *mp([good[0]])),
        "two befores": (422, "before", *mp([good[0], good[0], good[1]])),
        "unknown field": (422, "temperature", *mp(good, {"temperature": "0.7"})),
        "max_new_tokens 0": (422, "max_new_tokens", *mp(good, {"max_new_tokens": "0"})),
        "num_beams too many": (422, "num_beams", *mp(good, {"num_beams": "99"})),
        "body over the cap": (413, "body", *mp([("before", os.urandom(2**20)), good[1]])),
        "no such route": (404, "/v1/nope", b"", {}),
    }
    status, part, body, headers = cases[case]
    path = "/v1/nope" if case == "no such route" else "/v1/describe"
    got, data, _ = request(server.port, "POST", path, body, headers)
    assert got == status, data
    assert set(data) == {"error", "status"} and data["status"] == status
    assert data["error"].startswith(part + ": ") and "\n" not in data["error"]
    assert_serving(server, expected)


def test_a_chunked_body_over_the_cap_is_refused_while_it_streams(server, expected):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/describe HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nTransfer-Encoding: chunked\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode())
        chunk = b"x" * 65536
        try:
            for _ in range(40):  # 2.5 MB, over the 1 MB cap
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while not reply.endswith(b"}"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413") and '"body: more than' in reply
    assert_serving(server, expected)


def test_clients_that_disconnect_mid_upload(server, expected):
    body, headers = multipart([("before", PAIRS[0][0]), ("after", PAIRS[0][1])])
    for cut in (0, 10, len(body) // 2, len(body) - 5):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(f"POST /v1/describe HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                             f"Content-Type: {headers['Content-Type']}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
                sock.sendall(body[:cut])
    assert_serving(server, expected)
    assert request(server.port, "GET", "/health")[0] == 200


def test_a_full_queue_is_503_with_retry_after_and_a_long_wait_504(captioner, expected):
    class Gated:
        """The real captioner behind a gate, to hold the model busy while the test fills the queue."""

        def __init__(self):
            self.gate, self.entered = threading.Event(), threading.Event()

        def __getattr__(self, name):
            return getattr(captioner, name)

        def describe_batch(self, *args, **kwargs):
            self.entered.set()
            self.gate.wait(20)
            return captioner.describe_batch(*args, **kwargs)

    gated = Gated()
    config = ServeConfig(port=free_port(), max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=1.5)
    with LocalServer(config, lambda: gated) as server:
        server.wait_ready()
        client = Client(server.url)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.describe, *PAIRS[0])
            assert gated.entered.wait(10)  # the model holds the first pair
            waiting = [pool.submit(client.describe, *PAIRS[i]) for i in (1, 2)]
            deadline = time.monotonic() + 5
            while client.info()["stats"]["pending"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(ServerError) as full:
                client.describe(*PAIRS[3])
            assert full.value.status == 503 and full.value.retry_after >= 1
            assert full.value.message.startswith("queue: busy")
            for future in (first, *waiting):
                with pytest.raises(ServerError) as late:
                    future.result(10)
                assert late.value.status == 504 and late.value.message.startswith("queue: not described within")
        gated.gate.set()
        assert client.describe(*PAIRS[4])["caption"] == expected[4]
        assert client.info()["stats"]["pending"] == 0


# ----------------------------------------------------------------------------- a real process
def test_500_requests_from_16_clients_every_answer_right_memory_flat(expected):
    with ChildServer("--max-batch", "8", "--max-wait-ms", "10") as server:
        client = Client(f"http://127.0.0.1:{server.port}")
        jobs = [i % len(PAIRS) for i in range(500)]

        def run(chunk):
            return [client.describe(*PAIRS[i])["caption"] for i in chunk]

        def round_of(chunk_jobs):
            with ThreadPoolExecutor(16) as pool:
                slices = [chunk_jobs[k::16] for k in range(16)]
                answers = list(pool.map(run, slices))
            got = [None] * len(chunk_jobs)
            for k, captions in enumerate(answers):
                got[k::16] = captions
            return got

        warm = jobs[:100]
        assert round_of(warm) == [expected[i] for i in warm]
        rss_warm = server.rss_bytes()
        rest = jobs[100:]
        assert round_of(rest) == [expected[i] for i in rest]
        growth = server.rss_bytes() - rss_warm
        assert growth < 32 * 2**20, f"server memory grew by {growth / 2**20:.1f} MiB over 400 requests"
        stats = client.info()["stats"]
        assert stats["pairs"] == 500 and stats["pending"] == 0
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.output)
    assert not any("PNG" in line or "IHDR" in line for line in server.output)  # metadata only


def test_sigterm_lets_requests_in_flight_finish(expected):
    # A long wait keeps 12 requests in the batcher while the signal arrives.
    with ChildServer("--max-batch", "32", "--max-wait-ms", "2000") as server:
        client = Client(f"http://127.0.0.1:{server.port}")
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.describe, *PAIRS[i % 6]) for i in range(12)]
            deadline = time.monotonic() + 10
            while client.info()["stats"]["pending"] < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            results = [f.result(30) for f in futures]
        assert [r["caption"] for r in results] == [expected[i % 6] for i in range(12)]
        assert server.process.wait(30) == 0  # drained: a clean exit
        with pytest.raises(Unreachable):
            client.info()


def test_without_the_serve_extra_the_command_says_which_to_install(monkeypatch, capsys):
    import importlib.util

    from idc_lite.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == ["error: idc-lite serve needs fastapi: pip install 'idc-lite[serve]'"]


def test_the_load_benchmark_measures_both_modes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--clients", "1", "2", "--requests", "4",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("serve-demo-cpu-*.json")).read_text())
    assert set(report["modes"]) == {"one-at-a-time", "micro-batching"}
    for mode in report["modes"].values():
        assert [lv["clients"] for lv in mode["levels"]] == [1, 2]
        assert all(lv["requests"] == 4 and lv["rps"] > 0 and lv["p95_s"] >= lv["p50_s"] for lv in mode["levels"])
    summary = report["summary"]
    assert summary["wrong_captions"] == 0 and summary["same_captions_both_modes"]
    assert summary["clients"] == 2 and summary["throughput_ratio"] > 0


def test_attention_route_returns_the_picture_or_the_arrays_of_the_api(server, captioner):
    import io

    import numpy as np
    from PIL import Image

    from idc_lite.attention import render_attention

    def post(fields):
        body, headers = multipart([("before", PAIRS[0][0]), ("after", PAIRS[0][1])], fields)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request("POST", "/v1/attention", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()
        finally:
            conn.close()

    status, media, data = post({"layer": "-1", "from": "mean"})
    assert status == 200 and media == "image/png"
    want = captioner.attention(*PAIRS[0], layer=-1, source="mean")
    assert Image.open(io.BytesIO(data)).size == render_attention(want).size
    status, media, data = post({"layer": "0", "heads": "1", "format": "npz"})
    assert status == 200 and media == "application/octet-stream"
    arrays = np.load(io.BytesIO(data))
    assert arrays["heads"].tolist() == [1] and int(arrays["layer"]) == 0
    assert np.allclose(arrays["weights"], captioner.attention(*PAIRS[0], layer=0, heads="1").weights)
    status, media, data = post({"layer": "99"})
    assert status == 422 and "layer 99 does not exist" in json.loads(data)["error"]
