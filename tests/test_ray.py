"""``batch --ray`` and :func:`idc_lite.ray.describe_dataset` on a real local Ray cluster.

One cluster for the module (2 CPUs, a small object store, listening on loopback only), shut down at
the end; every run on it uses the embedded model, which knows the synthetic world these pairs come
from. Each subprocess has a deadline, so a hung cluster fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray's single-machine mode binds every server to 127.0.0.1; read when Ray is imported, and inherited
# by the drivers started below.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the ray extra: pip install 'idc-lite[ray]'")

from idc_lite.cli import main  # noqa: E402
from idc_lite.tools.synth import generate_pair  # noqa: E402

DEADLINE_S = 60


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 pairs of the synthetic world in two mirrored folders, a corrupt pair, an unpaired and an ambiguous name."""
    root = tmp_path_factory.mktemp("world")
    keys = []
    for i in range(40):
        pair = generate_pair(i, 0, "test")
        key = f"{'sub/' if i % 7 == 0 else ''}{i:03d}"
        for side, image in (("before", pair.before), ("after", pair.after)):
            path = root / side / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        keys.append(key)
    (root / "before" / "corrupt.png").write_bytes(b"not a png")
    (root / "after" / "corrupt.png").write_bytes((root / "after" / "001.png").read_bytes())
    (root / "before" / "alone.png").write_bytes((root / "before" / "002.png").read_bytes())
    for ext in (".png", ".jpg"):
        (root / "after" / f"twice{ext}").write_bytes((root / "after" / "003.png").read_bytes())
    (root / "before" / "twice.png").write_bytes((root / "before" / "003.png").read_bytes())
    return root, keys


@pytest.fixture(scope="module")
def local_records(world, tmp_path_factory):
    """Local ``batch`` on the world: the records every Ray run is compared with."""
    root, _ = world
    output = tmp_path_factory.mktemp("local") / "local.jsonl"
    code, err = run_cli(["batch", "before", "after", "-o", output], cwd=root)
    assert code == 1, err  # the corrupt pair and the ambiguous name
    return read_jsonl(output)


def run_cli(argv, cwd: Path) -> tuple[int, str]:
    """``idc-lite ARGV`` in this process (so it joins the module's cluster), from ``cwd``."""
    import contextlib
    import io

    err = io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
    finally:
        os.chdir(previous)
    return info.value.code or 0, err.getvalue()


def read_jsonl(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}), "a pair was written twice"
    return {r["id"]: r for r in records}


def without_timings(records: dict[str, dict]) -> dict[str, dict]:
    return {key: {k: v for k, v in r.items() if k != "seconds"} for key, r in records.items()}


def test_ray_batch_gives_the_records_of_local_batch(cluster, world, local_records, tmp_path):
    root, keys = world
    output = tmp_path / "ray.jsonl"
    code, err = run_cli(["batch", "before", "after", "-o", output, "--ray", cluster, "--workers", "1-2",
                         "--batch-size", "4"], cwd=root)
    assert code == 1, err
    assert "41 pairs in the folders, 0 already in" in err and "1 before images without a partner" in err
    records = read_jsonl(output)
    assert without_timings(records) == without_timings(local_records)
    assert records["corrupt"]["error"].startswith("before/corrupt.png: ") and records["corrupt"]["caption"] is None
    assert records["twice"]["error"].startswith("ambiguous")
    assert all(records[k]["caption"] and records[k]["error"] is None for k in keys)
    assert "40 ok and 2 failed" in err

    code, err = run_cli(["batch", "before", "after", "-o", output, "--ray", cluster], cwd=root)
    assert code == 1 and "41 already in" in err and "0 to describe" in err
    assert len(read_jsonl(output)) == len(local_records)


