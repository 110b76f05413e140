"""Corpus BLEU-1..4 exactly as the COCO caption toolkit computes it (pycocoevalcap ``bleu_scorer``).

Differences from textbook BLEU that matter for exactness, all kept on purpose:

* n-gram counts and lengths are summed over the whole corpus before the geometric mean (corpus
  level, not an average of sentence scores);
* the reference length of a caption is the reference length *closest* to the caption's length,
  the shorter one on a tie;
* ``1e-15`` is added to every numerator and ``1e-9`` to every denominator, so an n-gram order
  with no guesses gives a tiny value instead of a division by zero.

The inputs are already PTB-tokenized strings; words are whatever ``str.split()`` gives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["corpus_bleu"]

_TINY = 1e-15  # added to numerators ("so that if guess is 0 still return 0")
_SMALL = 1e-9  # added to denominators


def ngram_counts(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of ``words`` for n = 1..max_n."""
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """BLEU-1..BLEU-``max_n`` of tokenized hypotheses against their references (aligned lists)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    test_length = reference_length = 0
    guesses = [0] * max_n
    correct = [0] * max_n
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = hypothesis.split()
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            max_ref_counts |= ngram_counts(ref_words, max_n)
        test_length += len(words)
        reference_length += min((abs(length - len(words)), length) for length in ref_lengths)[1]
        for n in range(1, max_n + 1):
            guesses[n - 1] += max(0, len(words) - n + 1)
        for ngram, count in ngram_counts(words, max_n).items():
            correct[len(ngram) - 1] += min(max_ref_counts[ngram], count)

    scores = []
    product = 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guesses[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (test_length + _TINY) / (reference_length + _SMALL)
    if ratio < 1:  # brevity penalty
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores
