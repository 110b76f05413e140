"""Options shared by the commands that run a model, declared once, and the captioner they build.

A command decorated with :func:`model_options` gets every model option (``--model``, ``--adapter``,
``--device``, ``--max-new-tokens``, ...) on its command line and receives them as one
:class:`ModelOptions` argument named ``options``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, fields
from typing import Annotated, Optional, get_type_hints

import typer

from ..settings import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ModelOptions:
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model directory, hub id or idc-lite artifact. Default: the embedded model.")] = None
    adapter: Annotated[Optional[str], typer.Option(
        "--adapter", "-a", help="LoRA adapter folder (PEFT safetensors or legacy BLIP2IDC adapter_model.bin).")] = None
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")] = "auto"
    backend: Annotated[str, typer.Option("--backend", help="auto (lite for an artifact), reference (for an "
                                         "artifact: the base and adapter it ships) or lite.")] = "auto"
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="Reference backend dtype: fp32, fp16 or bf16 (default fp16 on CUDA, fp32 on CPU).")] = None
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", min=1, help="Most tokens to generate. Default: the artifact's, else 77.",
        show_default=False)] = None
    num_beams: Annotated[Optional[int], typer.Option(
        "--num-beams", min=1, help="Beam width (1 = greedy, as BLIP2IDC). Default: the artifact's, else 1.",
        show_default=False)] = None
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", help="Optional text prompt after the image (BLIP2IDC uses none).")] = None
    size_policy: Annotated[Optional[str], typer.Option(
        "--size-policy", help="Pairs of different sizes: smallest (both to the smaller size, BLIP2IDC demo), "
        "after (before resized to after, IER loaders) or strict (refuse). Default: the artifact's, else smallest.",
        show_default=False)] = None
    decoder: Annotated[Optional[str], typer.Option(
        "--decoder", help="Lite backend: which of the artifact's decoders (ort-int4, bnb-int4, torch-fp32, ...).")] = None
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Lite backend: ONNX Runtime CPU threads.")] = None
    max_image_bytes: Annotated[int, typer.Option(
        "--max-image-bytes", min=1, help="Refuse an image file larger than this.")] = MAX_IMAGE_BYTES
    max_image_pixels: Annotated[int, typer.Option(
        "--max-image-pixels", min=1, help="Refuse an image with more pixels than this (decompression bombs).")] = MAX_IMAGE_PIXELS

    def image_limits(self):
        """The :class:`~idc_lite.settings.ImageLimits` these options set."""
        from ..settings import ImageLimits

        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def captioner(self):
        """A :class:`idc_lite.Captioner` for these options (slow: loads the model)."""
        from ..captioner import Captioner
        from ..errors import IdcError
        from ..runtime import DTYPES
        from ..settings import CompositionSettings, GenerationSettings

        # Only what was given on the command line overrides the settings an artifact records.
        generation_given = {k: v for k, v in (("max_new_tokens", self.max_new_tokens), ("num_beams", self.num_beams),
                                              ("prompt", self.prompt)) if v is not None}
        try:  # bad values fail before the (slow) model load
            CompositionSettings(size_policy=self.size_policy or "smallest")
            GenerationSettings(**generation_given)
        except ValueError as exc:
            raise IdcError(None, str(exc)) from None
        if self.dtype is not None and self.dtype not in DTYPES:
            raise IdcError(None, f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise IdcError(None, f"--device must be auto, cpu or cuda[:N], not {self.device!r}")
        captioner = Captioner(
            self.model, self.adapter, device=self.device, dtype=self.dtype, backend=self.backend,
            revision=self.revision, image_limits=self.image_limits(), decoder=self.decoder, threads=self.threads,
        )
        if self.size_policy is not None:
            captioner.composition = dataclasses.replace(captioner.composition, size_policy=self.size_policy)
        if generation_given:
            captioner.generation = dataclasses.replace(captioner.generation, **generation_given)
        return captioner


def model_options(command):
    """Give a Typer ``command(..., options: ModelOptions)`` every :class:`ModelOptions` field as an option."""
    # Annotations are strings under ``from __future__ import annotations``: give Typer the resolved ones.
    own_hints = get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
           for p in inspect.signature(command).parameters.values() if p.name != "options"]
    hints = get_type_hints(ModelOptions, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(ModelOptions)]
    names = [f.name for f in fields(ModelOptions)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        return command(options=ModelOptions(**{name: kwargs.pop(name) for name in names}), **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *shared])
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *shared)}
    return wrapper
