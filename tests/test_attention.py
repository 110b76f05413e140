"""`idc-lite attention`: the ViT's attention maps over the stacked pair, on both backends.

The session's artifact (the tiny BLIP-2 with its adapter merged, fp32 encoder) and the reference
backend with the same adapter unmerged give the maps of both backends on the same weights: the
reference's are transformers' attention outputs, the lite backend's come from the artifact's
attention graph.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from idc_lite import Captioner
from idc_lite.artifact import ATTENTION_FILE, MANIFEST, load_manifest, write_manifest
from idc_lite.attention import (AttentionMaps, attention_layout, check_layer, parse_heads, parse_source,
                                render_attention)
from idc_lite.errors import ArtifactError, OptionError


def _pair(seed: int = 0, before_size=(50, 40), after_size=(70, 30)):
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 256, (before_size[1], before_size[0], 3), dtype=np.uint8)
    after = rng.integers(0, 256, (after_size[1], after_size[0], 3), dtype=np.uint8)
    return before, after


@pytest.fixture(scope="module")
def lite(artifact):
    return Captioner(artifact)


@pytest.fixture(scope="module")
def reference(adapted):
    """The same weights as the artifact's, unmerged: the reference backend's attention to compare with."""
    return adapted


@pytest.fixture(scope="module")
def bare(artifact, tmp_path_factory):
    """The artifact as an older idc-lite wrote it: no attention graph, no manifest entry."""
    root = shutil.copytree(artifact, tmp_path_factory.mktemp("attention") / "bare")
    (root / ATTENTION_FILE).unlink()
    data = json.loads((root / MANIFEST).read_text())
    write_manifest(root, {k: v for k, v in data.items() if k not in ("format", "format_version", "files", "attention")})
    return root


def test_both_backends_agree_at_fp32(lite, reference):
    """Every layer, every head, every token's row: the lite graph gives transformers' probabilities."""
    before, after = _pair()
    geometry = lite.backend.attention_geometry()
    assert geometry == reference.backend.attention_geometry()
    for layer in range(geometry.layers):
        got = lite.attention(before, after, layer=layer)
        expected = reference.attention(before, after, layer=layer)
        assert got.matrix.shape == (geometry.heads, geometry.tokens, geometry.tokens)
        assert np.abs(got.matrix - expected.matrix).max() <= 1e-4
        np.testing.assert_allclose(got.matrix.sum(-1), 1.0, atol=1e-5)  # each row is a distribution


def test_the_export_shares_the_encoders_weights(artifact):
    import onnx

    manifest = load_manifest(artifact)
    entry = manifest.attention
    assert entry.file == ATTENTION_FILE and entry.layers == 2 and entry.heads == 2 and entry.grid == (4, 4)
    assert entry.validation["max_abs_diff"] <= entry.validation["tolerance"] == 1e-4
    graph = onnx.load(str(artifact / ATTENTION_FILE), load_external_data=False).graph
    locations = {d.value for init in graph.initializer for d in init.external_data if d.key == "location"}
    assert locations == {"encoder.onnx.data"}  # the encoder's weights file, not a copy
    assert not list(artifact.glob("*attention*.data"))
    assert [o.name for o in graph.output] == list(entry.outputs)


@pytest.mark.parametrize("source", ["cls", "mean", (30, 50), "49,59"])
def test_maps_are_distributions_with_the_grid_geometry(lite, source):
    before, after = _pair()
    maps = lite.attention(before, after, source=source, heads="1")
    assert maps.heads == (1,) and maps.layer == 1 and maps.grid == (4, 4) and maps.patch_size == 8
    assert maps.weights.shape == (1, 17) and maps.maps.shape == (1, 4, 4)
    np.testing.assert_allclose(maps.weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.maps.sum((1, 2)) + maps.cls_weight, 1.0, atol=1e-5)
    assert maps.canvas_size == (50, 60) and maps.before_size == (50, 40) and maps.after_size == (70, 30)
    if not isinstance(source, str) or "," in source:
        row, col = maps.source_patch  # the canvas is 50 x 60 (two 50 x 30 halves) on a 4 x 4 grid
        assert (row, col) == ((3, 3) if source == "49,59" else (3, 2))
        assert np.array_equal(maps.weights, maps.matrix[:, 1 + row * 4 + col])


def _maps(grid=(5, 4), patch=10, before_size=(30, 20), after_size=(7, 11), heads=(0, 2)) -> AttentionMaps:
    rows, cols = grid
    weights = np.zeros((len(heads), 1 + rows * cols), np.float32)
    weights[:, 1:] = np.arange(rows * cols, dtype=np.float32)  # a patch's value is its index
    weights[1, 1:] += 100
    canvas = Image.new("RGB", (40, 64), (200, 10, 10))
    return AttentionMaps(
        matrix=np.zeros((len(heads), 1 + rows * cols, 1 + rows * cols), np.float32), weights=weights, layer=3,
        layers=4, heads=heads, source="cls", grid=grid, patch_size=patch, input_size=(cols * patch, rows * patch),
        canvas_size=canvas.size, before_size=before_size, after_size=after_size, canvas=canvas,
    )


def test_halves_map_the_grid_back_to_each_images_own_size():
    """5 patch rows over two halves: rows 0-1 and the top of row 2 are before, the rest after."""
    maps = _maps()
    before, after = maps.halves()
    assert before.shape == (2, 20, 30) and after.shape == (2, 11, 7)
    rows_seen = lambda half: [int(v) // 4 for v in half[0, :, 0]]  # noqa: E731  (patch row of each pixel row)
    assert rows_seen(before) == [0] * 8 + [1] * 8 + [2] * 4
    assert rows_seen(after) == [2] * 2 + [3] * 5 + [4] * 4  # pixel centres at 25 + (i + 0.5) * 25 / 11
    assert [int(v) % 4 for v in before[0, 0]] == [0] * 7 + [1] * 8 + [2] * 7 + [3] * 8  # columns, 30 px wide
    assert np.array_equal(before[1], before[0] + 100)  # each head its own map
    big = _maps(before_size=(4000, 3000)).halves(max_side=1024)[0]
    assert big.shape == (2, 768, 1024)  # capped, aspect ratio kept


def test_the_picture_is_the_pair_then_one_labelled_panel_per_head():
    maps = _maps(heads=tuple(range(7)))
    maps = AttentionMaps(**{**maps.__dict__, "weights": np.repeat(maps.weights[:1], 7, 0),
                            "matrix": np.zeros((7, 21, 21), np.float32)})
    layout = attention_layout(maps, panel_width=100)
    picture = render_attention(maps, panel_width=100)
    assert picture.size == layout.size and len(layout.panels) == 8
    assert layout.size[0] == 2 * 8 + 6 * 100 + 5 * 6  # six panels to a row, then the next row
    first, last = layout.panels[0], layout.panels[6]
    assert (first[2] - first[0], first[3] - first[1]) == (100, 160)  # the pair's own 40 x 64 aspect
    assert last[1] > first[3] and last[0] == first[0]
    pixels = np.asarray(picture)
    assert (pixels[first[1] + 5, first[0] + 5] == (200, 10, 10)).all()  # the pair, as composed
    title = pixels[: first[1] - 6]
    assert (title < 128).any()  # the title and the honest label are written
    assert any("Not a map of what changed" in line or "changed." in line for line in layout.title_lines)
    for box in layout.panels[1:]:  # each overlay: brightest where its map is highest (the bottom right patch)
        panel = pixels[box[1]:box[3], box[0]:box[2]].astype(int).sum(-1)
        assert panel[-3, -3] > panel[3, 3]
        assert (pixels[box[3] + 2: box[3] + layout.line_height, box[0]:box[2]] < 128).any()  # its label


def test_options_are_checked():
    assert check_layer(-1, 6) == 5 and check_layer(0, 6) == 0
    assert parse_heads("all") is None and parse_heads("2,0,2") == (2, 0) and parse_heads([1]) == (1,)
    assert parse_source(" CLS") == "cls" and parse_source("3,4") == (3, 4) and parse_source((3, 4)) == (3, 4)
    for bad in (lambda: check_layer(6, 6), lambda: check_layer(-7, 6), lambda: parse_heads("x"),
                lambda: parse_source("middle"), lambda: parse_source("1,2,3")):
        with pytest.raises(OptionError):
            bad()


def test_the_cli_writes_the_picture_and_the_arrays(artifact, tmp_path, capsys):
    from idc_lite.cli import main

    before, after = _pair()
    Image.fromarray(before).save(tmp_path / "b.png")
    Image.fromarray(after).save(tmp_path / "a.png")
    args = ["attention", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "-m", str(artifact)]
    with pytest.raises(SystemExit) as info:
        main([*args, "-o", str(tmp_path / "maps.png"), "--json", str(tmp_path / "maps.npz"), "--from", "mean",
              "--heads", "0", "--layer", "0"])
    assert not info.value.code
    assert Image.open(tmp_path / "maps.png").format == "PNG"
    arrays = np.load(tmp_path / "maps.npz")
    assert arrays["before"].shape == (1, 40, 50) and arrays["after"].shape == (1, 30, 70)
    assert int(arrays["layer"]) == 0 and str(arrays["source"]) == "mean"
    capsys.readouterr()
    for extra, message in ((["--layer", "2"], "layer 2 does not exist: the ViT has 2 layers"),
                           (["--heads", "0,5"], "head 5 does not exist: each layer has 2 heads"),
                           (["--heads", "one"], "heads must be 'all' or numbers"),
                           (["--from", "500,5"], "the point 500,5 lies outside the stacked pair (50x60 pixels")):
        with pytest.raises(SystemExit) as info:
            main([*args, "-o", str(tmp_path / "x.png"), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_artifacts_without_the_graph_still_load_and_the_tool_adds_it(bare, lite, tmp_path, capsys):
    from export.__main__ import main as export_main
    from idc_lite.cli import main

    before, after = _pair()
    old = Captioner(bare)
    assert old.backend.manifest.attention is None
    assert old.describe(before, after).caption == lite.describe(before, after).caption
    with pytest.raises(ArtifactError, match="has no attention graph; add one with `python -m export attention"):
        old.attention(before, after)
    Image.fromarray(before).save(tmp_path / "b.png")
    Image.fromarray(after).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        main(["attention", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "-m", str(bare),
              "-o", str(tmp_path / "x.png")])
    assert info.value.code == 2 and "has no attention graph" in capsys.readouterr().err

    encoder = (bare / "encoder.onnx").read_bytes()
    with pytest.raises(SystemExit) as info:
        export_main(["attention", str(bare)])
    assert not info.value.code
    assert (bare / "encoder.onnx").read_bytes() == encoder and not list(bare.glob(".*"))
    added = Captioner(bare)
    assert added.backend.manifest.attention.validation["against"] == "encoder.onnx"
    assert added.describe(before, after).caption == lite.describe(before, after).caption
    assert added.backend._attention_session is None  # captioning never opens the attention graph
    assert np.array_equal(added.attention(before, after).matrix, lite.attention(before, after).matrix)


def test_the_embedded_model_ships_with_its_attention_graph():
    from idc_lite.default_model import EMBEDDED_DIR

    if not (EMBEDDED_DIR / MANIFEST).is_file():
        pytest.skip("no embedded model in this checkout")
    manifest = load_manifest(EMBEDDED_DIR)
    validation = manifest.attention.validation if manifest.attention else {}
    assert validation and validation["max_abs_diff"] <= validation["tolerance"], validation
    assert sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file()) <= 50e6
    maps = Captioner().attention(*_pair(before_size=(64, 64), after_size=(64, 64)), heads="all")
    assert maps.matrix.shape == (3, 101, 101) and maps.layer == 5


def test_the_corresponding_parts_measure():
    """benchmarks.attention: the share of a changed region's attention on the same region of the other half."""
    from benchmarks.attention import corresponding_share, region_mask

    mask = region_mask([(60, 10, 90, 20)], (100, 100), rows=2, cols=2)  # the top right patch of each half
    assert mask.tolist() == [[False, True], [False, False]]
    assert region_mask(None, (100, 100), 2, 2).all()  # a change of the whole picture
    matrix = np.full((1, 9, 9), 1 / 9, np.float32)  # tokens: class, top half 1-4, bottom half 5-8
    matrix[0, 2] = [0.1, 0, 0, 0, 0, 0, 0.6, 0.3, 0]  # the top region patch: 0.6 on its bottom twin
    matrix[0, 6] = [0, 0.1, 0.2, 0, 0, 0.7, 0, 0, 0]  # the bottom region patch: 0.2 on its top twin
    region, half = corresponding_share(matrix, mask)
    np.testing.assert_allclose(region, [0.4])
    np.testing.assert_allclose(half, [0.6])


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(grid=[0, 4]), "'grid' is not two whole numbers"),
    (lambda e: e.update(outputs=[]), "lacks 'outputs'"),
    (lambda e: e.update(heads="2"), "lacks 'heads'"),
    (lambda e: e.update(file="../encoder-attention.onnx"), "leaves the artifact folder"),
    (lambda e: e.update(file="other.onnx"), "other.onnx: not listed in the manifest's files"),
])
def test_a_malformed_attention_entry_is_one_error(artifact, tmp_path, edit, message):
    root = shutil.copytree(artifact, tmp_path / "edited")
    data = json.loads((root / MANIFEST).read_text())
    edit(data["attention"])
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_manifest(root, verify=False)
