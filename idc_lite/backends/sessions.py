"""ONNX Runtime sessions, opened in one place: providers for a device, CUDA options, CPU memory settings.

Every graph of an artifact (the encoder, each ONNX Runtime decoder) is opened by :func:`open_session`,
so the provider choice, the CUDA library preload, the arena settings and the one-line error for a
graph ONNX Runtime cannot load are the same everywhere. The measurements behind each setting are in
``docs/design.md``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..artifact import check_onnxruntime
from ..errors import ArtifactError, first_line

logger = logging.getLogger("idc_lite")

#: CUDA execution provider options: grow the memory arena by what is asked (the smallest GPU peak of
#: the settings measured) and pick cuDNN's convolution algorithm by heuristics (the exhaustive search
#: costs seconds at the first run, for the ViT's one patch convolution).
CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"}

#: ONNX Runtime's CPU memory arena keeps every block it ever allocated and grows with each batch size
#: it sees; CPU sessions run without it (plain malloc, large blocks returned at once): a lower peak at
#: the same speed. Graph optimizations stay at ONNX Runtime's default, ALL: what makes MatMulNBits fast.
CPU_MEM_ARENA = False


def session_providers(device: str, providers: list[str] | None = None) -> list:
    """ONNX Runtime providers for ``device``: CUDA (on the device's GPU) then CPU, or CPU only."""
    if providers:
        return list(providers)
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index, **CUDA_OPTIONS}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@functools.cache
def _preload_cuda_libraries() -> None:
    """Make the CUDA libraries of the pip ``nvidia-*`` packages visible to ONNX Runtime (once)."""
    import importlib.util

    import onnxruntime as ort

    if importlib.util.find_spec("torch") is not None:
        importlib.import_module("torch")  # loads libcudart, cuBLAS and cuDNN from torch's nvidia-* packages
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception:  # a partial preload is still fine: the session says below if CUDA is unusable
            pass


def both_runtimes_installed() -> bool:
    """Whether the CPU and the GPU ONNX Runtime wheels are both installed (they overwrite each other's files)."""
    from importlib.metadata import PackageNotFoundError, version

    found = 0
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(name)
            found += 1
        except PackageNotFoundError:
            pass
    return found == 2


def open_session(path, device: str, providers: list[str] | None = None, threads: int | None = None,
                 profile_prefix: str | None = None):
    """An ONNX Runtime session for the graph at ``path`` on ``device``; a graph it cannot load is an ArtifactError.

    ``profile_prefix``: ONNX Runtime's per-node profiler on, writing ``<prefix>_<time>.json``
    (``session.end_profiling()`` ends it and returns the path); for benchmarks, never the default."""
    import onnxruntime as ort

    check_onnxruntime(path, ort.__version__)  # the GPU wheel is not bound by this package's requirement
    # Its environment logger warns at every CUDA session ("No registered plugin EP device found");
    # whether a session really runs on the GPU is said below. Set here so that paths without ONNX
    # Runtime do not import it.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    chosen = session_providers(device, providers)
    wants_cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in chosen)
    if wants_cuda:
        _preload_cuda_libraries()
    else:
        options.enable_cpu_mem_arena = CPU_MEM_ARENA
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ArtifactError(path, f"ONNX Runtime cannot load it ({first_line(exc)})") from None
    if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
        if not wants_cuda and both_runtimes_installed():
            why = ("onnxruntime and onnxruntime-gpu are both installed and overwrite each other: "
                   "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
        elif not wants_cuda:
            why = "this onnxruntime has no CUDA execution provider: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
        else:
            why = "ONNX Runtime could not start its CUDA execution provider (CUDA or cuDNN libraries missing?)"
        logger.warning("%s: runs on the CPU, not %s: %s", Path(path).name, device, why)
    return session
