"""``idc-lite batch BEFORE_DIR AFTER_DIR -o results.jsonl``: describe every pair of two folders.

Resumable: records are flushed as each batch finishes, and a second run with the same output skips
the pairs already there. A pair that fails is recorded with its error; the exit code is then 1.
``--ray`` runs the same on a Ray cluster (:mod:`idc_lite.ray`, the ``ray`` extra, imported only then),
which also reads folders in object storage and manifests of pairs, and writes Parquet parts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OptionError
from ..results_io import BATCH_FIELDS as FIELDS
from . import common


@common.model_options
def batch(
    options: common.ModelOptions,
    before_dir: Annotated[str, typer.Argument(
        help="Folder of images before the change; with --ray also a URI (s3://...), or a manifest of pairs "
        "(CSV, JSONL or Parquet with id, before, after) given alone.", show_default=False)],
    after_dir: Annotated[Optional[str], typer.Argument(
        help="Folder of images after the change (with --ray, a URI too).", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Results file (created, or resumed).")] = ...,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", help="jsonl or csv (default: from the output suffix, .csv -> csv, else jsonl); with --ray "
        "also parquet, a directory of parts (local or object storage).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per model call.")] = 8,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Describe again the pairs recorded with an error in OUTPUT.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]", help="Run on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT, or local "
        "(the default when --ray comes last or without a value: RAY_ADDRESS, else a new local cluster).")] = None,
    workers: Annotated[str, typer.Option(
        "--workers", help="With --ray: N workers, or MIN-MAX to autoscale; each loads the model once.")] = "1",
    gpus_per_worker: Annotated[float, typer.Option(
        "--gpus-per-worker", min=0, help="With --ray: GPUs each worker reserves (0: CPU workers).")] = 0.0,
) -> None:
    """Describe every pair of BEFORE_DIR and AFTER_DIR (matched by relative path without extension)."""
    if ray_address is not None:
        raise typer.Exit(_batch_on_ray(options, before_dir, after_dir, output, fmt, batch_size, retry_failed,
                                       ray_address, workers, gpus_per_worker))
    if after_dir is None:
        raise OptionError(None, "give BEFORE_DIR and AFTER_DIR (a manifest of pairs, given alone, needs --ray)")
    if fmt == "parquet" or workers != "1" or gpus_per_worker:
        raise OptionError(None, "--format parquet, --workers and --gpus-per-worker apply with --ray only")
    before_dir, after_dir, output = Path(before_dir), Path(after_dir), Path(output)
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

    from ..results_io import batch_record

    pairs = ((b, a) for _, b, a in todo)
    progress = tqdm(total=len(todo), unit="pair", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        for (key, before, after), result in zip(todo, captioner.describe_batch(pairs, batch_size, on_error="return")):
            results.write(batch_record(key, before, after, result))
            progress.update(1)
    except KeyboardInterrupt:
        progress.close()
        results.close()
        typer.echo(f"interrupted: {len(results.done)} results kept in {results.path}; run again to resume", err=True)
        raise typer.Exit(130) from None
    progress.close()


def _batch_on_ray(options, before, after, output, fmt, batch_size, retry_failed, address, workers, gpus) -> int:
    """The same command on a Ray cluster (:func:`idc_lite.ray.run_batch`): Ray is imported only here."""
    import dataclasses
    import os

    from ..errors import require

    require("ray", "batch --ray", "ray")
    if address == "local" or (address == "" and not os.environ.get("RAY_ADDRESS")):
        # A cluster for this machine alone listens on loopback only (Ray's single-machine mode; read on import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ..ray import run_batch

    # Workers start elsewhere: a local model or adapter is named by its absolute path.
    local = {name: os.path.abspath(value) for name in ("model", "adapter")
             if (value := getattr(options, name)) is not None and os.path.exists(value)}
    options = dataclasses.replace(options, **local)
    model = options.model or "the embedded default"
    return run_batch(
        before, after, output, captioner=options.captioner, model_name=model, fmt=fmt, batch_size=batch_size,
        workers=workers, gpus_per_worker=gpus, retry_failed=retry_failed, address=None if address == "" else address,
        echo=lambda line: typer.echo(line, err=True), progress=sys.stderr.isatty(),
    )


def bare_ray_option(argv: list[str]) -> list[str]:
    """``--ray`` without a value (last, or before another option) as ``--ray=``: Typer options need a value."""
    argv = list(argv)
    return [("--ray=" if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")) else arg)
            for i, arg in enumerate(argv)]


def _report_unpaired(found) -> None:
    for side, files in (("before", found.only_before), ("after", found.only_after)):
        if files:
            shown = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
            typer.echo(f"warning: {len(files)} {side} images without a partner: {shown}", err=True)
