"""The ONNX Runtime decoders (ort-fp32, ort-int4): parity with transformers' generate, int4 quality, integrity, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import MAX_NEW_TOKENS, random_pairs
from export.build import build_artifact, decoder_names
from export.errors import AtolError, ExportError, QuantizationError, ShapeError
from export.ort_decoder import default_block_size
from idc_lite import Captioner, GenerationSettings
from idc_lite.artifact import load_manifest
from idc_lite.backends.lite import DEFAULT_DECODERS
from idc_lite.backends.torch_decoder import load_torch_decoder
from idc_lite.compose import compose_batch
from idc_lite.decoding import generate_kwargs, inputs_embeds, prefix_ids
from idc_lite.errors import ArtifactError

GEN = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
BEAMS = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
PROMPT = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, prompt="the red circle")


@pytest.fixture(scope="session")
def ort_fp32(artifact):
    return Captioner(artifact, decoder="ort-fp32").backend


@pytest.fixture(scope="session")
def torch_fp32(artifact):
    return load_torch_decoder(artifact / "decoder", "torch-fp32", "cpu")


def torch_generate(language_model, query: np.ndarray, prefix, settings, tokens) -> list[list[int]]:
    with torch.inference_mode():
        embeds = inputs_embeds(language_model, torch.from_numpy(query), prefix)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs(settings, tokens))
    return out.tolist()


def captions(captioner, pairs, settings=GEN, batch_size=1):
    return [r.caption for r in captioner.describe_batch(pairs, batch_size=batch_size, generation=settings)]


def test_ort_fp32_is_token_identical_to_the_reference(artifact, ort_fp32, adapted, pairs):
    assert ort_fp32.decoder_name == "ort-fp32" and type(ort_fp32.decoder).__name__ == "OrtDecoder"
    pixels = compose_batch(pairs, processor=ort_fp32.processor)
    finished_early = 0
    for settings in (GEN, BEAMS, PROMPT, dataclasses.replace(BEAMS, prompt="the")):
        expected = adapted.backend.generate(pixels, settings)
        assert ort_fp32.generate(pixels, settings) == expected, settings
        finished_early += sum(row[-1] == ort_fp32.tokens.pad_token_id for row in expected)
    assert finished_early, "no caption ended before the others: the stopping rule was not exercised"


@pytest.fixture(scope="session")
def token_variants(ort_fp32, torch_fp32):
    """Query embeddings of 8 pairs, and token settings: the model's, two EOS ids, pad id 0."""
    query = ort_fp32.encode(compose_batch(random_pairs(8, seed=4), processor=ort_fp32.processor))
    tokens = ort_fp32.tokens
    plain = torch_generate(torch_fp32, query, [tokens.bos_token_id], GenerationSettings(max_new_tokens=24), tokens)
    common = next(t for t, _ in Counter(t for row in plain for t in row).most_common() if t not in (1, 2))
    return query, [tokens, dataclasses.replace(tokens, eos_token_ids=(*tokens.eos_token_ids, common)),
                   dataclasses.replace(tokens, pad_token_id=0)]


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_new_tokens=24), GenerationSettings(max_new_tokens=24, num_beams=4),
    GenerationSettings(max_new_tokens=32, num_beams=5), GenerationSettings(max_new_tokens=24, num_beams=2, prompt="the"),
], ids=["greedy-24", "beams4-24", "beams5-32", "beams2-prompt"])
def test_stopping_rules_match_transformers(ort_fp32, torch_fp32, token_variants, settings):
    """Longer runs; two EOS ids (3 x beams candidates a step); pad id 0 (beam search then fills with EOS)."""
    query, variants = token_variants
    for tokens in variants:
        prefix = prefix_ids(ort_fp32.tokenizer, tokens, settings.prompt)
        expected = torch_generate(torch_fp32, query, prefix, settings, tokens)
        assert ort_fp32.decoder.generate(query, prefix, settings, tokens) == expected, tokens


def first_token(backend, torch_fp32):
    """An ONNX Runtime decoder's first-token logits on 16 pairs, its cache after them, and the cosine similarity
    of the logits to the fp32 torch decoder's."""
    decoder = backend.decoder
    query = backend.encode(compose_batch(random_pairs(16, seed=3), processor=backend.processor))
    prefix = prefix_ids(backend.tokenizer, backend.tokens, None)
    rows, total = len(query), query.shape[1] + len(prefix)
    cache = decoder.new_cache(rows, total)
    logits = decoder._step(query, np.tile(prefix, (rows, 1)), total, np.arange(rows), cache)
    with torch.inference_mode():
        expected = torch_fp32(inputs_embeds=inputs_embeds(torch_fp32, torch.from_numpy(query), prefix)).logits[:, -1]
    return logits, cache, torch.nn.functional.cosine_similarity(torch.from_numpy(logits), expected, dim=-1)


