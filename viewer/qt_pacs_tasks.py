"""Background tasks of the batch and PACS tools: one worker object on its own QThread each.

A task is a plain function ``fn(progress, cancelled)`` that runs on a worker thread (a C-FIND,
a retrieval, an export and send, starting the listener). :class:`TaskRunner` moves a
:class:`TaskWorker` for it onto a fresh QThread, and the worker reports back with past-tense
signals (``started``, ``progressed``, ``finished``, ``errored``, ``aborted``), which a
:class:`TaskHandle` living on the GUI thread relays to the dialog. Every exception is caught
on the worker and arrives as a message; the engine's messages already name the node or the
file, anything else is prefixed with what was being done. ``cancel()`` sets a flag the engine
reads between instances; :meth:`TaskRunner.shutdown` cancels and waits, so nothing outlives
the window.

Modules of ``ich_model`` that reach the model runtime (TensorFlow) are imported only on
worker threads, through :func:`import_engine`.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QThread, Signal, Slot

from viewer.workers import start_thread, stop_thread

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
TaskFn = Callable[[ProgressFn, CancelFn], Any]

#: Engine modules that import ``ich_model.predictor`` (and so, lazily, TensorFlow).
WORKER_ONLY_MODULES = (
    "ich_model.batch",
    "ich_model.dicom_export",
    "ich_model.pacs_worklist",
    "ich_model.predictor",
)
#: Progress signals are thinned to about this rate (a C-GET reports every instance).
PROGRESS_INTERVAL_S = 0.05

_threads: weakref.WeakSet[QThread] = weakref.WeakSet()


def import_engine(name: str) -> ModuleType:
    """An ``ich_model`` module that reaches the model runtime, imported on a worker thread.

    The window must never wait for TensorFlow, so these modules are imported where the work
    runs, like ``viewer.workers._import_predictor``. The rule is checked here at run time;
    the static check (import-linter) needs the edges listed in pyproject's ``ignore_imports``
    before these can become plain ``import`` statements.
    """
    if name not in WORKER_ONLY_MODULES:
        raise ValueError(f"name must be one of {WORKER_ONLY_MODULES}. Received: name={name!r}")
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError(f"{name} must be imported on a worker thread, not the GUI thread")
    return importlib.import_module(name)


def track_thread(thread: QThread) -> QThread:
    """Remember a worker thread for :func:`running_threads` (tests check that none is left)."""
    _threads.add(thread)
    return thread


def running_threads() -> list[QThread]:
    """Worker threads started by the batch and PACS tools that are still running."""
    return [t for t in list(_threads) if shiboken6.isValid(t) and t.isRunning()]


def error_text(exc: BaseException, what: str) -> str:
    """The engine's own message (it names the node or file); otherwise what failed, and why."""
    module = type(exc).__module__ or ""
    if module.startswith("ich_model") or isinstance(exc, OSError):
        return str(exc) or f"{what}: {type(exc).__name__}"
    return f"{what} failed ({type(exc).__name__}: {exc})"


class TaskWorker(QObject):
    """Runs one task function on its thread; every exception becomes a signal."""

    started = Signal()
    progressed = Signal(int, int)  # done, total (0: unknown)
    finished = Signal(object)  # what the task returned
    errored = Signal(str)  # message naming the node or the file
    aborted = Signal(str)  # cancelled by the user; nothing was left behind

    _runRequested = Signal()

    def __init__(self, fn: TaskFn, what: str) -> None:
        super().__init__()
        self._fn = fn
        self.what = what
        self._cancel = threading.Event()
        self._last_report = 0.0
        self._runRequested.connect(self._run)

    def cancel(self) -> None:
        """Ask the task to stop at its next check (thread-safe)."""
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def _progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total > 0 or now - self._last_report >= PROGRESS_INTERVAL_S:
            self._last_report = now
            self.progressed.emit(int(done), int(total))

    @Slot()
    def _run(self) -> None:
        self.started.emit()
        try:
            result = self._fn(self._progress, self._cancel.is_set)
        except Exception as exc:
            if self._cancel.is_set() or type(exc).__name__ == "PacsCancelled":
                self.aborted.emit(str(exc) or f"{self.what}: cancelled")
                return
            if (type(exc).__module__ or "").startswith("ich_model"):
                log.warning("%s: %s", self.what, exc)
            else:
                log.exception("%s failed", self.what)
            self.errored.emit(error_text(exc, self.what))
            return
        self.finished.emit(result)


class TaskHandle(QObject):
    """The GUI-thread side of one task: relays the worker's signals, and cancels it."""

    progressed = Signal(int, int)
    finished = Signal(object)
    errored = Signal(str)
    aborted = Signal(str)
    ended = Signal()  # after any of the three above

    def __init__(self, worker: TaskWorker, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker = worker
        self.what = worker.what
        self.task_thread: QThread | None = None
        self.running = True
        self._dropped = False
        worker.progressed.connect(self._on_progressed)
        worker.finished.connect(self._on_finished)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)

    def cancel(self) -> None:
        if self.running:
            self.worker.cancel()

    def drop(self) -> None:
        """Cancel, and deliver nothing more (the dialog is going away)."""
        self._dropped = True
        self.cancel()

    def _end(self) -> None:
        self.running = False
        if self.task_thread is not None:
            stop_thread(self.task_thread)  # the task has returned: this wait is short
        if not self._dropped:
            self.ended.emit()

    @Slot(int, int)
    def _on_progressed(self, done: int, total: int) -> None:
        if self.running and not self._dropped:
            self.progressed.emit(done, total)

    @Slot(object)
    def _on_finished(self, result: object) -> None:
        if not self._dropped:
            self.finished.emit(result)
        self._end()

    @Slot(str)
    def _on_errored(self, message: str) -> None:
        if not self._dropped:
            self.errored.emit(message)
        self._end()

    @Slot(str)
    def _on_aborted(self, message: str) -> None:
        if not self._dropped:
            self.aborted.emit(message)
        self._end()


class TaskRunner(QObject):
    """Starts tasks, each on a new QThread; cancels and waits for all of them on shutdown."""

    def __init__(self, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._name = name
        self._handles: list[TaskHandle] = []
        self._closed = False

    def start(self, fn: TaskFn, what: str) -> TaskHandle:
        """Run ``fn(progress, cancelled)`` on a new thread; connect to the handle's signals
        before control returns to the event loop."""
        if self._closed:
            raise RuntimeError(f"{self._name}: the window is closing; no new task")
        self._prune()
        worker = TaskWorker(fn, what)
        handle = TaskHandle(worker, self)
        handle.task_thread = track_thread(start_thread(worker, f"ich-{self._name}", self))
        self._handles.append(handle)
        worker._runRequested.emit()
        return handle

    def busy(self) -> bool:
        return any(h.running for h in self._handles)

    def cancel_all(self) -> None:
        for h in self._handles:
            h.cancel()

    def threads(self) -> list[QThread]:
        return [h.task_thread for h in self._handles if h.task_thread is not None]

    def shutdown(self) -> None:
        """Cancel every task, drop what they still send, and wait for their threads."""
        self._closed = True
        for h in self._handles:
            h.drop()
        for h in self._handles:
            if h.task_thread is not None:
                stop_thread(h.task_thread)

    def _prune(self) -> None:
        keep = []
        for h in self._handles:
            if h.running or (h.task_thread is not None and h.task_thread.isRunning()):
                keep.append(h)
            else:
                if h.task_thread is not None:
                    h.task_thread.deleteLater()
                h.deleteLater()
        self._handles = keep
