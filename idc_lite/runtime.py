"""Shared runtime plumbing: device choice, dtype names, quiet library imports, which hosts are this machine."""

from __future__ import annotations

import ipaddress
import logging
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (weight-loading bars, optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cuda_driver_devices() -> int:
    """CUDA devices the NVIDIA driver reports, 0 without a driver; asked without importing torch."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", ctypes.util.find_library("cuda")):
        if not name:
            continue
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is usable, else ``cpu``; ``cuda:N`` is kept.

    ``auto`` on a machine without an NVIDIA driver is settled without importing torch (a second of
    start-up on a CPU, where the lite runtime needs no torch at all); with one, torch decides.
    """
    if device == "auto" and "torch" not in sys.modules and not cuda_driver_devices():
        return "cpu"
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import IdcError

        raise IdcError(None, f"device {device!r} asked for, but no CUDA GPU is available (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {device!r}")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype to run in: fp16 on CUDA and fp32 on CPU unless ``dtype`` says otherwise."""
    import torch

    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    name = DTYPES.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))}, not {dtype!r}")
    return getattr(torch, name)
