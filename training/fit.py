"""Training runs: build, fit with checkpoints and resume, validate, export weights with a manifest.

A run lives in one folder:
``config.json`` (everything needed to resume), ``last.keras`` (model and optimizer after the
latest epoch), ``best.weights.h5`` (best validation weighted log loss so far), ``state.json``
(epoch, best score, patience), ``log.csv`` and ``tensorboard/``, and once exported
``ich_xception_lstm.weights.h5`` with its manifest.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ich_model.labels import LABELS, METRIC_WEIGHTS
from ich_model.metrics import per_label_auc, sensitivity_specificity, weighted_log_loss
from ich_model.model import ModelConfig, build_model, save_weights
from training import calibrate
from training.datasets import (
    Sample,
    describe,
    picture_hu_ranges,
    read_dataset,
    split_by_group,
)
from training.pipeline import (
    Inputs,
    PipelineConfig,
    apply_logit_offset,
    decode_split,
    eval_dataset,
    prior_correction,
    train_dataset,
)

log = logging.getLogger(__name__)

EXPORT_NAME = "ich_xception_lstm.weights.h5"


@keras.saving.register_keras_serializable(package="ich")
def weighted_bce(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy weighted like the RSNA metric (any x2), averaged per slice."""
    w = tf.constant(METRIC_WEIGHTS, dtype=tf.float32)
    y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
    y_true = tf.cast(y_true, tf.float32)
    bce = -(y_true * tf.math.log(y_pred) + (1.0 - y_true) * tf.math.log(1.0 - y_pred))
    return tf.reduce_sum(bce * w, axis=-1) / tf.reduce_sum(w)


@dataclass
class RunConfig:
    data: list[str]
    formats: list[str | None]
    out: str
    model: dict[str, Any] = field(default_factory=lambda: ModelConfig().to_dict())
    pipeline: dict[str, Any] = field(default_factory=lambda: asdict(PipelineConfig()))
    epochs: int = 30
    steps_per_epoch: int | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    ema: float | None = None  # momentum of an exponential moving average of the weights
    init_weights: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 5
    max_minutes: float | None = None
    hu_range: tuple[float, float] | None = None
    command: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("hu_range"):
            d["hu_range"] = tuple(d["hu_range"])
        return cls(**d)


