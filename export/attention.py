"""The attention graph: the encoder's ViT up to its last attention, outputting every layer's attention.

``idc-lite attention`` shows where the ViT's heads attended over the stacked pair (seed Figure 1).
The encoder graph does not output those probabilities, and must not (its speed stays untouched), so
an artifact can hold a second graph, :data:`~idc_lite.artifact.ATTENTION_FILE`: the encoder's own
nodes from ``pixel_values`` to the softmax of each ViT layer, each softmax's output exposed as
``attention.{layer}`` (float32, (batch, heads, tokens, tokens)). It is cut out of the exported
encoder graph (graph surgery, no torch), so it computes exactly what the encoder computes:

- the softmaxes are found by what feeds them: the ViT's depend on the pixels and on no Q-Former
  weight nor the query tokens (the Q-Former's self- and cross-attention do); there must be at least
  as many as the ViT layers the weights' names show. An encoder whose attention
  is fused into one operator has no probabilities to expose: no attention graph then;
- weights are shared, not copied: an initializer stored in the encoder's external-data file keeps
  pointing at that file (the attention graph is saved beside the encoder), so an exported artifact
  grows by a few kilobytes; an encoder with inline weights (the embedded model's) gives a graph with
  its own copy of the ViT's weights.

The export validates the graph against transformers' attention outputs (eager attention) with
:data:`TOLERANCE` for an fp32 encoder; quantized or fp16 encoders have their difference recorded,
not enforced (their query embeddings are checked by the encoder's own validation).
:func:`add_attention` adds the graph to an existing artifact (``python -m export attention DIR``),
checked against the encoder's own softmax outputs, and rewrites its manifest.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from idc_lite.artifact import (ATTENTION_FILE, ENCODER_INPUT, MANIFEST, attention_output, load_manifest,
                               write_manifest)

from .errors import AtolError, ExportError, ShapeError

logger = logging.getLogger("export")

#: Max |attention graph - reference| allowed for an fp32 encoder (probabilities lie in [0, 1]).
TOLERANCE = 1e-4
#: Operators that compute attention in one node, leaving no probability tensor in the graph.
FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
#: Initializer names that only the Q-Former side of the encoder reads.
_QFORMER_WEIGHTS = re.compile(r"^(query_tokens|qformer\.)")
_VIT_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
_CHECK_GRAPH, _PARTIAL_GRAPH = ".attention-check.onnx", ".attention-partial.onnx"


class AttentionNotFound(ExportError):
    """The encoder graph holds no attention probabilities to expose."""


def vit_attention_tensors(model) -> list[str]:
    """The ViT layers' attention probabilities in ``model`` (an encoder ModelProto), first layer first."""
    graph = model.graph
    fused = sorted({n.op_type for n in graph.node if n.op_type in FUSED_ATTENTION})
    qformer = {init.name for init in graph.initializer if _QFORMER_WEIGHTS.match(init.name)}
    derived = set(qformer)  # tensors computed from a Q-Former weight or the query tokens
    found = []
    for node in _topological(graph):
        if any(name in derived for name in node.input):
            derived.update(node.output)
        elif node.op_type == "Softmax":
            found.append(node.output[0])
    if not qformer:
        raise AttentionNotFound(None, "the encoder graph has no query_tokens or qformer.* weights to tell the "
                                "ViT from the Q-Former")
    if not found:
        why = f"its attention is fused ({', '.join(fused)})" if fused else "it has no softmax before the Q-Former"
        raise AttentionNotFound(None, f"the encoder graph holds no ViT attention probabilities: {why}")
    # Weights the exporter found equal are stored once, under one layer's name: the names give a lower bound.
    named = {int(m.group(1)) for init in graph.initializer if (m := _VIT_LAYER.search(init.name))}
    if named and len(found) <= max(named):
        raise AttentionNotFound(None, f"found {len(found)} softmaxes before the Q-Former, the ViT has at least "
                                f"{max(named) + 1} layers")
    return found


