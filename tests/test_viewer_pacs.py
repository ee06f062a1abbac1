"""The PACS menu: settings, find and retrieve, send results, listener and worklist, and
File ▸ Export DICOM SR and key images….

Settings round-trip through a temporary ``pacs.json`` (``ICH_PACS_CONFIG``). The network
tests talk to a real Orthanc (``tests/orthanc.py``) and DCMTK's ``storescu`` on 127.0.0.1,
and skip with the reason when those are not installed. After every test no worker thread
of the tools may still run, and the listener must be stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any QApplication exists

import numpy as np
import pytest
from pydicom import dcmread

from ich_model import pacs
from ich_model.labels import LABELS
from ich_model.pacs import ListenerSettings, PacsConfig, PacsNode
from ich_model.phantom import PhantomSeries, PhantomSpec, write_series
from tests.orthanc import Modality, OrthancServer, free_port, orthanc_binary, running_orthanc
from tests.windows import window_factory
from viewer.qt_main_window import QtMainWindow
from viewer.qt_pacs import QtPacsTools, install_pacs
from viewer.qt_pacs_tasks import running_threads

WAIT_MS = 60_000
LOOPBACK = "127.0.0.1"
OUR_AE = "ICHSO"
PATIENT_ID = "VIEWER-PACS-1"
PATIENT_NAME = "Viewer^Phantom"
N = 6

needs_orthanc = pytest.mark.skipif(
    orthanc_binary() is None, reason="Orthanc is not installed (Debian: apt-get install orthanc)"
)
needs_storescu = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK's storescu is missing (apt-get install dcmtk)"
)


# converted (ONNX) models go to a test folder, not the user's cache (see conftest.model_cache)
pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``pacs.json`` in the test's folder; the default store too, never the user's."""
    path = tmp_path / "config" / "pacs.json"
    monkeypatch.setenv(pacs.CONFIG_ENV, str(path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return path


@pytest.fixture
def make_window(qtbot, tmp_path: Path) -> Iterator[Callable[..., QtMainWindow]]:
    """Windows with the PACS tools; at the end closed, every tool thread and listener stopped."""

    made: list[QtMainWindow] = []

    def install(w: QtMainWindow, autostart: bool = False) -> None:
        w.pacs_tools = install_pacs(w, autostart=autostart)  # type: ignore[attr-defined]
        made.append(w)

    windows = window_factory(
        qtbot,
        tmp_path,
        install=install,
        install_args=("autostart",),
        extra_threads=lambda w: _tools(w).threads(),
        load_model=False,
    )
    yield from windows
    assert all(_tools(w).listener is None for w in made), "a listener outlived its window"
    assert not running_threads(), "a PACS worker thread outlived its window"


def listener_port() -> int:
    """A free port below Linux's ephemeral range (32768 up), for a listener started later in
    the test: a port from ``free_port()`` may meanwhile become the local end of an outgoing
    connection (to Orthanc, say), and the listener then cannot bind it."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    return free_port()


def _tools(w: QtMainWindow) -> QtPacsTools:
    return w.pacs_tools  # type: ignore[attr-defined,no-any-return]


def _phantom(folder: Path, seed: int = 0, patient_id: str = PATIENT_ID) -> PhantomSeries:
    spec = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=N, seed=seed)
    return write_series(folder, spec, patient_id=patient_id, patient_name=PATIENT_NAME)


# ----------------------------------------------------------------------------- settings


def test_pacs_menu_and_export_entries(make_window, config_path):
    w = make_window()
    titles = [a.text() for a in w.menuBar().actions()]
    assert titles.index("&PACS") == titles.index("&Help") - 1
    pacs_menu = _tools(w).menu
    assert [a.text() for a in pacs_menu.actions() if a.text()] == [
        "&Settings…",
        "&Find and retrieve…",
        "Se&nd results to PACS…",
        "&Listener and worklist…",
        "&Receive studies (listener)",
    ]
    files = [a.text() for a in w.file_menu.actions()]
    assert files.index("Export DICOM S&R and key images…") < files.index("Export results as &CSV…")
    assert not _tools(w).action_export.isEnabled()  # nothing scored yet
    assert not _tools(w).action_send.isEnabled()


def test_settings_dialog_round_trip(qtbot, make_window, config_path, tmp_path):
    w = make_window()
    d = _tools(w).show_settings()
    assert d.node_list.count() == 0 and d.empty_label.isVisibleTo(d)
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "ws.pem", "ws.key"))
    for f in (ca, cert, key):
        f.write_text("placeholder")

    d.add_node()
    d.name_edit.setText("Main PACS")
    d.ae_edit.setText("")
    d.ae_edit.textEdited.emit("")
    assert "ae_title must be a non-empty AE title" in d.node_problems.text()
    assert not d.save() and "Not saved" in d.save_problems.text()
    assert not config_path.exists()

    d.ae_edit.setText("PACS1")
    d.host_edit.setText("pacs.hospital.example")
    d.port_box.setValue(11112)
    d.calling_edit.setText("ICHWS01")
    d.method_box.setCurrentIndex(d.method_box.findData("move"))
    d.timeout_box.setValue(20)
    d.tls_box.setChecked(True)
    d.ca_field.edit.setText(str(ca))
    d.cert_field.edit.setText(str(cert))
    d.key_field.edit.setText(str(key))
    d.name_edit.textEdited.emit("Main PACS")
    assert d.node_problems.text() == ""
    assert d.node_list.item(0).text() == "Main PACS"
    d.listen_enabled.setChecked(True)
    d.listen_ae.setText("ICHWS01")
    d.listen_port.setValue(11113)
    d.listen_bind.setText("0.0.0.0")
    d.listen_store.edit.setText(str(tmp_path / "store"))
    d.listen_timeout.setValue(5)
    with qtbot.waitSignal(d.saved):
        assert d.save()

    expected = PacsConfig(
        (
            PacsNode(
                "Main PACS",
                "PACS1",
                "pacs.hospital.example",
                11112,
                "ICHWS01",
                tls=True,
                tls_ca_file=ca,
                tls_cert_file=cert,
                tls_key_file=key,
                timeout_s=20.0,
                retrieve_method="move",
            ),
        ),
        ListenerSettings(True, "ICHWS01", 11113, "0.0.0.0", tmp_path / "store", 5.0),
    )
    assert pacs.load_config(config_path) == expected
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600

    # reopened: the saved node is there; add another, remove the first, save
    d = _tools(w).show_settings()
    assert d.node_list.count() == 1 and d.ae_edit.text() == "PACS1" and d.tls_box.isChecked()
    d.add_node()
    d.name_edit.setText("Backup")
    d.ae_edit.setText("BACKUP")
    d.host_edit.setText("10.0.0.2")
    d.name_edit.textEdited.emit("Backup")
    d.node_list.setCurrentRow(0)
    d.remove_current()
    assert d.node_list.count() == 1
    assert d.save()
    saved = pacs.load_config(config_path)
    assert [n.name for n in saved.nodes] == ["Backup"] and saved.listener == expected.listener


def test_echo_names_the_node_and_the_problem(qtbot, make_window, config_path):
    w = make_window()
    d = _tools(w).show_settings()
    d.add_node()
    d.name_edit.setText("Nobody home")
    d.ae_edit.setText("NOBODY")
    d.host_edit.setText(LOOPBACK)
    d.port_box.setValue(free_port())
    d.name_edit.textEdited.emit("Nobody home")
    with qtbot.waitSignal(d.echoFinished, timeout=WAIT_MS) as echo:
        d.test_echo()
    ok, message = echo.args
    assert not ok and "PACS 'Nobody home'" in message and "could not connect" in message
    assert "could not connect" in d.echo_label.text()


# ----------------------------------------------------------------------------- Orthanc


@dataclass
class Pacs:
    server: OrthancServer
    node: PacsNode
    study: PhantomSeries
    listener_port: int
    root: Path


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """Orthanc holding one phantom study; our AE title registered (with a free port for our
    listener, the C-MOVE destination)."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc)")
    root = tmp_path_factory.mktemp("orthanc")
    study = _phantom(root / "source")
    port = listener_port()
    with running_orthanc(root / "pacs", {"ich": Modality(OUR_AE, port)}) as server:
        node = PacsNode("Orthanc", server.ae_title, LOOPBACK, server.port, OUR_AE, timeout_s=10)
        assert pacs.send(node, study.files).sent == N
        yield Pacs(server, node, study, port, root)


def _write_config(path: Pacs, config_path: Path, store: Path, method: str = "get") -> None:
    node = PacsNode(
        "Orthanc",
        path.server.ae_title,
        LOOPBACK,
        path.server.port,
        OUR_AE,
        timeout_s=30,
        retrieve_method=method,
    )
    listener = ListenerSettings(False, OUR_AE, path.listener_port, LOOPBACK, store, 2.0)
    pacs.save_config(PacsConfig((node,), listener), config_path)


@needs_orthanc
@pytest.mark.slow
def test_find_retrieve_open_export_and_send_results(
    qtbot, make_window, config_path, orthanc, tiny_weights, tmp_path
):
    _write_config(orthanc, config_path, tmp_path / "store")
    w = make_window(weights=tiny_weights, load_model=True)
    tools = _tools(w)
    d = tools.show_find()
    assert d.node_box.count() == 1

    # queries: patient ID, wildcard name with a date range, accession; nothing for MR
    d.patient_id_edit.setText(PATIENT_ID)
    with qtbot.waitSignal(d.searched, timeout=WAIT_MS) as found:
        d.search()
    (match,) = found.args[0]
    assert match.study_uid == orthanc.study.study_uid and d.table.rowCount() == 1
    assert d.table.item(0, 1).text() == "Viewer Phantom" and d.table.item(0, 7).text() == str(N)
    day = dcmread(orthanc.study.files[0], stop_before_pixels=True).StudyDate
    d.patient_id_edit.setText("")
    d.patient_name_edit.setText("Viewer^*")
    d.date_box.setCurrentIndex(d.date_box.findText("Between…"))
    d.date_from.setDate(d.date_from.date().fromString(day, "yyyyMMdd"))
    d.date_to.setDate(d.date_to.date().fromString(day, "yyyyMMdd"))
    with qtbot.waitSignal(d.searched, timeout=WAIT_MS) as found:
        d.search()
    assert [m.study_uid for m in found.args[0]] == [match.study_uid]
    d.patient_name_edit.setText("")
    d.date_box.setCurrentIndex(0)
    d.accession_edit.setText(match.accession)
    d.modality_box.setCurrentText("MR")
    with qtbot.waitSignal(d.searched, timeout=WAIT_MS) as found:
        d.search()
    assert found.args[0] == [] and "0 studies found" in d.status_label.text()
    d.modality_box.setCurrentText("CT")
    with qtbot.waitSignal(d.searched, timeout=WAIT_MS) as found:
        d.search()
    assert len(found.args[0]) == 1

    # retrieve (C-GET) into the local store; it opens and the window's model scores it
    with (
        qtbot.waitSignal(w.scoringFinished, timeout=WAIT_MS) as scored,
        qtbot.waitSignal(d.retrieved, timeout=WAIT_MS) as got,
    ):
        d.table.cellDoubleClicked.emit(0, 0)
    assert scored.args == [True]
    retrieved = got.args[0]
    assert retrieved.n_instances == N and retrieved.folder == tmp_path / "store" / match.study_uid
    assert w.series is not None and w.series.study_uid == match.study_uid
    assert "Retrieved 6 image(s)" in d.status_label.text()

    # the untrained model's top slice is flagged at this threshold: one key image, with the
    # heat map once it has been computed
    assert w.scores is not None
    top = int(np.nanargmax(w.scores.probabilities[:, LABELS.index("any")]))
    w.set_threshold(float(w.scores.probabilities[top, LABELS.index("any")]) - 1e-4)
    w.set_slice(top)
    qtbot.waitUntil(tools.action_export.isEnabled)
    with qtbot.waitSignal(w.model_worker.gradcamComputed, timeout=WAIT_MS):
        w.set_heatmap_enabled(True)
    qtbot.waitUntil(lambda: bool(tools.snapshot().heatmaps), timeout=WAIT_MS)
    assert top in tools.snapshot().heatmaps
    with qtbot.waitSignal(tools.dicomExported, timeout=WAIT_MS) as exported:
        tools.export_dicom(tmp_path / "export")
    files = exported.args[0]
    assert files[0].name.startswith("SR_") and len(files) >= 2
    assert dcmread(files[0]).Modality == "SR"
    assert all(f.parent == tmp_path / "export" for f in files)

    # send them to Orthanc, which then holds the CT, our report and our key images
    s = tools.show_send()
    assert s.send_button.isEnabled() and "key image" in s.what_label.text()
    with qtbot.waitSignal(s.sent, timeout=WAIT_MS) as sent:
        s.send()
    assert sent.args[0].sent == len(files)
    listed = pacs.find_series(orthanc.node, match.study_uid)
    assert {x.modality for x in listed} >= {"CT", "SR"} and len(listed) == 3
    assert "stored" in s.status_label.text()


@needs_orthanc
def test_c_move_starts_the_listener_and_errors_name_the_node(
    qtbot, make_window, config_path, orthanc, tmp_path
):
    _write_config(orthanc, config_path, tmp_path / "store", method="move")
    w = make_window()
    tools = _tools(w)
    d = tools.show_find()
    d.patient_id_edit.setText(PATIENT_ID)
    with qtbot.waitSignal(d.searched, timeout=WAIT_MS):
        d.search()
    with (
        qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS),
        qtbot.waitSignal(d.retrieved, timeout=WAIT_MS) as got,
    ):
        d.retrieve_selected()
    assert got.args[0].method == "move" and tools.listener is not None
    assert w.series is not None and w.series.study_uid == orthanc.study.study_uid
    with qtbot.waitSignal(tools.listenerChanged, timeout=WAIT_MS):
        tools.stop_listener()
    qtbot.waitUntil(lambda: not tools.listener_busy(), timeout=WAIT_MS)

    # a PACS that does not know our AE title as the called one: the message says so
    wrong = PacsNode("Wrong AE", "NOTORTHANC", LOOPBACK, orthanc.server.port, OUR_AE)
    pacs.save_config(PacsConfig((wrong,)), config_path)
    d = tools.show_find()
    with qtbot.waitSignal(d.failed, timeout=WAIT_MS) as failed:
        d.search()
    assert failed.args[0].startswith("PACS 'Wrong AE': refused the association")
    assert failed.args[0] in d.status_label.text()


