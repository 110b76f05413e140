"""Build BLIP-2 models with random weights and a locally trained tokenizer, fully offline.

Used by the tests (tiny models built in seconds), by the benchmarks (the real BLIP-2 OPT-2.7B shapes
with random weights) and as the starting point of the demo model's training. The saved directory has
exactly the layout of a hub BLIP-2 model: ``config.json``, safetensors weights, tokenizer files,
``preprocessor_config.json`` and ``generation_config.json``.

    python -m idc_lite.tools.modelgen OUT_DIR            # a tiny BLIP-2 (captions are gibberish)
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: OPT's special tokens and ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; "<image>" is added last.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"
BOS_ID, PAD_ID, EOS_ID = 2, 1, 2

DEFAULT_CORPUS = [
    "a red circle was added", "the blue square is gone", "the background changed from beige to light blue",
    "nothing changed", "the image became darker", "a small green star moved to the left",
    "the word cat was written at the top", "the yellow triangle turned purple", "there is a new black circle",
    "the picture is now grayscale", "a large orange square appeared on the right", "the two images are the same",
]


def train_tokenizer(texts, vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on ``texts``, with OPT's special tokens and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def tiny_config(
    vocab_size: int, image_token_id: int, image_size: int = 32, num_query_tokens: int = 4, hidden: int = 64,
    init_std: float = 0.1, text_init_std: float = 0.02, eos_token_id: int = EOS_ID,
):
    """A BLIP-2 config a few layers deep: every code path runs in milliseconds.

    The vision side's ``init_std`` is larger than BLIP-2's 0.02 so that random weights give query
    embeddings, hence captions, that depend on the image (with 0.02 every caption is the same), and
    small enough that its activations stay in the range int8 encoders are checked for (cosine to
    fp32 far above the export's 0.98, while an int4 encoder falls far below it). The decoder keeps BLIP-2's
    own 0.02: at that scale its layers perturb the residual stream as a trained model's do.
    Keep ``hidden`` a multiple of 64: bitsandbytes' CPU int4 kernels need 64-wide blocks.
    """
    from transformers import Blip2Config

    config = Blip2Config(
        vision_config=dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            encoder_hidden_size=hidden, cross_attention_frequency=1,
        ),
        text_config=dict(
            model_type="opt", hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=vocab_size, word_embed_proj_dim=hidden, max_position_embeddings=256,
            bos_token_id=BOS_ID, eos_token_id=eos_token_id, pad_token_id=PAD_ID, init_std=text_init_std,
            tie_word_embeddings=False,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
        initializer_range=init_std,
    )
    config.vision_config.initializer_range = init_std
    config.qformer_config.initializer_range = init_std
    return config


def save_model(model, tokenizer, out_dir: str | Path, image_size: int) -> Path:
    """Save a model with its tokenizer and a BLIP-2 image processor of ``image_size`` pixels."""
    from transformers import Blip2Processor

    from ..runtime import quiet_libraries
    from ..settings import CLIP_MEAN, CLIP_STD

    quiet_libraries()

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import BlipImageProcessor as ImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = ImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens)
    processor.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


def numpy_weights(model, seed: int) -> None:
    """Give every weight of ``model`` a value drawn from numpy's seeded generator, as BLIP-2 initialises it.

    Matrices and embeddings are normal with the config's standard deviation (the decoder's
    ``init_std``, ``initializer_range`` elsewhere); the Q-Former's query tokens and the biases are 0,
    the norms 1. numpy's generator gives the same numbers on every machine, where torch's CPU
    sampler may differ in the last bits between vector instruction sets.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, 0])
    text_std, std = model.config.text_config.init_std, model.config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "query_tokens":
                param.zero_()
            elif param.dim() >= 2:
                scale = text_std if name.startswith("language_model.") else std
                param.copy_(torch.from_numpy(rng.standard_normal(tuple(param.shape)) * scale))
            else:
                param.fill_(1.0 if name.endswith("weight") else 0.0)


