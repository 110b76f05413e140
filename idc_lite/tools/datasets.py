"""Dataset readers: every supported image-difference dataset as one list of :class:`PairRecord`.

Training, evaluation and benchmarks read pairs through here and never parse a dataset themselves, so
each format's quirks (file naming, key spellings, id conventions) live in one place. Supported:

``jsonl``          idc-lite's own format (:func:`read_jsonl`, :func:`write_jsonl`); the synthetic
                   change world (:mod:`idc_lite.tools.synth`) writes it.
``clevr-change``   CLEVR-Change (Park et al., 2019), :func:`read_clevr_change`.
``spot-the-diff``  Spot-the-Diff (Jhamtani & Berg-Kirkpatrick, 2018), :func:`read_spot_the_diff`.
``ier``            Image Editing Request (Tan et al., 2019), :func:`read_ier`.
``syned``          Syned / Emu Edit test references as used by BLIP2IDC, :func:`read_syned`.

Every reader checks every record up front (keys present, references non-empty, both image files on
disk, ids unique) and raises :class:`~idc_lite.errors.DatasetError` naming the file and the record, so
a bad dataset fails before a long run starts, not half-way through it. Image names that a
Spot-the-Diff, IER or Syned file gives (or builds from its ids) must stay inside the image folder:
an absolute name or one whose ``..`` climbs out of it is refused, so a downloaded dataset file cannot
point the run at other files. (idc-lite's own JSONL may name any path: it is written by idc-lite or
by you, and its paths are relative to its own folder or absolute.) Reference captions are
stripped of surrounding whitespace and empty ones are dropped; a record left with none is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError

FORMATS = ("jsonl", "clevr-change", "spot-the-diff", "ier", "syned")

#: Default Syned image names; the released references do not say how images are named, so
#: :func:`read_syned` takes both patterns as parameters.
SYNED_BEFORE = "{idx}_input.png"
SYNED_AFTER = "{idx}_output.png"

# CLEVR-Change: change types that are the no-change (distractor) half, which gets category "none".
_CLEVR_NO_CHANGE_TYPES = {"distractor", "no_change", "no-change", "nochange", "nonsemantic", "none"}


@dataclass(frozen=True)
class PairRecord:
    """One (before, after) pair and its reference captions; image paths are absolute."""

    id: str
    before: str
    after: str
    references: tuple[str, ...]
    #: The change type when the dataset has one ("add", "color", ...; "none" for no change).
    category: str | None = None


# ----------------------------------------------------------------------------------------- jsonl
def read_jsonl(path: str | os.PathLike) -> list[PairRecord]:
    """Read idc-lite's JSONL format: one pair per line.

    Each non-blank line is ``{"id": "0001", "before": "images/0001_before.png",
    "after": "images/0001_after.png", "references": ["...", ...], "category": "add"}``;
    ``category`` is optional (absent or null). Image paths are relative to the JSONL file's folder,
    or absolute. Errors name the line number and, once known, the record id.
    """
    path = Path(path)
    folder = path.absolute().parent
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"line {lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(item, dict):
            raise DatasetError(path, f"line {lineno}: expected a JSON object, got {type(item).__name__}")
        rid = item.get("id")
        if not isinstance(rid, str) or not rid:
            problem = "missing key 'id'" if "id" not in item else "'id' must be a non-empty string"
            raise DatasetError(path, f"line {lineno}: {problem}")
        where = f"line {lineno}, record {rid!r}"
        _require(item, ("before", "after", "references"), path, where)
        category = item.get("category")
        if category is not None and not isinstance(category, str):
            raise DatasetError(path, f"{where}: 'category' must be a string or null")
        records.append(
            _record(path, where, rid, folder, item["before"], item["after"], item["references"], category)
        )
    return _unique(records, path)


def write_jsonl(records: Iterable[PairRecord], path: str | os.PathLike) -> Path:
    """Write records in the format :func:`read_jsonl` reads, image paths relative to the file's folder.

    Relative paths use forward slashes so the dataset folder can be moved or copied between systems;
    a path that has no relative form (another drive on Windows) is written absolute.
    """
    path = Path(path)
    folder = path.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        item: dict[str, Any] = {
            "id": record.id,
            "before": _relative(record.before, folder),
            "after": _relative(record.after, folder),
            "references": list(record.references),
        }
        if record.category is not None:
            item["category"] = record.category
        lines.append(json.dumps(item, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- CLEVR-Change
def read_clevr_change(root: str | os.PathLike, split: str = "test") -> list[PairRecord]:
    """Read one split of CLEVR-Change, two records per scene: its change and its no-change pair.

    Assumed layout (the released ``clevr_change.tar.gz``, which unpacks into ``data/``; ``root`` may
    be that ``data`` folder or the folder holding it)::

        change_captions.json     {"CLEVR_default_000123.png": ["the red cube moved", ...], ...}
        no_change_captions.json  same keys, captions of the distractor (no-change) pair
        splits.json              {"train": [0, 1, ...], "val": [...], "test": [...]}   scene numbers
        type_mapping.json        {"color": ["000123.png", ...], "material": [...], "add": [...],
                                  "drop": [...], "move": [...]}   (optional)
        images/CLEVR_default_000123.png        before
        sc_images/CLEVR_semantic_000123.png    after, semantic change
        nsc_images/CLEVR_nonsemantic_000123.png  after, no change (viewpoint/lighting only)

    Scene numbers are the digits in the file names, so caption keys and type-mapping entries may be
    spelled ``"CLEVR_default_000123.png"``, ``"000123.png"``, ``"000123"`` or ``123``; split
    indices may be ints or digit strings. Record ids are ``"000123"`` (change; category from
    ``type_mapping.json``, its type name lower-cased as written there, e.g. ``"material"``, or None
    if the file or the entry is missing) and ``"000123_n"`` (no change; category ``"none"``). The
    ``_n`` suffix follows the official evaluation files. Distractor types in the mapping
    (``distractor``, ``no_change``, or entries ending in ``_n``) are ignored.
    """
    root = Path(root)
    if not (root / "change_captions.json").is_file() and (root / "data" / "change_captions.json").is_file():
        root = root / "data"
    change_path = root / "change_captions.json"
    no_change_path = root / "no_change_captions.json"
    splits_path = root / "splits.json"
    types_path = root / "type_mapping.json"
    change = _captions_by_scene(change_path)
    no_change = _captions_by_scene(no_change_path)
    splits = _load_json(splits_path, dict)
    if split not in splits:
        raise DatasetError(splits_path, f"no split {split!r} (it has {', '.join(map(repr, splits))})")
    if not isinstance(splits[split], list):
        raise DatasetError(splits_path, f"split {split!r} must be a list of scene numbers")
    types = _clevr_types(types_path) if types_path.is_file() else {}

    records = []
    for position, entry in enumerate(splits[split]):
        number = _scene_number(entry)
        if number is None:
            raise DatasetError(splits_path, f"split {split!r}, item {position}: {entry!r} is not a scene number")
        name = f"{number:06d}"
        for rid, captions, captions_path, after_dir, after_stem, category in (
            (name, change, change_path, "sc_images", "CLEVR_semantic", types.get(number)),
            (f"{name}_n", no_change, no_change_path, "nsc_images", "CLEVR_nonsemantic", "none"),
        ):
            if number not in captions:
                raise DatasetError(captions_path, f"record {rid!r}: no captions for CLEVR_default_{name}.png")
            records.append(
                _record(
                    captions_path,
                    f"record {rid!r}",
                    rid,
                    root,
                    f"images/CLEVR_default_{name}.png",
                    f"{after_dir}/{after_stem}_{name}.png",
                    captions[number],
                    category,
                )
            )
    return _unique(records, splits_path)


def _captions_by_scene(path: Path) -> dict[int, Any]:
    """A CLEVR-Change caption file keyed by scene number, whatever the key spelling."""
    by_number: dict[int, Any] = {}
    for key, captions in _load_json(path, dict).items():
        number = _scene_number(key)
        if number is None:
            raise DatasetError(path, f"key {key!r} has no scene number in it")
        by_number[number] = captions
    return by_number


def _clevr_types(path: Path) -> dict[int, str]:
    """Scene number -> change type, from ``type_mapping.json``."""
    types: dict[int, str] = {}
    for kind, entries in _load_json(path, dict).items():
        if kind.lower() in _CLEVR_NO_CHANGE_TYPES:
            continue
        if not isinstance(entries, list):
            raise DatasetError(path, f"type {kind!r} must map to a list of image ids")
        for entry in entries:
            if isinstance(entry, str) and entry.endswith("_n"):
                continue
            number = _scene_number(entry)
            if number is None:
                raise DatasetError(path, f"type {kind!r}: {entry!r} has no scene number in it")
            types[number] = kind.lower()
    return types


def _scene_number(value: Any) -> int | None:
    """The scene number in ``123``, ``"123"``, ``"000123.png"`` or ``"CLEVR_default_000123.png"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        digits = re.findall(r"\d+", value)
        if digits:
            return int(digits[-1])
    return None


