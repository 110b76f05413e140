"""One backend, measured in a fresh process of its own, so that its peak memory is its own.

    python -m benchmarks.measure SPEC.json RESULT.json

The spec (written by :mod:`benchmarks.runner`) names the backend (``reference`` with a model dir,
adapter, device and dtype; or ``lite`` with an artifact, decoder and device), the batch sizes,
repeats, warm-up runs and the number of new tokens. For each batch size, smallest first:

- a warm-up run of the whole model, which also checks that every pair gets exactly ``new_tokens``
  new tokens (:func:`exactly_new_tokens`);
- ``repeats`` times: the encoder alone on the composed batch (lite: the ONNX graph; reference:
  torch's vision model + Q-Former + projection) and the end-to-end path
  (:meth:`Captioner.describe_batch`: composition, encoder, decoder, detokenization);
- the peak RSS so far (:func:`benchmarks.processes.peak_rss_bytes`) and, on CUDA, the peak GPU
  memory (:class:`GpuPeak`).

A batch size that runs out of memory is recorded as skipped and larger ones are not tried. Then,
with the peaks already recorded, the decoder alone (:func:`benchmarks.decoder_speed.decoder_ms_per_token`,
decode steps without the prefill) and, if asked, the captions of the quality pairs with the
model's own generation settings. The result file is rewritten after every step, so a child killed
midway (out of memory) still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from .processes import peak_rss_bytes

#: An EOS id no model can produce: generation then always runs to ``max_new_tokens``.
NEVER_EOS = -1


@contextmanager
def exactly_new_tokens(backend):
    """Generation that never stops before ``max_new_tokens``, for runs of comparable length.

    Benchmark-only: the backend's token settings get an EOS id that no model produces; both the
    reference and the lite decoders read their stopping ids from there (``idc_lite.decoding``).
    """
    original = backend.tokens
    backend.tokens = dataclasses.replace(original, eos_token_ids=(NEVER_EOS,))
    try:
        yield
    finally:
        backend.tokens = original


def benchmark_pairs(n: int, seed: int = 0) -> list:
    """``n`` (before, after) PIL image pairs of the synthetic world's test split."""
    from idc_lite.tools.synth import generate_pair

    return [(pair.before, pair.after) for pair in (generate_pair(i, seed, "test") for i in range(n))]


def summarize(samples: list[float]) -> dict:
    """Median, quartiles, min and max of ``samples`` (and the samples)."""
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": quartiles[0], "q3": quartiles[2],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered), "samples": samples}


