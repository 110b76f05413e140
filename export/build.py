"""``build``: base + adapter -> merged -> ONNX encoder + decoders -> artifact directory.

An artifact holds one or more decoders: at most one torch decoder (``bnb-int4``, ``torch-fp16`` or
``torch-fp32``, in ``decoder/``) and any of the ONNX Runtime ones (``ort-int4``, ``ort-fp32``, each
in its own folder). The default build holds ``bnb-int4`` (the decoder on CUDA) and ``ort-int4``
(the decoder on CPU).

Memory: each stage loads only its part of the model (:mod:`export.parts`): the encoder stage the
vision side, each decoder stage the language model. Only merging a LoRA adapter holds the whole
model (fp32), once; the merged weights are saved and the stages read them from disk. A big encoder
(ViT-g) is exported in a spawned process of its own, so that what its export leaves allocated is
gone before a language model loads (:data:`ENCODER_CHILD_PARAMETERS`).

The artifact is assembled in a new folder of an unpredictable name beside ``out``
(``<out>.partial-XXXXXXXX``) and renamed into place only when every step, its validation and the
manifest are done: an interrupted or failed build never leaves a half artifact under the real name. Before any weights are read, the disk must hold what the export surely writes
(:mod:`export.space`); a disk that fills up anyway is said as such.

``ship_reference`` also writes the base (fp16) and the adapter into the artifact, for its reference
backend to run offline (:mod:`export.reference`); ``provenance`` records a build by its recipe and
seed instead of the local paths it was built from (:func:`build_provenance`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from idc_lite import __version__
from idc_lite.adapters import adapter_summary, find_adapter
from idc_lite.artifact import DECODERS, ORT_DECODERS, TORCH_DECODERS, write_manifest
from idc_lite.tokenizer import load_tokenizer
from idc_lite.errors import first_line, require
from idc_lite.decoding import prefix_ids, token_settings
from idc_lite.loading import check_blip2_dir, is_hub_id, resolve_model_dir
from idc_lite.tools.memory import count_parameters, load_config, meta_model
from idc_lite.results_io import readable_by_umask
from idc_lite.runtime import quiet_libraries
from idc_lite.settings import CompositionSettings, GenerationSettings, ProcessorSettings, to_dict
from idc_lite.tokenizer import check_bare_tokenizer

from .errors import ExportError
from .space import check_free_space, disk_full_error, export_disk_need
from .parts import load_encoder_part, load_language_model

logger = logging.getLogger("export")

#: The decoders a ``decoder_precision`` builds when no decoder names are given.
DECODERS_BY_PRECISION = {"int4": ("bnb-int4", "ort-int4"), "fp16": ("torch-fp16",), "fp32": ("torch-fp32",)}


def require_export_extra() -> None:
    """One line naming the extra when what building an artifact needs is not installed."""
    for module in ("torch", "transformers", "onnx", "onnxscript"):
        require(module, "building an artifact", "export")


def decoder_names(decoder_precision: str | None = None, decoders=None) -> tuple[str, ...]:
    """The decoders to build: named ones, or those of ``decoder_precision`` (default int4)."""
    if decoders is not None and decoder_precision is not None:
        raise ExportError(None, "give decoder names or a decoder precision, not both")
    if decoders is None:
        precision = decoder_precision or "int4"
        if precision not in DECODERS_BY_PRECISION:
            raise ExportError(None, f"decoder precision must be one of {', '.join(DECODERS_BY_PRECISION)}, "
                              f"not {precision!r}")
        return DECODERS_BY_PRECISION[precision]
    names = tuple(dict.fromkeys(decoders))
    known = DECODERS
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ExportError(None, f"decoders must be among {', '.join(known)}, not {', '.join(unknown) or 'none'}")
    if sum(n in TORCH_DECODERS for n in names) > 1:
        raise ExportError(None, f"an artifact holds at most one torch decoder ({', '.join(TORCH_DECODERS)})")
    return names


def build_artifact(
    base: str, out: str | Path, adapter: str | Path | None = None, *, revision: str | None = None,
    encoder_precision: str = "fp32", decoder_precision: str | None = None, decoders=None, name: str | None = None,
    force: bool = False, local_files_only: bool = False, enforce_encoder_check: bool = True,
    ort_block_size: int | None = None, ort_symmetric: bool | None = None, ort_head: str | None = None,
    ship_reference: bool = False, provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Build an artifact from ``base`` (hub id or directory) and an optional LoRA ``adapter``.

    ``decoders`` names the decoders to build (e.g. ``("bnb-int4", "ort-int4")``); without it,
    ``decoder_precision`` picks them (:data:`DECODERS_BY_PRECISION`; int4 by default).
    ``ort_block_size`` and ``ort_symmetric`` set the int4 ONNX Runtime decoders' quantization
    (default: asymmetric blocks of 32, of 128 for a wide ``ort-int4``; ``export/ort_decoder.py``);
    ``ort_head`` the LM head's precision in ``ort-int4`` (``int8`` or ``fp16``; default: int8 for
    large heads, ``export/ort_decoder.py``).
    ``ship_reference`` ships the base in fp16 and the adapter in the artifact's ``reference/``
    (:mod:`export.reference`). ``provenance`` (e.g. ``{"recipe": "demo", "seed": 0}``) is recorded in
    the manifest's provenance in place of the local paths of the base and the adapter
    (:func:`build_provenance`).
    """
    require_export_extra()
    names = decoder_names(decoder_precision, decoders)
    check_provenance(provenance)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(out, "already exists; use --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # An unpredictable name, made by this process (never a folder or link planted under a known name).
    work = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))  # 0700 until it is complete
    started = time.perf_counter()

    try:
        _build_into(work, base, adapter, revision, local_files_only, encoder_precision, names, name or out.name,
                    enforce_encoder_check, _ort_quantization(ort_block_size, ort_symmetric, ort_head), ship_reference,
                    provenance)
    except BaseException as exc:
        full = disk_full_error(work.parent, exc)  # before cleaning up: the disk is still full
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work.with_name(work.name + ".merged"), ignore_errors=True)
        if full is not None:
            raise full from exc
        raise
    readable_by_umask(work)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    work.rename(out)
    logger.info("artifact written to %s in %.0f s", out, time.perf_counter() - started)
    return out


