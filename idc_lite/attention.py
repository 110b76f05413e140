"""Where the ViT's heads attended over the stacked pair: the attention maps of seed Figure 1.

BLIP2IDC's encoder sees one picture, *before* stacked on top of *after* and squeezed to a square.
Each head of each ViT layer spreads, from every token (the class token, then one per patch, row by
row), a distribution of attention over every token. :meth:`idc_lite.Captioner.attention` runs the
pair through the model and keeps one layer's distributions, from a chosen *source*:

- ``"cls"``: from the class token (what the layer gathers for the picture as a whole);
- ``"mean"``: the mean over every patch's distribution (where the patches look, on average);
- ``(x, y)``: from the patch under the point (x, y) of the stacked pair (pixels of the composed
  canvas, before on top): does a patch of the *after* half look at the same place in *before*?

:class:`AttentionMaps` holds them as arrays with the grid's geometry, split into the *before* and
*after* halves and mapped back to each image's own size (:meth:`AttentionMaps.halves`), and
:func:`render_attention` draws the picture, laid out like seed Figure 1: the pair, then one overlay per
head, brighter where the head attended more. Pillow only: no plotting library at run time.

What the maps are not: a map of what changed. They say where the heads attended while the encoder
read the pair; the paper reads some heads as comparing corresponding parts of the two images, and
calls the maps noisy. Both backends give them: the reference backend from transformers' attention
outputs, the lite backend from the artifact's attention graph (``export/attention.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .compose import ImageInput, describe_input, load_image, preprocess, stack_pair
from .errors import IdcError, OptionError

if TYPE_CHECKING:
    from .captioner import Captioner

#: Where the maps are drawn from: the class token, the mean over the patches, or a point (x, y).
SOURCES = ("cls", "mean")
Source = Union[str, tuple[int, int]]
#: :meth:`AttentionMaps.save_npz` maps each half at its image's own size, the longest side at most this.
MAX_MAP_SIDE = 1024
#: The picture's honest label, printed under its title.
LABEL = ("Where each head attended over the stacked pair (before on top, after below): brighter = more "
         "attention, each head scaled to its own maximum. Not a map of what changed.")
#: An increasing-brightness colour ramp (black, purple, red, orange, pale yellow), so brighter = more.
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)


@dataclass(frozen=True)
class ViTGeometry:
    """What a backend's ViT looks like: layers, heads per layer, patch size and the input's patch grid."""

    layers: int
    heads: int
    patch_size: int
    grid: tuple[int, int]  # patch rows, patch columns of the model's input

    @property
    def tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


@dataclass(frozen=True, eq=False)
class AttentionMaps:
    """One ViT layer's attention over a stacked pair, for the heads asked for, from one source.

    ``matrix`` (heads, tokens, tokens): the layer's attention probabilities, row ``i`` from token
    ``i`` (token 0 the class token, then the patches row by row), each row summing to 1. ``weights``
    (heads, tokens): the row(s) of ``source``, summing to 1. Sizes are (width, height).
    """

    matrix: np.ndarray
    weights: np.ndarray
    layer: int
    layers: int
    heads: tuple[int, ...]
    source: str
    grid: tuple[int, int]
    patch_size: int
    input_size: tuple[int, int]
    canvas_size: tuple[int, int]
    before_size: tuple[int, int]
    after_size: tuple[int, int]
    source_patch: tuple[int, int] | None = None  # (row, column) of the patch of an (x, y) source
    canvas: Image.Image | None = field(default=None, repr=False, compare=False)  # the stacked pair

    @property
    def maps(self) -> np.ndarray:
        """(heads, rows, columns): the weight on each patch of the input's grid (before in the top rows)."""
        return self.weights[:, 1:].reshape(len(self.heads), *self.grid)

    @property
    def cls_weight(self) -> np.ndarray:
        """(heads,): the weight on the class token, which no patch of the maps shows."""
        return self.weights[:, 0]

    def halves(self, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The maps of the *before* and the *after* half, each at its image's own size and aspect ratio.

        (heads, height, width) each; every pixel holds the weight of the patch the model saw it in.
        ``max_side`` caps the longest side (aspect ratio kept), for big photographs.
        """
        return (self._half(0, _capped(self.before_size, max_side)),
                self._half(1, _capped(self.after_size, max_side)))

    def _half(self, which: int, size: tuple[int, int]) -> np.ndarray:
        width, height = size
        input_w, input_h = self.input_size
        rows, cols = self.grid
        ys = (which + (np.arange(height) + 0.5) / height) * (input_h / 2)  # input pixels, the half's band
        xs = (np.arange(width) + 0.5) / width * input_w
        iy = np.minimum((ys // self.patch_size).astype(int), rows - 1)
        ix = np.minimum((xs // self.patch_size).astype(int), cols - 1)
        return self.maps[:, iy[:, None], ix[None, :]]

    def save_npz(self, path: str | os.PathLike, max_side: int | None = MAX_MAP_SIDE) -> None:
        """Write the arrays and their geometry to ``path`` (numpy ``.npz``)."""
        before, after = self.halves(max_side)
        np.savez_compressed(
            path, before=before, after=after, maps=self.maps, cls_weight=self.cls_weight, matrix=self.matrix,
            weights=self.weights, heads=np.asarray(self.heads), layer=self.layer, layers=self.layers,
            source=self.source, grid=np.asarray(self.grid), patch_size=self.patch_size,
            input_size=np.asarray(self.input_size), canvas_size=np.asarray(self.canvas_size),
            before_size=np.asarray(self.before_size), after_size=np.asarray(self.after_size),
        )


def _capped(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


# ------------------------------------------------------------------------------ options
def check_layer(layer: int, layers: int) -> int:
    """``layer`` from 0 (negative: from the last) as an index into ``layers``; a bad one is one OptionError."""
    if not -layers <= layer < layers:
        raise OptionError(None, f"layer {layer} does not exist: the ViT has {layers} layers "
                          f"(0 to {layers - 1}, or -1 for the last)")
    return layer % layers


def parse_heads(heads: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``all`` / None -> None (every head); ``"0,3"`` or ``[0, 3]`` -> (0, 3)."""
    if heads is None or isinstance(heads, str) and heads.strip().lower() == "all":
        return None
    if isinstance(heads, str):
        try:
            heads = [int(part) for part in heads.split(",")]
        except ValueError:
            raise OptionError(None, f"heads must be 'all' or numbers such as 0,3; not {heads!r}") from None
    chosen = tuple(dict.fromkeys(int(h) for h in heads))
    if not chosen:
        raise OptionError(None, "no head chosen; give 'all' or numbers such as 0,3")
    return chosen


def check_heads(heads: tuple[int, ...] | None, count: int) -> tuple[int, ...]:
    if heads is None:
        return tuple(range(count))
    bad = [h for h in heads if not 0 <= h < count]
    if bad:
        raise OptionError(None, f"head {bad[0]} does not exist: each layer has {count} heads (0 to {count - 1})")
    return heads


def parse_source(source: Source) -> str | tuple[int, int]:
    """``cls``, ``mean`` or a point: ``"x,y"`` or ``(x, y)``, whole pixels of the stacked pair."""
    if isinstance(source, str):
        if source.strip().lower() in SOURCES:
            return source.strip().lower()
        parts = source.split(",")
        try:
            point = tuple(int(p) for p in parts)
        except ValueError:
            point = ()
    else:
        point = tuple(source)
    if len(point) != 2 or not all(isinstance(v, (int, np.integer)) for v in point):
        raise OptionError(None, f"the source must be cls, mean or x,y (a point of the stacked pair, in pixels); "
                          f"not {source!r}")
    return int(point[0]), int(point[1])


# ------------------------------------------------------------------------------ computing
def pair_attention(
    captioner: Captioner, before: ImageInput, after: ImageInput, *, layer: int = -1,
    heads: str | Sequence[int] | None = None, source: Source = "cls",
) -> AttentionMaps:
    """:meth:`idc_lite.Captioner.attention`: compose the pair as for a caption, run the ViT, keep one layer."""
    backend = captioner.backend
    wanted_heads, wanted_source = parse_heads(heads), parse_source(source)
    geometry: ViTGeometry = backend.attention_geometry()
    layer = check_layer(layer, geometry.layers)
    chosen = check_heads(wanted_heads, geometry.heads)
    names = (describe_input(before), describe_input(after))
    background = captioner.composition.background
    images = load_image(before, background), load_image(after, background)
    canvas = stack_pair(*images, captioner.composition, names)
    pixels = preprocess(canvas, backend.processor)[None]
    probs = np.asarray(backend.attention(pixels, [layer])[layer][0], dtype=np.float32)
    if probs.shape[1:] != (geometry.tokens, geometry.tokens):
        raise IdcError(backend.model_id, f"attention of shape {probs.shape}, expected {geometry.tokens} tokens "
                       f"(a class token and {geometry.grid[0]} x {geometry.grid[1]} patches)")
    matrix = probs[list(chosen)]
    source_patch = None
    if wanted_source == "cls":
        weights = matrix[:, 0]
    elif wanted_source == "mean":
        weights = matrix[:, 1:].mean(axis=1)
    else:
        source_patch = _patch_at(wanted_source, canvas.size, geometry)
        weights = matrix[:, 1 + source_patch[0] * geometry.grid[1] + source_patch[1]]
    label = wanted_source if isinstance(wanted_source, str) else "{},{}".format(*wanted_source)
    return AttentionMaps(
        matrix=matrix, weights=np.ascontiguousarray(weights), layer=layer, layers=geometry.layers, heads=chosen,
        source=label, grid=geometry.grid, patch_size=geometry.patch_size,
        input_size=(backend.processor.width, backend.processor.height), canvas_size=canvas.size,
        before_size=images[0].size, after_size=images[1].size, source_patch=source_patch, canvas=canvas,
    )


def _patch_at(point: tuple[int, int], canvas: tuple[int, int], geometry: ViTGeometry) -> tuple[int, int]:
    """The (row, column) of the patch the model saw the canvas point in."""
    x, y = point
    width, height = canvas
    if not (0 <= x < width and 0 <= y < height):
        raise OptionError(None, f"the point {x},{y} lies outside the stacked pair ({width}x{height} pixels, "
                          "before on top)")
    rows, cols = geometry.grid
    return min(int(y / height * rows), rows - 1), min(int(x / width * cols), cols - 1)


# ------------------------------------------------------------------------------ the picture
@dataclass(frozen=True)
class Layout:
    """Where :func:`render_attention` puts things: the picture's size, the title band and each panel's box.

    Panel 0 is the stacked pair, panel ``i + 1`` head ``heads[i]``; each panel's label sits under it.
    """

    size: tuple[int, int]
    title_lines: tuple[str, ...]
    panels: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom)
    line_height: int


