"""Two builds of a decoder, interleaved: ms per token and the process's peak RSS, B against A.

    python -m benchmarks.decoder_ab A B [--decoder ort-int4] [--batch-sizes 1 8 32] [--rounds 3] [--tokens 20]

A and B are artifacts holding the decoder (e.g. one exported with ``--ort-block-size 32``, one with
128). Timed one after the other, two builds measure the machine's drift between the runs as much as
the change: a shared or virtual machine's speed moves by 10-30% over minutes. So each round runs
both, each in a fresh process (its peak RSS is its own: the decoder loaded, then every batch size),
A first in even rounds and B first in odd ones, and the result is the median over rounds of each,
with the ratio B / A. Each process times the decode steps alone
(:func:`benchmarks.decoder_speed.decoder_ms_per_token`: a prefill of random query embeddings + BOS,
then exactly ``--tokens`` steps). Writes ``--out`` (JSON) when given and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def measure(artifact: str, decoder: str, batch_sizes: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """In this process: the decoder's ms per token at each batch size (one load for all)."""
    from idc_lite.artifact import load_manifest
    from idc_lite.decoders import load_decoder

    from .decoder_speed import decoder_ms_per_token

    loaded = load_decoder(load_manifest(artifact, verify=False), decoder, "cpu")
    return {str(batch): decoder_ms_per_token(decoder, artifact, batch=batch, new_tokens=tokens, repeats=repeats,
                                             ort_decoder=loaded)
            for batch in batch_sizes}


def round_order(round_: int) -> tuple[str, str]:
    """Which build goes first in round ``round_`` (from 0): A in even rounds, B in odd ones."""
    return ("a", "b") if round_ % 2 == 0 else ("b", "a")


def compare(a: str, b: str, decoder: str, batch_sizes: list[int], rounds: int, tokens: int, repeats: int,
            log=print) -> dict:
    """``rounds`` interleaved rounds of A and B, each in a fresh process; medians and ratios B / A."""
    from .processes import run_child

    runs: dict[str, list[dict]] = {"a": [], "b": []}
    logs = Path(tempfile.mkdtemp(prefix="decoder-ab-"))  # kept if a run fails: its error names the log
    for round_ in range(rounds):
        for side in round_order(round_):
            artifact, out = {"a": a, "b": b}[side], logs / f"{side}{round_}.json"
            args = ["--child", artifact, "--decoder", decoder, "--tokens", tokens, "--repeats", repeats,
                    "--out", out, "--batch-sizes", *batch_sizes]
            child = run_child("benchmarks.decoder_ab", args, logs / f"{side}{round_}.log")
            if not child.ok:
                raise RuntimeError(f"{side.upper()} ({artifact}), round {round_ + 1}: {child.why()}")
            ms = json.loads(out.read_text(encoding="utf-8"))
            runs[side].append({"ms_per_token": ms, "peak_rss_bytes": child.peak_rss_bytes})
            log(f"round {round_ + 1} {side.upper()}: " + ", ".join(f"batch {k} {v:.1f} ms" for k, v in ms.items())
                + f", peak RSS {child.peak_rss_bytes / 2**30:.2f} GiB")
    shutil.rmtree(logs, ignore_errors=True)
    median = {side: {"ms_per_token": {str(batch): statistics.median(r["ms_per_token"][str(batch)] for r in rs)
                                      for batch in batch_sizes},
                     "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs)}
              for side, rs in runs.items()}
    ratio = {"ms_per_token": {k: median["b"]["ms_per_token"][k] / median["a"]["ms_per_token"][k]
                              for k in median["a"]["ms_per_token"]},
             "peak_rss": median["b"]["peak_rss_bytes"] / median["a"]["peak_rss_bytes"]}
    return {"a": a, "b": b, "decoder": decoder, "tokens": tokens, "rounds": rounds, "runs": runs,
            "median": median, "ratio_b_over_a": ratio}


def markdown(result: dict) -> str:
    batches = list(result["median"]["a"]["ms_per_token"])
    lines = [f"| {result['decoder']}, decoder alone | " + " | ".join(f"batch {b}" for b in batches)
             + " | process peak RSS |", "|---|" + "--:|" * (len(batches) + 1)]
    for side in ("a", "b"):
        row = result["median"][side]
        lines.append(f"| {side.upper()}: `{result[side]}` | " + " | ".join(
            f"{row['ms_per_token'][b]:.1f} ms" for b in batches) + f" | {row['peak_rss_bytes'] / 2**30:.2f} GiB |")
    ratio = result["ratio_b_over_a"]
    lines.append("| B / A | " + " | ".join(f"{ratio['ms_per_token'][b]:.2f}" for b in batches)
                 + f" | {ratio['peak_rss']:.2f} |")
    return "\n".join(lines) + f"\n\nMedians of {result['rounds']} interleaved rounds, {result['tokens']} tokens."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_ab", description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="*", metavar="ARTIFACT", help="A and B.")
    p.add_argument("--decoder", default="ort-int4")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="Timed runs per batch size in each process (median).")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one process's measurement, written to --out
    args = p.parse_args(argv)
    if args.child:
        result = measure(args.child, args.decoder, args.batch_sizes, args.tokens, args.repeats)
        args.out.write_text(json.dumps(result), encoding="utf-8")
        return 0
    if len(args.artifacts) != 2 or args.rounds < 1 or args.tokens < 1 or min(args.batch_sizes) < 1:
        p.error("give two artifacts, A and B; rounds, tokens and batch sizes >= 1")
    try:
        result = compare(*args.artifacts, args.decoder, args.batch_sizes, args.rounds, args.tokens, args.repeats)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
