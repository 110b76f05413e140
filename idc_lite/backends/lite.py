"""The lite backend: an artifact's ONNX encoder under ONNX Runtime, then its compact OPT decoder.

The encoder (ViT + Q-Former + projection) runs as one ONNX graph (CUDA execution provider when the
device is a GPU, else CPU). Its query embeddings, followed by the embedded prefix (BOS, and the prompt
if any), are the decoder's input. An ONNX Runtime decoder (``ort-int4``, ``ort-int4-fp16``,
``ort-fp32``) reproduces transformers' generation token for token with its own loop
(:mod:`idc_lite.backends.ort_decoder`); on a CPU that path imports neither torch nor transformers
(:mod:`idc_lite.tokenizer`). A torch decoder (``bnb-int4``, ``torch-fp16/32``, the ``reference``
extra) generates with transformers exactly as the reference backend's language model does.

Default decoder per device (:data:`DEFAULT_DECODERS`, the first one the artifact holds): the int4
ONNX Runtime decoders first (fp16 activations on CUDA), bitsandbytes' ``bnb-int4`` next, the fp16 /
fp32 decoders, whose memory misses the lite targets, last. Why, measured: ``docs/design.md``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..artifact import ORT_DECODERS, TORCH_DECODERS, load_manifest
from ..decoding import generate_kwargs, inputs_embeds, prefix_ids
from ..errors import AdapterError, ArtifactError, require
from ..runtime import resolve_device
from ..settings import GenerationSettings
from ..tokenizer import load_artifact_tokenizer
from .ort_decoder import load_ort_decoder
from .sessions import open_session

logger = logging.getLogger("idc_lite")

#: Decoder chosen when none is asked for, by device, first present wins.
DEFAULT_DECODERS = {
    "cuda": ("ort-int4-fp16", "ort-int4", "bnb-int4", "torch-fp16", "torch-fp32", "ort-fp32"),
    "cpu": ("ort-int4", "bnb-int4", "ort-fp32", "torch-fp32", "torch-fp16", "ort-int4-fp16"),
}


#: Images per encoder run on a CPU: one at a time was both the fastest and the smallest there
#: (``docs/design.md``). A GPU takes the whole batch in one run.
CPU_ENCODER_BATCH = 1

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
        self.adapter = manifest.adapter_name
        self.tokens = manifest.tokens
        self.processor = manifest.processor
        self.composition = manifest.composition
        self.generation = manifest.generation
        self.device = resolve_device(device)
        self.decoder_name = self._choose_decoder(decoder)

        # No torch or transformers on the ONNX Runtime path (most of a CPU caption's start-up): the
        # tokenizer is the bare tokenizer.json where the export checked it (idc_lite/tokenizer.py).
        self.tokenizer = load_artifact_tokenizer(manifest.path, manifest.tokenizer)
        self.session = open_session(manifest.file(manifest.encoder.file), self.device, providers, threads)
        self._encoder_on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self._attention_session, self._session_options = None, (providers, threads)  # opened by attention()
        if self.decoder_name in ORT_DECODERS:
            self.decoder = load_ort_decoder(manifest, self.decoder_name, self.device, providers, threads)
        else:
            from .torch_decoder import load_torch_decoder

            self.decoder = load_torch_decoder(manifest.decoder_dir(self.decoder_name), self.decoder_name, self.device)

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
        if decoder in TORCH_DECODERS:
            require("torch", f"the {decoder} decoder", "reference")
            if decoder == "bnb-int4":
                require("bitsandbytes", "the bnb-int4 decoder", "reference")
        return decoder

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Query embeddings (batch, num_query_tokens, hidden) from the ONNX encoder."""
        name, output = self.manifest.encoder.input, self.manifest.encoder.output
        step = CPU_ENCODER_BATCH if self._encoder_on_cpu else len(pixels)
        if len(pixels) <= step:
            return self.session.run([output], {name: pixels})[0]
        return np.concatenate([self.session.run([output], {name: pixels[start:start + step]})[0]
                               for start in range(0, len(pixels), step)])

    def attention_geometry(self):
        """The ViT's layers, heads and patch grid, from the manifest's attention graph (:mod:`idc_lite.attention`)."""
        from ..attention import ViTGeometry

        entry = self.manifest.attention
        if entry is None:
            raise ArtifactError(self.model_dir, "has no attention graph; add one with `python -m export attention "
                                f"{self.model_dir}` (the export extra), or rebuild it with this idc-lite")
        return ViTGeometry(entry.layers, entry.heads, entry.patch_size, entry.grid)

    def attention(self, pixels: np.ndarray, layers) -> dict[int, np.ndarray]:
        """Attention probabilities (batch, heads, tokens, tokens) of each ViT layer in ``layers``, from the
        artifact's attention graph, opened at the first call: captioning never loads it."""
        self.attention_geometry()
        entry = self.manifest.attention
        if self._attention_session is None:
            self._attention_session = open_session(self.manifest.file(entry.file), self.device, *self._session_options)
        outputs = self._attention_session.run([entry.outputs[layer] for layer in layers],
                                              {entry.input: np.ascontiguousarray(pixels, dtype=np.float32)})
        return dict(zip(layers, outputs))

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
