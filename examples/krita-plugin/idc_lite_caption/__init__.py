"""idc-lite for Krita: say what changed between two layers, or since a remembered state of the image.

Inside Krita this registers the extension (:mod:`.extension`); outside it (tests, scripts) only the
editor-free part, :mod:`.logic`, is used.
"""

try:
    import krita
except ImportError:  # outside Krita
    krita = None

if krita is not None:
    from .extension import register

    register()
