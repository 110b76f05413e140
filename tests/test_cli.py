"""The command line: describe, batch (pairing, failures, resume), errors, fast start-up."""

from __future__ import annotations

import csv
import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import HUB_COMMIT, MAX_NEW_TOKENS, fake_hub_cache, random_pairs
from idc_lite.cli import main

TOKENS = ["--max-new-tokens", str(MAX_NEW_TOKENS)]


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def write_pair(before_dir: Path, after_dir: Path, key: str, pair, after_ext=".png"):
    for folder, image, ext in ((before_dir, pair[0], ".png"), (after_dir, pair[1], after_ext)):
        path = folder / f"{key}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


@pytest.fixture
def folders(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    keys = ["a", "b", "sub/c", "sub/deeper/d", "e"]
    for key, pair in zip(keys, random_pairs(len(keys), seed=5)):
        write_pair(before, after, key, pair, after_ext=".jpg" if key == "b" else ".png")
    return before, after, keys


def test_describe_prints_the_caption_and_json(tiny_model, reference, pairs, tmp_path, capsys):
    write_pair(tmp_path, tmp_path / "after", "x", pairs[0])
    code, out, _ = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", tiny_model, *TOKENS], capsys)
    expected = reference.describe(tmp_path / "x.png", tmp_path / "after" / "x.png").caption
    assert code == 0 and out == expected + "\n"
    code, out, _ = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", tiny_model, "--json", *TOKENS], capsys)
    record = json.loads(out)
    assert code == 0 and record["caption"] == expected and record["model"] == str(tiny_model) and record["error"] is None


def test_describe_options_reach_the_model(artifact, pairs, tmp_path, capsys):
    from idc_lite import Captioner, GenerationSettings

    # The lite backend on ONNX Runtime's fp32 decoder: each CLI run loads in a fraction of a second.
    lite = Captioner(artifact, decoder="ort-fp32")
    write_pair(tmp_path, tmp_path / "after", "x", pairs[1])
    before, after = tmp_path / "x.png", tmp_path / "after" / "x.png"
    # Each option's caption must differ from the one its run would give without it.
    default = lite.describe(before, after).caption
    greedy = lite.describe(before, after, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)).caption
    options = [
        (["--max-new-tokens", "2"], GenerationSettings(max_new_tokens=2), default),
        (["--num-beams", "3", *TOKENS], GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, num_beams=3), greedy),
        (["--prompt", "the red circle", *TOKENS], GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, prompt="the red circle"),
         greedy),
    ]
    for argv, settings, without in options:
        expected = lite.describe(before, after, settings).caption
        assert expected != without, f"{argv} gives this pair the caption it has without it: the check would pass"
        code, out, _ = run(["describe", before, after, "-m", artifact, "--decoder", "ort-fp32", *argv], capsys)
        assert code == 0 and out == expected + "\n", argv


def test_user_errors_are_one_line_with_exit_code_2(tiny_model, legacy_adapter, pairs, tmp_path, capsys):
    write_pair(tmp_path, tmp_path, "ok", pairs[0])
    good = tmp_path / "ok.png"
    (tmp_path / "text.png").write_text("hello")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["nope"]}))
    from safetensors.torch import save_file
    import torch

    save_file({"base_model.model.nope.lora_A.weight": torch.zeros(2, 2)}, str(other / "adapter_model.safetensors"))
    cases = [
        (["describe", tmp_path / "missing.png", good, "-m", tiny_model], f"{tmp_path / 'missing.png'}: no such file"),
        (["describe", good, tmp_path / "text.png", "-m", tiny_model], f"{tmp_path / 'text.png'}: not an image file"),
        (["describe", tmp_path, good, "-m", tiny_model], f"{tmp_path}: is a folder"),
        (["describe", good, good, "-m", tmp_path / "nope"], f"{tmp_path / 'nope'}: no such model directory"),
        (["describe", good, good, "-m", "acme/unknown-model"], "acme/unknown-model: not in the local hub cache"),
        (["describe", good, good, "-m", bert], f"{bert}: not a BLIP-2 model"),
        (["describe", good, good, "-m", tiny_model, "-a", tmp_path / "no-adapter"], "no such adapter directory"),
        (["describe", good, good, "-m", tiny_model, "-a", other], f"{other}: does not fit"),
        (["describe", good, good, "-m", tiny_model, "--device", "tpu"], "--device must be"),
        (["batch", tmp_path / "nope", tmp_path, "-o", tmp_path / "r.jsonl", "-m", tiny_model], "no such folder"),
        (["batch", good, tmp_path, "-o", tmp_path / "r.jsonl", "-m", tiny_model], "is a file, expected a folder"),
    ]
    for argv, expected in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
        assert "Traceback" not in err and out == ""


