"""The OPT decoder for ONNX Runtime: one graph with a KV cache, in fp32 (``ort-fp32``) or int4 (``ort-int4``,
``ort-int4-fp16``).

**Graph.** One graph serves the prefill and every decode step; the prefill simply passes a cache
of length 0 (two graphs would store the weights twice for no gain). Inputs and outputs (``B`` rows,
``P`` cached positions; the names are the contract's, :mod:`idc_lite.artifact`)::

    inputs_embeds   (B, E, hidden) float32  embeddings placed first: the query embeddings (E = 0 when decoding)
    input_ids       (B, T) int64            tokens after them, embedded by the graph's own table
    attention_mask  (B, P + E + T) int64    the full mask; OPT's position ids are computed from it
                                            (cumsum(mask) * mask - 1, last E + T kept), as OPTDecoder does
    beam_idx        (B,) int64              the cache row each row continues (beam reordering, dropping
                                            finished rows, repeating the prefill for the beams)
    past.{i}.key / past.{i}.value   (B_past, heads, P, head_dim) float32, one pair per layer
    ->
    logits          (B, vocab) float32      next-token logits of the last position only
    present.{i}.key / present.{i}.value   (B, heads, P + E + T, head_dim) float32

The layers are transformers' own ``OPTModel`` forward, traced with a ``DynamicCache`` built from
the flat past tensors, so masking and positions are exactly OPT's. Exported with
``torch.onnx.export(dynamo=True)`` (dynamic rows, lengths and cache length; an empty cache or an
empty ``inputs_embeds`` run fine). The token embedding table is a graph initializer used by a
``Gather`` (for ``input_ids``) and, transposed, as the LM head; when the LM head is tied to the
embeddings (real OPT) the graph holds one copy for both. So the runtime needs no torch weights and
no side file to embed the prefix and the generated tokens.

**Quantization** (``ort-int4``): ONNX Runtime's ``MatMulNBitsQuantizer`` (round to nearest, block-wise
along K) on every MatMul of the layers (q, k, v, out, fc1, fc2: exported as MatMul + Add on stored
transposes, :class:`MatMulLinear`, so that no Gemm needs rewriting; any Gemm left is). Defaults,
each chosen by measurement (``docs/design.md``, "int4 quantization of the decoder"): asymmetric
blocks (:data:`DEFAULT_SYMMETRIC`) of 32, and of 128 for ``ort-int4`` when the model is wide
(:func:`default_block_size`: a CPU session's packed weights grow with the number of blocks, so
blocks of 128 hold OPT-2.7B's layers in less memory and decode faster; short rows, such as the
embedded model's 256, keep blocks of 32, which err less where a row has few blocks; the GPU's
choice is not yet measured again); ``accuracy_level`` 4, int8 activations on CPU (a node attribute
fixed at export; CUDA ignores it); the embedding table in fp16 for the int4 decoders
(:data:`TABLE_PRECISION`). The LM head of ``ort-int4`` is a ``MatMulNBits`` of its own in **int8**
(blocks as the layers') when it is large (:data:`INT8_HEAD_MIN_WEIGHTS`; OPT-2.7B's is 129 M): the
fp16 head was then the largest single cost of a CPU decode step, read at half the host's bandwidth,
and ONNX Runtime kept an fp32 copy of it in memory; int8 reads half the bytes in a fraction of the
time, at a relative logit error under 1% (``docs/design.md``, "The LM head in int8"). The table and
the head are then two initializers even when OPT ties them, and the table is stored by rows, one
token's embedding in one place, so that the pages no lookup reads stay on disk (:class:`CachedDecoder`).
A small head (the embedded model's) stays in the caches and costs nothing to read: quantizing it
would only add error, so it keeps the fp16 table it shares. ``head_precision`` (``int8`` or ``fp16``) overrides the choice;
``ort-int4-fp16`` (for CUDA) always keeps the fp16 head. The graph is exported with the fp16 head;
the int8 one, quantized from torch's weight beforehand (:func:`int8_head_node`), replaces it in the
int4 pass (:func:`replace_head`).

``ort-int4-fp16`` (for CUDA) is the same graph converted to fp16 before quantization (ONNX Runtime's
``float16`` converter): weights, activations and the KV cache inputs and outputs in fp16, only
``inputs_embeds`` and ``logits`` kept fp32 (:data:`FP32_IO`). Half the cache memory, and fp16
``MatMulNBits`` kernels on CUDA; on the CPU fp16 is converted to fp32, no faster.

The runtime overwrites a layer's past while the step runs (``KVCache``): the export checks that each
past input is read by its layer's ``beam_idx`` Gather alone (:func:`check_past_reads`).

Validation, as for the encoder: the unquantized graph is run against the same module in torch on a
prefill, a padded prefill (positions from the mask) and a decode step with reordered cache rows;
a difference above the tolerance raises :class:`AtolError`, a wrong shape :class:`ShapeError`. The
int4 graph's next-token logits must then reach cosine similarity :data:`MIN_COSINE` with the fp32
torch decoder's on the same inputs, or :class:`QuantizationError` is raised.
"""

