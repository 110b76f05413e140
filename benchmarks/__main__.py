"""``python -m benchmarks``: latency, throughput, memory and quality of lite against the reference.

Only argparse and the standard library are imported before the arguments are parsed, so ``--help``
is instant; the run itself is :func:`benchmarks.runner.run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EPILOG = """\
examples:
  python -m benchmarks --tiny --batch-sizes 1 2 --repeats 1 --new-tokens 3      # smoke run, seconds
  python -m benchmarks --quality 100                                            # the demo and its reference
  python -m benchmarks --config blip2-opt-2.7b --batch-sizes 1 8 --repeats 2    # real shapes, random weights

Each backend runs in its own process. Outputs: OUT/results.json, results.md, results.png and
OUT/logs/. Exit code 1 when a backend failed (its error is in the report), 2 on bad arguments.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to measure (one of; default: the embedded demo artifact)")
    what.add_argument("--artifact", type=Path, help="An idc-lite artifact; its reference is the one it ships "
                      "(reference/), else found from its manifest.")
    what.add_argument("--config", help="Random weights at the shapes of a shipped config (blip2-opt-2.7b) or a "
                      "config.json; built, exported and cached once.")
    what.add_argument("--tiny", action="store_true", help="A tiny random model: a smoke run in seconds.")
    what.add_argument("--reference", type=Path, help="The artifact's base model directory, if it moved "
                      "(instead of the reference it ships).")
    what.add_argument("--reference-adapter", type=Path, help="The artifact's LoRA adapter folder (checked by sha256).")
    what.add_argument("--depth-scale", type=float, default=1.0,
                      help="With --config: keep the widths, scale every stack's number of layers (e.g. 0.25).")
    what.add_argument("--decoders", nargs="+", default=None, metavar="NAME",
                      help="With --config/--tiny: decoders to export (default: bnb-int4 ort-int4).")
    what.add_argument("--encoder-precision", choices=("fp32", "fp16", "int4", "int8"), default="fp32",
                      help="With --config/--tiny: the ONNX encoder's precision (fp16 or int4 for GPUs, int8 for CPUs).")
    what.add_argument("--ort-block-size", type=int, choices=(16, 32, 64, 128, 256), default=None,
                      help="With --config/--tiny: the int4 ONNX Runtime decoders' block size (default: the export's).")
    what.add_argument("--ort-symmetric", action="store_true",
                      help="With --config/--tiny: symmetric int4 blocks for the ONNX Runtime decoders.")
    what.add_argument("--ort-head", choices=("int8", "fp16"), default=None,
                      help="With --config/--tiny: ort-int4's LM head (default: int8 for large heads, as the export).")
    how = p.add_argument_group("how")
    how.add_argument("--backends", nargs="+", metavar="NAME",
                     help="Only these backends (e.g. reference-fp32-cpu lite-ort-int4-cpu); default: all.")
    how.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), help="Default: cuda (when present) and cpu.")
    how.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32], metavar="N")
    how.add_argument("--repeats", type=int, default=3, help="Timed runs per batch size (default 3).")
    how.add_argument("--warmup", type=int, default=1, help="Untimed runs first (default 1; at least 1 is run).")
    how.add_argument("--new-tokens", type=int, default=20, help="Exactly this many new tokens per pair (default 20).")
    how.add_argument("--quality", type=int, default=0, metavar="N",
                     help="Also caption N synthetic test pairs per backend and compare (default: off).")
    how.add_argument("--quality-batch-size", type=int, default=8)
    how.add_argument("--seed", type=int, default=0, help="Seed of random weights and of the synthetic pairs.")
    out = p.add_argument_group("where")
    out.add_argument("--out", type=Path, help="Output folder (default: benchmarks/results/<time>-<host>).")
    out.add_argument("--cache-dir", type=Path, help="Random models and data (default: $IDC_LITE_CACHE/bench or "
                     "~/.cache/idc-lite/bench).")
    out.add_argument("--rebuild", action="store_true", help="Rebuild a cached random model and artifact.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.new_tokens < 2 or args.quality < 0:
        parser().error("batch sizes and repeats must be >= 1, warmup and quality >= 0, new tokens >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from idc_lite.errors import IdcError

    from .models import DEFAULT_DECODERS, default_cache_dir
    from .runner import Options, run

    options = Options(
        artifact=args.artifact, config=args.config, tiny=args.tiny, reference=args.reference,
        reference_adapter=args.reference_adapter, depth_scale=args.depth_scale,
        decoders=tuple(args.decoders or DEFAULT_DECODERS), encoder_precision=args.encoder_precision,
        ort_block_size=args.ort_block_size, ort_symmetric=args.ort_symmetric, ort_head=args.ort_head,
        backends=tuple(args.backends) if args.backends else None,
        devices=tuple(args.devices) if args.devices else None, batch_sizes=tuple(sorted(set(args.batch_sizes))),
        repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens, quality=args.quality,
        quality_batch_size=args.quality_batch_size, out=args.out, cache_dir=args.cache_dir or default_cache_dir(),
        rebuild=args.rebuild, seed=args.seed,
    )
    try:
        out, code = run(options)
    except (IdcError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out / "results.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
