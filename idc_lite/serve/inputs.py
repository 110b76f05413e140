"""What a request may carry, read without trusting it: a capped body, pairs of images, generation settings.

A describe request is ``multipart/form-data`` (files ``before`` and ``after``; for a batch, the two
fields repeated, paired in order) or JSON with base64 images. Generation settings are optional
fields (``max_new_tokens``, ``num_beams``, ``prompt``), bounded by :data:`GENERATION_LIMITS`.
Images are bytes only: nothing here fetches a URL or opens a path a client names. They are decoded
by :func:`idc_lite.compose.load_image`, so every check of the runtime applies (formats told by
content, byte and pixel caps, Pillow's decompression-bomb limit), and a refusal is classified into
the status a client can act on: 413 too large, 415 not an image, 422 an image that cannot be used.

Every problem is an :class:`ApiError`: a status and one line naming the part and the problem.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from dataclasses import dataclass

from ..errors import IdcError, first_line
from ..settings import GenerationSettings, ImageLimits

#: The most a client may ask of generation: a request cannot tie the model up for long.
GENERATION_LIMITS = {"max_new_tokens": 256, "num_beams": 8, "prompt": 1000}
#: Longest file name kept from an upload, for the result's ``before`` / ``after`` fields.
MAX_NAME = 200


class ApiError(Exception):
    """A request the server refuses: ``status``, and ``part: problem`` on one line."""

    def __init__(self, status: int, part: str, problem: str, headers: dict[str, str] | None = None):
        self.status, self.part, self.headers = status, part, headers or {}
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{part}: {self.problem}")

    def body(self) -> dict:
        return {"error": str(self), "status": self.status}


@dataclass(frozen=True)
class Upload:
    """One image as received: a name for the result (never opened) and its bytes."""

    part: str
    name: str
    data: bytes


# --------------------------------------------------------------------------- the body
async def read_body(request, max_bytes: int) -> bytes:
    """The request's body, refused with 413 as soon as it passes ``max_bytes`` (chunked uploads too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(size, max_bytes, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(size: int, max_bytes: int, at_least: bool = False) -> ApiError:
    return ApiError(413, "body", f"{'more than ' if at_least else ''}{size} bytes, more than the {max_bytes} "
                    f"allowed (--max-body-mb {max_bytes / 2**20:g})")


