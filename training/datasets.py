"""Labelled slices from the data layouts ``ich-train`` reads.

Every format becomes a list of :class:`Sample` records (a file, how to decode it
to HU, its six labels and the patient or study it belongs to, for splitting).
Decoding goes through ``ich_model`` (DICOM to HU) or through an explicit 8-bit to
HU mapping for pictures that were already windowed, so that training and
inference build the model input with the same function.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ich_model.labels import LABELS

log = logging.getLogger(__name__)

#: HU ranges carried by the 8-bit pictures of the known datasets (value 0 -> low, 255 -> high).
#: rsna-png: each slice clipped to its header window (mostly brain, level 40 / width 80).
#: ct-ich brain JPGs: brain window level 40 / width 120 (checked: the spread of brain and CSF
#: grey values is 1.5 times narrower than in rsna-png, and the parenchyma medians agree).
PICTURE_HU_RANGES: dict[str, tuple[float, float]] = {
    "rsna-png": (0.0, 80.0),
    "ctich-jpg": (-20.0, 100.0),
}

FORMATS = ("rsna-dcm", "rsna-png", "ctich-jpg", "phantom")


class DatasetError(Exception):
    """A dataset cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Sample:
    path: Path
    kind: str  # "dicom" or "picture"
    labels: tuple[int, ...]  # six 0/1 values in LABELS order
    group: str  # patient or study: never on both sides of a split
    source: str  # dataset format name
    hu_low: float = 0.0  # for pictures: the HU of grey value 0
    hu_high: float = 0.0  # and of 255


def decode_hu(sample: Sample) -> np.ndarray:
    """One sample's slice in HU (float32, 2-D), through the same code inference uses."""
    if sample.kind == "dicom":
        from ich_model.dicom_io import _slice_hu

        hu, _ = _slice_hu(sample.path)
        return hu
    img = cv2.imread(str(sample.path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DatasetError(f"{sample.path}: cannot decode image")
    from ich_model.windowing import uint8_to_hu

    return uint8_to_hu(img, sample.hu_low, sample.hu_high)


def _labels01(row: dict[str, str], names: Sequence[str], where: str) -> tuple[int, ...]:
    out = []
    for name in names:
        if name not in row or row[name] is None:
            raise DatasetError(f"{where}: missing column {name!r}")
        v = row[name].strip()
        if v not in ("0", "1"):
            raise DatasetError(f"{where}: label {name!r} is {v!r}, expected 0 or 1")
        out.append(int(v))
    return tuple(out)


def _check_columns(path: Path, header: Sequence[str] | None, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in (header or [])]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; found {list(header or [])}"
        )


def detect_format(folder: Path) -> str:
    """Recognise a layout from its files, as in ../shared/data."""
    if (folder / "hemorrhage_diagnosis.csv").is_file():
        return "ctich-jpg"
    if list(folder.glob("stage_2_train*.csv")) or list(folder.glob("stage_1_train*.csv")):
        return "rsna-dcm"
    labels = folder / "labels.csv"
    if labels.is_file():
        with open(labels, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header[:2] == ["ID", "Label"]:
            return "phantom"
        if "file" in header and list(folder.glob("*.dcm")):
            return "rsna-dcm"
        if "ID" in header and "any" in header:
            return "rsna-png"
    raise DatasetError(
        f"{folder}: cannot tell the data format (expected hemorrhage_diagnosis.csv, "
        "stage_2_train.csv, or labels.csv); name it with --format"
    )


def read_dataset(folder: Path | str, fmt: str | None = None) -> list[Sample]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    fmt = fmt or detect_format(folder)
    readers = {
        "rsna-dcm": read_rsna_dcm,
        "rsna-png": read_rsna_png,
        "ctich-jpg": read_ctich,
        "phantom": read_phantom,
    }
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        samples = readers[fmt](folder)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{folder}: not a {fmt} dataset ({exc.filename} is missing); check --format"
        ) from exc
    if not samples:
        raise DatasetError(f"{folder}: the {fmt} dataset is empty")
    log.info(
        "%s: %d slices (%s), %d positive",
        folder,
        len(samples),
        fmt,
        sum(s.labels[-1] for s in samples),
    )
    return samples


def _long_labels(path: Path) -> dict[str, dict[str, int]]:
    """RSNA long format ``ID_<id>_<label>,Label`` -> {id: {label: 0/1}}."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    pat = re.compile(r"^(ID_.+)_(" + "|".join(LABELS) + r")$")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _check_columns(path, reader.fieldnames, ["ID", "Label"])
        for i, row in enumerate(reader, start=2):
            m = pat.match(row["ID"].strip())
            if not m:
                raise DatasetError(f"{path}:{i}: ID {row['ID']!r} is not ID_<id>_<label>")
            v = row["Label"].strip()
            if v not in ("0", "1"):
                raise DatasetError(f"{path}:{i}: label is {v!r}, expected 0 or 1")
            out[m.group(1)][m.group(2)] = int(v)
    for key, labs in out.items():
        if len(labs) != len(LABELS):
            missing = [lab for lab in LABELS if lab not in labs]
            raise DatasetError(f"{path}: {key} lacks labels {missing}")
    return out


def _dicom_group(path: Path) -> str:
    """Patient (or study) of a DICOM file, read from its header only."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"]
        )
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read DICOM header ({exc})") from exc
    return str(ds.get("PatientID") or ds.get("StudyInstanceUID") or path.stem)


