"""The artifact contract between ``export/`` (which writes an artifact) and the runtime (which loads it).

Declared once, here, and imported by both sides: the file layout, the decoder names, each graph's
input and output names, and the manifest's schema as typed entries.

::

    manifest.json              format version, provenance, settings, entries below, size + sha256 of every file
    encoder.onnx (+ .data)     ViT + Q-Former + query tokens + language projection, one ONNX graph:
                               ENCODER_INPUT (pixels) -> ENCODER_OUTPUT (query embeddings)
    decoder/                   a torch decoder (TORCH_DECODERS): transformers' OPT in safetensors
    ort-int4/decoder.onnx ...  an ONNX Runtime decoder (ORT_DECODERS), one folder each, DECODER_INPUTS
                               + past.{i}.key/value -> DECODER_LOGITS + present.{i}.key/value
    tokenizer.json, ...        tokenizer files
    preprocessor_config.json   the image processor's settings
    reference/base/, adapter/  optional (REFERENCE_BASE_DIR, REFERENCE_ADAPTER_DIR): what the reference
                               backend runs offline, safetensors only: the base in fp16 and the LoRA adapter

:func:`load_manifest` parses the manifest into typed entries (a malformed one is one
:class:`~idc_lite.errors.ArtifactError`) and, unless told not to, checks the folder: every file in it
is listed with its size and sha256 and matches, is a regular file inside the folder (no symlink, no
hard link, no path leaving it), and nothing unlisted is there; so every file the runtime then opens
(graphs, external data, decoder folders, tokenizer) is one the manifest vouches for. This proves
integrity, not authenticity: anyone who can write the folder can write a matching manifest. Pin an
artifact by the sha256 of its ``manifest.json`` (:func:`manifest_sha256`). External data named inside
a graph is kept in the graph's folder by ONNX Runtime itself, from :data:`MIN_ONNXRUNTIME` on
(:func:`check_onnxruntime`).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError
from .hashing import file_sha256
from .settings import CompositionSettings, GenerationSettings, ProcessorSettings, TokenSettings, from_dict

MANIFEST = "manifest.json"
FORMAT = "idc-lite-artifact"
FORMAT_VERSION = 1

#: The encoder graph: file name, and its input and output names.
ENCODER_FILE = "encoder.onnx"
ENCODER_INPUT = "pixel_values"
ENCODER_OUTPUT = "query_embeds"

#: Torch decoders (transformers' OPT, loaded with the ``reference`` extra) -> storage precision.
TORCH_DECODERS = {"bnb-int4": "int4", "torch-fp16": "fp16", "torch-fp32": "fp32"}
#: The folder of an artifact's (single) torch decoder.
TORCH_DECODER_DIR = "decoder"
#: ONNX Runtime decoders -> what their graph computes in: int4 weights with fp32 (CPU) or fp16 (CUDA)
#: activations and cache, or fp32. Each lives in a folder of its name holding :data:`ORT_DECODER_GRAPH`.
ORT_DECODERS = {"ort-int4": "int4", "ort-int4-fp16": "int4-fp16", "ort-fp32": "fp32"}
ORT_DECODER_GRAPH = "decoder.onnx"
#: Every decoder name this idc-lite knows.
DECODERS = (*TORCH_DECODERS, *ORT_DECODERS)
#: The bare tokenizer the lite runtime opens when the export checked it (``manifest["tokenizer"]``).
TOKENIZER_FILE = "tokenizer.json"
#: The optional attention graph (manifest ``attention``): the encoder's ViT up to its last attention,
#: ENCODER_INPUT -> one ``attention.{layer}`` output per ViT layer (:func:`attention_output`), the
#: heads' attention probabilities (batch, heads, tokens, tokens), float32. Beside the encoder, whose
#: external-data file it shares (graphs with inline weights hold their own copy of the ViT's).
ATTENTION_FILE = "encoder-attention.onnx"
#: The optional shipped reference (manifest ``reference``): the base model the artifact was built from,
#: in fp16 safetensors with its config, tokenizer and processor files, and its LoRA adapter, unmerged
#: (safetensors + adapter_config.json), so that the reference backend and the benchmarks run the
#: artifact's own reference offline. Opt-in at export (``--ship-reference``): a real base is gigabytes.
REFERENCE_DIR = "reference"
REFERENCE_BASE_DIR = f"{REFERENCE_DIR}/base"
REFERENCE_ADAPTER_DIR = f"{REFERENCE_DIR}/adapter"
#: Suffixes a shipped reference may not hold: pickles (unpickling runs code) and Python (remote code).
REFERENCE_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py")


def attention_output(layer: int) -> str:
    """The attention graph's output for ViT layer ``layer`` (from 0)."""
    return f"attention.{layer}"


