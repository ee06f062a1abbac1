"""About: which model, which weights (hash), trained on what, how well, and the limits."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout, QWidget

from ich_model import __version__
from ich_model.labels import NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING
from ich_model.weights import MODEL_CARD, Manifest, model_card_summary
from viewer.qt_theme import ERROR, WARNING

CONTROLS: tuple[tuple[str, str], ...] = (
    ("Wheel, Up / Down", "next / previous slice (up = towards the head)"),
    ("Page Up / Page Down", "ten slices"),
    ("Home / End", "first (feet) / last (head) slice"),
    ("1, 2, 3", "brain, bone, subdural window"),
    ("Right drag (or Shift + left drag)", "window: horizontal = width, vertical = level"),
    ("Left drag, Ctrl + wheel", "pan, zoom"),
    ("R", "reset zoom and pan"),
    ("N / P", "next / previous flagged slice"),
    ("H", "heat map of where the model looked"),
    ("I", "show or hide patient and study in the corners"),
    ("Esc", "cancel the model run"),
)


def about_html(manifest: Manifest | None, weights: Path | None, problem: str = "") -> str:
    """The About text: model card summary of the weights, or why there is no model."""
    parts = [
        f"<h2>ICH second-opinion viewer {html.escape(__version__)}</h2>",
        f"<p style='color:{WARNING}'><b>{html.escape(NOT_FOR_DIAGNOSIS)}.</b> "
        "It flags CT slices that may show intracranial hemorrhage so that a reader can "
        "look again; it does not make or exclude a diagnosis.</p>",
    ]
    if manifest is not None:
        if not manifest.trained:
            parts.append(f"<p style='color:{WARNING}'><b>{html.escape(UNTRAINED_WARNING)}.</b></p>")
        parts.append(f"<pre>{html.escape(model_card_summary(manifest))}</pre>")
        parts.append(f"<p>Threshold from the manifest: {manifest.threshold:.2f}</p>")
        if weights is not None:
            parts.append(f"<p>Weights file: {html.escape(str(weights))}</p>")
    else:
        parts.append(f"<p style='color:{ERROR}'>{html.escape(problem or 'No model loaded.')}</p>")
    if MODEL_CARD.is_file():
        parts.append(
            f"<p>Model card: <a href='{MODEL_CARD.as_uri()}'>{html.escape(str(MODEL_CARD))}</a></p>"
        )
    rows = "".join(
        f"<tr><td><b>{html.escape(k)}</b>&nbsp;&nbsp;</td><td>{html.escape(v)}</td></tr>"
        for k, v in CONTROLS
    )
    parts.append(f"<h3>Controls</h3><table>{rows}</table>")
    return "\n".join(parts)


class QtAboutDialog(QDialog):
    """A non-blocking About box (``open()``, never ``exec()``)."""

    def __init__(self, text_html: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About the ICH second-opinion viewer")
        self.resize(640, 560)
        layout = QVBoxLayout(self)
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(True)
        self.browser.setHtml(text_html)
        layout.addWidget(self.browser)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
