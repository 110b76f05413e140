"""The synthetic change world: deterministic (before, after) scene pairs with reference captions.

Real image-difference datasets are large downloads with licences of their own; this world gives
training and tests an offline, endless and exactly labelled supply of pairs instead. A *scene* is a
picture on a plain background with 1 to 8 non-overlapping flat shapes; a *pair* is a scene and a
copy of it with exactly one change of a known category (:data:`CATEGORIES`, the categories of
BLIP2IDC's per-category tables plus ``none``), and 4 to 6 reference captions in varied wording.

What a user's flat-graphics pair can look like, the world draws (:class:`WorldRanges`): images from
128 to 1024 pixels on the long side, square or not (aspect 1:2 to 2:1); objects from about 4% to
35% of the image's short side; backgrounds of any of :data:`BACKGROUNDS`' colours, each shade
jittered, white and near-white included; and in a quarter of the pairs an *after* image of another
size than the *before* (the same scene, rendered larger or smaller), which idc-lite's composition
resizes as BLIP2IDC does. Object colours are only drawn where they stand out from the background
(:func:`visible_on`).

Splits: ``train``, ``val`` and ``test`` draw from :data:`TRAIN_RANGES`. ``shifted`` draws from
:data:`SHIFTED_RANGES`, parameter ranges training never sees (tinier and larger objects, smaller and
larger images, narrower and wider aspects, further-off background shades), so that a model's
generalization is measured, not assumed. Both use the same vocabulary: a shifted pair never needs
a word training did not teach.

Objects are named by the shortest description that tells them apart from the other objects of the
scene ("the star", "the red star", "the small star") in some captions and by size, colour and shape
("the small red star") in others, and located by the ninth of the image they are in ("on the left",
"in the upper right", :func:`position_word`). Sizes are ``small`` (under :data:`SMALL_LIMIT` of the
short side) or ``large``; the ranges leave a gap between the two so that the word is never a guess.

Shapes are drawn supersampled (about 1024 pixels on the long side) and box-filtered down
(exact-coverage anti-aliasing, much faster than Lanczos at the same quality for flat shapes).

Determinism: pair ``index`` of ``split`` with ``seed`` draws everything from
``numpy.random.default_rng([SPLIT_IDS[split], seed, index])`` (:func:`pair_rng`). NumPy's
SeedSequence hashes the three numbers into independent streams, so a pair never depends on which
other pairs were generated, and no two splits share a stream for any seed or index. The same
(split, seed, index) gives the same captions everywhere and the same pixels with the same NumPy and
Pillow versions (Pillow's text rasteriser and NumPy's distribution methods may change between major
versions). Category ``i % 9`` of :data:`CATEGORIES` goes to pair ``i``, so any ``n`` pairs have
category counts that differ by at most one; training may ask for a category instead
(``generate_pair(..., category=...)``).
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

#: The canvas of a scene built by hand (``Scene(...)`` without a size): the old world's square.
CANVAS = 256
#: Shapes are drawn at about this many pixels on the long side, then box-filtered down.
SUPERSAMPLE_SIDE = 1024
MAX_OBJECTS = 8
#: Free space kept between objects, and between an object and the image edge, as a share of the short side.
GAP_SHARE = 0.03
#: The old world's gap in pixels on :data:`CANVAS` (what tests of hand-built scenes use).
GAP = round(GAP_SHARE * CANVAS)

#: Background colours by name; a scene's background is one of them, its shade jittered per channel.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (211, 211, 211),
    "gray": (128, 128, 128),
    "dark gray": (64, 64, 64),
    "black": (12, 12, 12),
    "beige": (240, 232, 200),
    "light blue": (176, 214, 240),
    "navy": (28, 36, 96),
    "pale green": (196, 234, 196),
    "dark green": (24, 72, 40),
    "pink": (250, 192, 203),
    "lavender": (216, 200, 240),
    "light yellow": (252, 246, 190),
    "peach": (255, 210, 170),
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
    "white": (250, 250, 250),
}
#: Objects smaller than this share of the image's short side are ``small``, the others ``large``.
SMALL_LIMIT = 0.155
#: The old world's object extents in pixels on :data:`CANVAS` (hand-built scenes).
SIZES = {"small": 32, "large": 64}
WORDS = ("cat", "dog", "sun", "hello", "stop", "open", "tree", "boat", "fish", "moon", "home", "sale")
#: Text height as a share of the short side.
TEXT_SHARE = 0.156
#: Colours text is written in (yellow is too faint on light backgrounds).
TEXT_COLORS = ("red", "green", "blue", "purple", "orange", "black", "white")
STYLES = ("grayscale", "posterized", "pixelated")
#: Blocks of the ``pixelated`` style along the short side.
PIXEL_BLOCKS = 16
#: The old world's block side in pixels on :data:`CANVAS`.
PIXEL_BLOCK = CANVAS // PIXEL_BLOCKS
#: ``darker`` scales every level by 0.55; ``brighter`` moves every level 35% of the way to white
#: (a factor would leave black black).
BRIGHTNESS = {"darker": 0.55, "brighter": 0.35}
#: An object, text or background colour counts as visible on another when their RGB distance is at least this.
MIN_CONTRAST = 110.0
#: A background change moves the background colour at least this far (RGB distance), so that it shows.
MIN_BACKGROUND_CHANGE = 45.0

CATEGORIES = ("add", "remove", "color", "local", "background", "text", "style", "global", "none")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "shifted": 3}
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
#: The long side of every image the world draws stays within these (a resized after image included).
MIN_SIDE, MAX_SIDE = 128, 1024
_NOISE = 2
_TRIES = 200

Intervals = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class WorldRanges:
    """Where a split draws its free parameters from; each is a union of intervals.

    ``long_side``: the before image's long side in pixels; ``aspect``: width / height; ``small`` and
    ``large``: object extents as shares of the short side; ``shade``: how far each channel of the
    background is moved from its named colour, in levels; ``resized``: the share of pairs whose after
    image is rendered at another size, ``rescale`` the factors it is scaled by.
    """

    long_side: Intervals
    aspect: Intervals
    small: Intervals
    large: Intervals
    shade: Intervals
    resized: float = 0.25
    rescale: Intervals = ((0.5, 0.8), (1.25, 2.0))


TRAIN_RANGES = WorldRanges(
    long_side=((160, 768),), aspect=((0.75, 1.34),), small=((0.05, 0.13),), large=((0.18, 0.32),), shade=((0, 6),),
)
SHIFTED_RANGES = WorldRanges(
    long_side=((128, 160), (768, 1024)), aspect=((0.5, 0.75), (1.34, 2.0)), small=((0.04, 0.05),),
    large=((0.32, 0.35),), shade=((7, 14),),
)


def ranges_of(split: str) -> WorldRanges:
    return SHIFTED_RANGES if split == "shifted" else TRAIN_RANGES


@dataclass(frozen=True)
class SceneObject:
    """One flat shape; ``x``, ``y`` is its centre and ``extent`` its bounding-box side, in image pixels."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    extent: int = 0  # 0: the old world's extent of ``size`` (SIZES)

    def __post_init__(self):
        if not self.extent:
            object.__setattr__(self, "extent", SIZES[self.size])

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.extent / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)

    @property
    def full_name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def key(self) -> tuple[str, str, str]:
        """What names the object: no two objects of a scene share it."""
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Text:
    """A word written on the scene, centred at ``x``, ``y``, ``height`` pixels tall (0: the old world's 40)."""

    word: str
    color: str
    x: int
    y: int
    height: int = 0

    def __post_init__(self):
        if not self.height:
            object.__setattr__(self, "height", 40)

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = _text_offsets(self.word, self.height)
        return (self.x + x0, self.y + y0, self.x + x1, self.y + y1)


