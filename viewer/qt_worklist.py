"""PACS ▸ Listener and worklist…: studies pushed to us, scored as they arrive, flagged first.

The listener and the :class:`ich_model.pacs_worklist.Worklist` belong to
:class:`viewer.qt_pacs.QtPacsTools`; this dialog starts and stops them and shows the list.
The worklist reports changes from its own thread; they reach this dialog through a queued
signal and refresh the table at most five times a second.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidgetItem,
    QVBoxLayout,
)

from ich_model.labels import NOT_FOR_DIAGNOSIS
from viewer.qt_series_browser import format_dicom_date
from viewer.qt_theme import ERROR, LABEL_COLORS, MUTED, WARNING, results_table

if TYPE_CHECKING:
    from viewer.qt_pacs import QtPacsTools

log = logging.getLogger(__name__)

COLUMNS = (
    "",
    "Max ANY",
    "Status",
    "Patient",
    "Study date",
    "Study",
    "Series",
    "Slices",
    "Received",
)
_HEADER_TAGS = ["PatientName", "PatientID", "StudyDate", "StudyDescription", "AccessionNumber"]
REFRESH_MS = 200
_FOLDER_ROLE = Qt.ItemDataRole.UserRole + 1


def _when(epoch: float) -> str:
    if not epoch:
        return ""
    t = time.localtime(epoch)
    same_day = time.strftime("%Y%m%d", t) == time.strftime("%Y%m%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", t)


class QtWorklistDialog(QDialog):
    """Listener status and start/stop; received studies, flagged first; double-click opens."""

    refreshed = Signal(int)  # studies shown

    def __init__(self, tools: QtPacsTools) -> None:
        super().__init__(tools.window_)
        self.tools = tools
        self.setWindowTitle(f"Listener and worklist — {NOT_FOR_DIAGNOSIS}")
        self.resize(980, 520)
        self._studies: list[Any] = []
        self._headers: dict[Path, dict[str, str]] = {}
        layout = QVBoxLayout(self)

        top = QHBoxLayout()
        self.listener_label = QLabel(tools.listener_text)
        self.listener_label.setWordWrap(True)
        self.listener_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        top.addWidget(self.listener_label, 1)
        self.start_button = QPushButton("Start listener")
        self.start_button.clicked.connect(tools.start_listener)
        self.stop_button = QPushButton("Stop listener")
        self.stop_button.clicked.connect(tools.stop_listener)
        self.settings_button = QPushButton("Settings…")
        self.settings_button.clicked.connect(tools.show_settings)
        for b in (self.start_button, self.stop_button, self.settings_button):
            top.addWidget(b)
        layout.addLayout(top)

        hint = QLabel(
            "Series a PACS or a modality sends to our listener are scored in the background "
            "with the viewer's weights. Flagged studies come first, most probable first; "
            "double-click one to open it."
        )
        hint.setWordWrap(True)
        hint.setStyleSheet(f"color: {MUTED};")
        layout.addWidget(hint)

        self.table = results_table(COLUMNS)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(COLUMNS.index("Series"), QHeaderView.ResizeMode.Stretch)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        layout.addWidget(self.table, 1)

        bottom = QHBoxLayout()
        self.count_label = QLabel("")
        self.count_label.setStyleSheet(f"color: {MUTED};")
        bottom.addWidget(self.count_label, 1)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        bottom.addWidget(close)
        layout.addLayout(bottom)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        tools.worklistChanged.connect(self._changed)
        tools.listenerChanged.connect(self._on_listener)
        self._on_listener(tools.listener is not None, tools.listener_text)

    @Slot()
    def _changed(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    @Slot(bool, str)
    def _on_listener(self, running: bool, text: str) -> None:
        busy = self.tools.listener_busy()
        failed = text.startswith("Listener stopped:")
        colour = "#6fcf73" if running else (ERROR if failed else MUTED)
        self.listener_label.setStyleSheet(f"color: {colour};")
        self.listener_label.setText(("● " if running else "○ ") + text)
        self.start_button.setEnabled(not running and not busy)
        self.stop_button.setEnabled(running and not busy)
        self._changed()

    @property
    def studies(self) -> list[Any]:
        return list(self._studies)

    @Slot()
    def refresh(self) -> None:
        """Show the worklist as it is now (flagged first, then newest)."""
        self._studies = self.tools.studies()
        self.table.setRowCount(0)
        bold = QFont(self.table.font())
        bold.setBold(True)
        for study in self._studies:
            r = self.table.rowCount()
            self.table.insertRow(r)
            p = study.max_any
            status = study.status
            errors = [s.error for s in study.series if s.error]
            if status == "scored":
                label, colour = ("Flagged", ERROR) if study.flagged else ("Not flagged", "")
            elif status in ("queued", "scoring"):
                label, colour = status.capitalize() + "…", MUTED
            else:
                label, colour = status.capitalize(), WARNING
            descriptions = ", ".join(s.description for s in study.series if s.description)
            head = self._header(study)
            patient = ""
            if self.tools.window_.action_patient.isChecked():
                name = head.get("PatientName", "").replace("^", " ").strip()
                pid = head.get("PatientID", "")
                patient = f"{name} ({pid})" if name and pid else name or pid
            cells = [
                QTableWidgetItem("●" if study.flagged else ""),
                QTableWidgetItem("" if p is None else f"{100 * p:.0f}%"),
                QTableWidgetItem(label),
                QTableWidgetItem(patient),
                QTableWidgetItem(format_dicom_date(head.get("StudyDate", ""))),
                QTableWidgetItem(head.get("StudyDescription", "")),
                QTableWidgetItem(descriptions or f"{len(study.series)} series"),
                QTableWidgetItem(str(sum(s.n_slices for s in study.series) or "")),
                QTableWidgetItem(_when(study.received)),
            ]
            cells[0].setData(_FOLDER_ROLE, str(study.folder))
            cells[0].setForeground(QColor(LABEL_COLORS["any"]))
            cells[1].setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            cells[7].setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if colour:
                cells[2].setForeground(QColor(colour))
            if study.flagged:
                for c in cells[:3]:
                    c.setFont(bold)
            tip = [f"Study UID {study.study_uid}", f"Folder {study.folder}", *errors[:3]]
            for col, c in enumerate(cells):
                c.setToolTip("\n".join(tip))
                self.table.setItem(r, col, c)
        n = len(self._studies)
        flagged = sum(1 for s in self._studies if s.flagged)
        pending = sum(1 for s in self._studies if s.status in ("queued", "scoring"))
        self.count_label.setText(
            f"{n} stud{'y' if n == 1 else 'ies'}, {flagged} flagged"
            + (f", {pending} being scored" if pending else "")
        )
        self.refreshed.emit(n)

    def _header(self, study: Any) -> dict[str, str]:
        """Patient and study of a received study, from one file's header (read once)."""
        folder = Path(study.folder)
        if folder in self._headers:
            return self._headers[folder]
        from pydicom import dcmread

        head: dict[str, str] = {}
        for series in study.series:
            first = next(iter(sorted(Path(series.folder).glob("*.dcm"))), None)
            if first is None:
                continue
            try:
                ds = dcmread(first, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except Exception as exc:  # a header we cannot read only costs the row its names
                log.warning("%s: cannot read the header (%s)", first, type(exc).__name__)
                continue
            head = {k: str(ds.get(k, "") or "") for k in _HEADER_TAGS}
            break
        if head:
            self._headers[folder] = head
        return head

    def open_row(self, row: int) -> bool:
        item = self.table.item(row, 0)
        folder = item.data(_FOLDER_ROLE) if item is not None else None
        if not folder:
            return False
        self.tools.window_.open_paths([Path(folder)])
        return True
