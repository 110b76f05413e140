"""Training: the loss, BLIP2IDC's LoRA config, checkpoints that resume exactly, early stopping, the CLI."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import MAX_NEW_TOKENS
from idc_lite import Captioner, GenerationSettings
from idc_lite.cli import main
from idc_lite.tools.datasets import read_jsonl
from idc_lite.errors import IdcError
from idc_lite.settings import CompositionSettings, ProcessorSettings
from idc_lite.tools.training import (CaptionBatcher, RecordSource, Trainer, TrainSettings, learning_rate_at,
                               validation_batches)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from idc_lite.tools.synth import write_dataset

    root = tmp_path_factory.mktemp("world")
    return write_dataset(root / "train", 12, split="train"), write_dataset(root / "val", 4, split="val")


def sources(tiny_model, world):
    processor = ProcessorSettings.from_model_dir(tiny_model)
    train = RecordSource(read_jsonl(world[0]), CompositionSettings(), processor, seed=0)
    val = validation_batches(RecordSource(read_jsonl(world[1]), CompositionSettings(), processor, shuffle=False), 4, 4)
    return train, val


def test_labels_cover_the_caption_and_eos_only(reference):
    tokens = reference.backend.tokens
    batcher = CaptionBatcher(reference.backend.tokenizer, tokens, max_caption_tokens=40)
    ids, mask, labels = batcher(["a red circle was added", "nothing changed"])
    prefix = tokens.num_query_tokens + 1
    assert (labels[:, :prefix] == -100).all()
    for row in range(2):
        n = int(mask[row].sum())
        assert (labels[row, prefix:n] == ids[row, prefix:n]).all() and labels[row, n - 1] == tokens.eos_token_ids[0]
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tokens.pad_token_id).all()


def test_padding_does_not_change_the_loss(tiny_model, world):
    """The loss of a padded batch is the token-weighted mean of each caption's own loss."""
    train, val = sources(tiny_model, world)
    trainer = Trainer(tiny_model, world[0].parent.parent / "unused", TrainSettings(mode="full"), train, val)
    trainer.net.eval()
    pixels, _ = train.examples(0, 2)
    captions = ["a small red circle was added in the lower right corner", "nothing changed"]
    with torch.inference_mode():
        joint = float(trainer._loss(pixels, captions))
        singles = [float(trainer._loss(pixels[i:i + 1], captions[i:i + 1])) for i in range(2)]
    counts = [int((trainer.batcher([c])[2] != -100).sum()) for c in captions]
    assert joint == pytest.approx(sum(l * n for l, n in zip(singles, counts)) / sum(counts), rel=1e-5)


