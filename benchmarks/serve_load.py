"""``python -m benchmarks.serve_load``: ``idc-lite serve`` under concurrent clients, with and without micro-batching.

Two server processes run the same model, one per mode (micro-batching: ``--max-batch`` and
``--max-wait-ms``; one at a time: ``--max-batch 1 --max-wait-ms 0``), and are warmed up. At each
level, 1, 4 and 16 clients (threads, one keep-alive connection each) post the repository's example
pairs as multipart uploads, a fixed number of requests, to one mode's server and then to the
other's, so that both modes see the same machine (the idle server waits on its socket). Measured on
the client side: requests per second, and p50 / p95 latency. Every caption is checked against the
one the same server gave the pair alone. Issue 16's target: with 16 clients, micro-batching gives at
least 1.5x the requests per second of one at a time, at a p95 no worse than 2x a lone request (p50
at 1 client, one at a time).

Clients and server share the machine: on a small CPU the clients' own work is part of the figures,
the same in both modes; the load average before and after each level is recorded. Outputs
``serve-<model>-<device>-<machine>.json`` and ``.md`` in ``--out``.

    python -m benchmarks.serve_load                                              # the embedded model
    python -m benchmarks.serve_load --config blip2-opt-2.7b --depth-scale 0.25 --requests 32 --max-new-tokens 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("benchmarks")
NAMES = ("add", "background", "color", "local", "remove", "text")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load",
                                description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--artifact", type=Path, help="An idc-lite artifact (default: the embedded model).")
    p.add_argument("--config", help="Random weights at a shipped config's shapes (blip2-opt-2.7b), built and cached "
                   "as python -m benchmarks does.")
    p.add_argument("--depth-scale", type=float, default=1.0, help="With --config: scale the number of layers.")
    p.add_argument("--encoder-precision", default="int8",
                   help="With --config: the encoder's precision (default int8).")
    p.add_argument("--decoder", default=None, help="Which of the artifact's decoders (default: the device's).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu).")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=96, help="Requests per level (default 96).")
    p.add_argument("--max-batch", type=int, default=8, help="The micro-batching mode's --max-batch (default 8).")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="The micro-batching mode's --max-wait-ms (default 10).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Sent with every request (default: the model's).")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--cache-dir", type=Path, default=None)
    return p


# ----------------------------------------------------------------------------- the model
def resolve_model(args) -> tuple[str | None, str]:
    """(--model value, a short name) for the server."""
    if args.artifact:
        return str(args.artifact), args.artifact.name
    if args.config:
        from .models import default_cache_dir, random_subject
        from idc_lite.tools.memory import config_path

        logs = (args.out / "logs")
        logs.mkdir(parents=True, exist_ok=True)
        subject = random_subject(config_path(args.config), args.cache_dir or default_cache_dir(), logs,
                                 decoders=("ort-int4-fp16" if args.device.startswith("cuda") else "ort-int4",),
                                 depth_scale=args.depth_scale, encoder_precision=args.encoder_precision)
        name = (Path(args.config).stem if args.config.endswith(".json") else args.config) + (
            f"-depth{args.depth_scale:g}" if args.depth_scale != 1 else "")
        return str(subject.artifact), name
    return None, "demo"


# ----------------------------------------------------------------------------- the server
class Server:
    def __init__(self, model: str | None, args, max_batch: int, max_wait_ms: float):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "idc_lite", "serve", "--port", str(self.port), "--device", args.device,
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "1024",
                   "--timeout", "600"]
        if model:
            command += ["--model", model]
        if args.decoder:
            command += ["--decoder", args.decoder]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited: " + self.process.stderr.read().decode()[-2000:])
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def bodies(max_new_tokens: int | None) -> list[tuple[bytes, str]]:
    from idc_lite.serve.client import encode_multipart

    fields = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return [encode_multipart([("before", ROOT / "examples" / "before" / f"{n}.png"),
                              ("after", ROOT / "examples" / "after" / f"{n}.png")], fields) for n in NAMES]


def post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> dict:
    conn.request("POST", "/v1/describe", body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {data.get('error')}")
    return data


def level(port: int, clients: int, requests: int, payloads, expected: list[str]) -> dict:
    """``requests`` requests from ``clients`` threads; latencies, throughput, wrong captions, batch sizes."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    wrong = [0]
    lock = threading.Lock()
    per_client = [list(range(k, requests, clients)) for k in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(jobs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start.wait()
        for j in jobs:
            body, content_type = payloads[j % len(payloads)]
            t0 = time.perf_counter()
            result = post(conn, body, content_type)
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(result["timings"]["batch_size"])
                wrong[0] += result["caption"] != expected[j % len(payloads)]
        conn.close()

    load_before = os.getloadavg()[0]  # other work on the machine shows here
    threads = [threading.Thread(target=client, args=(jobs,)) for jobs in per_client]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "rps": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 4),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 4),
            "mean_batch": round(statistics.mean(batch_sizes), 2), "wrong_captions": wrong[0],
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_modes(model, args, payloads) -> dict:
    """Both modes, each on its own server; levels alternate between them so that both see the same machine."""
    settings = {"one-at-a-time": (1, 0.0), "micro-batching": (args.max_batch, args.max_wait_ms)}
    servers, modes = {}, {}
    try:
        for name, (max_batch, max_wait_ms) in settings.items():
            servers[name] = Server(model, args, max_batch, max_wait_ms)
            conn = http.client.HTTPConnection("127.0.0.1", servers[name].port, timeout=600)
            captions = [post(conn, *p)["caption"] for p in payloads]  # alone: the reference captions, and a warm-up
            if [post(conn, *p)["caption"] for p in payloads] != captions:
                raise RuntimeError(f"{name}: the same pair got two captions from the same server")
            conn.close()
            modes[name] = {"mode": name, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "captions": captions,
                           "levels": []}
        for clients in args.clients:
            for name, server in servers.items():
                result = level(server.port, clients, args.requests, payloads, modes[name]["captions"])
                logger.info("%-15s %2d clients: %.2f req/s, p50 %.3f s, p95 %.3f s, mean batch %.1f, wrong %d", name,
                            clients, result["rps"], result["p50_s"], result["p95_s"], result["mean_batch"],
                            result["wrong_captions"])
                modes[name]["levels"].append(result)
    finally:
        for server in servers.values():
            server.stop()
    return modes


