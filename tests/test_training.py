import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.dicomfactory import SHARED_DATA
from training.cli import main as train_main
from training.datasets import DatasetError, read_dataset, split_by_group

TINY_ARGS = [
    "--input-size",
    "64",
    "--width",
    "0.25",
    "--middle-blocks",
    "1",
    "--batch-size",
    "4",
    "--steps-per-epoch",
    "2",
    "--val-fraction",
    "0.34",
    "--hu-range",
    "0,80",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    assert (
        train_main(
            [
                "make-phantoms",
                str(out),
                "--studies",
                "6",
                "--slices",
                "6",
                "--matrix",
                "96",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    return out


@pytest.mark.parametrize(
    "sub",
    ["fit", "evaluate", "make-phantoms", "install", "export", "quantize", "check-reproduction"],
)
def test_every_subcommand_explains_itself(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main([sub, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ich-train" in text
    if sub == "fit":
        for opt in (
            "--resume",
            "--hu-range",
            "--val-fraction",
            "--learning-rate",
            "--width",
            "--positive-fraction",
            "--max-minutes",
            "--install",
        ):
            assert opt in text
    if sub == "quantize":
        for opt in (
            "--weights",
            "--format",
            "--out",
            "--install",
            "--card",
            "--calibration",
            "--batch-size",
            "--seed",
            "--val-fraction",
            "0.005",
            "Exit",
        ):
            assert opt in text
    if sub == "check-reproduction":
        for opt in ("RUN", "--weights", "--install", "95%", "reproduction.json", "Exit"):
            assert opt in text


def test_phantom_dataset_reads_and_splits_by_patient(phantoms):
    samples = read_dataset(phantoms)
    assert len(samples) == 36 and {s.source for s in samples} == {"phantom"}
    train, val = split_by_group(samples, 0.34, 0)
    assert train and val
    assert not {s.group for s in train} & {s.group for s in val}


def test_inputs_too_large_for_memory_are_decoded_on_the_fly(phantoms):
    from training.pipeline import (
        LazyInputs,
        PipelineConfig,
        decode_split,
        eval_dataset,
        train_dataset,
    )

    samples = read_dataset(phantoms)
    train, val = split_by_group(samples, 0.3, seed=0)
    cfg = PipelineConfig(input_size=32, hu_range=(0.0, 80.0), batch_size=4)
    seen: list[tuple[int, int]] = []
    xt, yt, xv, yv = decode_split(train, val, cfg, lambda d, n: seen.append((d, n)))  # in memory
    total = len(train) + len(val)
    assert [d for d, _ in seen] == list(range(1, total + 1)) and {n for _, n in seen} == {total}
    assert isinstance(xt, np.ndarray) and isinstance(xv, np.ndarray)
    lt, lyt, lv, lyv = decode_split(train, val, PipelineConfig(**{**cfg.__dict__, "memory_gb": 0}))
    assert isinstance(lt, LazyInputs) and isinstance(lv, LazyInputs)
    np.testing.assert_array_equal(lyt, yt)
    np.testing.assert_array_equal(lyv, yv)
    np.testing.assert_array_equal(lt[np.arange(len(train))], xt)  # decoded alike
    lazy_val = np.concatenate(list(eval_dataset(lv, 3).as_numpy_iterator()))
    np.testing.assert_array_equal(lazy_val, xv.astype(np.float32))  # in order
    batch_x, batch_y = next(iter(train_dataset(lt, lyt, cfg)))
    assert batch_x.shape == (4, 32, 32, 3) and batch_y.shape == (4, 6)
    assert float(np.min(batch_x)) >= 0.0 and float(np.max(batch_x)) <= 1.0


@pytest.mark.slow
def test_fit_decoding_on_the_fly(phantoms, tmp_path):
    run = tmp_path / "run"
    args = ["fit", str(phantoms), "--out", str(run), "--epochs", "1", "--memory-gb", "0"]
    assert train_main([*args, *TINY_ARGS]) == 0
    assert len((run / "log.csv").read_text().splitlines()) == 2
    manifest = json.loads((run / "ich_xception_lstm.manifest.json").read_text())
    assert "weighted_log_loss" in manifest["metrics"]


@pytest.mark.slow
def test_fit_evaluate_resume_and_predict(phantoms, tmp_path):
    run = tmp_path / "run"
    assert (
        train_main(
            ["fit", str(phantoms), "--out", str(run), "--epochs", "1", "--ema", "0.9", *TINY_ARGS]
        )
        == 0
    )
    for name in (
        "config.json",
        "last.keras",
        "best.weights.h5",
        "log.csv",
        "state.json",
        "ich_xception_lstm.weights.h5",
        "ich_xception_lstm.manifest.json",
    ):
        assert (run / name).is_file(), name
    assert (run / "tensorboard").is_dir()
    manifest = json.loads((run / "ich_xception_lstm.manifest.json").read_text())
    assert manifest["trained"] is True
    assert manifest["hu_range"] == [0.0, 80.0]
    assert manifest["architecture"]["input_size"] == 64
    assert "weighted_log_loss" in manifest["metrics"]

    assert train_main(["fit", "--resume", "--out", str(run), "--epochs", "2"]) == 0
    rows = list(csv.DictReader((run / "log.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((run / "state.json").read_text())["epoch"] == 2

    out = tmp_path / "eval.json"
    weights = run / "ich_xception_lstm.weights.h5"
    assert (
        train_main(["evaluate", str(phantoms), "--weights", str(weights), "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert set(result) == {"weighted_log_loss", "auc", "n_images"}
    assert result["n_images"] == 36
    assert set(result["auc"]) == {
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
        "any",
    }

    from ich_model.dicom_io import load_study
    from ich_model.predictor import Predictor

    series = load_study(phantoms)
    r = Predictor(weights).score_series(series[0])
    assert r.probabilities.shape == (6, 6) and r.model.trained


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_evaluate_json_has_exactly_the_three_keys(tiny_weights, phantoms, tmp_path, model_cache):
    out = tmp_path / "eval.json"
    assert (
        train_main(["evaluate", str(phantoms), "--weights", str(tiny_weights), "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result) == {"weighted_log_loss", "auc", "n_images"}
    assert result["n_images"] == 36 and len(result["auc"]) == 6


def test_clear_messages_for_bad_datasets(tmp_path):
    header = "ID,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n"
    d = tmp_path / "a"
    _write(d / "labels.csv", header.replace("subdural,", "") + "ID_1,0,0,0,0,0\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_dataset(d, "rsna-png")
    d = tmp_path / "b"
    _write(d / "labels.csv", header + "ID_1,0,0,0,0,0,0\n")
    (d / "images").mkdir()
    with pytest.raises(DatasetError, match="ID_1 is listed but"):
        read_dataset(d, "rsna-png")
    d = tmp_path / "c"
    _write(d / "labels.csv", header + "ID_1,0,0,2,0,0,0\n")
    import cv2

    (d / "images").mkdir()
    cv2.imwrite(str(d / "images" / "ID_1.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="expected 0 or 1"):
        read_dataset(d, "rsna-png")
    d = tmp_path / "d"
    _write(d / "labels.csv", header)
    with pytest.raises(DatasetError, match="empty"):
        read_dataset(d, "rsna-png")
    assert (
        train_main(["evaluate", str(d), "--format", "rsna-png", "--weights", "x.weights.h5"]) == 2
    )


def test_wrong_format_says_so(tmp_path):
    _write(tmp_path / "hemorrhage_diagnosis.csv", "PatientNumber,SliceNumber\n")
    for fmt in ("rsna-png", "phantom"):
        with pytest.raises(DatasetError, match=r"not a .* dataset .*--format"):
            read_dataset(tmp_path, fmt)


def test_manifest_records_how_pictures_were_mapped_to_hu(tmp_path):
    """Already windowed 8-bit pictures: the grey-to-HU mapping travels with the weights."""
    import cv2

    from ich_model.model import ModelConfig, build_model
    from tests.conftest import TINY
    from training.fit import RunConfig, export

    d = tmp_path / "png"
    header = "ID,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n"
    _write(d / "labels.csv", header + "ID_1,0,0,0,0,0,0\nID_2,0,1,0,0,0,1\n")
    (d / "images").mkdir()
    for key in ("ID_1", "ID_2"):
        cv2.imwrite(str(d / "images" / f"{key}.png"), np.zeros((8, 8), np.uint8))
    samples = read_dataset(d)
    mcfg = ModelConfig(**TINY)  # type: ignore[arg-type]
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(
        data=[str(d)], formats=[None], out=str(run), model=mcfg.to_dict(), hu_range=(0.0, 80.0)
    )
    none = np.zeros((0, 6), np.float32)
    export(run, cfg, build_model(mcfg), none, none, [], samples, np.zeros(6, np.float32))
    manifest = json.loads((run / "ich_xception_lstm.manifest.json").read_text())
    assert manifest["training"]["picture_hu_ranges"] == {"rsna-png": [0.0, 80.0]}
    assert manifest["hu_range"] == [0.0, 80.0]


def test_unknown_layout_says_what_it_expected(tmp_path):
    with pytest.raises(DatasetError, match="--format"):
        read_dataset(tmp_path)


needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@needs_data
@pytest.mark.realdata
def test_real_datasets_are_recognised_and_split_by_patient():
    png = read_dataset(SHARED_DATA / "rsna-png")
    jpg = read_dataset(SHARED_DATA / "ctich-jpg")
    assert len(png) == 2500 and sum(s.labels[-1] for s in png) == 377
    assert len(jpg) == 1893 and sum(s.labels[-1] for s in jpg) == 217
    assert len({s.group for s in jpg}) == 62
    train, val = split_by_group(png + jpg, 0.2, 0)
    assert not {s.group for s in train} & {s.group for s in val}
    assert {s.source for s in val} == {"rsna-png", "ctich-jpg"}


@needs_data
@pytest.mark.realdata
def test_picture_to_hu_mapping_matches_dicom_statistics():
    """Brain parenchyma lands near 30-40 HU in both 8-bit sets, as in the real DICOMs."""
    from training.datasets import decode_hu

    for folder in ("rsna-png", "ctich-jpg"):
        samples = read_dataset(SHARED_DATA / folder)[:60]
        medians = []
        for s in samples:
            hu = decode_hu(s)
            h, w = hu.shape
            c = hu[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
            c = c[(c > 10) & (c < 70)]
            if c.size > 100:
                medians.append(np.median(c))
        assert 28 < float(np.median(medians)) < 42, folder


def test_ema_weights_are_kept_under_mixed_precision(tmp_path):
    """On a GPU fit() trains in mixed_float16, where Keras wraps Adam in a LossScaleOptimizer:
    the moving average (--ema) must still be what is validated and kept as the best weights."""
    import keras

    from training.fit import RunConfig, _ValidateAndCheckpoint

    def tiny() -> keras.Model:
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(6, activation="sigmoid")])

    seen: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            inner = self.model.optimizer.inner_optimizer
            average = [keras.ops.convert_to_numpy(v) for v in inner._model_variables_moving_average]
            seen.append((average, self.model.get_weights()))

    state = {"epoch": 0, "best": float("inf"), "best_epoch": 0, "wait": 0}
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny()
        opt = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.9)
        model.compile(optimizer=opt, loss="mse")
        keep = _ValidateAndCheckpoint(
            tmp_path,
            RunConfig(data=[], formats=[], out=str(tmp_path), patience=10),
            np.zeros((0,)),
            np.zeros((0, 6)),
            state,
            None,
            np.zeros(6),
            np.zeros(0),
        )
        x, y = np.ones((4, 3), np.float32), np.zeros((4, 6), np.float32)
        model.fit(x, y, epochs=3, verbose=0, callbacks=[Record(), keep])
        assert type(model.optimizer).__name__ == "LossScaleOptimizer"
        kept = tiny()
        kept.load_weights(str(tmp_path / "best.weights.h5"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    average, raw = seen[state["best_epoch"] - 1]
    assert not np.allclose(average[0], raw[0])
    for a, b in zip(kept.get_weights(), average, strict=True):
        np.testing.assert_allclose(a, b)


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_local_workers_train_together(phantoms, tmp_path):
    """MultiWorkerMirroredStrategy through TF_CONFIG, two processes on this CPU, one shared
    --out as the README documents."""
    import os
    import subprocess
    import sys

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "CUDA_VISIBLE_DEVICES": "",
        }
        out = tmp_path / "run"
        cmd = [
            sys.executable,
            "-m",
            "training.cli",
            "fit",
            str(phantoms),
            "--out",
            str(out),
            "--epochs",
            "1",
            *TINY_ARGS,
        ]
        log = open(tmp_path / f"worker{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=600))
        finally:
            log.close()
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    assert "num_workers = 2" in logs
    # both workers stepped through the same synchronised training
    losses = [
        [ln for ln in (tmp_path / f"worker{i}.log").read_text().splitlines() if "val wLL" in ln]
        for i in range(2)
    ]
    assert losses[0] and losses[0] == losses[1]
    # the chief (worker 0) exports the weights and alone writes the logs
    assert (tmp_path / "run" / "ich_xception_lstm.weights.h5").is_file(), logs
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1"]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_threshold_keeps_sensitivity():
    from ich_model.metrics import sensitivity_specificity
    from training.card import choose_threshold

    y = np.array([1, 1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95])
    t = choose_threshold(y, p, 0.8)
    assert t == pytest.approx(0.6)
    assert sensitivity_specificity(y, p, t) == (0.8, 0.5)


def test_report_and_model_card_from_validation_predictions(tmp_path):
    from training.card import model_card, report

    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random((n, 6)) < 0.2).astype(np.float32)
    y[:, 5] = y[:, :5].max(axis=1)
    p = np.clip(y * 0.6 + rng.random((n, 6)) * 0.4, 0, 1)
    sources = np.asarray(["rsna-png"] * 100 + ["ctich-jpg"] * 100)
    groups = np.asarray([f"g{i // 4}" for i in range(n)])
    np.savez(
        tmp_path / "v.npz", y=y, p=p, sources=sources, groups=groups, train_prior=y.mean(axis=0)
    )
    rep = report(tmp_path / "v.npz", n_boot=50)
    assert set(rep["sets"]) == {"all", "rsna-png", "ctich-jpg"}
    allm = rep["sets"]["all"]
    assert allm["auc"]["any"] > 0.9
    assert allm["weighted_log_loss"] < allm["prior_baseline_log_loss"]
    lo, hi = allm["auc_ci"]["any"]
    assert lo <= allm["auc"]["any"] <= hi
    from ich_model.weights import Manifest

    text = model_card(
        Manifest(architecture={"input_size": 64}, sha256="ab" * 32, weights_file="w.weights.h5"),
        rep,
        "ab" * 32,
    )
    for needle in ("not for diagnostic use", "0.07528", "0.0438", "95% CI", "Known failure"):
        assert needle.lower() in text.lower()


def test_platt_calibration_fixes_overconfidence_and_folds_into_the_layer():
    from ich_model.metrics import roc_auc, weighted_log_loss
    from training import calibrate

    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random((n, 6)) < 0.15).astype(np.float32)
    z_true = np.where(y > 0, 1.0, -1.0) + rng.normal(0, 1.0, (n, 6))
    over = calibrate.sigmoid(4.0 * z_true + 1.5)  # overconfident and biased
    groups = np.asarray([f"p{i // 5}" for i in range(n)])
    fixed = calibrate.cross_fitted(over, y, groups)
    assert weighted_log_loss(y, fixed) < 0.7 * weighted_log_loss(y, over)
    # a monotone map per label: ranking (AUC) unchanged
    params = calibrate.fit_all(over, y)
    assert roc_auc(y[:, 0], calibrate.apply(over, params)[:, 0]) == pytest.approx(
        roc_auc(y[:, 0], over[:, 0])
    )
    # folding into a dense layer gives the same probabilities as applying after it
    x = rng.normal(size=(10, 4))
    kernel, bias = rng.normal(size=(4, 6)), rng.normal(size=6)
    k2, b2 = calibrate.fold_into_dense(kernel, bias, params)
    direct = calibrate.apply(calibrate.sigmoid(x @ kernel + bias), params)
    np.testing.assert_allclose(calibrate.sigmoid(x @ k2 + b2), direct, atol=1e-5)


def test_rsna_challenge_layout_long_csv_and_id_dcm(phantoms, tmp_path):
    """stage_2_train.csv (ID_<id>_<label>,Label) beside a folder of ID_<id>.dcm files."""
    import shutil

    import pydicom

    from ich_model.labels import LABELS

    root = tmp_path / "rsna"
    (root / "stage_2_train").mkdir(parents=True)
    lines = ["ID,Label"]
    for k, f in enumerate(sorted(phantoms.rglob("*.dcm"))[:4]):
        pid = f"ID_{k:09x}"
        shutil.copy(f, root / "stage_2_train" / f"{pid}.dcm")
        truth = [int(k == 1), 0, 0, 0, int(k == 1), int(k == 1)]
        lines += [f"{pid}_{lab},{v}" for lab, v in zip(LABELS, truth, strict=True)]
    (root / "stage_2_train.csv").write_text("\n".join(lines) + "\n")
    samples = read_dataset(root)
    assert len(samples) == 4 and {s.source for s in samples} == {"rsna-dcm"}
    assert sum(s.labels[-1] for s in samples) == 1
    # grouped by the DICOM PatientID, so a patient never straddles the split
    pids = {str(pydicom.dcmread(s.path, stop_before_pixels=True).PatientID) for s in samples}
    assert {s.group for s in samples} == pids
    (root / "stage_2_train" / "ID_000000002.dcm").unlink()
    with pytest.raises(DatasetError, match="ID_000000002 is listed but"):
        read_dataset(root)


# ----------------------------------------------------------------------------- int8 quantize


@pytest.fixture
def recorded_weights(tiny_weights, phantoms, tmp_path):
    """The tiny weights with a training record as ich-train fit writes it (phantom data)."""
    import shutil
    from dataclasses import replace

    from ich_model.weights import read_manifest, write_manifest
    from training.datasets import describe

    manifest, _ = read_manifest(tiny_weights)
    w = tmp_path / "w" / "tiny.weights.h5"
    w.parent.mkdir()
    shutil.copyfile(tiny_weights, w)
    train, val = split_by_group(read_dataset(phantoms), 0.34, 0)
    record = {
        "data": [str(phantoms)],
        "formats": [None],
        "seed": 0,
        "val_fraction": 0.34,
        "train_counts": describe(train),
        "validation_counts": describe(val),
    }
    write_manifest(w, replace(manifest, training=record))
    return w


def _set_training(weights: Path, **changes: object) -> None:
    from dataclasses import replace

    from ich_model.weights import read_manifest, write_manifest

    manifest, _ = read_manifest(weights)
    write_manifest(weights, replace(manifest, training={**manifest.training, **changes}))


def test_quantize_writes_int8_record_and_card_and_the_runtime_follows(
    recorded_weights, phantoms, model_cache, tmp_path, monkeypatch, capsys, caplog
):
    """End to end on phantoms: accepted -> exit 0 and int8 in use; rejected -> exit 1,
    files still written, float32 in use; the card's section is replaced, never doubled."""
    import logging

    from ich_model import runtime
    from ich_model.predictor import Predictor
    from ich_model.weights import read_manifest
    from training.card import INT8_BEGIN, INT8_END

    w = recorded_weights
    manifest, _ = read_manifest(w)
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Model card\n\n## Known failure modes\n\n- many\n")
    args = ["quantize", "--weights", str(w), "--out", str(w.parent), "--card", str(card)]
    args += ["--calibration", "8", "--batch-size", "4"]
    int8 = w.parent / runtime.onnx_file_name(manifest, "int8")
    record_path = runtime.int8_record_path(int8)

    # generous tolerances: accepted
    monkeypatch.setattr(runtime, "INT8_AUC_TOLERANCE", 1.0)
    monkeypatch.setattr(runtime, "INT8_LOG_LOSS_RELATIVE", 10.0)
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "AUC(any)" in out and "ACCEPTED" in out and str(int8) in out
    assert int8.is_file() and record_path.is_file()
    record = json.loads(record_path.read_text())
    _, val = split_by_group(read_dataset(phantoms), 0.34, 0)
    assert record["accepted"] is True
    assert record["weights_sha256"] == manifest.sha256
    assert record["cpu"] == runtime.cpu_key()
    assert record["n_calibration"] == 8 and record["n_slices"] == len(val)
    assert record["validation"]["counts_match_manifest"] is True
    assert record["slices_per_s_float32"] > 0 and record["slices_per_s_int8"] > 0
    assert 0.0 <= record["max_abs_diff"] < 1.0
    text = card.read_text()
    assert text.startswith("# Model card") and "## Known failure modes" in text
    assert text.count(INT8_BEGIN) == 1 and text.count(INT8_END) == 1
    section = text[text.index(INT8_BEGIN) : text.index(INT8_END)]
    assert manifest.sha256 in section and runtime.cpu_key() in section
    assert "int8 accepted" in section and "AUC(any)" in section
    assert "weighted log loss" in section and "slices/s at batch 4" in section
    p = Predictor(w)
    assert "int8" in p.runtime and "int8" in p.identity.to_dict()["runtime"]

    # accepted, but on another kind of CPU: float32, and the log says why
    other = {**record, "cpu": "x86_64:baseline"}
    record_path.write_text(json.dumps(other))
    with caplog.at_level(logging.INFO, logger="ich_model.runtime"):
        assert "float32" in Predictor(w).runtime
    assert any("accepted on a x86_64:baseline CPU only" in r.getMessage() for r in caplog.records)

    # no tolerance at all: measured and rejected, files still written
    monkeypatch.setattr(runtime, "INT8_AUC_TOLERANCE", 0.0)
    monkeypatch.setattr(runtime, "INT8_LOG_LOSS_RELATIVE", 0.0)
    assert train_main(args) == 1
    assert "NOT ACCEPTED" in capsys.readouterr().out
    record = json.loads(record_path.read_text())
    assert record["accepted"] is False and "tolerance" in record["reason"]
    assert int8.is_file()
    text = card.read_text()
    assert text.count(INT8_BEGIN) == 1 and "int8 not accepted" in text
    assert "float32" in Predictor(w).runtime


def test_quantize_refuses_what_it_cannot_measure_honestly(
    recorded_weights, phantoms, model_cache, tmp_path, capsys
):
    w = recorded_weights
    out = ["--out", str(tmp_path / "q"), "--calibration", "4"]
    with pytest.raises(SystemExit) as exc:  # neither --out nor --install
        train_main(["quantize", "--weights", str(w)])
    assert exc.value.code == 2
    # --install is for the bundled weights only
    assert train_main(["quantize", "--weights", str(w), "--install"]) == 2
    assert "bundled weights only" in capsys.readouterr().err
    # another seed would measure on training slices
    assert train_main(["quantize", "--weights", str(w), "--seed", "5", *out]) == 2
    assert "trained with seed 0" in capsys.readouterr().err
    # data recorded where training ran, not here: say so, and take the folders as arguments
    _set_training(w, data=["../elsewhere/phantoms"])
    assert train_main(["quantize", "--weights", str(w), *out]) == 2
    assert "give the DATA folders" in capsys.readouterr().err
    # other data than the weights were trained on: the split counts differ
    fewer = tmp_path / "fewer"
    train_main(["make-phantoms", str(fewer), "--studies", "3", "--slices", "6", "--matrix", "96"])
    assert train_main(["quantize", str(fewer), "--weights", str(w), *out]) == 2
    assert "not the one the weights were trained with" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    # the right folders given as arguments: measured (exit 0 or 1 by the verdict)
    rc = train_main(["quantize", str(phantoms), "--weights", str(w), *out])
    records = list((tmp_path / "q").glob("*.acceptance.json"))
    assert len(records) == 1
    assert rc == (0 if json.loads(records[0].read_text())["accepted"] else 1)


def test_model_card_keeps_the_int8_section_only_for_its_weights():
    from ich_model.labels import LABELS
    from ich_model.weights import Manifest
    from training.card import (
        INT8_BEGIN,
        INT8_END,
        int8_section,
        model_card,
        replace_int8_section,
    )

    rep = {
        "threshold": 0.1,
        "sets": {
            "all": {
                "n_images": 10,
                "n_groups": 5,
                "positives": dict.fromkeys(LABELS, 1),
                "weighted_log_loss": 0.2,
                "weighted_log_loss_ci": None,
                "prior_baseline_log_loss": 0.3,
                "auc": dict.fromkeys(LABELS, 0.8),
                "auc_ci": dict.fromkeys(LABELS),
                "any_sensitivity": 0.8,
                "any_specificity": 0.7,
            }
        },
    }
    sha = "ab" * 32
    manifest = Manifest(architecture={"input_size": 64}, sha256=sha, weights_file="w.weights.h5")
    record = {
        "weights_sha256": sha,
        "cpu": "x86_64:avx2",
        "cpu_model": "Some CPU",
        "accepted": True,
        "reason": "within tolerance",
        "n_slices": 905,
        "auc_any_float32": 0.85,
        "auc_any_int8": 0.849,
        "log_loss_float32": 0.166,
        "log_loss_int8": 0.167,
        "max_abs_diff": 0.02,
        "batch": 8,
        "cores": 2,
        "slices_per_s_float32": 20.0,
        "slices_per_s_int8": 30.0,
        "n_calibration": 256,
        "threshold": 0.0757,
        "any_calls_changed": 3,
    }
    card = model_card(manifest, rep, sha, record)
    assert card.count(INT8_BEGIN) == 1 and "int8 accepted" in card and "1.50x" in card
    assert "on 3 of 905 slices" in card
    assert "x86_64:avx2" in card and sha in card and "ich-train quantize" in card
    # a record of other weights is not shown: the card says int8 was not measured
    other = model_card(manifest, rep, sha, {**record, "weights_sha256": "cd" * 32})
    assert "Not measured for these weights" in other and "x86_64:avx2" not in other
    # replacing keeps one section, in place
    again = replace_int8_section(card, int8_section(None))
    assert again.count(INT8_BEGIN) == again.count(INT8_END) == 1
    assert "Not measured" in again and again.index(INT8_BEGIN) == card.index(INT8_BEGIN)
    assert replace_int8_section(again, int8_section(record)) == card


@needs_data
@pytest.mark.realdata
def test_quantize_rebuilds_the_bundled_weights_validation_split():
    """The split ich-train quantize measures on is the one fit validated the bundled weights on."""
    from ich_model.weights import read_manifest
    from training.quantize import pick_calibration, training_split

    manifest, _ = read_manifest()
    if not manifest.training.get("validation_counts"):
        pytest.skip("the bundled weights record no training split")
    names = [Path(d).name for d in manifest.training["data"]]
    split = training_split(manifest, data=[str(SHARED_DATA / n) for n in names])
    assert split.checked
    assert len(split.validation) == sum(
        c["slices"] for c in manifest.training["validation_counts"].values()
    )
    calib = pick_calibration(split.train, 256, split.seed)
    assert len(calib) == 256 and not {s.path for s in calib} & {s.path for s in split.validation}


# ----------------------------------------------------------------------------- reproducibility

FIT_COMMAND = (
    "ich-train fit /data/rsna-png /data/ctich-jpg --out {out} --input-size 64 --width 0.25 "
    "--middle-blocks 1 --hu-range 0,80 --val-fraction 0.34 --seed 0 --epochs 3"
)


def _validation_predictions(noise_seed: int, signal: float = 0.4) -> dict[str, np.ndarray]:
    """A small validation split (fixed labels, two sources, 4 slices per patient) and
    predictions that separate bleeds by ``signal``, with noise from ``noise_seed``."""
    rng = np.random.default_rng(0)
    n = 120
    y = (rng.random((n, 6)) < 0.25).astype(np.float32)
    y[:, 5] = y[:, :5].max(axis=1)
    noise = np.random.default_rng(noise_seed).random((n, 6))
    p = np.clip(y * signal + noise * (1 - signal), 0.01, 0.99)
    return {
        "y": y,
        "p": p,
        "sources": np.asarray(["rsna-png"] * 60 + ["ctich-jpg"] * 60),
        "groups": np.asarray([f"g{i // 4}" for i in range(n)]),
        "train_prior": np.full(6, 0.2),
    }


def _fake_run(
    folder: Path,
    weights: Path,
    command: str | None = None,
    npz: dict[str, np.ndarray] | None = None,
    nudge: float = 0.0,
    **training: object,
) -> Path:
    """A run folder as ich-train fit leaves it: config.json, exported weights (the tiny
    ones, one value moved by ``nudge`` so the hash differs) with a training record, and
    validation_predictions.npz (unless ``npz`` is None)."""
    import shutil
    from dataclasses import replace

    import h5py

    from ich_model.weights import read_manifest, write_manifest

    folder.mkdir(parents=True)
    command = command or FIT_COMMAND.format(out=folder)
    target = folder / "ich_xception_lstm.weights.h5"
    shutil.copyfile(weights, target)
    if nudge:
        with h5py.File(target, "r+") as f:
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            d = f[sorted(names)[0]]
            d[...] = d[...] + nudge
    manifest, _ = read_manifest(weights)
    record = {
        "data": ["/data/rsna-png", "/data/ctich-jpg"],
        "formats": [None, None],
        "seed": 0,
        "val_fraction": 0.34,
        "validation_counts": {"rsna-png": {"slices": 60}, "ctich-jpg": {"slices": 60}},
        "best_epoch": 2,
        "epochs_run": 3,
        "command": command,
        **training,
    }
    write_manifest(target, replace(manifest, trained=True, training=record))
    (folder / "config.json").write_text(json.dumps({"out": str(folder), "command": command}))
    if npz is not None:
        np.savez(folder / "validation_predictions.npz", **npz)  # type: ignore[arg-type]
    return target


@pytest.fixture
def installed(tiny_weights, tmp_path, model_cache):
    """Tiny weights from a phantom first run, installed with their card into ``dest``."""
    from training.fit import install

    run1 = tmp_path / "run1"
    _fake_run(run1, tiny_weights, npz=_validation_predictions(1))
    dest = tmp_path / "dest"
    install(run1 / "ich_xception_lstm.weights.h5", dest, dest / "MODEL_CARD.md")
    return dest / "ich_xception_lstm.weights.h5"


def test_check_reproduction_records_a_reproduced_run_and_install_keeps_it_for_its_weights(
    installed, tiny_weights, tmp_path, capsys
):
    from ich_model.weights import read_manifest
    from training.card import REPRO_BEGIN, REPRO_END
    from training.fit import install

    manifest, _ = read_manifest(installed)
    lo, hi = manifest.metrics["weighted_log_loss_ci"]  # install records the CI now
    assert lo <= manifest.metrics["weighted_log_loss"] <= hi
    card = installed.parent / "MODEL_CARD.md"
    text = card.read_text()
    assert text.count(REPRO_BEGIN) == 1 and "Not checked yet" in text
    assert "ich-train check-reproduction RUN2 --install" in text
    assert FIT_COMMAND.format(out=tmp_path / "run1") in text

    run2 = tmp_path / "run2"
    w2 = _fake_run(run2, tiny_weights, npz=_validation_predictions(2), nudge=1e-3, best_epoch=3)
    args = ["check-reproduction", str(run2), "--weights", str(installed)]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "NOT" not in out
    for needle in ("weighted log loss, all", "AUC(any), ctich-jpg", "AUC(any), rsna-png"):
        assert needle in out
    assert "best epoch / epochs run" in out and "2 / 3" in out and "3 / 3" in out
    second_sha = read_manifest(w2)[0].sha256
    assert manifest.sha256[:16] in out and second_sha[:16] in out
    record_path = installed.parent / "reproduction.json"
    assert not record_path.exists()  # only with --install

    assert train_main([*args, "--install"]) == 0
    record = json.loads(record_path.read_text())
    assert record["verdict"] == "reproduced" and record["reproduced"] is True
    assert record["weights_sha256"] == manifest.sha256
    assert record["run_weights_sha256"] == second_sha
    assert record["command"] == FIT_COMMAND.format(out=run2)
    assert record["checked"][:4].isdigit() and record["outside"] == []
    lo, hi = record["installed"]["auc_any_ci"]
    assert lo <= record["second_run"]["auc_any"] <= hi
    text = card.read_text()
    assert text.count(REPRO_BEGIN) == 1 and text.count(REPRO_END) == 1
    section = text[text.index(REPRO_BEGIN) : text.index(REPRO_END)]
    assert "**reproduced**" in section and manifest.sha256 in section and second_sha in section
    assert FIT_COMMAND.format(out=run2) in section and "Not checked yet" not in text

    # installing the same weights again keeps the section; other weights drop it
    install(tmp_path / "run1" / "ich_xception_lstm.weights.h5", installed.parent, card)
    assert "**reproduced**" in card.read_text()
    install(w2, installed.parent, card)
    text = card.read_text()
    assert "**reproduced**" not in text and "Not checked yet" in text
    assert text.count(REPRO_BEGIN) == 1
    assert FIT_COMMAND.format(out=run2) in text  # the new weights' own command


def test_check_reproduction_names_the_metric_that_fell_outside(
    installed, tiny_weights, tmp_path, capsys
):
    run2 = tmp_path / "run2"
    _fake_run(run2, tiny_weights, npz=_validation_predictions(3, signal=0.0), nudge=1e-3)
    args = ["check-reproduction", str(run2), "--weights", str(installed), "--install"]
    assert train_main(args) == 1
    out = capsys.readouterr().out
    assert "NOT REPRODUCED" in out and "AUC(any)" in out and "below the installed 95% CI" in out
    record = json.loads((installed.parent / "reproduction.json").read_text())
    assert record["verdict"] == "not reproduced"
    assert any(o.startswith("AUC(any)") and "below" in o for o in record["outside"])
    assert "**not reproduced**" in (installed.parent / "MODEL_CARD.md").read_text()


def test_check_reproduction_accepts_bit_identical_weights_from_another_folder(
    installed, tiny_weights, tmp_path, capsys
):
    """Training is deterministic here: the same command in another --out folder gave the
    very same bytes (the bundled weights' real check); that is a reproduction, said so."""
    run2 = tmp_path / "run2"
    _fake_run(run2, tiny_weights, npz=_validation_predictions(1))  # as run1, no nudge
    assert train_main(["check-reproduction", str(run2), "--weights", str(installed)]) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "bit-identical" in out


def test_check_reproduction_refuses_other_commands_and_missing_predictions(
    installed, tiny_weights, tmp_path, capsys
):
    npz = _validation_predictions(2)
    base = ["check-reproduction", "--weights", str(installed)]
    other = FIT_COMMAND.format(out=tmp_path / "a") + " --learning-rate 3e-4"
    _fake_run(tmp_path / "a", tiny_weights, other, npz, nudge=1e-3)
    assert train_main([*base, str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--learning-rate: 0.0001 (installed) vs 0.0003 (second run)" in err
    # the same command line, but another split seed recorded
    _fake_run(tmp_path / "b", tiny_weights, None, npz, nudge=1e-3, seed=1)
    assert train_main([*base, str(tmp_path / "b")]) == 2
    assert "seed: 0 (installed) vs 1 (second run)" in capsys.readouterr().err
    # the right command, not exported: no validation predictions
    _fake_run(tmp_path / "c", tiny_weights, None, None, nudge=1e-3)
    assert train_main([*base, str(tmp_path / "c"), "--install"]) == 2
    assert f"ich-train export {tmp_path / 'c'}" in capsys.readouterr().err
    # the installed run itself is no second run
    assert train_main([*base, str(tmp_path / "run1")]) == 2
    assert "same --out folder" in capsys.readouterr().err
    assert not (installed.parent / "reproduction.json").exists()


def test_model_card_keeps_the_reproducibility_section_only_for_its_weights():
    from ich_model.labels import LABELS
    from ich_model.weights import Manifest
    from training.card import (
        REPRO_BEGIN,
        REPRO_END,
        model_card,
        replace_reproduction_section,
        reproduction_section,
    )

    rep = {
        "threshold": 0.1,
        "sets": {
            "all": {
                "n_images": 10,
                "n_groups": 5,
                "positives": dict.fromkeys(LABELS, 1),
                "weighted_log_loss": 0.2,
                "weighted_log_loss_ci": [0.15, 0.25],
                "prior_baseline_log_loss": 0.3,
                "auc": dict.fromkeys(LABELS, 0.8),
                "auc_ci": {lab: [0.7, 0.9] for lab in LABELS},
                "any_sensitivity": 0.8,
                "any_specificity": 0.7,
            }
        },
    }
    sha = "ab" * 32
    manifest = Manifest(
        architecture={"input_size": 64},
        sha256=sha,
        weights_file="w.weights.h5",
        training={"command": "ich-train fit D --out R"},
    )
    figures = {"weighted_log_loss": 0.21, "auc_any": 0.79, "per_source": {}}
    record = {
        "weights_sha256": sha,
        "checked": "2025-01-02T03:04:05+00:00",
        "reproduced": True,
        "outside": [],
        "installed": {**figures, "weighted_log_loss_ci": [0.15, 0.25], "auc_any_ci": [0.7, 0.9]},
        "second_run": figures,
        "run_weights_sha256": "cd" * 32,
        "command": "ich-train fit D --out R2",
    }
    card = model_card(manifest, rep, sha, reproduction=record)
    assert card.count(REPRO_BEGIN) == 1 and "**reproduced**" in card and "2025-01-02" in card
    assert "ich-train fit D --out R2" in card and "check-reproduction" in card
    other = model_card(manifest, rep, sha, reproduction={**record, "weights_sha256": "ef" * 32})
    assert "Not checked yet" in other and "**reproduced**" not in other
    assert "ich-train fit D --out R\n" in other  # names the command to run again
    again = replace_reproduction_section(card, reproduction_section(None))
    assert again.count(REPRO_BEGIN) == again.count(REPRO_END) == 1
    assert replace_reproduction_section(again, reproduction_section(record)) == card
