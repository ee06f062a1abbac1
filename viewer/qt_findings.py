"""The findings panel: what the model says about the whole series, and its controls.

Per subtype the series maximum and the slices at or above the threshold; the
threshold itself (default from the weights' manifest); the heat-map controls; the
series' warnings; and, for untrained weights, a warning nobody can miss.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSlider,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ich_model.labels import LABELS, SHORT_NAMES
from viewer.overlay import format_percent
from viewer.qt_theme import LABEL_COLORS, MUTED, add_model_header, results_table
from viewer.scores import LiveScores, compact_ranges


def _swatch(colour: str) -> QIcon:
    pm = QPixmap(12, 12)
    pm.fill(QColor(colour))
    return QIcon(pm)


class QtFindingsPanel(QWidget):
    """Series-level results and the threshold and heat-map controls."""

    thresholdChanged = Signal(float)
    labelActivated = Signal(str)  # go to this label's most likely slice
    flaggedStepRequested = Signal(int)  # +1 next flagged slice (towards the head), -1 previous
    heatmapToggled = Signal(bool)
    heatmapLabelChanged = Signal(str)
    heatmapOpacityChanged = Signal(float)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)

        self.untrained_label, self.status_label = add_model_header(layout, "Model: not started")

        row = QHBoxLayout()
        row.addWidget(QLabel("Threshold"))
        self.threshold_box = QDoubleSpinBox()
        self.threshold_box.setRange(0.01, 0.99)
        self.threshold_box.setSingleStep(0.05)
        self.threshold_box.setDecimals(2)
        self.threshold_box.setValue(0.5)
        self.threshold_box.setKeyboardTracking(False)
        self.threshold_box.setToolTip(
            "Probability at or above which a slice is flagged. The default comes from the "
            "model's manifest (chosen on validation data)."
        )
        self.threshold_box.valueChanged.connect(self.thresholdChanged)
        row.addWidget(self.threshold_box)
        self.threshold_hint = QLabel("")
        self.threshold_hint.setStyleSheet(f"color: {MUTED};")
        row.addWidget(self.threshold_hint, 1)
        layout.addLayout(row)

        self.table = results_table(["", "Max", "Slices ≥ threshold"], rows=len(LABELS))
        self.table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.table.setWordWrap(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self._cells: list[tuple[QTableWidgetItem, QTableWidgetItem, QTableWidgetItem]] = []
        for i, lab in enumerate(LABELS):
            name = QTableWidgetItem(_swatch(LABEL_COLORS[lab]), SHORT_NAMES[lab])
            name.setToolTip(f"{lab}: click to go to its most likely slice")
            maximum, slices = QTableWidgetItem("–"), QTableWidgetItem("")
            maximum.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self._cells.append((name, maximum, slices))
            for col, item in enumerate(self._cells[-1]):
                self.table.setItem(i, col, item)
        self.table.resizeRowsToContents()
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.table.setFixedHeight(
            self.table.horizontalHeader().height()
            + sum(self.table.rowHeight(i) for i in range(len(LABELS)))
            + 4
        )
        self.table.cellClicked.connect(lambda r, _c: self.labelActivated.emit(LABELS[r]))
        layout.addWidget(self.table)

        nav = QHBoxLayout()
        self.previous_button = QPushButton("◀ Previous flagged (P)")
        self.next_button = QPushButton("Next flagged (N) ▶")
        self.previous_button.clicked.connect(lambda: self.flaggedStepRequested.emit(-1))
        self.next_button.clicked.connect(lambda: self.flaggedStepRequested.emit(1))
        nav.addWidget(self.previous_button)
        nav.addWidget(self.next_button)
        layout.addLayout(nav)

        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        layout.addWidget(self.summary_label)

        layout.addWidget(self._heatmap_box())

        self.warnings_label = QLabel("")
        self.warnings_label.setObjectName("seriesWarnings")
        self.warnings_label.setWordWrap(True)
        self.warnings_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.warnings_label.setVisible(False)
        layout.addWidget(self.warnings_label)
        layout.addStretch(1)
        self.set_scores(None, 0.5)

    def _heatmap_box(self) -> QGroupBox:
        box = self.heatmap_box = QGroupBox("Where the model looked (Grad-CAM)")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.heatmap_check = QCheckBox("Show heat map (H)")
        self.heatmap_check.toggled.connect(self.heatmapToggled)
        row.addWidget(self.heatmap_check)
        self.heatmap_label = QComboBox()
        for lab in LABELS:
            self.heatmap_label.addItem(_swatch(LABEL_COLORS[lab]), SHORT_NAMES[lab], lab)
        self.heatmap_label.setCurrentIndex(LABELS.index("any"))
        self.heatmap_label.currentIndexChanged.connect(
            lambda i: self.heatmapLabelChanged.emit(LABELS[i])
        )
        row.addWidget(self.heatmap_label)
        v.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Opacity"))
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(50)
        self.opacity_slider.valueChanged.connect(
            lambda v: self.heatmapOpacityChanged.emit(v / 100.0)
        )
        row.addWidget(self.opacity_slider, 1)
        v.addLayout(row)
        hint = QLabel("Computed for the shown slice once scrolling stops.")
        hint.setStyleSheet(f"color: {MUTED};")
        hint.setWordWrap(True)
        v.addWidget(hint)
        return box

    # ------------------------------------------------------------------ state

    @property
    def threshold(self) -> float:
        return float(self.threshold_box.value())

    def set_threshold(self, value: float, default: float | None = None) -> None:
        self.threshold_box.setValue(value)
        if default is not None:
            self.threshold_hint.setText(f"model default {default:.2f}")

    def set_trained(self, trained: bool | None) -> None:
        """Show the untrained warning when the weights are known to be untrained."""
        self.untrained_label.setVisible(trained is False)

    def set_model_available(self, available: bool) -> None:
        """No model (no weights, or they failed to load): nothing to compute a heat map with."""
        self.heatmap_box.setEnabled(available)
        if not available:
            self.heatmap_check.setChecked(False)

    def set_status(self, text: str, error: bool = False) -> None:
        self.status_label.setObjectName("modelError" if error else "modelStatus")
        self.status_label.setText(text)
        self.status_label.style().unpolish(self.status_label)
        self.status_label.style().polish(self.status_label)

    def set_warnings(self, warnings: list[str] | tuple[str, ...]) -> None:
        self.warnings_label.setVisible(bool(warnings))
        shown = list(warnings[:6])
        more = f"\n… and {len(warnings) - 6} more" if len(warnings) > 6 else ""
        self.warnings_label.setText("Warnings:\n" + "\n".join(f"• {w}" for w in shown) + more)

    def set_scores(self, scores: LiveScores | None, threshold: float) -> None:
        """Fill the table from (possibly partial) scores; None clears it."""
        maxima = scores.series_max() if scores is not None else dict.fromkeys(LABELS)
        flagged = scores.flagged(threshold) if scores is not None else {lab: [] for lab in LABELS}
        for i, lab in enumerate(LABELS):
            m = maxima[lab]
            above = m is not None and m >= threshold
            cells = self._cells[i]
            for item in cells:
                f = item.font()
                f.setBold(above)
                item.setFont(f)
            cells[1].setText(format_percent(m))
            n = len(flagged[lab])
            cells[2].setText(f"{compact_ranges(flagged[lab], limit=4)}  ({n})" if n else "none")
            cells[2].setToolTip(compact_ranges(flagged[lab], limit=1000))
        if scores is None:
            self.summary_label.setText("")
            return
        n_flagged = int(scores.flagged_mask(threshold).sum())
        scored = scores.n_scored
        part = "" if scores.complete or scored == scores.n_slices else f" ({scored} scored so far)"
        self.summary_label.setText(
            f"{n_flagged} of {scores.n_slices} slices at or above {threshold:.2f}{part}. "
            "Slice numbers count from the feet (1) to the head."
        )
