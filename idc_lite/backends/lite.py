"""The lite backend: an artifact's ONNX encoder under ONNX Runtime, then its compact OPT decoder.

The encoder (ViT + Q-Former + projection) runs as one ONNX graph (CUDA execution provider when the
device is a GPU, else CPU). Its query embeddings, followed by the embedded prefix (BOS, and the prompt
if any), are the decoder's input. A torch decoder (``bnb-int4``, ``torch-fp16/32``) then generates with
transformers exactly as the reference backend's language model does (same prefix, stopping rule and
settings); an ONNX Runtime decoder (``ort-int4``, ``ort-int4-fp16``, ``ort-fp32``) reproduces that
generation token for token with its own loop (:mod:`idc_lite.backends.ort_decoder`). On a CPU that
path imports neither torch nor transformers (:mod:`idc_lite.tokenizer`).

Default decoder per device (:data:`DEFAULT_DECODERS`, the first one the artifact holds): on CUDA
``ort-int4-fp16`` (int4 weights, fp16 activations and cache, built with ``--decoder ort-int4-fp16``),
then ``ort-int4`` (fp32 activations), on CPU ``ort-int4``; bitsandbytes' ``bnb-int4`` next. On CPU,
bitsandbytes' NF4 kernels run a 2560x10240 layer ~6x slower than fp32 (issue 7) while ONNX Runtime's
MatMulNBits int4 runs OPT-2.7B shaped MatMuls ~4.6x faster than fp32 (``export/ort_decoder.py``);
decode time per token measured with ``benchmarks/decoder_speed.py`` in one run on a 2-core AMD EPYC, at
OPT-2.7B width with 2 layers and the full vocabulary: ort-int4 3.5x faster than torch-fp32 and 4.2x
faster than bnb-int4. On CUDA (one NVIDIA H200, ``benchmarks/results/demo-cuda-h200.md``, one run):
ort-int4 decodes the demo model in 1.1 ms per token against bnb-int4's 5.0, end to end 43 against 78 ms
per pair at batch 1; at OPT-2.7B widths (quarter depth, ``blip2-opt-2.7b-depth0.25-cuda-h200.md``)
ort-int4 took 1.9 ms per token at batch 1 where the fp16 reference took 3.2 (3.8 against 3.1 at batch
8), while bnb-int4 at full depth took 18.0 against 11.5 (``blip2-opt-2.7b-bnb-int4-cuda-h200.md``).
With fp16 activations (``ort-int4-fp16``) at full depth: 7.0 / 9.4 / 15.4 ms per token at batch 1 / 8 /
32 against the fp16 reference's 12.3 / 12.0 / 11.6 (``blip2-opt-2.7b-cuda-h200.md``, one run). The int4
decoders come before the fp16/fp32 ones, whose memory misses the lite targets.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from ..artifact import load_manifest
from ..decoding import generate_kwargs, inputs_embeds, prefix_ids
from ..errors import AdapterError, ArtifactError
from ..runtime import resolve_device
from ..settings import GenerationSettings
from ..tokenizer import load_artifact_tokenizer
from .ort_decoder import ORT_DECODERS, load_ort_decoder
from .torch_decoder import TORCH_DECODERS, load_torch_decoder

logger = logging.getLogger("idc_lite")

#: Decoder chosen when none is asked for, by device, first present wins.
DEFAULT_DECODERS = {
    "cuda": ("ort-int4-fp16", "ort-int4", "bnb-int4", "torch-fp16", "torch-fp32", "ort-fp32"),
    "cpu": ("ort-int4", "bnb-int4", "ort-fp32", "torch-fp32", "torch-fp16", "ort-int4-fp16"),
}


def encoder_providers(device: str, providers: list[str] | None = None) -> list:
    """ONNX Runtime providers for ``device``: CUDA (on the device's GPU) then CPU, or CPU only."""
    if providers:
        return list(providers)
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index, **CUDA_OPTIONS}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


#: CUDA execution provider options: grow the memory arena by what is asked and pick cuDNN's convolution
#: algorithm by heuristics (the exhaustive search costs seconds at the first run, for the ViT's one patch
#: convolution). The arena setting by measurement (OPT-2.7B widths, quarter depth, one H200, GPU peak of
#: the lite process at batch 1 / 8 / 32): 1.78 / 2.13 / 3.73 GiB; ONNX Runtime's default (doubling)
#: 1.81 / 2.31 / 4.19; weights allocated outside the arena, the same as this; a small cuDNN workspace,
#: the same as the default.
CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"}


@functools.cache
def _preload_cuda_libraries() -> None:
    """Make the CUDA libraries of the pip ``nvidia-*`` packages (torch's) visible to ONNX Runtime (once)."""
    import importlib

    import onnxruntime as ort

    importlib.import_module("torch")  # loads libcudart, cuBLAS and cuDNN from those packages

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception:  # a partial preload is still fine: the session says below if CUDA is unusable
            pass


