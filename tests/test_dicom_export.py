"""DICOM exports: the TID 1500 Structured Report and the burned-in key images.

A phantom series goes through the real loader; its ScoreResult is built directly (no
TensorFlow) with known probabilities, so which slices are flagged is known exactly.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, SecondaryCaptureImageStorage

from ich_model import __version__
from ich_model.dicom_export import (
    FINDING_CODES,
    KEY_SERIES_DESCRIPTION,
    MANUFACTURER,
    MIN_KEY_IMAGE_SIZE,
    STUDY_KEYWORDS,
    export_dicom,
    export_key_images,
    export_sr,
    render_key_image,
)
from ich_model.dicom_io import load_study
from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING
from ich_model.phantom import PhantomSpec, write_series
from ich_model.predictor import ModelIdentity, ScoreResult
from ich_model.series import CTSeries

SHA = "0123456789abcdef" * 4
PATIENT_NAME = "Export^Phantom"
PATIENT_ID = "EXPORT-0042"
N = 8
#: slice -> {label: probability} above a 0.05 floor; threshold 0.5 flags slices 3, 4 and 5
HOT = {3: {"subdural": 0.91, "any": 0.95}, 4: {"any": 0.70}, 5: {"intraparenchymal": 0.55}}
FLAGGED_BY_RANK = [3, 4, 5]  # highest flagged probability first


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> CTSeries:
    folder = tmp_path_factory.mktemp("phantom")
    spec = PhantomSpec.for_matrix(128, subtypes=("subdural",), n_slices=N, seed=0)
    written = write_series(folder, spec, patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    for path in written.files:  # the phantom leaves this type 2 attribute out
        ds = dcmread(path)
        ds.ReferringPhysicianName = "Referring^Doctor"
        ds.save_as(path)
    (loaded,) = load_study(folder)
    return loaded


def _probabilities(hot: dict[int, dict[str, float]] = HOT) -> np.ndarray:
    p = np.full((N, len(LABELS)), 0.05, dtype=np.float32)
    for k, values in hot.items():
        for label, v in values.items():
            p[k, LABELS.index(label)] = v
    return p


def _result(series: CTSeries, probs: np.ndarray, trained: bool = True) -> ScoreResult:
    model = ModelIdentity(
        name="xception_lstm",
        sha256=SHA,
        trained=trained,
        input_size=64,
        threshold=0.5,
        runtime="test",
        summary="",
        weights_file="tiny.weights.h5",
    )
    return ScoreResult(
        probabilities=probs,
        sop_uids=series.sop_uids,
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        series_key=series.key,
        model=model,
    )


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR content tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _groups(ds: Dataset) -> list[Dataset]:
    return [i for i in _items(ds) if i.ValueType == "CONTAINER" and _name(i) == "Measurement Group"]


def _nums(group: Dataset) -> dict[str, float]:
    """Concept code value -> numeric value of the group's NUM items."""
    out = {}
    for item in group.ContentSequence:
        if item.ValueType == "NUM":
            code = str(item.ConceptNameCodeSequence[0].CodeValue)
            out[code] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def _present(group: Dataset) -> set[str]:
    return {
        str(i.ConceptNameCodeSequence[0].CodeValue)
        for i in group.ContentSequence
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Present"
    }


