"""What a benchmark measures: an artifact and, when it can be found, the reference it was built from.

- ``--artifact DIR`` (default: the embedded demo model): the reference is the one the artifact ships
  (``reference/base`` + ``reference/adapter``, built with ``--ship-reference``), checked file by file
  against the manifest, so that a fresh clone compares offline. Without one, or with ``--reference``
  or ``--reference-adapter`` given, it is the base model and the LoRA adapter named in the manifest's
  provenance: the base must still be a local directory, and the adapter is the one given with
  ``--reference-adapter``, the recorded path, or a folder of its name near the base (the demo
  recipe's layout, ``runs/demo/stage1/best`` + ``runs/demo/stage2/best``), whose hash must match.
- ``--config NAME|FILE`` (``blip2-opt-2.7b``: the real shapes) or ``--tiny``: a random-weight model,
  built by :mod:`benchmarks.build` in one process per stage and cached under
  ``<cache>/<name>-<hash>/`` (``model/`` in fp16, ``artifact-<decoders>/``, ``build.json`` with each
  stage's time and peak memory), so that later runs start at once. Its reference is that model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from idc_lite.errors import IdcError

from .processes import run_child

#: Bump when :mod:`benchmarks.build` changes what it writes: cached builds are then rebuilt.
BUILD_VERSION = 6  # 3: external-data weights; 4: no zero vision model; 5: tokenizer check; 6: MatMul layers
#: Bump when the export changes what an artifact holds but not the model: cached artifacts are then
#: rebuilt from the cached model. 2: ort-int4's large LM heads in int8; 3: a wide ort-int4 in blocks of 128;
#: 4: beside an int8 head, the embedding table stored by rows.
ARTIFACT_LAYOUT = 4
logger = logging.getLogger("benchmarks")
#: Decoders exported into a random model's artifact unless ``--decoders`` says otherwise.
DEFAULT_DECODERS = ("bnb-int4", "ort-int4")


@dataclass(frozen=True)
class Subject:
    """An artifact to measure and its reference (``reference_model`` None when unavailable, and why)."""

    name: str
    artifact: Path
    reference_model: Path | None
    reference_adapter: Path | None = None
    reference_note: str | None = None
    config: Path | None = None  # the BLIP-2 config.json, for the memory table
    random_weights: bool = False
    build: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "artifact": str(self.artifact),
                "reference_model": _str(self.reference_model), "reference_adapter": _str(self.reference_adapter),
                "reference_note": self.reference_note, "config": _str(self.config),
                "random_weights": self.random_weights, "build": self.build}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def default_cache_dir() -> Path:
    """``$IDC_LITE_CACHE/bench``, else ``~/.cache/idc-lite/bench``."""
    return Path(os.environ.get("IDC_LITE_CACHE") or Path.home() / ".cache" / "idc-lite") / "bench"


# --------------------------------------------------------------------------------- artifacts
def artifact_subject(artifact: Path | None, reference: Path | None = None, adapter: Path | None = None) -> Subject:
    """The artifact (default: the embedded demo) and its reference: the one it ships, unless
    ``reference`` or ``adapter`` is given, else the one its manifest's provenance points to."""
    from idc_lite.artifact import load_manifest

    if artifact is None:
        from idc_lite.default_model import EMBEDDED_DIR

        if not (EMBEDDED_DIR / "manifest.json").is_file():
            raise IdcError(EMBEDDED_DIR, "this install has no embedded demo model; pass --artifact DIR, "
                           "--config blip2-opt-2.7b or --tiny")
        artifact = EMBEDDED_DIR
    manifest = load_manifest(artifact)  # every file checked, the shipped reference's too
    artifact = manifest.path.resolve()
    if reference is None and adapter is None and manifest.reference is not None:
        base, shipped = manifest.reference_dirs()
        return Subject(manifest.name, artifact, base.resolve(), None if shipped is None else shipped.resolve(),
                       config=base.resolve() / "config.json")
    provenance = manifest.data.get("provenance") or {}
    base_id = (provenance.get("base") or {}).get("id")
    model = reference or (Path(base_id).expanduser() if base_id else None)
    if model is None or not (model / "config.json").is_file():
        where = f"base {base_id!r} is not a local model directory here" if base_id else "manifest records no local base"
        note = (f"the artifact ships no reference (python -m export build --ship-reference) and its {where}; "
                "pass --reference DIR" if reference is None else f"--reference {reference} holds no config.json")
        return Subject(manifest.name, artifact, None, reference_note=note)
    model, recorded = model.resolve(), provenance.get("adapter")
    found, note = (None, None) if recorded is None else find_reference_adapter(recorded, model, adapter)
    if recorded is not None and found is None:
        return Subject(manifest.name, artifact, None, reference_note=note, config=model / "config.json")
    return Subject(manifest.name, artifact, model, found, config=model / "config.json")


