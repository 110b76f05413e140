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
    init_std: float = 0.3, text_init_std: float = 0.02, eos_token_id: int = EOS_ID,
):
    """A BLIP-2 config a few layers deep: every code path runs in milliseconds.

    The vision side's ``init_std`` is larger than BLIP-2's 0.02 so that random weights give query
    embeddings, hence captions, that depend on the image (with 0.02 every caption is the same). The
    decoder keeps BLIP-2's own 0.02: at that scale its layers perturb the residual stream as a
    trained model's do, so quantization error behaves as it would on a real decoder.
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


def warm_up_decoder(language_model, tokenizer, texts, steps: int = 100, lr: float = 1e-2) -> float:
    """Train the OPT decoder alone on ``texts`` for a few steps; returns the last loss.

    A decoder with random weights has logits without structure, so it says nothing about how
    quantization would treat a real one; a few steps of language modelling give it the structure of
    a trained decoder (and captions that end with EOS at different lengths) in under a second.
    """
    import torch

    rows = [[BOS_ID, *tokenizer(t, add_special_tokens=False)["input_ids"], EOS_ID] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=lr)
    language_model.train()
    for _ in range(steps):
        loss = language_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    language_model.eval()
    return loss.item()


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, texts=DEFAULT_CORPUS, image_size: int = 32, decoder_steps: int = 100,
    **config_overrides,
) -> Path:
    """Build and save a tiny BLIP-2 (OPT decoder) with a BPE tokenizer trained on ``texts``.

    Vision encoder and Q-Former are random; the decoder is warmed up on ``texts`` (see
    :func:`warm_up_decoder`) unless ``decoder_steps`` is 0.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    tokenizer = train_tokenizer(texts)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_config(len(tokenizer), image_token_id, image_size=image_size, **config_overrides)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    if decoder_steps:
        warm_up_decoder(model.language_model, tokenizer, texts, decoder_steps)
    return save_model(model.eval(), tokenizer, out_dir, image_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m idc_lite.tools.modelgen", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
