"""Writing one study's results: a CSV row per slice and a JSON document.

No patient-identifying tag (``dicom_io.PHI_TAGS``) is ever written; every JSON
carries the "not for diagnostic use" line and, for untrained weights, the warning.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path
from typing import Any

from ich_model import __version__
from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS, UNTRAINED_WARNING
from ich_model.series import CTSeries
from viewer.scores import LiveScores

CSV_COLUMNS: tuple[str, ...] = ("index", "position_mm", "sop_instance_uid", *LABELS)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


def csv_rows(series: CTSeries, scores: LiveScores) -> list[list[str]]:
    """One row per slice (0-based index, feet to head); unscored slices have empty cells."""
    rows = []
    for k in range(series.n_slices):
        probs = scores.row(k)
        cells = [""] * len(LABELS) if probs is None else [f"{float(p):.6f}" for p in probs]
        rows.append([str(k), f"{series.positions[k]:.3f}", series.sop_uids[k], *cells])
    return rows


def write_csv(path: Path | str, series: CTSeries, scores: LiveScores) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(csv_rows(series, scores))
    return path


def series_summary(series: CTSeries) -> dict[str, Any]:
    """Series description without identifying tags."""
    from ich_model.dicom_io import PHI_TAGS  # lazily: see viewer.workers

    meta = {k: v for k, v in series.metadata.items() if k not in PHI_TAGS and v}
    return {
        "key": series.key,
        "series_instance_uid": series.series_uid,
        "study_instance_uid": series.study_uid,
        "n_slices": series.n_slices,
        "rows": int(series.hu.shape[1]),
        "columns": int(series.hu.shape[2]),
        "pixel_spacing_mm": list(series.pixel_spacing),
        "slice_thickness_mm": series.slice_thickness,
        "slice_spacing_mm": series.slice_spacing,
        "orientation": list(series.orientation) if series.orientation else None,
        "metadata": meta,
    }


def results_document(
    series: CTSeries,
    scores: LiveScores,
    model: dict[str, Any],
    threshold: float,
    warnings: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """The JSON export: series, model identity, warnings, per-slice and summary results."""
    trained = bool(model.get("trained", False))
    flagged = scores.flagged(threshold)
    slices = []
    for k in range(series.n_slices):
        probs = scores.row(k)
        slices.append(
            {
                "index": k,
                "position_mm": round(series.positions[k], 3),
                "sop_instance_uid": series.sop_uids[k],
                "probabilities": None
                if probs is None
                else {lab: _num(float(p)) for lab, p in zip(LABELS, probs, strict=True)},
            }
        )
    return {
        "notice": NOT_FOR_DIAGNOSIS,
        "untrained_warning": None if trained else UNTRAINED_WARNING,
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "software": f"ich-viewer {__version__}",
        "series": series_summary(series),
        "model": model,
        "threshold": threshold,
        "complete": scores.complete,
        "n_scored": scores.n_scored,
        "warnings": list(warnings),
        "labels": list(LABELS),
        "series_max": {k: _num(v) for k, v in scores.series_max().items()},
        "flagged_slices": flagged,
        "slices": slices,
    }


def write_json(path: Path | str, document: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
