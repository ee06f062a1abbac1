"""No patient name, ID or birth date in logs or exports unless the user asks (issue 8, item 5).

A full ``ich-score`` run is made as a subprocess over two phantom studies with distinctive
identifying tags, plus a truncated copy of one file and a file that is not DICOM (so the
warning paths that name files are exercised too). Everything the run prints (INFO logging,
stdout and stderr) and every file it writes under ``--out`` must be free of the name, the ID
and the birth date, in any of the spellings a program might produce.

The DICOM exports under ``--dicom-out`` (Structured Report, key images) are the exception,
and deliberately so: they are new instances of the patient's own study, meant for the PACS,
and must carry the patient's name and ID so that they file under the right patient. Asking
for ``--dicom-out`` is the user asking. The test checks that they do carry them.

The viewer's CSV and JSON exports (``viewer.export``) are checked in the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ich_model.phantom import PhantomSpec, write_series

ROOT = Path(__file__).resolve().parent.parent

NAMES = ("Zyxwv^Qwerty", "Plokij^Mnbvcx")
IDS = ("PID-98765-UNIQUE", "PID-43210-UNIQUE")
BIRTH_DATE = "19011231"


def _forbidden() -> list[str]:
    """Every spelling of the identifying values that must not leak (compared lower-case)."""
    words = []
    for name in NAMES:
        family, given = name.split("^")
        words += [name, family, given, f"{given} {family}", f"{family} {given}"]
    for pid in IDS:
        words += [pid, pid.split("-")[1]]  # the ID, and its distinctive digits alone
    words += [BIRTH_DATE, "1901-12-31", "31.12.1901", "12/31/1901", "31/12/1901"]
    return [w.lower() for w in words]


FORBIDDEN = _forbidden()


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [w for w in FORBIDDEN if w in low]


def file_text(path: Path) -> str:
    return path.read_bytes().decode("latin-1")  # binary-safe: any byte sequence decodes


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two patients' studies with identifying tags, a truncated file and a non-DICOM file."""
    root = tmp_path_factory.mktemp("privacy-in")
    for k, (name, pid) in enumerate(zip(NAMES, IDS, strict=True)):
        spec = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=8, seed=k)
        write_series(root / f"study{k}", spec, patient_id=pid, patient_name=name)
    files = sorted(root.rglob("*.dcm"))
    assert len(files) == 16
    for path in files:  # write_series derives the birth date; set a distinctive one
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = BIRTH_DATE
        ds.save_as(path, enforce_file_format=True)
    data = files[0].read_bytes()
    (root / "study0" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (root / "study0" / "notes.txt").write_text("not a DICOM file\n")
    return root


def test_batch_run_logs_and_outputs_have_no_phi(studies, tiny_weights, tmp_path):
    out, dcm = tmp_path / "out", tmp_path / "dcm"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ICH_CACHE_DIR"] = str(tmp_path / "cache")  # not the user's cache
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # let everything through: more text to check
    cmd = [
        sys.executable,
        "-m",
        "ich_model.score_cli",
        str(studies),
        "--out",
        str(out),
        "--weights",
        str(tiny_weights),
        "--dicom-out",
        str(dcm),
        "--batch-size",
        "4",
    ]
    run = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, errors="replace"
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "2 of 2 series scored" in run.stdout
    assert "INFO:" in log  # the run logged at INFO: the check below reads a full log
    assert "truncated.dcm" in log and "notes.txt" in log  # the stray files were reported
    assert not leaks(log), f"identifying values in the log: {leaks(log)}"

    written = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in written}
    assert {"predictions.csv", "series.csv", "summary.json"} <= names
    for path in written:
        assert not leaks(file_text(path)), f"identifying values in {path}: {leaks(file_text(path))}"

    exported = sorted(p for p in dcm.rglob("*") if p.is_file())
    assert exported, "no DICOM export was written"
    patients = set()
    for path in exported:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) in NAMES and ds.PatientID in IDS
        patients.add((str(ds.PatientName), ds.PatientID))
    assert patients == set(zip(NAMES, IDS, strict=True))  # each report files with its patient


def test_viewer_csv_and_json_exports_have_no_phi(studies, tmp_path):
    from ich_model.dicom_io import PHI_TAGS, load_series, scan
    from viewer.export import results_document, write_csv, write_json
    from viewer.scores import LiveScores

    infos = scan([studies])
    assert len(infos) == 2
    for k, info in enumerate(infos):
        series = load_series(info)
        assert {"PatientName", "PatientID", "PatientBirthDate"} <= PHI_TAGS
        rng = np.random.default_rng(k)
        scores = LiveScores.empty(series.n_slices)
        probs = rng.random((series.n_slices, 6), dtype=np.float32)
        scores.add_batch(0, probs)
        scores.finish(probs, True, 0.1)
        csv_path = write_csv(tmp_path / f"r{k}.csv", series, scores)
        model = {"name": "tiny", "sha256": "0" * 64, "trained": False}
        doc = results_document(series, scores, model, 0.5, list(series.warnings))
        json_path = write_json(tmp_path / f"r{k}.json", doc)
        for path in (csv_path, json_path):
            text = file_text(path)
            assert not leaks(text), f"identifying values in {path}: {leaks(text)}"
        assert json.loads(json_path.read_text())["series"]["n_slices"] == series.n_slices


def test_the_check_would_catch_a_leak():
    """The matcher itself: each spelling is caught, and ordinary output is not."""
    assert leaks("loaded QWERTY ZYXWV") and leaks("id 98765") and leaks("born 1901-12-31")
    assert not leaks("INFO: model tiny loaded (onnxruntime), weights 0123456789ab")
