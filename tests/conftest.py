"""Session fixtures: a tiny BLIP-2, its LoRA adapters in both layouts, the artifacts built from them, image pairs.

Everything is built here, offline, in a few seconds and without training: no hub, no download, and
the same weights on every machine (numpy's generator; see :mod:`idc_lite.tools.modelgen`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network during tests

DATA = Path(__file__).parent / "data"
MAX_NEW_TOKENS = 10
#: A test adapter's B @ A, as a share of the standard deviation of the weight it adds to.
ADAPTER_STRENGTH = 0.1


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the benchmark pipeline end to end (deselect with -m 'not slow')")


def random_pairs(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (before, after) uint8 image pairs of assorted sizes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        h, w = rng.integers(24, 64, size=2)
        before = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        after = before.copy()
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        after[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        pairs.append((before, after))
    return pairs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny BLIP-2 OPT model directory, as a hub download would leave it."""
    from idc_lite.tools.modelgen import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-blip2", seed=0)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(model_dir: Path, cache: Path, monkeypatch) -> Path:
    """``model_dir`` as huggingface_hub's cache holds ``acme/tiny-blip2`` at :data:`HUB_COMMIT` (``main``);
    the cache is made the current one. Returns the snapshot folder."""
    import shutil

    repo = cache / "models--acme--tiny-blip2"
    shutil.copytree(model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / HUB_COMMIT


def make_adapter(model_dir: Path, out_dir: Path, layout: str, seed: int = 1, r: int = 4) -> Path:
    """A LoRA adapter for ``model_dir`` with BLIP2IDC's target modules and non-zero random weights (from numpy).

    ``layout="legacy"`` writes BLIP2IDC's released layout (``adapter_model.bin`` pickle of tensors and
    its adapter_config.json); ``"peft"`` writes PEFT's safetensors layout.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import Blip2ForConditionalGeneration

    config = json.loads((DATA / "blip2idc-ier.adapter_config.json").read_text())
    config.update(r=r, lora_alpha=2 * r, base_model_name_or_path=str(model_dir))
    net = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    lora = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    peft_model = get_peft_model(net, lora)
    # Random A and B (PEFT starts B at zero), B @ A a tenth of the weight it adds to: the adapter
    # visibly changes the model, and merged weights stay close enough to int4's grid (see modelgen).
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.from_numpy(rng.standard_normal(tuple(a.shape))))
                target = ADAPTER_STRENGTH * float(module.base_layer.weight.std()) / module.scaling["default"]
                b.copy_(torch.from_numpy(rng.standard_normal(tuple(b.shape)) * target / np.sqrt(r)))
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if layout == "legacy":
        torch.save(state, out_dir / "adapter_model.bin")
    else:
        save_file(state, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def legacy_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "legacy", "legacy")


@pytest.fixture(scope="session")
def peft_adapter(tiny_model, tmp_path_factory) -> Path:
    """The same weights as ``legacy_adapter`` (same seed), in PEFT's safetensors layout."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "peft", "peft")


@pytest.fixture(scope="session")
def pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    return random_pairs(7)


@pytest.fixture(scope="session")
def adapted(tiny_model, legacy_adapter):
    """The reference backend with the adapter, unmerged: BLIP2IDC as it was trained."""
    from idc_lite import Captioner, GenerationSettings

    return Captioner(tiny_model, legacy_adapter, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))


# --- the artifacts: each built once per session, read by every test that needs one ---------------


@pytest.fixture(scope="session")
def artifact(tiny_model, legacy_adapter, tmp_path_factory) -> Path:
    """The tiny model with the legacy adapter merged: torch-fp32 (the reference decoder) beside the ONNX
    Runtime decoders (ort-fp32, ort-int4, ort-int4-fp16), fp32 encoder."""
    from export.build import build_artifact

    return build_artifact(tiny_model, tmp_path_factory.mktemp("artifacts") / "ort", legacy_adapter,
                          decoders=("torch-fp32", "ort-fp32", "ort-int4", "ort-int4-fp16"))


@pytest.fixture(scope="session")
def artifact_int4(tiny_model, legacy_adapter, tmp_path_factory) -> Path:
    """The default build of the tiny model with the legacy adapter: bnb-int4 and ort-int4."""
    from export.build import build_artifact

    return build_artifact(tiny_model, tmp_path_factory.mktemp("artifacts") / "int4", legacy_adapter)


@pytest.fixture(scope="session")
def reference(tiny_model):
    """A reference-backend captioner on the tiny model, shared by read-only tests."""
    from idc_lite import Captioner, GenerationSettings

    return Captioner(tiny_model, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