def _ort_quantization(block_size: int | None, symmetric: bool | None, head: str | None = None) -> dict:
    """Keyword arguments of ``export_ort_decoder`` for the given int4 settings (None: its default)."""
    chosen = {"block_size": block_size, "symmetric": symmetric, "head_precision": head}
    return {key: value for key, value in chosen.items() if value is not None}


def check_provenance(provenance: Mapping[str, Any] | None) -> None:
    """Refuse, before any work, a provenance override that would not make a manifest entry."""
    if provenance is None:
        return
    if not isinstance(provenance, Mapping) or not all(isinstance(key, str) for key in provenance):
        raise ExportError(None, "provenance must be a mapping of names to values, e.g. {'recipe': 'demo', 'seed': 0}")
    taken = sorted({"base", "adapter"} & set(provenance))
    if taken:
        raise ExportError(None, f"provenance may not set {' or '.join(map(repr, taken))}: the build records those")
    try:
        json.dumps(dict(provenance))
    except (TypeError, ValueError) as exc:
        raise ExportError(None, f"provenance is not JSON ({first_line(exc)})") from None


def build_provenance(base: str, revision: str | None, model_dir: Path, adapter, adapter_source,
                     override: Mapping[str, Any] | None = None) -> dict:
    """The manifest's ``provenance``: the base (id, revision, resolved commit) and the adapter's summary.

    With ``override`` (a recipe's name and seed), its entries come first and nothing local is
    recorded: a base given as a local directory loses its ``id`` (a hub id keeps it), the adapter its
    ``path``; the adapter's name, layout, r, lora_alpha and sha256 stay.
    """
    recorded_base = {"id": str(base), "revision": revision, "resolved": _resolved_commit(model_dir)}
    recorded_adapter = {**adapter_summary(adapter_source), "path": str(adapter)} if adapter_source else None
    if override is None:
        return {"base": recorded_base, "adapter": recorded_adapter}
    if not is_hub_id(str(base)) or Path(str(base)).expanduser().exists():
        del recorded_base["id"]
    if recorded_adapter is not None:
        del recorded_adapter["path"]
    return {**override, "base": recorded_base, "adapter": recorded_adapter}


