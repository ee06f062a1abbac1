"""File ▸ Batch score folder…: every series under a folder, scored in the background.

The :class:`BatchWorker` runs on its own QThread. It builds its own Predictor from the
window's weights (the window's model keeps serving the series on screen) and hands the
folder to ``ich_model.batch.score_folder``, the engine behind ``ich-score``: same outputs
(``predictions.csv``, ``series.csv``, ``summary.json``), same resume after an interruption.
Each finished series comes back as a :class:`BatchRow` through a queued signal, so the
table fills while the run goes on; progress arrives per model batch, which gives slices per
second and the time left. Cancel is read between model batches, so a run stops within one
batch; a cancelled or interrupted run goes on where it stopped when started again on the
same output folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QEvent, QObject, Qt, QThread, QUrl, Signal, Slot
from PySide6.QtGui import QAction, QColor, QDesktopServices, QFont
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidgetItem,
    QVBoxLayout,
)

from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, SHORT_NAMES
from ich_model.series import CTSeries
from ich_model.weights import WeightsError
from viewer.qt_pacs_tasks import import_engine, track_thread
from viewer.qt_theme import ERROR, LABEL_COLORS, MUTED, WARNING, add_model_header, results_table
from viewer.workers import (
    _collector_paused,
    _import_predictor,
    lower_thread_priority,
    start_thread,
    stop_thread,
)

if TYPE_CHECKING:
    from viewer.qt_main_window import QtMainWindow

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.1
_ROW_ROLE = Qt.ItemDataRole.UserRole + 1
#: Table columns: series, slices, the six maxima, status, details.
COLUMNS = ("Series", "Slices", *(SHORT_NAMES[lab] for lab in LABELS), "Status", "Details")
_FIRST_LABEL_COLUMN = 2
STATUS_COLUMN = _FIRST_LABEL_COLUMN + len(LABELS)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BatchRequest:
    """What to score and where to write it."""

    inputs: tuple[Path, ...]
    out: Path
    weights: Path | None = None
    batch_size: int = 8
    dicom_out: Path | None = None


@dataclass(frozen=True)
class BatchRow:
    """One line of the results table: a finished series, or a file the scan left out."""

    key: str
    description: str
    status: str  # scored, failed, not analyzable, left out
    n_slices: int = 0
    maxima: tuple[float, ...] | None = None  # LABELS order; None when not scored
    flagged: bool = False
    error: str = ""
    warnings: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()  # the series' files; empty for an earlier run's row
    earlier: bool = False  # finished by an earlier run on the same output folder


@dataclass(frozen=True)
class BatchProgress:
    series_done: int  # including series finished by an earlier run
    series_total: int  # 0 until the first series is finished (the scan is then done)
    slices_this_run: int  # including the part of the series being scored
    elapsed: float  # seconds since the run started (model load excluded)
    slices_per_s: float | None
    seconds_left: float | None
    current: str  # the series being scored


@dataclass(frozen=True)
class BatchResult:
    out: Path
    cancelled: bool
    total: int = 0
    scored: int = 0
    failed: int = 0
    not_analyzable: int = 0
    resumed: int = 0
    slices_this_run: int = 0
    seconds: float = 0.0
    left_out: tuple[str, ...] = ()  # the scan's "left out" messages, one per file


def format_duration(seconds: float) -> str:
    """``'45 s'``, ``'3 min 05 s'``, ``'2 h 04 min'``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def is_flagged(maxima: Sequence[float] | None, threshold: float) -> bool:
    """Flagged as ``series.csv`` and the worklist flag a series: "any" at or above the
    threshold on some slice (a subtype above it is highlighted in its own column)."""
    return maxima is not None and maxima[LABELS.index("any")] >= threshold