#: ONNX Runtime's CPU memory arena keeps every block it ever allocated and grows with each batch size
#: it sees; CPU sessions run without it (plain malloc, large blocks returned at once). Measured on
#: OPT-2.7B widths at a quarter of the depth (int8 encoder, ``ort-int4``; 2-core AMD EPYC), lite peak
#: RSS at batch 8, arena off / on: 2.14 and 2.27 / 2.63 and 2.63 GiB with the whole batch in one
#: encoder run; 2.03 / 2.08-2.09 (three runs each) with :data:`CPU_ENCODER_BATCH`. End-to-end time
#: per pair the same within this machine's noise (batch 8: 346-369 ms off, 325-343 on; batch 1:
#: 686-776 off, 678-722 on).
CPU_MEM_ARENA = False
#: Images per encoder run on a CPU: one at a time is both the fastest and the smallest there (same
#: model and machine, batch of 8, ms per pair / peak RSS: 1 image 126 / 1.61 GiB, 2: 141 / 1.65,
#: 4: 150 / 1.73, 8: 165 / 1.88). A GPU takes the whole batch in one run.
CPU_ENCODER_BATCH = 1
# Graph optimizations stay at ONNX Runtime's default, ALL: it is what makes MatMulNBits fast on a CPU.
# Quarter-depth OPT-2.7B ort-int4 decoder alone (2-core AMD EPYC, one run), ALL against EXTENDED: load
# 2.0 / 0.5 s, 0.99 / 0.53 GiB anonymous memory after loading, but 20 / 139 ms per token at batch 1
# and 167 / 311 at batch 32.


def open_session(path, device: str, providers: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session for ``path`` on ``device``."""
    import onnxruntime as ort

    # Its environment logger warns at every CUDA session ("No registered plugin EP device found",
    # onnxruntime 1.31); whether a session really runs on the GPU is said below. Set here, not with the
    # other libraries' quieting, so that paths without ONNX Runtime do not import it.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    chosen = encoder_providers(device, providers)
    wants_cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in chosen)
    if wants_cuda:
        _preload_cuda_libraries()
    else:
        options.enable_cpu_mem_arena = CPU_MEM_ARENA
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ArtifactError(path, f"ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})") from None
    if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
        why = ("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)" if not wants_cuda
               else "ONNX Runtime could not start its CUDA execution provider (CUDA or cuDNN libraries missing?)")
        logger.warning("%s: runs on the CPU, not %s: %s", Path(path).name, device, why)
    return session


class LiteBackend:
    name = "lite"

    def __init__(
        self, model: str | os.PathLike, adapter=None, *, device: str = "auto", decoder: str | None = None,
        providers: list[str] | None = None, threads: int | None = None,
    ):
        if adapter is not None:
            raise AdapterError(adapter, "an artifact already has its adapter merged in; export a new artifact "
                               "with `python -m export build --adapter` to use another")
        manifest = load_manifest(model)  # checks every file before any model is built
        self.manifest = manifest
        self.model_id = manifest.name
        self.model_dir = manifest.path
        provenance = manifest.data.get("provenance", {}).get("adapter") or {}
        self.adapter = provenance.get("name")
        self.tokens = manifest.tokens
        self.processor = manifest.processor
        self.composition = manifest.composition
        self.generation = manifest.generation
        self.device = resolve_device(device)
        self.decoder_name = self._choose_decoder(decoder)

        # No torch or transformers on the ONNX Runtime path (most of a CPU caption's start-up): the
        # tokenizer is the bare tokenizer.json where the export checked it (idc_lite/tokenizer.py).
        self.tokenizer = load_artifact_tokenizer(manifest.path, manifest.data.get("tokenizer"))
        self.session = open_session(manifest.file(manifest.encoder["file"]), self.device, providers, threads)
        self._encoder_on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        entry = manifest.decoders[self.decoder_name]
        if self.decoder_name in ORT_DECODERS:
            self.decoder = load_ort_decoder(manifest.file(entry["dir"]), entry, self.device, providers, threads)
        else:
            from ..runtime import quiet_libraries

            quiet_libraries()
            self.decoder = load_torch_decoder(manifest.file(entry["dir"]), self.decoder_name, self.device)

    def _choose_decoder(self, decoder: str | None) -> str:
        available = self.manifest.decoders
        if decoder is None:
            kind = "cuda" if self.device.startswith("cuda") else "cpu"
            decoder = next((d for d in DEFAULT_DECODERS[kind] if d in available), None)
            if decoder is None:
                raise ArtifactError(self.model_dir, f"no decoder runnable here; it holds {', '.join(available)}")
        elif decoder not in available:
            raise ArtifactError(self.model_dir, f"has no {decoder!r} decoder; it holds {', '.join(available)}")
        if decoder not in TORCH_DECODERS and decoder not in ORT_DECODERS:
            raise ArtifactError(self.model_dir, f"decoder {decoder!r} is not supported by this idc-lite")
        return decoder

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Query embeddings (batch, num_query_tokens, hidden) from the ONNX encoder."""
        name, output = self.manifest.encoder["input"], self.manifest.encoder["output"]
        step = CPU_ENCODER_BATCH if self._encoder_on_cpu else len(pixels)
        if len(pixels) <= step:
            return self.session.run([output], {name: pixels})[0]
        return np.concatenate([self.session.run([output], {name: pixels[start:start + step]})[0]
                               for start in range(0, len(pixels), step)])

    def generate(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        query = self.encode(np.ascontiguousarray(pixels, dtype=np.float32))
        prefix = prefix_ids(self.tokenizer, self.tokens, settings.prompt)
        if self.decoder_name in ORT_DECODERS:
            return self.decoder.generate(query, prefix, settings, self.tokens)
        import torch

        with torch.inference_mode():
            embeds = inputs_embeds(self.decoder, torch.from_numpy(query), prefix)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs(settings, self.tokens))
        return out.tolist()