def find_reference_adapter(recorded: dict, base: Path, given: Path | None) -> tuple[Path | None, str | None]:
    """The adapter whose weights have the recorded sha256: ``given``, or a folder named like it near ``base``."""
    from idc_lite.adapters import find_adapter

    if given is not None:
        candidates = [given]
    else:
        roots = [base.parent, base.parent.parent]
        candidates = [Path(recorded["path"])] if recorded.get("path") else []
        candidates += [p.parent for root in roots for pattern in (f"{recorded['name']}", f"*/{recorded['name']}")
                      for p in root.glob(f"{pattern}/adapter_config.json")]
    for candidate in candidates:
        try:
            if find_adapter(candidate).sha256() == recorded["sha256"]:
                return candidate.resolve(), None
        except IdcError:
            continue
    where = f"--reference-adapter {given}" if given else f"folders named {recorded['name']!r} near {base}"
    return None, (f"the artifact was built with adapter {recorded['name']!r} (sha256 {recorded['sha256'][:12]}...), "
                  f"not found in {where}; pass --reference-adapter DIR")


# ----------------------------------------------------------------------------- random models
def random_subject(
    config: Path | None, cache: Path, logs: Path, *, decoders=DEFAULT_DECODERS, depth_scale: float = 1.0,
    seed: int = 0, rebuild: bool = False, encoder_precision: str = "fp32", ort_block_size: int | None = None,
    ort_symmetric: bool = False, ort_head: str | None = None,
) -> Subject:
    """A random-weight model for ``config`` (None: tiny) and its artifact, built unless cached."""
    from idc_lite.artifact import TORCH_DECODERS

    if sum(d in TORCH_DECODERS for d in decoders) > 1:
        raise IdcError(None, f"an artifact holds at most one torch decoder ({', '.join(TORCH_DECODERS)}), "
                       f"not {', '.join(d for d in decoders if d in TORCH_DECODERS)}")
    label = "tiny" if config is None else config.stem
    if depth_scale != 1.0:
        label += f"-depth{depth_scale:g}"
    recipe = {"builder": BUILD_VERSION, "seed": seed, "depth_scale": depth_scale,
              "config": None if config is None else json.loads(config.read_text(encoding="utf-8"))}
    root = cache / f"{label}-{hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]}"
    encoder = "" if encoder_precision == "fp32" else f"-encoder-{encoder_precision}"
    ort = (("" if ort_block_size is None else f"-block{ort_block_size}") + ("-symmetric" if ort_symmetric else "")
           + ("" if ort_head is None else f"-head-{ort_head}"))
    layout = "" if ARTIFACT_LAYOUT == 1 else f"-layout{ARTIFACT_LAYOUT}"
    model, artifact = root / "model", root / f"artifact-{'+'.join(decoders)}{encoder}{ort}{layout}"
    with _build_lock(root):
        return _build(root, model, artifact, label, config, decoders, depth_scale, seed, rebuild, encoder_precision,
                      ort_block_size, ort_symmetric, ort_head, logs)


@contextmanager
def _build_lock(root: Path):
    """Hold ``<root>.lock`` while building ``root``: a second benchmark on the same cache waits for
    the first one's build and then uses it, instead of building it again over the first's files.
    (No lock where ``fcntl`` is missing: Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building %s", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(root: Path, model: Path, artifact: Path, label: str, config, decoders, depth_scale, seed, rebuild,
           encoder_precision, ort_block_size, ort_symmetric, ort_head, logs: Path) -> Subject:
    record_path = root / "build.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() and not rebuild else {}
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    def stage(name: str, key: str, args: list) -> None:
        log = logs / f"build-{key}.log"
        logger.info("building the random %s for %s (once; cached in %s, log %s)", key, label, root, log)
        run = run_child("benchmarks.build", [name, *args], log, echo=f"  [{key}] ")
        if not run.ok:
            raise IdcError(root, f"building the random model failed at stage {key!r}: {run.why()}")
        logger.info("built the random %s in %.0f s", key, run.wall_s)
        record[key] = {"wall_s": round(run.wall_s, 2), "peak_rss_bytes": run.peak_rss_bytes}
        record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")

    if not (model / "config.json").is_file():
        partial = model.with_name("model.partial")
        shutil.rmtree(partial, ignore_errors=True)
        args = ["--model", partial, "--seed", seed, "--depth-scale", depth_scale]
        stage("model", "model", args + (["--config", config] if config is not None else []))
        partial.rename(model)
    if not (artifact / "manifest.json").is_file():
        stage("artifact", "artifact", ["--model", model, "--out", artifact, "--name", f"{label}-random",
                                       "--encoder-precision", encoder_precision,
                                       *[arg for decoder in decoders for arg in ("--decoder", decoder)],
                                       *(["--ort-block-size", ort_block_size] if ort_block_size else []),
                                       *(["--ort-symmetric"] if ort_symmetric else []),
                                       *(["--ort-head", ort_head] if ort_head else [])])
    return Subject(f"{label} (random weights)", artifact, model, config=model / "config.json", random_weights=True,
                   build={"cache": str(root), "stages": record})
