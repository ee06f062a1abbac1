"""Results a PACS can store: a TID 1500 Structured Report and burned-in key images.

Both are new series (fresh UIDs) in the source study, carrying the source study's patient
and study attributes copied from the first slice's header, so a PACS files them next to
the CT they describe. Every object says "AI second opinion, not for diagnostic use", and
the untrained-weights warning when it applies.

- :func:`export_sr` writes a Comprehensive SR holding a Measurement Report (DICOM PS3.16
  TID 1500): one measurement group with the series-level probability of each label (the
  maximum over slices) and one group per flagged slice, which references that slice by
  SOP Class and SOP Instance UID. The model is the observer device (TID 1004) and the
  algorithm (TID 4019) of every group; its weights' sha256 is the device serial number.
- :func:`export_key_images` writes Secondary Capture images (RGB, 8 bit) of the flagged
  slices with the probabilities, the heat map and the notice burned in (PS3.3 A.8.1).

Finding codes: SNOMED CT where the concept could be checked (1386000 intracranial, 274100004
cerebral, 21454007 subarachnoid, 35486000 subdural hemorrhage); epidural and intraventricular
hemorrhage use the local scheme ``99ICH``, declared in CodingSchemeIdentificationSequence.
No source we can trust confirms SNOMED CT codes for those two: pydicom's SR dictionaries
(which hold 1386000) and the DICOM context groups they mirror have neither, and open projects
disagree (docs/PACS.md, "The report's finding codes"). A wrong code in a PACS is worse than
a local one, which a reader at least knows to look up.
Patient names and IDs are copied into the files, never logged, and never passed to highdicom
(its validators would log them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ich_model import __version__
from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, SHORT_NAMES, UNTRAINED_WARNING
from ich_model.predictor import ScoreResult
from ich_model.series import CTSeries
from ich_model.windowing import window_to_uint8

log = logging.getLogger(__name__)

MANUFACTURER = "ICH second opinion (open source)"
SOFTWARE_NAME = "ich-second-opinion"
SR_SERIES_DESCRIPTION = "ICH second opinion report (not for diagnostic use)"
KEY_SERIES_DESCRIPTION = "ICH second opinion key images (not for diagnostic use)"
SR_SERIES_NUMBER = 9001
KEY_SERIES_NUMBER = 9002
#: Smallest side of a key image: burned-in text stays legible at this size.
MIN_KEY_IMAGE_SIZE = 512

#: Patient and study attributes copied from the source (type 2 ones are written empty
#: when the source lacks them; StudyDescription is type 3 and only copied when present).
STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
_OPTIONAL_KEYWORDS = frozenset({"StudyDescription"})

LOCAL_SCHEME = "99ICH"
LOCAL_SCHEME_NAME = "ICH second opinion local codes"

#: Concept of each label, in :data:`LABELS` order.
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    "epidural": hd.sr.CodedConcept("EDH", LOCAL_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", LOCAL_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
}
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
PROCEDURE_REPORTED = hd.sr.CodedConcept("24725-4", "LN", "CT Head")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

_PATIENT_SEX = frozenset({"M", "F", "O"})


# --------------------------------------------------------------------- shared helpers


def _threshold(result: ScoreResult, threshold: float | None) -> float:
    t = result.model.threshold if threshold is None else float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    return t


def _check_result(series: CTSeries, result: ScoreResult) -> None:
    n = result.n_slices
    if n > series.n_slices or tuple(result.sop_uids) != tuple(series.sop_uids[:n]):
        raise ValueError(
            "the scoring result does not belong to this series: its SOP Instance UIDs differ "
            f"from the series' (result series {result.series_uid}, series {series.series_uid})"
        )
    if tuple(result.labels) != LABELS:
        raise ValueError(f"labels must be {LABELS}. Received: labels={result.labels}")
    if result.probabilities.shape != (n, len(LABELS)):
        raise ValueError(
            f"probabilities must be [slices, {len(LABELS)}]. "
            f"Received: shape={result.probabilities.shape}"
        )


def _notices(trained: bool) -> list[str]:
    return [NOT_FOR_DIAGNOSIS] if trained else [NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING]


def _flagged_slices(result: ScoreResult, threshold: float) -> dict[int, list[str]]:
    """Slice index -> labels at or above the threshold there (slices with none left out)."""
    out: dict[int, list[str]] = {}
    for label, indices in result.flagged(threshold).items():
        for k in indices:
            out.setdefault(k, []).append(label)
    return {k: sorted(labs, key=LABELS.index) for k, labs in sorted(out.items())}


def _series_max(probs: np.ndarray) -> np.ndarray:
    """Maximum over slices per label, ignoring unscored (NaN) slices; NaN where none is scored."""
    filled = np.where(np.isfinite(probs), probs, -np.inf)
    top = filled.max(axis=0) if len(probs) else np.full(len(LABELS), -np.inf)
    return np.where(np.isfinite(top), top, np.nan)


def _read_header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def _sop_class(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID)


def _equipment(result: ScoreResult) -> dict[str, Any]:
    """General Equipment attributes: the software, its version, the weights' hash."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": f"{SOFTWARE_NAME} {result.model.name}"[:64],
        "software_versions": __version__,
        "device_serial_number": result.model.sha256[:64] or None,
    }


