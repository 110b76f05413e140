"""What both ONNX exporters share: ``Gemm`` rewritten as ``MatMul``, int4 weight quantization, the cosine check."""

from __future__ import annotations

import logging
import math

import numpy as np

from .errors import QuantizationError

logger = logging.getLogger("export")


def gemm_to_matmul(model):
    """Rewrite ``Gemm(A, B, C)`` with a constant B as ``MatMul(A, B') + C``: the int4 quantizer takes MatMul only."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        rewritten += 1
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = node.input[1] + "_kn"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        if len(node.input) > 2 and node.input[2]:
            product = node.output[0] + "_matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name + "_matmul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [node.output[0]], name=node.name + "_matmul"))
    if not rewritten:
        return model
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    # Removed where they are: rebuilding the list would copy every weight (and python protobuf keeps
    # the memory of the old copies until the whole model goes).
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    return model


def min_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    """Smallest cosine similarity between matching vectors (last axis): 1 where both are zero, 0 where one is."""
    a, b = np.linalg.norm(got, axis=-1), np.linalg.norm(expected, axis=-1)
    norms = a * b
    cosine = (got * expected).sum(-1) / np.where(norms == 0, 1.0, norms)
    cosine = np.where((a == 0) & (b == 0), 1.0, cosine)
    return float(cosine.min())


def cosine_text(cosine: float) -> str:
    """``cosine`` rounded down to 4 decimals: a cosine below its threshold never reads as the threshold or above."""
    return f"{math.floor(cosine * 1e4) / 1e4:.4f}"


def quantize_int4(model, source, block_size: int, symmetric: bool, accuracy_level: int, exclude=(), include=None,
                  bits: int = 4):
    """``model`` with every MatMul that has a constant weight (but ``exclude``; only ``include`` when
    given) as ONNX Runtime's MatMulNBits, in int4 (or ``bits``: 8).

    Round to nearest, block-wise along K; fp32 or fp16 weights (the scales keep their type).
    ``source`` names the graph in errors.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                                         nodes_to_include=list(include) if include is not None else None)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantized = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in quantized.graph.node):
        raise QuantizationError(source, "no MatMul of the graph was quantized")
    return quantized
