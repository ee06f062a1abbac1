"""Inference speed on this CPU against its own matrix-multiply rate and against plain Keras.

One run prints:
- numpy's float32 matmul GFLOP/s (the machine's practical limit);
- slices/s of Keras ``predict``, of ``tf.function``, of the default runtime (ONNX Runtime
  float32 on a CPU) and of the int8 model, at batch 1 and at ``--batch-size``; the
  model's FLOPs per slice (counted on the ONNX graph), the GFLOP/s reached and their
  fraction of the matmul rate;
- how much of the per-slice time windowing and resizing costs;
- open-to-probabilities seconds for the 238-slice CQ500 series (when
  ../shared/data/cq500-mixed is there) and for a 40-slice phantom study;
- peak resident memory of each measurement (each runs in its own process).

By default the model is the paper's full-width Xception-LSTM at 299 px with random weights
(timing does not depend on training), kept in the cache folder so reruns skip the
conversion. Pause other CPU-heavy jobs for stable numbers.

    python benchmarks/bench_inference.py [--size 299] [--weights FILE] [--batch-size 8]
        [--quick] [--no-int8] [--int8-accept [DATA ...]]

The int8 line times the int8 model the runtime would use (shipped next to the weights or
in the cache, accepted by ``ich-train quantize`` for these weights and this kind of CPU)
when there is one; otherwise it quantises one for timing only (calibrated on rsna-png or
phantom slices), and says that it is not accepted. ``--int8-accept`` runs the acceptance
check itself, with the code of ``ich-train quantize`` (the weights' own validation split,
rebuilt from their manifest; DATA replaces the recorded folders), and records the verdict
next to the int8 model in the cache folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CQ500 = SHARED / "cq500-mixed"
RSNA_PNG = SHARED / "rsna-png"
RESULT = "BENCH-RESULT "


def peak_mb() -> float:
    """Peak resident memory of this process, MB.

    VmHWM rather than ``getrusage``: ru_maxrss survives exec, so a child forked from a
    parent holding TensorFlow would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- measurements


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of float32 square matmul rate, numpy's BLAS on all cores."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _inputs(n: int, size: int) -> np.ndarray:
    """Phantom slices through the real preprocessing (values like real inputs)."""
    from ich_model.phantom import render_slice
    from ich_model.windowing import model_input

    rng = np.random.default_rng(0)
    hu = [render_slice(rng, 512, ("subdural",), level=0.55)[0] for _ in range(min(n, 4))]
    return np.stack([model_input(hu[k % len(hu)], size, (0.0, 80.0)) for k in range(n)])


