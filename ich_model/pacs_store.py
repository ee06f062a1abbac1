"""The local store that studies from a PACS land in, and the SOP classes we exchange.

Layout: ``<store>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Whatever a
reader finds there is whole: a retrieval is received into ``.partial-<pid>-<id>/`` and its
series are renamed into place only after the PACS reported every instance sent; the listener
receives pushed series into ``.incoming/`` and moves a series into place once it is complete.
Every file is written under a temporary name and renamed, so no reader ever sees half a file.

UIDs come from the network and are untrusted: one that is not a plain UID (a ``../`` or a
path separator in it, say) is never used as a file name; a hash of it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
INCOMING = ".incoming"
SUFFIX = ".dcm"
#: Longest name we take from a UID as it is (PS3.5 allows 64 characters).
_MAX_NAME = 128
_SAFE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*")

#: What a C-GET asks the PACS to send: the CT we score, and the results a second opinion
#: leaves in a study (ours and others'): secondary captures, structured reports, key object
#: selections and presentation states. Anything else in a study fails its sub-operation and
#: the retrieval is reported partial; C-MOVE to the listener takes every storage class.
RETRIEVE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    SecondaryCaptureImageStorage,
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    ComprehensiveSRStorage,
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
)
#: Transfer syntaxes we accept in a C-GET: uncompressed, and the lossless compressions
#: ``ich_model.dicom_io`` decodes (so the PACS need not transcode what it archived).
RETRIEVE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def safe_name(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when it is harmless, else its hash."""
    uid = str(uid).strip().rstrip("\0")
    if len(uid) <= _MAX_NAME and _SAFE_NAME.fullmatch(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where one instance lives under ``root`` (a store, a partial or the incoming folder)."""
    return root / safe_name(study_uid) / safe_name(series_uid) / (safe_name(sop_uid) + SUFFIX)


def study_folder(store: Path, study_uid: str) -> Path:
    return Path(store) / safe_name(study_uid)


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(store: Path) -> int:
    """Remove the partial folders of processes that died mid-transfer; returns how many.

    A partial folder is named after its process, so one still being written by another
    thread or process is left alone.
    """
    removed = 0
    try:
        entries = list(Path(store).iterdir())
    except OSError:
        return 0
    for p in entries:
        if not (p.name.startswith(PARTIAL_PREFIX) and p.is_dir()):
            continue
        pid_text = p.name[len(PARTIAL_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d partial transfer(s) left by stopped processes in %s", removed, store)
    return removed


@contextlib.contextmanager
def partial_folder(store: Path) -> Iterator[Path]:
    """A fresh folder inside ``store`` for one transfer, removed on exit whatever happens."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    sweep_partials(store)
    folder = store / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst``; an existing ``dst`` is swapped out and then deleted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        try:
            os.rename(src, dst)
            return
        except OSError:
            if not dst.exists():
                raise
    old = dst.with_name(f".old-{dst.name}-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def commit_series(received: Path, store: Path) -> list[Path]:
    """Move every ``<study>/<series>`` folder under ``received`` into ``store``.

    Each series folder is renamed as a whole (one atomic step on one file system); a series
    already in the store is replaced, since what the PACS just sent is its current content.
    Returns the series folders in the store.
    """
    out: list[Path] = []
    for study in sorted(p for p in Path(received).iterdir() if p.is_dir()):
        for series in sorted(p for p in study.iterdir() if p.is_dir()):
            dst = Path(store) / study.name / series.name
            _replace_dir(series, dst)
            out.append(dst)
    return out


def merge_series(incoming: Path, dst: Path) -> None:
    """Move the files of an incoming series folder into its store folder, file by file.

    Used by the listener, where a series may arrive in several pushes: files already in
    the store stay, instances sent again replace theirs (each rename is atomic).
    """
    if not dst.exists():
        _replace_dir(incoming, dst)
        return
    for f in sorted(incoming.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            os.replace(f, dst / f.name)
    shutil.rmtree(incoming, ignore_errors=True)


def is_uncompressed(transfer_syntax: str) -> bool:
    return UID(transfer_syntax) in UNCOMPRESSED
