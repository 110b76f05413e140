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


def quantize_int4(model, source, block_size: int, symmetric: bool, accuracy_level: int, exclude=(), bits: int = 4):
    """``model`` with every MatMul that has a constant weight (but ``exclude``) as ONNX Runtime's
    MatMulNBits, in int4 (or ``bits``: 8).

    Round to nearest, block-wise along K; fp32 or fp16 weights (the scales keep their type).
    ``source`` names the graph in errors.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=list(exclude))
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantized = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in quantized.graph.node):
        raise QuantizationError(source, "no MatMul of the graph was quantized")
    return quantized


def quantize_weight(weight: np.ndarray, input_name: str, output_name: str, node_name: str, weight_name: str, source,
                    bits: int, block_size: int, symmetric: bool, accuracy_level: int, chunk_bytes: int = 1 << 26):
    """A ``(K, N)`` MatMul weight as a MatMulNBits node of ``bits`` bits (8) and its initializers.

    ONNX Runtime's quantizer sees one graph per slice of ``chunk_bytes`` of output columns, whose
    blocks, scales and zero points (each led by the output column, unpacked at 8 bits) are then
    joined: its working copies stay a few times a slice, not a few times the weight, and ``weight``
    may be a view (a transposed torch weight) that is never copied whole. Why one weight on its own:
    a second pass of the quantizer over a whole OPT-2.7B decoder, after the layers', was killed for
    memory on a 24 GiB machine.
    """
    from onnx import helper, numpy_helper

    if bits != 8:
        raise ValueError("quantize_weight joins slices of unpacked 8-bit blocks only")
    dtype = helper.np_dtype_to_tensor_dtype(weight.dtype)
    rows, columns = weight.shape
    step = max(1, chunk_bytes // (rows * weight.itemsize))
    parts, quantized = [], None
    for start in range(0, columns, step):
        alone = helper.make_model(helper.make_graph(
            [helper.make_node("MatMul", [input_name, weight_name], [output_name], name=node_name)], "one_matmul",
            [helper.make_tensor_value_info(input_name, dtype, None)],
            [helper.make_tensor_value_info(output_name, dtype, None)],
            [numpy_helper.from_array(np.ascontiguousarray(weight[:, start:start + step]), weight_name)]),
            opset_imports=[helper.make_opsetid("", 17)])
        alone = quantize_int4(alone, source, block_size, symmetric, accuracy_level, bits=bits)
        (quantized,) = alone.graph.node
        parts.append({init.name: numpy_helper.to_array(init) for init in alone.graph.initializer})
        del alone
    joined = [numpy_helper.from_array(np.concatenate([part[name] for part in parts]), name) for name in parts[0]]
    for attribute in quantized.attribute:
        if attribute.name == "N":
            attribute.i = columns
    return quantized, joined
