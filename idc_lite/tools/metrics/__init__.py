"""Caption metrics equal to the COCO caption toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

Captions go in as raw text and are PTB-tokenized here, as the toolkit does (see :mod:`.ptb`); the
numbers come out on the toolkit's scale: BLEU, METEOR and ROUGE-L in 0..1, CIDEr-D as the toolkit
returns it (already x10, so typically 0..10). Any x100 presentation is left to callers.

BLEU, ROUGE-L, CIDEr-D and the tokenizer are pure Python. METEOR runs pycocoevalcap's
``meteor-1.5.jar`` on Java, in one process that every call shares (started on first use, closed when
Python exits; see :mod:`.meteor`); without pycocoevalcap or ``java`` it is reported as unavailable
(``None`` plus a reason), never approximated.

    from idc_lite.tools.metrics import score
    score({"0": "a red car is gone"}, {"0": ["The red car is missing.", "the car left"]})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .bleu import corpus_bleu
from .cider import cider_d
from .meteor import score_shared, unavailable_reason
from .ptb import tokenize, tokenize_corpus
from .rouge import rouge_l

__all__ = ["CIDER_DF_NOTE_KEY", "OVERALL", "Scores", "score", "score_by_category", "tokenize", "tokenize_corpus"]

#: Key of the "overall" entry of :func:`score_by_category`.
OVERALL = "overall"
#: Key of the note in :func:`score_by_category` saying where CIDEr-D's document frequencies come from.
CIDER_DF_NOTE_KEY = "cider_document_frequencies"
#: One set of scores: metric name -> value (None for an unavailable METEOR), "n" and maybe a reason.
Scores = dict[str, float | int | str | None]

_CIDER_DF_NOTE = (
    "per subset: each entry's CIDEr-D uses document frequencies from that subset's references only, "
    "as the COCO toolkit does when it is run on the subset"
)


def _check_ids(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Same ids on both sides, one string per prediction, at least one string reference per id."""
    for key in references:
        if key not in predictions:
            raise ValueError(f"no prediction for id {key!r}, which has references")
    for key, prediction in predictions.items():
        if key not in references:
            raise ValueError(f"prediction for id {key!r}, which has no references")
        if not isinstance(prediction, str):
            raise ValueError(f"prediction for id {key!r} is a {type(prediction).__name__}, not a string")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"references for id {key!r} must be a non-empty list of strings")
    if not references:
        raise ValueError("no captions to score")


def _score_ids(
    ids: Sequence[str],
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    meteor: Callable[[list[str], list[list[str]]], float] | str,
) -> Scores:
    """All metrics for ``ids``, as the toolkit run on just these captions gives them.

    ``meteor`` scores METEOR (:func:`.meteor.score_shared`), or is the reason METEOR is missing.
    """
    hypotheses = tokenize_corpus({key: [predictions[key]] for key in ids})
    tokenized_refs = tokenize_corpus({key: list(references[key]) for key in ids})
    hyps = [hypotheses[key][0] for key in ids]
    refs = [tokenized_refs[key] for key in ids]
    result: Scores = {f"BLEU-{n}": value for n, value in enumerate(corpus_bleu(hyps, refs), start=1)}
    result["METEOR"] = None if isinstance(meteor, str) else meteor(hyps, refs)
    result["ROUGE-L"] = rouge_l(hyps, refs)
    result["CIDEr"] = cider_d(hyps, refs)
    result["n"] = len(ids)
    if isinstance(meteor, str):
        result["meteor_unavailable"] = meteor
    return result


def _meteor_or_reason(meteor: bool) -> Callable[[list[str], list[list[str]]], float] | str:
    """What scores METEOR (on the shared process), or why nothing does."""
    if not meteor:
        return "not requested (meteor=False)"
    reason = unavailable_reason()
    return score_shared if reason is None else reason


def score(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *, meteor: bool = True) -> Scores:
    """Score raw-text predictions against raw-text references, exactly as pycocoevalcap would.

    ``predictions`` maps an id to one caption, ``references`` maps the same ids to their
    reference captions. Returns ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "n"}``, plus
    ``"meteor_unavailable"`` (the reason) when METEOR is ``None``. Ids are taken in the order of
    ``references``; an id on one side only raises ValueError naming it.
    """
    _check_ids(predictions, references)
    return _score_ids(list(references), predictions, references, _meteor_or_reason(meteor))


def score_by_category(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    categories: Mapping[str, str],
    *,
    meteor: bool = True,
) -> dict[str, Scores | str]:
    """Score every category subset on its own, plus ``"overall"`` (all ids).

    Each subset is evaluated as if the toolkit were run on it alone: its captions are tokenized
    together and CIDEr-D's document frequencies come from its references only (the returned
    :data:`CIDER_DF_NOTE_KEY` entry says so). ``categories`` maps every id to its category.
    Returns ``{"overall": scores, <category>: scores, ..., CIDER_DF_NOTE_KEY: note}``, categories
    in order of first appearance in ``references``.
    """
    _check_ids(predictions, references)
    for key in references:
        if key not in categories:
            raise ValueError(f"no category for id {key!r}")
    for key, category in categories.items():
        if key not in references:
            raise ValueError(f"category for id {key!r}, which has no references")
        if category in (OVERALL, CIDER_DF_NOTE_KEY):
            raise ValueError(f"id {key!r} has the reserved category name {category!r}")
    subsets: dict[str, list[str]] = {OVERALL: list(references)}
    for key in references:
        subsets.setdefault(categories[key], []).append(key)

    scorer = _meteor_or_reason(meteor)
    result: dict[str, Scores | str] = {
        name: _score_ids(ids, predictions, references, scorer) for name, ids in subsets.items()
    }
    result[CIDER_DF_NOTE_KEY] = _CIDER_DF_NOTE
    return result
