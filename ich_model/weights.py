"""Weights files and their manifests.

Weights are stored in Keras's own ``.weights.h5`` format (plain arrays: loading never
executes code from a file) next to a JSON manifest that says how to rebuild the
network and how its input is made, what data trained it, how well it did on data
it never saw, and the sha256 of the weights file. A file whose hash does not match
its manifest is refused.

This module does not import Keras: the viewer reads manifests at start-up.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ich_model.labels import LABELS
from ich_model.windowing import MODEL_WINDOWS

MANIFEST_SUFFIX = ".manifest.json"
WEIGHTS_SUFFIX = ".weights.h5"
RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BUNDLED_WEIGHTS = RESOURCES / "weights" / "ich_xception_lstm.weights.h5"
MODEL_CARD = RESOURCES / "MODEL_CARD.md"


class WeightsError(Exception):
    """Weights or manifest missing, mismatched or malformed; the message names the file."""


@dataclass(frozen=True)
class Manifest:
    """What travels with a weights file."""

    architecture: dict[str, Any]  # ModelConfig.to_dict()
    sha256: str
    weights_file: str  # file name, relative to the manifest's folder
    labels: tuple[str, ...] = LABELS
    windows: tuple[tuple[float, float], ...] = tuple(w.value for w in MODEL_WINDOWS)
    hu_range: tuple[float, float] | None = (
        None  # HU clipped before windowing (see windowing.model_input)
    )
    trained: bool = False
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)  # data, counts, command line, epochs
    metrics: dict[str, Any] = field(default_factory=dict)  # measured on held-out data only
    summary: str = ""  # one paragraph shown in About boxes and summary.json
    created: str = ""
    version: int = 1

    @property
    def input_size(self) -> int:
        return int(self.architecture.get("input_size", 299))

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def to_json(self) -> str:
        """Standard JSON: a metric that is undefined (an AUC without positives) is null."""
        d = jsonable(asdict(self))
        return json.dumps(d, indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path | str = "manifest") -> Manifest:
        try:
            hu = d.get("hu_range")
            return cls(
                architecture=dict(d["architecture"]),
                sha256=str(d["sha256"]),
                weights_file=str(d["weights_file"]),
                labels=tuple(d.get("labels", LABELS)),
                windows=tuple((float(a), float(b)) for a, b in d.get("windows", [])) or cls.windows,
                hu_range=(float(hu[0]), float(hu[1])) if hu else None,
                trained=bool(d.get("trained", False)),
                threshold=float(d.get("threshold", 0.5)),
                training=dict(d.get("training", {})),
                metrics=dict(d.get("metrics", {})),
                summary=str(d.get("summary", "")),
                created=str(d.get("created", "")),
                version=int(d.get("version", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(
                f"{source}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path_for(weights: Path) -> Path:
    name = weights.name
    stem = name[: -len(WEIGHTS_SUFFIX)] if name.endswith(WEIGHTS_SUFFIX) else weights.stem
    return weights.with_name(stem + MANIFEST_SUFFIX)


def resolve(path: Path | str | None) -> tuple[Path, Path]:
    """(weights file, manifest file) from either of them, or the bundled model when None."""
    p = Path(path) if path is not None else BUNDLED_WEIGHTS
    if p.name.endswith(MANIFEST_SUFFIX):
        man = p
        weights = p.parent / _read_json(man).get("weights_file", "")
    else:
        weights, man = p, manifest_path_for(p)
    return weights, man


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path}: manifest not found (every weights file needs its manifest)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read manifest ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: manifest is not a JSON object")
    return data


def read_manifest(path: Path | str | None = None, verify: bool = True) -> tuple[Manifest, Path]:
    """Read and (by default) verify a manifest; returns it with the weights file's path."""
    weights, man_path = resolve(path)
    manifest = Manifest.from_dict(_read_json(man_path), man_path)
    weights = man_path.parent / manifest.weights_file
    if not weights.is_file():
        raise WeightsError(f"{weights}: weights file not found (named by {man_path})")
    if tuple(manifest.labels) != LABELS:
        raise WeightsError(
            f"{man_path}: label order {list(manifest.labels)} differs from {list(LABELS)}"
        )
    if verify:
        actual = sha256_file(weights)
        if actual != manifest.sha256:
            raise WeightsError(
                f"{weights}: sha256 {actual[:12]}... does not match its manifest "
                f"({manifest.sha256[:12]}...): the file was changed or belongs to other weights; "
                "refusing to load it"
            )
    return manifest, weights


def write_manifest(weights: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` next to ``weights`` with the file's actual name and hash."""
    final = replace(manifest, weights_file=weights.name, sha256=sha256_file(weights))
    path = manifest_path_for(weights)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(final.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def jsonable(v: Any) -> Any:
    """``v`` with every NaN or infinity replaced by None (null), for strict JSON."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def model_card_summary(manifest: Manifest) -> str:
    """The text every view and export shows about the weights."""
    status = "trained" if manifest.trained else "UNTRAINED (random initialisation)"
    lines = [
        f"Model: {manifest.architecture.get('name', 'xception_lstm')} "
        f"(input {manifest.input_size} px), weights {status}",
        f"Weights sha256: {manifest.sha256}",
    ]
    data = manifest.training.get("data_summary") or manifest.training.get("data")
    if data:
        lines.append(f"Training data: {data}")
    m = manifest.metrics
    if m.get("weighted_log_loss") is not None:
        auc_any = (m.get("auc") or {}).get("any")
        auc_txt = f", AUC(any) {auc_any:.3f}" if isinstance(auc_any, float) else ""
        lines.append(
            f"Held-out validation ({m.get('dataset', 'validation')}, n={m.get('n_images', '?')}): "
            f"weighted log loss {m['weighted_log_loss']:.4f}{auc_txt}"
        )
    if manifest.summary:
        lines.append(manifest.summary)
    return "\n".join(lines)