def _placeholder_reference(src: Dataset) -> Dataset:
    """The source's study UID with empty patient and study attributes, for highdicom.

    highdicom validates (and logs) the patient's name; the real values are copied
    afterwards by :func:`_copy_study` so they never pass through its checks or logs.
    """
    ref = Dataset()
    ref.StudyInstanceUID = src.StudyInstanceUID
    ref.SeriesInstanceUID = src.get("SeriesInstanceUID", "")
    ref.SOPInstanceUID = src.get("SOPInstanceUID", "")
    ref.SOPClassUID = src.get("SOPClassUID", "")
    for kw in STUDY_KEYWORDS:
        if kw != "StudyInstanceUID" and kw not in _OPTIONAL_KEYWORDS:
            setattr(ref, kw, None)
    if "SpecificCharacterSet" in src:
        ref.SpecificCharacterSet = src.SpecificCharacterSet
    return ref


def _copy_study(ds: Dataset, src: Dataset) -> None:
    """Copy the patient and study attributes of the source study onto a new instance."""
    for kw in STUDY_KEYWORDS:
        if kw in src:
            ds[kw] = src[kw]
        elif kw not in _OPTIONAL_KEYWORDS:
            setattr(ds, kw, None)
    if str(ds.get("PatientSex", "") or "") not in _PATIENT_SEX:
        ds.PatientSex = None  # enumerated M/F/O; anything else is written empty (type 2)
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------- structured report


def _algorithm(result: ScoreResult, threshold: float) -> hd.sr.AlgorithmIdentification:
    model = result.model
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=f"{SOFTWARE_NAME} {__version__}, weights sha256 {model.sha256}",
        parameters=[f"threshold={threshold:g}", f"runtime={model.runtime}"],
    )


def _probabilities(row: np.ndarray, derivation: Any = None) -> list[hd.sr.Measurement]:
    out = []
    for label, p in zip(LABELS, row, strict=True):
        if math.isfinite(float(p)):
            out.append(
                hd.sr.Measurement(
                    name=FINDING_CODES[label],
                    value=round(float(p), 6),
                    unit=PROBABILITY_UNIT,
                    derivation=derivation,
                )
            )
    return out


def _present(labels: Sequence[str]) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(FINDING_CODES[lab], codes.SCT.Present) for lab in labels]


def _comments(result: ScoreResult, threshold: float) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": the notice, the warning, how to read the numbers."""
    texts = [
        *_notices(result.model.trained),
        f"Probabilities from model {result.model.name} (weights sha256 {result.model.sha256}); "
        f"a label is reported on a slice when its probability is at least {threshold:g}.",
    ]
    if not result.complete:
        texts.append(f"Scoring was stopped early: {result.n_slices} slices were scored.")
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
    return container