def test_manifest_to_parquet_parts_resumes_after_a_cut_part(cluster, world, local_records, tmp_path):
    import pyarrow.parquet as pq

    root, keys = world
    manifest = root / "manifest.csv"
    rows = [f"{k},before/{k}.png,after/{k}.png" for k in keys[:24]] + ["0007,before/007.png,", "dup,a.png,b.png",
                                                                        "dup,c.png,d.png"]
    manifest.write_text("id,before,after\n" + "\n".join(rows) + "\n")
    output = tmp_path / "out.parquet"
    argv = ["batch", manifest, "-o", output, "--format", "parquet", "--ray", cluster, "--batch-size", "2"]
    code, err = run_cli(argv, cwd=tmp_path)
    assert code == 1, err  # the row without an after image and the duplicate id
    assert "24 pairs in the manifest" in err
    table = pq.read_table(output).to_pylist()
    records = {r["id"]: r for r in table}
    assert len(table) == len(records) == 26
    assert records["0007"]["error"] == "no after image in the manifest"  # "0007" stays a string
    assert records["dup"]["error"].startswith("duplicate id: 2 rows")
    for key in keys[:24]:
        assert records[key]["caption"] == local_records[key]["caption"]
        assert records[key]["before"] == str(root / "before" / f"{key}.png")

    # A run killed while a worker wrote a part leaves it without its footer: it is removed and redone.
    parts = sorted(p for p in output.iterdir() if p.name.endswith(".parquet") and not p.name.startswith("driver-"))
    cut = pq.read_table(parts[0]).column("id").to_pylist()
    parts[0].write_bytes(parts[0].read_bytes()[: parts[0].stat().st_size // 2])
    code, err = run_cli(argv, cwd=tmp_path)
    assert code == 1 and f"{24 - len(cut)} already in" in err and f"{len(cut)} to describe" in err
    assert "removed" in err
    again = pq.read_table(output).to_pylist()
    assert sorted(r["id"] for r in again) == sorted(records)
    assert {r["id"]: r["caption"] for r in again} == {k: r["caption"] for k, r in records.items()}


def test_folders_by_uri_and_the_python_api(cluster, world, local_records, tmp_path):
    from idc_lite.ray import describe_dataset

    root, keys = world
    output = tmp_path / "uri.jsonl"
    before, after = (f"file://{root / side}" for side in ("before", "after"))
    code, err = run_cli(["batch", before, after, "-o", output, "--ray", cluster], cwd=tmp_path)
    assert code == 1, err
    records = read_jsonl(output)
    assert records.keys() == local_records.keys()
    assert records["005"]["before"] == f"{before}/005.png"
    assert {k: r.get("caption") for k, r in records.items()} == {k: r.get("caption") for k, r in local_records.items()}
    problem = local_records["corrupt"]["error"].removeprefix("before/corrupt.png: ")
    assert records["corrupt"]["error"] == f"{before}/corrupt.png: {problem}"  # read from storage, named as given

    pairs = ray.data.from_items([{"id": k, "before": str(root / "before" / f"{k}.png"),
                                  "after": str(root / "after" / f"{k}.png")} for k in keys[:6]])
    described = describe_dataset(pairs, batch_size=3).take_all()
    assert sorted(r["id"] for r in described) == sorted(keys[:6])
    assert all(r["caption"] == local_records[r["id"]]["caption"] for r in described)


def test_a_killed_driver_loses_nothing_and_duplicates_nothing(cluster, world, local_records, tmp_path):
    root, keys = world
    output = tmp_path / "killed.jsonl"
    argv = [sys.executable, "-m", "idc_lite", "batch", root / "before", root / "after", "-o", output,
            "--ray", cluster, "--batch-size", "1"]
    process = subprocess.Popen([str(a) for a in argv], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 3):
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    written = output.read_text().count("\n")
    assert 3 <= written < len(local_records), "the kill should land mid-run"
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 1, done.stderr  # the corrupt pair and the ambiguous name, as locally
    assert f"{written - 1} already in" in done.stderr  # every complete line but the ambiguous name's
    records = read_jsonl(output)
    assert records.keys() == local_records.keys()
    assert {k: r.get("caption") for k, r in records.items()} == {k: r.get("caption") for k, r in local_records.items()}


def test_a_worker_that_dies_is_replaced_and_its_pairs_retried(cluster, world, local_records, tmp_path):
    from idc_lite.ray import describe_dataset, find_pairs, pairs_dataset

    root, keys = world
    found = find_pairs(root / "before", root / "after")
    records = describe_dataset(pairs_dataset(found.rows, 1, 1), batch_size=1)
    seen, killed = {}, []
    for batch in records.iter_batches(batch_size=None, batch_format="pyarrow"):
        seen.update({r["id"]: r for r in batch.to_pylist()})
        if not killed:
            killed = [pid for pid in _our_workers("ray::MapWorker") if os.kill(pid, signal.SIGKILL) is None]
    assert killed, "no worker found to kill"
    assert seen.keys() == {row["id"] for row in found.rows}
    assert {k: r["caption"] for k, r in seen.items()} == {k: local_records[k]["caption"] for k in seen}


def _our_workers(prefix: str) -> list[int]:
    """Processes below this one (the module's cluster) whose command line starts with ``prefix``."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, name in names.items() if name.startswith(prefix.encode()) and ours(pid)]


def test_without_the_extra_ray_options_are_one_line(world, monkeypatch):
    import importlib.util

    root, _ = world
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    code, err = run_cli(["batch", "before", "after", "-o", "never.jsonl", "--ray"], cwd=root)
    assert code == 2 and err == "error: batch --ray needs ray: pip install 'idc-lite[ray]'\n"
    monkeypatch.undo()
    code, err = run_cli(["batch", "before", "after", "-o", "never.jsonl", "--workers", "2"], cwd=root)
    assert code == 2 and err.startswith("error: --format parquet, --workers and --gpus-per-worker apply with --ray only")
    code, err = run_cli(["batch", "before", "after", "-o", "never.jsonl", "--ray", "before"], cwd=root)
    assert code == 2 and "--ray takes auto, local, HOST:PORT or ray://HOST:PORT" in err
    assert not (root / "never.jsonl").exists()
