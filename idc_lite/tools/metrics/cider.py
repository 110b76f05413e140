"""CIDEr-D exactly as the COCO caption toolkit computes it (pycocoevalcap ``cider_scorer``).

Each caption and reference becomes, for n = 1..4, a TF-IDF vector of its n-grams. The document
frequency of an n-gram is the number of *evaluated images* whose references contain it, so a score
depends on the whole evaluated set (scoring a subset uses that subset's frequencies, as the toolkit
does). Per n, the similarity with a reference is a cosine in which the caption's weights are
clipped to the reference's (the "-D" in CIDEr-D), damped by a Gaussian penalty on the length
difference (sigma = 6). The image score is the mean over n, averaged over references and times 10;
the corpus score is the mean over images.

Kept on purpose for exactness: the toolkit's "length" used in the penalty is the number of
*bigrams* of a sentence (its ``counts2vec`` only counts n-grams with ``n == 1`` in 0-based terms).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from .bleu import ngram_counts

__all__ = ["cider_d"]

_Vector = list[dict[tuple[str, ...], float]]


class _Tfidf:
    """TF-IDF vectors of n-gram counts, with the toolkit's norms and "length"."""

    def __init__(self, document_frequency: Counter[tuple[str, ...]], log_num_images: float, max_n: int):
        self.document_frequency = document_frequency
        self.log_num_images = log_num_images
        self.max_n = max_n

    def vector(self, counts: Counter[tuple[str, ...]]) -> tuple[_Vector, list[float], int]:
        vec: _Vector = [{} for _ in range(self.max_n)]
        norms = [0.0] * self.max_n
        length = 0
        for ngram, term_frequency in counts.items():
            n = len(ngram) - 1
            idf = self.log_num_images - math.log(max(1.0, self.document_frequency[ngram]))
            vec[n][ngram] = weight = float(term_frequency) * idf
            norms[n] += weight**2
            if n == 1:
                length += term_frequency
        return vec, [math.sqrt(norm) for norm in norms], length


def _similarity(
    hyp: tuple[_Vector, list[float], int], ref: tuple[_Vector, list[float], int], sigma: float
) -> list[float]:
    """Clipped cosine similarity per n-gram order, with the Gaussian length penalty."""
    (vec_hyp, norm_hyp, length_hyp), (vec_ref, norm_ref, length_ref) = hyp, ref
    delta = float(length_hyp - length_ref)
    values = []
    for n, (weights_hyp, weights_ref) in enumerate(zip(vec_hyp, vec_ref, strict=True)):
        value = 0.0
        for ngram, weight in weights_hyp.items():
            weight_ref = weights_ref.get(ngram, 0.0)
            value += min(weight, weight_ref) * weight_ref
        if norm_hyp[n] != 0 and norm_ref[n] != 0:
            value /= norm_hyp[n] * norm_ref[n]
        values.append(value * math.e ** (-(delta**2) / (2 * sigma**2)))
    return values


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D (x10, as the toolkit reports it) of tokenized captions against their references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no captions to score")
    ref_counts = [[ngram_counts(ref.split(), max_n) for ref in refs] for refs in references]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        document_frequency.update({ngram for ref in counts for ngram in ref})
    tfidf = _Tfidf(document_frequency, math.log(float(len(references))), max_n)

    total = 0.0
    for hypothesis, counts in zip(hypotheses, ref_counts, strict=True):
        hyp = tfidf.vector(ngram_counts(hypothesis.split(), max_n))
        per_n = [0.0] * max_n
        for ref in counts:
            per_n = [a + b for a, b in zip(per_n, _similarity(hyp, tfidf.vector(ref), sigma), strict=True)]
        total += sum(per_n) / max_n / len(counts) * 10.0
    return total / len(hypotheses)
