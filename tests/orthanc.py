"""A real Orthanc PACS for the tests, started in a temporary folder and always stopped.

Orthanc (Debian package ``orthanc``) is configured by one JSON file written next to its
storage: DICOM on a free loopback port, the HTTP server and every plug-in off, and only
modalities registered at 127.0.0.1 may query, retrieve or store (``DicomCheckModalityHost``).
Orthanc 1.10 has no option to bind its DICOM port to one address, so it listens on all
interfaces; refusing unregistered peers and hosts keeps it from serving anything but this
machine. :func:`orthanc_binary` returns ``None`` when Orthanc is not installed, so the tests
can skip with a reason instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ORTHANC_ENV = "ICH_ORTHANC"
#: Where Debian installs the server (``/usr/sbin`` is not on a normal user's PATH).
_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc")
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0


def orthanc_binary() -> str | None:
    """The Orthanc executable: ``$ICH_ORTHANC``, then PATH, then Debian's ``/usr/sbin``."""
    env = os.environ.get(ORTHANC_ENV)
    if env:
        return env if Path(env).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Modality:
    """A peer Orthanc may talk to: it answers our queries and sends C-MOVE results here."""

    ae_title: str
    port: int
    host: str = LOOPBACK


@dataclass
class OrthancServer:
    """A running Orthanc: where to reach it and where its log is."""

    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def host(self) -> str:
        return LOOPBACK

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """Terminate, and kill if Orthanc does not exit within 10 s."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("Orthanc did not stop within 10 s; killing it")
            self.process.kill()
            self.process.wait(timeout=10)


def orthanc_config(
    folder: Path,
    ae_title: str,
    port: int,
    modalities: Mapping[str, Modality],
    **overrides: object,
) -> dict[str, object]:
    """The configuration the tests run Orthanc with (see the module docstring)."""
    storage = folder / "storage"
    config: dict[str, object] = {
        "Name": "ich-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": port,
        # A wrong called AE title must be refused, as a hospital PACS would.
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {
            key: {"AET": m.ae_title, "Host": m.host, "Port": m.port}
            for key, m in modalities.items()
        },
        # Orthanc otherwise keeps a C-MOVE's outgoing association open 5 s after the last
        # instance, which would delay our listener's "association released" signal.
        "DicomAssociationCloseDelay": 0,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 10,
        "SynchronousCMove": True,
        "StrictAetComparison": True,
        "SaveJobs": False,
        "MetricsEnabled": False,
        "DeidentifyLogs": True,
        "StorageCompression": False,
        "OverwriteInstances": True,
        # the tests need no crash safety from Orthanc; an fsync per instance costs ~0.1 s
        "SyncStorageArea": False,
    }
    config.update(overrides)
    return config


def _die_with_parent() -> None:
    """In the child: have Linux send SIGTERM when the test process dies, even by SIGKILL."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _echo_ok(host: str, port: int, ae_title: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="ICHPROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 2
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


@contextlib.contextmanager
def running_orthanc(
    folder: Path,
    modalities: Mapping[str, Modality],
    ae_title: str = "ICHPACS",
    **overrides: object,
) -> Iterator[OrthancServer]:
    """Start Orthanc in ``folder``, wait until it answers C-ECHO, and stop it on exit."""
    binary = orthanc_binary()
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (Debian: apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = orthanc_config(folder, ae_title, port, modalities, **overrides)
    config_file = folder / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_file = folder / "orthanc.log"
    with open(log_file, "wb") as out:
        process = subprocess.Popen(
            [binary, "--no-jobs", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            # DCMTK (inside Orthanc) keeps Nagle's algorithm on unless told otherwise, which
            # adds a 40 ms delayed-ACK wait to every DIMSE message
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    server = OrthancServer(ae_title, port, folder, process, log_file)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _echo_ok(LOOPBACK, port, ae_title):
            if process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with status {process.returncode} while starting; "
                    f"log:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Orthanc did not answer C-ECHO on port {port} within "
                    f"{START_TIMEOUT_S:.0f} s; log:\n{server.log_tail()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
