"""ich-score end to end: phantom studies -> loader -> predictor -> predictions.csv."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ich_model.labels import LABELS
from ich_model.phantom import PhantomSpec, write_series
from ich_model.score_cli import main as score_main
from tests.dicomfactory import SHARED_DATA, ct_series, ct_slice


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


def test_force_scores_a_series_not_analyzable_and_keeps_the_reason(tiny_weights, tmp_path):
    ct_series(tmp_path / "mr", n=3, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")
    out = tmp_path / "out"
    args = [str(tmp_path / "mr"), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]
    assert score_main([*args, "--force"]) == 0
    [row] = csv.DictReader((out / "series.csv").read_text().splitlines())
    assert row["status"] == "scored" and row["n_slices"] == "3"
    assert "not analyzable, scored on request: modality MR" in row["warnings"]


def test_min_slices_flags_short_series_not_analyzable(studies, tiny_weights, tmp_path):
    root, _ = studies
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]
    assert score_main([*args, "--min-slices", "1000"]) == 1  # 1: some series not scored
    rows = list(csv.DictReader((out / "series.csv").read_text().splitlines()))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"not analyzable"}
    assert all(r["error"] == "only 6 slice(s), fewer than 1000" for r in rows)
    assert len(_rows(out / "predictions.csv")) == 1  # the header only
    assert score_main([*args, "--min-slices", "0"]) == 2


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


def test_rsna_image_ids_are_not_prefixed_twice(tiny_weights, tmp_path):
    # RSNA 2019 files carry their image ID ("ID_<hex>") as SOPInstanceUID; the challenge's
    # rows are "ID_<hex>_<label>", so the prefix is added only to UIDs that lack it.
    ct_slice(tmp_path / "in" / "rsna.dcm", series_uid="ID_5ee5a4b1c3", sop_uid="ID_0fe31b044")
    ct_slice(tmp_path / "in" / "ct.dcm", series_uid="1.2.3.98", sop_uid="1.2.3.98.1")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]
    assert score_main(args) == 0
    ids = {r[0] for r in _rows(out / "predictions.csv")[1:]}
    assert ids == {f"ID_{u}_{lab}" for u in ("0fe31b044", "1.2.3.98.1") for lab in LABELS}


def test_resume_skips_finished_series(studies, tiny_weights, tmp_path):
    root, _ = studies
    out = tmp_path / "out"
    args = [str(root), "--out", str(out), "--weights", str(tiny_weights), "--quiet"]
    assert score_main(args) == 0
    first = (out / "predictions.csv").read_bytes()
    assert score_main(args) == 0
    assert (out / "predictions.csv").read_bytes() == first
    assert json.loads((out / "summary.json").read_text())["series_resumed_from_earlier_run"] == 3


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_cq500_with_tilt_and_a_missing_slice_is_scored_with_both_warnings(tiny_weights, tmp_path):
    """Issue 8: tilt and gaps are warnings, not reasons; series.csv carries both."""
    out = tmp_path / "out"
    args = [str(SHARED_DATA / "cq500-mixed"), "--out", str(out), "--weights", str(tiny_weights)]
    assert score_main([*args, "--quiet"]) == 0
    series = list(csv.DictReader((out / "series.csv").read_text().splitlines()))
    [big] = [r for r in series if r["n_slices"] == "238"]
    assert big["status"] == "scored" and big["error"] == ""
    assert "gantry tilt of 8.5 degrees" in big["warnings"] and "1 gap(s)" in big["warnings"]
    assert len(_rows(out / "predictions.csv")) == 1 + 239 * 6


def test_bad_input_corpus_has_the_documented_outcome_in_ich_score(tiny_weights, tmp_path):
    """Every case of tests/badinput.py ends in ich-score's outputs as the loader and
    docs/INPUT_HANDLING.md say: in skipped_files, or as its series' status, error or warnings."""
    from ich_model.dicom_io import scan
    from tests.badinput import CASES, Outcome, write_corpus

    bad = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = [str(tmp_path / "corpus"), "--out", str(out), "--weights", str(tiny_weights)]
    assert score_main([*args, "--quiet"]) == 1  # some series fail or are not analyzable
    skipped = json.loads((out / "summary.json").read_text())["skipped_files"]
    series = csv.DictReader((out / "series.csv").read_text().splitlines())
    rows = {r["series_key"]: r for r in series}
    for case in CASES:
        keys = {i.key for i in scan(tmp_path / "corpus" / case.name)}
        mine = [rows[k] for k in keys]
        why = (case.name, skipped, mine)
        if case.outcome is Outcome.LEFT_OUT:
            said = [m for m in skipped if m.startswith(f"{bad[case.name]}: left out")]
            assert said and case.reason in said[0], why
        elif case.outcome is Outcome.SEPARATE_SERIES:
            assert any(case.reason in m for m in skipped) and len(mine) == 2, why
        elif case.outcome is Outcome.NOT_ANALYZABLE:
            assert any(
                r["status"] == "not analyzable" and case.reason in r["error"] for r in mine
            ), why
        elif case.outcome is Outcome.REFUSED:
            assert any(r["status"] == "failed" and case.reason in r["error"] for r in mine), why
        elif case.outcome is Outcome.LOADED:
            assert all(r["status"] == "scored" and not r["warnings"] for r in mine), why
        else:  # slice left out, loaded with a warning: scored, and the warning travels with it
            assert any(r["status"] == "scored" and case.reason in r["warnings"] for r in mine), why


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


