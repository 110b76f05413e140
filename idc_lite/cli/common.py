"""Options shared by the commands that run a model, and the captioner they build."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model directory, hub id or idc-lite artifact. Default: the embedded model.")]
Adapter = Annotated[Optional[str], typer.Option(
    "--adapter", "-a", help="LoRA adapter folder (PEFT safetensors or legacy BLIP2IDC adapter_model.bin).")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")]
Backend = Annotated[str, typer.Option("--backend", help="auto (lite for an artifact), reference or lite.")]
Dtype = Annotated[Optional[str], typer.Option(
    "--dtype", help="Reference backend dtype: fp32, fp16 or bf16 (default fp16 on CUDA, fp32 on CPU).")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")]
NumBeams = Annotated[int, typer.Option("--num-beams", min=1, help="Beam width (1 = greedy, as BLIP2IDC).")]
Prompt = Annotated[Optional[str], typer.Option(
    "--prompt", help="Optional text prompt after the image (BLIP2IDC uses none).")]
Decoder = Annotated[Optional[str], typer.Option(
    "--decoder", help="Lite backend: which of the artifact's decoders (bnb-int4, ort-int4, torch-fp32, ...).")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="Lite backend: ONNX Runtime CPU threads.")]
SizePolicy = Annotated[str, typer.Option(
    "--size-policy", help="Pairs of different sizes: smallest (both to the smaller size, BLIP2IDC demo), "
    "after (before resized to after, IER loaders) or strict (refuse).")]


def build_captioner(model, adapter, revision, device, backend, dtype, size_policy, max_new_tokens, num_beams, prompt,
                    decoder=None, threads=None):
    """A :class:`idc_lite.Captioner` from command-line options (slow: loads the model)."""
    from ..captioner import BACKENDS, Captioner
    from ..errors import IdcError
    from ..runtime import DTYPES
    from ..settings import CompositionSettings, GenerationSettings

    try:
        composition = CompositionSettings(size_policy=size_policy)
        generation = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, prompt=prompt)
    except ValueError as exc:
        raise IdcError(None, str(exc)) from None
    if backend not in BACKENDS:
        raise IdcError(None, f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if dtype is not None and dtype not in DTYPES:
        raise IdcError(None, f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise IdcError(None, f"--device must be auto, cpu or cuda[:N], not {device!r}")
    lite_options = {k: v for k, v in (("decoder", decoder), ("threads", threads)) if v is not None}
    if lite_options and backend == "reference":
        raise IdcError(None, "--decoder and --threads apply to the lite backend only")
    return Captioner(
        model, adapter, device=device, dtype=dtype, backend=backend, revision=revision,
        composition=composition, generation=generation, **lite_options,
    )
