"""Validation report and model card for a trained run.

Everything here is measured on the run's held-out validation split (patients or studies
never used in training), from ``validation_predictions.npz`` written at export: per-label
ROC AUC with bootstrap 95% confidence intervals (resampling patients), the weighted log
loss against the prior baseline, the operating threshold and its sensitivity and
specificity, per data source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ich_model.labels import LABELS
from ich_model.metrics import roc_auc, sensitivity_specificity, weighted_log_loss
from ich_model.weights import Manifest

PAPER_LOSS = 0.07528
WINNER_LOSS = 0.0438


def _group_bootstrap(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Percentile CIs of every label's AUC and of the weighted log loss, resampling groups."""
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    aucs: dict[str, list[float]] = {lab: [] for lab in LABELS}
    losses: list[float] = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in pick])
        losses.append(weighted_log_loss(y[idx], p[idx]))
        for i, lab in enumerate(LABELS):
            v = roc_auc(y[idx, i], p[idx, i])
            if not math.isnan(v):
                aucs[lab].append(v)

    def ci(v: Sequence[float]) -> list[float] | None:
        return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] if len(v) > 20 else None

    return {"auc_ci": {lab: ci(v) for lab, v in aucs.items()}, "weighted_log_loss_ci": ci(losses)}


def choose_threshold(y_any: np.ndarray, p_any: np.ndarray, min_sensitivity: float = 0.8) -> float:
    """The highest threshold on "any" whose sensitivity is still >= ``min_sensitivity``.

    A second opinion should rarely stay silent on a bleed; among thresholds that keep
    sensitivity, the highest one gives the fewest false alarms.
    """
    pos = np.sort(np.asarray(p_any, dtype=np.float64)[np.asarray(y_any) > 0.5])[::-1]
    if len(pos) == 0:
        return 0.5
    k = max(1, math.ceil(min_sensitivity * len(pos)))
    return float(pos[k - 1])


