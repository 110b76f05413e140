"""``idc-lite attention BEFORE AFTER -o maps.png``: where the ViT's heads attended over the stacked pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common


@common.model_options
def attention(
    options: common.ModelOptions,
    before: Annotated[Path, typer.Argument(help="The image before the change.", show_default=False)],
    after: Annotated[Path, typer.Argument(help="The image after the change.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The picture to write (PNG).", show_default=False)] = ...,
    layer: Annotated[int, typer.Option("--layer", help="ViT layer, from 0; -1 is the last.")] = -1,
    heads: Annotated[str, typer.Option("--heads", help="all, or head numbers from 0: 0,3,5.")] = "all",
    source: Annotated[str, typer.Option(
        "--from", help="Whose attention: cls (the class token), mean (every patch, averaged) or x,y (the patch "
        "at that pixel of the stacked pair, before on top).")] = "cls",
    arrays: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the maps as numpy arrays (.npz): the before and after halves at each "
        "image's own size, the patch grid, the layer's full attention.", show_default=False)] = None,
) -> None:
    """Draw where the ViT's heads attended over BEFORE stacked on AFTER (seed Figure 1).

    Brighter = more attention. These are where the heads looked while reading the pair, not a map of
    what changed.
    """
    from ..attention import parse_heads, parse_source, render_attention
    from ..compose import load_image
    from ..errors import IdcError

    parse_heads(heads), parse_source(source)  # bad options fail before the (slow) model load
    for path in (before, after):
        load_image(path)
    captioner = options.captioner()
    maps = captioner.attention(before, after, layer=layer, heads=heads, source=source)
    if options.model is None:
        typer.echo(f"(model: {captioner.model_id}, the embedded default; --model picks another)", err=True)
    picture = render_attention(maps)
    try:
        picture.save(out, format=None if out.suffix else "PNG")
        if arrays is not None:
            maps.save_npz(arrays)
    except (OSError, ValueError) as exc:
        raise IdcError(out if arrays is None else arrays, f"cannot write it ({exc})") from None
    typer.echo(str(out))
