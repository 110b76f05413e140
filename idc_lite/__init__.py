"""idc-lite: say what changed between two images, with BLIP2IDC, fast and small.

``import idc_lite`` is cheap: ONNX Runtime (and torch, for the reference backend) load when a model is
first built.

    from idc_lite import Captioner
    captioner = Captioner("path/to/model-or-artifact")
    print(captioner.describe("before.jpg", "after.jpg").caption)
"""

from ._version import __version__

_LAZY = {
    "Captioner": "captioner",
    "DiffResult": "captioner",
    "Timings": "captioner",
    "CompositionSettings": "settings",
    "GenerationSettings": "settings",
    "ProcessorSettings": "settings",
    "ImageLimits": "settings",
    "compose_pair": "compose",
    "load_image": "compose",
    "IdcError": "errors",
    "InputError": "errors",
    "ModelError": "errors",
    "AdapterError": "errors",
    "ArtifactError": "errors",
    "OptionError": "errors",
    "MissingExtraError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'idc_lite' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