def read_rsna_dcm(folder: Path) -> list[Sample]:
    """RSNA 2019 layout (``stage_2_train.csv`` + ``ID_<id>.dcm``), or a wide ``labels.csv``."""
    csvs = sorted(folder.glob("stage_2_train*.csv")) or sorted(folder.glob("stage_1_train*.csv"))
    samples = []
    if csvs:
        table = _long_labels(csvs[0])
        img_dirs = [
            d
            for d in (
                folder / "stage_2_train",
                folder / "stage_2_train_images",
                folder / "images",
                folder,
            )
            if d.is_dir()
        ]
        for key, labs in table.items():
            path = next((d / f"{key}.dcm" for d in img_dirs if (d / f"{key}.dcm").is_file()), None)
            if path is None:
                raise DatasetError(f"{csvs[0]}: {key} is listed but {key}.dcm is missing")
            samples.append(
                Sample(
                    path,
                    "dicom",
                    tuple(labs[lab] for lab in LABELS),
                    _dicom_group(path),
                    "rsna-dcm",
                )
            )
        return samples
    labels = folder / "labels.csv"
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _check_columns(labels, reader.fieldnames, ["file", *LABELS])
        for i, row in enumerate(reader, start=2):
            path = folder / row["file"]
            if not path.is_file():
                raise DatasetError(f"{labels}:{i}: {row['file']} is listed but missing")
            samples.append(
                Sample(
                    path,
                    "dicom",
                    _labels01(row, LABELS, f"{labels}:{i}"),
                    _dicom_group(path),
                    "rsna-dcm",
                )
            )
    return samples


def read_rsna_png(folder: Path) -> list[Sample]:
    """Windowed 8-bit slices with a wide ``labels.csv`` (``ID`` + the six labels)."""
    labels = folder / "labels.csv"
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    lo, hi = PICTURE_HU_RANGES["rsna-png"]
    samples = []
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _check_columns(labels, reader.fieldnames, ["ID", *LABELS])
        for i, row in enumerate(reader, start=2):
            key = row["ID"].strip()
            path = next(
                (
                    img_dir / f"{key}{ext}"
                    for ext in (".png", ".jpg", ".jpeg")
                    if (img_dir / f"{key}{ext}").is_file()
                ),
                None,
            )
            if path is None:
                raise DatasetError(
                    f"{labels}:{i}: {key} is listed but {img_dir}/{key}.png is missing"
                )
            # A random sample of slices without patient IDs: each slice is its own group.
            samples.append(
                Sample(
                    path,
                    "picture",
                    _labels01(row, LABELS, f"{labels}:{i}"),
                    f"rsna:{key}",
                    "rsna-png",
                    lo,
                    hi,
                )
            )
    return samples


