"""Random-weight BLIP-2 models at real shapes, and their artifacts, built in bounded memory.

The benchmark needs the real architecture (blip2-opt-2.7b: 3.7 B parameters) with no download, so
it builds one with random weights and exports it, once; :mod:`benchmarks.models` caches the result.
``export.build.build_artifact`` cannot do this on a 24 GiB machine: it holds the whole model in
fp32 (14 GiB) while it exports and validates the encoder under ONNX Runtime (4 to 8 GiB more) and
each decoder. So the build runs in stages, each in its own process, each holding only what it needs
(peak estimates at 2.7B shapes):

- ``model``: the model built directly in fp16 and saved as safetensors, with a small BPE tokenizer
  and the image processor (about 7.5 GiB);
- ``encoder``: only the vision model, Q-Former, query tokens and projection, in fp32, exported and
  validated by :func:`export.encoder.export_encoder`; also the tokenizer and processor files and the
  query embeddings the decoder checks use (4 GiB of weights, 9 to 16 GiB in all);
- ``decoder``: only the OPT language model, in fp32, exported by the exporter of one decoder
  (``bnb-int4``: about 14 GiB; one process per decoder);
- then :func:`write_artifact_manifest` (in the calling process, no model loaded).

Weights: transformers' own initialisation, except the decoder's Linear weights, which are random
values on every int4 grid the exporters use: 0 or +-a (a = initializer_range x sqrt(2)), with one
sign per run of 64 input features and at least one non-zero value per 32. bitsandbytes NF4 (blocks
of 64, absmax) and ONNX Runtime's MatMulNBits (blocks of 16 to 64 along the input, symmetric or
not) hold them exactly. Gaussian random weights have no structure that survives int4, so the
exporters' quantization checks (next-token logits cosine >= 0.99 to fp32) fail on them at random;
speed does not depend on the values, and quality is never measured on these weights.

    python -m benchmarks.build STAGE --model DIR [--work DIR] [--decoder NAME] [--config FILE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

#: Decoder Linear weights: one sign per this many input features (bitsandbytes' NF4 block).
SIGN_BLOCK = 64
#: ... and at least one non-zero weight per this many (ONNX Runtime's smallest usual block, 32).
NONZERO_BLOCK = 32
#: Files of the work directory that are build intermediates, not artifact contents.
QUERY_FILE, ENCODER_ENTRY = "_query.npy", "_encoder.json"
DECODER_ENTRY = "_decoder-{name}.json"
#: Files a BLIP-2 model directory needs besides config and weights, copied into the artifact.
EXTRA_FILES = ("preprocessor_config.json",)


# ------------------------------------------------------------------------------------- model
def build_model(config_path: Path | None, out: Path, seed: int = 0, depth_scale: float = 1.0) -> Path:
    """Build a random-weight BLIP-2 for ``config_path`` (a config.json; None: a tiny config) into ``out``."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from idc_lite.modelgen import DEFAULT_CORPUS, IMAGE_TOKEN, save_model, tiny_config, train_tokenizer

    tokenizer = train_tokenizer(DEFAULT_CORPUS)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config_path is None:
        config = tiny_config(len(tokenizer), image_token)
    else:
        config = model_config(config_path, image_token, depth_scale)
    torch.manual_seed(seed)
    net = Blip2ForConditionalGeneration._from_config(config, dtype=torch.float16).eval()
    std = getattr(config.text_config, "init_std", config.initializer_range)
    grid_decoder_weights(net.language_model, std, torch.Generator().manual_seed(seed))
    return save_model(net, tokenizer, out, config.vision_config.image_size)


