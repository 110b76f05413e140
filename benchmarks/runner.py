"""One benchmark run: resolve the models, measure each backend in its own process, compare, report.

The runner itself loads no model and imports no torch: it plans the backends, hands each to a
:mod:`benchmarks.measure` child with a spec file, reads the child's result file, then computes the
ratios, targets and quality retention from those results (:mod:`benchmarks.compare`) and writes
``results.json``, ``results.md`` and ``results.png`` (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from idc_lite.tools.memory import config_path

from . import compare, report
from .machine import machine_info, probe_gpu
from .models import DEFAULT_DECODERS, Subject, artifact_subject, default_cache_dir, random_subject
from .processes import run_child

logger = logging.getLogger("benchmarks")

#: Format of results.json; bump when a key changes meaning.
SCHEMA = 1
#: Where results go by default: benchmarks/results/<time>-<host>.
RESULTS = Path(__file__).resolve().parent / "results"
#: The seed paper's model: its memory table is always in the report (seed Table 4).
SEED_CONFIG = "blip2-opt-2.7b"


@dataclass
class Options:
    """What ``python -m benchmarks`` was asked for (see ``--help``)."""

    artifact: Path | None = None
    config: str | None = None
    tiny: bool = False
    reference: Path | None = None
    reference_adapter: Path | None = None
    depth_scale: float = 1.0
    decoders: tuple[str, ...] = DEFAULT_DECODERS
    encoder_precision: str = "fp32"
    ort_block_size: int | None = None
    ort_symmetric: bool = False
    ort_head: str | None = None
    backends: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 20
    quality: int = 0
    quality_batch_size: int = 8
    out: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    rebuild: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Planned:
    """One backend to measure."""

    name: str
    spec: dict


def plan(subject: Subject, devices: list[str], decoders: list[str]) -> list[Planned]:
    """The backends of a run: per device, the reference(s) then lite with each decoder of the artifact."""
    planned = []
    for device in devices:
        dtypes = ("fp16",) if device == "cuda" else ("fp32", "bf16")
        if subject.reference_model is not None:
            for dtype in dtypes:
                planned.append(Planned(f"reference-{dtype}-{device}", {
                    "kind": "reference", "device": device, "dtype": dtype, "model": str(subject.reference_model),
                    "adapter": None if subject.reference_adapter is None else str(subject.reference_adapter)}))
        for decoder in decoders:
            planned.append(Planned(f"lite-{decoder}-{device}", {"kind": "lite", "device": device, "decoder": decoder}))
    return planned


def size_on_disk(spec: dict, artifact: Path) -> int:
    """Bytes of the files a backend loads: the model (+ adapter) dir, or the artifact without other decoders
    (and without the reference it may ship)."""
    if spec["kind"] == "reference":
        dirs = [Path(spec["model"])] + ([Path(spec["adapter"])] if spec.get("adapter") else [])
        return sum(p.stat().st_size for d in dirs for p in d.rglob("*") if p.is_file())
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    others = [entry["dir"].rstrip("/") + "/" for name, entry in manifest["decoders"].items() if name != spec["decoder"]]
    shipped = manifest.get("reference") or {}
    others += [folder.rstrip("/") + "/" for folder in (shipped.get("base"), shipped.get("adapter")) if folder]
    return sum(info["size"] for path, info in manifest["files"].items() if not path.startswith(tuple(others)))


def resolve_subject(options: Options, logs: Path) -> Subject:
    if sum(bool(x) for x in (options.artifact, options.config, options.tiny)) > 1:
        raise ValueError("give one of --artifact, --config or --tiny")
    if options.config or options.tiny:
        return random_subject(None if options.tiny else config_path(options.config), options.cache_dir, logs,
                              decoders=options.decoders, depth_scale=options.depth_scale, seed=options.seed,
                              rebuild=options.rebuild, encoder_precision=options.encoder_precision,
                              ort_block_size=options.ort_block_size, ort_symmetric=options.ort_symmetric,
                              ort_head=options.ort_head)
    return artifact_subject(options.artifact, options.reference, options.reference_adapter)


def quality_dataset(cache: Path, n: int, seed: int) -> tuple[Path, dict[str, list[str]]]:
    """The first ``n`` pairs of the synthetic test split, written once into the cache."""
    from idc_lite.tools.datasets import read_jsonl
    from idc_lite.tools.synth import write_dataset

    folder = cache / f"synth-test-seed{seed}"
    path = folder / "test.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if len(records) < n:
        write_dataset(folder, n, seed=seed, split="test")
        records = read_jsonl(path)
    return path, {record.id: list(record.references) for record in records[:n]}


def memory_tables(subject: Subject) -> dict[str, dict]:
    """``idc_lite.tools.memory.memory_table`` for blip2-opt-2.7b (seed Table 4), and the subject's if its shapes differ.

    Called after every child has finished: it imports torch (meta device, no weights) in this process.
    """
    from idc_lite.tools.memory import memory_table

    tables = {SEED_CONFIG: memory_table(config_path(SEED_CONFIG))}
    if subject.config is not None:
        table = memory_table(subject.config)
        if table["params"] != tables[SEED_CONFIG]["params"]:
            tables[subject.name] = {**table, "model": subject.name}
    return tables


def measure_backend(planned: Planned, subject: Subject, options: Options, work: Path, quality: dict | None) -> dict:
    """Run one backend's child; its result, or why it has none."""
    spec = {"backend": planned.spec, "artifact": str(subject.artifact), "batch_sizes": sorted(options.batch_sizes),
            "repeats": options.repeats, "warmup": options.warmup, "new_tokens": options.new_tokens, "quality": quality}
    spec_path, result_path = work / f"{planned.name}.spec.json", work / f"{planned.name}.result.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    logger.info("measuring %s", planned.name)
    run = run_child("benchmarks.measure", [spec_path, result_path], work / f"{planned.name}.log")
    result = (json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file()
              else {"backend": planned.spec, "batches": [], "error": None})
    if not run.ok and not result.get("error"):
        result["error"] = f"the measuring process ended badly: {run.why()}"
    result.update(name=planned.name, process_wall_s=run.wall_s, process_peak_rss_bytes=run.peak_rss_bytes,
                  size_on_disk_bytes=size_on_disk(planned.spec, subject.artifact))
    return result


