"""The loader on broken and hostile input: every case of tests/badinput.py has the outcome
docs/INPUT_HANDLING.md promises, and no message carries a patient identifier."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ich_model.dicom_io import (
    MAX_TEXT,
    MIN_SLICES,
    analyzability,
    geometry_warnings,
    is_axial,
    load_series,
    load_study,
    scan,
    slice_normal,
)
from ich_model.series import CTSeries, SeriesInfo, SeriesLoadError
from tests.badinput import (
    BASE_SLICES,
    CASES,
    PATIENT_ID,
    PATIENT_NAME,
    Case,
    Outcome,
    good_series,
    write_case,
    write_corpus,
)
from tests.dicomfactory import ct_slice

DOC = Path(__file__).resolve().parent.parent / "docs" / "INPUT_HANDLING.md"


class Run:
    """Everything the loader said about one folder."""

    def __init__(self, folder: Path) -> None:
        self.scan_warnings: list[str] = []
        self.infos = scan(folder, self.scan_warnings.append)
        self.loaded: list[CTSeries] = []
        self.refused: list[tuple[SeriesInfo, SeriesLoadError]] = []
        for info in self.infos:
            try:
                self.loaded.append(load_series(info))
            except SeriesLoadError as exc:
                self.refused.append((info, exc))

    @property
    def series_warnings(self) -> list[str]:
        return [w for s in self.loaded for w in s.warnings] + [
            w for i, _ in self.refused for w in i.warnings
        ]

    @property
    def messages(self) -> list[str]:
        return (
            self.scan_warnings
            + self.series_warnings
            + [str(e) for _, e in self.refused]
            + [r for s in self.loaded for r in analyzability(s)]
        )

    def series_with(self, f: Path) -> CTSeries:
        [s] = [s for s in self.loaded if f in s.files]
        return s


def _identifiers(folder: Path) -> set[str]:
    """The identifiers to look for: the names we wrote and the birth dates in the files."""
    found = {PATIENT_NAME, PATIENT_ID, *PATIENT_NAME.split("^")}
    for f in folder.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            found.add(str(ds.get("PatientBirthDate", "")))
        except Exception:  # broken files are the point here
            continue
    return {x for x in found if len(x) >= 4}


def _assert_no_identifiers(texts: list[str], identifiers: set[str]) -> None:
    for text in texts:
        for ident in identifiers:
            assert ident not in text, f"patient identifier {ident!r} in message: {text[:300]}"


def _named(messages: list[str], f: Path, reason: str) -> list[str]:
    return [m for m in messages if str(f) in m and reason in m]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_outcome(tmp_path: Path, case: Case, caplog: pytest.LogCaptureFixture) -> None:
    bad = write_case(case.name, tmp_path)
    caplog.set_level(logging.DEBUG)
    run = Run(tmp_path)
    text = "\n".join(run.messages)
    scanned = [f for i in run.infos for f in i.files]
    loaded = [f for s in run.loaded for f in s.files]

    if case.outcome is Outcome.LEFT_OUT:
        assert bad not in scanned
        assert _named(run.scan_warnings, bad, case.reason), text
        good = [f for f in (tmp_path / "series").glob("IM*.dcm") if f != bad]
        assert set(good) <= set(loaded), "the rest of the series must still load"
    elif case.outcome is Outcome.SLICE_LEFT_OUT:
        assert bad in scanned and bad not in loaded
        [s] = [s for s in run.loaded if s.series_uid == run.infos[0].series_uid]
        assert s.n_slices == BASE_SLICES - 1
        assert _named(list(s.warnings), bad, case.reason), text
        assert _named(list(s.warnings), bad, "slice left out"), text
    elif case.outcome is Outcome.LOADED_WITH_WARNING:
        s = run.series_with(bad)
        assert any(case.reason in w for w in s.warnings), text
        assert not run.refused and not analyzability(s)
    elif case.outcome is Outcome.LOADED:
        s = run.series_with(bad)
        assert s.warnings == () and run.scan_warnings == [], text
        assert s.n_slices == BASE_SLICES and not analyzability(s)
        assert all(len(v) <= MAX_TEXT and "\n" not in v for v in s.metadata.values())
        assert s.hu.min() >= -1024 and 15 < float(np.median(s.hu[s.hu > 0])) < 80
    elif case.outcome is Outcome.SEPARATE_SERIES:
        s = run.series_with(bad)
        assert s.n_slices == 1 and s.key.endswith("#2")
        assert any(case.reason in w for w in run.scan_warnings), text
        assert any(i.n_slices == BASE_SLICES for i in run.infos)
    elif case.outcome is Outcome.NOT_ANALYZABLE:
        s = run.series_with(bad)
        assert any(case.reason in r for r in analyzability(s)), text
        [info] = [i for i in run.infos if bad in i.files]
        assert any(case.reason in r for r in analyzability(info)), "flagged before decoding"
    elif case.outcome is Outcome.REFUSED:
        [(info, exc)] = [(i, e) for i, e in run.refused if bad in i.files]
        assert case.reason in str(exc) and str(bad) in str(exc)
        assert bad in exc.paths
    else:  # pragma: no cover
        raise AssertionError(case.outcome)

    # every loaded volume is finite HU with air as the floor
    for s in run.loaded:
        assert np.isfinite(s.hu).all() and s.hu.min() >= -1024
    # privacy: neither the messages nor any log record names the patient
    records = [r.getMessage() for r in caplog.records]
    _assert_no_identifiers(run.messages + records, _identifiers(tmp_path))


def test_whole_corpus_nothing_lost_nothing_escapes(tmp_path: Path) -> None:
    """All cases in one tree: every file is either in a loaded series or named in a message,
    and nothing but SeriesLoadError leaves the loader."""
    write_corpus(tmp_path)
    with warnings.catch_warnings(record=True) as py_warnings:
        warnings.simplefilter("always")
        run = Run(tmp_path)
    text = "\n".join(run.messages)
    loaded = {f for s in run.loaded for f in s.files}
    loaded |= {f for _, exc in run.refused for f in exc.paths}  # named as a series
    for f in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        assert f in loaded or str(f) in text, f"{f} vanished without a word"
    _assert_no_identifiers(
        run.messages + [str(w.message) for w in py_warnings], _identifiers(tmp_path)
    )


def test_privacy_with_other_identifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Identifiers that look like UIDs (digits and dots) and names with non-ASCII letters."""
    name, pid = "Ødegård^Åsa", "99.77.31337"
    caplog.set_level(logging.DEBUG)
    for case in ("unsafe_uid", "truncated_pixels", "missing_position", "corrupt_jpeg2000"):
        write_case(case, tmp_path / case, patient_name=name, patient_id=pid)
    run = Run(tmp_path)
    assert run.scan_warnings
    texts = run.messages + [r.getMessage() for r in caplog.records]
    _assert_no_identifiers(texts, {name, pid, "Ødegård"})


