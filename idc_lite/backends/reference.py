"""The reference backend: transformers' ``Blip2ForConditionalGeneration``, with the LoRA adapter.

It is the yardstick the lite path is measured against: fp16 on CUDA, fp32 on CPU, generation through
transformers' own BLIP-2 ``generate``, with the settings and prefix shared with the lite path.

Given an idc-lite artifact, it runs the reference the artifact ships (``reference/``, built with
``--ship-reference``): the manifest is loaded and every file checked first, as the lite backend does,
then the base (safetensors only) and the adapter (safetensors only) are loaded from the artifact, with
the artifact's composition and generation settings as the defaults, as on the lite backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..adapters import apply_adapter, find_adapter
from ..artifact import is_artifact, load_manifest
from ..decoding import generate_kwargs, prefix_ids, token_settings
from ..errors import AdapterError, ModelError, first_line
from ..loading import check_blip2_dir, resolve_model_dir
from ..runtime import quiet_libraries, resolve_device, resolve_dtype
from ..settings import GenerationSettings, ProcessorSettings
from ..tokenizer import load_tokenizer


class ReferenceBackend:
    name = "reference"

    def __init__(
        self, model: str | os.PathLike, adapter: str | os.PathLike | None = None, *, revision: str | None = None,
        local_files_only: bool = False, device: str = "auto", dtype: str | None = None, merge_adapter: bool = False,
    ):
        self.model_id = os.fspath(model)
        adapter_name = None
        if is_artifact(model):
            if adapter is not None:
                raise AdapterError(adapter, "an artifact's reference is its shipped base and adapter; give the "
                                   "base with --model to run it with another adapter")
            manifest = load_manifest(model)  # checks every file, the shipped reference's too
            model, adapter = manifest.reference_dirs()
            self.model_id, adapter_name, local_files_only = manifest.name, manifest.adapter_name, True
            self.composition, self.generation = manifest.composition, manifest.generation
        model_dir = resolve_model_dir(model, revision, local_files_only)
        config = check_blip2_dir(model_dir)
        adapter_source = find_adapter(adapter) if adapter is not None else None
        self.model_dir = model_dir
        self.adapter = adapter_name or (adapter_source.name if adapter_source else None)
        self.tokens = token_settings(config, str(model_dir / "config.json"))
        self.processor = ProcessorSettings.from_model_dir(model_dir)
        self.device = resolve_device(device)

        quiet_libraries()
        import torch
        from transformers import Blip2ForConditionalGeneration

        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model_dir)
        try:
            net = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(model_dir, f"cannot load the model ({first_line(exc)})") from None
        if adapter_source is not None:
            net = apply_adapter(net, adapter_source, self.model_id, merge=merge_adapter)
        self.net = net.to(self.device).eval()
        self._torch = torch

    def attention_geometry(self):
        """The ViT's layers, heads and patch grid, from the model's config (:mod:`idc_lite.attention`)."""
        from ..attention import ViTGeometry

        vision = self.net.config.vision_config
        grid = (self.processor.height // vision.patch_size, self.processor.width // vision.patch_size)
        return ViTGeometry(vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size, grid)

    def attention(self, pixels: np.ndarray, layers) -> dict[int, np.ndarray]:
        """Attention probabilities (batch, heads, tokens, tokens) of each ViT layer in ``layers``:
        transformers' attention outputs, computed with eager attention for this call (SDPA returns none)."""
        torch = self._torch
        config = self.net.vision_model.config
        implementation = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            with torch.inference_mode():
                out = self.net.vision_model(torch.from_numpy(pixels).to(self.device, self.dtype),
                                            output_attentions=True, return_dict=True)
        finally:
            config._attn_implementation = implementation
        return {layer: out.attentions[layer].float().cpu().numpy() for layer in layers}

    def generate(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        torch = self._torch
        tokens = self.tokens
        prefix = [tokens.image_token_id] * tokens.num_query_tokens + prefix_ids(self.tokenizer, tokens, settings.prompt)
        batch = pixels.shape[0]
        with torch.inference_mode():
            input_ids = torch.tensor([prefix] * batch, dtype=torch.long, device=self.device)
            pixel_values = torch.from_numpy(pixels).to(self.device, self.dtype)
            out = self.net.generate(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                **generate_kwargs(settings, tokens),
            )
        return out[:, len(prefix):].tolist()
