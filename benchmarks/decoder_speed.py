"""Decoder speed: milliseconds per generated token, and the memory-bandwidth floor it is measured against.

Decoding one token at batch 1 reads every weight of the decoder once, so its time cannot go below
``bytes of weights read per token / read bandwidth`` (:func:`bandwidth_floor_ms`). The bandwidth is
measured the way a decode step reads its weights (:func:`read_bandwidth_gbps`: a streaming read of a
buffer larger than the caches, by as many threads as the decoders use); an array copy, which reads
and writes, understates it, and a backend then decodes "faster than its floor". The runner checks
that no backend does (:func:`benchmarks.compare.floor_violations`). Issue 7's target is CPU decode
ms per token <= 1.5x that floor at OPT-2.7B shapes.

:func:`decoder_ms_per_token` times the decode steps alone (the prefill, once per caption, is left
out) for an artifact's ``torch-fp32`` / ``torch-fp16`` / ``bnb-int4`` decoder (transformers forward
with a ``DynamicCache``, greedy) or ``ort-int4`` / ``ort-fp32`` (the lite runtime's own step with
its cache kept in ONNX Runtime). Every run decodes a fixed number of tokens whatever they are (no
EOS stop), so all decoders are timed on the same context lengths. A library module: the benchmark
runner calls it; nothing here runs on import.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from idc_lite.artifact import ORT_DECODERS, TORCH_DECODERS, load_manifest

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def decode_threads() -> int:
    """The threads a CPU decoder computes with here: ONNX Runtime and torch use one per core they may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def read_bandwidth_gbps(size_bytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> float:
    """Host read bandwidth in GB/s: ``threads`` threads (default :func:`decode_threads`) each stream a
    disjoint part of a ``size_bytes`` buffer once (a sum over 64-bit words, which numpy runs without the
    GIL), best of ``repeats``. The buffer is far larger than any CPU cache, as OPT-2.7B's weights are."""
    words = np.ones(size_bytes // 8, dtype=np.uint64)  # written once: every page is resident before timing
    parts = np.array_split(words, threads or decode_threads())

    def read_all() -> None:
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    read_all()  # warm-up: thread start, page tables
    best = min(_timed(read_all) for _ in range(repeats))
    return words.nbytes / best / 1e9


def bandwidth_floor_ms(decoder_weight_bytes: int, gbps: float) -> float:
    """The least time one decode step can take: the decoder's weights read once at ``gbps`` (read bandwidth)."""
    return decoder_weight_bytes / (gbps * 1e9) * 1000


def decoder_weight_bytes(decoder_kind: str, artifact_dir) -> int:
    """Bytes of an artifact decoder's weights read per generated token.

    Everything but the embedding lookups, which read one row per token: the position table always,
    the token table too unless it doubles as the LM head (tied, as in OPT).
    """
    manifest = load_manifest(artifact_dir, verify=False)
    entry = _entry(manifest, decoder_kind)
    if decoder_kind in ORT_DECODERS:
        return _onnx_weight_bytes(manifest.decoder_graph(decoder_kind))
    from safetensors import safe_open

    total = 0
    for path in sorted(manifest.decoder_dir(decoder_kind).glob("*.safetensors")):
        with safe_open(str(path), "np") as weights:
            keys = list(weights.keys())
            untied = any(k.endswith("lm_head.weight") for k in keys)
            for key in keys:
                if "embed_positions" in key or (untied and "embed_tokens" in key):
                    continue
                info = weights.get_slice(key)
                total += int(np.prod(info.get_shape())) * _SAFETENSORS_BYTES[info.get_dtype()]
    return total


def initializer_bytes(init) -> int:
    """Bytes of an ONNX initializer's values (read from its dims and type: its data may be external)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return int(np.prod(init.dims)) * tensor_dtype_to_np_dtype(init.data_type).itemsize


def _onnx_weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    lookups = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
    other = {name for node in model.graph.node if node.op_type != "Gather" for name in node.input}
    total = 0
    for init in model.graph.initializer:
        if init.name in lookups and init.name not in other:
            continue  # a lookup table: one row per token
        total += initializer_bytes(init)
    return total


def decoder_ms_per_token(
    decoder_kind: str, artifact_dir, *, batch: int = 1, new_tokens: int = 32, repeats: int = 3,
    device: str = "cpu", threads: int | None = None, language_model=None, ort_decoder=None, seed: int = 0,
) -> float:
    """Median over ``repeats`` of the mean time of one decode step, in ms, after a prefill of the
    query embeddings (random, of the artifact's shape) + BOS, for ``batch`` rows and ``new_tokens`` steps.

    ``decoder_kind``: one of the artifact's decoders (``ort-int4``, ``bnb-int4``, ``torch-fp32``, ...).
    ``language_model``: an ``OPTForCausalLM`` already loaded, timed instead of the artifact's torch
    decoder (e.g. the fp32 reference when the artifact holds ``bnb-int4``); ``decoder_kind`` then
    only names it. ``ort_decoder``: likewise an :class:`~idc_lite.backends.ort_decoder.OrtDecoder`
    already loaded (a lite backend's ``decoder``), so that its session is not opened twice.
    ``threads`` sets the new ONNX Runtime session's intra-op threads, or torch's thread count.
    """
    manifest = load_manifest(artifact_dir, verify=False)
    tokens = manifest.tokens
    rng = np.random.default_rng(seed)
    prefix = [tokens.bos_token_id]
    if decoder_kind in ORT_DECODERS or ort_decoder is not None:
        decoder = ort_decoder
        if decoder is None:
            from idc_lite.decoders import load_decoder

            _entry(manifest, decoder_kind)
            decoder = load_decoder(manifest, decoder_kind, device, threads=threads)
        query = (rng.standard_normal((batch, tokens.num_query_tokens, decoder.hidden_size)) * 0.1).astype(np.float32)
        run = lambda: _ort_decode(decoder, query, prefix, new_tokens)  # noqa: E731
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if language_model is None:
            from idc_lite.decoders import load_decoder

            _entry(manifest, decoder_kind)
            language_model = load_decoder(manifest, decoder_kind, device)
        hidden = language_model.get_input_embeddings().weight.shape[1]
        query = (rng.standard_normal((batch, tokens.num_query_tokens, hidden)) * 0.1).astype(np.float32)
        run = lambda: _torch_decode(language_model, query, prefix, new_tokens, device)  # noqa: E731
    run()  # warm-up: allocations, kernel selection, caches
    return statistics.median(run() for _ in range(repeats))


def _entry(manifest, decoder_kind: str):
    if decoder_kind not in ORT_DECODERS and decoder_kind not in TORCH_DECODERS:
        raise ValueError(f"unknown decoder {decoder_kind!r}")
    if decoder_kind not in manifest.decoders:
        raise ValueError(f"{manifest.path} has no {decoder_kind} decoder; it holds {', '.join(manifest.decoders)}")
    return manifest.decoders[decoder_kind]


def _ort_decode(decoder, query: np.ndarray, prefix: list[int], steps: int) -> float:
    rows = query.shape[0]
    ids = np.tile(np.asarray(prefix, dtype=np.int64), (rows, 1))
    total = query.shape[1] + ids.shape[1]
    cache = decoder.new_cache(rows, total + steps)
    logits = decoder._step(query, ids, total, np.arange(rows), cache)
    keep = np.arange(rows)
    started = time.perf_counter()
    for _ in range(steps):
        total += 1
        logits = decoder._step(decoder._no_embeds(rows), logits.argmax(-1)[:, None], total, keep, cache)
    return (time.perf_counter() - started) * 1000 / steps


def _torch_decode(language_model, query: np.ndarray, prefix: list[int], steps: int, device: str) -> float:
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache

    from idc_lite.decoding import inputs_embeds

    cuda = device.startswith("cuda")
    # transformers >= 5.2x calls the cache argument ``cache`` (``past_key_values`` still works, with a warning).
    name = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        embeds = inputs_embeds(language_model, torch.from_numpy(query).to(device), prefix)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        cache = {name: DynamicCache()}
        out = language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
            out = language_model(input_ids=next_tokens, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000 / steps


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started