#: The oldest ONNX Runtime that refuses a graph whose external data lies outside the graph's folder
#: (an absolute location, a ``..``, a symlink out): older ones read whatever file a graph names
#: (tried with crafted graphs on 1.20.1 to 1.23.2, refused from 1.24.1 on). The folder check of
#: :func:`verify_files` cannot see those locations (they are inside the graph), so graphs are opened
#: only with this version or later (:func:`check_onnxruntime`).
MIN_ONNXRUNTIME = (1, 24, 1)

#: An ONNX Runtime decoder graph's inputs besides the cache, and its logits output; the per-layer
#: cache names come from :func:`past_names`.
DECODER_INPUTS = ("inputs_embeds", "input_ids", "attention_mask", "beam_idx")
DECODER_LOGITS = "logits"


def past_names(num_layers: int, prefix: str = "past") -> list[str]:
    """``past.0.key, past.0.value, past.1.key, ...`` (``prefix="present"`` for the outputs)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cache_numpy_dtype(session) -> type:
    """The numpy type of a decoder graph's KV cache: float16 for ``ort-int4-fp16``, else float32."""
    import numpy as np

    kind = next(i.type for i in session.get_inputs() if i.name == past_names(1)[0])
    return np.float16 if kind == "tensor(float16)" else np.float32


@dataclass(frozen=True)
class EncoderEntry:
    """The manifest's ``encoder``: graph file (relative to the artifact), its I/O names and precision."""

    file: str
    input: str
    output: str
    precision: str
    validation: dict = field(default_factory=dict)
    quantization: dict | None = None


@dataclass(frozen=True)
class DecoderShape:
    """An ONNX Runtime decoder's dimensions, which its cache buffers are sized from."""

    layers: int
    heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class DecoderEntry:
    """One of the manifest's ``decoders``: where it lives and how it was made and checked."""

    name: str
    dir: str
    runtime: str  # "torch" or "onnxruntime"
    precision: str
    activations: str | None = None  # ONNX Runtime decoders: "fp32" or "fp16"
    graph: str | None = None  # ONNX Runtime decoders: the graph file inside ``dir``
    shape: DecoderShape | None = None  # ONNX Runtime decoders
    validation: dict = field(default_factory=dict)
    quantization: dict | None = None
    embeddings: dict | None = None


@dataclass(frozen=True)
class AttentionEntry:
    """The manifest's optional ``attention``: the attention graph, its outputs (one per ViT layer,
    from the first) and the patch grid they cover: the first token is the ViT's class token, then
    ``grid[0] x grid[1]`` patches of ``patch_size`` pixels, row by row."""

    file: str
    input: str
    outputs: tuple[str, ...]
    heads: int
    patch_size: int
    grid: tuple[int, int]
    validation: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.outputs)


