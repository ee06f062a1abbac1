"""A corpus of broken and hostile DICOM input, with the outcome the loader promises for each.

Every :class:`Case` writes one problem into an empty folder, usually next to (or inside) a
small valid phantom series (64 x 64, five slices), and returns the file the problem is in.
``tests/test_robustness.py`` checks each outcome, ``docs/INPUT_HANDLING.md`` documents it,
and other tests (batch scoring, the viewer) can reuse the corpus through :func:`write_case`
or :func:`write_corpus`.

Outcomes (see :class:`Outcome`): a file is *left out* when scanning (a warning names it and
the reason; the rest of its series loads), a *slice left out* when decoding, a series is
*loaded with a warning*, *loaded* as is, becomes a *separate series*, is *not analyzable*
(it loads, but ``analyzability`` says why the model must not score it), or is *refused*
(``load_series`` raises ``SeriesLoadError`` naming the files and the reason).

Everything is deterministic: phantom UIDs come from the seed, new UIDs from the case name.
"""

from __future__ import annotations

import enum
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from ich_model.phantom import PhantomSpec, write_series

#: Distinctive identifiers: tests assert they never reach a warning or a log record.
PATIENT_NAME = "Zyxwvutsrq^Qponmlkj"
PATIENT_ID = "PRIVATE-ID-424242"
BASE_MATRIX = 64
BASE_SLICES = 5


class Outcome(enum.StrEnum):
    LEFT_OUT = "left out"  # when scanning: not in any series, a scan or series warning
    SLICE_LEFT_OUT = "slice left out"  # when decoding: not in the CTSeries, a series warning
    LOADED_WITH_WARNING = "loaded with a warning"
    LOADED = "loaded"  # nothing the model or the user needs to know
    SEPARATE_SERIES = "separate series"  # split from its SeriesInstanceUID, with a warning
    NOT_ANALYZABLE = "not analyzable"  # loads; analyzability() gives the reason
    REFUSED = "refused"  # load_series raises SeriesLoadError


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # one line for the documentation table
    outcome: Outcome
    reason: str  # words the message must contain
    write: Callable[[Path, str, str], Path]  # (folder, patient name, patient id) -> bad file


# ----------------------------------------------------------------------------- helpers


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_000


