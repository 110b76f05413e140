"""Where an ONNX Runtime decoder's decode step spends its time: ONNX Runtime's own per-node profile.

    python -m benchmarks.decoder_profile --artifact DIR [--decoder ort-int4] [--batch 1] [--steps 20]

Runs one prefill (random query embeddings of the artifact's shape + BOS) and ``--steps`` decode
steps through the lite runtime's own step (:meth:`~idc_lite.backends.ort_decoder.OrtDecoder._step`,
its KV cache included) in a session with ONNX Runtime's profiler on, then sums the kernel time of
every node over the decode steps (the prefill and a warm-up run are left out). Nodes are grouped by
what they compute: each ``MatMulNBits`` / ``MatMul`` by the weight it reads (``q``, ``k``, ``v``,
``out``, ``fc1``, ``fc2`` of the layers; ``lm_head``), every other node by its operator. Each
weight group is reported with the bytes it reads per step and the rate it reads them at, to set
against the host's read bandwidth (:func:`benchmarks.decoder_speed.read_bandwidth_gbps`, measured
in the same run): a group far below it is compute-bound, not memory-bound.

Per-node timing adds overhead to every node, so the profiled step is slower than an unprofiled one
(the "unprofiled" line, same session options, gives the scale); the shares are what it is for.
Writes ``--out`` (JSON) when given and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

#: Weight-name patterns of the layers' linear maps (transformers' OPT names, as the export keeps them).
ROLES = (("q", r"q_proj"), ("k", r"k_proj"), ("v", r"v_proj"), ("out", r"out_proj"), ("fc1", r"fc1"),
         ("fc2", r"fc2"), ("lm_head", r"^(lm_head|table|head)(\b|_)"))


def weight_role(name: str) -> str | None:
    """The role of a weight initializer from its name, or None if it is none of :data:`ROLES`."""
    for role, pattern in ROLES:
        if re.search(pattern, name):
            return role
    return None


def node_groups(graph_path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """For each node of the graph, the group its time is counted in; and each weight group's bytes.

    A node that reads a weight of :data:`ROLES` (MatMul, MatMulNBits) counts as that role; every other
    node as its operator type. Bytes are the initializers' sizes (the quantized blocks, scales and
    zero points of a ``MatMulNBits`` included).
    """
    import onnx

    from .decoder_speed import initializer_bytes

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    sizes = {init.name: initializer_bytes(init) for init in graph.initializer}
    groups, weight_bytes = {}, defaultdict(int)
    for node in graph.node:
        role = None
        if node.op_type in ("MatMul", "MatMulNBits") and len(node.input) > 1:
            role = weight_role(node.input[1])
        groups[node.name] = role or node.op_type
        if role:
            weight_bytes[role] += sum(sizes.get(name, 0) for name in node.input[1:])
    return groups, dict(weight_bytes)


def profile_decode(artifact: Path, decoder_kind: str = "ort-int4", *, batch: int = 1, steps: int = 20,
                   threads: int | None = None, seed: int = 0, bandwidth_bytes: int = 1 << 30) -> dict:
    """Profile ``steps`` decode steps of ``decoder_kind``; returns the per-group times (see the module docstring).

    ``bandwidth_bytes``: the buffer the host's read bandwidth is measured on (larger than the caches)."""
    from idc_lite.artifact import load_manifest
    from idc_lite.decoders import load_decoder
    from idc_lite.errors import ArtifactError

    from .decoder_speed import _ort_decode, decode_threads, read_bandwidth_gbps

    manifest = load_manifest(artifact, verify=False)
    if decoder_kind not in manifest.decoders or manifest.decoders[decoder_kind].runtime != "onnxruntime":
        raise ArtifactError(artifact, f"no ONNX Runtime decoder {decoder_kind!r} (it holds {', '.join(manifest.decoders)})")
    path = manifest.decoder_graph(decoder_kind)
    shape = manifest.decoders[decoder_kind].shape
    tokens = manifest.tokens
    query = (np.random.default_rng(seed).standard_normal((batch, tokens.num_query_tokens, shape.hidden_size))
             * 0.1).astype(np.float32)
    prefix = [tokens.bos_token_id]

    with tempfile.TemporaryDirectory() as folder:
        # The runtime's own session options (the same as a Captioner's), the profiler on or off.
        plain = load_decoder(manifest, decoder_kind, "cpu", threads=threads)
        _ort_decode(plain, query, prefix, steps)  # warm-up
        unprofiled = min(_ort_decode(plain, query, prefix, steps) for _ in range(2))
        del plain
        profiled = load_decoder(manifest, decoder_kind, "cpu", threads=threads, profile_prefix=str(Path(folder) / "decode"))
        _ort_decode(profiled, query, prefix, steps)  # warm-up: counted in the file, left out below
        step_ms = _ort_decode(profiled, query, prefix, steps)
        events = json.loads(Path(profiled.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    # Runs: warm-up prefill + steps, then the timed prefill + steps. Keep the timed decode steps.
    timed = runs[-steps:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in timed]
    groups, weight_bytes = node_groups(path)
    totals = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        ts = event["ts"]
        if not any(start <= ts <= end for start, end in windows):
            continue
        node = event.get("args", {}).get("node_name") or event["name"][: -len("_kernel_time")]
        totals[groups.get(node, event.get("args", {}).get("op_name", "?"))] += event["dur"] / 1000
    run_ms = sum(e["dur"] for e in timed) / 1000 / steps
    gbps = read_bandwidth_gbps(size_bytes=bandwidth_bytes, threads=threads or decode_threads())
    rows = []
    for group, total in sorted(totals.items(), key=lambda item: -item[1]):
        ms = total / steps
        row = {"group": group, "ms_per_step": ms, "share": ms / run_ms}
        if group in weight_bytes:
            row["weight_bytes"] = weight_bytes[group]
            row["read_gbps"] = weight_bytes[group] / (ms / 1000) / 1e9 if ms else None
        rows.append(row)
    from .machine import machine_info

    return {"artifact": str(artifact), "decoder": decoder_kind, "batch": batch, "steps": steps,
            "layers": shape.layers, "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
            "threads": threads or decode_threads(), "unprofiled_ms_per_step": unprofiled,
            "profiled_ms_per_step": step_ms, "profiled_run_ms_per_step": run_ms, "read_gbps": gbps,
            "groups": rows, "machine": machine_info()}


def markdown(result: dict) -> str:
    """The profile as a Markdown table, with the run's header lines."""
    lines = [
        f"{result['decoder']} of `{result['artifact']}`: {result['layers']} layers, hidden {result['hidden_size']}, "
        f"vocabulary {result['vocab_size']}; batch {result['batch']}, {result['steps']} decode steps, "
        f"{result['threads']} threads; {result['machine'].get('cpu', '?')}",
        f"step: {result['unprofiled_ms_per_step']:.1f} ms unprofiled, {result['profiled_ms_per_step']:.1f} ms "
        f"profiled; host read bandwidth {result['read_gbps']:.1f} GB/s",
        "",
        "| group | ms per step | share of the step | weights read (MB) | read rate (GB/s) |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in result["groups"]:
        mb = f"{row['weight_bytes'] / 1e6:.0f}" if "weight_bytes" in row else ""
        rate = f"{row['read_gbps']:.1f}" if row.get("read_gbps") else ""
        lines.append(f"| {row['group']} | {row['ms_per_step']:.2f} | {row['share']:.1%} | {mb} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoder_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="an artifact directory")
    parser.add_argument("--decoder", default="ort-int4", help="one of its ONNX Runtime decoders (default ort-int4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")
    from idc_lite.errors import IdcError

    try:
        result = profile_decode(args.artifact, args.decoder, batch=args.batch, steps=args.steps, threads=args.threads)
    except IdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
