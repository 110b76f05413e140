"""Backends turn a batch of composed pairs into new token ids.

:class:`Backend` is the surface :class:`idc_lite.Captioner` relies on; the lite backend
(:mod:`.lite`: an artifact under ONNX Runtime) and the reference backend (:mod:`.reference`:
transformers, the ``reference`` extra) both provide it. ONNX Runtime sessions are opened in
:mod:`.sessions` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ..attention import ViTGeometry
    from ..settings import GenerationSettings, ProcessorSettings, TokenSettings


@runtime_checkable
class Backend(Protocol):
    """What a backend offers the captioner."""

    #: ``"reference"`` or ``"lite"``.
    name: str
    #: What the user asked for (path or hub id), as reported in results.
    model_id: str
    #: The adapter's name, or None.
    adapter: str | None
    #: The model's image-processor settings, which pair composition uses.
    processor: ProcessorSettings
    #: Token ids that decoding depends on.
    tokens: TokenSettings
    #: Builds the prompt prefix and decodes new ids: ``tokenizer(text, add_special_tokens=False)``
    #: and ``tokenizer.batch_decode(ids, skip_special_tokens=True)``.
    tokenizer: Any

    def generate(self, pixels: np.ndarray, settings: GenerationSettings) -> list[list[int]]:
        """New token ids for each pair of a float32 ``(N, 3, H, W)`` batch, padded to the longest."""
        ...

    def attention_geometry(self) -> ViTGeometry:
        """The ViT's layers, heads, patch size and patch grid (:mod:`idc_lite.attention`)."""
        ...

    def attention(self, pixels: np.ndarray, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """Attention probabilities ``(N, heads, tokens, tokens)`` of each ViT layer in ``layers``."""
        ...