def _row_from_outcome(outcome: Any, threshold: float) -> BatchRow:
    """A ``batch.SeriesOutcome`` as a table row."""
    result = outcome.result
    maxima = None
    if result is not None:
        smax = result.series_max()
        maxima = tuple(float(smax[lab]) for lab in LABELS)
    info = outcome.info
    return BatchRow(
        key=info.key,
        description=info.description,
        status=outcome.status,
        n_slices=int(outcome.n_slices or info.n_slices),
        maxima=maxima,
        flagged=is_flagged(maxima, threshold),
        error=outcome.error,
        warnings=tuple(outcome.warnings),
        files=tuple(info.files),
    )


def earlier_rows(
    out: Path, journal_name: str, threshold: float, exclude: str = ""
) -> list[BatchRow]:
    """Rows of the series an earlier run on ``out`` committed (its journal says which)."""
    done: set[str] = set()
    try:
        with open(out / journal_name, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    done.add(str(json.loads(line)["key"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
    except FileNotFoundError:
        return []
    done.discard(exclude)
    rows: list[BatchRow] = []
    try:
        with open(out / "series.csv", encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f):
                key = rec.get("series_key") or ""
                if key not in done:
                    continue
                done.discard(key)  # one row per series
                try:
                    maxima: tuple[float, ...] | None = tuple(
                        float(rec[f"max_{lab}"]) for lab in LABELS
                    )
                except (KeyError, TypeError, ValueError):
                    maxima = None
                rows.append(
                    BatchRow(
                        key=key,
                        description=rec.get("description") or "",
                        status=rec.get("status") or "",
                        n_slices=int(rec.get("n_slices") or 0),
                        maxima=maxima,
                        flagged=is_flagged(maxima, threshold),
                        error=rec.get("error") or "",
                        warnings=tuple(w for w in (rec.get("warnings") or "").split(" | ") if w),
                        earlier=True,
                    )
                )
    except (OSError, csv.Error) as exc:
        log.warning("%s: cannot read the earlier run's series.csv: %s", out, exc)
    return rows


# ----------------------------------------------------------------------------- worker


class ReportingPredictor:
    """A Predictor as ``score_folder`` and the worklist use it, with two additions.

    Python's cycle collector is paused on this thread while the model runs (see
    ``viewer.workers._collector_paused``: TensorFlow objects finalised on the GUI thread
    crashed the process), and every model batch is reported, for slices per second.
    """

    def __init__(
        self,
        predictor: Any,
        on_start: Callable[[CTSeries], None] | None = None,
        on_batch: Callable[[CTSeries, int, int], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.identity = predictor.identity
        self.on_start = on_start
        self.on_batch = on_batch

    def score_series(
        self,
        series: CTSeries,
        progress: Callable[..., None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Any:
        if self.on_start is not None:
            self.on_start(series)

        def report(done: int, total: int, start: int, probs: Any) -> None:
            if self.on_batch is not None:
                self.on_batch(series, done, total)
            if progress is not None:
                progress(done, total, start, probs)

        with _collector_paused():
            return self.predictor.score_series(series, progress=report, cancelled=cancelled)


def load_predictor(weights: Path | None, batch_size: int = 8) -> Any:
    """``ich_model.predictor.Predictor`` for ``weights``; call on a worker thread only."""
    with _collector_paused(freeze=True):
        return _import_predictor().Predictor(weights, batch_size=batch_size)


class BatchWorker(QObject):
    """Scores a folder with ``ich_model.batch.score_folder`` on its own thread."""

    started = Signal()
    modelLoaded = Signal(object)  # dict: ModelIdentity.to_dict()
    rowsResumed = Signal(object)  # list[BatchRow] an earlier run finished
    progressed = Signal(object)  # BatchProgress
    seriesFinished = Signal(object)  # BatchRow
    finished = Signal(object)  # BatchResult
    errored = Signal(str)  # message naming the weights, the folder or the file

    _runRequested = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self._cancel = False
        self._runRequested.connect(self._run)

    def run(self, request: BatchRequest) -> None:
        """Start (from the GUI thread); the result comes as ``finished`` or ``errored``."""
        self._runRequested.emit(request)

    def cancel(self) -> None:
        """Stop at the next model batch; what is committed stays (a rerun goes on from it)."""
        self._cancel = True

    def is_cancelled(self) -> bool:
        return self._cancel

    @Slot(object)
    def _run(self, request: BatchRequest) -> None:
        lower_thread_priority()
        self.started.emit()
        where = str(request.weights) if request.weights else "the bundled weights"
        try:
            predictor = load_predictor(request.weights, request.batch_size)
        except WeightsError as exc:
            self.errored.emit(str(exc))
            return
        except Exception as exc:
            log.exception("batch: cannot load the model from %s", where)
            self.errored.emit(f"{where}: cannot load the model ({type(exc).__name__}: {exc})")
            return
        self.modelLoaded.emit(predictor.identity.to_dict())
        if self._cancel:
            self.finished.emit(BatchResult(request.out, cancelled=True))
            return
        try:
            batch = import_engine("ich_model.batch")
            run = _Run(self, request, predictor.identity.threshold, batch.JOURNAL)
            summary = batch.score_folder(
                list(request.inputs),
                request.out,
                ReportingPredictor(predictor, run.on_start, run.on_batch),
                progress=run.on_progress,
                cancelled=self.is_cancelled,
                on_series=run.on_series,
                dicom_out=request.dicom_out,
            )
        except Exception as exc:
            log.exception("batch scoring into %s failed", request.out)
            self.errored.emit(f"{request.out}: batch scoring failed ({type(exc).__name__}: {exc})")
            return
        processed = summary.scored + summary.failed + summary.not_analyzable
        self.finished.emit(
            BatchResult(
                out=request.out,
                cancelled=self._cancel and processed < summary.total_series,
                total=summary.total_series,
                scored=summary.scored,
                failed=summary.failed,
                not_analyzable=summary.not_analyzable,
                resumed=summary.skipped_done,
                slices_this_run=summary.slices_this_run,
                seconds=summary.seconds,
                left_out=tuple(summary.scan_warnings),
            )
        )


@dataclass
class _Run:
    """Counts of one run on the worker thread; turns engine callbacks into signals."""

    worker: BatchWorker
    request: BatchRequest
    threshold: float
    journal: str
    t0: float = field(default_factory=time.perf_counter)
    resumed_sent: bool = False
    total: int = 0
    done: int = 0  # series finished, earlier runs included
    done_this_run: int = 0
    resumed: int = 0
    slices_finished: int = 0  # slices of series finished this run
    current: str = ""
    current_done: int = 0
    current_total: int = 0
    last_emit: float = 0.0

    def _resume_rows(self, exclude: str) -> None:
        if self.resumed_sent:
            return
        self.resumed_sent = True
        rows = earlier_rows(self.request.out, self.journal, self.threshold, exclude)
        self.resumed = self.done = len(rows)
        if rows:
            self.worker.rowsResumed.emit(rows)

    def on_start(self, series: CTSeries) -> None:
        self._resume_rows(series.key)
        self.current = series.description or series.key
        self.current_done, self.current_total = 0, series.n_slices
        self._emit(force=True)

    def on_batch(self, series: CTSeries, done: int, total: int) -> None:
        self.current_done, self.current_total = done, total
        self._emit()

    def on_series(self, outcome: Any) -> None:
        self._resume_rows(outcome.info.key)
        row = _row_from_outcome(outcome, self.threshold)
        self.done_this_run += 1
        self.done = self.resumed + self.done_this_run
        if outcome.result is not None:
            self.slices_finished += int(outcome.n_slices)
        self.current, self.current_done, self.current_total = "", 0, 0
        self.worker.seriesFinished.emit(row)

    def on_progress(self, done: int, total: int, _slices: int, _elapsed: float) -> None:
        self.total, self.done = total, done
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_emit < PROGRESS_INTERVAL_S:
            return
        self.last_emit = now
        elapsed = now - self.t0
        slices = self.slices_finished + self.current_done
        rate = slices / elapsed if elapsed > 0 and slices else None
        left = None
        fraction = self.done_this_run + (
            self.current_done / self.current_total if self.current_total else 0.0
        )
        if self.total and fraction > 0:
            remaining = max(self.total - self.resumed - fraction, 0.0)
            left = elapsed / fraction * remaining
        self.worker.progressed.emit(
            BatchProgress(self.done, self.total, slices, elapsed, rate, left, self.current)
        )


# ----------------------------------------------------------------------------- dialog


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


class QtBatchDialog(QDialog):
    """Choose a folder, watch it being scored, open any series in the viewer."""

    rowAdded = Signal(object)  # BatchRow
    runFinished = Signal(object)  # BatchResult
    runErrored = Signal(str)

    def __init__(self, window: QtMainWindow) -> None:
        super().__init__(window)
        self.window_ = window
        self.setWindowTitle(f"Batch score a folder — {NOT_FOR_DIAGNOSIS}")
        self.setObjectName("batchDialog")
        self.resize(1100, 680)
        self._worker: BatchWorker | None = None
        self._thread: QThread | None = None
        self._threads: list[QThread] = []
        self._request: BatchRequest | None = None
        self._threshold = window.threshold
        self._closed = False
        self._rows: list[BatchRow] = []
        self._build()
        self._show_weights(None)

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        layout.setSpacing(8)

        self.untrained_label, self.model_label = add_model_header(layout)

        grid = QGridLayout()
        grid.setHorizontalSpacing(8)
        self.input_edit = QLineEdit()
        self.input_edit.setPlaceholderText("Folder searched recursively for DICOM series")
        self.input_button = QPushButton("Browse…")
        self.input_button.clicked.connect(self._choose_input)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText(
            "predictions.csv, series.csv and summary.json go here; "
            "the same folder again resumes a run"
        )
        self.out_button = QPushButton("Browse…")
        self.out_button.clicked.connect(self._choose_out)
        grid.addWidget(QLabel("Input folder"), 0, 0)
        grid.addWidget(self.input_edit, 0, 1)
        grid.addWidget(self.input_button, 0, 2)
        grid.addWidget(QLabel("Output folder"), 1, 0)
        grid.addWidget(self.out_edit, 1, 1)
        grid.addWidget(self.out_button, 1, 2)
        self.dicom_check = QCheckBox(
            "Also write a DICOM Structured Report and key images per scored series (in dicom/)"
        )
        grid.addWidget(self.dicom_check, 2, 1, 1, 2)
        grid.setColumnStretch(1, 1)
        layout.addLayout(grid)

        bar = QHBoxLayout()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("Series %v of %m")
        self.progress_bar.setTextVisible(True)
        bar.addWidget(self.progress_bar, 1)
        self.start_button = QPushButton("Score")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self._start_clicked)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip(
            "Stop after the current model batch; run again on the same output folder to go on"
        )
        self.cancel_button.clicked.connect(self.cancel)
        bar.addWidget(self.start_button)
        bar.addWidget(self.cancel_button)
        layout.addLayout(bar)
        self.rate_label = QLabel("Choose a folder to score.")
        self.rate_label.setObjectName("modelStatus")
        layout.addWidget(self.rate_label)

        self.table = results_table(COLUMNS)
        self.table.setAlternatingRowColors(True)
        # rows stay in the order they finished until a header is clicked
        self.table.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.table.setSortingEnabled(True)
        self.table.setWordWrap(False)
        self.table.setToolTip("Double-click a series to open it in the viewer")
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.table.setColumnWidth(0, 240)
        for col in range(1, STATUS_COLUMN + 1):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
        for i, lab in enumerate(LABELS):
            item = self.table.horizontalHeaderItem(_FIRST_LABEL_COLUMN + i)
            if item is None:
                continue
            item.setForeground(QColor(LABEL_COLORS[lab]))
            item.setToolTip(f"Highest probability of {lab} over the series' slices")
        self.table.cellDoubleClicked.connect(self._row_activated)
        layout.addWidget(self.table, 1)

        bottom = QHBoxLayout()
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bottom.addWidget(self.summary_label, 1)
        self.open_out_button = QPushButton("Open output folder")
        self.open_out_button.setEnabled(False)
        self.open_out_button.clicked.connect(self._open_out)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)
        bottom.addWidget(self.open_out_button)
        bottom.addWidget(self.close_button)
        layout.addLayout(bottom)

    def _show_weights(self, identity: dict[str, Any] | None) -> None:
        """The weights the run uses: the manifest before the model loads, then its identity."""
        w = self.window_
        if identity is not None:
            sha = str(identity.get("sha256", ""))[:12]
            self.model_label.setText(
                f"Model {identity.get('name', '')} · weights {sha} · "
                f"{identity.get('runtime', '')} · {identity.get('weights_file', '')}"
            )
            self.untrained_label.setVisible(not identity.get("trained", False))
            self._threshold = float(identity.get("threshold", self._threshold))
            return
        m = w.manifest
        if m is None:
            self.model_label.setText("Model: no weights found; scoring is not possible")
            self.untrained_label.setVisible(False)
            return
        self.model_label.setText(
            f"Model {m.architecture.get('name', 'xception_lstm')} · weights {m.short_hash} · "
            f"{w.weights_path or ''}"
        )
        self.untrained_label.setVisible(not m.trained)

    # ------------------------------------------------------------------ running

    @property
    def rows(self) -> list[BatchRow]:
        return list(self._rows)

    def is_running(self) -> bool:
        return self._worker is not None

    def threads(self) -> list[QThread]:
        return list(self._threads)

    def start(self, inputs: Sequence[Path | str], out: Path | str, dicom: bool = False) -> bool:
        """Score ``inputs`` into ``out``; False (and a message) when that cannot start."""
        if self._worker is not None or self._closed:
            return False
        paths = tuple(Path(p) for p in inputs)
        out = Path(out)
        problem = ""
        missing = [p for p in paths if not p.exists()]
        if not paths:
            problem = "choose an input folder"
        elif missing:
            problem = f"{missing[0]}: no such file or folder"
        elif any(_inside(out, p) for p in paths if p.is_dir()):
            problem = (
                f"{out}: the output folder is inside the input folder; the next scan would "
                "find the results. Choose a folder outside it."
            )
        elif self.window_.manifest is None and self.window_.model_state == "failed":
            problem = "no model weights: scoring is not possible"
        if problem:
            self._fail(problem)
            return False
        self._request = BatchRequest(
            paths, out, self.window_.weights_path, dicom_out=out / "dicom" if dicom else None
        )
        self._rows.clear()
        self.table.setRowCount(0)
        self.summary_label.setText("")
        self.summary_label.setStyleSheet("")
        self.progress_bar.setRange(0, 0)  # busy until the scan is done
        self.rate_label.setText("Loading the model…")
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.open_out_button.setEnabled(False)
        for w in (self.input_edit, self.out_edit, self.input_button, self.out_button):
            w.setEnabled(False)
        self.dicom_check.setEnabled(False)

        worker = BatchWorker()
        worker.modelLoaded.connect(self._on_model_loaded)
        worker.rowsResumed.connect(self._on_rows_resumed)
        worker.progressed.connect(self._on_progressed)
        worker.seriesFinished.connect(self._on_series)
        worker.finished.connect(self._on_finished)
        worker.errored.connect(self._on_errored)
        self._worker = worker
        self._thread = track_thread(start_thread(worker, "ich-batch", self))
        self._threads.append(self._thread)
        worker.run(self._request)
        log.info("batch: scoring %d input(s) into %s", len(paths), out)
        return True

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self.cancel_button.setEnabled(False)
            self.rate_label.setText("Cancelling after the current model batch…")

    def shutdown(self) -> None:
        """Cancel and wait for the worker thread (the window is closing); safe to call twice."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        self._worker = None
        for thread in self._threads:
            stop_thread(thread)

    def _end_run(self) -> None:
        self._worker = None
        if self._thread is not None:
            stop_thread(self._thread)  # its run has returned: this wait is short
            self._thread = None
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        for w in (self.input_edit, self.out_edit, self.input_button, self.out_button):
            w.setEnabled(True)
        self.dicom_check.setEnabled(True)
        self.open_out_button.setEnabled(self._request is not None and self._request.out.is_dir())

    def _fail(self, message: str) -> None:
        self.summary_label.setText(message)
        self.summary_label.setStyleSheet(f"color: {ERROR};")
        self.rate_label.setText("")
        log.warning("batch: %s", message)
        self.runErrored.emit(message)

    # ------------------------------------------------------------------ worker results

    def _current(self) -> bool:
        return self._worker is not None and self.sender() is self._worker

    @Slot(object)
    def _on_model_loaded(self, identity: dict[str, Any]) -> None:
        if self._current():
            self._show_weights(identity)
            self.rate_label.setText("Finding series…")

    @Slot(object)
    def _on_rows_resumed(self, rows: list[BatchRow]) -> None:
        if self._current():
            for row in rows:
                self._add_row(row)

    @Slot(object)
    def _on_progressed(self, p: BatchProgress) -> None:
        if not self._current():
            return
        if p.series_total:
            self.progress_bar.setRange(0, p.series_total)
            self.progress_bar.setValue(p.series_done)
        parts = []  # "Series k of n" is on the bar
        if p.slices_per_s is not None:
            parts.append(f"{p.slices_per_s:.1f} slices/s")
        if p.seconds_left is not None:
            parts.append(f"about {format_duration(p.seconds_left)} left")
        parts.append(f"scoring {p.current}" if p.current else "reading the next series")
        self.rate_label.setText(" · ".join(parts))

    @Slot(object)
    def _on_series(self, row: BatchRow) -> None:
        if self._current():
            self._add_row(row)

    @Slot(object)
    def _on_finished(self, result: BatchResult) -> None:
        if not self._current():
            return
        for message in result.left_out:
            path, _, why = message.partition(": left out, ")
            self._add_row(
                BatchRow(key=path, description=Path(path).name, status="left out", error=why)
            )
        self._end_run()
        self.progress_bar.setRange(0, max(result.total, 1))
        done = result.scored + result.failed + result.not_analyzable
        self.progress_bar.setValue(done if result.total else 0)
        flagged = sum(1 for r in self._rows if r.flagged)
        counts = [f"{result.scored} of {result.total} series scored ({flagged} flagged)"]
        if result.resumed:
            counts.append(f"{result.resumed} from an earlier run")
        if result.failed:
            counts.append(f"{result.failed} failed")
        if result.not_analyzable:
            counts.append(f"{result.not_analyzable} not analyzable")
        if result.left_out:
            counts.append(f"{len(result.left_out)} file(s) left out")
        head = "Cancelled" if result.cancelled else "Done"
        text = f"{head}: " + ", ".join(counts) + f". Results in {result.out}"
        if result.cancelled:
            text += "; score again with the same output folder to go on."
        self.summary_label.setText(text)
        self.summary_label.setStyleSheet(f"color: {WARNING};" if result.cancelled else "")
        rate = (
            f" · {result.slices_this_run / result.seconds:.1f} slices/s"
            if result.seconds and result.slices_this_run
            else ""
        )
        self.rate_label.setText(f"{format_duration(result.seconds)}{rate}")
        log.info(
            "batch: %s, %d scored, %d failed, %d not analyzable",
            head.lower(),
            result.scored,
            result.failed,
            result.not_analyzable,
        )
        self.runFinished.emit(result)

    @Slot(str)
    def _on_errored(self, message: str) -> None:
        if not self._current():
            return
        self._end_run()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self._fail(message)
        self.window_.report_error(message)

    # ------------------------------------------------------------------ table

    def _add_row(self, row: BatchRow) -> None:
        self._rows.append(row)
        sorting = self.table.isSortingEnabled()
        self.table.setSortingEnabled(False)
        r = self.table.rowCount()
        self.table.insertRow(r)
        title = row.description or ("(no description)" if row.status != "left out" else row.key)
        first = QTableWidgetItem(title)
        if not row.description:
            first.setForeground(QColor(MUTED))
        first.setData(_ROW_ROLE, row)
        tip = [title, f"Series UID {row.key}" if row.status != "left out" else row.key]
        if row.earlier:
            tip.append("Finished by an earlier run on this output folder")
        tip += list(row.warnings[:5])
        first.setToolTip("\n".join(tip))
        cells: list[QTableWidgetItem] = [first]
        cells.append(_NumberItem(row.n_slices if row.status != "left out" else None))
        for i, lab in enumerate(LABELS):
            value = None if row.maxima is None else row.maxima[i]
            number = _NumberItem(None if value is None else round(100 * value), "%")
            if value is not None and value >= self._threshold:
                number.setForeground(QColor(LABEL_COLORS[lab]))
                number.setFont(_bold(number.font()))
            cells.append(number)
        status, colour = _status_text(row)
        status_item = QTableWidgetItem(status)
        if colour:
            status_item.setForeground(QColor(colour))
        if row.flagged:
            status_item.setFont(_bold(status_item.font()))
        cells.append(status_item)
        details = row.error or "; ".join(row.warnings)
        detail_item = QTableWidgetItem(details)
        detail_item.setToolTip(details)
        cells.append(detail_item)
        for col, item in enumerate(cells):
            if row.earlier:
                f = item.font()
                f.setItalic(True)
                item.setFont(f)
            self.table.setItem(r, col, item)
        self.table.setSortingEnabled(sorting)
        self.rowAdded.emit(row)

    def row_at(self, index: int) -> BatchRow | None:
        item = self.table.item(index, 0)
        value = item.data(_ROW_ROLE) if item is not None else None
        return value if isinstance(value, BatchRow) else None

    def open_row(self, index: int) -> bool:
        """Open the series of table row ``index`` in the main window."""
        row = self.row_at(index)
        if row is None or row.status == "left out":
            return False
        if row.files:
            parents = {f.parent for f in row.files}
            paths: list[Path] = list(parents) if len(parents) == 1 else list(row.files)
        elif self._request is not None:
            paths = list(self._request.inputs)
        else:
            return False
        open_series(self.window_, paths, row.key)
        return True

    def _row_activated(self, index: int, _column: int) -> None:
        self.open_row(index)

    # ------------------------------------------------------------------ buttons

    def _choose_input(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Folder to score", self.input_edit.text() or str(Path.home())
        )
        if folder:
            self.input_edit.setText(folder)
            if not self.out_edit.text():
                p = Path(folder)
                self.out_edit.setText(str(p.parent / f"{p.name}-ich-scores"))

    def _choose_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Output folder", self.out_edit.text() or self.input_edit.text()
        )
        if folder:
            self.out_edit.setText(folder)

    def _start_clicked(self) -> None:
        inp, out = self.input_edit.text().strip(), self.out_edit.text().strip()
        if not inp or not out:
            self._fail("choose an input folder and an output folder")
            return
        self.start([inp], out, self.dicom_check.isChecked())

    def _open_out(self) -> None:
        if self._request is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self._request.out)))

    def closeEvent(self, ev: Any) -> None:
        """Closing the dialog mid-run cancels the run (what is committed stays)."""
        if self._worker is not None:
            self.cancel()
        super().closeEvent(ev)


def _bold(font: QFont) -> QFont:
    f = QFont(font)
    f.setBold(True)
    return f


class _NumberItem(QTableWidgetItem):
    """A right-aligned number that sorts as a number ("–" when there is none)."""

    def __init__(self, value: int | None, suffix: str = "") -> None:
        super().__init__("–" if value is None else f"{value}{suffix}")
        self.value = -1 if value is None else value
        if value is None:
            self.setForeground(QColor(MUTED))
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


def _status_text(row: BatchRow) -> tuple[str, str]:
    """What the status column says, and its colour ("" for the normal text colour)."""
    if row.status == "scored":
        return ("Flagged", ERROR) if row.flagged else ("Scored", "")
    if row.status == "not analyzable":
        return "Not analyzable", WARNING
    if row.status == "left out":
        return "File left out", MUTED
    return row.status.capitalize(), ERROR


# ----------------------------------------------------------------------------- opening


class _SeriesOpener(QObject):
    """Opens paths in the window and, once they are scanned, shows the series ``key``.

    It acts on the first series shown from under ``paths`` and then lets go; a series the
    user opened some other way meanwhile is left alone.
    """

    def __init__(self, window: QtMainWindow, paths: Sequence[Path], key: str) -> None:
        super().__init__(window)
        self.window_ = window
        self.paths = [Path(p).resolve() for p in paths]
        self.key = key
        self._switched = False
        window.seriesShown.connect(self._on_shown)

    def _ours(self, series: CTSeries) -> bool:
        if not series.files:
            return False
        first = series.files[0].resolve()
        return any(first == p or first.is_relative_to(p) for p in self.paths)

    @Slot(object)
    def _on_shown(self, series: CTSeries) -> None:
        if series.key == self.key or not self._ours(series):
            self.done()
            return
        item = self.window_.browser.series_items().get(self.key)
        if item is None or self._switched:
            self.window_.statusBar().showMessage(
                f"Series {self.key} was not found under {self.paths[0]}", 8000
            )
            self.done()
            return
        self._switched = True
        self.window_.browser.tree.itemActivated.emit(item, 0)

    def done(self) -> None:
        with contextlib.suppress(RuntimeError):  # already disconnected
            self.window_.seriesShown.disconnect(self._on_shown)
        if _openers.get(self.window_) is self:
            del _openers[self.window_]
        self.deleteLater()


_openers: weakref.WeakKeyDictionary[QObject, _SeriesOpener] = weakref.WeakKeyDictionary()


def open_series(window: QtMainWindow, paths: Sequence[Path], key: str) -> None:
    """Show series ``key`` found under ``paths`` in ``window`` (another open replaces it)."""
    previous = _openers.get(window)
    if previous is not None:
        previous.done()
    _openers[window] = _SeriesOpener(window, paths, key)
    window.open_paths(list(paths))


# ----------------------------------------------------------------------------- menu


class QtBatchTool(QObject):
    """The File-menu action, the (single) dialog, and stopping it when the window closes."""

    def __init__(self, window: QtMainWindow) -> None:
        super().__init__(window)
        self.window_ = window
        self.dialog: QtBatchDialog | None = None
        self.action = QAction("&Batch score folder…", window)
        self.action.setStatusTip(
            "Score every series under a folder into CSV files; resumes an interrupted run"
        )
        self.action.triggered.connect(self.show_dialog)
        window.add_file_action(self.action)
        window.installEventFilter(self)

    def show_dialog(self) -> QtBatchDialog:
        if self.dialog is None:
            self.dialog = QtBatchDialog(self.window_)
        self.dialog.show()
        self.dialog.raise_()
        self.dialog.activateWindow()
        return self.dialog

    def shutdown(self) -> None:
        if self.dialog is not None:
            self.dialog.shutdown()
            self.dialog.close()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.window_ and event.type() == QEvent.Type.Close:
            self.shutdown()
        return False


def install_batch(window: QtMainWindow) -> QtBatchTool:
    """Add File ▸ Batch score folder… to ``window``."""
    return QtBatchTool(window)