from __future__ import annotations

import gc
import inspect
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from idc_lite.artifact import DECODER_INPUTS as INPUTS
from idc_lite.artifact import DECODER_LOGITS as LOGITS
from idc_lite.artifact import ORT_DECODER_GRAPH, ORT_DECODERS, cache_numpy_dtype, past_names

from .errors import AtolError, ExportError, QuantizationError, ShapeError
from .graph_ops import cosine_text, gemm_to_matmul, min_cosine, quantize_int4, quantize_weight

logger = logging.getLogger("export")

PRECISION_TO_DECODER = {precision: name for name, precision in ORT_DECODERS.items()}
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
#: ort-int4 quantizes in blocks of :data:`WIDE_BLOCK_SIZE` when the hidden size is at least this.
WIDE_MIN_HIDDEN = 1024
WIDE_BLOCK_SIZE = 128
DEFAULT_SYMMETRIC = False
DEFAULT_ACCURACY_LEVEL = 4
#: Precision of the embedding table / LM head, per decoder precision.
TABLE_PRECISION = {"int4": "fp16", "int4-fp16": "fp16", "fp32": "fp32"}
#: LM heads of ort-int4 with at least this many weights are int8 by default (smaller ones fp16):
#: 4 M weights are 8 MB in fp16, beyond what a core's caches keep between decode steps.
INT8_HEAD_MIN_WEIGHTS = 1 << 22
HEAD_PRECISIONS = ("int8", "fp16")
#: Max |onnx - torch| allowed for the unquantized graph: ``atol + rtol * max|torch|``, by table precision.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2)}
MIN_COSINE = {"int4": 0.99, "int4-fp16": 0.99, "fp32": 0.99999}
#: Graph inputs and outputs an fp16 decoder keeps in fp32 (the cache goes fp16: half the memory).
FP32_IO = ("inputs_embeds", LOGITS)


