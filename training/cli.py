"""``ich-train``: make phantom data, fit the Xception-LSTM, evaluate weights, install them."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ich_model.labels import LABELS
from ich_model.weights import jsonable

FORMAT_HELP = (
    "data format: rsna-dcm (stage_2_train.csv + ID_<id>.dcm, or labels.csv with a 'file' "
    "column), rsna-png (labels.csv + images/ID_<id>.png), ctich-jpg (PhysioNet ct-ich: "
    "hemorrhage_diagnosis.csv + brain/PPP_SS.jpg), phantom (ich-train make-phantoms output). "
    "Default: recognised from the folder's layout. Give once per DATA folder, or once for all."
)


#: the top-level keys of ``ich-train evaluate --json`` (``auc`` maps each label to its AUC)
JSON_KEYS = ("weighted_log_loss", "auc", "n_images")


def _formats(args: argparse.Namespace) -> list[str | None]:
    fmts = args.format or []
    if not fmts:
        return [None] * len(args.data)
    if len(fmts) == 1:
        return fmts * len(args.data)
    if len(fmts) != len(args.data):
        raise SystemExit("ich-train: give --format once, or once per DATA folder")
    return fmts


def _hu_range(text: str | None) -> tuple[float, float] | None:
    if not text or text == "none":
        return None
    lo, hi = (float(v) for v in text.split(","))
    if hi <= lo:
        raise argparse.ArgumentTypeError(
            f"--hu-range must be LOW,HIGH with LOW < HIGH. Received: {text}"
        )
    return lo, hi


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ich-train",
        description="Train and evaluate the ICH Xception-LSTM "
        "(a second opinion, not for diagnostic use).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser(
        "fit",
        help="train a model (or resume a run)",
        description="Train the Xception-LSTM on one or more labelled datasets. "
        "Checkpoints every epoch in --out; --resume continues a run.",
    )
    f.add_argument("data", nargs="*", help="dataset folders (several can be mixed)")
    f.add_argument(
        "--format",
        action="append",
        choices=["rsna-dcm", "rsna-png", "ctich-jpg", "phantom"],
        help=FORMAT_HELP,
    )
    f.add_argument("--out", required=True, help="run folder: checkpoints, logs, exported weights")
    f.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (data and settings "
        "come from its config.json; --epochs, --patience, --max-minutes may change)",
    )
    f.add_argument("--epochs", type=int, default=30, help="total epochs (default 30)")
    f.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="batches per epoch (default: training slices / batch size)",
    )
    f.add_argument("--batch-size", type=int, default=32, help="batch size (paper: 32)")
    f.add_argument(
        "--learning-rate", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)"
    )
    f.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="decoupled weight decay for Adam (default 0, as in the paper)",
    )
    f.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="MOMENTUM",
        help="validate, keep and export an exponential moving average of the weights with "
        "this momentum (e.g. 0.995); default: off",
    )
    f.add_argument(
        "--init-weights",
        default=None,
        help="start from these weights (a run's best.weights.h5) instead of random ones; use "
        "only weights trained on the same split, or validation data leaks into training",
    )
    f.add_argument("--input-size", type=int, default=299, help="input side in pixels (paper: 299)")
    f.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="Xception filter multiplier (1.0 = the paper's network; 0.5 halves every layer)",
    )
    f.add_argument(
        "--middle-blocks", type=int, default=8, help="Xception middle-flow blocks (paper: 8)"
    )
    f.add_argument(
        "--hu-range",
        type=_hu_range,
        default=None,
        help="LOW,HIGH: clip HU to this range before windowing, at training and (recorded "
        "in the manifest) at inference; use the range 8-bit pictures carry, e.g. 0,80 "
        "for brain-window pictures. Default: none (full HU from DICOM)",
    )
    f.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each dataset's patients (or studies) held out for validation",
    )
    f.add_argument(
        "--seed", type=int, default=0, help="seed for the split, sampling and initialisation"
    )
    f.add_argument(
        "--patience",
        type=int,
        default=5,
        help="early stopping: epochs without a better validation weighted log loss",
    )
    f.add_argument(
        "--positive-fraction",
        type=float,
        default=0.4,
        help="share of each batch drawn from slices with a bleed (class balancing)",
    )
    f.add_argument(
        "--rare-power",
        type=float,
        default=0.5,
        help="subtype groups are sampled in proportion to count**POWER (0: equally, "
        "which oversamples the rarest, epidural above all)",
    )
    f.add_argument("--rotation", type=float, default=10.0, help="random rotation, +- degrees")
    f.add_argument("--zoom", type=float, default=0.1, help="random rescale, +- fraction")
    f.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    f.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="keep decoded slices in memory up to this many GB (default: half of this "
        "machine's memory); a larger dataset (the full RSNA 2019 data) is decoded on the fly "
        "each time a slice is drawn; 0 always decodes on the fly",
    )
    f.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop cleanly after the epoch that passes this wall-clock budget",
    )
    f.add_argument(
        "--install",
        action="store_true",
        help="make the exported weights the bundled model in resources/weights",
    )

    e = sub.add_parser(
        "evaluate",
        help="score weights on labelled data",
        description="Weighted log loss (RSNA 2019), per-label ROC AUC, sensitivity "
        "and specificity at the manifest's threshold, calibration table.",
    )
    e.add_argument("data", nargs="+", help="dataset folders")
    e.add_argument("--weights", default=None, help="weights file (.weights.h5); default: bundled")
    e.add_argument(
        "--format",
        action="append",
        choices=["rsna-dcm", "rsna-png", "ctich-jpg", "phantom"],
        help=FORMAT_HELP,
    )
    e.add_argument(
        "--json",
        default=None,
        help="also write weighted_log_loss, auc (label -> AUC) and n_images as JSON to this file",
    )
    e.add_argument("--batch-size", type=int, default=16, help="inference batch size")

    m = sub.add_parser(
        "make-phantoms",
        help="write synthetic labelled head-CT studies",
        description="Write phantom CT DICOM studies of every hemorrhage subtype "
        "and labels.csv (RSNA long format).",
    )
    m.add_argument("out", help="output folder")
    m.add_argument("--studies", type=int, default=12, help="number of studies (default 12)")
    m.add_argument("--slices", type=int, default=40, help="slices per study (default 40)")
    m.add_argument("--matrix", type=int, default=512, help="rows = columns (default 512)")
    m.add_argument("--seed", type=int, default=0, help="seed (same seed, same studies and UIDs)")

    x = sub.add_parser(
        "export",
        help="export a run's best weights again",
        description="Re-export RUN's best weights with their calibration, validation metrics "
        "and manifest (as at the end of fit), e.g. after a run was stopped.",
    )
    x.add_argument("run", help="run folder (the --out of ich-train fit)")

    q = sub.add_parser(
        "quantize",
        help="make an int8 model and accept or reject it on the validation split",
        description="Static int8 quantisation of WEIGHTS' float32 ONNX model, calibrated on "
        "slices from the training side of the split the weights were trained with and "
        "compared with float32 on every validation slice of that split (rebuilt from the "
        "manifest's training record: data folders, formats, seed, validation fraction; checked "
        "against the counts it recorded). int8 is accepted only if the validation AUC(any) "
        "moves by at most 0.005 and the weighted log loss by at most 2%. Writes the int8 "
        "model and its acceptance record (weights hash, kind of CPU, metrics, speed) to --out, "
        "or with --install next to the bundled weights, and the comparison into the model "
        "card. The app's auto runtime uses int8 only with an accepted record for its weights "
        "and its kind of CPU. Exit status: 0 accepted, 1 measured and not accepted (files "
        "still written), 2 bad usage or nothing measured.",
    )
    q.add_argument(
        "data",
        nargs="*",
        help="the dataset folders the weights were trained on (default: those in the "
        "manifest's training record, which are paths where training ran: give them here "
        "when the data lives elsewhere)",
    )
    q.add_argument(
        "--weights",
        default=None,
        help="weights file (.weights.h5, manifest beside it); default: the bundled weights",
    )
    q.add_argument(
        "--format",
        action="append",
        choices=["rsna-dcm", "rsna-png", "ctich-jpg", "phantom"],
        help=FORMAT_HELP.replace("Default: recognised", "Default: the manifest's, else recognised"),
    )
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--out",
        default=None,
        help="write the int8 model (ich-<hash>-c<n>-int8.onnx) and its acceptance record "
        "(.acceptance.json) into this folder; the runtime finds them when the folder holds "
        "the weights or is the cache folder",
    )
    where.add_argument(
        "--install",
        action="store_true",
        help="write them next to the bundled weights in resources/weights (WEIGHTS must be the "
        "bundled ones) and the comparison into resources/MODEL_CARD.md",
    )
    q.add_argument(
        "--card",
        default=None,
        help="also write the comparison into the int8 section of this model card (default "
        "with --install: resources/MODEL_CARD.md; otherwise no card)",
    )
    q.add_argument(
        "--calibration",
        type=int,
        default=256,
        metavar="N",
        help="calibrate on N slices drawn (seeded) from the training side of the split "
        "(default 256)",
    )
    q.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="batch size of the comparison; the speed of both models is measured at it (default 8)",
    )
    q.add_argument(
        "--seed",
        type=int,
        default=None,
        help="split seed, only for weights whose manifest does not record it (it must agree "
        "where it does)",
    )
    q.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="validation fraction of the split, only for weights whose manifest does not "
        "record it (it must agree where it does)",
    )

    c = sub.add_parser(
        "check-reproduction",
        help="check a second training run against the installed weights' model card",
        description="Is the model reproducible? RUN is a second training run from scratch, "
        "made with the training command recorded with the installed weights (the card's "
        "command; only --out may differ, and a --init-weights warm start must come from a run "
        "made with the card's first command). The command, data folders, seed, validation "
        "fraction, validation split and architecture are checked to match. RUN's validation "
        "report is computed as ich-train install computes it, and the second run reproduces "
        "the weights when its overall weighted log loss and AUC(any) both fall inside the "
        "installed weights' 95% confidence intervals. Prints both runs side by side (overall "
        "and per source, best epoch, epochs run, weights hashes). Exit status: 0 reproduced, "
        "1 not reproduced (the metric that fell outside is named), 2 bad usage (another "
        "command or split, no validation predictions, unreadable weights).",
    )
    c.add_argument(
        "run",
        help="the second run's folder (its --out): config.json and validation_predictions.npz "
        "(written when fit ends, or by ich-train export RUN), with its exported weights and "
        "manifest when it has them",
    )
    c.add_argument(
        "--weights",
        default=None,
        help="the installed weights to check against (.weights.h5, manifest beside it); "
        "default: the bundled weights in resources/weights",
    )
    c.add_argument(
        "--install",
        action="store_true",
        help="record the check, whatever the verdict: reproduction.json next to the weights "
        "(for these weights' sha256 only) and the Reproducibility section of the model card "
        "(resources/MODEL_CARD.md for the bundled weights, else the MODEL_CARD.md beside "
        "WEIGHTS that ich-train install --dest wrote); ich-train install keeps both only "
        "while it installs the same weights",
    )

    i = sub.add_parser(
        "install",
        help="make given weights the bundled model",
        description="Verify a weights file against its manifest and copy both "
        "into resources/weights as the bundled model.",
    )
    i.add_argument("weights", help="weights file (.weights.h5) with its manifest beside it")
    i.add_argument(
        "--dest",
        default=None,
        help="install into this folder instead of resources/weights (the model card "
        "is written there too)",
    )
    return p


def _print_metrics(m: dict[str, Any]) -> None:
    print(f"images: {m['n_images']}   weighted log loss: {m['weighted_log_loss']:.4f}")
    print(
        f"{'label':18s} {'pos':>5s} {'AUC':>7s} {'sens':>7s} {'spec':>7s}   "
        f"(threshold {m['threshold']:.2f})"
    )
    for lab in LABELS:
        auc = m["auc"][lab]
        sens = m["sensitivity"][lab]
        spec = m["specificity"][lab]

        def f(v: float) -> str:
            return (
                "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.3f}"
            )

        print(f"{lab:18s} {m['positives'][lab]:5d} {f(auc)} {f(sens)} {f(spec)}")
    if "calibration" in m:
        print("calibration of 'any' (bin: n, mean predicted, observed):")
        for b in m["calibration"]:
            if b["n"]:
                print(
                    f"  {b['low']:.1f}-{b['high']:.1f}: {b['n']:5d} "
                    f"{b['mean_predicted']:.3f} {b['observed']:.3f}"
                )


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from ich_model.metrics import calibration_table
    from ich_model.predictor import Predictor
    from training.datasets import decode_hu, read_dataset
    from training.fit import evaluate_arrays

    samples = []
    for folder, fmt in zip(args.data, _formats(args), strict=True):
        samples.extend(read_dataset(folder, fmt))
    pred = Predictor(args.weights, batch_size=args.batch_size)
    probs = np.zeros((len(samples), len(LABELS)), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start : start + args.batch_size]
        x = np.stack([pred.preprocess(decode_hu(s)[None])[0] for s in chunk])
        probs[start : start + len(chunk)] = pred.predict_inputs(x)
        _bar(start + len(chunk), len(samples), t0)
    print(file=sys.stderr)
    y = np.asarray([s.labels for s in samples], dtype=np.float32)
    m = evaluate_arrays(y, probs, pred.manifest.threshold)
    m["calibration"] = calibration_table(y[:, -1], probs[:, -1])
    m["weights_sha256"] = pred.manifest.sha256
    _print_metrics(m)
    if args.json:
        # exactly these keys at the top level (the table above has the rest)
        out = {k: m[k] for k in JSON_KEYS}
        Path(args.json).write_text(json.dumps(jsonable(out), indent=2) + "\n", encoding="utf-8")
    return 0


def _bar(done: int, total: int, t0: float, label: str = "") -> None:
    if not sys.stderr.isatty():
        return
    frac = done / max(total, 1)
    left = (time.time() - t0) / max(frac, 1e-9) * (1 - frac)
    n = int(frac * 30)
    head = f"{label:12s} " if label else ""
    sys.stderr.write(f"\r{head}[{'#' * n}{'.' * (30 - n)}] {done}/{total}  {left:5.0f} s left")
    sys.stderr.flush()


def _fit(args: argparse.Namespace, argv: list[str]) -> int:
    from training.datasets import DatasetError
    from training.fit import RunConfig, fit, install

    if not args.resume and not args.data:
        raise SystemExit("ich-train fit: give at least one DATA folder (or --resume)")
    cfg = RunConfig(
        data=[str(Path(d).resolve()) for d in args.data],
        formats=_formats(args),
        out=args.out,
        model={
            "input_size": args.input_size,
            "width": args.width,
            "middle_blocks": args.middle_blocks,
            "timesteps": 32,
            "lstm_units": 64,
            "dropout": 0.3,
            "recurrent_dropout": 0.2,
            "n_labels": 6,
            "name": "xception_lstm",
        },
        pipeline={
            "batch_size": args.batch_size,
            "positive_fraction": args.positive_fraction,
            "rare_power": args.rare_power,
            "rotation_deg": args.rotation,
            "zoom": args.zoom,
            "flip": not args.no_flip,
            "memory_gb": args.memory_gb,
        },
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        ema=args.ema,
        init_weights=str(Path(args.init_weights).resolve()) if args.init_weights else None,
        val_fraction=args.val_fraction,
        seed=args.seed,
        patience=args.patience,
        max_minutes=args.max_minutes,
        hu_range=args.hu_range,
        command="ich-train " + " ".join(shlex.quote(a) for a in argv),
    )
    try:
        run = fit(cfg, resume=args.resume)
    except DatasetError as exc:
        print(f"ich-train: {exc}", file=sys.stderr)
        return 2
    if args.install:
        from ich_model.weights import BUNDLED_WEIGHTS, MODEL_CARD
        from training.fit import EXPORT_NAME

        print(f"installed: {install(run / EXPORT_NAME, BUNDLED_WEIGHTS.parent, MODEL_CARD)}")
    return 0


def _quantize(args: argparse.Namespace, argv: list[str]) -> int:
    from ich_model.runtime import ConversionError
    from ich_model.weights import BUNDLED_WEIGHTS, MODEL_CARD, WeightsError, read_manifest
    from training.datasets import DatasetError
    from training.quantize import QuantizeError, format_comparison, quantize

    if args.batch_size < 1:
        print(
            f"ich-train: --batch-size must be at least 1. Received: {args.batch_size}",
            file=sys.stderr,
        )
        return 2
    card: Path | None = Path(args.card) if args.card else None
    try:
        manifest, wpath = read_manifest(args.weights)
        if args.install:
            bundled, _ = read_manifest(BUNDLED_WEIGHTS)
            if bundled.sha256 != manifest.sha256:
                raise QuantizeError(
                    f"--install quantises the bundled weights only; {wpath} are other weights "
                    "(install them first with ich-train install, or use --out)"
                )
            out, card = BUNDLED_WEIGHTS.parent, card or MODEL_CARD
        else:
            out = Path(args.out)
        t0 = time.time()

        started: dict[str, float] = {}

        def progress(stage: str, done: int, total: int) -> None:
            _bar(done, total, started.setdefault(stage, time.time()), stage)
            if done == total and sys.stderr.isatty():
                print(file=sys.stderr)

        result = quantize(
            manifest,
            wpath,
            out,
            data=args.data or None,
            formats=args.format,
            seed=args.seed,
            val_fraction=args.val_fraction,
            n_calibration=args.calibration,
            batch=args.batch_size,
            card=card,
            command="ich-train " + " ".join(shlex.quote(a) for a in argv),
            progress=progress,
        )
    except (QuantizeError, DatasetError, WeightsError, ConversionError, OSError) as exc:
        print(f"ich-train quantize: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(result.record))
    print(f"wrote {result.int8_path}")
    print(f"wrote {result.record_path}")
    if card is not None:
        print(f"wrote the int8 section of {card}")
    print(f"({time.time() - t0:.0f} s)")
    return 0 if result.report.accepted else 1


# ------------------------------------------------------------------------- check-reproduction


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "make-phantoms":
        from ich_model.phantom import make_phantom_dataset

        series = make_phantom_dataset(
            Path(args.out), args.studies, n_slices=args.slices, matrix=args.matrix, seed=args.seed
        )
        print(f"wrote {len(series)} phantom studies and labels.csv to {args.out}")
        return 0
    if args.command == "export":
        from training.fit import export_run

        print(f"exported: {export_run(Path(args.run))}")
        return 0
    if args.command == "install":
        from ich_model.weights import BUNDLED_WEIGHTS, MODEL_CARD, WeightsError
        from training.fit import install

        dest = Path(args.dest) if args.dest else BUNDLED_WEIGHTS.parent
        card = dest / "MODEL_CARD.md" if args.dest else MODEL_CARD
        try:
            print(f"installed: {install(Path(args.weights), dest, card)}")
        except WeightsError as exc:
            print(f"ich-train: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "quantize":
        return _quantize(args, argv)
    if args.command == "check-reproduction":
        from training.reproduce import check_reproduction

        return check_reproduction(args)
    if args.command == "evaluate":
        from training.datasets import DatasetError

        try:
            return _evaluate(args)
        except DatasetError as exc:
            print(f"ich-train: {exc}", file=sys.stderr)
            return 2
    return _fit(args, argv)


if __name__ == "__main__":
    sys.exit(main())