def test_debug_shows_a_traceback(tmp_path, capsys):
    code, _, err = run(["--debug", "describe", tmp_path / "a.png", tmp_path / "b.png"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("no such file")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_pairs_folders_and_records_failures(tiny_model, folders, reference, capsys):
    before, after, keys = folders
    Image.new("RGB", (8, 8)).save(before / "lonely.png")
    (after / "sub" / "orphan.png").write_bytes((after / "a.png").read_bytes())
    (before / "notes.txt").write_text("not an image, ignored")
    (after / "e.png").write_bytes(b"\x89PNG broken")
    output = before.parent / "out" / "results.jsonl"
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--batch-size", "2", *TOKENS], capsys)
    assert code == 1
    assert "1 before images without a partner" in err and "lonely.png" in err
    assert "1 after images without a partner" in err and "orphan.png" in err
    records = {r["id"]: r for r in read_jsonl(output)}
    assert sorted(records) == sorted(keys)
    assert records["e"]["caption"] is None and f"{after / 'e.png'}: not an image" in records["e"]["error"]
    for key in ["a", "b", "sub/c", "sub/deeper/d"]:
        r = records[key]
        assert r["error"] is None and r["caption"] == reference.describe(r["before"], r["after"]).caption
    assert records["b"]["after"].endswith("b.jpg")


def test_batch_resumes_after_a_cut_line_without_duplicates(tiny_model, folders, capsys):
    before, after, keys = folders
    output = before.parent / "results.jsonl"
    assert run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)[0] == 0
    full = output.read_text()
    lines = full.splitlines(keepends=True)
    output.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)
    assert code == 0 and "2 already in" in err and "3 to describe" in err
    resumed = read_jsonl(output)
    assert sorted(r["id"] for r in resumed) == sorted(keys)
    assert [r["caption"] for r in sorted(resumed, key=lambda r: r["id"])] == \
        [json.loads(line)["caption"] for line in sorted(full.splitlines(), key=lambda l: json.loads(l)["id"])]
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)
    assert code == 0 and "0 to describe" in err and len(read_jsonl(output)) == len(keys)


#: Runs ``idc-lite batch`` and kills its own process (SIGKILL: nothing is flushed or cleaned up) when it is
#: about to write result number ``IDC_KILL_AT``: the kill lands at one known point, whatever the machine's speed.
KILLED_BATCH = """
import os, signal, sys
from idc_lite import results_io
from idc_lite.cli import main

write, written = results_io.ResultsFile.write, []
def write_until_killed(self, record):
    if len(written) == int(os.environ["IDC_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(record["id"])
    return write(self, record)
results_io.ResultsFile.write = write_until_killed
main(sys.argv[1:])
"""


