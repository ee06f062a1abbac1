"""The desktop viewer: opening, scrolling, windowing, the model run and its cancellation,
exports, errors, and ``--screenshot`` (offscreen in-process, and Xvfb in a subprocess).

Every window is closed at the end of its test, and every QThread it started must have
stopped by then (``threads_stopped``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import cv2
import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING
from ich_model.phantom import PhantomSpec, write_series
from ich_model.weights import read_manifest
from ich_model.windowing import WindowPreset, apply_window, window_to_uint8
from tests.windows import window_factory
from tests.xvfb import xvfb_display
from viewer.app import install_excepthook, main
from viewer.qt_main_window import QtMainWindow

ROOT = Path(__file__).resolve().parent.parent
WAIT_MS = 60_000


# ----------------------------------------------------------------------------- data


# converted (ONNX) models go to a test folder, not the user's cache (see conftest.model_cache)
pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One patient, one study, two series: 'long' (120 slices) and 'short' (16 slices)."""
    root = tmp_path_factory.mktemp("study")
    long = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=120, seed=3)
    first = write_series(root / "long", long, series_description="long series")
    short = PhantomSpec.for_matrix(96, subtypes=("intraparenchymal",), n_slices=16, seed=4)
    write_series(
        root / "short", short, study_uid=first.study_uid, series_description="short series"
    )
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-slice 128 x 128 phantom series with a subdural bleed."""
    folder = tmp_path_factory.mktemp("small")
    write_series(folder, PhantomSpec.for_matrix(128, subtypes=("subdural",), n_slices=24, seed=1))
    return folder


# ----------------------------------------------------------------------------- windows


@pytest.fixture
def make_window(qtbot, tmp_path: Path) -> Iterator[Callable[..., QtMainWindow]]:
    """Build main windows with test settings; at the end close them and check their threads."""
    yield from window_factory(qtbot, tmp_path)


def open_and_wait(qtbot, w: QtMainWindow, paths: list[Path]) -> None:
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        w.open_paths(paths)


def shown_image(w: QtMainWindow) -> np.ndarray:
    return np.asarray(w.slice_view.image_item.image)


# ----------------------------------------------------------------------------- display


def test_window_without_weights_opens_and_says_so(make_window, tmp_path):
    missing = tmp_path / "nowhere.weights.h5"
    w = make_window(weights=missing)
    assert w.model_state == "failed"
    assert f"no model weights found: {missing}" in w.findings.status_label.text()
    assert w.slice_view.overlay.hint  # the empty window says how to open a study
    assert w.slice_view.overlay.notice == NOT_FOR_DIAGNOSIS
    assert len(w.threads) == 1  # DICOM only: no model thread, TensorFlow never imported for it
    assert "no model weights found" in w.about_text()


def test_scroll_keys_wheel_slider_and_strip(qtbot, make_window, small):
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [small])
    n = w.n_slices
    assert n == 24 and w.current_index == n // 2
    view = w.slice_view
    k = w.current_index
    qtbot.keyClick(view, Qt.Key.Key_Up)
    assert w.current_index == k + 1  # up = towards the head
    qtbot.keyClick(view, Qt.Key.Key_Down)
    qtbot.keyClick(view, Qt.Key.Key_Down)
    assert w.current_index == k - 1
    qtbot.keyClick(view, Qt.Key.Key_PageUp)
    assert w.current_index == k + 9
    qtbot.keyClick(view, Qt.Key.Key_Home)
    assert w.current_index == 0
    qtbot.keyClick(view, Qt.Key.Key_PageDown)
    assert w.current_index == 0  # clamped
    qtbot.keyClick(view, Qt.Key.Key_End)
    assert w.current_index == n - 1

    centre = QPointF(view.viewport().rect().center())
    glob = QPointF(view.viewport().mapToGlobal(centre.toPoint()))
    for delta in (-120, -120, 120):
        ev = QWheelEvent(
            centre,
            glob,
            QPoint(0, 0),
            QPoint(0, delta),
            Qt.MouseButton.NoButton,
            Qt.KeyboardModifier.NoModifier,
            Qt.ScrollPhase.NoScrollPhase,
            False,
        )
        QApplication.sendEvent(view.viewport(), ev)
    assert w.current_index == n - 2

    w.slider.setValue(5)
    assert w.current_index == 5
    strip = w.strip
    y = strip.height() - 8  # near the bottom: the feet end
    qtbot.mouseClick(strip, Qt.MouseButton.LeftButton, pos=QPoint(20, y))
    assert w.current_index == strip.index_at(y) <= 1

    top_right = " ".join(view.overlay.top_right)
    assert f"Slice {w.current_index + 1} / {n}" in top_right and "mm" in top_right
    assert view.overlay.edges == ("R", "L", "A", "P")  # radiological, anterior up


def test_presets_show_the_window_they_name(qtbot, make_window, small):
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [small])
    hu = w.series.hu[w.current_index]
    for key, preset in zip(
        (Qt.Key.Key_2, Qt.Key.Key_3, Qt.Key.Key_1),
        (WindowPreset.BONE, WindowPreset.SUBDURAL, WindowPreset.BRAIN),
        strict=True,
    ):
        w.activateWindow()
        qtbot.keyClick(w.slice_view, key)
        assert w.level_width == (preset.level, preset.width)
        image = shown_image(w)
        assert np.array_equal(image, window_to_uint8(hu, preset.level, preset.width))
        assert np.allclose(
            image / 255.0, apply_window(hu, preset.level, preset.width), atol=0.5 / 255 + 1e-6
        )
        assert tuple(w.slice_view.image_item.levels) == (0, 255)
        assert (
            f"WW {preset.width:.0f}  WL {preset.level:.0f}" in w.slice_view.overlay.bottom_left[-2]
        )
    brain = shown_image(w).copy()
    w.apply_preset(WindowPreset.BONE)
    assert not np.array_equal(brain, shown_image(w))


def test_right_drag_sets_width_and_level(qtbot, make_window, small):
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [small])
    vp = w.slice_view.viewport()
    start = QPointF(vp.rect().center())

    def send(kind, pos, buttons):
        ev = QMouseEvent(
            kind,
            pos,
            QPointF(vp.mapToGlobal(pos.toPoint())),
            Qt.MouseButton.RightButton,
            buttons,
            Qt.KeyboardModifier.NoModifier,
        )
        QApplication.sendEvent(vp, ev)

    send(QMouseEvent.Type.MouseButtonPress, start, Qt.MouseButton.RightButton)
    for i in range(1, 11):
        send(QMouseEvent.Type.MouseMove, start + QPointF(6 * i, 3 * i), Qt.MouseButton.RightButton)
    send(QMouseEvent.Type.MouseButtonRelease, start + QPointF(60, 30), Qt.MouseButton.NoButton)
    level, width = w.level_width
    assert width > WindowPreset.BRAIN.width and level > WindowPreset.BRAIN.level
    assert "(custom)" in w.slice_view.overlay.bottom_left[-2]
    hu = w.series.hu[w.current_index]
    assert np.array_equal(shown_image(w), window_to_uint8(hu, level, width))
    assert not any(a.isChecked() for a in w.preset_actions.values())


# ----------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_model_fills_strip_findings_overlay_and_exports(
    qtbot, make_window, small, tiny_weights, tmp_path
):
    manifest, _ = read_manifest(tiny_weights)
    w = make_window(weights=tiny_weights)
    assert w.threshold == manifest.threshold
    assert w.findings.untrained_label.isVisibleTo(w.findings)  # tiny weights are untrained
    with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as done:
        w.open_paths([small])
    assert done.args == [True]
    scores = w.scores
    assert scores is not None and scores.complete and scores.n_scored == 24
    ov = w.slice_view.overlay
    assert ov.banner == UNTRAINED_WARNING
    assert [line.label for line in ov.probabilities] == list(LABELS)
    assert all(line.probability is not None for line in ov.probabilities)
    assert w.findings.table.item(5, 1).text().endswith("%")

    w.set_threshold(0.01)  # everything is flagged
    assert w.strip.flagged.all()
    assert all(line.above for line in w.slice_view.overlay.probabilities)
    assert "24 of 24" in w.findings.summary_label.text()
    w.set_slice(3)
    w.go_to_flagged(1)
    assert w.current_index == 4
    w.go_to_flagged(-1)
    assert w.current_index == 3
    w.set_threshold(0.99)
    assert not w.strip.flagged.any()
    assert not any(line.above for line in w.slice_view.overlay.probabilities)

    csv_path = w.export_csv(tmp_path / "r.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == ["index", "position_mm", "sop_instance_uid", *LABELS]
    assert len(lines) == 25
    doc = json.loads(w.export_json(tmp_path / "r.json").read_text())
    assert doc["notice"] == NOT_FOR_DIAGNOSIS and doc["untrained_warning"] == UNTRAINED_WARNING
    assert doc["model"]["sha256"] == manifest.sha256 and doc["complete"] is True
    assert len(doc["slices"]) == 24 and set(doc["series_max"]) == set(LABELS)
    assert doc["flagged_slices"] == {lab: [] for lab in LABELS}  # at 0.99
    text = json.dumps(doc)
    assert "Phantom^Head" not in text and "PHANTOM-0001" not in text  # no PHI in exports
    png = w.export_png(tmp_path / "view.png")
    assert cv2.imread(str(png)) is not None
    # the patient's name is on screen, and in an exported view only when asked for
    assert any("Phantom Head" in x for x in w.slice_view.overlay.top_left)
    drawn: list[tuple[str, ...]] = []
    real_grab = w.slice_view.grab
    w.slice_view.grab = lambda: (drawn.append(w.slice_view.overlay.top_left), real_grab())[1]
    plain = cv2.imread(str(w.export_png(tmp_path / "plain.png")))
    named = cv2.imread(str(w.export_png(tmp_path / "named.png", include_patient=True)))
    assert not any("Phantom Head" in x for x in drawn[0])
    assert any("Phantom Head" in x for x in drawn[1])
    assert not np.array_equal(plain, named)
    assert any("Phantom Head" in x for x in w.slice_view.overlay.top_left)  # screen unchanged

    # Grad-CAM of the shown slice, computed lazily in the model's thread
    w.findings.heatmap_label.setCurrentIndex(LABELS.index("intraparenchymal"))
    w.set_heatmap_enabled(True)
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=WAIT_MS)
    heat = w.slice_view.heat_item
    if heat.isVisible():
        assert np.asarray(heat.image).shape[:2] == w.series.hu.shape[1:]
    assert "Heat map" in " ".join(w.slice_view.overlay.bottom_left)
    w.set_heatmap_enabled(False)
    assert not heat.isVisible()
    assert manifest.sha256 in w.about_text() and UNTRAINED_WARNING in w.about_text()


def start_paused_run(qtbot, w: QtMainWindow, paths: list[Path]) -> threading.Event:
    """Open ``paths`` and hold the model after its first batch until the returned gate opens.

    The hold runs on the model's thread (a direct connection), so "mid-run" is certain
    however fast the tiny model is.
    """
    gate = threading.Event()
    w.model_worker.batchScored.connect(lambda *_: gate.wait(30), Qt.ConnectionType.DirectConnection)
    with qtbot.waitSignal(w.scoringProgressed, timeout=WAIT_MS):
        w.open_paths(paths)
    return gate


@pytest.mark.slow
def test_cancel_mid_run_keeps_partial_results(qtbot, make_window, study, tiny_weights):
    w = make_window(weights=tiny_weights, batch_size=1)
    gate = start_paused_run(qtbot, w, [study / "long"])
    with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as done:
        w.cancel_scoring()
        gate.set()
    assert done.args == [False]
    s = w.scores
    assert s is not None and not s.complete and s.n_scored == 1 and s.n_slices == 120
    assert "cancelled" in w.slice_view.overlay.model_status
    assert "cancelled" in w.findings.status_label.text()
    # scrolling and windowing still work, and the run can be started again
    w.set_slice(0)
    w.apply_preset(WindowPreset.SUBDURAL)
    with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as again:
        w.rescore()
    assert again.args == [True] and w.scores.complete


@pytest.mark.slow
def test_gui_stays_live_during_the_run(qtbot, make_window, study, tiny_weights):
    w = make_window(weights=tiny_weights, batch_size=1)
    gate = start_paused_run(qtbot, w, [study / "long"])
    k0 = w.current_index
    for _ in range(5):
        qtbot.keyClick(w.slice_view, Qt.Key.Key_Up)
    w.apply_preset(WindowPreset.BONE)
    assert w.current_index == k0 + 5 and w.level_width == WindowPreset.BONE.value
    assert w.is_busy() and w.cancel_button.isVisible()  # the run is still going
    with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as done:
        gate.set()
    assert done.args == [True] and not w.cancel_button.isVisible()


@pytest.mark.slow
def test_choosing_another_series_mid_run_stops_the_old_job(qtbot, make_window, study, tiny_weights):
    w = make_window(weights=tiny_weights, batch_size=1)
    gate = start_paused_run(qtbot, w, [study])
    assert w.series.description == "long series"  # the default: most slices
    items = w.browser.series_items()
    assert len(items) == 2
    short_key = next(k for k in items if k != w.series.key)
    finished: list[bool] = []
    w.scoringFinished.connect(finished.append)
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        w.browser.tree.itemClicked.emit(items[short_key], 0)
    gate.set()
    qtbot.waitUntil(lambda: bool(finished), timeout=WAIT_MS)
    qtbot.wait(200)  # anything the old job still sent has arrived by now
    assert finished == [True]  # only the new series' run reports; the old one was dropped
    assert w.series.description == "short series"
    assert w.scores.n_slices == 16 and w.scores.complete


@pytest.mark.slow
def test_close_mid_run_stops_every_thread(qtbot, make_window, study, tiny_weights):
    w = make_window(weights=tiny_weights, batch_size=1)
    gate = start_paused_run(qtbot, w, [study / "long"])
    threads = w.threads
    assert len(threads) == 2 and all(t.isRunning() for t in threads)
    assert w.is_busy()
    t0 = time.perf_counter()
    threading.Timer(0.3, gate.set).start()  # the model is held mid-run when close() begins
    w.close()
    assert all(not t.isRunning() for t in threads)
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_close_while_the_model_loads(qtbot, make_window, small, tiny_weights):
    w = make_window(weights=tiny_weights)
    w.open_paths([small])
    qtbot.wait(100)  # the model load has started
    threads = w.threads
    w.close()
    assert all(not t.isRunning() for t in threads)


@pytest.mark.slow
def test_a_series_that_comes_before_the_model_load_is_scored_after_it(qtbot, small, tiny_weights):
    """A small study can be read before the window's start-up timer asks for the model:
    the worker keeps the job and scores it once the model is loaded (CI saw this race)."""
    from ich_model.dicom_io import load_series, scan
    from viewer.workers import ModelWorker, start_thread, stop_thread

    series = load_series(scan([small])[0])
    worker = ModelWorker(batch_size=8)
    errors: list[str] = []
    worker.jobErrored.connect(lambda job, msg: errors.append(msg))
    thread = start_thread(worker, "ich-model-test")
    try:
        with qtbot.waitSignal(worker.jobFinished, timeout=WAIT_MS) as done:
            worker.score(series)  # queued before the load request
            worker.load_model(tiny_weights)
        assert not errors
        assert done.args[1].shape == (series.n_slices, len(LABELS)) and done.args[2] is True
    finally:
        worker.stop()
        stop_thread(thread)


# ----------------------------------------------------------------------------- panels, files


def test_tags_panel_hides_identifying_tags(qtbot, make_window, small):
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [small])
    w.tags_dock.raise_()
    qtbot.waitUntil(lambda: w.tag_panel.path == w.series.files[w.current_index], timeout=5000)
    shown = w.tag_panel.shown_keywords()
    assert "Modality" in shown and "SliceThickness" in shown
    assert not shown & {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"}
    assert w.tag_panel.hidden_count >= 4
    w.tag_panel.show_identifying.setChecked(True)
    assert {"PatientName", "PatientID"} <= w.tag_panel.shown_keywords()


def test_browser_thumbnails_and_patient_toggle(qtbot, make_window, study):
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [study])
    tree = w.browser.tree
    patient = tree.topLevelItem(0)
    assert "Phantom Head" in patient.text(0)
    qtbot.waitUntil(lambda: all(not i.icon(0).isNull() for i in w.browser.series_items().values()))
    assert "Phantom Head" in " ".join(w.slice_view.overlay.top_left)
    w.action_patient.trigger()  # hide patient and study
    assert w.slice_view.overlay.top_left == ()
    assert tree.topLevelItem(0).text(0) == "Patient 1"


def test_drop_folder_opens_it_and_recent_studies(qtbot, make_window, small):
    w = make_window(load_model=False, remember=True)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(small))])
    ev = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        w.dropEvent(ev)
    assert w.recent_studies()[0] == [str(small.resolve())]
    w.recent_menu.aboutToShow.emit()
    assert str(small.resolve()) in [a.text() for a in w.recent_menu.actions()]


def test_file_menu_hook_for_other_tools(make_window):
    from PySide6.QtGui import QAction

    w = make_window(load_model=False)
    action = QAction("Batch score a folder…", w)
    w.add_file_action(action)
    texts = [a.text() for a in w.file_menu.actions()]
    assert texts.index("Batch score a folder…") < texts.index("Export results as &CSV…")
    assert texts.index("Batch score a folder…") > texts.index("Open &DICOMDIR…")


def test_bad_input_names_the_file_and_never_dies(qtbot, make_window, tmp_path):
    bad = tmp_path / "notdicom"
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"this is not DICOM")
    w = make_window(load_model=False, dialogs=True)
    w.open_paths([bad])
    qtbot.waitUntil(lambda: bool(w.errors), timeout=WAIT_MS)
    assert str(bad) in w.errors[-1]
    assert str(bad) in w.statusBar().currentMessage()
    boxes = [b for b in w.findChildren(QMessageBox) if b.isVisible()]
    assert boxes and str(bad) in boxes[0].text()
    for b in boxes:
        b.close()
    assert w.series is None


def test_files_left_out_stay_visible_after_the_series_loads(qtbot, make_window, small, tmp_path):
    """The scan's "left out" messages must outlive the loading and series messages."""
    import shutil

    folder = tmp_path / "with-junk"
    shutil.copytree(small, folder)
    (folder / "empty.dcm").write_bytes(b"")
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [folder])
    assert w.left_out_label.isVisible() and w.left_out_label.text() == "1 file(s) left out"
    assert f"{folder / 'empty.dcm'}: left out, empty file" in w.left_out_label.toolTip()
    open_and_wait(qtbot, w, [small])  # a clean folder clears it
    assert not w.left_out_label.isVisible()


