"""The slice view: one CT slice in a pyqtgraph ImageItem, a Grad-CAM layer, corner text.

Mouse: wheel scrolls slices (Ctrl+wheel zooms), left drag pans, right drag (or
Shift+left drag) sets the window (horizontal = width, vertical = level), Ctrl+right
drag zooms. Keys: Up/Down one slice, Page Up/Down ten, Home/End first/last.
The image is shown as stored with anterior up; "up" in every control means
towards the head, as the slices are ordered feet to head.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QKeyEvent, QPainter, QPen
from PySide6.QtWidgets import QWidget

from viewer.overlay import OverlayText, ProbabilityLine, format_percent
from viewer.qt_theme import IMAGE_BACKGROUND, LABEL_COLORS, MUTED, WARNING


class _SliceViewBox(pg.ViewBox):
    """A ViewBox whose wheel scrolls slices and whose right drag sets the window."""

    wheelStepped = Signal(int)
    windowDragged = Signal(float, float)

    def __init__(self) -> None:
        super().__init__(lockAspect=True, invertY=True, enableMenu=False)
        self._wheel_rest = 0

    def wheelEvent(self, ev: Any, axis: Any = None) -> None:
        if ev.modifiers() & Qt.KeyboardModifier.ControlModifier:
            super().wheelEvent(ev, axis)
            return
        self._wheel_rest += int(ev.delta())
        steps = int(self._wheel_rest / 120)
        if steps:
            self._wheel_rest -= steps * 120
            self.wheelStepped.emit(steps)
        ev.accept()

    def mouseDragEvent(self, ev: Any, axis: Any = None) -> None:
        mods = ev.modifiers()
        windowing = (
            ev.button() == Qt.MouseButton.RightButton
            and not mods & Qt.KeyboardModifier.ControlModifier
        ) or (ev.button() == Qt.MouseButton.LeftButton and mods & Qt.KeyboardModifier.ShiftModifier)
        if windowing:
            ev.accept()
            d = ev.screenPos() - ev.lastScreenPos()
            self.windowDragged.emit(float(d.x()), float(d.y()))
            return
        super().mouseDragEvent(ev, axis)


class QtSliceView(pg.GraphicsView):
    """Shows one slice (already windowed to 8 bits), an optional heat map and the overlay."""

    sliceStepRequested = Signal(int)  # +n: towards the head
    sliceEndRequested = Signal(bool)  # True: last (head-most) slice, False: first
    windowDragged = Signal(float, float)  # screen pixels: dx -> width, dy -> level

    _STEP_KEYS: ClassVar[dict[Qt.Key, int]] = {
        Qt.Key.Key_Up: 1,
        Qt.Key.Key_Down: -1,
        Qt.Key.Key_PageUp: 10,
        Qt.Key.Key_PageDown: -10,
    }

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, background=IMAGE_BACKGROUND)
        self.setMinimumSize(320, 320)
        self.view_box = _SliceViewBox()
        self.setCentralItem(self.view_box)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.heat_item = pg.ImageItem(axisOrder="row-major")
        self.heat_item.setZValue(10)
        self.heat_item.setVisible(False)
        self.view_box.addItem(self.image_item)
        self.view_box.addItem(self.heat_item)
        self.view_box.wheelStepped.connect(self.sliceStepRequested)
        self.view_box.windowDragged.connect(self.windowDragged)
        self._overlay = OverlayText()
        self._geometry: tuple[tuple[int, int], tuple[float, float]] | None = None
        self._heat_geometry: tuple[int, int] | None = None

    # ------------------------------------------------------------------ content

    def set_image(
        self, image: np.ndarray | None, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> None:
        """Show an 8-bit slice ``[rows, cols]`` with (row, column) pixel spacing in mm."""
        if image is None:
            self.image_item.clear()
            self.set_heatmap(None)
            self._geometry = None
            return
        self.image_item.setImage(image, levels=(0, 255), autoLevels=False)
        geometry = (image.shape[:2], (float(spacing[0]), float(spacing[1])))
        if geometry != self._geometry:
            self._geometry = geometry
            self.image_item.setRect(self._image_rect())
            self._heat_geometry = None
            self.reset_view()

    def _image_rect(self) -> QRectF:
        assert self._geometry is not None
        (rows, cols), (sy, sx) = self._geometry
        return QRectF(0.0, 0.0, cols * sx, rows * sy)

    def set_heatmap(self, rgba: np.ndarray | None, opacity: float = 0.5) -> None:
        """Overlay an RGBA heat map of the slice's size, or hide it."""
        if rgba is None or self._geometry is None:
            self.heat_item.setVisible(False)
            return
        self.heat_item.setImage(rgba, autoLevels=False, levels=(0, 255))
        if self._heat_geometry != rgba.shape[:2]:
            self._heat_geometry = rgba.shape[:2]
            self.heat_item.setRect(self._image_rect())
        self.heat_item.setOpacity(opacity)
        self.heat_item.setVisible(True)

    def set_heatmap_opacity(self, opacity: float) -> None:
        self.heat_item.setOpacity(opacity)

    @property
    def overlay(self) -> OverlayText:
        return self._overlay

    def set_overlay(self, overlay: OverlayText) -> None:
        if overlay != self._overlay:
            self._overlay = overlay
            self.viewport().update()

    def reset_view(self) -> None:
        """Fit the whole slice in the view (undo zoom and pan)."""
        if self._geometry is not None:
            self.view_box.setRange(rect=self._image_rect(), padding=0.02)

    def zoom(self, factor: float) -> None:
        self.view_box.scaleBy((1.0 / factor, 1.0 / factor))

    # ------------------------------------------------------------------ keys

    def keyPressEvent(self, ev: QKeyEvent) -> None:
        key = Qt.Key(ev.key())
        if key in self._STEP_KEYS:
            self.sliceStepRequested.emit(self._STEP_KEYS[key])
        elif key == Qt.Key.Key_Home:
            self.sliceEndRequested.emit(False)
        elif key == Qt.Key.Key_End:
            self.sliceEndRequested.emit(True)
        else:
            super().keyPressEvent(ev)
            return
        ev.accept()

    # ------------------------------------------------------------------ overlay

    def drawForeground(self, painter: QPainter, rect: QRectF | Any) -> None:
        super().drawForeground(painter, rect)
        painter.save()
        try:
            painter.resetTransform()
            painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
            painter.setRenderHint(QPainter.RenderHint.TextAntialiasing, True)
            _OverlayPainter(painter, QRectF(self.viewport().rect()), self.font()).draw(
                self._overlay
            )
        finally:
            painter.restore()


