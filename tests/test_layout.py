"""The lean install and the layout: what the runtime imports, what the wheel holds, what a missing extra says."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from idc_lite.errors import ArtifactError, MissingExtraError, OptionError, first_line

ROOT = Path(__file__).resolve().parent.parent
#: What a device imports: idc_lite less its tools, its command line and its ``python -m`` entry point.
RUNTIME = [p for p in (ROOT / "idc_lite").rglob("*.py")
           if not {"tools", "cli", "__main__.py"} & set(p.relative_to(ROOT / "idc_lite").parts)]


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(ROOT).parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_runtime_never_imports_the_tools_the_cli_export_or_benchmarks():
    assert len(RUNTIME) > 15
    for path in RUNTIME:
        bad = sorted(n for n in _imports(path) if _within(n, "idc_lite.tools", "idc_lite.cli", "export", "benchmarks"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_export_and_benchmarks_use_the_contract_not_the_backends():
    for path in [*(ROOT / "export").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        bad = sorted(n for n in _imports(path) if _within(n, "idc_lite.backends"))
        assert not bad, f"{path.relative_to(ROOT)} reaches into {bad}"


def test_onnx_runtime_sessions_are_opened_in_one_place():
    opened = [p.relative_to(ROOT).as_posix() for p in RUNTIME if "InferenceSession(" in p.read_text(encoding="utf-8")]
    assert opened == ["idc_lite/backends/sessions.py"]


def test_the_wheel_holds_idc_lite_only_and_the_plain_install_no_torch():
    from setuptools import find_packages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found = find_packages(str(ROOT), include=project["tool"]["setuptools"]["packages"]["find"]["include"])
    assert found and all(p == "idc_lite" or p.startswith("idc_lite.") for p in found)
    assert "idc_lite.tools" in found and "idc_lite.backends" in found
    plain = " ".join(project["project"]["dependencies"]).lower()
    for heavy in ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime-gpu", "huggingface"):
        assert heavy not in plain
    assert any(d.startswith("torch>=") for d in project["project"]["optional-dependencies"]["reference"])


def test_describing_with_an_artifact_imports_neither_torch_nor_transformers(tmp_path):
    examples = ROOT / "examples"
    code = ("import sys\nfrom idc_lite import Captioner\n"
            f"r = Captioner().describe({str(examples / 'before' / 'add.png')!r}, {str(examples / 'after' / 'add.png')!r})\n"
            "assert r.caption, r\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'idc_lite.tools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_is_one_line_naming_it(tiny_model, monkeypatch, capsys):
    from idc_lite import Captioner
    from idc_lite.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"^the reference backend needs torch: pip install 'idc-lite\[reference\]'$"):
        Captioner(tiny_model)
    with pytest.raises(SystemExit) as info:
        main(["describe", str(ROOT / "examples/before/add.png"), str(ROOT / "examples/after/add.png"), "-m", str(tiny_model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == ["error: the reference backend needs torch: pip install 'idc-lite[reference]'"]


def test_lite_options_on_a_reference_model_are_one_error_from_the_api_and_the_cli(tiny_model, capsys):
    from idc_lite import Captioner
    from idc_lite.cli import main

    with pytest.raises(OptionError) as api:
        Captioner(tiny_model, threads=2)
    assert "threads apply to the lite backend only" in str(api.value)
    with pytest.raises(SystemExit) as info:
        main(["describe", str(ROOT / "examples/before/add.png"), str(ROOT / "examples/after/add.png"),
              "-m", str(tiny_model), "--threads", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [f"error: {api.value}"]


def test_errors_with_an_empty_message_still_make_one_line(monkeypatch, tmp_path):
    import onnxruntime as ort

    from idc_lite.backends.sessions import open_session

    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("\n  \nsecond line\nthird")) == "second line"

    def fail(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(ort, "InferenceSession", fail)
    with pytest.raises(ArtifactError, match=r"ONNX Runtime cannot load it \(RuntimeError\)$"):
        open_session(tmp_path / "graph.onnx", "cpu")


def test_memory_takes_a_shipped_config_by_name(capsys):
    from idc_lite.cli import main

    for argv in (["memory", "blip2-opt-2.7b"], ["memory"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        out = capsys.readouterr().out
        assert not info.value.code and "## Memory of blip2-opt-2.7b" in out and "| fp16 |" in out
    with pytest.raises(SystemExit) as info:
        main(["memory", "blip2-nonesuch"])
    assert info.value.code == 2 and "shipped: blip2-opt-2.7b" in capsys.readouterr().err


def test_bnb_int4_refuses_widths_bitsandbytes_cannot_pack_before_any_export(tmp_path):
    from export.build import build_artifact
    from export.errors import ExportError
    from idc_lite.tools.modelgen import build_tiny_model

    model = build_tiny_model(tmp_path / "w40", hidden=40, decoder="random")
    with pytest.raises(ExportError, match=r"bnb-int4 needs layer widths that are multiples of 32.*40.*ort-int4"):
        build_artifact(str(model), tmp_path / "artifact", decoders=("bnb-int4",))
    assert not (tmp_path / "artifact").exists() and not (tmp_path / "artifact.partial").exists()


def test_a_benchmark_child_shows_its_progress_as_it_runs(tmp_path, capfd):
    from benchmarks.processes import run_child

    run = run_child("calendar", ["2026", "11"], tmp_path / "child.log", echo="  [cal] ")
    err = capfd.readouterr().err.splitlines()
    assert run.ok and run.peak_rss_bytes > 0
    assert any(line.startswith("  [cal] ") and "November 2026" in line for line in err)
    logged = (tmp_path / "child.log").read_text(encoding="utf-8").splitlines()
    assert [f"  [cal] {line}".rstrip() for line in logged] == err


def test_both_backends_provide_the_backend_protocol(tiny_model):
    from idc_lite import Captioner
    from idc_lite.backends import Backend

    assert isinstance(Captioner().backend, Backend)
    assert isinstance(Captioner(tiny_model).backend, Backend)
    assert not isinstance(object(), Backend)


def test_debug_shows_the_traceback_wherever_it_is_given(capsys):
    from idc_lite.cli import main

    for argv in (["--debug", "describe", "missing-before.png", "missing-after.png"],
                 ["describe", "missing-before.png", "missing-after.png", "--debug"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" in err
        assert err.strip().splitlines()[-1] == "error: missing-before.png: no such file"
    with pytest.raises(SystemExit):
        main(["describe", "missing-before.png", "missing-after.png"])
    assert "Traceback" not in capsys.readouterr().err