def test_a_series_the_model_cannot_read_is_shown_but_not_scored(qtbot, make_window, tmp_path):
    from tests.dicomfactory import ct_series

    ct_series(tmp_path / "mr", n=4, modality="MR")
    w = make_window(load_model=False)
    open_and_wait(qtbot, w, [tmp_path / "mr"])
    assert w.scores is None and not w.is_busy()
    assert "not scored: modality MR" in w.slice_view.overlay.model_status


def test_the_user_can_insist_on_scoring_a_series_not_analyzable(
    qtbot, make_window, tmp_path, tiny_weights
):
    from tests.dicomfactory import ct_series

    ct_series(tmp_path / "mr", n=4, modality="MR")
    w = make_window(weights=tiny_weights)
    qtbot.waitUntil(lambda: w._model_state == "ready", timeout=WAIT_MS)
    open_and_wait(qtbot, w, [tmp_path / "mr"])
    assert w.scores is None
    assert "not analyzable" in w.slice_view.overlay.model_status
    with qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS):
        w.action_force_score.trigger()
    assert w.scores is not None and w.scores.n_scored == 4
    note = "not analyzable, scored on request: modality MR"
    assert note in w.findings.warnings_label.text()  # the reason stays in sight
    assert any(note in x for x in w.results_document()["warnings"])  # and into the exports


