"""The Krita side: three menu actions (Tools > Scripts) that hand pixels to :mod:`.logic` and show its report.

- *Describe change between two layers*: select two layers; the lower is *before*, the upper *after*.
- *Remember image as before*: keeps the whole image as it is now.
- *Describe change since remembered*: the whole image now against what was remembered.

The call runs on Krita's UI thread: the embedded model answers in a fraction of a second, an
OPT-2.7B artifact on a CPU in a few.
"""

from krita import Extension, Krita

from .logic import ChangeDescriber, Image

try:
    from PyQt5.QtWidgets import QApplication, QMessageBox
except ImportError:  # Krita 6 ships PyQt6
    from PyQt6.QtWidgets import QApplication, QMessageBox

TITLE = "idc-lite: what changed?"


def _layer_image(node, document, index: int) -> Image:
    width, height = document.width(), document.height()
    if node.colorDepth() != "U8" or node.colorModel() != "RGBA":
        return Image(node.name(), width, height, b"", f"{node.colorModel()}/{node.colorDepth()}", index)
    return Image(node.name(), width, height, bytes(node.projectionPixelData(0, 0, width, height)), "BGRA", index)


def _document_image(document) -> Image:
    width, height = document.width(), document.height()
    if document.colorDepth() != "U8" or document.colorModel() != "RGBA":
        return Image(document.name() or "image", width, height, b"", f"{document.colorModel()}/{document.colorDepth()}")
    document.refreshProjection()
    return Image(document.name() or "image", width, height, bytes(document.pixelData(0, 0, width, height)))


class IdcLiteExtension(Extension):
    def __init__(self, parent):
        super().__init__(parent)
        self.describer = ChangeDescriber()

    def setup(self):
        pass

    def createActions(self, window):
        for name, text, slot in (
            ("idc_lite_describe_layers", "Describe change between two layers", self.describe_layers),
            ("idc_lite_remember", "Remember image as before", self.remember),
            ("idc_lite_describe_since", "Describe change since remembered", self.describe_since),
        ):
            window.createAction(name, text, "tools/scripts").triggered.connect(slot)

    def describe_layers(self):
        document, view = Krita.instance().activeDocument(), Krita.instance().activeWindow().activeView()
        if document is None or view is None:
            return self._show(False, "Open an image first.")
        nodes = view.selectedNodes()
        order = {id(n): i for i, n in enumerate(nodes[0].parentNode().childNodes())} if nodes else {}
        images = [_layer_image(n, document, order.get(id(n), i)) for i, n in enumerate(nodes)]
        self._report(self.describer.describe_layers(images))

    def remember(self):
        document = Krita.instance().activeDocument()
        if document is None:
            return self._show(False, "Open an image first.")
        self._report(self.describer.remember(_document_image(document)))

    def describe_since(self):
        document = Krita.instance().activeDocument()
        if document is None:
            return self._show(False, "Open an image first.")
        self._report(self.describer.describe_since(_document_image(document)))

    def _report(self, report):
        if report.caption:
            QApplication.clipboard().setText(report.caption)
        self._show(report.ok, report.text + ("\n\n(The caption is on the clipboard.)" if report.caption else ""))

    def _show(self, ok, text):
        box = QMessageBox.information if ok else QMessageBox.warning
        box(Krita.instance().activeWindow().qwindow(), TITLE, text)


def register():
    Krita.instance().addExtension(IdcLiteExtension(Krita.instance()))
