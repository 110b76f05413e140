"""The encoder graph: ViT + Q-Former + query tokens + language projection, exported to ONNX.

In: ``pixel_values`` (batch, 3, H, W) float32. Out: ``query_embeds`` (batch, num_query_tokens,
text hidden size), the embeddings BLIP-2 puts in front of the prompt for the OPT decoder. The batch
axis is dynamic. The export is checked against torch on several inputs, as optimum's exporter does.

Precisions: ``fp32``; ``fp16`` (weights and compute, inputs and outputs kept fp32: for CUDA);
``int8``, for CPUs: ONNX Runtime's dynamic quantization of every MatMul with a weight (int8 weights
per output channel, activations quantized to uint8 per tensor at run time, MatMulInteger), the
patch convolution, norms and attention products left in fp32: less resident memory than fp32 and
faster per image on a CPU with VNNI, at a small cost in accuracy (``docs/design.md``, "The
encoder's precisions"). CPUs without VNNI may saturate int8 products (ONNX Runtime's note); the
validation below runs on the exporting machine.

``int4``, for GPUs: the fp16 graph with every MatMul / Gemm weight as ONNX Runtime's MatMulNBits
(int4 blocks of 32 along K, asymmetric, fp16 scales; activations stay fp16): a quarter of fp16's
weight memory, which is what the GPU memory target needs (the fp16 ViT-g alone is a quarter of the
fp16 reference's whole footprint). Its accuracy on the demo model: ``docs/design.md``. The CPU runs
it too (its validation does), slowly: fp16 is not a CPU format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idc_lite.artifact import ENCODER_FILE, ENCODER_INPUT, ENCODER_OUTPUT

from .errors import AtolError, ExportError, QuantizationError, ShapeError
from .graph_ops import cosine_text, gemm_to_matmul, min_cosine, quantize_int4

logger = logging.getLogger("export")

#: Max |onnx - torch| allowed is ``atol + rtol * max|torch|``, per precision.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2)}
#: Quantized encoders are checked by the cosine similarity of each query embedding to torch's.
MIN_COSINE = {"int8": 0.98, "int4": 0.98}
#: ``int4``: MatMulNBits blocks along K, asymmetric (the int4 decoder's choice, export/ort_decoder.py).
INT4_BLOCK_SIZE, INT4_SYMMETRIC = 32, False
PRECISIONS = (*TOLERANCES, *MIN_COSINE)
#: Graphs whose weights exceed this cannot go through in-memory shape inference (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30
#: Weights are always saved in an external-data file beside the graph (``encoder.onnx.data``): ONNX
#: Runtime maps it on CPUs instead of copying the weights out of a parsed protobuf, which keeps less
#: resident (``docs/design.md``, "Weights in external-data files"); and protobuf caps inline graphs at 2 GB.


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
    tolerance: float | None
    inputs_checked: int
    cosine_min: float | None = None
    enforced: bool = True
    attention: dict | None = None  # the attention graph's manifest entry (export/attention.py), if one was made

    def as_dict(self) -> dict:
        validation = {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                      "inputs_checked": self.inputs_checked}
        entry = {"file": self.file, "precision": self.precision, "input": ENCODER_INPUT, "output": ENCODER_OUTPUT,
                 "validation": validation}
        if self.precision in MIN_COSINE:
            validation.update(cosine_min=self.cosine_min, threshold=MIN_COSINE[self.precision])
            entry["quantization"] = QUANTIZATION[self.precision]
        if not self.enforced:
            validation["enforced"] = False
        return entry


QUANTIZATION = {
    "int8": {"method": "onnxruntime-dynamic", "ops": ["MatMul"], "weights": "int8, per output channel",
             "activations": "uint8, per tensor, at run time"},
    "int4": {"method": "onnxruntime-matmulnbits", "ops": ["MatMul", "Gemm"], "bits": 4,
             "block_size": INT4_BLOCK_SIZE, "symmetric": INT4_SYMMETRIC, "activations": "fp16"},
}


def sample_inputs(image_size: int, seed: int = 0) -> list[np.ndarray]:
    """Validation inputs: batches of 1 and 3 of normalised-range noise, and a flat image."""
    rng = np.random.default_rng(seed)
    noise = [rng.standard_normal((n, 3, image_size, image_size)).astype(np.float32) for n in (1, 3)]
    return [*noise, np.full((2, 3, image_size, image_size), -0.5, dtype=np.float32)]


def export_encoder(blip2, out_dir: Path, precision: str = "fp32", image_size: int = 224,
                   enforce: bool = True) -> EncoderReport:
    """Export ``blip2``'s encoder to ``out_dir/encoder.onnx`` and validate it against torch.

    ``enforce=False`` (the benchmarks' random weights only) records the comparison without failing.
    """
    if precision not in PRECISIONS:
        raise ExportError(None, f"encoder precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    module = QueryEncoder(blip2).eval().float()
    path = out_dir / ENCODER_FILE
    example = torch.from_numpy(sample_inputs(image_size)[1])
    logger.info("exporting the encoder to ONNX (torch.onnx, dynamo)")
    weights_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.inference_mode():
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[ENCODER_INPUT], output_names=[ENCODER_OUTPUT],
            dynamic_shapes={ENCODER_INPUT: {0: torch.export.Dim("batch")}}, optimize=True, verbose=False,
        )
    if precision == "fp16":
        _save_fp16(program.model_proto, path, weights_bytes)
    elif precision == "int8":
        _save_int8(program, path)
    elif precision == "int4":
        _save_int4(program.model_proto, path, weights_bytes)
    else:
        program.save(str(path), external_data=True)
    return validate_encoder(module, path, precision, image_size, enforce)


def _half(model_proto, weights_bytes: int):
    """The graph in fp16, its input and output kept fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model_proto, keep_io_types=True, disable_shape_infer=weights_bytes > EXTERNAL_DATA_BYTES)


