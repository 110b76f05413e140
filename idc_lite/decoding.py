"""What the reference and the lite decoders share: token ids, the prefix, generation kwargs, decoding.

Without a prompt the language model sees BLIP2IDC's input: the query embeddings followed by the BOS
token. With a prompt, the prompt's tokens follow BOS. Both paths build that prefix here, stop on the
same EOS ids, and decode new tokens with ``skip_special_tokens=True``.
"""

from __future__ import annotations

from .errors import ModelError
from .settings import GenerationSettings, TokenSettings


def token_settings(config: dict, where: str = "config.json") -> TokenSettings:
    """Token ids from a BLIP-2 ``config.json``: the ones transformers' own BLIP-2 ``generate`` uses.

    The language model generates with its text config's ids (for blip2-opt: EOS 50118, a newline),
    not the top-level ``generation_config.json``.
    """
    text = config.get("text_config") or {}
    image_token = config.get("image_token_index", config.get("image_token_id"))
    if image_token is None:
        raise ModelError(where, "no image_token_index: a BLIP-2 config from transformers >= 4.47 is needed")
    eos = text.get("eos_token_id", 2)
    return TokenSettings(
        bos_token_id=int(text.get("bos_token_id", 2)),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
        pad_token_id=int(text.get("pad_token_id", 1)),
        image_token_id=int(image_token),
        num_query_tokens=int(config.get("num_query_tokens", 32)),
    )


def prefix_ids(tokenizer, tokens: TokenSettings, prompt: str | None) -> list[int]:
    """Token ids that follow the query embeddings: BOS, then the prompt if any."""
    ids = [tokens.bos_token_id]
    if prompt:
        ids += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids


def generate_kwargs(settings: GenerationSettings, tokens: TokenSettings) -> dict:
    """Arguments for transformers' ``generate``: every decoding choice explicit, nothing from defaults files."""
    return dict(
        max_new_tokens=settings.max_new_tokens,
        num_beams=settings.num_beams,
        do_sample=False,
        eos_token_id=list(tokens.eos_token_ids),
        pad_token_id=tokens.pad_token_id,
        bos_token_id=tokens.bos_token_id,
        length_penalty=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        early_stopping=False,
    )


def decode(tokenizer, sequences) -> list[str]:
    """New token ids -> captions (special tokens skipped, whitespace trimmed)."""
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def inputs_embeds(language_model, query_embeds, prefix: list[int]):
    """The decoder's input: query embeddings followed by the embedded prefix tokens.

    This is what BLIP-2's ``generate`` builds by scattering the query embeddings over the image
    tokens of ``[image] * num_query_tokens + prefix``.
    """
    import torch

    embed = language_model.get_input_embeddings()
    ids = torch.tensor([prefix], dtype=torch.long, device=embed.weight.device)
    tokens = embed(ids).expand(query_embeds.shape[0], -1, -1)
    return torch.cat([query_embeds.to(tokens.device, tokens.dtype), tokens], dim=1)
