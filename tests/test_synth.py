"""The synthetic change world: determinism, balance, visible changes, truthful captions, output files."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from idc_lite.cli.synth import synth
from idc_lite.tools.datasets import read_dataset, read_jsonl
from idc_lite.tools.synth import (
    BACKGROUNDS,
    CANVAS,
    CATEGORIES,
    COLORS,
    MAX_OBJECTS,
    MAX_SIDE,
    MIN_SIDE,
    PIXEL_BLOCK,
    SHIFTED_RANGES,
    SMALL_LIMIT,
    TRAIN_RANGES,
    Scene,
    SceneObject,
    _short_name,
    describe_scene,
    generate_pair,
    list_differences,
    pair_rng,
    position_word,
    random_scene,
    render_scene,
    visible_on,
    write_dataset,
)

N_PER_CATEGORY = 4


@pytest.fixture(scope="module")
def pairs():
    """The first 36 test pairs, 4 of each category."""
    return [generate_pair(i, seed=0, split="test") for i in range(N_PER_CATEGORY * len(CATEGORIES))]


def _of(pairs, category):
    return [p for p in pairs if p.category == category]


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _diff(pair) -> np.ndarray:
    """Per-pixel largest channel difference between after and before (rendered at after's size)."""
    before = pair.before if pair.before.size == pair.after.size else render_scene(pair.before_scene, pair.after.size)
    return np.abs(_pixels(pair.after) - _pixels(before)).max(axis=2)


def _changed_inside(pair, boxes, threshold: int = 8) -> None:
    """Every visibly changed pixel lies in one of ``boxes`` (scene pixels, grown by 2 px for anti-aliasing)."""
    ys, xs = np.nonzero(_diff(pair) > threshold)
    assert len(xs) > 0
    zoom = pair.after.width / pair.before_scene.width
    inside = np.zeros(len(xs), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = (v * zoom for v in (x0, y0, x1, y1))
        inside |= (xs >= x0 - 2) & (xs <= x1 + 2) & (ys >= y0 - 2) & (ys <= y1 + 2)
    assert inside.all()


def _one(items):
    (item,) = items
    return item


# ------------------------------------------------------------------------ determinism, balance
def test_same_arguments_give_the_same_pair_and_other_splits_or_seeds_do_not():
    a, b = generate_pair(7, seed=3, split="train"), generate_pair(7, seed=3, split="train")
    assert np.array_equal(_pixels(a.before), _pixels(b.before))
    assert np.array_equal(_pixels(a.after), _pixels(b.after))
    assert a.references == b.references and a.before_scene == b.before_scene
    for other in (generate_pair(7, seed=3, split="val"), generate_pair(7, seed=4, split="train")):
        assert other.category == a.category
        assert other.before_scene != a.before_scene


def test_pair_rng_refuses_unknown_split_and_out_of_range_numbers():
    with pytest.raises(ValueError, match="split"):
        pair_rng(0, 0, "dev")
    with pytest.raises(ValueError, match="seed"):
        pair_rng(0, -1, "test")
    with pytest.raises(ValueError, match="index"):
        pair_rng(2**32, 0, "test")


@pytest.mark.parametrize("n", [9, 20, 31])
def test_categories_are_balanced(n, tmp_path):
    """Any first n pairs of a split, and of a written dataset, hold each category n // 9 or n // 9 + 1 times."""
    for split in ("train", "val"):
        counts = Counter(generate_pair(i, seed=1, split=split).category for i in range(n))
        assert set(counts) <= set(CATEGORIES)
        assert max(counts.values()) - min(counts.get(c, 0) for c in CATEGORIES) <= 1, counts
    written = Counter(r.category for r in read_jsonl(write_dataset(tmp_path, n, seed=1, split="test")))
    assert max(written.values()) - min(written.get(c, 0) for c in CATEGORIES) <= 1, written


# ------------------------------------------------------------------------------ visible changes
def test_add_remove_color_local_text_change_only_the_object_or_text(pairs):
    for pair in _of(pairs, "add"):
        new = _one(set(pair.after_scene.objects) - set(pair.before_scene.objects))
        _changed_inside(pair, [new.box])
    for pair in _of(pairs, "remove"):
        gone = _one(set(pair.before_scene.objects) - set(pair.after_scene.objects))
        _changed_inside(pair, [gone.box])
    for pair in _of(pairs, "color") + _of(pairs, "local"):
        old = _one(set(pair.before_scene.objects) - set(pair.after_scene.objects))
        new = _one(set(pair.after_scene.objects) - set(pair.before_scene.objects))
        _changed_inside(pair, [old.box, new.box])
    for pair in _of(pairs, "text"):
        _changed_inside(pair, [pair.after_scene.text.box])


def test_background_and_global_change_most_of_the_image(pairs):
    for pair in _of(pairs, "background") + _of(pairs, "global"):
        assert (_diff(pair) > 8).mean() > 0.5, pair.after_description
    for pair in _of(pairs, "global"):
        darker = _pixels(pair.after).mean() < _pixels(pair.before).mean()
        assert darker == (pair.after_scene.effect == "darker")


@pytest.mark.parametrize("style", ["grayscale", "posterized", "pixelated"])
def test_every_style_changes_the_whole_picture(style):
    scene = random_scene(np.random.default_rng(5), n_objects=4, canvas=(CANVAS, CANVAS))
    before, after = render_scene(scene), render_scene(Scene(scene.background, scene.objects, effect=style))
    pixels = _pixels(after)
    if style == "pixelated":
        blocks = pixels.reshape(CANVAS // PIXEL_BLOCK, PIXEL_BLOCK, CANVAS // PIXEL_BLOCK, PIXEL_BLOCK, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()  # constant in every block: blocky everywhere
        assert (np.abs(pixels - _pixels(before)).max(axis=2) > 8).any()
    else:
        assert (np.abs(pixels - _pixels(before)).max(axis=2) > 8).mean() > 0.5
    if style == "grayscale":
        assert (pixels == pixels[:, :, :1]).all()


def test_none_differs_only_by_faint_noise(pairs):
    for pair in _of(pairs, "none"):
        assert pair.before_scene == pair.after_scene
        if pair.after.size == pair.before.size:
            assert 0 < _diff(pair).max() <= 2


# ------------------------------------------------------------------------------------- captions
def test_captions_are_four_to_six_distinct_lower_case_lines(pairs):
    for pair in pairs:
        refs = pair.references
        assert 4 <= len(refs) <= 6 and len(set(refs)) == len(refs)
        assert all(r == r.lower() and r.strip() == r and not r.endswith(".") for r in refs)


def test_captions_name_the_changed_object(pairs):
    for pair in _of(pairs, "add") + _of(pairs, "remove") + _of(pairs, "color") + _of(pairs, "local"):
        changed = set(pair.before_scene.objects) ^ set(pair.after_scene.objects)
        obj = min(changed, key=lambda o: o in pair.after_scene.objects)  # the before one if there is one
        assert all(obj.shape in r for r in pair.references), pair.references
        assert obj.full_name in pair.references[0]
        if pair.category == "color":
            new = _one(set(pair.after_scene.objects) - set(pair.before_scene.objects))
            assert all(new.color in r for r in pair.references)
    for pair in _of(pairs, "background"):
        assert all(pair.after_scene.background in r for r in pair.references)
    for pair in _of(pairs, "text"):
        assert all(f"'{pair.after_scene.text.word}'" in r for r in pair.references)
    for pair in _of(pairs, "global"):
        word = "darker" if pair.after_scene.effect == "darker" else "bright"
        assert sum(word in r for r in pair.references) >= 3


def test_short_names_are_the_shortest_unambiguous_ones():
    small_red = SceneObject("circle", "red", "small", 40, 40)
    large_red = SceneObject("circle", "red", "large", 140, 40)
    blue = SceneObject("circle", "blue", "small", 40, 140)
    square = SceneObject("square", "red", "small", 140, 140)
    scene = Scene("white", (small_red, large_red, blue, square))
    assert _short_name(square, scene) == "square"
    assert _short_name(blue, scene) == "blue circle"
    assert _short_name(large_red, scene) == "large circle"
    assert _short_name(small_red, scene) == "small red circle"


def _direction(dx: int, dy: int) -> str:
    horizontal = "left" if dx < 0 else "right" if dx > 0 else ""
    vertical = "up" if dy < 0 else "down" if dy > 0 else ""
    if horizontal and vertical:
        return f"to the {'upper' if vertical == 'up' else 'lower'} {horizontal}"
    return f"to the {horizontal}" if horizontal else vertical


def test_local_captions_say_the_direction_of_the_move():
    seen = set()
    for index in range(3, 3 + 9 * 80, 9):  # 80 local pairs: every direction shows up
        pair = generate_pair(index, split="train")
        old = _one(set(pair.before_scene.objects) - set(pair.after_scene.objects))
        new = _one(set(pair.after_scene.objects) - set(pair.before_scene.objects))
        assert (old.shape, old.color, old.size) == (new.shape, new.color, new.size)
        expected = _direction(new.x - old.x, new.y - old.y)
        seen.add(expected)
        assert all(re.search(rf"\b{expected}\b", r) for r in pair.references), (expected, pair.references)
    assert len(seen) == 8


def test_position_words():
    assert position_word(20, 20) == "upper left"
    assert position_word(128, 20) == "top"
    assert position_word(128, 128) == "center"
    assert position_word(240, 128) == "right"
    assert position_word(240, 240) == "lower right"


# -------------------------------------------------------------------------------------- scenes
def _apart(a, b, gap) -> bool:
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def test_objects_and_text_never_overlap_stay_on_the_canvas_and_stand_out(pairs):
    for scene in itertools.chain.from_iterable((p.before_scene, p.after_scene) for p in pairs):
        boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text else [])
        assert 0 <= len(scene.objects) <= MAX_OBJECTS
        assert all(0 <= x0 and 0 <= y0 and x1 <= scene.width and y1 <= scene.height for x0, y0, x1, y1 in boxes)
        assert all(_apart(a, b, scene.gap) for a, b in itertools.combinations(boxes, 2))
        assert len({(o.size, o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        colors = [o.color for o in scene.objects] + ([scene.text.color] if scene.text else [])
        assert all(visible_on(COLORS[c], scene.background_rgb) for c in colors), (colors, scene.background)


def test_single_scene_render_and_description():
    scene = random_scene(np.random.default_rng(11))
    image = render_scene(scene)
    assert image.size == (scene.width, scene.height) and image.mode == "RGB"
    caption = describe_scene(scene)
    assert caption.endswith(f" on a {scene.background} background")
    for obj in scene.objects:
        assert obj.full_name in caption
    two = Scene("beige", (SceneObject("star", "blue", "small", 200, 60), SceneObject("circle", "red", "large", 50, 60)))
    assert describe_scene(two) == "a large red circle and a small blue star on a beige background"


# ---------------------------------------------------------------------------------- files, CLI
def test_write_dataset_is_readable_and_matches_generate_pair(tmp_path: Path):
    calls = []
    path = write_dataset(tmp_path / "out", 10, seed=2, split="val", progress=lambda *args: calls.append(args))
    assert path == tmp_path / "out" / "val.jsonl"
    assert calls == [(i, 10) for i in range(1, 11)]
    records = read_jsonl(path)
    assert [r.id for r in records] == [f"val-{i:06d}" for i in range(10)]
    assert [r.category for r in records] == [CATEGORIES[i % 9] for i in range(10)]
    pair = generate_pair(4, seed=2, split="val")
    assert records[4].references == pair.references
    assert np.array_equal(_pixels(Image.open(records[4].after)), _pixels(pair.after))
    assert "images/val-000004_after.png" in path.read_text(encoding="utf-8")
    assert read_dataset(tmp_path / "out", split="val") == records


def test_cli_writes_a_dataset_and_prints_its_path(tmp_path: Path):
    app = typer.Typer()
    app.command()(synth)
    runner = CliRunner()
    result = runner.invoke(app, [str(tmp_path), "--n", "3", "--seed", "1", "--split", "train"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "train.jsonl")
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 3
    bad = runner.invoke(app, [str(tmp_path), "--n", "1", "--split", "dev"])
    assert bad.exit_code == 2 and "dev" in bad.output


# ---------------------------------------------------------------------------------- the wide world
def _in(value: float, intervals, slack: float = 0.0) -> bool:
    return any(lo - slack <= value <= hi + slack for lo, hi in intervals)


@pytest.mark.parametrize("split, ranges, other", [("train", TRAIN_RANGES, SHIFTED_RANGES),
                                                  ("shifted", SHIFTED_RANGES, TRAIN_RANGES)])
def test_each_split_draws_from_its_own_ranges(split, ranges, other):
    """Image sizes, aspects, object sizes and background shades come from the split's ranges, which
    the shifted split and the others never share."""
    shown = {"long": [], "aspect": [], "small": [], "large": [], "shade": [], "sides": []}
    for index in range(90):
        pair = generate_pair(index, seed=5, split=split)
        scene = pair.before_scene
        shown["long"].append(max(scene.width, scene.height))
        shown["aspect"].append(scene.width / scene.height)
        shown["shade"] += [abs(v) for v in scene.shade]
        shown["sides"] += [max(pair.before.size), max(pair.after.size)]
        for obj in scene.objects:
            shown[obj.size].append(obj.extent / scene.short_side)
    side_slack = 1 / 16  # rounding to whole pixels
    assert all(_in(v, ranges.long_side, 1) and not _in(v, other.long_side, -1) for v in shown["long"])
    assert all(_in(v, ranges.aspect, 0.01) for v in shown["aspect"])
    assert all(_in(v, ranges.small, side_slack / 8) and v < SMALL_LIMIT for v in shown["small"])
    assert all(_in(v, ranges.large, side_slack / 8) and v >= SMALL_LIMIT for v in shown["large"])
    assert all(_in(v, ranges.shade, 0.5) for v in shown["shade"])
    assert all(MIN_SIDE <= v <= MAX_SIDE for v in shown["sides"])
    assert shown["small"] and shown["large"]


def test_the_world_is_wide():
    """Non-square images, every background (white included), 1 to 8 objects, resized after images."""
    pairs = [generate_pair(index, seed=6, split="train") for index in range(400)]
    scenes = [p.before_scene for p in pairs]
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} >= set(range(1, MAX_OBJECTS + 1))
    assert sum(s.width != s.height for s in scenes) > 300
    resized = [p for p in pairs if p.after.size != p.before.size]
    assert 0.15 < len(resized) / len(pairs) < 0.35
    for pair in resized[:5]:  # the same scene, only larger or smaller
        assert abs(pair.after.width / pair.after.height - pair.before.width / pair.before.height) < 0.05


def test_the_leading_reference_is_not_always_one_template():
    firsts = {c: set() for c in ("add", "remove", "color", "local", "background", "text")}
    for index in range(9 * 30):
        pair = generate_pair(index, seed=7, split="train")
        if pair.category in firsts:
            firsts[pair.category].add(" ".join(w for w in pair.references[0].split() if w in
                                                ("added", "appeared", "removed", "missing", "turned", "changed",
                                                 "moved", "shifted", "from", "became", "written", "letters")))
    assert all(len(verbs) >= 2 for verbs in firsts.values()), firsts


def test_a_category_can_be_asked_for():
    assert generate_pair(0, split="train", category="none").category == "none"
    assert generate_pair(0, split="train", category="none").before_scene != generate_pair(0, split="train").before_scene
    with pytest.raises(ValueError, match="category"):
        generate_pair(0, category="rotate")


def test_differences_list_what_is_in_one_half_and_not_the_other(pairs):
    for pair in pairs:
        listed = pair.differences
        assert listed == list_differences(pair.before_scene, pair.after_scene) and listed.startswith("differences: ")
        gone = set(pair.before_scene.objects) - set(pair.after_scene.objects)
        new = set(pair.after_scene.objects) - set(pair.before_scene.objects)
        if pair.category == "none":
            assert listed == "differences: none"
        for obj in gone:
            assert "top only" in listed and obj.full_name in listed.split("; bottom only")[0] or "moved" in listed
        for obj in new:
            assert f"bottom only" in listed and obj.full_name in listed.split("bottom only")[-1] or "moved" in listed
        if pair.category == "background":
            assert f"top only {'an' if pair.before_scene.background[0] in 'aeiou' else 'a'} {pair.before_scene.background} background" in listed
        if pair.category in ("style", "global"):
            assert listed.startswith("differences: bottom only ") and "top only" not in listed
