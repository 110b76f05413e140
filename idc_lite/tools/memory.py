"""Memory a BLIP-2 model needs, counted from the real parameter shapes of its config (seed Table 4).

The seed paper's Table 4 gives BLIP2IDC's weight memory at four precisions and its LoRA training
memory at three ranks without saying how they were counted. This module computes the same
quantities for any BLIP-2 config from a model built on the meta device (real shapes, no memory),
so the figures can be checked, extended to other configs, and compared with the seed's.

Conventions (the first one found by reproducing the seed's weight figures to the digit):

- Units: the seed's "GB" are GiB (2**30 bytes), and its parameter count is every named parameter
  tensor, the OPT ``lm_head`` that shares storage with the token embedding counted a second time.
  For blip2-opt-2.7b that is 3,873,540,096 parameters x 4 bytes = 14.43 GiB; the 3,744,761,856
  unique parameters give 13.95 GiB (14.98 GB).
- Naive: every parameter at the precision's width (4, 2, 1 or 0.5 bytes), which is what the seed
  reports.
- As quantized: what bitsandbytes stores. Every ``nn.Linear`` weight that is not tied to another
  tensor is int8 with one fp32 scale per output row (LLM.int8's ``SCB``), or NF4, two weights a byte,
  with one fp32 absmax per block of 64 (no double quantization). Everything else (embeddings,
  norms, biases, the patch convolution, the query tokens) stays fp16. Tied tensors are held once.
- LoRA training: frozen weights in fp16, held once; LoRA parameters in fp32 (PEFT upcasts adapters
  under fp16 mixed precision) with fp32 gradients and Adam's two fp32 moments, 16 bytes each.
  Activations, the CUDA context and allocator slack are not modelled: they are the residual
  between the seed's figure and ours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import BLIP2IDC_TARGET_MODULES
from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn
    from transformers import Blip2Config

#: BLIP-2 configs shipped with idc-lite, by file stem (``blip2-opt-2.7b``).
CONFIG_DIR = Path(__file__).parent / "configs"
#: The config.json of the hub model Salesforce/blip2-opt-2.7b, the base of every BLIP2IDC adapter.
DEFAULT_CONFIG = CONFIG_DIR / "blip2-opt-2.7b.json"


LORA_RANKS = (8, 16, 32)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
UNQUANTIZED_BYTES = 2  # fp16: what a quantized model keeps out of its Linear weights
SCALE_BYTES = 4  # fp32 row scale (int8) or block absmax (NF4)
NF4_BLOCKSIZE = 64
LORA_TRAINING_BYTES = 16  # per LoRA parameter: fp32 value, gradient, Adam exp_avg and exp_avg_sq
GIB = 2**30

#: Seed Table 4 for blip2-opt-2.7b, in GiB (the paper writes GB).
SEED_WEIGHTS_GIB = {"fp32": 14.43, "fp16": 7.21, "int8": 3.61, "int4": 1.8}
SEED_TRAINING_GIB = {8: 8.65, 16: 8.75, 32: 8.95}

NOTES = (
    "GiB = 2^30 bytes: the unit that reproduces the seed's 'GB'.",
    "Naive, seed's count: every parameter tensor at the precision's width, the lm_head tied to the "
    "token embedding counted twice (this reproduces the seed). Naive, unique: tied storage once.",
    "As quantized: Linear weights int8 + fp32 row scale, or NF4 + fp32 absmax per 64 weights "
    "(bitsandbytes); everything else fp16.",
    "Training: frozen fp16 weights (unique) + LoRA in fp32 with gradient and two Adam moments "
    "(16 B/param). Activations and CUDA overheads are not modelled: they are in 'Seed - ours'.",
)

_COMPONENTS = {
    "vision_model": "vision", "qformer": "qformer", "query_tokens": "qformer",
    "language_projection": "projection", "language_model": "language_model",
}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per BLIP-2 component; ``tied`` counts those a second name shares (OPT's lm_head)."""

    vision: int
    qformer: int  # the Q-Former and its query tokens
    projection: int
    language_model: int
    tied: int

    @property
    def unique(self) -> int:
        """Parameters held in memory: tied storage once."""
        return self.vision + self.qformer + self.projection + self.language_model

    @property
    def all_tensors(self) -> int:
        """Parameters of every named tensor, tied ones counted again (the seed's count)."""
        return self.unique + self.tied


@dataclass(frozen=True)
class LoraTarget:
    """One Linear module LoRA adapts: its name and shape."""

    name: str
    in_features: int
    out_features: int

    def params(self, r: int) -> int:
        """LoRA parameters for rank ``r``: A is r x in, B is out x r (no bias)."""
        return r * (self.in_features + self.out_features)


