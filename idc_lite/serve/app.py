"""The HTTP service: a FastAPI app around one warm :class:`idc_lite.Captioner`.

Routes (JSON in and out, described at ``/openapi.json``, read at ``/docs``):

- ``GET /health``: 503 while the model loads (or when it failed to), 200 once it answers;
- ``GET /v1/info``: model, backend, decoder, device, version, limits, counters;
- ``POST /v1/describe``: one pair, multipart (``before``, ``after``) or JSON (base64); the result
  has the fields of ``idc-lite describe --json``;
- ``POST /v1/describe/batch``: several pairs, results in order; a pair that fails carries its
  ``error`` and the others their captions;
- ``GET /``: the web page (``static/``).

The model loads on a thread after the server starts listening, so ``/health`` can say it is loading.
Images are decoded on worker threads while the model runs (at most one decode per CPU at a time),
then pairs go through the :class:`~idc_lite.serve.batcher.MicroBatcher`, whose one model thread
calls :meth:`Captioner.describe_batch`. Only metadata is logged: paths, statuses, counts, seconds.
"""


import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from .._version import __version__
from ..errors import IdcError, first_line
from .batcher import MicroBatcher, QueueFull, WaitTimeout
from .config import ServeConfig
from .guard import Guard
from .inputs import (GENERATION_LIMITS, ApiError, Upload, decode_image, generation_settings, pair_uploads,
                     parse_request, read_body)

logger = logging.getLogger("idc_lite.serve")
STATIC = Path(__file__).parent / "static"


@dataclasses.dataclass
class _Pair:
    before: Upload
    after: Upload
    images: tuple | None = None
    decode_s: float = 0.0


