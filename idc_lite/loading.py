"""Finding and checking models: local directories or hub ids, through huggingface_hub's cache.

A model argument is either a local directory or a hub id (``Salesforce/blip2-opt-2.7b``), with an
optional revision. Hub ids go through ``huggingface_hub.snapshot_download``, so its cache,
``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` apply; ``local_files_only=True`` never touches
the network. Only safetensors weights are fetched or accepted: pickled ``.bin`` weights are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ModelError, first_line

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files a BLIP-2 model directory needs, fetched from the hub (weights as safetensors only).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def is_hub_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith((".", "/", "~"))


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None, local_files_only: bool = False) -> Path:
    """Return the local directory of ``model``: the directory itself, or the hub snapshot in the cache."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(text, "is a file, expected a model directory (with config.json)")
        return path.resolve()
    if not is_hub_id(text):
        raise ModelError(text, "no such model directory")
    return Path(_snapshot(text, revision, local_files_only))


def _snapshot(repo_id: str, revision: str | None, local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return snapshot_download(
            repo_id, revision=revision, local_files_only=local_files_only, allow_patterns=HUB_PATTERNS
        )
    except hub_errors.RepositoryNotFoundError:
        raise ModelError(where, "no such model on the hub (or it is private)") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelError(where, "no such revision on the hub") from None
    except hub_errors.GatedRepoError:
        raise ModelError(where, "gated model: log in with `hf auth login` and accept its terms") from None
    except hub_errors.LocalEntryNotFoundError:
        why = "local_files_only is set" if local_files_only else "HF_HUB_OFFLINE is set or the hub is unreachable"
        raise ModelError(where, f"not in the local hub cache and {why}; give a local directory instead") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise ModelError(where, f"download failed ({first_line(exc)})") from None


def read_json(path: Path, kind: type[Exception] = ModelError) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise kind(path, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise kind(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise kind(path, "expected a JSON object")
    return data


def check_blip2_dir(model_dir: Path) -> dict:
    """Check that ``model_dir`` holds a BLIP-2 model with an OPT decoder and safetensors weights.

    Returns its ``config.json`` as a dict.
    """
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(model_dir, "not a model directory (no config.json)")
    config = read_json(config_path)
    model_type = config.get("model_type")
    if model_type != "blip-2":
        raise ModelError(model_dir, f"not a BLIP-2 model (model_type is {model_type!r}, expected 'blip-2')")
    text_type = (config.get("text_config") or {}).get("model_type", "opt")
    if text_type != "opt":
        raise ModelError(model_dir, f"BLIP-2 with a {text_type!r} language model; idc-lite runs BLIP-2 OPT models")
    if not any(model_dir.glob("*.safetensors")):
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise ModelError(model_dir, "has only pickled weights (.bin/.pt); idc-lite loads safetensors only")
        raise ModelError(model_dir, "no weights (*.safetensors) in the model directory")
    return config