def chain_decoder(language_model, tokenizer, seed: int, token_scale: float = 1.0, logit_scale: float = 1.5) -> None:
    """Make an OPT decoder say chains of tokens: after each token its successor wins by several logits.

    Every word token gets a random unit code; its embedding is ``token_scale`` times its code, and
    the LM head row of its successor is ``logit_scale`` times that code, so after a token the
    successor's logit leads the others by several units whatever the image, and argmaxes after the
    first token cannot flip between CPUs, thread counts or batch sizes. The tokens are cut into
    segments of 2 to 16: a segment of up to 12 tokens ends with EOS (its last token's code leans
    towards the EOS row), a longer one loops back to its start; so captions end at EOS at different
    lengths or run to the token limit. BOS has no embedding: the first token is the one whose LM
    head row the image's query embeddings (through the decoder's random attention) point at, so the
    image picks where in which chain a caption starts. Beam search then prefers a longer chain
    started by a likely token where greedy takes a short one. The layers' weights are
    :func:`int4_grid` values, so that int4 decoders keep the logits.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, 1])
    std = language_model.config.init_std
    vocab, hidden = language_model.lm_head.weight.shape
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    words = [t for t in range(vocab) if t not in special]
    rng.shuffle(words)
    codes = rng.standard_normal((vocab, hidden))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    successors, start = {}, 0
    while start < len(words):
        segment = words[start:start + int(rng.integers(2, 17))]
        start += len(segment)
        successors.update(zip(segment, segment[1:]))
        successors[segment[-1]] = EOS_ID if len(segment) <= 12 else segment[0]
    head = np.zeros((vocab, hidden))
    for token, successor in successors.items():
        if successor == EOS_ID:
            codes[token] = (codes[token] + codes[EOS_ID]) / np.linalg.norm(codes[token] + codes[EOS_ID])
    for token, successor in successors.items():
        head[successor] += codes[token]
    head[EOS_ID] = codes[EOS_ID]
    embeddings = token_scale * codes
    embeddings[BOS_ID] = 0.0
    with torch.no_grad():
        language_model.lm_head.weight.copy_(torch.from_numpy(logit_scale * head))
        language_model.get_input_embeddings().weight.copy_(torch.from_numpy(embeddings))
        for module in language_model.model.decoder.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(int4_grid(module.weight.shape, std, rng)))


def int4_grid(shape, std: float, rng):
    """Weights of standard deviation ``std`` that int4 keeps nearly intact: each one is ``+std`` or ``-std``.

    bitsandbytes' NF4 stores such a block exactly (its largest magnitude, signed); ONNX Runtime's
    asymmetric blocks, whose zero point is a whole step, move one of the two values by a fifteenth
    of the block's range. An int4 decoder built from them stays close to fp32 (next-token logits
    cosine well above the export's 0.99), also once an adapter's merge moves some weights off them.
    """
    return rng.choice([-std, std], shape)


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, texts=DEFAULT_CORPUS, image_size: int = 32, decoder: str = "chains",
    **config_overrides,
) -> Path:
    """Build and save a tiny BLIP-2 (OPT decoder) with a BPE tokenizer trained on ``texts``, without training.

    Weights come from numpy (:func:`numpy_weights`): the model is the same on every machine.
    ``decoder="chains"`` (the default) makes the decoder a :func:`chain_decoder`, whose captions
    depend on the image, end at different lengths and keep wide logit margins after their first
    token; ``"random"`` leaves the decoder as BLIP-2 initialises it (normal weights of the config's
    ``text_init_std``).
    """
    from transformers import Blip2ForConditionalGeneration

    if decoder not in ("chains", "random"):
        raise ValueError(f"decoder must be chains or random, not {decoder!r}")
    tokenizer = train_tokenizer(texts)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_config(len(tokenizer), image_token_id, image_size=image_size, **config_overrides)
    model = Blip2ForConditionalGeneration(config)
    numpy_weights(model, seed)
    if decoder == "chains":
        chain_decoder(model.language_model, tokenizer, seed)
    return save_model(model.eval(), tokenizer, out_dir, image_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m idc_lite.tools.modelgen", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
