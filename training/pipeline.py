"""tf.data input pipelines: parallel decoding and windowing, balancing, augmentation, prefetch.

Decoding and windowing go through ``ich_model.windowing.model_input`` (the function
inference uses). Decoded inputs are cached in memory as float16, the training stream
draws from per-group index streams (rarest positive subtype, or negative) with fixed
weights so rare subtypes are oversampled, and augmentation (flip, rotation, rescale)
runs on whole batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ich_model.labels import LABELS
from ich_model.windowing import model_input
from training.datasets import DatasetError, Sample, decode_hu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    input_size: int = 299
    hu_range: tuple[float, float] | None = None
    batch_size: int = 32
    positive_fraction: float = 0.4  # share of each batch drawn from slices with any bleed
    rare_power: float = 0.5  # subtype groups weighted by count**rare_power (0 = equal)
    rotation_deg: float = 10.0
    zoom: float = 0.1  # rescale by up to +-10 %
    flip: bool = True
    seed: int = 0


def decode_inputs(
    samples: Sequence[Sample],
    cfg: PipelineConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and window every sample in parallel (tf.data): ``X`` float16, ``Y`` float32."""
    n = len(samples)
    if n == 0:
        raise DatasetError("empty dataset: nothing to decode")
    size, hu_range = cfg.input_size, cfg.hu_range

    def load(i: np.ndarray) -> np.ndarray:
        s = samples[int(i)]
        try:
            return model_input(decode_hu(s), size, hu_range).astype(np.float16)
        except Exception as exc:
            raise DatasetError(f"{s.path}: {exc}") from exc

    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.numpy_function(load, [i], tf.float16, stateful=False),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    x = np.empty((n, size, size, 3), dtype=np.float16)
    for k, item in enumerate(ds.as_numpy_iterator()):
        x[k] = item
        if progress is not None:
            progress(k + 1, n)
    y = np.asarray([s.labels for s in samples], dtype=np.float32)
    return x, y


def balance_groups(y: np.ndarray) -> tuple[list[np.ndarray], list[float], list[str]]:
    """Split indices by their rarest positive subtype (or negative) and weight the groups."""
    counts = y[:, :5].sum(axis=0)
    group_of = np.full(len(y), -1, dtype=np.int64)
    for i, row in enumerate(y):
        pos = np.flatnonzero(row[:5] > 0.5)
        if len(pos):
            group_of[i] = int(pos[np.argmin(counts[pos])])
        elif row[5] > 0.5:
            group_of[i] = 5  # "any" without a subtype (should not happen, kept anyway)
    groups, names = [], []
    for g in [-1, *range(6)]:
        idx = np.flatnonzero(group_of == g)
        if len(idx):
            groups.append(idx)
            names.append("negative" if g < 0 else LABELS[g])
    return groups, [float(len(g)) for g in groups], names


def group_weights(sizes: Sequence[float], names: Sequence[str], cfg: PipelineConfig) -> list[float]:
    pos = [i for i, n in enumerate(names) if n != "negative"]
    if not pos or "negative" not in names:
        return [1.0 / len(names)] * len(names)
    raw = np.asarray([sizes[i] ** cfg.rare_power for i in pos])
    w = [0.0] * len(names)
    for i, r in zip(pos, raw / raw.sum(), strict=True):
        w[i] = float(r * cfg.positive_fraction)
    w[names.index("negative")] = 1.0 - cfg.positive_fraction
    return w


def augmenter(cfg: PipelineConfig) -> tf.keras.Sequential:
    import keras

    steps: list[keras.layers.Layer] = []
    if cfg.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=cfg.seed))
    if cfg.rotation_deg > 0:
        steps.append(
            keras.layers.RandomRotation(
                cfg.rotation_deg / 360.0, fill_mode="constant", fill_value=0.0, seed=cfg.seed + 1
            )
        )
    if cfg.zoom > 0:
        steps.append(
            keras.layers.RandomZoom(
                (-cfg.zoom, cfg.zoom), fill_mode="constant", fill_value=0.0, seed=cfg.seed + 2
            )
        )
    return keras.Sequential(steps, name="augment")


def train_dataset(x: np.ndarray, y: np.ndarray, cfg: PipelineConfig) -> tf.data.Dataset:
    """Endless balanced, augmented batches from the cached inputs."""
    groups, sizes, names = balance_groups(y)
    weights = group_weights(sizes, names, cfg)
    log.info(
        "training groups: %s",
        ", ".join(
            f"{n} {int(s)} (p={w:.3f})" for n, s, w in zip(names, sizes, weights, strict=True)
        ),
    )
    xt = tf.constant(x)
    yt = tf.constant(y)
    streams = [
        tf.data.Dataset.from_tensor_slices(g)
        .shuffle(len(g), seed=cfg.seed + k, reshuffle_each_iteration=True)
        .repeat()
        for k, g in enumerate(groups)
    ]
    aug = augmenter(cfg)
    ds = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=cfg.seed)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    ds = ds.map(
        lambda i: (tf.cast(tf.gather(xt, i), tf.float32), tf.gather(yt, i)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.map(
        lambda a, b: (tf.clip_by_value(aug(a, training=True), 0.0, 1.0), b),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return _data_sharded(ds).prefetch(tf.data.AUTOTUNE)


def _data_sharded(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Under multi-worker training each worker takes its share of every batch (not of files)."""
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(opts)


def eval_dataset(x: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return (
        tf.data.Dataset.from_tensor_slices(x)
        .batch(batch_size)
        .map(lambda a: tf.cast(a, tf.float32))
        .with_options(_data_sharded(tf.data.Dataset.range(1)).options())
        .prefetch(tf.data.AUTOTUNE)
    )


def prior_correction(y: np.ndarray, cfg: PipelineConfig) -> np.ndarray:
    """Per-label logit offset that undoes the class balancing.

    Balanced sampling shows the network label ``k`` with rate ``q_k`` instead of the data's
    ``pi_k``, which inflates its probabilities; adding ``logit(pi_k) - logit(q_k)`` to the
    output logits restores the data's prior (Saerens et al. 2002). Computed from the
    training labels alone, so no validation data leaks into it.
    """
    groups, sizes, names = balance_groups(y)
    weights = group_weights(sizes, names, cfg)
    q = sum(w * y[g].mean(axis=0) for g, w in zip(groups, weights, strict=True))
    pi = y.mean(axis=0)
    eps = 1e-4
    q = np.clip(q, eps, 1 - eps)
    pi = np.clip(pi, eps, 1 - eps)
    return (np.log(pi / (1 - pi)) - np.log(q / (1 - q))).astype(np.float32)


def apply_logit_offset(p: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Probabilities with ``offset`` added to their logits."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    z = np.log(p / (1 - p)) + offset
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
