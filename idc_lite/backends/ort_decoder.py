"""The OPT decoder under ONNX Runtime (``ort-int4``, ``ort-int4-fp16``, ``ort-fp32``): greedy and beam search.

The decoder graph (written by ``export/ort_decoder.py``) holds the token embedding table, the OPT
layers and the LM head; its KV cache goes in and out as one key and one value tensor per layer.
The cache never comes back to Python: each generation allocates one key and one value buffer per
layer and one spare pair (:class:`KVCache`, on the GPU under CUDA, in host memory on CPU, grown when a
step needs more room); each step writes a layer's present where the layer below kept its past (I/O
binding by pointer), and the graph's ``beam_idx`` input picks the cache rows each new row continues, which is how beam
search reorders it and how finished greedy rows are dropped, without a copy through numpy. The cache
is fp32, or fp16 for ``ort-int4-fp16`` (read from the graph's inputs); the logits are always fp32.

Decoding reproduces transformers' ``generate`` as :func:`idc_lite.decoding.generate_kwargs` calls
it, token for token: greedy stops a row at an EOS id and pads it with ``pad_token_id`` after that;
beam search is transformers' vectorised beam search (top ``max(2, 1 + n_eos) * num_beams``
candidates per step, hypotheses scored ``sum logprobs / generated_len ** length_penalty``,
``early_stopping=False`` heuristic, best hypothesis returned, padded). Its arithmetic is
transformers' own, in float32 and in the same order, so that scores round alike and ties break
alike (lowest index first) wherever the logits agree.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np

from ..artifact import DECODER_INPUTS, DECODER_LOGITS, DecoderShape, Manifest, cache_numpy_dtype, past_names
from ..errors import ArtifactError
from ..settings import GenerationSettings, TokenSettings

logger = logging.getLogger("idc_lite")

def load_ort_decoder(manifest: Manifest, name: str, device: str, providers: list[str] | None = None,
                     threads: int | None = None, profile_prefix: str | None = None) -> "OrtDecoder":
    """Open the artifact's ONNX Runtime decoder ``name`` on ``device`` (profiled: see ``open_session``)."""
    from .sessions import open_session

    path = manifest.decoder_graph(name)
    session = open_session(path, device, providers, threads, profile_prefix=profile_prefix)
    return OrtDecoder(session, manifest.decoders[name].shape, path)


