"""Find, group, sort and load CT series from DICOM files, folders and DICOMDIRs.

Two steps, so the viewer can list series before decoding any pixel:
``scan(paths)`` reads headers only and returns :class:`SeriesInfo` per series;
``load_series(info)`` decodes, converts to HU and returns a :class:`CTSeries`.
``load_study(paths)`` does both. Bad files never stop the good ones: they are
left out with a warning that names the file and the reason.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ich_model.series import CTSeries, SeriesInfo, SeriesLoadError

log = logging.getLogger(__name__)

# Real archives are full of small standard violations (RSNA's "ID_..." strings in UID
# fields, for one); we check what we use ourselves and report it per file, so pydicom's
# own value validation would only add noise to every read.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: SOP classes that never carry a slice to score (Structured Reports, presentation states,
#: key-object selections, raw data, encapsulated documents).
_NON_IMAGE_SOP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.481.", "radiotherapy object"),
)

#: The largest slice matrix we decode; anything larger is a broken or hostile header.
MAX_MATRIX = 4096
#: Lowest HU kept; padding (-2048, -3024, ...) and anything below air becomes air.
AIR_HU = -1024.0

_METADATA_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "BodyPartExamined",
    "ConvolutionKernel",
    "KVP",
    "GantryDetectorTilt",
)

#: Tags that identify a patient: hidden in the viewer unless asked, never logged or exported.
PHI_TAGS = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"}
)

WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_uid: str
    series_uid: str
    study_uid: str
    modality: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    instance_number: int | None
    metadata: dict[str, str]


# ----------------------------------------------------------------------------- files


def _expand(paths: Iterable[Path | str], warn: WarnFn) -> list[Path]:
    """Folders (recursively), DICOMDIRs and single files -> the list of candidate files."""
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            dicomdir = p / "DICOMDIR"
            if dicomdir.is_file():
                for f in read_dicomdir(dicomdir, warn):
                    add(f)
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name != "DICOMDIR" and not f.name.startswith("."):
                    add(f)
        elif p.is_file():
            if p.name.upper() == "DICOMDIR":
                for f in read_dicomdir(p, warn):
                    add(f)
            else:
                add(p)
        else:
            warn(f"{p}: no such file or folder")
    return out


def read_dicomdir(path: Path, warn: WarnFn) -> list[Path]:
    """The image files a DICOMDIR references (PS3.3 F.5), relative to its folder."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        warn(f"{path}: cannot read DICOMDIR ({exc})")
        return []
    files = []
    for rec in ds.get("DirectoryRecordSequence", []):
        ref = rec.get("ReferencedFileID")
        if ref is None:
            continue
        parts = (
            [str(x) for x in ref]
            if isinstance(ref, Sequence) and not isinstance(ref, str)
            else [str(ref)]
        )
        f = path.parent.joinpath(*parts)
        if f.is_file():
            files.append(f)
        else:
            warn(f"{path}: DICOMDIR references a missing file {f}")
    return files


