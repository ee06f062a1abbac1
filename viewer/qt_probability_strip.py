"""The probability strip beside the slice slider: the whole series at a glance.

One column per subtype in its colour, one row per slice with the head at the top
(like the slider), brighter for higher probability, full colour at or above the
threshold; a tick on the right marks every slice with any label above it. Click or
drag to jump; hover for the numbers.
"""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QImage, QMouseEvent, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

from ich_model.labels import LABELS, SHORT_NAMES
from viewer.overlay import format_percent
from viewer.qt_theme import LABEL_COLORS, WARNING

_BACKGROUND = np.array([0x17, 0x19, 0x1B], dtype=np.float32)
_UNSCORED = np.array([0x2E, 0x30, 0x33], dtype=np.float32)
_COLOURS = np.array(
    [(c.red(), c.green(), c.blue()) for c in (QColor(LABEL_COLORS[lab]) for lab in LABELS)],
    dtype=np.float32,
)


def strip_colours(probs: np.ndarray, threshold: float) -> np.ndarray:
    """``[z, 6]`` probabilities (NaN = not scored) -> ``[z, 6, 3]`` uint8 cell colours."""
    p = np.nan_to_num(probs, nan=0.0)[..., None]
    faded = _BACKGROUND + (_COLOURS - _BACKGROUND) * (0.10 + 0.55 * p)
    with np.errstate(invalid="ignore"):
        above = (probs >= threshold)[..., None]
    out = np.where(above, _COLOURS, faded)
    out = np.where(np.isnan(probs)[..., None], _UNSCORED, out)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class QtProbabilityStrip(QWidget):
    """Per-slice probabilities of the current series along z."""

    sliceClicked = Signal(int)

    HEADER = 34
    COLUMN = 15
    MARK = 10

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFixedWidth(len(LABELS) * self.COLUMN + self.MARK + 8)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Expanding)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.setMouseTracking(True)
        self.setToolTip("Click to go to a slice. Head at the top, feet at the bottom.")
        self._n = 0
        self._probs: np.ndarray | None = None
        self._threshold = 0.5
        self._current = 0
        self._image: QImage | None = None
        self._image_key: tuple[int, int] | None = None
        self._flagged = np.zeros(0, dtype=bool)

    # ------------------------------------------------------------------ state

    @property
    def n_slices(self) -> int:
        return self._n

    @property
    def flagged(self) -> np.ndarray:
        """``[z]`` bool, the slices drawn with a flag mark."""
        return self._flagged

    def set_series(self, n_slices: int) -> None:
        self._n = n_slices
        self._probs = None
        self._current = min(self._current, max(n_slices - 1, 0))
        self._refresh()

    def set_scores(self, probabilities: np.ndarray | None) -> None:
        """``[z, 6]`` with NaN for unscored slices (the array is read, not kept)."""
        self._probs = None if probabilities is None else np.array(probabilities, dtype=np.float32)
        self._refresh()

    def set_threshold(self, threshold: float) -> None:
        self._threshold = float(threshold)
        self._refresh()

    def set_current(self, index: int) -> None:
        if index != self._current:
            self._current = index
            self.update()

    def _refresh(self) -> None:
        self._image = None
        if self._probs is not None and len(self._probs) == self._n:
            with np.errstate(invalid="ignore"):
                self._flagged = np.asarray((self._probs >= self._threshold).any(axis=1))
        else:
            self._flagged = np.zeros(self._n, dtype=bool)
        self.update()

    # ------------------------------------------------------------------ geometry

    def _data_rect(self) -> QRectF:
        return QRectF(
            4.0, float(self.HEADER), len(LABELS) * self.COLUMN, self.height() - self.HEADER - 6.0
        )

    def _row_center(self, index: int) -> float:
        r = self._data_rect()
        return r.top() + (self._n - 1 - index + 0.5) * r.height() / max(self._n, 1)

    def index_at(self, y: float) -> int | None:
        """The slice under a y coordinate (None when outside the data)."""
        r = self._data_rect()
        if self._n == 0 or r.height() <= 0:
            return None
        row = math.floor((y - r.top()) / r.height() * self._n)
        return int(min(max(self._n - 1 - row, 0), self._n - 1))

    # ------------------------------------------------------------------ mouse

    def mousePressEvent(self, ev: QMouseEvent) -> None:
        if ev.button() == Qt.MouseButton.LeftButton:
            self._jump(ev.position().y())
        super().mousePressEvent(ev)

    def mouseMoveEvent(self, ev: QMouseEvent) -> None:
        if ev.buttons() & Qt.MouseButton.LeftButton:
            self._jump(ev.position().y())
        k = self.index_at(ev.position().y())
        if k is not None and ev.position().y() >= self.HEADER:
            QToolTip.showText(ev.globalPosition().toPoint(), self._describe(k), self)
        super().mouseMoveEvent(ev)

    def _jump(self, y: float) -> None:
        k = self.index_at(y)
        if k is not None:
            self.sliceClicked.emit(k)

    def _describe(self, k: int) -> str:
        head = f"Slice {k + 1} of {self._n}"
        if self._probs is None or bool(np.isnan(self._probs[k]).any()):
            return f"{head}: not scored"
        parts = [
            f"{SHORT_NAMES[lab]} {format_percent(float(p))}{' ▲' if p >= self._threshold else ''}"
            for lab, p in zip(LABELS, self._probs[k], strict=True)
        ]
        return head + "\n" + "  ".join(parts)

    # ------------------------------------------------------------------ painting

    def _cells(self, height: int) -> QImage | None:
        """The cell colours as an image ``[rows, 6]``, head at the top, max-pooled to ``height``."""
        if self._probs is None or self._n == 0 or len(self._probs) != self._n:
            return None
        key = (height, self._n)
        if self._image is not None and self._image_key == key:
            return self._image
        probs = self._probs[::-1]  # head at the top
        if self._n > height > 0:
            starts = np.linspace(0, self._n, height, endpoint=False).astype(np.intp)
            pooled = np.fmax.reduceat(probs, starts, axis=0)
        else:
            pooled = probs
        rgb = np.ascontiguousarray(strip_colours(pooled, self._threshold))
        h, w = rgb.shape[:2]
        self._image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
        self._image_key = key
        return self._image

    def paintEvent(self, ev: QPaintEvent) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor("#17191b"))
        r = self._data_rect()
        self._paint_header(p)
        if self._n == 0:
            p.end()
            return
        p.fillRect(r, QColor("#2e3033"))
        image = self._cells(int(r.height()))
        if image is not None:
            for j in range(len(LABELS)):
                target = QRectF(r.left() + j * self.COLUMN, r.top(), self.COLUMN - 1, r.height())
                p.drawImage(target, image, QRectF(j, 0, 1, image.height()))
        self._paint_flags(p, r)
        self._paint_current(p, r)
        p.end()

    def _paint_header(self, p: QPainter) -> None:
        font = QFont(self.font())
        font.setPointSizeF(7.5)
        font.setBold(True)
        p.setFont(font)
        for j, lab in enumerate(LABELS):
            p.save()
            p.translate(4 + j * self.COLUMN + self.COLUMN / 2 + 4, self.HEADER - 3)
            p.rotate(-90)
            p.setPen(QColor(LABEL_COLORS[lab]))
            p.drawText(QPointF(0, 0), SHORT_NAMES[lab])
            p.restore()

    def _paint_flags(self, p: QPainter, r: QRectF) -> None:
        if not self._flagged.any():
            return
        x0 = r.right() + 2
        p.setPen(QPen(QColor(WARNING), max(1.0, min(3.0, r.height() / self._n))))
        for k in np.flatnonzero(self._flagged):
            y = self._row_center(int(k))
            p.drawLine(QPointF(x0, y), QPointF(x0 + self.MARK - 3, y))

    def _paint_current(self, p: QPainter, r: QRectF) -> None:
        y = self._row_center(self._current)
        p.setPen(QPen(QColor("#ffffff"), 1.5))
        p.drawLine(QPointF(r.left() - 3, y), QPointF(r.right(), y))
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor("#ffffff"))
        p.drawPolygon(QPolygonF([QPointF(0, y - 4), QPointF(4, y), QPointF(0, y + 4)]))