def test_lora_follows_blip2idc_and_the_best_adapter_loads(tiny_model, world, tmp_path):
    train, val = sources(tiny_model, world)
    settings = TrainSettings(rank=4, lr=5e-3, batch_size=4, max_steps=4, val_every=2, warmup_steps=0)
    old = os.umask(0o022)
    try:
        summary = Trainer(tiny_model, tmp_path, settings, train, val).run()
    finally:
        os.umask(old)
    assert summary["steps"] == 4 and summary["stopped"] == "max steps"
    # safetensors writes 0600 and mkdtemp makes 0700: a run in a shared folder stays readable.
    for path in [*(tmp_path / "best").rglob("*"), *(tmp_path / "checkpoint").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    config = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (4, 8, 0.05, "none")
    assert {"qkv", "key", "value", "q_proj", "k_proj", "v_proj", "qformer.encoder.layer.0.crossattention.attention.query"} \
        <= set(config["target_modules"])
    saved = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    tuned = Captioner(tiny_model, tmp_path / "best", generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    loaded = {name: param for name, param in tuned.backend.net.named_parameters() if "lora_" in name}
    # PEFT starts B at zero: non-zero values are trained ones, and each is loaded where it belongs.
    assert len(loaded) == len(saved) and any("lora_B" in name and param.abs().max() > 0 for name, param in loaded.items())
    for name, param in loaded.items():
        key = "base_model.model." + name.removeprefix("base_model.model.").replace(".default.", ".")
        torch.testing.assert_close(param.detach(), saved[key], rtol=0, atol=0)
    pairs = [(r.before, r.after) for r in read_jsonl(world[1])]
    assert all(r.ok for r in tuned.describe_batch(pairs))


def test_training_reduces_the_loss(tiny_model, world, tmp_path):
    train, val = sources(tiny_model, world)
    trainer = Trainer(tiny_model, tmp_path, TrainSettings(mode="full", lr=3e-3, batch_size=4, max_steps=12,
                                                          val_every=12, warmup_steps=0), train, val)
    before = trainer.validate()
    trainer.run()
    assert trainer.validate() < 0.8 * before


def test_an_interrupted_run_resumes_exactly(tiny_model, world, tmp_path):
    train, val = sources(tiny_model, world)
    settings = dict(rank=4, lr=5e-3, batch_size=4, val_every=2, warmup_steps=2)
    Trainer(tiny_model, tmp_path / "straight", TrainSettings(max_steps=6, **settings), train, val).run()
    Trainer(tiny_model, tmp_path / "resumed", TrainSettings(max_steps=4, **settings), train, val).run()
    resumed = Trainer(tiny_model, tmp_path / "resumed", TrainSettings(max_steps=6, **settings), train, val)
    assert resumed.step == 4
    resumed.run()
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    with pytest.raises(IdcError, match="checkpoint of another training run"):
        Trainer(tiny_model, tmp_path / "resumed", TrainSettings(max_steps=6, **{**settings, "rank": 8}), train, val)


def test_a_resumed_cosine_run_follows_the_longer_schedule(tiny_model, world, tmp_path):
    """Given more steps on resume, the cosine decays to 0 at the new max_steps, not at the old one."""
    train, val = sources(tiny_model, world)
    settings = dict(rank=4, lr=5e-3, batch_size=4, val_every=2, warmup_steps=0, schedule="cosine")
    Trainer(tiny_model, tmp_path, TrainSettings(max_steps=2, **settings), train, val).run()
    longer = TrainSettings(max_steps=6, **settings)
    resumed = Trainer(tiny_model, tmp_path, longer, train, val)
    used = []
    step = resumed.optimizer.step
    resumed.optimizer.step = lambda *args: used.append(resumed.optimizer.param_groups[0]["lr"]) or step(*args)
    assert resumed.step == 2 and resumed.run()["steps"] == 6
    assert used == pytest.approx([learning_rate_at(longer, s) for s in range(2, 6)])
    assert min(used) > 0  # the 2-step schedule had reached 0 at step 2


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine():
    constant = TrainSettings(lr=1e-3, warmup_steps=4, max_steps=104)
    cosine = TrainSettings(lr=1e-3, warmup_steps=4, max_steps=104, schedule="cosine")
    for settings in (constant, cosine):
        assert [learning_rate_at(settings, step) for step in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert learning_rate_at(constant, 103) == 1e-3
    assert learning_rate_at(cosine, 4) == pytest.approx(1e-3)
    assert learning_rate_at(cosine, 54) == pytest.approx(5e-4)  # half-way through the decay
    assert learning_rate_at(cosine, 104) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_at(cosine, 500) == pytest.approx(0.0, abs=1e-12)  # past max_steps: stays at 0
    with pytest.raises(ValueError, match="schedule must be constant or cosine"):
        TrainSettings(schedule="linear")


def test_early_stopping_keeps_the_best_checkpoint(tiny_model, world, tmp_path):
    train, val = sources(tiny_model, world)
    settings = TrainSettings(mode="full", lr=1.0, batch_size=4, max_steps=20, val_every=1, patience=2, warmup_steps=0)
    summary = Trainer(tiny_model, tmp_path, settings, train, val).run()
    assert summary["stopped"] == "early stopping" and summary["steps"] < 20
    history = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["history"]
    assert summary["best_val_loss"] == min(h["val_loss"] for h in history)
    assert (tmp_path / "best" / "config.json").is_file()


def test_train_cli(tiny_model, world, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", str(world[0]), "-m", str(tiny_model), "-o", str(out), "--rank", "4", "--batch-size", "4",
              "--max-steps", "2", "--val-every", "1"])
    captured = capsys.readouterr()
    assert not info.value.code and captured.out.strip() == str(out / "best")
    assert "11 training pairs, 1 validation pairs; lr 5e-05" in captured.err
    assert (out / "best" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit) as info:  # the same command with more steps resumes at step 2
        main(["train", str(world[0]), "-m", str(tiny_model), "-o", str(out), "--rank", "4", "--batch-size", "4",
              "--max-steps", "3", "--val-every", "1"])
    err = capsys.readouterr().err
    assert not info.value.code and json.loads(err.splitlines()[-1])["steps"] == 3
    assert "step 3: loss" in err and "step 1: loss" not in err and "step 2: loss" not in err
    history = json.loads((out / "checkpoint" / "state.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    with pytest.raises(SystemExit) as info:  # seed Table 3: rank 32 trains at 1e-4
        main(["train", str(world[0]), "-m", str(tiny_model), "-o", str(tmp_path / "r32"), "--rank", "32",
              "--batch-size", "4", "--max-steps", "1"])
    assert not info.value.code and "11 training pairs, 1 validation pairs; lr 0.0001\n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", str(tmp_path / "none.jsonl"), "-m", str(tiny_model), "-o", str(out)])
    assert info.value.code == 2 and "none.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", str(world[0]), "-m", str(tiny_model), "-o", str(out), "--schedule", "step"])
    assert info.value.code == 2 and "schedule must be constant or cosine" in capsys.readouterr().err


