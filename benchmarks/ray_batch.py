"""``batch --ray`` against local ``batch`` on one machine: pairs per second, Ray's start-up and per-pair cost.

    python -m benchmarks.ray_batch --pairs 2000 --rounds 2 --out benchmarks/results/ray-batch-cpu

Each run is the command a user types, in a fresh process, timed from start to exit (cluster start-up,
model loads and writing the records included), on synthetic pairs in two mirrored folders (the
embedded model's world; generated once into ``--data``). Scenarios: local ``batch`` and ``--ray
local`` with 1 worker, each with ONNX Runtime's default threads and with ``--threads T``; 2 workers
of T threads each (so that they share the machine instead of each taking all of it); and one GPU
worker when the machine has a GPU. Each Ray scenario is compared with the local run of the same
threads per process (its baseline), and with plain local ``batch``. They run interleaved, round
after round, so that drift and other load on the machine weigh on all alike; figures are medians
over rounds.

Ray's overheads come from the same runs at two sizes: start-up is ``wall(Ray, small) -
wall(baseline, small)`` on ``--small`` pairs (a new cluster, the actor pool, Ray Data's planning),
and the per-pair overhead is the difference of the marginal costs, ``(wall(N) - wall(small)) / (N -
small)``, between Ray and its baseline. Every run's captions are compared with the local run's.

Outputs: ``OUT/results.json`` (every wall time, the machine, the load average before and after) and
``OUT/results.md``; the figures are also printed. Exit code 1 when a run failed or a caption differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import describe, machine_info


def make_pairs(folder: Path, n: int) -> Path:
    """``n`` synthetic test pairs as ``folder/before/NNNNN.png`` and ``folder/after/NNNNN.png`` (kept once made)."""
    from idc_lite.tools.synth import generate_pair

    marker = folder / f".complete-{n}"
    if not marker.exists():
        for i in range(n):
            pair = generate_pair(i, 0, "test")
            for side, image in (("before", pair.before), ("after", pair.after)):
                (folder / side).mkdir(parents=True, exist_ok=True)
                image.save(folder / side / f"{i:05d}.png")
        marker.touch()
    return folder


def scenarios(threads: int, gpu: bool) -> dict[str, tuple[list[str], str]]:
    """Extra ``batch`` arguments of each scenario, and the local scenario it is compared with."""
    t = ["--threads", str(threads)]
    runs = {
        "local": ([], "local"),
        f"local, {threads} threads": (t, f"local, {threads} threads"),
        "ray, 1 worker": (["--ray", "local", "--workers", "1"], "local"),
        f"ray, 1 worker, {threads} threads": (["--ray", "local", "--workers", "1", *t], f"local, {threads} threads"),
        f"ray, 2 workers x {threads} threads": (["--ray", "local", "--workers", "2", *t], f"local, {threads} threads"),
    }
    if gpu:
        runs["local, GPU"] = (["--device", "cuda"], "local, GPU")
        runs["ray, 1 GPU worker"] = (["--ray", "local", "--gpus-per-worker", "1", "--device", "cuda"], "local, GPU")
    return runs


def timed_batch(data: Path, pairs: int, extra: list[str], out: Path, batch_size: int) -> tuple[float, dict]:
    """Wall seconds of one ``idc-lite batch`` over the first ``pairs`` pairs, and its captions by id."""
    view = out.parent / f"view-{pairs}"
    if not view.exists():  # a folder pair with the first `pairs` images, as links
        for side in ("before", "after"):
            (view / side).mkdir(parents=True)
            for i in range(pairs):
                (view / side / f"{i:05d}.png").symlink_to((data / side / f"{i:05d}.png").resolve())
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "idc_lite", "batch", str(view / "before"), str(view / "after"), "-o", str(out),
            "--batch-size", str(batch_size), *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    captions = {r["id"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    if len(captions) != pairs:
        raise RuntimeError(f"{out}: {len(captions)} records for {pairs} pairs")
    return wall, captions


def gpu_available() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def run(args) -> dict:
    data = make_pairs(args.data, args.pairs)
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    runs = scenarios(args.threads, gpu_available() if args.gpu is None else args.gpu)
    walls: dict[str, dict[int, list[float]]] = {name: {args.small: [], args.pairs: []} for name in runs}
    differing: dict[str, int] = {name: 0 for name in runs}
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for size in (args.small, args.pairs):
            reference = None
            for index, (name, (extra, _)) in enumerate(runs.items()):
                wall, captions = timed_batch(data, size, extra, work / f"{index}.jsonl", args.batch_size)
                walls[name][size].append(wall)
                reference = captions if reference is None else reference
                differing[name] += sum(1 for key, caption in captions.items() if caption != reference[key])
                print(f"round {round_ + 1}, {size} pairs, {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    from importlib.metadata import version

    report = {"machine": machine_info(), "ray": version("ray"), "pairs": args.pairs, "small": args.small, "rounds": args.rounds,
              "batch_size": args.batch_size, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "walls_s": walls, "captions_differing_from_local": differing, "figures": {}}
    def medians(name):
        small, big = (statistics.median(walls[name][s]) for s in (args.small, args.pairs))
        return small, big, (big - small) / (args.pairs - args.small)

    for name, (_, baseline) in runs.items():
        small, big, marginal = medians(name)
        base_small, base_big, base_marginal = medians(baseline)
        report["figures"][name] = {
            "baseline": baseline, "wall_s": big, "pairs_per_s": args.pairs / big,
            "vs_local_throughput": medians("local")[1] / big, "vs_baseline_throughput": base_big / big,
            "steady_pairs_per_s": 1 / marginal, "startup_overhead_s": small - base_small,
            "per_pair_overhead_ms": (marginal - base_marginal) * 1000,
        }
    return report


def markdown(report: dict) -> str:
    lines = [f"Machine: {describe(report['machine'])}; load average before / after: "
             f"{report['load_average_before'][0]:.1f} / {report['load_average_after'][0]:.1f}. "
             f"{report['pairs']} pairs, batch {report['batch_size']}, median of {report['rounds']} rounds.", "",
             "| run | wall s | pairs/s | throughput / local | / baseline | steady pairs/s | start-up overhead s "
             "| per-pair overhead ms | captions unlike local |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, f in report["figures"].items():
        own = f["baseline"] == name
        lines.append(f"| {name} | {f['wall_s']:.1f} | {f['pairs_per_s']:.1f} | {f['vs_local_throughput']:.2f} | "
                     f"{'' if own else format(f['vs_baseline_throughput'], '.2f')} | {f['steady_pairs_per_s']:.1f} | "
                     f"{'' if own else format(f['startup_overhead_s'], '.1f')} | "
                     f"{'' if own else format(f['per_pair_overhead_ms'], '.2f')} | "
                     f"{report['captions_differing_from_local'][name]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_batch", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000, help="Pairs per large run (default 2000).")
    p.add_argument("--small", type=int, default=16, help="Pairs per small run, which measures start-up (default 16).")
    p.add_argument("--rounds", type=int, default=1, help="Interleaved rounds; figures are medians (default 1).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="ONNX Runtime threads per process in the --threads scenarios (default: half the cores).")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="Also one GPU worker (default: when ONNX Runtime has CUDA).")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IDC_LITE_CACHE", Path.home() / ".cache/idc-lite"))
                   / "bench" / "ray-pairs", help="Where the synthetic pairs are generated, once.")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results") / f"ray-batch-{time.strftime('%Y%m%d-%H%M%S')}")
    args = p.parse_args(argv)
    if not 0 < args.small < args.pairs:
        p.error("--small must be at least 1 and below --pairs")
    try:
        report = run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shutil.rmtree(args.out / "runs", ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(report["captions_differing_from_local"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
