"""One decoder of an artifact, opened by name outside a :class:`~idc_lite.Captioner`.

The export validates the decoders it has just written, and the benchmarks time a decoder's steps
alone; both open them here rather than reaching into the backends.
"""

from __future__ import annotations

from .artifact import ORT_DECODERS, TORCH_DECODERS, Manifest
from .errors import ArtifactError


def load_decoder(manifest: Manifest, name: str, device: str = "cpu", *, providers: list[str] | None = None,
                 threads: int | None = None, profile_prefix: str | None = None):
    """The artifact's decoder ``name`` on ``device``.

    ``profile_prefix`` (ONNX Runtime decoders): turn on ONNX Runtime's per-node profiler; its JSON file
    is named from that prefix and ``decoder.session.end_profiling()`` returns its path.

    An ONNX Runtime decoder comes back as :class:`idc_lite.backends.ort_decoder.OrtDecoder`
    (``generate``, ``new_cache``, ``session``), a torch one as transformers' ``OPTForCausalLM`` in
    eval mode (the ``reference`` extra).
    """
    if name not in manifest.decoders:
        raise ArtifactError(manifest.path, f"has no {name!r} decoder; it holds {', '.join(manifest.decoders)}")
    if name in ORT_DECODERS:
        from .backends.ort_decoder import load_ort_decoder

        return load_ort_decoder(manifest, name, device, providers, threads, profile_prefix)
    if name in TORCH_DECODERS:
        from .backends.torch_decoder import load_torch_decoder

        return load_torch_decoder(manifest.decoder_dir(name), name, device)
    raise ArtifactError(manifest.path, f"decoder {name!r} is not supported by this idc-lite")


def load_torch_decoder(path, name: str, device: str = "cpu"):
    """A torch decoder folder (``bnb-int4``, ``torch-fp16``, ``torch-fp32``) not yet in a manifest, as the runtime loads it."""
    from .backends.torch_decoder import load_torch_decoder as load

    return load(path, name, device)
