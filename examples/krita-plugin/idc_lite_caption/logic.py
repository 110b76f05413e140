"""Everything the plug-in does that needs no editor: pixels to PNG, two images to a pair, the call, the report.

Krita hands over a layer's pixels as raw bytes (8-bit RGBA layers: B, G, R, A per pixel); this
module turns them into PNG with the standard library (zlib), picks which image is *before* and
which *after*, asks the local ``idc-lite serve`` through ``idc_lite_client`` (copied next to this
file by ``install.py``), and words the outcome, caption or error, for a message box.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from .idc_lite_client import Client, ServerError, Unreachable

#: Where the service is and its token, from the environment Krita was started in.
URL_VARIABLE, TOKEN_VARIABLE = "IDC_LITE_URL", "IDC_LITE_TOKEN"


@dataclass(frozen=True)
class Image:
    """Pixels handed over by the editor: ``pixels`` holds ``width * height`` pixels in ``order``."""

    name: str
    width: int
    height: int
    pixels: bytes
    order: str = "BGRA"  # Krita's byte order for 8-bit RGBA
    stack_index: int = 0  # position in the layer stack, 0 at the bottom


@dataclass(frozen=True)
class Report:
    """What to show the user: ``ok`` with the ``caption``, or why not, in ``text``."""

    ok: bool
    text: str
    caption: str | None = None


class PluginError(Exception):
    """Something the user must change before the plug-in can work (the message says what)."""


def encode_png(image: Image) -> bytes:
    """``image`` as an 8-bit RGBA PNG (alpha kept: the service composites it on white)."""
    if image.order not in ("BGRA", "RGBA"):
        raise PluginError(f"{image.name}: pixels in {image.order} order; convert the image to 8-bit RGBA")
    if image.width < 1 or image.height < 1 or len(image.pixels) != image.width * image.height * 4:
        raise PluginError(f"{image.name}: {len(image.pixels)} bytes for {image.width}x{image.height} pixels; "
                          "convert the image to 8-bit RGBA (Image > Convert Image Color Space)")
    data = bytearray(image.pixels)
    if image.order == "BGRA":
        data[0::4], data[2::4] = data[2::4], data[0::4]
    stride = image.width * 4
    raw = b"".join(b"\x00" + bytes(data[row * stride:(row + 1) * stride]) for row in range(image.height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def pair_from_layers(layers: list[Image]) -> tuple[Image, Image]:
    """(before, after) from exactly two layers: the lower one is *before*, the upper one *after*."""
    if len(layers) != 2:
        raise PluginError(f"select exactly two layers (the lower is 'before', the upper 'after'); "
                          f"{len(layers)} selected")
    lower, upper = sorted(layers, key=lambda image: image.stack_index)
    return lower, upper


class ChangeDescriber:
    """The plug-in's state and actions, free of the editor: a remembered image and a client."""

    def __init__(self, client: Client | None = None):
        self.client = client or Client(os.environ.get(URL_VARIABLE) or "http://127.0.0.1:8000",
                                       token=os.environ.get(TOKEN_VARIABLE) or None)
        self.remembered: Image | None = None

    def remember(self, image: Image) -> Report:
        """Keep ``image`` as the *before* of :meth:`describe_since`."""
        encode_png(image)  # refuse now what could not be sent later
        self.remembered = image
        return Report(True, f"Remembered '{image.name}' ({image.width}x{image.height}) as the image before.")

    def describe_since(self, image: Image) -> Report:
        """What changed between the remembered image and ``image``."""
        if self.remembered is None:
            return Report(False, "Nothing remembered yet: use 'Remember image as before' first.")
        return self.describe(self.remembered, image)

    def describe_layers(self, layers: list[Image]) -> Report:
        """What changed from the lower of two layers to the upper one."""
        try:
            before, after = pair_from_layers(layers)
        except PluginError as exc:
            return Report(False, str(exc))
        return self.describe(before, after)

    def describe(self, before: Image, after: Image) -> Report:
        try:
            result = self.client.describe(encode_png(before), encode_png(after))
        except PluginError as exc:
            return Report(False, str(exc))
        except Unreachable:
            return Report(False, f"No idc-lite service at {self.client.url}. Start it with `idc-lite serve` "
                          f"(pip install 'idc-lite[serve]'), or set {URL_VARIABLE}.")
        except ServerError as exc:
            if exc.status == 401:
                return Report(False, f"The service needs its token: set {TOKEN_VARIABLE} before starting Krita.")
            if exc.status == 503:
                return Report(False, f"The service is busy or still loading its model; try again ({exc.message}).")
            return Report(False, f"The service refused the pair ({exc.status}): {exc.message}")
        seconds = result["timings"]["total_s"]
        return Report(True, f"{before.name} → {after.name}: {result['caption']} ({seconds:.2f} s, {result['model']})",
                      result["caption"])
