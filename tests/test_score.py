"""ich-score end to end: phantom studies -> loader -> predictor -> predictions.csv."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ich_model.labels import LABELS
from ich_model.phantom import PhantomSpec, write_series
from ich_model.score_cli import main as score_main
from tests.dicomfactory import ct_slice


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    written = []
    for k, sub in enumerate([("subdural",), (), ("epidural", "intraventricular")]):
        spec = PhantomSpec.for_matrix(96, subtypes=sub, n_slices=6, seed=k)
        written.append(write_series(root / f"study{k}", spec, patient_id=f"PH{k}"))
    return root, written


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predictions_csv_has_exactly_the_expected_rows(studies, tiny_weights, tmp_path):
    root, written = studies
    out = tmp_path / "out"
    assert (
        score_main([str(root), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]) == 0
    )
    rows = _rows(out / "predictions.csv")
    assert rows[0] == ["ID", "Label"]
    expected = {f"ID_{uid}_{lab}" for s in written for uid in s.sop_uids for lab in LABELS}
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == len(expected) == 3 * 6 * 6
    assert set(ids) == expected
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    series = list(csv.DictReader((out / "series.csv").read_text().splitlines()))
    assert len(series) == 3 and {r["status"] for r in series} == {"scored"}
    assert {r["series_uid"] for r in series} == {s.series_uid for s in written}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["series_scored"] == 3 and summary["slices_scored"] == 18
    assert summary["model"]["trained"] is False
    assert "not for diagnostic use" in summary["notice"]
    # privacy: no patient name or ID in any output
    for f in out.iterdir():
        text = f.read_text()
        assert "Phantom^Head" not in text and "PH0" not in text


def test_mixed_folder_reports_reasons_and_scores_the_rest(studies, tiny_weights, tmp_path):
    root, written = studies
    mixed = tmp_path / "mixed"
    import shutil

    shutil.copytree(root / "study0", mixed / "good")
    (mixed / "empty").mkdir()
    raw = written[1].files[0].read_bytes()
    (mixed / "broken").mkdir()
    (mixed / "broken" / "truncated.dcm").write_bytes(raw[:300])
    ct_slice(
        mixed / "mr" / "mr.dcm",
        series_uid="1.2.3.99",
        modality="MR",
        sop_class="1.2.840.10008.5.1.4.1.1.4",
    )
    out = tmp_path / "out"
    code = score_main([str(mixed), "--out", str(out), "--weights", str(tiny_weights), "--quiet"])
    assert code == 1
    series = {
        r["series_uid"]: r for r in csv.DictReader((out / "series.csv").read_text().splitlines())
    }
    assert series[written[0].series_uid]["status"] == "scored"
    assert series["1.2.3.99"]["status"] == "not analyzable"
    assert "MR" in series["1.2.3.99"]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert any("truncated.dcm" in w for w in summary["skipped_files"])
    assert len(_rows(out / "predictions.csv")) == 1 + 6 * 6


def test_bad_usage_exits_2(tmp_path, tiny_weights):
    assert score_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert score_main(["--out", str(tmp_path / "o")]) == 2
    assert (
        score_main(
            [
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--weights",
                str(tmp_path / "missing.weights.h5"),
            ]
        )
        == 2
    )


def test_resume_skips_finished_series(studies, tiny_weights, tmp_path):
    root, _ = studies
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]
    assert score_main(args) == 0
    first = (out / "predictions.csv").read_bytes()
    assert score_main(args) == 0
    assert (out / "predictions.csv").read_bytes() == first
    assert json.loads((out / "summary.json").read_text())["series_resumed_from_earlier_run"] == 3


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_output(tiny_weights, tmp_path):
    root = tmp_path / "many"
    for k in range(10):
        write_series(
            root / f"s{k}",
            PhantomSpec.for_matrix(128, subtypes=("subdural",), n_slices=30, seed=100 + k),
            patient_id=f"K{k}",
        )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [
        sys.executable,
        "-m",
        "ich_model.score_cli",
        str(root),
        "--weights",
        str(tiny_weights),
        "--quiet",
        "--batch-size",
        "2",
    ]
    ref = tmp_path / "ref"
    subprocess.run([*cmd, "--out", str(ref)], check=True, env=env, timeout=600)

    out = tmp_path / "out"
    journal = out / ".ich-score-journal.jsonl"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = journal.read_text().count("\n")
    assert 2 <= committed < 10, "the run was not interrupted mid-way"
    # what a killed run leaves is valid CSV: whole rows only
    rows = _rows(out / "predictions.csv")
    assert all(len(r) == 2 for r in rows)
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, timeout=600)
    assert _rows(out / "predictions.csv") == _rows(ref / "predictions.csv")
    assert _rows(out / "series.csv") == _rows(ref / "series.csv")


def test_dicom_out_writes_sr_and_key_images(studies, tiny_weights, tmp_path):
    import pydicom

    root, written = studies
    out, dcm = tmp_path / "out", tmp_path / "dcm"
    code = score_main(
        [
            str(root / "study0"),
            "--out",
            str(out),
            "--weights",
            str(tiny_weights),
            "--quiet",
            "--dicom-out",
            str(dcm),
        ]
    )
    assert code == 0
    [folder] = [p for p in dcm.iterdir()]
    assert folder.name == written[0].series_uid
    files = sorted(folder.glob("*.dcm"))
    srs = [f for f in files if f.name.startswith("SR_")]
    assert len(srs) == 1
    sr = pydicom.dcmread(srs[0])
    assert sr.StudyInstanceUID == written[0].study_uid
    assert sr.SeriesInstanceUID != written[0].series_uid
    assert not list(dcm.glob(".*partial"))