def config_path(name: str | Path) -> Path:
    """A config.json path, the folder holding one, or a shipped config's name (``blip2-opt-2.7b``)."""
    path = Path(name)
    if path.exists():
        return path / "config.json" if path.is_dir() else path
    shipped = CONFIG_DIR / f"{path.name}.json"
    if path.name == str(name) and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise ModelError(path, f"no such file, nor a shipped config name (shipped: {known}); "
                     "give a BLIP-2 config.json or the folder holding one")


def load_config(config: Blip2Config | str | Path) -> Blip2Config:
    """A ``Blip2Config`` from itself, a config.json file, the folder holding one or a shipped config's name."""
    from transformers import Blip2Config

    if isinstance(config, Blip2Config):
        return config
    file = config_path(config)
    if not file.is_file():
        raise ModelError(file, "no such file: give a BLIP-2 config.json or the folder holding it")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(file, f"cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("model_type") != "blip-2":
        found = data.get("model_type") if isinstance(data, dict) else None
        raise ModelError(file, f"model_type is {found!r}, not 'blip-2': give the config.json of a BLIP-2 model")
    return Blip2Config.from_dict(data)


def meta_model(config: Blip2Config) -> nn.Module:
    """``Blip2ForConditionalGeneration`` with every tensor on the meta device: shapes, no memory."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        return Blip2ForConditionalGeneration(config)


def count_parameters(model: nn.Module) -> ParamCounts:
    """Parameters of ``model`` per component, and how many are tied to another tensor."""
    counts = dict.fromkeys(("vision", "qformer", "projection", "language_model"), 0)
    for name, param in model.named_parameters():
        head = name.split(".", 1)[0]
        if head not in _COMPONENTS:
            raise ValueError(f"parameter {name!r} is in no BLIP-2 component ({', '.join(_COMPONENTS)})")
        counts[_COMPONENTS[head]] += param.numel()
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    return ParamCounts(**counts, tied=every - sum(counts.values()))


def naive_weight_bytes(n_params: int, precision: str) -> int:
    """Bytes of ``n_params`` parameters all at ``precision``'s width."""
    return math.ceil(n_params * BYTES_PER_PARAM[precision])


def quantized_linear_bytes(in_features: int, out_features: int, precision: str) -> int:
    """Bytes bitsandbytes stores for one quantized Linear weight (``int8`` or ``int4``), bias excluded."""
    n = in_features * out_features
    if precision == "int8":
        return n + out_features * SCALE_BYTES
    if precision == "int4":
        return math.ceil(n / 2) + math.ceil(n / NF4_BLOCKSIZE) * SCALE_BYTES
    raise ValueError(f"{precision!r} is not a quantized precision (int8 or int4)")


def as_quantized_weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of ``model``'s weights stored at ``precision`` as a real runtime holds them (module doc)."""
    from torch import nn

    params = list(model.parameters())
    if precision not in ("int8", "int4"):
        return naive_weight_bytes(sum(p.numel() for p in params), precision)
    names_per_tensor: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        names_per_tensor[id(param)] = names_per_tensor.get(id(param), 0) + 1
    quantized = {
        id(module.weight): module for module in model.modules()
        if isinstance(module, nn.Linear) and names_per_tensor[id(module.weight)] == 1
    }
    total = 0
    for param in params:
        linear = quantized.get(id(param))
        total += (quantized_linear_bytes(linear.in_features, linear.out_features, precision) if linear
                  else param.numel() * UNQUANTIZED_BYTES)
    return total


def matches_target(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of ``target_modules``: the module's full name or a "."-suffix of it."""
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def lora_targets(model: nn.Module, targets: Sequence[str] = BLIP2IDC_TARGET_MODULES) -> list[LoraTarget]:
    """The modules of ``model`` that LoRA with ``targets`` adapts, as PEFT would pick them."""
    from torch import nn

    found = []
    for name, module in model.named_modules():
        if not matches_target(name, targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} matches a LoRA target but is a {type(module).__name__}, not a Linear")
        found.append(LoraTarget(name, module.in_features, module.out_features))
    if not found:
        raise ValueError(f"no module of the model matches the LoRA targets {list(targets)}")
    return found


def lora_parameter_count(targets: Sequence[LoraTarget], r: int) -> int:
    """LoRA parameters of rank ``r`` over ``targets``."""
    return sum(target.params(r) for target in targets)


def is_seed_architecture(config: Blip2Config) -> bool:
    """Whether ``config`` has blip2-opt-2.7b's shapes, the model of seed Table 4 (vocabulary aside)."""
    return _shape_signature(config) == _shape_signature(load_config(DEFAULT_CONFIG))


def _shape_signature(config: Blip2Config) -> tuple:
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    return (
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.patch_size, vision.image_size,
        qformer.hidden_size, qformer.intermediate_size, qformer.num_hidden_layers, qformer.cross_attention_frequency,
        text.model_type, text.hidden_size, getattr(text, "ffn_dim", None), text.num_hidden_layers,
        config.num_query_tokens,
    )


def memory_table(config: Blip2Config | str | Path = DEFAULT_CONFIG, ranks: Sequence[int] = LORA_RANKS) -> dict[str, Any]:
    """Weight memory per precision and LoRA training memory per rank for a BLIP-2 config, in bytes.

    Rows carry the seed's figure (GiB) and ours/seed when the config has blip2-opt-2.7b's shapes.
    The result is plain JSON data.
    """
    cfg = load_config(config)
    model = meta_model(cfg)
    counts = count_parameters(model)
    seed = is_seed_architecture(cfg)

    def versus_seed(ours_bytes: int, seed_gib: float | None) -> dict[str, float | None]:
        if seed_gib is None:
            return {"seed_gib": None, "ours_over_seed": None, "seed_minus_ours_gib": None}
        return {"seed_gib": seed_gib, "ours_over_seed": ours_bytes / GIB / seed_gib,
                "seed_minus_ours_gib": seed_gib - ours_bytes / GIB}

    weights = []
    for precision in PRECISIONS:
        naive = naive_weight_bytes(counts.all_tensors, precision)
        weights.append({
            "precision": precision,
            "naive_bytes": naive,
            "naive_unique_bytes": naive_weight_bytes(counts.unique, precision),
            "as_quantized_bytes": as_quantized_weight_bytes(model, precision),
            **versus_seed(naive, SEED_WEIGHTS_GIB[precision] if seed else None),
        })

    targets = lora_targets(model)
    frozen = naive_weight_bytes(counts.unique, "fp16")
    training = []
    for r in ranks:
        lora = lora_parameter_count(targets, r)
        state = lora * LORA_TRAINING_BYTES
        training.append({
            "r": r,
            "lora_modules": len(targets),
            "lora_params": lora,
            "adapter_fp32_bytes": naive_weight_bytes(lora, "fp32"),
            "frozen_fp16_bytes": frozen,
            "lora_state_bytes": state,
            "total_bytes": frozen + state,
            **versus_seed(frozen + state, SEED_TRAINING_GIB.get(r) if seed else None),
        })

    return {
        "model": _model_name(config, cfg),
        "params": {
            "vision": counts.vision, "qformer": counts.qformer, "projection": counts.projection,
            "language_model": counts.language_model, "unique": counts.unique, "all_tensors": counts.all_tensors,
        },
        "weights": weights,
        "training": training,
        "notes": list(NOTES),
    }


def format_memory_table(table: dict[str, Any]) -> str:
    """``memory_table``'s result as markdown: parameters, weights per precision, training per LoRA rank."""
    params = table["params"]
    lines = [
        f"## Memory of {table['model']} (GiB)", "",
        "| Component | Parameters |", "|---|--:|",
        f"| Vision encoder | {params['vision']:,} |",
        f"| Q-Former + query tokens | {params['qformer']:,} |",
        f"| Language projection | {params['projection']:,} |",
        f"| Language model | {params['language_model']:,} |",
        f"| Total, unique tensors | {params['unique']:,} |",
        f"| Total, tied tensors counted again | {params['all_tensors']:,} |",
        "",
        "| Weights | Naive, seed's count | Naive, unique | As quantized | Seed | Ours/seed |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in table["weights"]:
        lines.append(
            f"| {row['precision']} | {_gib(row['naive_bytes'])} | {_gib(row['naive_unique_bytes'])} "
            f"| {_gib(row['as_quantized_bytes'])} | {_seed(row)} |"
        )
    lines += [
        "",
        "| LoRA r | Modules | LoRA params | Adapter fp32 (MiB) | Frozen fp16 | LoRA + grad + Adam | Total "
        "| Seed | Ours/seed | Seed - ours |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in table["training"]:
        residual = "-" if row["seed_minus_ours_gib"] is None else f"{row['seed_minus_ours_gib']:.3f}"
        lines.append(
            f"| {row['r']} | {row['lora_modules']} | {row['lora_params']:,} | {row['adapter_fp32_bytes'] / 2**20:.1f} "
            f"| {_gib(row['frozen_fp16_bytes'])} | {_gib(row['lora_state_bytes'])} | {_gib(row['total_bytes'])} "
            f"| {_seed(row)} | {residual} |"
        )
    lines += ["", *(f"- {note}" for note in table["notes"])]
    return "\n".join(lines)


def _model_name(config: Blip2Config | str | Path, cfg: Blip2Config) -> str:
    """What the table is about: the config file's stem, its folder's name, or the config's name."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            return path.name
        return path.name.removesuffix(".json") if path.exists() else str(config)
    return cfg.name_or_path or "BLIP-2"


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.3f}"


def _seed(row: dict[str, Any]) -> str:
    """The 'Seed | Ours/seed' cells of a row."""
    if row["seed_gib"] is None:
        return "- | -"
    return f"{row['seed_gib']:.2f} | {row['ours_over_seed']:.3f}"
