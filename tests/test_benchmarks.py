"""The benchmark pipeline, end to end on a tiny random model: outputs well-formed, figures consistent.

No timing is asserted (a benchmark measures, a test asserts behaviour): only that every backend ran
in its own process, that every figure the report shows is in results.json, that each ratio is the
quotient of the two figures stored beside it, that targets say pass exactly when the ratio is
within the limit, and that generation is forced to the asked number of new tokens.

The runs themselves (the smoke run, then the fp16-encoder build on its cache) start in the background
when the session starts (:func:`start_early`, called by conftest.py, puts them in the session's
background queue), and this file's tests run last (they are marked slow): by then the runs are
done, on what the other tests left of the cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from benchmarks.compare import TARGETS, batch_value
from benchmarks.machine import describe
from benchmarks.measure import exactly_new_tokens
from conftest import BACKGROUND, random_pairs

pytestmark = pytest.mark.slow

BATCH_SIZES = [1, 2]
NEW_TOKENS = 3
QUALITY_PAIRS = 2
#: The same tiny model with an fp16 encoder, built into the smoke run's cache after it.
FP16_BUILD = ("import json, sys; from pathlib import Path; from benchmarks.models import random_subject; "
              "print(json.dumps(random_subject(None, Path(sys.argv[1]), Path(sys.argv[2]), "
              "encoder_precision='fp16').to_dict()))")

_runs: SimpleNamespace | None = None


def start_early(tmp_path_factory, items) -> None:
    """:func:`start_runs`, if a collected test uses them (conftest.py calls this when the session starts)."""
    if any("bench_runs" in item.fixturenames for item in items):
        start_runs(tmp_path_factory)


def start_runs(tmp_path_factory) -> SimpleNamespace:
    """``python -m benchmarks --tiny`` (``.smoke``; its output folder ``.out``, its model cache ``.cache``),
    then :func:`benchmarks.models.random_subject` with an fp16 encoder on the same cache (``.fp16``), in
    the session's background queue (conftest.py); once per session."""
    global _runs
    if _runs is None:
        out = tmp_path_factory.mktemp("bench") / "out"
        cache = tmp_path_factory.mktemp("bench-cache")
        # One thread per process: tiny models gain nothing from two, and on a busy machine OpenMP's
        # spinning threads make them many times slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        smoke = [sys.executable, "-m", "benchmarks", "--tiny", "--batch-sizes", *map(str, BATCH_SIZES),
                 "--repeats", "1", "--new-tokens", str(NEW_TOKENS), "--quality", str(QUALITY_PAIRS),
                 "--out", str(out), "--cache-dir", str(cache)]
        fp16 = [sys.executable, "-c", FP16_BUILD, str(cache), str(out.parent / "fp16-logs")]
        _runs = SimpleNamespace(out=out, cache=cache, smoke=BACKGROUND.submit(smoke, env),
                                fp16=BACKGROUND.submit(fp16, env))
    return _runs


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """The runs :func:`start_early` started when the session started."""
    return start_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def bench(bench_runs):
    """One smoke run of ``python -m benchmarks --tiny``: the results folder and results.json."""
    out = bench_runs.out
    done = bench_runs.smoke.result()
    report = out / "results.md"
    assert done.returncode == 0, done.stderr + (report.read_text() if report.is_file() else "")
    assert done.stdout.strip() == str(out / "results.md")
    return out, json.loads((out / "results.json").read_text())


def expected_backends(results) -> set[str]:
    devices = ["cuda", "cpu"] if results["machine"]["gpu"]["available"] else ["cpu"]
    names = set()
    for device in devices:
        names |= {"reference-fp16-cuda"} if device == "cuda" else {"reference-fp32-cpu", "reference-bf16-cpu"}
        names |= {f"lite-{decoder}-{device}" for decoder in ("bnb-int4", "ort-int4")}
    return names