@needs_storescu
@pytest.mark.slow
def test_listener_and_worklist_show_a_pushed_study(
    qtbot, make_window, config_path, tiny_weights, tmp_path
):
    study = _phantom(tmp_path / "source", seed=5, patient_id="PUSH-2")
    port = listener_port()
    listener = ListenerSettings(False, "ICHLISTEN", port, LOOPBACK, tmp_path / "store", 2.0)
    pacs.save_config(PacsConfig((), listener), config_path)
    w = make_window(weights=tiny_weights)
    tools = _tools(w)
    d = tools.show_worklist()
    assert d.start_button.isEnabled() and not d.stop_button.isEnabled()
    with qtbot.waitSignal(tools.listenerChanged, timeout=WAIT_MS, check_params_cb=lambda r, _t: r):
        d.start_button.click()
    assert f"Receiving as ICHLISTEN on {LOOPBACK}:{port}" in d.listener_label.text()
    assert d.stop_button.isEnabled()

    run = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "ICHLISTEN", LOOPBACK, str(port)]
        + [str(f) for f in study.files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    qtbot.waitUntil(lambda: bool(d.studies) and d.studies[0].status == "scored", timeout=WAIT_MS)
    (entry,) = d.studies
    assert entry.study_uid == study.study_uid and d.table.rowCount() == 1
    assert d.table.item(0, 1).text().endswith("%") and "1 study" in d.count_label.text()
    with qtbot.waitSignal(w.seriesShown, timeout=WAIT_MS):
        d.table.cellDoubleClicked.emit(0, 0)
    assert w.series is not None and w.series.series_uid == study.series_uid

    with qtbot.waitSignal(tools.listenerChanged, timeout=WAIT_MS):
        d.stop_button.click()
    qtbot.waitUntil(lambda: not tools.listener_busy(), timeout=WAIT_MS)
    assert "Listener stopped" in d.listener_label.text() and d.start_button.isEnabled()
    assert (tmp_path / "store" / ".worklist" / "worklist.json").is_file()


def test_listener_starts_with_the_viewer_when_the_settings_say_so(
    qtbot, make_window, config_path, tmp_path
):
    listener = ListenerSettings(True, "ICHAUTO", listener_port(), LOOPBACK, tmp_path / "store", 2.0)
    pacs.save_config(PacsConfig((), listener), config_path)
    w = make_window(autostart=True)  # as ich-viewer does
    tools = _tools(w)
    with qtbot.waitSignal(
        tools.listenerChanged, timeout=WAIT_MS, check_params_cb=lambda running, _t: running
    ):
        pass
    assert tools.listener is not None and tools.listener.port == listener.port
    assert tools.action_listen.isChecked()
    assert pacs.echo(PacsNode("us", "ICHAUTO", LOOPBACK, listener.port, timeout_s=5)) < 5
    # nothing scored on screen: the export says why instead of failing
    tools.export_dialog()
    assert "Cannot export DICOM results: no series is open" in w.errors[-1]
