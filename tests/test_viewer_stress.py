"""Open, switch, cancel and close 50 times in a row in the viewer (issue 8, item 6).

The real main window with tiny weights: two phantom series are opened alternately, each
one while the other's model run is going (which abandons that run), now and then a folder
holding only a broken file is opened instead, the Cancel button is pressed now and then,
and every ten rounds the whole window is closed and a new one built.

Checked at the end: no crash, every QThread any of the windows started has stopped, the
last window still scores a series to the end, and resident memory grew by less than
``RSS_BOUND_MB`` between a warmed-up start (first window up, model loaded, both series
scored once) and the end (last window closed and deleted, ``gc.collect()``). The numbers
are printed (``pytest -s`` shows them). The log of the whole run (INFO) names no patient.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import pytest
import shiboken6
from PySide6.QtCore import QCoreApplication, QEvent, QSettings, Qt, QThread

from ich_model.phantom import PhantomSpec, write_series
from viewer.qt_main_window import QtMainWindow

ROUNDS = 50
REOPEN_EVERY = 10
BROKEN_EVERY = 7  # round k with k % 7 == 6 opens the broken folder
CANCEL_EVERY = 3  # round k with k % 3 == 1 presses Cancel once the run has started
RSS_BOUND_MB = 300.0
WAIT_MS = 60_000
STARTED_S = 3.0  # how long a round waits for the first batch before it moves on
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process (``/proc/self/statm``, second field), in MB."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


# converted (ONNX) models go to a test folder, not the user's cache (see conftest.model_cache)
pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stress")
    spec_a = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=40, seed=11)
    spec_b = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=32, seed=12)
    write_series(root / "a", spec_a, series_description="series A")
    write_series(root / "b", spec_b, patient_id="PHANTOM-0002", series_description="series B")
    broken = root / "broken"
    broken.mkdir()
    data = next((root / "a").glob("*.dcm")).read_bytes()
    (broken / "half.dcm").write_bytes(data[: len(data) // 3])  # truncated in the header
    return {"a": root / "a", "b": root / "b", "broken": broken}


def wait_for(qtbot, condition: Callable[[], bool], seconds: float) -> bool:
    """Run the event loop until ``condition()`` or ``seconds`` pass; return ``condition()``."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        qtbot.wait(5)
    return condition()


@pytest.mark.slow
def test_open_switch_cancel_close_fifty_times(qtbot, caplog, folders, tiny_weights, tmp_path):
    caplog.set_level(logging.INFO)
    settings_file = str(tmp_path / "settings.ini")
    threads: list[QThread] = []  # every QThread any window started
    t_start = time.perf_counter()

    def new_window() -> QtMainWindow:
        settings = QSettings(settings_file, QSettings.Format.IniFormat)
        w = QtMainWindow(
            weights=tiny_weights, settings=settings, dialogs=False, remember=False, batch_size=1
        )
        w.resize(1000, 700)
        w.show()
        qtbot.waitExposed(w)
        threads.extend(w.threads)
        assert wait_for(qtbot, lambda: w.model_state != "loading", WAIT_MS / 1000)
        assert w.model_state == "ready", w.errors
        return w

    def close(w: QtMainWindow) -> None:
        mine = w.threads
        w.close()
        assert all(not t.isRunning() for t in mine), "a worker thread outlived its window"
        w.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)

    def score_to_end(w: QtMainWindow, folder: Path) -> None:
        with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as done:
            w.open_paths([folder])
        assert done.args == [True] and w.scores.complete

    w = new_window()
    score_to_end(w, folders["a"])  # warm-up: every code path has run once
    score_to_end(w, folders["b"])
    rss0, tasks0 = rss_mb(), os_threads()
    seen = {"mid_run": 0, "progress": 0, "cancelled": 0, "errors": 0, "reopened": 0}
    trace = [f"round 0: {rss0:.0f} MB"]

    def play(w: QtMainWindow, k: int) -> None:
        """Round ``k``: open the broken folder, or the series the model is not scoring."""
        if k % BROKEN_EVERY == BROKEN_EVERY - 1:
            n_errors = len(w.errors)
            w.open_paths([folders["broken"]])
            assert wait_for(qtbot, lambda: len(w.errors) > n_errors, WAIT_MS / 1000), k
            assert str(folders["broken"]) in w.errors[-1]
            seen["errors"] += 1
            return
        folder = folders["a"] if k % 2 == 0 else folders["b"]
        seen["mid_run"] += w.cancel_button.isVisible()  # the model is scoring the other series
        w.open_paths([folder])  # abandons the run of the other series, if still going
        started = wait_for(
            qtbot,
            lambda: (
                w.scores is not None
                and w.scores.n_scored > 0
                and w.series.files[0].parent == folder
            ),
            STARTED_S,
        )
        seen["progress"] += started
        if k % CANCEL_EVERY == 1 and w.cancel_button.isVisible():
            qtbot.mouseClick(w.cancel_button, Qt.MouseButton.LeftButton)
            assert wait_for(qtbot, lambda: not w.is_busy(), WAIT_MS / 1000), k
            assert w.scores is not None, k
            assert w.scores.complete or "cancelled" in w.findings.status_label.text(), k
            seen["cancelled"] += 1

    for k in range(ROUNDS):
        if k and k % REOPEN_EVERY == 0:
            close(w)
            trace.append(f"round {k}: {rss_mb():.0f} MB (window closed)")
            w = new_window()
            seen["reopened"] += 1
        play(w, k)

    score_to_end(w, folders["a"])  # the window still works after all that
    assert w.series.n_slices == 40 and w.scores.n_scored == 40
    close(w)
    del w  # the last reference: the window and its widgets can go before the measure
    QCoreApplication.processEvents()
    rss1, tasks1 = rss_mb(), os_threads()
    trace.append(f"end: {rss1:.0f} MB")
    elapsed = time.perf_counter() - t_start

    # A window deletes its threads with it; Qt aborts the process if a running QThread is
    # destroyed, so a deleted thread had stopped. The rest must not be running.
    running = [t.objectName() for t in threads if shiboken6.isValid(t) and t.isRunning()]
    assert not running, f"threads still running: {running}"
    growth = rss1 - rss0
    print(
        f"\nstress: {ROUNDS} rounds in {elapsed:.1f} s; {seen}; "
        f"RSS {rss0:.0f} -> {rss1:.0f} MB (growth {growth:+.0f} MB, bound {RSS_BOUND_MB:.0f} MB); "
        f"OS threads {tasks0} -> {tasks1}; {len(threads)} QThreads started, none running\n  "
        + "; ".join(trace)
    )
    assert seen["progress"] >= ROUNDS // 2, seen  # most rounds saw their run start
    assert seen["mid_run"] >= 10, seen  # and many were cut off by the next series
    assert tasks1 <= tasks0 + 4, f"OS threads {tasks0} -> {tasks1}"
    assert seen["cancelled"] >= 5 and seen["errors"] == ROUNDS // BROKEN_EVERY, seen
    assert growth < RSS_BOUND_MB, f"resident memory grew by {growth:.0f} MB"
    logged = caplog.text.lower()  # the viewer's log of the whole run names no patient
    assert "file truncated" in logged
    for phi in ("phantom^head", "phantom head", "phantom-0001", "phantom-0002"):
        assert phi not in logged, phi
