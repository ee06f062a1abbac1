import numpy as np
import pytest
from pydicom.uid import generate_uid

from ich_model.dicom_io import load_study
from ich_model.labels import LABELS
from ich_model.predictor import Predictor
from ich_model.series import CTSeries


def _series(n: int = 11, size: int = 48) -> CTSeries:
    rng = np.random.default_rng(0)
    return CTSeries(
        hu=rng.normal(30, 20, (n, size, size)).astype(np.float32),
        pixel_spacing=(0.5, 0.5),
        positions=tuple(float(k * 5) for k in range(n)),
        slice_thickness=5.0,
        orientation=(1, 0, 0, 0, 1, 0),
        study_uid="1.2",
        series_uid="1.2.3",
        sop_uids=tuple(generate_uid() for _ in range(n)),
        files=tuple(f"f{k}" for k in range(n)),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def predictor(tiny_weights, model_cache):
    return Predictor(tiny_weights, batch_size=4)


def test_scores_every_slice_in_batches(predictor):
    s = _series()
    calls = []
    r = predictor.score_series(s, progress=lambda d, n, st, p: calls.append((d, n, st, p.shape)))
    assert r.probabilities.shape == (11, 6)
    assert np.all((r.probabilities >= 0) & (r.probabilities <= 1))
    assert [c[0] for c in calls] == [4, 8, 11]
    assert calls[-1][3] == (3, 6)
    assert r.complete and r.sop_uids == s.sop_uids
    assert set(r.series_max()) == set(LABELS)
    assert r.model.trained is False and r.model.sha256


def test_batch_results_equal_one_call(predictor):
    s = _series(6)
    np.testing.assert_allclose(
        predictor.score_series(s).probabilities, predictor.predict_hu(s.hu), atol=1e-5
    )


def test_cancel_between_batches(predictor):
    s = _series()
    seen = []

    def progress(done, n, start, p):
        seen.append(done)

    r = predictor.score_series(s, progress=progress, cancelled=lambda: len(seen) >= 1)
    assert not r.complete
    assert r.n_slices == 4 and len(r.sop_uids) == 4


def test_flagged_uses_threshold(predictor):
    r = predictor.score_series(_series(3))
    assert r.flagged(0.0)["any"] == [0, 1, 2]
    assert r.flagged(1.01)["any"] == []


def test_gradcam_is_a_map_at_slice_size(predictor):
    cam = predictor.gradcam(_series(1, 80).hu[0], "subdural")
    assert cam.shape == (80, 80)
    assert cam.min() >= 0 and cam.max() <= 1


def test_scores_a_loaded_dicom_series(predictor, tmp_path):
    from tests.dicomfactory import ct_series

    ct_series(tmp_path, n=5)
    [s] = load_study(tmp_path)
    assert predictor.score_series(s).probabilities.shape == (5, 6)


# ----------------------------------------------------------------------------- Grad-CAM paths


def test_head_gradient_matches_finite_differences(tiny_weights):
    from ich_model.gradcam import Head

    head = Head.from_weights_file(tiny_weights, timesteps=32)
    g = np.random.default_rng(1).uniform(0, 2, head.features)
    for label in (0, 5):
        grad, y = head.gradient(g, label)
        assert np.allclose(y, head.forward(g)[0])
        for c in (0, 7, head.features // 2, head.features - 1):
            e = np.zeros_like(g)
            e[c] = 1e-5
            numeric = (head.forward(g + e)[0][label] - head.forward(g - e)[0][label]) / 2e-5
            assert abs(numeric - grad[c]) < 1e-7 + 1e-4 * abs(numeric)


def test_gradcam_through_onnx_equals_tensorflow(predictor, tiny_weights):
    from ich_model.gradcam import OnnxGradcam

    hu = _series(1, 80).hu[0]
    onnx_maps = [predictor.gradcam(hu, lab) for lab in LABELS]
    assert isinstance(predictor._onnx_cam, OnnxGradcam)  # no TensorFlow for the map
    tf_path = Predictor(tiny_weights, batch_size=4)
    tf_path._onnx_cam = False
    for lab, cam in zip(LABELS, onnx_maps, strict=True):
        assert np.allclose(cam, tf_path.gradcam(hu, lab), atol=1e-4)


@pytest.mark.slow
def test_scoring_and_gradcam_never_import_tensorflow(predictor, tiny_weights, model_cache):
    """With the converted model cached, the viewer's model thread needs no TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from ich_model.predictor import Predictor;"
        f"p = Predictor({str(tiny_weights)!r});"
        "hu = np.full((64, 64), 40, np.float32);"
        "p.predict_hu(hu[None]); p.gradcam(hu, 'any');"
        "sys.exit(3 if 'tensorflow' in sys.modules else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.realdata
@pytest.mark.slow
def test_gradcam_of_the_bundled_model_on_real_bleeds():
    import csv

    import cv2

    from ich_model.windowing import uint8_to_hu
    from tests.dicomfactory import SHARED_DATA

    folder = SHARED_DATA / "rsna-png"
    if not (folder / "labels.csv").is_file():
        pytest.skip("needs ../shared/data/rsna-png")
    with open(folder / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["any"] == "1"][:3]
    onnx_path, tf_path = Predictor(), Predictor()
    tf_path._onnx_cam = False
    shown = 0
    for r in rows:
        img = cv2.imread(str(folder / "images" / f"{r['ID']}.png"), cv2.IMREAD_GRAYSCALE)
        hu = uint8_to_hu(img, 0.0, 80.0)
        cam = onnx_path.gradcam(hu, "any")
        assert np.allclose(cam, tf_path.gradcam(hu, "any"), atol=1e-4)
        shown += bool(cam.max() > 0)
    assert shown >= 1  # the model looked somewhere on at least one bleed


def test_gradcam_from_a_file_converted_without_the_activations_output(
    predictor, tiny_weights, tmp_path
):
    """int8 scores but float32 maps: from the float32 file, adding the activations output
    in memory when an older conversion lacks it."""
    import onnx

    from ich_model.gradcam import OnnxGradcam
    from ich_model.runtime import find_cached

    path = find_cached(predictor.manifest, tiny_weights, "float32")
    assert path is not None
    proto = onnx.load(str(path))
    del proto.graph.output[1:]
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    x = predictor.preprocess(_series(1, 64).hu)[0]
    new_map = OnnxGradcam.from_file(path, tiny_weights, 32)(x, 5)
    old_map = OnnxGradcam.from_file(old, tiny_weights, 32)(x, 5)
    np.testing.assert_allclose(old_map, new_map, atol=1e-6)
