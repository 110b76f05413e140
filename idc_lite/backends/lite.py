"""The lite backend: an artifact's ONNX encoder under ONNX Runtime, then its compact OPT decoder.

The encoder (ViT + Q-Former + projection) runs as one ONNX graph (CUDA execution provider when the
device is a GPU, else CPU). Its query embeddings, followed by the embedded prefix (BOS, and the
prompt if any), are the decoder's ``inputs_embeds``; the decoder then generates with transformers
exactly as the reference backend's language model does (same prefix, stopping rule and settings).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..artifact import load_manifest
from ..decoding import generate_kwargs, inputs_embeds, prefix_ids
from ..errors import AdapterError, ArtifactError
from ..runtime import resolve_device
from ..settings import GenerationSettings
from .torch_decoder import TORCH_DECODERS, load_torch_decoder

logger = logging.getLogger("idc_lite")

#: Decoder chosen when none is asked for, by device, first present wins.
DEFAULT_DECODERS = {"cuda": ("bnb-int4", "torch-fp16", "torch-fp32"), "cpu": ("bnb-int4", "torch-fp32", "torch-fp16")}


def encoder_providers(device: str, providers: list[str] | None = None) -> list:
    """ONNX Runtime providers for ``device``: CUDA (on the device's GPU) then CPU, or CPU only."""
    if providers:
        return list(providers)
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path, device: str, providers: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session for ``path`` on ``device``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=encoder_providers(device, providers))
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ArtifactError(path, f"ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]})") from None


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

        from ..runtime import quiet_libraries

        quiet_libraries()
        import torch

        from .reference import load_tokenizer

        self._torch = torch
        self.tokenizer = load_tokenizer(manifest.path)
        self.session = open_session(manifest.file(manifest.encoder["file"]), self.device, providers, threads)
        entry = manifest.decoders[self.decoder_name]
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
        if decoder not in TORCH_DECODERS:
            raise ArtifactError(self.model_dir, f"decoder {decoder!r} is not supported by this idc-lite")
        return decoder

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Query embeddings (batch, num_query_tokens, hidden) from the ONNX encoder."""
        return self.session.run([self.manifest.encoder["output"]], {self.manifest.encoder["input"]: pixels})[0]

    def generate(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        torch = self._torch
        query = torch.from_numpy(self.encode(np.ascontiguousarray(pixels, dtype=np.float32)))
        with torch.inference_mode():
            embeds = inputs_embeds(self.decoder, query, prefix_ids(self.tokenizer, self.tokens, settings.prompt))
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs(settings, self.tokens))
        return out.tolist()