def model_config(config_path: Path, image_token_id: int, depth_scale: float = 1.0):
    """The config at ``config_path`` with our tokenizer's image token and, optionally, fewer layers.

    The vocabulary size stays the config's (the real embedding and LM head shapes); the small
    tokenizer's ids are all below it. ``depth_scale`` < 1 keeps every width and scales the number
    of layers of the vision model, the Q-Former and the decoder (at least one each).
    """
    from idc_lite.memory import load_config

    config = load_config(config_path)
    if image_token_id >= config.text_config.vocab_size:
        raise ValueError(f"image token id {image_token_id} is outside the vocabulary ({config.text_config.vocab_size})")
    config.image_token_index = image_token_id
    if not 0 < depth_scale <= 1:
        raise ValueError(f"depth scale must be in (0, 1], not {depth_scale}")
    for part in (config.vision_config, config.qformer_config, config.text_config):
        part.num_hidden_layers = max(1, math.ceil(part.num_hidden_layers * depth_scale))
    return config


def grid_decoder_weights(language_model, std: float, generator) -> None:
    """Overwrite the decoder's Linear weights (LM head aside) with values on every int4 grid (module doc)."""
    import torch

    scale = std * math.sqrt(2)  # half the weights are +-scale: standard deviation ``std``
    with torch.no_grad():
        for name, module in language_model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module.weight is language_model.get_output_embeddings().weight:
                continue
            out_features, in_features = module.weight.shape
            if in_features % SIGN_BLOCK:
                raise ValueError(f"{name}: {in_features} input features, not a multiple of {SIGN_BLOCK}")
            blocks = in_features // SIGN_BLOCK
            signs = torch.randint(0, 2, (out_features, blocks, 1), generator=generator, dtype=torch.int8) * 2 - 1
            keep = torch.randint(0, 2, (out_features, in_features // NONZERO_BLOCK, NONZERO_BLOCK), generator=generator,
                                 dtype=torch.int8)
            keep[..., 0] = 1
            values = signs * keep.reshape(out_features, blocks, SIGN_BLOCK)
            module.weight.copy_(values.reshape(out_features, in_features).to(module.weight.dtype) * scale)


# ----------------------------------------------------------------------------------- loading
def load_part(model_dir: Path, module, prefix: str, skip: str | None = None) -> None:
    """Load ``model_dir``'s weights under ``prefix`` into ``module`` (built on the meta device), in fp32.

    Only these tensors are read (safetensors, one at a time), so only this part of the model is
    ever in memory. ``skip`` leaves out keys that start with it (after the prefix).
    """
    import torch
    from safetensors import safe_open

    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(prefix) and not (skip and key[len(prefix):].startswith(skip)):
                    state[key[len(prefix):]] = weights.get_tensor(key).to(torch.float32)
    module.load_state_dict(state, strict=False, assign=True)


def check_materialized(module, what: str) -> None:
    """Raise when a tensor of ``module`` is still on the meta device (a weight missing from the files)."""
    missing = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"{what}: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


# ----------------------------------------------------------------------------------- encoder
def build_encoder(model_dir: Path, work: Path) -> None:
    """Export and validate the encoder; write the query embeddings, tokenizer and processor files."""
    import numpy as np
    import torch

    from export.encoder import QueryEncoder, export_encoder, sample_inputs
    from idc_lite.backends.reference import load_tokenizer
    from idc_lite.memory import load_config, meta_model

    net = meta_model(load_config(model_dir))
    load_part(model_dir, net, "", skip="language_model.")
    encoder = QueryEncoder(net)
    check_materialized(encoder, "encoder")
    image_size = net.config.vision_config.image_size
    work.mkdir(parents=True, exist_ok=True)
    report = export_encoder(net, work, "fp32", image_size)
    with torch.inference_mode():
        query = encoder.eval()(torch.from_numpy(sample_inputs(image_size, seed=2)[1]))
    np.save(work / QUERY_FILE, query.numpy())
    (work / ENCODER_ENTRY).write_text(json.dumps(report.as_dict()), encoding="utf-8")
    load_tokenizer(model_dir).save_pretrained(work)
    for name in EXTRA_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, work / name)


