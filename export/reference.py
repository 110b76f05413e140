"""``--ship-reference``: the artifact carries the base and the adapter its reference backend runs.

An artifact holds the merged model as graphs; the reference it is measured against (transformers'
BLIP-2 with the LoRA adapter, unmerged) needs the base and the adapter themselves, which a fresh
clone or another machine does not have. With ``ship_reference`` the export writes them into the
artifact (:data:`~idc_lite.artifact.REFERENCE_BASE_DIR`, :data:`~idc_lite.artifact.REFERENCE_ADAPTER_DIR`),
hashed in the manifest like every other file, in safetensors only:

- the base's weights cast to fp16 (half of fp32's size; finite values that fp16 cannot hold are an
  error, not an ``inf``), tensor names and shards as they are, with ``config.json`` and
  ``generation_config.json``, the processor settings, and the tokenizer as transformers saves it
  (no remote-code files are ever copied);
- the adapter's ``adapter_config.json`` and ``adapter_model.safetensors``: a legacy BLIP2IDC adapter
  (pickled ``adapter_model.bin``) is converted, read weights-only as the merge reads it. The config's
  ``base_model_name_or_path`` is cleared: its base is the shipped one, and a path of the build
  machine means nothing elsewhere (the manifest's provenance says where the adapter came from).

The reference then runs the fp16-rounded base (upcast to the backend's dtype when loaded), not the
exact fp32 weights the graphs were exported from. Opt-in: a real 2.7B base is 7.7 GB in fp16.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from idc_lite.adapters import CONFIG_NAME, SAFETENSORS_NAME, AdapterSource, convert_legacy_adapter
from idc_lite.artifact import REFERENCE_ADAPTER_DIR, REFERENCE_BASE_DIR
from idc_lite.errors import first_line

from .errors import ExportError

logger = logging.getLogger("export")

#: Files of a base model copied as they are (the weights are cast, the tokenizer saved by transformers).
BASE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")
#: The storage precision of a shipped base.
REFERENCE_PRECISION = "fp16"


def write_reference(model_dir: Path, adapter: AdapterSource | None, tokenizer, work: Path) -> dict:
    """Write the base of ``model_dir`` (fp16) and ``adapter`` into ``work``; return the manifest's ``reference``."""
    base = work / REFERENCE_BASE_DIR
    base.mkdir(parents=True)
    logger.info("shipping the reference: the base in %s, the adapter unmerged", REFERENCE_PRECISION)
    weights = sorted(model_dir.glob("*.safetensors"))
    for path in weights:
        _cast_to_fp16(path, base / path.name)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = sum((base / p.name).stat().st_size for p in weights)
        (base / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for name in BASE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, base / name)
    tokenizer.save_pretrained(base)
    entry: dict = {"base": REFERENCE_BASE_DIR, "precision": REFERENCE_PRECISION, "adapter": None}
    if adapter is not None:
        target = work / REFERENCE_ADAPTER_DIR
        if adapter.layout == "peft":
            target.mkdir(parents=True)
            shutil.copyfile(adapter.weights, target / SAFETENSORS_NAME)
        else:
            convert_legacy_adapter(adapter.path, target)
        config = {**adapter.config, "base_model_name_or_path": None}
        (target / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        entry["adapter"] = REFERENCE_ADAPTER_DIR
    return entry


def _cast_to_fp16(src: Path, dst: Path) -> None:
    """``src``'s tensors with every floating one in fp16 (names and metadata kept), one file at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    try:
        with safe_open(str(src), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and tensor.dtype != torch.float16:
                    half = tensor.to(torch.float16)
                    if not torch.equal(torch.isfinite(half), torch.isfinite(tensor)):
                        raise ExportError(src, f"tensor {key!r} has values fp16 cannot hold (beyond 65504); "
                                          "the reference cannot be shipped in fp16")
                    tensor = half
                tensors[key] = tensor.contiguous()
    except ExportError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise ExportError(src, f"cannot read the weights ({first_line(exc)})") from None
    save_file(tensors, str(dst), metadata=metadata)
