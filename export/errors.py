"""Typed export errors, as optimum's exporter has: each says what failed validation and by how much."""

from __future__ import annotations

from idc_lite.errors import IdcError


class ExportError(IdcError):
    """The export could not be completed."""


class ShapeError(ExportError):
    """The exported graph's output shape differs from torch's."""


class AtolError(ExportError):
    """The exported graph's outputs differ from torch's by more than the tolerance."""


class QuantizationError(ExportError):
    """The quantized decoder departs from the full-precision one by more than the tolerance."""


class DownloadError(ExportError):
    """A file could not be downloaded, or its content is not what was expected."""
