"""Session fixtures: a tiny BLIP-2, its LoRA adapters in both layouts, the artifacts built from them, image pairs.

Everything is built here, offline, in a few seconds and without training: no hub, no download, and
the same weights on every machine (numpy's generator; see :mod:`idc_lite.tools.modelgen`).

Work that tests wait for only later and that runs in processes of its own (the benchmark pipeline's
smoke run, the COCO toolkit's Java processes) is started when the session starts, if a collected
test needs it (:func:`_start_early`): it then takes what the tests leave of the cores instead of
the suite's time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network during tests

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
MAX_NEW_TOKENS = 10
#: A test adapter's B @ A, as a share of the standard deviation of the weight it adds to.
ADAPTER_STRENGTH = 0.1


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the benchmark pipeline end to end (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    """The files with slow tests run last (each file's tests stay together and in order): the work they
    wait for, started when the session starts (:func:`_start_early`), is done by then."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] in slow)  # a stable sort


@pytest.fixture(scope="session", autouse=True)
def _start_early(request, tmp_path_factory):
    """Start what collected tests will wait for, before the first test runs, so that it runs beside them.

    - A test file may define ``start_early(tmp_path_factory, items)``: it is called with the file's
      collected tests, to start work of its own (:data:`BACKGROUND`, :func:`in_background`) that its
      fixtures then wait for. What is left of the queue when the session ends is stopped.
    - The METEOR process that every scoring call shares (``idc_lite.tools.metrics.meteor.start_shared``)
      is started when a collected test needs Java: it loads its paraphrase table (seconds) meanwhile.
    """
    items = request.session.items
    by_module = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and callable(getattr(module, "start_early", None)):
            by_module.setdefault(module, []).append(item)
    for module, module_items in by_module.items():
        module.start_early(tmp_path_factory, module_items)
    if any(_needs_java(item) for item in items):
        from idc_lite.tools.metrics import meteor

        with contextlib.suppress(meteor.MeteorError):  # a Java that fails to start fails the tests that need it
            pid = meteor.start_shared()  # None when METEOR is unavailable here
            if pid is not None:
                _lower_priority(pid)
    yield
    BACKGROUND.stop()


def _needs_java(item) -> bool:
    return any("java" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def _lower_priority(pid: int) -> None:
    """Give process ``pid`` (and the processes it starts) the background's priority: tests go first."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, pid, Background.NICE)


def in_background(function, *args) -> Future:
    """``function(*args)`` in a thread of its own (for work that waits on processes: the GIL is free).
    On Linux, where a thread has a priority of its own, the thread and the processes it starts run at
    the background's priority."""
    future: Future = Future()

    def run() -> None:
        if sys.platform.startswith("linux"):
            _lower_priority(threading.get_native_id())
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # raised in the test that waits for it
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


class Job:
    """A command in the :class:`Background` queue; :meth:`result` waits for it."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path):
        self.command, self.env, self.cwd = command, env, cwd
        self._done = threading.Event()
        self._result: subprocess.CompletedProcess | BaseException | None = None

    def finish(self, result: subprocess.CompletedProcess | BaseException) -> None:
        self._result = result
        self._done.set()

    def result(self) -> subprocess.CompletedProcess:
        """How the command ended (its output captured as text); waits until it has."""
        self._done.wait()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


class Background:
    """One queue of commands for the session: run one after the other (in the order submitted), each in a
    process (and process group) of its own, at a lower priority, so that the test that is running goes
    first and the queue takes what the tests leave of the cores."""

    NICE = 10

    def __init__(self):
        self._queue: list[Job] = []
        self._ready = threading.Condition()
        self._process: subprocess.Popen | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    def submit(self, command: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> Job:
        job = Job(command, dict(os.environ) if env is None else env, cwd)
        with self._ready:
            if self._stopped:
                job.finish(RuntimeError("not run: the session had ended"))
                return job
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            self._ready.notify()
        return job

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                job = self._queue.pop(0)
                try:
                    self._process = subprocess.Popen(job.command, env=job.env, cwd=job.cwd, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
                except BaseException as exc:  # raised in the test that waits for it
                    job.finish(exc)
                    continue
                _lower_priority(self._process.pid)
            out, err = self._process.communicate()
            job.finish(subprocess.CompletedProcess(job.command, self._process.returncode, out, err))

    def stop(self) -> None:
        """End the command running now, its children with it, and start no other."""
        with self._ready:
            self._stopped = True
            process, pending, self._queue = self._process, self._queue, []
            self._ready.notify()
        for job in pending:
            job.finish(RuntimeError("not run: the session ended first"))
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (AttributeError, OSError):
                process.kill()
        if self._thread is not None:
            self._thread.join(30)


#: The session's queue of background commands (:func:`_start_early`).
BACKGROUND = Background()


def random_pairs(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (before, after) uint8 image pairs of assorted sizes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        h, w = rng.integers(24, 64, size=2)
        before = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        after = before.copy()
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        after[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        pairs.append((before, after))
    return pairs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny BLIP-2 OPT model directory, as a hub download would leave it."""
    from idc_lite.tools.modelgen import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-blip2", seed=0)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(model_dir: Path, cache: Path, monkeypatch) -> Path:
    """``model_dir`` as huggingface_hub's cache holds ``acme/tiny-blip2`` at :data:`HUB_COMMIT` (``main``);
    the cache is made the current one. Returns the snapshot folder."""
    import shutil

    repo = cache / "models--acme--tiny-blip2"
    shutil.copytree(model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / HUB_COMMIT


def make_adapter(model_dir: Path, out_dir: Path, layout: str, seed: int = 1, r: int = 4) -> Path:
    """A LoRA adapter for ``model_dir`` with BLIP2IDC's target modules and non-zero random weights (from numpy).

    ``layout="legacy"`` writes BLIP2IDC's released layout (``adapter_model.bin`` pickle of tensors and
    its adapter_config.json); ``"peft"`` writes PEFT's safetensors layout.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import Blip2ForConditionalGeneration

    config = json.loads((DATA / "blip2idc-ier.adapter_config.json").read_text())
    config.update(r=r, lora_alpha=2 * r, base_model_name_or_path=str(model_dir))
    net = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    lora = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    peft_model = get_peft_model(net, lora)
    # Random A and B (PEFT starts B at zero), B @ A a tenth of the weight it adds to: the adapter
    # visibly changes the model, and merged weights stay close enough to int4's grid (see modelgen).
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.from_numpy(rng.standard_normal(tuple(a.shape))))
                target = ADAPTER_STRENGTH * float(module.base_layer.weight.std()) / module.scaling["default"]
                b.copy_(torch.from_numpy(rng.standard_normal(tuple(b.shape)) * target / np.sqrt(r)))
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if layout == "legacy":
        torch.save(state, out_dir / "adapter_model.bin")
    else:
        save_file(state, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture(scope="session")
def legacy_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "legacy", "legacy")


@pytest.fixture(scope="session")
def peft_adapter(tiny_model, tmp_path_factory) -> Path:
    """The same weights as ``legacy_adapter`` (same seed), in PEFT's safetensors layout."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "peft", "peft")


@pytest.fixture(scope="session")
def pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    return random_pairs(7)


@pytest.fixture(scope="session")
def adapted(tiny_model, legacy_adapter):
    """The reference backend with the adapter, unmerged: BLIP2IDC as it was trained."""
    from idc_lite import Captioner, GenerationSettings

    return Captioner(tiny_model, legacy_adapter, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))


# --- the artifacts: each built once per session, read by every test that needs one ---------------


@pytest.fixture(scope="session")
def artifact(tiny_model, legacy_adapter, tmp_path_factory) -> Path:
    """The tiny model with the legacy adapter merged: torch-fp32 (the reference decoder) beside the ONNX
    Runtime decoders (ort-fp32, ort-int4, ort-int4-fp16), fp32 encoder. ort-int4's LM head is int8,
    as a large model's is by default (the tiny one's would stay fp16), so that the runtime tests run it."""
    from export.build import build_artifact

    return build_artifact(tiny_model, tmp_path_factory.mktemp("artifacts") / "ort", legacy_adapter,
                          decoders=("torch-fp32", "ort-fp32", "ort-int4", "ort-int4-fp16"), ort_head="int8")


@pytest.fixture(scope="session")
def artifact_int4(tiny_model, legacy_adapter, tmp_path_factory) -> Path:
    """The default build of the tiny model with the legacy adapter: bnb-int4 and ort-int4."""
    from export.build import build_artifact

    return build_artifact(tiny_model, tmp_path_factory.mktemp("artifacts") / "int4", legacy_adapter)


@pytest.fixture(scope="session")
def reference(tiny_model):
    """A reference-backend captioner on the tiny model, shared by read-only tests."""
    from idc_lite import Captioner, GenerationSettings

    return Captioner(tiny_model, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
