"""Backends turn a batch of composed pairs into new token ids.

Every backend exposes the same small surface, which :class:`idc_lite.Captioner` relies on:

- ``name`` (``"reference"`` or ``"lite"``), ``model_id``, ``adapter`` (name or None);
- ``processor`` (:class:`~idc_lite.settings.ProcessorSettings`) and ``tokens``
  (:class:`~idc_lite.settings.TokenSettings`), read from the model;
- ``tokenizer`` (used to build the prompt prefix and decode);
- ``generate(pixels, settings) -> list[list[int]]``: new token ids for each pair of a float32
  ``(N, 3, H, W)`` batch.
"""