def _throughput(predict: Any, size: int, batch: int, n: int, passes: int = 5) -> float:
    """slices/s over ``n`` slices in batches, after one warm-up batch; the best of
    ``passes`` short passes, so that other jobs on a shared machine hurt it less."""
    x = _inputs(batch, size)
    predict(x)
    steps = max(1, n // batch)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(steps):
            predict(x)
        best = min(best, time.perf_counter() - t0)
    return steps * batch / best


def child_speed(kind: str, weights: str, batch: int, n: int) -> dict[str, Any]:
    from ich_model.weights import read_manifest

    manifest, wpath = read_manifest(weights)
    size = manifest.input_size
    t0 = time.perf_counter()
    if kind in ("keras-predict", "tf-function"):
        from ich_model.runtime import TensorflowBackend, build_keras

        model = build_keras(manifest, wpath)
        if kind == "keras-predict":

            def predict(x: np.ndarray) -> Any:
                return model.predict(x, batch_size=batch, verbose=0)

            runtime = "keras predict"
        else:
            backend = TensorflowBackend(model)
            predict = backend.predict
            runtime = backend.description
    else:
        from ich_model.predictor import Predictor

        p = Predictor(weights, batch_size=batch, runtime="onnx")
        predict, runtime = p.predict_inputs, p.runtime
    load_s = time.perf_counter() - t0
    sps = _throughput(predict, size, batch, n)
    return {"slices_per_s": sps, "load_s": load_s, "runtime": runtime, "peak_mb": peak_mb()}


def child_interleaved(weights: str, batch: int, rounds: int) -> dict[str, Any]:
    """Keras predict, tf.function and ONNX Runtime taking turns in one process.

    On a shared machine, separate runs see different loads; alternating batch by batch
    and keeping each one's best gives the fairest ratio.
    """
    from ich_model.runtime import OnnxBackend, TensorflowBackend, build_keras, find_cached
    from ich_model.weights import read_manifest

    manifest, wpath = read_manifest(weights)
    path = find_cached(manifest, wpath)
    if path is None:
        return {"skipped": "no converted model"}
    model = build_keras(manifest, wpath)
    tfb, ortb = TensorflowBackend(model), OnnxBackend(path)
    x = _inputs(batch, manifest.input_size)
    fns = {
        "keras-predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        "tf-function": lambda: tfb.predict(x),
        "onnx-float32": lambda: ortb.predict(x),
    }
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return {name: batch / t for name, t in best.items()}


def child_e2e(kind: str, weights: str, batch: int, folder: str) -> dict[str, Any]:
    """Open a study folder and score its largest series: what a user waits for."""
    from ich_model.dicom_io import load_series, scan
    from ich_model.predictor import Predictor

    t0 = time.perf_counter()
    p = Predictor(weights, batch_size=batch)
    t1 = time.perf_counter()
    infos = scan(folder)
    info = max(infos, key=lambda i: i.n_slices)
    series = load_series(info)
    t2 = time.perf_counter()
    result = p.score_series(series)
    t3 = time.perf_counter()
    assert result.complete and np.isfinite(result.probabilities).all()
    hu = series.hu
    t_pre = min(_timed(lambda: p.preprocess(hu)) for _ in range(2))
    return {
        "n_slices": series.n_slices,
        "matrix": list(hu.shape[1:]),
        "load_model_s": t1 - t0,
        "read_s": t2 - t1,
        "score_s": t3 - t2,
        "open_to_probabilities_s": t3 - t1,
        "preprocess_ms_per_slice": 1000 * t_pre / series.n_slices,
        "score_ms_per_slice": 1000 * (t3 - t2) / series.n_slices,
        "runtime": p.runtime,
        "peak_mb": peak_mb(),
    }


def child_convert(weights: str) -> dict[str, Any]:
    """Build the default runtime (converting when the cache lacks it); FLOPs from the graph."""
    from ich_model.predictor import Predictor
    from ich_model.runtime import OnnxBackend

    t0 = time.perf_counter()
    p = Predictor(weights)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "runtime": p.runtime}
    backend = p._backend
    if isinstance(backend, OnnxBackend):
        out["onnx"] = str(backend.path)
        out["gflop_per_slice"] = onnx_gflop(backend.path)
    out["peak_mb"] = peak_mb()
    return out


