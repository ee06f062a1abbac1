"""``ich-train quantize``: an int8 model for given weights, judged on their own validation split.

Static int8 quantisation (ONNX Runtime QDQ, convolutions only, see
:func:`ich_model.runtime.quantize_int8`) is calibrated on real slices from the training
side of the split the weights were trained with, then compared with float32 on every
validation slice of that split. The split is rebuilt from the manifest's training record
with the functions ``ich-train fit`` used (:func:`training.datasets.read_dataset` and
:func:`training.datasets.split_by_group`, same folders, formats, seed and validation
fraction) and checked against the counts the manifest recorded, so no slice the weights
were trained on is measured. Slices are decoded to HU and windowed as inference does
(:func:`training.datasets.decode_hu`, then :func:`ich_model.windowing.model_input` with the
manifest's HU range), in float32.

The int8 file and its acceptance record are written next to each other; the runtime uses
the int8 model only where the record accepts it for these weights and this kind of CPU.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ich_model.runtime import (
    Int8Report,
    accept_int8,
    int8_record_path,
    onnx_file_name,
    physical_cores,
)
from ich_model.weights import Manifest
from ich_model.windowing import model_input
from training.datasets import Sample, decode_hu, describe, read_dataset, split_by_group

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = 256
#: progress(stage, done, total); stage: "calibration" or "validation" (decoding), "compare".
Progress = Callable[[str, int, int], None]


class QuantizeError(Exception):
    """The split cannot be rebuilt or the request makes no sense; says what to give instead."""


@dataclass(frozen=True)
class TrainingSplit:
    """The training/validation split the weights were trained with, rebuilt."""

    train: list[Sample]
    validation: list[Sample]
    data: list[str]
    formats: list[str | None]
    seed: int
    val_fraction: float
    checked: bool  # the slice counts match those the manifest recorded


def _normalise(counts: Any) -> Any:
    return json.loads(json.dumps(counts, sort_keys=True))


def _summary(counts: Mapping[str, Mapping[str, int]]) -> str:
    return ", ".join(
        f"{src} {c['slices']} slices / {c['groups']} groups / {c['any']} with ICH"
        for src, c in counts.items()
    )


def training_split(
    manifest: Manifest,
    data: Sequence[str] | None = None,
    formats: Sequence[str | None] | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
) -> TrainingSplit:
    """Rebuild the split from the manifest's training record, as ``ich-train fit`` made it.

    ``data`` replaces the recorded folders (which are paths where training ran);
    ``formats`` the recorded formats; ``seed`` and ``val_fraction`` are for weights whose
    manifest does not record them (they must agree with it where it does).
    """
    tr = manifest.training or {}
    folders = [str(d) for d in (data or tr.get("data") or [])]
    if not folders:
        raise QuantizeError(
            "the weights' manifest records no training data: give the DATA folders they were "
            "trained on (and --seed and --val-fraction)"
        )
    for folder in folders:
        if not Path(folder).is_dir():
            where = "given" if data else "recorded in the manifest's training record"
            raise QuantizeError(
                f"{folder} ({where}) is not a folder here; give the DATA folders the weights "
                "were trained on as arguments"
            )
    if formats:
        fmts = list(formats) * len(folders) if len(formats) == 1 else list(formats)
        if len(fmts) != len(folders):
            raise QuantizeError("give --format once, or once per DATA folder")
    else:
        recorded = list(tr.get("formats") or [])
        fmts = recorded if len(recorded) == len(folders) else [None] * len(folders)

    def setting(name: str, given: Any, cast: Callable[[Any], Any]) -> Any:
        recorded = tr.get(name)
        if recorded is None:
            if given is None:
                raise QuantizeError(
                    f"the weights' manifest does not record the split's {name}: give "
                    f"--{name.replace('_', '-')} as used by ich-train fit"
                )
            log.warning("manifest records no %s: using the given %s", name, given)
            return cast(given)
        if given is not None and cast(given) != cast(recorded):
            raise QuantizeError(
                f"the weights were trained with {name} {recorded}; a split with {given} would "
                "measure int8 on slices they were trained on. Received: "
                f"--{name.replace('_', '-')} {given}"
            )
        return cast(recorded)

    split_seed = int(setting("seed", seed, int))
    fraction = float(setting("val_fraction", val_fraction, float))
    samples: list[Sample] = []
    for folder, fmt in zip(folders, fmts, strict=True):
        samples.extend(read_dataset(folder, fmt))
    train, val = split_by_group(samples, fraction, split_seed)
    if not val:
        raise QuantizeError(f"validation fraction {fraction}: no validation slices to measure on")
    checked = False
    for side, got, key in (
        ("validation", val, "validation_counts"),
        ("training", train, "train_counts"),
    ):
        want = tr.get(key)
        if want is None:
            continue
        if _normalise(describe(got)) != _normalise(want):
            raise QuantizeError(
                f"the rebuilt {side} split is not the one the weights were trained with "
                f"(manifest: {_summary(want)}; rebuilt: {_summary(describe(got))}); give the "
                "same DATA folders as the training run"
            )
        checked = True
    if not checked:
        log.warning(
            "the manifest records no split counts: cannot check that the rebuilt split is "
            "the one the weights were trained with"
        )
    return TrainingSplit(train, val, folders, fmts, split_seed, fraction, checked)


def pick_calibration(train: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` training slices, a seeded random draw (kept in file order)."""
    if n < 1:
        raise QuantizeError(f"--calibration must be at least 1. Received: {n}")
    if n >= len(train):
        return list(train)
    idx = np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))
    return [train[int(i)] for i in idx]


