import numpy as np
import pytest

from ich_model.windowing import (
    MODEL_WINDOWS,
    WindowPreset,
    apply_window,
    model_input,
    model_input_batch,
    uint8_to_hu,
    window_to_uint8,
)


def test_presets_are_the_papers():
    assert WindowPreset.BRAIN.value == (40.0, 80.0)
    assert WindowPreset.BONE.value == (400.0, 1800.0)
    assert WindowPreset.SUBDURAL.value == (80.0, 200.0)
    assert MODEL_WINDOWS == (WindowPreset.BRAIN, WindowPreset.BONE, WindowPreset.SUBDURAL)


def test_apply_window_maps_edges_and_clips():
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    out = apply_window(hu, 40, 80)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        apply_window(np.array([-500.0, 400.0, 1300.0]), 400, 1800), [0, 0.5, 1]
    )


def test_apply_window_rejects_zero_width():
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros(3), 40, 0)


def test_window_to_uint8():
    np.testing.assert_array_equal(
        window_to_uint8(np.array([0.0, 40.0, 80.0]), 40, 80), [0, 128, 255]
    )


def test_model_input_stacks_three_windows_at_size():
    hu = np.full((64, 48), 60.0, dtype=np.float32)
    x = model_input(hu, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_allclose(
        x[0, 0], [apply_window(np.array(60.0), *w.value) for w in MODEL_WINDOWS], rtol=1e-6
    )


def test_model_input_hu_range_clips_before_windowing():
    hu = np.full((8, 8), 1000.0, dtype=np.float32)
    x = model_input(hu, 8, hu_range=(0.0, 80.0))
    expected = [float(apply_window(np.array(80.0), *w.value)) for w in MODEL_WINDOWS]
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)


def test_model_input_batch_matches_single():
    vol = np.random.default_rng(0).normal(40, 30, (3, 40, 40)).astype(np.float32)
    b = model_input_batch(vol, 16)
    for i in range(3):
        np.testing.assert_array_equal(b[i], model_input(vol[i], 16))


def test_uint8_to_hu_inverts_the_window():
    hu = np.array([0.0, 40.0, 80.0])
    img = window_to_uint8(hu, 40, 80)
    np.testing.assert_allclose(uint8_to_hu(img, 0.0, 80.0), hu, atol=0.2)