@pytest.mark.parametrize("name", ["ort-int4", "ort-int4-fp16"])
def test_ort_int4_logits_stay_close_to_fp32(artifact, torch_fp32, adapted, pairs, record_property, name):
    lite = Captioner(artifact, decoder=name)
    decoder = lite.backend.decoder
    entry = load_manifest(artifact).decoders[name]
    assert entry.runtime == "onnxruntime" and entry.quantization["method"] == "onnxruntime-matmulnbits"
    import onnx
    from onnx import helper

    graph = onnx.load(str(artifact / entry.dir / entry.graph))
    bits = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.graph.node if n.op_type == "MatMulNBits"]
    # Every layer's six linear maps in int4; ort-int4's LM head in int8 (ort-int4-fp16 keeps an fp16 head).
    head = [8] if name == "ort-int4" else []
    assert sorted(bits) == [4] * 6 * entry.shape.layers + head and entry.embeddings["lm_head"] == ("int8" if head else "fp16")
    logits, cache, cosine = first_token(lite.backend, torch_fp32)
    assert cosine.min() >= 0.99, cosine
    # ort-int4-fp16 keeps its cache in fp16 (half the memory), the logits in fp32 for the search.
    half = name == "ort-int4-fp16"
    assert decoder.cache_dtype == (np.float16 if half else np.float32) and logits.dtype == np.float32
    assert {array.dtype for array in cache.arrays()} == {np.dtype(decoder.cache_dtype)}
    # int4 moves the first token's logits by about a hundredth of their spread and the tiny model keeps
    # every later token by several logits (idc_lite.tools.modelgen): all but a near-tie keep the reference's caption.
    same = np.mean([x == y for x, y in zip(captions(lite, pairs), captions(adapted, pairs))])
    record_property(f"{name}_identical_captions", same)
    assert same >= 0.7, f"{name}: {same:.0%} of the captions are the reference's"


@pytest.mark.parametrize("decoder", ["ort-fp32", "ort-int4", "ort-int4-fp16"])
def test_batch_equals_one_by_one(artifact, decoder, pairs):
    lite = Captioner(artifact, decoder=decoder)
    for settings in (GEN, BEAMS):
        assert captions(lite, pairs, settings, batch_size=len(pairs)) == captions(lite, pairs, settings)


def _unbound_steps(decoder, query, prefix, steps) -> list[np.ndarray]:
    """The logits of a prefill and decode steps run without binding: ONNX Runtime allocates every cache."""
    from idc_lite.artifact import DECODER_INPUTS as INPUTS

    rows, total = len(query), query.shape[1] + len(prefix)
    past = [np.zeros((rows, decoder.num_heads, 0, decoder.head_dim), dtype=decoder.cache_dtype)] * len(decoder.past)
    embeds, ids, beam_idx, out = query, np.tile(prefix, (rows, 1)), np.arange(rows), []
    for order in [None, *steps]:
        if order is not None:
            beam_idx, embeds, ids = order, decoder._no_embeds(len(order)), out[-1].argmax(-1)[order, None]
            total += 1
        feeds = dict(zip(INPUTS, (embeds, ids, np.ones((len(ids), total), dtype=np.int64), beam_idx)))
        logits, *past = decoder.session.run(None, {**feeds, **dict(zip(decoder.past, past))})
        out.append(logits)
    return out


