"""Seeded mutation fuzzing of the loader: thousands of damaged versions of small valid files
go through ``scan`` + ``load_series`` + ``analyzability``. Only warnings and
``SeriesLoadError`` may come out; no case may take more than 5 s or allocate much memory;
no message may name the patient. Deterministic: case ``k`` is rebuilt from ``SEED + k``,
so a failure report (case number, mutations) reproduces with ``mutate(seed_file, k)``.
"""

from __future__ import annotations

import faulthandler
import logging
import resource
import struct
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from ich_model.dicom_io import analyzability, hide_pydicom_charset_values, load_series, scan
from ich_model.series import SeriesLoadError
from tests.badinput import PATIENT_ID, PATIENT_NAME, good_series

SEED = 20260801
CASES_PER_SEED = 400  # six seed files: 2400 cases
MAX_SECONDS_PER_CASE = 5.0
HANG_SECONDS = 60.0  # a case still running then is a hang: the test process exits
MAX_CASE_PEAK_MB = 200  # traced (Python and numpy) allocations of one case
MAX_RSS_GROWTH_MB = 500

_EXPLICIT_32 = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"}
_EXPLICIT_32 |= {b"UT", b"UV"}
#: Tags whose values steer the loader: geometry, pixel module, rescale, identity, encoding.
_TARGETS = {
    0x00020010,  # TransferSyntaxUID
    0x00080005,  # SpecificCharacterSet
    0x00080008,  # ImageType
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x00180050,  # SliceThickness
    0x0020000E,  # SeriesInstanceUID
    0x00200013,  # InstanceNumber
    0x00200032,  # ImagePositionPatient
    0x00200037,  # ImageOrientationPatient
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280030,  # PixelSpacing
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280102,  # HighBit
    0x00280103,  # PixelRepresentation
    0x00281052,  # RescaleIntercept
    0x00281053,  # RescaleSlope
    0x7FE00010,  # PixelData
    0xFFFEE000,  # Item (fragments)
}
_TEXT_VALUES = [
    b"",
    b"nan",
    b"inf",
    b"-inf",
    b"1e400",
    b"-1e308",
    b"0",
    b"-0",
    b"abc",
    b"1\\2\\3\\4\\5\\6\\7\\8",
    b"0\\0\\0\\0\\0\\0",
    b"1\\0\\0\\0\\0\\-1",
    b"-1e5\\1e5\\1e5",
    b"1e-300\\1e-300",
    b"\xff\xfe\xfd\xfc",
    b"\x00\x00\x00\x00",
    b"9" * 60,
    b"1.2.840.10008.1.2.4.90",
    b"1.2.840.10008.1.2.1.99",
    b"1.2.840.10008.1.2.2",
    b"1.2.840.10008.1.2.5",
    b"1.2.840.10008.1.2.4.50",
    b"1.2.840.10008.5.1.4.1.1.88.11",
    b"ISO_IR 192",
    b"ISO 2022 IR 87\\ISO 2022 IR 159",
    b"ORIGINAL\\PRIMARY\\LOCALIZER",
    b"MR",
    b"RGB",
    b"PALETTE COLOR",
    b"a,b\nc",
]
_BINARY_VALUES = [b"\x00\x00", b"\x01\x00", b"\xff\xff", b"\x00\x80", b"\x10\x00", b"\x20\x00"]
_BINARY_VALUES += [b"\x07", b"\x00\x10\x00", b"\x00\x00\x00\x00"]
_LENGTHS = [0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@dataclass(frozen=True)
class _Elem:
    tag: int
    tag_at: int
    vr_at: int | None  # None: implicit VR or an item
    len_at: int
    len_size: int
    value_at: int
    length: int


def _walk(raw: bytes, start: int, implicit: bool) -> list[_Elem]:
    """The elements of a file, top level and the items (fragments) of undefined-length values."""
    out: list[_Elem] = []
    pos = start
    while pos + 8 <= len(raw):
        group, element = struct.unpack_from("<HH", raw, pos)
        tag = group << 16 | element
        vr = raw[pos + 4 : pos + 6]
        if (implicit and group != 0x0002) or group == 0xFFFE:
            length = struct.unpack_from("<I", raw, pos + 4)[0]
            e = _Elem(tag, pos, None, pos + 4, 4, pos + 8, length)
        elif vr in _EXPLICIT_32:
            length = struct.unpack_from("<I", raw, pos + 8)[0]
            e = _Elem(tag, pos, pos + 4, pos + 8, 4, pos + 12, length)
        else:
            length = struct.unpack_from("<H", raw, pos + 6)[0]
            e = _Elem(tag, pos, pos + 4, pos + 6, 2, pos + 8, length)
        out.append(e)
        pos = e.value_at if length == 0xFFFFFFFF else e.value_at + length
    return out


@dataclass(frozen=True)
class SeedFile:
    name: str
    raw: bytes
    elems: list[_Elem]


def _seed_files(folder: Path) -> tuple[list[SeedFile], list[Path]]:
    """Six small valid slices in different encodings, and two neighbours of their series."""
    files = good_series(folder / "src", seed=77, n=3)
    out: list[SeedFile] = []

    def add(name: str, ds: pydicom.Dataset, implicit: bool = False, **kw: object) -> None:
        path = folder / f"{name}.dcm"
        ds.save_as(path, **kw)  # type: ignore[arg-type]
        raw = path.read_bytes()
        elems = _walk(raw, 0 if implicit else 132, implicit)
        out.append(SeedFile(name, raw, elems))

    add("native", pydicom.dcmread(files[1]))
    for syntax, name in ((JPEG2000Lossless, "j2k"), (RLELossless, "rle")):
        ds = pydicom.dcmread(files[1])
        ds.compress(syntax)
        add(name, ds)
    ds = pydicom.dcmread(files[1])
    ok, buf = cv2.imencode(".jpg", np.clip(ds.pixel_array // 8, 0, 255).astype(np.uint8))
    assert ok
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([buf.tobytes()])
    add("jpeg", ds)
    ds = pydicom.dcmread(files[1])
    del ds.file_meta
    ds.preamble = None
    path = folder / "implicit.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    raw = path.read_bytes()
    out.append(SeedFile("implicit", raw, _walk(raw, 0, True)))
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = folder / "deflated.dcm"
    ds.save_as(path)
    raw = path.read_bytes()
    out.append(SeedFile("deflated", raw, _walk(raw, 132, False)[:1]))  # meta only: rest is zlib
    return out, [files[0], files[2]]


# ----------------------------------------------------------------------------- mutations

Mutation = Callable[[bytearray, SeedFile, np.random.Generator], str]


def _flip_bytes(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 9))
    for p in rng.integers(0, len(b), n):
        b[p] ^= int(rng.integers(1, 256))
    return f"flip {n} bytes"


def _flip_bits(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 4))
    for p in rng.integers(0, len(b), n):
        b[p] ^= 1 << int(rng.integers(0, 8))
    return f"flip {n} bits"


def _truncate(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    at = int(rng.integers(0, len(b)))
    del b[at:]
    return f"truncate at {at}"


def _insert(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    at, n = int(rng.integers(0, len(b) + 1)), int(rng.integers(1, 65))
    b[at:at] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return f"insert {n} at {at}"


def _delete(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    at = int(rng.integers(0, len(b)))
    n = int(rng.integers(1, 65))
    del b[at : at + n]
    return f"delete {n} at {at}"


def _duplicate(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    at, n, to = (
        int(rng.integers(0, len(b))),
        int(rng.integers(1, 257)),
        int(rng.integers(0, len(b))),
    )
    b[to:to] = b[at : at + n]
    return f"copy {n} from {at} to {to}"


def _pick(s: SeedFile, b: bytearray, rng: np.random.Generator, targeted: bool) -> _Elem | None:
    elems = [e for e in s.elems if e.value_at <= len(b)]
    if targeted:
        elems = [e for e in elems if e.tag in _TARGETS] or elems
    return elems[int(rng.integers(0, len(elems)))] if elems else None


def _length(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    e = _pick(s, b, rng, bool(rng.integers(0, 2)))
    if e is None:
        return "no element"
    choices = [*_LENGTHS, e.length + 1, max(0, e.length - 1), e.length * 2, len(b)]
    new = int(choices[int(rng.integers(0, len(choices)))]) % (1 << (8 * e.len_size))
    b[e.len_at : e.len_at + e.len_size] = new.to_bytes(e.len_size, "little")
    return f"length of {e.tag:08X} -> {new}"


def _tag(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    e = _pick(s, b, rng, False)
    if e is None:
        return "no element"
    pool = sorted(_TARGETS | {0x00100010, 0x00100020, 0xFFFEE0DD, 0xFFFEE00D, 0x00091010})
    new = pool[int(rng.integers(0, len(pool)))]
    b[e.tag_at : e.tag_at + 4] = struct.pack("<HH", new >> 16, new & 0xFFFF)
    return f"tag {e.tag:08X} -> {new:08X}"


def _vr(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    elems = [e for e in s.elems if e.vr_at is not None and e.value_at <= len(b)]
    if not elems:
        return "no explicit VR"
    e = elems[int(rng.integers(0, len(elems)))]
    vrs = [b"SQ", b"UN", b"OB", b"US", b"DS", b"UI", b"\0\0", b"zz", b"FD", b"AT"]
    new = vrs[int(rng.integers(0, len(vrs)))]
    b[e.vr_at : e.vr_at + 2] = new  # type: ignore[operator]
    return f"VR of {e.tag:08X} -> {new!r}"


def _value(b: bytearray, s: SeedFile, rng: np.random.Generator) -> str:
    e = _pick(s, b, rng, True)
    if e is None or e.length == 0xFFFFFFFF:
        return "no value"
    binary = e.length in (2, 4) and e.tag >> 16 == 0x0028 and e.tag & 0xFFFF >= 0x0002
    pool = _BINARY_VALUES if binary and rng.integers(0, 4) else _TEXT_VALUES
    new = pool[int(rng.integers(0, len(pool)))]
    if len(new) % 2 and rng.integers(0, 4):
        new += b" "
    new = new[: (1 << (8 * e.len_size)) - 1]
    b[e.value_at : e.value_at + e.length] = new
    b[e.len_at : e.len_at + e.len_size] = len(new).to_bytes(e.len_size, "little")
    return f"value of {e.tag:08X} -> {new[:24]!r}"


MUTATIONS: list[Mutation] = [
    _flip_bytes,
    _flip_bits,
    _truncate,
    _insert,
    _delete,
    _duplicate,
    _length,
    _length,
    _tag,
    _vr,
    _value,
    _value,
    _value,
]


def mutate(seed: SeedFile, k: int) -> tuple[bytes, list[str]]:
    """Case ``k``: one to three mutations of ``seed``, all from ``SEED + k``."""
    rng = np.random.default_rng(SEED + k)
    b = bytearray(seed.raw)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        if not b:
            break
        op = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
        done.append(op(b, seed, rng))
    return bytes(b), done


# ----------------------------------------------------------------------------- the run


class _LeakCheck(logging.Handler):
    """Counts log records and keeps those that name the patient (records are not stored)."""

    def __init__(self, identifiers: set[str]) -> None:
        super().__init__(logging.DEBUG)
        self.identifiers = identifiers
        self.records = 0
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: not ours to judge
            return
        if any(i in text for i in self.identifiers):
            self.leaks.append(text[:300])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
def test_fuzz_scan_and_load(tmp_path: Path) -> None:
    seeds, neighbours = _seed_files(tmp_path / "seeds")
    birth = str(pydicom.dcmread(neighbours[0]).PatientBirthDate)
    identifiers = {PATIENT_NAME, PATIENT_ID, birth, *PATIENT_NAME.split("^")}
    alone, with_series = tmp_path / "alone", tmp_path / "series"
    alone.mkdir()
    with_series.mkdir()
    for f in neighbours:
        (with_series / f.name).write_bytes(f.read_bytes())

    leak_check = _LeakCheck(identifiers)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(leak_check)
    root.setLevel(logging.DEBUG)
    failures: list[str] = []
    times: list[float] = []
    peaks: list[float] = []
    outcomes = {"series loaded": 0, "series refused": 0, "file left out": 0}
    rss0, maxrss0 = _rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_max = rss0
    tracemalloc.start()
    t_start = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            for j in range(CASES_PER_SEED):
                k = i * CASES_PER_SEED + j
                data, ops = mutate(seed, k)
                folder = with_series if k % 3 == 0 else alone
                target = folder / "fuzzed.dcm"
                target.write_bytes(data)
                messages: list[str] = []
                tracemalloc.reset_peak()
                # a case stuck in a decoder (C code, out of reach of Python signals) must fail
                # CI, not hang it: the whole process exits with every thread's traceback
                faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings(record=True) as py_warnings:
                        warnings.simplefilter("always")
                        hide_pydicom_charset_values()
                        infos = scan(folder, messages.append)
                        for info in infos:
                            messages += info.warnings
                            try:
                                s = load_series(info)
                            except SeriesLoadError as exc:
                                messages.append(str(exc))
                                outcomes["series refused"] += 1
                                continue
                            outcomes["series loaded"] += 1
                            messages += list(s.warnings) + analyzability(s)
                            assert s.hu.ndim == 3 and s.hu.dtype == np.float32
                            assert np.isfinite(s.hu).all() and s.hu.min() >= -1024
                            assert len(s.positions) == s.n_slices
                        if not any(target in i.files for i in infos):
                            outcomes["file left out"] += 1
                            assert any(str(target) in m for m in messages), "left out silently"
                    messages += [str(w.message) for w in py_warnings]
                except (Exception, BaseException) as exc:  # report everything, do not stop
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    failures.append(f"case {k} ({seed.name}: {ops}): {type(exc).__name__}: {exc}")
                dt = time.perf_counter() - t0
                faulthandler.cancel_dump_traceback_later()
                times.append(dt)
                peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
                if k % 50 == 0:
                    rss_max = max(rss_max, _rss_mb())
                if dt > MAX_SECONDS_PER_CASE:
                    failures.append(f"case {k} ({seed.name}: {ops}) took {dt:.1f} s")
                leaked = [m for m in messages if any(x in m for x in identifiers)]
                if leaked:
                    failures.append(f"case {k} ({seed.name}: {ops}) names the patient: {leaked}")
    finally:
        faulthandler.cancel_dump_traceback_later()
        tracemalloc.stop()
        root.removeHandler(leak_check)
        root.setLevel(old_level)
    total = time.perf_counter() - t_start
    rss_max = max(rss_max, _rss_mb())
    maxrss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - maxrss0
    worst = int(np.argmax(times))
    print(
        f"\nfuzz: {len(times)} cases in {total:.1f} s; per case median "
        f"{1000 * float(np.median(times)):.1f} ms, max {max(times):.2f} s (case {worst}); "
        f"traced peak max {max(peaks):.1f} MB; RSS growth {rss_max - rss0:.0f} MB, "
        f"peak RSS growth {maxrss_growth:.0f} MB; {leak_check.records} log records; {outcomes}"
    )
    assert len(times) >= 2000
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
    assert not leak_check.leaks, leak_check.leaks[:5]
    assert max(peaks) < MAX_CASE_PEAK_MB
    assert rss_max - rss0 < MAX_RSS_GROWTH_MB and maxrss_growth < MAX_RSS_GROWTH_MB


def test_mutations_are_deterministic(tmp_path: Path) -> None:
    seeds, _ = _seed_files(tmp_path)
    assert [s.name for s in seeds] == ["native", "j2k", "rle", "jpeg", "implicit", "deflated"]
    for k in (0, 7, 1234):
        assert mutate(seeds[k % len(seeds)], k) == mutate(seeds[k % len(seeds)], k)
    # the walker finds the pixel data (and, when encapsulated, its fragments)
    assert any(e.tag == 0x7FE00010 for e in seeds[0].elems)
    assert any(e.tag == 0xFFFEE000 for e in seeds[1].elems)
