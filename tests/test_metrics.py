"""idc_lite.tools.metrics against the COCO caption toolkit itself (pycocoevalcap and its Java parts).

The toolkit is the oracle: every number must equal pycocoevalcap's on the same raw captions
(1e-6, METEOR 1e-4), and the pure-Python PTB tokenizer must equal CoreNLP's jar. Java start-up is
slow (METEOR loads its paraphrase table for several seconds), so the toolkit runs once, in the
background from the start of the session (:func:`start_early`), and ours is the one process that
every scoring call shares (``meteor.score_shared``, started early too by conftest.py); the tests that
end and replace that process come after the comparisons, which it serves.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest

from conftest import in_background
from idc_lite.tools import metrics
from idc_lite.tools.metrics import meteor as meteor_module
from idc_lite.tools.metrics.meteor import MeteorError

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="java is not on PATH (the toolkit's tokenizer and METEOR need it)")
needs_meteor = pytest.mark.skipif(meteor_module.unavailable_reason() is not None,
                                  reason="METEOR needs java on PATH and pycocoevalcap (its jar)")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# id -> (category, prediction, references): mixed case, punctuation, contractions, quotes, hyphens,
# numbers, parentheses, abbreviations, a repeated reference, 1 to 5 references, empty predictions.
CORPUS = {
    "00": (
        "Add",
        "a red car has been added",
        ["A red car was added to the parking lot.", "There's a new red car.", "the red car is new"],
    ),
    "01": ("Remove", "The man isn't there anymore.", ["The man is gone.", "The man is gone.", "the person left"]),
    "02": ("Color", "the sign says 'stop'", ['The sign now reads "STOP".', 'a "stop" sign appears']),
    "03": (
        "Color",
        "the T-shirt logo is different",
        ["The well-known T-shirt logo changed colour.", "x-ray: brighter"],
    ),
    "04": (
        "Add",
        "there are 3 more cars",
        ["3.5 more cars; 10% fewer people", "1,000 birds (approx.) flew away", "5 1/2 cars"],
    ),
    "05": ("Remove", "the small dog moved to the left", ["The (small) dog moved left.", "dog [brown] moved {far}"]),
    "06": (
        "Remove",
        "can not see the cat",
        ["It's not there; can't see it.", "You won't find the cat.", "cannot see cat"],
    ),
    "07": ("Remove", "", ["The tree was removed.", "no tree"]),
    "08": ("Add", "...", ["A bench appears.", "new bench!"]),
    "09": (
        "Color",
        "THE BLUE CUBE CHANGED ITS COLOR",
        ["the blue cube changed its color", "The blue cube became RED."],
    ),
    "10": ("Add", "the car... moved and/or turned", ["The car moved -- and turned.", "car moved/turned"]),
    "11": ("Add", "AT&T sign added", ["An AT&T sign was added.", "Q&A board & a sign"]),
    "12": ("Remove", "Mr. Smith left. The end", ["Mr. Smith is gone.", "the U.S. flag is gone etc."]),
    "13": ("Color", "they're gonna paint it", ["They are going to paint it.", "gonna be painted"]),
    "14": ("Color", "\u2018Caf\u00e9\u2019 sign is \u201cgreen\u201d", ["The café sign is green.", "cafe sign: green"]),
    "15": (
        "Add",
        "a person",
        ["A person walked in.", "someone appears", "a man is there", "one more person", "a person"],
    ),
    "16": ("Remove", "nothing", ["!", "nothing changed", "There is no difference."]),
    "17": ("Remove", "the white van is gone", ["the white van is gone"]),
    "18": ("Color", "", ["The wall changed from white to grey, and the door from blue to green."]),
    "19": ("Add", "two (2) new cones; 1st and 2nd rows", ["Two new cones appear in the 1st and 2nd rows.", "2 cones"]),
    "20": ("Remove", "e.g. the lamp", ["The lamp, i.e. the tall one, is gone.", "lamp removed"]),
    "21": ("Color", "rock'n'roll poster's colors", ["The rock 'n' roll poster's colours changed.", "poster colour"]),
    "22": ("Add", "a 5-year-old child 's toy", ["A toy for a 5-year-old appeared.", "child's toy added"]),
    "23": ("Remove", "The people --- all of them --- left", ["Everyone left.", "the people left"]),
}
PREDICTIONS = {key: prediction for key, (_, prediction, _) in CORPUS.items()}
REFERENCES = {key: refs for key, (_, _, refs) in CORPUS.items()}
CATEGORIES = {key: category for key, (category, _, _) in CORPUS.items()}

# Strings whose PTB tokenization is easy to get wrong; lexed together, as the toolkit does.
TRICKY = [
    "The man doesn't like it's colour. I can't, cannot; won't!",
    '"Hello," she said. \'Quoted\' text and "double" quotes',
    "A well-known 3.5 meter 1,000 10% (left) [bracket] {brace}",
    "wait... what?! and/or 1/2 3/4 AT&T & Q&A s.p.a U.S. Mr. Smith",
    "gonna wanna gotta i'm you're we've he'd they'll y'all lemme gimme 'tis 'twas",
    "e-mail co-operate 5-year-old 10-20 1990s '90s mid-1990s pre-war x-ray a--b a---b ---- -----",
    "http://example.com/a.b www.google.com foo@bar.com @user #tag $5 US$ £3 €4 ¢",
    "3.5. Jan. 5 etc. He said. U.S. The end. a.m. p.m. Mr. and Mrs. vs. St. Louis No. 5 Fig. 3",
    "it's don't DON'T I'M she'll ain't y'know o'clock rock'n'roll 'em 'n' cont'd",
    "a/b 1/2 5 1/2 11/22/2013 12:30 1,000,000 -5 +5 .5 5. 5.5.5 3x4 2nd 100km",
    ". . . .... ..... ...... hey.. ?? !! ?! -- * ** # @@ ~ ^ | \\ = == +",
    "`back` ``latex'' \u2018curly\u2019 \u201ccurly\u201d \u00ab guillemets \u00bb \u201elow\u201c '' '",
    "hello,world hello.world hello;world hello:world hello!world hello?world hello(world)",
    "<b>bold</b> a < b > c <<duck>> &amp; &lt; &gt; &quot;hi&quot; AT&amp;T :) ;-) (^_^)",
    "I.B.M. IBM. NASA's A&P R&D e.g. i.e. Ph.D. J. The I. the",
    "na\u00efve caf\u00e9 Z\u00fcrich \u2014 \u2013 \u2026 \u00b7 \u00a9 \u00b0 \u00d7 \u00bd",
    "soft\xadhyphen c++ C# 1a.txt x",
    "etc.",
    "The next caption starts with a capital after etc.",
    "",
    "   leading and trailing spaces   ",
]

# Expected tokenizations taken from the jar, checked without Java.
KNOWN = [
    ("The man doesn't like it's colour.", "the man does n't like it 's colour"),
    ("I can't, cannot; won't!", "i ca n't can not wo n't"),
    ('"Hello," she said.', "hello she said"),
    ("a well-known 3.5 m x-ray (left)", "a well-known 3.5 m x-ray -lrb- left -rrb-"),
    ("1,000 cars, 10% fewer... and/or AT&T", "1,000 cars 10 % fewer and/or at&t"),
    ("gonna wanna", "gon na wan na"),
    ("Mr. Smith left. The U.S. flag", "mr. smith left the u.s. flag"),
    ("[x] {y} <b>bold</b>", "-lsb- x -rsb- -lcb- y -rcb- <b> bold </b>"),
    ("5 1/2 inches", "5\xa01/2 inches"),
    ("rock'n'roll 'em o'clock", "rock 'n' roll 'em o'clock"),
    ("\u2018curly\u2019 \u201cdouble\u201d", "curly double"),
    ("", ""),
    ("...", ""),
    ("The END!", "the end"),
    ("smile :p", "smile p"),
    ("smile :p x", "smile :p x"),
]


def _toolkit():
    """The pycocoevalcap pieces, or skip the test when it is not installed."""
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer, Bleu, Meteor, Rouge, Cider


def _toolkit_scores(ids, meteor_scorer) -> dict:
    """pycocoevalcap on the raw captions of ``ids``, as COCOEvalCap.evaluate runs it."""
    PTBTokenizer, Bleu, _, Rouge, Cider = _toolkit()
    gts = PTBTokenizer().tokenize({key: [{"caption": ref} for ref in REFERENCES[key]] for key in ids})
    res = PTBTokenizer().tokenize({key: [{"caption": PREDICTIONS[key]}] for key in ids})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": value for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = meteor_scorer.compute_score(gts, res)[0]
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


def _toolkit_all() -> dict:
    """The toolkit's scores for the whole corpus ("overall") and for each category subset."""
    _, _, Meteor, _, _ = _toolkit()
    meteor_scorer = Meteor()  # one METEOR process for every subset
    try:
        subsets = {metrics.OVERALL: list(CORPUS)}
        for key, category in CATEGORIES.items():
            subsets.setdefault(category, []).append(key)
        return {name: _toolkit_scores(ids, meteor_scorer) for name, ids in subsets.items()}
    finally:
        del meteor_scorer