def test_the_cache_turns_through_one_slot_per_layer_and_a_spare(ort_fp32, pairs):
    """A step writes layer j's present where layer j - 1's past was; the logits are those of unbound runs."""
    from idc_lite.backends.ort_decoder import KVCache

    decoder = ort_fp32.decoder
    query = ort_fp32.encode(compose_batch(pairs[:3], processor=ort_fp32.processor))
    prefix = prefix_ids(ort_fp32.tokenizer, ort_fp32.tokens, None)
    rows, total = len(query), query.shape[1] + len(prefix)
    # Rows reordered and dropped, as beam search and greedy do; the cache grows at the third step.
    steps = [np.array([2, 0, 1]), np.array([1, 2, 0]), np.array([0, 2, 1]), np.array([1, 0])]
    expected = _unbound_steps(decoder, query, prefix, steps)
    cache = decoder.new_cache(rows, total + 2)
    assert cache.slots == decoder.num_layers + 1
    got = [decoder._step(query, np.tile(prefix, (rows, 1)), total, np.arange(rows), cache)]
    assert (cache.rows, cache.length) == (rows, total)
    pool, sizes = set(cache.past_pointers()), cache.sizes()  # the spare slot's pointers are added at the first step
    prefill = cache.arrays()
    for index, order in enumerate(steps):
        before = cache.past_pointers()
        got.append(decoder._step(decoder._no_embeds(len(order)), got[-1].argmax(-1)[order, None], total + index + 1,
                                 order, cache))
        after = cache.past_pointers()
        if index == 0:
            pool |= set(after)
        if index != 2:  # layer j's present is where layer j - 1's past was, layer 0's in the spare slot
            assert after[2:] == before[:-2] and not set(after[:2]) & set(before)
        if index < 2:  # and until the cache grows, nothing is allocated
            assert set(after) <= pool
        if index == 0:
            for old, new in zip(prefill, cache.arrays()):  # the kept rows' past, then the new position
                assert new.shape == (rows, old.shape[1], total + 1, old.shape[3])
                np.testing.assert_array_equal(new[:, :, :total], old[order])
    # It grew once (the slots written from the third step on), with room for GROWTH more positions ...
    position = decoder.num_heads * decoder.head_dim
    assert len(pool) == 2 * cache.slots and sizes == [rows * (total + 2) * position] * cache.slots
    assert sorted(cache.sizes()) == [rows * (total + 2) * position] + [rows * (total + 3 + KVCache.GROWTH) * position] * (cache.slots - 1)
    assert cache.length == total + len(steps) < total + KVCache.GROWTH
    for one, other in zip(got, expected):  # ... and no step overwrote a past before reading it
        np.testing.assert_allclose(one, other, rtol=1e-5, atol=1e-5)


def _cuda_available() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("name", ["ort-fp32", "ort-int4-fp16"])
def test_cuda_keeps_the_cache_on_the_device(artifact, ort_fp32, pairs, name):
    cuda = Captioner(artifact, device="cuda", decoder=name).backend
    on_cpu = ort_fp32 if name == "ort-fp32" else Captioner(artifact, device="cpu", decoder=name).backend
    decoder = cuda.decoder
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    assert decoder.session.get_providers()[0] == "CUDAExecutionProvider" and decoder.device_type == "cuda"
    query = ort_fp32.encode(compose_batch(pairs, processor=cuda.processor))
    prefix = prefix_ids(cuda.tokenizer, cuda.tokens, None)
    rows, total = len(query), query.shape[1] + len(prefix)

    def prefill(ort_decoder):
        cache = ort_decoder.new_cache(rows, total + 1)
        return ort_decoder._step(query, np.tile(prefix, (rows, 1)), total, np.arange(rows), cache), cache

    logits, cache = prefill(decoder)
    assert cache.device == "cuda"
    step = decoder._step(decoder._no_embeds(rows), logits.argmax(-1)[:, None], total + 1,
                         np.arange(rows)[::-1].copy(), cache)  # a reordered cache, gathered on the GPU
    assert cache.device == "cuda" and step.shape == logits.shape and cache.length == total + 1
    past = cache.arrays()
    expected = prefill(on_cpu.decoder)[0]
    if name == "ort-fp32":
        assert np.allclose(logits, expected, atol=1e-2, rtol=1e-3)
    else:  # fp16 kernels differ between the providers more than fp32 ones
        cosine = (logits * expected).sum(-1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(expected, axis=-1))
        assert cosine.min() >= 0.999 and {array.dtype for array in past} == {np.dtype(np.float16)}
    for settings in (GEN, BEAMS):
        got = decoder.generate(query, prefix, settings, cuda.tokens)
        assert len(got) == rows and len({len(row) for row in got}) == 1 and len(got[0]) <= MAX_NEW_TOKENS