def _topological(graph) -> list:
    """The graph's nodes in an order where each comes after the nodes it reads (ONNX asks for it, but the
    fp16 converter appends its input casts at the end); the graph's own order wherever it allows."""
    import heapq

    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting = [0] * len(graph.node)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for source in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            readers.setdefault(source, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(graph.node[i])
        for reader in readers.get(i, ()):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(ordered) != len(graph.node):
        raise ExportError(None, "the encoder graph has a cycle")
    return ordered


def attention_model(encoder):
    """The attention graph cut out of ``encoder`` (a ModelProto, external data not loaded or loaded)."""
    from onnx import TensorProto, helper

    tensors = vit_attention_tensors(encoder)
    graph = encoder.graph
    outputs = [attention_output(i) for i in range(len(tensors))]
    casts = [helper.make_node("Cast", [tensor], [name], name=f"{name}.cast", to=TensorProto.FLOAT)
             for tensor, name in zip(tensors, outputs)]
    needed = set(tensors)
    kept = []
    for node in reversed(_topological(graph)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    inputs = [i for i in graph.input if i.name == ENCODER_INPUT]
    if not inputs:
        raise ExportError(None, f"the encoder graph has no {ENCODER_INPUT!r} input")
    attention = helper.make_graph(
        [*kept, *casts], "idc-lite-attention", inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "heads", "tokens", "tokens"])
         for name in outputs],
        initializer=[init for init in graph.initializer if init.name in needed],
    )
    model = helper.make_model(attention, opset_imports=encoder.opset_import, ir_version=encoder.ir_version,
                              producer_name="idc-lite")
    model.functions.extend(f for f in encoder.functions)
    return model


def patch_size(encoder) -> int:
    """The ViT's patch size: the stride of its patch embedding, the encoder's first convolution (an fp16
    graph reads the pixels through a Cast first)."""
    from onnx import helper

    conv = next((node for node in encoder.graph.node if node.op_type == "Conv"), None)
    strides = [] if conv is None else next(
        (helper.get_attribute_value(a) for a in conv.attribute if a.name == "strides"), [])
    if len(strides) != 2 or strides[0] != strides[1]:
        raise ExportError(None, "the encoder graph has no square-strided patch convolution")
    return int(strides[0])


