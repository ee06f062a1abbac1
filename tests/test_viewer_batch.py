"""File ▸ Batch score folder…: the dialog over ``ich_model.batch.score_folder``.

A folder mixing two phantom series, an MR series (not analyzable), a truncated file and an
empty sub-folder is scored with tiny weights; the table must show every outcome with its
reason, the outputs must be written, a cancel must stop the worker thread, a second run on
the same output folder must resume, and a double-click must open the series in the window.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import pytest

from ich_model.labels import NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING
from ich_model.phantom import PhantomSpec, write_series
from tests.windows import window_factory
from viewer.qt_batch import STATUS_COLUMN, QtBatchDialog, ReportingPredictor, install_batch
from viewer.qt_main_window import QtMainWindow
from viewer.qt_pacs_tasks import running_threads

WAIT_MS = 60_000


# converted (ONNX) models go to a test folder, not the user's cache (see conftest.model_cache)
pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom CT series, an MR series, a truncated file and an empty folder."""
    from tests.dicomfactory import ct_series

    root = tmp_path_factory.mktemp("mixed")
    spec = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=6, seed=0)
    first = write_series(root / "a", spec, series_description="first series")
    spec_b = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=6, seed=1)
    write_series(root / "b", spec_b, study_uid=first.study_uid, series_description="second")
    ct_series(root / "mr", n=4, modality="MR")
    (root / "empty" / "nothing").mkdir(parents=True)
    data = first.files[0].read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "cut.dcm").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def make_window(qtbot, tmp_path: Path) -> Iterator[Callable[..., QtMainWindow]]:
    """Windows with the batch tool; at the end closed, with no worker thread left running."""

    def install(w: QtMainWindow) -> None:
        w.batch_tool = install_batch(w)  # type: ignore[attr-defined]

    yield from window_factory(qtbot, tmp_path, install=install, load_model=False)
    assert not running_threads(), "a batch worker thread outlived its window"


def _dialog(w: QtMainWindow) -> QtBatchDialog:
    return w.batch_tool.show_dialog()  # type: ignore[attr-defined,no-any-return]


def _series_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "series.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