# -------------------------------------------------------------------------- Spot-the-Diff, IER
def read_spot_the_diff(json_path: str | os.PathLike, image_dir: str | os.PathLike) -> list[PairRecord]:
    """Read Spot-the-Diff: a JSON list of ``{"img_id": "256", "sentences": [...]}``.

    Images are ``<image_dir>/<img_id>.png`` (before) and ``<image_dir>/<img_id>_2.png`` (after), as in
    the released ``resized_images`` folder. Record ids are the ``img_id`` values.
    """
    json_path = Path(json_path)
    records = []
    for position, item in enumerate(_load_json(json_path, list)):
        rid = _item_id(item, "img_id", json_path, position)
        where = f"record {rid!r} (item {position})"
        _require(item, ("sentences",), json_path, where)
        records.append(
            _record(json_path, where, rid, Path(image_dir), f"{rid}.png", f"{rid}_2.png", item["sentences"],
                    confine=True)
        )
    return _unique(records, json_path)


def read_ier(json_path: str | os.PathLike, image_dir: str | os.PathLike) -> list[PairRecord]:
    """Read Image Editing Request: a JSON list of ``{"img0", "img1", "sents", "uid"}``.

    ``img0`` (before) and ``img1`` (after) are file names in ``image_dir``; record ids are the ``uid``
    values.
    """
    json_path = Path(json_path)
    records = []
    for position, item in enumerate(_load_json(json_path, list)):
        rid = _item_id(item, "uid", json_path, position)
        where = f"record {rid!r} (item {position})"
        _require(item, ("img0", "img1", "sents"), json_path, where)
        records.append(
            _record(json_path, where, rid, Path(image_dir), item["img0"], item["img1"], item["sents"], confine=True)
        )
    return _unique(records, json_path)


# ----------------------------------------------------------------------------------------- Syned
def read_syned(
    refs_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    before_pattern: str = SYNED_BEFORE,
    after_pattern: str = SYNED_AFTER,
    unquote: bool = True,
) -> list[PairRecord]:
    """Read Syned / Emu Edit test references: ``{"<idx> ": ["caption", ...], ...}``.

    The keys carry a trailing space in the released files (``"102 "``); it is stripped and the
    record id is the bare index. Image names are not part of the references, so they are built from
    ``before_pattern`` and ``after_pattern`` with ``{idx}`` (defaults ``"{idx}_input.png"`` and
    ``"{idx}_output.png"`` in ``image_dir``; change them to match your copy). With ``unquote`` a
    caption wrapped in double quotes, an artefact of the LLM-augmented references
    (``"\\"Put a suitcase on the bed.\\""``), loses that one pair of quotes.
    """
    refs_json = Path(refs_json)
    records = []
    for key, captions in _load_json(refs_json, dict).items():
        rid = key.strip()
        where = f"record {rid!r}"
        if not rid:
            raise DatasetError(refs_json, f"record {key!r}: empty index")
        if unquote and isinstance(captions, list):
            captions = [_unquote(c) if isinstance(c, str) else c for c in captions]
        records.append(
            _record(
                refs_json,
                where,
                rid,
                Path(image_dir),
                before_pattern.format(idx=rid),
                after_pattern.format(idx=rid),
                captions,
                confine=True,
            )
        )
    return _unique(records, refs_json)


def _unquote(caption: str) -> str:
    caption = caption.strip()
    if len(caption) >= 2 and caption[0] == caption[-1] == '"':
        return caption[1:-1]
    return caption


# -------------------------------------------------------------------------------------- dispatch
def read_dataset(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    image_dir: str | os.PathLike | None = None,
    split: str = "test",
) -> list[PairRecord]:
    """Read any supported dataset; ``format="auto"`` tells the format from ``path``.

    Auto-detection: a ``.jsonl`` file is ``jsonl``; a folder holding ``change_captions.json`` (or
    ``data/change_captions.json``) is ``clevr-change``; a folder holding ``<split>.jsonl`` (what
    ``idc-lite synth`` writes) is that ``jsonl`` file; a ``.json`` file is told by its content: a list
    of objects with ``img_id`` is ``spot-the-diff``, with ``img0`` is ``ier``, an object mapping ids
    to caption lists is ``syned``. ``image_dir`` (Spot-the-Diff, IER, Syned) defaults to the first of
    ``images/``, ``resized_images/`` or the folder itself next to the JSON file. ``split`` picks the
    CLEVR-Change split (and the ``<split>.jsonl`` of a synth folder).
    """
    path = Path(path)
    if format == "auto":
        format = detect_format(path, split)
    if format not in FORMATS:
        raise DatasetError(path, f"unknown dataset format {format!r} (expected auto or one of {', '.join(FORMATS)})")
    if format == "jsonl":
        return read_jsonl(path / f"{split}.jsonl" if path.is_dir() else path)
    if format == "clevr-change":
        return read_clevr_change(path.parent if path.is_file() else path, split)
    images = Path(image_dir) if image_dir is not None else _default_image_dir(path)
    reader = {"spot-the-diff": read_spot_the_diff, "ier": read_ier, "syned": read_syned}[format]
    return reader(path, images)