def test_damaged_identifier_is_never_quoted(tmp_path: Path) -> None:
    """PatientID with its VR changed to FD (found by the fuzzer): pydicom's conversion error
    quotes the raw bytes. The file still loads, and no message shows the ID."""
    files = good_series(tmp_path, seed=2)
    raw = files[1].read_bytes()
    assert raw.count(b"\x10\x00\x20\x00LO") == 1
    files[1].write_bytes(raw.replace(b"\x10\x00\x20\x00LO", b"\x10\x00\x20\x00FD"))
    run = Run(tmp_path)
    assert [s.n_slices for s in run.loaded] == [BASE_SLICES]
    _assert_no_identifiers(run.messages, {PATIENT_ID})
    from ich_model.dicom_io import _brief

    ds = pydicom.dcmread(files[1])
    exc = ValueError(f"received b'{PATIENT_ID}' and {PATIENT_NAME.split('^')[0]}")
    assert PATIENT_ID not in _brief(exc) and "Zyxwvutsrq" not in _brief(exc, ds)


def test_missing_sop_uid_falls_back_to_a_safe_file_name(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=14, n=2)
    ds = pydicom.dcmread(files[0])
    del ds.SOPInstanceUID
    odd = tmp_path / "slice 1,final.dcm"
    ds.save_as(odd)
    files[0].unlink()
    [s] = load_study(tmp_path)
    assert "slice_1_final" in s.sop_uids


