"""Workers that keep the GUI thread free: one reads DICOM, one owns the model.

Each is a QObject moved to its own long-lived QThread (the superqt/napari pattern):
requests go in as queued signals, results come back as past-tense signals, every
exception is caught in the worker and emitted as a message that names the file,
and a job is abandoned between steps as soon as a newer one supersedes it (a flag
read between slices or batches; the GUI thread never waits for a job).

``ich_model.dicom_io`` (with pydicom, about half a second to import) is imported on
first use, normally here on the DICOM thread, so the window never waits for it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from ich_model.series import CTSeries, SeriesInfo, SeriesLoadError
from ich_model.weights import WeightsError
from ich_model.windowing import WindowPreset, window_to_uint8

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 96


_pin = threading.local()


def pin_thread_state() -> None:
    """Give this Qt thread one Python thread state for its whole life.

    PySide creates a fresh Python thread state for every slot call on a QThread and
    deletes it afterwards. TensorFlow's pybind11 code caches the thread state it saw
    per OS thread; the next slot then ran with a new state while TensorFlow used the
    deleted one (whose memory a new thread had reused): the model thread waited for
    the GIL it already held, tracing its first ``tf.function`` after a Grad-CAM
    (gdb: ``take_gil`` under ``PyGraph::version_def``). Holding one extra
    ``PyGILState_Ensure`` keeps the same state from the thread's start to its end.
    """
    if getattr(_pin, "state", None) is None:
        _pin.state = ctypes.pythonapi.PyGILState_Ensure()


def unpin_thread_state() -> None:
    """Undo :func:`pin_thread_state`, on the same thread, as it finishes."""
    state = getattr(_pin, "state", None)
    if state is not None:
        _pin.state = None
        ctypes.pythonapi.PyGILState_Release(state)


def start_thread(worker: QObject, name: str, parent: QObject | None = None) -> QThread:
    """Move ``worker`` to a new running QThread; the worker is deleted when the thread ends.

    The thread keeps one Python thread state while it runs (:func:`pin_thread_state`).
    """
    thread = QThread(parent)
    thread.setObjectName(name)
    worker.moveToThread(thread)
    direct = Qt.ConnectionType.DirectConnection  # run in the new thread itself
    thread.started.connect(pin_thread_state, direct)
    thread.finished.connect(unpin_thread_state, direct)
    thread.finished.connect(worker.deleteLater)
    thread.start()
    return thread


def stop_thread(thread: QThread) -> None:
    """Quit a worker thread's event loop and wait until it has stopped.

    The wait can last up to one model batch, or the rest of a model load (a first-time
    conversion runs in a child process that ``ModelWorker.stop`` kills): jobs see their
    cancel flag between batches, and neither runtime can be interrupted mid-call. It has
    no time limit on purpose: a QThread destroyed while it runs aborts the whole process.
    """
    if not thread.isRunning():
        return
    thread.quit()
    t0 = time.perf_counter()
    thread.wait()
    waited = time.perf_counter() - t0
    if waited > 1.0:
        log.info("waited %.1f s for thread %s to finish its step", waited, thread.objectName())


# ----------------------------------------------------------------------------- DICOM


class StudyWorker(QObject):
    """Scans files and folders for series and loads one series at a time.

    A new scan or load supersedes the one in progress; superseded jobs stop at the
    next slice and their results are never emitted.
    """

    scanned = Signal(int, object, object)  # job, list[SeriesInfo], list[str] warnings
    thumbnailRead = Signal(int, str, object)  # job, SeriesInfo.key, uint8 [h, w]
    progressed = Signal(int, int, int)  # job, slices done, slices in the series
    loaded = Signal(int, object)  # job, CTSeries
    errored = Signal(int, str)  # job, message naming the file(s)

    _scanRequested = Signal(int, object)
    _loadRequested = Signal(int, object)
    _thumbnailsRequested = Signal(int, object)

    def __init__(self) -> None:
        super().__init__()
        self._last_job = 0
        self._wanted_scan = 0
        self._wanted_load = 0
        self._scanRequested.connect(self._scan)
        self._loadRequested.connect(self._load)
        self._thumbnailsRequested.connect(self._thumbnails)

    # -- called from the GUI thread

    def _new_job(self) -> int:
        self._last_job += 1
        return self._last_job

    def scan(self, paths: Sequence[Path | str]) -> int:
        """Start scanning ``paths``; cancels any load in progress. Returns the job id."""
        job = self._new_job()
        self._wanted_scan, self._wanted_load = job, 0
        self._scanRequested.emit(job, [Path(p) for p in paths])
        return job

    def load(self, info: SeriesInfo) -> int:
        """Start loading one series; cancels the load in progress. Returns the job id."""
        job = self._new_job()
        self._wanted_load = job
        self._loadRequested.emit(job, info)
        return job

    def read_thumbnails(self, job: int, infos: Sequence[SeriesInfo]) -> None:
        """Decode the middle slice of each series of scan ``job`` for the series browser."""
        self._thumbnailsRequested.emit(job, list(infos))

    def cancel(self) -> None:
        self._wanted_scan = self._wanted_load = 0

    # -- the worker thread

    @Slot(int, object)
    def _scan(self, job: int, paths: list[Path]) -> None:
        if job != self._wanted_scan:
            return
        from ich_model.dicom_io import scan

        warnings: list[str] = []
        try:
            infos = scan(paths, warn=warnings.append)
        except Exception as exc:  # the scanner skips bad files; this is a bug or an OS error
            log.exception("scanning failed")
            names = ", ".join(str(p) for p in paths)
            self.errored.emit(job, f"{names}: cannot scan ({type(exc).__name__}: {exc})")
            return
        if job == self._wanted_scan:
            self.scanned.emit(job, infos, warnings)

    @Slot(int, object)
    def _thumbnails(self, job: int, infos: list[SeriesInfo]) -> None:
        for info in infos:
            if job != self._wanted_scan:
                return
            try:
                self.thumbnailRead.emit(job, info.key, thumbnail(info))
            except Exception as exc:  # a thumbnail is decoration: log and go on
                log.warning(
                    "no thumbnail for series %s (%s: %s)", info.key, type(exc).__name__, exc
                )

    @Slot(int, object)
    def _load(self, job: int, info: SeriesInfo) -> None:
        if job != self._wanted_load:
            return
        from ich_model.dicom_io import load_series

        n = info.n_slices

        def progress(done: int, total: int) -> None:
            if done == total or done % 8 == 0:
                self.progressed.emit(job, done, total)

        try:
            series = load_series(
                info, progress=progress, cancelled=lambda: job != self._wanted_load
            )
        except SeriesLoadError as exc:
            if job == self._wanted_load:
                self.errored.emit(job, str(exc))
            return
        except Exception as exc:
            log.exception("loading series %s failed", info.key)
            first = info.files[0] if info.files else info.key
            self.errored.emit(
                job, f"{first}: cannot load series of {n} file(s) ({type(exc).__name__}: {exc})"
            )
            return
        if job == self._wanted_load:
            self.loaded.emit(job, series)


def thumbnail(info: SeriesInfo, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """The middle slice of a series, brain window, ``size`` pixels on its long side."""
    from ich_model.dicom_io import load_series

    middle = replace(info, files=(info.files[len(info.files) // 2],), warnings=())
    hu = load_series(middle).hu[0]
    if info.modality.upper() in ("CT", ""):
        image = window_to_uint8(hu, WindowPreset.BRAIN.level, WindowPreset.BRAIN.width)
    else:
        lo, hi = np.percentile(hu, (1, 99))
        image = window_to_uint8(hu, float(lo + hi) / 2.0, max(float(hi - lo), 1.0))
    h, w = image.shape
    scale = size / max(h, w)
    out_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, out_size, interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- model


class _Predictor(Protocol):
    """What the viewer uses of ``ich_model.predictor.Predictor``."""

    identity: Any

    def score_series(
        self,
        series: CTSeries,
        progress: Callable[[int, int, int, np.ndarray], None] | None = ...,
        cancelled: Callable[[], bool] | None = ...,
    ) -> Any: ...

    def gradcam(self, hu_slice: np.ndarray, label: str = ...) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class GradcamRequest:
    """Where-the-model-looked map for one slice of one loaded series (``token``)."""

    token: int
    index: int
    label: str
    hu: np.ndarray


def lower_thread_priority(nice: int = 10) -> None:
    """Let the GUI thread win the CPU when it needs it; the model gets every idle cycle.

    The model's runtime keeps one thread busy per core; at equal priority the GUI thread
    then waits for a time slice and scrolling stutters. On Linux the nice value is per
    thread and inherited by the threads this one starts (the runtime's thread pool, the
    batch preparation thread); elsewhere Qt's thread priority is the closest knob.
    """
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
            )
        except OSError as exc:
            log.debug("cannot lower the model thread's priority: %s", exc)
    else:
        QThread.currentThread().setPriority(QThread.Priority.LowPriority)


@contextmanager
def _collector_paused(freeze: bool = False) -> Iterator[None]:
    """Keep Python's cycle collector out of other threads while the model works here.

    TensorFlow objects that die in reference cycles are finalised by whichever thread
    happens to run the collector. When that was the GUI thread while this one traced a
    tf.function (the first Grad-CAM), the process crashed (SIGSEGV in
    ``Graph.graph_def_versions``; with the collector off it never did). So the collector
    is off during the work, and afterwards collects here what the work left behind: with
    collection off, all of it is still in the youngest generation, so that is cheap.

    ``freeze``: move what survived (the model, TensorFlow, Keras: about 300,000 objects)
    out of the collector's sight. A full collection walks every object and took 330 ms
    with TensorFlow loaded; without the freeze one would hit the GUI thread now and then.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        t0 = time.perf_counter()
        gc.collect(0)
        if freeze:
            gc.freeze()
        log.debug("collected on the model thread in %.0f ms", 1e3 * (time.perf_counter() - t0))
        if enabled:
            gc.enable()


