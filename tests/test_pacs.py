"""PACS exchange: configuration, C-ECHO/FIND/GET/MOVE/STORE, the listener and the worklist.

Three kinds of peer: a real Orthanc (``tests/orthanc.py``; skipped when not installed), a
pynetdicom Q/R SCP that misbehaves on purpose (aborts, sends part of a study), and plain
sockets (nothing listening; accepts and never answers). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

from ich_model import pacs, pacs_store
from ich_model.labels import LABELS
from ich_model.pacs import (
    FIND_MODEL,
    GET_MODEL,
    ListenerSettings,
    PacsCancelled,
    PacsConfig,
    PacsConfigError,
    PacsError,
    PacsNode,
)
from ich_model.pacs_listener import Listener, ListenerError
from ich_model.pacs_worklist import Worklist, WorklistStudy, ordered
from ich_model.phantom import PhantomSeries, PhantomSpec, write_series
from ich_model.predictor import ModelIdentity, ScoreResult
from ich_model.series import CTSeries
from tests.orthanc import Modality, OrthancServer, free_port, orthanc_binary, running_orthanc

LOOPBACK = "127.0.0.1"
OUR_AE = "ICHSO"
PATIENT_ID = "PACS-1"
PATIENT_NAME = "Pacs^Phantom"
N = 6


# ----------------------------------------------------------------------------- helpers


def _phantom(
    folder: Path, seed: int = 0, patient_id: str = PATIENT_ID, n: int = N
) -> PhantomSeries:
    spec = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=n, seed=seed)
    return write_series(folder, spec, patient_id=patient_id, patient_name=PATIENT_NAME)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _store_is_clean(store: Path) -> bool:
    """No study folder, no partial and no temporary file: the store is as before."""
    return not store.exists() or not any(store.iterdir())


def _sop_uids(folder: Path) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in _files_under(folder)}


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@dataclass
class StubPredictor:
    """A Predictor without a model: every slice gets the probability set for its series."""

    p_any: dict[str, float] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    identity: ModelIdentity = field(
        default_factory=lambda: ModelIdentity(
            name="stub",
            sha256="0" * 64,
            trained=False,
            input_size=64,
            threshold=0.5,
            runtime="stub",
            summary="",
            weights_file="stub.weights.h5",
        )
    )

    def score_series(
        self, series: CTSeries, progress: Any = None, cancelled: Any = None
    ) -> ScoreResult:
        self.calls.append(series.series_uid)
        p = np.full((series.n_slices, len(LABELS)), 0.01, dtype=np.float32)
        p[:, LABELS.index("any")] = self.p_any.get(series.series_uid, 0.1)
        return ScoreResult(
            p, series.sop_uids, series.series_uid, series.study_uid, series.key, self.identity
        )


# ----------------------------------------------------------------------------- fake PACS


class FakePacs:
    """A pynetdicom Q/R SCP serving one study, with faults on demand.

    ``mode``: "ok"; "abort" (A-ABORT after ``after`` C-STORE sub-operations of a C-GET);
    "hang" (stops answering after ``after`` sub-operations);
    "partial" (announces and sends only ``after`` instances, reports success, while its
    C-FIND says the study holds them all).
    """

    def __init__(self, files: list[Path], ae_title: str = "FAKEPACS") -> None:
        self.datasets = [dcmread(f) for f in files]
        self.ae_title = ae_title
        self.mode = "ok"
        self.after = 2
        self.gets = 0
        self.timeout = 5.0
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(FIND_MODEL)
        ae.add_supported_context(GET_MODEL)
        for uid in pacs_store.RETRIEVE_SOP_CLASSES:
            ae.add_supported_context(uid, scu_role=False, scp_role=True)
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)]
        self.server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=handlers)
        self.ae = ae

    @property
    def node(self) -> PacsNode:
        return PacsNode("fake", self.ae_title, LOOPBACK, self.port, OUR_AE, timeout_s=self.timeout)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        first = self.datasets[0]
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = first.StudyInstanceUID
        ds.StudyDate = first.StudyDate
        ds.ModalitiesInStudy = "CT"
        ds.NumberOfStudyRelatedInstances = len(self.datasets)
        yield 0xFF00, ds

    def _get(self, event: Any) -> Iterator[Any]:
        self.gets += 1
        send = self.datasets
        if self.mode == "partial":
            send = self.datasets[: self.after]
        yield len(send)
        for k, ds in enumerate(send):
            if self.mode == "abort" and k == self.after:
                event.assoc.abort()
                return
            if self.mode == "hang" and k == self.after:
                time.sleep(3 * self.node.timeout_s)
                return
            yield 0xFF00, ds


@pytest.fixture
def study(tmp_path: Path) -> PhantomSeries:
    return _phantom(tmp_path / "source")


@pytest.fixture
def fake(study: PhantomSeries) -> Iterator[FakePacs]:
    server = FakePacs(list(study.files))
    yield server
    server.close()


# ----------------------------------------------------------------------------- config


def test_config_round_trip_in_the_xdg_config_dir(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    path = pacs.default_config_path(env)
    assert path == tmp_path / "cfg" / "ich-second-opinion" / "pacs.json"
    assert pacs.default_config_path({**env, pacs.CONFIG_ENV: str(tmp_path / "x.json")}) == (
        tmp_path / "x.json"
    )
    assert pacs.load_config(path) == PacsConfig()  # no file yet: nothing configured
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked when saving")
    node = PacsNode(
        "Main PACS", "PACS1", "pacs.example.org", 104, "ICHWS", tls=True, tls_ca_file=ca
    )
    config = PacsConfig(
        (node, PacsNode("Test", "ORTHANC", LOOPBACK, 4242, retrieve_method="move")),
        ListenerSettings(enabled=True, ae_title="ICHWS", port=11113, store_dir=tmp_path / "s"),
    )
    assert pacs.save_config(config, path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pacs.load_config(path) == config
    assert pacs.load_config(path).node("Test").retrieve_method == "move"
    with pytest.raises(KeyError, match="Did you mean 'Test'"):
        config.node("Tset")
    replaced = pacs.with_node(config, PacsNode("Test", "OTHER", LOOPBACK, 4243))
    assert [n.ae_title for n in replaced.nodes] == ["PACS1", "OTHER"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 0}, "port must be an integer in 1..65535. Received: port=0"),
        ({"port": "104"}, "port must be an integer"),
        ({"ae_title": "A" * 17}, "ae_title must be at most 16 characters"),
        ({"calling_ae_title": ""}, "calling_ae_title must be a non-empty AE title"),
        ({"host": "pacs host"}, "host must be a host name or IP address"),
        ({"timeout_s": 0}, "timeout_s must be a number of seconds"),
        ({"retrieve_method": "ftp"}, "retrieve_method must be one of ('get', 'move')"),
        ({"tls_cert_file": "/x.pem", "tls": True}, "tls_cert_file and tls_key_file"),
        ({"tls_ca_file": "/x.pem"}, "tls_ca_file is set but tls is false"),
        ({"tls": True, "tls_ca_file": "/missing/ca.pem"}, "tls_ca_file does not exist"),
        ({"aet": "X"}, "unknown field 'aet'"),
    ],
)
def test_config_errors_name_the_file_node_and_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    node = {"name": "Main", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, **change}
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node]}))
    with pytest.raises(PacsConfigError) as info:
        pacs.load_config(path, check_files=True)
    text = str(info.value)
    assert message in text
    assert str(path) in text and ("'Main'" in text or "nodes[0]" in text)


def test_config_that_is_not_json_says_where(tmp_path: Path) -> None:
    path = tmp_path / "pacs.json"
    path.write_text('{"nodes": [\n  {"name": "x",}\n]}')
    with pytest.raises(PacsConfigError, match=r"not valid JSON \(line 2"):
        pacs.load_config(path)
    path.write_text(json.dumps({"nodes": [{"name": "x"}]}))
    with pytest.raises(PacsConfigError, match="missing field"):
        pacs.load_config(path)
    path.write_text(json.dumps({"listener": {"port": 70000}}))
    with pytest.raises(PacsConfigError, match="listener: port must be"):
        pacs.load_config(path)


def test_queries_refuse_bad_keys_without_echoing_patient_data() -> None:
    node = PacsNode("n", "PACS", LOOPBACK, 1)
    with pytest.raises(ValueError, match="patient_id must be") as info:
        pacs.find_studies(node, patient_id="SECRET\\OTHER")
    assert "SECRET" not in str(info.value)
    with pytest.raises(ValueError, match="date_from must be a date"):
        pacs.find_studies(node, date_from="5 May")
    with pytest.raises(ValueError, match="study_uid must be a DICOM UID"):
        pacs.find_series(node, "../../etc")


def test_study_match_repr_leaves_patient_data_out() -> None:
    m = pacs.StudyMatch("1.2.3", patient_name=PATIENT_NAME, patient_id=PATIENT_ID, accession="A1")
    assert PATIENT_NAME not in repr(m) and PATIENT_ID not in repr(m) and "A1" not in repr(m)


def test_unsafe_uids_never_become_paths() -> None:
    assert pacs_store.safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    for bad in ("../../etc/passwd", "/abs", "a/b", "..", ".hidden", "x" * 200, "1.2\x00"):
        name = pacs_store.safe_name(bad)
        assert "/" not in name and not name.startswith(".") and len(name) <= 128
    assert pacs_store.safe_name("a/b") != pacs_store.safe_name("a_b")


# ----------------------------------------------------------------------------- faults


def test_nothing_listening_is_a_clear_error(tmp_path: Path) -> None:
    node = PacsNode("Ward PACS", "PACS", LOOPBACK, free_port(), timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(PacsError) as info:
        pacs.retrieve_study(node, "1.2.3", tmp_path / "store")
    assert time.monotonic() - t0 < 5
    assert info.value.node == "Ward PACS"
    assert "PACS 'Ward PACS': could not connect to 127.0.0.1:" in str(info.value)
    assert "nothing is listening" in str(info.value)
    assert _store_is_clean(tmp_path / "store")


def test_a_peer_that_never_answers_times_out(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    node = PacsNode("Silent", "PACS", LOOPBACK, server.getsockname()[1], timeout_s=1)
    t0 = time.monotonic()
    try:
        with pytest.raises(PacsError, match="got no answer to the association request within 1 s"):
            pacs.echo(node)
    finally:
        for s in accepted:
            s.close()
        server.close()
    assert time.monotonic() - t0 < 5


def test_abort_mid_transfer_keeps_nothing_and_a_retry_completes(
    fake: FakePacs, study: PhantomSeries, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    fake.mode, fake.after = "abort", 3
    seen: list[tuple[int, int]] = []
    with pytest.raises(PacsError) as info:
        pacs.retrieve_study(fake.node, study.study_uid, store, lambda d, t: seen.append((d, t)))
    text = str(info.value)
    assert text.startswith("PACS 'fake': ")
    assert "aborted the association during C-GET after 3 of 6 instance(s)" in text
    assert "nothing was kept" in text
    assert seen[-1] == (3, 6)
    assert _store_is_clean(store)
    fake.mode = "ok"
    got = pacs.retrieve_study(fake.node, study.study_uid, store)
    assert got.n_instances == N and fake.gets == 2
    assert _sop_uids(got.folder) == set(study.sop_uids)
    assert [p.name for p in store.iterdir()] == [study.study_uid]


def test_a_pacs_that_stops_answering_mid_transfer_times_out(
    fake: FakePacs, study: PhantomSeries, tmp_path: Path
) -> None:
    fake.mode, fake.after, fake.timeout = "hang", 2, 1.0
    t0 = time.monotonic()
    with pytest.raises(PacsError, match=r"stopped answering during C-GET .* after 2 of 6"):
        pacs.retrieve_study(fake.node, study.study_uid, tmp_path / "store")
    assert time.monotonic() - t0 < 3
    assert _store_is_clean(tmp_path / "store")


def test_a_partial_study_is_refused_and_a_retry_completes(
    fake: FakePacs, study: PhantomSeries, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    fake.mode, fake.after = "partial", 4
    with pytest.raises(PacsError, match=r"sent only part of study .*: 4 of 6 instance\(s\)"):
        pacs.retrieve_study(fake.node, study.study_uid, store)
    assert _store_is_clean(store)
    fake.mode = "ok"
    assert pacs.retrieve_study(fake.node, study.study_uid, store).n_instances == N


def test_a_process_killed_mid_transfer_leaves_only_a_partial_that_is_swept(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    dead = store / f"{pacs_store.PARTIAL_PREFIX}999999999-abc"  # no such process
    (dead / "1.2" / "3.4").mkdir(parents=True)
    (dead / "1.2" / "3.4" / "5.6.dcm").write_bytes(b"half")
    alive = store / f"{pacs_store.PARTIAL_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    assert pacs_store.sweep_partials(store) == 1
    assert not dead.exists() and alive.exists()


# ----------------------------------------------------------------------------- listener


def test_listener_completes_a_series_on_release_and_files_it_by_uid(
    study: PhantomSeries, tmp_path: Path
) -> None:
    done: list[Path] = []
    store = tmp_path / "store"
    with Listener(
        "ICHLISTEN", 0, store, done.append, series_timeout_s=30, release_grace_s=0.2
    ) as li:
        node = PacsNode("us", "ICHLISTEN", LOOPBACK, li.port, "MODALITY", timeout_s=5)
        assert pacs.echo(node) < 5
        assert pacs.send(node, study.files).sent == N
        assert _wait(lambda: len(done) == 1, 5), "no series completed 0.2 s after release"
    folder = done[0]
    assert folder == store / study.study_uid / study.series_uid
    assert sorted(f.name for f in folder.iterdir()) == sorted(f"{u}.dcm" for u in study.sop_uids)
    assert not any((store / pacs_store.INCOMING).rglob("*.dcm"))
    assert not list(store.rglob("*.tmp"))


def test_listener_completes_a_series_after_the_quiet_time(
    study: PhantomSeries, tmp_path: Path
) -> None:
    done: list[Path] = []
    with Listener("ICHLISTEN", 0, tmp_path / "s", done.append, series_timeout_s=0.5) as li:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(str(dcmread(study.files[0]).SOPClassUID))
        assoc = ae.associate(LOOPBACK, li.port, ae_title="ICHLISTEN")
        assert assoc.is_established
        for f in study.files[:3]:
            assert assoc.send_c_store(f).Status == 0
        assert not done  # still open, not yet quiet
        assert _wait(lambda: len(done) == 1, 5)  # quiet for 0.5 s: complete
        assert len(list(done[0].iterdir())) == 3
        for f in study.files[3:]:  # the rest arrives later: the series completes again
            assert assoc.send_c_store(f).Status == 0
        assoc.release()
        assert _wait(lambda: len(done) == 2, 5)
    assert done[1] == done[0] and len(list(done[0].iterdir())) == N


def test_listener_refuses_wrong_called_ae_and_reports_a_busy_port(tmp_path: Path) -> None:
    with Listener("ICHLISTEN", 0, tmp_path / "s") as li:
        with pytest.raises(PacsError, match="Called AE title not recognised"):
            pacs.echo(PacsNode("us", "SOMEONE", LOOPBACK, li.port, timeout_s=5))
        other = Listener("OTHER", li.port, tmp_path / "t")
        with pytest.raises(ListenerError, match=r"cannot listen on 127.0.0.1:\d+"):
            other.start()


def test_listener_files_hostile_uids_inside_the_store(study: PhantomSeries, tmp_path: Path) -> None:
    evil = tmp_path / "evil.dcm"
    ds = dcmread(study.files[0])
    ds.SeriesInstanceUID = "../../../outside"
    ds.save_as(evil)
    done: list[Path] = []
    store = tmp_path / "store"
    with Listener("ICHLISTEN", 0, store, done.append, release_grace_s=0.1) as li:
        pacs.send(PacsNode("us", "ICHLISTEN", LOOPBACK, li.port, timeout_s=5), [evil])
        assert _wait(lambda: len(done) == 1, 5)
    assert done[0].parent.parent == store and done[0].name.startswith("x")
    assert not (tmp_path / "outside").exists()


def test_listener_completes_series_left_incoming_by_an_earlier_run(
    study: PhantomSeries, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    incoming = store / pacs_store.INCOMING / study.study_uid / study.series_uid
    incoming.mkdir(parents=True)
    for f in study.files:
        shutil.copy(f, incoming / f.name)
    done: list[Path] = []
    with Listener("ICHLISTEN", 0, store, done.append, release_grace_s=0.1):
        assert _wait(lambda: len(done) == 1, 5)
    assert len(list(done[0].glob("*.dcm"))) == N and not incoming.exists()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC: fast)."""
    folder.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=ich-test-ca", cwd=folder)  # fmt: skip
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "1",
                 "-extfile", "san.cnf", cwd=folder)  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certs")
