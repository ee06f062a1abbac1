"""Tiny hand-made DICOM files for loader tests (the phantom generator makes realistic ones)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def ct_slice(
    path: Path,
    *,
    series_uid: str,
    study_uid: str = "1.2.3.4",
    z: float | None = 0.0,
    instance: int | None = 1,
    rows: int = 32,
    cols: int = 32,
    hu: np.ndarray | float = 40.0,
    orientation: Sequence[float] | None = (1, 0, 0, 0, 1, 0),
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    intercept: float = -1024.0,
    slope: float = 1.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    stored: np.ndarray | None = None,
    with_pixels: bool = True,
    sop_uid: str | None = None,
    xy: tuple[float, float] = (-100.0, -100.0),
) -> Path:
    """Write one CT slice; ``hu`` sets the pixel values (through the rescale) unless ``stored``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-001"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.ImageType = list(image_type)
    if instance is not None:
        ds.InstanceNumber = instance
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if z is not None:
        ds.ImagePositionPatient = [xy[0], xy[1], float(z)]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    if with_pixels:
        if stored is None:
            arr = np.broadcast_to(np.asarray(hu, dtype=np.float64), (rows, cols))
            stored = np.round((arr - intercept) / slope)
        dtype = np.int16 if pixel_representation else np.uint16
        px = np.asarray(stored).astype(dtype)
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pixel_representation
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.PixelData = px.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, n: int = 5, spacing: float = 5.0, **kw: object) -> list[Path]:
    """``n`` slices of one series, values rising with z so the order can be checked."""
    uid = generate_uid()
    out = []
    for k in range(n):
        out.append(
            ct_slice(
                folder / f"s{k:03d}.dcm",
                series_uid=uid,
                z=k * spacing,
                instance=k + 1,
                hu=float(k * 10),
                **kw,
            )  # type: ignore[arg-type]
        )
    return out
