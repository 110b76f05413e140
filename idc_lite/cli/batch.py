"""``idc-lite batch BEFORE_DIR AFTER_DIR -o results.jsonl``: describe every pair of two folders.

Resumable: records are flushed as each batch finishes, and a second run with the same output skips
the pairs already there. A pair that fails is recorded with its error; the exit code is then 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common

FIELDS = ["id", "before", "after", "caption", "error", "model", "adapter", "backend", "seconds"]


@common.model_options
def batch(
    options: common.ModelOptions,
    before_dir: Annotated[Path, typer.Argument(help="Folder of images before the change.", show_default=False)],
    after_dir: Annotated[Path, typer.Argument(help="Folder of images after the change.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Results file (created, or resumed).")],
    fmt: Annotated[Optional[str], typer.Option(
        "--format", help="jsonl or csv (default: from the output suffix, .csv -> csv, else jsonl).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per model call.")] = 8,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Describe again the pairs recorded with an error in OUTPUT.")] = False,
) -> None:
    """Describe every pair of BEFORE_DIR and AFTER_DIR (matched by relative path without extension)."""
    from ..folders import pair_folders
    from ..results_io import ResultsFile

    found = pair_folders(before_dir, after_dir)
    _report_unpaired(found)
    results = ResultsFile(output, FIELDS, fmt)
    if retry_failed:
        results.rewrite_without({k for k, r in results.records.items() if r.get("error")})
    done = results.done
    todo = [(key, b, a) for key, b, a in found.pairs if key not in done]
    ambiguous = [(key, files) for key, files in found.ambiguous if key not in done]
    typer.echo(
        f"{len(found.pairs)} pairs in the folders, {len(found.pairs) - len(todo)} already in {output}, "
        f"{len(todo)} to describe", err=True,
    )
    for key, files in ambiguous:
        names = ", ".join(str(f) for f in files)
        results.write({"id": key, "error": f"ambiguous: several images share this name ({names})"})
    if todo:
        captioner = options.captioner()
        default = " (the embedded default)" if options.model is None else ""
        typer.echo(f"model: {captioner.model_id}{default}, {captioner.backend.name} backend", err=True)
        _describe_all(todo, results, batch_size, captioner)
    results.close()
    keys = [key for key, _, _ in found.pairs] + [key for key, _ in found.ambiguous]
    failed = sum(1 for key in keys if results.records.get(key, {}).get("error"))
    typer.echo(f"{len(todo)} pairs described now; {len(keys) - failed} ok and {failed} failed in {output}", err=True)
    if failed:
        typer.echo("failed pairs are recorded with their error; fix them and run again with --retry-failed", err=True)
        raise typer.Exit(1)


def _describe_all(todo, results, batch_size: int, captioner) -> None:
    from tqdm import tqdm

    pairs = ((b, a) for _, b, a in todo)
    progress = tqdm(total=len(todo), unit="pair", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        for (key, before, after), result in zip(todo, captioner.describe_batch(pairs, batch_size, on_error="return")):
            results.write({
                "id": key, "before": str(before), "after": str(after), "caption": result.caption,
                "error": result.error, "model": result.model, "adapter": result.adapter,
                "backend": result.backend, "seconds": round(result.timings.total_s, 4),
            })
            progress.update(1)
    except KeyboardInterrupt:
        progress.close()
        results.close()
        typer.echo(f"interrupted: {len(results.done)} results kept in {results.path}; run again to resume", err=True)
        raise typer.Exit(130) from None
    progress.close()


def _report_unpaired(found) -> None:
    for side, files in (("before", found.only_before), ("after", found.only_after)):
        if files:
            shown = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
            typer.echo(f"warning: {len(files)} {side} images without a partner: {shown}", err=True)