def build_sr(
    series: CTSeries, result: ScoreResult, threshold: float | None = None
) -> hd.sr.ComprehensiveSR:
    """The Measurement Report of one scored series as an SR instance (not yet written)."""
    _check_result(series, result)
    t = _threshold(result, threshold)
    model = result.model
    src = _read_header(series.files[0])
    n = result.n_slices
    probs = np.asarray(result.probabilities, dtype=np.float64)
    flagged = _flagged_slices(result, t)
    classes = [_sop_class(f) for f in series.files[:n]]

    algorithm = _algorithm(result, t)
    series_max = _series_max(probs)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(),
                identifier=f"Series-level probabilities, maximum over {n} slices",
            ),
            finding_type=FINDING_CODES["any"],
            algorithm_id=algorithm,
            measurements=_probabilities(series_max, derivation=codes.SCT.Maximum),
            qualitative_evaluations=_present(
                [lab for lab, p in zip(LABELS, series_max, strict=True) if p >= t]
            ),
        )
    ]
    for k, labels in flagged.items():
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(),
                    identifier=f"Slice {k + 1} of {series.n_slices} "
                    f"at {series.positions[k]:.1f} mm: "
                    + ", ".join(SHORT_NAMES[lab] for lab in labels),
                ),
                finding_type=FINDING_CODES["any"],
                algorithm_id=algorithm,
                measurements=_probabilities(probs[k]),
                qualitative_evaluations=_present(labels),
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(classes[k], result.sop_uids[k])
                ],
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["ich-second-opinion-model", model.sha256]),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{SOFTWARE_NAME} {__version__}",
            serial_number=model.sha256 or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_comments(result, t))

    # the placeholder is slice 0 (``files[0]``), so it doubles as that slice's evidence
    evidence = [_placeholder_reference(src)]
    for k in range(1, n):
        item = Dataset()
        item.StudyInstanceUID = src.StudyInstanceUID
        item.SeriesInstanceUID = src.SeriesInstanceUID
        item.SOPInstanceUID = result.sop_uids[k]
        item.SOPClassUID = classes[k]
        evidence.append(item)

    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        is_complete=result.complete,
        is_final=False,
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name=LOCAL_SCHEME_NAME,
                responsible_organization=MANUFACTURER,
            )
        ],
        **_equipment(result),
    )
    _copy_study(sr, src)
    return sr


