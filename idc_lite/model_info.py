"""A report on a model or artifact: what it holds and how it would run on this machine."""

from __future__ import annotations

import os

from .artifact import is_artifact, load_manifest


def describe_model(model: str | os.PathLike | None, device: str = "auto") -> dict:
    """A JSON-ready report; checks the artifact's files (hashes) like loading it would."""
    from .runtime import resolve_device

    if model is None:
        from .default_model import default_model_dir

        model = default_model_dir()
    device = resolve_device(device)
    if is_artifact(model):
        return _artifact_report(model, device)
    return _model_report(model, device)


def _artifact_report(path, device: str) -> dict:
    from .backends.lite import DEFAULT_DECODERS
    from .backends.sessions import session_providers

    manifest = load_manifest(path)
    data = manifest.data
    provenance = data.get("provenance", {})
    adapter = provenance.get("adapter") or {}
    kind = "cuda" if device.startswith("cuda") else "cpu"
    decoder = next((d for d in DEFAULT_DECODERS[kind] if d in manifest.decoders), None)
    encoder = manifest.encoder
    summary = {
        "format": f"{data['format']} v{data['format_version']}",
        "base": _base(provenance),
        "adapter": f"{adapter.get('name')} (r={adapter.get('r')}, sha256 {adapter.get('sha256', '')[:12]})" if adapter else "none",
        "encoder": f"{encoder.file} {encoder.precision}, " + _encoder_check(encoder.validation),
        "decoders": ", ".join(f"{name} ({entry.precision}, {_decoder_check(entry.validation)})"
                              for name, entry in manifest.decoders.items()),
        "tokenizer": _tokenizer(manifest.tokenizer or {}),
        "reference": _reference(manifest.reference),
        "generation": ", ".join(f"{k}={v}" for k, v in data["generation"].items()),
        "composition": f"size policy {data['composition']['size_policy']}",
        "built": f"{data.get('created')} with idc-lite {data.get('built_with', {}).get('idc_lite')}",
    }
    providers = [p[0] if isinstance(p, tuple) else p for p in session_providers(device)]
    return {"name": manifest.name, "kind": "idc-lite artifact", "path": str(manifest.path), "summary": summary,
            "files": data["files"], "manifest": data,
            "plan": {"device": device, "encoder providers": providers, "decoder": decoder}}


def _tokenizer(entry: dict) -> str:
    if entry.get("runtime") == "tokenizers":
        checked = entry.get("checked", {})
        return (f"tokenizer.json through tokenizers, no transformers (same as transformers' on all "
                f"{checked.get('token_ids')} token ids, {checked.get('sequences')} sequences, {checked.get('prompts')} prompts)")
    return "transformers" + (f" ({entry['why']})" if entry.get("why") else " (not checked at export)")


def _reference(entry) -> str:
    if entry is None:
        return "not shipped (built without --ship-reference)"
    adapter = f" + {entry.adapter}/" if entry.adapter else ""
    return f"{entry.base}/ ({entry.precision}){adapter}, run with --backend reference"


def _base(provenance: dict) -> str:
    """The base's id, revision and commit, then any entries a recipe recorded (``recipe demo, seed 0``)."""
    base = provenance.get("base") or {}
    text = str(base["id"]) if base.get("id") else ""
    if text and base.get("revision"):
        text += f"@{base['revision']}"
    if base.get("resolved"):
        text += f" (commit {base['resolved'][:12]})"
    recipe = ", ".join(f"{key} {value}" for key, value in provenance.items() if key not in ("base", "adapter"))
    return ", ".join(part for part in (text.strip(), recipe) if part) or "not recorded"


def _model_report(model, device: str) -> dict:
    from pathlib import Path

    from .loading import check_blip2_dir, resolve_model_dir

    path = resolve_model_dir(model)
    config = check_blip2_dir(path)
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    files = {p.relative_to(path).as_posix(): {"size": p.stat().st_size} for p in sorted(Path(path).rglob("*")) if p.is_file()}
    summary = {
        "vision": f"{vision.get('num_hidden_layers')} layers x {vision.get('hidden_size')}, {vision.get('image_size')} px",
        "query tokens": config.get("num_query_tokens"),
        "decoder": f"OPT {text.get('num_hidden_layers')} layers x {text.get('hidden_size')}, vocabulary {text.get('vocab_size')}",
    }
    dtype = "fp16" if device.startswith("cuda") else "fp32"
    return {"name": str(model), "kind": "BLIP-2 model (reference backend)", "path": str(path), "summary": summary,
            "files": files, "plan": {"device": device, "backend": "reference", "dtype": dtype}}


def _decoder_check(validation: dict) -> str:
    cosine = validation.get("logits_cosine_min")
    return f"logits cosine {cosine:.4f}" if isinstance(cosine, (int, float)) else "not validated"


def _encoder_check(validation: dict) -> str:
    if not validation:
        return "not validated"
    if validation.get("cosine_min") is not None:
        text = f"query-embedding cosine {validation['cosine_min']:.4f} (threshold {validation['threshold']})"
    else:
        text = f"max |onnx - torch| {validation['max_abs_diff']:.2g} (tolerance {validation['tolerance']:.2g})"
    return text + ("" if validation.get("enforced", True) else ", not enforced (random weights)")
