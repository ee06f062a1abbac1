"""The main window: series browser, slice view with probability strip, findings, tags.

The GUI thread only draws and routes: DICOM is read by a :class:`StudyWorker` and the
model runs in a :class:`ModelWorker`, each on its own long-lived QThread. Every
result carries the job id it belongs to, and results of a superseded job (another
series chosen, the run cancelled) are dropped, so a slow worker can never paint
stale results over the series the user is looking at.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QSlider,
    QToolButton,
    QWidget,
)

from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, SHORT_NAMES, UNTRAINED_WARNING
from ich_model.series import CTSeries, SeriesInfo
from ich_model.weights import Manifest, WeightsError, read_manifest, resolve
from ich_model.windowing import WindowPreset, window_to_uint8
from viewer import export
from viewer.overlay import (
    OverlayText,
    ProbabilityLine,
    format_mm,
    heat_to_rgba,
    orientation_letters,
)
from viewer.qt_about import QtAboutDialog, about_html
from viewer.qt_findings import QtFindingsPanel
from viewer.qt_probability_strip import QtProbabilityStrip
from viewer.qt_series_browser import QtSeriesBrowser, format_dicom_date, series_title
from viewer.qt_slice_view import QtSliceView
from viewer.qt_tags import QtTagPanel
from viewer.scores import LiveScores
from viewer.workers import GradcamRequest, ModelWorker, StudyWorker, start_thread, stop_thread

log = logging.getLogger(__name__)

APP_NAME = "ICH second opinion"
SETTINGS_ORG = "ich-second-opinion"
SETTINGS_APP = "ich-viewer"
MAX_RECENT = 10
HEAT_CACHE = 32
GRADCAM_DEBOUNCE_MS = 150
TAGS_DEBOUNCE_MS = 120
EMPTY_HINT = (
    "Open a head CT series: File ▸ Open folder… (Ctrl+O),\nor drop DICOM files or a folder here."
)
_PRESET_NAMES = {
    WindowPreset.BRAIN: "Brain",
    WindowPreset.BONE: "Bone",
    WindowPreset.SUBDURAL: "Subdural",
}


class QtMainWindow(QMainWindow):
    """The viewer window. ``dialogs=False`` (the --screenshot mode) never opens a dialog."""

    seriesShown = Signal(object)  # CTSeries
    scoringProgressed = Signal(int, int)  # slices scored, slices in the series
    scoringFinished = Signal(bool)  # complete

    def __init__(
        self,
        weights: Path | str | None = None,
        settings: QSettings | None = None,
        dialogs: bool = True,
        remember: bool = True,
        batch_size: int = 8,
        load_model: bool = True,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"{APP_NAME} — {NOT_FOR_DIAGNOSIS}")
        self.setAcceptDrops(True)
        self.resize(1440, 900)
        self._settings = settings if settings is not None else QSettings(SETTINGS_ORG, SETTINGS_APP)
        self._dialogs = dialogs
        self._remember = remember
        self._closed = False
        #: Every error message shown to the user, oldest first.
        self.errors: list[str] = []

        # study and display state
        self._study_paths: list[Path] = []
        self._infos: list[SeriesInfo] = []
        self._series: CTSeries | None = None
        self._token = 0  # increments for every series shown; Grad-CAM maps carry it
        self._index = 0
        self._level, self._width = WindowPreset.BRAIN.value
        self._preset: WindowPreset | None = WindowPreset.BRAIN
        self._show_patient = True
        self._scan_job = 0
        self._load_job = 0

        # model state
        self._weights_arg = Path(weights) if weights else None
        self._manifest: Manifest | None = None
        self._weights_path: Path | None = None
        self._model_state = "loading"  # loading | ready | failed | off
        self._model_requested = False
        self._model_problem = ""
        self._model_info: dict[str, Any] | None = None
        self._scores: LiveScores | None = None
        self._score_job = 0
        self._score_note = ""
        self._forced_note = ""  # a series not analyzable that the user chose to score anyway
        self._threshold = 0.5
        self._heat_enabled = False
        self._heat_label = "any"
        self._heat_opacity = 0.5
        # RGBA maps by (series token, slice, label); None: computed, but nothing to show
        self._heat_cache: OrderedDict[tuple[int, int, str], np.ndarray | None] = OrderedDict()
        self._heat_wanted: tuple[int, int, str] | None = None

        self._build_ui()
        self._build_actions()
        self._build_menus()
        self._read_manifest()

        self._threads: list[QThread] = []
        self.study_worker = StudyWorker()
        self.study_worker.scanned.connect(self._on_scanned)
        self.study_worker.thumbnailRead.connect(self._on_thumbnail)
        self.study_worker.progressed.connect(self._on_load_progress)
        self.study_worker.loaded.connect(self._on_loaded)
        self.study_worker.errored.connect(self._on_study_error)
        self._threads.append(start_thread(self.study_worker, "ich-dicom", self))

        self.model_worker = ModelWorker(batch_size=batch_size)
        self.model_worker.modelLoaded.connect(self._on_model_loaded)
        self.model_worker.modelErrored.connect(self._on_model_error)
        self.model_worker.jobStarted.connect(self._on_job_started)
        self.model_worker.batchScored.connect(self._on_batch_scored)
        self.model_worker.jobFinished.connect(self._on_job_finished)
        self.model_worker.jobErrored.connect(self._on_job_error)
        self.model_worker.gradcamComputed.connect(self._on_gradcam)
        self.model_worker.gradcamErrored.connect(self._on_gradcam_error)
        self._threads_started_model = self._model_state == "loading" and load_model
        if self._threads_started_model:
            self._threads.append(start_thread(self.model_worker, "ich-model", self))
            # After the first paint: importing the model runtime must not delay the window.
            QTimer.singleShot(50, self._start_model)
        elif self._model_state == "loading":
            self._model_state = "off"
            self.findings.set_status("Model: off")
            self.findings.set_model_available(False)

        if remember:
            self._restore_layout()
        self._update_everything()

    # ================================================================== building

    def _build_ui(self) -> None:
        self.slice_view = QtSliceView()
        self.slice_view.sliceStepRequested.connect(lambda d: self.set_slice(self._index + d))
        self.slice_view.sliceEndRequested.connect(
            lambda last: self.set_slice(self.n_slices - 1 if last else 0)
        )
        self.slice_view.windowDragged.connect(self._on_window_dragged)

        self.slider = QSlider(Qt.Orientation.Vertical)
        self.slider.setRange(0, 0)
        self.slider.setPageStep(10)
        self.slider.setToolTip("Slice (top: head, bottom: feet)")
        self.slider.valueChanged.connect(self.set_slice)

        self.strip = QtProbabilityStrip()
        self.strip.sliceClicked.connect(self.set_slice)

        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(2)
        row.addWidget(self.slice_view, 1)
        row.addWidget(self.slider)
        row.addWidget(self.strip)
        self.setCentralWidget(central)

        self.browser = QtSeriesBrowser()
        self.browser.seriesChosen.connect(self.load_series)
        self.browser_dock = self._dock(
            "Series", "seriesDock", self.browser, Qt.DockWidgetArea.LeftDockWidgetArea
        )
        self.browser_dock.setMinimumWidth(240)

        self.findings = QtFindingsPanel()
        self.findings.thresholdChanged.connect(self.set_threshold)
        self.findings.labelActivated.connect(self.go_to_label_max)
        self.findings.flaggedStepRequested.connect(self.go_to_flagged)
        self.findings.heatmapToggled.connect(self.set_heatmap_enabled)
        self.findings.heatmapLabelChanged.connect(self._on_heat_label)
        self.findings.heatmapOpacityChanged.connect(self._on_heat_opacity)
        self.findings_dock = self._dock(
            "Findings", "findingsDock", self.findings, Qt.DockWidgetArea.RightDockWidgetArea
        )
        self.findings_dock.setMinimumWidth(340)

        self.tag_panel = QtTagPanel()
        self.tags_dock = self._dock(
            "DICOM tags", "tagsDock", self.tag_panel, Qt.DockWidgetArea.RightDockWidgetArea
        )
        self.tabifyDockWidget(self.findings_dock, self.tags_dock)
        self.findings_dock.raise_()
        self.tags_dock.visibilityChanged.connect(self._on_tags_visibility)

        bar = self.statusBar()
        self.left_out_label = QLabel("")  # the files the last scan left out, until the next one
        self.left_out_label.setObjectName("leftOut")
        self.left_out_label.setVisible(False)
        bar.addPermanentWidget(self.left_out_label)
        self.load_progress = QProgressBar()
        self.load_progress.setMaximumWidth(180)
        self.load_progress.setFormat("Loading %v/%m")
        self.load_progress.setVisible(False)
        bar.addPermanentWidget(self.load_progress)
        self.model_progress = QProgressBar()
        self.model_progress.setMaximumWidth(220)
        self.model_progress.setFormat("AI %v/%m slices")
        self.model_progress.setVisible(False)
        bar.addPermanentWidget(self.model_progress)
        self.cancel_button = QToolButton()
        self.cancel_button.setText("Cancel")
        self.cancel_button.setToolTip("Stop the model run (Esc); results so far are kept")
        self.cancel_button.clicked.connect(self.cancel_scoring)
        self.cancel_button.setVisible(False)
        bar.addPermanentWidget(self.cancel_button)
        notice = QLabel(NOT_FOR_DIAGNOSIS)
        notice.setObjectName("notice")
        bar.addPermanentWidget(notice)

        self._gradcam_timer = QTimer(self)
        self._gradcam_timer.setSingleShot(True)
        self._gradcam_timer.setInterval(GRADCAM_DEBOUNCE_MS)
        self._gradcam_timer.timeout.connect(self._request_gradcam)
        self._tags_timer = QTimer(self)
        self._tags_timer.setSingleShot(True)
        self._tags_timer.setInterval(TAGS_DEBOUNCE_MS)
        self._tags_timer.timeout.connect(self._show_tags)

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetClosable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.addDockWidget(area, dock)
        return dock

    def _action(
        self,
        text: str,
        slot: Any,
        shortcut: str | QKeySequence | QKeySequence.StandardKey | None = None,
        tip: str = "",
    ) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setToolTip(tip)
            action.setStatusTip(tip)
        action.triggered.connect(slot)
        self.addAction(action)  # shortcuts work even with the menu bar hidden
        return action

    def _build_actions(self) -> None:
        a = self._action
        self.action_open_folder = a(
            "Open &folder…", self.open_folder_dialog, QKeySequence.StandardKey.Open
        )
        self.action_open_files = a("Open fi&les…", self.open_files_dialog, "Ctrl+Shift+O")
        self.action_open_dicomdir = a("Open &DICOMDIR…", self.open_dicomdir_dialog)
        self.action_export_csv = a("Export results as &CSV…", self.export_csv_dialog)
        self.action_export_json = a("Export results as &JSON…", self.export_json_dialog)
        self.action_export_png = a("Export view as &PNG…", self.export_png_dialog, "Ctrl+Shift+S")
        self.action_png_patient = a(
            "Include patient and study in exported views",
            lambda _=False: None,
            tip="Exported PNG views show no patient name, ID or study unless this is checked",
        )
        self.action_png_patient.setCheckable(True)
        self.action_quit = a("&Quit", self.close, QKeySequence.StandardKey.Quit)

        self.preset_actions: dict[WindowPreset, QAction] = {}
        group = QActionGroup(self)
        group.setExclusionPolicy(QActionGroup.ExclusionPolicy.ExclusiveOptional)
        for key, preset in zip("123", WindowPreset, strict=True):
            act = a(
                f"{_PRESET_NAMES[preset]} window",
                lambda _=False, p=preset: self.apply_preset(p),
                key,
                f"{_PRESET_NAMES[preset]}: level {preset.level:g}, "
                f"width {preset.width:g} HU ({key})",
            )
            act.setCheckable(True)
            group.addAction(act)
            self.preset_actions[preset] = act
        self.action_next_flagged = a("&Next flagged slice", lambda: self.go_to_flagged(1), "N")
        self.action_previous_flagged = a(
            "&Previous flagged slice", lambda: self.go_to_flagged(-1), "P"
        )
        self.action_reset_view = a(
            "&Reset view", self.slice_view.reset_view, "R", "Undo zoom and pan (R)"
        )
        self.action_zoom_in = a(
            "Zoom in", lambda: self.slice_view.zoom(1.25), QKeySequence.StandardKey.ZoomIn
        )
        self.action_zoom_out = a(
            "Zoom out", lambda: self.slice_view.zoom(0.8), QKeySequence.StandardKey.ZoomOut
        )
        self.action_heatmap = a(
            "&Heat map", self.set_heatmap_enabled, "H", "Where the model looked (Grad-CAM) (H)"
        )
        self.action_heatmap.setCheckable(True)
        self.action_patient = a("Show &patient and study", self._toggle_patient, "I")
        self.action_patient.setCheckable(True)
        self.action_patient.setChecked(True)
        self.action_cancel = a("&Cancel model run", self.cancel_scoring, "Esc")
        self.action_rescore = a("&Score this series again", self.rescore)
        self.action_about = a("&About…", self.show_about, QKeySequence.StandardKey.HelpContents)

        tools = self.addToolBar("Tools")
        tools.setObjectName("toolsBar")
        tools.setMovable(False)
        tools.addAction(self.action_open_folder)
        tools.addSeparator()
        for act in self.preset_actions.values():
            tools.addAction(act)
        tools.addSeparator()
        tools.addAction(self.action_reset_view)
        tools.addAction(self.action_heatmap)
        tools.addAction(self.action_patient)

    def _build_menus(self) -> None:
        menu = self.menuBar()
        self.file_menu = menu.addMenu("&File")
        self.file_menu.addAction(self.action_open_folder)
        self.file_menu.addAction(self.action_open_files)
        self.file_menu.addAction(self.action_open_dicomdir)
        self.recent_menu = QMenu("Open &recent", self)
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        self.file_menu.addMenu(self.recent_menu)
        # File-menu tools of other issues go here, before the exports (see add_file_action).
        self._file_tools_anchor = self.file_menu.addSeparator()
        self.file_menu.addAction(self.action_export_csv)
        self.file_menu.addAction(self.action_export_json)
        self.file_menu.addAction(self.action_export_png)
        self.file_menu.addAction(self.action_png_patient)
        self.file_menu.addSeparator()
        self.file_menu.addAction(self.action_quit)

        view = menu.addMenu("&View")
        for act in self.preset_actions.values():
            view.addAction(act)
        view.addSeparator()
        view.addAction(self.action_reset_view)
        view.addAction(self.action_zoom_in)
        view.addAction(self.action_zoom_out)
        view.addAction(self.action_patient)
        view.addSeparator()
        for dock in (self.browser_dock, self.findings_dock, self.tags_dock):
            view.addAction(dock.toggleViewAction())

        model = menu.addMenu("&Model")
        model.addAction(self.action_next_flagged)
        model.addAction(self.action_previous_flagged)
        model.addAction(self.action_heatmap)
        model.addSeparator()
        model.addAction(self.action_cancel)
        model.addAction(self.action_rescore)
        self.action_force_score = QAction("Score anyway (series not analyzable)", self)
        self.action_force_score.setToolTip(
            "Run the model on a series it was not trained to read (not CT, not axial); "
            "its results then mean even less than usual"
        )
        self.action_force_score.triggered.connect(self.score_anyway)
        model.addAction(self.action_force_score)

        helpm = menu.addMenu("&Help")
        helpm.addAction(self.action_about)

    def add_file_action(self, action: QAction) -> None:
        """Hook for File-menu tools of other issues (batch scoring of a folder first).

        The action goes after "Open recent", before the exports. A batch scorer can
        reuse this window's model (``model_worker``, ``weights_path``) or build its own
        worker; it should report errors through :meth:`report_error`.
        """
        self.file_menu.insertAction(self._file_tools_anchor, action)

    # ================================================================== model start

    def _read_manifest(self) -> None:
        """Read the manifest (JSON only, no TensorFlow) for the threshold and the warnings."""
        try:
            weights, manifest_path = resolve(self._weights_arg)
        except WeightsError as exc:
            self._set_model_failed(str(exc))
            return
        self._weights_path = weights
        if not weights.is_file() and not manifest_path.is_file():
            self._set_model_failed(f"no model weights found: {weights}")
            return
        try:
            self._manifest, self._weights_path = read_manifest(self._weights_arg, verify=False)
        except WeightsError as exc:
            self._set_model_failed(str(exc))
            return
        self._threshold = self._manifest.threshold
        self.findings.set_threshold(self._manifest.threshold, default=self._manifest.threshold)
        self.findings.set_trained(self._manifest.trained)

    def _set_model_failed(self, problem: str) -> None:
        self._model_state = "failed"
        self._model_problem = problem
        log.warning("%s", problem)
        self.findings.set_status(f"Model: {problem}", error=True)
        self.findings.set_trained(None)
        self.findings.set_model_available(False)
        for action in (self.action_heatmap, self.action_rescore, self.action_cancel):
            action.setEnabled(False)

    def _start_model(self) -> None:
        if not self._closed and self._model_state == "loading" and not self._model_requested:
            self._model_requested = True
            self.findings.set_status("Model: loading TensorFlow and the weights…")
            self.model_worker.load_model(self._weights_path)

    def _on_model_loaded(self, identity: dict[str, Any]) -> None:
        if self._closed:
            return
        self._model_state = "ready"
        self._model_info = identity
        self.findings.set_trained(bool(identity.get("trained")))
        self.findings.set_status(
            f"Model: {identity.get('name')} · weights {str(identity.get('sha256', ''))[:12]} · "
            f"{identity.get('runtime', '')}"
        )
        if self._score_note:  # keep saying why the shown series is not scored
            self.findings.set_status(f"Model: {self._score_note}", error=True)
        self.statusBar().showMessage("Model loaded", 4000)
        self._update_overlay()

    def _on_model_error(self, message: str) -> None:
        if self._closed:
            return
        self._set_model_failed(message)
        self._score_job = 0
        self._scores = None
        self._update_everything()
        self.report_error(message)

    # ================================================================== opening

    def open_paths(self, paths: Sequence[Path | str]) -> None:
        """Scan files, folders or DICOMDIRs and show their first readable series."""
        chosen = [Path(p) for p in paths]
        if not chosen:
            return
        self._study_paths = chosen
        self._abandon_scoring()
        self._load_job = 0
        self.load_progress.setVisible(False)
        self._scan_job = self.study_worker.scan(chosen)
        self._show_left_out([])
        self.statusBar().showMessage(f"Reading {self._describe_paths(chosen)}…")

    @staticmethod
    def _describe_paths(paths: Sequence[Path]) -> str:
        return str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"

    def open_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Open a folder of DICOM files", self._last_dir()
        )
        if folder:
            self.open_paths([folder])

    def open_files_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Open DICOM files", self._last_dir(), "All files (*)"
        )
        if files:
            self.open_paths(files)

    def open_dicomdir_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a DICOMDIR", self._last_dir(), "DICOMDIR (DICOMDIR dicomdir);;All files (*)"
        )
        if path:
            self.open_paths([path])

    def _last_dir(self) -> str:
        recent = self.recent_studies()
        if recent:
            p = Path(recent[0][0])
            return str(p if p.is_dir() else p.parent)
        return str(Path.home())

    def _on_scanned(self, job: int, infos: list[SeriesInfo], warnings: list[str]) -> None:
        if job != self._scan_job:
            return
        self._scan_job = 0
        self._infos = infos
        self.browser.set_series(infos, self._show_patient)
        where = self._describe_paths(self._study_paths)
        if not infos:
            why = "; ".join(warnings[:3]) if warnings else "no DICOM files"
            self.report_error(f"{where}: no CT series found ({why})")
            return
        self._remember_study(self._study_paths)
        self._show_left_out([w for w in warnings if "left out" in w])
        choice = self._default_series(infos)
        self.load_series(choice)
        self.study_worker.read_thumbnails(job, infos)

    def _show_left_out(self, messages: list[str]) -> None:
        """Keep the scan's "left out" messages in the status bar (a transient message would be
        replaced at once by the loading one): a count, with the messages as its tooltip."""
        self.left_out_label.setVisible(bool(messages))
        self.left_out_label.setText(f"{len(messages)} file(s) left out" if messages else "")
        more = f"\n… and {len(messages) - 20} more" if len(messages) > 20 else ""
        self.left_out_label.setToolTip("\n".join(messages[:20]) + more)

    @staticmethod
    def _default_series(infos: list[SeriesInfo]) -> SeriesInfo:
        """The series with most slices among those the model can read (else the largest)."""
        from ich_model.dicom_io import analyzability  # lazily: see viewer.workers

        readable = [i for i in infos if not analyzability(i)]
        return max(readable or infos, key=lambda i: i.n_slices)

    def _on_thumbnail(self, job: int, key: str, image: np.ndarray) -> None:
        if self._closed:
            return
        self.browser.set_thumbnail(key, image)

    def load_series(self, info: SeriesInfo) -> None:
        """Load one series in the worker; the model run of the current one stops."""
        self._abandon_scoring()
        self._load_job = self.study_worker.load(info)
        self.load_progress.setRange(0, info.n_slices)
        self.load_progress.setValue(0)
        self.load_progress.setVisible(True)
        self.statusBar().showMessage(f"Loading {series_title(info)} ({info.n_slices} slices)…")

    def _on_load_progress(self, job: int, done: int, total: int) -> None:
        if job == self._load_job:
            self.load_progress.setRange(0, total)
            self.load_progress.setValue(done)

    def _on_loaded(self, job: int, series: CTSeries) -> None:
        if job != self._load_job:
            return
        self._load_job = 0
        self.load_progress.setVisible(False)
        self.show_series(series)

    def _on_study_error(self, job: int, message: str) -> None:
        if job == self._scan_job:
            self._scan_job = 0
        elif job == self._load_job:
            self._load_job = 0
            self.load_progress.setVisible(False)
        else:
            return
        self.report_error(message)

    def show_series(self, series: CTSeries) -> None:
        """Display a loaded series and start the model on it."""
        self._series = series
        self._token += 1
        self._heat_cache.clear()
        self._heat_wanted = None
        self._index = series.n_slices // 2
        self.slider.blockSignals(True)
        self.slider.setRange(0, series.n_slices - 1)
        self.slider.setValue(self._index)
        self.slider.blockSignals(False)
        self.strip.set_series(series.n_slices)
        self.browser.set_current(series.key)
        self.setWindowTitle(
            f"{APP_NAME} — {series.description or series.key} — {NOT_FOR_DIAGNOSIS}"
        )
        self.findings.set_warnings(
            [w.removeprefix(f"series {series.key}: ") for w in series.warnings]
        )
        if series.warnings:
            self.statusBar().showMessage(f"{series.description}: {series.warnings[0]}", 10000)
        else:
            self.statusBar().showMessage(
                f"{series.description or 'Series'}: {series.n_slices} slices", 5000
            )
        self._start_scoring()
        self._show_slice()
        self.slice_view.setFocus()
        self.seriesShown.emit(series)

    # ================================================================== scoring

    def _start_scoring(self, force: bool = False) -> None:
        """Score the shown series, unless it is not analyzable and the user did not insist."""
        s = self._series
        self._scores = None
        self._score_job = 0
        self._score_note = self._forced_note = ""
        if s is None:
            return
        from ich_model.dicom_io import analyzability, scored_on_request  # lazily: see workers

        reasons = analyzability(s)
        if reasons and not force:
            self._score_note = (
                "not analyzable, not scored: " + "; ".join(reasons) + " (Model > Score anyway)"
            )
            self.findings.set_status(f"Model: {self._score_note}", error=True)
        elif self._model_state in ("loading", "ready"):
            if reasons:  # the user insisted: the reasons stay in sight and in the exports
                self._forced_note = scored_on_request(reasons)
                shown = [w.removeprefix(f"series {s.key}: ") for w in s.warnings]
                self.findings.set_warnings([*shown, self._forced_note])
            if self._threads_started_model and not self._model_requested:
                self._start_model()  # a series came before the start-up timer: load first
            self._scores = LiveScores.empty(s.n_slices)
            self._score_job = self.model_worker.score(s)
            self.model_progress.setRange(0, s.n_slices)
            self.model_progress.setValue(0)
            self.model_progress.setVisible(True)
            self.cancel_button.setVisible(True)
            self.cancel_button.setEnabled(True)
        self._update_results()

    def score_anyway(self) -> None:
        """The user insists: score a series the quality check flagged as not analyzable."""
        if self._series is not None and self._score_job == 0:
            self._start_scoring(force=True)
            self._update_overlay()

    def rescore(self) -> None:
        if self._series is not None and self._score_job == 0:
            self._start_scoring()
            self._update_overlay()

    def cancel_scoring(self) -> None:
        """Stop the model run at its next batch; the slices scored so far are kept."""
        if self._score_job:
            self.model_worker.cancel()
            self.cancel_button.setEnabled(False)
            self.statusBar().showMessage("Cancelling the model run…")

    def _abandon_scoring(self) -> None:
        """Another series is coming: stop the run and ignore whatever it still sends."""
        if self._score_job:
            self.model_worker.cancel()
        self._score_job = 0
        self.model_progress.setVisible(False)
        self.cancel_button.setVisible(False)

    def _on_job_started(self, job: int, total: int) -> None:
        if job == self._score_job:
            self.findings.set_status(f"Model: scoring {total} slices…")

    def _on_batch_scored(self, job: int, start: int, probs: np.ndarray) -> None:
        if job != self._score_job or self._scores is None:
            return
        self._scores.add_batch(start, probs)
        self.model_progress.setValue(self._scores.n_scored)
        self._update_results()
        self.scoringProgressed.emit(self._scores.n_scored, self._scores.n_slices)

    def _on_job_finished(self, job: int, probs: np.ndarray, complete: bool, seconds: float) -> None:
        if job != self._score_job or self._scores is None:
            return
        self._score_job = 0
        self._scores.finish(probs, complete, seconds)
        self.model_progress.setVisible(False)
        self.cancel_button.setVisible(False)
        s = self._scores
        if s.complete:
            msg = f"Model: {s.n_slices} slices scored in {seconds:.1f} s"
        else:
            msg = f"Model: run cancelled after {s.n_scored} of {s.n_slices} slices"
        self.findings.set_status(msg)
        self.statusBar().showMessage(msg, 8000)
        self._update_results()
        self.scoringFinished.emit(s.complete)

    def _on_job_error(self, job: int, message: str) -> None:
        if job != self._score_job:
            return
        self._score_job = 0
        self.model_progress.setVisible(False)
        self.cancel_button.setVisible(False)
        self.findings.set_status(f"Model: {message}", error=True)
        self.report_error(message)

    def set_threshold(self, value: float) -> None:
        self._threshold = float(value)
        if abs(self.findings.threshold - self._threshold) > 1e-9:
            self.findings.set_threshold(self._threshold)
        self._update_results()

    def _update_results(self) -> None:
        probs = self._scores.probabilities if self._scores is not None else None
        self.strip.set_threshold(self._threshold)
        self.strip.set_scores(probs)
        self.findings.set_scores(self._scores, self._threshold)
        has = self._scores is not None and self._scores.n_scored > 0
        self.action_export_csv.setEnabled(has)
        self.action_export_json.setEnabled(has)
        self._update_overlay()

    # ================================================================== navigation

    @property
    def n_slices(self) -> int:
        return self._series.n_slices if self._series is not None else 0

    @property
    def current_index(self) -> int:
        return self._index

    @property
    def series(self) -> CTSeries | None:
        return self._series

    @property
    def scores(self) -> LiveScores | None:
        return self._scores

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def level_width(self) -> tuple[float, float]:
        """(level, width) in HU."""
        return self._level, self._width

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    @property
    def weights_path(self) -> Path | None:
        return self._weights_path

    @property
    def model_state(self) -> str:
        return self._model_state

    @property
    def threads(self) -> list[QThread]:
        """The worker threads this window started (all stopped once it is closed)."""
        return list(self._threads)

    def set_slice(self, index: int) -> None:
        if self._series is None:
            return
        index = int(min(max(index, 0), self._series.n_slices - 1))
        if index != self._index:
            self._index = index
            self._show_slice()

    def go_to_flagged(self, step: int) -> None:
        """Jump to the next (``step`` > 0, towards the head) or previous flagged slice."""
        if self._scores is None:
            return
        k = self._scores.next_flagged(self._index, self._threshold, step)
        if k is None:
            where = "above" if step > 0 else "below"
            self.statusBar().showMessage(f"No flagged slice {where} slice {self._index + 1}", 3000)
            return
        self.set_slice(k)

    def go_to_label_max(self, label: str) -> None:
        if self._scores is not None:
            k = self._scores.argmax(label)
            if k is not None:
                self.set_slice(k)

    # ================================================================== windowing

    def apply_preset(self, preset: WindowPreset) -> None:
        self.set_window(preset.level, preset.width, preset)

    def set_window(self, level: float, width: float, preset: WindowPreset | None = None) -> None:
        self._level, self._width = float(level), max(1.0, float(width))
        self._preset = preset
        for p, act in self.preset_actions.items():
            act.setChecked(p is preset)
        self._show_slice()

    def _on_window_dragged(self, dx: float, dy: float) -> None:
        scale = max(self._width, 20.0) / 300.0
        self.set_window(self._level + dy * scale, self._width + dx * scale)

    # ================================================================== drawing

    def _show_slice(self) -> None:
        s = self._series
        if s is None:
            self.slice_view.set_image(None)
            self._update_overlay()
            return
        k = self._index
        image = window_to_uint8(s.hu[k], self._level, self._width)
        self.slice_view.set_image(image, s.pixel_spacing)
        if self.slider.value() != k:
            self.slider.blockSignals(True)
            self.slider.setValue(k)
            self.slider.blockSignals(False)
        self.strip.set_current(k)
        self._show_heatmap()
        self._update_overlay()
        if self.tag_panel.isVisible():
            self._tags_timer.start()

    def _update_overlay(self) -> None:
        self.slice_view.set_overlay(self._overlay_text())

    def _overlay_text(self) -> OverlayText:
        s = self._series
        banner = (
            UNTRAINED_WARNING if self._manifest is not None and not self._manifest.trained else ""
        )
        if s is None:
            status = f"AI: {self._model_problem}" if self._model_state == "failed" else ""
            return OverlayText(
                hint=EMPTY_HINT, notice=NOT_FOR_DIAGNOSIS, banner=banner, model_status=status
            )
        k, meta = self._index, s.metadata
        top_left: tuple[str, ...] = ()
        if self._show_patient:
            name = meta.get("PatientName", "").replace("^", " ").strip()
            study = " ".join(
                x
                for x in (
                    format_dicom_date(meta.get("StudyDate", "")),
                    meta.get("StudyDescription", ""),
                )
                if x
            )
            top_left = tuple(
                x
                for x in (name, f"ID {meta['PatientID']}" if meta.get("PatientID") else "", study)
                if x
            )
        thickness = f"   Thk {format_mm(s.slice_thickness, 2)}" if s.slice_thickness else ""
        top_right = (
            s.description or s.key,
            f"Slice {k + 1} / {s.n_slices}",
            f"Pos {format_mm(s.positions[k])}{thickness}",
        )
        preset = _PRESET_NAMES[self._preset] if self._preset else "custom"
        bottom_left = [
            f"WW {self._width:.0f}  WL {self._level:.0f}  ({preset})",
            f"{s.hu.shape[1]}×{s.hu.shape[2]}   "
            f"{s.pixel_spacing[1]:.2f}×{s.pixel_spacing[0]:.2f} mm",
        ]
        heat_line = self._heat_line()
        if heat_line:
            bottom_left.insert(0, heat_line)
        lines: tuple[ProbabilityLine, ...] = ()
        title = ""
        if self._scores is not None:
            row = self._scores.row(k)
            lines = tuple(
                ProbabilityLine(
                    SHORT_NAMES[lab],
                    lab,
                    None if row is None else float(row[i]),
                    row is not None and float(row[i]) >= self._threshold,
                )
                for i, lab in enumerate(LABELS)
            )
            title = f"AI probability (flag ≥ {100 * self._threshold:.0f}%)"
        return OverlayText(
            top_left=top_left,
            top_right=top_right,
            bottom_left=tuple(bottom_left),
            probabilities=lines,
            probability_title=title,
            model_status=self._model_status_line(),
            notice=NOT_FOR_DIAGNOSIS,
            banner=banner,
            edges=orientation_letters(s.orientation),
        )

    def _heat_line(self) -> str:
        if not self._heat_enabled or self._model_state in ("failed", "off"):
            return ""
        name = SHORT_NAMES[self._heat_label]
        key = self._heat_key()
        if key not in self._heat_cache:
            return f"Heat map for {name}: computing…"
        if self._heat_cache[key] is None:
            return f"Heat map for {name}: no evidence on this slice"
        return f"Heat map: where the model looked for {name}"

    def _model_status_line(self) -> str:
        if self._score_note:
            return f"AI: {self._score_note}"
        if self._model_state == "failed":
            return f"AI: {self._model_problem}"
        sc = self._scores
        if sc is None:
            return ""
        if self._score_job and self._model_state == "loading":
            return "AI: loading the model…"
        if self._score_job:
            return f"AI: scoring… {sc.n_scored}/{sc.n_slices}"
        if sc.finished and not sc.complete:
            return f"AI: cancelled, {sc.n_scored}/{sc.n_slices} slices scored"
        return ""

    # ================================================================== heat map

    def set_heatmap_enabled(self, enabled: bool) -> None:
        self._heat_enabled = bool(enabled)
        if self.findings.heatmap_check.isChecked() != self._heat_enabled:
            self.findings.heatmap_check.setChecked(self._heat_enabled)
        self.action_heatmap.setChecked(self._heat_enabled)
        self._show_heatmap()
        self._update_overlay()

    def _on_heat_label(self, label: str) -> None:
        self._heat_label = label
        self._show_heatmap()
        self._update_overlay()

    def _on_heat_opacity(self, opacity: float) -> None:
        self._heat_opacity = opacity
        self.slice_view.set_heatmap_opacity(opacity)

    def _heat_key(self) -> tuple[int, int, str]:
        return (self._token, self._index, self._heat_label)

    def _show_heatmap(self) -> None:
        """Show the cached map of this slice, or hide it and ask for one once scrolling stops."""
        if not self._heat_enabled or self._series is None or self._model_state in ("failed", "off"):
            self.slice_view.set_heatmap(None)
            self._gradcam_timer.stop()
            return
        key = self._heat_key()
        self.slice_view.set_heatmap(self._heat_cache.get(key), self._heat_opacity)
        if key not in self._heat_cache:
            self._gradcam_timer.start()

    def _request_gradcam(self) -> None:
        s = self._series
        if s is None or not self._heat_enabled or self._closed:
            return
        key = self._heat_key()
        if key in self._heat_cache or key == self._heat_wanted:
            return
        self._heat_wanted = key
        self.model_worker.request_gradcam(GradcamRequest(key[0], key[1], key[2], s.hu[key[1]]))

    def _on_gradcam(self, request: GradcamRequest, heat: np.ndarray) -> None:
        if self._closed:
            return
        key = (request.token, request.index, request.label)
        if self._heat_wanted == key:
            self._heat_wanted = None
        if request.token != self._token:
            return
        self._heat_cache[key] = heat_to_rgba(heat) if float(np.max(heat)) > 0 else None
        while len(self._heat_cache) > HEAT_CACHE:
            self._heat_cache.popitem(last=False)
        if key == self._heat_key():
            self._show_heatmap()
            self._update_overlay()

    def _on_gradcam_error(self, request: GradcamRequest, message: str) -> None:
        if self._closed:
            return
        self._heat_wanted = None
        self.statusBar().showMessage(message, 8000)
        log.warning("%s", message)

    # ================================================================== tags, patient

    def _on_tags_visibility(self, visible: bool) -> None:
        if visible:
            self._tags_timer.start()

    def _show_tags(self) -> None:
        if self._series is not None and self.tag_panel.isVisible():
            self.tag_panel.show_file(self._series.files[self._index])

    def _toggle_patient(self) -> None:
        self._show_patient = self.action_patient.isChecked()
        if self._infos:
            self.browser.set_series(self._infos, self._show_patient)
        self._update_overlay()

    # ================================================================== export

    def export_csv(self, path: Path | str) -> Path:
        if self._series is None or self._scores is None:
            raise ValueError("no results to export")
        return export.write_csv(path, self._series, self._scores)

    def results_document(self) -> dict[str, Any]:
        if self._series is None or self._scores is None:
            raise ValueError("no results to export")
        model = dict(self._model_info or {})
        if not model and self._manifest is not None:
            model = {"sha256": self._manifest.sha256, "trained": self._manifest.trained}
        warnings = [*self._series.warnings, *([self._forced_note] if self._forced_note else [])]
        return export.results_document(self._series, self._scores, model, self._threshold, warnings)

    def export_json(self, path: Path | str) -> Path:
        return export.write_json(path, self.results_document())

    def export_png(self, path: Path | str, include_patient: bool | None = None) -> Path:
        """The slice view as shown, overlay and heat map included; the patient and study lines
        only when asked (``include_patient``, by default File ▸ Include patient and study in
        exported views): an image leaves the viewer more easily than a study does."""
        path = Path(path)
        if include_patient is None:
            include_patient = self.action_png_patient.isChecked()
        shown = self._show_patient
        self._show_patient = shown and include_patient
        try:
            self._update_overlay()
            ok = self.slice_view.grab().save(str(path), "PNG")
        finally:
            self._show_patient = shown
            self._update_overlay()
        if not ok:
            raise OSError(f"{path}: cannot write PNG")
        return path

    def _export_dialog(self, title: str, suffix: str, writer: Any) -> None:
        s = self._series
        stem = (s.description or "series").replace("/", "_").replace(" ", "_") if s else "view"
        start = str(Path(self._last_dir()) / f"{stem}{suffix}")
        path, _ = QFileDialog.getSaveFileName(self, title, start, f"*{suffix}")
        if not path:
            return
        try:
            writer(path)
        except (OSError, ValueError) as exc:
            self.report_error(f"{path}: cannot export ({exc})")
            return
        self.statusBar().showMessage(f"Saved {path}", 5000)

    def export_csv_dialog(self) -> None:
        self._export_dialog("Export results as CSV", ".csv", self.export_csv)

    def export_json_dialog(self) -> None:
        self._export_dialog("Export results as JSON", ".json", self.export_json)

    def export_png_dialog(self) -> None:
        self._export_dialog("Export view as PNG", ".png", self.export_png)

    # ================================================================== recent studies

    def recent_studies(self) -> list[list[str]]:
        raw = self._settings.value("recentStudies", "[]")
        try:
            data = json.loads(raw if isinstance(raw, str) else "[]")
        except json.JSONDecodeError:
            return []
        return [list(map(str, d)) for d in data if isinstance(d, list) and d]

    def _remember_study(self, paths: Sequence[Path]) -> None:
        if not self._remember:
            return
        entry = [str(p.resolve()) for p in paths]
        recent = [r for r in self.recent_studies() if r != entry]
        self._settings.setValue("recentStudies", json.dumps([entry, *recent][:MAX_RECENT]))

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_studies()
        if not recent:
            self.recent_menu.addAction("(none)").setEnabled(False)
            return
        for entry in recent:
            label = entry[0] if len(entry) == 1 else f"{entry[0]} (+{len(entry) - 1})"
            act = self.recent_menu.addAction(label)
            act.triggered.connect(lambda _=False, e=entry: self.open_paths(e))

    # ================================================================== drops

    def dragEnterEvent(self, ev: QDragEnterEvent) -> None:
        md = ev.mimeData()
        if md.hasUrls() and any(u.isLocalFile() for u in md.urls()):
            ev.acceptProposedAction()
        else:
            ev.ignore()

    def dropEvent(self, ev: QDropEvent) -> None:
        paths = [u.toLocalFile() for u in ev.mimeData().urls() if u.isLocalFile()]
        if paths:
            ev.acceptProposedAction()
            self.open_paths(paths)

    # ================================================================== errors, about

    def report_error(self, message: str) -> None:
        """Status bar and (unless in --screenshot mode) a non-blocking dialog."""
        self.errors.append(message)
        log.error("%s", message)
        self.statusBar().showMessage(message, 20000)
        if self._dialogs and not self._closed:
            box = QMessageBox(
                QMessageBox.Icon.Warning, APP_NAME, message, QMessageBox.StandardButton.Ok, self
            )
            box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            box.open()

    def about_text(self) -> str:
        return about_html(self._manifest, self._weights_path, self._model_problem)

    def show_about(self) -> None:
        dialog = QtAboutDialog(self.about_text(), self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()

    # ================================================================== state, closing

    def is_busy(self) -> bool:
        """True while a scan, a load, a model run (or its model load) or a heat map is pending."""
        if self._scan_job or self._load_job or self._score_job:
            return True
        heat_pending = (
            self._heat_enabled and self._series is not None and self._model_state == "ready"
        )
        return heat_pending and (self._heat_wanted is not None or self._gradcam_timer.isActive())

    def _update_everything(self) -> None:
        self._update_results()
        self._show_slice()

    def _restore_layout(self) -> None:
        geometry = self._settings.value("windowGeometry")
        state = self._settings.value("windowState")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def shutdown(self) -> None:
        """Stop every job and thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # results still queued for this window are dropped: every slot checks its job id
        self._scan_job = self._load_job = self._score_job = 0
        self._gradcam_timer.stop()
        self._tags_timer.stop()
        self.study_worker.cancel()
        self.model_worker.stop()
        for thread in self._threads:
            stop_thread(thread)
        if self._remember:
            self._settings.setValue("windowGeometry", self.saveGeometry())
            self._settings.setValue("windowState", self.saveState())

    def closeEvent(self, ev: QCloseEvent) -> None:
        self.hide()  # the wait for the model's current step should not look like a hang
        self.shutdown()
        super().closeEvent(ev)
