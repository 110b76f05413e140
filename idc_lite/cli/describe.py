"""``idc-lite describe BEFORE AFTER``: one pair, one caption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import common


@common.model_options
def describe(
    options: common.ModelOptions,
    before: Annotated[Path, typer.Argument(help="The image before the change.", show_default=False)],
    after: Annotated[Path, typer.Argument(help="The image after the change.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the caption.")] = False,
) -> None:
    """Say what changed between BEFORE and AFTER."""
    from ..compose import load_image

    for path in (before, after):  # bad input fails before the (slow) model load
        load_image(path, limits=options.image_limits())
    captioner = options.captioner()
    result = captioner.describe(before, after)
    if options.model is None:
        typer.echo(f"(model: {result.model}, the embedded default; --model picks another)", err=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        typer.echo(result.caption)
