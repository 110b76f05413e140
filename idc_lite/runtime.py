"""Shared runtime plumbing: device choice, dtype names, quiet library imports."""

from __future__ import annotations

import logging

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (weight-loading bars, optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is usable, else ``cpu``; ``cuda:N`` is kept."""
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