def _read_header(path: Path) -> Dataset:
    """Read a file's header, deferring large values (pixel data) so nothing heavy is loaded."""
    try:
        return pydicom.dcmread(path, defer_size="4 KB")
    except InvalidDicomError as exc:
        # Files written without the 128-byte preamble are still common; accept them only
        # if what pydicom then finds looks like a real image object.
        ds = pydicom.dcmread(path, defer_size="4 KB", force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise InvalidDicomError(
                "not a DICOM file (no preamble, no DICOM header found)"
            ) from exc
        return ds


def _str(ds: Dataset, name: str, default: str = "") -> str:
    try:
        v = ds.get(name, default)
    except Exception:
        return default
    if v is None:
        return default
    return str(v).strip()


def _floats(ds: Dataset, name: str, n: int) -> tuple[float, ...] | None:
    try:
        v = ds.get(name)
        if v is None:
            return None
        vals = tuple(
            float(x) for x in (v if isinstance(v, Sequence) and not isinstance(v, str) else [v])
        )
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
        return None
    return vals


def _header(path: Path, ds: Dataset) -> tuple[_Header | None, str | None]:
    """Turn a dataset into a slice header, or say why the file is left out."""
    sop_class = _str(ds, "SOPClassUID")
    for prefix, what in _NON_IMAGE_SOP_PREFIXES:
        if sop_class.startswith(prefix):
            return None, f"{path}: left out, a {what}, not an image"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "DirectoryRecordSequence" in ds:
            return None, None  # a DICOMDIR found while walking a folder: already expanded
        return None, f"{path}: left out, no pixel data"
    image_type = [s.upper() for s in (ds.get("ImageType") or [])] if "ImageType" in ds else []
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return None, f"{path}: left out, a localizer (scout) image"
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        return None, f"{path}: left out, {spp} samples per pixel (colour), not a CT slice"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return None, f"{path}: left out, multi-frame objects ({frames} frames) are not supported"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None, f"{path}: left out, Rows/Columns missing or invalid"
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        return None, f"{path}: left out, matrix {rows} x {cols} outside 1..{MAX_MATRIX}"
    series_uid = _str(ds, "SeriesInstanceUID")
    if not series_uid:
        return None, f"{path}: left out, no SeriesInstanceUID"
    inst: int | None
    try:
        inst = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    pos = _floats(ds, "ImagePositionPatient", 3)
    meta = {t: _str(ds, t) for t in _METADATA_TAGS}
    meta["SliceThickness"] = _str(ds, "SliceThickness")
    meta["PixelSpacing"] = "\\".join(str(x) for x in (ds.get("PixelSpacing") or []))
    return (
        _Header(
            path=path,
            sop_uid=_str(ds, "SOPInstanceUID") or path.stem,
            series_uid=series_uid,
            study_uid=_str(ds, "StudyInstanceUID"),
            modality=_str(ds, "Modality"),
            rows=rows,
            columns=cols,
            orientation=_floats(ds, "ImageOrientationPatient", 6),
            position=(pos[0], pos[1], pos[2]) if pos else None,
            instance_number=inst,
            metadata=meta,
        ),
        None,
    )


# ----------------------------------------------------------------------------- geometry


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal of an image plane from ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient. Received: {tuple(orientation)}")
    return n / norm


def _orientation_key(o: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return None if o is None else tuple(round(x, 2) for x in o)


def _split_groups(headers: list[_Header]) -> list[list[_Header]]:
    """Split one SeriesInstanceUID into parts of one orientation and matrix size."""
    groups: dict[tuple[Any, ...], list[_Header]] = defaultdict(list)
    for h in headers:
        groups[(_orientation_key(h.orientation), h.rows, h.columns)].append(h)
    return sorted(groups.values(), key=len, reverse=True)


def _sort(headers: list[_Header], warn: WarnFn) -> list[_Header]:
    """Sort along the slice normal; fall back to InstanceNumber with a warning."""
    orient = headers[0].orientation
    if orient is not None and all(h.position is not None for h in headers):
        try:
            normal = slice_normal(orient)
        except ValueError:
            normal = None
        if normal is not None:
            return sorted(headers, key=lambda h: float(np.dot(normal, h.position)))  # type: ignore[arg-type]
    warn(
        f"series {headers[0].series_uid}: ImagePositionPatient or ImageOrientationPatient "
        "missing; slices sorted by InstanceNumber"
    )
    return sorted(
        headers, key=lambda h: (h.instance_number is None, h.instance_number or 0, str(h.path))
    )


def _positions(headers: Sequence[_Header]) -> list[float]:
    orient = headers[0].orientation
    if orient is not None and all(h.position is not None for h in headers):
        try:
            normal = slice_normal(orient)
            return [float(np.dot(normal, h.position)) for h in headers]  # type: ignore[arg-type]
        except ValueError:
            pass
    return [float(i) for i in range(len(headers))]


def geometry_warnings(
    positions: Sequence[float],
    orientation: Sequence[float] | None,
    xyz: Sequence[Sequence[float]] | None,
    label: str,
) -> list[str]:
    """Gantry tilt, gaps and uneven spacing: warnings, the series is still scored."""
    out: list[str] = []
    if len(positions) < 2:
        return out
    d = np.diff(np.asarray(positions, dtype=np.float64))
    step = float(np.median(d))
    if step > 0:
        gaps = int(np.sum(d > 1.5 * step))
        if gaps:
            missing = int(np.sum(np.round(d[d > 1.5 * step] / step) - 1))
            out.append(
                f"{label}: {gaps} gap(s) in slice positions (about {missing} missing slice(s) "
                f"at {step:.3g} mm spacing)"
            )
        elif float(np.max(np.abs(d - step))) > max(0.1 * step, 0.01):
            out.append(
                f"{label}: uneven slice spacing ({float(d.min()):.3g} to {float(d.max()):.3g} mm)"
            )
    if orientation is not None and xyz is not None and len(xyz) >= 2:
        normal = slice_normal(orientation)
        delta = np.asarray(xyz[-1], dtype=np.float64) - np.asarray(xyz[0], dtype=np.float64)
        length = np.linalg.norm(delta)
        if length > 1e-6:
            cosang = abs(float(np.dot(delta / length, normal)))
            tilt = math.degrees(math.acos(min(1.0, cosang)))
            if tilt > 0.5:
                out.append(f"{label}: gantry tilt of {tilt:.1f} degrees (slices are sheared)")
    return out


def is_axial(orientation: Sequence[float] | None, tolerance_deg: float = 30.0) -> bool:
    """True when the slice normal lies within ``tolerance_deg`` of the patient's head-feet axis."""
    if orientation is None:
        return True  # unknown: let it through; the caller warns about missing geometry
    n = slice_normal(orientation)
    return abs(float(n[2])) >= math.cos(math.radians(tolerance_deg))


# ----------------------------------------------------------------------------- scanning


def scan(
    paths: Iterable[Path | str] | Path | str,
    warn: WarnFn | None = None,
) -> list[SeriesInfo]:
    """Read headers of every file under ``paths`` and group them into sorted series.

    Returns one :class:`SeriesInfo` per series (largest first within a study).
    Files that are not images, not DICOM or broken are left out with a warning.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s", msg)
        if warn is not None:
            warn(msg)

    headers: list[_Header] = []
    for f in _expand(paths, _warn):
        try:
            ds = _read_header(f)
        except InvalidDicomError as exc:
            _warn(f"{f}: left out, {exc}")
            continue
        except Exception as exc:  # truncated, corrupt, unreadable: the file, not the study
            _warn(f"{f}: left out, cannot read DICOM header ({type(exc).__name__}: {exc})")
            continue
        try:
            h, why = _header(f, ds)
        except Exception as exc:
            h, why = None, f"{f}: left out, malformed header ({type(exc).__name__}: {exc})"
        if why:
            _warn(why)
        if h is not None:
            headers.append(h)

    by_uid: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        by_uid[h.series_uid].append(h)

    infos: list[SeriesInfo] = []
    for uid, hs in by_uid.items():
        groups = _split_groups(hs)
        if len(groups) > 1:
            _warn(
                f"series {uid}: slices differ in orientation or matrix size; "
                f"split into {len(groups)} series"
            )
        for i, g in enumerate(groups):
            series_warn: list[str] = []
            g_sorted = _sort(g, series_warn.append)
            g_sorted = _drop_duplicates(g_sorted, series_warn.append)
            first = g_sorted[0]
            key = uid if i == 0 else f"{uid}#{i + 1}"
            if len(groups) > 1:
                series_warn.append(
                    f"series {uid} was split by orientation/matrix; this part has "
                    f"{len(g_sorted)} of {len(hs)} files"
                )
            infos.append(
                SeriesInfo(
                    key=key,
                    series_uid=uid,
                    study_uid=first.study_uid,
                    modality=first.modality,
                    files=tuple(h.path for h in g_sorted),
                    rows=first.rows,
                    columns=first.columns,
                    metadata=dict(first.metadata),
                    warnings=tuple(series_warn),
                )
            )
            for msg in series_warn:
                log.warning("%s", msg)
    if not infos and not warnings:
        _warn(f"{', '.join(str(p) for p in paths)}: no DICOM files found")
    infos.sort(key=lambda s: (s.study_uid, -s.n_slices, s.key))
    return infos


def _drop_duplicates(headers: list[_Header], warn: WarnFn) -> list[_Header]:
    """Keep one slice per position (and per SOP Instance UID); warn about the rest."""
    out: list[_Header] = []
    seen_uid: set[str] = set()
    last_pos: float | None = None
    positions = _positions(headers)
    has_pos = all(h.position is not None for h in headers)
    for h, p in zip(headers, positions, strict=True):
        if h.sop_uid in seen_uid:
            warn(f"{h.path}: left out, duplicate SOP Instance UID {h.sop_uid}")
            continue
        if has_pos and last_pos is not None and abs(p - last_pos) < 1e-3:
            warn(f"{h.path}: left out, duplicate slice position {p:.2f} mm")
            continue
        seen_uid.add(h.sop_uid)
        last_pos = p
        out.append(h)
    return out


# ----------------------------------------------------------------------------- pixels


def rsna_wrap_fix_applies(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """The RSNA 2019 files whose 12-bit unsigned values wrapped (BitsStored 12,
    PixelRepresentation 0, RescaleIntercept > -100)."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


def to_hu(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    padding_value: float | None = None,
) -> np.ndarray:
    """Stored values -> HU with the modality LUT (PS3.3 C.11.1.1.2), fixes included.

    - RSNA wrap fix: for 12-bit unsigned slices with intercept > -100, add 1000,
      wrap at 4096 and use intercept -1000 (the fix published with the challenge data).
    - Padding (``PixelPaddingValue``) and anything below air becomes air (-1024 HU),
      so -2048 or -3024 outside the field of view never looks like tissue.
    """
    px = np.asarray(stored)
    pad_mask = None if padding_value is None else px == padding_value
    if rsna_wrap_fix_applies(bits_stored, pixel_representation, intercept):
        x = px.astype(np.int32) + 1000
        x[x >= 4096] -= 4096
        hu = x.astype(np.float32) * np.float32(slope) + np.float32(-1000.0)
    else:
        hu = px.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if pad_mask is not None:
        hu[pad_mask] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def _slice_hu(path: Path) -> tuple[np.ndarray, Dataset]:
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise SeriesLoadError(
            f"{path}: pixel data has shape {arr.shape}, expected one 2-D slice", [path]
        )
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols):
        raise SeriesLoadError(
            f"{path}: pixel data {arr.shape} does not match Rows x Columns", [path]
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    pad = ds.get("PixelPaddingValue")
    hu = to_hu(
        arr,
        slope,
        intercept,
        bits_stored=int(ds.get("BitsStored", 16) or 16),
        pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
        padding_value=float(pad) if isinstance(pad, (int, float)) else None,
    )
    return hu, ds


def load_series(
    info: SeriesInfo,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> CTSeries:
    """Decode every slice of a scanned series into a :class:`CTSeries` in HU.

    A slice that fails to decode is left out with a warning; if none decode, raises
    :class:`SeriesLoadError` naming the files.
    """
    slices: list[np.ndarray] = []
    kept: list[tuple[Path, Dataset]] = []
    warnings = list(info.warnings)
    n = len(info.files)
    for i, f in enumerate(info.files):
        if cancelled is not None and cancelled():
            raise SeriesLoadError(f"loading series {info.key} was cancelled", info.files)
        try:
            hu, ds = _slice_hu(f)
        except SeriesLoadError as exc:
            warnings.append(f"{exc}; slice left out")
            continue
        except Exception as exc:
            warnings.append(
                f"{f}: slice left out, cannot decode pixels ({type(exc).__name__}: {exc})"
            )
            continue
        slices.append(hu)
        kept.append((f, ds))
        if progress is not None:
            progress(i + 1, n)
    if not slices:
        raise SeriesLoadError(
            f"series {info.key}: none of its {n} file(s) could be decoded: "
            + "; ".join(w for w in warnings[-3:]),
            info.files,
        )
    for w in warnings[len(info.warnings) :]:
        log.warning("%s", w)

    first = kept[0][1]
    orientation = _floats(first, "ImageOrientationPatient", 6)
    xyz = [_floats(ds, "ImagePositionPatient", 3) for _, ds in kept]
    if orientation is not None and all(p is not None for p in xyz):
        normal = slice_normal(orientation)
        positions = [float(np.dot(normal, p)) for p in xyz]  # type: ignore[arg-type]
        warnings += geometry_warnings(positions, orientation, xyz, f"series {info.key}")  # type: ignore[arg-type]
    else:
        positions = [float(i) for i in range(len(kept))]
    spacing = _floats(first, "PixelSpacing", 2) or (1.0, 1.0)
    if "PixelSpacing" not in first:
        warnings.append(f"series {info.key}: PixelSpacing missing; 1 mm assumed")
    thick_raw = _floats(first, "SliceThickness", 1)
    return CTSeries(
        hu=np.stack(slices).astype(np.float32, copy=False),
        pixel_spacing=(spacing[0], spacing[1]),
        positions=tuple(positions),
        slice_thickness=thick_raw[0] if thick_raw else None,
        orientation=orientation,
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        sop_uids=tuple(_str(ds, "SOPInstanceUID") or f.stem for f, ds in kept),
        files=tuple(f for f, _ in kept),
        metadata=dict(info.metadata),
        warnings=tuple(warnings),
        key=info.key,
    )


def load_study(
    paths: Iterable[Path | str] | Path | str,
    warn: WarnFn | None = None,
) -> list[CTSeries]:
    """Scan ``paths`` and load every series found (those that fail are warned about)."""
    out = []
    for info in scan(paths, warn):
        try:
            out.append(load_series(info))
        except SeriesLoadError as exc:
            log.warning("%s", exc)
            if warn is not None:
                warn(str(exc))
    return out


def analyzability(series: CTSeries | SeriesInfo, min_slices: int = 1) -> list[str]:
    """Reasons why the model cannot read this series as trained (empty list: it can)."""
    reasons = []
    modality = series.modality
    if modality and modality.upper() != "CT":
        reasons.append(f"modality {modality}, the model reads CT only")
    orientation = series.orientation if isinstance(series, CTSeries) else None
    if orientation is not None and not is_axial(orientation):
        reasons.append("not an axial series (a sagittal, coronal or oblique reformat)")
    if series.n_slices < min_slices:
        reasons.append(f"only {series.n_slices} slice(s), fewer than {min_slices}")
    return reasons


def with_warning(series: CTSeries, message: str) -> CTSeries:
    """A copy of the series with one more warning."""
    return replace(series, warnings=(*series.warnings, message))
