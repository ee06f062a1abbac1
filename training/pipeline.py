"""tf.data input pipelines: parallel decoding and windowing, balancing, augmentation, prefetch.

Decoding and windowing go through ``ich_model.windowing.model_input`` (the function
inference uses). Decoded inputs are cached in memory as float16 when they fit in
``PipelineConfig.memory_gb`` (by default half of this machine's memory); a larger set (the
full RSNA 2019 data: about 750,000 slices, 400 GB at 299 px) is decoded on the fly, in
parallel, every time a slice is drawn (:class:`LazyInputs`). The training stream draws from
per-group index streams (rarest positive subtype, or negative) with fixed weights so rare
subtypes are oversampled, and augmentation (flip, rotation, rescale) runs on whole batches.
"""

from __future__ import annotations

import logging
import os
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
    memory_gb: float | None = None  # decoded inputs kept in memory up to this; None: half the RAM


def memory_budget_gb(cfg: PipelineConfig) -> float:
    """How many GB of decoded inputs (training and validation together) may stay in memory."""
    if cfg.memory_gb is not None:
        return cfg.memory_gb
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


def decoded_gb(n: int, cfg: PipelineConfig) -> float:
    """Memory that ``n`` decoded float16 inputs take."""
    return n * cfg.input_size**2 * 3 * 2 / 2**30


class LazyInputs:
    """Model inputs decoded when asked for, for sets too large to keep decoded in memory.

    ``inputs[indices]`` decodes and windows those samples (float16) exactly as
    :func:`decode_inputs` would; the pipelines call it in parallel from tf.data.
    """

    def __init__(self, samples: Sequence[Sample], cfg: PipelineConfig) -> None:
        self.samples = list(samples)
        self.size, self.hu_range = cfg.input_size, cfg.hu_range

    def __len__(self) -> int:
        return len(self.samples)

    def one(self, i: int) -> np.ndarray:
        s = self.samples[int(i)]
        try:
            return model_input(decode_hu(s), self.size, self.hu_range).astype(np.float16)
        except Exception as exc:
            raise DatasetError(f"{s.path}: {exc}") from exc

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        out = np.empty((len(idx), self.size, self.size, 3), dtype=np.float16)
        for k, i in enumerate(idx):
            out[k] = self.one(int(i))
        return out


Inputs = np.ndarray | LazyInputs


def decode_inputs(
    samples: Sequence[Sample],
    cfg: PipelineConfig,
    progress: Callable[[int, int], None] | None = None,
    lazy: bool = False,
) -> tuple[Inputs, np.ndarray]:
    """Decode and window every sample in parallel (tf.data): ``X`` float16, ``Y`` float32.

    With ``lazy``, ``X`` is a :class:`LazyInputs` that decodes slices when they are drawn.
    """
    n = len(samples)
    if n == 0:
        raise DatasetError("empty dataset: nothing to decode")
    y = np.asarray([s.labels for s in samples], dtype=np.float32)
    lazy_x = LazyInputs(samples, cfg)
    if lazy:
        return lazy_x, y
    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.numpy_function(lazy_x.one, [i], tf.float16, stateful=False),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    x = np.empty((n, cfg.input_size, cfg.input_size, 3), dtype=np.float16)
    for k, item in enumerate(ds.as_numpy_iterator()):
        x[k] = item
        if progress is not None:
            progress(k + 1, n)
    return x, y


def decode_split(
    train: Sequence[Sample],
    val: Sequence[Sample],
    cfg: PipelineConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Inputs, np.ndarray, Inputs, np.ndarray]:
    """Training and validation inputs: decoded into memory when both fit in
    :func:`memory_budget_gb`, else decoded on the fly (said in the log). ``progress(done,
    total)`` follows the decoding into memory, both sets together."""
    total = len(train) + len(val)
    need, budget = decoded_gb(total, cfg), memory_budget_gb(cfg)
    lazy = need > budget
    if lazy:
        log.warning(
            "%d slices at %d px take %.1f GB decoded, more than the %.1f GB allowed "
            "(--memory-gb): decoding them on the fly each time they are drawn",
            total,
            cfg.input_size,
            need,
            budget,
        )
    empty = (
        np.zeros((0, cfg.input_size, cfg.input_size, 3), np.float16),
        np.zeros((0, 6), np.float32),
    )

    def shifted(offset: int) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, _n: progress(offset + done, total)

    xt, yt = decode_inputs(train, cfg, shifted(0), lazy=lazy) if train else empty
    xv, yv = decode_inputs(val, cfg, shifted(len(train)), lazy=lazy) if val else empty
    return xt, yt, xv, yv


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


def _gather(x: Inputs) -> Callable[[tf.Tensor], tf.Tensor]:
    """Indices -> float32 inputs: from memory, or decoded on the fly (:class:`LazyInputs`)."""
    if isinstance(x, LazyInputs):
        size = x.size

        def decode(i: tf.Tensor) -> tf.Tensor:
            out = tf.numpy_function(x.__getitem__, [i], tf.float16, stateful=False)
            out.set_shape([None, size, size, 3])
            return tf.cast(out, tf.float32)

        return decode
    xt = tf.constant(x)
    return lambda i: tf.cast(tf.gather(xt, i), tf.float32)


def train_dataset(x: Inputs, y: np.ndarray, cfg: PipelineConfig) -> tf.data.Dataset:
    """Endless balanced, augmented batches from the inputs."""
    groups, sizes, names = balance_groups(y)
    weights = group_weights(sizes, names, cfg)
    log.info(
        "training groups: %s",
        ", ".join(
            f"{n} {int(s)} (p={w:.3f})" for n, s, w in zip(names, sizes, weights, strict=True)
        ),
    )
    gather = _gather(x)
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
        lambda i: (gather(i), tf.gather(yt, i)),
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


def eval_dataset(x: Inputs, batch_size: int) -> tf.data.Dataset:
    """The inputs in order, in batches (decoded in parallel when ``x`` is lazy)."""
    if isinstance(x, LazyInputs):
        ds = (
            tf.data.Dataset.range(len(x))
            .batch(batch_size)
            .map(_gather(x), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        )
    else:
        ds = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
        ds = ds.map(lambda a: tf.cast(a, tf.float32))
    return ds.with_options(_data_sharded(tf.data.Dataset.range(1)).options()).prefetch(
        tf.data.AUTOTUNE
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
