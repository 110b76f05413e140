"""The model embedded in the package, used when no model is given."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError

EMBEDDED_DIR = Path(__file__).parent / "models" / "default"


def default_model_dir() -> Path:
    """The embedded default artifact's directory."""
    if (EMBEDDED_DIR / "manifest.json").is_file():
        return EMBEDDED_DIR
    raise ModelError(None, "this install has no embedded default model; pass a model with --model (see README)")