def summarize(modes: dict) -> dict:
    one, batched = modes["one-at-a-time"], modes["micro-batching"]
    at = {m: {lv["clients"]: lv for lv in modes[m]["levels"]} for m in modes}
    lone = at["one-at-a-time"].get(1, {}).get("p50_s")
    top = max(at["micro-batching"])
    speedup = at["micro-batching"][top]["rps"] / at["one-at-a-time"][top]["rps"]
    p95_ratio = at["micro-batching"][top]["p95_s"] / lone if lone else None
    return {
        "clients": top, "lone_request_s": lone,
        "throughput_ratio": round(speedup, 3), "p95_over_lone": None if p95_ratio is None else round(p95_ratio, 3),
        "p95_over_one_at_a_time": round(at["micro-batching"][top]["p95_s"] / at["one-at-a-time"][top]["p95_s"], 3),
        "target_throughput": speedup >= 1.5, "target_p95": p95_ratio is not None and p95_ratio <= 2.0,
        "same_captions_both_modes": one["captions"] == batched["captions"],
        "wrong_captions": sum(lv["wrong_captions"] for m in modes.values() for lv in m["levels"]),
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# idc-lite serve under load: {report['model']}", "", f"Machine: {report['machine_line']}", "",
             f"Command: `{report['command']}`", "",
             "| mode | clients | req/s | p50 s | p95 s | mean batch | wrong captions | load average before, after |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for mode in report["modes"].values():
        for lv in mode["levels"]:
            load = ", ".join(f"{x:.1f}" for x in lv["load_1m"])
            lines.append(f"| {mode['mode']} | {lv['clients']} | {lv['rps']:.2f} | {lv['p50_s']:.3f} | {lv['p95_s']:.3f} "
                         f"| {lv['mean_batch']:.1f} | {lv['wrong_captions']} | {load} |")
    verdict = {True: "pass", False: "FAIL"}
    lines += ["", f"With {s['clients']} clients: micro-batching / one at a time = {s['throughput_ratio']:.2f}x "
              f"requests per second (target >= 1.5: {verdict[s['target_throughput']]}); p95 / lone request = "
              f"{s['p95_over_lone']:.2f} (target <= 2: {verdict[s['target_p95']]}); p95 / one at a time's p95 = "
              f"{s['p95_over_one_at_a_time']:.2f}. Captions the same in both modes: "
              f"{s['same_captions_both_modes']}; wrong captions under load: {s['wrong_captions']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .machine import describe, machine_info, probe_gpu

    model, name = resolve_model(args)
    payloads = bodies(args.max_new_tokens)
    modes = run_modes(model, args, payloads)
    machine = machine_info(probe_gpu() if args.device.startswith("cuda") else None)
    report = {"model": name, "artifact": model, "device": args.device, "machine": machine,
              "machine_line": describe(machine),
              "command": "python -m benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
              "requests_per_level": args.requests, "max_new_tokens": args.max_new_tokens, "modes": modes,
              "summary": summarize(modes)}
    on_gpu = args.device.startswith("cuda") and machine["gpu"].get("available")
    slug = re.sub(r"[^a-z0-9]+", "-", (machine["gpu"]["name"] if on_gpu else machine["cpu"]).lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{name}-{args.device.split(':')[0]}-{slug}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"written: {args.out / stem}.json, .md")


if __name__ == "__main__":
    main()
