"""The ONNX Runtime path: matches Keras, cached by weights hash, overridable, falls back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ich_model import runtime
from ich_model.dicom_io import load_study
from ich_model.labels import LABELS
from ich_model.phantom import PhantomSpec, write_series
from ich_model.predictor import Predictor
from ich_model.weights import Manifest, read_manifest
from tests.dicomfactory import SHARED_DATA

SMALL = {"input_size": 64, "width": 0.25, "middle_blocks": 1}
RSNA_DCM = SHARED_DATA / "rsna-dcm"


def _spread_weights(path: Path, seed: int = 0, **arch: object) -> Path:
    """Random weights whose outputs differ from slice to slice.

    Freshly initialised weights give ~0.5 everywhere (the activations shrink through the
    un-normalised BatchNorms), which would make any comparison pass; setting the BN
    statistics from one training-mode pass and scaling the last layer spreads them.
    """
    import keras

    from ich_model.model import ModelConfig, build_model, save_weights

    cfg = ModelConfig(**{**SMALL, **arch})  # type: ignore[arg-type]
    keras.utils.set_random_seed(seed)
    model = build_model(cfg, inference=True)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
            layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape).astype("float32"))
    model(runtime.probe_inputs(cfg.input_size, (0.0, 80.0))[:3], training=True)
    dense = model.get_layer("probabilities")
    dense.kernel.assign(dense.kernel * 4.0)
    save_weights(model, cfg, path, trained=False, hu_range=(0.0, 80.0))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runtime.CACHE_ENV, str(folder))
        mp.delenv(runtime.RUNTIME_ENV, raising=False)
        yield folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _spread_weights(tmp_path_factory.mktemp("w") / "spread.weights.h5")


@pytest.fixture(scope="module")
def onnx_predictor(cache: Path, weights: Path) -> Predictor:
    return Predictor(weights, batch_size=4, runtime="onnx")


@pytest.fixture(scope="module")
def tf_predictor(cache: Path, weights: Path) -> Predictor:
    return Predictor(weights, batch_size=4, runtime="tensorflow")


def _phantom_hu(tmp_path: Path) -> np.ndarray:
    spec = PhantomSpec.for_matrix(128, subtypes=("subdural", "intraventricular"), n_slices=6)
    write_series(tmp_path / "phantom", spec)
    [series] = load_study(tmp_path / "phantom")
    return series.hu


def _real_hu() -> np.ndarray:
    if not RSNA_DCM.is_dir():
        pytest.skip(f"{RSNA_DCM} absent")
    slices = [s.hu[k] for s in load_study(RSNA_DCM) for k in range(s.n_slices)]
    assert slices, f"no slices loaded from {RSNA_DCM}"
    return np.stack([np.asarray(s, np.float32) for s in slices if s.shape == slices[0].shape])


def test_onnx_is_the_cpu_default_and_says_so(onnx_predictor):
    assert onnx_predictor.identity.runtime.startswith("onnxruntime")
    assert "float32" in onnx_predictor.identity.runtime
    assert onnx_predictor.identity.to_dict()["runtime"] == onnx_predictor.runtime


def test_onnx_matches_keras_on_phantom_slices(onnx_predictor, tf_predictor, tmp_path):
    hu = _phantom_hu(tmp_path)
    p_onnx, p_tf = onnx_predictor.predict_hu(hu), tf_predictor.predict_hu(hu)
    assert p_tf.std(axis=0).max() > 1e-3, "the test weights must give slice-dependent outputs"
    np.testing.assert_allclose(p_onnx, p_tf, atol=1e-4, rtol=0)


@pytest.mark.realdata
def test_onnx_matches_keras_on_real_slices(onnx_predictor, tf_predictor):
    hu = _real_hu()
    np.testing.assert_allclose(
        onnx_predictor.predict_hu(hu), tf_predictor.predict_hu(hu), atol=1e-4, rtol=0
    )


def test_series_scores_match_between_runtimes(onnx_predictor, tf_predictor, tmp_path):
    hu = _phantom_hu(tmp_path)
    [series] = load_study(tmp_path / "phantom")
    r = onnx_predictor.score_series(series)
    assert r.complete and r.probabilities.shape == (len(hu), len(LABELS))
    np.testing.assert_allclose(r.probabilities, tf_predictor.predict_hu(hu), atol=1e-4, rtol=0)


def test_data_parallel_runs_equal_one_run(cache, weights, onnx_predictor):
    path = onnx_predictor._backend.path
    split, single = runtime.OnnxBackend(path, threads=3), runtime.OnnxBackend(path, threads=1)
    x = runtime.probe_inputs(64, (0.0, 80.0))
    x = np.concatenate([x, x[::-1]])
    for n in (0, 1, 2, 3, 5, 8):
        got = split.predict(x[:n])
        assert got.shape == (n, 6)
        np.testing.assert_allclose(got, single.predict(x[:n]), atol=1e-6, rtol=0)


def test_next_batch_is_windowed_on_a_helper_thread(onnx_predictor, tmp_path, monkeypatch):
    [series] = load_study(write_series(tmp_path / "s", PhantomSpec.for_matrix(64)).folder)
    threads: list[str] = []
    real = onnx_predictor.preprocess

    def spy(hu: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(hu)

    monkeypatch.setattr(onnx_predictor, "preprocess", spy)
    onnx_predictor.score_series(series)
    assert len(threads) == -(-series.n_slices // onnx_predictor.batch_size)
    assert all(name.startswith("ich-prep") for name in threads)


def test_second_predictor_reuses_the_cached_model(cache, weights, onnx_predictor, monkeypatch):
    manifest, _ = read_manifest(weights)
    [cached] = list(cache.glob(f"ich-{manifest.sha256[:24]}-*-float32.onnx"))
    before = cached.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(runtime, "export_onnx", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(runtime, "build_keras", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(runtime, "convert_in_child", lambda *a, **k: calls.append(a))
    again = Predictor(weights, batch_size=4)
    assert calls == [] and cached.stat().st_mtime_ns == before
    assert again.runtime == onnx_predictor.runtime


def test_cached_model_scores_without_importing_tensorflow(cache, weights, onnx_predictor):
    code = (
        "import sys, numpy as np\n"
        "from ich_model.predictor import Predictor\n"
        f"p = Predictor({str(weights)!r}, batch_size=2)\n"
        "out = p.predict_inputs(np.zeros((3, 64, 64, 3), np.float32))\n"
        "assert out.shape == (3, 6), out.shape\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules)\n"
        "print(p.runtime, heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    env = {**os.environ, runtime.CACHE_ENV: str(cache)}
    env.pop(runtime.RUNTIME_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime" in proc.stdout


def test_cache_is_keyed_by_the_weights_hash(cache, weights, onnx_predictor, tmp_path):
    other = _spread_weights(tmp_path / "other.weights.h5", seed=1)
    p = Predictor(other, runtime="onnx")
    a, _ = read_manifest(weights)
    b, _ = read_manifest(other)
    assert a.sha256 != b.sha256
    assert runtime.onnx_file_name(a) != runtime.onnx_file_name(b)
    assert (cache / runtime.onnx_file_name(a)).is_file()
    assert (cache / runtime.onnx_file_name(b)).is_file()
    x = runtime.probe_inputs(64, (0.0, 80.0))
    assert np.abs(p.predict_inputs(x) - onnx_predictor.predict_inputs(x)).max() > 1e-3


def test_cache_name_changes_with_the_converter_version(monkeypatch):
    m = Manifest(architecture={}, sha256="ab" * 32, weights_file="w.weights.h5")
    first = runtime.onnx_file_name(m)
    monkeypatch.setattr(runtime, "CONVERTER_VERSION", runtime.CONVERTER_VERSION + 1)
    assert runtime.onnx_file_name(m) != first


def test_unwritable_cache_falls_back_to_the_next_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {runtime.CACHE_ENV: str(blocker / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert runtime.writable_cache_dir(env) == tmp_path / "xdg" / runtime.APP_DIR


def test_corrupt_cached_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    w = _spread_weights(tmp_path / "c.weights.h5", seed=2)
    manifest, _ = read_manifest(w)
    bad = tmp_path / "cache" / runtime.onnx_file_name(manifest)
    bad.parent.mkdir()
    bad.write_bytes(b"not an onnx model")
    p = Predictor(w, runtime="onnx")
    assert p.runtime.startswith("onnxruntime")
    assert bad.stat().st_size > 1000


def test_altered_converted_model_is_passed_over(tmp_path, monkeypatch, caplog):
    # the converted file is what scores on a CPU: one changed after conversion (a flipped
    # byte in a shipped file here) is named and not used; a fresh conversion is
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    w = _spread_weights(tmp_path / "shipped" / "t.weights.h5", seed=3)
    manifest, _ = read_manifest(w)
    reference = Predictor(w, runtime="onnx")
    [converted] = (tmp_path / "cache").glob("*-float32.onnx")
    assert runtime.hash_record_path(converted).is_file() and runtime.altered(converted) is None
    shipped = w.parent / converted.name
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0x01
    shipped.write_bytes(bytes(data))
    runtime.hash_record_path(converted).replace(runtime.hash_record_path(shipped))
    with caplog.at_level(logging.WARNING, logger="ich_model.runtime"):
        assert runtime.find_cached(manifest, w) is None
        again = Predictor(w, runtime="onnx")
    assert f"{shipped}: not used, its sha256 differs" in caplog.text
    assert again.runtime.startswith("onnxruntime")
    assert runtime.find_cached(manifest, w) == converted
    x = runtime.probe_inputs(64, (0.0, 80.0))
    np.testing.assert_array_equal(again.predict_inputs(x), reference.predict_inputs(x))


def test_runtime_override_by_argument_and_environment(cache, weights, monkeypatch):
    assert Predictor(weights, runtime="tensorflow").runtime.startswith("tensorflow")
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorflow")
    assert Predictor(weights).runtime.startswith("tensorflow")
    assert Predictor(weights, runtime="onnx").runtime.startswith("onnxruntime")
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxx")
    with pytest.raises(ValueError, match="Did you mean 'onnx'"):
        Predictor(weights)


def test_resolve_runtime_names():
    assert runtime.resolve_runtime(None, {}) == "auto"
    assert runtime.resolve_runtime(None, {runtime.RUNTIME_ENV: "TF"}) == "tensorflow"
    assert runtime.resolve_runtime("int8", {}) == "onnx-int8"
    with pytest.raises(ValueError, match="tensorflow"):
        runtime.resolve_runtime("tensorflw", {})


def test_failed_conversion_falls_back_to_tensorflow(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    w = _spread_weights(tmp_path / "f.weights.h5", seed=3)

    def broken(*args: object, **kwargs: object) -> Path:
        raise runtime.ConversionError("simulated converter failure")

    monkeypatch.setattr(runtime, "convert_in_child", broken)
    with caplog.at_level(logging.WARNING, logger="ich_model.runtime"):
        p = Predictor(w, batch_size=4)
    assert p.runtime.startswith("tensorflow") and "fallback" in p.runtime
    assert any("simulated converter failure" in r.getMessage() for r in caplog.records)
    assert p.predict_inputs(runtime.probe_inputs(64)).shape == (4, 6)


def test_missing_onnxruntime_falls_back_to_tensorflow(cache, weights, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="ich_model.runtime"):
        p = Predictor(weights)
    assert "fallback" in p.runtime
    assert any("falling back to TensorFlow" in r.getMessage() for r in caplog.records)


def test_gradcam_with_onnx_builds_keras_lazily(cache, weights, onnx_predictor):
    fresh = Predictor(weights, runtime="onnx")  # from the cache: no Keras model yet
    assert fresh._keras_model is None
    cam = fresh.gradcam(np.full((70, 90), 40.0, np.float32), "subdural")
    assert cam.shape == (70, 90) and cam.min() >= 0.0 and cam.max() <= 1.0


# ----------------------------------------------------------------------------- int8


def test_int8_acceptance_rule():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 6)) < 0.3).astype(np.float32)
    y[:, 5] = y[:, :5].max(axis=1)
    p = np.clip(0.6 * y + 0.4 * rng.random(y.shape), 0.01, 0.99).astype(np.float32)
    same = runtime.int8_acceptance(y, p, p + 1e-4)
    assert same.accepted and same.reason == "within tolerance"
    noisy = runtime.int8_acceptance(y, p, np.clip(p + rng.normal(0, 0.2, p.shape), 0.01, 0.99))
    assert not noisy.accepted and "AUC(any)" in noisy.reason
    one_class = runtime.int8_acceptance(np.zeros_like(y), p, p)
    assert not one_class.accepted


def test_int8_is_used_only_when_accepted(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    w = _spread_weights(tmp_path / "q.weights.h5", seed=4)
    manifest, _ = read_manifest(w)
    x = runtime.probe_inputs(64, (0.0, 80.0))
    y = np.zeros((len(x), 6), np.float32)
    y[0] = 1  # the subdural phantom slice
    report = runtime.accept_int8(manifest, w, calibration=x, validation=x, validation_labels=y)
    int8 = tmp_path / "cache" / runtime.onnx_file_name(manifest, "int8")
    record = json.loads(runtime.int8_record_path(int8).read_text())
    assert record["accepted"] == report.accepted and record["weights_sha256"] == manifest.sha256

    record["accepted"] = False
    runtime.int8_record_path(int8).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="ich_model.runtime"):
        assert "float32" in Predictor(w, runtime="onnx-int8").runtime
    assert any("not accepted" in r.getMessage() for r in caplog.records)
    assert "float32" in Predictor(w).runtime

    record["accepted"] = True
    runtime.int8_record_path(int8).write_text(json.dumps(record))
    p = Predictor(w)
    assert "int8" in p.runtime
    assert np.abs(p.predict_inputs(x) - Predictor(w, runtime="onnx").predict_inputs(x)).max() < 0.2


class _Fixed:
    """A backend whose "any" probability is the slice's first pixel (plus ``shift``)."""

    description = "fixed"

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def predict(self, x: np.ndarray) -> np.ndarray:
        p = np.clip(x[:, 0, 0, :1] + self.shift, 0.01, 0.99)
        return np.repeat(p, 6, axis=1).astype(np.float32)


