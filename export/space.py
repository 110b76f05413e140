"""Disk space of an export: checked before the long work starts, and a full disk said plainly.

An export of OPT-2.7B runs for minutes and writes far more than the artifact it leaves: the merged
weights when an adapter is merged (fp32), and the fp32 ONNX graph of the language model that the
int4 ONNX Runtime decoders are quantized from (10.6 GB for OPT-2.7B). :func:`export_disk_need`
counts the bytes an export is sure to hold on disk at once, from the config alone (parameter
counts, no weights read): a lower bound, so that :func:`check_free_space` refuses only an export
that cannot fit. If the disk still fills up (another process writing, the graphs' extra tensors),
:func:`disk_full_error` turns ONNX's or the OS's message (onnx says "Cannot open external data for
tensor ...") into one naming the folder and the space left.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from idc_lite.tools.memory import ParamCounts

from .errors import ExportError

#: Bytes per parameter of the encoder's ONNX graph, by encoder precision (int4: the 4-bit weights alone).
ENCODER_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}
#: Bytes per language-model parameter of each decoder's files (int4: the 4-bit weights alone).
DECODER_BYTES = {"torch-fp32": 4, "torch-fp16": 2, "bnb-int4": 0.5, "ort-fp32": 4, "ort-int4": 0.5,
                 "ort-int4-fp16": 0.5}
#: Decoders quantized from an fp32 ONNX graph written beside the artifact first.
FROM_FP32_GRAPH = ("ort-int4", "ort-int4-fp16")
#: Free space under which a failed write is taken for a full disk.
LOW_SPACE = 256 * 2**20


def export_disk_need(counts: ParamCounts, encoder_precision: str, decoders, merge: bool,
                     reference: bool = False) -> dict[str, int]:
    """Bytes an export surely writes, by kind: a lower bound of what it holds on disk at once.

    ``artifact``: its encoder and decoders, and with ``reference`` the shipped fp16 base; ``merged``: the merged fp32 weights (``merge``);
    ``graph``: the fp32 graph the int4 ONNX Runtime decoders are quantized from (one at a time), all
    three beside the artifact; ``tmp``: the fp32 language model ``bnb-int4`` saves to the system's
    temporary folder to quantize it. The decoders are built one after the other, so ``graph`` and
    ``tmp`` never coexist.
    """
    language = counts.language_model
    encoder = counts.vision + counts.qformer + counts.projection
    artifact = encoder * ENCODER_BYTES[encoder_precision] + sum(DECODER_BYTES[d] * language for d in decoders)
    artifact += 2 * counts.unique if reference else 0
    return {"artifact": int(artifact), "merged": 4 * counts.unique if merge else 0,
            "graph": 4 * language if any(d in FROM_FP32_GRAPH for d in decoders) else 0,
            "tmp": 4 * language if "bnb-int4" in decoders else 0}


def check_free_space(out_dir: Path, need: dict[str, int]) -> None:
    """Raise :class:`ExportError` if ``out_dir``'s disk (or the temporary folder's) cannot hold ``need``."""
    beside = need["artifact"] + need["merged"]
    tmp_dir = Path(tempfile.gettempdir())
    same_disk = not need["tmp"] or os.stat(tmp_dir).st_dev == os.stat(out_dir).st_dev
    checks = [(out_dir, beside + max(need["graph"], need["tmp"] if same_disk else 0))]
    if not same_disk:
        checks.append((tmp_dir, need["tmp"]))
    for place, total in checks:
        free = shutil.disk_usage(place).free
        if free < total:
            hint = "TMPDIR" if place == tmp_dir and not same_disk else "--out"
            raise ExportError(place, f"not enough disk space for this export: it writes at least {_gib(total)} GiB "
                              f"here, {_gib(free)} GiB are free; free some or build elsewhere ({hint})")


def disk_full_error(place: Path, exc: BaseException) -> ExportError | None:
    """An :class:`ExportError` saying the disk filled up, if that is why ``exc`` was raised; else None.

    Call it before cleaning up, while the disk is still full: an OS "no space left" anywhere in
    the exception's chain, or any write failure with less than :data:`LOW_SPACE` left.
    """
    if not isinstance(exc, Exception) or isinstance(exc, ExportError):
        return None
    chain, seen = exc, set()
    no_space = False
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        no_space |= isinstance(chain, OSError) and chain.errno == errno.ENOSPC
        chain = chain.__cause__ or chain.__context__
    try:  # the fuller of the artifact's disk and the temporary folder's (bnb-int4 writes there)
        free, which, place = min((shutil.disk_usage(p).free, i, p)
                                 for i, p in enumerate((Path(place), Path(tempfile.gettempdir()))))
    except OSError:
        return None
    if not no_space and free >= LOW_SPACE:
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    hint = "--out" if which == 0 else "TMPDIR"
    return ExportError(place, f"the disk filled up during the export ({free / 2**20:.0f} MiB left; {first}); "
                       f"free some space or build elsewhere ({hint})")


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f}"