def report(npz: Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics per source and overall from a run's validation predictions."""
    d = np.load(npz, allow_pickle=False)
    y, p = d["y"].astype(np.float64), d["p"].astype(np.float64)
    sources = d["sources"] if "sources" in d else np.asarray(["validation"] * len(y))
    groups = d["groups"] if "groups" in d else np.arange(len(y)).astype(str)
    prior = d["train_prior"] if "train_prior" in d else y.mean(axis=0)
    threshold = choose_threshold(y[:, -1], p[:, -1])
    out: dict[str, Any] = {"threshold": threshold, "sets": {}}
    for name in ["all", *sorted(set(sources.tolist()))]:
        m = np.ones(len(y), bool) if name == "all" else sources == name
        ys, ps = y[m], p[m]
        base = np.broadcast_to(np.clip(prior, 1e-6, 1 - 1e-6), ys.shape)
        sens, spec = sensitivity_specificity(ys[:, -1], ps[:, -1], threshold)
        entry: dict[str, Any] = {
            "n_images": int(m.sum()),
            "n_groups": len(set(groups[m].tolist())),
            "positives": {lab: int(ys[:, i].sum()) for i, lab in enumerate(LABELS)},
            "weighted_log_loss": weighted_log_loss(ys, ps),
            "prior_baseline_log_loss": weighted_log_loss(ys, base),
            "auc": {lab: roc_auc(ys[:, i], ps[:, i]) for i, lab in enumerate(LABELS)},
            "any_sensitivity": sens,
            "any_specificity": spec,
        }
        entry.update(_group_bootstrap(ys, ps, groups[m], n_boot, seed))
        out["sets"][name] = entry
    return out


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _ci(c: list[float] | None) -> str:
    if not c or any(x is None or not math.isfinite(x) for x in c):
        return "too few positives"
    return f"{c[0]:.3f} to {c[1]:.3f}"


def model_card(
    manifest: Manifest,
    rep: dict[str, Any],
    sha256: str,
    int8_record: dict[str, Any] | None = None,
    reproduction: dict[str, Any] | None = None,
) -> str:
    """The Markdown model card; ``int8_record`` (from :func:`find_int8_record`) fills its
    int8 section, which otherwise says that int8 was not measured for these weights, and
    ``reproduction`` (from :func:`find_reproduction_record`) its Reproducibility section,
    which otherwise says that no second run has been checked."""
    if int8_record is not None and int8_record.get("weights_sha256") != sha256:
        int8_record = None  # a comparison of other weights says nothing about these
    if reproduction is not None and reproduction.get("weights_sha256") != sha256:
        reproduction = None  # a second run checked against other weights, likewise
    arch = manifest.architecture
    tr = manifest.training
    lines = [
        "# Model card: ICH second opinion, bundled weights",
        "",
        "**Not for diagnostic use.** A research and teaching second opinion on intracranial",
        "hemorrhage in head CT. It must never replace reading every slice.",
        "",
        "## Summary",
        "",
        f"- Weights: `{manifest.weights_file}`, sha256 `{sha256}`",
        f"- Network: Xception-LSTM (Ko et al.) at {arch.get('input_size')} px, "
        f"Xception width {arch.get('width')}, {arch.get('middle_blocks')} middle-flow blocks, "
        f"LSTM {arch.get('lstm_units')} units over {arch.get('timesteps')} timesteps, 6 sigmoids",
        f"- Operating threshold: {rep['threshold']:.4f} (on every label; chosen on validation "
        'so that sensitivity for "any" stays at or above 0.80)',
    ]
    allm = rep["sets"]["all"]
    lines += [
        f"- Held-out validation, all sources ({allm['n_images']} slices, {allm['n_groups']} "
        f"patients or studies): weighted log loss {_fmt(allm['weighted_log_loss'], 4)} "
        f"(prior baseline {_fmt(allm['prior_baseline_log_loss'], 4)}), AUC(any) "
        f"{_fmt(allm['auc']['any'])} (95% CI {_ci(allm['auc_ci']['any'])})",
        "",
        "## Intended use",
        "",
        "A second reader for research and education: it marks, slice by slice, how likely the",
        "model thinks each hemorrhage subtype is, so that a human reader looks again. It is not",
        "a medical device, has not been validated clinically, and its outputs are not a",
        "diagnosis. Do not use it to rule out hemorrhage.",
        "",
        "## Training data",
        "",
        f"{tr.get('data_summary', 'see manifest')}.",
        "",
        "- RSNA 2019 Intracranial Hemorrhage Detection (stage 2 training set), 2,500 random slices"
        " as 8-bit PNG clipped to their header window (about brain 40/80). Non-commercial research"
        " and education use; cite Flanders et al., Radiology: AI 2020. The sample carries no"
        " patient IDs, so slices (not patients) were split; slices of one patient may sit on both"
        " sides of the split, which can flatter the RSNA validation figures.",
        "- PhysioNet CT-ICH (Hssayeni et al., Data 2020), 62 patients, brain-window JPG slices"
        " (window 40/120). Split by patient.",
        "",
        "Counts per split (slices, and positives per label):",
        "",
        "```",
        json.dumps(
            {"train": tr.get("train_counts"), "validation": tr.get("validation_counts")}, indent=1
        ),
        "```",
        "",
        "## Preprocessing",
        "",
        "HU from DICOM (modality LUT, RSNA wrap fix, padding to air), resized to the input size,",
        f"clipped to HU {manifest.hu_range} (the range the 8-bit training pictures carried, so",
        "DICOM at inference gives the model the same input), then windowed three ways (brain",
        "40/80, bone 400/1800, subdural 80/200) and stacked as three channels. Pictures are",
        "mapped back to HU with the window they were saved with (recorded in the manifest).",
        "",
        "## Training",
        "",
        "```",
        str(tr.get("command", "")),
        "```",
        "",
        *(
            [
                "It started from the weights of an earlier run on the same data and the same"
                " split (same seed, so no validation patient was ever trained on), made with:",
                "",
                "```",
                str(tr["init_run_command"]),
                "```",
                "",
            ]
            if tr.get("init_run_command")
            else []
        ),
        f"Adam, learning rate {tr.get('learning_rate')}, batch 32, loss: binary cross-entropy"
        " weighted like the RSNA metric. Balanced sampling: 40% of each batch from slices with a"
        " bleed, spread over the subtypes by count^0.5 (rare subtypes oversampled); random"
        " flips, rotations (+-10 degrees) and rescaling (+-10%). The shift in class prior that"
        " balancing causes is undone by a logit offset folded into the output bias"
        f" ({tr.get('prior_correction_logit_offsets')}), and so is a per-label Platt"
        " calibration fitted on the validation patients (the metrics below use cross-fitted"
        " calibration: each validation patient's slices were calibrated with parameters fitted"
        " on the other half). Best epoch by calibrated validation weighted log loss:"
        f" {tr.get('best_epoch')} of {tr.get('epochs_run')} run.",
        "",
        "### Departures from the paper, and why",
        "",
        "- The paper's full Xception (width 1.0, 8 middle blocks) is slow to train on the 2-core"
        " CPUs this model was trained on: a 45-minute feasibility run there saw 2.7 images/s at"
        " 128 px, and `benchmarks/bench_training.py` measures it at 299 px and at the bundled"
        " size on any machine. The bundled variant keeps the"
        " architecture (same separable-convolution modules, same LSTM head) at reduced width and"
        " input size so that it could see the data many times within the hours available. "
        "`ich-train` keeps the paper's full network as its default.",
        "- Trained from scratch (no ImageNet weights may be downloaded).",
        "",
        "## Validation (held-out patients and slices, never used in training)",
        "",
    ]
    for name, m in rep["sets"].items():
        lines += [
            f"### {name}: {m['n_images']} slices, {m['n_groups']} patients or studies",
            "",
            f"- Weighted log loss {_fmt(m['weighted_log_loss'], 4)} (95% CI "
            f"{_ci(m['weighted_log_loss_ci'])}); prior baseline "
            f"{_fmt(m['prior_baseline_log_loss'], 4)}",
            f'- At threshold {rep["threshold"]:.4f}: "any" sensitivity '
            f"{_fmt(m['any_sensitivity'])}, specificity {_fmt(m['any_specificity'])}",
            "",
            "| label | positives | ROC AUC | 95% CI |",
            "|---|---:|---:|---|",
        ]
        for lab in LABELS:
            lines.append(
                f"| {lab} | {m['positives'][lab]} | {_fmt(m['auc'][lab])} | "
                f"{_ci(m['auc_ci'][lab])} |"
            )
        lines.append("")
    lines += [
        "Confidence intervals: percentile bootstrap over patients (ct-ich) or slices (RSNA),"
        " 1,000 resamples. The threshold was chosen on the same validation split, so its"
        " sensitivity and specificity are optimistic.",
        "",
        int8_section(int8_record),
        "",
        "## Comparison with published results (measured on other data)",
        "",
        f"The paper reports a weighted log loss of {PAPER_LOSS} on the RSNA 2019 stage-2 test"
        f" set; the challenge winner reached {WINNER_LOSS} using slice context across whole"
        " series. Those numbers come from about 750,000 training slices and another test set;"
        " ours come from a few thousand slices on a CPU and a small validation split. They are"
        " not comparable, and ours are much weaker.",
        "",
        "## Known failure modes",
        "",
        "- Trained on brain-window pictures only: the bone and subdural channels carry no more"
        " than the brain window, so findings that need a wide window (fractures, thin subdurals"
        " against bone) are weak.",
        "- Very small training set, few positives per subtype (epidural and subarachnoid above"
        ' all): subtype probabilities are unreliable; "any" is the most trustworthy output.',
        "- One slice at a time: no context from neighbouring slices, so beam-hardening and"
        " partial-volume artefacts near the skull base and vertex raise false alarms.",
        "- Not trained on post-operative heads, children, contrast-enhanced scans, or scanners"
        " outside the two source datasets; calcifications and hyperdense vessels can look like"
        " blood to it.",
        "- Not analysed: sagittal or coronal reformats, non-CT series (refused by the loader).",
        "- Synthetic phantoms, such as the bundled demo study, look like nothing it was trained"
        " on: its probabilities there demonstrate the viewer, not the model (on the demo it"
        " flags slices the phantom has no bleed in).",
        "",
        "## Reproduce",
        "",
        "Run the training command above on the same data, then `ich-train install"
        " RUN/ich_xception_lstm.weights.h5`. Runs differing only in seed differed by up to"
        " 0.25 in validation AUC at the same epoch in early experiments; expect the intervals above"
        " to be wide. Then `ich-train quantize --install` measures the int8 model and"
        " writes its section above. A second run from scratch with the same command (another"
        " `--out` folder) is checked against this card with `ich-train check-reproduction"
        " RUN2 --install`: it is reproduced when its weighted log loss and AUC(any) fall inside"
        " the 95% confidence intervals above, and the verdict is recorded below.",
        "",
        reproduction_section(reproduction, str(tr.get("command") or "") or None),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- int8 section

#: The int8 comparison sits between these lines, so ``ich-train quantize --install`` can
#: replace it in a card that ``ich-train install`` wrote, and the other way round.
INT8_BEGIN = "<!-- int8 comparison: written by ich-train quantize; do not edit by hand -->"
INT8_END = "<!-- end of int8 comparison -->"
_INT8_ANCHORS = ("## Comparison with published results", "## Known failure modes", "## Reproduce")


def find_int8_record(folder: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The ``ich-train quantize`` record for these weights in ``folder``, if there is one."""
    from ich_model.runtime import int8_record_path, onnx_file_name

    path = int8_record_path(Path(folder) / onnx_file_name(manifest, "int8"))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("weights_sha256") != manifest.sha256:
        return None
    return record


def _num(v: Any, nd: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def int8_section(record: dict[str, Any] | None) -> str:
    """The model card's int8 section: the float32 vs int8 comparison of ``record`` (an
    ``ich-train quantize`` acceptance record), or a note that none was made."""
    from ich_model.runtime import INT8_AUC_TOLERANCE, INT8_LOG_LOSS_RELATIVE

    tol = (record or {}).get("tolerances") or {}
    auc_tol = tol.get("auc_any", INT8_AUC_TOLERANCE)
    wll_tol = tol.get("weighted_log_loss_relative", INT8_LOG_LOSS_RELATIVE)
    rule = (
        f"int8 is used only if it moves the validation AUC(any) by at most {auc_tol} and the"
        f" weighted log loss by at most {wll_tol:.0%} (relative) from float32"
    )
    lines = [INT8_BEGIN, "## int8 model (static quantisation)", ""]
    if record is None:
        lines += [
            "Not measured for these weights: the app runs the float32 model. `ich-train quantize"
            " --install` quantises it (static int8, calibrated on training slices), compares it"
            " with float32 on the validation split the weights were trained with and records the"
            f" comparison here; {rule}.",
            "",
            INT8_END,
        ]
        return "\n".join(lines)
    accepted = bool(record.get("accepted"))
    f32, i8 = record.get("slices_per_s_float32"), record.get("slices_per_s_int8")
    speed = (
        [
            f"| slices/s at batch {record.get('batch')} ({record.get('cores')} cores,"
            f" load average {record.get('load_average')})"
            f" | {_num(f32, 1)} | {_num(i8, 1)} ({i8 / f32:.2f}x) |"
        ]
        if f32 and i8
        else []
    )
    split = record.get("validation") or {}
    calib = record.get("calibration") or {}
    lines += [
        f"Measured by `ich-train quantize` on {str(record.get('measured', ''))[:10]} for the"
        f" weights with sha256 `{record.get('weights_sha256')}`, on a CPU of kind"
        f" `{record.get('cpu')}` ({record.get('cpu_model')}), ONNX Runtime"
        f" {record.get('onnxruntime')}. Verdict: **int8 "
        + ("accepted" if accepted else "not accepted")
        + f"** ({record.get('reason')}).",
        "",
        f"| {record.get('n_slices')} validation slices | float32 | int8 |",
        "|---|---:|---:|",
        f"| AUC(any) | {_num(record.get('auc_any_float32'), 4)}"
        f" | {_num(record.get('auc_any_int8'), 4)} |",
        f"| weighted log loss | {_num(record.get('log_loss_float32'), 4)}"
        f" | {_num(record.get('log_loss_int8'), 4)} |",
        *speed,
        "",
        f"- Largest difference in any probability: {_num(record.get('max_abs_diff'), 4)}"
        + (
            f'; int8 changes the "any" call at the operating threshold'
            f" ({record['threshold']:.4f}) on {record['any_calls_changed']} of"
            f" {record.get('n_slices')} slices."
            if record.get("any_calls_changed") is not None
            else "."
        ),
        f"- Validation: every slice of the held-out split the weights were trained with"
        f" ({split.get('summary', 'see the record')}; seed {split.get('seed')}, validation"
        f" fraction {split.get('val_fraction')}), decoded and windowed as at inference.",
        f"- Calibration: {record.get('n_calibration')} slices drawn from the training side of"
        f" that split ({calib.get('summary', 'see the record')}); static QDQ quantisation with"
        " per-channel int8 convolution weights and uint8 activations (MinMax); everything"
        " else stays float32.",
        f"- Rule: {rule}. The app's `auto` runtime then uses int8, and only on a CPU of the"
        " kind above; elsewhere it runs float32 (and logs why) until `ich-train quantize` is"
        " run there. The runtime in use is shown in the About box and in `summary.json`.",
        "",
        INT8_END,
    ]
    return "\n".join(lines)


def _replace_between(
    text: str, begin: str, end: str, section: str, anchors: Sequence[str] = ()
) -> str:
    """``text`` with the part from ``begin`` to ``end`` replaced by ``section``; without
    one, ``section`` goes before the first of ``anchors`` found, else at the end."""
    start, stop = text.find(begin), text.find(end)
    if start >= 0 and stop > start:
        return text[:start] + section + text[stop + len(end) :]
    for anchor in anchors:
        at = text.find(anchor)
        if at >= 0:
            return text[:at] + section + "\n\n" + text[at:]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"


def replace_int8_section(text: str, section: str) -> str:
    """``text`` with its int8 section replaced by ``section`` (inserted if it has none)."""
    return _replace_between(text, INT8_BEGIN, INT8_END, section, _INT8_ANCHORS)


def write_int8_section(card: Path, record: dict[str, Any] | None) -> None:
    """Write (or replace) the int8 section of the model card at ``card``."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(replace_int8_section(text, int8_section(record)), encoding="utf-8")


# ----------------------------------------------------------------------------- reproducibility

#: The check of a second training run sits between these lines, so ``ich-train
#: check-reproduction --install`` can replace it in a card that ``ich-train install`` wrote.
REPRO_BEGIN = (
    "<!-- reproducibility: written by ich-train check-reproduction; do not edit by hand -->"
)
REPRO_END = "<!-- end of reproducibility -->"
REPRODUCTION_RECORD = "reproduction.json"


class ReproductionError(Exception):
    """The second run cannot be compared with the installed weights; the message says why."""


def find_reproduction_record(folder: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The ``ich-train check-reproduction`` record for these weights in ``folder``, if any."""
    try:
        record = json.loads((Path(folder) / REPRODUCTION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("weights_sha256") != manifest.sha256:
        return None
    return record


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    """The figures a reproduction is judged on, from a report set or a manifest's metrics."""

    def finite(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def interval(c: Any) -> list[float] | None:
        return [float(c[0]), float(c[1])] if c else None

    return {
        "n_images": m.get("n_images"),
        "weighted_log_loss": finite(m.get("weighted_log_loss")),
        "weighted_log_loss_ci": interval(m.get("weighted_log_loss_ci")),
        "auc_any": finite((m.get("auc") or {}).get("any")),
        "auc_any_ci": interval((m.get("auc_ci") or {}).get("any")),
    }


def summary_from_report(rep: dict[str, Any]) -> dict[str, Any]:
    """Overall and per-source weighted log loss and AUC(any), with CIs, of a :func:`report`."""
    sets = rep["sets"]
    per_source = {k: _headline(v) for k, v in sets.items() if k != "all"}
    return {**_headline(sets["all"]), "per_source": per_source}


def summary_from_manifest(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The same from the metrics ``ich-train install`` stored in a manifest, or None when
    they lack the weighted log loss's CI (weights installed before it was recorded)."""
    if metrics.get("weighted_log_loss") is None or not metrics.get("weighted_log_loss_ci"):
        return None
    per_source = {k: _headline(v) for k, v in (metrics.get("per_source") or {}).items()}
    return {**_headline(metrics), "per_source": per_source}


_JUDGED = (("weighted_log_loss", "weighted log loss", 4), ("auc_any", "AUC(any)", 3))


def outside_intervals(installed: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Which of the second run's overall weighted log loss and AUC(any) fall outside the
    installed weights' 95% CIs (none: reproduced). A result better than the interval counts
    as outside too: the card's intervals should describe what the command gives."""
    outside = []
    for key, name, nd in _JUDGED:
        ci = installed.get(f"{key}_ci")
        if not ci:
            raise ReproductionError(
                f"the installed weights have no 95% CI of the {name} (too few positives in "
                "their validation split), so a second run cannot be judged against it"
            )
        v = second.get(key)
        if v is None:
            outside.append(f"{name} could not be measured on the second run")
        elif not ci[0] <= v <= ci[1]:
            side = "below" if v < ci[0] else "above"
            outside.append(
                f"{name} {v:.{nd}f} is {side} the installed 95% CI {ci[0]:.{nd}f} to {ci[1]:.{nd}f}"
            )
    return outside


def reproduction_record(
    *,
    weights_sha256: str,
    installed_command: str,
    installed: dict[str, Any],
    installed_epochs: tuple[Any, Any],
    run: Path,
    run_weights_sha256: str | None,
    run_command: str,
    second: dict[str, Any],
    second_epochs: tuple[Any, Any],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The record ``ich-train check-reproduction`` prints and, with --install, writes."""
    from datetime import UTC, datetime

    outside = outside_intervals(installed, second)
    return {
        "check": "ich-train check-reproduction",
        "checked": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights_sha256": weights_sha256,
        "installed_command": installed_command,
        "installed": {
            **installed,
            "best_epoch": installed_epochs[0],
            "epochs_run": installed_epochs[1],
        },
        "run": str(run),
        "run_weights_sha256": run_weights_sha256,
        "command": run_command,
        "second_run": {**second, "best_epoch": second_epochs[0], "epochs_run": second_epochs[1]},
        "reproduced": not outside,
        "verdict": "reproduced" if not outside else "not reproduced",
        "outside": outside,
        "notes": list(notes),
    }


def _rows(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, installed with its CI, second run) for the overall and per-source figures."""
    a, b = record["installed"], record["second_run"]
    rows = []
    pa, pb = a.get("per_source") or {}, b.get("per_source") or {}
    sets = [("all", a, b)] + [(s, pa.get(s, {}), pb.get(s, {})) for s in sorted({*pa, *pb})]
    for name, x, y in sets:
        for key, label, nd in _JUDGED:
            ci = x.get(f"{key}_ci")
            inst = _num(x.get(key), nd) + (f" ({ci[0]:.{nd}f} to {ci[1]:.{nd}f})" if ci else "")
            rows.append((f"{label}, {name}", inst, _num(y.get(key), nd)))
    rows.append(
        (
            "best epoch / epochs run",
            f"{a.get('best_epoch')} / {a.get('epochs_run')}",
            f"{b.get('best_epoch')} / {b.get('epochs_run')}",
        )
    )
    return rows


def format_reproduction(record: dict[str, Any]) -> str:
    """The comparison as a plain-text table with the verdict, for the terminal."""
    run_sha = record.get("run_weights_sha256")
    rows = [
        ("", "installed (95% CI)", "second run"),
        (
            "weights sha256",
            str(record["weights_sha256"])[:16],
            str(run_sha)[:16] if run_sha else "n/a",
        ),
        *_rows(record),
    ]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"{r[0]:{w0}s}  {r[1]:{w1}s}  {r[2]}" for r in rows]
    lines += [f"note: {n}" for n in record.get("notes") or []]
    if record["reproduced"]:
        lines.append(
            "verdict: REPRODUCED (weighted log loss and AUC(any) inside the installed 95% CIs)"
        )
    else:
        lines.append("verdict: NOT REPRODUCED: " + "; ".join(record["outside"]))
    return "\n".join(lines)


def reproduction_section(record: dict[str, Any] | None, command: str | None = None) -> str:
    """The model card's Reproducibility section: the check of a second run (``record``, an
    ``ich-train check-reproduction`` record), or a note that none was checked yet."""
    lines = [REPRO_BEGIN, "## Reproducibility", ""]
    if record is None:
        lines += [
            "Not checked yet for these weights: no second run from scratch has been compared"
            " with this card. Train one with the training command above, changing only"
            " `--out`"
            + (f":\n\n```\n{command}\n```\n\n" if command else " ")
            + "then run `ich-train check-reproduction RUN2 --install` (RUN2 being that"
            " `--out` folder). It records here whether the second run's weighted log loss and"
            " AUC(any) fall inside the 95% confidence intervals above.",
            "",
            REPRO_END,
        ]
        return "\n".join(lines)
    verdict = "reproduced" if record.get("reproduced") else "not reproduced"
    why = (
        "its weighted log loss and AUC(any) fall inside the 95% confidence intervals above"
        if record.get("reproduced")
        else "; ".join(record.get("outside") or [])
    )
    run_sha = record.get("run_weights_sha256")
    lines += [
        f"Checked by `ich-train check-reproduction` on {str(record.get('checked', ''))[:10]}"
        f" for the weights with sha256 `{record.get('weights_sha256')}`: a second training run"
        " from scratch with the same command (only `--out` differs), scored on the same"
        " validation split"
        + (f" (its weights: sha256 `{run_sha}`)" if run_sha else "")
        + f". Verdict: **{verdict}** ({why}).",
        "",
        "| | these weights (95% CI) | second run |",
        "|---|---|---:|",
        *(f"| {a} | {b} | {c} |" for a, b, c in _rows(record)),
        "",
        "The second run:",
        "",
        "```",
        str(record.get("command", "")),
        "```",
        "",
        *(f"- {n}" for n in record.get("notes") or []),
        *([""] if record.get("notes") else []),
        REPRO_END,
    ]
    return "\n".join(lines)


def replace_reproduction_section(text: str, section: str) -> str:
    """``text`` with its Reproducibility section replaced by ``section`` (appended if none)."""
    return _replace_between(text, REPRO_BEGIN, REPRO_END, section)


def write_reproduction_section(
    card: Path, record: dict[str, Any] | None, command: str | None = None
) -> None:
    """Write (or replace) the Reproducibility section of the model card at ``card``."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    card.parent.mkdir(parents=True, exist_ok=True)
    section = reproduction_section(record, command)
    card.write_text(replace_reproduction_section(text, section), encoding="utf-8")
