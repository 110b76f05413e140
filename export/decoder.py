"""The decoder: the merged OPT language model, saved for the lite runtime.

``int4`` is bitsandbytes NF4 (block size 64), quantized here and saved pre-quantized with
transformers' serialization; ``fp16`` and ``fp32`` are plain safetensors. Every saved decoder is
loaded back as the runtime loads it and its next-token logits compared with the full-precision
decoder's on the same inputs (cosine similarity), which must reach :data:`MIN_COSINE`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from idc_lite.artifact import TORCH_DECODER_DIR, TORCH_DECODERS
from idc_lite.decoders import load_torch_decoder
from idc_lite.decoding import inputs_embeds

from .errors import ExportError, QuantizationError
from .graph_ops import cosine_text

logger = logging.getLogger("export")

PRECISION_TO_DECODER = {precision: name for name, precision in TORCH_DECODERS.items()}
MIN_COSINE = {"int4": 0.99, "fp16": 0.9999, "fp32": 0.99999}
#: bitsandbytes' CPU kernels on CPUs with AVX512-BF16 repack int4 weights in blocks of this many output
#: rows and assert that the output width divides into them; elsewhere they run any width. An artifact
#: runs on any CPU, so the export refuses widths that would fail there.
BNB_CPU_BLOCK_N = 32


def check_bnb_shapes(language_model) -> None:
    """Raise :class:`ExportError` if a Linear that bnb-int4 quantizes has an output width bitsandbytes cannot pack."""
    odd = sorted({m.out_features for name, m in language_model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lm_head" not in name and m.out_features % BNB_CPU_BLOCK_N})
    if odd:
        raise ExportError(None, f"bnb-int4 needs layer widths that are multiples of {BNB_CPU_BLOCK_N} (bitsandbytes' "
                          f"CPU kernels), this model has {', '.join(map(str, odd))}: build ort-int4 instead")


def export_decoder(language_model, out_dir: Path, precision: str, query_embeds: torch.Tensor, prefix: list[int]) -> tuple[str, dict]:
    """Save ``language_model`` under ``out_dir/decoder`` at ``precision``; return its manifest entry."""
    if precision not in PRECISION_TO_DECODER:
        raise ExportError(None, f"decoder precision must be one of {', '.join(PRECISION_TO_DECODER)}, not {precision!r}")
    name = PRECISION_TO_DECODER[precision]
    target = out_dir / TORCH_DECODER_DIR
    language_model = language_model.float().eval()
    embeds = inputs_embeds(language_model, query_embeds, prefix)
    with torch.inference_mode():
        reference = language_model(inputs_embeds=embeds).logits[:, -1].float()
    if precision == "int4":
        _save_int4(language_model, target)
    else:
        (language_model.half() if precision == "fp16" else language_model).save_pretrained(target)
        language_model.float()
    cosine = decoder_cosine(target, name, embeds, reference)
    logger.info("decoder %s: next-token logits cosine similarity to fp32 = %.5f", name, cosine)
    if cosine < MIN_COSINE[precision]:
        raise QuantizationError(target, f"{name} logits cosine similarity {cosine_text(cosine)} "
                                f"< {MIN_COSINE[precision]}")
    entry = {"dir": TORCH_DECODER_DIR, "runtime": "torch", "precision": precision,
             "validation": {"logits_cosine_min": cosine, "threshold": MIN_COSINE[precision]}}
    if precision == "int4":
        entry["quantization"] = {"method": "bitsandbytes", "quant_type": "nf4", "blocksize": 64, "double_quant": False}
    return name, entry


def _save_int4(language_model, target: Path) -> None:
    from transformers import BitsAndBytesConfig, OPTForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        language_model.save_pretrained(tmp)
        quantized = OPTForCausalLM.from_pretrained(
            tmp, device_map={"": "cpu"}, dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            ),
        )
        quantized.save_pretrained(target)


def decoder_cosine(path: Path, name: str, embeds: torch.Tensor, reference: torch.Tensor) -> float:
    """Smallest cosine similarity between the saved decoder's next-token logits and ``reference``."""
    decoder = load_torch_decoder(path, name, "cpu")
    with torch.inference_mode():
        logits = decoder(inputs_embeds=embeds.to(decoder.dtype)).logits[:, -1].float()
    return float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min())
