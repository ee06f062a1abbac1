"""Batch scoring throughput against the model's own, and memory over many studies.

Writes phantom studies of 40 slices, then in one run measures:
- the model's own throughput: slices/s of ``Predictor.predict_inputs`` on inputs already
  windowed and resized (no reading);
- the batch pipeline's throughput: slices/s of ``score_folder`` over 10 studies, from DICOM
  on disk to committed CSV rows (reading and windowing overlap the model);
- what each stage costs per slice on one thread (scan, load, windowing) and the most the
  pipeline can reach with those costs on this machine's cores;
- peak resident memory after 5 and after 20 studies (it should not grow with the count).

Both throughputs are the best of ``--repeat`` runs, so that other work on a shared
machine does not decide the ratio.

    python benchmarks/bench_batch.py [--weights FILE] [--studies 10] [--matrix 512] [--repeat 3]
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
from ich_model.dicom_io import load_series, load_study, scan
from ich_model.phantom import PhantomSpec, write_series
from ich_model.predictor import Predictor
from ich_model.runtime import physical_cores

TARGET = 0.90


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_costs(folder: Path, pred: Predictor) -> dict[str, float]:
    """Milliseconds per slice of each stage before the model, each on one thread."""
    t0 = time.perf_counter()
    infos = scan(folder)
    t_scan = time.perf_counter() - t0
    n = sum(i.n_slices for i in infos)
    t_load = t_prep = 0.0
    for info in infos:
        t0 = time.perf_counter()
        series = load_series(info)
        t1 = time.perf_counter()
        for k in range(0, series.n_slices, pred.batch_size):
            pred.preprocess(series.hu[k : k + pred.batch_size])
        t_load += t1 - t0
        t_prep += time.perf_counter() - t1
        del series
    return {"scan": 1e3 * t_scan / n, "load": 1e3 * t_load / n, "windowing": 1e3 * t_prep / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="weights file (default: bundled)")
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="runs of each throughput; best kept")
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
        del series
        pred.predict_inputs(x)  # warm-up
        model_rate = pipe_rate = 0.0
        scored = 0
        for r in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                pred.predict_inputs(x)
            model_rate = max(model_rate, reps * len(x) / (time.perf_counter() - t0))

            t0 = time.perf_counter()
            s = score_folder([ten], root / f"out-ten-{r}", pred)
            pipe_rate = max(pipe_rate, s.slices / (time.perf_counter() - t0))
            scored = s.scored
        print(f"model alone:     {model_rate:6.1f} slices/s")
        print(
            f"batch pipeline:  {pipe_rate:6.1f} slices/s over {scored} studies "
            f"({100 * pipe_rate / model_rate:.0f}% of the model's own; target >= 90%)"
        )

        # why: what the stages cost, and the best the pipeline can do with those costs
        cost = stage_costs(ten, pred)
        cores = physical_cores()
        model_ms = 1e3 / model_rate
        print(
            "per slice, one thread: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in cost.items())
            + f"; model {model_ms:.2f} ms on {cores} cores"
        )
        # the scan runs before anything else; loading and windowing take cores from the model
        best = model_ms + cost["scan"] + (cost["load"] + cost["windowing"]) / cores
        budget = model_ms * (1 / TARGET - 1)
        print(
            f"bound with these costs: {100 * model_ms / best:.0f}% of the model's own "
            f"(scan + (load + windowing) / {cores} cores = "
            f"{cost['scan'] + (cost['load'] + cost['windowing']) / cores:.2f} ms per slice; "
            f"{100 * TARGET:.0f}% allows {budget:.2f} ms)"
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
