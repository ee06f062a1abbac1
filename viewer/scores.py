"""Per-slice probabilities while they arrive, and the summaries the viewer shows.

The engine's ``ScoreResult`` describes a finished run. While the model is still
running the viewer needs the same summaries (series maximum, flagged slices) over
a partly filled array, so unscored slices are NaN here and every summary skips them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ich_model.labels import LABELS


@dataclass
class LiveScores:
    """Probabilities ``[z, 6]`` in :data:`LABELS` order; NaN where a slice is not scored yet."""

    probabilities: np.ndarray
    complete: bool = False
    finished: bool = False
    seconds: float = 0.0

    @classmethod
    def empty(cls, n_slices: int) -> LiveScores:
        return cls(np.full((n_slices, len(LABELS)), np.nan, dtype=np.float32))

    @property
    def n_slices(self) -> int:
        return int(self.probabilities.shape[0])

    @property
    def n_scored(self) -> int:
        return int(np.sum(~np.isnan(self.probabilities).any(axis=1)))

    def add_batch(self, start: int, probs: np.ndarray) -> None:
        """Store one batch; out-of-range rows (a stale job) are ignored."""
        p = np.asarray(probs, dtype=np.float32)
        stop = min(start + len(p), self.n_slices)
        if 0 <= start < stop:
            self.probabilities[start:stop] = p[: stop - start]

    def finish(self, probs: np.ndarray, complete: bool, seconds: float = 0.0) -> None:
        """The run ended: ``probs`` covers the first ``len(probs)`` slices."""
        self.add_batch(0, probs)
        self.complete = bool(complete) and len(probs) == self.n_slices
        self.finished = True
        self.seconds = seconds

    def row(self, index: int) -> np.ndarray | None:
        """The six probabilities of one slice, or None when it is not scored."""
        if not 0 <= index < self.n_slices:
            return None
        r = self.probabilities[index]
        return None if bool(np.isnan(r).any()) else r

    def series_max(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for i, lab in enumerate(LABELS):
            col = self.probabilities[:, i]
            out[lab] = None if bool(np.isnan(col).all()) else float(np.nanmax(col))
        return out

    def argmax(self, label: str) -> int | None:
        col = self.probabilities[:, LABELS.index(label)]
        if bool(np.isnan(col).all()):
            return None
        return int(np.nanargmax(col))

    def flagged(self, threshold: float) -> dict[str, list[int]]:
        """Slice indices (0-based, feet to head) at or above ``threshold``, per label."""
        with np.errstate(invalid="ignore"):
            above = self.probabilities >= threshold
        return {lab: [int(k) for k in np.flatnonzero(above[:, i])] for i, lab in enumerate(LABELS)}

    def flagged_mask(self, threshold: float) -> np.ndarray:
        """``[z]`` bool: any of the six labels at or above ``threshold``."""
        with np.errstate(invalid="ignore"):
            return np.asarray((self.probabilities >= threshold).any(axis=1))

    def next_flagged(self, index: int, threshold: float, step: int) -> int | None:
        """The nearest flagged slice after (``step`` > 0) or before ``index``, or None."""
        k = np.flatnonzero(self.flagged_mask(threshold))
        if step > 0:
            later = k[k > index]
            return int(later[0]) if len(later) else None
        earlier = k[k < index]
        return int(earlier[-1]) if len(earlier) else None


def compact_ranges(indices: Sequence[int], base: int = 1, limit: int = 8) -> str:
    """``[2, 3, 4, 9]`` -> ``"3–5, 10"`` (shown 1-based); long lists end in "…"."""
    if not len(indices):
        return ""
    runs: list[tuple[int, int]] = []
    for k in sorted(int(i) for i in indices):
        if runs and k == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    parts = [f"{a + base}" if a == b else f"{a + base}–{b + base}" for a, b in runs]
    if len(parts) > limit:
        parts = [*parts[:limit], f"… (+{len(parts) - limit})"]
    return ", ".join(parts)
