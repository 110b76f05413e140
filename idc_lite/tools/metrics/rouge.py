"""ROUGE-L exactly as the COCO caption toolkit computes it (pycocoevalcap ``rouge.py``).

For each caption: the longest common subsequence with every reference gives a precision and a
recall; the best precision and the best recall (taken independently, possibly from different
references) are combined into an F-measure with beta = 1.2. The corpus score is the mean over
captions. Words are split on single spaces (``str.split(" ")``), as the toolkit does, so an empty
caption is one empty word and matches an empty reference.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["rouge_l"]

BETA = 1.2


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def sentence_rouge_l(hypothesis: str, references: Sequence[str], beta: float = BETA) -> float:
    """ROUGE-L F-measure of one tokenized caption against its tokenized references."""
    words = hypothesis.split(" ")
    precision = recall = 0.0
    for reference in references:
        ref_words = reference.split(" ")
        lcs = _lcs_length(ref_words, words)
        precision = max(precision, lcs / len(words))
        recall = max(recall, lcs / len(ref_words))
    if precision == 0 or recall == 0:
        return 0.0
    return ((1 + beta**2) * precision * recall) / (recall + beta**2 * precision)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = BETA) -> float:
    """Mean ROUGE-L over aligned lists of tokenized captions and their references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no captions to score")
    return sum(sentence_rouge_l(h, refs, beta) for h, refs in zip(hypotheses, references, strict=True)) / len(
        hypotheses
    )
