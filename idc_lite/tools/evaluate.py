"""Evaluate a captioner on a dataset: predictions, then COCO caption scores overall and per category.

This is what ``idc-lite eval`` runs, as a function that benchmarks and notebooks can call too.

- Predictions go to a JSONL file as each batch finishes (:class:`~idc_lite.results_io.ResultsFile`),
  so an interrupted evaluation resumes where it stopped: ids already predicted are not predicted
  again. A file holding another model's predictions is refused, so two models never mix in one score.
- A pair that cannot be described (an unreadable image) is recorded with its error, left out of the
  scores and listed in the report. It is tried again on the next run, after the image is fixed.
- Scores are the COCO caption toolkit's (:mod:`idc_lite.tools.metrics`): overall, and per change category
  laid out like BLIP2IDC's Table 5 (rows = categories; columns BLEU-4, METEOR, ROUGE-L, CIDEr).
  The report keeps the raw numbers on the toolkit's scale and the x100 numbers papers print.
- On datasets labelled with the synthetic world's categories, the share of captions that state the
  right kind of change (:mod:`idc_lite.tools.kinds`), overall and per category: CIDEr credits a
  caption that names the right object with the wrong change; this does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .datasets import PairRecord
from ..errors import DatasetError, InputError
from .metrics import CIDER_DF_NOTE_KEY, OVERALL, Scores, score_by_category
from ..results_io import ResultsFile, atomic_write_text

logger = logging.getLogger("idc_lite")

#: The fields of one line of the predictions JSONL.
PREDICTION_FIELDS = ["id", "caption", "error", "category", "model", "adapter", "backend"]
#: The columns of the tables, as in BLIP2IDC's Table 5.
TABLE_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
#: The category given to records without one when other records of the dataset have one.
UNCATEGORIZED = "uncategorized"
SCALE_NOTE = (
    "'overall' and 'per_category' are on the COCO toolkit's scale: BLEU, METEOR and ROUGE-L in 0..1, "
    "CIDEr-D as the toolkit returns it (already x10). 'table_x100' multiplies all four by 100 and rounds "
    "to 2 decimals, as papers print them."
)


def evaluate(
    captioner,
    records: Sequence[PairRecord],
    predictions_path: str | os.PathLike,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    meteor: bool = True,
    *,
    dataset: str | os.PathLike | None = None,
) -> dict:
    """Describe the first ``limit`` records (all by default) and score the captions; returns the report.

    ``predictions_path`` is created, or resumed: ids it already holds without an error are not
    described again. ``progress(done, total)`` is called after each pair described in this run.
    ``dataset`` is only written into the report. ``meteor=False`` skips METEOR (it needs Java and
    takes seconds to start); the report then says it is unavailable. Raises
    :class:`~idc_lite.errors.InputError` when the predictions file holds another model's captions.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    selected = list(records if limit is None else records[:limit])
    if not selected:
        raise DatasetError(dataset, "no pairs to evaluate")
    identity = {"model": captioner.model_id, "adapter": captioner.backend.adapter, "backend": captioner.backend.name}

    with ResultsFile(predictions_path, PREDICTION_FIELDS, "jsonl") as predictions:
        _check_same_model(predictions, identity)
        wanted = {record.id for record in selected}
        retry = {key for key, p in predictions.records.items() if key in wanted and p.get("error")}
        if retry:
            predictions.rewrite_without(retry)
        todo = [record for record in selected if record.id not in predictions.done]
        logger.info("%d pairs: %d already in %s, %d to describe", len(selected), len(selected) - len(todo),
                    predictions.path, len(todo))
        started = time.perf_counter()
        _predict(captioner, todo, predictions, batch_size, progress)
        predict_s = time.perf_counter() - started
        outcome = {record.id: predictions.records[record.id] for record in selected}

    failures = {key: p["error"] for key, p in outcome.items() if p.get("error")}
    scored = [record for record in selected if record.id not in failures]
    started = time.perf_counter()
    captions = {r.id: outcome[r.id]["caption"] for r in scored}
    overall, per_category, cider_note = _score(scored, captions, meteor)
    right_kind = _right_kind(scored, captions)
    score_s = time.perf_counter() - started

    return {
        **identity,
        "generation": dataclasses.asdict(captioner.generation),
        "dataset": None if dataset is None else str(dataset),
        "n": len(selected),
        "dataset_size": len(records),
        "limit": limit,
        "scored": len(scored),
        "failed": len(failures),
        "failures": failures,
        "scale": SCALE_NOTE,
        "overall": overall,
        "per_category": per_category,
        "table_x100": {
            "columns": list(TABLE_METRICS),
            "overall": None if overall is None else _x100(overall),
            "per_category": {name: _x100(scores) for name, scores in per_category.items()},
        },
        "right_kind": right_kind,
        "cider_document_frequencies": cider_note,
        "meteor": _meteor_status(overall),
        "timing": {
            "described": len(todo),
            "resumed": len(selected) - len(todo),
            "describe_s": round(predict_s, 3),
            "pairs_per_second": round(len(todo) / predict_s, 3) if todo and predict_s > 0 else None,
            "score_s": round(score_s, 3),
            "model_load_s": round(captioner.load_s, 3),
        },
        "predictions": str(predictions_path),
    }