def test_uid_equal_to_patient_id_is_refused(tmp_path: Path) -> None:
    """A SeriesInstanceUID that holds the PatientID (a swapped tag) would put the ID into
    every message about the series: the file is left out instead."""
    files = good_series(tmp_path, seed=3, patient_id="123456789")
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID = "123456789"
    ds.save_as(files[0])
    warns: list[str] = []
    infos = scan(tmp_path, warns.append)
    assert [i.n_slices for i in infos] == [BASE_SLICES - 1]
    assert any("invalid SeriesInstanceUID (it holds a patient identifier)" in w for w in warns)
    assert not any("123456789" in w for w in warns)


def test_deferred_values_are_read(tmp_path: Path) -> None:
    """Values read later from the file (large ones) arrive: a 64 kB description (cut for
    display) and a 1024 x 1024 slice whose 2 MB of pixels are read after the header."""
    write_case("huge_string", tmp_path / "a")
    [s] = load_study(tmp_path / "a")
    assert s.metadata["SeriesDescription"].startswith("CT HEAD CT HEAD")
    assert len(s.metadata["SeriesDescription"]) == MAX_TEXT
    ct_slice(tmp_path / "b" / "big.dcm", series_uid="1.2.3.4.5", rows=1024, cols=1024, hu=40.0)
    [big] = load_study(tmp_path / "b")
    assert big.hu.shape == (1, 1024, 1024) and float(big.hu.mean()) == 40.0


def test_single_valued_image_type_localizer(tmp_path: Path) -> None:
    """ImageType "LOCALIZER" written as one value (VM 1) is still a localizer."""
    files = good_series(tmp_path, seed=4)
    ds = pydicom.dcmread(files[0])
    ds.ImageType = "LOCALIZER"
    ds.save_as(files[0])
    warns: list[str] = []
    [info] = scan(tmp_path, warns.append)
    assert info.n_slices == BASE_SLICES - 1
    assert _named(warns, files[0], "localizer")


# ----------------------------------------------------------------------------- analyzability


def test_min_slices_default_is_one_and_exposed(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=5, n=3)
    [s] = load_study(files[:1])
    assert MIN_SLICES == 1
    assert analyzability(s) == []
    assert analyzability(s, min_slices=20) == ["only 1 slice(s), fewer than 20"]


def test_analyzability_without_modality_uses_the_sop_class(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=6, n=2)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.Modality
        ds.save_as(f)
    [s] = load_study(tmp_path)
    assert analyzability(s) == []  # CT Image Storage: a CT without its Modality
    info = scan(tmp_path)[0]
    other = SeriesInfo(**{**info.__dict__, "metadata": {"SOPClassUID": "1.2.3"}})
    assert "no Modality" in analyzability(other)[0]


def test_analyzability_degenerate_orientation_is_a_reason_not_an_exception() -> None:
    info = SeriesInfo("k", "1.2", "1.3", "CT", (Path("a"),), 8, 8, orientation=(0,) * 6)
    assert "degenerate" in analyzability(info)[0]
    with pytest.raises(ValueError, match="degenerate"):
        slice_normal((0, 0, 0, 0, 0, 0))
    assert is_axial(None)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "positions",
    [[0.0, 1e300, -1e300], [0.0, float("nan"), 5.0], [0.0, 0.0, 0.0], [5.0, 0.0], [0, 1e-300]],
)
def test_geometry_warnings_never_raise(positions: list[float]) -> None:
    xyz = [(0.0, 0.0, p) for p in positions]
    out = geometry_warnings(positions, (1, 0, 0, 0, 1, 0), xyz, "s")
    assert isinstance(out, list)
    assert geometry_warnings(positions, (0,) * 6, xyz, "s") == geometry_warnings(
        positions, None, None, "s"
    )


