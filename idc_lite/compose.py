"""Pair composition: (before, after) -> one stacked canvas -> the model's pixel tensor.

This is BLIP2IDC's input, and every backend goes through it:

1. each image is opened (path, bytes, ``PIL.Image`` or ``HxWx3`` uint8 array), its EXIF orientation
   applied, and converted to RGB from whatever Pillow mode it has, transparency composited onto
   white;
2. images of different sizes are brought to one size by the size policy
   (:data:`idc_lite.settings.SIZE_POLICIES`; the default is BLIP2IDC's demo: both to the smaller
   width and the smaller height, Lanczos);
3. *before* is stacked on top of *after* on one RGB canvas of (W, H_before + H_after);
4. the canvas goes through the model's image processor: resize to its height x width (aspect ratio
   not kept), rescale, normalise. The result is a float32 ``(3, H, W)`` array; :func:`compose_batch`
   stacks several into ``(N, 3, H, W)``.

Only numpy and Pillow are used, so the lite runtime needs neither transformers nor torch here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .settings import CompositionSettings, ProcessorSettings

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

# Pillow's decompression-bomb guard stays on; a picture above it is refused with a clear message.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def describe_input(image: ImageInput) -> str:
    """A short name for an input, used in error messages and results."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"<PIL.Image {image.mode} {image.width}x{image.height}>"
    if isinstance(image, np.ndarray):
        return f"<array {'x'.join(map(str, image.shape))} {image.dtype}>"
    return f"<{type(image).__name__}>"


def load_image(image: ImageInput, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open one input as an upright RGB ``PIL.Image`` (EXIF applied, alpha on ``background``)."""
    name = describe_input(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, name)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise InputError(name, "no such file")
        if path.is_dir():
            raise InputError(name, "is a folder, expected an image file")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InputError(name, f"cannot read file ({exc.strerror or exc})") from None
        pil = _decode(data, name)
    elif isinstance(image, (bytes, bytearray)):
        pil = _decode(bytes(image), name)
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise InputError(name, "unsupported input type; give a path, bytes, a PIL.Image or an HxWx3 uint8 array")
    try:
        pil = ImageOps.exif_transpose(pil)
        return to_rgb(pil, background)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(name, f"cannot decode image ({exc})") from None


def _decode(data: bytes, name: str) -> Image.Image:
    if not data:
        raise InputError(name, "empty file, not an image")
    try:
        pil = Image.open(io.BytesIO(data))
        pil.load()
    except UnidentifiedImageError:
        raise InputError(name, "not an image file (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(name, f"image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(name, f"corrupt or truncated image ({exc})") from None
    return pil


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(name, "arrays must be uint8 (H x W x 3, RGB)")
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(array), "RGB")
    if array.ndim == 3 and array.shape[2] == 4:
        return to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    raise InputError(name, "arrays must have shape H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (gray)")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent pixels are composited onto ``background``.

    High bit-depth modes are scaled, not clipped: 16-bit integer images (``I;16*``, and ``I`` when
    its values exceed 255) map 0..65535 to 0..255; float images (``F``) in 0..1 map to 0..255, other
    float ranges are clipped to 0..255.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        return _scale_to_l(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_rgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, lab_to_rgb)
    return image.convert("RGB")


def _scale_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def stack_pair(
    before: Image.Image, after: Image.Image, settings: CompositionSettings = CompositionSettings(),
    names: tuple[str, str] = ("before", "after"),
) -> Image.Image:
    """Bring two RGB images to one size by the size policy and stack them, before on top."""
    if before.size != after.size:
        if settings.size_policy == "strict":
            raise InputError(
                names[1], f"size {after.width}x{after.height} differs from {names[0]} "
                f"({before.width}x{before.height}) and the size policy is 'strict'"
            )
        if settings.size_policy == "after":
            before = before.resize(after.size, Image.Resampling.BICUBIC)
        else:
            size = (min(before.width, after.width), min(before.height, after.height))
            if before.size != size:
                before = before.resize(size, Image.Resampling.LANCZOS)
            if after.size != size:
                after = after.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (before.width, before.height + after.height))
    canvas.paste(before, (0, 0))
    canvas.paste(after, (0, before.height))
    return canvas


def preprocess(canvas: Image.Image, processor: ProcessorSettings = ProcessorSettings()) -> np.ndarray:
    """The BLIP-2 image processor on one RGB image: resize, rescale, normalise -> float32 (3, H, W)."""
    size = (processor.width, processor.height)
    if canvas.size != size:
        canvas = canvas.resize(size, Image.Resampling(processor.resample))
    pixels = np.asarray(canvas)
    if processor.do_rescale:
        pixels = (pixels.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if processor.do_normalize:
        mean = np.asarray(processor.image_mean, dtype=np.float32)
        std = np.asarray(processor.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def compose_pair(
    before: ImageInput, after: ImageInput,
    composition: CompositionSettings = CompositionSettings(),
    processor: ProcessorSettings = ProcessorSettings(),
) -> np.ndarray:
    """One pair -> float32 pixel array (3, H, W), ready for the vision encoder."""
    names = (describe_input(before), describe_input(after))
    canvas = stack_pair(
        load_image(before, composition.background), load_image(after, composition.background), composition, names
    )
    return preprocess(canvas, processor)


def compose_batch(
    pairs, composition: CompositionSettings = CompositionSettings(), processor: ProcessorSettings = ProcessorSettings()
) -> np.ndarray:
    """Several pairs -> float32 pixel batch (N, 3, H, W)."""
    return np.stack([compose_pair(b, a, composition, processor) for b, a in pairs])
