"""Shared fixtures: tiny random weights (fast), built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted (ONNX) models go to a test folder, not the user's cache (subprocesses too)."""
    folder = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICH_CACHE_DIR", str(folder))
        yield folder
