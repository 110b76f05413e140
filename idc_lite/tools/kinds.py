"""What kind of change a caption says: the strict check behind "the right kind of change".

CIDEr rewards a caption that names the right object and hides one that says the wrong change
about it ("the small blue square turned orange" for a square that was added). This reads a caption
the way a person would and returns the one kind of change it states, so that a model is scored by
what it says happened.

The rule (stated in ``docs/model-card.md``), checked in this order, first match wins:

- ``none``: the caption says nothing changed ("nothing changed", "no difference", "the same",
  "identical");
- ``text``: a quoted word, or words about writing ("word", "text", "letters", "wrote", "written");
- ``background``: the background or backdrop;
- ``style``: a named filter (grayscale / black and white, posterized, pixelated / blocky / big
  pixels) or its effect on the colours (fewer, coarser or flat colours, colours removed, lost its
  colour, turned gray);
- ``global``: brightness (darker, brighter, darkened, brightened, brightness);
- ``local``: an object moved (moved, shifted, pushed);
- ``remove``: an object went away (removed, gone, disappeared, missing, no longer, taken away,
  deleted);
- ``add``: an object came (added, appeared, new, extra, "now there is also");
- ``color``: an object's colour changed: a shape word, then a colour verb ("turned", "became",
  "is now", "is ... now", "changed color", "color of", "painted", "recolored") and a colour word
  after the shape, the new colour. Any other sentence with "now" is not a colour change.

Anything else is ``None``: it states no kind of change this world knows.
"""

from __future__ import annotations

import re

from .synth import COLORS, SHAPES

_SHAPE = r"\b(?:" + "|".join(SHAPES) + r")s?\b"
_COLOR = r"\b(?:" + "|".join(COLORS) + r")\b"
_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((kind, re.compile(pattern)) for kind, pattern in (
    ("none", r"\bnothing\b.*\bchanged?\b|\bno (?:difference|change)s?\b|\b(?:the )?same\b|\bidentical\b"),
    ("text", r"'[^']+'|\b(?:word|words|text|letters|wrote|written)\b"),
    ("background", r"\bbackground\b|\bbackdrop\b"),
    ("style", r"\b(?:grayscale|gr[ae]y ?scale|black and white|posteri[sz]\w*|pixelat\w*|blocky|big pixels|"
              r"fewer colou?rs|coarser|flat tones|colou?rs were removed|lost (?:its|their) colou?r|turned gr[ae]y)\b"),
    ("global", r"\b(?:darker|brighter|darkened|brightened|brightness)\b"),
    ("local", r"\b(?:moved|shifted|pushed)\b"),
    ("remove", r"\b(?:removed|gone|disappeared|missing|no longer|taken away|deleted)\b"),
    ("add", r"\b(?:added|appeared|new|extra)\b|\bnow there is also\b"),
))
_COLOR_VERB = re.compile(r"\b(?:turned|became|is now|is \w+ now|changed colou?r|colou?r of|painted|recolou?red)\b")


def kind_of(caption: str) -> str | None:
    """The one kind of change ``caption`` states (a category of :data:`~idc_lite.tools.synth.CATEGORIES`), or None."""
    text = caption.lower()
    for kind, pattern in _RULES:
        if pattern.search(text):
            return kind
    shape = re.search(_SHAPE, text)
    if shape and _COLOR_VERB.search(text) and re.search(_COLOR, text[shape.end():]):
        return "color"
    return None


def says_kind(caption: str, category: str) -> bool:
    """Whether ``caption`` states a change of ``category`` (and no other kind first)."""
    return kind_of(caption) == category