def export_sr(
    series: CTSeries, result: ScoreResult, out_dir: Path, threshold: float | None = None
) -> Path:
    """Write the Structured Report as ``SR_<SOPInstanceUID>.dcm`` into ``out_dir``."""
    sr = build_sr(series, result, threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _save(sr, out_dir / f"SR_{sr.SOPInstanceUID}.dcm")
    log.info("wrote structured report %s", path.name)
    return path


# --------------------------------------------------------------------- key images

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (235, 235, 235)
_GREY = (170, 170, 170)
_YELLOW = (255, 215, 0)
_ORANGE = (255, 140, 40)
_FLAG_BOX = (190, 20, 20)


def _put(img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour: Any) -> None:
    """Text with a dark outline so it reads on bone as well as on air."""
    thick = max(1, round(scale * 2))
    cv2.putText(img, text, org, _FONT, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, colour, thick, cv2.LINE_AA)


def _text_width(text: str, scale: float) -> int:
    (w, _), _ = cv2.getTextSize(text, _FONT, scale, max(1, round(scale * 2)) + 2)
    return int(w)


def _wrap(text: str, scale: float, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}", scale) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _heat_rgb(heat: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM map in [0, 1] -> jet colours and an opacity that fades out where it is low."""
    h, w = size
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    bgr = cv2.applyColorMap((heat * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = np.clip((heat - 0.15) / 0.45, 0.0, 1.0) * 0.5
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), alpha[..., None]


def render_key_image(
    hu_slice: np.ndarray,
    probabilities: Sequence[float],
    threshold: float,
    slice_text: str,
    model_text: str,
    trained: bool,
    heatmap: np.ndarray | None = None,
    window: tuple[float, float] = (40.0, 80.0),
) -> np.ndarray:
    """One slice with everything burned in, as ``[rows, columns, 3]`` uint8 RGB.

    The slice (upscaled so its smaller side is at least :data:`MIN_KEY_IMAGE_SIZE`) is
    shown in ``window`` (level, width) with the heat map blended over it; slice text goes
    top left, the six probabilities top right (those at or above the threshold on a red
    box), and a black footer under the image carries the notice, the untrained warning
    and the model, so no text hides the lower part of the head.
    """
    hu: np.ndarray = np.asarray(hu_slice, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one 2-D slice. Received: shape={hu.shape}")
    if len(probabilities) != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} probabilities. Received: {len(probabilities)}")
    h0, w0 = hu.shape
    f = max(1.0, MIN_KEY_IMAGE_SIZE / min(h0, w0))
    h, w = round(h0 * f), round(w0 * f)
    if (h, w) != (h0, w0):
        hu = cv2.resize(hu, (w, h), interpolation=cv2.INTER_LINEAR)
    grey = window_to_uint8(hu, window[0], window[1])
    image = np.repeat(grey[..., None], 3, axis=2)
    if heatmap is not None:
        heat = np.asarray(heatmap)
        if heat.ndim != 2:
            raise ValueError(f"a heat map must be 2-D. Received: shape={heat.shape}")
        colours, alpha = _heat_rgb(heat, (h, w))
        image = (image * (1.0 - alpha) + colours * alpha + 0.5).astype(np.uint8)

    s = w / MIN_KEY_IMAGE_SIZE  # text grows with the image, never below the 512 size
    scale = 0.5 * s
    line = round(20 * s)
    pad = round(8 * s)

    # top left: where the slice is and what the picture shows
    top_left = [slice_text, f"W {window[1]:g} L {window[0]:g}"]
    if heatmap is not None:
        top_left.append("heat map: Grad-CAM")
    for i, text in enumerate(top_left):
        _put(image, text, (pad, pad + line * (i + 1) - round(5 * s)), scale, _WHITE)

    # top right: the six probabilities (values right-aligned), those at or above the
    # threshold on a red box; a title and the threshold span both columns
    rows: list[tuple[str, str, Any, bool]] = [("AI probability", "", _GREY, False)]
    for label, p in zip(LABELS, probabilities, strict=True):
        ok = math.isfinite(float(p))
        value = f"{100.0 * float(p):.1f}%" if ok else "--"
        rows.append((SHORT_NAMES[label], value, _WHITE, ok and float(p) >= threshold))
    rows.append((f"threshold {100.0 * threshold:g}%", "", _GREY, False))
    gap = round(12 * s)
    label_w = max(_text_width(a, scale) for a, b, _, _ in rows if b)
    value_w = max(_text_width(b, scale) for _, b, _, _ in rows)
    col_w = max(label_w + gap + value_w, *(_text_width(a, scale) for a, b, _, _ in rows if not b))
    x = w - pad - col_w
    for i, (text, value, colour, above) in enumerate(rows):
        y = pad + line * (i + 1) - round(5 * s)
        if above:
            cv2.rectangle(
                image,
                (x - round(4 * s), y - line + round(5 * s)),
                (w - pad + round(4 * s), y + round(5 * s)),
                _FLAG_BOX,
                thickness=-1,
            )
        ink = (255, 255, 255) if above else colour
        _put(image, text, (x, y), scale, ink)
        if value:
            _put(image, value, (w - pad - _text_width(value, scale), y), scale, ink)

    # footer: notice, warning, model, on black under the image
    footer: list[tuple[str, Any]] = [
        (t, _YELLOW) for t in _wrap(NOT_FOR_DIAGNOSIS, scale, w - 2 * pad)
    ]
    if not trained:
        footer += [(t, _ORANGE) for t in _wrap(UNTRAINED_WARNING, scale, w - 2 * pad)]
    footer += [(t, _GREY) for t in _wrap(model_text, scale, w - 2 * pad)]
    band = np.zeros((2 * pad + line * len(footer), w, 3), dtype=np.uint8)
    for i, (text, colour) in enumerate(footer):
        _put(band, text, (pad, pad + line * (i + 1) - round(5 * s)), scale, colour)
    return np.ascontiguousarray(np.concatenate([image, band], axis=0))


def _patient_orientation(orientation: Sequence[float] | None) -> tuple[str, str] | None:
    """PatientOrientation (PS3.3 C.7.6.1.1.1): where the rows and columns point, one letter
    each (the main axis only; an oblique slice is labelled by its nearest axis)."""
    if orientation is None or len(orientation) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for v in (np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)):
        axis = int(np.argmax(np.abs(v)))
        out.append(letters[axis][1 if v[axis] > 0 else 0])
    return out[0], out[1]


def select_key_slices(result: ScoreResult, threshold: float, max_images: int) -> list[int]:
    """Flagged slices (any label), highest flagged probability first, at most ``max_images``."""
    if max_images < 0:
        raise ValueError(f"max_images must be non-negative. Received: max_images={max_images}")
    flagged = _flagged_slices(result, threshold)
    p = result.probabilities

    def top(k: int) -> float:
        return max(float(p[k, LABELS.index(lab)]) for lab in flagged[k])

    return sorted(flagged, key=lambda k: (-top(k), k))[:max_images]


def export_key_images(
    series: CTSeries,
    result: ScoreResult,
    out_dir: Path,
    threshold: float | None = None,
    heatmaps: Mapping[int, np.ndarray] | None = None,
    window: tuple[float, float] = (40.0, 80.0),
    max_images: int = 20,
) -> list[Path]:
    """Write Secondary Capture key images of the flagged slices as ``KEY_<nnn>_<UID>.dcm``.

    ``heatmaps`` maps slice indices (0-based, feet to head) to Grad-CAM maps in [0, 1];
    ``window`` is (level, width) in HU. Images are numbered highest probability first.
    """
    _check_result(series, result)
    t = _threshold(result, threshold)
    if window[1] <= 0:
        raise ValueError(f"window width must be positive. Received: window={window}")
    chosen = select_key_slices(result, t, max_images)
    out_dir = Path(out_dir)
    if not chosen:
        log.info("no flagged slices: no key images written")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    model = result.model
    src = _read_header(series.files[0])
    reference = _placeholder_reference(src)
    orientation = _patient_orientation(series.orientation)
    series_uid = generate_uid()
    comments = " ".join(_notices(model.trained))
    model_text = f"Model {model.name}  sha256 {model.sha256[:12]}  {SOFTWARE_NAME} {__version__}"
    flagged = _flagged_slices(result, t)
    paths = []
    for number, k in enumerate(chosen, start=1):
        heat = None if heatmaps is None else heatmaps.get(k)
        pixels = render_key_image(
            series.hu[k],
            [float(v) for v in result.probabilities[k]],
            t,
            slice_text=f"Slice {k + 1}/{series.n_slices}  pos {series.positions[k]:.1f} mm",
            model_text=model_text,
            trained=model.trained,
            heatmap=heat,
            window=window,
        )
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=KEY_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            patient_orientation=orientation or ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=KEY_SERIES_DESCRIPTION,
            **_equipment(result),
        )
        _copy_study(sc, src)
        if orientation is None:
            sc.PatientOrientation = []  # unknown: empty (type 2C), not a guess
        # a body part tells readers (and dciodvfy) that Laterality is not needed
        sc.BodyPartExamined = str(src.get("BodyPartExamined", "") or "HEAD")[:16]
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = comments
        sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
        sc.SecondaryCaptureDeviceManufacturerModelName = SOFTWARE_NAME
        sc.SecondaryCaptureDeviceSoftwareVersions = __version__
        labels = ", ".join(SHORT_NAMES[lab] for lab in flagged[k])
        sc.DerivationDescription = (
            f"Slice {k + 1} in window W {window[1]:g} L {window[0]:g} with AI probabilities "
            f"burned in ({labels} at or above {t:g})"
            + ("; Grad-CAM heat map blended" if heat is not None else "")
        )[:1024]
        source = Dataset()
        source.ReferencedSOPClassUID = _sop_class(series.files[k])
        source.ReferencedSOPInstanceUID = result.sop_uids[k]
        sc.SourceImageSequence = [source]
        paths.append(_save(sc, out_dir / f"KEY_{number:03d}_{sc.SOPInstanceUID}.dcm"))
    log.info("wrote %d key images", len(paths))
    return paths


def export_dicom(
    series: CTSeries,
    result: ScoreResult,
    out_dir: Path,
    threshold: float | None = None,
    heatmaps: Mapping[int, np.ndarray] | None = None,
) -> list[Path]:
    """Write the Structured Report and the key images; the SR comes first in the list."""
    sr = export_sr(series, result, out_dir, threshold)
    return [sr, *export_key_images(series, result, out_dir, threshold, heatmaps)]