class OrtDecoder:
    """Generation with an ONNX Runtime decoder session; see the module docstring."""

    def __init__(self, session, shape: DecoderShape, path: Path | None = None):
        self.session = session
        self.shape = shape
        self.num_layers, self.num_heads, self.head_dim = shape.layers, shape.heads, shape.head_dim
        self.hidden_size, self.vocab_size = shape.hidden_size, shape.vocab_size
        self.past = past_names(self.num_layers)
        self.present = past_names(self.num_layers, "present")
        names = {i.name for i in session.get_inputs()}
        missing = [n for n in (*DECODER_INPUTS, *self.past) if n not in names]
        if missing:
            raise ArtifactError(path or "decoder graph", f"the decoder graph lacks inputs {', '.join(missing)}; "
                                "re-export the artifact with this version of idc-lite")
        self.cache_dtype = cache_numpy_dtype(session)
        provider = session.get_providers()[0]
        self.device_type = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        options = session.get_provider_options().get(provider, {})
        self.device_id = int(options.get("device_id", 0))

    # -- one forward step -------------------------------------------------------------------

    def new_cache(self, rows: int, length: int) -> "KVCache":
        """An empty cache with room for ``rows`` rows and ``length`` positions (it grows when a step needs more)."""
        return KVCache(self, rows, length)

    def _step(self, embeds: np.ndarray, ids: np.ndarray, total_len: int, beam_idx: np.ndarray,
              cache: "KVCache") -> np.ndarray:
        """Run the graph once; return the last-position logits as numpy. ``cache`` goes one step on.

        An empty ``cache`` is a prefill; else its rows ``beam_idx`` are continued.
        """
        rows = len(beam_idx)
        # Host inputs stay referenced here until the run is over (ONNX Runtime may read their memory).
        host = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "attention_mask": np.ones((ids.shape[0], total_len), dtype=np.int64),
            "beam_idx": np.ascontiguousarray(beam_idx, dtype=np.int64),
        }
        if cache.length == 0:
            empty = np.zeros((rows, self.num_heads, 0, self.head_dim), dtype=self.cache_dtype)
            host.update(dict.fromkeys(self.past, empty))
        binding = self.session.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        if cache.length:
            for name, pointer in zip(self.past, cache.past_pointers()):
                binding.bind_input(name, self.device_type, self.device_id, self.cache_dtype,
                                   cache.shape(cache.rows, cache.length), pointer)
        binding.bind_output(DECODER_LOGITS, "cpu")
        for name, pointer in zip(self.present, cache.present_pointers(rows, total_len)):
            binding.bind_output(name, self.device_type, self.device_id, self.cache_dtype,
                                cache.shape(rows, total_len), pointer)
        self.session.run_with_iobinding(binding)
        cache.advance(rows, total_len)
        return binding.get_outputs()[0].numpy()

    # -- generation -------------------------------------------------------------------------

    def generate(self, query_embeds: np.ndarray, prefix: list[int], settings: GenerationSettings,
                 tokens: TokenSettings) -> list[list[int]]:
        """New token ids per batch item, padded to the longest, as transformers' ``generate`` returns them."""
        from ..decoding import generate_kwargs

        options = generate_kwargs(settings, tokens)
        unsupported = options["do_sample"] or options["early_stopping"] is not False \
            or options["repetition_penalty"] != 1.0 or options["no_repeat_ngram_size"]
        if unsupported:
            raise NotImplementedError("the ONNX Runtime decoder implements greedy and beam search without sampling, "
                                      "early stopping or repetition penalties only")
        query = np.ascontiguousarray(query_embeds, dtype=np.float32)
        if query.ndim != 3 or query.shape[2] != self.hidden_size:
            raise ValueError(f"query embeddings of shape {query.shape}, the decoder takes (batch, n, {self.hidden_size})")
        if options["num_beams"] == 1:
            return self._greedy(query, prefix, options)
        return self._beam_search(query, prefix, options)

    def _greedy(self, query: np.ndarray, prefix: list[int], options: dict) -> list[list[int]]:
        batch = query.shape[0]
        eos = np.asarray(options["eos_token_id"], dtype=np.int64)
        ids = np.tile(np.asarray(prefix, dtype=np.int64), (batch, 1))
        total = query.shape[1] + ids.shape[1]
        cache = self.new_cache(batch, total + min(options["max_new_tokens"], KVCache.GROWTH))
        logits = self._step(query, ids, total, np.arange(batch), cache)
        rows = np.arange(batch)  # batch item of each row still running
        out = [[] for _ in range(batch)]
        for step in range(options["max_new_tokens"]):
            next_tokens = logits.argmax(-1)
            for row, token in zip(rows, next_tokens):
                out[row].append(int(token))
            running = ~np.isin(next_tokens, eos)
            if step + 1 == options["max_new_tokens"] or not running.any():
                break
            # Finished rows are dropped: transformers feeds them pad tokens whose logits it never reads.
            keep = np.flatnonzero(running)
            rows, total = rows[keep], total + 1
            logits = self._step(self._no_embeds(len(keep)), next_tokens[keep, None], total, keep, cache)
        return _pad(out, options["pad_token_id"])

    def _beam_search(self, query: np.ndarray, prefix: list[int], options: dict) -> list[list[int]]:
        """transformers' ``_beam_search`` (length_penalty, early_stopping=False), in numpy float32."""
        batch, beams, vocab = query.shape[0], options["num_beams"], self.vocab_size
        max_new = options["max_new_tokens"]
        eos = np.asarray(options["eos_token_id"], dtype=np.int64)
        length_penalty = float(options["length_penalty"])
        pad = options["pad_token_id"]
        fill = pad if pad else int(eos[0])  # transformers: `pad_token_id or eos_token_id[0]`
        keep_k = max(2, 1 + len(eos)) * beams
        top_beams = np.arange(keep_k) < beams
        neg = np.float32(-1.0e9)

        ids = np.tile(np.asarray(prefix, dtype=np.int64), (batch, 1))
        total = query.shape[1] + ids.shape[1]
        # The prefill runs once per batch item; its cache rows are then repeated for the beams.
        cache = self.new_cache(batch * beams, total + min(max_new, KVCache.GROWTH))
        logits = self._step(query, ids, total, np.arange(batch), cache)
        logits = np.repeat(logits, beams, axis=0)
        cache_rows = np.repeat(np.arange(batch), beams)  # cache row of each (item, beam); then one row each
        source_rows = np.arange(batch * beams)

        running = np.full((batch, beams, max_new), fill, dtype=np.int64)
        running_scores = np.zeros((batch, beams), dtype=np.float32)
        running_scores[:, 1:] = neg
        finished = np.full((batch, beams, max_new), fill, dtype=np.int64)
        finished_scores = np.full((batch, beams), neg, dtype=np.float32)
        finished_lengths = np.zeros((batch, beams), dtype=np.int64)
        is_finished = np.zeros((batch, beams), dtype=bool)
        improvable = np.ones((batch, 1), dtype=bool)
        offsets = (np.arange(batch) * beams)[:, None]

        for cur in range(max_new):
            if cur:
                total += 1
                logits = self._step(self._no_embeds(batch * beams), running[:, :, cur - 1].reshape(-1, 1),
                                    total, cache_rows[source_rows], cache)
                cache_rows = np.arange(batch * beams)
            log_probs = _log_softmax(logits.astype(np.float32, copy=False)).reshape(batch, beams, vocab)
            log_probs = (log_probs + running_scores[:, :, None]).reshape(batch, beams * vocab)

            # c. the top keep_k continuations over all beams, best first
            top = _topk(log_probs, keep_k)
            top_scores = np.take_along_axis(log_probs, top, axis=1)
            top_beam, top_token = top // vocab, top % vocab
            top_seqs = np.take_along_axis(running, top_beam[:, :, None], axis=1)
            top_seqs[:, :, cur] = top_token
            # d. which of them stop here (an EOS id, or the length limit)
            hits = np.isin(top_token, eos) | (cur + 1 >= max_new)
            # e. the best num_beams that go on
            going = top_scores + hits.astype(np.float32) * neg
            chosen = _topk(going, beams)
            running = np.take_along_axis(top_seqs, chosen[:, :, None], axis=1)
            running_scores = np.take_along_axis(going, chosen, axis=1)
            source_rows = (np.take_along_axis(top_beam, chosen, axis=1) + offsets).reshape(-1)
            # f. finished hypotheses: only the top num_beams candidates count, scored by length
            just_finished = hits & top_beams[None, :]
            scores = top_scores / np.float32((cur + 1) ** length_penalty)
            scores = scores + (~improvable).astype(np.float32) * neg
            scores = scores + (~just_finished).astype(np.float32) * neg
            merged_scores = np.concatenate([finished_scores, scores], axis=1)
            best = _topk(merged_scores, beams)
            finished = np.take_along_axis(np.concatenate([finished, top_seqs], axis=1), best[:, :, None], axis=1)
            finished_scores = np.take_along_axis(merged_scores, best, axis=1)
            finished_lengths = np.take_along_axis(
                np.concatenate([finished_lengths, np.full((batch, keep_k), cur + 1)], axis=1), best, axis=1)
            is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), best, axis=1)
            # g. can a running beam still beat the worst finished one? (early_stopping=False heuristic)
            best_running = running_scores[:, :1] / np.float32((cur + 1) ** length_penalty)
            worst = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), neg)
            improvable = improvable & (best_running > worst).any(axis=-1, keepdims=True)
            if not improvable.any() or hits.all():
                break

        length = int(finished_lengths[:, 0].max())
        return [row[:length].tolist() for row in finished[:, 0]]

    def _no_embeds(self, rows: int) -> np.ndarray:
        return np.zeros((rows, 0, self.hidden_size), dtype=np.float32)


