import json
import shutil

import numpy as np
import pytest

from ich_model.labels import LABELS
from ich_model.model import ModelConfig, build_model, save_weights
from ich_model.weights import WeightsError, read_manifest


def test_full_network_is_the_papers():
    import keras

    m = build_model(ModelConfig())
    assert m.input_shape == (None, 299, 299, 3)
    assert m.output_shape == (None, 6)
    # Xception without top: 20,861,480; LSTM(64) over 32 x 64: 33,024; Dense(6): 390
    assert m.count_params() == 20_861_480 + 33_024 + 390
    lstm = m.get_layer("lstm")
    assert lstm.units == 64 and lstm.dropout == 0.3 and lstm.recurrent_dropout == 0.2
    assert m.get_layer("to_timesteps").output.shape[1:] == (32, 64)
    assert m.get_layer("probabilities").activation is keras.activations.sigmoid


def test_config_validation():
    with pytest.raises(ValueError, match="Received: width"):
        ModelConfig(width=0.0)
    with pytest.raises(ValueError, match="timesteps"):
        ModelConfig(width=0.25, timesteps=3)
    assert ModelConfig.from_dict({**ModelConfig().to_dict(), "unknown": 1}) == ModelConfig()


def test_inference_copy_matches_training_build():
    cfg = ModelConfig(input_size=64, width=0.25, middle_blocks=1)
    train = build_model(cfg)
    infer = build_model(cfg, inference=True)
    infer.set_weights(train.get_weights())
    assert infer.get_layer("lstm").recurrent_dropout == 0.0
    x = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(train(x, training=False), infer(x, training=False), atol=1e-6)


def test_weights_round_trip_and_manifest(tmp_path, tiny_weights):
    manifest, _path = read_manifest(tiny_weights)
    assert manifest.labels == LABELS
    assert manifest.input_size == 64
    assert manifest.trained is False
    assert manifest.hu_range == (0.0, 80.0)
    assert len(manifest.sha256) == 64


def test_tampered_weights_are_refused(tmp_path, tiny_weights):
    w = tmp_path / "t.weights.h5"
    shutil.copy(tiny_weights, w)
    shutil.copy(tiny_weights.with_name("tiny.manifest.json"), tmp_path / "t.manifest.json")
    data = json.loads((tmp_path / "t.manifest.json").read_text())
    data["weights_file"] = w.name
    (tmp_path / "t.manifest.json").write_text(json.dumps(data))
    read_manifest(w)  # same bytes: accepted
    raw = bytearray(w.read_bytes())
    raw[-100] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="does not match its manifest"):
        read_manifest(w)


def test_missing_manifest_is_a_clear_error(tmp_path):
    cfg = ModelConfig(input_size=64, width=0.25, middle_blocks=1)
    save_weights(build_model(cfg), cfg, tmp_path / "m.weights.h5", trained=False)
    (tmp_path / "m.manifest.json").unlink()
    with pytest.raises(WeightsError, match="manifest not found"):
        read_manifest(tmp_path / "m.weights.h5")


def test_save_weights_requires_keras_suffix(tmp_path):
    cfg = ModelConfig(input_size=64, width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        save_weights(build_model(cfg), cfg, tmp_path / "m.h5", trained=False)


def test_manifest_is_standard_json_with_undefined_metrics():
    # an AUC without positives is NaN in numpy; the manifest writes null (strict JSON)
    from ich_model.weights import Manifest

    metrics = {"auc": {"epidural": float("nan"), "any": 0.9}, "auc_ci": {"any": [0.8, 1.0]}}
    m = Manifest(architecture={}, sha256="ab" * 32, weights_file="w.weights.h5", metrics=metrics)

    def strict(name: str) -> float:
        raise ValueError(f"not JSON: {name}")

    data = json.loads(m.to_json(), parse_constant=strict)
    assert data["metrics"]["auc"] == {"epidural": None, "any": 0.9}
