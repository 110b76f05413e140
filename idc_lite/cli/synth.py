"""``idc-lite synth``: write a synthetic change-world dataset (see :mod:`idc_lite.tools.synth`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write images/ and <split>.jsonl into.")],
    n: Annotated[int, typer.Option("--n", min=0, help="Number of pairs.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Dataset seed.")] = 0,
    split: Annotated[str, typer.Option("--split", help="train, val, test or shifted (ranges training never sees): each has its own pairs.")] = "test",
) -> None:
    """Write N synthetic (before, after) pairs with reference captions, and print the JSONL path.

    The same --seed, --split and --n always give the same dataset; categories are balanced.
    """
    import sys

    from tqdm import tqdm

    from ..tools.synth import SPLIT_IDS, write_dataset

    if split not in SPLIT_IDS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(SPLIT_IDS)}", param_hint="--split")
    with tqdm(total=n, unit="pair", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        path = write_dataset(out_dir, n, seed=seed, split=split, progress=lambda done, _total: bar.update(done - bar.n))
    typer.echo(str(path))