def write_attention_graph(encoder_path: Path, image_size: tuple[int, int], path: Path | None = None) -> dict:
    """Write the attention graph beside ``encoder_path`` (as ``path`` if given, in the same folder); return
    its manifest entry (without validation; ``file`` relative to the encoder's folder).

    ``image_size`` is the encoder's input (height, width). The graph is serialised as is: weights in
    the encoder's external-data file stay there, and the new graph points at them.
    """
    import onnx

    encoder = onnx.load(str(encoder_path), load_external_data=False)
    try:
        model = attention_model(encoder)
    except AttentionNotFound as exc:
        raise AttentionNotFound(encoder_path, exc.problem) from None
    path = path or encoder_path.with_name(ATTENTION_FILE)
    path.write_bytes(model.SerializeToString())
    shared = any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    patch = patch_size(encoder)
    grid = [image_size[0] // patch, image_size[1] // patch]
    session = _session(path)
    probs = session.run(None, {ENCODER_INPUT: np.zeros((1, 3, *image_size), np.float32)})
    _, heads, tokens, _ = probs[0].shape
    if tokens != 1 + grid[0] * grid[1]:
        raise ShapeError(path, f"{tokens} tokens, not a class token and {grid[0]} x {grid[1]} patches")
    logger.info("attention graph: %d ViT layers x %d heads over %d x %d patches (%s, %.1f MB)", len(probs), heads,
                *grid, "weights shared with the encoder" if shared else "weights inline", path.stat().st_size / 1e6)
    return {"file": ATTENTION_FILE, "input": ENCODER_INPUT, "outputs": [attention_output(i) for i in range(len(probs))],
            "heads": int(heads), "patch_size": patch, "grid": grid}


def sample_pixels(image_size: tuple[int, int], seed: int = 3) -> list[np.ndarray]:
    """Check inputs: a batch of 2 of normalised-range noise and a smooth gradient image."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    ramp = np.linspace(-1.5, 1.5, height * width, dtype=np.float32).reshape(1, 1, height, width)
    return [rng.standard_normal((2, 3, height, width)).astype(np.float32), np.repeat(ramp, 3, axis=1)]


def export_attention(vision_model, work: Path, precision: str, image_size: int, enforce: bool = True) -> dict | None:
    """Build's step: the attention graph of ``work``'s encoder, validated against ``vision_model``'s attentions.

    None (and a warning) when the encoder has no attention probabilities to expose.
    """
    import torch

    from idc_lite.artifact import ENCODER_FILE

    try:
        entry = write_attention_graph(work / ENCODER_FILE, (image_size, image_size))
    except AttentionNotFound as exc:
        logger.warning("no attention graph: %s", exc)
        return None
    session = _session(work / entry["file"])
    config = vision_model.config
    implementation = config._attn_implementation
    worst, inputs = 0.0, sample_pixels((image_size, image_size))
    config._attn_implementation = "eager"  # SDPA computes no probabilities to return
    try:
        for pixels in inputs:
            with torch.inference_mode():
                expected = vision_model(torch.from_numpy(pixels), output_attentions=True, return_dict=True).attentions
            got = session.run(entry["outputs"], {ENCODER_INPUT: pixels})
            worst = max(worst, *(float(np.abs(g - e.float().numpy()).max()) for g, e in zip(got, expected)))
    finally:
        config._attn_implementation = implementation
    enforced = enforce and precision == "fp32"
    if worst > TOLERANCE and enforced:
        raise AtolError(work / entry["file"], f"max |onnx - torch| attention = {worst:.3g} exceeds {TOLERANCE}")
    logger.info("attention graph %s on %d inputs: max |onnx - torch| = %.3g", "validated" if enforced else
                "compared (not enforced)", len(inputs), worst)
    entry["validation"] = {"against": "transformers (eager attention)", "max_abs_diff": worst,
                           "tolerance": TOLERANCE if enforced else None, "inputs_checked": len(inputs)}
    if not enforced:
        entry["validation"]["enforced"] = False
    return entry


def add_attention(artifact: str | Path) -> dict:
    """Add (or remake) the attention graph of an existing artifact and rewrite its manifest; return the entry.

    The artifact is verified first; the new graph is checked against the encoder's own softmax outputs
    (the same nodes, exposed in a temporary copy of the encoder graph), and must agree exactly up to
    :data:`TOLERANCE`. Every file but the manifest and the new graph is left as it was.
    """
    manifest = load_manifest(artifact)
    root = manifest.path
    encoder_path = manifest.file(manifest.encoder.file)
    processor = manifest.processor
    size = (processor.height, processor.width)
    final, partial = encoder_path.with_name(ATTENTION_FILE), encoder_path.with_name(_PARTIAL_GRAPH)
    try:  # made under another name and moved in place once checked: a failure leaves the artifact as it was
        entry = write_attention_graph(encoder_path, size, partial)
        worst, checked = _against_encoder(encoder_path, partial, size)
        if worst > TOLERANCE:
            raise AtolError(final, f"differs from the encoder's own attention by {worst:.3g}")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    entry["file"] = (Path(manifest.encoder.file).parent / ATTENTION_FILE).as_posix()
    entry["validation"] = {"against": manifest.encoder.file, "max_abs_diff": worst, "tolerance": TOLERANCE,
                           "inputs_checked": checked}
    data = {key: value for key, value in manifest.data.items() if key not in ("format", "format_version", "files")}
    data["attention"] = entry
    write_manifest(root, data)
    load_manifest(root)  # the rewritten manifest vouches for every file
    logger.info("%s: attention graph added, manifest rewritten", root / MANIFEST)
    return entry


def _against_encoder(encoder_path: Path, attention_path: Path, image_size: tuple[int, int]) -> tuple[float, int]:
    """Max |attention graph - the encoder's softmax outputs| on :func:`sample_pixels`, and the number of inputs."""
    import onnx
    from onnx import TensorProto, helper

    encoder = onnx.load(str(encoder_path), load_external_data=False)
    tensors = vit_attention_tensors(encoder)
    exposed = [f"check.{i}" for i in range(len(tensors))]
    encoder.graph.node.extend(helper.make_node("Cast", [tensor], [name], to=TensorProto.FLOAT)
                              for tensor, name in zip(tensors, exposed))
    encoder.graph.output.extend(helper.make_tensor_value_info(e, TensorProto.FLOAT, None) for e in exposed)
    check = encoder_path.with_name(_CHECK_GRAPH)  # beside the encoder: its external data resolves the same way
    check.write_bytes(encoder.SerializeToString())
    try:
        full, attention = _session(check), _session(attention_path)
        inputs = sample_pixels(image_size)
        worst = 0.0
        for pixels in inputs:
            expected = full.run(exposed, {ENCODER_INPUT: pixels})
            got = attention.run(None, {ENCODER_INPUT: pixels})
            worst = max(worst, *(float(np.abs(g - e).max()) for g, e in zip(got, expected)))
    finally:
        check.unlink(missing_ok=True)
    return worst, len(inputs)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
