"""``idc-lite serve``: the local HTTP service for photo-editing tools (``docs/serve.md``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import common


@common.model_options
def serve(
    options: common.ModelOptions,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most pairs described together.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0, help="How long a pair waits for others to share its batch.")] = 10.0,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="IDC_LITE_TOKEN", show_envvar=True,
        help="Every request (but the page) then needs 'Authorization: Bearer TOKEN'.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        "--cors-origin", help="A web origin allowed to call the service from a browser (repeatable).")] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body.")] = 50.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, help="Pairs that may wait; beyond, 503 with Retry-After.")] = 64,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.001, help="Seconds a request may wait for its captions; beyond, 504.")] = 60.0,
) -> None:
    """Serve the model over HTTP on this machine, for editors and scripts (web page at /)."""
    from ..errors import require

    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module, "idc-lite serve", "serve")
    from ..serve.config import ServeConfig
    from ..serve.server import serve as run_server

    config = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, token=token,
                         cors_origins=tuple(cors_origin or ()), max_body_mb=max_body_mb, max_queue=max_queue,
                         timeout_s=timeout)
    if options.model is None:
        typer.echo("(model: the embedded default; --model picks another)", err=True)
    run_server(config, options.captioner)