def create_app(config: ServeConfig, load: Callable[[], Any], on_fatal: Callable[[str], None] | None = None):
    """The ASGI app. ``load()`` builds the captioner (on a thread, at start-up); ``on_fatal(message)``
    is called when it fails, for the command to stop the server with that error."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from . import schema

    state: dict[str, Any] = {"captioner": None, "error": None, "batcher": None}
    decoding = asyncio.Semaphore(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1))

    def run_batch(pairs: list[_Pair], generation) -> list:
        captioner = state["captioner"]
        results = captioner.describe_batch([p.images for p in pairs], batch_size=len(pairs), generation=generation,
                                           on_error="return")
        return [dataclasses.replace(
            r, before=p.before.name, after=p.after.name,
            error=None if r.ok else f"model: {r.error}",
            timings=dataclasses.replace(r.timings, compose_s=r.timings.compose_s + p.decode_s),
        ) for p, r in zip(pairs, results)]

    async def load_model() -> None:
        started = time.perf_counter()
        try:
            state["captioner"] = await asyncio.get_running_loop().run_in_executor(None, load)
        except Exception as exc:  # an IdcError is the user's one line; anything else, its first line
            state["error"] = str(exc) if hasattr(exc, "problem") else f"{type(exc).__name__}: {first_line(exc)}"
            logger.error("the model did not load: %s", state["error"])
            if on_fatal:
                on_fatal(state["error"])
            return
        logger.info("model %s ready in %.1f s", state["captioner"].model_id, time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(app):
        batcher = MicroBatcher(run_batch, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                               max_queue=config.max_queue, timeout_s=config.timeout_s)
        batcher.start()
        state["batcher"] = batcher
        loading = asyncio.get_running_loop().create_task(load_model())
        try:
            yield
        finally:
            loading.cancel()
            await batcher.stop()

    app = FastAPI(
        title="idc-lite", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Say what changed between two images (BLIP2IDC). Every error is "
                    "`{\"error\": \"<part>: <problem>\", \"status\": N}`.",
    )

    # ------------------------------------------------------------------ errors
    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        logger.info("%s %s %d %s", request.method, request.url.path, exc.status, exc)
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        problem = {404: "no such route (see /docs)", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, request.url.path[:100], problem,
                                       dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
        return error_response(ApiError(422, ".".join(map(str, first["loc"])), first["msg"]))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, "server", f"internal error ({type(exc).__name__}); see the server's log"))

    def ready():
        if state["captioner"] is None:
            if state["error"]:
                raise ApiError(503, "model", f"did not load: {state['error']}")
            raise ApiError(503, "model", "still loading; try again shortly", {"Retry-After": "1"})
        return state["captioner"]

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get("/health", response_model=schema.Health, responses={503: {"model": schema.Health}},
             summary="503 while the model loads, 200 when it can answer")
    async def health():
        if state["captioner"] is not None:
            return {"status": "ok", "model": state["captioner"].model_id}
        body = {"status": "failed", "error": state["error"]} if state["error"] else {"status": "loading"}
        return JSONResponse(body, 503, headers={} if state["error"] else {"Retry-After": "1"})

    @app.get("/v1/info", response_model=schema.Info, responses=schema.ACCESS_ERRORS,
             summary="Model, version and limits")
    async def info():
        captioner, batcher = ready(), state["batcher"]
        backend = captioner.backend
        return {
            "model": captioner.model_id, "backend": backend.name, "adapter": backend.adapter,
            "decoder": getattr(backend, "decoder_name", None), "device": str(getattr(backend, "device", "")),
            "version": __version__, "load_s": round(captioner.load_s, 3),
            "generation": dataclasses.asdict(captioner.generation),
            "composition": dataclasses.asdict(captioner.composition),
            "limits": {
                "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms, "max_queue": config.max_queue,
                "timeout_s": config.timeout_s, "max_body_bytes": config.max_body_bytes,
                "max_image_bytes": captioner.image_limits.max_bytes,
                "max_image_pixels": captioner.image_limits.max_pixels,
                "max_pairs_per_request": config.max_queue, "generation": GENERATION_LIMITS,
            },
            "stats": {"batches": batcher.batches, "pairs": batcher.pairs, "pending": batcher.pending},
        }

    @app.post("/v1/describe", response_model=schema.Result, responses=schema.ERRORS,
              openapi_extra=schema.request_body(single=True), summary="Describe one pair")
    async def describe(request: Request):
        return await _describe(request, single=True)

    @app.post("/v1/describe/batch", response_model=schema.BatchResult, responses=schema.ERRORS,
              openapi_extra=schema.request_body(single=False), summary="Describe several pairs, results in order")
    async def describe_batch(request: Request):
        return await _describe(request, single=False)

    @app.post("/v1/attention", responses={200: {"content": {"image/png": {}, "application/octet-stream": {}},
                                                "description": "the picture (PNG) or, with format=npz, the arrays"},
                                           **schema.ERRORS},
              openapi_extra=schema.request_body(single=True), summary="Where the ViT's heads attended over one pair")
    async def attention(request: Request):
        """One pair as for ``/v1/describe``, and the fields ``layer`` (default -1, the last), ``heads``
        (``all`` or ``0,2``), ``from`` (``cls``, ``mean`` or ``x,y``) and ``format`` (``png`` or ``npz``).
        Where the heads attended, not a map of what changed (``docs/attention.md``)."""
        import io

        from ..attention import render_attention

        captioner = ready()
        try:
            body = await read_body(request, config.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)
        uploads, fields = parse_request(request.headers.get("content-type"), body)
        del body
        unknown = sorted(set(fields) - {"layer", "heads", "from", "format"})
        if unknown:
            raise ApiError(422, unknown[0], "unknown field; attention takes layer, heads, from and format")
        fmt = str(fields.get("format") or "png").lower()
        if fmt not in ("png", "npz"):
            raise ApiError(422, "format", f"{fmt!r}: png or npz")
        try:
            layer = int(fields.get("layer", -1))
        except (TypeError, ValueError):
            raise ApiError(422, "layer", f"{fields.get('layer')!r} is not a whole number") from None
        [(before, after)] = pair_uploads(uploads, True, 1)
        background, limits = captioner.composition.background, captioner.image_limits
        images = [decode_image(u, background, limits) for u in (before, after)]

        def draw() -> tuple[bytes, str]:
            source = fields.get("from") or "cls"
            maps = captioner.attention(*images, layer=layer, heads=fields.get("heads"),
                                       source=tuple(source) if isinstance(source, list) else source)
            out = io.BytesIO()
            if fmt == "npz":
                maps.save_npz(out)
                return out.getvalue(), "application/octet-stream"
            render_attention(maps).save(out, "PNG")
            return out.getvalue(), "image/png"

        async with decoding:
            try:
                data, media = await run_in_threadpool(draw)
            except IdcError as exc:  # a bad layer, head or point; a model without an attention graph
                raise ApiError(422, "attention", exc.problem) from None
        logger.info("%s %s 200 %s, %d bytes", request.method, request.url.path, fmt, len(data))
        return Response(data, media_type=media)

    async def _describe(request, single: bool):
        captioner = ready()
        started = time.perf_counter()
        try:
            body = await read_body(request, config.max_body_bytes)
        except ClientDisconnect:
            logger.info("%s %s: the client went away during the upload", request.method, request.url.path)
            return Response(status_code=400)
        uploads, fields = parse_request(request.headers.get("content-type"), body)
        del body
        pairs = [_Pair(b, a) for b, a in pair_uploads(uploads, single, config.max_queue)]
        del uploads
        generation = generation_settings(fields, captioner.generation)
        background, limits = captioner.composition.background, captioner.image_limits

        def decode(pair: _Pair) -> ApiError | None:
            t0 = time.perf_counter()
            try:
                pair.images = tuple(decode_image(u, background, limits) for u in (pair.before, pair.after))
                # a waiting pair keeps its decoded images only, not the bytes they came from
                pair.before, pair.after = (dataclasses.replace(u, data=b"") for u in (pair.before, pair.after))
                if captioner.composition.size_policy == "strict":  # the one policy that refuses a pair
                    from ..compose import stack_pair

                    stack_pair(*pair.images, captioner.composition, (pair.before.part, pair.after.part))
            except ApiError as exc:
                return exc
            except Exception as exc:  # the size policy's refusal (an InputError), or Pillow on an odd image
                return ApiError(422, pair.after.part, getattr(exc, "problem", first_line(exc)))
            finally:
                pair.decode_s = time.perf_counter() - t0
            return None

        async def decode_all() -> list[ApiError | None]:
            async def one(pair):
                async with decoding:
                    return await run_in_threadpool(decode, pair)
            return list(await asyncio.gather(*(one(p) for p in pairs)))

        failures = await decode_all()
        if single and failures[0] is not None:
            raise failures[0]
        good = [p for p, failure in zip(pairs, failures) if failure is None]
        try:
            described = iter(await state["batcher"].submit(good, generation) if good else [])
        except QueueFull as exc:
            raise ApiError(503, "queue", f"busy: {exc}; retry after {exc.retry_after_s} s",
                           {"Retry-After": str(exc.retry_after_s)}) from None
        except WaitTimeout as exc:
            raise ApiError(504, "queue", str(exc)) from None
        results = []
        for pair, failure in zip(pairs, failures):
            if failure is None:
                results.append(next(described).to_dict())
            else:
                results.append(_failed(captioner, pair, failure))
        logger.info("%s %s 200 %d pairs in %.3f s", request.method, request.url.path, len(pairs),
                    time.perf_counter() - started)
        if single:
            if results[0]["error"]:
                raise ApiError(500, "model", results[0]["error"].removeprefix("model: "))
            return results[0]
        return {"results": results}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, config)


def _failed(captioner, pair: _Pair, failure: ApiError) -> dict:
    from ..captioner import DiffResult, Timings

    backend = captioner.backend
    return DiffResult(caption=None, before=pair.before.name, after=pair.after.name, model=backend.model_id,
                      backend=backend.name, adapter=backend.adapter, timings=Timings(pair.decode_s, 0.0, 0),
                      error=str(failure)).to_dict()

