"""The series browser: patients, their studies and series, with thumbnails.

Clicking a series (or pressing Enter on it) loads it; moving through the list with
the arrow keys does not, so browsing never starts a load of hundreds of slices.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QIcon, QImage, QPixmap
from PySide6.QtWidgets import QLabel, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from ich_model.series import SeriesInfo
from viewer.qt_theme import MUTED

_INFO_ROLE = Qt.ItemDataRole.UserRole + 1


def format_dicom_date(value: str) -> str:
    """``20190302`` -> ``2019-03-02``; anything else is returned unchanged."""
    v = value.strip()
    if len(v) == 8 and v.isdigit():
        return f"{v[:4]}-{v[4:6]}-{v[6:]}"
    return v


def series_title(info: SeriesInfo) -> str:
    desc = info.description or f"Series {info.metadata.get('SeriesNumber', '') or '?'}"
    return desc.strip()


def series_details(info: SeriesInfo) -> str:
    parts = [f"{info.n_slices} sl", info.modality or "?"]
    thickness = info.metadata.get("SliceThickness", "")
    if thickness:
        with contextlib.suppress(ValueError):
            parts.append(f"{float(thickness):g} mm")
    return " · ".join(parts)


class QtSeriesBrowser(QWidget):
    """A tree of patient > study > series; emits the series the user chooses."""

    seriesChosen = Signal(object)  # SeriesInfo

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.tree = QTreeWidget()
        self.tree.setHeaderHidden(True)
        self.tree.setColumnCount(1)
        self.tree.setIconSize(QSize(56, 56))
        self.tree.setIndentation(12)
        self.tree.setUniformRowHeights(False)
        self.tree.setWordWrap(True)
        self.tree.itemClicked.connect(self._chosen)
        self.tree.itemActivated.connect(self._chosen)
        layout.addWidget(self.tree)
        self.empty_label = QLabel("No study open.\nFile ▸ Open folder… or drop files here.")
        self.empty_label.setStyleSheet(f"color: {MUTED};")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.empty_label)
        self._items: dict[str, QTreeWidgetItem] = {}
        self._current = ""
        self.tree.setVisible(False)

    def series_items(self) -> dict[str, QTreeWidgetItem]:
        return dict(self._items)

    def set_series(self, infos: list[SeriesInfo], show_patient: bool = True) -> None:
        """Show the series of a scanned study, grouped by patient and study."""
        self.tree.clear()
        self._items.clear()
        self.tree.setVisible(bool(infos))
        self.empty_label.setVisible(not infos)
        patients: dict[str, dict[str, list[SeriesInfo]]] = defaultdict(lambda: defaultdict(list))
        for info in infos:
            pid = info.metadata.get("PatientID", "") or info.metadata.get("PatientName", "")
            patients[pid][info.study_uid].append(info)
        bold = QFont(self.tree.font())
        bold.setBold(True)
        for p_index, (pid, studies) in enumerate(patients.items(), start=1):
            first = next(iter(studies.values()))[0].metadata
            if show_patient:
                name = first.get("PatientName", "").replace("^", " ").strip() or "Unnamed patient"
                label = f"{name} ({pid})" if pid and pid != first.get("PatientName") else name
            else:
                label = f"Patient {p_index}"
            p_item = QTreeWidgetItem([label])
            p_item.setFont(0, bold)
            p_item.setFlags(Qt.ItemFlag.ItemIsEnabled)
            self.tree.addTopLevelItem(p_item)
            for series_list in studies.values():
                meta = series_list[0].metadata
                date = format_dicom_date(meta.get("StudyDate", ""))
                desc = meta.get("StudyDescription", "") or "Study"
                s_item = QTreeWidgetItem([f"{date}  {desc}".strip()])
                s_item.setFlags(Qt.ItemFlag.ItemIsEnabled)
                p_item.addChild(s_item)
                for info in series_list:
                    s_item.addChild(self._series_item(info))
                s_item.setExpanded(True)
            p_item.setExpanded(True)
        if self._current in self._items:
            self.set_current(self._current)

    def _series_item(self, info: SeriesInfo) -> QTreeWidgetItem:
        item = QTreeWidgetItem([f"{series_title(info)}\n{series_details(info)}"])
        item.setData(0, _INFO_ROLE, info)
        from ich_model.dicom_io import analyzability  # lazily: see viewer.workers

        reasons = analyzability(info)
        tip = [
            series_title(info),
            f"{info.n_slices} slices, {info.modality}, {info.rows}×{info.columns}",
            f"Series UID {info.series_uid}",
        ]
        if reasons:
            tip.append("Not scored by the model: " + "; ".join(reasons))
            item.setForeground(0, QBrush(QColor(MUTED)))
        tip += list(info.warnings[:5])
        item.setToolTip(0, "\n".join(tip))
        placeholder = QPixmap(56, 56)
        placeholder.fill(QColor("#101113"))
        item.setIcon(0, QIcon(placeholder))
        self._items[info.key] = item
        return item

    def set_thumbnail(self, key: str, image: np.ndarray) -> None:
        """A uint8 thumbnail ``[h, w]`` for one series."""
        item = self._items.get(key)
        if item is None:
            return
        img = np.ascontiguousarray(image, dtype=np.uint8)
        h, w = img.shape
        qimg = QImage(img.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
        item.setIcon(0, QIcon(QPixmap.fromImage(qimg)))

    def set_current(self, key: str) -> None:
        """Mark the displayed series (bold), without emitting :attr:`seriesChosen`."""
        self._current = key
        for k, item in self._items.items():
            f = item.font(0)
            f.setBold(k == key)
            item.setFont(0, f)
        current = self._items.get(key)
        if current is not None:
            self.tree.blockSignals(True)
            self.tree.setCurrentItem(current)
            self.tree.blockSignals(False)

    def _chosen(self, item: QTreeWidgetItem, _column: int = 0) -> None:
        info = item.data(0, _INFO_ROLE)
        if isinstance(info, SeriesInfo):
            self.seriesChosen.emit(info)