# ----------------------------------------------------------------------------- reading speed
# The batch pipeline reads each file once: the scan keeps where a plain slice's pixels are,
# and loading reads them without parsing the header again. These tests hold that to giving
# exactly what the full pydicom read gives.


def _series_fields(s):
    return (
        s.pixel_spacing,
        s.positions,
        s.slice_thickness,
        s.orientation,
        s.sop_uids,
        s.files,
        s.warnings,
        s.metadata,
    )


def _load_both_ways(folder, monkeypatch):
    """load_series with the scan's shortcut and with pydicom only, on the same scan."""
    from ich_model import dicom_io

    [info] = dicom_io.scan(folder)
    fast = dicom_io.load_series(info)
    with monkeypatch.context() as m:
        m.setattr(dicom_io, "_PREALLOCATE_BYTES", 0)  # slice by slice, then stacked
        stacked = dicom_io.load_series(info)
        m.setattr(dicom_io, "_NATIVE", dicom_io._NativeSlices(limit=0))
        full = dicom_io.load_series(info)
    np.testing.assert_array_equal(fast.hu, stacked.hu)
    assert _series_fields(fast) == _series_fields(stacked)
    return info, fast, full


@pytest.mark.parametrize(
    "encoding",
    [
        dict(bits_stored=16, pixel_representation=1, intercept=-1024.0, slope=1.0),
        dict(bits_stored=12, pixel_representation=1, intercept=0.0, slope=1.0),
        dict(bits_stored=12, pixel_representation=0, intercept=-1024.0, slope=1.0),
        dict(bits_stored=12, pixel_representation=0, intercept=0.0, slope=1.0),  # RSNA wrap
        dict(bits_stored=16, pixel_representation=0, intercept=-1024.25, slope=0.5),
        dict(bits_stored=10, pixel_representation=1, intercept=-300.0, slope=3.0),
    ],
)
def test_one_read_loading_equals_the_full_read(encoding, tmp_path, monkeypatch):
    from ich_model import dicom_io

    bits, signed = encoding["bits_stored"], encoding["pixel_representation"]
    rng = np.random.default_rng(bits)
    lo = -(2 ** (bits - 1)) if signed else 0
    hi = min(2 ** (bits - 1) if signed else 2**bits, lo + 3000)
    uid = "1.2.826.0.1.3680043.8.498.4242"
    for k in range(4):
        v = rng.integers(lo, hi, (24, 20))
        v[0, :2] = [lo, hi - 1]
        raw = (v & (2**bits - 1)).astype(np.uint16)
        if bits < 16:  # bits above Bits Stored hold garbage, as in some real files
            raw |= rng.integers(0, 2 ** (16 - bits), v.shape).astype(np.uint16) << bits
        stored = raw.view(np.int16) if signed else raw
        ct_slice(tmp_path / f"s{k}.dcm", series_uid=uid, z=k * 5.0, stored=stored, **encoding)
    info, fast, full = _load_both_ways(tmp_path, monkeypatch)
    assert all(dicom_io._NATIVE.get(f) is not None for f in info.files)
    assert fast.hu.dtype == np.float32 and fast.hu.shape == (4, 24, 20)
    np.testing.assert_array_equal(fast.hu, full.hu)
    assert _series_fields(fast) == _series_fields(full)