class MatMulLinear(torch.nn.Module):
    """An ``nn.Linear`` that stores its weight transposed and computes ``x @ W^T + b``.

    torch.onnx exports it as MatMul (+ Add) on a (in, out) initializer, the layout ``MatMulNBits``
    quantizes. An ``nn.Linear`` on 2-D inputs (OPT's fc1 and fc2) becomes a Gemm instead, and
    rewriting those as MatMul meant copying every weight into an in-memory protobuf first: that was
    the export's host-memory peak (``docs/design.md``, "Export memory").
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        out = torch.matmul(x, self.weight_t)
        return out if self.bias is None else out + self.bias


def linears_as_matmuls(language_model) -> None:
    """Replace, one at a time, every ``nn.Linear`` of the decoder layers by a :class:`MatMulLinear`."""
    for layer in language_model.model.decoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, MatMulLinear(child))


class CachedDecoder(torch.nn.Module):
    """``OPTForCausalLM`` as the exported graph: flat cache tensors in and out, the table inside.

    The table is stored transposed, ``(hidden, vocab)``, so that a tied LM head can read the same
    initializer. With ``table_by_rows`` (for a head that is replaced by its own int8 node) it is stored
    ``(vocab, hidden)`` instead, apart from the head: a lookup then reads one row, a few pages of the
    mapped file, where a column of the transposed table touches a page in every one of its rows.
    """

    def __init__(self, language_model, table_dtype: torch.dtype = torch.float32, table_by_rows: bool = False):
        super().__init__()
        self.model = language_model.model
        embed = language_model.get_input_embeddings().weight.detach()
        head = language_model.get_output_embeddings().weight.detach()
        self.tied = head.shape == embed.shape and torch.equal(head, embed)
        self.table_by_rows = table_by_rows
        if table_by_rows:
            self.table = torch.nn.Parameter(embed.contiguous().to(table_dtype), requires_grad=False)
            self.head = torch.nn.Parameter(head.t().contiguous().to(table_dtype), requires_grad=False)
        else:
            self.table = torch.nn.Parameter(embed.t().contiguous().to(table_dtype), requires_grad=False)
            self.head = self.table if self.tied else torch.nn.Parameter(head.t().contiguous().to(table_dtype),
                                                                        requires_grad=False)
        self.num_layers = language_model.config.num_hidden_layers
        # transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def forward(self, inputs_embeds, input_ids, attention_mask, beam_idx, *past):
        from transformers.cache_utils import DynamicCache

        rows, count = input_ids.shape
        if self.table_by_rows:
            tokens = self.table.index_select(0, input_ids.reshape(-1)).reshape(rows, count, -1)
        else:
            tokens = self.table.index_select(1, input_ids.reshape(-1)).t().reshape(rows, count, -1)
        embeds = torch.cat([inputs_embeds, tokens.to(inputs_embeds.dtype)], dim=1)
        cache = DynamicCache(ddp_cache_data=[
            (past[2 * i].index_select(0, beam_idx), past[2 * i + 1].index_select(0, beam_idx))
            for i in range(self.num_layers)
        ])
        hidden = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True,
                            **{self._cache_kw: cache}).last_hidden_state[:, -1]
        logits = (hidden.to(self.head.dtype) @ self.head).float()
        return (logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def graph_shape(language_model) -> dict:
    config = language_model.config
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "heads": heads, "head_dim": config.hidden_size // heads,
            "hidden_size": config.word_embed_proj_dim, "vocab_size": config.vocab_size}


def export_ort_decoder(
    language_model, out_dir: Path, precision: str = "int4", query_embeds: torch.Tensor | None = None,
    prefix: list[int] | None = None, *, block_size: int | None = None, symmetric: bool = DEFAULT_SYMMETRIC,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL, table_precision: str | None = None,
    head_precision: str | None = None,
) -> tuple[str, dict]:
    """Export ``language_model`` to ``out_dir/<name>/decoder.onnx``, validate it; return (name, manifest entry).

    ``query_embeds`` (batch, n, hidden) and ``prefix`` (token ids after them) are the validation
    inputs, as for :func:`export.decoder.export_decoder`. ``language_model`` is used up: once the
    graph is written its weights are released (moved to the meta device), so that the graph check
    and the quantization do not hold the model twice.
    """
    if precision not in PRECISION_TO_DECODER:
        raise ExportError(None, f"ONNX Runtime decoder precision must be one of {', '.join(PRECISION_TO_DECODER)}, "
                          f"not {precision!r}")
    if block_size is None:
        block_size = default_block_size(precision, language_model.config.hidden_size)
    if block_size not in BLOCK_SIZES:
        raise ExportError(None, f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {block_size}")
    if query_embeds is None or not prefix:
        raise ExportError(None, "the ONNX Runtime decoder export needs query embeddings and a prefix to validate on")
    table_precision = table_precision or TABLE_PRECISION[precision]
    if table_precision not in TOLERANCES:
        raise ExportError(None, f"table precision must be fp32 or fp16, not {table_precision!r}")
    if precision == "fp32":
        head_precision = table_precision  # the table itself, unquantized
    elif head_precision is None:
        weights = language_model.get_output_embeddings().weight.numel()
        head_precision = "int8" if precision == "int4" and weights >= INT8_HEAD_MIN_WEIGHTS else "fp16"
    elif head_precision not in HEAD_PRECISIONS or (head_precision == "int8" and precision != "int4"):
        raise ExportError(None, f"the LM head of {PRECISION_TO_DECODER[precision]} may be "
                          f"{' or '.join(('int8', 'fp16') if precision == 'int4' else ('fp16',))}, not {head_precision!r}")
    int8_head = head_precision == "int8"
    name = PRECISION_TO_DECODER[precision]
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    path = target / ORT_DECODER_GRAPH
    language_model = language_model.float().eval()
    linears_as_matmuls(language_model)  # the caller's copy: it loads the weights for this decoder alone
    shape = graph_shape(language_model)
    reference = CachedDecoder(language_model, torch.float32).eval()
    # An int8 head replaces the graph's own in the int4 pass: the table is then stored by rows (CachedDecoder).
    module = reference if table_precision == "fp32" else CachedDecoder(language_model, torch.float16,
                                                                       table_by_rows=int8_head).eval()
    # The int8 head is quantized now, from torch's fp32 weight, while memory is low; the graph is exported
    # with the fp16 head as before, and the quantized head replaces it in the int4 pass (_quantize).
    head = int8_head_node(language_model, block_size, symmetric, accuracy_level) if int8_head else None
    tied = module.tied
    # Everything the checks need from torch, computed before the export: torch's weights then go.
    cases = validation_cases(reference, query_embeds.float(), prefix)
    expected = expected_outputs(module, cases)
    reference_logits = [outputs[0] for outputs in expected_outputs(reference, cases)]

    try:  # a decoder that fails its validation leaves nothing behind
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            graph = Path(tmp) / ORT_DECODER_GRAPH if precision != "fp32" else path
            _export_graph(module, graph)
            del reference, module
            language_model.to("meta")
            gc.collect()  # the exporter leaves cycles that hold the weights until a collection
            diff, bound = validate_graph(expected, graph, cases, table_precision)
            if precision != "fp32":
                _quantize(graph, path, block_size, symmetric, accuracy_level, half=precision == "int4-fp16",
                          head=head)
            del head
        check_past_reads(path)
        cosine = graph_cosine(path, reference_logits, cases)
        logger.info("decoder %s: next-token logits cosine similarity to fp32 = %.5f", name, cosine)
        if cosine < MIN_COSINE[precision]:
            raise QuantizationError(path, f"{name} logits cosine similarity {cosine_text(cosine)} "
                                    f"< {MIN_COSINE[precision]}")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    entry = {
        "dir": name, "graph": ORT_DECODER_GRAPH, "runtime": "onnxruntime", "precision": precision,
        "shape": shape, "inputs": [*INPUTS, "past.{i}.key", "past.{i}.value"],
        "outputs": [LOGITS, "present.{i}.key", "present.{i}.value"],
        "embeddings": {"precision": table_precision, "tied_lm_head": tied, "lm_head": head_precision},
        "activations": "fp16" if precision == "int4-fp16" else "fp32",
        "validation": {"logits_cosine_min": cosine, "threshold": MIN_COSINE[precision], "max_abs_diff": diff,
                       "tolerance": bound, "inputs_checked": len(cases)},
    }
    if precision != "fp32":
        entry["quantization"] = {"method": "onnxruntime-matmulnbits", "bits": 4, "block_size": block_size,
                                 "symmetric": symmetric, "accuracy_level": accuracy_level,
                                 "not_quantized": ["embedding table"] if int8_head else ["embedding table / lm_head"]}
        if int8_head:
            entry["quantization"]["lm_head"] = {"bits": 8, "block_size": block_size, "symmetric": symmetric}
    return name, entry


def default_block_size(precision: str, hidden_size: int) -> int:
    """The int4 block size along K when none is asked for (see the module docstring)."""
    return WIDE_BLOCK_SIZE if precision == "int4" and hidden_size >= WIDE_MIN_HIDDEN else DEFAULT_BLOCK_SIZE


def _export_graph(module: CachedDecoder, path: Path) -> None:
    """Export ``module`` with dynamic axes, its weights in ``<path>.data``."""
    heads = module.model.config.num_attention_heads
    head_dim = module.model.config.hidden_size // heads
    rows, embeds, ids, past_rows, past_len = 2, 3, 2, 3, 4
    example = (
        torch.zeros(rows, embeds, module.head.shape[0]), torch.zeros(rows, ids, dtype=torch.long),
        torch.ones(rows, past_len + embeds + ids, dtype=torch.long), torch.tensor([2, 0]),
        *[torch.zeros(past_rows, heads, past_len, head_dim) for _ in range(2 * module.num_layers)],
    )
    dim = torch.export.Dim
    batch, past_batch, past = dim("batch"), dim("past_batch"), dim("past")
    dynamic = {"inputs_embeds": {0: batch, 1: dim("embeds")}, "input_ids": {0: batch, 1: dim("ids")},
               "attention_mask": {0: batch, 1: dim("total")}, "beam_idx": {0: batch},
               "past": tuple({0: past_batch, 2: past} for _ in range(2 * module.num_layers))}
    logger.info("exporting the decoder to ONNX (torch.onnx, dynamo)")
    with torch.inference_mode():
        program = torch.onnx.export(
            module, example, dynamo=True, input_names=[*INPUTS, *past_names(module.num_layers)],
            output_names=[LOGITS, *past_names(module.num_layers, "present")], dynamic_shapes=dynamic,
            optimize=True, verbose=False,
        )
    # Saved from the exporter's IR tensor by tensor: ``program.model_proto`` would first copy every
    # weight into one in-memory protobuf.
    program.save(str(path), external_data=True)


def _save(model, path: Path) -> None:
    """Save with the weights in ``<graph>.data``, always: ONNX Runtime maps that file on CPUs instead of
    copying the weights out of a parsed protobuf, a faster load and less memory (``docs/design.md``,
    "Weights in external-data files"). Protobuf also caps inline graphs at 2 GB."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")


