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


def test_export_demo_skips_finished_stages_and_resumes_an_interrupted_one(tiny_model, legacy_adapter, tmp_path,
                                                                           capsys, caplog, monkeypatch):
    """Stages 1 and 1b finished, stage 2 killed after a checkpoint: `python -m export demo` trains only what is left.

    The stages are tiny (the tiny model stands in for the stage-1b base) and the export is recorded, not run:
    the artifact build is tested on its own (tests/test_export.py).
    """
    import json
    import logging
    import shutil

    import export.build
    import export.demo as demo
    from export.__main__ import main

    out = tmp_path / "demo"
    shutil.copytree(tiny_model, out / "base")
    shutil.copytree(tiny_model, out / "stage1b" / "best")
    for stage in ("stage1", "stage1b"):
        (out / stage).mkdir(exist_ok=True)
        (out / stage / "done.json").write_text(json.dumps({"steps": 5000, "stopped": "max steps"}))
    built = []
    monkeypatch.setattr(export.build, "build_artifact", lambda *args, **kwargs: built.append((args, kwargs)) or args[1])
    monkeypatch.setattr(demo, "VAL_EXAMPLES", 4)
    stage2 = dict(mode="lora", rank=4, lr=1e-3, batch_size=2, val_every=1, patience=6, warmup_steps=0)

    def run(max_steps: int) -> str:
        monkeypatch.setattr(demo, "STAGE2", {**stage2, "max_steps": max_steps})
        with pytest.raises(SystemExit) as info:
            main(["demo", "--out", str(out)])
        captured = capsys.readouterr()
        assert not info.value.code and captured.out.strip() == str(out / "artifact")
        return captured.err

    err = run(1)
    assert "stage1: already trained" in err and "stage1b: already trained" in err
    assert not (out / "stage1" / "checkpoint").exists() and not (out / "stage1b" / "checkpoint").exists()
    assert json.loads((out / "stage2" / "done.json").read_text())["steps"] == 1
    (out / "stage2" / "done.json").unlink()  # killed after its checkpoint, before it was marked done
    err = run(2)
    assert "resumed from step 1" in err and "stage2: already trained" not in err
    assert [h["step"] for h in json.loads((out / "stage2" / "done.json").read_text())["history"]] == [1, 2]
    assert "stage2: already trained" in run(2)
    assert [args for args, _ in built] == [(out / "stage1b" / "best", out / "artifact", out / "stage2" / "best")] * 3
    assert all(kwargs == {"name": "idc-lite-demo", "force": True, "ship_reference": True,
                          "provenance": {"recipe": "demo", "seed": 0}} for _, kwargs in built)
    # The command's progress went to its stderr; afterwards the package's logs reach the caller's logging again.
    assert logging.getLogger("export").handlers == [] and logging.getLogger("export").propagate
    with caplog.at_level(logging.INFO, logger="export"):
        logging.getLogger("export").info("after the command")
    assert "after the command" in caplog.text