def _save_external(model_proto, path: Path) -> None:
    import onnx

    onnx.save_model(model_proto, str(path), save_as_external_data=True, location=path.name + ".data")


def _save_fp16(model_proto, path: Path, weights_bytes: int) -> None:
    _save_external(_half(model_proto, weights_bytes), path)


def _save_int4(model_proto, path: Path, weights_bytes: int) -> None:
    """fp16 graph whose MatMul / Gemm weights are int4 MatMulNBits (module doc)."""
    logger.info("quantizing the encoder's MatMul weights to int4 (MatMulNBits, block %d, fp16 activations)",
                INT4_BLOCK_SIZE)
    half = gemm_to_matmul(_half(model_proto, weights_bytes))
    # accuracy_level 0: plain weight-only dequantization, as the CUDA kernels compute it.
    _save_external(quantize_int4(half, path, INT4_BLOCK_SIZE, INT4_SYMMETRIC, accuracy_level=0), path)


def _save_int8(program, path: Path) -> None:
    """Save the fp32 graph aside, quantize it dynamically into ``path`` (module doc), drop the fp32 files."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("encoder-fp32.onnx")
    program.save(str(fp32), external_data=True)
    logger.info("quantizing the encoder's MatMul weights to int8 (ONNX Runtime dynamic quantization)")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the model, printed on every call
    try:
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=True)
    finally:
        logging.getLogger().setLevel(quiet)
        for leftover in (fp32, fp32.with_name(fp32.name + ".data")):
            leftover.unlink(missing_ok=True)


def validate_encoder(module: torch.nn.Module, path: Path, precision: str, image_size: int,
                     enforce: bool = True) -> EncoderReport:
    """Run the ONNX graph and torch on :func:`sample_inputs`; raise if they disagree (``enforce``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    atol, rtol = TOLERANCES.get(precision, (None, None))
    worst, bound, cosine = 0.0, 0.0, 1.0
    inputs = sample_inputs(image_size, seed=1)
    for pixels in inputs:
        with torch.inference_mode():
            expected = module(torch.from_numpy(pixels)).numpy()
        got = session.run([ENCODER_OUTPUT], {ENCODER_INPUT: pixels})[0].astype(np.float32)
        if got.shape != expected.shape:
            raise ShapeError(path, f"output shape {got.shape}, torch gives {expected.shape}")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if precision in MIN_COSINE:
            cosine = min(cosine, min_cosine(got, expected))
            continue
        limit = atol + rtol * float(np.abs(expected).max())
        if diff > limit and enforce:
            raise AtolError(path, f"max |onnx - torch| = {diff:.3g} exceeds the {precision} tolerance {limit:.3g}")
        bound = max(bound, limit)
    how = "validated" if enforce else "compared (not enforced)"
    if precision in MIN_COSINE:
        if cosine < MIN_COSINE[precision] and enforce:
            raise QuantizationError(path, f"{precision} encoder: query-embedding cosine similarity "
                                    f"{cosine_text(cosine)} < {MIN_COSINE[precision]}")
        logger.info("encoder %s on %d inputs: query-embedding cosine similarity >= %.4f (threshold %s)",
                    how, len(inputs), cosine, MIN_COSINE[precision])
        return EncoderReport(path.name, precision, worst, None, len(inputs), cosine, enforce)
    logger.info("encoder %s on %d inputs: max |onnx - torch| = %.3g (tolerance %.3g)", how, len(inputs), worst, bound)
    return EncoderReport(path.name, precision, worst, bound, len(inputs), enforced=enforce)
