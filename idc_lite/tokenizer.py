"""The lite runtime's tokenizer: the artifact's ``tokenizer.json`` run by ``tokenizers`` alone.

Importing transformers imports torch, which was most of a CPU caption's start-up and memory
(``docs/design.md``), for a tokenizer that only builds the prompt's ids and turns the new
tokens into text. transformers' fast tokenizers run the same Rust object that ``tokenizer.json``
holds, but they may add behaviour of their own (special tokens from ``tokenizer_config.json``, a
clean-up of spaces, a subclass's ``decode``). So the export checks, with transformers at hand, that the bare file decodes every token
id and a set of mixed sequences (special ids included), and encodes sample prompts, exactly as
transformers does (:func:`check_bare_tokenizer`), and records the verdict in the manifest. The
runtime uses the bare file only where that check passed (:func:`load_artifact_tokenizer`), and
transformers otherwise (older artifacts, tokenizers that differ).
"""

from __future__ import annotations

import random
from pathlib import Path

from .errors import ArtifactError, ModelError, first_line, require

#: Prompts whose ids must be the same either way (ASCII, punctuation, spaces, accents, symbols).
SAMPLE_PROMPTS = ("Describe the change.", "what is different?", "  two  spaces ", "café, naïve; ✓ 42%", "a\nb")
#: Random id sequences checked, and their longest length.
SAMPLE_SEQUENCES, SAMPLE_LENGTH = 256, 40


class BareTokenizer:
    """The two calls idc-lite makes on a tokenizer, answered by ``tokenizers`` from ``tokenizer.json``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for a bad file
            raise ArtifactError(path, f"cannot load the tokenizer ({first_line(exc)})") from None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        # One sequence at a time, as transformers does: decode_batch would start the Rust thread pool
        # in the host process (tokenizers then warns in every child a later fork makes).
        return [self._tokenizer.decode(list(map(int, s)), skip_special_tokens=skip_special_tokens) for s in sequences]


def check_bare_tokenizer(tokenizer, path: Path, seed: int = 0) -> dict:
    """Compare the bare ``tokenizer.json`` at ``path`` with transformers' ``tokenizer``; the manifest entry.

    ``runtime`` is ``tokenizers`` when every check agrees, else ``transformers`` with the first
    difference.
    """
    if not path.is_file():
        return {"runtime": "transformers", "why": "no tokenizer.json"}
    bare = BareTokenizer(path)
    size = len(tokenizer)
    rng = random.Random(seed)
    special = sorted(set(tokenizer.all_special_ids))
    sequences = [[i] for i in range(size)]
    for _ in range(SAMPLE_SEQUENCES):
        length = rng.randint(1, SAMPLE_LENGTH)
        sequences.append([rng.choice(special) if special and rng.random() < 0.2 else rng.randrange(size)
                          for _ in range(length)])
    for skip in (True, False):
        ours, theirs = bare.batch_decode(sequences, skip), tokenizer.batch_decode(sequences, skip_special_tokens=skip)
        for ids, got, want in zip(sequences, ours, theirs):
            if got != want:
                return {"runtime": "transformers",
                        "why": f"ids {ids[:8]} decode to {got!r} bare, {want!r} with transformers "
                               f"(skip_special_tokens={skip})"}
    for prompt in SAMPLE_PROMPTS:
        got, want = bare(prompt, add_special_tokens=False)["input_ids"], \
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if got != want:
            return {"runtime": "transformers", "why": f"prompt {prompt!r} encodes to {got[:8]} bare, {want[:8]}"}
    return {"runtime": "tokenizers", "checked": {"token_ids": size, "sequences": SAMPLE_SEQUENCES,
                                                 "prompts": len(SAMPLE_PROMPTS)}}


def load_artifact_tokenizer(root: Path, entry: dict | None):
    """The artifact's tokenizer: bare ``tokenizers`` if the export's check passed, else transformers'."""
    if (entry or {}).get("runtime") == "tokenizers":
        return BareTokenizer(root / "tokenizer.json")
    require("transformers", f"the tokenizer of {root} (not checked to run without transformers at export)", "reference")
    from .runtime import quiet_libraries

    quiet_libraries()
    return load_tokenizer(root)


def load_tokenizer(model_dir: Path):
    """A model's tokenizer through transformers (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(model_dir, f"cannot load the tokenizer ({first_line(exc)})") from None

