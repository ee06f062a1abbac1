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
    return f"{c[0]:.3f} to {c[1]:.3f}" if c else "too few positives"


def model_card(manifest: Manifest, rep: dict[str, Any], sha256: str) -> str:
    """The Markdown model card."""
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
        "- The paper's Xception (width 1.0, 8 middle blocks, 299 px) trains at about 20 images/s"
        " at 128 px on the 2-core CPUs this model was trained on. The bundled variant keeps the"
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
        "",
        "## Reproduce",
        "",
        "Run the training command above on the same data, then `ich-train install"
        " RUN/ich_xception_lstm.weights.h5`. Runs differing only in seed differed by up to"
        " 0.25 in validation AUC at the same epoch in early experiments; expect the intervals above"
        " to be wide.",
        "",
    ]
    return "\n".join(lines)
