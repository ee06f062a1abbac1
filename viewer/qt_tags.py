"""The DICOM tags of the shown slice, with patient-identifying tags hidden unless asked.

Hidden by default: the engine's ``PHI_TAGS``, every person name (VR PN: patient,
physicians, operators), and the other patient identifiers, addresses and numbers
listed below. The header is read again from the slice's file (no pixel data), only
while the panel is visible.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from viewer.qt_theme import ERROR, MUTED

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Identifying keywords beyond the engine's PHI_TAGS (PS3.15 E.1-1, the obvious ones).
EXTRA_IDENTIFYING: frozenset[str] = frozenset(
    {
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientBirthTime",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "MilitaryRank",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "RequestAttributesSequence",
        "ReferencedPatientSequence",
    }
)
MAX_VALUE_CHARS = 160


@cache
def identifying_keywords() -> frozenset[str]:
    from ich_model.dicom_io import PHI_TAGS  # lazily: see viewer.workers

    return frozenset(PHI_TAGS) | EXTRA_IDENTIFYING


def is_identifying(elem: DataElement) -> bool:
    return elem.keyword in identifying_keywords() or elem.VR == "PN"


def value_text(elem: DataElement) -> str:
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.keyword == "PixelData":
        return f"<{elem.VR}, {len(elem.value) if elem.value is not None else 0} bytes>"
    try:
        text = str(elem.value)
    except Exception as exc:  # malformed values: show, do not fail
        text = f"<unreadable: {type(exc).__name__}>"
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


class QtTagPanel(QWidget):
    """Tag, keyword and value of every element of one file's header."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        row = QHBoxLayout()
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter tags…")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._refill)
        row.addWidget(self.filter_edit, 1)
        layout.addLayout(row)
        self.show_identifying = QCheckBox("Show patient-identifying tags")
        self.show_identifying.toggled.connect(self._refill)
        layout.addWidget(self.show_identifying)
        self.file_label = QLabel("")
        self.file_label.setStyleSheet(f"color: {MUTED};")
        self.file_label.setWordWrap(True)
        layout.addWidget(self.file_label)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(3)
        self.tree.setHeaderLabels(["Tag", "Keyword", "Value"])
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        header = self.tree.header()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(1, 150)
        layout.addWidget(self.tree)
        self._path: Path | None = None
        self._dataset: Dataset | None = None
        self._error = ""
        self.hidden_count = 0

    @property
    def path(self) -> Path | None:
        return self._path

    def show_file(self, path: Path | None) -> None:
        """Read and show one file's header (cached while the path stays the same)."""
        if path == self._path:
            return
        self._path = path
        self._dataset, self._error = None, ""
        if path is not None:
            import pydicom

            try:
                self._dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception as exc:  # the file changed or vanished since it was loaded
                self._error = f"{path}: cannot read the header ({type(exc).__name__}: {exc})"
                log.warning("%s", self._error)
        self._refill()

    def shown_keywords(self) -> set[str]:
        """Keywords of the top-level rows now shown (for tests and checks)."""
        items = (self.tree.topLevelItem(i) for i in range(self.tree.topLevelItemCount()))
        return {item.text(1) for item in items if item is not None}

    def _refill(self) -> None:
        self.tree.clear()
        self.hidden_count = 0
        if self._error:
            item = QTreeWidgetItem(["", "", self._error])
            item.setForeground(2, QBrush(QColor(ERROR)))
            self.tree.addTopLevelItem(item)
            self.file_label.setText("")
            return
        if self._dataset is None:
            self.file_label.setText("No slice shown.")
            return
        self.file_label.setText(str(self._path))
        self._add(self.tree.invisibleRootItem(), self._dataset, self.filter_edit.text().lower(), 0)
        if self.hidden_count and not self.show_identifying.isChecked():
            item = QTreeWidgetItem(["", "", f"{self.hidden_count} identifying tag(s) hidden"])
            item.setForeground(2, QBrush(QColor(MUTED)))
            self.tree.addTopLevelItem(item)

    def _add(self, parent: QTreeWidgetItem, ds: Dataset, needle: str, depth: int) -> None:
        show_all = self.show_identifying.isChecked()
        for elem in ds:
            if not show_all and is_identifying(elem):
                self.hidden_count += 1
                continue
            tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
            if elem.VR == "SQ":
                item = QTreeWidgetItem(
                    [tag, elem.keyword or elem.name, f"<{len(elem.value)} item(s)>"]
                )
                if depth < 3:
                    for i, sub in enumerate(elem.value):
                        child = QTreeWidgetItem(["", f"item {i + 1}", ""])
                        self._add(child, sub, "", depth + 1)
                        item.addChild(child)
            else:
                item = QTreeWidgetItem([tag, elem.keyword or elem.name, value_text(elem)])
            if needle and depth == 0 and not any(needle in item.text(c).lower() for c in range(3)):
                continue
            item.setToolTip(2, item.text(2))
            parent.addChild(item)