def test_pixel_padding_and_implicit_vr_equal_the_full_read(tmp_path, monkeypatch):
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.uid import ImplicitVRLittleEndian

    uid = "1.2.826.0.1.3680043.8.498.4343"
    for k in range(3):
        stored = np.full((16, 16), 1064, np.int16)
        stored[:3] = -2000
        f = ct_slice(tmp_path / f"s{k}.dcm", series_uid=uid, z=k * 5.0, stored=stored)
        ds = pydicom.dcmread(f)
        ds.add(DataElement(0x00280120, "SS", -2000))  # PixelPaddingValue
        if k == 1:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(f)
    _, fast, full = _load_both_ways(tmp_path, monkeypatch)
    np.testing.assert_array_equal(fast.hu, full.hu)
    assert fast.hu[:, 0, 0].tolist() == [-1024.0] * 3 and fast.hu[0, 5, 5] == 40.0
    assert _series_fields(fast) == _series_fields(full)


def test_a_file_changed_after_the_scan_is_read_in_full(tmp_path, monkeypatch):
    """Same size, another header (a different rescale) or other pixels: what the file holds
    now, as the full read gives it."""
    import pydicom

    from ich_model import dicom_io

    files = ct_series(tmp_path, n=4, intercept=-1024.0)
    [info] = dicom_io.scan(tmp_path)
    size = files[1].stat().st_size
    ds = pydicom.dcmread(files[1])
    ds.RescaleIntercept = "-1000.0"  # as long as "-1024.0": the file keeps its size
    ds.save_as(files[1])
    ds = pydicom.dcmread(files[2])
    ds.PixelData = (np.frombuffer(ds.PixelData, np.int16) + 7).astype(np.int16).tobytes()
    ds.save_as(files[2])
    assert files[1].stat().st_size == files[2].stat().st_size == size
    calls = []
    full_read = dicom_io._slice_hu
    monkeypatch.setattr(
        dicom_io, "_slice_hu", lambda p, out=None: calls.append(p) or full_read(p, out)
    )
    s = dicom_io.load_series(info)
    assert calls == [files[1]]  # the other three were read once, without pydicom
    assert s.hu[1].mean() == pytest.approx(10 + 24) and s.hu[2].mean() == pytest.approx(20 + 7)
    with monkeypatch.context() as m:
        m.setattr(dicom_io, "_NATIVE", dicom_io._NativeSlices(limit=0))
        np.testing.assert_array_equal(s.hu, dicom_io.load_series(info).hu)


def test_model_input_batch_matches_model_input_slice_by_slice():
    from ich_model.windowing import model_input, model_input_batch

    rng = np.random.default_rng(1)
    for shape, size, hu_range in [((3, 50, 40), 16, None), ((2, 64, 64), 24, (0.0, 80.0))]:
        vol = rng.normal(40, 400, shape).astype(np.float32)
        b = model_input_batch(vol, size, hu_range)
        for i in range(shape[0]):
            np.testing.assert_array_equal(b[i], model_input(vol[i], size, hu_range))
    same = rng.normal(40, 400, (2, 16, 16)).astype(np.float32)  # no resize: input untouched
    before = same.copy()
    b = model_input_batch(same, 16, (0.0, 80.0))
    np.testing.assert_array_equal(same, before)
    np.testing.assert_array_equal(b[1], model_input(same[1], 16, (0.0, 80.0)))