def model_inputs(
    samples: Sequence[Sample],
    size: int,
    hu_range: Sequence[float] | None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Model inputs ``[n, size, size, 3]`` float32: decoded to HU as in training, windowed
    as at inference."""
    out = np.empty((len(samples), size, size, 3), np.float32)

    def one(i: int) -> int:
        out[i] = model_input(decode_hu(samples[i]), size, hu_range)
        return i

    with ThreadPoolExecutor(physical_cores(), thread_name_prefix="ich-decode") as pool:
        for k, _ in enumerate(pool.map(one, range(len(samples))), start=1):
            if progress is not None:
                progress(k, len(samples))
    return out


def labels_of(samples: Sequence[Sample]) -> np.ndarray:
    return np.asarray([s.labels for s in samples], dtype=np.float32).reshape(-1, 6)


@dataclass(frozen=True)
class QuantizeResult:
    report: Int8Report
    int8_path: Path
    record_path: Path
    record: dict[str, Any]


def quantize(
    manifest: Manifest,
    weights_path: Path,
    out_dir: Path,
    *,
    data: Sequence[str] | None = None,
    formats: Sequence[str | None] | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    n_calibration: int = DEFAULT_CALIBRATION,
    batch: int = 8,
    card: Path | None = None,
    command: str = "",
    environ: Mapping[str, str] = os.environ,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Rebuild the split, quantise, compare, and write the int8 file and its record to
    ``out_dir`` (and the comparison into the model card at ``card``, if given)."""
    split = training_split(manifest, data, formats, seed, val_fraction)
    calib = pick_calibration(split.train, n_calibration, split.seed)
    size, hu_range = manifest.input_size, manifest.hu_range

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda d, t: progress(name, d, t))

    log.info("decoding %d calibration and %d validation slices", len(calib), len(split.validation))
    x_cal = model_inputs(calib, size, hu_range, stage("calibration"))
    x_val = model_inputs(split.validation, size, hu_range, stage("validation"))
    extra = {
        "validation": {
            "data": split.data,
            "formats": split.formats,
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "counts_match_manifest": split.checked,
            "counts": describe(split.validation),
            "summary": _summary(describe(split.validation)),
        },
        "calibration": {
            "from": "training side of the split",
            "counts": describe(calib),
            "summary": _summary(describe(calib)),
        },
        "hu_range": list(hu_range) if hu_range else None,
        # other work on the machine slows the speed measured: say how busy it was
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "command": command,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report = accept_int8(
        manifest,
        weights_path,
        calibration=x_cal,
        validation=x_val,
        validation_labels=labels_of(split.validation),
        environ=environ,
        out_dir=out_dir,
        extra=extra,
        batch=batch,
        progress=stage("compare"),
        threshold=manifest.threshold,
    )
    int8_path = out_dir / onnx_file_name(manifest, "int8")
    record_path = int8_record_path(int8_path)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if card is not None:
        from training.card import write_int8_section

        write_int8_section(card, record)
        log.info("wrote the int8 comparison into %s", card)
    return QuantizeResult(report, int8_path, record_path, record)


def format_comparison(record: Mapping[str, Any]) -> str:
    """The comparison as ``ich-train quantize`` prints it."""

    def num(v: Any, nd: int) -> str:
        return "n/a" if v is None else f"{v:.{nd}f}"

    tol = record.get("tolerances") or {}
    auc_f, auc_q = record.get("auc_any_float32"), record.get("auc_any_int8")
    wll_f, wll_q = record.get("log_loss_float32"), record.get("log_loss_int8")
    auc_d = f"{auc_q - auc_f:+.4f}" if auc_f is not None and auc_q is not None else "n/a"
    wll_d = f"{(wll_q - wll_f) / wll_f:+.1%}" if wll_f and wll_q is not None else "n/a"
    val = record.get("validation") or {}
    lines = [
        f"int8 vs float32 for weights {str(record.get('weights_sha256'))[:12]} on "
        f"{record.get('cpu')} ({record.get('cpu_model')}), onnxruntime {record.get('onnxruntime')}",
        f"  validation: {record.get('n_slices')} slices ({val.get('summary')}); seed "
        f"{val.get('seed')}, val_fraction {val.get('val_fraction')}, counts "
        + ("match the manifest" if val.get("counts_match_manifest") else "NOT checked"),
        f"  calibration: {record.get('n_calibration')} training slices "
        f"({(record.get('calibration') or {}).get('summary')})",
        f"  {'':22s} {'float32':>9s} {'int8':>9s}",
        f"  {'AUC(any)':22s} {num(auc_f, 4):>9s} {num(auc_q, 4):>9s}   "
        f"diff {auc_d} (tolerance {tol.get('auc_any')})",
        f"  {'weighted log loss':22s} {num(wll_f, 4):>9s} {num(wll_q, 4):>9s}   "
        f"change {wll_d} (tolerance {tol.get('weighted_log_loss_relative', 0):.0%})",
    ]
    f32, i8 = record.get("slices_per_s_float32"), record.get("slices_per_s_int8")
    if f32 and i8:
        lines.append(
            f"  {'slices/s at batch ' + str(record.get('batch')):22s} {f32:9.1f} {i8:9.1f}   "
            f"int8 {i8 / f32:.2f}x float32 ({record.get('cores')} cores, "
            f"load average {record.get('load_average')} at the start)"
        )
    lines += [
        f"  max |p_int8 - p_float32|: {num(record.get('max_abs_diff'), 4)}"
        + (
            f'; "any" calls changed at the operating threshold {record["threshold"]:.4f}: '
            f"{record['any_calls_changed']} of {record.get('n_slices')}"
            if record.get("any_calls_changed") is not None
            else ""
        ),
        "  verdict: "
        + ("ACCEPTED" if record.get("accepted") else "NOT ACCEPTED")
        + f" ({record.get('reason')})",
    ]
    return "\n".join(lines)
