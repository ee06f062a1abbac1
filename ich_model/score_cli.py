"""``ich-score``: score every CT series under the given paths into CSV and JSON files."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from ich_model.labels import NOT_FOR_DIAGNOSIS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ich-score",
        description=f"Score head CT series for intracranial hemorrhage ({NOT_FOR_DIAGNOSIS}). "
        "Writes predictions.csv (RSNA format), series.csv and summary.json; a run that was "
        "interrupted goes on where it stopped when started again with the same --out.",
    )
    p.add_argument(
        "paths", nargs="+", help="DICOM files, folders (searched recursively) or DICOMDIRs"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default=None, help="weights file (.weights.h5); default: bundled")
    p.add_argument("--batch-size", type=int, default=8, help="slices per model call (default 8)")
    p.add_argument(
        "--force",
        action="store_true",
        help="also score series flagged not analyzable (not CT, not axial, too few slices)",
    )
    p.add_argument(
        "--min-slices",
        type=int,
        default=1,
        help="a series with fewer slices is not analyzable (default 1: the model reads one "
        "slice at a time; 20 keeps to whole-head studies)",
    )
    p.add_argument(
        "--dicom-out",
        default=None,
        help="also write a DICOM Structured Report and key images of every scored series "
        "into this folder (one sub-folder per series), ready to send to a PACS",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Bar:
    def __init__(self, quiet: bool) -> None:
        self.on = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int, slices: int, elapsed: float) -> None:
        if not self.on:
            return
        frac = done / max(total, 1)
        rate = slices / elapsed if elapsed > 0 else 0.0
        left = elapsed / max(frac, 1e-9) * (1 - frac) if done else float("nan")
        n = int(frac * 30)
        sys.stderr.write(
            f"\r[{'#' * n}{'.' * (30 - n)}] {done}/{total} series, {rate:5.1f} slices/s, "
            f"{left:6.0f} s left"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"ich-score: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.min_slices < 1 or args.batch_size < 1:
        print("ich-score: --min-slices and --batch-size must be at least 1", file=sys.stderr)
        return 2
    from ich_model.batch import score_folder
    from ich_model.predictor import Predictor
    from ich_model.weights import WeightsError

    try:
        predictor = Predictor(args.weights, batch_size=args.batch_size)
    except WeightsError as exc:
        print(f"ich-score: {exc}", file=sys.stderr)
        return 2
    if not predictor.identity.trained:
        print(
            "ich-score: WARNING: untrained weights; the probabilities carry no medical meaning",
            file=sys.stderr,
        )
    bar = _Bar(args.quiet)
    stop = threading.Event()
    try:
        summary = score_folder(
            args.paths,
            Path(args.out),
            predictor,
            force=args.force,
            min_slices=args.min_slices,
            progress=bar,
            cancelled=stop.is_set,
            dicom_out=Path(args.dicom_out) if args.dicom_out else None,
        )
    except KeyboardInterrupt:
        stop.set()
        bar.close()
        print("ich-score: interrupted; run the same command again to go on", file=sys.stderr)
        return 1
    bar.close()
    if not args.quiet:
        print(
            f"{summary.scored} of {summary.total_series} series scored "
            f"({summary.skipped_done} from an earlier run), {summary.failed} failed, "
            f"{summary.not_analyzable} not analyzable; results in {args.out}"
        )
        for f in summary.failures:
            print(f"  {f['series_key']}: {f['status']}: {f['error']}")
    return 0 if summary.failed == 0 and summary.not_analyzable == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
