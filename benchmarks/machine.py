"""The machine a benchmark ran on and the library versions it used, recorded with every result.

The runner stays light (no torch import, so its own memory does not weigh on the children it
measures): the CPU, RAM and load come from ``/proc`` and :mod:`platform`, library versions from
package metadata, and the GPU from one short child process (``python -m benchmarks.machine``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

#: Distributions whose versions are recorded (first installed name of each entry wins).
LIBRARIES = {
    "idc_lite": ("idc-lite",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "onnx": ("onnx",),
    "bitsandbytes": ("bitsandbytes",),
    "numpy": ("numpy",),
}


#: Libraries whose version is read from the module itself: where both the CPU and the GPU wheel of
#: ONNX Runtime were ever installed, both leave a record and the metadata names the wrong one.
FROM_MODULE = ("onnxruntime",)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries the measured paths depend on, and Python's."""
    import importlib

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, candidates in LIBRARIES.items():
        versions[name] = next((v for v in map(_version, candidates) if v), None)
        if name in FROM_MODULE and versions[name] is not None:
            try:
                versions[name] = importlib.import_module(name).__version__
            except Exception:  # a broken install: keep what its metadata says
                pass
    return versions


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int | None:
    """Physical memory, from /proc/meminfo (Linux) or sysconf."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(gpu: dict | None = None) -> dict:
    """CPU, cores, RAM, load, OS, libraries and the GPU (``gpu``: :func:`probe_gpu`'s result)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "ram_bytes": total_ram_bytes(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "gpu": gpu or {"available": False},
        "libraries": library_versions(),
    }


def describe(machine: dict) -> str:
    """One line naming the machine: CPU, cores, RAM and GPU."""
    ram = f", {machine['ram_bytes'] / 2**30:.0f} GiB RAM" if machine.get("ram_bytes") else ""
    gpu = machine["gpu"]
    gpu_text = f", GPU {gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB)" if gpu.get("available") else ", no GPU"
    return f"{machine['cpu']} ({machine['cpu_usable']} of {machine['cpu_count']} cores usable){ram}{gpu_text}"


def probe_gpu() -> dict:
    """The CUDA GPU torch sees, asked in a child process so that this one never imports torch."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.machine"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"available": False, "error": (done.stderr.strip().splitlines() or ["probe failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gpu_here() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    props = torch.cuda.get_device_properties(0)
    return {"available": True, "name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}"}


if __name__ == "__main__":
    print(json.dumps(_gpu_here()))
