"""The synthetic change world: deterministic (before, after) scene pairs with reference captions.

Real image-difference datasets are large downloads with licences of their own; this world gives
training and tests an offline, endless and exactly labelled supply of pairs instead. A *scene* is a
256x256 picture on a plain background with 1 to 5 non-overlapping flat shapes; a *pair* is a scene
and a copy of it with exactly one change of a known category (:data:`CATEGORIES`, the categories of
BLIP2IDC's per-category tables plus ``none``), and 4 to 6 reference captions in varied wording.

Objects are named by the shortest description that tells them apart from the other objects of the
scene ("the star", "the red star", "the small star") in some captions and by size, colour and shape
("the small red star") in others, and located by the ninth of the canvas they are in ("on the
left", "in the upper right", :func:`position_word`).

Sizes: small objects are 32 px and large ones 64 px across on the 256 px canvas, so after a pair is
stacked (512x256) and resized to about 160 px tall they are still about 10 and 20 px: clearly two
sizes. Shapes are drawn at 4x and box-filtered down (exact-coverage anti-aliasing, much faster than
Lanczos at the same quality for flat shapes).

Determinism: pair ``index`` of ``split`` with ``seed`` draws everything from
``numpy.random.default_rng([SPLIT_IDS[split], seed, index])`` (:func:`pair_rng`). NumPy's
SeedSequence hashes the three numbers into independent streams, so a pair never depends on which
other pairs were generated, and train, val and test never share a stream for any seed or index.
The same (split, seed, index) gives the same captions everywhere and the same pixels with the same
NumPy and Pillow versions (Pillow's text rasteriser and NumPy's distribution methods may change
between major versions). Category ``i % 9`` of :data:`CATEGORIES` goes to pair ``i``, so any ``n``
pairs have category counts that differ by at most one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from .datasets import PairRecord, write_jsonl

CANVAS = 256
SUPERSAMPLE = 4
MAX_OBJECTS = 5
#: Free pixels kept between objects, and between an object and the canvas edge.
GAP = 8
MARGIN = 8

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (211, 211, 211),
    "beige": (240, 232, 200),
    "light blue": (176, 214, 240),
    "pale green": (196, 234, 196),
}
SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 150, 52),
    "blue": (31, 80, 210),
    "yellow": (240, 200, 20),
    "purple": (130, 55, 170),
    "orange": (250, 128, 14),
    "black": (20, 20, 20),
}
#: Object extent (bounding-box side) in pixels on the 256 px canvas.
SIZES = {"small": 32, "large": 64}
WORDS = ("cat", "dog", "sun", "hello", "stop", "open", "tree", "boat", "fish", "moon", "home", "sale")
TEXT_SIZE = 40
#: Colours text is written in (yellow is too faint on the light backgrounds).
TEXT_COLORS = ("red", "green", "blue", "purple", "orange", "black")
STYLES = ("grayscale", "posterized", "pixelated")
#: Block side of the ``pixelated`` style, in pixels.
PIXEL_BLOCK = 16
BRIGHTNESS = {"darker": 0.55, "brighter": 1.4}

CATEGORIES = ("add", "remove", "color", "local", "background", "text", "style", "global", "none")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
#: Move directions: caption word -> unit step (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "upper left": (-1, -1),
    "upper right": (1, -1),
    "lower left": (-1, 1),
    "lower right": (1, 1),
}
_NOISE = 2
_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    """One flat shape; ``x``, ``y`` is its centre in canvas pixels."""

    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def extent(self) -> int:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.extent / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)

    @property
    def full_name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Text:
    """A word written on the scene, centred at ``x``, ``y``."""

    word: str
    color: str
    x: int
    y: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = _text_offsets(self.word)
        return (self.x + x0, self.y + y0, self.x + x1, self.y + y1)


@dataclass(frozen=True)
class Scene:
    """What a picture shows: background, objects, optional text and optional whole-image effect.

    ``effect`` is one of :data:`STYLES` or a key of :data:`BRIGHTNESS`, applied after drawing.
    """

    background: str
    objects: tuple[SceneObject, ...]
    text: Text | None = None
    effect: str | None = None


@dataclass(frozen=True)
class SynthPair:
    """A generated pair. ``after`` is ``render_scene(after_scene)``, plus faint noise for ``none``."""

    before: Image.Image
    after: Image.Image
    references: tuple[str, ...]
    category: str
    before_scene: Scene
    after_scene: Scene
    before_description: str
    after_description: str


# ------------------------------------------------------------------------------------ scenes
def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A scene of ``n_objects`` (default: 1 to 5 at random) distinct, non-overlapping objects.

    No two objects share size, colour and shape, so every object has an unambiguous name.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    background = _choice(rng, list(BACKGROUNDS))
    for _ in range(_TRIES):
        objects: list[SceneObject] = []
        for _ in range(n):
            obj = _new_object(rng, Scene(background, tuple(objects)))
            if obj is None:
                break
            objects.append(obj)
        else:
            return Scene(background, tuple(objects))
    raise RuntimeError(f"could not place {n} objects on the canvas")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 256x256 RGB picture, anti-aliased."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (CANVAS * scale, CANVAS * scale), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, scale)
    if scene.text is not None:
        text = scene.text
        font = _font(TEXT_SIZE * scale)
        draw.text((text.x * scale, text.y * scale), text.word, fill=COLORS[text.color], font=font, anchor="mm")
    image = image.reduce(scale)
    return _apply_effect(image, scene.effect)


def describe_scene(scene: Scene) -> str:
    """A one-line caption of the scene's contents, objects from left to right.

    e.g. "a large red circle, a small blue star and a large green square on a beige background".
    """
    names = [_a(obj.full_name) for obj in sorted(scene.objects, key=lambda o: (o.x, o.y))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{listed} on {_a(scene.background)} background"
    if scene.text is not None:
        caption += f", with the word '{scene.text.word}' written {_at(position_word(scene.text.x, scene.text.y))}"
    if scene.effect is not None:
        caption += {
            "grayscale": ", in grayscale",
            "posterized": ", posterized",
            "pixelated": ", pixelated",
            "darker": ", darkened",
            "brighter": ", brightened",
        }[scene.effect]
    return caption


def position_word(x: float, y: float) -> str:
    """Where a point is, by ninths of the canvas: "upper left", "top", ..., "center", ..."""
    col = "left" if x < CANVAS / 3 else "right" if x >= 2 * CANVAS / 3 else ""
    row = "top" if y < CANVAS / 3 else "bottom" if y >= 2 * CANVAS / 3 else ""
    if row and col:
        return f"{'upper' if row == 'top' else 'lower'} {col}"
    return row or col or "center"


# ------------------------------------------------------------------------------------- pairs
def pair_rng(index: int, seed: int = 0, split: str = "train") -> np.random.Generator:
    """The random stream of one pair: ``default_rng([SPLIT_IDS[split], seed, index])``.

    ``seed`` and ``index`` must be in [0, 2**32) so that the seed words never run into each other.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLIT_IDS)})")
    for name, value in (("seed", seed), ("index", index)):
        if not 0 <= value < 2**32:
            raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return np.random.default_rng([SPLIT_IDS[split], seed, index])