def onnx_gflop(path: Path) -> float:
    """Multiply-adds x 2 of the convolutions, LSTM and dense layers for one slice."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.dim_value:
                dim.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]
    }
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += 2.0 * np.prod(shapes[node.output[0]]) * np.prod(inits[node.input[1]][1:])
        elif node.op_type == "LSTM":
            w, r = inits[node.input[1]], inits[node.input[2]]
            steps = shapes[node.input[0]][0]
            total += 2.0 * steps * (np.prod(w[1:]) + np.prod(r[1:]))
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            total += 2.0 * np.prod(inits[node.input[1]])
    return total / 1e9


def _rsna_png(ids: list[str], size: int, hu_range: tuple[float, float]) -> np.ndarray:
    import cv2

    from ich_model.windowing import model_input, uint8_to_hu

    out = np.empty((len(ids), size, size, 3), np.float32)
    for k, i in enumerate(ids):
        path = RSNA_PNG / "images" / f"{i}.png"
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise OSError(f"{path}: cannot read the image")
        out[k] = model_input(uint8_to_hu(img, 0.0, 80.0), size, hu_range)
    return out


def child_int8(weights: str, n_calibration: int, accept: bool, data: list[str]) -> dict[str, Any]:
    """The int8 model to time: with ``accept``, quantised and judged as ``ich-train
    quantize`` does (into the cache folder); else the accepted one if there is one; else
    quantised for timing only (calibrated on rsna-png or phantom slices)."""
    from ich_model.runtime import (
        accepted_int8,
        load_onnx_float32,
        onnx_file_name,
        quantize_int8,
        writable_cache_dir,
    )
    from ich_model.weights import read_manifest

    manifest, wpath = read_manifest(weights)
    size, hu_range = manifest.input_size, manifest.hu_range or (0.0, 80.0)
    t0 = time.perf_counter()
    out: dict[str, Any]
    if accept:
        from training.quantize import quantize

        result = quantize(
            manifest,
            wpath,
            writable_cache_dir(),
            data=data or None,
            n_calibration=n_calibration,
            command="benchmarks/bench_inference.py --int8-accept",
        )
        out = {
            "report": result.report.to_dict(),
            "calibration": "training side of the weights' split",
            "path": str(result.int8_path),
        }
    elif (accepted := accepted_int8(manifest, wpath)) is not None:
        out = {"report": None, "accepted": str(accepted), "calibration": "accepted model"}
    else:
        if RSNA_PNG.is_dir():
            with open(RSNA_PNG / "labels.csv", newline="") as f:
                ids = [r["ID"] for r in csv.DictReader(f)][:n_calibration]
            calib_x, source = _rsna_png(ids, size, hu_range), "rsna-png"
        else:
            calib_x, source = _inputs(n_calibration, size), "phantom"
        backend = load_onnx_float32(manifest, wpath).backend
        out_path = writable_cache_dir() / onnx_file_name(manifest, "int8")
        quantize_int8(backend.path, out_path, calib_x, manifest)  # type: ignore[attr-defined]
        out = {"calibration": source, "report": None}
    out["quantise_s"] = time.perf_counter() - t0
    out["peak_mb"] = peak_mb()
    return out


def child_int8_speed(weights: str, batch: int, n: int) -> dict[str, Any]:
    """int8 speed: the accepted model (what the app would run) if there is one, else
    whichever int8 file is there, marked as not accepted."""
    from ich_model.runtime import OnnxBackend, accepted_int8, find_cached
    from ich_model.weights import read_manifest

    manifest, wpath = read_manifest(weights)
    path = accepted_int8(manifest, wpath)
    accepted = path is not None
    if path is None:
        path = find_cached(manifest, wpath, "int8")
    if path is None:
        return {"skipped": "no int8 model"}
    backend = OnnxBackend(path, precision="int8")
    sps = _throughput(backend.predict, manifest.input_size, batch, n)
    return {
        "slices_per_s": sps,
        "runtime": backend.description,
        "accepted": accepted,
        "path": str(path),
        "peak_mb": peak_mb(),
    }


# ----------------------------------------------------------------------------- driver


def _child(args: list[str], timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return dict(json.loads(line[len(RESULT) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _default_weights(size: int, folder: Path) -> Path:
    """The paper's full-width model at ``size`` with seeded random weights, made once."""
    path = folder / f"bench-xception-lstm-{size}.weights.h5"
    if path.is_file():
        return path
    import keras

    from ich_model.model import ModelConfig, build_model, save_weights

    cfg = ModelConfig(input_size=size)
    keras.utils.set_random_seed(0)
    save_weights(build_model(cfg), cfg, path, trained=False, hu_range=(0.0, 80.0))
    return path


def _phantom_study(folder: Path) -> Path:
    from ich_model.phantom import PhantomSpec, write_series

    study = folder / "phantom-40"
    if not study.is_dir():
        write_series(study, PhantomSpec(n_slices=40, subtypes=("subdural",), seed=3))
    return study


