"""Shared fixtures: tiny random weights (fast), built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = {"input_size": 64, "width": 0.25, "middle_blocks": 1}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained Xception-LSTM weights at 64 px and a quarter width, with their manifest."""
    import keras

    from ich_model.model import ModelConfig, build_model, save_weights

    cfg = ModelConfig(**TINY)  # type: ignore[arg-type]
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.weights.h5"
    save_weights(build_model(cfg), cfg, path, trained=False, hu_range=(0.0, 80.0))
    return path