def generate_pair(index: int, seed: int = 0, split: str = "train") -> SynthPair:
    """Pair ``index`` of ``split``: category ``CATEGORIES[index % 9]``, fully determined by its arguments."""
    rng = pair_rng(index, seed, split)
    category = CATEGORIES[index % len(CATEGORIES)]
    low, high = {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(category, (1, MAX_OBJECTS))
    for _ in range(_TRIES):
        before = random_scene(rng, int(rng.integers(low, high + 1)))
        change = _CHANGES[category](before, rng)
        if change is not None:
            break
    else:
        raise RuntimeError(f"could not make a {category!r} change")
    after, pool = change
    after_image = render_scene(after)
    if category == "none":
        after_image = _add_noise(after_image, rng)
    return SynthPair(
        before=render_scene(before),
        after=after_image,
        references=_pick_captions(pool, rng),
        category=category,
        before_scene=before,
        after_scene=after,
        before_description=describe_scene(before),
        after_description=describe_scene(after),
    )


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "test",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write pairs 0..n-1 of ``split`` as an idc-lite JSONL dataset; returns the JSONL path.

    Layout: ``out_dir/images/<id>_before.png``, ``<id>_after.png`` and ``out_dir/<split>.jsonl``
    (:func:`idc_lite.tools.datasets.write_jsonl`), ids ``<split>-000042``. ``progress(done, total)`` is
    called after each pair. Existing files of the same names are overwritten.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pair_rng(0, seed, split)  # validates split and seed before anything is written
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n):
        pair = generate_pair(index, seed, split)
        rid = f"{split}-{index:06d}"
        before, after = images / f"{rid}_before.png", images / f"{rid}_after.png"
        pair.before.save(before)
        pair.after.save(after)
        records.append(PairRecord(rid, str(before.absolute()), str(after.absolute()), pair.references, pair.category))
        if progress is not None:
            progress(index + 1, n)
    return write_jsonl(records, out_dir / f"{split}.jsonl")


# ----------------------------------------------------------------------------------- changes
# Each change takes the before scene and returns (after scene, caption pool), or None when this
# scene leaves no room for it (a new scene is drawn then). The pool's first caption names objects
# in full and is always kept; see _pick_captions.
Change = Callable[[Scene, np.random.Generator], tuple[Scene, list[str]] | None]