def _import_predictor() -> Any:
    """``ich_model.predictor``, imported here, on the model thread, when first needed.

    The import pulls in TensorFlow (seconds); the window must be up before it happens,
    so nothing imports it at module level. pyproject's import-linter contract allows
    exactly this edge.
    """
    import ich_model.predictor

    return ich_model.predictor


class ModelWorker(QObject):
    """Owns the Predictor: loads it once, then scores series and computes Grad-CAM maps.

    One job runs at a time; submitting a new one cancels the current one at its next
    batch. Grad-CAM requests keep only the newest and are served between batches, so
    the heat map follows the user even while a series is being scored.
    """

    modelLoaded = Signal(object)  # dict, ModelIdentity.to_dict()
    modelErrored = Signal(str)
    jobStarted = Signal(int, int)  # job, slices
    batchScored = Signal(int, int, object)  # job, first slice, probabilities [b, 6]
    jobFinished = Signal(int, object, bool, float)  # job, probabilities [z', 6], complete, s
    jobErrored = Signal(int, str)
    gradcamComputed = Signal(object, object)  # GradcamRequest, heat map [y, x] in [0, 1]
    gradcamErrored = Signal(object, str)

    _loadRequested = Signal(object)
    _scoreRequested = Signal(int, object)
    _gradcamRequested = Signal()

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self._batch_size = batch_size
        self._predictor: _Predictor | None = None
        self._load_error = ""
        self._load_attempted = False
        self._deferred_score: tuple[int, CTSeries] | None = None
        self._last_job = 0
        self._wanted_job = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._pending_gradcam: GradcamRequest | None = None
        self._loadRequested.connect(self._load)
        self._scoreRequested.connect(self._score)
        self._gradcamRequested.connect(self._serve_gradcam)

    # -- called from the GUI thread

    def load_model(self, weights: Path | None) -> None:
        """Build the Predictor (imports TensorFlow) on the worker thread."""
        self._loadRequested.emit(weights)

    def score(self, series: CTSeries) -> int:
        """Score a series; cancels the current job. Returns the job id."""
        self._last_job += 1
        job = self._last_job
        self._wanted_job = job
        self._scoreRequested.emit(job, series)
        return job

    def cancel(self) -> None:
        """Stop the current job at its next batch (it finishes with ``complete=False``)."""
        self._wanted_job = 0

    def request_gradcam(self, request: GradcamRequest) -> None:
        """Ask for a heat map; an older request not yet served is dropped."""
        with self._lock:
            self._pending_gradcam = request
        self._gradcamRequested.emit()

    def stop(self) -> None:
        """Before quitting the thread: cancel everything, serve nothing more (a first
        conversion of the weights, running in a child process, is killed)."""
        self._stopping = True
        self._wanted_job = 0
        runtime = sys.modules.get("ich_model.runtime")  # loaded only by the model thread
        if runtime is not None:
            runtime.cancel_conversions()
        with self._lock:
            self._pending_gradcam = None

    # -- the worker thread

    @Slot(object)
    def _load(self, weights: Path | None) -> None:
        if self._stopping:
            return
        lower_thread_priority()
        self._load_attempted = True
        where = str(weights) if weights else "the bundled weights"
        try:
            with _collector_paused(freeze=True):
                module = _import_predictor()
                self._predictor = module.Predictor(weights, batch_size=self._batch_size)
        except WeightsError as exc:
            self._load_error = str(exc)
        except Exception as exc:  # TensorFlow, h5py, memory: the message names the file
            log.exception("cannot load the model from %s", where)
            self._load_error = f"{where}: cannot load the model ({type(exc).__name__}: {exc})"
        deferred, self._deferred_score = self._deferred_score, None
        if self._predictor is None:
            self.modelErrored.emit(self._load_error)
        else:
            self.modelLoaded.emit(self._predictor.identity.to_dict())
            self._serve_gradcam()
        if deferred is not None:
            self._score(*deferred)

    @Slot(int, object)
    def _score(self, job: int, series: CTSeries) -> None:
        if job != self._wanted_job or self._stopping:
            return
        predictor = self._predictor
        if predictor is None and not self._load_attempted:
            # The series arrived before the load request (a small study read within the
            # window's start-up delay): score it as soon as the model is loaded.
            self._deferred_score = (job, series)
            return
        if predictor is None:
            self.jobErrored.emit(job, self._load_error or "the model is not loaded")
            return
        self.jobStarted.emit(job, series.n_slices)

        def progress(done: int, total: int, start: int, probs: np.ndarray) -> None:
            self.batchScored.emit(job, start, np.array(probs, dtype=np.float32))
            self._serve_gradcam()

        def cancelled() -> bool:
            return job != self._wanted_job or self._stopping

        try:
            with _collector_paused():
                result = predictor.score_series(series, progress=progress, cancelled=cancelled)
        except Exception as exc:
            log.exception("scoring series %s failed", series.key)
            where = series.files[0].parent if series.files else series.key
            self.jobErrored.emit(
                job, f"{where}: the model failed on this series ({type(exc).__name__}: {exc})"
            )
            return
        self.jobFinished.emit(
            job, np.asarray(result.probabilities), bool(result.complete), float(result.seconds)
        )
        self._serve_gradcam()

    @Slot()
    def _serve_gradcam(self) -> None:
        if self._predictor is None or self._stopping:
            return  # kept pending until the model is loaded
        with self._lock:
            request, self._pending_gradcam = self._pending_gradcam, None
        if request is None:
            return
        try:
            with _collector_paused(freeze=True):
                heat = self._predictor.gradcam(request.hu, request.label)
        except Exception as exc:
            log.exception("Grad-CAM failed")
            self.gradcamErrored.emit(request, f"Grad-CAM failed ({type(exc).__name__}: {exc})")
            return
        self.gradcamComputed.emit(request, heat)