class _OverlayPainter:
    """Draws :class:`OverlayText` in viewport pixels: shadowed text in the four corners."""

    MARGIN = 10.0
    BAR = 64.0

    def __init__(self, painter: QPainter, area: QRectF, base: QFont) -> None:
        self.p = painter
        self.area = area
        self.font = QFont(base)
        self.font.setPointSizeF(9.5)
        self.bold = QFont(self.font)
        self.bold.setBold(True)
        self.fm = QFontMetricsF(self.font)
        self.line = self.fm.height() + 1.0

    def text(
        self,
        x: float,
        y: float,
        s: str,
        color: str | QColor,
        right: bool = False,
        bold: bool = False,
    ) -> float:
        """Draw ``s`` with its top-left (or top-right) at (x, y); returns its width."""
        font = self.bold if bold else self.font
        fm = QFontMetricsF(font)
        w = fm.horizontalAdvance(s)
        x0 = x - w if right else x
        base = y + fm.ascent()
        self.p.setFont(font)
        self.p.setPen(QColor(0, 0, 0, 220))
        self.p.drawText(QPointF(x0 + 1.0, base + 1.0), s)
        self.p.setPen(QColor(color))
        self.p.drawText(QPointF(x0, base), s)
        return w

    def draw(self, o: OverlayText) -> None:
        a, m = self.area, self.MARGIN
        if o.hint:
            self._hint(o.hint)
        top = a.top() + m
        letters_top = a.top() + 2.0
        if o.banner:
            top = self._banner(o.banner) + 6.0
            letters_top = top
        for i, s in enumerate(o.top_left):
            self.text(a.left() + m, top + i * self.line, s, "#dcdcdc")
        for i, s in enumerate(o.top_right):
            self.text(a.right() - m, top + i * self.line, s, "#dcdcdc", right=True)
        n = len(o.bottom_left)
        # in a narrow view the bottom-left lines go above the notice's row, never under it
        widest = max((self.fm.horizontalAdvance(s) for s in o.bottom_left), default=0.0)
        notice = QFontMetricsF(self.bold).horizontalAdvance(o.notice) if o.notice else 0.0
        lift = self.line + 4 if widest + notice + 3 * m > a.width() else 0.0
        for i, s in enumerate(o.bottom_left):
            self.text(a.left() + m, a.bottom() - m - (n - i) * self.line - lift, s, "#dcdcdc")
        # the orientation letters move clear of corner text that reaches the middle
        crowded = a.right() - m - notice < a.center().x() + self.line
        top_w = max((self.fm.horizontalAdvance(s) for s in o.top_right), default=0.0)
        if a.right() - m - top_w < a.center().x() + self.line:
            letters_top = top + len(o.top_right) * self.line
        self._edges(o.edges, letters_top, self.line + 4 if crowded else 0.0)
        self._probabilities(o)

    def _hint(self, hint: str) -> None:
        font = QFont(self.font)
        font.setPointSizeF(13.0)
        self.p.setFont(font)
        self.p.setPen(QColor(MUTED))
        self.p.drawText(
            self.area, int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap), hint
        )

    def _banner(self, text: str) -> float:
        """An amber band across the top (untrained weights); returns its bottom."""
        a, m = self.area, self.MARGIN
        width = min(a.width() - 2 * m, 760.0)
        flags = int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap)
        fm = QFontMetricsF(self.bold)
        bound = fm.boundingRect(QRectF(0, 0, width - 16, 1000), flags, text)
        box = QRectF(a.center().x() - width / 2, a.top() + m, width, bound.height() + 10)
        self.p.setPen(Qt.PenStyle.NoPen)
        self.p.setBrush(QColor(WARNING))
        self.p.drawRoundedRect(box, 4, 4)
        self.p.setFont(self.bold)
        self.p.setPen(QColor("#1b1d20"))
        self.p.drawText(box.adjusted(8, 5, -8, -5), flags, text)
        return box.bottom()

    def _edges(self, edges: tuple[str, str, str, str], top_y: float, lift: float = 0.0) -> None:
        left, right, top, bottom = edges
        if not any(edges):
            return
        a = self.area
        c = "#c8b060"
        h = self.fm.ascent() / 2
        cy = a.center().y() - h
        self.text(a.left() + 4, cy, left, c, bold=True)
        self.text(a.right() - 4, cy, right, c, right=True, bold=True)
        w = self.fm.horizontalAdvance(top) / 2
        self.text(a.center().x() - w, top_y, top, c, bold=True)
        w = self.fm.horizontalAdvance(bottom) / 2
        self.text(a.center().x() - w, a.bottom() - self.line - 2 - lift, bottom, c, bold=True)

    def _probabilities(self, o: OverlayText) -> None:
        """Bottom right: per-subtype bars for this slice, the model status, the notice."""
        a, m, lh = self.area, self.MARGIN, self.line
        right = a.right() - m
        y = a.bottom() - m - lh
        if o.notice:
            self.text(right, y, o.notice, WARNING, right=True, bold=True)
            y -= lh + 4
        if o.model_status:
            room = max(a.width() * 0.55, 120.0)
            for s in reversed(o.model_status.split("\n")):
                s = self.fm.elidedText(s, Qt.TextElideMode.ElideMiddle, room)
                self.text(right, y, s, MUTED, right=True)
                y -= lh
        if not o.probabilities:
            return
        pct_w = self.fm.horizontalAdvance("100%") + 6
        name_w = self.fm.horizontalAdvance("WWW") + 10
        block_w = name_w + self.BAR + pct_w + 8
        rows = len(o.probabilities) + (1 if o.probability_title else 0)
        box = QRectF(right - block_w - 6, y - (rows - 1) * lh - 4, block_w + 12, rows * lh + 8)
        self.p.setPen(Qt.PenStyle.NoPen)
        self.p.setBrush(QColor(0, 0, 0, 150))
        self.p.drawRoundedRect(box, 4, 4)
        for line in reversed(o.probabilities):
            self._probability_line(line, right - block_w, y, name_w, pct_w)
            y -= lh
        if o.probability_title:
            self.text(right, y, o.probability_title, "#dcdcdc", right=True)

    def _probability_line(
        self, line: ProbabilityLine, x: float, y: float, name_w: float, pct_w: float
    ) -> None:
        colour = QColor(LABEL_COLORS[line.label])
        dim = QColor("#8c8c8c")
        self.text(x, y, line.short, colour if line.above else dim, bold=line.above)
        bar = QRectF(x + name_w, y + self.line * 0.25, self.BAR, self.line * 0.5)
        self.p.setPen(QPen(QColor("#5a5a5a"), 1.0))
        self.p.setBrush(Qt.BrushStyle.NoBrush)
        self.p.drawRect(bar)
        if line.probability is not None:
            fill = QRectF(
                bar.left(), bar.top(), bar.width() * float(line.probability), bar.height()
            )
            c = QColor(colour)
            if not line.above:
                c.setAlpha(110)
            self.p.setPen(Qt.PenStyle.NoPen)
            self.p.setBrush(c)
            self.p.drawRect(fill)
        self.text(
            x + name_w + self.BAR + pct_w,
            y,
            format_percent(line.probability),
            colour if line.above else dim,
            right=True,
            bold=line.above,
        )
