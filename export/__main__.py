"""``python -m export``: build idc-lite artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from idc_lite.errors import IdcError

app = typer.Typer(name="python -m export", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Build idc-lite artifacts from a BLIP-2 base and a BLIP2IDC LoRA adapter.")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show a traceback with errors (read by run_app).")] = False) -> None:
    """The options every command takes (``--debug`` is read by ``run_app``)."""


@app.command()
def build(
    recipe: Annotated[Optional[str], typer.Argument(
        help="A named recipe (see `recipes`); or give --base (and --adapter).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")] = ...,
    base: Annotated[Optional[str], typer.Option("--base", help="BLIP-2 base: hub id or local directory.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision of the base.")] = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter folder to merge.")] = None,
    encoder_precision: Annotated[str, typer.Option(
        "--encoder-precision", help="fp32, fp16 (GPUs), int4 (GPUs: int4 weights, fp16 compute) or int8 "
        "(CPUs: a quarter of fp32's memory).")] = "fp32",
    decoder_precision: Annotated[Optional[str], typer.Option(
        "--decoder-precision", help="int4 (bnb-int4 + ort-int4, the default), fp16 (torch-fp16) or fp32 (torch-fp32).",
        show_default=False)] = None,
    decoder: Annotated[Optional[list[str]], typer.Option(
        "--decoder", help="A decoder to build, repeatable: bnb-int4, ort-int4, ort-int4-fp16 (CUDA: fp16 activations), "
        "ort-fp32, torch-fp16 or torch-fp32 "
        "(instead of --decoder-precision).", show_default=False)] = None,
    ort_block_size: Annotated[Optional[int], typer.Option(
        "--ort-block-size", help="int4 ONNX Runtime decoders: quantization block along K (16, 32, 64, 128 or 256; "
        "default 32; 128 for ort-int4 at hidden sizes of 1024 or more).", show_default=False)] = None,
    ort_symmetric: Annotated[bool, typer.Option(
        "--ort-symmetric", help="int4 ONNX Runtime decoders: symmetric blocks (no zero points; default asymmetric).")
    ] = False,
    ort_head: Annotated[Optional[str], typer.Option(
        "--ort-head", help="ort-int4: the LM head's precision, int8 or fp16 (default: int8 for heads of 4 M "
        "weights or more, such as OPT's: a fifth of fp16's time on a CPU).", show_default=False)] = None,
    ship_reference: Annotated[bool, typer.Option(
        "--ship-reference", help="Also ship the base (fp16 safetensors) and the adapter in OUT/reference/, for "
        "`--backend reference` and the benchmarks to run offline; small bases only (2.7B: +7.7 GB).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Merge, export, quantize and validate; write the artifact to OUT."""
    from .build import build_artifact
    from .recipes import fetch_adapter, get_recipe

    name = None
    if recipe is not None:
        if base is not None or adapter is not None:
            raise IdcError(recipe, "a recipe sets --base and --adapter itself; give one or the other")
        chosen = get_recipe(recipe)
        base, revision, name = chosen.base, revision or chosen.base_revision, chosen.name
        adapter = fetch_adapter(chosen)
    elif base is None:
        raise IdcError(None, "give a recipe name or --base")
    path = build_artifact(base, out, adapter, revision=revision, encoder_precision=encoder_precision,
                          decoder_precision=decoder_precision, decoders=decoder or None, name=name, force=force,
                          ort_block_size=ort_block_size, ort_symmetric=ort_symmetric or None, ort_head=ort_head,
                          ship_reference=ship_reference)
    typer.echo(str(path))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder for the stages.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the world, the weights and the data order.")] = 0,
    artifact: Annotated[Optional[Path], typer.Option(
        "--artifact", help="Where to write the artifact (default OUT/artifact).")] = None,
) -> None:
    """Train the demo model on the synthetic world (stage 1 base, stage 2 LoRA) and export it."""
    from .demo import build_demo

    typer.echo(str(build_demo(out, seed, artifact)))


@app.command()
def attention(
    artifact: Annotated[Path, typer.Argument(help="The artifact directory to add the attention graph to.",
                                             show_default=False)],
) -> None:
    """Add the attention graph (`idc-lite attention` on the lite backend) to an existing artifact, cut out of
    its encoder graph; the manifest is rewritten, every other file kept."""
    from .attention import add_attention

    entry = add_attention(artifact)
    typer.echo(str(artifact / entry["file"]))


@app.command()
def recipes() -> None:
    """List the named recipes."""
    from .recipes import RECIPES

    for recipe in RECIPES.values():
        typer.echo(f"{recipe.name:24} {recipe.base} + {recipe.repo}/code_release/weights/{recipe.folder}: {recipe.description}")


def main(argv: list[str] | None = None) -> None:
    from idc_lite.cli import run_app

    from .build import stderr_logging

    with stderr_logging():
        run_app(app, argv, "python -m export")


if __name__ == "__main__":
    main()