# ----------------------------------------------------------------------------------- decoder
def build_decoder(model_dir: Path, work: Path, name: str) -> None:
    """Export and validate decoder ``name`` (``bnb-int4``, ``ort-int4``, ...) from the language model alone."""
    import numpy as np
    import torch
    from transformers import OPTForCausalLM

    from idc_lite.backends.ort_decoder import ORT_DECODERS
    from idc_lite.backends.torch_decoder import TORCH_DECODERS
    from idc_lite.decoding import token_settings
    from idc_lite.loading import read_json
    from idc_lite.memory import load_config

    config = read_json(model_dir / "config.json")
    with torch.device("meta"):
        language_model = OPTForCausalLM(load_config(model_dir).text_config)
    load_part(model_dir, language_model, "language_model.")
    language_model.tie_weights()
    check_materialized(language_model, "decoder")
    query = torch.from_numpy(np.load(work / QUERY_FILE))
    prefix = [token_settings(config).bos_token_id]  # export.build's prefix: no prompt
    if name in TORCH_DECODERS:
        from export.decoder import export_decoder

        got, entry = export_decoder(language_model.eval(), work, TORCH_DECODERS[name], query, prefix)
    elif name in ORT_DECODERS:
        from export.ort_decoder import export_ort_decoder

        got, entry = export_ort_decoder(language_model.eval(), work, ORT_DECODERS[name], query, prefix)
    else:
        raise ValueError(f"unknown decoder {name!r}; known: {', '.join([*TORCH_DECODERS, *ORT_DECODERS])}")
    (work / DECODER_ENTRY.format(name=got)).write_text(json.dumps(entry), encoding="utf-8")


# ---------------------------------------------------------------------------------- manifest
def write_artifact_manifest(model_dir: Path, work: Path, out: Path, name: str, versions: dict) -> Path:
    """Write the manifest of the stages' outputs in ``work`` and move it to ``out``, as ``build_artifact`` does.

    The manifest has ``export.build``'s layout; the provenance names the random-weight model dir.
    """
    from idc_lite.artifact import write_manifest
    from idc_lite.decoding import token_settings
    from idc_lite.loading import read_json
    from idc_lite.settings import CompositionSettings, GenerationSettings, ProcessorSettings, to_dict

    encoder = json.loads((work / ENCODER_ENTRY).read_text(encoding="utf-8"))
    decoders = {}
    for path in sorted(work.glob(DECODER_ENTRY.format(name="*"))):
        decoders[path.stem.removeprefix("_decoder-")] = json.loads(path.read_text(encoding="utf-8"))
    if not decoders:
        raise ValueError(f"{work}: no decoder was built")
    for path in (work / QUERY_FILE, work / ENCODER_ENTRY, *work.glob(DECODER_ENTRY.format(name="*"))):
        path.unlink()
    write_manifest(work, {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "built_with": versions,
        "provenance": {"base": {"id": str(model_dir), "revision": None, "resolved": None}, "adapter": None},
        "composition": to_dict(CompositionSettings()),
        "generation": to_dict(GenerationSettings()),
        "processor": to_dict(ProcessorSettings.from_model_dir(model_dir)),
        "tokens": to_dict(token_settings(read_json(model_dir / "config.json"))),
        "encoder": encoder,
        "decoders": decoders,
    })
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build", description="One stage of a random-model build.")
    parser.add_argument("stage", choices=("model", "encoder", "decoder"))
    parser.add_argument("--model", type=Path, required=True, help="The model directory (written by 'model').")
    parser.add_argument("--work", type=Path, help="The artifact being assembled (encoder, decoder).")
    parser.add_argument("--decoder", help="The decoder to build (decoder).")
    parser.add_argument("--config", type=Path, help="The BLIP-2 config.json (model); none: a tiny model.")
    parser.add_argument("--depth-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from idc_lite.runtime import quiet_libraries

    quiet_libraries()
    if args.stage == "model":
        build_model(args.config, args.model, args.seed, args.depth_scale)
    elif args.stage == "encoder":
        build_encoder(args.model, args.work)
    else:
        build_decoder(args.model, args.work, args.decoder)


if __name__ == "__main__":
    main()
