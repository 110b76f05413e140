"""A client for ``idc-lite serve``, in one file, standard library only: copy it into a plug-in as is.

    from idc_lite_client import Client, ServerError
    client = Client("http://127.0.0.1:8000")            # token="..." for a server started with --token
    result = client.describe("before.png", "after.png")  # paths, bytes or file objects
    print(result["caption"])

``describe`` returns the fields of ``idc-lite describe --json`` (caption, before, after, model,
backend, adapter, timings, error); ``describe_batch`` a list of them, in order, where a pair that
failed carries its ``error``. Anything the server refuses raises :class:`ServerError` with the
status and the server's one-line message; a server that cannot be reached raises
:class:`Unreachable`. Images go as multipart uploads, encoded here by hand; nothing but the
standard library is imported, so the file runs inside any editor's Python (Krita, GIMP 3, Blender).
"""

import io
import json
import os
import time
import urllib.error
import urllib.request
import uuid

__all__ = ["Client", "ClientError", "ServerError", "Unreachable", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """Base class of this client's errors."""


class ServerError(ClientError):
    """The server answered with an error: ``status`` (400..504) and its one-line ``message``."""

    def __init__(self, status, message, retry_after=None):
        self.status, self.message, self.retry_after = status, message, retry_after
        super().__init__(f"{status}: {message}")


class Unreachable(ClientError):
    """No server answered at the URL (not started, wrong port, still starting)."""


class Client:
    """Talk to one ``idc-lite serve``. ``timeout`` is seconds per request."""

    def __init__(self, url=DEFAULT_URL, token=None, timeout=120.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # ------------------------------------------------------------------ the routes
    def health(self):
        """True when the model is loaded and the server answers; False while it loads."""
        try:
            return self._request("GET", "/health").get("status") == "ok"
        except ServerError as exc:
            if exc.status == 503:
                return False
            raise

    def wait_until_ready(self, timeout=60.0, interval=0.2):
        """Poll ``/health`` until the model is loaded; raise :class:`Unreachable` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                if self.health():
                    return
            except Unreachable as exc:
                last = exc
            time.sleep(interval)
        raise Unreachable(f"{self.url}: not ready after {timeout:g} s" + (f" ({last})" if last else ""))

    def info(self):
        """The model, backend, decoder, device, version and limits."""
        return self._request("GET", "/v1/info")

    def describe(self, before, after, max_new_tokens=None, num_beams=None, prompt=None):
        """Describe one pair; ``before`` and ``after`` are paths, bytes or binary file objects."""
        fields = _generation(max_new_tokens, num_beams, prompt)
        body, content_type = encode_multipart([("before", before), ("after", after)], fields)
        return self._request("POST", "/v1/describe", body, content_type)

    def describe_batch(self, pairs, max_new_tokens=None, num_beams=None, prompt=None):
        """Describe several (before, after) pairs in one request; results in order."""
        files = []
        for before, after in pairs:
            files += [("before", before), ("after", after)]
        body, content_type = encode_multipart(files, _generation(max_new_tokens, num_beams, prompt))
        return self._request("POST", "/v1/describe/batch", body, content_type)["results"]

    # ------------------------------------------------------------------ HTTP
    def _request(self, method, path, body=None, content_type=None):
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with _opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw.decode("utf-8"))["error"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                message = raw.decode("utf-8", "replace").strip()[:200] or exc.reason
            retry = exc.headers.get("Retry-After") if exc.headers else None
            raise ServerError(exc.code, message, int(retry) if retry and retry.isdigit() else None) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"{self.url}: {reason}") from None


# A local service: never go through the user's HTTP proxy settings.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _generation(max_new_tokens, num_beams, prompt):
    fields = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "prompt": prompt}
    return {k: str(v) for k, v in fields.items() if v is not None}


def _read(image):
    """(file name, bytes) of a path, bytes or binary file object."""
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as fh:
            return os.path.basename(os.fspath(image)), fh.read()
    if hasattr(image, "read"):
        return os.path.basename(getattr(image, "name", "") or "image"), image.read()
    raise TypeError(f"an image is a path, bytes or a binary file object, not {type(image).__name__}")


def encode_multipart(files, fields=None):
    """(body, content type) of a multipart/form-data request with these files and text fields."""
    boundary = "idc-lite-" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(str(value).encode("utf-8") + b"\r\n")
    for name, image in files:
        filename, data = _read(image)
        filename = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode("utf-8"))
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
