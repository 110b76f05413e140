"""An artifact that ships its reference (``--ship-reference``): listed and hashed, checked, found offline.

The artifact is built from a copy of the tiny model that is deleted afterwards, as a fresh clone
lacks the base an artifact was built from: whatever still finds the reference finds the shipped one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import MAX_NEW_TOKENS, random_pairs
from idc_lite import Captioner, GenerationSettings
from idc_lite.artifact import MANIFEST, REFERENCE_ADAPTER_DIR, REFERENCE_BASE_DIR, load_manifest, write_manifest
from idc_lite.errors import ArtifactError
from idc_lite.hashing import file_sha256

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def shipped(tiny_model, legacy_adapter, tmp_path_factory) -> Path:
    """The tiny model + the legacy adapter with the reference shipped, recorded by recipe; its base is gone."""
    from export.build import build_artifact

    root = tmp_path_factory.mktemp("shipped")
    base = Path(shutil.copytree(tiny_model, root / "moved-base"))
    artifact = build_artifact(str(base), root / "artifact", legacy_adapter, decoders=("torch-fp32",),
                              ship_reference=True, provenance={"recipe": "demo", "seed": 0})
    shutil.rmtree(base)
    return artifact


def test_every_file_of_a_built_artifact_gets_the_mode_a_plain_write_would(shipped):
    """safetensors and the int4 quantizer write 0600 files; an artifact in a shared folder must stay readable."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(shipped).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [shipped, *shipped.rglob("*")]}
    assert modes[REFERENCE_BASE_DIR + "/model.safetensors"] == 0o666 & ~mask
    assert {name: mode for name, mode in modes.items()
            if mode != (0o777 if (shipped / name).is_dir() else 0o666) & ~mask} == {}


def _rewrite(artifact: Path, target: Path, change) -> Path:
    """A copy of ``artifact`` whose folder ``change(folder, data)`` alters, re-hashed: a consistent artifact."""
    shutil.copytree(artifact, target)
    data = json.loads((target / MANIFEST).read_text())
    change(target, data)
    for key in ("format", "format_version", "files"):
        data.pop(key)
    write_manifest(target, data)
    return target


def test_the_manifest_lists_and_hashes_the_shipped_reference(shipped, legacy_adapter):
    from safetensors import safe_open

    data = load_manifest(shipped).data
    assert data["reference"] == {"base": REFERENCE_BASE_DIR, "precision": "fp16", "adapter": REFERENCE_ADAPTER_DIR}
    on_disk = {p.relative_to(shipped).as_posix() for p in (shipped / "reference").rglob("*") if p.is_file()}
    assert {f"{REFERENCE_BASE_DIR}/{name}" for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                         "preprocessor_config.json")} <= on_disk
    assert on_disk == {f"{REFERENCE_ADAPTER_DIR}/adapter_config.json", f"{REFERENCE_ADAPTER_DIR}/adapter_model.safetensors",
                       *(name for name in on_disk if name.startswith(REFERENCE_BASE_DIR + "/"))}
    for name in on_disk:
        assert data["files"][name] == {"size": (shipped / name).stat().st_size, "sha256": file_sha256(shipped / name)}
    with safe_open(str(shipped / REFERENCE_BASE_DIR / "model.safetensors"), framework="pt") as weights:
        dtypes = {str(weights.get_slice(key).get_dtype()) for key in weights.keys()}
    assert "F16" in dtypes and not {"F32", "BF16", "F64"} & dtypes
    # Provenance by recipe: the adapter's summary stays, no path of the build machine is recorded.
    provenance = data["provenance"]
    assert provenance["recipe"] == "demo" and provenance["seed"] == 0 and "id" not in provenance["base"]
    assert provenance["adapter"]["sha256"] == file_sha256(legacy_adapter / "adapter_model.bin")
    assert provenance["adapter"]["r"] == 4 and "path" not in provenance["adapter"]
    text = (shipped / MANIFEST).read_text() + (shipped / REFERENCE_ADAPTER_DIR / "adapter_config.json").read_text()
    assert str(shipped.parent / "moved-base") not in text and str(legacy_adapter) not in text