class GpuPeak:
    """Peak GPU memory of this process, sampled every few milliseconds in a thread.

    Two figures: this process's memory as NVML reports it (with pynvml, ``nvidia-ml-py``), which
    counts torch, ONNX Runtime and the CUDA context; and the device's used memory minus what was
    used before the model was loaded (right when nothing else runs on the GPU). :attr:`peak` is
    the first when NVML sees this process (it may not inside some containers), else the second.
    Torch's own peak (``max_memory_allocated``) is kept apart: it misses ONNX Runtime's allocations.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.005):
        import torch

        self._torch, self._index, self._interval = torch, index, interval_s
        free, total = torch.cuda.mem_get_info(index)  # also creates the CUDA context
        self._baseline = total - free
        self._nvml = self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # pynvml missing or NVML unusable: the device-wide figure only
            pass
        self.process_peak = self.device_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def source(self) -> str:
        return "nvml-process" if self.process_peak else "device-used-minus-baseline"

    @property
    def peak(self) -> int:
        return self.process_peak or self.device_peak

    def current(self) -> int:
        return self._process_bytes() or self._device_bytes()

    def _process_bytes(self) -> int:
        if self._nvml is None:
            return 0
        pid = os.getpid()
        return sum(p.usedGpuMemory or 0 for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                   if p.pid == pid)

    def _device_bytes(self) -> int:
        free, total = self._torch.cuda.mem_get_info(self._index)
        return total - free - self._baseline

    def reset_torch_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats(self._index)

    def torch_peak(self) -> int:
        return self._torch.cuda.max_memory_allocated(self._index)

    def _sample_once(self) -> None:
        self.process_peak = max(self.process_peak, self._process_bytes())
        self.device_peak = max(self.device_peak, self._device_bytes())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sample_once()
            time.sleep(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()


@dataclasses.dataclass
class Loaded:
    """A loaded backend and what the measurements need from it."""

    captioner: object
    encode: Callable  # pixels (N, 3, H, W) float32 -> query embeddings, synchronised
    decoder_kind: str  # the name decoder_speed knows it by
    language_model: object | None  # a torch decoder to time, or None (decoder_speed loads the ORT one)
    decoder_bytes: int | None  # weights read per decode step, when known here
    details: dict


def load(backend: dict, artifact: str | None) -> Loaded:
    """Build the captioner of ``backend`` and its encoder-alone function."""
    from idc_lite import Captioner

    if backend["kind"] == "reference":
        captioner = Captioner(backend["model"], backend.get("adapter"), backend="reference", device=backend["device"],
                              dtype=backend["dtype"], merge_adapter=True)
        net = captioner.backend.net
        return Loaded(captioner, _torch_encoder(net, captioner.backend.device, captioner.backend.dtype),
                      f"reference-{backend['dtype']}", net.language_model, read_bytes(net.language_model),
                      {"adapter_merged": captioner.backend.adapter is not None})
    from idc_lite.artifact import TORCH_DECODERS

    from .decoder_speed import decoder_weight_bytes

    captioner = Captioner(artifact, backend="lite", device=backend["device"], decoder=backend["decoder"])
    lite = captioner.backend
    torch_decoder = lite.decoder if lite.decoder_name in TORCH_DECODERS else None
    # ONNX Runtime returns host arrays: its run is over when it returns, on CUDA too.
    return Loaded(captioner, lite.encode, lite.decoder_name, torch_decoder,
                  decoder_weight_bytes(lite.decoder_name, artifact), {"encoder_providers": lite.session.get_providers()})


def _torch_encoder(net, device: str, dtype) -> Callable:
    """The reference's encoder alone: vision model + Q-Former + projection, as the ONNX graph has it."""
    import torch

    from export.encoder import QueryEncoder

    module = QueryEncoder(net).eval()

    def encode(pixels):
        with torch.inference_mode():
            out = module(torch.from_numpy(pixels).to(device, dtype))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return encode


def read_bytes(language_model) -> int:
    """Bytes of a torch decoder's weights read per decode step: all but the embedding lookups.

    The rule of :func:`benchmarks.decoder_speed.decoder_weight_bytes`: the position table is read one
    row per token, and so is the token table unless it doubles as the LM head (tied).
    """
    head = language_model.get_output_embeddings().weight
    total = 0
    for name, param in language_model.named_parameters():
        if "embed_positions" in name or ("embed_tokens" in name and param is not head):
            continue
        total += param.numel() * param.element_size()
    return total