def test_cuda_options_and_a_cpu_fallback_is_said(artifact, caplog):
    import onnxruntime as ort

    from idc_lite.backends.sessions import CUDA_OPTIONS, open_session, session_providers as encoder_providers

    assert encoder_providers("cpu") == ["CPUExecutionProvider"]
    assert encoder_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert encoder_providers("cuda:1") == ["CPUExecutionProvider"]
    else:
        assert encoder_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1, **CUDA_OPTIONS})
    if _cuda_available():
        session = open_session(artifact / "encoder.onnx", "cuda")
        assert session.get_providers()[0] == "CUDAExecutionProvider"
        return
    # No usable GPU: the session still opens, on the CPU, and says so rather than running slowly unannounced.
    with caplog.at_level("WARNING", logger="idc_lite"):
        session = open_session(artifact / "encoder.onnx", "cuda")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "encoder.onnx: runs on the CPU, not cuda" in caplog.text


def test_cpu_sessions_skip_the_arena_and_encode_one_image_at_a_time(artifact, pairs, monkeypatch):
    from idc_lite.backends import lite

    backend = Captioner(artifact, device="cpu").backend
    assert backend.session.get_session_options().enable_cpu_mem_arena is False
    pixels = compose_batch(pairs[:3], processor=backend.processor)
    runs = []
    real_run = backend.session.run
    monkeypatch.setattr(backend.session, "run", lambda *args: runs.append(args[1]) or real_run(*args))
    one_by_one = backend.encode(pixels)
    assert [len(feed[backend.manifest.encoder.input]) for feed in runs] == [1, 1, 1]
    monkeypatch.setattr(lite, "CPU_ENCODER_BATCH", 8)
    np.testing.assert_allclose(one_by_one, backend.encode(pixels), rtol=1e-4, atol=1e-5)
    assert len(runs) == 4  # the whole batch in one run