def test_the_benchmarks_and_the_reference_backend_find_the_shipped_reference(shipped, tiny_model, legacy_adapter,
                                                                             capsys):
    from benchmarks.models import artifact_subject
    from idc_lite.cli import main

    subject = artifact_subject(shipped)  # the base it was built from is gone: only the shipped one is there
    assert subject.reference_model == (shipped / REFERENCE_BASE_DIR).resolve()
    assert subject.reference_adapter == (shipped / REFERENCE_ADAPTER_DIR).resolve()
    assert subject.config == subject.reference_model / "config.json" and subject.reference_note is None
    given = artifact_subject(shipped, tiny_model, legacy_adapter)  # --reference and --reference-adapter still win
    assert given.reference_model == tiny_model.resolve() and given.reference_adapter == legacy_adapter.resolve()

    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    reference = Captioner(shipped, backend="reference", generation=settings)
    assert reference.backend.name == "reference" and reference.model_id == "artifact"
    assert reference.backend.adapter == "legacy" and reference.backend.model_dir == subject.reference_model
    assert any(hasattr(module, "lora_A") for module in reference.backend.net.modules())  # the adapter, unmerged
    by_hand = Captioner(subject.reference_model, subject.reference_adapter, backend="reference", generation=settings)
    pairs = random_pairs(3, seed=5)
    assert [reference.describe(*p).caption for p in pairs] == [by_hand.describe(*p).caption for p in pairs]

    with pytest.raises(SystemExit) as info:
        main(["describe", str(EXAMPLES / "before/add.png"), str(EXAMPLES / "after/add.png"), "-m", str(shipped),
              "--backend", "reference", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert not info.value.code and result["backend"] == "reference" and result["adapter"] == "legacy"


def test_a_tampered_reference_file_is_refused_naming_it(shipped, tmp_path, monkeypatch):
    from transformers import Blip2ForConditionalGeneration

    from benchmarks.models import artifact_subject

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded from a tampered reference")

    monkeypatch.setattr(Blip2ForConditionalGeneration, "from_pretrained", refuse)
    tampered = Path(shutil.copytree(shipped, tmp_path / "tampered"))
    weights = tampered / REFERENCE_ADAPTER_DIR / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    expected = f"{weights}: sha256 does not match the manifest: the file was altered or corrupted"
    for load in (lambda: Captioner(tampered, backend="reference"), lambda: artifact_subject(tampered)):
        with pytest.raises(ArtifactError) as info:
            load()
        assert str(info.value) == expected


def test_a_reference_that_would_unpickle_or_leave_the_artifact_is_refused(shipped, legacy_adapter, tmp_path):
    def add_pickle(folder: Path, data: dict) -> None:
        shutil.copyfile(legacy_adapter / "adapter_model.bin", folder / REFERENCE_ADAPTER_DIR / "adapter_model.bin")

    def move_out(folder: Path, data: dict) -> None:
        data["reference"]["base"] = "../moved-base"

    pickled = _rewrite(shipped, tmp_path / "pickled", add_pickle)
    with pytest.raises(ArtifactError, match=r"adapter_model\.bin: refused: a shipped reference holds safetensors"):
        Captioner(pickled, backend="reference")
    outside = _rewrite(shipped, tmp_path / "outside", move_out)
    with pytest.raises(ArtifactError, match=r"reference\.base '\.\./moved-base' leaves the artifact folder$"):
        Captioner(outside, backend="reference")


def test_an_artifact_without_a_reference_says_so(shipped, tmp_path):
    from benchmarks.models import artifact_subject

    def drop(folder: Path, data: dict) -> None:
        shutil.rmtree(folder / "reference")
        del data["reference"]

    bare = _rewrite(shipped, tmp_path / "bare", drop)
    with pytest.raises(ArtifactError, match=r"^[^\n]*bare: ships no reference model \(built without --ship-reference\)"):
        Captioner(bare, backend="reference")
    subject = artifact_subject(bare)
    assert subject.reference_model is None and "--ship-reference" in subject.reference_note


def test_build_options_reach_the_build_and_bad_provenance_is_refused_first(tiny_model, tmp_path, monkeypatch):
    import export.build
    from export.__main__ import main
    from export.build import build_artifact
    from export.errors import ExportError

    for bad in ({"base": "elsewhere"}, {"recipe": object()}):
        with pytest.raises(ExportError, match="provenance"):
            build_artifact(str(tiny_model), tmp_path / "bad", provenance=bad)
    assert not list(tmp_path.iterdir())
    seen = {}
    monkeypatch.setattr(export.build, "build_artifact", lambda *args, **kwargs: seen.update(kwargs) or args[1])
    with pytest.raises(SystemExit) as info:
        main(["build", "--base", str(tiny_model), "--out", str(tmp_path / "a"), "--ship-reference"])
    assert not info.value.code and seen["ship_reference"] is True