def test_tls_with_client_certificates(study: PhantomSeries, tmp_path: Path) -> None:
    import ssl

    f = _tls_files(tmp_path / "tls")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(f["ca_pem"]))
    server_ctx.load_cert_chain(str(f["server_pem"]), str(f["server_key"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    done: list[Path] = []
    with Listener(
        "ICHTLS", 0, tmp_path / "store", done.append, release_grace_s=0.1, ssl_context=server_ctx
    ) as li:
        node = PacsNode(
            "TLS PACS",
            "ICHTLS",
            LOOPBACK,
            li.port,
            tls=True,
            tls_ca_file=f["ca_pem"],
            tls_cert_file=f["client_pem"],
            tls_key_file=f["client_key"],
            timeout_s=5,
        ).validate()
        assert pacs.echo(node) < 5
        assert pacs.send(node, study.files[:2]).sent == 2
        assert _wait(lambda: len(done) == 1, 5)
        with pytest.raises(PacsError, match=r"TLS handshake .* CERTIFICATE_VERIFY_FAILED"):
            pacs.echo(PacsNode("TLS PACS", "ICHTLS", LOOPBACK, li.port, tls=True, timeout_s=5))
        with pytest.raises(PacsError, match="wants a client certificate, set tls_cert_file"):
            pacs.echo(PacsNode("TLS PACS", "ICHTLS", LOOPBACK, li.port, tls=True,
                               tls_ca_file=f["ca_pem"], timeout_s=5))  # fmt: skip
        with pytest.raises(PacsError, match="cannot use tls_cert_file"):
            bad = dict(tls_cert_file=f["ca_key"], tls_key_file=f["client_key"])
            pacs.echo(PacsNode("TLS PACS", "ICHTLS", LOOPBACK, li.port, tls=True, **bad))
        plain = PacsNode("Plain", "ICHTLS", LOOPBACK, li.port, timeout_s=2)
        with pytest.raises(PacsError, match=r"PACS 'Plain': .* if it expects TLS, set tls"):
            pacs.echo(plain)


# ----------------------------------------------------------------------------- worklist


def _three_studies(root: Path) -> tuple[list[Path], dict[str, float]]:
    """Three series folders laid out as the store does, and the p(any) to give each."""
    folders, p = [], {}
    for k, value in enumerate((0.9, 0.2, 0.7)):
        s = _phantom(root / "tmp" / str(k), seed=k, patient_id=f"WL-{k}", n=3)
        dst = root / "store" / s.study_uid / s.series_uid
        shutil.copytree(s.folder, dst)
        folders.append(dst)
        p[s.series_uid] = value
    return folders, p


def test_worklist_scores_flags_orders_and_survives_a_restart(tmp_path: Path) -> None:
    folders, p_any = _three_studies(tmp_path)
    stub = StubPredictor(p_any)
    changes: list[int] = []
    state = tmp_path / "results" / "worklist.json"
    with Worklist(stub, tmp_path / "results", on_change=lambda: changes.append(1)) as wl:
        for f in folders:
            wl.submit(f)
        assert wl.wait_idle(30)
        studies = wl.studies()
    assert [s.max_any for s in studies] == pytest.approx([0.9, 0.7, 0.2])
    assert [s.flagged for s in studies] == [True, True, False]
    assert all(
        s.status == "scored" and s.folder == f.parent
        for s, f in zip(studies, [folders[0], folders[2], folders[1]], strict=True)
    )
    series = studies[0].series[0]
    assert series.folder == folders[0] and series.n_slices == 3
    assert series.results_dir is not None and (series.results_dir / "series.csv").is_file()
    assert changes and len(stub.calls) == 3
    assert "WL-" not in state.read_text() and PATIENT_NAME not in state.read_text()

    # restart: the list is back without rescoring; an interrupted series is scored again
    raw = json.loads(state.read_text())
    raw["studies"][1]["series"][0]["status"] = "scoring"
    state.write_text(json.dumps(raw))
    again = StubPredictor(p_any)
    with Worklist(again, tmp_path / "results") as wl:
        assert wl.wait_idle(30)
        restored = wl.studies()
    assert [s.max_any for s in restored] == pytest.approx([0.9, 0.7, 0.2])
    assert len(again.calls) == 1


def test_worklist_skips_non_ct_and_loads_the_model_lazily(
    study: PhantomSeries, tmp_path: Path
) -> None:
    mr_series = tmp_path / "store" / "1.2.3" / "4.5.6"
    mr_series.mkdir(parents=True)
    ds = dcmread(study.files[0])
    ds.Modality = "MR"  # not a CT: listed, never scored
    ds.save_as(mr_series / "mr.dcm")
    loads: list[int] = []

    def factory() -> Any:
        loads.append(1)
        return StubPredictor()

    with Worklist(factory, tmp_path / "results") as wl:
        assert not loads  # nothing to score yet: no model loaded
        wl.submit(mr_series)
        assert wl.wait_idle(10)
        (entry,) = wl.studies()
    assert entry.status == "skipped" and entry.max_any is None and not loads


def test_ordering_puts_flagged_first_then_newest() -> None:
    def st(name: str, p: float | None, flagged: bool, received: float) -> WorklistStudy:
        from ich_model.pacs_worklist import WorklistSeries

        s = WorklistSeries(Path(name), max_any=p, flagged=flagged, status="scored")
        return WorklistStudy(Path(name), received=received, series=[s])

    got = ordered([st("a", 0.1, False, 1), st("b", 0.8, True, 2), st("c", 0.95, True, 0),
                   st("d", None, False, 5)])  # fmt: skip
    assert [s.folder.name for s in got] == ["c", "b", "d", "a"]


# ----------------------------------------------------------------------------- Orthanc

needs_orthanc = pytest.mark.skipif(
    orthanc_binary() is None, reason="Orthanc is not installed (Debian: apt-get install orthanc)"
)
needs_storescu = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK's storescu is missing (apt-get install dcmtk)"
)


@dataclass
class Pacs:
    server: OrthancServer
    node: PacsNode
    listener: Listener
    pushed: list[Path]
    study: PhantomSeries


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """Orthanc holding one phantom study (stored with our ``send``), and our listener,
    registered at Orthanc as the C-MOVE destination."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc)")
    root = tmp_path_factory.mktemp("orthanc")
    written = _phantom(root / "source")
    pushed: list[Path] = []
    with (
        Listener(OUR_AE, 0, root / "listener", pushed.append, release_grace_s=0.2) as listener,
        running_orthanc(
            root / "pacs",
            {"ich": Modality(OUR_AE, listener.port), "storescu": Modality("STORESCU", 1)},
        ) as server,
    ):
        node = PacsNode("Orthanc", server.ae_title, LOOPBACK, server.port, OUR_AE, timeout_s=10)
        assert pacs.send(node, written.files).sent == N
        yield Pacs(server, node, listener, pushed, written)
    assert server.process.poll() is not None, "Orthanc still running after the fixture"


@needs_orthanc
def test_orthanc_echo_and_find(orthanc: Pacs) -> None:
    node, s = orthanc.node, orthanc.study
    assert pacs.echo(node) < 5
    (match,) = pacs.find_studies(node, patient_id=PATIENT_ID)
    assert match.study_uid == s.study_uid and match.modalities == ("CT",)
    assert match.n_instances == N and match.n_series == 1
    assert match.patient_name == PATIENT_NAME and match.patient_id == PATIENT_ID
    day = match.study_date
    assert pacs.find_studies(node, patient_name="Pacs^*", date_from=day, date_to=day)
    assert pacs.find_studies(node, accession=match.accession)[0].study_uid == s.study_uid
    assert not pacs.find_studies(node, patient_id="NOBODY")
    assert not pacs.find_studies(node, patient_id=PATIENT_ID, modality="MR")
    (series,) = pacs.find_series(node, s.study_uid)
    assert (series.series_uid, series.modality, series.n_instances) == (s.series_uid, "CT", N)
    found = pacs.find_instances(node, s.study_uid, s.series_uid)
    assert [i.sop_uid for i in found] == list(s.sop_uids)


@needs_orthanc
def test_orthanc_c_get_writes_the_whole_study(orthanc: Pacs, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    got = pacs.retrieve_study(
        orthanc.node, orthanc.study.study_uid, tmp_path, lambda d, t: seen.append((d, t))
    )
    assert got.method == "get" and got.n_instances == N
    assert got.series_folders == (tmp_path / orthanc.study.study_uid / orthanc.study.series_uid,)
    assert _sop_uids(got.folder) == set(orthanc.study.sop_uids)
    assert seen[-1] == (N, N) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert [p.name for p in tmp_path.iterdir()] == [orthanc.study.study_uid]  # no partial left
    original = dcmread(orthanc.study.files[0])
    copy = dcmread(got.series_folders[0] / f"{original.SOPInstanceUID}.dcm")
    assert copy.PixelData == original.PixelData


@needs_orthanc
def test_orthanc_c_move_to_our_listener(orthanc: Pacs, tmp_path: Path) -> None:
    got = pacs.retrieve_study(
        orthanc.node, orthanc.study.study_uid, tmp_path, method="move", listener=orthanc.listener
    )
    assert got.method == "move" and _sop_uids(got.folder) == set(orthanc.study.sop_uids)
    time.sleep(0.5)
    assert not orthanc.pushed, "a C-MOVE result must not also appear as a pushed series"
    with pytest.raises(
        PacsError, match="may not know our AE title 'NOBODY' as a C-MOVE destination"
    ):
        pacs.retrieve_study(
            orthanc.node,
            orthanc.study.study_uid,
            tmp_path / "x",
            method="move",
            listener=orthanc.listener,
            move_destination="NOBODY",
        )
    assert _store_is_clean(tmp_path / "x")


@needs_orthanc
def test_orthanc_cancel_keeps_nothing_and_a_retry_completes(orthanc: Pacs, tmp_path: Path) -> None:
    done = [0]

    def progress(d: int, _t: int) -> None:
        done[0] = d

    for method in ("get", "move"):
        store = tmp_path / method
        with pytest.raises(PacsCancelled, match="cancelled"):
            pacs.retrieve_study(
                orthanc.node,
                orthanc.study.study_uid,
                store,
                progress,
                cancelled=lambda: done[0] >= 2,
                method=method,
                listener=orthanc.listener,
            )
        assert _store_is_clean(store), method
        done[0] = 0
        got = pacs.retrieve_study(
            orthanc.node, orthanc.study.study_uid, store, method=method, listener=orthanc.listener
        )
        assert got.n_instances == N
    time.sleep(0.5)
    assert not orthanc.pushed


@needs_orthanc
def test_orthanc_refuses_a_wrong_called_ae_title(orthanc: Pacs) -> None:
    wrong = PacsNode("Orthanc", "NOTORTHANC", LOOPBACK, orthanc.server.port, timeout_s=5)
    with pytest.raises(PacsError) as info:
        pacs.find_studies(wrong)
    assert str(info.value).startswith("PACS 'Orthanc': refused the association")
    assert "Called AE title not recognised" in str(info.value)
    assert "'NOTORTHANC'" in str(info.value)


def _all_refs(ds: Dataset) -> set[str]:
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


@needs_orthanc
@pytest.mark.slow
def test_round_trip_retrieve_score_send_results_and_read_them_back(
    orthanc: Pacs, tiny_weights: Path, tmp_path: Path
) -> None:
    from ich_model.dicom_export import export_dicom
    from ich_model.dicom_io import load_study
    from ich_model.predictor import Predictor

    s = orthanc.study
    got = pacs.retrieve_study(orthanc.node, s.study_uid, tmp_path / "store")
    (series,) = load_study(got.series_folders)
    result = Predictor(tiny_weights).score_series(series)
    assert result.complete and result.n_slices == N
    # the untrained model's top slice is "flagged", so there is a key image to send
    top = float(result.probabilities[:, LABELS.index("any")].max())
    files = export_dicom(series, result, tmp_path / "results", threshold=top)
    assert len(files) >= 2
    assert pacs.send(orthanc.node, files).sent == len(files)

    listed = pacs.find_series(orthanc.node, s.study_uid)
    assert len(listed) == 3  # the CT, our SR and our key images
    (sr_series,) = [x for x in listed if x.modality == "SR"]
    (key_series,) = [x for x in listed if x.series_uid not in (s.series_uid, sr_series.series_uid)]
    assert key_series.n_instances == len(files) - 1
    (sr_instance,) = pacs.find_instances(orthanc.node, s.study_uid, sr_series.series_uid)
    assert sr_instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"

    back = pacs.retrieve_study(orthanc.node, s.study_uid, tmp_path / "again")
    assert back.n_instances == N + len(files)
    sr = dcmread(back.folder / sr_series.series_uid / f"{sr_instance.sop_uid}.dcm")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == s.series_uid
    assert {str(r.ReferencedSOPInstanceUID) for r in evidence.ReferencedSOPSequence} == set(
        s.sop_uids
    )
    assert _all_refs(sr) <= set(s.sop_uids)
    keys = [
        dcmread(f)
        for f in _files_under(back.folder)
        if f.parent.name not in (s.series_uid, sr_series.series_uid)
    ]
    assert keys and all(
        k.SourceImageSequence[0].ReferencedSOPInstanceUID in s.sop_uids for k in keys
    )


def _deschedule_our_threads(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """Act out a busy CPU on our side of each association we request, as in issue 10:
    pynetdicom's reactor thread, woken after a request, runs ``delay`` late, and the thread
    that sent the next request collects its answer ``2 * delay`` late. Without a pause that
    holds, the reactor then takes that answer and the request waits out the DIMSE timeout.
    """

    def is_paused(assoc: Association) -> bool:
        return bool(assoc.__dict__.get("_is_paused", False))

    def set_paused(assoc: Association, value: bool) -> None:
        woken = not value and is_paused(assoc) and threading.current_thread() is assoc
        if woken and assoc.__dict__.get("_mode") == "requestor":
            time.sleep(delay)
        assoc.__dict__["_is_paused"] = value

    monkeypatch.setattr(Association, "_is_paused", property(is_paused, set_paused), raising=False)
    get_msg = DIMSEServiceProvider.get_msg

    def late_get_msg(dimse: DIMSEServiceProvider, block: bool = False) -> Any:
        if block and dimse.assoc.is_requestor:
            time.sleep(2 * delay)
        return get_msg(dimse, block)

    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", late_get_msg)


@needs_orthanc
@pytest.mark.parametrize("cpu", ["idle", "busy"])
def test_orthanc_takes_a_series_sent_again_and_again(
    orthanc: Pacs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cpu: str,
) -> None:
    """Issue 10: C-STOREs in a row stalled for the DIMSE timeout, then failed, now and then."""
    n = 32
    s = _phantom(tmp_path / "source", patient_id=f"SEND-{cpu}", n=n)
    if cpu == "busy":  # makes the stall certain without the fix
        _deschedule_our_threads(monkeypatch, 0.01)
    node = replace(orthanc.node, timeout_s=5)
    for _ in range(3):
        assert pacs.send(node, s.files).sent == n
    found = pacs.find_instances(node, s.study_uid, s.series_uid)
    assert [i.sop_uid for i in found] == list(s.sop_uids)
    assert "unexpected" not in caplog.text


@needs_orthanc
@needs_storescu
@pytest.mark.slow
def test_storescu_push_is_scored_by_the_worklist(tiny_weights: Path, tmp_path: Path) -> None:
    from ich_model.predictor import Predictor

    s = _phantom(tmp_path / "source", seed=3, patient_id="PUSH-1")
    results = tmp_path / "results"
    wl = Worklist(lambda: Predictor(tiny_weights), results)
    try:
        with Listener("ICHLISTEN", 0, tmp_path / "store", wl.submit, release_grace_s=0.2) as li:
            run = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "ICHLISTEN",
                    LOOPBACK,
                    str(li.port),
                    *map(str, s.files),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, run.stderr
            assert _wait(lambda: bool(wl.studies()), 10)
            assert wl.wait_idle(120)
        (entry,) = wl.studies()
        assert entry.status == "scored" and entry.study_uid == s.study_uid
        assert entry.folder == (tmp_path / "store" / s.study_uid).resolve()
        assert entry.max_any is not None and 0.0 <= entry.max_any <= 1.0
        (series,) = entry.series
        assert series.series_uid == s.series_uid and series.n_slices == N
        assert _sop_uids(series.folder) == set(s.sop_uids)
    finally:
        wl.close()
    # restart: the entry is back, already scored
    with Worklist(lambda: pytest.fail("no model needed"), results) as again:
        assert again.wait_idle(5)
        (restored,) = again.studies()
    assert restored.max_any == entry.max_any and restored.status == "scored"


def test_no_patient_identifiers_in_logs(
    fake: FakePacs, study: PhantomSeries, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pynetdicom")  # even pynetdicom's own narration
    try:
        pacs.find_studies(fake.node, patient_id=PATIENT_ID, patient_name="Pacs^*", modality=None)
        pacs.retrieve_study(fake.node, study.study_uid, tmp_path / "store")
        with Listener("ICHLISTEN", 0, tmp_path / "l", release_grace_s=0.1) as li:
            pacs.send(PacsNode("us", "ICHLISTEN", LOOPBACK, li.port, timeout_s=5), study.files)
    finally:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    assert len(caplog.records) > 20
    assert PATIENT_ID not in caplog.text and PATIENT_NAME not in caplog.text
    assert "Pacs^*" not in caplog.text