class Blocker:
    """Makes the second series the model sees wait until the run is cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []  # keys of the series scoring began on
        self.block = True


@pytest.fixture
def blocking_second_series(monkeypatch: pytest.MonkeyPatch) -> Blocker:
    """The second series is scored only once the run is cancelled: a long series, in effect."""
    blocker = Blocker()
    original = ReportingPredictor.score_series

    def score_series(self: ReportingPredictor, series: Any, progress=None, cancelled=None) -> Any:
        blocker.started.append(series.key)
        if blocker.block and len(blocker.started) == 2:
            assert cancelled is not None
            while not cancelled():
                time.sleep(0.01)
        return original(self, series, progress, cancelled)

    monkeypatch.setattr(ReportingPredictor, "score_series", score_series)
    return blocker


def test_menu_entry_and_dialog_show_notice_and_weights(make_window, tiny_weights):
    w = make_window(weights=tiny_weights)
    texts = [a.text() for a in w.file_menu.actions()]
    assert texts.index("&Batch score folder…") < texts.index("Export results as &CSV…")
    d = _dialog(w)
    labels = " ".join(lbl.text() for lbl in d.findChildren(type(d.model_label)))
    assert NOT_FOR_DIAGNOSIS in labels and UNTRAINED_WARNING in labels
    assert w.manifest is not None and w.manifest.short_hash in d.model_label.text()
    assert d.start([d.windowTitle()], w.weights_path or "") is False  # no such folder
    assert "no such file or folder" in d.summary_label.text()


def test_batch_scores_a_mixed_folder_and_opens_a_row(qtbot, make_window, tiny_weights, mixed):
    w = make_window(weights=tiny_weights)
    d = _dialog(w)
    out = mixed.parent / f"{mixed.name}-out"
    assert not d.start([mixed], mixed / "results")  # output inside the input: refused
    assert "inside the input folder" in d.summary_label.text()
    with qtbot.waitSignal(d.runFinished, timeout=WAIT_MS) as done:
        assert d.start([mixed], out)
    result = done.args[0]
    assert not result.cancelled and (result.total, result.scored) == (3, 2)
    assert result.not_analyzable == 1 and len(result.left_out) == 1
    assert not d.is_running() and not running_threads()

    by_status: dict[str, list[Any]] = {}
    for row in d.rows:
        by_status.setdefault(row.status, []).append(row)
    assert sorted(r.description for r in by_status["scored"]) == ["first series", "second"]
    for row in by_status["scored"]:
        assert row.n_slices == 6 and row.maxima is not None and len(row.maxima) == 6
        assert all(0.0 <= p <= 1.0 for p in row.maxima) and row.files
    (mr,) = by_status["not analyzable"]
    assert "MR" in mr.error
    (cut,) = by_status["left out"]
    assert cut.key.endswith("cut.dcm") and "truncated" in cut.error
    assert d.table.rowCount() == 4
    statuses = {d.table.item(r, STATUS_COLUMN).text() for r in range(4)}
    assert {"Not analyzable", "File left out"} <= statuses
    assert "2 of 3 series scored" in d.summary_label.text()
    assert "1 file(s) left out" in d.summary_label.text()
    assert "/s" in d.rate_label.text()

    # the engine's outputs
    rows = _series_csv(out)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"scored", "not analyzable"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["notice"] == NOT_FOR_DIAGNOSIS and summary["series_scored"] == 2
    assert summary["skipped_files"] and "cut.dcm" in summary["skipped_files"][0]
    n_pred = len((out / "predictions.csv").read_text(encoding="utf-8").splitlines()) - 1
    assert n_pred == 2 * 6 * 6

    # double-click opens that series in the viewer
    index = next(r for r in range(d.table.rowCount()) if d.row_at(r).status == "scored")
    key = d.row_at(index).key
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        d.table.cellDoubleClicked.emit(index, 0)
    assert w.series is not None and w.series.key == key
    assert not d.open_row(next(r for r in range(4) if d.row_at(r).status == "left out"))


def test_cancel_mid_series_then_resume(
    qtbot, make_window, tiny_weights, mixed, tmp_path, blocking_second_series
):
    w = make_window(weights=tiny_weights)
    d = _dialog(w)
    out = tmp_path / "out"
    with qtbot.waitSignal(d.runFinished, timeout=WAIT_MS) as done:
        d.start([mixed], out)
        qtbot.waitUntil(lambda: len(blocking_second_series.started) == 2, timeout=WAIT_MS)
        assert d.is_running() and d.cancel_button.isEnabled()
        d.cancel()
    assert done.args[0].cancelled
    qtbot.waitUntil(lambda: not running_threads(), timeout=WAIT_MS)
    assert "Cancelled" in d.summary_label.text()
    first_run = _series_csv(out)
    assert 1 <= len(first_run) < 3 and "scored" in {r["status"] for r in first_run}

    # again on the same output folder: the earlier series are shown, not scored again
    blocking_second_series.started.clear()
    blocking_second_series.block = False
    with qtbot.waitSignal(d.runFinished, timeout=WAIT_MS) as done:
        d.start([mixed], out)
    result = done.args[0]
    assert not result.cancelled and result.resumed == len(first_run)
    earlier = [r for r in d.rows if r.earlier]
    assert [r.key for r in earlier] == [r["series_key"] for r in first_run]
    assert len(blocking_second_series.started) == 2 - sum(r.status == "scored" for r in earlier)
    final = _series_csv(out)
    assert len(final) == 3 and len({r["series_key"] for r in final}) == 3
    # an earlier run's row opens too (by scanning the input and picking the series)
    index = next(r for r in range(d.table.rowCount()) if d.row_at(r).earlier)
    key = d.row_at(index).key
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        assert d.open_row(index)
    qtbot.waitUntil(lambda: w.series is not None and w.series.key == key, timeout=WAIT_MS)


def test_closing_the_window_mid_run_stops_the_batch(
    qtbot, make_window, tiny_weights, mixed, tmp_path, blocking_second_series
):
    w = make_window(weights=tiny_weights)
    d = _dialog(w)
    d.start([mixed], tmp_path / "out")
    qtbot.waitUntil(lambda: len(blocking_second_series.started) == 2, timeout=WAIT_MS)
    threads = d.threads()
    w.close()
    assert threads and all(not t.isRunning() for t in threads)
    assert not running_threads()
