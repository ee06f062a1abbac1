"""Small frozen data types passed between the loader, the model and the apps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class SeriesLoadError(Exception):
    """A series (or a file) cannot be loaded; the message names the file(s) and the reason."""

    def __init__(self, message: str, paths: Sequence[Path | str] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(Path(p) for p in paths)


@dataclass(frozen=True)
class SeriesInfo:
    """A series found by scanning headers, before any pixel is decoded."""

    key: str  # SeriesInstanceUID, with a suffix when one UID had to be split
    series_uid: str
    study_uid: str
    modality: str
    files: tuple[Path, ...]  # sorted along the slice normal
    rows: int
    columns: int
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = ()
    # ImageOrientationPatient of the first slice (None: unknown), so a reformat can be
    # flagged "not analyzable" before any pixel is decoded
    orientation: tuple[float, ...] | None = None

    @property
    def n_slices(self) -> int:
        return len(self.files)

    @property
    def description(self) -> str:
        return self.metadata.get("SeriesDescription", "")


@dataclass(frozen=True)
class CTSeries:
    """One loaded series: HU volume ``[z, y, x]`` sorted along the slice normal (feet to head)."""

    hu: np.ndarray  # float32, HU, padding set to air
    pixel_spacing: tuple[float, float]  # (row, column) spacing in mm
    positions: tuple[float, ...]  # position of each slice along the normal, mm
    slice_thickness: float | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 values)
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = ()
    key: str = ""

    def __post_init__(self) -> None:
        n = self.hu.shape[0]
        if self.hu.ndim != 3:
            raise ValueError(f"hu must be [z, y, x]. Received: shape={self.hu.shape}")
        for name in ("positions", "sop_uids", "files"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} slices")

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def modality(self) -> str:
        return self.metadata.get("Modality", "")

    @property
    def description(self) -> str:
        return self.metadata.get("SeriesDescription", "")

    @property
    def slice_spacing(self) -> float | None:
        """Median distance between neighbouring slices in mm (None for one slice)."""
        if len(self.positions) < 2:
            return None
        return float(np.median(np.abs(np.diff(self.positions))))
