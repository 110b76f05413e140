"""Evaluation: the report's scores are the metrics run on the predictions, resume, failures, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import MAX_NEW_TOKENS
from idc_lite.cli import main
from idc_lite.tools.datasets import read_dataset
from idc_lite.errors import InputError
from idc_lite.tools.kinds import says_kind
from idc_lite.tools.evaluate import PREDICTION_FIELDS, TABLE_METRICS, evaluate, format_tables
from idc_lite.tools.metrics import CIDER_DF_NOTE_KEY, OVERALL, score, score_by_category
from idc_lite.tools.synth import CATEGORIES, write_dataset

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH (METEOR needs it)")
CLI_OPTIONS = ["--no-meteor", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4"]


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingCaptioner:
    """A captioner that counts the pairs it is asked to describe."""

    def __init__(self, captioner):
        self.captioner = captioner
        self.described = 0

    def __getattr__(self, name):
        return getattr(self.captioner, name)

    def describe_batch(self, pairs, *args, **kwargs):
        def counted():
            for pair in pairs:
                self.described += 1
                yield pair

        return self.captioner.describe_batch(counted(), *args, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("eval-data"), n=18, split="test")


@pytest.fixture(scope="module")
def full_run(reference, dataset, tmp_path_factory) -> tuple[dict, Path]:
    """A fresh evaluation of the whole dataset: the report and its predictions file."""
    path = tmp_path_factory.mktemp("eval-full") / "full.predictions.jsonl"
    return evaluate(reference, read_dataset(dataset), path, batch_size=4, meteor=False, dataset=dataset), path


def test_the_report_scores_are_the_metrics_on_the_predictions(full_run, dataset):
    report, path = full_run
    records = read_dataset(dataset)
    lines = read_predictions(path)
    assert [line["id"] for line in lines] == [r.id for r in records]
    assert all(list(line) == PREDICTION_FIELDS and line["error"] is None for line in lines)
    captions = {line["id"]: line["caption"] for line in lines}
    references = {r.id: list(r.references) for r in records}
    by_category = score_by_category(captions, references, {r.id: r.category for r in records}, meteor=False)

    assert report["overall"] == score(captions, references, meteor=False) == by_category[OVERALL]
    assert report["per_category"] == {k: v for k, v in by_category.items() if k not in (OVERALL, CIDER_DF_NOTE_KEY)}
    assert list(report["per_category"]) == list(CATEGORIES)
    assert report["cider_document_frequencies"] == by_category[CIDER_DF_NOTE_KEY]
    for name, raw in [("overall", report["overall"]), *report["per_category"].items()]:
        table = report["table_x100"]["overall" if name == "overall" else "per_category"]
        values = table if name == "overall" else table[name]
        assert values == {m: None if raw[m] is None else round(100 * raw[m], 2) for m in TABLE_METRICS}
    assert (report["n"], report["scored"], report["failed"], report["failures"]) == (18, 18, 0, {})
    assert report["meteor"] == {"available": False, "reason": "not requested (meteor=False)"}
    assert report["timing"]["described"] == 18 and report["timing"]["pairs_per_second"] > 0
    hits = {c: [says_kind(captions[r.id], c) for r in records if r.category == c] for c in CATEGORIES}
    assert report["right_kind"]["per_category"] == {c: round(sum(h) / len(h), 4) for c, h in hits.items()}
    assert report["right_kind"]["overall"] == round(sum(map(sum, hits.values())) / 18, 4)

    tables = format_tables(report)
    assert all(f"| {category} " in tables for category in CATEGORIES) and "| overall " in tables
    assert f"{report['table_x100']['overall']['CIDEr']:.2f}" in tables and "n/a" in tables
    assert "| right kind " in tables
    for block in tables.split("\n\n"):  # each table's columns are aligned
        assert len({len(line) for line in block.splitlines() if line.startswith("|")}) <= 2


def test_a_resumed_run_describes_only_the_missing_pairs(reference, dataset, full_run, tmp_path):
    records = read_dataset(dataset)
    path = tmp_path / "resumed.predictions.jsonl"
    counting = CountingCaptioner(reference)
    first = evaluate(counting, records, path, batch_size=4, limit=9, meteor=False)
    assert counting.described == 9 and (first["n"], first["limit"]) == (9, 9) and len(read_predictions(path)) == 9

    second = evaluate(counting, records, path, batch_size=4, meteor=False)
    assert counting.described == 18, "the second run described pairs already predicted"
    assert (second["timing"]["described"], second["timing"]["resumed"]) == (9, 9)
    full_report, full_path = full_run
    assert read_predictions(path) == read_predictions(full_path)
    assert second["overall"] == full_report["overall"] and second["per_category"] == full_report["per_category"]


def test_predictions_of_another_model_are_refused(reference, dataset, tmp_path):
    records = read_dataset(dataset)
    path = tmp_path / "other.predictions.jsonl"
    other = {"id": records[0].id, "caption": "x", "error": None, "category": "add", "model": "other-model",
             "adapter": None, "backend": "reference"}
    path.write_text(json.dumps(other) + "\n")
    with pytest.raises(InputError, match="other-model"):
        evaluate(reference, records, path, meteor=False)


def test_a_corrupt_image_fails_is_not_scored_and_exits_1(tiny_model, tmp_path, capsys, monkeypatch):
    data = write_dataset(tmp_path / "data", n=4, split="test")
    records = read_dataset(data)
    broken = records[2]
    Path(broken.after).write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)

    code, out, err = run(["eval", data, "-m", tiny_model, *CLI_OPTIONS], capsys)
    assert code == 1 and broken.id in err
    report = json.loads((tmp_path / "test.report.json").read_text())  # the documented default paths
    assert report["failed"] == 1 and list(report["failures"]) == [broken.id]
    assert report["overall"]["n"] == report["scored"] == 3
    assert sum(s["n"] for s in report["per_category"].values()) == 3 and broken.category not in report["per_category"]
    lines = {line["id"]: line for line in read_predictions(tmp_path / "test.predictions.jsonl")}
    assert lines[broken.id]["caption"] is None and lines[broken.id]["error"]
    assert "| overall " in out

    write_dataset(tmp_path / "data", n=4, split="test")  # the image is fixed: the next run retries it only
    code, _, err = run(["eval", data, "-m", tiny_model, *CLI_OPTIONS], capsys)
    report = json.loads((tmp_path / "test.report.json").read_text())
    assert code == 0 and report["failed"] == 0 and report["scored"] == 4
    assert (report["timing"]["described"], report["timing"]["resumed"]) == (1, 3)


def test_a_malformed_dataset_is_a_one_line_error_with_exit_code_2(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "before": "x.png"\n')
    code, out, err = run(["eval", bad, "-m", tiny_model, "-o", tmp_path / "r.json", *CLI_OPTIONS], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "bad.jsonl" in err and "line 1" in err
    assert not (tmp_path / "r.json").exists()


@needs_java
def test_meteor_is_scored_when_java_is_there(reference, dataset, full_run, tmp_path):
    path = shutil.copy(full_run[1], tmp_path / "copy.predictions.jsonl")
    report = evaluate(reference, read_dataset(dataset), path, meteor=True)
    assert report["timing"]["described"] == 0
    assert report["meteor"] == {"available": True, "reason": None}
    assert isinstance(report["overall"]["METEOR"], float) and 0 <= report["overall"]["METEOR"] <= 1
    assert all(isinstance(s["METEOR"], float) for s in report["per_category"].values())
    assert "n/a" not in format_tables(report)


def test_limit_predictions_format_and_image_dir_reach_the_run(tiny_model, tmp_path, capsys):
    """A Spot-the-Diff file whose images are elsewhere: --image-dir finds them, --format picks the reader,
    --limit cuts the run, --predictions says where the predictions go."""
    from PIL import Image

    from conftest import random_pairs

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for number, (before, after) in enumerate(random_pairs(3, seed=6), start=1):
        Image.fromarray(before).save(pictures / f"{number}.png")
        Image.fromarray(after).save(pictures / f"{number}_2.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"img_id": str(n), "sentences": ["a red circle was added"]} for n in (1, 2, 3)]))
    predictions, report_path = tmp_path / "out" / "mine.jsonl", tmp_path / "out" / "report.json"
    argv = ["eval", data, "-m", tiny_model, "-o", report_path, *CLI_OPTIONS]
    code, _, err = run([*argv, "--format", "spot-the-diff"], capsys)  # the images are not next to the data
    assert code == 2 and f"before image not found: {tmp_path / '1.png'}" in err
    code, _, err = run([*argv, "--format", "ier", "--image-dir", pictures], capsys)
    assert code == 2 and "item 0: missing key 'uid'" in err  # read as IER
    code, _, err = run([*argv, "--format", "spot-the-diff", "--image-dir", pictures, "--limit", "2",
                        "--predictions", predictions], capsys)
    report = json.loads(report_path.read_text())
    assert code == 0 and (report["n"], report["limit"], report["scored"]) == (2, 2, 2)
    assert [line["id"] for line in read_predictions(predictions)] == ["1", "2"]
    assert str(predictions) in err and not (tmp_path / "out" / "report.predictions.jsonl").exists()