def good_series(
    folder: Path,
    seed: int = 0,
    n: int = BASE_SLICES,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
) -> list[Path]:
    """A valid phantom series (64 x 64) with the given identifiers."""
    spec = PhantomSpec.for_matrix(BASE_MATRIX, n_slices=n, seed=seed)
    return list(write_series(folder, spec, patient_id=patient_id, patient_name=patient_name).files)


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Set an element's bytes as they are, bypassing pydicom's value checks."""
    if len(value) % 2:
        value += b" " if vr not in ("OB", "OW", "UN", "UI") else b"\0"
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _edit(src: Path, dst: Path, fn: Callable[[Dataset], None], new_sop: str = "") -> Path:
    """A copy of ``src`` with ``fn`` applied (and a new SOP Instance UID if ``new_sop``)."""
    ds = pydicom.dcmread(src)
    if new_sop:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(new_sop)
    fn(ds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def _in_place(path: Path, fn: Callable[[Dataset], None]) -> Path:
    return _edit(path, path, fn)


def _base(folder: Path, name: str, pn: str, pid: str, n: int = BASE_SLICES) -> list[Path]:
    return good_series(folder / "series", _seed(name), n, pn, pid)


def _compressed(path: Path, syntax: UID) -> bytes:
    """The single fragment of ``path`` compressed with ``syntax`` (written back to ``path``)."""
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def _replace_fragment(path: Path, frame: bytes) -> Path:
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([frame])
    ds.save_as(path)
    return path


def _corrupt_fragment(path: Path, syntax: UID, seed: int) -> Path:
    """Compress a slice, then overwrite bytes that the decoder cannot do without: the coding
    style marker (COD) of a JPEG 2000 stream, the segment offsets and data of an RLE one.

    (Noise in the entropy-coded data of JPEG 2000 often decodes without an error to a wrong
    image: no loader can tell, see docs/INPUT_HANDLING.md.)"""
    frag = bytearray(_compressed(path, syntax))
    rng = np.random.default_rng(seed)
    if syntax == RLELossless:
        lo, hi = 4, len(frag)  # keep the segment count
    else:
        lo = frag.find(b"\xff\x52") + 2
        hi = lo + 12
    frag[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    return _replace_fragment(path, bytes(frag))


def _set_ts(path: Path, new: str) -> None:
    """Rewrite the TransferSyntaxUID in the file meta, leaving the data set bytes as they are."""
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    meta = pydicom.filereader.read_file_meta_info(path)
    meta.TransferSyntaxUID = new
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(raw[:128] + b"DICM" + buf.getvalue() + raw[meta_end:])


# ----------------------------------------------------------------------------- cases
# Each writer: (folder, patient name, patient id) -> the file that carries the problem.


def _zero_byte(d: Path, pn: str, pid: str) -> Path:
    _base(d, "zero", pn, pid)
    (d / "empty.dcm").write_bytes(b"")
    return d / "empty.dcm"


def _truncated_header(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "trunc-header", pn, pid)
    out = d / "truncated_header.dcm"
    out.write_bytes(files[0].read_bytes()[:300])
    return out


def _truncated_pixels(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "trunc-pixels", pn, pid)
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) - 1000])
    return files[2]


def _jpeg_named_dcm(d: Path, pn: str, pid: str) -> Path:
    _base(d, "jpeg", pn, pid)
    ok, buf = cv2.imencode(".jpg", np.full((64, 64), 128, np.uint8))
    assert ok
    (d / "photo.dcm").write_bytes(buf.tobytes())
    return d / "photo.dcm"


def _text_named_dcm(d: Path, pn: str, pid: str) -> Path:
    _base(d, "text", pn, pid)
    (d / "notes.dcm").write_text("Not a DICOM file: a note someone saved as .dcm\n" * 40)
    return d / "notes.dcm"


def _no_pixel_data(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "nopix", pn, pid)
    return _edit(files[1], d / "nopixels.dcm", lambda ds: ds.pop("PixelData"), "nopix")


def _as_mr(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.SeriesInstanceUID = _uid("mr-series")
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
        ds.pop(kw, None)


def _mr_series(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "mr", pn, pid)
    for k, f in enumerate(files):
        _edit(f, d / "mr" / f.name, _as_mr, f"mr-{k}")
    return d / "mr" / files[0].name


def _non_image(sop_class: str, modality: str, name: str) -> Callable[[Path, str, str], Path]:
    def write(d: Path, pn: str, pid: str) -> Path:
        files = _base(d, name, pn, pid)

        def fn(ds: Dataset) -> None:
            ds.pop("PixelData")
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.Modality = modality
            ds.SeriesInstanceUID = _uid(name, "series")

        return _edit(files[0], d / f"{name}.dcm", fn, name)

    return write


def _localizer_in_series(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "scout", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    return _edit(files[0], d / "series" / "scout.dcm", fn, "scout")


def _odd_matrix(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "odd-matrix", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.PixelData = ds.pixel_array[::2, ::2].astype("<i2").tobytes()
        ds.Rows = ds.Columns = 32
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], 500.0]

    return _edit(files[0], d / "series" / "odd_matrix.dcm", fn, "odd-matrix")


def _odd_orientation(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "odd-orient", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal

    return _edit(files[0], d / "series" / "coronal.dcm", fn, "odd-orient")


def _duplicate_position(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "dup-pos", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.InstanceNumber = 99  # a re-sent copy: the original (lower InstanceNumber) is kept

    return _edit(files[2], d / "resent.dcm", fn, "dup-pos")


def _duplicate_file(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "dup-file", pn, pid)
    out = d / "zz_copy" / files[2].name
    out.parent.mkdir()
    shutil.copy(files[2], out)
    return out


def _missing_ipp(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "no-ipp", pn, pid)
    return _in_place(files[2], lambda ds: ds.pop("ImagePositionPatient"))


def _no_ipp_anywhere(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "no-ipp-all", pn, pid)
    for f in files:
        _in_place(f, lambda ds: ds.pop("ImagePositionPatient"))
    return files[0]


def _gantry_tilt(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "tilt", pn, pid)
    shear = float(np.tan(np.radians(15.0)))

    def fn(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + shear * z, 4), z]

    for f in files:
        _in_place(f, fn)
    return files[0]


def _missing_slice(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "gap", pn, pid)
    files[2].unlink()
    return files[0]


def _rgb(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "rgb", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.zeros((64, 64, 3), np.uint8).tobytes()

    return _edit(files[0], d / "series" / "rgb.dcm", fn, "rgb")


def _matrix(rows: int, name: str) -> Callable[[Path, str, str], Path]:
    def write(d: Path, pn: str, pid: str) -> Path:
        files = _base(d, name, pn, pid)

        def fn(ds: Dataset) -> None:
            ds.Rows = ds.Columns = rows

        return _edit(files[0], d / "series" / f"{name}.dcm", fn, name)

    return write


def _ts_says_jpeg_holds_raw(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "ts-jpeg-raw", pn, pid)
    _set_ts(files[2], JPEGLosslessSV1)
    return files[2]


def _ts_says_native_holds_j2k(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "ts-native-j2k", pn, pid)
    _compressed(files[2], JPEG2000Lossless)
    _set_ts(files[2], ExplicitVRLittleEndian)
    return files[2]


def _big_endian_says_little(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "ts-endian", pn, pid)
    ds = pydicom.dcmread(files[2])
    ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(files[2], ds, implicit_vr=False, little_endian=False, force_encoding=True)
    _set_ts(files[2], ExplicitVRLittleEndian)
    return files[2]


def _byte_swapped_pixels(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "swapped", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()

    return _in_place(files[2], fn)


def _corrupt(syntax: UID, name: str) -> Callable[[Path, str, str], Path]:
    def write(d: Path, pn: str, pid: str) -> Path:
        files = _base(d, name, pn, pid)
        return _corrupt_fragment(files[2], syntax, _seed(name))

    return write


def _corrupt_every_slice(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "corrupt-all", pn, pid)
    for k, f in enumerate(files):
        _corrupt_fragment(f, JPEG2000Lossless, k)
    return files[0]


def _jpegls_cut_short(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "cut-jpegls", pn, pid)
    frame = _compressed(files[2], JPEGLSLossless)
    return _replace_fragment(files[2], frame[: len(frame) // 2])


def _j2k_declares_huge_image(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "j2k-huge", pn, pid)
    frag = bytearray(_compressed(files[2], JPEG2000Lossless))
    siz = frag.find(b"\xff\x4f\xff\x51") + 2
    frag[siz + 6 : siz + 14] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    return _replace_fragment(files[2], bytes(frag))


def _jpeg_declares_huge_image(d: Path, pn: str, pid: str) -> Path:
    """An 8-bit baseline JPEG slice whose frame header (SOF0) says 65000 x 65000."""
    files = _base(d, "jpeg-huge", pn, pid)
    ok, buf = cv2.imencode(".jpg", np.full((64, 64), 100, np.uint8))
    assert ok
    jpg = bytearray(buf.tobytes())
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2

    def fn(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([bytes(jpg)])

    return _in_place(files[2], fn)


def _no_file_meta(d: Path, pn: str, pid: str) -> Path:
    """Implicit VR little endian without preamble or file meta, as old archives write."""
    files = _base(d, "no-meta", pn, pid)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(f, ds, implicit_vr=True, little_endian=True)
    return files[0]


def _unknown_ts(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "ts-unknown", pn, pid)
    _set_ts(files[2], "1.2.3.4.5.6.7.8.9.1")
    return files[2]


def _latin1_name(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "latin1", pn, pid)

    def fn(ds: Dataset) -> None:
        ds.pop("SpecificCharacterSet", None)
        _raw(ds, "PatientName", "PN", (pn + "^Müller").encode("latin-1"))
        _raw(ds, "InstitutionName", "LO", "Hôpital Saint-Éloi".encode("latin-1"))

    for f in files:
        _in_place(f, fn)
    return files[0]


def _rsna_style_uids(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "rsna-uid", pn, pid)
    series = "ID_" + _uid("rsna")[-10:].replace(".", "")

    def fn(ds: Dataset) -> None:
        _raw(ds, "SeriesInstanceUID", "UI", series.encode())
        _raw(ds, "SOPInstanceUID", "UI", ("ID_" + ds.SOPInstanceUID[-12:]).encode())

    for f in files:
        _in_place(f, fn)
    return files[0]


def _unsafe_uid(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "uid-unsafe", pn, pid)
    return _in_place(
        files[2], lambda ds: _raw(ds, "SOPInstanceUID", "UI", b"1.2.3,4\nID_x_any,0.99")
    )


def _text_value(
    keyword: str, vr: str, value: bytes, every: bool, name: str
) -> Callable[[Path, str, str], Path]:
    def write(d: Path, pn: str, pid: str) -> Path:
        files = _base(d, name, pn, pid)
        for f in files if every else [files[2]]:
            _in_place(f, lambda ds: _raw(ds, keyword, vr, value))
        return files[0] if every else files[2]

    return write


def _huge_string(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "huge-string", pn, pid)
    big = b"CT HEAD " * 8000  # 64 000 bytes: the most an explicit-VR LO can hold
    for f in files:
        _in_place(f, lambda ds: _raw(ds, "SeriesDescription", "LO", big))
    return files[0]


def _zero_orientation(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "iop-zero", pn, pid)
    return _in_place(
        files[2], lambda ds: _raw(ds, "ImageOrientationPatient", "DS", b"0\\0\\0\\0\\0\\0")
    )


def _sagittal_series(d: Path, pn: str, pid: str) -> Path:
    files = _base(d, "sagittal", pn, pid)

    def fn(ds: Dataset) -> None:
        _x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [z, y, 100.0]

    for f in files:
        _in_place(f, fn)
    return files[0]


def _deflate_bomb(d: Path, pn: str, pid: str) -> Path:
    """A 250 kB slice whose deflated data set expands to 256 MB (a real slice, then zeros)."""
    files = _base(d, "deflate", pn, pid)
    out = d / "series" / "bomb.dcm"
    _edit(files[0], out, lambda ds: None, "deflate")
    raw = out.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [z.compress(raw[meta_end:])]
    chunk = bytes(2**24)
    body += [z.compress(chunk) for _ in range(16)]
    body.append(z.flush())
    out.write_bytes(raw[:meta_end] + b"".join(body))
    _set_ts(out, DeflatedExplicitVRLittleEndian)
    return out


def _set_numeric(**values: object) -> Callable[[Dataset], None]:
    def fn(ds: Dataset) -> None:
        for k, v in values.items():
            setattr(ds, k, v)

    return fn


def _header_edit(name: str, fn: Callable[[Dataset], None]) -> Callable[[Path, str, str], Path]:
    def write(d: Path, pn: str, pid: str) -> Path:
        files = _base(d, name, pn, pid)
        return _in_place(files[2], fn)

    return write


CASES: tuple[Case, ...] = (
    Case("zero_byte", "a zero-byte file", Outcome.LEFT_OUT, "empty file", _zero_byte),
    Case(
        "truncated_header",
        "the first 300 bytes of a slice (header cut short)",
        Outcome.LEFT_OUT,
        "file truncated",
        _truncated_header,
    ),
    Case(
        "truncated_pixels",
        "a slice whose pixel data is cut 1000 bytes short",
        Outcome.LEFT_OUT,
        "file truncated: PixelData needs 8192 bytes, 7192 left",
        _truncated_pixels,
    ),
    Case(
        "jpeg_named_dcm",
        "a JPEG photo saved as .dcm",
        Outcome.LEFT_OUT,
        "not a DICOM file",
        _jpeg_named_dcm,
    ),
    Case(
        "text_named_dcm",
        "a text file saved as .dcm",
        Outcome.LEFT_OUT,
        "not a DICOM file",
        _text_named_dcm,
    ),
    Case(
        "no_pixel_data",
        "a CT header without pixel data",
        Outcome.LEFT_OUT,
        "no pixel data",
        _no_pixel_data,
    ),
    Case(
        "mr_series",
        "an MR series (MR Image Storage, Modality MR)",
        Outcome.NOT_ANALYZABLE,
        "modality MR",
        _mr_series,
    ),
    Case(
        "structured_report",
        "a Structured Report (SR) document",
        Outcome.LEFT_OUT,
        "structured report",
        _non_image("1.2.840.10008.5.1.4.1.1.88.22", "SR", "sr"),
    ),
    Case(
        "presentation_state",
        "a grayscale softcopy presentation state",
        Outcome.LEFT_OUT,
        "presentation state",
        _non_image("1.2.840.10008.5.1.4.1.1.11.1", "PR", "pr"),
    ),
    Case(
        "localizer_in_series",
        "a localizer (ImageType LOCALIZER) inside the CT series",
        Outcome.LEFT_OUT,
        "localizer",
        _localizer_in_series,
    ),
    Case(
        "odd_matrix_slice",
        "one 32 x 32 slice in a 64 x 64 series",
        Outcome.SEPARATE_SERIES,
        "split into 2 series",
        _odd_matrix,
    ),
    Case(
        "odd_orientation_slice",
        "one coronal slice in an axial series",
        Outcome.SEPARATE_SERIES,
        "split into 2 series",
        _odd_orientation,
    ),
    Case(
        "duplicate_position",
        "a second slice at the same position (new SOP Instance UID)",
        Outcome.LEFT_OUT,
        "duplicate slice position",
        _duplicate_position,
    ),
    Case(
        "duplicate_file",
        "the same file twice (same SOP Instance UID)",
        Outcome.LEFT_OUT,
        "duplicate SOP Instance UID",
        _duplicate_file,
    ),
    Case(
        "missing_position",
        "one slice without ImagePositionPatient",
        Outcome.LEFT_OUT,
        "no usable ImagePositionPatient",
        _missing_ipp,
    ),
    Case(
        "no_positions",
        "a series without ImagePositionPatient on any slice",
        Outcome.LOADED_WITH_WARNING,
        "sorted by InstanceNumber",
        _no_ipp_anywhere,
    ),
    Case(
        "gantry_tilt",
        "a series acquired with 15 degrees gantry tilt",
        Outcome.LOADED_WITH_WARNING,
        "gantry tilt of 15.0 degrees",
        _gantry_tilt,
    ),
    Case(
        "missing_slice",
        "a series with one slice missing",
        Outcome.LOADED_WITH_WARNING,
        "1 gap(s)",
        _missing_slice,
    ),
    Case("rgb", "an RGB image", Outcome.LEFT_OUT, "3 samples per pixel", _rgb),
    Case(
        "enormous_matrix",
        "Rows = Columns = 65535 with 8 kB of pixel data",
        Outcome.LEFT_OUT,
        "matrix 65535 x 65535",
        _matrix(65535, "enormous"),
    ),
    Case(
        "matrix_exceeds_data",
        "Rows = Columns = 4096 with 8 kB of pixel data",
        Outcome.LEFT_OUT,
        "needs 33554432",
        _matrix(4096, "bigger-matrix"),
    ),
    Case(
        "data_exceeds_matrix",
        "Rows = Columns = 32 with 64 x 64 pixels of data",
        Outcome.LEFT_OUT,
        "needs 2048",
        _matrix(32, "smaller-matrix"),
    ),
    Case(
        "ts_compressed_holds_raw",
        "transfer syntax JPEG Lossless, pixel data raw",
        Outcome.LEFT_OUT,
        "not encapsulated",
        _ts_says_jpeg_holds_raw,
    ),
    Case(
        "ts_native_holds_compressed",
        "transfer syntax explicit little endian, pixel data JPEG 2000 fragments",
        Outcome.LEFT_OUT,
        "encapsulated",
        _ts_says_native_holds_j2k,
    ),
    Case(
        "ts_little_holds_big_endian",
        "transfer syntax explicit little endian, data set big endian",
        Outcome.LEFT_OUT,
        "big-endian byte order",
        _big_endian_says_little,
    ),
    Case(
        "byte_swapped_pixels",
        "pixel values in the wrong byte order (header says little endian)",
        Outcome.SLICE_LEFT_OUT,
        "implausible CT values",
        _byte_swapped_pixels,
    ),
    Case(
        "corrupt_jpeg2000",
        "a JPEG 2000 slice with noise over its coding-style header (COD)",
        Outcome.SLICE_LEFT_OUT,
        "cannot decode pixels",
        _corrupt(JPEG2000Lossless, "corrupt-j2k"),
    ),
    Case(
        "corrupt_rle",
        "an RLE slice whose segment offsets and data are noise",
        Outcome.SLICE_LEFT_OUT,
        "cannot decode pixels",
        _corrupt(RLELossless, "corrupt-rle"),
    ),
    Case(
        "corrupt_every_slice",
        "a series whose every JPEG 2000 stream is corrupt",
        Outcome.REFUSED,
        "could be decoded",
        _corrupt_every_slice,
    ),
    Case(
        "jpegls_cut_short",
        "a JPEG-LS slice whose stream stops half-way (pylibjpeg would decode it, wrongly)",
        Outcome.SLICE_LEFT_OUT,
        "ends before its end marker",
        _jpegls_cut_short,
    ),
    Case(
        "j2k_declares_huge_image",
        "a JPEG 2000 stream whose header (SIZ) says 60000 x 60000",
        Outcome.SLICE_LEFT_OUT,
        "the JPEG 2000 stream is 60000 x 60000",
        _j2k_declares_huge_image,
    ),
    Case(
        "jpeg_declares_huge_image",
        "a baseline JPEG stream whose frame header (SOF) says 65000 x 65000",
        Outcome.SLICE_LEFT_OUT,
        "the JPEG stream is 65000 x 65000",
        _jpeg_declares_huge_image,
    ),
    Case(
        "no_file_meta",
        "implicit VR files without preamble and file meta (old archives)",
        Outcome.LOADED,
        "",
        _no_file_meta,
    ),
    Case(
        "unknown_transfer_syntax",
        "an unknown TransferSyntaxUID",
        Outcome.LEFT_OUT,
        "transfer syntax",
        _unknown_ts,
    ),
    Case(
        "deflate_bomb",
        "deflated data set that would expand to 256 MB",
        Outcome.LEFT_OUT,
        "deflated data set",
        _deflate_bomb,
    ),
    Case(
        "latin1_without_charset",
        "PatientName, InstitutionName in latin-1 without SpecificCharacterSet",
        Outcome.LOADED,
        "",
        _latin1_name,
    ),
    Case(
        "rsna_style_uids",
        'non-standard but harmless UIDs ("ID_1234abcd", as in the RSNA data)',
        Outcome.LOADED,
        "",
        _rsna_style_uids,
    ),
    Case(
        "unsafe_uid",
        "a SOPInstanceUID with a comma and a line break",
        Outcome.LEFT_OUT,
        "invalid SOPInstanceUID",
        _unsafe_uid,
    ),
    Case(
        "text_slice_thickness",
        'SliceThickness "thick" on every slice',
        Outcome.LOADED_WITH_WARNING,
        "SliceThickness",
        _text_value("SliceThickness", "DS", b"thick", True, "thick"),
    ),
    Case(
        "text_pixel_spacing",
        'PixelSpacing "a\\b" on every slice',
        Outcome.LOADED_WITH_WARNING,
        "PixelSpacing",
        _text_value("PixelSpacing", "DS", b"a\\b", True, "spacing"),
    ),
    Case(
        "text_position",
        'ImagePositionPatient "x\\y\\z" on one slice',
        Outcome.LEFT_OUT,
        "no usable ImagePositionPatient",
        _text_value("ImagePositionPatient", "DS", b"x\\y\\z", False, "ipp-text"),
    ),
    Case(
        "nan_position",
        'ImagePositionPatient "nan\\nan\\nan" on one slice',
        Outcome.LEFT_OUT,
        "no usable ImagePositionPatient",
        _text_value("ImagePositionPatient", "DS", b"nan\\nan\\nan", False, "ipp-nan"),
    ),
    Case(
        "zero_orientation",
        "ImageOrientationPatient all zeros on one slice",
        Outcome.LEFT_OUT,
        "no usable ImageOrientationPatient",
        _zero_orientation,
    ),
    Case(
        "multivalued_intercept",
        'RescaleIntercept "-1024\\0" on one slice',
        Outcome.LEFT_OUT,
        "RescaleIntercept",
        _text_value("RescaleIntercept", "DS", b"-1024\\0", False, "intercept"),
    ),
    Case(
        "nan_slope",
        'RescaleSlope "nan" on one slice',
        Outcome.LEFT_OUT,
        "RescaleSlope",
        _text_value("RescaleSlope", "DS", b"nan", False, "slope"),
    ),
    Case(
        "bits_allocated_12",
        "BitsAllocated 12",
        Outcome.LEFT_OUT,
        "BitsAllocated 12",
        _header_edit("bits12", _set_numeric(BitsAllocated=12)),
    ),
    Case(
        "multi_frame",
        "NumberOfFrames 2",
        Outcome.LEFT_OUT,
        "multi-frame",
        _header_edit("frames", _set_numeric(NumberOfFrames=2)),
    ),
    Case(
        "huge_string",
        "a 64 kB SeriesDescription on every slice",
        Outcome.LOADED,
        "",
        _huge_string,
    ),
    Case(
        "sagittal_series",
        "a sagittal reformat",
        Outcome.NOT_ANALYZABLE,
        "not an axial series",
        _sagittal_series,
    ),
)

CASES_BY_NAME = {c.name: c for c in CASES}


def write_case(
    name: str, folder: Path, patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID
) -> Path:
    """Write case ``name`` into ``folder`` (created); returns the file with the problem."""
    folder.mkdir(parents=True, exist_ok=True)
    return CASES_BY_NAME[name].write(folder, patient_name, patient_id)


def write_corpus(folder: Path) -> dict[str, Path]:
    """Every case in its own subfolder of ``folder``; UIDs differ between cases."""
    return {c.name: write_case(c.name, folder / c.name) for c in CASES}
