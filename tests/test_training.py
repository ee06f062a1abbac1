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


@pytest.mark.parametrize("sub", ["fit", "evaluate", "make-phantoms", "install", "export"])
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


def test_phantom_dataset_reads_and_splits_by_patient(phantoms):
    samples = read_dataset(phantoms)
    assert len(samples) == 36 and {s.source for s in samples} == {"phantom"}
    train, val = split_by_group(samples, 0.34, 0)
    assert train and val
    assert not {s.group for s in train} & {s.group for s in val}


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
    assert {"weighted_log_loss", "auc", "n_images"} <= set(result)
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
    """MultiWorkerMirroredStrategy through TF_CONFIG, two processes on this CPU."""
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
        out = tmp_path / f"run{i}"
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
    # the chief (worker 0) exports the weights
    assert (tmp_path / "run0" / "ich_xception_lstm.weights.h5").is_file(), logs


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
