"""The one place for the settings that the reference and the lite paths share.

Composition (how a pair becomes one picture), the model's image-processor settings (how that picture
becomes a tensor) and generation (how a caption is produced) are plain frozen dataclasses. Backends
receive them; they never keep their own copies, so two paths cannot drift apart. The artifact
manifest stores them with :func:`to_dict` and reads them back with ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

#: How pairs of different sizes are brought to one size before stacking.
#: ``smallest``: BLIP2IDC's demo: both images to the smaller width and the smaller height (Lanczos).
#: ``after``: BLIP2IDC's IER / Emu loaders: *before* resized to *after*'s size (bicubic).
#: ``strict``: refuse pairs whose sizes differ.
SIZE_POLICIES = ("smallest", "after", "strict")

#: BLIP-2's CLIP normalisation, used when a model directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The zero-shot prompt of the BLIP2IDC paper's baseline; never used unless asked for.
ZERO_SHOT_PROMPT = "Describe the differences between the two images"


@dataclass(frozen=True)
class CompositionSettings:
    """How a (before, after) pair becomes one canvas: before on top, after below."""

    size_policy: str = "smallest"
    #: Colour that transparent pixels are composited onto.
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self):
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {', '.join(SIZE_POLICIES)}, not {self.size_policy!r}")


#: Default caps on one input image (:class:`ImageLimits`): its file or bytes, and its pixels. An
#: uncompressed 40-megapixel RGB image is 120 MB, so real photos pass both; a file or a header that
#: asks for more is refused before it is read or decoded.
MAX_IMAGE_BYTES = 128 << 20
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageLimits:
    """What one input image may cost: ``max_bytes`` of file (or bytes) read, ``max_pixels`` decoded.

    These belong to whoever runs idc-lite, never to a model or an artifact, so no manifest carries
    them. Above Pillow's own bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) Pillow refuses too, unless
    that limit is raised as well.
    """

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be at least 1, not {self.max_bytes} bytes / {self.max_pixels} pixels")


@dataclass(frozen=True)
class ProcessorSettings:
    """The model's own image-processor settings (``preprocessor_config.json``)."""

    height: int = 224
    width: int = 224
    #: PIL resampling filter code (3 = bicubic, BLIP-2's default).
    resample: int = 3
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "ProcessorSettings":
        """Read ``preprocessor_config.json`` (or the ``image_processor`` part of ``processor_config.json``)."""
        model_dir = Path(model_dir)
        raw = None
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = model_dir / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise ModelError(path, f"cannot read the image-processor settings ({exc})") from None
                raw = data.get(key) if key else data
                if raw is not None:
                    break
        if raw is None:
            return cls()
        size = raw.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise ModelError(model_dir, f"image-processor size {size!r} is not a fixed height x width, as BLIP-2 uses")
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(raw.get("resample", 3)),
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(v) for v in raw.get("image_std", CLIP_STD)),
        )


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. The defaults are BLIP2IDC's: no prompt, greedy, 77 new tokens."""

    max_new_tokens: int = 77
    num_beams: int = 1
    prompt: str | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, not {self.num_beams}")


@dataclass(frozen=True)
class TokenSettings:
    """Token ids of the model that decoding depends on, resolved once from its configs."""

    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int
    num_query_tokens: int


def to_dict(settings) -> dict:
    """A JSON-ready dict of a settings dataclass."""
    return dataclasses.asdict(settings)


def from_dict(cls, data: dict):
    """Rebuild a settings dataclass from :func:`to_dict` output, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key in names:
            values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