def _quantize(source: Path, path: Path, block_size: int, symmetric: bool, accuracy_level: int,
              half: bool = False, head=None) -> None:
    """MatMulNBits int4 for every MatMul with a constant weight, except the LM head; in fp16 if ``half``.

    ``head`` (:func:`int8_head_node`): the LM head's MatMul (and the casts around its fp16 weight) is
    replaced by that quantized node."""
    import onnx

    model = gemm_to_matmul(onnx.load(str(source)))  # any Gemm left (layers are MatMulLinear already)
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        logger.info("converting the decoder graph to fp16 (the cache too; %s kept fp32)", " and ".join(FP32_IO))
        big = sum(init.ByteSize() for init in model.graph.initializer) > (1 << 30)
        model = convert_float_to_float16(model, keep_io_types=list(FP32_IO), disable_shape_infer=big)
    table = {"table", "head"}
    head_nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in table]
    if len(head_nodes) != 1:
        raise ExportError(source, "cannot find the LM head MatMul in the exported decoder graph")
    if head is not None:
        replace_head(model, head_nodes[0], head, source)
    logger.info("quantizing the decoder's MatMuls to int4 (block %d, %s, accuracy level %d)", block_size,
                "symmetric" if symmetric else "asymmetric", accuracy_level)
    _save(quantize_int4(model, source, block_size, symmetric, accuracy_level, exclude=head_nodes), path)


