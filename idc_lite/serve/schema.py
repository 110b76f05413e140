"""The service's JSON shapes, for its OpenAPI description (``/openapi.json``).

Requests are read by :mod:`idc_lite.serve.inputs` (multipart or JSON, capped and checked there);
these models say what they hold. Results have the fields of ``idc-lite describe --json``
(:meth:`idc_lite.DiffResult.to_dict`).
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from .inputs import GENERATION_LIMITS


class Generation(BaseModel):
    max_new_tokens: Optional[int] = Field(None, ge=1, le=GENERATION_LIMITS["max_new_tokens"],
                                          description="Most tokens to generate (the model's default: 77).")
    num_beams: Optional[int] = Field(None, ge=1, le=GENERATION_LIMITS["num_beams"], description="1 = greedy.")
    prompt: Optional[str] = Field(None, max_length=GENERATION_LIMITS["prompt"],
                                  description="Optional text prompt after the image (BLIP2IDC uses none).")


class Timings(BaseModel):
    compose_s: float = Field(description="Decoding and composing the pair.")
    inference_s: float = Field(description="The model's time, shared equally by the pairs of its batch.")
    batch_size: int = Field(description="Pairs in the model call that described this one.")
    total_s: float


class Result(BaseModel):
    caption: Optional[str]
    before: str = Field(description="The uploaded file's name, or the part's name.")
    after: str
    model: str
    backend: str
    adapter: Optional[str]
    timings: Timings
    error: Optional[str] = Field(description="Why this pair has no caption: '<part>: <problem>'.")


class BatchResult(BaseModel):
    results: list[Result]


class Health(BaseModel):
    status: str = Field(description="ok, loading or failed.")
    model: Optional[str] = None
    error: Optional[str] = None


class Info(BaseModel):
    model: str
    backend: str
    adapter: Optional[str]
    decoder: Optional[str]
    device: str
    version: str
    load_s: float
    generation: dict
    composition: dict
    limits: dict
    stats: dict


class Error(BaseModel):
    error: str = Field(description="One line: '<part>: <problem>'.")
    status: int


_WHY = {
    400: "malformed body (multipart, JSON, base64)",
    401: "missing or wrong bearer token (servers started with --token)",
    403: "Host or Origin not this server's, nor a --cors-origin",
    413: "body over --max-body-mb, or an image over the size or decompression-bomb limits",
    415: "not multipart/form-data nor JSON, or a part that is not an image",
    422: "missing images, bad generation settings, a pair the size policy refuses",
    503: "model loading, or queue full (Retry-After)",
    504: "the pair waited longer than --timeout",
}
#: Error responses of the describe routes, and of the others.
ERRORS = {status: {"model": Error, "description": why} for status, why in _WHY.items()}
ACCESS_ERRORS = {status: ERRORS[status] for status in (401, 403, 503)}


def request_body(single: bool) -> dict:
    """The OpenAPI ``requestBody`` of a describe route: multipart files or JSON with base64 images."""
    fields = {"max_new_tokens": {"type": "integer"}, "num_beams": {"type": "integer"}, "prompt": {"type": "string"}}
    files = ({"type": "string", "format": "binary"} if single
             else {"type": "array", "items": {"type": "string", "format": "binary"}})
    image = {"type": "string", "description": "base64 (or a data: URL) of the image's file"}
    pair = {"type": "object", "required": ["before", "after"], "properties": {"before": image, "after": image}}
    generation = Generation.model_json_schema()
    json_schema = ({**pair, "properties": {**pair["properties"], "generation": generation}} if single else
                   {"type": "object", "required": ["pairs"],
                    "properties": {"pairs": {"type": "array", "items": pair}, "generation": generation}})
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["before", "after"],
            "properties": {"before": files, "after": files, **fields},
            "description": "One 'before' and one 'after' file" if single
            else "'before' and 'after' files repeated, paired in order",
        }},
        "application/json": {"schema": json_schema},
    }}}