def test_main_with_bad_input_saves_a_screenshot_and_fails(qtbot, tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    out = tmp_path / "bad.png"
    rc = main([str(bad), "--weights", str(tmp_path / "none.weights.h5"), "--screenshot", str(out)])
    assert rc == 1  # nothing to show, but no dialog waited on and no crash
    assert cv2.imread(str(out)) is not None


def test_excepthook_shows_unexpected_errors(make_window):
    w = make_window(load_model=False)
    previous = install_excepthook(w)
    try:
        sys.excepthook(ValueError, ValueError("boom"), None)
    finally:
        sys.excepthook = previous
    assert "ValueError: boom" in w.errors[-1]


# ----------------------------------------------------------------------------- the command line


def _check_screenshot(path: Path, size: tuple[int, int]) -> None:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a PNG"
    assert image.shape[1::-1] == size
    assert float(image.std()) > 10.0  # not uniform
    colours = np.unique(image[::4, ::4].reshape(-1, 3), axis=0)
    assert len(colours) > 50


@pytest.mark.slow
def test_main_screenshot_offscreen(qtbot, small, tiny_weights, tmp_path):
    out = tmp_path / "shot.png"
    rc = main(
        [str(small), "--weights", str(tiny_weights), "--screenshot", str(out), "--size", "1280x800"]
    )
    assert rc == 0
    _check_screenshot(out, (1280, 800))


def _python(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from the repository, offscreen unless ``env`` says otherwise; asserts
    that it exits 0 (the message ends with its output)."""
    full = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", QT_QPA_PLATFORM="offscreen")
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full.update(env)
    run = subprocess.run(
        [sys.executable, *args], env=full, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_screenshot_under_xvfb(small, tiny_weights, tmp_path):
    with xvfb_display() as display:
        if display is None:
            pytest.skip(
                "Xvfb is not installed (apt-get install xvfb); the offscreen test covers the rest"
            )
        out = tmp_path / "xvfb.png"
        args = ["-m", "viewer.app", str(small), "--screenshot", str(out), "--weights"]
        _python([*args, str(tiny_weights)], 180, DISPLAY=display, QT_QPA_PLATFORM="xcb")
        _check_screenshot(out, (1440, 900))


def test_window_shows_before_tensorflow_is_imported(tmp_path):
    """``--exit-after-show`` paints the window and exits; TensorFlow was never imported."""
    script = textwrap.dedent(
        """
        import sys
        from viewer.app import main
        rc = main(["--exit-after-show"])
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        sys.exit(rc)
        """
    )
    run = _python(["-c", script], 60)
    assert run.stdout.startswith("shown ")


@pytest.mark.slow
def test_the_model_runtime_is_imported_off_the_gui_thread(tmp_path, small, tiny_weights):
    script = textwrap.dedent(
        f"""
        import sys, threading
        from PySide6.QtWidgets import QApplication
        where = dict()  # heavy module -> imported on the main (GUI) thread?

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name in ("tensorflow", "keras", "onnxruntime") and name not in where:
                    where[name] = threading.current_thread() is threading.main_thread()
                return None

        sys.meta_path.insert(0, Spy())
        app = QApplication([])
        from viewer.qt_main_window import QtMainWindow
        from PySide6.QtCore import QSettings, QTimer
        settings = QSettings({str(tmp_path / "s.ini")!r}, QSettings.Format.IniFormat)
        w = QtMainWindow(
            weights={str(tiny_weights)!r}, dialogs=False, remember=False, settings=settings
        )
        w.show()
        timer = QTimer()
        timer.timeout.connect(lambda: w.model_state != "loading" and app.quit())
        timer.start(50)
        app.exec()
        print("model:", w.model_state)
        w.close()
        print("imported on the main thread:", where)
        sys.exit(0 if where and not any(where.values()) and w.model_state == "ready" else 1)
        """
    )
    _python(["-c", script], 120)


@pytest.mark.slow
def test_heat_map_with_the_tensorflow_runtime_does_not_hang(small, tiny_weights, tmp_path):
    """Grad-CAM, then the first scoring call, both tracing a ``tf.function`` on the model
    thread: this deadlocked (the model thread waited for the GIL it held) until worker
    threads kept one Python thread state for life (``viewer.workers.pin_thread_state``)."""
    out = tmp_path / "heat.png"
    args = [str(small), "--weights", str(tiny_weights), "--screenshot", str(out), "--heatmap"]
    _python(["-m", "viewer.app", *args], 180, ICH_RUNTIME="tensorflow")
    assert cv2.imread(str(out)) is not None