def _strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored with TF_CONFIG, Mirrored across several GPUs, else the default."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _fit_distributed(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    data: tf.data.Dataset,
    epochs: int,
    initial_epoch: int,
    steps: int,
    callbacks: Sequence[keras.callbacks.Callback],
) -> None:
    """A plain tf.distribute training loop, for strategies with several replicas.

    Keras 3's ``fit`` does not run under MultiWorkerMirroredStrategy (it reduces sample
    batches and scalar metrics across workers in ways the strategy rejects; see
    tensorflow/tensorflow#72388), so replicated runs step through this loop instead:
    the same loss, optimizer, callbacks and checkpoints.
    """
    global_batch = int(data.element_spec[0].shape[0])
    dist = iter(strategy.experimental_distribute_dataset(data))
    optimizer = model.optimizer

    def replica_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.nn.compute_average_loss(weighted_bce(y, p), global_batch_size=global_batch)
        # mixed precision on GPUs: the LossScaleOptimizer scales and unscales
        grads = tape.gradient(optimizer.scale_loss(loss), model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(it: Any) -> Any:
        x, y = next(it)
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    for cb in callbacks:
        cb.set_model(model)
    model.stop_training = False
    for epoch in range(initial_epoch, epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        total = 0.0
        for _ in range(steps):
            total += float(train_step(dist))
        for cb in callbacks:
            cb.on_epoch_end(epoch, {"loss": total / steps})
        if model.stop_training:
            break


def _is_chief() -> bool:
    cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = cfg.get("task", {})
    return (
        task.get("type", "worker") in ("chief",)
        or (task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0)
        or not cfg
    )


def evaluate_arrays(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Every metric we report, on one set of labels and predictions."""
    sens_spec = {
        lab: sensitivity_specificity(y[:, i], p[:, i], threshold) for i, lab in enumerate(LABELS)
    }
    return {
        "weighted_log_loss": weighted_log_loss(y, p),
        "auc": per_label_auc(y, p),
        "n_images": len(y),
        "threshold": threshold,
        "sensitivity": {k: v[0] for k, v in sens_spec.items()},
        "specificity": {k: v[1] for k, v in sens_spec.items()},
        "positives": {lab: int(y[:, i].sum()) for i, lab in enumerate(LABELS)},
    }


def _ema_optimizer(optimizer: Any) -> keras.optimizers.Optimizer | None:
    """The optimizer that keeps a moving average of the weights, or None.

    Under mixed precision (on a GPU) Keras wraps Adam in a LossScaleOptimizer, whose own
    ``use_ema`` is off: the average lives in its inner optimizer.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if getattr(inner, "use_ema", False) else None


class _Progress(keras.callbacks.Callback):
    """One line per epoch with time left; the batch bar comes from Keras's own verbose=1."""

    def __init__(self, total_epochs: int) -> None:
        super().__init__()
        self.total = total_epochs
        self.t0 = time.time()
        self.first: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.first is None:
            self.first = epoch
        done = epoch - self.first + 1
        per = (time.time() - self.t0) / done
        left = per * (self.total - epoch - 1)
        print(f"epoch {epoch + 1}/{self.total} done, about {left / 60:.1f} min left", flush=True)


class _DecodeProgress:
    """A line at every tenth of the decoding with the time left (it can take minutes)."""

    def __init__(self, t0: float) -> None:
        self.t0, self.shown = t0, 0

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth <= self.shown:
            return
        self.shown = tenth
        left = (time.time() - self.t0) / done * (total - done)
        print(f"decoding: {done}/{total} slices, about {left:.0f} s left", flush=True)


class _ValidateAndCheckpoint(keras.callbacks.Callback):
    """After each epoch: validate with the challenge metric, checkpoint, early-stop, time-limit.

    The score that picks the best epoch is the weighted log loss after the same calibration
    the export applies (cross-fitted over validation patients), so the kept checkpoint is the
    one whose exported, calibrated probabilities are best, not the least overconfident one.
    """

    def __init__(
        self,
        run: Path,
        cfg: RunConfig,
        xv: Inputs,
        yv: np.ndarray,
        state: dict[str, Any],
        deadline: float | None,
        offset: np.ndarray,
        groups: np.ndarray,
    ) -> None:
        super().__init__()
        self.offset = offset
        self.groups = groups
        self.run, self.cfg, self.xv, self.yv = run, cfg, xv, yv
        self.state = state
        self.deadline = deadline
        self.is_chief = _is_chief()
        self.epoch_start = time.time()
        # Workers of one multi-worker run share --out: only the chief writes the logs.
        self.writer = (
            tf.summary.create_file_writer(str(run / "tensorboard")) if self.is_chief else None
        )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_start = time.time()

    @staticmethod
    def _swap_ema(opt: keras.optimizers.Optimizer) -> None:
        """Exchange the weights with their moving average (Polyak averaging), in place."""
        for var, avg in zip(
            opt._trainable_variables, opt._model_variables_moving_average, strict=True
        ):
            raw = keras.ops.convert_to_numpy(var)
            var.assign(avg)
            avg.assign(raw)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        ema = _ema_optimizer(self.model.optimizer)
        if ema is not None:
            self._swap_ema(ema)  # validate and keep the averaged weights
        try:
            self._epoch_end(epoch, logs)
        finally:
            if ema is not None:
                self._swap_ema(ema)
        if self.is_chief:
            tmp = self.run / "last.tmp.keras"
            self.model.save(str(tmp))  # raw weights and optimizer state, for --resume
            tmp.replace(self.run / "last.keras")
            (self.run / "state.json").write_text(json.dumps(self.state, indent=2), encoding="utf-8")

    def _epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            "seconds": round(time.time() - self.epoch_start, 1),
        }
        if len(self.yv):
            p = apply_logit_offset(
                self.model.predict(eval_dataset(self.xv, 64), verbose=0), self.offset
            )
            m = evaluate_arrays(self.yv, calibrate.cross_fitted(p, self.yv, self.groups))
            row["val_uncalibrated_weighted_log_loss"] = weighted_log_loss(self.yv, p)
            row["val_weighted_log_loss"] = m["weighted_log_loss"]
            for lab, v in m["auc"].items():
                row[f"val_auc_{lab}"] = v
            score = m["weighted_log_loss"]
        else:
            score = float(logs.get("loss", np.inf))
        chief = self.is_chief
        if self.writer is not None:
            with self.writer.as_default():
                for k, v in row.items():
                    if k != "epoch" and v is not None and np.isfinite(v):
                        tf.summary.scalar(k, v, step=epoch + 1)
        if chief:
            self._append_csv(row)
        if score < self.state.get("best", np.inf):
            self.state.update(best=score, best_epoch=epoch + 1, wait=0)
            if chief:
                self.model.save_weights(str(self.run / "best.weights.h5"))
        else:
            self.state["wait"] = self.state.get("wait", 0) + 1
        self.state["epoch"] = epoch + 1
        auc_any = row.get("val_auc_any")
        print(
            f"epoch {epoch + 1}: loss {row['loss']:.4f}, val wLL {score:.4f}"
            + (f", val AUC(any) {auc_any:.3f}" if auc_any is not None else "")
            + f", best {self.state['best']:.4f} (epoch {self.state['best_epoch']})",
            flush=True,
        )
        if self.state["wait"] >= self.cfg.patience:
            print(f"early stop: no improvement for {self.cfg.patience} epochs", flush=True)
            self.model.stop_training = True
        if self.deadline is not None and time.time() > self.deadline:
            print(
                "time limit reached: stopping after this epoch (resume with --resume)", flush=True
            )
            self.model.stop_training = True

    def _append_csv(self, row: dict[str, Any]) -> None:
        """Append one epoch; if the columns changed (a resumed run), rewrite with all of them."""
        path = self.run / "log.csv"
        rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        fields = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row.keys()]))
        if rows and list(rows[0].keys()) == fields:
            with open(path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows([*rows, row])
        tmp.replace(path)


def _load_samples(cfg: RunConfig) -> tuple[list[Sample], list[Sample]]:
    samples: list[Sample] = []
    for folder, fmt in zip(cfg.data, cfg.formats, strict=True):
        samples.extend(read_dataset(folder, fmt))
    return split_by_group(samples, cfg.val_fraction, cfg.seed)


def fit(cfg: RunConfig, resume: bool = False) -> Path:
    """Train (or resume) a run; returns the run folder. Exports weights at the end."""
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"epoch": 0, "best": float("inf"), "best_epoch": 0, "wait": 0}
    if resume:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: no config.json to resume from")
        saved = RunConfig.load(run / "config.json")
        saved.epochs = cfg.epochs
        saved.max_minutes = cfg.max_minutes
        saved.patience = cfg.patience
        cfg = saved
        if (run / "state.json").is_file():
            state.update(json.loads((run / "state.json").read_text(encoding="utf-8")))
    else:
        cfg.save(run / "config.json")

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = _strategy()  # before any other TF op: collectives are configured at start-up
    keras.utils.set_random_seed(cfg.seed + state["epoch"])
    mcfg = ModelConfig.from_dict(cfg.model)
    pcfg = PipelineConfig(
        **{
            **cfg.pipeline,
            "input_size": mcfg.input_size,
            "hu_range": cfg.hu_range,
            "seed": cfg.seed + state["epoch"],
        }
    )
    train_s, val_s = _load_samples(cfg)
    pictures = picture_hu_ranges(train_s)
    if pictures and cfg.hu_range is None:
        log.warning(
            "training on 8-bit pictures (%s) without --hu-range: at inference, DICOM HU "
            "outside the range the pictures carried reach the model; give --hu-range "
            "(e.g. 0,80 for brain-window pictures)",
            ", ".join(f"{k} {lo:g}..{hi:g} HU" for k, (lo, hi) in pictures.items()),
        )
    print(
        f"data: {len(train_s)} training and {len(val_s)} validation slices; "
        f"groups on both sides: {len({s.group for s in train_s} & {s.group for s in val_s})}",
        flush=True,
    )
    t0 = time.time()
    xt, yt, xv, yv = decode_split(train_s, val_s, pcfg, _DecodeProgress(t0))
    if isinstance(xt, np.ndarray):
        print(
            f"decoded and windowed {len(xt) + len(xv)} slices in {time.time() - t0:.0f} s",
            flush=True,
        )
    if _is_chief():
        (run / "data.json").write_text(
            json.dumps(
                {
                    "train": describe(train_s),
                    "validation": describe(val_s),
                    "validation_groups": sorted({s.group for s in val_s}),
                },
                indent=2,
            ),
            encoding="utf-8",
        )

    with strategy.scope():
        if resume and (run / "last.keras").is_file():
            model = keras.models.load_model(str(run / "last.keras"), safe_mode=True)
            print(f"resumed from {run / 'last.keras'} after epoch {state['epoch']}", flush=True)
        else:
            model = build_model(mcfg)
            if cfg.init_weights:
                model.load_weights(cfg.init_weights)
                print(f"initialised from {cfg.init_weights}", flush=True)
            optimizer = keras.optimizers.Adam(
                cfg.learning_rate,
                weight_decay=cfg.weight_decay or None,
                use_ema=cfg.ema is not None and strategy.num_replicas_in_sync == 1,
                ema_momentum=cfg.ema or 0.99,
            )
            model.compile(optimizer=optimizer, loss=weighted_bce)
    steps = cfg.steps_per_epoch or max(1, len(train_s) // pcfg.batch_size)
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    offset = prior_correction(yt, pcfg)
    print("prior correction (logit offsets): " + ", ".join(f"{v:+.2f}" for v in offset), flush=True)
    if state["epoch"] < cfg.epochs:
        data = train_dataset(xt, yt, pcfg)
        callbacks = [
            _ValidateAndCheckpoint(
                run, cfg, xv, yv, state, deadline, offset, np.asarray([s.group for s in val_s])
            ),
            _Progress(cfg.epochs),
        ]
        if strategy.num_replicas_in_sync > 1:
            _fit_distributed(model, strategy, data, cfg.epochs, state["epoch"], steps, callbacks)
        else:
            model.fit(
                data,
                epochs=cfg.epochs,
                initial_epoch=state["epoch"],
                steps_per_epoch=steps,
                shuffle=False,  # the dataset shuffles and balances itself
                verbose=2 if not sys.stdout.isatty() else 1,
                callbacks=callbacks,
            )
    if _is_chief():
        export(run, cfg, model, xv, yv, val_s, train_s, offset, yt.mean(axis=0))
    return run


def export(
    run: Path,
    cfg: RunConfig,
    model: keras.Model,
    xv: Inputs,
    yv: np.ndarray,
    val_s: Sequence[Sample],
    train_s: Sequence[Sample],
    offset: np.ndarray,
    yt_prior: np.ndarray | None = None,
) -> Path:
    """Write the best weights, calibrated, with a manifest holding held-out metrics.

    The class-balancing prior correction and a per-label Platt calibration fitted on the
    validation patients are folded into the output layer, so the exported network gives
    calibrated probabilities with no extra step at inference. The reported metrics use
    cross-fitted calibration (see ``training.calibrate``): no slice helped calibrate itself.
    """
    mcfg = ModelConfig.from_dict(cfg.model)
    if (run / "best.weights.h5").is_file():
        model.load_weights(str(run / "best.weights.h5"))
    inference = build_model(mcfg, inference=True)
    inference.set_weights(model.get_weights())
    dense = inference.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + offset])
    metrics: dict[str, Any] = {}
    platt = None
    if len(yv):
        raw = inference.predict(eval_dataset(xv, 64), verbose=0)
        groups = np.asarray([s.group for s in val_s])
        p = calibrate.cross_fitted(raw, yv, groups)
        platt = calibrate.fit_all(raw, yv)
        dense.set_weights(list(calibrate.fold_into_dense(kernel, bias + offset, platt)))
        metrics = evaluate_arrays(yv, p)
        metrics["uncalibrated_weighted_log_loss"] = evaluate_arrays(yv, raw)["weighted_log_loss"]
        metrics["dataset"] = (
            "held-out validation split (" + ", ".join(sorted({s.source for s in val_s})) + ")"
        )
        np.savez_compressed(
            run / "validation_predictions.npz",
            y=yv,
            p=p,
            paths=np.asarray([str(s.path) for s in val_s]),
            sources=np.asarray([s.source for s in val_s]),
            groups=np.asarray([s.group for s in val_s]),
            train_prior=yt_prior if yt_prior is not None else np.full(6, np.nan),
        )
    counts = describe(train_s)
    data_summary = "; ".join(
        f"{k}: {v['slices']} slices, {v['any']} with ICH" for k, v in counts.items()
    )
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else {}
    path = save_weights(
        inference,
        mcfg,
        run / EXPORT_NAME,
        trained=True,
        hu_range=cfg.hu_range,
        training={
            "data": cfg.data,
            "formats": cfg.formats,
            "picture_hu_ranges": picture_hu_ranges([*train_s, *val_s]),
            "data_summary": data_summary,
            "train_counts": counts,
            "validation_counts": describe(val_s),
            "epochs_run": state.get("epoch"),
            "best_epoch": state.get("best_epoch"),
            "learning_rate": cfg.learning_rate,
            "weight_decay": cfg.weight_decay,
            "ema": cfg.ema,
            "init_weights": cfg.init_weights,
            "init_run_command": _run_command(cfg.init_weights),
            "pipeline": cfg.pipeline,
            "val_fraction": cfg.val_fraction,
            "prior_correction_logit_offsets": [float(v) for v in offset],
            "platt_calibration": None if platt is None else platt.tolist(),
            "seed": cfg.seed,
            "command": cfg.command,
        },
        metrics=metrics,
    )
    print(f"exported {run / EXPORT_NAME} with {path.name}", flush=True)
    return run / EXPORT_NAME


