"""Score CT series with the bundled (or any verified) weights.

The :class:`Predictor` loads the manifest and weights once, then scores series in
batches; the next batch is windowed and resized on a helper thread while the model
computes the current one (ONNX Runtime and TensorFlow both release the GIL while they
compute). Progress arrives per batch, and a cancel flag is checked between batches.
Where the model runs is chosen by :mod:`ich_model.runtime`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ich_model.labels import LABELS
from ich_model.series import CTSeries
from ich_model.weights import Manifest, model_card_summary, read_manifest
from ich_model.weights import WeightsError as WeightsError  # re-exported: callers catch it
from ich_model.windowing import model_input, model_input_batch

log = logging.getLogger(__name__)

#: progress(done, total, first_index, probabilities_of_this_batch)
ProgressFn = Callable[[int, int, int, np.ndarray], None]


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced a result; printed on every view and export."""

    name: str
    sha256: str
    trained: bool
    input_size: int
    threshold: float
    runtime: str
    summary: str
    weights_file: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "trained": self.trained,
            "input_size": self.input_size,
            "threshold": self.threshold,
            "runtime": self.runtime,
            "weights_file": self.weights_file,
            "summary": self.summary,
        }


@dataclass(frozen=True)
class ScoreResult:
    """Per-slice probabilities of one series, labels in :data:`LABELS` order."""

    probabilities: np.ndarray  # [z, 6] float32
    sop_uids: tuple[str, ...]
    series_uid: str
    study_uid: str
    series_key: str
    model: ModelIdentity
    seconds: float = 0.0
    complete: bool = True
    labels: tuple[str, ...] = field(default=LABELS)

    @property
    def n_slices(self) -> int:
        return int(self.probabilities.shape[0])

    def series_max(self) -> dict[str, float]:
        p = self.probabilities
        return {lab: float(p[:, i].max()) if len(p) else 0.0 for i, lab in enumerate(self.labels)}

    def flagged(self, threshold: float | None = None) -> dict[str, list[int]]:
        """Slice indices (0-based, feet to head) above the threshold, per label."""
        t = self.model.threshold if threshold is None else threshold
        p = self.probabilities
        return {
            lab: [int(k) for k in np.flatnonzero(p[:, i] >= t)] for i, lab in enumerate(self.labels)
        }


def _configure_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


