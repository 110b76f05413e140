"""The embedded default model: a fresh install describes pairs offline, and describes them well."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from idc_lite import Captioner
from idc_lite.default_model import EMBEDDED_DIR

EXAMPLES = Path(__file__).parent.parent / "examples"
#: What each example pair shows: its kind of change and words naming what changed (the object's
#: shape and, where the caption must say it, its colour; the new background; the written word).
EXAMPLE_TRUTH = {
    "add": ("add", ("square", "blue")),
    "remove": ("remove", ("square",)),
    "color": ("color", ("triangle", "black")),
    "local": ("local", ("circle",)),
    "background": ("background", ("beige",)),
    "text": ("text", ("'dog'",)),
}

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "manifest.json").is_file(), reason="no embedded model in this checkout")


@pytest.fixture(scope="module")
def default():
    return Captioner()


def test_no_model_means_the_embedded_artifact(default):
    assert default.backend.name == "lite" and default.model_id == "idc-lite-demo"
    assert default.backend.decoder_name == "ort-int4"


#: Runs ``idc-lite`` with every network connection and name lookup refused (Python's audit hooks see them all).
WITHOUT_NETWORK = """
import sys

def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        raise OSError(f"network access in an offline run: {event} {args}")

sys.addaudithook(refuse)
from idc_lite.cli import main
main(sys.argv[1:])
"""


def test_the_cli_describes_the_readme_example_offline():
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}  # no offline switch either
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_NETWORK, "describe", str(EXAMPLES / "before" / "add.png"),
         str(EXAMPLES / "after" / "add.png")], capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "idc-lite-demo, the embedded default" in done.stderr


#: The example pairs the shipped model still describes wrongly (issue 18): each is an xfail that must
#: fail, so that a model that gets one right turns it into a failure until it is taken off this list.
WRONG_TODAY = {"add", "remove", "color", "local", "background", "text"}
WRONG_REASON = ("issue 18: the shipped model calls additions and removals moves, and names the right kind of "
                "change with the wrong object, colour or word in the other examples")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=WRONG_REASON)) if name in WRONG_TODAY else name
    for name in EXAMPLE_TRUTH])
def test_the_example_pair_is_described_with_the_right_kind_of_change_and_object(default, name):
    """The six pairs of examples/ (the README's first command is add.png), read with the strict rule."""
    from idc_lite.tools.kinds import kind_of

    kind, words = EXAMPLE_TRUTH[name]
    caption = default.describe(EXAMPLES / "before" / f"{name}.png", EXAMPLES / "after" / f"{name}.png").caption
    assert kind_of(caption) == kind and all(w in caption for w in words), caption


@pytest.mark.parametrize("split", ["test", "shifted"])
def test_captions_say_what_kind_of_change_happened(default, split):
    """On unseen pairs of the wide world, captions state the right kind of change (the strict rule) in
    most categories, `none` included, well above chance overall.

    Chance is 1/9; a broken encoder, decoder or composition path repeats one caption and can be right
    in one category only (saying "nothing changed" to every pair is right in `none` alone), and the
    two models before this one were right in 26% / 25% and 42% / 38% of the test / shifted splits,
    never in `none` (docs/model-card.md). The floors sit below what the shipped model gives on these
    108 pairs, leaving room for any CPU's int4 rounding.
    """
    from collections import defaultdict

    from idc_lite.tools.kinds import says_kind
    from idc_lite.tools.synth import CATEGORIES, generate_pair

    pairs = [generate_pair(i, seed=0, split=split) for i in range(5000, 5000 + 12 * len(CATEGORIES))]
    results = list(default.describe_batch([(p.before, p.after) for p in pairs], batch_size=12))
    right = defaultdict(list)
    for pair, result in zip(pairs, results):
        right[pair.category].append(says_kind(result.caption, pair.category))
    shares = {c: sum(v) / len(v) for c, v in right.items()}
    overall = sum(map(sum, right.values())) / len(pairs)
    assert overall >= 0.5 and sum(share >= 0.5 for share in shares.values()) >= 5, (overall, shares)
    assert shares["none"] >= 0.75, shares


def test_a_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    import idc_lite.default_model as default_model
    from idc_lite.errors import ModelError

    monkeypatch.setattr(default_model, "EMBEDDED_DIR", tmp_path / "nothing")
    with pytest.raises(ModelError, match="no embedded default model; pass a model with --model"):
        Captioner()