@dataclass(frozen=True)
class Scene:
    """What a picture shows: background, objects, optional text and optional whole-image effect.

    ``effect`` is one of :data:`STYLES` or a key of :data:`BRIGHTNESS`, applied after drawing.
    ``width`` x ``height`` is the picture's size; ``shade`` the background's per-channel offset from
    its named colour.
    """

    background: str
    objects: tuple[SceneObject, ...]
    text: Text | None = None
    effect: str | None = None
    width: int = CANVAS
    height: int = CANVAS
    shade: tuple[int, int, int] = (0, 0, 0)

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(BACKGROUNDS[self.background], self.shade))

    @property
    def gap(self) -> float:
        return GAP_SHARE * self.short_side


@dataclass(frozen=True)
class SynthPair:
    """A generated pair. ``after`` is the after scene rendered (at another size in some pairs), plus faint noise for ``none``."""

    before: Image.Image
    after: Image.Image
    references: tuple[str, ...]
    category: str
    before_scene: Scene
    after_scene: Scene
    before_description: str
    after_description: str

    @property
    def differences(self) -> str:
        """What differs between the two scenes, listed plainly (see :func:`list_differences`)."""
        return list_differences(self.before_scene, self.after_scene)


# ------------------------------------------------------------------------------------ scenes
def visible_on(color: tuple[int, int, int], background: tuple[int, int, int]) -> bool:
    """Whether ``color`` stands out from ``background`` (RGB distance >= :data:`MIN_CONTRAST`)."""
    return math.dist(color, background) >= MIN_CONTRAST


