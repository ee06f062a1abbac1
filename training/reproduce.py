"""``ich-train check-reproduction``: does a second run with the card's command land inside
the installed weights' 95% confidence intervals? (issue 6, "Reproducible")

The second run must have been made with the installed weights' own ``ich-train fit``
command (only ``--out`` may differ) on the same data and split; its validation report is
computed exactly as ``ich-train install`` computes one, and compared with the intervals
recorded in the installed manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any


def fit_parser() -> argparse.ArgumentParser:
    from training.cli import _parser  # the one parser that ich-train itself uses

    return _parser()


#: Options of ``ich-train fit`` that do not change what a run learns: where it is written,
#: and whether its weights are installed at the end.
_NOT_TRAINING = ("out", "install", "command")


class _Refused(Exception):
    """A second run that cannot be compared with the installed weights; the message says why."""


def _parse_fit(command: str) -> argparse.Namespace:
    """The arguments of a recorded ``ich-train fit`` command line."""
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        raise _Refused(f"cannot read the command {command!r}: {exc}") from None
    if tokens[:1] == ["ich-train"]:
        tokens = tokens[1:]
    if tokens[:1] != ["fit"]:
        raise _Refused(f"not an ich-train fit command. Received: {command!r}")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            return fit_parser().parse_args(tokens)
        except SystemExit:
            msg = err.getvalue().strip().splitlines()[-1:] or ["?"]
            raise _Refused(f"cannot read the command {command!r}: {msg[0]}") from None


def _option(key: str) -> str:
    return "DATA" if key == "data" else "--" + key.replace("_", "-")


def _command_differences(
    installed: str,
    second: str,
    init_commands: tuple[str | None, str | None] = (None, None),
    nested: bool = False,
) -> tuple[list[str], list[str]]:
    """(differences, notes) between two fit commands, ignoring --out and --install.

    A warm start (--init-weights) may come from another folder only when the run it came
    from was itself made with the same command (``init_commands``: the commands of the runs
    the installed and the second run started from, where known); a second run that starts
    from the installed run's own starting weights repeats its last stage only, and says so.
    """
    a = {k: v for k, v in vars(_parse_fit(installed)).items() if k not in _NOT_TRAINING}
    b = {k: v for k, v in vars(_parse_fit(second)).items() if k not in _NOT_TRAINING}
    diffs = [
        f"{_option(k)}: {a.get(k)!r} (installed) vs {b.get(k)!r} (second run)"
        for k in sorted(set(a) | set(b))
        if k != "init_weights" and a.get(k) != b.get(k)
    ]
    notes: list[str] = []
    ia, ib = a.get("init_weights"), b.get("init_weights")
    if (ia is None) != (ib is None):
        diffs.append(f"--init-weights: {ia!r} (installed) vs {ib!r} (second run)")
    elif ia is not None and nested:
        notes.append("earlier warm starts (--init-weights of the first stage) were not checked")
    elif ia is not None and ia == ib:
        notes.append(
            f"the second run started from the same weights as the installed one ({ia}), so "
            "only its last training stage was repeated"
        )
    elif ia is not None:
        if not all(init_commands):
            diffs.append(
                f"--init-weights: the second run starts from {ib}, the installed run from {ia}, "
                "and the command that made one of them is not recorded"
            )
        else:
            inner, inner_notes = _command_differences(
                str(init_commands[0]), str(init_commands[1]), nested=True
            )
            diffs += [f"warm start (--init-weights) made with another command: {d}" for d in inner]
            notes += inner_notes
            if not inner:
                notes.append(
                    f"warm start from {ib}, a run made with the card's first command (only "
                    "--out differs)"
                )
    return diffs, notes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _second_run(run: Path) -> dict[str, Any]:
    """What a run folder records about how it was trained, from its exported manifest when
    it has one, else from config.json, data.json and state.json."""
    from ich_model.weights import BUNDLED_WEIGHTS, read_manifest

    if not run.is_dir():
        raise _Refused(f"{run} is not a folder (give the --out folder of the second run)")
    config = _read_json(run / "config.json")
    exported = run / BUNDLED_WEIGHTS.name  # the name ich-train fit exports to
    if exported.is_file():
        manifest, _ = read_manifest(exported)  # refuses weights that do not match it
        tr, arch, sha = manifest.training, manifest.architecture, manifest.sha256
    elif config:
        state = _read_json(run / "state.json")
        tr = {
            **config,
            "validation_counts": _read_json(run / "data.json").get("validation"),
            "best_epoch": state.get("best_epoch"),
            "epochs_run": state.get("epoch"),
        }
        arch, sha = dict(config.get("model") or {}), None
    else:
        raise _Refused(
            f"{run} holds neither config.json nor exported weights: not an ich-train fit run"
        )
    command = str(tr.get("command") or config.get("command") or "")
    if not command:
        raise _Refused(f"{run} records no training command (it was not made by ich-train fit)")
    init = tr.get("init_run_command")
    if init is None and tr.get("init_weights"):
        init = _read_json(Path(tr["init_weights"]).parent / "config.json").get("command")
    return {"training": tr, "architecture": arch, "sha256": sha, "command": command, "init": init}


def _same_training(manifest: Any, second: dict[str, Any]) -> list[str]:
    """Refuse a second run not made the way the installed weights were; returns notes."""
    tr, tr2 = manifest.training, second["training"]
    command = str(tr.get("command") or "")
    if not command:
        raise _Refused(
            "the installed weights record no training command, so there is nothing to reproduce"
        )
    if _parse_fit(command).out == _parse_fit(second["command"]).out:
        raise _Refused(
            "the second run was written to the same --out folder as the installed one: give "
            "the folder of another run made with the same command"
        )
    diffs, notes = _command_differences(
        command, second["command"], (tr.get("init_run_command"), second.get("init"))
    )
    for key in ("data", "seed", "val_fraction"):
        if tr.get(key) is None:
            raise _Refused(f"the installed weights' manifest records no training {key}")
        if tr.get(key) != tr2.get(key):
            diffs.append(f"{key}: {tr.get(key)!r} (installed) vs {tr2.get(key)!r} (second run)")
    for key in ("input_size", "width", "middle_blocks"):
        a, b = manifest.architecture.get(key), second["architecture"].get(key)
        if a != b:
            diffs.append(f"architecture {key}: {a!r} (installed) vs {b!r} (second run)")
    va, vb = tr.get("validation_counts"), tr2.get("validation_counts")
    if va and vb and va != vb:
        diffs.append(
            "validation split: other slices were held out (the data changed on disk?): "
            f"{json.dumps(va, sort_keys=True)} (installed) vs "
            f"{json.dumps(vb, sort_keys=True)} (second run)"
        )
    if diffs:
        raise _Refused(
            "the second run was not made with the installed weights' command and data (only "
            "--out may differ):\n  " + "\n  ".join(diffs)
        )
    if second["sha256"] is not None and second["sha256"] == manifest.sha256:
        # Another folder (the installed run's own is refused above), same bytes: training
        # was deterministic (same seed, data, thread count and libraries).
        notes.append(
            "the second run's weights are bit-identical to the installed ones: training was "
            "deterministic on this machine"
        )
    return notes


def _installed_predictions(manifest: Any, wpath: Path) -> Path | None:
    """The validation predictions of the run that made the installed weights: beside them
    (weights checked from a run folder), or in the --out folder of their command, provided
    the weights exported there are these weights."""
    from ich_model.weights import BUNDLED_WEIGHTS, sha256_file

    folders = [wpath.parent]
    with contextlib.suppress(_Refused):  # no command: only the folder of the weights
        folders.append(Path(_parse_fit(str(manifest.training.get("command") or "")).out))
    for folder in folders:
        npz, weights = folder / "validation_predictions.npz", folder / BUNDLED_WEIGHTS.name
        if npz.is_file() and weights.is_file() and sha256_file(weights) == manifest.sha256:
            return npz
    return None


def check_reproduction(args: argparse.Namespace) -> int:
    """``ich-train check-reproduction``: exit 0 reproduced, 1 not, 2 refused."""
    from ich_model.weights import BUNDLED_WEIGHTS, MODEL_CARD, WeightsError, read_manifest
    from training.card import (
        REPRODUCTION_RECORD,
        ReproductionError,
        format_reproduction,
        report,
        reproduction_record,
        summary_from_manifest,
        summary_from_report,
        write_reproduction_section,
    )

    run = Path(args.run)
    try:
        manifest, wpath = read_manifest(args.weights)
        second = _second_run(run)
        notes = _same_training(manifest, second)
        npz = run / "validation_predictions.npz"
        if not npz.is_file():
            raise _Refused(
                f"{run} has no validation_predictions.npz: run `ich-train export {run}` first "
                "(it exports the run's best weights with their validation predictions)"
            )
        installed = summary_from_manifest(manifest.metrics)
        if installed is None:
            found = _installed_predictions(manifest, wpath)
            if found is None:
                raise _Refused(
                    "the installed weights' manifest records no 95% CI of the weighted log "
                    "loss, and the validation_predictions.npz of the run that made them was not "
                    "found beside them or in their command's --out folder; install them again "
                    "with ich-train install (which records it)"
                )
            print(f"installed intervals recomputed from {found}", file=sys.stderr)
            installed = summary_from_report(report(found))
        tr, tr2 = manifest.training, second["training"]
        record = reproduction_record(
            weights_sha256=manifest.sha256,
            installed_command=str(tr.get("command")),
            installed=installed,
            installed_epochs=(tr.get("best_epoch"), tr.get("epochs_run")),
            run=run.resolve(),
            run_weights_sha256=second["sha256"],
            run_command=second["command"],
            second=summary_from_report(report(npz)),  # as ich-train install computes it
            second_epochs=(tr2.get("best_epoch"), tr2.get("epochs_run")),
            notes=notes,
        )
    except (_Refused, ReproductionError, WeightsError) as exc:
        print(f"ich-train check-reproduction: {exc}", file=sys.stderr)
        return 2
    print(format_reproduction(record))
    if args.install:
        path = wpath.parent / REPRODUCTION_RECORD
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        bundled = wpath.resolve() == BUNDLED_WEIGHTS.resolve()
        card = MODEL_CARD if bundled else wpath.parent / "MODEL_CARD.md"
        if card.is_file():
            write_reproduction_section(card, record)
            print(f"wrote the Reproducibility section of {card}")
        else:
            print(f"no model card at {card}: only the record was written")
    return 0 if record["reproduced"] else 1