def test_batch_killed_mid_run_loses_and_duplicates_nothing(artifact_int4, tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    pairs = random_pairs(8, seed=8)
    for i, pair in enumerate(pairs):
        write_pair(before, after, f"p{i:02d}", pair)
    output = tmp_path / "results.jsonl"
    # The lite backend's ONNX Runtime decoder: the killed child starts without importing torch.
    argv = ["batch", before, after, "-o", output, "-m", artifact_int4, "--decoder", "ort-int4", "--batch-size", "1",
            *TOKENS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDC_KILL_AT": "3"}
    killed = subprocess.run([sys.executable, "-c", KILLED_BATCH, *map(str, argv)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["id"] for r in read_jsonl(output)] == ["p00", "p01", "p02"]  # each record was on disk when written
    code, _, err = run(argv, capsys)
    assert code == 0 and "3 already in" in err and "5 to describe" in err
    ids = [r["id"] for r in read_jsonl(output)]
    assert sorted(ids) == [f"p{i:02d}" for i in range(len(pairs))]


def test_batch_csv_and_retry_failed(tiny_model, folders, capsys):
    before, after, keys = folders
    broken = (after / "a.png").read_bytes()
    (after / "a.png").write_bytes(b"junk")
    output = before.parent / "results.csv"
    assert run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)[0] == 1
    rows = list(csv.DictReader(output.open()))
    assert sorted(r["id"] for r in rows) == sorted(keys)
    assert [r["id"] for r in rows if r["error"]] == ["a"]
    assert run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)[0] == 1  # still failed
    (after / "a.png").write_bytes(broken)
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--retry-failed", *TOKENS], capsys)
    assert code == 0 and "1 to describe" in err
    rows = list(csv.DictReader(output.open()))
    assert sorted(r["id"] for r in rows) == sorted(keys) and not any(r["error"] for r in rows)


def test_batch_reports_ambiguous_names(tiny_model, folders, capsys):
    before, after, _ = folders
    Image.new("RGB", (8, 8)).save(after / "a.jpg")  # a.png and a.jpg now both claim key "a"
    output = before.parent / "results.jsonl"
    assert run(["batch", before, after, "-o", output, "-m", tiny_model, *TOKENS], capsys)[0] == 1
    records = {r["id"]: r for r in read_jsonl(output)}
    assert "ambiguous" in records["a"]["error"]


def test_version_and_help_do_not_import_torch():
    code = ("import sys; from idc_lite.cli import main\n"
            "for argv in (['--version'], ['--help'], ['describe', '--help'], ['batch', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from idc_lite import __version__

    assert f"idc-lite {__version__}" in done.stdout and "describe" in done.stdout


def test_a_cpu_caption_from_an_artifact_needs_neither_torch_nor_transformers(tmp_path):
    """The lite runtime's start-up: the embedded model describes a pair on the CPU without importing
    torch or transformers (about 2 s of a 2.4 s `idc-lite describe`), with the caption it gives
    when transformers' tokenizer is used."""
    from idc_lite.default_model import EMBEDDED_DIR

    if not (EMBEDDED_DIR / "manifest.json").is_file():
        pytest.skip("no embedded model in this checkout")
    examples = Path(__file__).resolve().parent.parent / "examples"
    code = ("import sys; from idc_lite.cli import main\n"
            f"code = main(['describe', {str(examples / 'before' / 'color.png')!r}, "
            f"{str(examples / 'after' / 'color.png')!r}, '--device', 'cpu'])\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not code and not heavy, (code, heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from idc_lite import Captioner

    with_transformers = Captioner(device="cpu")
    from idc_lite.tokenizer import load_tokenizer

    with_transformers.backend.tokenizer = load_tokenizer(EMBEDDED_DIR)
    want = with_transformers.describe(examples / "before" / "color.png", examples / "after" / "color.png").caption
    assert want and want in done.stdout


def test_auto_device_without_a_gpu_driver_is_settled_without_torch():
    code = ("import sys; from idc_lite.runtime import cuda_driver_devices, resolve_device\n"
            "print(resolve_device('auto'), cuda_driver_devices(), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    device, gpus, imported = done.stdout.split()
    if int(gpus):
        assert device.startswith("cuda") or imported == "True"  # torch decides where there is a driver
    else:
        assert (device, imported) == ("cpu", "False")


# --- options that reach the model, formats, failures mid-run ------------------------------------


def different_size_pairs(n: int) -> list[tuple]:
    """Pairs whose after image is smaller than the before image, so the size policies compose them differently."""
    return [(before, after[: len(after) * 2 // 3, : after.shape[1] * 3 // 4]) for before, after in random_pairs(n, seed=9)]


def test_size_policy_reaches_the_composition(tiny_model, tmp_path, capsys):
    from idc_lite import Captioner, CompositionSettings

    by_policy = {policy: Captioner(tiny_model, composition=CompositionSettings(size_policy=policy))
                 for policy in ("smallest", "after")}
    pairs = different_size_pairs(8)
    captions = {policy: [c.describe(*pair).caption for pair in pairs] for policy, c in by_policy.items()}
    differ = [i for i, (a, b) in enumerate(zip(captions["smallest"], captions["after"])) if a != b]
    assert differ, "no pair is captioned differently under the two policies: the check would pass without the option"
    write_pair(tmp_path, tmp_path / "after", "x", pairs[differ[0]])
    before, after = tmp_path / "x.png", tmp_path / "after" / "x.png"
    for policy in ("smallest", "after"):
        code, out, _ = run(["describe", before, after, "-m", tiny_model, "--size-policy", policy, *TOKENS], capsys)
        assert code == 0 and out == captions[policy][differ[0]] + "\n", policy
    code, out, err = run(["describe", before, after, "-m", tiny_model, "--size-policy", "strict"], capsys)
    assert code == 2 and out == "" and "the size policy is 'strict'" in err and str(after) in err
    code, _, err = run(["describe", before, after, "-m", tiny_model, "--size-policy", "largest"], capsys)
    assert code == 2 and "size_policy must be one of" in err


def test_strict_size_policy_in_batch_records_each_pair_that_differs(tiny_model, folders, reference, capsys):
    before, after, keys = folders
    small = different_size_pairs(1)[0][1]
    Image.fromarray(small).save(after / "sub" / "c.png")  # one pair whose sizes differ
    output = before.parent / "results.jsonl"
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--size-policy", "strict", *TOKENS],
                       capsys)
    records = {r["id"]: r for r in read_jsonl(output)}
    assert code == 1 and sorted(records) == sorted(keys) and "1 failed" in err
    assert records["sub/c"]["caption"] is None and "the size policy is 'strict'" in records["sub/c"]["error"]
    for key in set(keys) - {"sub/c"}:
        assert records[key]["caption"] == reference.describe(records[key]["before"], records[key]["after"]).caption


def test_the_cli_keeps_the_size_policy_an_artifact_records(artifact, tmp_path, capsys):
    recorded = tmp_path / "strict-artifact"
    shutil.copytree(artifact, recorded)
    manifest = json.loads((recorded / "manifest.json").read_text())
    manifest["composition"]["size_policy"] = "strict"
    (recorded / "manifest.json").write_text(json.dumps(manifest))
    write_pair(tmp_path, tmp_path / "after", "x", different_size_pairs(1)[0])
    code, _, err = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", recorded], capsys)
    assert code == 2 and "the size policy is 'strict'" in err


def test_csv_output_under_any_name_resumes_after_a_cut_line(tiny_model, folders, capsys):
    before, after, keys = folders
    output = before.parent / "results.txt"
    assert run(["batch", before, after, "-o", output, "-m", tiny_model, "--format", "csv", *TOKENS], capsys)[0] == 0
    full = output.read_text(encoding="utf-8")
    rows = list(csv.DictReader(full.splitlines()))
    assert full.startswith("id,before,after,caption,error,") and sorted(r["id"] for r in rows) == sorted(keys)
    lines = full.splitlines(keepends=True)
    output.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")  # killed in row 3
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--format", "csv", *TOKENS], capsys)
    assert code == 0 and "2 already in" in err and "3 to describe" in err
    resumed = list(csv.DictReader(output.read_text(encoding="utf-8").splitlines()))
    assert sorted((r["id"], r["caption"]) for r in resumed) == sorted((r["id"], r["caption"]) for r in rows)


def test_a_model_error_mid_batch_is_recorded_for_each_pair_of_that_batch(tiny_model, folders, capsys, monkeypatch):
    from idc_lite.backends.reference import ReferenceBackend

    calls = []
    real = ReferenceBackend.generate

    def fails_second(self, pixels, settings):  # the model itself fails on the second batch (as out of memory would)
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(self, pixels, settings)

    monkeypatch.setattr(ReferenceBackend, "generate", fails_second)
    before, after, keys = folders
    output = before.parent / "results.jsonl"
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--batch-size", "2", *TOKENS], capsys)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    failed = [r["id"] for r in records if r["error"]]
    assert code == 1 and calls == [2, 2, 1] and len(records) == len(keys) and "2 failed" in err
    assert failed == [r["id"] for r in records[2:4]] and all(r["caption"] is None for r in records[2:4])
    assert all("model failed on this batch (RuntimeError: CUDA out of memory)" in r["error"] for r in records[2:4])
    assert all(r["caption"] for r in records if not r["error"])
    code, _, err = run(["batch", before, after, "-o", output, "-m", tiny_model, "--retry-failed", *TOKENS], capsys)
    assert code == 0 and "2 to describe" in err and not any(r["error"] for r in read_jsonl(output))


@pytest.mark.parametrize("command", ["batch", "eval"])
def test_ctrl_c_keeps_what_is_done_and_exits_130(command, tiny_model, folders, tmp_path, capsys, monkeypatch):
    from idc_lite import Captioner

    real = Captioner.describe_batch

    def interrupted_after_two(self, pairs, *args, **kwargs):  # Ctrl-C arrives while the third pair is described
        for index, result in enumerate(real(self, pairs, *args, **kwargs)):
            if index == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Captioner, "describe_batch", interrupted_after_two)
    if command == "batch":
        before, after, _ = folders
        output = tmp_path / "results.jsonl"
        argv = ["batch", before, after, "-o", output, "-m", tiny_model, "--batch-size", "1", *TOKENS]
    else:
        from idc_lite.tools.synth import write_dataset

        data = write_dataset(tmp_path / "data", n=5, split="test")
        output = tmp_path / "r.predictions.jsonl"
        argv = ["eval", data, "-m", tiny_model, "-o", tmp_path / "r.json", "--no-meteor", "--batch-size", "1", *TOKENS]
    code, _, err = run(argv, capsys)
    assert code == 130 and "interrupted" in err and "run again to resume" in err
    assert len(read_jsonl(output)) == 2
    monkeypatch.setattr(Captioner, "describe_batch", real)
    code, _, err = run(argv, capsys)
    assert code == 0 and len(read_jsonl(output)) == 5


def test_threads_reach_the_onnx_runtime_sessions(artifact, pairs, tmp_path, capsys, monkeypatch):
    import idc_lite.backends.lite as lite

    opened = []
    real = lite.open_session
    monkeypatch.setattr(lite, "open_session", lambda *args, **kwargs: opened.append(real(*args, **kwargs)) or opened[-1])
    write_pair(tmp_path, tmp_path / "after", "x", pairs[0])
    for threads in ("1", "2"):
        code, out, _ = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", artifact,
                            "--threads", threads, *TOKENS], capsys)
        assert code == 0 and out.strip()
        assert opened[-1].get_session_options().intra_op_num_threads == int(threads)
    code, _, err = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "--threads", "0"], capsys)
    assert code == 2 and "--threads" in err


def test_dtype_reaches_the_reference_backend(tiny_model, pairs, tmp_path, capsys, monkeypatch):
    import torch

    from idc_lite.backends.reference import ReferenceBackend

    built = []
    real = ReferenceBackend.__init__
    monkeypatch.setattr(ReferenceBackend, "__init__", lambda self, *a, **k: built.append(self) or real(self, *a, **k))
    write_pair(tmp_path, tmp_path / "after", "x", pairs[0])
    code, out, _ = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", tiny_model,
                        "--dtype", "bf16", *TOKENS], capsys)
    assert code == 0 and out.strip() and built[-1].net.dtype == torch.bfloat16
    code, _, err = run(["describe", tmp_path / "x.png", tmp_path / "after" / "x.png", "-m", tiny_model,
                        "--dtype", "fp64"], capsys)
    assert code == 2 and "--dtype must be one of" in err


def test_revision_picks_a_snapshot_of_the_hub_cache(tiny_model, reference, pairs, tmp_path, capsys, monkeypatch):
    fake_hub_cache(tiny_model, tmp_path / "hub", monkeypatch)
    write_pair(tmp_path, tmp_path / "after", "x", pairs[0])
    before, after = tmp_path / "x.png", tmp_path / "after" / "x.png"
    code, out, _ = run(["describe", before, after, "-m", "acme/tiny-blip2", "--revision", HUB_COMMIT, "--json", *TOKENS],
                       capsys)
    record = json.loads(out)
    assert code == 0 and record["model"] == "acme/tiny-blip2" and record["caption"] == reference.describe(before, after).caption
    code, _, err = run(["describe", before, after, "-m", "acme/tiny-blip2", "--revision", "v2"], capsys)
    assert code == 2 and "acme/tiny-blip2@v2: not in the local hub cache" in err