def _draw(rng: np.random.Generator, intervals: Intervals) -> float:
    """A uniform draw from a union of intervals (each picked by its length)."""
    lengths = np.array([hi - lo for lo, hi in intervals], dtype=float)
    lo, hi = intervals[int(rng.choice(len(intervals), p=lengths / lengths.sum()))]
    return float(rng.uniform(lo, hi))


def random_canvas(rng: np.random.Generator, ranges: WorldRanges = TRAIN_RANGES) -> tuple[int, int]:
    """A (width, height) drawn from ``ranges``."""
    long_side, aspect = _draw(rng, ranges.long_side), _draw(rng, ranges.aspect)
    if aspect >= 1:
        return int(round(long_side)), max(1, int(round(long_side / aspect)))
    return max(1, int(round(long_side * aspect))), int(round(long_side))


def random_background(rng: np.random.Generator, ranges: WorldRanges = TRAIN_RANGES,
                      exclude: str | None = None) -> tuple[str, tuple[int, int, int]]:
    """A background name (not ``exclude``) and its shade offsets, drawn from ``ranges``."""
    name = _choice(rng, [b for b in BACKGROUNDS if b != exclude])
    shade = tuple(int(round(_draw(rng, ranges.shade))) * (1 if rng.random() < 0.5 else -1) for _ in range(3))
    return name, shade


