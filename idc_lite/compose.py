"""Pair composition: (before, after) -> one stacked canvas -> the model's pixel tensor.

This is BLIP2IDC's input, and every backend goes through it:

1. each image is opened (path, bytes, ``PIL.Image`` or ``HxWx3`` uint8 array), its EXIF orientation
   applied, and converted to RGB from whatever Pillow mode it has, transparency composited onto
   white. Inputs are untrusted: a path must be a regular file (never a FIFO or a device, which
   would hang or never end), files and bytes are capped before they are read and images before
   they are decoded (:class:`~idc_lite.settings.ImageLimits`), only :data:`IMAGE_FORMATS` are
   decoded, told by content, and any failure, running out of memory included, is that input's
   :class:`~idc_lite.errors.InputError`;
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
import stat
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import IdcError, InputError, first_line
from .settings import CompositionSettings, ImageLimits, ProcessorSettings

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

#: The image formats idc-lite decodes (Pillow's names), told by content whatever the file's name:
#: PNG, JPEG, WebP, BMP, GIF and TIFF (first frame). Pillow knows some forty more, some handed to
#: outside programs (EPS to Ghostscript); none of them is tried.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
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


def load_image(
    image: ImageInput, background: tuple[int, int, int] = (255, 255, 255), limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Open one input as an upright RGB ``PIL.Image`` (EXIF applied, alpha on ``background``), within ``limits``."""
    name = describe_input(image)
    try:
        if isinstance(image, np.ndarray):
            return _check_pixels(_from_array(image, name), name, limits)
        if isinstance(image, (str, os.PathLike)):
            pil = _open_file(os.fspath(image), name, limits)
        elif isinstance(image, (bytes, bytearray)):
            if len(image) > limits.max_bytes:
                raise InputError(name, f"{len(image)} bytes, more than the {limits.max_bytes} an image may be")
            pil = _decode(io.BytesIO(bytes(image)), name, limits)
        elif isinstance(image, Image.Image):
            pil = _check_pixels(image, name, limits)
        else:
            raise InputError(name, "unsupported input type; give a path, bytes, a PIL.Image or an HxWx3 uint8 array")
        return to_rgb(ImageOps.exif_transpose(pil), background)
    except IdcError:
        raise
    except MemoryError:
        raise InputError(name, "not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's decoders raise many types (OSError, ValueError, SyntaxError, struct.error...)
        raise InputError(name, f"cannot decode image ({type(exc).__name__}: {first_line(exc)})") from None


def _open_file(path: str, name: str, limits: ImageLimits) -> Image.Image:
    """Decode the regular file at ``path``; a FIFO, device or folder is refused before any read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except OSError as exc:
        raise InputError(name, f"cannot read file ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = "is a folder, expected an image file"
    elif not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file (a device, FIFO or socket); give an image file"
    elif info.st_size > limits.max_bytes:
        problem = f"{info.st_size} bytes, more than the {limits.max_bytes} an image may be"
    if problem is not None:
        os.close(fd)
        raise InputError(name, problem)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise InputError(name, f"cannot read file ({exc.strerror or exc})") from None
    if len(data) > limits.max_bytes:  # it grew after the check
        raise InputError(name, f"more than the {limits.max_bytes} bytes an image may be")
    return _decode(io.BytesIO(data), name, limits)


def _decode(fh, name: str, limits: ImageLimits) -> Image.Image:
    """Decode an accepted format from ``fh``, refusing a picture above the pixel cap before decoding it."""
    start = fh.tell()
    if not fh.read(1):
        raise InputError(name, "empty file, not an image")
    fh.seek(start)
    with warnings.catch_warnings():
        # Pillow only warns between its bomb limit and twice that; here that is a refusal too, unless
        # the pixel cap asked for is above Pillow's limit (then the cap itself decides).
        over = "ignore" if limits.max_pixels > (Image.MAX_IMAGE_PIXELS or 0) else "error"
        warnings.simplefilter(over, Image.DecompressionBombWarning)
        try:
            pil = Image.open(fh, formats=IMAGE_FORMATS)
            _check_pixels(pil, name, limits)
            pil.load()
        except UnidentifiedImageError:
            raise InputError(name, f"not an image file of an accepted format ({', '.join(IMAGE_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(name, f"image too large ({first_line(exc)})") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(name, f"corrupt or truncated image ({exc})") from None
    return pil


def _check_pixels(pil: Image.Image, name: str, limits: ImageLimits) -> Image.Image:
    pixels = pil.width * pil.height
    if pixels > limits.max_pixels:
        raise InputError(name, f"image too large: {pil.width}x{pil.height} is {pixels} pixels, "
                         f"more than the {limits.max_pixels} allowed")
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
    limits: ImageLimits = ImageLimits(),
) -> np.ndarray:
    """One pair -> float32 pixel array (3, H, W), ready for the vision encoder.

    Anything that goes wrong with this pair (a bad image, too little memory) is one
    :class:`~idc_lite.errors.InputError`, so a batch can record it and go on.
    """
    names = (describe_input(before), describe_input(after))
    images = load_image(before, composition.background, limits), load_image(after, composition.background, limits)
    try:
        return preprocess(stack_pair(*images, composition, names), processor)
    except IdcError:
        raise
    except MemoryError:
        raise InputError(names[0], f"not enough memory to compose this image with {names[1]}") from None
    except Exception as exc:  # Pillow's resampling on an unusual image
        raise InputError(names[0], f"cannot compose this image with {names[1]} "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def compose_batch(
    pairs, composition: CompositionSettings = CompositionSettings(), processor: ProcessorSettings = ProcessorSettings(),
    limits: ImageLimits = ImageLimits(),
) -> np.ndarray:
    """Several pairs -> float32 pixel batch (N, 3, H, W)."""
    return np.stack([compose_pair(b, a, composition, processor, limits) for b, a in pairs])
