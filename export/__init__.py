"""Build time: BLIP-2 base + BLIP2IDC LoRA adapter -> the artifact the lite runtime runs.

``python -m export build --base DIR|ID --adapter DIR --out ARTIFACT`` merges the adapter, exports the
vision side as one ONNX graph, saves the decoder (int4 by default), and writes the manifest.
``python -m export build blip2idc-syned-emu --out ARTIFACT`` does the same for a released adapter.
The runtime (``idc_lite``) never imports this package.
"""
