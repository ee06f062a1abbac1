"""Studies straight from the PACS: retrieve + score, against scoring the same study from disk.

Writes one phantom study (default 40 slices of 512 x 512), stores it in a local Orthanc
(``tests/orthanc.py``: loopback only, temporary folder, stopped at the end), then times, as
the median of ``--reps`` runs after one warm-up:

- disk:        ``score_folder`` on the study's folder (read, window, model, CSV);
- C-GET:       ``retrieve_study(method="get")`` into a fresh store, then the same scoring;
- C-MOVE:      ``retrieve_study(method="move")`` through our listener, then the scoring;
- C-STORE:     sending the 40 slices to Orthanc (how long a push takes).

The model is loaded once, before any timing. Without ``--weights`` and without bundled
weights, tiny untrained weights are built (the transfer is what is measured; the model's
share is reported separately).

    python benchmarks/bench_pacs.py [--weights FILE] [--slices 40] [--matrix 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.orthanc

from ich_model import pacs
from ich_model.batch import score_folder
from ich_model.pacs_listener import Listener
from ich_model.phantom import PhantomSpec, write_series
from ich_model.predictor import Predictor
from ich_model.weights import BUNDLED_WEIGHTS
from tests.orthanc import Modality, orthanc_binary, running_orthanc


def tiny_weights(folder: Path) -> Path:
    import keras

    from ich_model.model import ModelConfig, build_model, save_weights

    cfg = ModelConfig(input_size=64, width=0.25, middle_blocks=1)
    keras.utils.set_random_seed(0)
    path = folder / "tiny.weights.h5"
    save_weights(build_model(cfg), cfg, path, trained=False, hu_range=(0.0, 80.0))
    return path


def timed(fn: object, reps: int) -> tuple[float, list[float]]:
    """Median seconds of ``reps`` calls after one warm-up call."""
    assert callable(fn)
    fn(-1)
    runs = []
    for k in range(reps):
        t0 = time.perf_counter()
        fn(k)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--weights", default=None, help="weights file (default: bundled, else tiny)")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if orthanc_binary() is None:
        print("Orthanc is not installed (Debian: apt-get install orthanc)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = BUNDLED_WEIGHTS if BUNDLED_WEIGHTS.exists() else tiny_weights(root)
        pred = Predictor(weights)
        print(f"model: {pred.identity.name} at {pred.input_size} px, {pred.identity.runtime}")
        spec = PhantomSpec.for_matrix(args.matrix, ("subdural",), n_slices=args.slices, seed=0)
        study = write_series(root / "study", spec, patient_id="BENCH-1")
        mb = sum(f.stat().st_size for f in study.files) / 2**20
        print(f"study: {args.slices} slices of {args.matrix}^2, {mb:.1f} MB")

        def from_disk(k: int) -> None:
            score_folder([study.folder], root / f"out-disk-{k}", pred)

        with (
            Listener("ICHBENCH", 0, root / "listener") as listener,
            running_orthanc(root / "orthanc", {"bench": Modality("ICHBENCH", listener.port)}) as o,
        ):
            node = pacs.PacsNode("bench", o.ae_title, "127.0.0.1", o.port, "ICHBENCH")

            def store(_k: int) -> None:
                pacs.send(node, study.files)

            def via(method: str) -> object:
                def run(k: int) -> None:
                    got = pacs.retrieve_study(
                        node,
                        study.study_uid,
                        root / f"store-{method}-{k}",
                        method=method,
                        listener=listener,
                    )
                    score_folder(list(got.series_folders), root / f"out-{method}-{k}", pred)

                return run

            def fetch_only(k: int) -> None:
                pacs.retrieve_study(node, study.study_uid, root / f"fetch-{k}")

            t_store, _ = timed(store, args.reps)
            t_disk, disk_runs = timed(from_disk, args.reps)
            t_get, get_runs = timed(via("get"), args.reps)
            t_move, move_runs = timed(via("move"), args.reps)
            t_fetch, _ = timed(fetch_only, args.reps)

    results = {
        "slices": args.slices,
        "matrix": args.matrix,
        "study_mb": round(mb, 1),
        "runtime": pred.identity.runtime,
        "input_size": pred.input_size,
        "reps": args.reps,
        "seconds_score_from_disk": round(t_disk, 3),
        "seconds_retrieve_get_and_score": round(t_get, 3),
        "seconds_retrieve_move_and_score": round(t_move, 3),
        "seconds_retrieve_get_only": round(t_fetch, 3),
        "seconds_send_study": round(t_store, 3),
        "runs": {"disk": disk_runs, "get": get_runs, "move": move_runs},
    }
    print(f"score from disk:           {t_disk:6.2f} s")
    print(f"C-GET + score:             {t_get:6.2f} s  ({t_get / t_disk:4.2f} x disk)")
    print(f"C-MOVE + score:            {t_move:6.2f} s  ({t_move / t_disk:4.2f} x disk)")
    print(f"C-GET alone:               {t_fetch:6.2f} s  ({mb / t_fetch:5.1f} MB/s)")
    print(f"C-STORE of the study:      {t_store:6.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
