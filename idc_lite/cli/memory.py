"""``idc-lite memory``: the memory table of seed Table 4 for a BLIP-2 config (see :mod:`idc_lite.memory`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..memory import DEFAULT_CONFIG


def memory(
    config: Annotated[Path, typer.Argument(
        help="A BLIP-2 config.json, or the folder holding one.",
        show_default="the shipped Salesforce/blip2-opt-2.7b config")] = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON (bytes) instead of markdown.")] = False,
) -> None:
    """Print the weight memory per precision and the LoRA training memory per rank of a BLIP-2 model.

    Counted from the config's parameter shapes, no weights loaded; blip2-opt-2.7b meets seed Table 4.
    """
    import json

    from ..memory import format_memory_table, memory_table

    table = memory_table(config)
    typer.echo(json.dumps(table, indent=2) if as_json else format_memory_table(table))
