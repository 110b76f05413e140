"""Loading one part of a BLIP-2 model from its safetensors, so a build never holds the whole model.

At blip2-opt-2.7b shapes the full model is 14 GiB in fp32; the encoder part (ViT, Q-Former, query
tokens, projection) is 4 GiB and the language model 10 GiB. Building the part on the meta device
and reading only its tensors, one at a time, keeps each export stage to its own part.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ExportError

LANGUAGE_MODEL = "language_model."


def _load_tensors(model_dir: Path, module, prefix: str = "", skip: str | None = None) -> None:
    """Read ``model_dir``'s tensors under ``prefix`` (minus ``skip``) into ``module``, in fp32."""
    import torch
    from safetensors import safe_open

    state = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(prefix) and not (skip and key.startswith(skip)):
                    state[key[len(prefix):]] = weights.get_tensor(key).to(torch.float32)
    module.load_state_dict(state, strict=False, assign=True)


def _check_loaded(module, what: str, model_dir: Path) -> None:
    missing = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing:
        raise ExportError(model_dir, f"no weights for the {what}'s {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}")


def load_encoder_part(model_dir: Path):
    """A ``Blip2ForConditionalGeneration`` whose encoder part is loaded (fp32) and whose language model is not."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config.from_pretrained(model_dir)
    with torch.device("meta"):
        net = Blip2ForConditionalGeneration(config)
    _load_tensors(model_dir, net, skip=LANGUAGE_MODEL)
    for name in ("vision_model", "qformer", "language_projection"):
        _check_loaded(getattr(net, name), "encoder", model_dir)
    if net.query_tokens.is_meta:
        raise ExportError(model_dir, "no weights for the query tokens")
    return net.eval()


def load_language_model(model_dir: Path):
    """The OPT language model alone, loaded in fp32."""
    import torch
    from transformers import Blip2Config, OPTForCausalLM

    config = Blip2Config.from_pretrained(model_dir)
    with torch.device("meta"):
        language_model = OPTForCausalLM(config.text_config)
    _load_tensors(model_dir, language_model, prefix=LANGUAGE_MODEL)
    language_model.tie_weights()
    _check_loaded(language_model, "language model", model_dir)
    return language_model.eval()