_toolkit_early: Future | None = None


def start_early(tmp_path_factory, items) -> None:
    """Run the toolkit (:func:`_toolkit_all`: its Java processes, seconds) in the background from the start
    of the session, if a collected test compares with it (conftest.py calls this)."""
    global _toolkit_early
    if JAVA and importlib.util.find_spec("pycocoevalcap") and any("toolkit" in item.fixturenames for item in items):
        try:
            _toolkit()  # imported here, not in the thread
        except (ImportError, pytest.skip.Exception):  # the tests that need it skip, and say why
            return
        _toolkit_early = in_background(_toolkit_all)


@pytest.fixture(scope="module")
def toolkit() -> dict:
    """The toolkit's scores for the whole corpus ("overall") and for each category subset."""
    _toolkit()  # or skip
    return _toolkit_all() if _toolkit_early is None else _toolkit_early.result()


def _assert_equal_scores(mine: dict, expected: dict) -> None:
    for name in METRICS:
        tolerance = 1e-4 if name == "METEOR" else 1e-6
        assert mine[name] == pytest.approx(expected[name], abs=tolerance), name


def _gone(pid: int, timeout_s: float = 10) -> bool:
    """Whether process ``pid`` has ended and been reaped (within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@needs_java
def test_score_equals_toolkit(toolkit):
    pid = meteor_module.start_shared()
    mine = metrics.score(PREDICTIONS, REFERENCES)
    _assert_equal_scores(mine, toolkit[metrics.OVERALL])
    assert mine["n"] == len(CORPUS)
    assert "meteor_unavailable" not in mine
    assert meteor_module.shared_pid() == pid  # scored on the running process, which is still there


@needs_java
def test_score_by_category_equals_toolkit_on_each_subset(toolkit):
    pid = meteor_module.start_shared()
    mine = metrics.score_by_category(PREDICTIONS, REFERENCES, CATEGORIES)
    assert meteor_module.shared_pid() == pid  # one process for every subset, and for the calls before
    assert set(mine) == {*toolkit, metrics.CIDER_DF_NOTE_KEY}
    assert "per subset" in mine[metrics.CIDER_DF_NOTE_KEY]
    for name, expected in toolkit.items():
        _assert_equal_scores(mine[name], expected)
        assert mine[name]["n"] == sum(1 for c in CATEGORIES.values() if name in (c, metrics.OVERALL))


@needs_meteor
def test_a_meteor_process_that_died_is_replaced_by_the_next_call():
    first = meteor_module.start_shared()
    assert first is not None and meteor_module.start_shared() == first == meteor_module.shared_pid()
    os.kill(first, signal.SIGKILL)  # as the OOM killer would end it between two calls
    deadline = time.monotonic() + 10
    while meteor_module.shared_pid() == first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert meteor_module.shared_pid() is None
    second = meteor_module.start_shared()
    assert second not in (None, first) and _gone(first)


@needs_meteor
def test_a_call_that_fails_midway_ends_its_process_and_the_next_call_starts_another():
    pid = meteor_module.start_shared()
    meteor_module._shared._process.stdout.close()  # its answers can no longer be read: the call fails
    with pytest.raises(MeteorError, match="could not read from METEOR"):
        metrics.score({"a": "a red car"}, {"a": ["the red car"]})
    assert meteor_module.shared_pid() is None and _gone(pid)  # not left running, out of step
    again = meteor_module.start_shared()
    assert again not in (None, pid)
    meteor_module.close_shared()
    assert meteor_module.shared_pid() is None and _gone(again)


@needs_meteor
def test_the_shared_process_ends_with_python():
    code = "from idc_lite.tools.metrics import meteor; print(meteor.start_shared())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert _gone(int(done.stdout), timeout_s=0)  # ended and reaped before that Python exited


@needs_java
def test_tokenizer_equals_corenlp_jar():
    PTBTokenizer = _toolkit()[0]
    captions = {str(i): [text] for i, text in enumerate(TRICKY)}
    expected = PTBTokenizer().tokenize({key: [{"caption": text}] for key, [text] in captions.items()})
    assert metrics.tokenize_corpus(captions) == expected
    # Alone, a caption ends at the end of the file, where look-ahead rules fail: ":p" is no smiley.
    for text in ("smile :p", "File 1a.txt"):
        alone = PTBTokenizer().tokenize({"x": [{"caption": text}]})
        assert metrics.tokenize(text) == alone["x"][0], text


def test_bleu_rouge_and_cider_equal_the_toolkits_scorers_without_java():
    """BLEU, ROUGE-L and CIDEr-D need no Java: pycocoevalcap's own scorers, run on our PTB tokenization,
    give exactly our numbers, overall and on each category subset (the tokenization itself is checked
    against the jar when Java is there, and on known cases without it)."""
    _, Bleu, _, Rouge, Cider = _toolkit()
    subsets = {metrics.OVERALL: list(CORPUS)}
    for key, category in CATEGORIES.items():
        subsets.setdefault(category, []).append(key)
    mine = metrics.score_by_category(PREDICTIONS, REFERENCES, CATEGORIES, meteor=False)
    for name, ids in subsets.items():
        gts = metrics.tokenize_corpus({key: REFERENCES[key] for key in ids})
        res = metrics.tokenize_corpus({key: [PREDICTIONS[key]] for key in ids})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        expected = {f"BLEU-{n}": value for n, value in enumerate(bleu, start=1)}
        expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
        expected["CIDEr"] = Cider().compute_score(gts, res)[0]
        for metric, value in expected.items():
            assert mine[name][metric] == pytest.approx(value, abs=1e-6), (name, metric)


@pytest.mark.parametrize(("text", "expected"), KNOWN)
def test_tokenize_known_cases(text, expected):
    assert metrics.tokenize(text) == expected


def test_tokenize_corpus_sees_the_next_caption():
    # The jar's look-ahead crosses lines: "J." before a capitalised "The" is a letter plus a period.
    assert metrics.tokenize_corpus({"a": ["Agent J.", "The end"]}) == {"a": ["agent j", "the end"]}
    assert metrics.tokenize_corpus({"a": ["Agent J.", "the end"]}) == {"a": ["agent j.", "the end"]}
    assert metrics.tokenize("Agent J.") == "agent j."


def test_line_breaks_inside_a_caption_are_spaces():
    # The toolkit would emit extra lines for "\r" and shift later captions; we keep them aligned.
    assert metrics.tokenize_corpus({"a": ["one\rtwo\u2028three"], "b": ["four\nfive"]}) == {
        "a": ["one two three"],
        "b": ["four five"],
    }


def test_meteor_unavailable_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    result = metrics.score({"a": "a red car"}, {"a": ["the red car", "a car"]})
    assert result["METEOR"] is None
    assert "java" in result["meteor_unavailable"]
    assert result["BLEU-1"] > 0 and result["n"] == 1
    by_category = metrics.score_by_category({"a": "a red car"}, {"a": ["the red car"]}, {"a": "Add"})
    assert by_category["Add"]["METEOR"] is None and "java" in by_category["Add"]["meteor_unavailable"]


def test_meteor_unavailable_without_pycocoevalcap(monkeypatch):
    monkeypatch.setattr(meteor_module, "find_meteor_jar", lambda: None)
    result = metrics.score({"a": "a red car"}, {"a": ["the red car"]})
    assert result["METEOR"] is None
    assert "pycocoevalcap" in result["meteor_unavailable"]


def test_meteor_can_be_skipped():
    result = metrics.score({"a": "a red car"}, {"a": ["the red car"]}, meteor=False)
    assert result["METEOR"] is None and "meteor=False" in result["meteor_unavailable"]


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({"a": "x"}, {"a": ["x"], "b": ["y"]}, "no prediction for id 'b'"),
        ({"a": "x", "c": "z"}, {"a": ["x"]}, "prediction for id 'c', which has no references"),
        ({"a": "x"}, {"a": []}, "references for id 'a'"),
        ({"a": ["x"]}, {"a": ["x"]}, "prediction for id 'a' is a list"),
        ({}, {}, "no captions"),
    ],
)
def test_mismatched_ids_raise(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        metrics.score(predictions, references, meteor=False)


def test_score_by_category_checks_categories():
    with pytest.raises(ValueError, match="no category for id 'b'"):
        metrics.score_by_category({"a": "x", "b": "y"}, {"a": ["x"], "b": ["y"]}, {"a": "Add"}, meteor=False)
    with pytest.raises(ValueError, match="reserved category name"):
        metrics.score_by_category({"a": "x"}, {"a": ["x"]}, {"a": metrics.OVERALL}, meteor=False)


def test_overall_equals_score_and_subsets_use_their_own_document_frequencies():
    overall = metrics.score(PREDICTIONS, REFERENCES, meteor=False)
    by_category = metrics.score_by_category(PREDICTIONS, REFERENCES, CATEGORIES, meteor=False)
    assert by_category[metrics.OVERALL] == overall
    add_only = {key: REFERENCES[key] for key in REFERENCES if CATEGORIES[key] == "Add"}
    alone = metrics.score({key: PREDICTIONS[key] for key in add_only}, add_only, meteor=False)
    assert by_category["Add"] == alone
