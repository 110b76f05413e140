"""Model and adapter loading, and the reference backend's generation."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from conftest import HUB_COMMIT, MAX_NEW_TOKENS, fake_hub_cache, make_adapter
from idc_lite import Captioner, GenerationSettings
from idc_lite.adapters import convert_legacy_adapter, find_adapter
from idc_lite.compose import compose_batch
from idc_lite.errors import AdapterError, ModelError
from idc_lite.loading import resolve_model_dir
from idc_lite.tools.modelgen import build_tiny_model

GEN = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)


def captions(captioner, pairs, batch_size=1, generation=GEN):
    return [r.caption for r in captioner.describe_batch(pairs, batch_size=batch_size, generation=generation)]


# --- the reference backend -------------------------------------------------------------------


def test_default_prefix_is_transformers_blip2_generate(reference, pairs):
    """No prompt: exactly what ``Blip2ForConditionalGeneration.generate(pixel_values)`` produces."""
    backend = reference.backend
    pixels = compose_batch(pairs, processor=backend.processor)
    ours = backend.generate(pixels, GEN)
    with torch.inference_mode():
        theirs = backend.net.generate(pixel_values=torch.from_numpy(pixels), max_new_tokens=MAX_NEW_TOKENS)
    prefix = backend.tokens.num_query_tokens + 1
    assert ours == theirs[:, prefix:].tolist()


def test_batch_equals_one_by_one(reference, pairs):
    single = captions(reference, pairs)
    assert len(set(single)) > 2, "the tiny model should say different things for different pairs"
    assert captions(reference, pairs, batch_size=4) == single
    assert captions(reference, pairs, batch_size=len(pairs)) == single


def test_beam_search_batch_equals_one_by_one(reference, pairs):
    beams = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
    single = captions(reference, pairs, generation=beams)
    assert captions(reference, pairs, batch_size=len(pairs), generation=beams) == single
    assert single != captions(reference, pairs), "beam search should change some captions"


def test_captions_end_at_eos_or_the_token_limit(reference, pairs):
    pixels = compose_batch(pairs, processor=reference.backend.processor)
    eos = reference.backend.tokens.eos_token_ids
    for limit in (1, 4):
        ids = reference.backend.generate(pixels, GenerationSettings(max_new_tokens=limit))
        assert all(len(seq) <= limit for seq in ids)
    ids = reference.backend.generate(pixels, GEN)
    ended = [seq for seq in ids if any(t in eos for t in seq)]
    assert ended and len(ended) < len(ids), "some captions end early, others run to the limit"


def test_greedy_choices_win_by_a_margin_no_cpu_can_flip(reference, adapted, pairs):
    """The premise of every exact caption comparison here: on the shared pairs each greedy token leads the
    runner-up by far more than the last-bit differences between CPUs, thread counts and batch sizes
    (about 1e-5 of these logits). After the first token the tiny model's chains lead by whole logits."""
    for captioner in (reference, adapted):
        backend = captioner.backend
        pixels = torch.from_numpy(compose_batch(pairs, processor=backend.processor))
        prefix = [backend.tokens.image_token_id] * backend.tokens.num_query_tokens + [backend.tokens.bos_token_id]
        eos = backend.tokens.eos_token_ids[0]
        for row, ids in enumerate(backend.generate(pixels.numpy(), GEN)):
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids  # the tokens chosen, then padding
            with torch.inference_mode():
                logits = backend.net(pixel_values=pixels[row:row + 1], input_ids=torch.tensor([prefix + ids])).logits
            top = logits[0, len(prefix) - 1:len(prefix) - 1 + len(ids)].topk(2).values
            gaps = (top[:, 0] - top[:, 1]).tolist()
            assert gaps[0] > 2e-3 and min(gaps[1:], default=2.0) >= 2.0, (row, gaps)


def test_prompt_changes_the_prefix_and_the_output(reference, pairs):
    prompted = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, prompt="the red circle")
    with_prompt = captions(reference, pairs, generation=prompted)
    assert with_prompt != captions(reference, pairs)
    assert captions(reference, pairs, batch_size=3, generation=prompted) == with_prompt


def test_result_fields(reference, pairs, tiny_model):
    result = reference.describe(*pairs[0])
    assert result.ok and result.backend == "reference" and result.model == str(tiny_model)
    assert result.timings.total_s > 0 and result.to_dict()["timings"]["total_s"] == result.timings.total_s


