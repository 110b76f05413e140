"""The ``idc-lite`` command line. One module per subcommand; heavy imports happen inside commands."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import typer

from .._version import __version__
from ..errors import IdcError
from .attention import attention
from .batch import batch
from .describe import describe
from .evaluate import eval_command
from .info import info
from .memory import memory
from .serve import serve
from .synth import synth
from .train import train

app = typer.Typer(
    name="idc-lite", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Say what changed between two images (BLIP2IDC, optimized for the edge).",
)
app.command()(describe)
app.command()(batch)
app.command()(synth)
app.command()(info)
app.command()(memory)
app.command()(train)
app.command("eval")(eval_command)
app.command()(attention)
app.command()(serve)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"idc-lite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback with errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what is being done.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose or debug else logging.WARNING, format="%(message)s")


def run_app(typer_app: typer.Typer, argv: list[str] | None, prog_name: str) -> None:
    """Run a Typer app; an :class:`IdcError` becomes one line on stderr and exit code 2.

    Anything else is a bug and keeps its traceback; ``--debug`` shows the traceback of user errors too,
    wherever it is given (it is the root command's option: it is moved before the subcommand).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = ["--debug", *(arg for arg in argv if arg != "--debug")]
    try:
        typer_app(args=argv, prog_name=prog_name)
    except IdcError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The ``idc-lite`` entry point."""
    from .batch import bare_ray_option

    run_app(app, bare_ray_option(sys.argv[1:] if argv is None else argv), "idc-lite")
