"""The demo recipe's training data (export/demo.py): what each stage's examples show and say."""

from __future__ import annotations

import numpy as np
import pytest

from export.demo import PairSource, SceneSource, stacked_caption
from idc_lite.compose import compose_pair
from idc_lite.settings import CompositionSettings, ProcessorSettings
from idc_lite.tools.synth import generate_pair

PROCESSOR = ProcessorSettings(height=32, width=32)


def test_stacked_examples_are_a_pair_stacked_and_captioned_by_its_halves():
    pixels, captions = SceneSource("val", 0, PROCESSOR, stacked=1.0).examples(3, 6)
    assert pixels.shape == (3, 3, 32, 32)
    for offset, caption in enumerate(captions):
        pair = generate_pair(3 + offset, seed=0, split="val")
        assert caption == stacked_caption(pair.before_description, pair.after_description)
        assert caption.startswith("top: ") and ". bottom: " in caption
        np.testing.assert_array_equal(pixels[offset], compose_pair(pair.before, pair.after, CompositionSettings(),
                                                                   PROCESSOR))


def test_stage_one_mixes_scenes_replay_and_stacked_pairs_reproducibly():
    source = SceneSource("train", 0, PROCESSOR, replay=0.25, stacked=0.5)
    pixels, captions = source.examples(0, 200)
    again_pixels, again_captions = source.examples(0, 200)
    assert captions == again_captions and np.array_equal(pixels, again_pixels)
    stacked = sum(c.startswith("top: ") for c in captions)
    scenes = sum(" background" in c and not c.startswith("top: ") and c.startswith("a ") for c in captions)
    assert 70 <= stacked <= 130 and scenes >= 25 and stacked + scenes < 200  # the rest is language replay
    # Without stacked examples the stream is stage 1's: the same draws pick replay or a scene.
    plain = SceneSource("train", 0, PROCESSOR, replay=0.25).examples(0, 50)[1]
    assert not any(c.startswith("top: ") for c in plain)
    with pytest.raises(ValueError, match="at most 1"):
        SceneSource("train", 0, PROCESSOR, replay=0.6, stacked=0.6)


def test_stage_two_shows_pairs_with_one_of_their_change_references():
    pixels, captions = PairSource("train", 0, PROCESSOR).examples(0, 9)
    assert pixels.shape == (9, 3, 32, 32)
    for index, caption in enumerate(captions):
        assert caption in generate_pair(index, seed=0, split="train").references
