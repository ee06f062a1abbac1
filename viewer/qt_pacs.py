"""The PACS menu, and File ▸ Export DICOM SR and key images…

:class:`QtPacsTools` adds the actions to the window and owns what outlives a dialog: the
listener (our C-STORE SCP) and the worklist that scores what it receives. Every network
call, every file export and the listener's start and stop run on worker threads
(:mod:`viewer.qt_pacs_tasks`); failures arrive as the engine's messages, which name the node
("PACS 'Main': could not connect to …") or the file, and are shown in the dialog (and the
status bar) instead of raising.

- PACS ▸ Settings… (:mod:`viewer.qt_pacs_settings`)
- PACS ▸ Find and retrieve…: C-FIND by patient, date, accession and modality; C-GET or
  C-MOVE of one study into the local store, then it opens in the viewer
- PACS ▸ Send results to PACS…: the Structured Report and key images of the series on
  screen, C-STOREd to a node
- PACS ▸ Listener and worklist… (:mod:`viewer.qt_worklist`)

Patient names and IDs are shown in the find dialog (the user searches by them) but never
logged: log lines carry node names, UIDs and counts.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PySide6.QtCore import QDate, QEvent, QObject, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDateEdit,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QTableWidgetItem,
    QVBoxLayout,
)

from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS
from ich_model.series import CTSeries
from viewer.qt_pacs_settings import QtPacsSettingsDialog
from viewer.qt_pacs_tasks import CancelFn, ProgressFn, TaskHandle, TaskRunner, import_engine
from viewer.qt_series_browser import format_dicom_date
from viewer.qt_theme import ERROR, MUTED, results_table
from viewer.workers import GradcamRequest

if TYPE_CHECKING:
    from ich_model.pacs import PacsConfig, PacsNode, RetrievedStudy, StudyMatch
    from viewer.qt_main_window import QtMainWindow
    from viewer.qt_worklist import QtWorklistDialog

log = logging.getLogger(__name__)

OK_COLOUR = "#6fcf73"
DATE_RANGES = ("Any date", "Today", "Last 7 days", "Last 30 days", "Between…")
FIND_COLUMNS = (
    "Study date",
    "Patient name",
    "Patient ID",
    "Accession",
    "Description",
    "Modalities",
    "Series",
    "Images",
)
_STUDY_ROLE = Qt.ItemDataRole.UserRole + 1


def _status(label: QLabel, text: str, kind: str = "") -> None:
    """A dialog's status line: ``kind`` "error", "ok" or "" (muted)."""
    colour = {"error": ERROR, "ok": OK_COLOUR}.get(kind, MUTED)
    label.setStyleSheet(f"color: {colour};")
    label.setText(text)
    label.setToolTip(text)


def _node_combo(config: PacsConfig | None) -> QComboBox:
    box = QComboBox()
    box.setMinimumWidth(220)
    for n in config.nodes if config is not None else ():
        box.addItem(f"{n.name}  ({n.ae_title}@{n.host}:{n.port})", n.name)
    return box


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultsSnapshot:
    """What an export needs of the window, copied on the GUI thread."""

    series: CTSeries
    probabilities: np.ndarray  # [z, 6], complete
    seconds: float
    model: dict[str, Any]  # ModelIdentity.to_dict()
    threshold: float
    heatmaps: dict[int, np.ndarray]  # slice -> Grad-CAM map in [0, 1], flagged slices only

    @property
    def flagged(self) -> list[int]:
        return [int(k) for k in np.flatnonzero((self.probabilities >= self.threshold).any(1))]


def export_results(snapshot: ResultsSnapshot, out_dir: Path) -> list[Path]:
    """The SR and key images of a snapshot (worker thread: imports the engine's exporter)."""
    predictor = import_engine("ich_model.predictor")
    dicom_export = import_engine("ich_model.dicom_export")
    fields = predictor.ModelIdentity.__dataclass_fields__
    identity = predictor.ModelIdentity(**{k: snapshot.model[k] for k in fields})
    s = snapshot.series
    result = predictor.ScoreResult(
        probabilities=np.asarray(snapshot.probabilities, dtype=np.float32),
        sop_uids=s.sop_uids,
        series_uid=s.series_uid,
        study_uid=s.study_uid,
        series_key=s.key,
        model=identity,
        seconds=snapshot.seconds,
        complete=True,
    )
    files: list[Path] = dicom_export.export_dicom(
        s, result, out_dir, snapshot.threshold, snapshot.heatmaps or None
    )
    return files


# ----------------------------------------------------------------------------- tools