def test_position_far_away_is_unusable(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=7)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = [0, 0, 1e200]
    ds.save_as(files[2])
    warns: list[str] = []
    [info] = scan(tmp_path, warns.append)
    assert info.n_slices == BASE_SLICES - 1
    assert any(str(files[2]) in w and "ImagePositionPatient" in w for w in warns)


# ----------------------------------------------------------------------------- after the scan


def test_file_changed_or_removed_after_scan(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=8)
    [info] = scan(tmp_path)
    files[1].unlink()
    files[3].write_bytes(b"gone")
    calls: list[tuple[int, int]] = []
    s = load_series(info, progress=lambda i, n: calls.append((i, n)))
    assert s.n_slices == BASE_SLICES - 2
    assert calls[-1] == (BASE_SLICES, BASE_SLICES) and len(calls) == BASE_SLICES
    assert _named(list(s.warnings), files[1], "slice left out")
    assert _named(list(s.warnings), files[3], "slice left out")


def test_matrix_changed_after_scan(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=9)
    [info] = scan(tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.PixelData = ds.pixel_array[::2, ::2].astype("<i2").tobytes()
    ds.Rows = ds.Columns = 32
    ds.save_as(files[0])
    s = load_series(info)
    assert s.n_slices == BASE_SLICES - 1
    assert _named(list(s.warnings), files[0], "file changed since the scan")


def test_refusal_names_files_and_reasons(tmp_path: Path) -> None:
    files = good_series(tmp_path, seed=10)
    [info] = scan(tmp_path)
    for f in files:
        f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SeriesLoadError) as exc:
        load_series(info)
    msg = str(exc.value)
    assert "none of its 5 file(s) could be decoded" in msg and "(and 2 more)" in msg
    assert str(files[0]) in msg and "truncated" in msg
    assert set(exc.value.paths) == set(files)


# ----------------------------------------------------------------------------- files and folders


def test_dicomdir_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    files = good_series(tmp_path / "src", seed=11, n=2)
    fs = FileSet()
    for f in files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    dicomdir = tmp_path / "media" / "DICOMDIR"
    ds = pydicom.dcmread(dicomdir)
    images = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    images[0].ReferencedFileID = ["..", "src", files[0].name]
    ds.save_as(dicomdir)
    warns: list[str] = []
    [s] = load_study(dicomdir, warns.append)
    assert s.n_slices == 1
    assert any("outside its folder" in w for w in warns)


def test_unreadable_file_is_left_out(tmp_path: Path) -> None:
    import os

    files = good_series(tmp_path, seed=12)
    files[0].chmod(0)
    try:
        if os.access(files[0], os.R_OK):
            pytest.skip("running as root: permissions do not apply")
        warns: list[str] = []
        [info] = scan(tmp_path, warns.append)
        assert info.n_slices == BASE_SLICES - 1
        assert _named(warns, files[0], "PermissionError")
    finally:
        files[0].chmod(0o644)


def test_valid_baseline_jpeg_slice_loads(tmp_path: Path) -> None:
    """The JPEG header check must not refuse a good stream (APP segments before SOF)."""
    import cv2
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    files = good_series(tmp_path, seed=13, n=2)
    ok, buf = cv2.imencode(".jpg", np.full((64, 64), 100, np.uint8))
    assert ok
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([buf.tobytes()])
        ds.save_as(f)
    [s] = load_study(tmp_path)
    assert s.n_slices == 2
    np.testing.assert_allclose(s.hu, 100 - 1024, atol=2)


def test_documentation_lists_every_case() -> None:
    """docs/INPUT_HANDLING.md has one table row per case, with the same outcome."""
    text = DOC.read_text(encoding="utf-8")
    for case in CASES:
        row = re.search(rf"^\|\s*`{case.name}`\s*\|(.*)$", text, re.MULTILINE)
        assert row, f"{case.name} missing from {DOC.name}"
        assert f"| {case.outcome.value} |" in row.group(0), (case.name, row.group(0))