def _change_add(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]] | None:
    obj = _new_object(rng, before)
    if obj is None:
        return None
    after = replace(before, objects=before.objects + (obj,))
    full, short, at = obj.full_name, _short_name(obj, after), _at(position_word(obj.x, obj.y))
    return after, [
        f"{_a(full)} was added {at}",
        f"{_a(short)} was added",
        f"there is a new {short} {at}",
        f"{_a(full)} appeared",
        f"someone added {_a(short)} {at}",
        f"a new {full} is now {at}",
        f"the after image has an extra {short}",
    ]


def _change_remove(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    obj = _choice(rng, before.objects)
    after = replace(before, objects=tuple(o for o in before.objects if o is not obj))
    full, short, at = obj.full_name, _short_name(obj, before), _at(position_word(obj.x, obj.y))
    return after, [
        f"the {full} was removed",
        f"the {short} is gone",
        f"the {short} {at} disappeared",
        f"the {full} {at} is missing",
        f"someone removed the {short}",
        f"there is no longer {_a(short)} {at}",
    ]


def _change_color(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]] | None:
    obj = _choice(rng, before.objects)
    taken = {(o.size, o.color, o.shape) for o in before.objects}
    colors = [c for c in COLORS if (obj.size, c, obj.shape) not in taken]
    if not colors:
        return None
    new = _choice(rng, colors)
    after = replace(before, objects=tuple(replace(o, color=new) if o is obj else o for o in before.objects))
    full, short, at = obj.full_name, _short_name(obj, before), _at(position_word(obj.x, obj.y))
    return after, [
        f"the {full} turned {new}",
        f"the {short} changed color to {new}",
        f"the {short} {at} is now {new}",
        f"the {short} is {new} now",
        f"the color of the {short} changed from {obj.color} to {new}",
        f"someone painted the {short} {new}",
    ]


def _change_local(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]] | None:
    obj = _choice(rng, before.objects)
    others = replace(before, objects=tuple(o for o in before.objects if o is not obj))
    for _ in range(20):
        direction = _choice(rng, list(DIRECTIONS))
        ux, uy = DIRECTIONS[direction]
        step = int(rng.integers(48, 111)) * (0.75 if ux and uy else 1.0)
        moved = replace(obj, x=int(round(obj.x + ux * step)), y=int(round(obj.y + uy * step)))
        if _is_free(moved.box, others):
            break
    else:
        return None
    after = replace(before, objects=tuple(moved if o is obj else o for o in before.objects))
    full, short = obj.full_name, _short_name(obj, before)
    to = direction if direction in ("up", "down") else f"to the {direction}"
    was_at, now = _at(position_word(obj.x, obj.y)), position_word(moved.x, moved.y)
    pool = [
        f"the {full} moved {to}",
        f"the {short} moved {to}",
        f"the {short} was moved {to}",
        f"the {full} shifted {to}",
        f"someone moved the {short} {to}",
        f"the {short} {was_at} moved {to}",
    ]
    if now != direction:
        pool.append(f"the {short} moved {to} and is now {_at(now)}")
    return after, pool


def _change_background(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    old = before.background
    new = _choice(rng, [b for b in BACKGROUNDS if b != old])
    return replace(before, background=new), [
        f"the background changed from {old} to {new}",
        f"the background is now {new}",
        f"the {old} background became {new}",
        f"the background color changed to {new}",
        f"the background turned {new}",
        f"someone repainted the background {new}",
    ]


def _change_text(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]] | None:
    word, color = _choice(rng, WORDS), _choice(rng, TEXT_COLORS)
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(MARGIN, CANVAS - MARGIN, size=2))
        text = Text(word, color, x, y)
        if _is_free(text.box, before):
            break
    else:
        return None
    at = _at(position_word(x, y))
    return replace(before, text=text), [
        f"the word '{word}' was written {at}",
        f"the text '{word}' appeared {at}",
        f"someone wrote '{word}' {at}",
        f"the word '{word}' was added in {color} letters",
        f"there is now {color} text saying '{word}' {at}",
        f"'{word}' is written {at} now",
    ]