MARGIN, GAP = 8, 6


def attention_layout(maps: AttentionMaps, panel_width: int = 192, columns: int | None = None) -> Layout:
    """The picture's layout for ``maps``: one row of up to ``columns`` panels (default: up to 6) per line."""
    font = _font()
    line = _line_height(font)
    count = 1 + len(maps.heads)
    columns = columns or min(count, 6)
    canvas_w, canvas_h = maps.canvas_size
    panel_h = int(min(max(round(panel_width * canvas_h / canvas_w), panel_width // 2), 3 * panel_width))
    width = 2 * MARGIN + columns * panel_width + (columns - 1) * GAP
    title = _wrap(_title(maps), font, width - 2 * MARGIN) + _wrap(LABEL, font, width - 2 * MARGIN)
    top = MARGIN + len(title) * line + GAP
    rows = -(-count // columns)
    cell_h = panel_h + line + GAP
    panels = []
    for i in range(count):
        left = MARGIN + (i % columns) * (panel_width + GAP)
        upper = top + (i // columns) * cell_h
        panels.append((left, upper, left + panel_width, upper + panel_h))
    return Layout((width, top + rows * cell_h + MARGIN - GAP), tuple(title), tuple(panels), line)


def render_attention(maps: AttentionMaps, panel_width: int = 192, columns: int | None = None) -> Image.Image:
    """The picture of ``maps`` (RGB): title and label, the stacked pair, then one overlay per head, labelled."""
    if maps.canvas is None:
        raise OptionError(None, "these maps carry no picture of the pair to draw on")
    layout = attention_layout(maps, panel_width, columns)
    font = _font()
    picture = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for i, text in enumerate(layout.title_lines):
        draw.text((MARGIN, MARGIN + i * layout.line_height), text, fill=(0, 0, 0), font=font)
    first = layout.panels[0]
    size = (first[2] - first[0], first[3] - first[1])
    pair = maps.canvas.resize(size, Image.Resampling.BILINEAR)
    gray = np.asarray(pair.convert("L"), dtype=np.float64)[..., None]
    labels = ["pair: before / after"]
    labels += [f"head {h}  (class token {w:.1%})" for h, w in zip(maps.heads, maps.cls_weight)]
    for index, box in enumerate(layout.panels):
        if index == 0:
            panel = pair
        else:
            panel = _overlay(maps.maps[index - 1], gray, size)
        picture.paste(panel, box[:2])
        middle = box[1] + size[1] // 2
        draw.line([(box[0], middle), (box[2] - 1, middle)], fill=(255, 255, 255), width=1)
        if maps.source_patch is not None:
            draw.rectangle(_patch_box(maps, box, size), outline=(0, 255, 255), width=2)
        draw.text((box[0], box[3] + 1), labels[index], fill=(0, 0, 0), font=font)
    return picture


def _overlay(grid: np.ndarray, gray: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """One head's map over the darkened pair: the colour ramp of the map scaled to its maximum."""
    peak = float(grid.max())
    scaled = (grid / peak if peak > 0 else grid).astype(np.float32)
    heat = np.asarray(Image.fromarray(scaled).resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(_RAMP))
    colour = np.stack([np.interp(np.clip(heat, 0, 1), stops, _RAMP[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(0.3 * gray + 0.7 * colour, 0, 255).astype(np.uint8))


def _patch_box(maps: AttentionMaps, box, size) -> tuple[int, int, int, int]:
    rows, cols = maps.grid
    row, col = maps.source_patch
    left, top = box[0] + col * size[0] / cols, box[1] + row * size[1] / rows
    return (round(left), round(top), round(left + size[0] / cols) - 1, round(top + size[1] / rows) - 1)


def _title(maps: AttentionMaps) -> str:
    source = {"cls": "the class token", "mean": "every patch (mean)"}.get(maps.source, f"the patch at {maps.source}")
    return (f"ViT layer {maps.layer} (of 0-{maps.layers - 1}), attention from {source}, "
            f"{maps.grid[0]} x {maps.grid[1]} patches of {maps.patch_size} px")


def _font():
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Hg")
    return int(bottom - min(top, 0)) + 3


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels (a longer word keeps a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines
