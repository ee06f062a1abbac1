"""Find, group, sort and load CT series from DICOM files, folders and DICOMDIRs.

Two steps, so the viewer can list series before decoding any pixel:
``scan(paths)`` reads headers only and returns :class:`SeriesInfo` per series;
``load_series(info)`` decodes, converts to HU and returns a :class:`CTSeries`.
``load_study(paths)`` does both. Bad files never stop the good ones: they are
left out with a warning that names the file and the reason.

Each file is parsed once: for a plain slice (uncompressed 16-bit little endian, the usual
CT file) the scan keeps where the pixels are and what the header said, and loading reads
the pixels with one plain read when the file's header bytes are still those the scan saw
(any other file, or a changed one, is read in full with pydicom).

Input is untrusted: every value read from a file is checked before it sizes an allocation,
orders slices or reaches a message, and messages carry file paths and UIDs, never a patient's
name, ID or birth date. ``docs/INPUT_HANDLING.md`` lists each kind of bad input and what
happens to it; ``tests/test_robustness.py`` and ``tests/test_fuzz.py`` hold us to it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import math
import os
import re
import struct
import threading
import warnings as pywarnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from ich_model.series import CTSeries, SeriesInfo, SeriesLoadError

log = logging.getLogger(__name__)

# Real archives are full of small standard violations (RSNA's "ID_..." strings in UID
# fields, for one); we check what we use ourselves and report it per file, so pydicom's
# own value validation would only add noise to every read.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: pydicom's messages that quote a SpecificCharacterSet value (PS3.3 C.12.1.1.2).
_CHARSET_MESSAGE = (
    r"(Unknown encoding|Incorrect value for Specific Character Set|Failed to decode byte "
    r"string|Value '.*' (for Specific Character Set|cannot be used as code extension)|Found "
    r"unknown escape sequence)"
)


class _HideCharsetValues(logging.Filter):
    """pydicom quotes an unknown SpecificCharacterSet in its log messages; in a damaged file
    that value can be any text, a patient's name included (a swapped tag is enough)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return True
        if re.match(_CHARSET_MESSAGE, text):
            record.msg = "invalid or unknown SpecificCharacterSet (value not shown)"
            record.args = ()
        return True


def hide_pydicom_charset_values() -> None:
    """Keep the text of unknown character sets out of pydicom's log records and warnings.

    Installed on import; call again inside ``warnings.catch_warnings()`` blocks that reset
    the filters. The event is still logged, without the value."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _HideCharsetValues) for f in logger.filters):
        logger.addFilter(_HideCharsetValues())
    pywarnings.filterwarnings("ignore", message=_CHARSET_MESSAGE, category=UserWarning)


hide_pydicom_charset_values()

#: SOP classes that never carry a slice to score (Structured Reports, presentation states,
#: key-object selections, raw data, encapsulated documents).
_NON_IMAGE_SOP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.481.", "radiotherapy object"),
)
#: CT Image, Enhanced CT Image and Legacy Converted Enhanced CT Image Storage.
_CT_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)

#: The largest slice matrix we decode; anything larger is a broken or hostile header.
MAX_MATRIX = 4096
#: Lowest HU kept; padding (-2048, -3024, ...) and anything below air becomes air.
AIR_HU = -1024.0
#: Default minimum slices for :func:`analyzability`. The model scores slice by slice and the
#: RSNA challenge data are single slices, so one slice is enough to score; a whole-head
#: study has 20 or more (5 mm) and callers that need one can ask for more.
MIN_SLICES = 1
#: A deflated data set (transfer syntax 1.2.840.10008.1.2.1.99) may expand to this much;
#: the largest slice we accept (4096 x 4096 x 32 bits) is 64 MB.
MAX_INFLATED_BYTES = 80 * 2**20
#: Longest UID we accept: PS3.5 allows 64 characters, some archives write a little more.
MAX_UID_LENGTH = 128
#: Metadata strings are cut to this many characters (a 60 kB description helps nobody).
MAX_TEXT = 1024
#: ImagePositionPatient beyond +-100 m is not a position.
_MAX_POSITION_MM = 1e5
#: A CT slice with more than this share of pixels above this HU is not what its header
#: says (byte order, transfer syntax or rescale wrong); bone and metal stay well below.
_IMPLAUSIBLE_HU = 4000.0
_IMPLAUSIBLE_SHARE = 0.10

#: load_series fills one volume reserved up front when it is no larger than this; bigger
#: series (or headers that only claim to be) are gathered slice by slice and stacked.
_PREALLOCATE_BYTES = 2 * 2**30

_UNDEFINED_LENGTH = 0xFFFFFFFF
#: How much of a file :func:`_read_with_head` looks at before pydicom reads it.
_HEAD_BYTES = 16384
#: JPEG start-of-frame markers (ITU T.81 B.1.1.3) and JPEG-LS SOF55 (T.87 C.2.2).
_JPEG_SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF, 0xF7}
)
_DEFLATED_BYTES = DeflatedExplicitVRLittleEndian.encode()
_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')
_UID_CHARS = re.compile(r"[0-9A-Za-z._-]+")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
#: What a malformed value can raise when pydicom converts it (bad numbers, bad bytes,
#: wrong value multiplicity, odd lengths for binary VRs).
_VALUE_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    UnicodeError,
    LookupError,
    struct.error,
    NotImplementedError,
    BytesLengthException,
)

_METADATA_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "BodyPartExamined",
    "ConvolutionKernel",
    "KVP",
    "GantryDetectorTilt",
)

#: Tags that identify a patient: hidden in the viewer unless asked, never logged or exported.
PHI_TAGS = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"}
)

WarnFn = Callable[[str], None]


class _Unusable(Exception):
    """A file cannot give a slice; the message is the reason, without the path."""


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_uid: str
    series_uid: str
    study_uid: str
    modality: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    instance_number: int | None
    metadata: dict[str, str]


# ----------------------------------------------------------------------------- files


def _expand(paths: Iterable[Path | str], warn: WarnFn) -> list[Path]:
    """Folders (recursively), DICOMDIRs and single files -> the list of candidate files."""
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        try:
            r = p.resolve()
        except (OSError, RuntimeError):  # symlink loops, vanished files
            r = p.absolute()
        if r not in seen:
            seen.add(r)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            dicomdir = p / "DICOMDIR"
            if dicomdir.is_file():
                for f in read_dicomdir(dicomdir, warn):
                    add(f)
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name != "DICOMDIR" and not f.name.startswith("."):
                    add(f)
        elif p.is_file():
            if p.name.upper() == "DICOMDIR":
                for f in read_dicomdir(p, warn):
                    add(f)
            else:
                add(p)
        else:
            warn(f"{p}: no such file or folder")
    return out


def read_dicomdir(path: Path, warn: WarnFn) -> list[Path]:
    """The image files a DICOMDIR references (PS3.3 F.5), relative to its folder.

    References that leave the folder (absolute paths, ``..``) are ignored with a warning:
    a DICOMDIR on a CD must not make us read files elsewhere on the computer.
    """
    try:
        ds, _ = _read(Path(path), defer_size=None)
    except (InvalidDicomError, _Unusable) as exc:
        warn(f"{path}: cannot read DICOMDIR ({_brief(exc)})")
        return []
    except Exception as exc:  # any other failure of a hostile file: this file, not the study
        warn(f"{path}: cannot read DICOMDIR ({type(exc).__name__}: {_brief(exc)})")
        return []
    files = []
    try:
        records = list(ds.get("DirectoryRecordSequence", []))
    except _VALUE_ERRORS as exc:
        warn(f"{path}: cannot read DICOMDIR records ({type(exc).__name__})")
        return []
    for rec in records:
        try:
            ref = rec.get("ReferencedFileID")
        except _VALUE_ERRORS:
            continue
        if ref is None:
            continue
        parts = (
            [str(x) for x in ref]
            if isinstance(ref, Sequence) and not isinstance(ref, str)
            else [str(ref)]
        )
        if not parts or any(
            not p or p in (".", "..") or "/" in p or "\\" in p or ":" in p for p in parts
        ):
            warn(f"{path}: DICOMDIR references a file outside its folder; ignored")
            continue
        f = path.parent.joinpath(*parts)
        if f.is_file():
            files.append(f)
        else:
            warn(f"{path}: DICOMDIR references a missing file {f}")
    return files


def _brief(exc: BaseException, ds: Dataset | None = None, limit: int = 240) -> str:
    """An exception's message on one line, cut short (decoder messages can be long) and
    safe to log: pydicom quotes raw bytes in some messages, and in a damaged file those can
    be a patient's name (``b'...'`` literals are hidden, and so is every identifier of
    ``ds``)."""
    text = " ".join(str(exc).split())
    text = _BYTES_LITERAL.sub("b'(hidden)'", text)
    if ds is not None:
        for value in sorted(_identifiers(ds), key=len, reverse=True):
            text = text.replace(value, "(hidden)")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _identifiers(ds: Dataset) -> set[str]:
    """The patient identifiers of ``ds`` as they are in the file (and a name's parts),
    read without converting anything, so even a damaged element yields its text."""
    out: set[str] = set()
    for name in PHI_TAGS:
        tag = _tag(name)
        if tag is None or tag not in ds:
            continue
        try:
            value = ds.get_item(tag, keep_deferred=True).value
        except _VALUE_ERRORS:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        text = str(value).strip(" \0")
        for part in {text, *text.split("^")}:
            if len(part.strip()) >= 3:
                out.add(part.strip())
    return out


class _ClampedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than is left in it.

    CPython allocates ``n`` bytes before it reads, and pydicom reads a value with the length
    its header declares: a length field of 0xFFFFFFFE in a 10 kB file cost 4 GB (of address
    space, or of committed memory where the system does not overcommit)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(os.fspath(path), "rb"))  # a str name: pydicom reopens it
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1, /) -> bytes:
        if size is not None and size > 65536:  # small reads cannot hurt; skip the tell()
            size = min(size, max(0, self._size - self.tell()))
            if size == 0:
                return b""
        return super().read(size)


def _read(path: Path, defer_size: str | None) -> tuple[Dataset, int]:
    """``pydicom.dcmread`` with the guards hostile files need; returns the data set and the
    size of what it was read from (for the truncation check)."""
    ds, size, _ = _read_with_head(path, defer_size)
    return ds, size


def _read_with_head(path: Path, defer_size: str | None) -> tuple[Dataset, int, bytes | None]:
    """:func:`_read`, and the file's first 16 kB (None when the data set was read from
    something else: an inflated copy)."""
    size = path.stat().st_size
    if size == 0:
        raise _Unusable("empty file (0 bytes)")
    with open(path, "rb") as fp:
        head = fp.read(_HEAD_BYTES)
    if _DEFLATED_BYTES in head:
        inflated = _inflate(path)
        if inflated is not None:
            return pydicom.dcmread(io.BytesIO(inflated), force=True), len(inflated), None
    with _ClampedReader(path) as fp:
        try:
            return pydicom.dcmread(fp, defer_size=defer_size), size, head
        except InvalidDicomError as exc:
            # Files written without the 128-byte preamble are still common; accept them
            # only if what pydicom then finds looks like a real image object.
            fp.seek(0)
            ds = pydicom.dcmread(fp, defer_size=defer_size, force=True)
            if "SOPClassUID" not in ds and "Modality" not in ds:
                raise InvalidDicomError(
                    "not a DICOM file (no preamble, no DICOM header found)"
                ) from exc
            return ds, size, head


def _inflate(path: Path) -> bytes | None:
    """A deflated file (PS3.5 A.5) rewritten as explicit VR little endian in memory, after
    checking it does not expand beyond :data:`MAX_INFLATED_BYTES`; None if not deflated.

    pydicom inflates the whole data set without a limit, so 300 kB of zeros would
    become 256 MB (and again on every deferred read)."""
    with _ClampedReader(path) as fp:
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        out = bytearray()
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or fp.read(1 << 20)
                if not chunk:
                    break
                out += inflater.decompress(chunk, MAX_INFLATED_BYTES + 1 - len(out))
                if len(out) > MAX_INFLATED_BYTES:
                    raise _Unusable(
                        f"deflated data set expands to more than {MAX_INFLATED_BYTES // 2**20} MB"
                    )
        except zlib.error as exc:
            raise _Unusable(f"deflated data set is corrupt (zlib: {exc})") from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=False)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + bytes(out)


def _read_header(path: Path) -> tuple[Dataset, int, bytes | None]:
    """Read a file's header, deferring large values (pixel data) so nothing heavy is loaded;
    returns it with the file's size and first bytes (see :func:`_read_with_head`)."""
    ds, size, head = _read_with_head(path, defer_size="4 KB")
    why = _truncation(ds, size)
    if why:
        raise _Unusable(_BIG_ENDIAN if _byte_swapped(ds) else why)
    return ds, size, head


def _raw_elements(ds: Dataset) -> Iterable[Any]:
    """Top-level elements as read, deferred values left unread (``Dataset.elements`` reads
    them)."""
    for tag in sorted(ds.keys()):
        yield ds.get_item(tag, keep_deferred=True)


def _truncation(ds: Dataset, size: int) -> str | None:
    """Says where a file was cut short: pydicom reads a short value (or defers one beyond
    the end of the file) without complaint, and stops quietly inside the file meta."""
    meta = getattr(ds, "file_meta", None)
    group_length = _int(meta, "FileMetaInformationGroupLength") if meta is not None else None
    has_preamble = getattr(ds, "preamble", None) is not None
    if group_length is not None and has_preamble and 132 + 12 + group_length > size:
        return "file truncated inside the file meta information"
    empty = True
    for elem in _raw_elements(ds):
        empty = False
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        end = elem.value_tell + elem.length
        if end > size:
            name = pydicom.datadict.keyword_for_tag(elem.tag) or str(elem.tag)
            return (
                f"file truncated: {name} needs {elem.length} bytes, "
                f"{max(0, size - elem.value_tell)} left in the file"
            )
    if empty:
        return "no data set after the file meta information (truncated or empty)"
    return None


# ----------------------------------------------------------------------------- values


@functools.cache
def _tag(name: str) -> BaseTag | None:
    # a BaseTag: pydicom converts any other key to one on every lookup
    tag = pydicom.datadict.tag_for_keyword(name)
    return None if tag is None else BaseTag(tag)


def _value(ds: Dataset, name: str) -> Any:
    """A value, or None when absent or unconvertible."""
    tag = _tag(name)
    if tag is None or tag not in ds:
        return None
    try:
        return ds[tag].value
    except _VALUE_ERRORS:
        return None


def _str(ds: Dataset, name: str, default: str = "", limit: int = MAX_TEXT) -> str:
    """A text value on one line, cut to ``limit`` characters (huge values are not read)."""
    tag = _tag(name)
    if tag is None:
        return default
    try:
        raw = ds.get_item(tag, keep_deferred=True)
    except _VALUE_ERRORS:
        return default
    if raw is None:
        return default
    if (
        isinstance(raw, RawDataElement)
        and raw.length != _UNDEFINED_LENGTH
        and raw.length > 64 * limit
    ):
        return default
    try:
        v = ds[tag].value
    except _VALUE_ERRORS:
        return default
    if v is None:
        return default
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, MultiValue):
        v = "\\".join(str(x) for x in v)
    text = " ".join(str(v).replace("\0", " ").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _strings(ds: Dataset, name: str) -> list[str]:
    """A multi-valued text element as a list (a single value is a one-item list)."""
    v = _value(ds, name)
    if v is None:
        return []
    if isinstance(v, (str, bytes)):
        v = [v]
    try:
        return [str(x).strip().upper() for x in v]
    except TypeError:
        return []


def _int(ds: Dataset, name: str, default: int | None = None) -> int | None:
    """An integer value; ``default`` when absent or empty, None when not one integer."""
    v = _value(ds, name)
    if v is None or v == "":
        return default
    if isinstance(v, (MultiValue, list, tuple, bytes)):
        return None
    try:
        f = float(v)
    except _VALUE_ERRORS:
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def _floats(ds: Dataset, name: str, n: int) -> tuple[float, ...] | None:
    v = _value(ds, name)
    if v is None:
        return None
    try:
        vals = tuple(
            float(x)
            for x in (v if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else [v])
        )
    except _VALUE_ERRORS:
        return None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
        return None
    return vals


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient, or None when missing, not 6 numbers or degenerate."""
    o = _floats(ds, "ImageOrientationPatient", 6)
    if o is None or _degenerate(o):
        return None
    return o


@functools.lru_cache(maxsize=256)
def _degenerate(orientation: tuple[float, ...]) -> bool:
    # cached: every slice of a series has the same orientation, and numpy is slow on 3-vectors
    try:
        slice_normal(orientation)
    except ValueError:
        return True
    return False


def _position(ds: Dataset) -> tuple[float, float, float] | None:
    """ImagePositionPatient, or None when missing, not 3 numbers or beyond +-100 m."""
    p = _floats(ds, "ImagePositionPatient", 3)
    if p is None or any(abs(x) > _MAX_POSITION_MM for x in p):
        return None
    return (p[0], p[1], p[2])


def _number(ds: Dataset, name: str, default: float) -> float:
    """One finite number (RescaleSlope, RescaleIntercept); raises :class:`_Unusable`."""
    if name not in ds:
        return default
    try:
        v = ds.get(name)
    except _VALUE_ERRORS as exc:
        raise _Unusable(f"{name} is not a number") from exc
    if v is None or v == "":
        return default
    if isinstance(v, (MultiValue, list, tuple)):
        raise _Unusable(f"{name} has {len(v)} values, expected one number")
    try:
        f = float(v)
    except _VALUE_ERRORS as exc:
        raise _Unusable(f"{name} is not a number") from exc
    if not math.isfinite(f):
        raise _Unusable(f"{name} is not a finite number")
    return f


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT, checked (PS3.3 C.11.1.1.2)."""
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    if slope == 0:
        raise _Unusable("RescaleSlope is 0 (every pixel would have the same value)")
    return slope, intercept


def _uid_problem(ds: Dataset, name: str, phi: set[str]) -> tuple[str, str | None]:
    """A UID's value and what is wrong with it. Tolerated: non-standard characters such as
    the RSNA "ID_..." strings; refused: anything that could break a CSV row or a log line
    (commas, spaces, line breaks, non-ASCII), overlong values and patient identifiers."""
    uid = _str(ds, name, limit=MAX_UID_LENGTH * 2)
    if not uid:
        return "", None
    if len(uid) > MAX_UID_LENGTH:
        return uid, f"invalid {name} (longer than {MAX_UID_LENGTH} characters)"
    if not _UID_CHARS.fullmatch(uid):
        return uid, f"invalid {name} (characters other than digits, letters, '.', '_', '-')"
    if uid in phi:
        return uid, f"invalid {name} (it holds a patient identifier)"
    return uid, None


def _safe_stem(path: Path) -> str:
    """A file name standing in for a missing SOPInstanceUID, in the characters UIDs may use
    (it becomes an ID in predictions.csv)."""
    return re.sub(r"[^0-9A-Za-z._-]", "_", path.stem)[:MAX_UID_LENGTH] or "unnamed"


def _code(value: str) -> str:
    """A code string fit for a message (Modality, ...), or a placeholder."""
    return value if _CODE_STRING.fullmatch(value) else "(invalid value)"


# ----------------------------------------------------------------------------- pixel checks


def _transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax; for files without one (no file meta), the encoding pydicom used."""
    meta = getattr(ds, "file_meta", None)
    ts = _str(meta, "TransferSyntaxUID", limit=MAX_UID_LENGTH) if meta is not None else ""
    if ts:
        return UID(ts)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit in (None, True):
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _pixel_length(ds: Dataset) -> tuple[int, bool]:
    """(length in bytes, encapsulated) of PixelData without reading a deferred value."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(elem, RawDataElement):
        if elem.length == _UNDEFINED_LENGTH:
            return (len(elem.value) if elem.value is not None else 0), True
        return elem.length, False
    if elem is None:
        return 0, False
    value = elem.value
    return (len(value) if value is not None else 0), bool(elem.is_undefined_length)


def _pixel_problem(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` cannot be one CT slice, or None; checked on the header
    alone, before anything is decoded or allocated."""
    spp = _int(ds, "SamplesPerPixel", 1)
    if spp is None:
        return "SamplesPerPixel invalid"
    if spp != 1:
        return f"{spp} samples per pixel (colour), not a CT slice"
    photometric = _str(ds, "PhotometricInterpretation").upper()
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return "PhotometricInterpretation is not MONOCHROME1/2 (a colour or palette image)"
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None:
        return "NumberOfFrames invalid"
    if frames != 1:
        return f"multi-frame objects ({frames} frames) are not supported"
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or cols is None:
        return "Rows/Columns missing or invalid"
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        return f"matrix {rows} x {cols} outside 1..{MAX_MATRIX}"
    bits = _int(ds, "BitsAllocated")
    if bits not in (8, 16, 32):
        return f"BitsAllocated {bits if bits is not None else 'missing'} (expected 8, 16 or 32)"
    stored = _int(ds, "BitsStored", bits)
    if stored is None or not 1 <= stored <= bits:
        return f"BitsStored {stored} does not fit in BitsAllocated {bits}"
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        return "PixelRepresentation invalid (expected 0 or 1)"
    try:
        _rescale(ds)
    except _Unusable as exc:
        return str(exc)
    ts = _transfer_syntax(ds)
    shown = ts if _UID_CHARS.fullmatch(ts) else "(invalid)"
    try:
        if not ts.is_transfer_syntax:
            raise ValueError
        compressed = ts.is_compressed
    except ValueError:
        return f"transfer syntax {shown} is unknown"
    length, encapsulated = _pixel_length(ds)
    if not compressed:
        if encapsulated:
            return (
                f"transfer syntax {ts.name} is uncompressed but the pixel data is "
                "encapsulated (compressed fragments): the header is wrong"
            )
        need = rows * cols * bits // 8
        if length not in (need, need + 1):
            return (
                f"pixel data holds {length} bytes but Rows x Columns x BitsAllocated "
                f"({rows} x {cols} x {bits}) needs {need}"
            )
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"transfer syntax {ts.name} is not supported"
    if not decoder.is_available:
        return f"no decoder installed for transfer syntax {ts.name}"
    if not encapsulated:
        return (
            f"transfer syntax {ts.name} is compressed but the pixel data is not "
            "encapsulated: the header is wrong"
        )
    return None


def _be16(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 2], "big")


def _be32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "big")


def _codestream_problem(ts: UID, frame: bytes, rows: int, cols: int) -> str | None:
    """Compare a JPEG / JPEG-LS / JPEG 2000 stream's own header with Rows x Columns.

    Decoders allocate what the stream declares; a stream that says 60000 x 60000 (or a
    million tiles, or many components) must be refused before it is decoded.
    """
    if ts in JPEG2000TransferSyntaxes:
        i = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (PS3.5 A.4.4, T.800 A.5)
        if i < 0 or len(frame) < i + 44:
            return "the JPEG 2000 stream has no image header (SIZ): corrupt"
        s = i + 2
        width = _be32(frame, s + 6) - _be32(frame, s + 14)
        height = _be32(frame, s + 10) - _be32(frame, s + 18)
        tw, th = _be32(frame, s + 22), _be32(frame, s + 26)
        tox, toy = _be32(frame, s + 30), _be32(frame, s + 34)
        comps = _be16(frame, s + 38)
        if (height, width) != (rows, cols):
            return (
                f"the JPEG 2000 stream is {height} x {width} but Rows x Columns say {rows} x {cols}"
            )
        if comps != 1:
            return f"the JPEG 2000 stream has {comps} components, expected 1"
        if tw == 0 or th == 0:
            return "the JPEG 2000 stream has a zero tile size: corrupt"
        x1, y1 = _be32(frame, s + 6), _be32(frame, s + 10)
        tiles = math.ceil(max(0, x1 - tox) / tw) * math.ceil(max(0, y1 - toy) / th)
        if tiles > 65536:
            return f"the JPEG 2000 stream has {tiles} tiles: corrupt or hostile"
        return None
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        if frame[:2] != b"\xff\xd8":
            return "the JPEG stream does not start with SOI: corrupt"
        pos = 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return "the JPEG stream has a broken marker: corrupt"
            m = frame[pos + 1]
            if m == 0xFF:
                pos += 1
                continue
            if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
                pos += 2
                continue
            if m in _JPEG_SOF:
                if pos + 10 > len(frame):
                    break
                height, width, comps = _be16(frame, pos + 5), _be16(frame, pos + 7), frame[pos + 9]
                if (height, width) != (rows, cols):
                    return (
                        f"the JPEG stream is {height} x {width} "
                        f"but Rows x Columns say {rows} x {cols}"
                    )
                if comps != 1:
                    return f"the JPEG stream has {comps} components, expected 1"
                return None
            if m == 0xDA:
                break
            pos += 2 + _be16(frame, pos + 2)
        return "the JPEG stream has no frame header (SOF): corrupt"
    return None


def _stream_end(ts: UID, tail: bytes) -> str | None:
    """A JPEG, JPEG-LS or JPEG 2000 stream ends with its end marker (EOI / EOC, FF D9), before
    any padding to an even length. One cut short can still decode (pylibjpeg fills in what is
    missing), into a wrong picture with no error: refuse it."""
    if not (
        ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes or ts in JPEG2000TransferSyntaxes
    ):
        return None
    if not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "the compressed stream ends before its end marker (FF D9): truncated"
    return None


# ----------------------------------------------------------------------------- headers


def _header(path: Path, ds: Dataset) -> tuple[_Header | None, str | None]:
    """Turn a dataset into a slice header, or say why the file is left out."""
    sop_class = _str(ds, "SOPClassUID")
    for prefix, what in _NON_IMAGE_SOP_PREFIXES:
        if sop_class.startswith(prefix):
            return None, f"{path}: left out, a {what}, not an image"
    if "PixelData" not in ds:
        if "DirectoryRecordSequence" in ds:
            return None, None  # a DICOMDIR found while walking a folder: already expanded
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return None, f"{path}: left out, float pixel data (a parametric map), not CT"
        if _byte_swapped(ds):
            return None, f"{path}: left out, {_BIG_ENDIAN}"
        return None, f"{path}: left out, no pixel data"
    image_type = _strings(ds, "ImageType")
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return None, f"{path}: left out, a localizer (scout) image"
    problem = _pixel_problem(ds)
    if problem:
        return None, f"{path}: left out, {problem}"
    meta = {t: _str(ds, t) for t in _METADATA_TAGS}
    phi = {v for t in PHI_TAGS if (v := meta.get(t, ""))}
    uids: dict[str, str] = {}
    for name in ("SeriesInstanceUID", "SOPInstanceUID", "StudyInstanceUID"):
        uids[name], problem = _uid_problem(ds, name, phi)
        if problem:
            return None, f"{path}: left out, {problem}"
    if not uids["SeriesInstanceUID"]:
        return None, f"{path}: left out, no SeriesInstanceUID"
    meta["SliceThickness"] = _str(ds, "SliceThickness")
    meta["PixelSpacing"] = _str(ds, "PixelSpacing")
    meta["SOPClassUID"] = sop_class[:MAX_UID_LENGTH]
    return (
        _Header(
            path=path,
            sop_uid=uids["SOPInstanceUID"] or _safe_stem(path),
            series_uid=uids["SeriesInstanceUID"],
            study_uid=uids["StudyInstanceUID"],
            modality=_str(ds, "Modality", limit=16),
            rows=int(_int(ds, "Rows") or 0),
            columns=int(_int(ds, "Columns") or 0),
            orientation=_orientation(ds),
            position=_position(ds),
            instance_number=_int(ds, "InstanceNumber"),
            metadata=meta,
        ),
        None,
    )


_BIG_ENDIAN = "the data set is in big-endian byte order but the transfer syntax says little endian"


def _byte_swapped(ds: Dataset) -> bool:
    """Read as little endian, a big-endian data set shows groups 0x0800, 0x1000, 0x2000..."""
    groups = [e.tag.group for e in _raw_elements(ds)]
    swapped = sum(g in (0x0800, 0x1000, 0x1800, 0x2000, 0x2800, 0xE07F) for g in groups)
    return bool(groups) and swapped * 2 >= len(groups)


# ----------------------------------------------------------------------------- geometry


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal of an image plane from ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    with np.errstate(all="ignore"):
        n = np.cross(row, col)
        norm = np.linalg.norm(n)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient. Received: {tuple(orientation)}")
    return n / norm


def _orientation_key(o: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return None if o is None else tuple(round(x, 2) for x in o)


def _split_groups(headers: list[_Header]) -> list[list[_Header]]:
    """Split one SeriesInstanceUID into parts of one orientation and matrix size."""
    groups: dict[tuple[Any, ...], list[_Header]] = defaultdict(list)
    for h in headers:
        groups[(_orientation_key(h.orientation), h.rows, h.columns)].append(h)
    return sorted(groups.values(), key=len, reverse=True)


def _normal_of(headers: Sequence[_Header]) -> np.ndarray | None:
    """The slice normal when every header has a position and the first an orientation."""
    orient = headers[0].orientation
    if orient is None or any(h.position is None for h in headers):
        return None
    try:
        return slice_normal(orient)
    except ValueError:
        return None


def _sort(headers: list[_Header], warn: WarnFn) -> list[_Header]:
    """Sort along the slice normal (ties: lower InstanceNumber, then path, first); fall back
    to InstanceNumber with a warning."""
    normal = _normal_of(headers)
    if normal is not None:
        return sorted(
            headers,
            key=lambda h: (
                float(np.dot(normal, h.position)),  # type: ignore[arg-type]
                h.instance_number is None,
                h.instance_number or 0,
                str(h.path),
            ),
        )
    warn(
        f"series {headers[0].series_uid}: ImagePositionPatient or ImageOrientationPatient "
        "missing or invalid; slices sorted by InstanceNumber"
    )
    return sorted(
        headers, key=lambda h: (h.instance_number is None, h.instance_number or 0, str(h.path))
    )


def _positions(headers: Sequence[_Header]) -> list[float]:
    normal = _normal_of(headers)
    if normal is not None:
        return [float(np.dot(normal, h.position)) for h in headers]  # type: ignore[arg-type]
    return [float(i) for i in range(len(headers))]


def geometry_warnings(
    positions: Sequence[float],
    orientation: Sequence[float] | None,
    xyz: Sequence[Sequence[float]] | None,
    label: str,
) -> list[str]:
    """Gantry tilt, gaps and uneven spacing: warnings, the series is still scored."""
    out: list[str] = []
    if len(positions) < 2:
        return out
    with np.errstate(all="ignore"):
        d = np.diff(np.asarray(positions, dtype=np.float64))
        if not np.all(np.isfinite(d)):
            return [f"{label}: slice positions are not usable numbers"]
        step = float(np.median(d))
        if step > 0:
            gap = d > 1.5 * step
            gaps = int(np.sum(gap))
            if gaps:
                missing = int(np.sum(np.clip(np.round(d[gap] / step) - 1, 0, 1e9)))
                out.append(
                    f"{label}: {gaps} gap(s) in slice positions (about {missing} missing "
                    f"slice(s) at {step:.3g} mm spacing)"
                )
            elif float(np.max(np.abs(d - step))) > max(0.1 * step, 0.01):
                out.append(
                    f"{label}: uneven slice spacing ({float(d.min()):.3g} to "
                    f"{float(d.max()):.3g} mm)"
                )
    if orientation is not None and xyz is not None and len(xyz) >= 2:
        try:
            normal = slice_normal(orientation)
        except ValueError:
            return out
        with np.errstate(all="ignore"):
            delta = np.asarray(xyz[-1], dtype=np.float64) - np.asarray(xyz[0], dtype=np.float64)
            length = float(np.linalg.norm(delta))
            if math.isfinite(length) and length > 1e-6:
                cosang = abs(float(np.dot(delta / length, normal)))
                tilt = math.degrees(math.acos(min(1.0, cosang)))
                if tilt > 0.5:
                    out.append(f"{label}: gantry tilt of {tilt:.1f} degrees (slices are sheared)")
    return out


def is_axial(orientation: Sequence[float] | None, tolerance_deg: float = 30.0) -> bool:
    """True when the slice normal lies within ``tolerance_deg`` of the patient's head-feet axis."""
    if orientation is None:
        return True  # unknown: let it through; the caller warns about missing geometry
    n = slice_normal(orientation)
    return abs(float(n[2])) >= math.cos(math.radians(tolerance_deg))


# ----------------------------------------------------------------------------- scanning


def scan(
    paths: Iterable[Path | str] | Path | str,
    warn: WarnFn | None = None,
) -> list[SeriesInfo]:
    """Read headers of every file under ``paths`` and group them into sorted series.

    Returns one :class:`SeriesInfo` per series (largest first within a study).
    Files that are not images, not DICOM or broken are left out with a warning; every file
    left out, here or while grouping, is named in a ``warn`` message (and those that
    belonged to a series also in that series' warnings).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s", msg)
        if warn is not None:
            warn(msg)

    headers: list[_Header] = []
    for f in _expand(paths, _warn):
        _NATIVE.put(f, None)
        try:
            ds, size, head = _read_header(f)
        except (InvalidDicomError, _Unusable) as exc:
            _warn(f"{f}: left out, {_brief(exc)}")
            continue
        except Exception as exc:  # truncated, corrupt, unreadable: the file, not the study
            _warn(f"{f}: left out, cannot read DICOM header ({type(exc).__name__}: {_brief(exc)})")
            continue
        try:
            h, why = _header(f, ds)
        except Exception as exc:  # a value we did not foresee: the file, not the study
            h, why = (
                None,
                f"{f}: left out, malformed header ({type(exc).__name__}: {_brief(exc, ds)})",
            )
        if why:
            _warn(why)
        if h is not None:
            headers.append(h)
            _NATIVE.put(f, _prepare_native(h, ds, size, head))

    by_uid: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        by_uid[h.series_uid].append(h)

    infos: list[SeriesInfo] = []
    for uid, all_hs in by_uid.items():
        left_out: list[str] = []
        hs = _drop_unplaceable(all_hs, left_out.append)
        groups = _split_groups(hs)
        if len(groups) > 1:
            _warn(
                f"series {uid}: slices differ in orientation or matrix size; "
                f"split into {len(groups)} series"
            )
        for i, g in enumerate(groups):
            series_warn: list[str] = list(left_out) if i == 0 else []
            g_sorted = _sort(g, series_warn.append)
            dropped: list[str] = []
            g_sorted = _drop_duplicates(g_sorted, dropped.append)
            series_warn += dropped
            left_out += dropped
            first = g_sorted[0]
            key = uid if i == 0 else f"{uid}#{i + 1}"
            if len(groups) > 1:
                series_warn.append(
                    f"series {uid} was split by orientation/matrix; this part has "
                    f"{len(g_sorted)} of {len(all_hs)} files"
                )
            infos.append(
                SeriesInfo(
                    key=key,
                    series_uid=uid,
                    study_uid=first.study_uid,
                    modality=first.modality,
                    files=tuple(h.path for h in g_sorted),
                    rows=first.rows,
                    columns=first.columns,
                    metadata=dict(first.metadata),
                    warnings=tuple(series_warn),
                    orientation=first.orientation,
                )
            )
            for msg in series_warn:
                if msg not in left_out:
                    log.warning("%s", msg)
        for msg in left_out:
            _warn(msg)
    if not infos and not warnings:
        _warn(f"{', '.join(str(p) for p in paths)}: no DICOM files found")
    infos.sort(key=lambda s: (s.study_uid, -s.n_slices, s.key))
    return infos


def _drop_unplaceable(headers: list[_Header], warn: WarnFn) -> list[_Header]:
    """In a series whose slices mostly carry a position and orientation, leave out those
    that do not: they cannot be placed, and sorting the rest by InstanceNumber instead
    would lose the geometry checks (gaps, tilt) for the whole series."""
    placed = [h for h in headers if h.orientation is not None and h.position is not None]
    if not placed or len(placed) == len(headers):
        return headers
    for h in headers:
        if h.orientation is None:
            warn(
                f"{h.path}: left out, no usable ImageOrientationPatient (the other slices of "
                f"series {h.series_uid} have one)"
            )
        elif h.position is None:
            warn(
                f"{h.path}: left out, no usable ImagePositionPatient (the other slices of "
                f"series {h.series_uid} have one)"
            )
    return placed


def _drop_duplicates(headers: list[_Header], warn: WarnFn) -> list[_Header]:
    """Keep one slice per position (and per SOP Instance UID); warn about the rest."""
    out: list[_Header] = []
    seen_uid: set[str] = set()
    last_pos: float | None = None
    positions = _positions(headers)
    has_pos = _normal_of(headers) is not None
    for h, p in zip(headers, positions, strict=True):
        if h.sop_uid in seen_uid:
            warn(f"{h.path}: left out, duplicate SOP Instance UID {h.sop_uid}")
            continue
        if has_pos and last_pos is not None and abs(p - last_pos) < 1e-3:
            warn(f"{h.path}: left out, duplicate slice position {p:.2f} mm")
            continue
        seen_uid.add(h.sop_uid)
        last_pos = p
        out.append(h)
    return out


# ----------------------------------------------------------------------------- pixels


def rsna_wrap_fix_applies(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """The RSNA 2019 files whose 12-bit unsigned values wrapped (BitsStored 12,
    PixelRepresentation 0, RescaleIntercept > -100)."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


def to_hu(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    padding_value: float | None = None,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored values -> HU with the modality LUT (PS3.3 C.11.1.1.2), fixes included.

    - RSNA wrap fix: for 12-bit unsigned slices with intercept > -100, add 1000,
      wrap at 4096 and use intercept -1000 (the fix published with the challenge data).
    - Padding (``PixelPaddingValue``) and anything below air becomes air (-1024 HU),
      so -2048 or -3024 outside the field of view never looks like tissue.

    Computed in float32 as ``float32(stored) * float32(slope) + float32(intercept)``, into
    ``out`` (float32, the shape of ``stored``) when given, so a loader can fill a volume
    without a copy per slice.
    """
    px = np.asarray(stored)
    hu = np.empty(px.shape, dtype=np.float32) if out is None else out
    pad_mask = None if padding_value is None else px == padding_value
    if rsna_wrap_fix_applies(bits_stored, pixel_representation, intercept):
        x = np.add(px, 1000, dtype=np.int32)
        x[x >= 4096] -= 4096
        px, intercept = x, -1000.0
    # One pass each, no temporaries; x * 1.0f is x exactly, so a unit slope is skipped.
    if np.float32(slope) == 1:
        np.add(px, np.float32(intercept), out=hu, dtype=np.float32)
    else:
        np.multiply(px, np.float32(slope), out=hu, dtype=np.float32)
        np.add(hu, np.float32(intercept), out=hu)
    if pad_mask is not None:
        hu[pad_mask] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu


class _SliceMeta(NamedTuple):
    """What :func:`load_series` takes from a slice's header besides its pixels."""

    sop_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    has_spacing: bool
    thickness: tuple[float, ...] | None
    thickness_text: str


def _slice_meta(path: Path, ds: Dataset, header: _Header | None = None) -> _SliceMeta:
    """The header values of one slice; ``header``: the scan's, for the UID and geometry."""
    if header is None:
        sop_uid = _uid_problem(ds, "SOPInstanceUID", set())[0] or _safe_stem(path)
        position, orientation = _position(ds), _orientation(ds)
    else:
        sop_uid, position, orientation = header.sop_uid, header.position, header.orientation
    return _SliceMeta(
        sop_uid=sop_uid,
        position=position,
        orientation=orientation,
        spacing=_floats(ds, "PixelSpacing", 2),
        has_spacing="PixelSpacing" in ds,
        thickness=_floats(ds, "SliceThickness", 1),
        thickness_text=_str(ds, "SliceThickness"),
    )


def _hu_parameters(ds: Dataset) -> tuple[float, float, int, int, float | None]:
    """(slope, intercept, bits stored, pixel representation, padding) for :func:`to_hu`;
    raises :class:`_Unusable` for a rescale that is not a usable number."""
    slope, intercept = _rescale(ds)
    pad = _value(ds, "PixelPaddingValue")
    return (
        slope,
        intercept,
        int(_int(ds, "BitsStored", 16) or 16),
        int(_int(ds, "PixelRepresentation", 0) or 0),
        float(pad) if isinstance(pad, (int, float)) else None,
    )


def _checked_hu(path: Path, hu: np.ndarray) -> np.ndarray:
    # After to_hu's maximum() the only values that are not finite are NaN and +inf, and
    # max() passes both on: one reduction instead of an isfinite() array.
    if not math.isfinite(float(hu.max())):
        raise SeriesLoadError(
            f"{path}: RescaleSlope/RescaleIntercept give values that are not finite", [path]
        )
    return hu


def _slice_hu(path: Path, out: np.ndarray | None = None) -> tuple[np.ndarray, Dataset]:
    """One slice in HU (into ``out`` when the slice has its shape). Raises
    :class:`SeriesLoadError` (naming the file) for what the header says is wrong, before
    decoding; decoder errors pass through to the caller."""
    try:
        ds, size = _read(path, defer_size="1 MB")
        problem = _truncation(ds, size) or _pixel_problem(ds)
        if problem is None and "PixelData" not in ds:
            problem = "no pixel data"
        if problem is not None:
            raise _Unusable(problem)
        rows, cols = int(_int(ds, "Rows") or 0), int(_int(ds, "Columns") or 0)
        ts = _transfer_syntax(ds)
        if ts.is_compressed:
            frame = get_frame(ds.PixelData, 0, number_of_frames=1)
            problem = _codestream_problem(ts, bytes(frame[:65536]), rows, cols) or _stream_end(
                ts, bytes(frame[-16:])
            )
            if problem is not None:
                raise _Unusable(problem)
        _rescale(ds)
    except _Unusable as exc:
        raise SeriesLoadError(f"{path}: {exc}", [path]) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ts  # no file meta: decode as pydicom read it
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise anything on corrupt streams
        raise SeriesLoadError(
            f"{path}: cannot decode pixels ({type(exc).__name__}: {_brief(exc, ds)})", [path]
        ) from exc
    if arr.ndim != 2:
        raise SeriesLoadError(
            f"{path}: pixel data has shape {arr.shape}, expected one 2-D slice", [path]
        )
    if arr.shape != (rows, cols):
        raise SeriesLoadError(
            f"{path}: pixel data {arr.shape} does not match Rows x Columns", [path]
        )
    slope, intercept, bits_stored, representation, padding = _hu_parameters(ds)
    hu = to_hu(
        arr,
        slope,
        intercept,
        bits_stored=bits_stored,
        pixel_representation=representation,
        padding_value=padding,
        out=out if out is not None and out.shape == arr.shape else None,
    )
    return _checked_hu(path, hu), ds


# ----------------------------------------------------------------------------- one read


@dataclass(frozen=True)
class _NativeSlice:
    """A slice the scan found in native little-endian 16-bit encoding with its pixel data at
    the end of the file: where the pixels are, how to turn them into HU, and what
    :func:`load_series` takes from the header, so loading reads the file once and parses
    no header again.

    Only valid while the file has this size and these bytes before the pixel data (checked
    on every use): then pydicom would read the very same data set, so every check the scan
    made still holds and the values are those the full read would give.
    """

    size: int
    offset: int
    digest: bytes
    rows: int
    columns: int
    dtype: str
    unused_bits: int
    hu: tuple[float, float, int, int, float | None]
    meta: _SliceMeta


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _exact_int(ds: Dataset, name: str) -> int | None:
    """A value pydicom reads as a plain integer (US elements), else None."""
    v = _value(ds, name)
    return v if type(v) is int else None


def _native_slice(
    ds: Dataset, size: int, head: bytes | None, values: _SliceMeta
) -> _NativeSlice | None:
    """The :class:`_NativeSlice` of a header that passed the scan, or None when decoding
    it takes more than reading its bytes (compressed, big endian, 8 or 32 bits, anything
    pydicom would treat specially): those slices are read with pydicom."""
    if head is None:
        return None  # read from an inflated copy: offsets are not the file's
    meta = getattr(ds, "file_meta", None)
    ts = _str(meta, "TransferSyntaxUID", limit=MAX_UID_LENGTH) if meta is not None else ""
    if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    if any(k in ds for k in ("FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames")):
        return None
    elem = ds.get_item("PixelData", keep_deferred=True)
    if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
        return None
    offset = elem.value_tell
    rows, cols = _exact_int(ds, "Rows"), _exact_int(ds, "Columns")
    stored = _exact_int(ds, "BitsStored")
    representation = _exact_int(ds, "PixelRepresentation")
    if (
        rows is None
        or cols is None
        or stored is None
        or representation not in (0, 1)
        or _exact_int(ds, "BitsAllocated") != 16
        or _exact_int(ds, "SamplesPerPixel") != 1
        or not 1 <= stored <= 16
        or _value(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
        or elem.length != rows * cols * 2
        or offset + elem.length != size
        or offset > len(head)
    ):
        return None
    try:
        hu = _hu_parameters(ds)
    except _Unusable:
        return None
    return _NativeSlice(
        size=size,
        offset=offset,
        digest=_digest(head[:offset]),
        rows=rows,
        columns=cols,
        dtype="<i2" if representation else "<u2",
        unused_bits=16 - stored,
        hu=hu,
        meta=values,
    )


class _NativeSlices:
    """The scan's :class:`_NativeSlice` per file, for the load that follows; bounded (the
    oldest go first), and a stale entry is only a miss (see :class:`_NativeSlice`)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: dict[Path, _NativeSlice] = {}
        self._lock = threading.Lock()

    def put(self, path: Path, item: _NativeSlice | None) -> None:
        with self._lock:
            self._items.pop(path, None)
            if item is None:
                return
            self._items[path] = item
            while len(self._items) > self._limit:
                del self._items[next(iter(self._items))]

    def get(self, path: Path) -> _NativeSlice | None:
        with self._lock:
            return self._items.get(path)


#: Enough for the slices of a large batch; about 1 kB each.
_NATIVE = _NativeSlices(limit=20000)


def _native_hu(path: Path, item: _NativeSlice, out: np.ndarray | None) -> np.ndarray | None:
    """The slice in HU from one plain read, or None when the file is no longer what the scan
    saw (the caller then reads it with pydicom)."""
    try:
        with open(path, "rb", buffering=0) as fp:
            if os.fstat(fp.fileno()).st_size != item.size:
                return None
            head = fp.read(item.offset)
            if len(head) != item.offset or _digest(head) != item.digest:
                return None
            px = np.empty((item.rows, item.columns), dtype=item.dtype)
            view = px.data.cast("B")
            got = 0
            while got < len(view):
                n = fp.readinto(view[got:])
                if not n:
                    return None
                got += n
    except OSError:
        return None  # let the full read name the problem
    if item.unused_bits:
        # what pydicom does with bits above Bits Stored: shifted out, sign kept for signed
        np.left_shift(px, item.unused_bits, out=px)
        np.right_shift(px, item.unused_bits, out=px)
    slope, intercept, bits_stored, representation, padding = item.hu
    hu = to_hu(
        px,
        slope,
        intercept,
        bits_stored=bits_stored,
        pixel_representation=representation,
        padding_value=padding,
        out=out if out is not None and out.shape == px.shape else None,
    )
    return _checked_hu(path, hu)


def _prepare_native(h: _Header, ds: Dataset, size: int, head: bytes | None) -> _NativeSlice | None:
    """The scan's part of :class:`_NativeSlice`; never fails (None: load with pydicom)."""
    try:
        meta = _slice_meta(h.path, ds, h)
        return _native_slice(ds, size, head, meta)
    except Exception:  # a value we did not foresee: the full read will meet it again
        return None


def _load_slice(path: Path, out: np.ndarray | None) -> tuple[np.ndarray, _SliceMeta]:
    """One slice in HU and its header values: from one plain read when the scan prepared
    it and the file is unchanged, otherwise with pydicom."""
    item = _NATIVE.get(path)
    if item is not None:
        hu = _native_hu(path, item, out)
        if hu is not None:
            return hu, item.meta
    hu, ds = _slice_hu(path, out)
    return hu, _slice_meta(path, ds)


def _is_decoder_panic(exc: BaseException) -> bool:
    """A Rust decoder's panic (pyo3 ``PanicException``, e.g. pylibjpeg-rle on a corrupt
    stream) derives from BaseException, so ``except Exception`` misses it."""
    return type(exc).__name__ == "PanicException"


def _implausible(hu: np.ndarray) -> str | None:
    if float(hu.max()) <= _IMPLAUSIBLE_HU:
        return None  # the usual case, without a mask
    share = float(np.mean(hu > _IMPLAUSIBLE_HU))
    if share > _IMPLAUSIBLE_SHARE:
        return (
            f"implausible CT values: {share:.0%} of pixels above {_IMPLAUSIBLE_HU:.0f} HU "
            "(pixel data in another byte order or encoding than the header says?)"
        )
    return None


def load_series(
    info: SeriesInfo,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> CTSeries:
    """Decode every slice of a scanned series into a :class:`CTSeries` in HU.

    A slice that fails to decode is left out with a warning; if none decode, raises
    :class:`SeriesLoadError` naming the files. Nothing else escapes: any failure of a
    slice is that slice's warning.
    """
    n = len(info.files)
    # Slices are converted straight into the volume (a slice left out is overwritten), unless
    # the headers declare more than is sensible to reserve before any slice has decoded.
    volume = (
        np.empty((n, info.rows, info.columns), dtype=np.float32)
        if n * info.rows * info.columns * 4 <= _PREALLOCATE_BYTES
        else None
    )
    slices: list[np.ndarray] = []
    kept: list[tuple[Path, _SliceMeta]] = []
    warnings = list(info.warnings)
    dropped: list[str] = []
    check_values = info.modality.upper() in ("CT", "")
    for i, f in enumerate(info.files):
        if cancelled is not None and cancelled():
            raise SeriesLoadError(f"loading series {info.key} was cancelled", info.files)
        try:
            hu, meta = _load_slice(f, None if volume is None else volume[len(kept)])
            why = None
            if hu.shape != (info.rows, info.columns):
                why = (
                    f"{f}: slice is {hu.shape[0]} x {hu.shape[1]}, the series "
                    f"{info.rows} x {info.columns} (file changed since the scan?)"
                )
            elif check_values:
                bad = _implausible(hu)
                why = f"{f}: {bad}" if bad else None
            if why:
                raise SeriesLoadError(why, [f])
        except SeriesLoadError as exc:
            msg, prefix = str(exc), f"{f}: "
            reason = msg[len(prefix) :] if msg.startswith(prefix) else msg
            dropped.append(f"{f}: slice left out, {reason}")
        except Exception as exc:  # decoders raise anything on corrupt streams
            dropped.append(
                f"{f}: slice left out, cannot decode pixels ({type(exc).__name__}: {_brief(exc)})"
            )
        except BaseException as exc:
            if not _is_decoder_panic(exc):
                raise
            dropped.append(f"{f}: slice left out, the decoder crashed ({_brief(exc)})")
        else:
            kept.append((f, meta))
            if volume is None:
                slices.append(hu)
        if progress is not None:
            progress(i + 1, n)
    warnings += dropped
    for w in dropped:
        log.warning("%s", w)
    if not kept:
        more = f" (and {len(dropped) - 3} more)" if len(dropped) > 3 else ""
        raise SeriesLoadError(
            f"series {info.key}: none of its {n} file(s) could be decoded: "
            + "; ".join(dropped[:3])
            + more,
            info.files,
        )
    if volume is None:
        hu_volume = np.stack(slices)
    else:
        hu_volume = volume if len(kept) == n else volume[: len(kept)].copy()
    del volume, slices

    first = kept[0][1]
    orientation = first.orientation
    xyz = [m.position for _, m in kept]
    positions = [float(i) for i in range(len(kept))]
    if orientation is not None and all(p is not None for p in xyz):
        normal = slice_normal(orientation)
        along = [float(np.dot(normal, p)) for p in xyz]  # type: ignore[arg-type]
        if all(b > a for a, b in itertools.pairwise(along)):
            positions = along
            warnings += geometry_warnings(positions, orientation, xyz, f"series {info.key}")  # type: ignore[arg-type]
        else:
            warnings.append(
                f"series {info.key}: slice positions changed since the scan; "
                "positions replaced by slice numbers"
            )
    spacing = first.spacing
    if spacing is None or not all(0 < s < 100 for s in spacing):
        what = "missing" if not first.has_spacing else "invalid"
        warnings.append(f"series {info.key}: PixelSpacing {what}; 1 mm assumed")
        spacing = (1.0, 1.0)
    thick_raw = first.thickness
    thickness = thick_raw[0] if thick_raw and 0 < thick_raw[0] < 1000 else None
    if thickness is None and first.thickness_text:
        warnings.append(f"series {info.key}: SliceThickness invalid; thickness unknown")
    return CTSeries(
        hu=hu_volume,
        pixel_spacing=(spacing[0], spacing[1]),
        positions=tuple(positions),
        slice_thickness=thickness,
        orientation=orientation,
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        sop_uids=tuple(m.sop_uid for _, m in kept),
        files=tuple(f for f, _ in kept),
        metadata=dict(info.metadata),
        warnings=tuple(warnings),
        key=info.key,
    )


def load_study(
    paths: Iterable[Path | str] | Path | str,
    warn: WarnFn | None = None,
) -> list[CTSeries]:
    """Scan ``paths`` and load every series found (those that fail are warned about)."""
    out = []
    for info in scan(paths, warn):
        try:
            out.append(load_series(info))
        except SeriesLoadError as exc:
            log.warning("%s", exc)
            if warn is not None:
                warn(str(exc))
    return out


def analyzability(series: CTSeries | SeriesInfo, min_slices: int = MIN_SLICES) -> list[str]:
    """Reasons why the model cannot read this series as trained (empty list: it can):
    not CT, not axial, or fewer than ``min_slices`` slices. Gantry tilt, gaps and uneven
    spacing are warnings of the series instead; the model still reads those."""
    reasons = []
    modality = series.modality.strip()
    if modality and modality.upper() != "CT":
        reasons.append(f"modality {_code(modality)}, the model reads CT only")
    elif not modality:
        sop_class = series.metadata.get("SOPClassUID", "")
        if sop_class and sop_class not in _CT_SOP_CLASSES:
            reasons.append("no Modality and not a CT storage class; the model reads CT only")
    orientation = series.orientation
    if orientation is not None:
        try:
            axial = is_axial(orientation)
        except ValueError:
            reasons.append("ImageOrientationPatient is degenerate; the plane is unknown")
        else:
            if not axial:
                reasons.append("not an axial series (a sagittal, coronal or oblique reformat)")
    if series.n_slices < min_slices:
        reasons.append(f"only {series.n_slices} slice(s), fewer than {min_slices}")
    return reasons


def scored_on_request(reasons: Sequence[str]) -> str:
    """The warning a series not analyzable keeps when the user has it scored anyway."""
    return "not analyzable, scored on request: " + "; ".join(reasons)


def with_warning(series: CTSeries, message: str) -> CTSeries:
    """A copy of the series with one more warning."""
    return replace(series, warnings=(*series.warnings, message))