def _change_style(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    style = _choice(rng, STYLES)
    return replace(before, effect=style), {
        "grayscale": [
            "the image became black and white",
            "the image is now grayscale",
            "the colors were removed from the picture",
            "the picture turned gray",
            "everything lost its color",
            "a grayscale filter was applied",
        ],
        "posterized": [
            "the image was posterized",
            "the image now has fewer colors",
            "the colors were reduced to a few flat tones",
            "a posterize filter was applied",
            "the picture looks posterized now",
            "the colors of the image became coarser",
        ],
        "pixelated": [
            "the image became pixelated",
            "the picture is now blocky",
            "a pixelation filter was applied",
            "the image looks pixelated now",
            "the picture was turned into big pixels",
            "the image lost its detail and became blocky",
        ],
    }[style]


def _change_global(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    # White cannot get brighter, so a white scene always gets darker.
    effect = "darker" if before.background == "white" else _choice(rng, list(BRIGHTNESS))
    word, verb = ("darker", "darkened") if effect == "darker" else ("brighter", "brightened")
    return replace(before, effect=effect), [
        f"the image became {word}",
        f"the picture is {word} now",
        f"the brightness was {'lowered' if effect == 'darker' else 'raised'}",
        f"everything got {word}",
        f"the image was {verb}",
        f"the whole scene is {word}",
    ]


def _change_none(before: Scene, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    return before, [
        "nothing changed",
        "there is no difference",
        "the two images are the same",
        "no change",
        "the images look identical",
        "nothing was changed",
        "there is no change between the images",
    ]


_CHANGES: dict[str, Change] = {
    "add": _change_add,
    "remove": _change_remove,
    "color": _change_color,
    "local": _change_local,
    "background": _change_background,
    "text": _change_text,
    "style": _change_style,
    "global": _change_global,
    "none": _change_none,
}


# ----------------------------------------------------------------------------------- helpers
def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _new_object(rng: np.random.Generator, scene: Scene) -> SceneObject | None:
    """A random object, distinct from and not overlapping the scene's; None if none fits."""
    taken = {(o.size, o.color, o.shape) for o in scene.objects}
    for _ in range(50):
        size, color, shape = _choice(rng, list(SIZES)), _choice(rng, list(COLORS)), _choice(rng, SHAPES)
        if (size, color, shape) in taken:
            continue
        half = SIZES[size] // 2
        x = int(rng.integers(MARGIN + half, CANVAS - MARGIN - half + 1))
        y = int(rng.integers(MARGIN + half, CANVAS - MARGIN - half + 1))
        obj = SceneObject(shape, color, size, x, y)
        if _is_free(obj.box, scene):
            return obj
    return None


def _is_free(box: tuple[float, float, float, float], scene: Scene) -> bool:
    """Whether ``box`` is inside the margins and at least GAP away from every object and the text."""
    x0, y0, x1, y1 = box
    if x0 < MARGIN or y0 < MARGIN or x1 > CANVAS - MARGIN or y1 > CANVAS - MARGIN:
        return False
    boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text is not None else [])
    return all(
        x0 >= b[2] + GAP or b[0] >= x1 + GAP or y0 >= b[3] + GAP or b[1] >= y1 + GAP for b in boxes
    )


def _short_name(obj: SceneObject, scene: Scene) -> str:
    """The shortest of shape / colour+shape / size+shape / size+colour+shape unique in ``scene``."""
    for attrs in (("shape",), ("color", "shape"), ("size", "shape")):
        key = tuple(getattr(obj, a) for a in attrs)
        if sum(tuple(getattr(o, a) for a in attrs) == key for o in scene.objects) == 1:
            return " ".join(key)
    return obj.full_name


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _at(position: str) -> str:
    """A position word as a phrase: "on the left", "at the top", "in the center", "in the upper left"."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def _pick_captions(pool: list[str], rng: np.random.Generator) -> tuple[str, ...]:
    """4 to 6 distinct captions: the pool's first (full names) and a random choice of the others."""
    pool = list(dict.fromkeys(pool))
    k = min(int(rng.integers(4, 7)), len(pool))
    rest = sorted(int(i) + 1 for i in rng.permutation(len(pool) - 1)[: k - 1])
    return (pool[0], *(pool[i] for i in rest))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    x0, y0, x1, y1 = (v * scale for v in obj.box)
    fill = COLORS[obj.color]
    cx, cy, r = obj.x * scale, obj.y * scale, obj.extent * scale / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # five-pointed star, tip up
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)


def _apply_effect(image: Image.Image, effect: str | None) -> Image.Image:
    if effect is None:
        return image
    if effect == "grayscale":
        return ImageOps.grayscale(image).convert("RGB")
    if effect == "posterized":
        return ImageOps.posterize(image, 2)
    if effect == "pixelated":
        small = image.resize((CANVAS // PIXEL_BLOCK,) * 2, Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    return ImageEnhance.Brightness(image).enhance(BRIGHTNESS[effect])


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Faint noise (+-2 levels) so a no-change pair's files differ without a visible change."""
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-_NOISE, _NOISE + 1, size=(CANVAS, CANVAS, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _text_offsets(word: str) -> tuple[float, float, float, float]:
    """The ink box of ``word`` relative to its centre point, in canvas pixels (measured as drawn)."""
    x0, y0, x1, y1 = _font(TEXT_SIZE * SUPERSAMPLE).getbbox(word, anchor="mm")
    return x0 / SUPERSAMPLE, y0 / SUPERSAMPLE, x1 / SUPERSAMPLE, y1 / SUPERSAMPLE