def detect_format(path: str | os.PathLike, split: str = "test") -> str:
    """The dataset format of ``path`` (one of :data:`FORMATS`), by the rules of :func:`read_dataset`."""
    path = Path(path)
    if path.is_dir():
        if (path / "change_captions.json").is_file() or (path / "data" / "change_captions.json").is_file():
            return "clevr-change"
        if (path / f"{split}.jsonl").is_file():
            return "jsonl"
        raise DatasetError(path, f"cannot tell the dataset format: no change_captions.json and no {split}.jsonl in it")
    if not path.is_file():
        raise DatasetError(path, "no such file or folder")
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    if path.name == "change_captions.json":
        return "clevr-change"
    content = _load_json(path, (list, dict))
    if isinstance(content, list) and content and isinstance(content[0], dict):
        if "img_id" in content[0]:
            return "spot-the-diff"
        if "img0" in content[0]:
            return "ier"
    if isinstance(content, dict) and content and all(isinstance(v, list) for v in content.values()):
        return "syned"
    raise DatasetError(path, "cannot tell the dataset format from its content; pass the format explicitly")


def _default_image_dir(json_path: Path) -> Path:
    folder = json_path.absolute().parent
    for candidate in (folder / "images", folder / "resized_images"):
        if candidate.is_dir():
            return candidate
    return folder


# --------------------------------------------------------------------------------------- helpers
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(path, "no such file") from None
    except IsADirectoryError:
        raise DatasetError(path, "is a folder, expected a file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_json(path: Path, kind: type | tuple[type, ...]) -> Any:
    """The parsed content of a JSON file, which must be of ``kind`` (list and/or dict)."""
    try:
        content = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"invalid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(content, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join("a JSON list" if k is list else "a JSON object" for k in kinds)
        raise DatasetError(path, f"expected {expected}, got {type(content).__name__}")
    return content


def _item_id(item: Any, key: str, path: Path, position: int) -> str:
    """The id of one item of a JSON-list dataset (ints are accepted and made strings)."""
    if not isinstance(item, dict):
        raise DatasetError(path, f"item {position}: expected a JSON object, got {type(item).__name__}")
    value = item.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        problem = f"missing key {key!r}" if key not in item else f"{key!r} must be a non-empty string"
        raise DatasetError(path, f"item {position}: {problem}")
    return value


def _require(item: dict, keys: tuple[str, ...], path: Path, where: str) -> None:
    for key in keys:
        if key not in item:
            raise DatasetError(path, f"{where}: missing key {key!r}")


def _record(
    path: Path,
    where: str,
    rid: str,
    folder: Path,
    before: Any,
    after: Any,
    references: Any,
    category: str | None = None,
    confine: bool = False,
) -> PairRecord:
    """A checked record: references cleaned and non-empty, both images existing files (inside ``folder``
    when ``confine``)."""
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise DatasetError(path, f"{where}: references must be a list of strings")
    cleaned = tuple(r.strip() for r in references if r.strip())
    if not cleaned:
        raise DatasetError(path, f"{where}: no reference captions (empty list)")
    return PairRecord(
        id=rid,
        before=_image(folder, before, path, where, "before", confine),
        after=_image(folder, after, path, where, "after", confine),
        references=cleaned,
        category=category,
    )


def _image(folder: Path, name: Any, path: Path, where: str, role: str, confine: bool = False) -> str:
    if not isinstance(name, str) or not name:
        raise DatasetError(path, f"{where}: the {role} image must be a non-empty path string")
    base = Path(os.path.normpath(folder.absolute()))
    image = Path(os.path.normpath(base / name))
    if confine and (Path(name).is_absolute() or Path(name).drive or not image.is_relative_to(base) or image == base):
        raise DatasetError(path, f"{where}: the {role} image {name!r} lies outside the image folder {base}")
    if not image.is_file():
        raise DatasetError(path, f"{where}: {role} image not found: {image}")
    return str(image)


def _unique(records: list[PairRecord], path: Path) -> list[PairRecord]:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DatasetError(path, f"record {record.id!r}: duplicate id")
        seen.add(record.id)
    return records


def _relative(image: str, folder: Path) -> str:
    try:
        return Path(os.path.relpath(image, folder)).as_posix()
    except ValueError:
        return image
