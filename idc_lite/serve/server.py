"""Running the service: uvicorn on the configured address, the model loading behind it.

uvicorn owns the signals: on SIGTERM (or Ctrl-C) it stops accepting connections, lets the requests
in flight finish (their pairs still in the micro-batcher included, up to ``--timeout``), then stops
the batcher; the process then exits with code 0 after a SIGTERM. A model that fails to load stops the server, and the command reports that error.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable

from ..errors import IdcError
from .app import create_app
from .config import ServeConfig

logger = logging.getLogger("idc_lite.serve")


def serve(config: ServeConfig, load: Callable[[], Any], log_level: str = "info") -> None:
    """Serve until stopped; raise the model's :class:`IdcError` when it cannot be loaded."""
    import uvicorn

    if not logger.handlers:  # the service's own lines, next to uvicorn's, on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if log_level in ("info", "debug") else logging.WARNING)
        logger.propagate = False
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(config, load, on_fatal)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=int(config.timeout_s) + 5, server_header=False, date_header=False,
        proxy_headers=False,  # no proxy in front of a local service: X-Forwarded-* are not trusted
        # h11's cap on a request's head; bodies are capped by the service itself
        h11_max_incomplete_event_size=64 * 1024,
    ))
    logger.info("idc-lite serve: http://%s:%d/ (the model loads now; GET /health says when it is ready)",
                f"[{config.host}]" if ":" in config.host else config.host, config.port)
    # uvicorn re-raises a SIGTERM it caught once it has drained; a drained stop is a clean exit, code 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        raise IdcError(None, f"the model did not load: {failure[0]}")