def _image_refs(group: Dataset) -> list[tuple[str, str]]:
    return [
        (str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
        for i in group.ContentSequence
        if i.ValueType == "IMAGE"
        for r in i.ReferencedSOPSequence
    ]


def _texts(ds: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in _items(ds):
        if item.ValueType == "TEXT":
            out.setdefault(_name(item), []).append(str(item.TextValue))
    return out


def _assert_study_copied(ds: Dataset, series: CTSeries) -> None:
    src = dcmread(series.files[0], stop_before_pixels=True)
    for kw in STUDY_KEYWORDS:
        assert kw in src, kw
        assert ds[kw].value == src[kw].value, kw
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
    assert ds.StudyInstanceUID == series.study_uid
    assert ds.SeriesInstanceUID != series.series_uid
    assert ds.SOPInstanceUID not in series.sop_uids


# ----------------------------------------------------------------------------- SR


@pytest.mark.parametrize("trained", [True, False])
def test_sr_holds_series_and_slice_findings(series, tmp_path, trained):
    result = _result(series, _probabilities(), trained=trained)
    path = export_sr(series, result, tmp_path)
    assert path.name.startswith("SR_") and path.parent == tmp_path
    ds = dcmread(path)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    _assert_study_copied(ds, series)
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # the model is the observer device and the equipment, with the weights' hash
    texts = _texts(ds)
    assert texts["Device Observer Serial Number"] == [SHA]
    assert texts["Device Observer Manufacturer"] == [MANUFACTURER]
    assert texts["Device Observer Name"] == ["xception_lstm"]
    assert __version__ in texts["Device Observer Model Name"][0]
    assert ds.DeviceSerialNumber == SHA and ds.Manufacturer == MANUFACTURER
    assert SHA in texts["Algorithm Version"][0]

    # the notice, and the warning only for untrained weights
    assert NOT_FOR_DIAGNOSIS in texts["Comment"]
    assert (UNTRAINED_WARNING in texts["Comment"]) is (not trained)

    groups = _groups(ds)
    assert len(groups) == 1 + len(HOT)
    series_group, *slice_groups = groups
    # series level: the maximum over slices of all six labels, no image reference
    expected = result.series_max()
    nums = _nums(series_group)
    assert set(nums) == {FINDING_CODES[lab].value for lab in LABELS}
    for lab in LABELS:
        assert nums[FINDING_CODES[lab].value] == pytest.approx(expected[lab], abs=1e-6)
    assert _present(series_group) == {
        FINDING_CODES[lab].value for lab in ("intraparenchymal", "subdural", "any")
    }
    assert _image_refs(series_group) == []
    # one group per flagged slice, feet to head, referencing exactly that slice
    for group, k in zip(slice_groups, sorted(HOT), strict=True):
        assert _image_refs(group) == [(CTImageStorage, series.sop_uids[k])]
        assert _present(group) == {FINDING_CODES[lab].value for lab in HOT[k]}
        assert _nums(group)[FINDING_CODES["any"].value] == pytest.approx(
            float(result.probabilities[k, LABELS.index("any")]), abs=1e-6
        )

    # every scored slice is evidence; the local coding scheme is declared
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == series.study_uid
    refs = evidence.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == series.series_uid
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence} == set(series.sop_uids)
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99ICH"


def test_finding_codes_are_snomed_where_confirmed_and_local_elsewhere():
    """Issue 10: epidural and intraventricular hemorrhage keep local codes, because no
    trustworthy source confirms SNOMED CT codes for them (docs/PACS.md)."""
    coded = {
        lab: (FINDING_CODES[lab].scheme_designator, FINDING_CODES[lab].value) for lab in LABELS
    }
    assert coded == {
        "epidural": ("99ICH", "EDH"),
        "intraparenchymal": ("SCT", "274100004"),
        "intraventricular": ("99ICH", "IVH"),
        "subarachnoid": ("SCT", "21454007"),
        "subdural": ("SCT", "35486000"),
        "any": ("SCT", "1386000"),
    }
    # the one of ours that pydicom's SR dictionary (DICOM PS3.16) holds, with our meaning
    assert codes.SCT.IntracranialHemorrhage.value == FINDING_CODES["any"].value


def test_threshold_argument_overrides_the_model(series, tmp_path):
    result = _result(series, _probabilities())
    ds = dcmread(export_sr(series, result, tmp_path, threshold=0.8))
    slice_groups = _groups(ds)[1:]
    assert [_image_refs(g)[0][1] for g in slice_groups] == [series.sop_uids[3]]


def test_no_flagged_slice_still_writes_the_sr_and_no_key_image(series, tmp_path):
    result = _result(series, _probabilities({}))
    paths = export_dicom(series, result, tmp_path)
    assert len(paths) == 1 and paths[0].name.startswith("SR_")
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[0].name]
    ds = dcmread(paths[0])
    (group,) = _groups(ds)
    assert len(_nums(group)) == len(LABELS)
    assert _present(group) == set()
    assert not any(i.ValueType == "IMAGE" for i in _items(ds))
    assert export_key_images(series, result, tmp_path / "keys") == []


