"""``idc-lite describe BEFORE AFTER``: one pair, one caption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import common


def describe(
    before: Annotated[Path, typer.Argument(help="The image before the change.", show_default=False)],
    after: Annotated[Path, typer.Argument(help="The image after the change.", show_default=False)],
    model: common.Model = None,
    adapter: common.Adapter = None,
    revision: common.Revision = None,
    device: common.Device = "auto",
    backend: common.Backend = "auto",
    dtype: common.Dtype = None,
    max_new_tokens: common.MaxNewTokens = 77,
    num_beams: common.NumBeams = 1,
    prompt: common.Prompt = None,
    size_policy: common.SizePolicy = "smallest",
    decoder: common.Decoder = None,
    threads: common.Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the caption.")] = False,
) -> None:
    """Say what changed between BEFORE and AFTER."""
    from ..compose import load_image

    for path in (before, after):  # bad input fails before the (slow) model load
        load_image(path)
    captioner = common.build_captioner(
        model, adapter, revision, device, backend, dtype, size_policy, max_new_tokens, num_beams, prompt, decoder, threads
    )
    result = captioner.describe(before, after)
    if model is None:
        typer.echo(f"(model: {result.model}, the embedded default; --model picks another)", err=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        typer.echo(result.caption)