def random_scene(rng: np.random.Generator, n_objects: int | None = None, ranges: WorldRanges = TRAIN_RANGES,
                 canvas: tuple[int, int] | None = None) -> Scene:
    """A scene of ``n_objects`` (default: 1 to 8 at random) distinct, non-overlapping objects.

    No two objects share size, colour and shape, so every object has an unambiguous name; every
    object's colour stands out from the background.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    width, height = canvas or random_canvas(rng, ranges)
    background, shade = random_background(rng, ranges)
    empty = Scene(background, (), width=width, height=height, shade=shade)
    for _ in range(_TRIES):
        scene = empty
        for _ in range(n):
            obj = _new_object(rng, scene, ranges, crowd=n)
            if obj is None:
                break
            scene = replace(scene, objects=scene.objects + (obj,))
        else:
            return scene
    raise RuntimeError(f"could not place {n} objects on a {width}x{height} image")


def render_scene(scene: Scene, size: tuple[int, int] | None = None) -> Image.Image:
    """The scene as an RGB picture of its size (or of ``size``, the same scene scaled), anti-aliased."""
    width, height = size or (scene.width, scene.height)
    zoom = width / scene.width
    scale = max(1, min(4, SUPERSAMPLE_SIDE // max(width, height)))
    factor = zoom * scale
    image = Image.new("RGB", (width * scale, height * scale), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, factor)
    if scene.text is not None:
        text = scene.text
        font = _font(max(1, round(text.height * factor)))
        draw.text((text.x * factor, text.y * factor), text.word, fill=COLORS[text.color], font=font, anchor="mm")
    if scale > 1:
        image = image.reduce(scale)
    return _apply_effect(image, scene.effect)


def describe_scene(scene: Scene) -> str:
    """A one-line caption of the scene's contents, objects from left to right.

    e.g. "a large red circle, a small blue star and a large green square on a beige background".
    """
    names = [_a(obj.full_name) for obj in sorted(scene.objects, key=lambda o: (o.x, o.y))]
    caption = f"{_listed(names)} on {_a(scene.background)} background" if names else f"{_a(scene.background)} background"
    if scene.text is not None:
        caption += f", with the word '{scene.text.word}' written {_at(_where(scene.text, scene))}"
    if scene.effect is not None:
        caption += ", " + _EFFECT_WORDS[scene.effect]
    return caption


_EFFECT_WORDS = {"grayscale": "in grayscale", "posterized": "posterized", "pixelated": "pixelated",
                 "darker": "darkened", "brighter": "brightened"}


def list_differences(before: Scene, after: Scene) -> str:
    """What differs between two scenes, plainly: "differences: top only ...; bottom only ...".

    The auxiliary caption of the demo recipe's pre-training: it names every object present in one
    scene and not the other (with where it is), a background, text or effect of one and not the
    other, and "differences: none" for identical scenes. Top is the before scene, bottom the after,
    as a pair is stacked.
    """
    def items(scene: Scene, other: Scene) -> list[str]:
        listed = [f"{_a(o.full_name)} {_at(_where(o, scene))}"
                  for o in sorted(scene.objects, key=lambda o: (o.x, o.y))
                  if (o.key, _where(o, scene)) not in {(p.key, _where(p, other)) for p in other.objects}]
        if scene.background != other.background:
            listed.append(f"{_a(scene.background)} background")
        if scene.text is not None and scene.text != other.text:
            listed.append(f"the word '{scene.text.word}' in {scene.text.color} {_at(_where(scene.text, scene))}")
        if scene.effect is not None and scene.effect != other.effect:
            listed.append(_EFFECT_WORDS[scene.effect])
        return listed

    top, bottom = items(before, after), items(after, before)
    if not top and not bottom:
        # A move within one ninth names the same place twice: say which object moved anyway.
        moved = set(before.objects) ^ set(after.objects)
        if not moved:
            return "differences: none"
        obj = next(o for o in before.objects if o in moved)
        return f"differences: the {obj.full_name} moved"
    parts = [f"top only {_listed(top)}"] if top else []
    parts += [f"bottom only {_listed(bottom)}"] if bottom else []
    return "differences: " + "; ".join(parts)


def position_word(x: float, y: float, width: float = CANVAS, height: float = CANVAS) -> str:
    """Where a point is, by ninths of the image: "upper left", "top", ..., "center", ..."""
    col = "left" if x < width / 3 else "right" if x >= 2 * width / 3 else ""
    row = "top" if y < height / 3 else "bottom" if y >= 2 * height / 3 else ""
    if row and col:
        return f"{'upper' if row == 'top' else 'lower'} {col}"
    return row or col or "center"


def _where(thing, scene: Scene) -> str:
    return position_word(thing.x, thing.y, scene.width, scene.height)


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


def generate_pair(index: int, seed: int = 0, split: str = "train", category: str | None = None) -> SynthPair:
    """Pair ``index`` of ``split``: category ``CATEGORIES[index % 9]`` (or ``category``), fully determined by its arguments."""
    rng = pair_rng(index, seed, split)
    category = category or CATEGORIES[index % len(CATEGORIES)]
    if category not in _CHANGES:
        raise ValueError(f"unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
    ranges = ranges_of(split)
    low, high = {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(category, (1, MAX_OBJECTS))
    for _ in range(_TRIES):
        before = random_scene(rng, int(rng.integers(low, high + 1)), ranges)
        change = _CHANGES[category](before, rng, ranges)
        if change is not None:
            break
    else:
        raise RuntimeError(f"could not make a {category!r} change")
    after, pool = change
    size = None
    if rng.random() < ranges.resized:
        long_side = max(before.width, before.height)
        factor = min(max(_draw(rng, ranges.rescale), MIN_SIDE / long_side), MAX_SIDE / long_side)
        size = (max(1, round(before.width * factor)), max(1, round(before.height * factor)))
    after_image = render_scene(after, size)
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
# scene leaves no room for it (a new scene is drawn then). The pool's first captions name objects in
# full (one of them is always kept, see _pick_captions); the "lead" count says how many there are.
Change = Callable[[Scene, np.random.Generator, WorldRanges], tuple[Scene, list[str]] | None]


def _change_add(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]] | None:
    obj = _new_object(rng, before, ranges, crowd=len(before.objects) + 1)
    if obj is None:
        return None
    after = replace(before, objects=before.objects + (obj,))
    full, short, at = obj.full_name, _short_name(obj, after), _at(_where(obj, after))
    return after, _lead(2, [
        f"{_a(full)} was added {at}",
        f"{_a(full)} appeared {at}",
        f"{_a(short)} was added",
        f"there is a new {short} {at}",
        f"{_a(full)} appeared",
        f"someone added {_a(short)} {at}",
        f"a new {full} is now {at}",
        f"the after image has an extra {short}",
        f"{_a(_vary(short, rng))} has been added {at}",
        f"now there is also {_a(short)} {at}",
    ])


def _change_remove(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]]:
    obj = _choice(rng, before.objects)
    after = replace(before, objects=tuple(o for o in before.objects if o is not obj))
    full, short, at = obj.full_name, _short_name(obj, before), _at(_where(obj, before))
    return after, _lead(2, [
        f"the {full} was removed",
        f"the {full} {at} is missing",
        f"the {short} is gone",
        f"the {short} {at} disappeared",
        f"someone removed the {short}",
        f"there is no longer {_a(short)} {at}",
        f"the {_vary(short, rng)} {at} was taken away",
        f"the {short} was deleted",
    ])


def _change_color(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]] | None:
    obj = _choice(rng, before.objects)
    taken = {o.key for o in before.objects}
    colors = [c for c in COLORS if (obj.size, c, obj.shape) not in taken and visible_on(COLORS[c], before.background_rgb)]
    if not colors:
        return None
    new = _choice(rng, colors)
    after = replace(before, objects=tuple(replace(o, color=new) if o is obj else o for o in before.objects))
    full, short, at = obj.full_name, _short_name(obj, before), _at(_where(obj, before))
    return after, _lead(2, [
        f"the {full} turned {new}",
        f"the {full} changed color to {new}",
        f"the {short} changed color to {new}",
        f"the {short} {at} is now {new}",
        f"the {short} is {new} now",
        f"the color of the {short} changed from {obj.color} to {new}",
        f"someone painted the {short} {new}",
        f"the {_vary(short, rng)} became {new}",
        f"the {short} was recolored {new}",
    ])


def _change_local(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]] | None:
    obj = _choice(rng, before.objects)
    others = replace(before, objects=tuple(o for o in before.objects if o is not obj))
    side = before.short_side
    for _ in range(20):
        direction = _choice(rng, list(DIRECTIONS))
        ux, uy = DIRECTIONS[direction]
        step = max(obj.extent * 1.2, side * float(rng.uniform(0.19, 0.43))) * (0.75 if ux and uy else 1.0)
        moved = replace(obj, x=int(round(obj.x + ux * step)), y=int(round(obj.y + uy * step)))
        if _is_free(moved.box, others):
            break
    else:
        return None
    after = replace(before, objects=tuple(moved if o is obj else o for o in before.objects))
    full, short = obj.full_name, _short_name(obj, before)
    to = direction if direction in ("up", "down") else f"to the {direction}"
    was_at, now = _at(_where(obj, before)), _where(moved, after)
    pool = _lead(2, [
        f"the {full} moved {to}",
        f"the {full} shifted {to}",
        f"the {short} moved {to}",
        f"the {short} was moved {to}",
        f"someone moved the {short} {to}",
        f"the {short} {was_at} moved {to}",
        f"the {_vary(short, rng)} was pushed {to}",
    ])
    if now != direction:
        pool.append(f"the {short} moved {to} and is now {_at(now)}")
    return after, pool


def _change_background(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]] | None:
    old = before.background
    colors = [COLORS[o.color] for o in before.objects] + ([COLORS[before.text.color]] if before.text else [])
    for _ in range(20):
        new, shade = random_background(rng, ranges, exclude=old)
        after = replace(before, background=new, shade=shade)
        if (math.dist(after.background_rgb, before.background_rgb) >= MIN_BACKGROUND_CHANGE
                and all(visible_on(c, after.background_rgb) for c in colors)):
            break
    else:
        return None
    return after, _lead(2, [
        f"the background changed from {old} to {new}",
        f"the {old} background became {new}",
        f"the background is now {new}",
        f"the background color changed to {new}",
        f"the background turned {new}",
        f"someone repainted the background {new}",
        f"the backdrop is {new} instead of {old}",
    ])


def _change_text(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]] | None:
    word = _choice(rng, WORDS)
    colors = [c for c in TEXT_COLORS if visible_on(COLORS[c], before.background_rgb)]
    color = _choice(rng, colors)
    height = max(8, round(before.short_side * TEXT_SHARE * float(rng.uniform(0.8, 1.2))))
    margin = before.gap
    for _ in range(100):
        x = int(rng.integers(int(margin), max(int(margin) + 1, int(before.width - margin))))
        y = int(rng.integers(int(margin), max(int(margin) + 1, int(before.height - margin))))
        text = Text(word, color, x, y, height)
        if _is_free(text.box, before):
            break
    else:
        return None
    after = replace(before, text=text)
    at = _at(_where(text, after))
    return after, _lead(2, [
        f"the word '{word}' was written {at}",
        f"the word '{word}' was added in {color} letters",
        f"the text '{word}' appeared {at}",
        f"someone wrote '{word}' {at}",
        f"there is now {color} text saying '{word}' {at}",
        f"'{word}' is written {at} now",
        f"a {color} '{word}' was written on the image",
    ])


def _change_style(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]]:
    style = _choice(rng, STYLES)
    return replace(before, effect=style), _lead(1, {
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
    }[style])


def _change_global(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]]:
    # A light scene cannot get visibly brighter (it clips) and a dark one visibly darker.
    level = sum(before.background_rgb) / 3
    effect = "darker" if level > 200 else "brighter" if level < 80 else _choice(rng, list(BRIGHTNESS))
    word, verb = ("darker", "darkened") if effect == "darker" else ("brighter", "brightened")
    return replace(before, effect=effect), _lead(1, [
        f"the image became {word}",
        f"the picture is {word} now",
        f"the brightness was {'lowered' if effect == 'darker' else 'raised'}",
        f"everything got {word}",
        f"the image was {verb}",
        f"the whole scene is {word}",
    ])


def _change_none(before: Scene, rng: np.random.Generator, ranges: WorldRanges) -> tuple[Scene, list[str]]:
    return before, _lead(1, [
        "nothing changed",
        "there is no difference",
        "the two images are the same",
        "no change",
        "the images look identical",
        "nothing was changed",
        "there is no change between the images",
    ])


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


class _Pool(list):
    """A caption pool whose first ``lead`` captions name things in full (one of them is always kept)."""

    lead = 1


def _lead(n: int, captions: list[str]) -> _Pool:
    pool = _Pool(captions)
    pool.lead = n
    return pool


def _vary(name: str, rng: np.random.Generator) -> str:
    """A name with its size word sometimes replaced by a synonym ("little", "big")."""
    if rng.random() < 0.5:
        return name
    return name.replace("small ", "little ").replace("large ", "big ")


def _new_object(rng: np.random.Generator, scene: Scene, ranges: WorldRanges = TRAIN_RANGES,
                crowd: int = 1) -> SceneObject | None:
    """A random object, distinct from, visible among and not overlapping the scene's; None if none fits.

    ``crowd`` is how many objects the scene will hold: the more, the rarer large ones, so that they fit.
    """
    taken = {o.key for o in scene.objects}
    colors = [c for c in COLORS if visible_on(COLORS[c], scene.background_rgb)]
    p_large = 0.5 if crowd <= 4 else 0.25
    side = scene.short_side
    for _ in range(50):
        size = "large" if rng.random() < p_large else "small"
        color, shape = _choice(rng, colors), _choice(rng, SHAPES)
        if (size, color, shape) in taken:
            continue
        extent = max(4, int(round(_draw(rng, ranges.large if size == "large" else ranges.small) * side)))
        half = extent / 2
        low_x, high_x = scene.gap + half, scene.width - scene.gap - half
        low_y, high_y = scene.gap + half, scene.height - scene.gap - half
        if high_x < low_x or high_y < low_y:
            continue
        x = int(round(rng.uniform(low_x, high_x)))
        y = int(round(rng.uniform(low_y, high_y)))
        obj = SceneObject(shape, color, size, x, y, extent)
        if _is_free(obj.box, scene):
            return obj
    return None


def _is_free(box: tuple[float, float, float, float], scene: Scene) -> bool:
    """Whether ``box`` is inside the margins and at least the gap away from every object and the text."""
    x0, y0, x1, y1 = box
    gap = scene.gap
    if x0 < gap or y0 < gap or x1 > scene.width - gap or y1 > scene.height - gap:
        return False
    boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text is not None else [])
    return all(
        x0 >= b[2] + gap or b[0] >= x1 + gap or y0 >= b[3] + gap or b[1] >= y1 + gap for b in boxes
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


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _at(position: str) -> str:
    """A position word as a phrase: "on the left", "at the top", "in the center", "in the upper left"."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def _pick_captions(pool: list[str], rng: np.random.Generator) -> tuple[str, ...]:
    """4 to 6 distinct captions: one of the pool's leading (full-name) captions first, then a random choice of the others."""
    lead = getattr(pool, "lead", 1)
    first = pool[int(rng.integers(lead))]
    rest_pool = [c for c in dict.fromkeys(pool) if c != first]
    k = min(int(rng.integers(4, 7)), len(rest_pool) + 1)
    rest = sorted(int(i) for i in rng.permutation(len(rest_pool))[: k - 1])
    return (first, *(rest_pool[i] for i in rest))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float) -> None:
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
        block = max(2, min(image.size) // PIXEL_BLOCKS)
        small = image.resize((max(1, image.width // block), max(1, image.height // block)), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    if effect == "darker":
        return ImageEnhance.Brightness(image).enhance(BRIGHTNESS[effect])
    return Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), BRIGHTNESS[effect])


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Faint noise (+-2 levels) so a no-change pair's files differ without a visible change."""
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-_NOISE, _NOISE + 1, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _text_offsets(word: str, height: int) -> tuple[float, float, float, float]:
    """The ink box of ``word`` at ``height`` relative to its centre point, in image pixels (measured as drawn at 4x)."""
    x0, y0, x1, y1 = _font(height * 4).getbbox(word, anchor="mm")
    return x0 / 4, y0 / 4, x1 / 4, y1 / 4