class QtPacsTools(QObject):
    """The PACS menu and File ▸ Export DICOM…, the listener and the worklist of a window."""

    listenerChanged = Signal(bool, str)  # running, what it says (address or the error)
    worklistChanged = Signal()  # emitted from the worklist's thread: connect queued slots
    dicomExported = Signal(object)  # list[Path]
    resultsSent = Signal(object)  # ich_model.pacs.SendResult

    def __init__(
        self,
        window: QtMainWindow,
        config_path: Path | str | None = None,
        autostart: bool = False,
    ) -> None:
        super().__init__(window)
        self.window_ = window
        self._config_path = Path(config_path) if config_path is not None else None
        self.runner = TaskRunner("pacs", self)
        self.listener: Any = None  # ich_model.pacs_listener.Listener while it runs
        self.worklist: Any = None  # ich_model.pacs_worklist.Worklist while it runs
        self.listener_text = "Listener stopped"
        self._listener_task: TaskHandle | None = None
        # (listener, worklist) started on a worker and not yet handed to the GUI thread
        self._started: list[tuple[Any, Any]] = []
        self._closed = False
        # raw Grad-CAM maps of the series on screen: (slice, label) -> [y, x] in [0, 1]
        self._heat: dict[tuple[int, str], np.ndarray] = {}
        self.settings_dialog: QtPacsSettingsDialog | None = None
        self.find_dialog: QtPacsFindDialog | None = None
        self.send_dialog: QtPacsSendDialog | None = None
        self.worklist_dialog: QtWorklistDialog | None = None
        self._build_actions()
        window.seriesShown.connect(self._on_series_shown)
        window.scoringFinished.connect(self._update_actions)
        window.model_worker.gradcamComputed.connect(self._on_gradcam)
        window.installEventFilter(self)
        self._update_actions()
        if autostart:
            QTimer.singleShot(1500, self._autostart)

    # ------------------------------------------------------------------ menu

    def _build_actions(self) -> None:
        w = self.window_
        self.action_export = QAction("Export DICOM S&R and key images…", w)
        self.action_export.setStatusTip(
            "Write a DICOM Structured Report and key images of the series on screen"
        )
        self.action_export.triggered.connect(self.export_dialog)
        w.add_file_action(self.action_export)

        self.menu = QMenu("&PACS", w)
        self.action_settings = self.menu.addAction("&Settings…")
        self.action_settings.triggered.connect(self.show_settings)
        self.action_find = self.menu.addAction("&Find and retrieve…")
        self.action_find.setShortcut("Ctrl+Shift+F")
        self.action_find.triggered.connect(self.show_find)
        self.action_send = self.menu.addAction("Se&nd results to PACS…")
        self.action_send.triggered.connect(self.show_send)
        self.menu.addSeparator()
        self.action_worklist = self.menu.addAction("&Listener and worklist…")
        self.action_worklist.triggered.connect(self.show_worklist)
        self.action_listen = self.menu.addAction("&Receive studies (listener)")
        self.action_listen.setCheckable(True)
        self.action_listen.triggered.connect(self._toggle_listener)
        for a in (self.action_find, self.action_send, self.action_worklist):
            w.addAction(a)
        self.menu.aboutToShow.connect(self._update_actions)
        w.file_menu.aboutToShow.connect(self._update_actions)
        bar = w.menuBar()
        help_action = next((a for a in bar.actions() if a.text() == "&Help"), None)
        if help_action is not None:
            bar.insertMenu(help_action, self.menu)
        else:
            bar.addMenu(self.menu)

    @Slot()
    def _update_actions(self, *_: object) -> None:
        has = self.snapshot_problem() == ""
        self.action_export.setEnabled(has)
        self.action_send.setEnabled(has)
        self.action_listen.setChecked(self.listener is not None)

    # ------------------------------------------------------------------ configuration

    @property
    def config_path(self) -> Path:
        if self._config_path is not None:
            return self._config_path
        from ich_model.pacs import default_config_path

        return default_config_path()

    def load_config(self, report: bool = True) -> PacsConfig | None:
        """The saved configuration; None (and a message naming the file) when unreadable."""
        from ich_model import pacs

        try:
            return pacs.load_config(self.config_path)
        except pacs.PacsConfigError as exc:
            if report:
                self.window_.report_error(str(exc))
            return None

    def store_dir(self, config: PacsConfig) -> Path:
        from ich_model.pacs import default_store_dir

        return config.listener.store_dir or default_store_dir()

    # ------------------------------------------------------------------ dialogs

    def show_settings(self) -> QtPacsSettingsDialog:
        if self.settings_dialog is not None:
            self.settings_dialog.shutdown()
            self.settings_dialog.deleteLater()
        dialog = QtPacsSettingsDialog(self.config_path, self.window_)
        dialog.saved.connect(self._on_settings_saved)
        self.settings_dialog = dialog
        dialog.open()
        return dialog

    @Slot(object)
    def _on_settings_saved(self, config: PacsConfig) -> None:
        self.window_.statusBar().showMessage(f"PACS settings saved to {self.config_path}", 5000)
        for d in (self.find_dialog, self.send_dialog):
            if d is not None:
                d.set_config(config)
        if self.listener is not None:
            self.window_.statusBar().showMessage(
                "PACS settings saved; restart the listener to use its new settings", 8000
            )

    def show_find(self) -> QtPacsFindDialog:
        if self.find_dialog is None:
            self.find_dialog = QtPacsFindDialog(self)
        self.find_dialog.set_config(self.load_config())
        self.find_dialog.show()
        self.find_dialog.raise_()
        return self.find_dialog

    def show_send(self) -> QtPacsSendDialog:
        if self.send_dialog is None:
            self.send_dialog = QtPacsSendDialog(self)
        self.send_dialog.set_config(self.load_config())
        self.send_dialog.refresh()
        self.send_dialog.show()
        self.send_dialog.raise_()
        return self.send_dialog

    def show_worklist(self) -> QtWorklistDialog:
        from viewer.qt_worklist import QtWorklistDialog

        if self.worklist_dialog is None:
            self.worklist_dialog = QtWorklistDialog(self)
        self.worklist_dialog.refresh()
        self.worklist_dialog.show()
        self.worklist_dialog.raise_()
        return self.worklist_dialog

    # ------------------------------------------------------------------ results on screen

    @Slot(object)
    def _on_series_shown(self, _series: CTSeries) -> None:
        self._heat.clear()
        self._update_actions()

    @Slot(object, object)
    def _on_gradcam(self, request: GradcamRequest, heat: np.ndarray) -> None:
        s = self.window_.series
        if s is not None and np.may_share_memory(request.hu, s.hu):  # this series' slice
            self._heat[(request.index, request.label)] = np.asarray(heat, dtype=np.float32)

    def snapshot_problem(self) -> str:
        """Why the results on screen cannot be exported ("" when they can)."""
        w = self.window_
        if w.series is None:
            return "no series is open"
        sc = w.scores
        if sc is None or sc.n_scored == 0:
            return "the series on screen has no model results"
        if not sc.complete:
            return "the model has not scored every slice of this series (score it again)"
        return ""

    def snapshot(self) -> ResultsSnapshot:
        """The series on screen and its complete results; ValueError says why not."""
        problem = self.snapshot_problem()
        if problem:
            raise ValueError(problem)
        w = self.window_
        series, scores = w.series, w.scores
        assert series is not None and scores is not None
        model = dict(w.results_document()["model"])
        probs = np.array(scores.probabilities, dtype=np.float32)
        flagged = set(np.flatnonzero((probs >= w.threshold).any(axis=1)).tolist())
        preferred = ["any", *(lab for lab in LABELS if lab != "any")]
        heatmaps: dict[int, np.ndarray] = {}
        for k in sorted(flagged):
            for lab in preferred:
                if (k, lab) in self._heat:
                    heatmaps[k] = self._heat[(k, lab)]
                    break
        return ResultsSnapshot(series, probs, scores.seconds, model, w.threshold, heatmaps)

    def export_dicom(self, out_dir: Path | str) -> TaskHandle:
        """Write the SR and key images of the series on screen into ``out_dir`` (a worker)."""
        snap = self.snapshot()
        out = Path(out_dir)
        handle = self.runner.start(lambda _p, _c: export_results(snap, out), f"{out}: DICOM export")
        handle.finished.connect(self._on_exported)
        handle.errored.connect(self.window_.report_error)
        return handle

    def export_dialog(self) -> None:
        problem = self.snapshot_problem()
        if problem:
            self.window_.report_error(f"Cannot export DICOM results: {problem}")
            return
        folder = QFileDialog.getExistingDirectory(
            self.window_, "Folder for the DICOM report and key images", str(Path.home())
        )
        if folder:
            self.export_dicom(folder)

    @Slot(object)
    def _on_exported(self, files: list[Path]) -> None:
        keys = len(files) - 1
        where = files[0].parent if files else ""
        self.window_.statusBar().showMessage(
            f"Wrote a DICOM report and {keys} key image(s) to {where}", 8000
        )
        self.dicomExported.emit(files)

    def send_results(self, node: PacsNode) -> TaskHandle:
        """Export the SR and key images to a temporary folder and C-STORE them to ``node``."""
        snap = self.snapshot()

        def task(progress: ProgressFn, cancelled: CancelFn) -> Any:
            from ich_model import pacs

            tmp = Path(tempfile.mkdtemp(prefix="ich-send-"))
            try:
                files = export_results(snap, tmp)
                if cancelled():
                    raise pacs.PacsCancelled(node.name, "sending cancelled")
                return pacs.send(node, files, progress, cancelled)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        handle = self.runner.start(task, f"sending results to PACS {node.name!r}")
        handle.finished.connect(self.resultsSent)
        return handle

    # ------------------------------------------------------------------ listener, worklist

    def _autostart(self) -> None:
        """Start the listener if the settings say so (read on a worker: the window is busy
        starting, and reading them imports the DICOM network stack)."""
        if self._closed:
            return
        path = self._config_path

        def task(_p: ProgressFn, _c: CancelFn) -> bool:
            from ich_model import pacs

            return pacs.load_config(path).listener.enabled

        handle = self.runner.start(task, "reading the PACS settings")
        handle.finished.connect(
            lambda enabled: enabled and self.listener is None and self.start_listener()
        )
        handle.errored.connect(lambda m: self.window_.statusBar().showMessage(m, 15000))

    def _toggle_listener(self, checked: bool) -> None:
        if checked:
            self.start_listener()
        else:
            self.stop_listener()

    def listener_busy(self) -> bool:
        return self._listener_task is not None and self._listener_task.running

    def start_listener(self) -> TaskHandle | None:
        """Start the listener (settings from the configuration) and its worklist."""
        if self.listener is not None or self.listener_busy() or self._closed:
            return self._listener_task
        config = self.load_config()
        if config is None:
            self._set_listener(False, "Listener stopped: the PACS settings cannot be read")
            return None
        weights = self.window_.weights_path
        store = self.store_dir(config)
        changed = self.worklistChanged
        started = self._started

        def task(_p: ProgressFn, _c: CancelFn) -> tuple[Any, Any]:
            from ich_model.pacs_listener import Listener

            pacs_worklist = import_engine("ich_model.pacs_worklist")
            worklist = pacs_worklist.Worklist(
                _worklist_predictor(weights), store / ".worklist", on_change=changed.emit
            )
            try:
                listener = Listener.from_settings(config.listener, worklist.submit).start()
            except Exception:
                worklist.close()
                raise
            started.append((listener, worklist))  # shutdown() stops it if nobody took it
            return listener, worklist

        self._set_listener(False, "Listener starting…")
        handle = self.runner.start(task, f"listener {config.listener.ae_title!r}")
        handle.finished.connect(self._on_listener_started)
        handle.errored.connect(self._on_listener_error)
        handle.ended.connect(self._listener_task_ended)
        self._listener_task = handle
        return handle

    @Slot(object)
    def _on_listener_started(self, started: tuple[Any, Any]) -> None:
        listener, worklist = started
        if started in self._started:
            self._started.remove(started)
        if self._closed:  # the window closed meanwhile: stop at once
            listener.stop()
            worklist.close()
            return
        self.listener, self.worklist = listener, worklist
        self._set_listener(
            True,
            f"Receiving as {listener.ae_title} on {listener.bind_address}:{listener.port} · "
            f"store {listener.store_dir}",
        )
        log.info("listener %s started on port %d", listener.ae_title, listener.port)
        self.worklistChanged.emit()

    @Slot(str)
    def _on_listener_error(self, message: str) -> None:
        self._set_listener(False, f"Listener stopped: {message}")
        self.window_.report_error(message)

    def stop_listener(self) -> TaskHandle | None:
        """Stop the listener and the worklist (what is queued is scored after the next start)."""
        if self.listener is None or self.listener_busy():
            return self._listener_task
        listener, worklist = self.listener, self.worklist
        self.listener = None

        def task(_p: ProgressFn, _c: CancelFn) -> None:
            listener.stop()
            worklist.close()

        self._set_listener(False, "Listener stopping…")
        handle = self.runner.start(task, f"stopping listener {listener.ae_title!r}")
        handle.finished.connect(lambda _r: self._set_listener(False, "Listener stopped"))
        handle.errored.connect(self._on_listener_error)
        handle.ended.connect(self._listener_task_ended)
        self._listener_task = handle
        return handle

    @Slot()
    def _listener_task_ended(self) -> None:
        """Once a start or stop is over, the buttons that wait for it can be used again."""
        self.listenerChanged.emit(self.listener is not None, self.listener_text)

    def _set_listener(self, running: bool, text: str) -> None:
        self.listener_text = text
        self.action_listen.setChecked(running)
        self.listenerChanged.emit(running, text)

    def studies(self) -> list[Any]:
        """The worklist, flagged studies first (empty while the listener never ran)."""
        return self.worklist.studies() if self.worklist is not None else []

    # ------------------------------------------------------------------ closing

    def shutdown(self) -> None:
        """Stop every task, the listener and the worklist; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for d in (self.settings_dialog, self.find_dialog, self.send_dialog):
            if d is not None:
                d.shutdown()
        self.runner.shutdown()
        for listener, worklist in self._started:  # started while the window was closing
            listener.stop()
            worklist.close()
        self._started.clear()
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.worklist is not None:
            self.worklist.close()
        for dialog in (
            self.settings_dialog,
            self.find_dialog,
            self.send_dialog,
            self.worklist_dialog,
        ):
            if dialog is not None:
                dialog.close()

    def threads(self) -> list[Any]:
        out = list(self.runner.threads())
        for d in (self.settings_dialog, self.find_dialog, self.send_dialog):
            if d is not None:
                out += d.runner.threads()
        return out

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.window_ and event.type() == QEvent.Type.Close:
            self.window_.hide()  # the waits below should not look like a hang
            self.shutdown()
        return False


def _worklist_predictor(weights: Path | None) -> Callable[[], Any]:
    """Loads the window's weights on the worklist's thread the first time it scores."""

    def load() -> Any:
        from viewer.qt_batch import ReportingPredictor, load_predictor
        from viewer.workers import lower_thread_priority

        lower_thread_priority()
        return ReportingPredictor(load_predictor(weights))

    return load


def install_pacs(
    window: QtMainWindow, config_path: Path | str | None = None, autostart: bool = False
) -> QtPacsTools:
    """Add the PACS menu and File ▸ Export DICOM SR and key images… to ``window``."""
    return QtPacsTools(window, config_path, autostart)


# ----------------------------------------------------------------------------- find


class _PacsTaskDialog(QDialog):
    """What the find and send dialogs share: one PACS task at a time, its progress and errors.

    A subclass sets `tools`, `status_label`, `progress` and `_task` when it builds itself.
    """

    failed = Signal(str)

    tools: QtPacsTools
    status_label: QLabel
    progress: QProgressBar
    _task: TaskHandle | None

    @Slot(int, int)
    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, done))
        self.progress.setValue(done)

    @Slot(str)
    def _on_error(self, message: str) -> None:
        _status(self.status_label, message, "error")
        self.tools.window_.statusBar().showMessage(message, 15000)
        self.failed.emit(message)

    def _cancel_task(self) -> bool:
        """Ask the running task to stop; False when none runs."""
        if self._task is None:
            return False
        self._task.cancel()
        return True


class QtPacsFindDialog(_PacsTaskDialog):
    """Query a PACS for CT studies, retrieve one into the local store, open it."""

    searched = Signal(object)  # list[StudyMatch]
    retrieved = Signal(object)  # RetrievedStudy

    def __init__(self, tools: QtPacsTools) -> None:
        super().__init__(tools.window_)
        self.tools = tools
        self.setWindowTitle(f"Find and retrieve studies — {NOT_FOR_DIAGNOSIS}")
        self.resize(1080, 620)
        self.runner = TaskRunner("pacs-find", self)
        self._config: PacsConfig | None = None
        self._task: TaskHandle | None = None
        self._matches: list[StudyMatch] = []
        self._build()

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        grid = QGridLayout()
        grid.setHorizontalSpacing(10)
        self.node_box = _node_combo(None)
        self.patient_id_edit = QLineEdit()
        self.patient_name_edit = QLineEdit()
        self.patient_name_edit.setPlaceholderText("Doe^J*  (wildcards * and ?)")
        self.accession_edit = QLineEdit()
        self.modality_box = QComboBox()
        self.modality_box.setEditable(True)
        self.modality_box.addItems(["CT", ""])
        self.modality_box.setToolTip("Empty: any modality")
        self.date_box = QComboBox()
        self.date_box.addItems(list(DATE_RANGES))
        self.date_box.currentIndexChanged.connect(self._on_date_range)
        self.date_from = QDateEdit(QDate.currentDate().addDays(-7))
        self.date_to = QDateEdit(QDate.currentDate())
        for d in (self.date_from, self.date_to):
            d.setCalendarPopup(True)
            d.setDisplayFormat("yyyy-MM-dd")
            d.setEnabled(False)
        dates = QHBoxLayout()
        dates.addWidget(self.date_box)
        dates.addWidget(self.date_from)
        dates.addWidget(QLabel("to"))
        dates.addWidget(self.date_to)
        dates.addStretch(1)
        grid.addWidget(QLabel("PACS"), 0, 0)
        grid.addWidget(self.node_box, 0, 1)
        grid.addWidget(QLabel("Modality"), 0, 2)
        grid.addWidget(self.modality_box, 0, 3)
        grid.addWidget(QLabel("Patient ID"), 1, 0)
        grid.addWidget(self.patient_id_edit, 1, 1)
        grid.addWidget(QLabel("Patient name"), 1, 2)
        grid.addWidget(self.patient_name_edit, 1, 3)
        grid.addWidget(QLabel("Accession"), 2, 0)
        grid.addWidget(self.accession_edit, 2, 1)
        grid.addWidget(QLabel("Study date"), 2, 2)
        grid.addLayout(dates, 2, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 2)
        layout.addLayout(grid)
        for edit in (self.patient_id_edit, self.patient_name_edit, self.accession_edit):
            edit.returnPressed.connect(self.search)

        buttons = QHBoxLayout()
        self.search_button = QPushButton("Search")
        self.search_button.setDefault(True)
        self.search_button.clicked.connect(self.search)
        self.settings_button = QPushButton("Settings…")
        self.settings_button.clicked.connect(self.tools.show_settings)
        buttons.addWidget(self.search_button)
        buttons.addStretch(1)
        buttons.addWidget(self.settings_button)
        layout.addLayout(buttons)

        self.table = results_table(FIND_COLUMNS)
        self.table.setAlternatingRowColors(True)
        self.table.setSortingEnabled(True)
        self.table.setToolTip("Double-click a study to retrieve it and open it in the viewer")
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.cellDoubleClicked.connect(lambda _r, _c: self.retrieve_selected())
        layout.addWidget(self.table, 1)

        bottom = QHBoxLayout()
        self.open_check = QCheckBox("Open when retrieved")
        self.open_check.setChecked(True)
        self.progress = QProgressBar()
        self.progress.setFormat("%v of %m images")
        policy = self.progress.sizePolicy()
        policy.setRetainSizeWhenHidden(True)  # the buttons keep their place and size
        self.progress.setSizePolicy(policy)
        self.progress.setVisible(False)
        self.retrieve_button = QPushButton("Retrieve")
        self.retrieve_button.setEnabled(False)
        self.retrieve_button.clicked.connect(self.retrieve_selected)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)
        bottom.addWidget(self.open_check)
        bottom.addWidget(self.progress, 1)
        bottom.addWidget(self.retrieve_button)
        bottom.addWidget(self.cancel_button)
        bottom.addWidget(self.close_button)
        layout.addLayout(bottom)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status_label)

    # ------------------------------------------------------------------ state

    def set_config(self, config: PacsConfig | None) -> None:
        self._config = config
        current = self.node_box.currentData()
        self.node_box.clear()
        for n in config.nodes if config is not None else ():
            self.node_box.addItem(f"{n.name}  ({n.ae_title}@{n.host}:{n.port})", n.name)
        if current is not None:
            self.node_box.setCurrentIndex(max(0, self.node_box.findData(current)))
        if self.node_box.count() == 0:
            _status(self.status_label, "No PACS configured: PACS ▸ Settings… to add one.", "error")
        self._update_buttons()

    def node(self) -> PacsNode | None:
        name = self.node_box.currentData()
        if self._config is None or name is None:
            return None
        return self._config.node(str(name))

    def busy(self) -> bool:
        return self._task is not None and self._task.running

    def _update_buttons(self) -> None:
        busy = self.busy()
        has_node = self.node_box.count() > 0
        self.search_button.setEnabled(has_node and not busy)
        self.retrieve_button.setEnabled(has_node and not busy and self.selected() is not None)
        self.cancel_button.setEnabled(busy)

    def _on_date_range(self, index: int) -> None:
        between = DATE_RANGES[index] == "Between…"
        self.date_from.setEnabled(between)
        self.date_to.setEnabled(between)

    def date_range(self) -> tuple[date | None, date | None]:
        choice = DATE_RANGES[self.date_box.currentIndex()]
        today = date.today()
        if choice == "Today":
            return today, today
        if choice == "Last 7 days":
            return date.fromordinal(today.toordinal() - 6), today
        if choice == "Last 30 days":
            return date.fromordinal(today.toordinal() - 29), today
        if choice == "Between…":
            a, b = self.date_from.date(), self.date_to.date()
            return date(a.year(), a.month(), a.day()), date(b.year(), b.month(), b.day())
        return None, None

    # ------------------------------------------------------------------ search

    def search(self) -> TaskHandle | None:
        node = self.node()
        if node is None or self.busy():
            return None
        from ich_model import pacs

        date_from, date_to = self.date_range()
        keys = {
            "patient_id": self.patient_id_edit.text().strip() or None,
            "patient_name": self.patient_name_edit.text().strip() or None,
            "accession": self.accession_edit.text().strip() or None,
            "modality": self.modality_box.currentText().strip().upper() or None,
            "date_from": date_from,
            "date_to": date_to,
        }

        def task(_p: ProgressFn, cancelled: CancelFn) -> list[StudyMatch]:
            return pacs.find_studies(node, **keys, cancelled=cancelled)  # type: ignore[arg-type]

        _status(self.status_label, f"Searching {node.name}…")
        handle = self._start(task, f"study query on PACS {node.name!r}")
        handle.finished.connect(self._on_found)
        return handle

    def _start(self, fn: Any, what: str) -> TaskHandle:
        handle = self.runner.start(fn, what)
        handle.errored.connect(self._on_error)
        handle.aborted.connect(lambda m: _status(self.status_label, m or "Cancelled"))
        handle.ended.connect(self._on_ended)
        self._task = handle
        self._update_buttons()
        return handle

    @Slot(object)
    def _on_found(self, matches: list[StudyMatch]) -> None:
        self._matches = list(matches)
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        for m in matches:
            r = self.table.rowCount()
            self.table.insertRow(r)
            values = (
                format_dicom_date(m.study_date) or m.study_date,
                m.patient_name.replace("^", " ").strip(),
                m.patient_id,
                m.accession,
                m.description,
                ", ".join(m.modalities),
                "" if m.n_series is None else str(m.n_series),
                "" if m.n_instances is None else str(m.n_instances),
            )
            for c, v in enumerate(values):
                item = QTableWidgetItem(v)
                if c == 0:
                    item.setData(_STUDY_ROLE, m)
                    item.setToolTip(f"Study UID {m.study_uid}")
                if c >= 6:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)
        if matches:
            self.table.selectRow(0)
        n = len(matches)
        _status(
            self.status_label,
            f"{n} stud{'y' if n == 1 else 'ies'} found"
            + (": double-click one to retrieve and open it." if n else "."),
            "ok" if n else "",
        )
        self.searched.emit(self._matches)

    def selected(self) -> StudyMatch | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        value = item.data(_STUDY_ROLE) if item is not None else None
        return value if value is not None and hasattr(value, "study_uid") else None

    # ------------------------------------------------------------------ retrieve

    def retrieve_selected(self) -> TaskHandle | None:
        match, node = self.selected(), self.node()
        if match is None or node is None or self.busy() or self._config is None:
            return None
        return self.retrieve(node, match)

    def retrieve(self, node: PacsNode, match: StudyMatch) -> TaskHandle | None:
        """C-GET or C-MOVE (the node's choice) of ``match`` into the local store."""
        if node.retrieve_method == "move" and self.tools.listener is None:
            # C-MOVE sends to our listener: start it first, then come back here
            handle = self.tools.start_listener()
            if handle is None:
                self._on_error("C-MOVE needs our listener, and it cannot start")
                return None
            _status(self.status_label, "Starting our listener for the C-MOVE…")
            handle.finished.connect(lambda _r: self.retrieve(node, match))
            handle.errored.connect(lambda m: self._on_error(f"C-MOVE needs our listener: {m}"))
            return handle
        from ich_model import pacs

        assert self._config is not None
        store = self.tools.store_dir(self._config)
        listener = self.tools.listener
        uid, expected = match.study_uid, match.n_instances

        def task(progress: ProgressFn, cancelled: CancelFn) -> RetrievedStudy:
            return pacs.retrieve_study(
                node,
                uid,
                store,
                progress,
                cancelled,
                listener=listener,
                expected_instances=expected,
            )

        method = "C-MOVE" if node.retrieve_method == "move" else "C-GET"
        _status(self.status_label, f"Retrieving from {node.name} by {method}…")
        self.progress.setRange(0, max(expected or 0, 0))
        self.progress.setValue(0)
        self.progress.setVisible(True)
        handle = self._start(task, f"retrieving a study from PACS {node.name!r}")
        handle.progressed.connect(self._on_progress)
        handle.finished.connect(self._on_retrieved)
        return handle

    @Slot(object)
    def _on_retrieved(self, got: RetrievedStudy) -> None:
        self.progress.setRange(0, max(got.n_instances, 1))
        self.progress.setValue(got.n_instances)
        _status(
            self.status_label,
            f"Retrieved {got.n_instances} image(s) in {len(got.series_folders)} series "
            f"({got.seconds:.1f} s) into {got.folder}",
            "ok",
        )
        if self.open_check.isChecked():
            self.tools.window_.open_paths([got.folder])
        self.retrieved.emit(got)

    @Slot()
    def _on_ended(self) -> None:
        self.progress.setVisible(False)
        self._update_buttons()

    def cancel(self) -> None:
        if self._cancel_task():
            _status(self.status_label, "Cancelling…")

    def shutdown(self) -> None:
        self.runner.shutdown()

    def closeEvent(self, ev: Any) -> None:
        self.cancel()  # a retrieval stops at its next instance; the store stays as it was
        super().closeEvent(ev)


# ----------------------------------------------------------------------------- send


class QtPacsSendDialog(_PacsTaskDialog):
    """Send the report and key images of the series on screen to a PACS node."""

    sent = Signal(object)  # SendResult

    def __init__(self, tools: QtPacsTools) -> None:
        super().__init__(tools.window_)
        self.tools = tools
        self.setWindowTitle(f"Send results to PACS — {NOT_FOR_DIAGNOSIS}")
        self.resize(620, 260)
        self.runner = tools.runner  # sending outlives this dialog's closing
        self._config: PacsConfig | None = None
        self._task: TaskHandle | None = None
        layout = QVBoxLayout(self)
        self.what_label = QLabel("")
        self.what_label.setWordWrap(True)
        layout.addWidget(self.what_label)
        form = QFormLayout()
        self.node_box = _node_combo(None)
        form.addRow("Send to", self.node_box)
        layout.addLayout(form)
        self.progress = QProgressBar()
        self.progress.setFormat("%v of %m files")
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)
        for b in (self.send_button, self.cancel_button, self.close_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)

    def set_config(self, config: PacsConfig | None) -> None:
        self._config = config
        current = self.node_box.currentData()
        self.node_box.clear()
        for n in config.nodes if config is not None else ():
            self.node_box.addItem(f"{n.name}  ({n.ae_title}@{n.host}:{n.port})", n.name)
        if current is not None:
            self.node_box.setCurrentIndex(max(0, self.node_box.findData(current)))
        self.refresh()

    def refresh(self) -> None:
        problem = self.tools.snapshot_problem()
        busy = self._task is not None and self._task.running
        self.send_button.setEnabled(not problem and self.node_box.count() > 0 and not busy)
        self.cancel_button.setEnabled(busy)
        if problem:
            self.what_label.setText(f"Nothing to send: {problem}.")
            return
        snap = self.tools.snapshot()
        s = snap.series
        flagged = snap.flagged
        keys = min(len(flagged), 20)
        self.what_label.setText(
            f"<b>{s.description or s.key}</b> · {s.n_slices} slices<br>"
            f"A DICOM Structured Report and {keys} key image(s) of the slices at or above "
            f"{100 * snap.threshold:.0f}% ({len(snap.heatmaps)} with a heat map), "
            f"filed in the same study.<br><span style='color:{MUTED}'>{NOT_FOR_DIAGNOSIS}"
            "</span>"
        )
        if self.node_box.count() == 0:
            _status(self.status_label, "No PACS configured: PACS ▸ Settings… to add one.", "error")

    def node(self) -> PacsNode | None:
        name = self.node_box.currentData()
        if self._config is None or name is None:
            return None
        return self._config.node(str(name))

    def send(self) -> TaskHandle | None:
        node = self.node()
        if node is None or (self._task is not None and self._task.running):
            return None
        try:
            handle = self.tools.send_results(node)
        except ValueError as exc:
            self._on_error(f"Cannot send: {exc}")
            return None
        self._task = handle
        self.progress.setRange(0, 0)
        self.progress.setVisible(True)
        _status(self.status_label, f"Writing the report and sending to {node.name}…")
        handle.progressed.connect(self._on_progress)
        handle.finished.connect(lambda r: self._on_sent(node.name, r))
        handle.errored.connect(self._on_error)
        handle.aborted.connect(lambda m: _status(self.status_label, m or "Cancelled"))
        handle.ended.connect(self._on_ended)
        self.refresh()
        return handle

    def _on_sent(self, name: str, result: Any) -> None:
        warn = f", {result.warnings} with warnings" if result.warnings else ""
        _status(
            self.status_label,
            f"{name} stored {result.sent} file(s){warn} in {result.seconds:.1f} s.",
            "ok",
        )
        self.sent.emit(result)

    @Slot()
    def _on_ended(self) -> None:
        self.progress.setVisible(False)
        self.refresh()

    def cancel(self) -> None:
        self._cancel_task()

    def shutdown(self) -> None:
        self.cancel()