FROZEN = ("vision_model.embeddings.position_embedding", "vision_model.encoder.layers.0.self_attn",
          "vision_model.embeddings.patch_embedding.weight[0:4]")


def test_frozen_weights_stay_as_built_in_full_and_lora_training(tiny_model, world, tmp_path):
    """``frozen`` keeps hand-built weights: not trained in full mode (named rows of a trained parameter
    too), no LoRA in LoRA mode; a run resumes."""
    from transformers import Blip2ForConditionalGeneration

    train, val = sources(tiny_model, world)
    settings = dict(mode="full", lr=5e-3, batch_size=4, val_every=2, warmup_steps=0, frozen=FROZEN)
    Trainer(tiny_model, tmp_path / "full", TrainSettings(max_steps=2, **settings), train, val).run()
    resumed = Trainer(tiny_model, tmp_path / "full", TrainSettings(max_steps=4, **settings), train, val)
    assert resumed.step == 2
    resumed.run()
    start = dict(Blip2ForConditionalGeneration.from_pretrained(tiny_model).named_parameters())
    trained = dict(Blip2ForConditionalGeneration.from_pretrained(tmp_path / "full" / "best").named_parameters())
    kept = [n for n in start if n.startswith(FROZEN[:2])]
    assert kept and all(torch.equal(start[n], trained[n]) for n in kept)
    patch = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(start[patch][:4], trained[patch][:4]) and not torch.equal(start[patch][4:], trained[patch][4:])
    assert not torch.equal(start["vision_model.encoder.layers.1.self_attn.qkv.weight"],
                           trained["vision_model.encoder.layers.1.self_attn.qkv.weight"])

    Trainer(tiny_model, tmp_path / "lora", TrainSettings(rank=4, max_steps=2, **{**settings, "mode": "lora"}),
            train, val).run()
    adapted = load_file(str(tmp_path / "lora" / "best" / "adapter_model.safetensors"))
    assert any("vision_model.encoder.layers.1.self_attn.qkv" in k for k in adapted)
    assert not any("vision_model.encoder.layers.0.self_attn" in k for k in adapted)

    for missing in ("vision_model.nowhere", "vision_model.embeddings[0:2]"):  # rows: of a parameter only
        with pytest.raises(IdcError, match=f"no weights named {re.escape(missing)}"):
            Trainer(tiny_model, tmp_path / "none", TrainSettings(frozen=(missing,)), train, val)