@dataclass(frozen=True)
class ReferenceEntry:
    """The manifest's optional ``reference``: the shipped base model's folder, its storage precision,
    and the LoRA adapter's folder (None when the artifact merged no adapter)."""

    base: str
    precision: str
    adapter: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest; ``path`` is the artifact directory and ``data`` the raw JSON."""

    path: Path
    data: dict
    encoder: EncoderEntry
    decoders: dict[str, DecoderEntry]
    attention: AttentionEntry | None = None  # artifacts without an attention graph still load
    reference: ReferenceEntry | None = None  # only artifacts built with --ship-reference ship one

    @property
    def name(self) -> str:
        return self.data.get("name") or self.path.name

    @property
    def composition(self) -> CompositionSettings:
        return _settings(self, CompositionSettings, "composition")

    @property
    def generation(self) -> GenerationSettings:
        return _settings(self, GenerationSettings, "generation")

    @property
    def processor(self) -> ProcessorSettings:
        return _settings(self, ProcessorSettings, "processor")

    @property
    def tokens(self) -> TokenSettings:
        return _settings(self, TokenSettings, "tokens")

    @property
    def tokenizer(self) -> dict | None:
        """How the export checked the bare tokenizer (``{"runtime": "tokenizers", ...}``), if it did."""
        value = self.data.get("tokenizer")
        return value if isinstance(value, dict) else None

    @property
    def adapter_name(self) -> str | None:
        provenance = self.data.get("provenance")
        adapter = provenance.get("adapter") if isinstance(provenance, dict) else None
        return adapter.get("name") if isinstance(adapter, dict) else None

    def file(self, relative: str) -> Path:
        """The path of a file the manifest names (already checked to stay inside the artifact)."""
        return self.path / relative

    def reference_dirs(self) -> tuple[Path, Path | None]:
        """The shipped reference's base folder and adapter folder (None: no adapter), checked like every
        file when the manifest was loaded with ``verify``; an artifact without one is an :class:`ArtifactError`."""
        if self.reference is None:
            raise ArtifactError(self.path, "ships no reference model (built without --ship-reference); for the "
                                "reference backend give its base with --model and its adapter with --adapter")
        adapter = self.reference.adapter
        return self.path / self.reference.base, None if adapter is None else self.path / adapter

    def decoder_dir(self, name: str) -> Path:
        return self.path / self.decoders[name].dir

    def decoder_graph(self, name: str) -> Path:
        entry = self.decoders[name]
        if entry.graph is None:
            raise ArtifactError(self.path / MANIFEST, f"decoder {name!r} has no graph")
        return self.path / entry.dir / entry.graph


def check_onnxruntime(graph: str | os.PathLike, version: str | None = None) -> None:
    """Refuse to open ``graph`` with an ONNX Runtime older than :data:`MIN_ONNXRUNTIME`.

    ``version`` is the installed ONNX Runtime's (``onnxruntime.__version__``, read when not given).
    """
    import re

    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    if parts < MIN_ONNXRUNTIME:
        wanted = ".".join(map(str, MIN_ONNXRUNTIME))
        raise ArtifactError(graph, f"not opened with onnxruntime {version}, which reads external data from outside "
                            f"the artifact; pip install 'onnxruntime>={wanted}' (or 'onnxruntime-gpu>={wanted}')")


def _settings(manifest: Manifest, cls, key: str):
    try:
        return from_dict(cls, manifest.data[key])
    except (TypeError, ValueError) as exc:
        raise ArtifactError(manifest.path / MANIFEST, f"malformed {key!r} ({exc})") from None


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(os.fspath(path)).expanduser() / MANIFEST).is_file()


def manifest_sha256(path: str | os.PathLike) -> str:
    """The sha256 of an artifact's ``manifest.json``: it pins every file, so it pins the artifact."""
    return file_sha256(Path(os.fspath(path)).expanduser() / MANIFEST)