def _build_into(work: Path, base, adapter, revision, local_files_only, encoder_precision, decoders, name,
                enforce_encoder_check: bool = True, ort_quantization: dict | None = None, ship_reference: bool = False,
                provenance: Mapping[str, Any] | None = None) -> None:
    import torch

    quiet_libraries()
    # The model's facts, read without loading any weights.
    model_dir = resolve_model_dir(base, revision, local_files_only)
    config = check_blip2_dir(model_dir)
    tokens = token_settings(config, str(model_dir / "config.json"))
    processor = ProcessorSettings.from_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    image_size = config["vision_config"].get("image_size", 224)
    if (processor.height, processor.width) != (image_size, image_size):
        raise ExportError(model_dir, f"processor size {processor.height}x{processor.width} "
                          f"differs from the vision model's {image_size}x{image_size}")
    adapter_source = find_adapter(adapter) if adapter else None
    meta = meta_model(load_config(model_dir))
    counts = count_parameters(meta)
    if "bnb-int4" in decoders:
        from .decoder import check_bnb_shapes

        check_bnb_shapes(meta.language_model)  # before any work: bitsandbytes fails late, with an assertion
    check_free_space(work.parent, export_disk_need(counts, encoder_precision, decoders, adapter_source is not None,
                                                   reference=ship_reference))
    weights_dir = model_dir
    if adapter_source is not None:
        weights_dir = work.with_name(work.name + ".merged")
        _merge(model_dir, adapter_source, weights_dir, str(base))

    big_encoder = counts.vision + counts.qformer > ENCODER_CHILD_PARAMETERS
    try:
        encoder, entries = _export_parts(weights_dir, work, encoder_precision, decoders, image_size,
                                         enforce_encoder_check, prefix_ids(tokenizer, tokens, None),
                                         ort_quantization or {}, encoder_in_child=big_encoder)
    finally:
        if weights_dir != model_dir:
            shutil.rmtree(weights_dir, ignore_errors=True)

    tokenizer.save_pretrained(work)
    bare_tokenizer = check_bare_tokenizer(tokenizer, work / "tokenizer.json")
    if bare_tokenizer["runtime"] != "tokenizers":
        logger.info("the runtime will load the tokenizer with transformers: %s", bare_tokenizer["why"])
    for extra in ("preprocessor_config.json",):
        if (model_dir / extra).is_file():
            shutil.copyfile(model_dir / extra, work / extra)
    reference = None
    if ship_reference:
        from .reference import write_reference

        reference = write_reference(model_dir, adapter_source, tokenizer, work)

    write_manifest(work, {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "built_with": {"idc_lite": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
                       "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                       "bitsandbytes": _version("bitsandbytes"), "python": platform.python_version()},
        "provenance": build_provenance(base, revision, model_dir, adapter, adapter_source, provenance),
        "composition": to_dict(CompositionSettings()),
        "generation": to_dict(GenerationSettings()),
        "processor": to_dict(processor),
        "tokens": to_dict(tokens),
        "tokenizer": bare_tokenizer,
        "encoder": encoder.as_dict(),
        **({"attention": encoder.attention} if encoder.attention else {}),
        **({"reference": reference} if reference else {}),
        "decoders": entries,
    })


#: Encoders with more parameters than this are exported in a process of their own (spawned): what the
#: encoder's export and quantization leave allocated, which ``gc.collect`` does not free, then goes
#: back to the system before the decoders load, instead of sitting under the fp32 language model's
#: export (``docs/design.md``, "Export memory"). Small encoders stay in-process: a spawned Python with
#: torch costs seconds.
ENCODER_CHILD_PARAMETERS = 50_000_000


def _export_parts(weights_dir: Path, work: Path, encoder_precision: str, decoders, image_size: int, enforce: bool,
                  prefix, ort_quantization: dict, encoder_in_child: bool = False):
    """Export the encoder, then each decoder, each from its own part of the weights."""
    import torch

    from .decoder import export_decoder
    from .ort_decoder import export_ort_decoder

    stage = (weights_dir, work, encoder_precision, image_size, enforce)
    encoder, query = _in_child(_encoder_stage, *stage) if encoder_in_child else _encoder_stage(*stage)
    query = torch.from_numpy(query)
    entries = {}
    for decoder in decoders:
        logger.info("exporting the %s decoder", decoder)
        language_model = load_language_model(weights_dir)
        if decoder in TORCH_DECODERS:
            got, entry = export_decoder(language_model, work, TORCH_DECODERS[decoder], query, prefix)
        else:
            # The head's precision is ort-int4's choice alone (ort-int4-fp16 keeps its fp16 head).
            options = {k: v for k, v in ort_quantization.items() if k != "head_precision" or decoder == "ort-int4"}
            got, entry = export_ort_decoder(language_model, work, ORT_DECODERS[decoder], query, prefix, **options)
        entries[got] = entry
        del language_model
    return encoder, entries


def _encoder_stage(weights_dir: Path, work: Path, encoder_precision: str, image_size: int, enforce: bool):
    """Export the encoder; return its report and its query embeddings of a sample pair (the decoders' check input)."""
    import torch

    from .attention import export_attention
    from .encoder import QueryEncoder, export_encoder, sample_inputs

    logger.info("exporting the encoder")
    net = load_encoder_part(weights_dir)
    encoder = export_encoder(net, work, encoder_precision, image_size, enforce)
    attention = export_attention(net.vision_model, work, encoder_precision, image_size, enforce)
    encoder = replace(encoder, attention=attention)
    with torch.inference_mode():
        query = QueryEncoder(net).eval()(torch.from_numpy(sample_inputs(image_size, seed=2)[1]))
    return encoder, query.numpy()


def _in_child(function, *args):
    """``function(*args)`` in a spawned process, its log lines shown as this process shows them; its
    exceptions are raised here, and a process that dies is an :class:`ExportError`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    shown = logger.handlers and logger.getEffectiveLevel() <= logging.INFO
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_setup,
                                 initargs=(bool(shown),)) as pool:
            return pool.submit(function, *args).result()
    except BrokenProcessPool:
        raise ExportError(None, f"the process running {function.__name__.strip('_').replace('_', ' ')} ended "
                          "abruptly (killed: out of memory?)") from None


def _child_setup(show_progress: bool) -> None:
    quiet_libraries()
    if show_progress:
        log_to_stderr()


#: The loggers whose messages ``python -m export`` shows.
SHOWN_LOGGERS = ("export", "idc_lite")


def log_to_stderr() -> logging.Handler:
    """Progress as ``python -m export`` shows it: one line per message of idc-lite's loggers, on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in SHOWN_LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        # ONNX Runtime's MatMulNBits quantizer calls logging.basicConfig() when imported: without this
        # every line would be printed twice, once more through the root logger.
        logging.getLogger(name).propagate = False
    return handler


@contextlib.contextmanager
def stderr_logging():
    """:func:`log_to_stderr` for the duration of a command; the loggers are then as they were.

    A caller that goes on after the command (a test, a notebook) keeps its own logging: no handler
    is left on a stream that may be closed by then, and the messages reach the root logger again.
    """
    loggers = [logging.getLogger(name) for name in SHOWN_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    handler = log_to_stderr()
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _merge(model_dir: Path, adapter, out: Path, model_name: str) -> None:
    """Merge ``adapter`` into the fp32 base and save the merged weights (the one step holding the whole model)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from idc_lite.adapters import apply_adapter

    logger.info("merging the adapter %s into %s (fp32)", adapter.name, model_name)
    try:
        net = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExportError(model_dir, f"cannot load the model ({first_line(exc)})") from None
    shutil.rmtree(out, ignore_errors=True)
    apply_adapter(net, adapter, model_name, merge=True).save_pretrained(out)


def _resolved_commit(model_dir: Path) -> str | None:
    """The commit of a hub snapshot (``.../snapshots/<commit>``), None for a plain directory."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for candidate in (package, f"{package}-gpu"):
        try:
            return version(candidate)
        except PackageNotFoundError:
            continue
    return None