def parse_request(content_type: str | None, body: bytes) -> tuple[list[Upload], dict]:
    """Uploads in the order sent and the other fields, from a multipart or a JSON body."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return _parse_multipart(content_type, body)
    if media == "application/json":
        return _parse_json(body)
    raise ApiError(415, "content-type", f"{media or 'none'} is not accepted; send multipart/form-data (files "
                   "'before' and 'after') or application/json (base64 images)")


def _parse_multipart(content_type: str, body: bytes) -> tuple[list[Upload], dict]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "content-type", "multipart/form-data without a boundary")
    parts: list[dict] = []
    state = {"name": b"", "value": b"", "ended": False}

    def on_part_begin():
        parts.append({"headers": {}, "data": io.BytesIO()})

    def on_header_field(data, start, end):
        state["name"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][state["name"].lower()] = state["value"]
        state["name"] = state["value"] = b""

    def on_part_data(data, start, end):
        parts[-1]["data"].write(data[start:end])

    def on_end():
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_end": on_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart's MultipartParseError and header-size errors
        raise ApiError(400, "body", f"malformed multipart data ({first_line(exc)})") from None
    if not state["ended"]:
        raise ApiError(400, "body", "malformed multipart data (it ends before its closing boundary)")
    uploads, fields = [], {}
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"name" not in options:
            raise ApiError(400, "body", "a multipart part without a name in its Content-Disposition")
        name = options[b"name"].decode("utf-8", "replace")
        data = part["data"].getvalue()
        if name in ("before", "after"):
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            uploads.append(Upload(name, os.path.basename(filename.replace("\\", "/"))[:MAX_NAME] or name, data))
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, name, "not UTF-8 text") from None
    return uploads, fields


def _parse_json(body: bytes) -> tuple[list[Upload], dict]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body", f"not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ApiError(422, "body", "expected a JSON object")
    uploads: list[Upload] = []
    if "pairs" in data:
        pairs = data["pairs"]
        if not isinstance(pairs, list):
            raise ApiError(422, "pairs", "expected a list of {\"before\": base64, \"after\": base64} objects")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise ApiError(422, f"pairs[{i}]", "expected an object with 'before' and 'after'")
            uploads += [_from_base64(f"pairs[{i}].{side}", pair.get(side), side) for side in ("before", "after")]
    else:
        uploads += [_from_base64(side, data.get(side), side) for side in ("before", "after")]
    fields = data.get("generation") or {}
    if not isinstance(fields, dict):
        raise ApiError(422, "generation", "expected an object (max_new_tokens, num_beams, prompt)")
    return uploads, fields


def _from_base64(part: str, value, side: str) -> Upload:
    if value is None:
        raise ApiError(422, part, "missing; give the image as a base64 string")
    if not isinstance(value, str):
        raise ApiError(422, part, "expected a base64 string")
    if value.startswith("data:"):  # a data URL, as browsers write them
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, part, "not valid base64") from None
    return Upload(part, side, data)


# --------------------------------------------------------------------------- pairs and settings
def pair_uploads(uploads: list[Upload], single: bool, max_pairs: int) -> list[tuple[Upload, Upload]]:
    """Pair the ``before`` and ``after`` uploads in order: exactly one pair for ``single``."""
    befores = [u for u in uploads if u.part.endswith("before")]
    afters = [u for u in uploads if u.part.endswith("after")]
    if single:
        for side, found in (("before", befores), ("after", afters)):
            if len(found) != 1:
                raise ApiError(422, side, "missing; send one 'before' and one 'after' image" if not found else
                               f"{len(found)} images given; /v1/describe takes one pair (use /v1/describe/batch)")
    elif not befores or len(befores) != len(afters):
        raise ApiError(422, "pairs", f"{len(befores)} 'before' and {len(afters)} 'after' images; send them in pairs")
    if len(befores) > max_pairs:
        raise ApiError(422, "pairs", f"{len(befores)} pairs, more than the {max_pairs} one request may hold")
    if not single:  # name a batch's parts by their place, whatever the client called them
        befores = [b if b.part.startswith("pairs[") else Upload(f"pairs[{i}].before", b.name, b.data)
                   for i, b in enumerate(befores)]
        afters = [a if a.part.startswith("pairs[") else Upload(f"pairs[{i}].after", a.name, a.data)
                  for i, a in enumerate(afters)]
    return list(zip(befores, afters))


def generation_settings(fields: dict, default: GenerationSettings) -> GenerationSettings:
    """The request's generation settings over the model's defaults, within :data:`GENERATION_LIMITS`."""
    unknown = sorted(set(fields) - set(GENERATION_LIMITS))
    if unknown:
        raise ApiError(422, unknown[0], f"unknown field; generation settings are {', '.join(GENERATION_LIMITS)}")
    values = {}
    for name in ("max_new_tokens", "num_beams"):
        value = fields.get(name)
        if value is None or value == "":
            continue
        try:
            number = int(value)
            if isinstance(value, float) or isinstance(value, bool) or str(number) != str(value).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise ApiError(422, name, f"expected a whole number, not {str(value)[:40]!r}") from None
        if not 1 <= number <= GENERATION_LIMITS[name]:
            raise ApiError(422, name, f"{number} is outside 1..{GENERATION_LIMITS[name]}")
        values[name] = number
    prompt = fields.get("prompt")
    if prompt not in (None, ""):
        if not isinstance(prompt, str):
            raise ApiError(422, "prompt", "expected text")
        if len(prompt) > GENERATION_LIMITS["prompt"]:
            raise ApiError(422, "prompt", f"{len(prompt)} characters, more than {GENERATION_LIMITS['prompt']}")
        values["prompt"] = prompt
    try:
        return dataclasses.replace(default, **values)
    except ValueError as exc:
        raise ApiError(422, "generation", str(exc)) from None


# --------------------------------------------------------------------------- images
def decode_image(upload: Upload, background: tuple[int, int, int], limits: ImageLimits):
    """Decode one upload with the runtime's own checks; a refusal is an :class:`ApiError` with its status."""
    from ..compose import load_image

    try:
        return load_image(upload.data, background, limits)
    except IdcError as exc:
        raise ApiError(_refusal_status(upload.data, limits), upload.part, exc.problem) from None


def _refusal_status(data: bytes, limits: ImageLimits) -> int:
    """413 for a picture too large, 415 for bytes that are no accepted image, else 422 (corrupt, ...).

    Decides from the image's header alone (Pillow's lazy open), only once the runtime has refused it.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from ..compose import IMAGE_FORMATS

    if len(data) > limits.max_bytes:
        return 413
    if not data:
        return 415
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
    except UnidentifiedImageError:
        return 415
    except Image.DecompressionBombError:
        return 413
    except Exception:
        return 422
    bomb = Image.MAX_IMAGE_PIXELS or float("inf")
    return 413 if width * height > min(limits.max_pixels, bomb) else 422
