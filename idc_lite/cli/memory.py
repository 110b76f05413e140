"""``idc-lite memory``: the memory table of seed Table 4 for a BLIP-2 config (see :mod:`idc_lite.tools.memory`)."""

from __future__ import annotations

from typing import Annotated

import typer


def memory(
    config: Annotated[str, typer.Argument(
        help="A BLIP-2 config.json, the folder holding one, or a shipped config's name (blip2-opt-2.7b).",
        show_default="blip2-opt-2.7b")] = "blip2-opt-2.7b",
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON (bytes) instead of markdown.")] = False,
) -> None:
    """Print the weight memory per precision and the LoRA training memory per rank of a BLIP-2 model.

    Counted from the config's parameter shapes, no weights loaded; blip2-opt-2.7b meets seed Table 4.
    """
    import json

    from ..errors import require

    require("transformers", "idc-lite memory", "reference")
    require("torch", "idc-lite memory", "reference")
    from ..tools.memory import format_memory_table, memory_table

    table = memory_table(config)
    typer.echo(json.dumps(table, indent=2) if as_json else format_memory_table(table))
