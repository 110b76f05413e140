"""The encoder graph: ViT + Q-Former + query tokens + language projection, exported to ONNX.

In: ``pixel_values`` (batch, 3, H, W) float32. Out: ``query_embeds`` (batch, num_query_tokens,
text hidden size), the embeddings BLIP-2 puts in front of the prompt for the OPT decoder. The batch
axis is dynamic. The export is checked against torch on several inputs, as optimum's exporter does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import AtolError, ExportError, ShapeError

logger = logging.getLogger("export")

INPUT_NAME, OUTPUT_NAME = "pixel_values", "query_embeds"
#: Max |onnx - torch| allowed is ``atol + rtol * max|torch|``, per precision.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2)}
#: Graphs whose weights exceed this are saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30


class QueryEncoder(torch.nn.Module):
    """What ``Blip2ForConditionalGeneration`` computes before the language model, as one module."""

    def __init__(self, blip2):
        super().__init__()
        self.vision_model = blip2.vision_model
        self.qformer = blip2.qformer
        self.query_tokens = blip2.query_tokens
        self.language_projection = blip2.language_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values, return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = self.qformer(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True,
        ).last_hidden_state
        return self.language_projection(query.to(image_embeds.dtype))


@dataclass(frozen=True)
class EncoderReport:
    file: str
    precision: str
    max_abs_diff: float
    tolerance: float
    inputs_checked: int

    def as_dict(self) -> dict:
        return {"file": self.file, "precision": self.precision, "input": INPUT_NAME, "output": OUTPUT_NAME,
                "validation": {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                               "inputs_checked": self.inputs_checked}}


def sample_inputs(image_size: int, seed: int = 0) -> list[np.ndarray]:
    """Validation inputs: batches of 1 and 3 of normalised-range noise, and a flat image."""
    rng = np.random.default_rng(seed)
    noise = [rng.standard_normal((n, 3, image_size, image_size)).astype(np.float32) for n in (1, 3)]
    return [*noise, np.full((2, 3, image_size, image_size), -0.5, dtype=np.float32)]


def export_encoder(blip2, out_dir: Path, precision: str = "fp32", image_size: int = 224) -> EncoderReport:
    """Export ``blip2``'s encoder to ``out_dir/encoder.onnx`` and validate it against torch."""
    if precision not in TOLERANCES:
        raise ExportError(None, f"encoder precision must be one of {', '.join(TOLERANCES)}, not {precision!r}")
    module = QueryEncoder(blip2).eval().float()
    path = out_dir / "encoder.onnx"
    example = torch.from_numpy(sample_inputs(image_size)[1])
    logger.info("exporting the encoder to ONNX (torch.onnx, dynamo)")
    weights_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.inference_mode():
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}}, optimize=True, verbose=False,
        )
    if precision == "fp16":
        _save_fp16(program.model_proto, path, weights_bytes)
    else:
        program.save(str(path), external_data=weights_bytes > EXTERNAL_DATA_BYTES)
    return validate_encoder(module, path, precision, image_size)


def _save_fp16(model_proto, path: Path, weights_bytes: int) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model_proto, keep_io_types=True, disable_shape_infer=weights_bytes > EXTERNAL_DATA_BYTES)
    onnx.save_model(half, str(path), save_as_external_data=weights_bytes // 2 > EXTERNAL_DATA_BYTES,
                    location=path.name + ".data")


def validate_encoder(module: torch.nn.Module, path: Path, precision: str, image_size: int) -> EncoderReport:
    """Run the ONNX graph and torch on :func:`sample_inputs`; raise if they disagree."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    atol, rtol = TOLERANCES[precision]
    worst, bound = 0.0, 0.0
    inputs = sample_inputs(image_size, seed=1)
    for pixels in inputs:
        with torch.inference_mode():
            expected = module(torch.from_numpy(pixels)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        if got.shape != expected.shape:
            raise ShapeError(path, f"output shape {got.shape}, torch gives {expected.shape}")
        diff = float(np.abs(got.astype(np.float32) - expected).max())
        limit = atol + rtol * float(np.abs(expected).max())
        if diff > limit:
            raise AtolError(path, f"max |onnx - torch| = {diff:.3g} exceeds the {precision} tolerance {limit:.3g}")
        worst, bound = max(worst, diff), max(bound, limit)
    logger.info("encoder validated on %d inputs: max |onnx - torch| = %.3g (tolerance %.3g)", len(inputs), worst, bound)
    return EncoderReport(path.name, precision, worst, bound, len(inputs))
