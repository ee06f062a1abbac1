"""Batch scoring throughput against the model's own, and memory over many studies.

Writes phantom studies of 40 slices, then in one run measures:
- the model's own throughput: slices/s of ``Predictor.predict_inputs`` on inputs already
  windowed and resized (no reading);
- the batch pipeline's throughput: slices/s of ``score_folder`` over 10 studies, from DICOM
  on disk to committed CSV rows (reading and windowing overlap the model);
- peak resident memory after 5 and after 20 studies (it should not grow with the count).

    python benchmarks/bench_batch.py [--weights FILE] [--studies 10] [--matrix 512]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from ich_model.batch import score_folder
from ich_model.dicom_io import load_study
from ich_model.phantom import PhantomSpec, write_series
from ich_model.predictor import Predictor


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="weights file (default: bundled)")
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    pred = Predictor(args.weights, batch_size=args.batch_size)
    print(f"model: {pred.identity.name} at {pred.input_size} px, runtime {pred.identity.runtime}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subtypes = [(), ("subdural",), ("intraparenchymal",), ("epidural",), ("subarachnoid",)]
        n_total = max(args.studies, 20)
        for k in range(n_total):
            spec = PhantomSpec.for_matrix(
                args.matrix, subtypes=subtypes[k % len(subtypes)], n_slices=args.slices, seed=k
            )
            write_series(root / "all" / f"s{k:03d}", spec, patient_id=f"B{k:03d}")
        ten = root / "ten"
        ten.mkdir()
        for k in range(args.studies):
            shutil.copytree(root / "all" / f"s{k:03d}", ten / f"s{k:03d}")

        # the model alone, on ready inputs
        series = load_study(root / "all" / "s000")[0]
        x = pred.preprocess(series.hu)
        pred.predict_inputs(x)  # warm-up
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            pred.predict_inputs(x)
        model_rate = reps * len(x) / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        s = score_folder([ten], root / "out-ten", pred)
        pipe_rate = s.slices / (time.perf_counter() - t0)
        print(f"model alone:     {model_rate:6.1f} slices/s")
        print(
            f"batch pipeline:  {pipe_rate:6.1f} slices/s over {s.scored} studies "
            f"({100 * pipe_rate / model_rate:.0f}% of the model's own; target >= 90%)"
        )

        marks = {}

        def after(outcome: object) -> None:
            done = len(marks_done) + 1
            marks_done.append(done)
            if done in (5, 20):
                marks[done] = (rss_mb(), peak_mb())

        marks_done: list[int] = []
        score_folder([root / "all"], root / "out-all", pred, on_series=after)
        for k in sorted(marks):
            print(
                f"after {k:2d} studies: resident {marks[k][0]:7.0f} MB, peak {marks[k][1]:7.0f} MB"
            )
        if 5 in marks and 20 in marks:
            growth = marks[20][0] - marks[5][0]
            print(f"resident growth from 5 to 20 studies: {growth:+.0f} MB")


if __name__ == "__main__":
    main()