def int8_head_node(language_model, block_size: int, symmetric: bool, accuracy_level: int):
    """The LM head as an int8 MatMulNBits node and its initializers (input ``hidden``, output ``logits``),
    quantized from torch's weight, ``(vocab, hidden)``, read through a transposed view: never copied whole."""
    logger.info("quantizing the LM head to int8 (block %d)", block_size)
    weight = language_model.get_output_embeddings().weight.detach()
    view = (weight if weight.dtype == torch.float32 else weight.float()).numpy().T  # (hidden, vocab), MatMul's
    return quantize_weight(view, "hidden", "logits", "lm_head", "lm_head", "the LM head", 8, block_size, symmetric,
                           accuracy_level)


def replace_head(model, head_name: str, head, source: Path) -> None:
    """Put ``head`` (:func:`int8_head_node`) in place of the graph's LM head ``head_name``: a MatMul of the
    fp16 weight between a cast of the fp32 hidden state to fp16 and a cast of the logits back to fp32."""
    graph = model.graph
    node, initializers = head
    matmul = next(n for n in graph.node if n.name == head_name)
    producers = {out: n for n in graph.node for out in n.output}
    before = producers.get(matmul.input[0])
    after = [n for n in graph.node if matmul.output[0] in n.input]
    if before is None or before.op_type != "Cast" or len(after) != 1 or after[0].op_type != "Cast":
        raise ExportError(source, "the LM head is not an fp16 MatMul between two casts: cannot put the int8 head in")
    (after,) = after
    quantized = node  # made for this graph alone (int8_head_node): wired in place
    quantized.input[0], quantized.output[0] = before.input[0], after.output[0]
    weight = matmul.input[1]
    for old in (after, matmul) + ((before,) if sum(before.output[0] in n.input for n in graph.node) == 1 else ()):
        graph.node.remove(old)
    # In topological order: before the first node that reads the logits (none: they are the graph's output).
    readers = [i for i, n in enumerate(graph.node) if quantized.output[0] in n.input]
    graph.node.insert(readers[0] if readers else len(graph.node), quantized)
    if not any(weight in n.input for n in graph.node):  # an untied head's own fp16 weight
        graph.initializer.remove(next(i for i in graph.initializer if i.name == weight))
    graph.initializer.extend(initializers)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