def _check_same_model(predictions: ResultsFile, identity: dict) -> None:
    """Refuse to resume a predictions file written by another model, adapter or backend."""
    for record in predictions.records.values():
        theirs = {key: record.get(key) for key in identity}
        if theirs != identity:
            raise InputError(
                predictions.path,
                f"holds predictions of {_describe_model(theirs)}, not of {_describe_model(identity)}; "
                "give another predictions file, or delete this one to start over",
            )


def _describe_model(identity: dict) -> str:
    adapter = f" with adapter {identity['adapter']!r}" if identity.get("adapter") else ""
    return f"model {identity.get('model')!r}{adapter} ({identity.get('backend')} backend)"


def _predict(captioner, todo: list[PairRecord], predictions: ResultsFile, batch_size: int, progress) -> None:
    """Describe ``todo``, writing each prediction as soon as its batch is done."""
    pairs = ((record.before, record.after) for record in todo)
    results = captioner.describe_batch(pairs, batch_size, on_error="return")
    for done, (record, result) in enumerate(zip(todo, results), 1):
        predictions.write({
            "id": record.id, "caption": result.caption, "error": result.error, "category": record.category,
            "model": result.model, "adapter": result.adapter, "backend": result.backend,
        })
        if progress is not None:
            progress(done, len(todo))


def _score(
    scored: list[PairRecord], captions: dict[str, str], meteor: bool
) -> tuple[Scores | None, dict[str, Scores], str | None]:
    """Overall scores, per-category scores (empty when the dataset has no categories) and the CIDEr note."""
    if not scored:
        return None, {}, None
    references = {record.id: list(record.references) for record in scored}
    categories = {record.id: record.category or UNCATEGORIZED for record in scored}
    by_category = score_by_category(captions, references, categories, meteor=meteor)
    note = by_category.pop(CIDER_DF_NOTE_KEY)
    overall = by_category.pop(OVERALL)
    if set(categories.values()) == {UNCATEGORIZED}:
        by_category = {}
    return overall, by_category, note


def _right_kind(scored: list[PairRecord], captions: dict[str, str]) -> dict | None:
    """Shares of captions stating their pair's kind of change, overall and per category; None when
    the pairs are not (all) labelled with the synthetic world's categories."""
    from .kinds import says_kind
    from .synth import CATEGORIES

    if not scored or any(record.category not in CATEGORIES for record in scored):
        return None
    hits: dict[str, list[bool]] = {}
    for record in scored:
        hits.setdefault(record.category, []).append(says_kind(captions[record.id], record.category))
    every = [hit for values in hits.values() for hit in values]
    return {
        "rule": "idc_lite.tools.kinds.kind_of (docs/model-card.md)",
        "overall": round(sum(every) / len(every), 4),
        "per_category": {name: round(sum(hits[name]) / len(hits[name]), 4) for name in CATEGORIES if name in hits},
    }


def _x100(scores: Scores) -> dict[str, float | None]:
    return {name: None if scores[name] is None else round(100 * scores[name], 2) for name in TABLE_METRICS}


def _meteor_status(overall: Scores | None) -> dict:
    if overall is None:
        return {"available": False, "reason": "no pair could be scored"}
    return {"available": overall["METEOR"] is not None, "reason": overall.get("meteor_unavailable")}


def format_tables(report: dict) -> str:
    """The overall and the per-category tables of a report (x100), as aligned Markdown tables."""
    table = report["table_x100"]
    header = ["", "n", *table["columns"]]
    lines = [f"Overall, x100 ({report['scored']} of {report['n']} pairs scored, {report['failed']} failed)", ""]
    if table["overall"] is None:
        lines.append("No pair could be scored.")
    else:
        lines += _markdown(header, [_row("overall", report["overall"]["n"], table["overall"])])
    if table["per_category"]:
        lines += ["", "Per category, x100 (CIDEr-D document frequencies from each category's references)", ""]
        rows = [_row(name, report["per_category"][name]["n"], values) for name, values in table["per_category"].items()]
        lines += _markdown(header, rows)
    kind = report.get("right_kind")
    if kind:
        names = list(kind["per_category"])
        lines += ["", "The right kind of change (share of captions; the strict rule of docs/model-card.md)", ""]
        lines += _markdown(["", "overall", *names],
                           [["right kind", f"{kind['overall']:.2f}", *(f"{kind['per_category'][n]:.2f}" for n in names)]])
    if report["meteor"]["available"] is False and table["overall"] is not None:
        lines += ["", f"METEOR n/a: {report['meteor']['reason']}"]
    return "\n".join(lines)


def _row(name: str, n: int, values: dict[str, float | None]) -> list[str]:
    return [name, str(n), *("n/a" if values[m] is None else f"{values[m]:.2f}" for m in TABLE_METRICS)]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table padded to aligned columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return [line(header), rule, *map(line, rows)]


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` as JSON atomically (an exclusive temporary file, then a rename): never a
    half-written report, never a write through a symlink left in the folder."""
    return atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
