"""The demo recipe's training data (export/demo.py): what each stage's examples show and say."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from export.demo import TRAIN_CATEGORIES, PairSource, SceneSource
from idc_lite.compose import compose_pair
from idc_lite.settings import CompositionSettings, ProcessorSettings
from idc_lite.tools.kinds import kind_of
from idc_lite.tools.synth import CATEGORIES, generate_pair

PROCESSOR = ProcessorSettings(height=32, width=32)


def test_compared_examples_are_a_pair_stacked_and_captioned_by_its_differences():
    pixels, captions = SceneSource("val", 0, PROCESSOR, compared=1.0).examples(3, 6)
    assert pixels.shape == (3, 3, 32, 32)
    for offset, caption in enumerate(captions):
        index = 3 + offset
        pair = generate_pair(index, seed=0, split="val", category=TRAIN_CATEGORIES[index % len(TRAIN_CATEGORIES)])
        assert caption == pair.differences and caption.startswith("differences: ")
        np.testing.assert_array_equal(pixels[offset], compose_pair(pair.before, pair.after, CompositionSettings(),
                                                                   PROCESSOR))


def test_stage_one_mixes_scenes_replay_and_compared_pairs_reproducibly():
    source = SceneSource("train", 0, PROCESSOR, replay=0.2, compared=0.5)
    pixels, captions = source.examples(0, 200)
    again_pixels, again_captions = source.examples(0, 200)
    assert captions == again_captions and np.array_equal(pixels, again_pixels)
    compared = sum(c.startswith("differences: ") for c in captions)
    scenes = sum(" background" in c and not c.startswith("differences: ") and c.startswith(("a ", "an "))
                 for c in captions)
    assert 70 <= compared <= 130 and scenes >= 35 and compared + scenes < 200  # the rest is language replay
    assert any(c == "differences: none" for c in captions)
    # Without compared pairs the same draws pick replay or a scene.
    plain = SceneSource("train", 0, PROCESSOR, replay=0.2).examples(0, 50)[1]
    assert not any(c.startswith("differences: ") for c in plain)
    with pytest.raises(ValueError, match="at most 1"):
        SceneSource("train", 0, PROCESSOR, replay=0.6, compared=0.6)


def test_stage_two_shows_pairs_with_one_of_their_change_references_add_and_none_twice_as_often():
    pixels, captions = PairSource("train", 0, PROCESSOR, categories=TRAIN_CATEGORIES).examples(0, 22)
    assert pixels.shape == (22, 3, 32, 32)
    for index, caption in enumerate(captions):
        category = TRAIN_CATEGORIES[index % len(TRAIN_CATEGORIES)]
        assert caption in generate_pair(index, seed=0, split="train", category=category).references
    counts = Counter(TRAIN_CATEGORIES)
    assert set(counts) == set(CATEGORIES) and counts["add"] == counts["none"] == 2
    assert all(counts[c] == 1 for c in CATEGORIES if c not in ("add", "none"))
    # Validation stays balanced: the split's own turn of categories.
    val = PairSource("val", 0, PROCESSOR).examples(0, 9)[1]
    assert [kind_of(c) for c in val] == list(CATEGORIES)


def test_export_demo_skips_finished_stages_and_resumes_an_interrupted_one(tiny_model, legacy_adapter, tmp_path,
                                                                           capsys, caplog, monkeypatch):
    """Stage 1 finished, stage 2 killed after a checkpoint: `python -m export demo` trains only what is left.

    The stages are tiny (the tiny model stands in for the stage-1 base) and the export is recorded, not run:
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
    shutil.copytree(tiny_model, out / "stage1" / "best")
    (out / "stage1" / "done.json").write_text(json.dumps({"steps": 6000, "stopped": "max steps"}))
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
    assert "stage1: already trained" in err and not (out / "stage1" / "checkpoint").exists()
    assert json.loads((out / "stage2" / "done.json").read_text())["steps"] == 1
    (out / "stage2" / "done.json").unlink()  # killed after its checkpoint, before it was marked done
    err = run(2)
    assert "resumed from step 1" in err and "stage2: already trained" not in err
    assert [h["step"] for h in json.loads((out / "stage2" / "done.json").read_text())["history"]] == [1, 2]
    assert "stage2: already trained" in run(2)
    assert [args for args, _ in built] == [(out / "stage1" / "best", out / "artifact", out / "stage2" / "best")] * 3
    assert all(kwargs == {"name": "idc-lite-demo", "force": True, "ship_reference": True,
                          "provenance": {"recipe": "demo", "seed": 0}} for _, kwargs in built)
    # The command's progress went to its stderr; afterwards the package's logs reach the caller's logging again.
    assert logging.getLogger("export").handlers == [] and logging.getLogger("export").propagate
    with caplog.at_level(logging.INFO, logger="export"):
        logging.getLogger("export").info("after the command")
    assert "after the command" in caplog.text