def _run_command(weights: str | None) -> str | None:
    """The command of the run whose weights a warm start began from, when it is known."""
    if not weights:
        return None
    config = Path(weights).parent / "config.json"
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("command") or "") or None
    except (OSError, ValueError):
        return None


def export_run(run: Path) -> Path:
    """Export a run's best weights again (with the current calibration and metrics code)."""
    cfg = RunConfig.load(run / "config.json")
    mcfg = ModelConfig.from_dict(cfg.model)
    pcfg = PipelineConfig(
        **{
            **cfg.pipeline,
            "input_size": mcfg.input_size,
            "hu_range": cfg.hu_range,
            "seed": cfg.seed,
        }
    )
    train_s, val_s = _load_samples(cfg)
    yt = np.asarray([s.labels for s in train_s], dtype=np.float32)
    _, _, xv, yv = decode_split([], val_s, pcfg)
    model = build_model(mcfg)
    return export(
        run, cfg, model, xv, yv, val_s, train_s, prior_correction(yt, pcfg), yt.mean(axis=0)
    )


def install(weights: Path, dest: Path, card: Path | None = None) -> Path:
    """Make verified weights the bundled model: copy them with their manifest into ``dest``.

    When the run's validation predictions are beside the weights, the operating threshold
    is chosen on them, the manifest's metrics and summary are rewritten from the validation
    report, and the model card is written to ``card``.
    """
    from dataclasses import replace

    from ich_model.weights import manifest_path_for, read_manifest, write_manifest
    from training.card import find_int8_record, find_reproduction_record, model_card, report

    manifest, wpath = read_manifest(weights)
    npz = wpath.parent / "validation_predictions.npz"
    rep = None
    if npz.is_file():
        rep = report(npz)
        allm = rep["sets"]["all"]
        metrics = {
            "dataset": "held-out validation split ("
            + ", ".join(k for k in rep["sets"] if k != "all")
            + ")",
            "weighted_log_loss": allm["weighted_log_loss"],
            "weighted_log_loss_ci": allm["weighted_log_loss_ci"],
            "prior_baseline_log_loss": allm["prior_baseline_log_loss"],
            "auc": allm["auc"],
            "auc_ci": allm["auc_ci"],
            "n_images": allm["n_images"],
            "threshold": rep["threshold"],
            "any_sensitivity": allm["any_sensitivity"],
            "any_specificity": allm["any_specificity"],
            "per_source": {k: v for k, v in rep["sets"].items() if k != "all"},
        }
        manifest = replace(
            manifest,
            threshold=rep["threshold"],
            metrics=metrics,
            summary="Research and teaching second opinion, not for diagnostic use; metrics "
            "measured on held-out validation data (see MODEL_CARD.md).",
        )
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / EXPORT_NAME
    if wpath.resolve() != target.resolve():
        shutil.copyfile(wpath, target)
    write_manifest(target, manifest)
    if rep is not None and card is not None:
        final, _ = read_manifest(target)
        # The int8 comparison stays only when one was measured for these weights (ich-train
        # quantize --install writes it next to them); a card for new weights drops the old one.
        # So does the check of a second run (ich-train check-reproduction --install).
        int8 = find_int8_record(dest, final)
        repro = find_reproduction_record(dest, final)
        card.write_text(model_card(final, rep, final.sha256, int8, repro), encoding="utf-8")
        log.info("wrote model card %s", card)
    ship_onnx(target)
    log.info("installed %s -> %s", wpath, target)
    return manifest_path_for(target)


def ship_onnx(weights: Path) -> Path:
    """Convert installed weights to float32 ONNX beside them, so that the app and the
    bundle score without converting (or importing TensorFlow) on first use; converted
    models of other weights or converter versions in that folder are removed."""
    from ich_model.runtime import build_keras, export_onnx, hash_record_path, onnx_file_name
    from ich_model.weights import read_manifest

    manifest, wpath = read_manifest(weights)
    out = wpath.parent / onnx_file_name(manifest, "float32")
    keep = {out.name}
    keep |= {p.name for p in wpath.parent.glob(out.name.replace("float32.onnx", "int8*"))}
    for stale in wpath.parent.glob("ich-*.onnx"):
        if stale.name not in keep:
            stale.unlink()
            stale.with_name(stale.name[: -len(".onnx")] + ".acceptance.json").unlink(
                missing_ok=True
            )
            hash_record_path(stale).unlink(missing_ok=True)
            log.info("removed %s (other weights or converter version)", stale)
    if not out.is_file() or not hash_record_path(out).is_file():
        export_onnx(build_keras(manifest, wpath), manifest, out)
    return out
