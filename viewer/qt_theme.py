"""The dark theme radiology viewers use (a bright frame around a dark image tires the eye)
and the one colour per subtype that every view of the results shares."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QBoxLayout,
    QLabel,
    QTableWidget,
)

from ich_model.labels import NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING

#: One colour per label, Okabe-Ito based (distinguishable with the common colour-vision
#: deficiencies), brightened for a dark background. "any" is white: it is the sum of the rest.
LABEL_COLORS: dict[str, str] = {
    "epidural": "#f0a030",
    "intraparenchymal": "#56b4e9",
    "intraventricular": "#2ec4a0",
    "subarachnoid": "#f0e442",
    "subdural": "#e07ab8",
    "any": "#ff5a4a",
}

ACCENT = "#3d9be9"
WARNING = "#ffb020"
ERROR = "#ff6b6b"
TEXT = "#e6e6e6"
MUTED = "#9a9a9a"
IMAGE_BACKGROUND = "#000000"


def label_color(label: str) -> QColor:
    return QColor(LABEL_COLORS[label])


def apply_dark_theme(app: QApplication) -> None:
    """Fusion style with a dark palette; a few style-sheet touches for the panels."""
    app.setStyle("Fusion")
    p = QPalette()
    window, base, alt = QColor("#232629"), QColor("#1b1d20"), QColor("#2a2e32")
    text, muted = QColor(TEXT), QColor(MUTED)
    for group in (QPalette.ColorGroup.Active, QPalette.ColorGroup.Inactive):
        p.setColor(group, QPalette.ColorRole.Window, window)
        p.setColor(group, QPalette.ColorRole.WindowText, text)
        p.setColor(group, QPalette.ColorRole.Base, base)
        p.setColor(group, QPalette.ColorRole.AlternateBase, alt)
        p.setColor(group, QPalette.ColorRole.ToolTipBase, QColor("#31363b"))
        p.setColor(group, QPalette.ColorRole.ToolTipText, text)
        p.setColor(group, QPalette.ColorRole.PlaceholderText, muted)
        p.setColor(group, QPalette.ColorRole.Text, text)
        p.setColor(group, QPalette.ColorRole.Button, alt)
        p.setColor(group, QPalette.ColorRole.ButtonText, text)
        p.setColor(group, QPalette.ColorRole.BrightText, QColor(ERROR))
        p.setColor(group, QPalette.ColorRole.Link, QColor(ACCENT))
        p.setColor(group, QPalette.ColorRole.Highlight, QColor("#2d6ea8"))
        p.setColor(group, QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    disabled = QPalette.ColorGroup.Disabled
    for role in (
        QPalette.ColorRole.WindowText,
        QPalette.ColorRole.Text,
        QPalette.ColorRole.ButtonText,
    ):
        p.setColor(disabled, role, QColor("#6b6b6b"))
    p.setColor(disabled, QPalette.ColorRole.Window, window)
    p.setColor(disabled, QPalette.ColorRole.Base, base)
    p.setColor(disabled, QPalette.ColorRole.Button, alt)
    app.setPalette(p)
    app.setStyleSheet(
        f"""
        QToolTip {{ color: {TEXT}; background: #31363b; border: 1px solid #4a4f54; }}
        QDockWidget::title {{ background: #2a2e32; padding: 4px 6px; }}
        QToolBar {{ border: none; spacing: 4px; padding: 2px; }}
        QToolButton:checked {{ background: #2d6ea8; border-radius: 3px; }}
        QStatusBar {{ color: {TEXT}; }}
        QLabel#untrainedWarning {{
            color: #1b1d20; background: {WARNING}; border-radius: 3px; padding: 6px;
            font-weight: bold;
        }}
        QLabel#notice {{ color: {WARNING}; }}
        QLabel#seriesWarnings {{ color: {WARNING}; }}
        QLabel#modelStatus {{ color: {MUTED}; }}
        QLabel#modelError {{ color: {ERROR}; }}
        """
    )


def add_model_header(layout: QBoxLayout, status: str = "") -> tuple[QLabel, QLabel]:
    """The lines every view that shows probabilities opens with: "not for diagnostic use",
    the untrained-weights warning (hidden until needed) and a selectable model status line.

    Returns (untrained warning, status line).
    """
    notice = QLabel(NOT_FOR_DIAGNOSIS)
    notice.setObjectName("notice")
    notice.setWordWrap(True)
    font = QFont(notice.font())
    font.setBold(True)
    notice.setFont(font)
    layout.addWidget(notice)
    untrained = QLabel(UNTRAINED_WARNING)
    untrained.setObjectName("untrainedWarning")
    untrained.setWordWrap(True)
    untrained.setVisible(False)
    layout.addWidget(untrained)
    status_label = QLabel(status)
    status_label.setObjectName("modelStatus")
    status_label.setWordWrap(True)
    status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    layout.addWidget(status_label)
    return untrained, status_label


def results_table(columns: Sequence[str], rows: int = 0) -> QTableWidget:
    """A read-only table of results: whole rows selected one at a time, no row numbers."""
    table = QTableWidget(rows, len(columns))
    table.setHorizontalHeaderLabels(list(columns))
    table.verticalHeader().setVisible(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    return table
