"""LoRA adapters: PEFT directories (safetensors) and the legacy BLIP2IDC layout (``adapter_model.bin``).

The released BLIP2IDC adapters are legacy PEFT checkpoints: ``adapter_config.json`` plus a pickled
``adapter_model.bin``. Pickles can run code when loaded, so they are read with
``torch.load(weights_only=True)`` only, which accepts plain tensors and refuses anything else, and
only with a torch in which that mode has no known bypass (:data:`MIN_TORCH_WEIGHTS_ONLY`);
:func:`convert_legacy_adapter` turns one into the safetensors layout once and for all.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError, first_line
from .hashing import file_sha256
from .loading import read_json

#: BLIP2IDC's LoRA targets, as in its released adapter_config.json files (PEFT matches each entry
#: against a module's full name or a "."-suffix of it): ViT fused qkv, Q-Former cross-attention
#: query of layers 0-11 and every key and value, OPT q/k/v projections.
BLIP2IDC_TARGET_MODULES: tuple[str, ...] = (
    *(f"qformer.encoder.layer.{i}.crossattention.attention.query" for i in range(12)),
    "value", "key", "qkv", "q_proj", "k_proj", "v_proj",
)

#: The oldest torch whose ``torch.load(weights_only=True)`` has no known way to run code: up to
#: 2.5.1 a crafted file could (CVE-2025-32434).
MIN_TORCH_WEIGHTS_ONLY = (2, 6)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's files are, and what they are."""

    path: Path
    layout: str  # "peft" (safetensors) or "legacy" (pickled .bin, read weights-only)
    weights: Path
    config: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    def sha256(self) -> str:
        return file_sha256(self.weights)


def find_adapter(path: str | os.PathLike) -> AdapterSource:
    """Locate an adapter directory and check its config, without loading any weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterError(path, "no such adapter directory")
    if path.is_file():
        raise AdapterError(path, f"is a file; give the adapter folder (the one holding {CONFIG_NAME})")
    config = read_json(path / CONFIG_NAME, AdapterError)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(path / CONFIG_NAME, f"peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    if not config.get("target_modules"):
        raise AdapterError(path / CONFIG_NAME, "no target_modules")
    if (path / SAFETENSORS_NAME).is_file():
        return AdapterSource(path, "peft", path / SAFETENSORS_NAME, config)
    if (path / LEGACY_NAME).is_file():
        return AdapterSource(path, "legacy", path / LEGACY_NAME, config)
    raise AdapterError(path, f"no adapter weights ({SAFETENSORS_NAME} or {LEGACY_NAME})")


def load_adapter_weights(source: AdapterSource) -> dict:
    """The adapter's tensors, read safely (safetensors, or a weights-only unpickle of the legacy file)."""
    import torch

    if source.layout == "peft":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(source.weights))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise AdapterError(source.weights, f"cannot read safetensors file ({exc})") from None
    else:
        _check_torch(source.weights, torch.__version__)
        try:
            tensors = torch.load(source.weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for unsafe content, RuntimeError for corrupt zips
            first = first_line(exc)
            raise AdapterError(
                source.weights, f"refused: not a plain tensor checkpoint, it will not be unpickled ({first})"
            ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterError(source.weights, "expected a mapping of parameter names to tensors")
    if not any(".lora_" in key for key in tensors):
        raise AdapterError(source.weights, "holds no LoRA weights (no lora_A / lora_B tensors)")
    return tensors


def _check_torch(weights: Path, version: str) -> None:
    """Refuse to unpickle ``weights`` with a torch older than :data:`MIN_TORCH_WEIGHTS_ONLY`."""
    import re

    if tuple(int(p) for p in re.findall(r"\d+", str(version))[:2]) < MIN_TORCH_WEIGHTS_ONLY:
        wanted = ".".join(map(str, MIN_TORCH_WEIGHTS_ONLY))
        raise AdapterError(weights, f"not read with torch {version}, whose weights-only loading can be made to run "
                           f"code (CVE-2025-32434); pip install 'torch>={wanted}'")


def convert_legacy_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a legacy BLIP2IDC adapter as a PEFT safetensors adapter directory (config copied)."""
    from safetensors.torch import save_file

    source = find_adapter(src)
    tensors = load_adapter_weights(source)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / SAFETENSORS_NAME))
    shutil.copyfile(source.path / CONFIG_NAME, dst / CONFIG_NAME)
    return dst


def apply_adapter(model, source: AdapterSource, model_name: str, merge: bool = False):
    """Inject ``source`` into ``model`` (a ``Blip2ForConditionalGeneration``) and return the model to run.

    With ``merge`` the LoRA deltas are folded into the base weights (``merge_and_unload``) and a plain
    transformers model comes back; otherwise the model with LoRA layers in place.
    An adapter that does not fit the model (no target module found, shape mismatch, weights for
    modules the model lacks) raises :class:`AdapterError`.
    """
    import warnings

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    tensors = load_adapter_weights(source)
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in source.config.items() if k in known})
    config.inference_mode = True
    misfit = f"does not fit {model_name}"
    try:
        with warnings.catch_warnings():  # "base_model_name_or_path was renamed": expected, the base is ours
            warnings.simplefilter("ignore", UserWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise AdapterError(source.path, f"{misfit} ({first_line(exc)})") from None
    try:
        result = set_peft_model_state_dict(peft_model, tensors)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise AdapterError(source.weights, f"{misfit} ({detail})") from None
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    if unexpected:
        raise AdapterError(source.weights, f"{misfit}: {len(unexpected)} tensors for modules it lacks, e.g. {unexpected[0]}")
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise AdapterError(source.weights, f"{misfit}: no weights for {len(missing)} LoRA layers, e.g. {missing[0]}")
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload()
    return peft_model.get_base_model()


def adapter_summary(source: AdapterSource) -> dict:
    """Provenance of an adapter, as recorded in results and manifests."""
    return {"name": source.name, "layout": source.layout, "r": source.rank,
            "lora_alpha": source.config.get("lora_alpha"), "sha256": source.sha256()}

