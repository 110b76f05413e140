"""Export toolchain and lite backend: parity with the reference, validation, artifact integrity."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import MAX_NEW_TOKENS, random_pairs
from export.build import build_artifact
from export.encoder import TOLERANCES, QueryEncoder, validate_encoder
from export.errors import AtolError, ExportError, QuantizationError, ShapeError
from idc_lite import Captioner, GenerationSettings
from idc_lite.artifact import load_manifest
from idc_lite.backends.torch_decoder import load_torch_decoder
from idc_lite.compose import compose_batch
from idc_lite.decoding import inputs_embeds, prefix_ids
from idc_lite.errors import ArtifactError

GEN = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)


def captions(captioner, pairs, batch_size=1):
    return [r.caption for r in captioner.describe_batch(pairs, batch_size=batch_size, generation=GEN)]


def test_fp32_artifact_is_token_identical_to_the_reference(artifact, adapted, pairs):
    lite = Captioner(artifact, decoder="torch-fp32")
    assert lite.backend.name == "lite" and lite.backend.decoder_name == "torch-fp32"
    pixels = compose_batch(pairs, processor=lite.backend.processor)
    assert lite.backend.generate(pixels, GEN) == adapted.backend.generate(pixels, GEN)
    assert captions(lite, pairs, batch_size=4) == captions(adapted, pairs)


def test_prompt_and_beams_match_the_reference(artifact, adapted, pairs):
    lite = Captioner(artifact, decoder="torch-fp32")
    pixels = compose_batch(pairs, processor=lite.backend.processor)
    for settings in (GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, num_beams=3),
                     GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, prompt="the red circle")):
        assert lite.backend.generate(pixels, settings) == adapted.backend.generate(pixels, settings)


def test_onnx_encoder_matches_torch(artifact, tiny_model, legacy_adapter, pairs):
    lite = Captioner(artifact).backend
    merged = Captioner(tiny_model, legacy_adapter, merge_adapter=True).backend
    pixels = compose_batch(pairs, processor=lite.processor)
    with torch.inference_mode():
        expected = QueryEncoder(merged.net).eval()(torch.from_numpy(pixels)).numpy()
    got = lite.encode(pixels)
    atol, rtol = TOLERANCES["fp32"]
    assert got.shape == expected.shape == (len(pairs), merged.tokens.num_query_tokens, 64)
    assert np.abs(got - expected).max() <= atol + rtol * np.abs(expected).max()
    validation = load_manifest(artifact).encoder.validation
    assert validation["max_abs_diff"] <= validation["tolerance"] and validation["inputs_checked"] >= 3


def test_int4_decoder_logits_stay_close_to_fp32(artifact, artifact_int4, adapted, pairs, record_property):
    lite = Captioner(artifact_int4, decoder="bnb-int4")
    assert lite.backend.decoder_name == "bnb-int4"
    full = load_torch_decoder(artifact / "decoder", "torch-fp32", "cpu")
    quantized = lite.backend.decoder
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    pixels = compose_batch(random_pairs(16, seed=3), processor=lite.backend.processor)
    query = torch.from_numpy(lite.backend.encode(pixels))
    prefix = prefix_ids(lite.backend.tokenizer, lite.backend.tokens, None)
    with torch.inference_mode():
        a = full(inputs_embeds=inputs_embeds(full, query, prefix)).logits[:, -1]
        b = quantized(inputs_embeds=inputs_embeds(quantized, query, prefix)).logits[:, -1]
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.min() >= 0.99, cosine
    # int4 moves the first token's logits by about a hundredth of their spread and the tiny model keeps
    # every later token by several logits (idc_lite.tools.modelgen): all but a near-tie keep the reference's caption.
    same = np.mean([x == y for x, y in zip(captions(lite, pairs), captions(adapted, pairs))])
    record_property("int4_identical_captions", same)
    assert same >= 0.7, f"{same:.0%} of the captions are the reference's"


@pytest.mark.parametrize("decoder", ["torch-fp32", "bnb-int4"])
def test_lite_batch_equals_one_by_one(decoder, artifact, artifact_int4, pairs):
    lite = Captioner(artifact if decoder == "torch-fp32" else artifact_int4, decoder=decoder)
    assert captions(lite, pairs, batch_size=len(pairs)) == captions(lite, pairs)


def test_manifest_records_provenance_and_settings(artifact_int4, tiny_model, legacy_adapter):
    from idc_lite.hashing import file_sha256

    data = load_manifest(artifact_int4).data
    assert data["format"] == "idc-lite-artifact" and data["format_version"] == 1
    assert data["provenance"]["base"]["id"] == str(tiny_model)
    assert data["provenance"]["adapter"]["sha256"] == file_sha256(legacy_adapter / "adapter_model.bin")
    assert data["provenance"]["adapter"]["path"] == str(legacy_adapter)
    assert not list(artifact_int4.parent.glob("*.merged")), "the merged weights are a build intermediate"
    assert data["generation"] == {"max_new_tokens": 77, "num_beams": 1, "prompt": None}
    assert data["composition"]["size_policy"] == "smallest"
    assert data["decoders"]["bnb-int4"]["quantization"]["quant_type"] == "nf4"
    files = {p.relative_to(artifact_int4).as_posix() for p in artifact_int4.rglob("*") if p.is_file()}
    assert set(data["files"]) == files - {"manifest.json"}


def _broken_copies(artifact, tmp_path):
    """(artifact dir, expected message) for each way an artifact can be damaged."""
    cases = []

    def copy(name):
        target = tmp_path / name
        shutil.copytree(artifact, target)
        return target

    tampered = copy("tampered")
    data = bytearray((tampered / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "encoder.onnx").write_bytes(bytes(data))
    cases.append((tampered, f"{tampered / 'encoder.onnx'}: sha256 does not match"))
    truncated = copy("truncated")
    weights = truncated / "decoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases.append((truncated, f"{weights}: truncated or altered: 1000 bytes"))
    missing = copy("missing")
    (missing / "tokenizer.json").unlink()
    cases.append((missing, f"{missing / 'tokenizer.json'}: missing from the artifact"))
    version = copy("version")
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    cases.append((version, "artifact format version 99"))
    no_manifest = copy("no-manifest")
    (no_manifest / "manifest.json").write_text("{oops")
    cases.append((no_manifest, "unreadable manifest"))
    return cases


def test_damaged_artifacts_are_caught_before_any_model_is_built(artifact_int4, tmp_path, monkeypatch):
    import idc_lite.backends.lite as lite

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from a damaged artifact")

    monkeypatch.setattr(lite, "open_session", refuse)
    monkeypatch.setattr(lite, "load_ort_decoder", refuse)
    for path, message in _broken_copies(artifact_int4, tmp_path):
        with pytest.raises(ArtifactError) as info:
            Captioner(path, backend="lite")
        assert message in str(info.value)


def test_artifact_refuses_an_extra_adapter_and_unknown_decoders(artifact_int4, legacy_adapter):
    from idc_lite.errors import AdapterError

    with pytest.raises(AdapterError, match="already has its adapter merged"):
        Captioner(artifact_int4, legacy_adapter)
    with pytest.raises(ArtifactError, match="has no 'ort-fp32' decoder; it holds bnb-int4, ort-int4"):
        Captioner(artifact_int4, decoder="ort-fp32")


def test_encoder_validation_raises_typed_errors(artifact, tiny_model, monkeypatch):
    module = QueryEncoder(Captioner(tiny_model).backend.net).eval()
    path = artifact / "encoder.onnx"
    monkeypatch.setitem(TOLERANCES, "fp32", (0.0, 0.0))
    with pytest.raises(AtolError, match="exceeds the fp32 tolerance"):
        validate_encoder(module, path, "fp32", 32)  # the un-adapted model differs from the merged graph
    monkeypatch.undo()

    class Wrong(torch.nn.Module):
        def forward(self, pixels):
            return torch.zeros(pixels.shape[0], 3)

    with pytest.raises(ShapeError, match="output shape"):
        validate_encoder(Wrong(), path, "fp32", 32)


def test_a_decoder_that_quantizes_badly_fails_the_build(tmp_path):
    """A random decoder at fifty times BLIP-2's weight scale (sharp attention that int4's rounding moves)
    loses too much in int4: the export says so and leaves nothing."""
    from idc_lite.tools.modelgen import build_tiny_model

    random_decoder = build_tiny_model(tmp_path / "random", decoder="random", text_init_std=1.0)
    out = tmp_path / "artifact"
    with pytest.raises(QuantizationError, match=r"bnb-int4 logits cosine similarity 0\.\d{4} < 0.99$") as raised:
        build_artifact(random_decoder, out)
    assert float(str(raised.value).split("similarity ")[1].split()[0]) < 0.98  # far below, not at the edge
    assert not out.exists() and not (tmp_path / "artifact.partial").exists()


def assert_encoder_close(artifact, tiny_model, pairs, min_cosine):
    """The artifact's encoder gives the test pairs query embeddings within ``min_cosine`` of torch's, and its
    captions are the fp32 decoder's on those embeddings (the runtime feeds the quantized encoder's output on)."""
    from export.graph_ops import min_cosine as cosine_of

    lite = Captioner(artifact).backend
    pixels = compose_batch(pairs, processor=lite.processor)
    with torch.inference_mode():
        expected = QueryEncoder(Captioner(tiny_model).backend.net).eval()(torch.from_numpy(pixels)).numpy()
    query = lite.encode(pixels)
    assert cosine_of(query, expected) >= min_cosine
    full = load_torch_decoder(artifact / "decoder", "torch-fp32", "cpu")
    with torch.inference_mode():
        embeds = inputs_embeds(full, torch.from_numpy(query), prefix_ids(lite.tokenizer, lite.tokens, None))
        first = full(inputs_embeds=embeds).logits[:, -1].argmax(-1).tolist()
    assert [ids[0] for ids in lite.generate(pixels, GEN)] == first


def test_fp16_encoder_export(tiny_model, tmp_path, pairs):
    artifact = build_artifact(tiny_model, tmp_path / "fp16", encoder_precision="fp16", decoder_precision="fp32")
    encoder = load_manifest(artifact).encoder
    assert encoder.precision == "fp16" and encoder.validation["max_abs_diff"] <= encoder.validation["tolerance"]
    import onnx

    graph = onnx.load(str(artifact / "encoder.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    assert_encoder_close(artifact, tiny_model, pairs, min_cosine=0.999)


def test_int8_encoder_export(tiny_model, artifact, tmp_path, pairs, monkeypatch):
    import onnx

    from export import encoder as encoder_export
    from idc_lite.model_info import describe_model

    int8 = build_artifact(tiny_model, tmp_path / "int8", encoder_precision="int8", decoder_precision="fp32")
    manifest = load_manifest(int8)
    encoder = manifest.encoder
    assert encoder.precision == "int8" and encoder.quantization["method"] == "onnxruntime-dynamic"
    assert 0.98 <= encoder.validation["cosine_min"] <= 1 and encoder.validation["threshold"] == 0.98
    ops = {node.op_type for node in onnx.load(str(int8 / "encoder.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert not [f for f in manifest.data["files"] if "fp32" in f]  # the fp32 graph it came from is gone
    def encoder_bytes(folder):  # the graph and its external-data file
        return sum(f.stat().st_size for f in folder.glob("encoder.onnx*"))

    assert (int8 / "encoder.onnx.data").is_file()
    # Weights at a quarter of fp32's; the tiny graph's own structure keeps the files above a quarter.
    assert encoder_bytes(int8) < 0.7 * encoder_bytes(artifact)
    assert "query-embedding cosine" in describe_model(int8, "cpu")["summary"]["encoder"]
    assert_encoder_close(int8, tiny_model, pairs, min_cosine=0.98)

    module = QueryEncoder(Captioner(tiny_model).backend.net).eval()
    monkeypatch.setitem(encoder_export.MIN_COSINE, "int8", 1.01)
    with pytest.raises(QuantizationError, match=r"int8 encoder: query-embedding cosine similarity 0\.\d+ < 1.01"):
        validate_encoder(module, int8 / "encoder.onnx", "int8", 32)
    recorded = validate_encoder(module, int8 / "encoder.onnx", "int8", 32, enforce=False).as_dict()["validation"]
    assert recorded["enforced"] is False and recorded["cosine_min"] < recorded["threshold"] == 1.01


def test_existing_output_needs_force(tiny_model, artifact, tmp_path):
    with pytest.raises(ExportError, match="already exists; use --force"):
        build_artifact(tiny_model, artifact)


def test_cli_runs_artifacts_and_reports_on_them(artifact_int4, pairs, tmp_path, capsys):
    from PIL import Image

    from idc_lite.cli import main

    Image.fromarray(pairs[0][0]).save(tmp_path / "b.png")
    Image.fromarray(pairs[0][1]).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        main(["describe", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "-m", str(artifact_int4), "--json",
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1"])
    record = json.loads(capsys.readouterr().out)
    assert not info.value.code and record["backend"] == "lite" and record["model"] == "int4"
    assert record["caption"] == Captioner(artifact_int4).describe(*pairs[0], GEN).caption
    with pytest.raises(SystemExit) as info:
        main(["info", str(artifact_int4), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not info.value.code and report["plan"] == {
        "device": "cpu", "encoder providers": ["CPUExecutionProvider"], "decoder": "ort-int4"}
    assert report["files"]["encoder.onnx"]["size"] == (artifact_int4 / "encoder.onnx").stat().st_size
    with pytest.raises(SystemExit) as info:
        main(["info", str(artifact_int4)])
    text = capsys.readouterr().out
    assert "bnb-int4 (int4, logits cosine" in text and "decoder/model.safetensors" in text
    assert "tokenizer: tokenizer.json through tokenizers, no transformers (same as transformers' on all" in text
    with pytest.raises(SystemExit) as info:
        main(["describe", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "-m", str(artifact_int4), "--backend", "reference"])
    assert info.value.code == 2 and "ships no reference model (built without --ship-reference)" in capsys.readouterr().err


def test_a_cosine_below_its_threshold_never_reads_as_the_threshold():
    from export.graph_ops import cosine_text

    assert cosine_text(0.99997) == "0.9999" and cosine_text(0.98999) == "0.9899" and cosine_text(0.5) == "0.5000"
    assert cosine_text(1.0) == "1.0000"


def test_encoder_cosine_treats_zero_outputs_as_the_values_they_are():
    from export.graph_ops import min_cosine as _cosine_min

    zero, ones = np.zeros((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32)
    assert _cosine_min(zero, zero) == 1.0  # a graph that outputs zeros where torch does is right
    assert _cosine_min(ones, zero) == 0.0 and _cosine_min(zero, ones) == 0.0
    assert _cosine_min(ones, -ones) == pytest.approx(-1.0) and _cosine_min(2 * ones, ones) == pytest.approx(1.0)


def test_int4_encoder_export(tiny_model, tmp_path, pairs):
    import onnx

    # The tiny model's random 32-wide vision weights do not survive int4 (the trained demo model's
    # encoder keeps cosine 0.988, README): the check fails loudly and leaves nothing behind...
    with pytest.raises(QuantizationError, match=r"int4 encoder: query-embedding cosine similarity 0\.\d+ < 0.98"):
        build_artifact(tiny_model, tmp_path / "checked", encoder_precision="int4", decoder_precision="fp32")
    assert not (tmp_path / "checked").exists()
    # ... and, not enforced (the benchmarks' random models), records what it measured.
    artifact = build_artifact(tiny_model, tmp_path / "int4", encoder_precision="int4", decoder_precision="fp32",
                              enforce_encoder_check=False)
    encoder = load_manifest(artifact).encoder
    assert encoder.precision == "int4" and encoder.quantization["method"] == "onnxruntime-matmulnbits"
    assert encoder.quantization["block_size"] == 32
    validation = encoder.validation
    assert validation["enforced"] is False and 0 < validation["cosine_min"] < validation["threshold"] == 0.98
    graph = onnx.load(str(artifact / "encoder.onnx")).graph
    weights = {init.name for init in graph.initializer}
    # Every product with a weight (MatMul, and the exporter's Gemm) is now an int4 MatMulNBits on fp16 activations.
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) > 0
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in and out, for the runtime
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert_encoder_close(artifact, tiny_model, pairs, min_cosine=0.5)


def test_an_export_the_disk_cannot_hold_stops_before_reading_weights(tiny_model, legacy_adapter, tmp_path,
                                                                      monkeypatch):
    import export.build
    import export.space

    def no_weights(*args):
        raise AssertionError("the weights were read before the disk space was checked")

    monkeypatch.setattr(export.build, "load_encoder_part", no_weights)
    monkeypatch.setattr(export.build, "_merge", no_weights)
    monkeypatch.setattr(export.space.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(ExportError, match=r"not enough disk space for this export: it writes at least .* GiB .* "
                                          r"0\.0 GiB are free") as caught:
        build_artifact(tiny_model, tmp_path / "a", legacy_adapter)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["no space", "onnx on a full disk"])
def test_a_disk_that_fills_up_is_said_and_leaves_nothing(tiny_model, legacy_adapter, tmp_path, monkeypatch, failure):
    import errno

    import export.encoder
    import export.space

    if failure == "no space":
        error = OSError(errno.ENOSPC, "No space left on device")
    else:  # what onnx raised on an H200 machine whose disk two exports had filled
        error = RuntimeError("Cannot open external data for tensor head")

    def fill_up(*args, **kwargs):
        if failure != "no space":  # the disk is full from here on (the check before the export saw room)
            monkeypatch.setattr(export.space.shutil, "disk_usage",
                                lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
        raise error

    monkeypatch.setattr(export.encoder, "export_encoder", fill_up)
    with pytest.raises(ExportError, match="the disk filled up during the export") as caught:
        build_artifact(tiny_model, tmp_path / "a", legacy_adapter)
    assert caught.value.__cause__ is error and str(error) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the .partial nor the .merged folder


def test_the_disk_need_of_opt_2_7b_counts_what_the_exports_write():
    from idc_lite.tools.memory import config_path
    from export.space import export_disk_need
    from idc_lite.tools.memory import count_parameters, load_config, meta_model

    counts = count_parameters(meta_model(load_config(config_path("blip2-opt-2.7b"))))
    gib = 2**30
    gpu = export_disk_need(counts, "int4", ("ort-int4-fp16",), merge=False)
    # The fp32 graph the int4 decoder is quantized from (2.65e9 parameters): 9.9 GiB; the artifact ~1.7.
    assert gpu["graph"] == 4 * counts.language_model and gpu["merged"] == gpu["tmp"] == 0
    assert 1.5 * gib < gpu["artifact"] < 2 * gib
    merged = export_disk_need(counts, "int4", ("ort-int4-fp16",), merge=True)
    assert merged["merged"] == 4 * counts.unique  # the merged fp32 weights, 14.5 GiB
    default = export_disk_need(counts, "fp32", ("bnb-int4", "ort-int4"), merge=False)
    assert default["tmp"] == default["graph"] and default["artifact"] > gpu["artifact"] + 3 * gib


def test_the_runtime_tokenizer_is_the_bare_file_the_export_checked(artifact_int4, pairs):
    from idc_lite.tokenizer import load_tokenizer
    from idc_lite.decoding import decode
    from idc_lite.tokenizer import BareTokenizer

    manifest = load_manifest(artifact_int4)
    transformers_tokenizer = load_tokenizer(artifact_int4)
    assert manifest.data["tokenizer"] == {"runtime": "tokenizers", "checked": {
        "token_ids": len(transformers_tokenizer), "sequences": 256, "prompts": 5}}
    lite = Captioner(artifact_int4, generation=GEN)
    assert isinstance(lite.backend.tokenizer, BareTokenizer)
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, prompt="what changed?")
    ids = lite.backend.generate(compose_batch(pairs, processor=lite.backend.processor), settings)
    assert decode(lite.backend.tokenizer, ids) == decode(transformers_tokenizer, ids)
    assert prefix_ids(lite.backend.tokenizer, lite.backend.tokens, "what changed?") == \
        prefix_ids(transformers_tokenizer, lite.backend.tokens, "what changed?")


def test_a_tokenizer_transformers_decodes_otherwise_stays_with_transformers(artifact_int4):
    from idc_lite.tokenizer import load_tokenizer
    from idc_lite.tokenizer import BareTokenizer, check_bare_tokenizer, load_artifact_tokenizer

    real = load_tokenizer(artifact_int4)

    class KeepsSpecialTokens:  # a transformers tokenizer that does not count the file's special tokens so
        all_special_ids = real.all_special_ids

        def __len__(self):
            return len(real)

        def __call__(self, *args, **kwargs):
            return real(*args, **kwargs)

        def batch_decode(self, sequences, skip_special_tokens=False):
            return real.batch_decode(sequences, skip_special_tokens=False)

    verdict = check_bare_tokenizer(KeepsSpecialTokens(), artifact_int4 / "tokenizer.json")
    assert verdict["runtime"] == "transformers" and "with transformers" in verdict["why"]
    assert not isinstance(load_artifact_tokenizer(artifact_int4, verdict), BareTokenizer)
    assert check_bare_tokenizer(real, artifact_int4 / "missing.json") == {"runtime": "transformers",
                                                                         "why": "no tokenizer.json"}


def test_a_full_temporary_folder_is_named_as_the_full_disk(tmp_path, monkeypatch):
    import errno

    import export.space
    from export.space import disk_full_error

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(export.space.tempfile, "gettempdir", lambda: str(system_tmp))
    monkeypatch.setattr(export.space.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**12, 10**12, 2**20 if path == system_tmp else 10**11))
    error = disk_full_error(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert str(error).startswith(f"{system_tmp}: the disk filled up during the export (1 MiB left; ")
    assert str(error).endswith("(TMPDIR)")
    assert disk_full_error(tmp_path, ExportError(tmp_path, "said already")) is None
    monkeypatch.setattr(export.space.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10**11))
    assert disk_full_error(tmp_path, ValueError("not a disk problem")) is None  # room on both disks


def test_big_encoders_are_exported_in_a_process_of_their_own(tiny_model, legacy_adapter, artifact, pairs,
                                                              tmp_path, monkeypatch):
    """What a big encoder's export leaves allocated goes with its process; the artifact is the same, and
    the child's errors reach the caller as the typed errors they are."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from export import build as build_module
    from idc_lite.errors import IdcError, ModelError

    in_child = build_module._in_child
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_model / "config.json", broken / "config.json")
    # The two failing children run beside the build (each process starts Python and imports torch:
    # seconds, most of them waiting on a single core).
    with ThreadPoolExecutor(2) as pool:
        failing = pool.submit(in_child, build_module._encoder_stage, broken, tmp_path, "fp32", 32, True)
        dying = pool.submit(in_child, os._exit, 9)  # a child that dies, as the kernel's OOM killer would end it

        spawned = []
        monkeypatch.setattr(build_module, "_in_child", lambda function, *args: spawned.append(function.__name__)
                            or in_child(function, *args))
        monkeypatch.setattr(build_module, "ENCODER_CHILD_PARAMETERS", 0)
        child = build_artifact(tiny_model, tmp_path / "child", legacy_adapter, decoder_precision="fp32")
        assert spawned == ["_encoder_stage"]
        assert captions(Captioner(child), pairs) == captions(Captioner(artifact, decoder="torch-fp32"), pairs)

        error = pickle.loads(pickle.dumps(QuantizationError(tmp_path / "x.onnx", "cosine 0.5 < 0.98")))
        assert type(error) is QuantizationError and str(error) == f"{tmp_path / 'x.onnx'}: cosine 0.5 < 0.98"
        with pytest.raises(IdcError) as raised:
            failing.result()
        assert isinstance(raised.value, (ModelError, ExportError)) and str(broken) in str(raised.value)
        with pytest.raises(ExportError, match=r"^the process running exit ended abruptly \(killed: out of memory\?\)$"):
            dying.result()
