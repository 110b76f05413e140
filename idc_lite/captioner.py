"""The Python API: :class:`Captioner` describes what changed between two images.

    from idc_lite import Captioner
    captioner = Captioner("path/to/model")
    print(captioner.describe("before.jpg", "after.jpg").caption)

A captioner loads its model once and then describes pairs one by one (:meth:`Captioner.describe`) or
in batches (:meth:`Captioner.describe_batch`, an iterator, so that millions of pairs stream through
in bounded memory). Batching never changes a caption: a pair gets the same words alone or in a batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Iterable, Iterator

from .compose import ImageInput, compose_pair, describe_input
from .decoding import decode
from .errors import IdcError, OptionError, first_line, require
from .settings import CompositionSettings, GenerationSettings, ImageLimits

if TYPE_CHECKING:
    from .attention import AttentionMaps
    from .backends import Backend

logger = logging.getLogger("idc_lite")

BACKENDS = ("auto", "reference", "lite")


@dataclass(frozen=True)
class Timings:
    """Seconds spent on one pair. In a batch, the model's time is shared equally by its pairs."""

    compose_s: float
    inference_s: float
    batch_size: int = 1

    @property
    def total_s(self) -> float:
        return self.compose_s + self.inference_s


@dataclass(frozen=True)
class DiffResult:
    """The description of one pair, or the reason it could not be described (``error``)."""

    caption: str | None
    before: str
    after: str
    model: str
    backend: str
    adapter: str | None = None
    timings: Timings = field(default_factory=lambda: Timings(0.0, 0.0))
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["timings"]["total_s"] = self.timings.total_s
        return data