class KVCache:
    """The KV cache of one generation: one slot (a key and a value buffer) per layer, and one spare.

    A step reads layer ``j``'s past from one slot and writes its present into the slot that held
    layer ``j - 1``'s past (layer 0's into the spare one), all bound by pointer on the session's device;
    the slots then turn by one. That is safe because a step reads each past once, through the graph's
    ``beam_idx`` Gather, and layer ``j``'s present is computed from layer ``j - 1``'s output, which
    needs that layer's past read first: whichever order ONNX Runtime runs the nodes in, a slot is
    written only after its past was read (the export checks that each past input is read by one
    Gather: ``export.ort_decoder.check_past_reads``). So the cache takes ``layers + 1`` slots where
    reading from one set of buffers and writing into another took ``2 * layers``.

    A step allocates nothing unless a slot it writes is too small; that slot is then replaced by one
    :data:`GROWTH` positions longer than the step needs (the old one is kept until the step has read
    it). Letting ONNX Runtime allocate each step's cache instead, one position longer than the one it
    frees, left its arena unable to reuse the freed blocks, and it grew by more than the cache itself.
    Device buffers are ORT values; host ones are numpy arrays over anonymous maps of their own, so that
    a finished generation gives its cache back to the system (glibc keeps the freed pages of heap
    arrays), and pages never written are never resident. The measurements: ``docs/design.md``.
    """

    #: Positions a (re)allocated slot holds beyond what the step that needed it writes.
    GROWTH = 32

    def __init__(self, decoder: "OrtDecoder", rows: int, length: int):
        self._decoder = decoder
        self.layers, self.heads, self.head_dim = decoder.num_layers, decoder.num_heads, decoder.head_dim
        # Each slot: ([key, value] buffers, their pointers, size in elements).
        self._slots = [self._allocate(rows * self.heads * length * self.head_dim) for _ in range(self.layers + 1)]
        self._retired: list = []  # slots replaced by bigger ones, kept until the step that reads them is over
        self.base, self.rows, self.length = 0, 0, 0

    def _allocate(self, size: int) -> tuple[list, list[int], int]:
        decoder = self._decoder
        if decoder.device_type == "cpu":
            buffers = [_mapped(size, decoder.cache_dtype) for _ in range(2)]
            return buffers, [b.ctypes.data for b in buffers], size
        from onnxruntime import OrtValue

        buffers = [OrtValue.ortvalue_from_shape_and_type([size], decoder.cache_dtype, decoder.device_type,
                                                        decoder.device_id) for _ in range(2)]
        return buffers, [b.data_ptr() for b in buffers], size

    def _slot(self, layer: int, base: int) -> int:
        return (base + layer) % (self.layers + 1)

    def past_pointers(self) -> list[int]:
        """Where the cache is: ``past.0.key, past.0.value, past.1.key, ...``."""
        return [p for layer in range(self.layers) for p in self._slots[self._slot(layer, self.base)][1]]

    def present_pointers(self, rows: int, length: int) -> list[int]:
        """Where the next step writes ``rows`` x ``length`` positions (growing the slots that cannot hold them)."""
        base, need = self.base - 1, rows * self.heads * length * self.head_dim
        pointers = []
        for layer in range(self.layers):
            index = self._slot(layer, base)
            if self._slots[index][2] < need:
                self._retired.append(self._slots[index])  # it may hold the past of layer - 1
                self._slots[index] = self._allocate(rows * self.heads * (length + self.GROWTH) * self.head_dim)
            pointers += self._slots[index][1]
        return pointers

    def advance(self, rows: int, length: int) -> None:
        """The step that wrote at :meth:`present_pointers` is over: its present is now the past."""
        self.base = (self.base - 1) % (self.layers + 1)
        self.rows, self.length = rows, length
        self._retired.clear()

    def shape(self, rows: int, length: int) -> list[int]:
        return [rows, self.heads, length, self.head_dim]

    def arrays(self) -> list[np.ndarray]:
        """The current cache tensors (``past.0.key, past.0.value, ...``), copied to numpy (for checks)."""
        count = self.rows * self.heads * self.length * self.head_dim
        shape = self.shape(self.rows, self.length)
        return [(b if isinstance(b, np.ndarray) else b.numpy())[:count].reshape(shape).copy()
                for layer in range(self.layers) for b in self._slots[self._slot(layer, self.base)][0]]

    @property
    def slots(self) -> int:
        return len(self._slots)

    def sizes(self) -> list[int]:
        """Elements each slot's key (and value) buffer holds."""
        return [size for _, _, size in self._slots]

    @property
    def device(self) -> str:
        first = self._slots[0][0][0]
        return "cpu" if isinstance(first, np.ndarray) else first.device_name().lower()


def _mapped(size: int, dtype) -> np.ndarray:
    """An array of ``size`` zeros in pages of its own (an anonymous map): freed, they go back to the system."""
    dtype = np.dtype(dtype)
    pages = mmap.mmap(-1, max(1, size * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(pages, dtype=dtype, count=size)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, largest first (ties: lowest index first)."""
    if k < scores.shape[-1]:
        candidates = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
        candidates.sort(axis=-1)  # index order, so that the stable sort below breaks ties by index
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, candidates, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(candidates, order, axis=-1)[:, :k]


def _pad(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max(map(len, rows))
    return [row + [pad] * (width - len(row)) for row in rows]
