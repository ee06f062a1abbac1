"""A worklist of received studies, scored in the background, flagged ones first.

Wire a :class:`~ich_model.pacs_listener.Listener`'s ``on_series_complete`` to
:meth:`Worklist.submit` and every CT series a PACS pushes is scored on the worklist's own
thread (through :func:`ich_model.batch.score_folder`, the same path as ``ich-score``), into
``<results>/<study>/<series>/`` (CSV, summary and, with ``export_dicom``, the SR and key
images ready for :func:`ich_model.pacs.send`). The list survives a restart: it is saved
as JSON after every change, and series that were queued or being scored when the program
stopped are scored again on the next start.

Nothing here imports Qt; ``on_change`` is called from the worker (or the caller's) thread,
so a viewer forwards it through a queued signal. The saved list holds folders, UIDs and
scores, never a patient's name or ID.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ich_model.batch import SeriesOutcome, score_folder
from ich_model.dicom_io import scan

if TYPE_CHECKING:
    from ich_model.predictor import Predictor

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Statuses of a series; the first two mean "not finished yet".
PENDING = ("queued", "scoring")
STATUSES = (*PENDING, "scored", "not analyzable", "failed", "skipped")


@dataclass
class WorklistSeries:
    """One received series and what the model made of it."""

    folder: Path
    series_uid: str = ""
    status: str = "queued"
    description: str = ""
    n_slices: int = 0
    max_any: float | None = None
    flagged: bool = False
    error: str = ""
    results_dir: Path | None = None
    received: float = 0.0  # epoch seconds of the (last) arrival
    scored_at: float | None = None


@dataclass
class WorklistStudy:
    """A received study: its local folder and its series."""

    folder: Path
    study_uid: str = ""
    received: float = 0.0  # epoch seconds of the first series
    series: list[WorklistSeries] = field(default_factory=list)

    @property
    def max_any(self) -> float | None:
        values = [s.max_any for s in self.series if s.max_any is not None]
        return max(values) if values else None

    @property
    def flagged(self) -> bool:
        return any(s.flagged for s in self.series)

    @property
    def status(self) -> str:
        """ "scoring"/"queued" while any series is, else "scored" if any was, else the first."""
        statuses = [s.status for s in self.series]
        for s in ("scoring", "queued", "scored"):
            if s in statuses:
                return s
        return statuses[0] if statuses else "queued"


def ordered(studies: list[WorklistStudy]) -> list[WorklistStudy]:
    """Flagged studies first, most probable first; then the rest, newest first."""
    flagged = sorted((s for s in studies if s.flagged), key=lambda s: -(s.max_any or 0.0))
    rest = sorted((s for s in studies if not s.flagged), key=lambda s: -s.received)
    return flagged + rest


def _series_to_json(s: WorklistSeries) -> dict[str, Any]:
    d = asdict(s)
    d["folder"] = str(s.folder)
    d["results_dir"] = None if s.results_dir is None else str(s.results_dir)
    return d


def _series_from_json(d: dict[str, Any]) -> WorklistSeries:
    d = dict(d)
    d["folder"] = Path(d["folder"])
    d["results_dir"] = Path(d["results_dir"]) if d.get("results_dir") else None
    if d.get("status") not in STATUSES:
        d["status"] = "queued"
    known = WorklistSeries.__dataclass_fields__
    return WorklistSeries(**{k: v for k, v in d.items() if k in known})


class Worklist:
    """Scores submitted series folders one at a time on a background thread.

    ``predictor`` is a loaded :class:`~ich_model.predictor.Predictor` or a function that
    loads one: it is then called on the worker thread the first time something needs
    scoring, so a viewer's window never waits for TensorFlow.
    """

    def __init__(
        self,
        predictor: Predictor | Callable[[], Predictor],
        results_dir: Path,
        state_file: Path | None = None,
        *,
        threshold: float | None = None,
        export_dicom: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._predictor: Predictor | None = None if callable(predictor) else predictor
        self._factory = predictor if callable(predictor) else None
        self.results_dir = Path(results_dir)
        self.state_file = Path(state_file) if state_file else self.results_dir / "worklist.json"
        self.threshold = threshold
        self.export_dicom = export_dicom
        self.on_change = on_change
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._studies: dict[Path, WorklistStudy] = {}
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._queued: set[Path] = set()
        self._busy: Path | None = None
        self._again: set[Path] = set()
        self._stop = threading.Event()
        self._load()
        self._thread = threading.Thread(target=self._run, name="ich-worklist", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, series_folder: Path) -> None:
        """Queue a complete series folder (``<store>/<study>/<series>``); thread-safe.

        A folder submitted again (more instances arrived) is scored again.
        """
        folder = Path(series_folder).resolve()
        now = time.time()
        with self._lock:
            study = self._studies.get(folder.parent)
            if study is None:
                study = self._studies[folder.parent] = WorklistStudy(folder.parent, received=now)
            entry = next((s for s in study.series if s.folder == folder), None)
            if entry is None:
                entry = WorklistSeries(folder)
                study.series.append(entry)
            entry.received = now
            if folder == self._busy:
                self._again.add(folder)  # scored again when the current run ends
            else:
                entry.status = "queued"
                self._enqueue(folder)
            self._save()
        self._changed()

    def studies(self) -> list[WorklistStudy]:
        """A snapshot of the list, in display order (see :func:`ordered`)."""
        with self._lock:
            return ordered(copy.deepcopy(list(self._studies.values())))

    def remove(self, study_folder: Path) -> None:
        """Forget a study (its files stay where they are)."""
        with self._lock:
            self._studies.pop(Path(study_folder).resolve(), None)
            self._save()
        self._changed()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being scored; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._queued or self._busy is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; a series being scored is scored again after the next start."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> Worklist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def _enqueue(self, folder: Path) -> None:
        if folder not in self._queued:
            self._queued.add(folder)
            self._queue.put(folder)

    def _entry(self, folder: Path) -> WorklistSeries | None:
        study = self._studies.get(folder.parent)
        if study is None:
            return None
        return next((s for s in study.series if s.folder == folder), None)

    def _load(self) -> None:
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("worklist %s unreadable, starting empty: %s", self.state_file, exc)
            return
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            log.warning("worklist %s has an unknown format; starting empty", self.state_file)
            return
        for d in raw.get("studies", []):
            try:
                study = WorklistStudy(
                    Path(d["folder"]),
                    d.get("study_uid", ""),
                    float(d.get("received", 0.0)),
                    [_series_from_json(s) for s in d.get("series", [])],
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("worklist %s: skipped a malformed entry: %s", self.state_file, exc)
                continue
            study.series = [s for s in study.series if s.folder.is_dir()]
            if not study.series:
                continue  # deleted from disk since
            self._studies[study.folder] = study
            for s in study.series:
                if s.status in PENDING:
                    s.status = "queued"
                    self._enqueue(s.folder)
        log.info(
            "worklist: %d studies restored, %d series to score",
            len(self._studies),
            len(self._queued),
        )

    def _save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "threshold": self.threshold,
            "studies": [
                {
                    "folder": str(s.folder),
                    "study_uid": s.study_uid,
                    "received": s.received,
                    "series": [_series_to_json(x) for x in s.series],
                }
                for s in self._studies.values()
            ],
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.error("worklist: could not save %s: %s", self.state_file, exc)

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("worklist: on_change failed")

    def _update(self, folder: Path, **values: Any) -> None:
        with self._lock:
            entry = self._entry(folder)
            if entry is not None:
                for k, v in values.items():
                    setattr(entry, k, v)
            self._save()
        self._changed()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._stop.is_set():
            folder = self._queue.get()
            if folder is None:
                break
            with self._lock:
                self._queued.discard(folder)
                if self._entry(folder) is None:  # removed meanwhile
                    self._idle.notify_all()
                    continue
                self._busy = folder
            try:
                self._score(folder)
            except Exception as exc:  # one bad series must never stop the worklist
                log.exception("worklist: scoring a series failed")
                self._update(folder, status="failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._busy = None
                    if folder in self._again and not self._stop.is_set():
                        self._again.discard(folder)
                        entry = self._entry(folder)
                        if entry is not None:
                            entry.status = "queued"
                            self._enqueue(folder)
                    self._idle.notify_all()

    def _load_predictor(self) -> Predictor:
        if self._predictor is None:
            assert self._factory is not None
            self._predictor = self._factory()
        return self._predictor

    def _score(self, folder: Path) -> None:
        self._update(folder, status="scoring", error="")
        warnings: list[str] = []
        infos = [i for i in scan([folder], warn=warnings.append) if i.modality == "CT"]
        if not infos:
            self._update(folder, status="skipped", error="no CT series in this folder")
            return
        with self._lock:
            study = self._studies.get(folder.parent)
            if study is not None:
                study.study_uid = infos[0].study_uid
        try:
            predictor = self._load_predictor()
        except Exception as exc:
            log.error("worklist: the model could not be loaded: %s", exc)
            self._update(folder, status="failed", error=f"model could not be loaded: {exc}")
            return
        threshold = self.threshold if self.threshold is not None else predictor.identity.threshold
        out = self.results_dir / folder.parent.name / folder.name
        shutil.rmtree(out, ignore_errors=True)  # a rescore starts afresh, not resumed
        outcomes: list[SeriesOutcome] = []
        score_folder(
            [folder],
            out,
            predictor,
            cancelled=self._stop.is_set,
            on_series=outcomes.append,
            dicom_out=out / "dicom" if self.export_dicom else None,
        )
        if self._stop.is_set() and not outcomes:
            self._update(folder, status="queued")
            return
        scored = [o for o in outcomes if o.result is not None]
        first = outcomes[0] if outcomes else None
        if scored:
            max_any = max(o.result.series_max()["any"] for o in scored if o.result is not None)
            self._update(
                folder,
                status="scored",
                series_uid=scored[0].info.series_uid,
                description=scored[0].info.description,
                n_slices=sum(o.n_slices for o in scored),
                max_any=max_any,
                flagged=max_any >= threshold,
                results_dir=out,
                scored_at=time.time(),
                error="",
            )
            log.info("worklist: series scored, max any %.3f", max_any)
        else:
            self._update(
                folder,
                status=first.status if first is not None else "failed",
                series_uid=first.info.series_uid if first is not None else "",
                description=first.info.description if first is not None else "",
                error=first.error
                if first is not None
                else "; ".join(warnings) or "nothing to score",
                results_dir=out,
            )