class Captioner:
    """Describe the change between a *before* and an *after* image.

    Args:
        model: a model directory, a hub id (``Salesforce/blip2-opt-2.7b``) or an idc-lite artifact
            directory. ``None`` uses the model embedded in the package.
        adapter: a LoRA adapter directory (PEFT safetensors or legacy BLIP2IDC ``adapter_model.bin``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        dtype: override the reference backend's dtype (fp16 on CUDA, fp32 on CPU by default).
        backend: ``auto`` (lite for an artifact, reference otherwise), ``reference`` or ``lite``.
            ``reference`` on an artifact runs the base and adapter it ships (``--ship-reference``).
        revision, local_files_only: for hub ids.
        merge_adapter: fold the LoRA weights into the base weights after loading.
        composition: how pairs are stacked (:class:`~idc_lite.settings.CompositionSettings`).
        generation: default decoding settings (:class:`~idc_lite.settings.GenerationSettings`).
        image_limits: caps on each input image's bytes and pixels (:class:`~idc_lite.settings.ImageLimits`);
            an image over them is that pair's :class:`~idc_lite.errors.InputError`.
        backend_options: passed to the lite backend: ``decoder`` (which of the artifact's decoders),
            ``providers`` (ONNX Runtime providers) and ``threads`` (ONNX Runtime intra-op threads);
            given for a model that runs on the reference backend, they raise
            :class:`~idc_lite.errors.OptionError`.
    """

    def __init__(
        self, model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None, *,
        device: str = "auto", dtype: str | None = None, backend: str = "auto", revision: str | None = None,
        local_files_only: bool = False, merge_adapter: bool = False,
        composition: CompositionSettings | None = None, generation: GenerationSettings | None = None,
        image_limits: ImageLimits | None = None, **backend_options,
    ):
        if model is None:
            from .default_model import default_model_dir

            model = default_model_dir()
        started = time.perf_counter()
        self.backend: Backend = _load_backend(
            model, adapter, backend=backend, device=device, dtype=dtype, revision=revision,
            local_files_only=local_files_only, merge_adapter=merge_adapter, **backend_options,
        )
        self.load_s = time.perf_counter() - started
        # An artifact carries the settings it was built and validated with; they are the defaults.
        self.composition = composition or getattr(self.backend, "composition", None) or CompositionSettings()
        self.generation = generation or getattr(self.backend, "generation", None) or GenerationSettings()
        self.image_limits = image_limits or ImageLimits()
        logger.info("loaded %s (%s backend) in %.1f s", self.backend.model_id, self.backend.name, self.load_s)

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def describe(
        self, before: ImageInput, after: ImageInput, generation: GenerationSettings | None = None
    ) -> DiffResult:
        """Describe one pair. Bad input raises :class:`~idc_lite.errors.InputError`."""
        return next(self.describe_batch([(before, after)], batch_size=1, generation=generation))

    def attention(
        self, before: ImageInput, after: ImageInput, *, layer: int = -1, heads: str | Iterable[int] | None = None,
        source: str | tuple[int, int] = "cls",
    ) -> AttentionMaps:
        """Where the ViT's heads attended over the stacked pair (seed Figure 1), not a map of what changed.

        ``layer`` from 0 (-1: the last), ``heads`` (None or ``"all"``: every head), ``source``: ``"cls"``,
        ``"mean"`` or a point ``(x, y)`` of the stacked pair. Returns an
        :class:`~idc_lite.attention.AttentionMaps`; :func:`~idc_lite.attention.render_attention` draws it.
        A bad layer or head is an :class:`~idc_lite.errors.OptionError`.
        """
        from .attention import pair_attention

        return pair_attention(self, before, after, layer=layer, heads=heads, source=source)

    def describe_batch(
        self, pairs: Iterable[tuple[ImageInput, ImageInput]], batch_size: int = 8, *,
        generation: GenerationSettings | None = None, on_error: str = "raise",
    ) -> Iterator[DiffResult]:
        """Describe many pairs, ``batch_size`` at a time, yielding results in input order.

        With ``on_error="return"`` a pair that cannot be described (unreadable image, ...) yields a
        result whose ``error`` says why, and the others go on; with ``"raise"`` the error propagates.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if on_error not in ("raise", "return"):
            raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")
        generation = generation or self.generation
        iterator = iter(pairs)
        while chunk := list(islice(iterator, batch_size)):
            yield from self._describe_chunk(chunk, generation, on_error)

    def _describe_chunk(self, chunk, generation, on_error) -> list[DiffResult]:
        import numpy as np

        names = [(describe_input(b), describe_input(a)) for b, a in chunk]
        pixels, compose_s, errors = [], [], {}
        for i, (before, after) in enumerate(chunk):
            started = time.perf_counter()
            try:
                pixels.append(compose_pair(before, after, self.composition, self.backend.processor, self.image_limits))
            except IdcError as exc:
                if on_error == "raise":
                    raise
                errors[i] = str(exc)
            compose_s.append(time.perf_counter() - started)

        captions: list[str] = []
        inference_s = 0.0
        if pixels:
            started = time.perf_counter()
            try:
                captions = decode(self.backend.tokenizer, self.backend.generate(np.stack(pixels), generation))
            except Exception as exc:  # a failed batch is recorded pair by pair, the run goes on
                if on_error == "raise":
                    raise
                logger.exception("batch of %d pairs failed", len(pixels))
                message = f"model failed on this batch ({type(exc).__name__}: {first_line(exc)})"
                errors.update({i: message for i in range(len(chunk)) if i not in errors})
                captions = []
            inference_s = (time.perf_counter() - started) / len(pixels)

        results, produced = [], iter(captions)
        for i, (before_name, after_name) in enumerate(names):
            error = errors.get(i)
            caption = None if error else next(produced)
            results.append(DiffResult(
                caption=caption, before=before_name, after=after_name, model=self.backend.model_id,
                backend=self.backend.name, adapter=self.backend.adapter, error=error,
                timings=Timings(compose_s[i], 0.0 if error else inference_s, len(pixels)),
            ))
        return results


def _load_backend(model, adapter, *, backend, decoder=None, providers=None, threads=None, **options) -> Backend:
    from .artifact import is_artifact

    if backend not in BACKENDS:
        raise OptionError(None, f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        backend = "lite" if is_artifact(model) else "reference"
    if backend == "lite":
        from .backends.lite import LiteBackend

        return LiteBackend(model, adapter, device=options["device"], decoder=decoder, providers=providers, threads=threads)
    given = [name for name, value in (("decoder", decoder), ("providers", providers), ("threads", threads)) if value]
    if given:
        why = ("this runs the artifact's shipped reference" if is_artifact(model) else
               "this is not an idc-lite artifact: it runs on the reference backend")
        raise OptionError(model, f"{' and '.join(given)} apply to the lite backend only, and {why}")
    require("torch", "the reference backend", "reference")
    require("transformers", "the reference backend", "reference")
    from .backends.reference import ReferenceBackend

    return ReferenceBackend(model, adapter, **options)