def test_describe_batch_returns_errors_in_place_when_asked(reference, pairs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    results = list(reference.describe_batch([pairs[0], (bad, pairs[1][1]), pairs[2]], batch_size=3, on_error="return"))
    assert [r.ok for r in results] == [True, False, True]
    assert "bad.png: not an image" in results[1].error
    assert [results[0].caption, results[2].caption] == captions(reference, [pairs[0], pairs[2]])


# --- model loading ---------------------------------------------------------------------------


def test_model_errors_name_the_model(tmp_path, tiny_model):
    cases = {}
    cases[tmp_path / "nothing"] = "no such model directory"
    (tmp_path / "file").write_text("x")
    cases[tmp_path / "file"] = "is a file"
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "empty"] = "no config.json"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases[bert] = "not a BLIP-2 model"
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "t5"}}))
    cases[t5] = "'t5' language model"
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases[pickled] = "pickled weights"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{not json")
    cases[broken / "config.json"] = "not valid JSON"
    for path, problem in cases.items():
        with pytest.raises(ModelError) as info:
            Captioner(path.parent if path.name == "config.json" else path)
        assert str(info.value).startswith(str(path)) and problem in str(info.value)


def test_hub_ids_resolve_through_the_offline_cache(tmp_path, tiny_model, monkeypatch):
    """A hub id is found in huggingface_hub's cache with HF_HUB_OFFLINE, at a branch or a revision."""
    snapshot = fake_hub_cache(tiny_model, tmp_path / "hub", monkeypatch)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_model_dir("acme/tiny-blip2") == snapshot
    assert resolve_model_dir("acme/tiny-blip2", revision=HUB_COMMIT) == snapshot
    assert Captioner("acme/tiny-blip2", local_files_only=True).model_id == "acme/tiny-blip2"
    with pytest.raises(ModelError, match="acme/other: not in the local hub cache"):
        resolve_model_dir("acme/other")
    with pytest.raises(ModelError, match="acme/tiny-blip2@v2: not in the local hub cache"):
        resolve_model_dir("acme/tiny-blip2", revision="v2")


# --- adapters --------------------------------------------------------------------------------


def test_legacy_and_peft_layouts_load_the_same_adapter(tiny_model, legacy_adapter, peft_adapter, reference, pairs):
    assert find_adapter(legacy_adapter).layout == "legacy" and find_adapter(peft_adapter).layout == "peft"
    legacy = captions(Captioner(tiny_model, legacy_adapter), pairs)
    assert legacy == captions(Captioner(tiny_model, peft_adapter), pairs)
    assert legacy != captions(reference, pairs), "the adapter must change the model"


def test_adapter_reaches_every_blip2idc_target(tiny_model, legacy_adapter):
    net = Captioner(tiny_model, legacy_adapter).backend.net
    names = [n for n, _ in net.named_modules() if n.endswith(".lora_A")]
    for target in ("vision_model.encoder.layers.0.self_attn.qkv", "crossattention.attention.query",
                   "attention.attention.key", "crossattention.attention.value", "self_attn.q_proj",
                   "self_attn.k_proj", "self_attn.v_proj"):
        assert any(target in n for n in names), target
    assert not any("self_attn.out_proj" in n or "attention.attention.query" in n and "crossattention" not in n
                   for n in names)


def test_merged_equals_unmerged(tiny_model, legacy_adapter, pairs):
    unmerged = Captioner(tiny_model, legacy_adapter).backend
    merged = Captioner(tiny_model, legacy_adapter, merge_adapter=True).backend
    assert not any("lora" in n for n, _ in merged.net.named_modules())
    pixels = torch.from_numpy(compose_batch(pairs, processor=merged.processor))
    ids = torch.tensor([[merged.tokens.image_token_id] * merged.tokens.num_query_tokens + [merged.tokens.bos_token_id]] * len(pairs))
    with torch.inference_mode():
        a = unmerged.net(pixel_values=pixels, input_ids=ids).logits
        b = merged.net(pixel_values=pixels, input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_legacy_adapter_converts_to_safetensors(legacy_adapter, tmp_path, tiny_model, pairs):
    converted = convert_legacy_adapter(legacy_adapter, tmp_path / "converted")
    assert find_adapter(converted).layout == "peft"
    assert captions(Captioner(tiny_model, converted), pairs[:2]) == captions(Captioner(tiny_model, legacy_adapter), pairs[:2])


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(legacy_adapter, tmp_path, tiny_model, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(legacy_adapter, evil)
    with open(evil / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x.lora_A.weight": Payload()}, fh)
    with pytest.raises(AdapterError, match="refused: not a plain tensor checkpoint"):
        Captioner(tiny_model, evil)
    assert "pwned" not in capsys.readouterr().out


def test_adapter_errors(tmp_path, tiny_model, legacy_adapter):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        Captioner(tiny_model, tmp_path / "nope")
    with pytest.raises(AdapterError, match="is a file"):
        Captioner(tiny_model, legacy_adapter / "adapter_config.json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(legacy_adapter / "adapter_config.json", no_weights)
    with pytest.raises(AdapterError, match="no adapter weights"):
        Captioner(tiny_model, no_weights)
    not_lora = tmp_path / "ia3"
    shutil.copytree(legacy_adapter, not_lora)
    config = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA"):
        Captioner(tiny_model, not_lora)


def test_adapter_for_another_model_does_not_fit(tmp_path, tiny_model, pairs):
    bigger = build_tiny_model(tmp_path / "bigger", hidden=48)
    adapter = make_adapter(bigger, tmp_path / "bigger-adapter", "legacy")
    with pytest.raises(AdapterError, match=f"does not fit {tiny_model}.*size mismatch"):
        Captioner(tiny_model, adapter)
    wrong_targets = make_adapter(tiny_model, tmp_path / "targets", "peft")
    config = json.loads((wrong_targets / "adapter_config.json").read_text())
    (wrong_targets / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["fc_nonexistent"]}))
    with pytest.raises(AdapterError, match="does not fit"):
        Captioner(tiny_model, wrong_targets)