def run(options: Options) -> tuple[Path, int]:
    """Measure, compare and report; returns the output folder and the exit code (1 when a backend failed)."""
    from idc_lite.artifact import load_manifest

    from .decoder_speed import decode_threads, read_bandwidth_gbps

    started = time.strftime("%Y%m%d-%H%M%S")
    gpu = probe_gpu()
    machine = machine_info(gpu)
    out = options.out or RESULTS / f"{started}-{os.uname().nodename}"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    subject = resolve_subject(options, logs)
    decoders = list(load_manifest(subject.artifact, verify=False).decoders)
    devices = list(options.devices or (["cuda", "cpu"] if gpu.get("available") else ["cpu"]))
    if "cuda" in devices and not gpu.get("available"):
        raise ValueError(f"--devices cuda, but torch sees no CUDA GPU here ({gpu.get('error', 'none found')})")
    planned = plan(subject, devices, decoders)
    if options.backends:
        unknown = sorted(set(options.backends) - {p.name for p in planned})
        if unknown:
            raise ValueError(f"no backend {', '.join(unknown)} in this run; there are {', '.join(p.name for p in planned)}")
        planned = [p for p in planned if p.name in options.backends]

    quality_spec, references = None, {}
    if options.quality and subject.reference_model is not None:
        dataset, references = quality_dataset(options.cache_dir, options.quality, options.seed)
        quality_spec = {"dataset": str(dataset), "n": options.quality, "batch_size": options.quality_batch_size}
    bandwidth = read_bandwidth_gbps()  # before any child: the machine is as quiet as it gets

    backends = {p.name: measure_backend(p, subject, options, logs, quality_spec) for p in planned}
    ratio_rows = compare.ratios(backends)
    results = {
        "schema": SCHEMA,
        "created": started,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]]),
        "machine": machine,
        "settings": {"batch_sizes": sorted(options.batch_sizes), "repeats": options.repeats, "warmup": options.warmup,
                     "new_tokens": options.new_tokens, "devices": devices, "quality_pairs": options.quality},
        "subject": subject.to_dict(),
        "memory_bandwidth_gbps": bandwidth,
        "bandwidth_method": f"streaming read of 1 GiB by {decode_threads()} threads, best of 5",
        "backends": backends,
        "ratios": ratio_rows,
        "targets": compare.targets(backends, ratio_rows, bandwidth),
        "floor_violations": compare.floor_violations(backends, bandwidth),
        "quality": compare.quality(backends, references) if quality_spec else
        {"skipped": "not asked for (--quality N)" if not options.quality else subject.reference_note},
        "memory_tables": memory_tables(subject),
    }
    report.write_all(results, out)
    for row in results["floor_violations"]:
        logger.error("%s decoded at %.2fx its bandwidth floor: the floor is not a floor on this machine",
                     row["backend"], row["ratio"])
    failed = any(b.get("error") for b in backends.values()) or results["floor_violations"]
    return out, 1 if failed else 0
