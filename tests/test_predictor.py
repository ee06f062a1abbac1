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
def predictor(tiny_weights):
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