def measure_batch(loaded: Loaded, batch_size: int, spec: dict, gpu: GpuPeak | None) -> dict:
    """Warm-up (with the token-count check), then ``repeats`` encoder and end-to-end runs at ``batch_size``."""
    from idc_lite.compose import compose_batch
    from idc_lite.settings import GenerationSettings

    captioner = loaded.captioner
    backend = captioner.backend
    new_tokens, repeats = spec["new_tokens"], spec["repeats"]
    pairs = benchmark_pairs(batch_size)
    pixels = compose_batch(pairs, captioner.composition, backend.processor)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    if gpu is not None:
        gpu.reset_torch_peak()
    encoder_s, e2e_s = [], []
    with exactly_new_tokens(backend):
        for _ in range(max(1, spec["warmup"])):  # at least one: it checks the token counts
            lengths = sorted({len(ids) for ids in backend.generate(pixels, settings)})
        if lengths != [new_tokens]:
            raise RuntimeError(f"asked for exactly {new_tokens} new tokens, got {lengths}")
        for _ in range(repeats):
            encoder_s.append(_timed(lambda: loaded.encode(pixels)))
            started = time.perf_counter()
            results = list(captioner.describe_batch(pairs, batch_size=batch_size, generation=settings))
            e2e_s.append(time.perf_counter() - started)
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"end-to-end run failed: {failed[0]}")
    row = {
        "batch_size": batch_size,
        "new_tokens": lengths[0],
        "encoder_ms_per_pair": summarize([1000 * s / batch_size for s in encoder_s]),
        "e2e_ms_per_pair": summarize([1000 * s / batch_size for s in e2e_s]),
        "pairs_per_s": summarize([batch_size / s for s in e2e_s]),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if gpu is not None:
        row.update(gpu_peak_bytes=gpu.peak, gpu_peak_source=gpu.source, gpu_peak_device_bytes=gpu.device_peak,
                   gpu_peak_torch_bytes=gpu.torch_peak())
    return row


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (torch CUDA, ONNX Runtime, or the host)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "failed to allocate" in text


def measure(spec: dict, out: Path) -> dict:
    """Measure the backend of ``spec``, writing the result to ``out`` after every step."""
    _first_to_go()
    backend = spec["backend"]
    result: dict = {"backend": backend, "batches": [], "error": None}
    write = lambda: out.write_text(json.dumps(result, indent=1), encoding="utf-8")  # noqa: E731
    gpu = None
    try:
        if backend["device"].startswith("cuda"):
            gpu = GpuPeak(int(backend["device"].split(":")[1]) if ":" in backend["device"] else 0)
        started = time.perf_counter()
        loaded = load(backend, spec.get("artifact"))
        # torch only if the backend imported it: the lite runtime on a CPU does without it, and its
        # start-up and memory are measured as a user gets them.
        torch = sys.modules.get("torch")
        result.update(load_s=time.perf_counter() - started, rss_after_load_bytes=peak_rss_bytes(),
                      torch_threads=torch.get_num_threads() if torch else None, torch_imported=torch is not None,
                      decoder_bytes=loaded.decoder_bytes, **loaded.details)
        if gpu is not None:
            result["gpu_after_load_bytes"] = gpu.current()
        write()
        measured = []
        for batch_size in spec["batch_sizes"]:
            try:
                result["batches"].append(measure_batch(loaded, batch_size, spec, gpu))
                measured.append(batch_size)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                result["batches"].append({"batch_size": batch_size, "skipped": f"out of memory ({_first_line(exc)})"})
                write()
                break
            write()
        result["decoder_ms_per_token"] = decode_speed(loaded, spec, measured)
        write()
        if spec.get("quality"):
            result["quality"] = captions(loaded.captioner, spec["quality"])
            write()
    except Exception as exc:  # recorded in the result; the runner reports it and exits non-zero
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        write()
    finally:
        if gpu is not None:
            gpu.stop()
    return result


def decode_speed(loaded: Loaded, spec: dict, batch_sizes: list[int]) -> dict[str, float]:
    """Median ms per decode step (the decoder alone, prefill excluded), by batch size."""
    from .decoder_speed import decoder_ms_per_token

    device = loaded.captioner.backend.device
    return {str(b): decoder_ms_per_token(loaded.decoder_kind, spec["artifact"], batch=b, new_tokens=spec["new_tokens"],
                                         repeats=spec["repeats"], device=device, language_model=loaded.language_model)
            for b in batch_sizes}


def captions(captioner, quality: dict) -> dict:
    """Captions of the quality pairs, with the model's own generation settings (EOS stops)."""
    from idc_lite.tools.datasets import read_jsonl

    records = read_jsonl(quality["dataset"])[: quality["n"]]
    results = captioner.describe_batch(((r.before, r.after) for r in records), batch_size=quality["batch_size"],
                                       on_error="return")
    return {"captions": {record.id: result.caption for record, result in zip(records, results)},
            "errors": {record.id: result.error for record, result in zip(records, results) if result.error}}


def _first_to_go() -> None:
    """Ask the kernel to kill this process first if memory runs out, not a neighbour's."""
    with suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _timed(function: Callable) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])
    from idc_lite.runtime import quiet_libraries

    quiet_libraries()
    result = measure(json.loads(Path(spec_path).read_text(encoding="utf-8")), Path(out_path))
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
