"""The artifact directory: the contract between ``export/`` (which writes it) and the lite runtime.

::

    manifest.json             format version, provenance, settings, precisions, sha256 of every file
    encoder.onnx (+ .data)    ViT + Q-Former + query tokens + language projection, one ONNX graph
    decoder/                  the merged OPT decoder (safetensors; int4 pre-quantized or fp16/fp32)
    tokenizer.json, ...       tokenizer files
    preprocessor_config.json  the image processor's settings

:func:`load_manifest` checks the manifest and every file it lists (presence, size, sha256) before
anything is built from them, and says exactly what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .hashing import file_sha256
from .settings import CompositionSettings, GenerationSettings, ProcessorSettings, TokenSettings, from_dict

MANIFEST = "manifest.json"
FORMAT = "idc-lite-artifact"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    path: Path  # the artifact directory
    data: dict

    @property
    def name(self) -> str:
        return self.data.get("name") or self.path.name

    @property
    def composition(self) -> CompositionSettings:
        return from_dict(CompositionSettings, self.data["composition"])

    @property
    def generation(self) -> GenerationSettings:
        return from_dict(GenerationSettings, self.data["generation"])

    @property
    def processor(self) -> ProcessorSettings:
        return from_dict(ProcessorSettings, self.data["processor"])

    @property
    def tokens(self) -> TokenSettings:
        return from_dict(TokenSettings, self.data["tokens"])

    @property
    def encoder(self) -> dict:
        return self.data["encoder"]

    @property
    def decoders(self) -> dict[str, dict]:
        """Decoders in the artifact by name (``bnb-int4``, ``torch-fp32``, ``ort-int4``, ...)."""
        return self.data["decoders"]

    def file(self, relative: str) -> Path:
        return self.path / relative


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(os.fspath(path)).expanduser() / MANIFEST).is_file()


def load_manifest(path: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and check an artifact's manifest; with ``verify``, also every file's size and sha256."""
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise ArtifactError(root, "no such artifact directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(root, f"not an idc-lite artifact (no {MANIFEST})")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(manifest_path, f"unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(manifest_path, f"not an idc-lite artifact manifest (format is not {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            manifest_path, f"artifact format version {version!r}, this idc-lite reads version {FORMAT_VERSION}; "
            "re-export the artifact with this version of idc-lite",
        )
    for key in ("composition", "generation", "processor", "tokens", "encoder", "decoders", "files"):
        if key not in data:
            raise ArtifactError(manifest_path, f"manifest lacks {key!r}")
    if verify:
        verify_files(root, data["files"])
    return Manifest(root, data)


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """Check that every listed file exists with its recorded size and sha256."""
    for relative, expected in sorted(files.items()):
        path = root / relative
        if not path.is_file():
            raise ArtifactError(path, "missing from the artifact")
        size = path.stat().st_size
        if size != expected["size"]:
            raise ArtifactError(path, f"truncated or altered: {size} bytes, the manifest says {expected['size']}")
        if file_sha256(path) != expected["sha256"]:
            raise ArtifactError(path, "sha256 does not match the manifest: the file was altered or corrupted")


def hash_files(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file below ``root`` except the manifest, by relative path."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def write_manifest(root: Path, data: dict) -> Path:
    """Write ``manifest.json`` with the format header and the hashes of every file now in ``root``."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **data, "files": hash_files(root)}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
