"""Batch scoring of folders: the engine behind ``ich-score`` and the viewer's batch dialog.

Outputs, in the output folder:

- ``predictions.csv``: RSNA submission format (``ID,Label`` with ``ID_<SOPInstanceUID>_<label>``),
  one row per slice and label;
- ``series.csv``: one row per series (UIDs, description, slices, maximum per label, status,
  the error or the warnings);
- ``summary.json``: model identity, counts, failures, timings.

Each series' rows are appended in one write and committed by a line in a journal
(``.ich-score-journal.jsonl``) after they reach the disk. A run killed at any moment leaves
at most one uncommitted block, which the next run cuts off before it goes on; finished
series are skipped, so a resumed run ends with exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ich_model import __version__
from ich_model.dicom_io import MIN_SLICES, analyzability, load_series, scan, scored_on_request
from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS
from ich_model.predictor import Predictor, ScoreResult
from ich_model.series import CTSeries, SeriesInfo, SeriesLoadError

log = logging.getLogger(__name__)

JOURNAL = ".ich-score-journal.jsonl"
SERIES_COLUMNS = (
    "study_uid",
    "series_uid",
    "series_key",
    "description",
    "n_slices",
    *(f"max_{lab}" for lab in LABELS),
    "flagged_slices_any",
    "status",
    "error",
    "warnings",
)


@dataclass
class SeriesOutcome:
    """One finished series, as written to ``series.csv``."""

    info: SeriesInfo
    status: str  # "scored", "failed", "not analyzable", "cancelled"
    result: ScoreResult | None = None
    error: str = ""
    warnings: tuple[str, ...] = ()
    n_slices: int = 0

    def row(self, threshold: float) -> dict[str, Any]:
        smax = self.result.series_max() if self.result is not None else {}
        flagged = self.result.flagged(threshold)["any"] if self.result is not None else []
        return {
            "study_uid": self.info.study_uid,
            "series_uid": self.info.series_uid,
            "series_key": self.info.key,
            "description": self.info.description,
            "n_slices": self.n_slices or self.info.n_slices,
            **{f"max_{lab}": f"{smax[lab]:.6f}" if lab in smax else "" for lab in LABELS},
            "flagged_slices_any": len(flagged),
            "status": self.status,
            "error": self.error,
            "warnings": " | ".join(self.warnings),
        }


@dataclass
class BatchSummary:
    total_series: int = 0
    scored: int = 0
    failed: int = 0
    not_analyzable: int = 0
    skipped_done: int = 0
    slices: int = 0
    slices_this_run: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    scan_warnings: list[str] = field(default_factory=list)


ProgressFn = Callable[[int, int, int, float], None]  # series done, total, slices done, elapsed


def rsna_image_id(sop_uid: str) -> str:
    """The RSNA 2019 image ID of a slice: ``ID_<SOPInstanceUID>``, except for the challenge's
    own files, whose SOPInstanceUID already is that ID (``ID_<hex>``)."""
    return sop_uid if sop_uid.startswith("ID_") else f"ID_{sop_uid}"


def prediction_rows(result: ScoreResult) -> str:
    """The RSNA submission rows of one series, as CSV text."""
    buf = io.StringIO()
    for uid, probs in zip(result.sop_uids, result.probabilities, strict=True):
        image_id = rsna_image_id(uid)
        for lab, p in zip(LABELS, probs, strict=True):
            buf.write(f"{image_id}_{lab},{float(p):.6f}\n")
    return buf.getvalue()


class BatchWriter:
    """Appends committed series blocks to the outputs; recovers from an interrupted run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.pred = out / "predictions.csv"
        self.series = out / "series.csv"
        self.journal = out / JOURNAL
        self.done: dict[str, dict[str, Any]] = {}
        self._recover()

    def _recover(self) -> None:
        """Read the journal and cut both CSVs back to what it committed."""
        pred_end, series_end = 0, 0
        if self.journal.exists():
            good = b""
            with open(self.journal, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # torn last line: not committed
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.done[rec["key"]] = rec
                    pred_end, series_end = rec["pred_end"], rec["series_end"]
                    good += line
            with open(self.journal, "wb") as f:
                f.write(good)
        for path, end, header in (
            (self.pred, pred_end, "ID,Label\n"),
            (self.series, series_end, ",".join(SERIES_COLUMNS) + "\n"),
        ):
            if end == 0:
                with open(path, "w", encoding="utf-8", newline="") as f:
                    f.write(header)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                with open(path, "r+b") as f:
                    f.truncate(end)
        if self.done:
            log.info("resuming: %d series already finished in %s", len(self.done), self.out)

    def commit(self, outcome: SeriesOutcome, threshold: float) -> None:
        pred_text = prediction_rows(outcome.result) if outcome.result is not None else ""
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=SERIES_COLUMNS, lineterminator="\n").writerow(
            outcome.row(threshold)
        )
        for path, text in ((self.pred, pred_text), (self.series, buf.getvalue())):
            with open(path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        rec = {
            "key": outcome.info.key,
            "status": outcome.status,
            "slices": outcome.n_slices,
            "error": outcome.error,
            "pred_end": self.pred.stat().st_size,
            "series_end": self.series.stat().st_size,
        }
        with open(self.journal, "ab") as f:
            f.write((json.dumps(rec) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done[outcome.info.key] = rec


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _load(info: SeriesInfo, cancelled: Callable[[], bool] | None) -> CTSeries:
    return load_series(info, cancelled=cancelled)


def _prefetched(
    todo: Sequence[SeriesInfo],
    cancelled: Callable[[], bool] | None,
) -> Iterator[tuple[SeriesInfo, CTSeries | None, str]]:
    """Series loaded one ahead on a helper thread, so reading overlaps the model's work."""
    if not todo:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="ich-load") as pool:
        fut: Future[CTSeries] = pool.submit(_load, todo[0], cancelled)
        for k, info in enumerate(todo):
            try:
                series: CTSeries | None = fut.result()
                err = ""
            except SeriesLoadError as exc:
                series, err = None, str(exc)
            except Exception as exc:  # a bad study must never stop the batch
                series, err = None, f"{type(exc).__name__}: {exc}"
            if k + 1 < len(todo):
                fut = pool.submit(_load, todo[k + 1], cancelled)
            yield info, series, err


def score_folder(
    inputs: Sequence[Path | str],
    out: Path,
    predictor: Predictor,
    *,
    force: bool = False,
    min_slices: int = MIN_SLICES,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_series: Callable[[SeriesOutcome], None] | None = None,
    dicom_out: Path | None = None,
) -> BatchSummary:
    """Score every series under ``inputs`` into ``out``; resumes a run already there.

    With ``dicom_out``, each scored series also gets a Structured Report and key images
    (``ich_model.dicom_export``) in ``dicom_out/<series UID>/``, written before the series
    is committed so a resumed run never leaves a half-written folder behind. A series with
    fewer than ``min_slices`` slices is not analyzable (1 by default: the model reads one
    slice at a time; 20 asks for whole-head studies).
    """
    t0 = time.perf_counter()
    summary = BatchSummary()
    infos = scan(inputs, warn=summary.scan_warnings.append)
    writer = BatchWriter(out)
    summary.total_series = len(infos)
    todo = [i for i in infos if i.key not in writer.done]
    summary.skipped_done = len(infos) - len(todo)
    for rec in writer.done.values():
        _count(summary, rec["status"], rec.get("slices", 0), rec.get("error", ""), rec["key"])
    threshold = predictor.identity.threshold
    done_series = summary.skipped_done
    for info, series, err in _prefetched(todo, cancelled):
        if cancelled is not None and cancelled():
            break
        outcome = _score_one(info, series, err, predictor, force, min_slices, cancelled)
        if outcome.status == "cancelled":
            break
        if dicom_out is not None and series is not None and outcome.result is not None:
            outcome = _export(outcome, series, dicom_out)
        writer.commit(outcome, threshold)
        _count(summary, outcome.status, outcome.n_slices, outcome.error, info.key)
        if outcome.result is not None:
            summary.model_seconds += outcome.result.seconds
            summary.slices_this_run += outcome.n_slices
        done_series += 1
        if on_series is not None:
            on_series(outcome)
        if progress is not None:
            progress(done_series, len(infos), summary.slices, time.perf_counter() - t0)
        summary.seconds = time.perf_counter() - t0
        _write_json_atomic(out / "summary.json", summary_json(summary, predictor, inputs))
    summary.seconds = time.perf_counter() - t0
    _write_json_atomic(out / "summary.json", summary_json(summary, predictor, inputs))
    return summary


def _score_one(
    info: SeriesInfo,
    series: CTSeries | None,
    err: str,
    predictor: Predictor,
    force: bool,
    min_slices: int,
    cancelled: Callable[[], bool] | None,
) -> SeriesOutcome:
    if series is None:
        return SeriesOutcome(info, "failed", error=err, warnings=info.warnings)
    reasons = analyzability(series, min_slices)
    if reasons and not force:
        return SeriesOutcome(
            info,
            "not analyzable",
            error="; ".join(reasons),
            warnings=series.warnings,
            n_slices=series.n_slices,
        )
    warnings = series.warnings
    if reasons:  # the user insisted (force): the reasons stay with the scores
        warnings = (*warnings, scored_on_request(reasons))
    try:
        result = predictor.score_series(series, cancelled=cancelled)
    except Exception as exc:
        log.exception("model failed on series %s", info.key)
        return SeriesOutcome(info, "failed", error=f"model error: {exc}", warnings=warnings)
    if not result.complete:
        return SeriesOutcome(info, "cancelled")
    return SeriesOutcome(info, "scored", result=result, warnings=warnings, n_slices=series.n_slices)


def _export(outcome: SeriesOutcome, series: CTSeries, dicom_out: Path) -> SeriesOutcome:
    """Write the DICOM SR and key images into a fresh folder, renamed into place when whole."""
    import shutil

    from ich_model.dicom_export import export_dicom

    assert outcome.result is not None
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in outcome.info.key)
    final = dicom_out / safe
    tmp = dicom_out / f".{safe}.partial"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        export_dicom(series, outcome.result, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("series %s: DICOM export failed: %s", outcome.info.key, exc)
        outcome.warnings = (*outcome.warnings, f"DICOM export failed: {exc}")
    return outcome


def _count(summary: BatchSummary, status: str, slices: int, error: str, key: str) -> None:
    if status == "scored":
        summary.scored += 1
        summary.slices += int(slices)
    elif status == "not analyzable":
        summary.not_analyzable += 1
        summary.failures.append({"series_key": key, "status": status, "error": error})
    else:
        summary.failed += 1
        summary.failures.append({"series_key": key, "status": status, "error": error})


def summary_json(
    summary: BatchSummary, predictor: Predictor, inputs: Sequence[Path | str]
) -> dict[str, Any]:
    return {
        "notice": NOT_FOR_DIAGNOSIS,
        "software": f"ich-second-opinion {__version__}",
        "model": predictor.identity.to_dict(),
        "inputs": [str(p) for p in inputs],
        "series_total": summary.total_series,
        "series_scored": summary.scored,
        "series_failed": summary.failed,
        "series_not_analyzable": summary.not_analyzable,
        "series_resumed_from_earlier_run": summary.skipped_done,
        "slices_scored": summary.slices,
        "seconds_total": round(summary.seconds, 3),
        "seconds_model": round(summary.model_seconds, 3),
        "slices_per_second": (
            round(summary.slices_this_run / summary.seconds, 3) if summary.seconds else None
        ),
        "failures": summary.failures,
        "skipped_files": summary.scan_warnings,
    }