def _fmt_speed(name: str, r: dict[str, Any], gflop: float, mm: float) -> str:
    if "slices_per_s" not in r:
        return f"  {name:<34} {r.get('skipped') or r.get('error')}"
    sps = r["slices_per_s"]
    g = sps * gflop
    return (
        f"  {name:<34} {sps:6.2f} slices/s  {g:6.1f} GFLOP/s  {g / mm:5.0%} of matmul"
        f"  peak {r['peak_mb']:6.0f} MB"
    )


def run(args: argparse.Namespace) -> int:
    cache = Path(os.environ.get("ICH_CACHE_DIR") or tempfile.gettempdir()) / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    if args.weights:
        weights = Path(args.weights)
    else:
        made = _child(["make-weights", str(args.size), str(cache)])
        if "error" in made:
            print(f"cannot make the benchmark weights: {made['error']}")
            return 1
        weights = Path(made["weights"])
    w = str(weights)
    bs = args.batch_size
    n = 8 if args.quick else 16
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
        f"weights {weights.name}; batch sizes 1 and {bs}"
    )

    mm = _child(["matmul"])
    print(f"numpy float32 matmul (2048^3): {mm['gflops']:.1f} GFLOP/s")
    conv = _child(["convert", w])
    if "error" in conv:
        print(f"default runtime failed: {conv['error']}")
        return 1
    gflop = conv.get("gflop_per_slice") or 0.0
    print(
        f"default runtime: {conv['runtime']}; ready in {conv['load_s']:.1f} s "
        f"(includes the one-time conversion if it was not cached); "
        f"model {gflop:.2f} GFLOP/slice"
    )
    if not gflop:
        gflop = 16.7 * (args.size / 299) ** 2  # the full-width model, when the graph is absent

    results: dict[str, dict[str, Any]] = {}
    kinds = ["keras-predict", "tf-function", "onnx-float32"]
    if not args.no_int8:
        accept = args.int8_accept is not None
        n_cal = (64 if args.quick else 256) if accept else (16 if args.quick else 64)
        q = _child(["int8", w, str(n_cal), "accept" if accept else "", *(args.int8_accept or [])])
        if "error" in q:
            print(f"int8 quantisation failed: {q['error']}")
        else:
            rep = q.get("report")
            if q.get("accepted"):
                print(f"int8: the accepted model {q['accepted']} (ich-train quantize)")
            else:
                print(
                    f"int8: quantised in {q['quantise_s']:.0f} s, calibrated on "
                    f"{q['calibration']}"
                    + (
                        f"; acceptance on {rep['n_slices']} validation slices: AUC(any) "
                        f"{rep['auc_any_int8']:.4f} vs {rep['auc_any_float32']:.4f}, weighted "
                        f"log loss {rep['log_loss_int8']:.4f} vs {rep['log_loss_float32']:.4f}"
                        f" -> {'ACCEPTED' if rep['accepted'] else 'not accepted'} "
                        f"({rep['reason']})"
                        if rep
                        else "; not accepted: timing only (ich-train quantize judges it)"
                    )
                )
            kinds.append("onnx-int8")
    print(f"throughput (best of 5 passes over {n} slices; each line its own process):")
    for batch in (1, bs):
        for kind in kinds:
            if kind == "onnx-int8":
                r = _child(["int8-speed", w, str(batch), str(max(n, batch))])
                if "accepted" in r:
                    kind_name = "onnx-int8" + ("" if r["accepted"] else " (not accepted)")
                    results[f"{kind}@{batch}"] = r
                    print(_fmt_speed(f"{kind_name} batch {batch}", r, gflop, mm["gflops"]))
                    continue
            else:
                slices = max(n // (4 if kind == "keras-predict" and batch == 1 else 1), batch)
                r = _child(["speed", kind, w, str(batch), str(slices)])
            results[f"{kind}@{batch}"] = r
            print(_fmt_speed(f"{kind} batch {batch}", r, gflop, mm["gflops"]))

    inter = _child(["interleaved", w, str(bs), str(3 if args.quick else 8)])
    if "error" not in inter and "skipped" not in inter:
        print(
            f"interleaved in one process at batch {bs} (best of each): "
            + ", ".join(f"{k} {v:.2f} slices/s" for k, v in inter.items())
            + f"; ONNX Runtime {inter['onnx-float32'] / inter['keras-predict']:.2f}x Keras "
            f"predict, {inter['onnx-float32'] / inter['tf-function']:.2f}x tf.function"
        )
        results["interleaved"] = inter

    studies = [("40-slice phantom (512 px)", str(_phantom_study(cache)))]
    if CQ500.is_dir():
        studies.append(("CQ500 238-slice series", str(CQ500)))
    else:
        print(f"  ({CQ500} absent: CQ500 timing skipped)")
    print(f"open to probabilities (default runtime, batch {bs}):")
    for name, folder in studies:
        r = _child(["e2e", "default", w, str(bs), folder])
        if "error" in r:
            print(f"  {name}: {r['error']}")
            continue
        share = r["preprocess_ms_per_slice"] / r["score_ms_per_slice"]
        print(
            f"  {name:<26} {r['open_to_probabilities_s']:6.2f} s "
            f"(read {r['read_s']:.2f} s, score {r['score_s']:.2f} s for {r['n_slices']} slices); "
            f"model load {r['load_model_s']:.2f} s; windowing {r['preprocess_ms_per_slice']:.1f} "
            f"ms/slice = {share:.1%} of the per-slice time; peak {r['peak_mb']:.0f} MB; "
            f"{r['runtime']}"
        )
        results[f"e2e {name}"] = r

    base = results.get(f"keras-predict@{bs}", {}).get("slices_per_s")
    best = results.get(f"onnx-float32@{bs}", {}).get("slices_per_s")
    if base and best:
        print(
            f"summary: ONNX Runtime float32 at batch {bs}: "
            f"{best * gflop / mm['gflops']:.0%} of the matmul rate, "
            f"{best / base:.2f}x Keras predict"
            + (
                f", int8 {results[f'onnx-int8@{bs}']['slices_per_s'] / best:.2f}x float32"
                if "slices_per_s" in results.get(f"onnx-int8@{bs}", {})
                else ""
            )
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul": mm, "convert": conv, **results}, indent=2))
    return 0


def child_main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "matmul":
        out: dict[str, Any] = {"gflops": matmul_gflops()}
    elif kind == "convert":
        out = child_convert(rest[0])
    elif kind == "speed":
        out = child_speed(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif kind == "interleaved":
        out = child_interleaved(rest[0], int(rest[1]), int(rest[2]))
    elif kind == "e2e":
        out = child_e2e(rest[0], rest[1], int(rest[2]), rest[3])
    elif kind == "int8":
        out = child_int8(rest[0], int(rest[1]), rest[2:3] == ["accept"], rest[3:])
    elif kind == "make-weights":
        out = {"weights": str(_default_weights(int(rest[0]), Path(rest[1])))}
    elif kind == "int8-speed":
        out = child_int8_speed(rest[0], int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown child measurement {kind!r}")
    print(RESULT + json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=299, help="input size of the random model")
    p.add_argument("--weights", default=None, help="benchmark these weights instead")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="fewer slices per measurement")
    p.add_argument("--no-int8", action="store_true", help="skip quantising and timing int8")
    p.add_argument(
        "--int8-accept",
        nargs="*",
        default=None,
        metavar="DATA",
        help="run the int8 acceptance check of ich-train quantize (the weights' own "
        "validation split; DATA replaces the folders their manifest records) and record the "
        "verdict in the cache folder",
    )
    p.add_argument("--json", default="", help="also write every measurement here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