def load_manifest(path: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and check an artifact's manifest; with ``verify``, also every file in the folder (see the module doc)."""
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise ArtifactError(root, "no such artifact directory")
    manifest_path = root / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
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
        if not isinstance(data.get(key), dict):
            raise ArtifactError(manifest_path, f"manifest lacks {key!r}" if key not in data
                                else f"malformed manifest: {key!r} is not an object")
    files = _parse_files(manifest_path, data["files"])
    encoder = _parse_encoder(manifest_path, data["encoder"])
    decoders = {name: _parse_decoder(manifest_path, name, entry) for name, entry in data["decoders"].items()}
    attention = _parse_attention(manifest_path, data["attention"]) if data.get("attention") is not None else None
    reference = _parse_reference(manifest_path, data["reference"], files) if data.get("reference") is not None else None
    if not decoders:
        raise ArtifactError(manifest_path, "malformed manifest: it lists no decoder")
    opened = [encoder.file, *(d.dir if d.graph is None else f"{d.dir}/{d.graph}" for d in decoders.values())]
    if attention is not None:
        opened.append(attention.file)
    if reference is not None:
        opened += [reference.base, *([reference.adapter] if reference.adapter else [])]
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("runtime") == "tokenizers":
        opened.append(TOKENIZER_FILE)
    for relative in opened:
        if relative not in files and not any(f.startswith(relative.rstrip("/") + "/") for f in files):
            raise ArtifactError(root / relative, "not listed in the manifest's files")
    manifest = Manifest(root, data, encoder, decoders, attention, reference)
    for key in ("composition", "generation", "processor", "tokens"):
        getattr(manifest, key)  # a malformed settings object is one error now, not a TypeError later
    if verify:
        verify_files(root, files)
    return manifest


def _malformed(manifest_path: Path, what: str) -> ArtifactError:
    return ArtifactError(manifest_path, f"malformed manifest: {what}")


def _relative(manifest_path: Path, value: Any, what: str) -> str:
    """A relative path that stays inside the artifact: no absolute path, no ``..``, no backslash or drive."""
    if not isinstance(value, str) or not value:
        raise _malformed(manifest_path, f"{what} is not a path")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value or ":" in value or value.startswith("~"):
        raise _malformed(manifest_path, f"{what} {value!r} leaves the artifact folder")
    return pure.as_posix()


def _field(manifest_path: Path, entry: dict, key: str, kind: type, what: str):
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _malformed(manifest_path, f"{what} lacks {key!r} or it is not a {kind.__name__}")
    return value


def _parse_files(manifest_path: Path, files: dict) -> dict[str, dict]:
    checked = {}
    for relative, expected in files.items():
        name = _relative(manifest_path, relative, "a files entry")
        if name == MANIFEST:
            raise _malformed(manifest_path, "the manifest lists itself")
        if not isinstance(expected, dict):
            raise _malformed(manifest_path, f"files entry {relative!r} is not an object")
        size = _field(manifest_path, expected, "size", int, f"files entry {relative!r}")
        digest = _field(manifest_path, expected, "sha256", str, f"files entry {relative!r}")
        if size < 0 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _malformed(manifest_path, f"files entry {relative!r} has a bad size or sha256")
        checked[name] = {"size": size, "sha256": digest}
    return checked


def _parse_encoder(manifest_path: Path, entry: dict) -> EncoderEntry:
    return EncoderEntry(
        file=_relative(manifest_path, entry.get("file"), "encoder.file"),
        input=_field(manifest_path, entry, "input", str, "encoder"),
        output=_field(manifest_path, entry, "output", str, "encoder"),
        precision=_field(manifest_path, entry, "precision", str, "encoder"),
        validation=entry.get("validation") if isinstance(entry.get("validation"), dict) else {},
        quantization=entry.get("quantization") if isinstance(entry.get("quantization"), dict) else None,
    )


def _parse_attention(manifest_path: Path, entry: Any) -> AttentionEntry:
    what = "attention"
    if not isinstance(entry, dict):
        raise _malformed(manifest_path, f"{what} is not an object")
    outputs, grid = entry.get("outputs"), entry.get("grid")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise _malformed(manifest_path, f"{what} lacks 'outputs' or it is not a list of names")
    if (not isinstance(grid, list) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)):
        raise _malformed(manifest_path, f"{what}'s 'grid' is not two whole numbers of patches (rows, columns)")
    sizes = {key: _field(manifest_path, entry, key, int, what) for key in ("heads", "patch_size")}
    if min(sizes.values()) < 1:
        raise _malformed(manifest_path, f"{what}'s heads or patch_size is below 1")
    return AttentionEntry(
        file=_relative(manifest_path, entry.get("file"), f"{what}.file"),
        input=_field(manifest_path, entry, "input", str, what), outputs=tuple(outputs), grid=(grid[0], grid[1]),
        validation=entry.get("validation") if isinstance(entry.get("validation"), dict) else {}, **sizes,
    )