class Predictor:
    """Loads verified weights once and scores slices and series.

    ``runtime`` ("auto", "onnx", "onnx-int8", "tensorflow"; default ``$ICH_RUNTIME`` or
    "auto") picks where the model runs, see :mod:`ich_model.runtime`; the choice is in
    ``identity.runtime``. With a cached ONNX model, nothing here imports TensorFlow
    until Grad-CAM is asked for.
    """

    def __init__(
        self,
        weights: Path | str | None = None,
        batch_size: int = 8,
        manifest: Manifest | None = None,
        runtime: str | None = None,
    ) -> None:
        if manifest is None:
            manifest, weights_path = read_manifest(weights)
        else:
            weights_path = Path(weights) if weights else Path(manifest.weights_file)
        self.manifest = manifest
        self.weights_path = weights_path
        self.batch_size = max(1, int(batch_size))
        self.input_size = manifest.input_size
        self.hu_range = manifest.hu_range

        from ich_model.runtime import load_backend

        loaded = load_backend(manifest, weights_path, runtime)
        self._backend = loaded.backend
        self._keras_model: Any = loaded.keras_model  # built lazily for Grad-CAM otherwise
        self._gradcam_fn: Any = None
        self._onnx_cam: Any = None  # OnnxGradcam, or False once it proved unavailable
        self._tf: Any = None
        self.runtime = self._backend.description
        name = str(manifest.architecture.get("name", "xception_lstm"))
        self.identity = ModelIdentity(
            name=name,
            sha256=manifest.sha256,
            trained=manifest.trained,
            input_size=self.input_size,
            threshold=manifest.threshold,
            runtime=self.runtime,
            summary=model_card_summary(manifest),
            weights_file=str(weights_path),
        )
        log.info("model %s loaded (%s), weights %s", name, self.runtime, manifest.short_hash)

    # ------------------------------------------------------------------ slices

    def preprocess(self, hu: np.ndarray) -> np.ndarray:
        """HU slices ``[z, y, x]`` -> model input ``[z, s, s, 3]``."""
        return model_input_batch(hu, self.input_size, self.hu_range)

    def predict_inputs(self, x: np.ndarray) -> np.ndarray:
        """Model inputs ``[n, s, s, 3]`` -> probabilities ``[n, 6]`` float32."""
        out = [
            self._backend.predict(x[i : i + self.batch_size])
            for i in range(0, len(x), self.batch_size)
        ]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 6), np.float32)

    def predict_hu(self, hu: np.ndarray) -> np.ndarray:
        return self.predict_inputs(self.preprocess(hu))

    # ------------------------------------------------------------------ series

    def _batches(self, hu: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Preprocessed batches, the next one prepared while the caller computes."""
        starts = list(range(0, hu.shape[0], self.batch_size))
        if not starts:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="ich-prep") as pool:
            future = pool.submit(self.preprocess, hu[starts[0] : starts[0] + self.batch_size])
            for k, s in enumerate(starts):
                batch = future.result()
                if k + 1 < len(starts):
                    n = starts[k + 1]
                    future = pool.submit(self.preprocess, hu[n : n + self.batch_size])
                yield s, batch

    def score_series(
        self,
        series: CTSeries,
        progress: ProgressFn | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> ScoreResult:
        """Score every slice; on cancel, returns what was scored with ``complete=False``."""
        t0 = time.perf_counter()
        n = series.n_slices
        probs = np.full((n, len(LABELS)), np.nan, dtype=np.float32)
        done = 0
        complete = True
        for start, batch in self._batches(series.hu):
            if cancelled is not None and cancelled():
                complete = False
                break
            p = self._backend.predict(batch)
            probs[start : start + len(p)] = p
            done = start + len(p)
            if progress is not None:
                progress(done, n, start, p)
        if not complete:
            probs = probs[:done]
        return ScoreResult(
            probabilities=probs,
            sop_uids=series.sop_uids[: len(probs)],
            series_uid=series.series_uid,
            study_uid=series.study_uid,
            series_key=series.key,
            model=self.identity,
            seconds=time.perf_counter() - t0,
            complete=complete,
        )

    # ------------------------------------------------------------------ Grad-CAM

    def gradcam(self, hu_slice: np.ndarray, label: str = "any") -> np.ndarray:
        """Where the model looked for ``label`` on one slice: a heat map in [0, 1] at the
        slice's own size (Grad-CAM, Selvaraju et al. 2017, on the last convolutional block)."""
        cam = self._onnx_gradcam(hu_slice, label)
        if cam is not None:
            return cam
        if self._gradcam_fn is None:
            from ich_model.model import gradcam_model
            from ich_model.runtime import build_keras

            tf = self._tf = _configure_tensorflow()
            if self._keras_model is None:
                self._keras_model = build_keras(self.manifest, self.weights_path)
            gm = gradcam_model(self._keras_model)

            @tf.function
            def fn(x: Any, k: Any) -> Any:
                with tf.GradientTape() as tape:
                    conv, out = gm(x, training=False)
                    target = tf.gather(out, k, axis=1)
                grads = tape.gradient(target, conv)
                weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
                cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
                return cam[0]

            self._gradcam_fn = fn
        k = LABELS.index(label)
        x = model_input(hu_slice, self.input_size, self.hu_range)[None]
        tf = self._tf
        cam = np.asarray(self._gradcam_fn(tf.constant(x), tf.constant(k)), dtype=np.float32)
        return _heat_map(cam, hu_slice.shape)

    def _onnx_gradcam(self, hu_slice: np.ndarray, label: str) -> np.ndarray | None:
        """Grad-CAM through the float32 ONNX model and a numpy head (no TensorFlow), or None
        when this model or runtime cannot take that path (see :mod:`ich_model.gradcam`)."""
        from ich_model.gradcam import GradcamUnavailable, OnnxGradcam
        from ich_model.runtime import OnnxBackend

        if self._onnx_cam is False or not isinstance(self._backend, OnnxBackend):
            return None  # the TensorFlow runtime (a GPU) maps with TensorFlow too
        try:
            if self._onnx_cam is None:
                from ich_model.runtime import find_cached

                timesteps = int(self.manifest.architecture.get("timesteps", 32))
                backend = self._backend
                if (
                    isinstance(backend, OnnxBackend)
                    and backend.precision == "float32"
                    and backend.activations_name is not None
                ):
                    self._onnx_cam = OnnxGradcam(backend.activations, self.weights_path, timesteps)
                else:  # int8 scores, but the map comes from float32
                    path = find_cached(self.manifest, self.weights_path, "float32")
                    if path is None:
                        raise GradcamUnavailable("no converted float32 ONNX model")
                    self._onnx_cam = OnnxGradcam.from_file(path, self.weights_path, timesteps)
            x = model_input(hu_slice, self.input_size, self.hu_range)
            cam = self._onnx_cam(x, LABELS.index(label))
        except GradcamUnavailable as exc:
            log.info("Grad-CAM through TensorFlow: %s", exc)
            self._onnx_cam = False
            return None
        return _heat_map(cam, hu_slice.shape)


def _heat_map(cam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A class-activation map scaled to [0, 1] and resized to the slice."""
    import cv2

    if cam.max() > 0:
        cam = cam / cam.max()
    h, w = shape
    return np.clip(cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