#: The only nodes that may read a ``past.*`` input: the cache rows' Gather by ``beam_idx``, and Shape.
PAST_READERS = ("Gather", "Shape")


def check_past_reads(path: Path) -> None:
    """Raise :class:`ExportError` unless each ``past.*`` input of the graph is read by one Gather (and Shapes).

    The runtime's cache (:class:`idc_lite.backends.ort_decoder.KVCache`) writes layer ``j``'s present
    where layer ``j - 1``'s past was. That is safe when every past tensor is read once, by the Gather
    whose output feeds its own layer, before anything depends on that layer's output.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    past = {i.name for i in graph.input if i.name.startswith("past.")}
    readers: dict[str, list[str]] = {name: [] for name in past}
    for node in graph.node:
        for name in node.input:
            if name in past:
                readers[name].append(node.op_type)
    for name, ops in sorted(readers.items()):
        if ops.count("Gather") != 1 or set(ops) - set(PAST_READERS):
            raise ExportError(path, f"the decoder graph reads {name} with {', '.join(ops) or 'nothing'}; the cache "
                              "needs it read by one Gather (and Shape) only")


def validation_cases(module: CachedDecoder, query_embeds: torch.Tensor, prefix: list[int]) -> list[dict]:
    """Inputs for the graph checks: a prefill, a left-padded prefill and a decode step with reordered rows."""
    rows = query_embeds.shape[0]
    layers = module.num_layers
    heads = module.model.config.num_attention_heads
    head_dim = module.model.config.hidden_size // heads
    ids = torch.tensor([prefix] * rows, dtype=torch.long)
    total = query_embeds.shape[1] + ids.shape[1]
    empty = [torch.zeros(rows, heads, 0, head_dim) for _ in range(2 * layers)]
    prefill = {"inputs_embeds": query_embeds, "input_ids": ids, "attention_mask": torch.ones(rows, total, dtype=torch.long),
               "beam_idx": torch.arange(rows), "past": empty}
    padded_mask = prefill["attention_mask"].clone()
    padded_mask[0, : min(2, query_embeds.shape[1])] = 0  # left padding moves OPT's positions
    padded = {**prefill, "attention_mask": padded_mask}
    with torch.inference_mode():
        presents = module(*_args(prefill))[1:]
    generator = torch.Generator().manual_seed(0)
    decode = {"inputs_embeds": torch.zeros(rows, 0, query_embeds.shape[2]),
              "input_ids": torch.randint(4, module.head.shape[1], (rows, 1), generator=generator),
              "attention_mask": torch.ones(rows, total + 1, dtype=torch.long),
              "beam_idx": torch.arange(rows).flip(0), "past": [p.float() for p in presents]}
    return [prefill, padded, decode]


def _args(case: dict) -> tuple:
    return (case["inputs_embeds"], case["input_ids"], case["attention_mask"], case["beam_idx"], *case["past"])


def _feeds(case: dict, layers: int, cache_dtype=np.float32) -> dict:
    feeds = {name: case[name].numpy() for name in INPUTS}
    feeds.update({name: t.numpy().astype(cache_dtype) for name, t in zip(past_names(layers), case["past"])})
    return feeds


def _session(path: Path, prepack: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not prepack:  # MatMuls then read their weights from the mapped file instead of packed copies
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def expected_outputs(module: torch.nn.Module, cases: list[dict]) -> list[list[np.ndarray]]:
    """``module``'s outputs (logits, then the cache) on each of ``cases``, as fp32 numpy."""
    with torch.inference_mode():
        return [[t.float().numpy() for t in module(*_args(case))] for case in cases]