def _parse_reference(manifest_path: Path, entry: Any, files: dict[str, dict]) -> ReferenceEntry:
    """The ``reference`` entry; its folders must hold what the reference backend opens, in safetensors
    only: the base's config.json and weights, the adapter's config and adapter_model.safetensors."""
    from .adapters import CONFIG_NAME, SAFETENSORS_NAME

    what = "reference"
    if not isinstance(entry, dict):
        raise _malformed(manifest_path, f"{what} is not an object")
    base = _relative(manifest_path, entry.get("base"), f"{what}.base").rstrip("/")
    adapter = entry.get("adapter")
    adapter = None if adapter is None else _relative(manifest_path, adapter, f"{what}.adapter").rstrip("/")
    precision = _field(manifest_path, entry, "precision", str, what)
    needed = [f"{base}/config.json", *([f"{adapter}/{CONFIG_NAME}", f"{adapter}/{SAFETENSORS_NAME}"] if adapter else [])]
    for relative in needed:
        if relative not in files:
            raise ArtifactError(manifest_path.parent / relative, "the shipped reference needs it, and the manifest "
                                "does not list it")
    if not any(name.startswith(f"{base}/") and name.endswith(".safetensors") for name in files):
        raise ArtifactError(manifest_path.parent / base, "the shipped reference's base has no *.safetensors weights")
    for name in files:
        inside = name.startswith((f"{REFERENCE_DIR}/", f"{base}/", *([f"{adapter}/"] if adapter else [])))
        if inside and name.lower().endswith(REFERENCE_REFUSED_SUFFIXES):
            raise ArtifactError(manifest_path.parent / name, "refused: a shipped reference holds safetensors "
                                "weights only (no pickle, no code)")
    return ReferenceEntry(base=base, precision=precision, adapter=adapter)


def _parse_decoder(manifest_path: Path, name: str, entry: Any) -> DecoderEntry:
    what = f"decoder {name!r}"
    if not isinstance(entry, dict):
        raise _malformed(manifest_path, f"{what} is not an object")
    runtime = _field(manifest_path, entry, "runtime", str, what)
    graph = shape = None
    if runtime == "onnxruntime":
        graph = _relative(manifest_path, entry.get("graph"), f"{what}'s graph")
        raw = entry.get("shape")
        if not isinstance(raw, dict):
            raise _malformed(manifest_path, f"{what} lacks its 'shape'")
        dims = {key: _field(manifest_path, raw, key, int, f"{what}'s shape") for key in
                ("layers", "heads", "head_dim", "hidden_size", "vocab_size")}
        if min(dims.values()) < 1:
            raise _malformed(manifest_path, f"{what}'s shape has a dimension below 1")
        shape = DecoderShape(**dims)
    elif runtime != "torch":
        raise _malformed(manifest_path, f"{what} has runtime {runtime!r}, not 'torch' or 'onnxruntime'")

    def optional(key):
        value = entry.get(key)
        return value if isinstance(value, dict) else None

    return DecoderEntry(
        name=name, dir=_relative(manifest_path, entry.get("dir"), f"{what}'s dir"), runtime=runtime,
        precision=_field(manifest_path, entry, "precision", str, what), graph=graph, shape=shape,
        activations=entry.get("activations") if isinstance(entry.get("activations"), str) else None,
        validation=optional("validation") or {}, quantization=optional("quantization"),
        embeddings=optional("embeddings"),
    )


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """Check the artifact folder against the manifest's ``files``.

    Every listed file must be a regular file inside ``root`` (no symlink anywhere on its path, one
    hard link) with its recorded size and sha256, and nothing but the manifest and the listed files
    (and the folders holding them) may be in the folder.
    """
    real_root = root.resolve()
    folders = {PurePosixPath(name).parents[i].as_posix() for name in files
               for i in range(len(PurePosixPath(name).parts) - 1)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise ArtifactError(path, "is a symbolic link; an artifact holds regular files only")
            if stat.S_ISDIR(info.st_mode):
                if relative not in folders:
                    raise ArtifactError(path, "not listed in the manifest: an artifact holds only the files it lists")
            elif relative != MANIFEST and relative not in files:
                raise ArtifactError(path, "not listed in the manifest: an artifact holds only the files it lists")
    for relative, expected in sorted(files.items()):
        path = root / relative
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise ArtifactError(path, "missing from the artifact") from None
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(path, "is not a regular file")
        if info.st_nlink > 1:
            raise ArtifactError(path, "has other hard links; an artifact's files must be its own")
        if not path.resolve().is_relative_to(real_root):
            raise ArtifactError(path, "lies outside the artifact folder")
        if info.st_size != expected["size"]:
            raise ArtifactError(path, f"truncated or altered: {info.st_size} bytes, the manifest says {expected['size']}")
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