def _first_layer_attention(vision_model, pixels):
    """Layer 0's attention of the ViT on ``pixels``: its weights and its output, before the residual."""
    import torch

    layer = vision_model.encoder.layers[0]
    with torch.no_grad():
        hidden = layer.layer_norm1(vision_model.embeddings(torch.from_numpy(pixels)))
        return layer.self_attn(hidden)


def test_a_new_demo_model_starts_comparing_the_halves_of_a_pair():
    """The demo base's ViT starts with comparison heads (export.demo.init_comparison_heads): head 0 of layer 0
    attends to the same place in the other image, head 1 to the patch itself, and their output's difference
    dimensions are zero where the two images agree and largest where they differ. Its other weights and the
    query tokens start as a from-scratch model's, not at transformers' pre-trained-model defaults."""
    import torch
    from PIL import Image, ImageDraw
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from export.demo import DIFFERENCE_DIMS, IMAGE_SIZE, INIT_STD, NUM_QUERY_TOKENS, QFORMER, VISION, init_from_scratch

    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=dict(
        model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
        word_embed_proj_dim=32), num_query_tokens=NUM_QUERY_TOKENS)
    model = Blip2ForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")  # attention weights are read below
    init_from_scratch(model, seed=0)
    vision = model.vision_model
    layer1 = vision.encoder.layers[1].self_attn.qkv.weight.detach()
    assert abs(float(layer1.std()) - INIT_STD) < 0.2 * INIT_STD
    queries = model.query_tokens[0].detach()
    assert float(queries.std()) > 0.5 * INIT_STD and not bool((queries[0] == queries[1]).all())

    processor = ProcessorSettings(height=IMAGE_SIZE, width=IMAGE_SIZE)
    grid = IMAGE_SIZE // VISION["patch_size"]
    before = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE // 2), (235, 230, 220))
    ImageDraw.Draw(before).ellipse((10, 10, 40, 30), fill=(20, 60, 200))
    after = before.copy()
    # An object added in the after image, inside patch (row 3, column 7) of each half (16-pixel patches).
    ImageDraw.Draw(after).rectangle((114, 50, 124, 60), fill=(200, 30, 30))
    pixels = np.stack([compose_pair(before, before, CompositionSettings(), processor),
                       compose_pair(before, after, CompositionSettings(), processor)])
    output, weights = _first_layer_attention(vision, pixels)

    tokens = np.arange(1, 1 + grid * grid)
    rows = (tokens - 1) // grid
    counterpart = np.where(rows < grid // 2, tokens + grid * grid // 2, tokens - grid * grid // 2)
    assert float(weights[:, 0][:, tokens, counterpart].mean()) > 0.9
    assert float(weights[:, 1][:, tokens, tokens].mean()) > 0.9
    changed = sorted({3 * grid + 7, (3 + grid // 2) * grid + 7})  # the patch in the top half and in the bottom half
    # The layer's whole output: the changed patches carry the largest differences, above the other heads' noise.
    difference = output[:, 1:, DIFFERENCE_DIMS].norm(dim=-1).numpy()  # (pair, patch)
    assert sorted(np.argsort(difference[1])[-2:].tolist()) == changed
    assert difference[1][changed].min() > 3 * np.delete(difference[1], changed).max()
    assert difference[1][changed].min() > 3 * difference[0].max()

    # The comparison heads' own part (the other heads' output left out): zero wherever the images agree.
    head_dim = VISION["hidden_size"] // VISION["num_attention_heads"]
    with torch.no_grad():
        vision.encoder.layers[0].self_attn.projection.weight[:, 2 * head_dim:] = 0
    own = _first_layer_attention(vision, pixels)[0][:, 1:, DIFFERENCE_DIMS].norm(dim=-1).numpy()
    assert own[0].max() < 1e-4 and np.delete(own[1], changed).max() < 1e-4
    assert own[1][changed].min() > 1.0
