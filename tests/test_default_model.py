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
#: Words a caption of each change category uses (the world's templates), to check what a caption says.
CATEGORY_WORDS = {
    "add": ("added", "new", "appeared", "extra"),
    "remove": ("removed", "gone", "disappeared", "missing", "no longer"),
    "color": ("turned", "color", "painted", "is now", "now"),
    "local": ("moved", "shifted"),
    "background": ("background",),
    "text": ("word", "text", "written", "wrote"),
    "style": ("grayscale", "posterize", "pixel", "blocky", "black and white", "colors", "filter", "coarser"),
    "global": ("darker", "brighter", "brightness", "darkened", "brightened"),
    "none": ("nothing", "same", "no change", "identical", "no difference"),
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


def test_captions_say_what_kind_of_change_happened(default):
    """On unseen test-split pairs, captions use the words of the right change category far above chance.

    Chance is 1/9 per category; a decoder that ignored the picture would repeat one phrasing (e.g.
    "... moved to the lower right") and score about 0.11. The shipped model misses `add` and `none`
    (README "The embedded default model"), and its two int4 decoders, different roundings of the
    same weights, score within a few pairs of each other here: the floor of 0.35, three times
    chance, catches a broken encoder or decoder path and leaves room for any CPU's rounding.
    """
    from idc_lite.tools.synth import CATEGORIES, generate_pair

    pairs = [generate_pair(i, seed=0, split="test") for i in range(5000, 5000 + 16 * len(CATEGORIES))]
    results = list(default.describe_batch([(p.before, p.after) for p in pairs], batch_size=12))
    right = [any(w in r.caption for w in CATEGORY_WORDS[p.category]) for p, r in zip(pairs, results)]
    assert sum(right) / len(right) >= 0.35, [(p.category, r.caption) for p, r, ok in zip(pairs, results, right) if not ok]


def test_a_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    import idc_lite.default_model as default_model
    from idc_lite.errors import ModelError

    monkeypatch.setattr(default_model, "EMBEDDED_DIR", tmp_path / "nothing")
    with pytest.raises(ModelError, match="no embedded default model; pass a model with --model"):
        Captioner()