_CTICH_COLUMNS = {
    "epidural": "Epidural",
    "intraparenchymal": "Intraparenchymal",
    "intraventricular": "Intraventricular",
    "subarachnoid": "Subarachnoid",
    "subdural": "Subdural",
}


def read_ctich(folder: Path) -> list[Sample]:
    """PhysioNet ct-ich: ``brain/PPP_SS.jpg`` with ``hemorrhage_diagnosis.csv``, by patient."""
    table = folder / "hemorrhage_diagnosis.csv"
    lo, hi = PICTURE_HU_RANGES["ctich-jpg"]
    samples = []
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _check_columns(
            table, reader.fieldnames, ["PatientNumber", "SliceNumber", *_CTICH_COLUMNS.values()]
        )
        for i, row in enumerate(reader, start=2):
            try:
                pat, sl = int(row["PatientNumber"]), int(row["SliceNumber"])
            except ValueError as exc:
                raise DatasetError(f"{table}:{i}: bad patient or slice number") from exc
            path = folder / "brain" / f"{pat:03d}_{sl:02d}.jpg"
            if not path.is_file():
                raise DatasetError(f"{table}:{i}: {path} is listed but missing")
            sub = _labels01(
                {k: row[v] for k, v in _CTICH_COLUMNS.items()}, LABELS[:5], f"{table}:{i}"
            )
            samples.append(
                Sample(path, "picture", (*sub, int(any(sub))), f"ctich:{pat}", "ctich-jpg", lo, hi)
            )
    return samples


def read_phantom(folder: Path) -> list[Sample]:
    """Phantom series (DICOM) with their RSNA long-format ``labels.csv``, grouped by patient."""
    table = _long_labels(folder / "labels.csv")
    import pydicom

    samples = []
    for f in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "PatientID"]
            )
        except Exception as exc:
            raise DatasetError(f"{f}: cannot read DICOM header ({exc})") from exc
        key = f"ID_{ds.SOPInstanceUID}"
        if key not in table:
            continue
        labs = table.pop(key)
        samples.append(
            Sample(
                f,
                "dicom",
                tuple(labs[lab] for lab in LABELS),
                f"phantom:{ds.get('PatientID', f.parent.name)}",
                "phantom",
            )
        )
    if table:
        first = next(iter(table))
        raise DatasetError(
            f"{folder / 'labels.csv'}: {len(table)} listed slice(s) missing, e.g. {first}"
        )
    return samples


def picture_hu_ranges(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """How each source of 8-bit pictures was mapped to HU (grey 0 -> low, 255 -> high)."""
    return {s.source: [s.hu_low, s.hu_high] for s in samples if s.kind == "picture"}


def split_by_group(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Train/validation split where no group (patient) is on both sides.

    Groups are shuffled with ``seed`` and taken into validation per source until each
    source has about ``val_fraction`` of its slices there.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1). Received: {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    by_source: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        by_source[s.source][s.group].append(s)
    for source in sorted(by_source):
        groups = by_source[source]
        names = sorted(groups)
        rng.shuffle(names)
        total = sum(len(g) for g in groups.values())
        target = val_fraction * total
        taken = 0
        for name in names:
            if taken < target and val_fraction > 0:
                val.extend(groups[name])
                taken += len(groups[name])
            else:
                train.extend(groups[name])
    return train, val


def describe(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """Counts per source: slices, groups and positives per label."""
    out: dict[str, dict[str, int]] = {}
    for source in sorted({s.source for s in samples}):
        ss = [s for s in samples if s.source == source]
        d = {"slices": len(ss), "groups": len({s.group for s in ss})}
        for i, lab in enumerate(LABELS):
            d[lab] = sum(s.labels[i] for s in ss)
        out[source] = d
    return out
