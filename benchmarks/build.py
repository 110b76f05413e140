"""Random-weight BLIP-2 models at real shapes, and their artifacts.

The benchmark needs the real architecture (blip2-opt-2.7b: 3.7 B parameters) with no download, so
it builds one with random weights and exports it, once; :mod:`benchmarks.models` caches the result.
Two stages, each in its own process so its peak memory is measured and released:

- ``model``: the model built directly in fp16 and saved as safetensors, with a small BPE tokenizer
  and the image processor (about 7.5 GiB at 2.7B);
- ``artifact``: the product's exporter (:func:`export.build.build_artifact`), which loads one part
  of the model at a time (the encoder part, then the language model for each decoder).

Weights: transformers' own initialisation (the tensors it leaves at zero filled with random values,
:func:`fill_zero_weights`), except the decoder's Linear weights, which are random
values on every int4 grid the exporters use: 0 or +-a (a = initializer_range x sqrt(2)), with one
sign per run of 64 input features and at least one non-zero value per 32. bitsandbytes NF4 (blocks
of 64, absmax) and ONNX Runtime's MatMulNBits (blocks of 16 to 64 along the input, symmetric or
not) hold them exactly. Gaussian random weights have no structure that survives int4, so the
exporters' quantization checks (next-token logits cosine >= 0.99 to fp32) fail on them at random;
speed does not depend on the values, and quality is never measured on these weights. For the same
reason the encoder's check (fp16 or int8 against torch) is recorded in the manifest but not
enforced: Gaussian vision weights with per-tensor int8 activations depart far from fp32 on noise
images (cosine 0.5 on the tiny model) where a trained model does not (0.992 on the demo model).

    python -m benchmarks.build STAGE --model DIR [--out DIR --decoder NAME ...] [--config FILE ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("benchmarks")

#: Decoder Linear weights: one sign per this many input features (bitsandbytes' NF4 block).
SIGN_BLOCK = 64
#: ... and at least one non-zero weight per this many (ONNX Runtime's smallest usual block, 32).
NONZERO_BLOCK = 32


# ------------------------------------------------------------------------------------- model
def build_model(config_path: Path | None, out: Path, seed: int = 0, depth_scale: float = 1.0) -> Path:
    """Build a random-weight BLIP-2 for ``config_path`` (a config.json; None: a tiny config) into ``out``."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from idc_lite.tools.modelgen import DEFAULT_CORPUS, IMAGE_TOKEN, save_model, tiny_config, train_tokenizer

    tokenizer = train_tokenizer(DEFAULT_CORPUS)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config_path is None:
        config = tiny_config(len(tokenizer), image_token)
    else:
        config = model_config(config_path, image_token, depth_scale)
    torch.manual_seed(seed)
    # transformers' initialisation of 3.7 B fp16 parameters takes minutes on a CPU, seconds on a GPU
    # (the values then differ from a CPU build's; speed and memory do not depend on them).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("initialising random fp16 weights on %s", device)
    with torch.device(device):
        net = Blip2ForConditionalGeneration._from_config(config, dtype=torch.float16).eval()
    net = net.to("cpu")
    fill_zero_weights(net, config.initializer_range, torch.Generator().manual_seed(seed + 1))
    std = getattr(config.text_config, "init_std", config.initializer_range)
    logger.info("putting the decoder's weights on every int4 grid")
    grid_decoder_weights(net.language_model, std, torch.Generator().manual_seed(seed))
    logger.info("saving the model to %s", out)
    return save_model(net, tokenizer, out, config.vision_config.image_size)


def fill_zero_weights(net, std: float, generator) -> list[str]:
    """Give random values to the weight matrices and embeddings the model was built with as zeros.

    transformers (5.x) leaves the whole vision model, the query tokens and the vision embeddings at
    zero when BLIP-2 is built from a config in fp16 (seen with 5.17 and 5.24): the encoder's output
    is then exactly zero, whatever the image. Speed does not depend on the values, but a zero encoder
    makes the exporters' checks of the encoder vacuous. Norms and biases keep their values.
    """
    import torch

    filled = []
    with torch.no_grad():
        for name, param in net.named_parameters():
            if (param.dim() >= 2 or name.endswith("_embedding")) and not param.any():
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(values.to(param.dtype))
                filled.append(name)
    return filled


def model_config(config_path: Path, image_token_id: int, depth_scale: float = 1.0):
    """The config at ``config_path`` with our tokenizer's image token and, optionally, fewer layers.

    The vocabulary size stays the config's (the real embedding and LM head shapes); the small
    tokenizer's ids are all below it. ``depth_scale`` < 1 keeps every width and scales the number
    of layers of the vision model, the Q-Former and the decoder (at least one each).
    """
    from idc_lite.tools.memory import load_config

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


# -------------------------------------------------------------------------------- artifact
def build_random_artifact(model_dir: Path, out: Path, decoders: list[str], name: str,
                          encoder_precision: str = "fp32", ort_block_size: int | None = None,
                          ort_symmetric: bool = False, ort_head: str | None = None) -> Path:
    """Export ``model_dir`` into an artifact with the product's exporter (which loads one part at a time)."""
    from export.build import build_artifact

    # The encoder's check is recorded, not enforced: random vision weights are not what int8 or fp16
    # is checked for (see the module doc); the decoders' checks hold on the grid weights.
    return build_artifact(model_dir, out, decoders=decoders, name=name, force=True,
                          encoder_precision=encoder_precision, enforce_encoder_check=False,
                          ort_block_size=ort_block_size, ort_symmetric=ort_symmetric or None, ort_head=ort_head)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build", description="One stage of a random-model build.")
    parser.add_argument("stage", choices=("model", "artifact"))
    parser.add_argument("--model", type=Path, required=True, help="The model directory (written by 'model').")
    parser.add_argument("--out", type=Path, help="The artifact to write (artifact).")
    parser.add_argument("--decoder", action="append", help="A decoder to build (artifact; repeatable).")
    parser.add_argument("--name", help="The artifact's name (artifact).")
    parser.add_argument("--encoder-precision", default="fp32", help="The ONNX encoder's precision (artifact).")
    parser.add_argument("--config", type=Path, help="The BLIP-2 config.json (model); none: a tiny model.")
    parser.add_argument("--ort-block-size", type=int, help="int4 ONNX Runtime decoders' block size (artifact).")
    parser.add_argument("--ort-symmetric", action="store_true", help="Symmetric int4 blocks (artifact).")
    parser.add_argument("--ort-head", choices=("int8", "fp16"), help="ort-int4's LM head precision (artifact).")
    parser.add_argument("--depth-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The stage's progress (the export's and this module's loggers) goes to the stage's log, and from
    # there to the runner's console; set up before ONNX Runtime's quantizer calls basicConfig itself.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("export", "idc_lite", "benchmarks"):  # not the exporters' own INFO chatter
        logging.getLogger(name).setLevel(logging.INFO)

    from idc_lite.runtime import quiet_libraries

    quiet_libraries()
    if args.stage == "model":
        build_model(args.config, args.model, args.seed, args.depth_scale)
    else:
        build_random_artifact(args.model, args.out, args.decoder, args.name, args.encoder_precision,
                              args.ort_block_size, args.ort_symmetric, args.ort_head)


if __name__ == "__main__":
    main()