def test_cli_selects_the_ort_decoder(artifact, pairs, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import idc_lite.backends.lite as lite
    from idc_lite.cli import main

    opened = []
    real = lite.load_ort_decoder
    def recording(manifest, name, *args, **kwargs):
        opened.append(manifest.decoders[name].dir)
        return real(manifest, name, *args, **kwargs)

    monkeypatch.setattr(lite, "load_ort_decoder", recording)
    Image.fromarray(pairs[0][0]).save(tmp_path / "b.png")
    Image.fromarray(pairs[0][1]).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        main(["describe", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "-m", str(artifact), "--decoder", "ort-int4",
              "--json", "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1"])
    record = json.loads(capsys.readouterr().out)
    assert not info.value.code and record["backend"] == "lite" and opened == ["ort-int4"]
    assert record["caption"] == Captioner(artifact, decoder="ort-int4").describe(*pairs[0], GEN).caption
    with pytest.raises(SystemExit) as info:
        main(["info", str(artifact), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not info.value.code and report["plan"]["decoder"] == "ort-int4"  # the CPU default when present


def test_damaged_ort_decoder_is_caught_before_any_session(artifact, tmp_path, monkeypatch):
    import idc_lite.backends.lite as lite

    def refuse(*args, **kwargs):
        raise AssertionError("a session or model was built from a damaged artifact")

    for name in ("open_session", "load_ort_decoder"):
        monkeypatch.setattr(lite, name, refuse)
    tampered = tmp_path / "tampered"
    shutil.copytree(artifact, tampered)
    graph = tampered / "ort-int4" / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        Captioner(tampered, backend="lite", decoder="ort-int4")
    missing = tmp_path / "missing"
    shutil.copytree(artifact, missing)
    (missing / "ort-fp32" / "decoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing from the artifact"):
        Captioner(missing, backend="lite", decoder="ort-fp32")


def test_export_validation_raises_typed_errors(artifact, tiny_model, ort_fp32, monkeypatch, tmp_path):
    import export.ort_decoder as ort_export
    from export.ort_decoder import CachedDecoder, expected_outputs, validate_graph, validation_cases

    plain = Captioner(tiny_model).backend.net.language_model.float().eval()  # without the adapter
    module = CachedDecoder(plain).eval()
    query = torch.from_numpy(ort_fp32.encode(compose_batch(random_pairs(2), processor=ort_fp32.processor)))
    cases = validation_cases(module, query, [ort_fp32.tokens.bos_token_id])
    graph = artifact / "ort-fp32" / "decoder.onnx"
    with pytest.raises(AtolError, match="exceeds the fp32 tolerance"):
        validate_graph(expected_outputs(module, cases), graph, cases, "fp32")  # the un-adapted decoder differs

    class Wrong(torch.nn.Module):
        def forward(self, embeds, ids, mask, beam_idx, *past):
            return (torch.zeros(ids.shape[0], 3), *past)

    with pytest.raises(ShapeError, match="output logits has shape"):
        validate_graph(expected_outputs(Wrong(), cases), graph, cases, "fp32")
    monkeypatch.setitem(ort_export.MIN_COSINE, "int4", 1.01)
    with pytest.raises(QuantizationError, match=r"ort-int4 logits cosine similarity 0\.\d+ < 1.01"):
        ort_export.export_ort_decoder(plain, tmp_path, "int4", query, [ort_fp32.tokens.bos_token_id])
    assert not (tmp_path / "ort-int4").exists()


def test_a_tied_head_gets_an_int8_matmul_of_its_own_and_fp16_keeps_it_shared(artifact, ort_fp32, artifact_int4,
                                                                              monkeypatch, tmp_path):
    """Real OPT ties its LM head to the token table. ort-int4's int8 head must then be a MatMulNBits on
    its own initializer, the fp16 table read by the lookup alone and stored by rows (a token's
    embedding in one place, not spread over every row of a transposed table); ``head_precision="fp16"`` keeps the
    one shared fp16 table, and ort-int4-fp16 takes no int8 head. By default a head is int8 from
    ``INT8_HEAD_MIN_WEIGHTS`` weights on: the tiny model's default build keeps its small head in fp16."""
    import export.ort_decoder as ort_export
    import onnx
    from onnx import helper

    from export.ort_decoder import export_ort_decoder

    def tied_decoder():
        language_model = load_torch_decoder(artifact / "decoder", "torch-fp32", "cpu")
        language_model.lm_head.weight = language_model.get_input_embeddings().weight  # OPT's tying
        return language_model

    query = torch.from_numpy(ort_fp32.encode(compose_batch(random_pairs(2), processor=ort_fp32.processor)))
    prefix = [ort_fp32.tokens.bos_token_id]
    assert load_manifest(artifact_int4).decoders["ort-int4"].embeddings["lm_head"] == "fp16"
    monkeypatch.setattr(ort_export, "INT8_HEAD_MIN_WEIGHTS", tied_decoder().lm_head.weight.numel())
    readers = {}
    for head, chosen in (("int8", None), ("fp16", "fp16")):  # int8: the default for a head of that size
        name, entry = export_ort_decoder(tied_decoder(), tmp_path / head, "int4", query, prefix, head_precision=chosen)
        assert entry["embeddings"] == {"precision": "fp16", "tied_lm_head": True, "lm_head": head}
        assert entry["validation"]["logits_cosine_min"] >= 0.99
        graph = onnx.load(str(tmp_path / head / name / "decoder.onnx"), load_external_data=False).graph
        table = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in
                     {init.name for init in graph.initializer})
        readers[head] = sorted(n.op_type for n in graph.node if table in n.input)
        dims = next(list(init.dims) for init in graph.initializer if init.name == table)
        gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == table)
        axis = helper.get_attribute_value(next(a for a in gather.attribute if a.name == "axis"))
        vocab, hidden = tied_decoder().get_input_embeddings().weight.shape
        assert (dims, axis) == (([vocab, hidden], 0) if head == "int8" else ([hidden, vocab], 1))
        bits = {helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
                for n in graph.node if n.op_type == "MatMulNBits"}
        assert bits == ({4, 8} if head == "int8" else {4})
    assert readers == {"int8": ["Gather"], "fp16": ["Gather", "MatMul"]}
    with pytest.raises(ExportError, match="may be fp16, not 'int8'"):
        export_ort_decoder(tied_decoder(), tmp_path / "half", "int4-fp16", query, prefix, head_precision="int8")


def test_manifest_entries_and_decoder_choice(artifact):
    decoders = load_manifest(artifact).decoders
    assert list(decoders) == ["torch-fp32", "ort-fp32", "ort-int4", "ort-int4-fp16"]
    fp32, int4, half = decoders["ort-fp32"], decoders["ort-int4"], decoders["ort-int4-fp16"]
    assert (fp32.activations, int4.activations, half.activations) == ("fp32", "fp32", "fp16")
    assert half.precision == "int4-fp16" and half.embeddings["lm_head"] == "fp16"
    assert half.quantization == {**{k: v for k, v in int4.quantization.items() if k != "lm_head"},
                                 "not_quantized": ["embedding table / lm_head"]}
    # The first of the device's defaults that the artifact holds: fp16 activations on CUDA, fp32 on CPUs.
    assert [next(d for d in DEFAULT_DECODERS[kind] if d in decoders) for kind in ("cuda", "cpu")] == [
        "ort-int4-fp16", "ort-int4"]
    assert Captioner(artifact, device="cpu").backend.decoder_name == "ort-int4"
    assert fp32.validation["max_abs_diff"] <= fp32.validation["tolerance"]
    assert fp32.embeddings["precision"] == "fp32" and fp32.quantization is None
    assert int4.validation["logits_cosine_min"] >= int4.validation["threshold"] == 0.99
    # the tiny model's head is untied; ort-int4's head is int8 (MatMulNBits), its table fp16
    assert int4.embeddings == {"precision": "fp16", "tied_lm_head": False, "lm_head": "int8"}
    assert int4.quantization == {"method": "onnxruntime-matmulnbits", "bits": 4, "block_size": 32, "symmetric": False,
                                    "accuracy_level": 4, "not_quantized": ["embedding table"],
                                    "lm_head": {"bits": 8, "block_size": 32, "symmetric": False}}
    # blocks of 32 for this narrow model; of 128 for a wide ort-int4 (OPT-2.7B: 2560), never for CUDA's
    assert [default_block_size(p, h) for p, h in (("int4", 64), ("int4", 2560), ("int4-fp16", 2560))] == [32, 128, 32]
    assert decoder_names() == ("bnb-int4", "ort-int4") and decoder_names("fp32") == ("torch-fp32",)
    assert decoder_names(decoders=["ort-int4", "torch-fp32", "ort-int4"]) == ("ort-int4", "torch-fp32")
    for bad, message in (((None, ["bnb-int4", "torch-fp32"]), "at most one torch decoder"),
                         (("int4", ["ort-int4"]), "not both"), ((None, ["ort-int8"]), "not ort-int8")):
        with pytest.raises(ExportError, match=message):
            decoder_names(*bad)


def test_export_cli_takes_repeated_decoders(monkeypatch, tmp_path):
    import export.build
    from export.__main__ import main

    seen = {}
    monkeypatch.setattr(export.build, "build_artifact", lambda *args, **kwargs: seen.update(kwargs) or tmp_path)
    for args, decoders, precision in ((["--decoder", "bnb-int4", "--decoder", "ort-int4"], ["bnb-int4", "ort-int4"], None),
                                      (["--decoder-precision", "fp32"], None, "fp32")):
        with pytest.raises(SystemExit) as info:
            main(["build", "--base", "some/model", "--out", str(tmp_path), *args])
        assert not info.value.code and seen["decoders"] == decoders and seen["decoder_precision"] == precision
    with pytest.raises(SystemExit) as info:
        main(["build", "--base", "some/model", "--out", str(tmp_path), "--ort-block-size", "64", "--ort-symmetric",
              "--ort-head", "fp16"])
    assert not info.value.code and (seen["ort_block_size"], seen["ort_symmetric"], seen["ort_head"]) == (64, True, "fp16")


def test_ort_int4_block_size_and_symmetry_are_chosen_at_export(artifact, ort_fp32, torch_fp32, tmp_path):
    """The quantization ONNX Runtime's CUDA weight-only GEMM takes (symmetric, blocks of 64) can be asked for.
    (The decoder alone is exported, from the artifact's merged torch decoder: no encoder to rebuild.)"""
    import onnx
    from onnx import helper

    from export.ort_decoder import export_ort_decoder

    query = torch.from_numpy(ort_fp32.encode(compose_batch(random_pairs(2), processor=ort_fp32.processor)))
    merged = load_torch_decoder(artifact / "decoder", "torch-fp32", "cpu")
    name, entry = export_ort_decoder(merged, tmp_path, "int4-fp16", query, [ort_fp32.tokens.bos_token_id],
                                     block_size=64, symmetric=True)
    assert (entry["quantization"]["block_size"], entry["quantization"]["symmetric"]) == (64, True)
    assert entry["validation"]["logits_cosine_min"] >= 0.99
    nodes = [n for n in onnx.load(str(tmp_path / name / entry["graph"])).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")) == 64
                         for n in nodes)
    assert all(len(n.input) < 4 or not n.input[3] for n in nodes)  # symmetric: no zero points
    from types import SimpleNamespace

    from idc_lite.backends.ort_decoder import OrtDecoder
    from idc_lite.backends.sessions import open_session

    decoder = OrtDecoder(open_session(tmp_path / name / entry["graph"], "cpu"), ort_fp32.decoder.shape)
    backend = SimpleNamespace(decoder=decoder, encode=ort_fp32.encode, processor=ort_fp32.processor,
                              tokenizer=ort_fp32.tokenizer, tokens=ort_fp32.tokens)  # ort_fp32's encoder, this decoder
    assert first_token(backend, torch_fp32)[2].min() >= 0.99


def test_decoder_layers_are_exported_as_matmuls_on_stored_transposes(artifact, torch_fp32):
    """Every layer's Linear reaches the graph as MatMul on an (in, out) initializer, with no Gemm to
    rewrite: the rewrite copied every weight into an in-memory protobuf, the export's memory peak."""
    import onnx

    from export.ort_decoder import MatMulLinear, linears_as_matmuls

    graph = onnx.load(str(artifact / "ort-fp32" / "decoder.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    layer = torch_fp32.model.decoder.layers[0]
    assert "Gemm" not in ops and "MatMulNBits" not in ops
    assert shapes["model.decoder.layers.0.fc1.weight_t"] == list(layer.fc1.weight.shape[::-1])
    # The same function as nn.Linear, on 2-D and 3-D inputs.
    copy = type(torch_fp32)(torch_fp32.config).eval()
    copy.load_state_dict(torch_fp32.state_dict())
    linears_as_matmuls(copy)
    moved = copy.model.decoder.layers[0]
    assert isinstance(moved.fc1, MatMulLinear) and isinstance(moved.self_attn.q_proj, MatMulLinear)
    for shape in ((5, layer.fc1.in_features), (2, 3, layer.fc1.in_features)):
        x = torch.randn(*shape)
        torch.testing.assert_close(moved.fc1(x), layer.fc1(x), rtol=1e-5, atol=1e-6)


def test_decoder_graphs_read_each_past_once(artifact, tmp_path):
    """The cache writes a layer's present over the past of the layer below: the export checks each past is
    read by one Gather (and Shapes); the embedded model's decoder passes that check too."""
    import onnx

    from export.ort_decoder import check_past_reads
    from idc_lite.default_model import default_model_dir

    for name in ("ort-fp32", "ort-int4", "ort-int4-fp16"):
        check_past_reads(artifact / name / "decoder.onnx")
    check_past_reads(default_model_dir() / "ort-int4" / "decoder.onnx")
    model = onnx.load(str(artifact / "ort-fp32" / "decoder.onnx"), load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Identity", ["past.1.value"], ["late_read"]))
    onnx.save_model(model, str(tmp_path / "decoder.onnx"))
    with pytest.raises(ExportError, match=r"reads past\.1\.value with Gather, Identity"):
        check_past_reads(tmp_path / "decoder.onnx")


def test_a_weight_quantized_in_slices_is_the_same_as_whole():
    """The int8 LM head is quantized a slice of output columns at a time, from a transposed view of
    torch's weight (memory); joined, the slices must be exactly the whole weight's quantization by
    ONNX Runtime's quantizer, and run as it does."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.graph_ops import quantize_int4, quantize_weight

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((261, 64)).astype(np.float32).T  # (K, N) as a view, as the head's is

    def model(node, initializers):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["h"], name="relu"), node],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 261])], initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    plain = model(helper.make_node("MatMul", ["h", "w"], ["y"], name="head"),
                  [numpy_helper.from_array(np.ascontiguousarray(weight), "w")])
    whole = quantize_int4(plain, "g", 32, False, 4, bits=8)
    sliced = model(*quantize_weight(weight, "h", "y", "head", "w", "g", 8, 32, False, 4, chunk_bytes=64 * 4 * 50))
    arrays = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (whole, sliced)]
    assert arrays[0].keys() == arrays[1].keys() and "w" not in arrays[0]
    assert all(np.array_equal(arrays[0][k], arrays[1][k]) for k in arrays[0])  # six slices, joined
    assert [n.op_type for n in sliced.graph.node] == ["Relu", "MatMulNBits"]
    onnx.checker.check_model(sliced)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
               for m in (whole, sliced)]
    expected = np.maximum(x, 0) @ weight
    assert np.array_equal(outputs[0], outputs[1])
    assert np.linalg.norm(outputs[1] - expected) / np.linalg.norm(expected) < 0.02  # int8: about 1% error
