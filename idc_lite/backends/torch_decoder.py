"""The OPT decoder of an artifact in torch: int4 through bitsandbytes (NF4), or fp16 / fp32.

The int4 decoder is stored pre-quantized (transformers' bitsandbytes serialization), so loading it
does not need the full-precision weights. Its compute dtype is fp16 on CUDA and fp32 on CPU.
"""

from __future__ import annotations

from pathlib import Path

from ..artifact import TORCH_DECODERS
from ..errors import ArtifactError, first_line


def load_torch_decoder(path: Path, name: str, device: str):
    """Load an artifact's torch decoder (``OPTForCausalLM``) on ``device``, in eval mode."""
    import torch
    from transformers import OPTForCausalLM

    from ..runtime import quiet_libraries

    quiet_libraries()
    precision = TORCH_DECODERS[name]
    # fp16 weights run in fp16 on CUDA only; on CPU everything computes in fp32.
    dtype = torch.float16 if device.startswith("cuda") and precision != "fp32" else torch.float32
    try:
        decoder = OPTForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype, device_map={"": device})
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(path, f"cannot load the {name} decoder ({first_line(exc)})") from None
    if precision == "int4":
        # The compute dtype saved with a pre-quantized checkpoint is the exporting machine's; set ours.
        import bitsandbytes as bnb

        for module in decoder.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype = dtype
    return decoder.eval()