def test_outputs_exist_and_name_the_machine(bench):
    out, results = bench
    assert {"schema", "machine", "settings", "subject", "backends", "ratios", "targets", "quality", "memory_tables",
            "memory_bandwidth_gbps"} <= set(results)
    machine = results["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and machine["ram_bytes"] > 0
    assert {"python", "torch", "transformers", "onnxruntime", "bitsandbytes"} <= set(machine["libraries"])
    assert machine["libraries"]["torch"] and machine["libraries"]["python"]
    text = (out / "results.md").read_text()
    assert describe(machine) in text and machine["cpu"] in text
    assert "Memory of blip2-opt-2.7b" in text and "14.43" in text  # seed Table 4 beside ours
    with Image.open(out / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300


def test_every_backend_measured_in_its_own_process(bench):
    out, results = bench
    backends = results["backends"]
    assert set(backends) == expected_backends(results)
    text = (out / "results.md").read_text()
    for name, backend in backends.items():
        assert backend["error"] is None, backend["error"]
        assert name in text
        assert backend["load_s"] > 0 and backend["size_on_disk_bytes"] > 0 and backend["decoder_bytes"] > 0
        assert [row["batch_size"] for row in backend["batches"]] == BATCH_SIZES
        for row in backend["batches"]:
            assert row["new_tokens"] == NEW_TOKENS
            for metric in ("encoder_ms_per_pair", "e2e_ms_per_pair", "pairs_per_s"):
                summary = row[metric]
                assert summary["n"] == 1 and summary["min"] <= summary["median"] <= summary["max"]
                assert summary["median"] > 0
            assert row["peak_rss_bytes"] >= backend["rss_after_load_bytes"] > 0
        assert set(backend["decoder_ms_per_token"]) == {str(b) for b in BATCH_SIZES}
    # The lite ONNX Runtime backend on a CPU runs, and is measured, without torch: its start-up and memory
    # are what a user gets (the reference and bitsandbytes need torch).
    assert {name for name, b in backends.items() if not b["torch_imported"]} == {"lite-ort-int4-cpu"}
    # Peak memory is each process's own: not one figure inherited by all of them.
    assert len({b["batches"][-1]["peak_rss_bytes"] for b in backends.values()}) > 1
    stages = results["subject"]["build"]["stages"]
    assert set(stages) == {"model", "artifact"}
    assert all(stage["peak_rss_bytes"] > 0 for stage in stages.values())


def test_ratios_are_computed_from_the_figures_beside_them(bench):
    _, results = bench
    backends, ratios = results["backends"], results["ratios"]
    lites = [name for name in backends if name.startswith("lite-") and name.endswith("-cpu")]
    for lite in lites:
        for batch_size in BATCH_SIZES:
            assert any(r["lite"] == lite and r["batch_size"] == batch_size and r["metric"] == "e2e_ms_per_pair"
                       for r in ratios)
    for row in ratios:
        lite, reference = backends[row["lite"]], backends[row["reference"]]
        if row["batch_size"] is None:
            assert row["lite_value"] == lite[row["metric"]] and row["reference_value"] == reference[row["metric"]]
        else:
            assert row["lite_value"] == batch_value(lite, row["batch_size"], row["metric"])
            assert row["reference_value"] == batch_value(reference, row["batch_size"], row["metric"])
        assert row["ratio"] == pytest.approx(row["lite_value"] / row["reference_value"])


def test_targets_pass_exactly_when_within_their_limit(bench):
    out, results = bench
    assert {t.what for t in TARGETS} == {row["target"] for row in results["targets"]}
    text = (out / "results.md").read_text()
    for row in results["targets"]:
        if row["status"] == "n/a":
            assert row["value"] is None and row["why"]
        else:
            assert row["status"] == ("pass" if row["value"] <= row["limit"] else "fail")
    failed = [row for row in results["targets"] if row["status"] == "fail"]
    assert ("**FAIL**" in text) == bool(failed)
    for row in failed:
        assert f"Missed: {row['target']} for {row['lite']} at batch {row['batch_size']}" in text


def test_quality_compares_lite_captions_with_the_reference(bench):
    _, results = bench
    quality = results["quality"]
    assert set(quality["per_backend"]) == set(results["backends"])
    assert all(row["n"] == QUALITY_PAIRS and row["errors"] == 0 for row in quality["per_backend"].values())
    retention = {row["lite"]: row for row in quality["retention"]}
    assert set(retention) == {name for name in results["backends"] if name.startswith("lite-")}
    for name, row in retention.items():
        ours = results["backends"][name]["quality"]["captions"]
        theirs = results["backends"][row["reference"]]["quality"]["captions"]
        assert row["identical"] == sum(ours[key] == theirs[key] for key in ours)
        assert row["identical_share"] == pytest.approx(row["identical"] / QUALITY_PAIRS)


def test_forcing_new_tokens_generates_exactly_that_many(bench):
    """The reference and both lite decoders run to exactly N new tokens where EOS would stop them at once."""
    from idc_lite import Captioner, GenerationSettings
    from idc_lite.compose import compose_batch

    _, results = bench
    n = 12
    settings = GenerationSettings(max_new_tokens=n)
    artifact, model = results["subject"]["artifact"], results["subject"]["reference_model"]
    for captioner in (Captioner(model), *(Captioner(artifact, decoder=d) for d in ("bnb-int4", "ort-int4"))):
        backend = captioner.backend
        pixels = compose_batch(random_pairs(3), processor=backend.processor).astype(np.float32)
        first = {ids[0] for ids in backend.generate(pixels, GenerationSettings(max_new_tokens=1))}
        # Make every first token an EOS: unforced, every pair stops after one token.
        backend.tokens = dataclasses.replace(backend.tokens, eos_token_ids=tuple(first))
        assert [len(ids) for ids in backend.generate(pixels, settings)] == [1] * 3
        with exactly_new_tokens(backend):
            assert [len(ids) for ids in backend.generate(pixels, settings)] == [n] * 3
        assert backend.tokens.eos_token_ids == tuple(first)  # restored afterwards


def test_encoder_precision_is_built_and_cached_apart(bench, bench_runs, tmp_path):
    from benchmarks.models import DEFAULT_DECODERS, random_subject
    from benchmarks.models import ARTIFACT_LAYOUT
    from idc_lite.artifact import load_manifest

    built = bench_runs.fp16.result()  # random_subject(encoder_precision="fp16") on the smoke run's cache, after it
    assert built.returncode == 0, built.stderr
    fp32 = bench[1]["subject"]  # the smoke run's: same model and decoders, fp32 encoder
    record = json.loads((Path(fp32["build"]["cache"]) / "build.json").read_text())
    assert record["model"] == fp32["build"]["stages"]["model"]  # the fp16 build did not rebuild the model
    subject = random_subject(None, bench_runs.cache, tmp_path / "logs", encoder_precision="fp16")
    assert not (tmp_path / "logs").exists()  # built once: this call found it and ran no build stage
    assert json.loads(built.stdout) == subject.to_dict()
    assert str(subject.reference_model) == fp32["reference_model"]
    name = f"artifact-{'+'.join(DEFAULT_DECODERS)}-encoder-fp16-layout{ARTIFACT_LAYOUT}"
    assert subject.artifact.name == name != Path(fp32["artifact"]).name
    manifest = load_manifest(subject.artifact)
    assert manifest.encoder.precision == "fp16" and list(manifest.decoders) == list(DEFAULT_DECODERS)
    assert manifest.encoder.validation["enforced"] is False  # random vision weights: recorded only
    assert load_manifest(Path(fp32["artifact"])).encoder.precision == "fp32"
    # No weight matrix or embedding is left at zero (transformers leaves the vision model so).
    from safetensors import safe_open

    with safe_open(str(subject.reference_model / "model.safetensors"), "pt") as weights:
        zero = [k for k in weights.keys() if (len(weights.get_slice(k).get_shape()) >= 2 or k.endswith("_embedding"))
                and not weights.get_tensor(k).any()]
    assert zero == []


def test_a_second_run_waits_for_the_build_of_the_same_model(tmp_path, monkeypatch, caplog):
    import logging
    import threading

    import benchmarks.models as models

    fcntl = pytest.importorskip("fcntl")
    built = []
    monkeypatch.setattr(models, "_build", lambda root, *args: built.append(root) or root)
    root = models.random_subject(None, tmp_path, tmp_path / "logs")
    caplog.set_level(logging.INFO, "benchmarks")
    with open(root.with_name(root.name + ".lock"), "a") as held:  # another process building it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=models.random_subject, args=(None, tmp_path, tmp_path / "logs"))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and built == [root]
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(30)
    assert not waiter.is_alive() and built == [root, root]
    assert f"waiting for another process that is building {root}" in caplog.text


def test_the_bandwidth_floor_is_shown_for_cpu_backends_only(bench):
    import copy

    from benchmarks.report import decoder_table

    _, results = bench
    table = "\n".join(decoder_table(results))
    cpu = [name for name, backend in results["backends"].items() if backend["backend"]["device"] == "cpu"]
    assert cpu and all(f"| {name} |" in table for name in cpu)
    on_gpu = copy.deepcopy(results)
    for backend in on_gpu["backends"].values():
        backend["backend"]["device"] = "cuda"
    table = "\n".join(decoder_table(on_gpu))
    assert "No CPU backend in this run" in table and not any(f"| {name} |" in table for name in cpu)


def test_the_feature_probe_reads_a_kind_that_is_there_and_not_one_that_is_not(tiny_model):
    """``benchmarks.feature_probe``: states of a real (tiny) model at every depth, and a head that finds
    a planted kind of change and stays near chance on noise."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from benchmarks.feature_probe import DEPTHS, features, probe
    from idc_lite.settings import ProcessorSettings
    from idc_lite.tools.synth import CATEGORIES

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model).eval()
    states, kinds = features(model, ProcessorSettings.from_model_dir(tiny_model), "val", 9, seed=0, batch=4)
    assert set(states) == set(DEPTHS) and all(len(s) == 9 for s in states.values())
    assert sorted(kinds) == list(range(len(CATEGORIES)))  # the split's balanced turn

    generator = torch.Generator().manual_seed(0)
    labels = np.arange(360) % len(CATEGORIES)
    noise = torch.randn(360, 5, 16, generator=generator)
    planted = noise.clone()
    planted[torch.arange(360), :, torch.from_numpy(labels)] += 3.0  # the kind, written into every token
    train, val = slice(0, 270), slice(270, 360)
    assert probe(planted[train], labels[train], planted[val], labels[val], epochs=40)["overall"] >= 0.9
    assert probe(noise[train], labels[train], noise[val], labels[val], epochs=40)["overall"] <= 0.35
