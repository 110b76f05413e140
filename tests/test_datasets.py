"""Dataset readers: tiny fake datasets of every format, read back, and every kind of bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from idc_lite.tools.datasets import (
    PairRecord,
    detect_format,
    read_clevr_change,
    read_dataset,
    read_ier,
    read_jsonl,
    read_spot_the_diff,
    read_syned,
    write_jsonl,
)
from idc_lite.errors import DatasetError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)
    return path


def _json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def _raises(call, *fragments: str) -> str:
    """Run ``call``, expect a one-line DatasetError whose message holds every fragment."""
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ----------------------------------------------------------------------------------------- jsonl
@pytest.fixture
def jsonl_dataset(tmp_path: Path) -> Path:
    for stem in ("a", "b"):
        _png(tmp_path / "images" / f"{stem}_before.png")
        _png(tmp_path / "images" / f"{stem}_after.png")
    outside = _png(tmp_path.parent / f"{tmp_path.name}-outside.png")
    lines = [
        {"id": "a", "before": "images/a_before.png", "after": "images/a_after.png",
         "references": ["a red circle was added", "  a circle appeared  "], "category": "add"},
        {"id": "b", "before": "images/b_before.png", "after": str(outside), "references": ["nothing changed"]},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_relative_and_absolute_paths_and_optional_category(jsonl_dataset: Path):
    a, b = read_jsonl(jsonl_dataset)
    folder = jsonl_dataset.parent
    assert a == PairRecord(
        "a", str(folder / "images/a_before.png"), str(folder / "images/a_after.png"),
        ("a red circle was added", "a circle appeared"), "add",
    )
    assert b.category is None and Path(b.after).is_absolute() and Path(b.after).is_file()


def test_write_jsonl_round_trips_with_relative_paths(jsonl_dataset: Path, tmp_path: Path):
    records = read_jsonl(jsonl_dataset)
    copy = write_jsonl(records, tmp_path / "copy.jsonl")
    first = json.loads(copy.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "a", "before": "images/a_before.png", "after": "images/a_after.png",
                     "references": ["a red circle was added", "a circle appeared"], "category": "add"}
    assert "category" not in json.loads(copy.read_text(encoding="utf-8").splitlines()[1])
    assert read_jsonl(copy) == records


def _rewrite(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_malformed_line_names_file_and_line(jsonl_dataset: Path):
    _rewrite(jsonl_dataset, 3, '{"id": "b", "before": ')
    message = _raises(lambda: read_jsonl(jsonl_dataset), str(jsonl_dataset), "line 3", "invalid JSON")
    assert message.startswith(f"{jsonl_dataset}: ")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda item: item.pop("references"), ("line 1, record 'a'", "missing key 'references'")),
        (lambda item: item.pop("id"), ("line 1", "missing key 'id'")),
        (lambda item: item.update(references=[]), ("record 'a'", "no reference captions")),
        (lambda item: item.update(references=["  "]), ("record 'a'", "no reference captions")),
        (lambda item: item.update(references="a caption"), ("record 'a'", "list of strings")),
        (lambda item: item.update(after="images/nope.png"), ("record 'a'", "after image not found", "nope.png")),
        (lambda item: item.update(category=3), ("record 'a'", "'category'")),
    ],
)
def test_jsonl_bad_records_name_file_and_record(jsonl_dataset: Path, change, fragments):
    item = json.loads(jsonl_dataset.read_text(encoding="utf-8").splitlines()[0])
    change(item)
    _rewrite(jsonl_dataset, 1, json.dumps(item))
    _raises(lambda: read_jsonl(jsonl_dataset), str(jsonl_dataset), *fragments)


def test_jsonl_duplicate_ids_and_missing_file(jsonl_dataset: Path, tmp_path: Path):
    first = jsonl_dataset.read_text(encoding="utf-8").splitlines()[0]
    jsonl_dataset.write_text(first + "\n" + first + "\n", encoding="utf-8")
    _raises(lambda: read_jsonl(jsonl_dataset), "record 'a'", "duplicate id")
    _raises(lambda: read_jsonl(tmp_path / "absent.jsonl"), "absent.jsonl", "no such file")


# ---------------------------------------------------------------------------------- CLEVR-Change
@pytest.fixture
def clevr_root(tmp_path: Path) -> Path:
    """CLEVR-Change with three scenes, unpacked as the release does into ``data/``."""
    data = tmp_path / "data"
    for i in range(3):
        _png(data / "images" / f"CLEVR_default_{i:06d}.png")
        _png(data / "sc_images" / f"CLEVR_semantic_{i:06d}.png")
        _png(data / "nsc_images" / f"CLEVR_nonsemantic_{i:06d}.png")
    # Key spellings differ on purpose: the reader goes by the scene number.
    _json(data / "change_captions.json", {
        "CLEVR_default_000000.png": ["the cube became red"],
        "CLEVR_default_000001.png": ["the small cylinder changed to blue", "the cylinder turned blue"],
        "000002.png": ["the sphere has moved"],
    })
    _json(data / "no_change_captions.json", {
        f"CLEVR_default_{i:06d}.png": ["no change was made", "the scene is the same"] for i in range(3)
    })
    _json(data / "splits.json", {"train": [0], "val": [], "test": [1, "2"]})
    _json(data / "type_mapping.json", {
        "color": ["000000.png", "000001.png"],
        "move": ["CLEVR_default_000002.png"],
        "distractor": ["000001.png_n", "000002.png_n"],
    })
    return tmp_path


def test_clevr_change_gives_a_change_and_a_no_change_record_per_scene(clevr_root: Path):
    records = read_clevr_change(clevr_root, "test")
    data = clevr_root / "data"
    assert [(r.id, r.category) for r in records] == [
        ("000001", "color"), ("000001_n", "none"), ("000002", "move"), ("000002_n", "none"),
    ]
    change, no_change = records[0], records[1]
    assert change.before == no_change.before == str(data / "images/CLEVR_default_000001.png")
    assert change.after == str(data / "sc_images/CLEVR_semantic_000001.png")
    assert no_change.after == str(data / "nsc_images/CLEVR_nonsemantic_000001.png")
    assert change.references == ("the small cylinder changed to blue", "the cylinder turned blue")
    assert read_clevr_change(clevr_root / "data", "train")[0].id == "000000"


def test_clevr_change_without_type_mapping_has_no_change_category(clevr_root: Path):
    (clevr_root / "data" / "type_mapping.json").unlink()
    assert [r.category for r in read_clevr_change(clevr_root, "test")] == [None, "none", None, "none"]


def test_clevr_change_errors(clevr_root: Path):
    data = clevr_root / "data"
    _raises(lambda: read_clevr_change(clevr_root, "dev"), str(data / "splits.json"), "no split 'dev'")
    (data / "sc_images" / "CLEVR_semantic_000002.png").unlink()
    _raises(
        lambda: read_clevr_change(clevr_root, "test"),
        str(data / "change_captions.json"), "record '000002'", "after image not found",
    )
    _json(data / "no_change_captions.json", {"CLEVR_default_000001.png": []})
    _raises(
        lambda: read_clevr_change(clevr_root, "test"),
        str(data / "no_change_captions.json"), "record '000001_n'", "no reference captions",
    )
    (data / "change_captions.json").write_text('{"CLEVR_default_000001.png": [', encoding="utf-8")
    _raises(lambda: read_clevr_change(clevr_root, "test"), str(data / "change_captions.json"), "invalid JSON")


# -------------------------------------------------------------------------- Spot-the-Diff, IER
@pytest.fixture
def std_dataset(tmp_path: Path) -> Path:
    for stem in ("256", "256_2", "187", "187_2"):
        _png(tmp_path / "resized_images" / f"{stem}.png")
    return _json(tmp_path / "test.json", [
        {"img_id": "256", "sentences": ["person with umbrella is gone", "car is now missing"]},
        {"img_id": 187, "sentences": ["i see no differences between the two images"]},
    ])


def test_spot_the_diff(std_dataset: Path):
    images = std_dataset.parent / "resized_images"
    first, second = read_spot_the_diff(std_dataset, images)
    assert first == PairRecord(
        "256", str(images / "256.png"), str(images / "256_2.png"),
        ("person with umbrella is gone", "car is now missing"),
    )
    assert second.id == "187"


def test_spot_the_diff_errors(std_dataset: Path):
    images = std_dataset.parent / "resized_images"
    (images / "187_2.png").unlink()
    _raises(lambda: read_spot_the_diff(std_dataset, images), str(std_dataset), "record '187'", "187_2.png")
    _json(std_dataset, [{"img_id": "256"}])
    _raises(lambda: read_spot_the_diff(std_dataset, images), "record '256'", "missing key 'sentences'")
    _json(std_dataset, [{"sentences": ["x"]}])
    _raises(lambda: read_spot_the_diff(std_dataset, images), "item 0", "missing key 'img_id'")
    _json(std_dataset, {"img_id": "256"})
    _raises(lambda: read_spot_the_diff(std_dataset, images), str(std_dataset), "expected a JSON list")


@pytest.fixture
def ier_dataset(tmp_path: Path) -> Path:
    for name in ("r_1.jpg", "r_1_2.jpg", "r_2.png", "r_2_edit.png"):
        _png(tmp_path / "images" / name)
    return _json(tmp_path / "test.json", [
        {"img0": "r_1.jpg", "img1": "r_1_2.jpg", "sents": ["take the people out"], "uid": "Reddit_1052"},
        {"img0": "r_2.png", "img1": "r_2_edit.png", "sents": ["add a tiger", "insert a tiger"], "uid": "Reddit_1085"},
    ])


def test_ier(ier_dataset: Path):
    images = ier_dataset.parent / "images"
    records = read_ier(ier_dataset, images)
    assert [r.id for r in records] == ["Reddit_1052", "Reddit_1085"]
    assert records[1].after == str(images / "r_2_edit.png")
    assert records[1].references == ("add a tiger", "insert a tiger")


def test_ier_errors(ier_dataset: Path):
    images = ier_dataset.parent / "images"
    items = json.loads(ier_dataset.read_text(encoding="utf-8"))
    del items[1]["img1"]
    _json(ier_dataset, items)
    _raises(lambda: read_ier(ier_dataset, images), str(ier_dataset), "record 'Reddit_1085'", "missing key 'img1'")
    items[1]["img1"] = "r_2_edit.png"
    items[0]["sents"] = []
    _json(ier_dataset, items)
    _raises(lambda: read_ier(ier_dataset, images), "record 'Reddit_1052'", "no reference captions")


# ----------------------------------------------------------------------------------------- Syned
@pytest.fixture
def syned_dataset(tmp_path: Path) -> Path:
    for idx in ("0", "204"):
        _png(tmp_path / "images" / f"{idx}_input.png")
        _png(tmp_path / "images" / f"{idx}_output.png")
    return _json(tmp_path / "gt_augmented_test.json", {
        "0 ": ["Add a goat peeking over the fence", "Place a curious goat near the fence"],
        "204 ": ['"Put a suitcase on the bed."', 'Change the word "ARC" to "BEACH'],
    })


def test_syned_strips_key_spaces_and_wrapping_quotes(syned_dataset: Path):
    images = syned_dataset.parent / "images"
    goat, suitcase = read_syned(syned_dataset, images)
    assert goat.id == "0" and goat.before == str(images / "0_input.png") and goat.after == str(images / "0_output.png")
    assert suitcase.references == ("Put a suitcase on the bed.", 'Change the word "ARC" to "BEACH')
    kept = read_syned(syned_dataset, images, unquote=False)[1]
    assert kept.references[0] == '"Put a suitcase on the bed."'


def test_syned_image_patterns_are_configurable(syned_dataset: Path):
    images = syned_dataset.parent / "images"
    for idx in ("0", "204"):
        (images / f"{idx}_input.png").rename(images / f"src_{idx}.png")
    _raises(lambda: read_syned(syned_dataset, images), str(syned_dataset), "record '0'", "before image not found")
    records = read_syned(syned_dataset, images, before_pattern="src_{idx}.png")
    assert records[1].before == str(images / "src_204.png")


# -------------------------------------------------------------------------------------- dispatch
def test_read_dataset_jsonl_file_or_synth_folder(jsonl_dataset: Path):
    assert detect_format(jsonl_dataset) == "jsonl"
    assert [r.id for r in read_dataset(jsonl_dataset)] == ["a", "b"]
    assert [r.id for r in read_dataset(jsonl_dataset.parent, split="test")] == ["a", "b"]


def test_read_dataset_clevr_change_folder_or_caption_file(clevr_root: Path):
    assert detect_format(clevr_root) == "clevr-change"
    assert len(read_dataset(clevr_root, split="test")) == 4
    assert len(read_dataset(clevr_root / "data" / "change_captions.json", split="train")) == 2


def test_read_dataset_spot_the_diff_with_default_image_dir(std_dataset: Path):
    assert detect_format(std_dataset) == "spot-the-diff"
    assert read_dataset(std_dataset)[0].before == str(std_dataset.parent / "resized_images" / "256.png")


def test_read_dataset_ier_and_syned(ier_dataset: Path, tmp_path_factory):
    assert detect_format(ier_dataset) == "ier"
    assert read_dataset(ier_dataset)[0].id == "Reddit_1052"
    syned = tmp_path_factory.mktemp("syned")
    _png(syned / "7_input.png")
    _png(syned / "7_output.png")
    refs = _json(syned / "refs.json", {"7 ": ["make it snow"]})
    assert detect_format(refs) == "syned"
    assert read_dataset(refs, "syned", image_dir=syned)[0].references == ("make it snow",)


def test_read_dataset_errors(tmp_path: Path):
    _raises(lambda: read_dataset(tmp_path), str(tmp_path), "cannot tell the dataset format")
    _raises(lambda: read_dataset(tmp_path / "nothing.json"), "nothing.json", "no such file")
    odd = _json(tmp_path / "odd.json", [1, 2])
    _raises(lambda: read_dataset(odd), str(odd), "pass the format explicitly")
    _raises(lambda: read_dataset(odd, "coco"), "unknown dataset format 'coco'")