def test_rejects_a_result_of_another_series(series, tmp_path):
    result = _result(series, _probabilities())
    other = ScoreResult(
        probabilities=result.probabilities,
        sop_uids=tuple(reversed(series.sop_uids)),
        series_uid="1.2.3",
        study_uid=series.study_uid,
        series_key="1.2.3",
        model=result.model,
    )
    with pytest.raises(ValueError, match="does not belong to this series"):
        export_sr(series, other, tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        export_key_images(series, result, tmp_path, threshold=1.5)


# ----------------------------------------------------------------------------- key images


def _sc_checks(ds: Dataset, series: CTSeries) -> None:
    assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "OT"
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.BitsAllocated == 8 and ds.PlanarConfiguration == 0
    assert ds.ConversionType == "WSD" and ds.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in ds.ImageComments
    assert ds.SeriesDescription == KEY_SERIES_DESCRIPTION
    assert ds.DeviceSerialNumber == SHA
    _assert_study_copied(ds, series)


def test_key_images_of_flagged_slices_highest_first(series, tmp_path):
    result = _result(series, _probabilities(), trained=False)
    paths = export_key_images(series, result, tmp_path)
    assert [p.name[:8] for p in paths] == ["KEY_001_", "KEY_002_", "KEY_003_"]
    datasets = [dcmread(p) for p in paths]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    for number, (ds, k) in enumerate(zip(datasets, FLAGGED_BY_RANK, strict=True), start=1):
        _sc_checks(ds, series)
        assert ds.InstanceNumber == number
        assert UNTRAINED_WARNING in ds.ImageComments
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPInstanceUID == series.sop_uids[k]
        assert source.ReferencedSOPClassUID == CTImageStorage
        assert list(ds.PatientOrientation) == ["L", "P"]
        pixels = ds.pixel_array
        # a 128 matrix is scaled up to 512 wide, the footer with the notice lies below it
        assert pixels.shape[1] == MIN_KEY_IMAGE_SIZE and pixels.shape[2] == 3
        assert pixels.shape[0] > MIN_KEY_IMAGE_SIZE
        assert (ds.Rows, ds.Columns) == pixels.shape[:2]
        footer = pixels[MIN_KEY_IMAGE_SIZE:]
        assert footer.std() > 10  # text, not a blank band
        yellow = (footer[..., 0] > 200) & (footer[..., 1] > 170) & (footer[..., 2] < 90)
        assert yellow.sum() > 100  # the notice is drawn in yellow
        corner = pixels[:150, -150:]  # probabilities, the flagged ones on a red box
        red = (corner[..., 0] > 150) & (corner[..., 1] < 60) & (corner[..., 2] < 60)
        assert red.sum() > 200


def test_key_images_are_capped_and_take_heat_maps(series, tmp_path):
    result = _result(series, _probabilities())
    heat = np.zeros((128, 128), dtype=np.float32)
    heat[40:80, 40:80] = 1.0
    paths = export_key_images(series, result, tmp_path, heatmaps={3: heat}, max_images=2)
    assert len(paths) == 2
    first, second = (dcmread(p) for p in paths)
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == series.sop_uids[3]
    assert second.SourceImageSequence[0].ReferencedSOPInstanceUID == series.sop_uids[4]
    assert "heat map" in first.DerivationDescription
    assert "heat map" not in second.DerivationDescription
    assert UNTRAINED_WARNING not in first.ImageComments
    # the centre of the heat map is coloured (red dominates a grey CT pixel there)
    centre = first.pixel_array[220:290, 220:290].astype(int)
    assert (centre[..., 0] - centre[..., 2]).mean() > 40


def test_render_key_image_is_pure_and_scales_up():
    hu = np.full((100, 120), 40.0, dtype=np.float32)
    probs = [0.1, 0.2, 0.3, 0.4, 0.9, 0.95]
    kwargs = {"slice_text": "Slice 1/1", "model_text": "Model m"}
    trained = render_key_image(hu, probs, 0.5, trained=True, **kwargs)
    untrained = render_key_image(hu, probs, 0.5, trained=False, **kwargs)
    assert trained.dtype == np.uint8 and trained.shape[2] == 3
    assert trained.shape[1] == round(120 * MIN_KEY_IMAGE_SIZE / 100)
    assert untrained.shape[0] > trained.shape[0]  # the warning adds footer lines
    # the middle of the image (grey, level 40) is untouched by text
    assert np.all(trained[250:350, 250:350] == 128)
    with pytest.raises(ValueError, match="probabilities"):
        render_key_image(hu, probs[:5], 0.5, trained=True, **kwargs)


def test_no_patient_identifiers_in_logs(series, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    export_dicom(series, _result(series, _probabilities()), tmp_path)
    assert "Export" not in caplog.text and PATIENT_ID not in caplog.text


# ----------------------------------------------------------------------------- validators


@pytest.fixture
def exported(series: CTSeries, tmp_path: Path) -> list[Path]:
    heat = np.linspace(0.0, 1.0, 128 * 128, dtype=np.float32).reshape(128, 128)
    result = _result(series, _probabilities(), trained=False)
    return export_dicom(series, result, tmp_path, heatmaps={3: heat})


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_errors(exported):
    for path in (exported[0], exported[1]):  # the SR and a key image
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        output = run.stdout + run.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}:\n{output}"


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump (dcmtk) not installed")
def test_dsrdump_reads_the_sr(exported, series):
    run = subprocess.run(
        ["dsrdump", "-ll", "warn", "+Pt", str(exported[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert not [x for x in run.stderr.splitlines() if x.startswith(("E:", "F:"))], run.stderr
    assert "# TID 1500 (DCMR)" in run.stdout
    assert "Comprehensive SR Document" in run.stdout
    assert "Imaging Measurement Report" in run.stdout
    assert '"Source of Measurement"' in run.stdout
    assert "Subdural intracranial hemorrhage" in run.stdout


def test_missing_or_invalid_source_attributes_are_written_empty(tmp_path):
    folder = tmp_path / "src"
    spec = PhantomSpec.for_matrix(64, subtypes=("subdural",), n_slices=N, seed=1)
    for path in write_series(folder, spec).files:
        ds = dcmread(path)
        ds.PatientSex = "U"  # not an enumerated value of PatientSex
        del ds.StudyDescription
        ds.save_as(path)
    (loaded,) = load_study(folder)
    paths = export_dicom(loaded, _result(loaded, _probabilities()), tmp_path / "out")
    for ds in (dcmread(p) for p in paths):
        assert ds.PatientSex == "" and ds.ReferringPhysicianName == ""
        assert "StudyDescription" not in ds
    if shutil.which("dciodvfy"):
        for path in paths[:2]:
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert "Error" not in run.stdout + run.stderr, path.name
