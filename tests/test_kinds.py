"""The strict check of what kind of change a caption states (idc_lite/tools/kinds.py)."""

from __future__ import annotations

import pytest

from idc_lite.tools.kinds import kind_of, says_kind
from idc_lite.tools.synth import CATEGORIES, generate_pair


@pytest.mark.parametrize("split", ["train", "shifted"])
def test_every_reference_of_the_world_states_its_own_category(split):
    """Each of the world's templates, in 270 pairs (30 per category), reads as its pair's category."""
    for index in range(270):
        pair = generate_pair(index, seed=3, split=split)
        for reference in pair.references:
            assert kind_of(reference) == pair.category, reference


@pytest.mark.parametrize("caption, kind", [
    ("the small blue circle turned orange", "color"),
    ("the color of the square changed from red to blue", "color"),
    ("someone painted the star green", "color"),
    ("the triangle is yellow now", "color"),
    # "now" alone is not a colour change: the object did not get a new colour.
    ("the small blue star is now in the center", None),
    ("the red square is now there", None),
    ("a new small green star is now in the lower left", "add"),
    ("the removed purple square turned green", "remove"),
    ("the small yellow circle moved to the lower right", "local"),
    ("there is no change between the images", "none"),
    ("the word 'cat' was added in red letters", "text"),
    ("the background turned navy", "background"),
    ("the picture turned gray", "style"),
    ("the whole scene is darker", "global"),
    ("a large red circle on a white background", "background"),
    ("a large red circle", None),
])
def test_captions_read_as_a_person_would(caption, kind):
    assert kind_of(caption) == kind
    for category in CATEGORIES:
        assert says_kind(caption, category) == (category == kind)