def test_compare_int8_times_both_and_counts_changed_calls():
    rng = np.random.default_rng(1)
    x = rng.random((20, 4, 4, 3), dtype=np.float32)
    y = (x[:, 0, 0, :1] > 0.5).astype(np.float32).repeat(6, axis=1)
    report = runtime.compare_int8(_Fixed(), _Fixed(0.01), x, y, batch=4, threshold=0.5)
    assert report.n_slices == 20 and report.batch == 4
    assert report.slices_per_s_float32 and report.slices_per_s_int8
    p = x[:, 0, 0, 0]
    assert report.any_calls_changed == int(((p >= 0.5) != (p + 0.01 >= 0.5)).sum())
    assert report.max_abs_diff == pytest.approx(0.01, abs=1e-6)


def test_an_accepted_int8_in_the_cache_wins_over_a_rejected_one_beside_the_weights(
    tmp_path, monkeypatch, caplog
):
    """Every place the runtime looks is checked; each refusal is logged with its reason."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    manifest = Manifest(architecture={"input_size": 64}, sha256="ab" * 32, weights_file="w.h5")
    weights = tmp_path / "w" / "w.h5"
    name = runtime.onnx_file_name(manifest, "int8")
    for folder, accepted in ((weights.parent, False), (tmp_path / "cache", True)):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"int8 " + folder.name.encode())
        record = {
            "accepted": accepted,
            "reason": "within tolerance" if accepted else "AUC(any) 0.80 vs 0.86",
            "weights_sha256": manifest.sha256,
            "cpu": runtime.cpu_key(),
            "int8_sha256": runtime.sha256_file(folder / name),
        }
        runtime.int8_record_path(folder / name).write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="ich_model.runtime"):
        assert runtime.accepted_int8(manifest, weights) == tmp_path / "cache" / name
    assert any("not accepted (AUC(any) 0.80" in r.getMessage() for r in caplog.records)
    (tmp_path / "cache" / name).write_bytes(b"changed")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ich_model.runtime"):
        assert runtime.accepted_int8(manifest, weights) is None
    assert any("changed after it was accepted" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- realistic size


@pytest.mark.slow
def test_onnx_matches_keras_at_the_bundled_size(tmp_path, monkeypatch):
    """The bundled model's architecture (160 px, half width, 8 middle blocks)."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    w = _spread_weights(tmp_path / "big.weights.h5", input_size=160, width=0.5, middle_blocks=8)
    onnx_p = Predictor(w, batch_size=8, runtime="onnx")
    assert onnx_p.runtime.startswith("onnxruntime")
    x = onnx_p.preprocess(_phantom_hu(tmp_path))
    if RSNA_DCM.is_dir():
        x = np.concatenate([x, onnx_p.preprocess(_real_hu())])
    manifest, _ = read_manifest(w)
    keras_out = np.asarray(runtime.build_keras(manifest, w)(x, training=False))
    assert keras_out.std(axis=0).max() > 1e-3
    np.testing.assert_allclose(onnx_p.predict_inputs(x), keras_out, atol=1e-4, rtol=0)


def test_conversion_runs_in_a_child_and_reports_its_failure(tmp_path, monkeypatch):
    """The scoring process never imports TensorFlow, even to convert; a failing child's
    last words become the ConversionError."""
    w = _spread_weights(tmp_path / "k.weights.h5", seed=4)
    out = tmp_path / "cache" / "model.onnx"
    out.parent.mkdir()
    code = (
        "import sys; from pathlib import Path; from ich_model import runtime;"
        f"runtime.convert_in_child(Path({str(w)!r}), Path({str(out)!r}));"
        "sys.exit(3 if 'tensorflow' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert runtime.OnnxBackend(out).activations_name is not None
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not weights")
    with pytest.raises(runtime.ConversionError, match=r"broken\.weights\.h5"):
        runtime.convert_in_child(broken, tmp_path / "cache" / "b.onnx")