def validate_graph(expected_all: list[list[np.ndarray]], path: Path, cases: list[dict],
                   table_precision: str) -> tuple[float, float]:
    """Run the graph on ``cases``; raise :class:`ShapeError` / :class:`AtolError` where it disagrees with
    ``expected_all`` (:func:`expected_outputs` of the module it was exported from)."""
    session = _session(path, prepack=False)
    atol, rtol = TOLERANCES[table_precision]
    worst, bound = 0.0, 0.0
    layers = len(cases[0]["past"]) // 2
    for case, expected in zip(cases, expected_all):
        got = session.run(None, _feeds(case, layers))
        # Positions the mask hides hold values nothing reads (attention over no key): compare the others.
        seen = case["attention_mask"].numpy()[:, None, :, None].astype(bool)
        for index, (name, g, e) in enumerate(zip([LOGITS, *past_names(layers, "present")], got, expected)):
            if g.shape != e.shape:
                raise ShapeError(path, f"output {name} has shape {g.shape}, torch gives {e.shape}")
            if index:
                g, e = np.where(seen, g, 0.0), np.where(seen, e, 0.0)
            diff = float(np.abs(g - e).max()) if e.size else 0.0
            limit = atol + rtol * (float(np.abs(e).max()) if e.size else 0.0)
            if diff > limit:
                raise AtolError(path, f"max |onnx - torch| of {name} = {diff:.3g} exceeds the {table_precision} "
                                f"tolerance {limit:.3g}")
            worst, bound = max(worst, diff), max(bound, limit)
    logger.info("decoder graph validated on %d inputs: max |onnx - torch| = %.3g (tolerance %.3g)", len(cases), worst, bound)
    return worst, bound


def graph_cosine(path: Path, reference_logits: list[np.ndarray], cases: list[dict]) -> float:
    """Smallest cosine similarity between the graph's next-token logits and ``reference_logits``, over ``cases``."""
    session = _session(path)
    cache_dtype = cache_numpy_dtype(session)
    worst = 1.0
    layers = len(cases[0]["past"]) // 2
    for case, expected in zip(cases, reference_logits):
        got = session.run([LOGITS], _feeds(case, layers, cache_dtype))[0].astype(np.float64)
        worst = min(worst, min_cosine(got, expected.astype(np.float64)))
    return worst
