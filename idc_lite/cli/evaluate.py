"""``idc-lite eval DATA -m MODEL``: caption a dataset and score the captions (see :mod:`idc_lite.tools.evaluate`).

Prints the overall and per-category tables (x100), writes the report JSON and keeps the predictions
in a JSONL file that a second run with the same paths resumes. Exit code 0 when every pair was
described, 1 when some failed (they are listed in the report and left out of the scores), 2 for
user errors (bad dataset, bad options).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common


@common.model_options
def eval_command(
    options: common.ModelOptions,
    data: Annotated[Path, typer.Argument(
        help="Dataset: idc-lite JSONL file, synth or CLEVR-Change folder, Spot-the-Diff / IER / Syned JSON file.",
        show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Report JSON. Default: <DATA name>.report.json in the current folder.")] = None,
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", help="Predictions JSONL, created or resumed. Default: <report name>.predictions.jsonl "
        "next to the report.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N pairs only.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per model call.")] = 8,
    no_meteor: Annotated[bool, typer.Option("--no-meteor", help="Skip METEOR (it needs Java and starts slowly).")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="Dataset format: auto, jsonl, clevr-change, spot-the-diff, ier or syned.")] = "auto",
    split: Annotated[str, typer.Option("--split", help="CLEVR-Change split, or <split>.jsonl of a synth folder.")] = "test",
    image_dir: Annotated[Optional[Path], typer.Option(
        "--image-dir", help="Spot-the-Diff / IER / Syned images (default: images/ or resized_images/ next to DATA).")] = None,
) -> None:
    """Caption every pair of DATA and score the captions: BLEU-4, METEOR, ROUGE-L, CIDEr, overall and per category.

    Run it again to resume: pairs already in the predictions file are not described again (failed ones are retried).
    """
    from ..tools.datasets import read_dataset
    from ..errors import InputError
    from ..tools.evaluate import format_tables, write_report

    records = read_dataset(data, fmt, image_dir=image_dir, split=split)  # a bad dataset fails before the model loads
    report_path, predictions_path = default_paths(data, output, predictions)
    for path in (report_path, predictions_path):
        if path.is_dir():
            raise InputError(path, "is a folder; give a file path")
    captioner = options.captioner()
    report = _run(captioner, records, predictions_path, batch_size, limit, not no_meteor, data)
    write_report(report, report_path)
    typer.echo(format_tables(report))
    timing = report["timing"]
    typer.echo(
        f"{report['n']} pairs: {timing['described']} described now, {timing['resumed']} resumed from {predictions_path}; "
        f"report: {report_path}", err=True,
    )
    if report["failed"]:
        shown = "; ".join(f"{key}: {error}" for key, error in list(report["failures"].items())[:5])
        more = f" and {report['failed'] - 5} more" if report["failed"] > 5 else ""
        typer.echo(f"{report['failed']} pairs failed and are not scored: {shown}{more}", err=True)
        raise typer.Exit(1)


def default_paths(data: Path, output: Path | None, predictions: Path | None) -> tuple[Path, Path]:
    """The report and predictions paths: ``<DATA name>.report.json`` in the current folder and
    ``<report name>.predictions.jsonl`` next to the report, unless given."""
    report = output if output is not None else Path(f"{data.absolute().stem or 'dataset'}.report.json")
    if predictions is None:
        base = report.name.removesuffix(".json").removesuffix(".report")
        predictions = report.with_name(f"{base}.predictions.jsonl")
    return report, predictions


def _run(captioner, records, predictions_path: Path, batch_size: int, limit, meteor: bool, data: Path) -> dict:
    """:func:`idc_lite.tools.evaluate.evaluate` with a progress bar on a terminal; Ctrl-C keeps what is done."""
    from tqdm import tqdm

    from ..tools.evaluate import evaluate

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        with tqdm(unit="pair", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
            return evaluate(captioner, records, predictions_path, batch_size, limit, progress, meteor, dataset=data)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: predictions so far are kept in {predictions_path}; run again to resume", err=True)
        raise typer.Exit(130) from None
