"""Studies straight from a PACS, and results back to it (DIMSE over TCP, optionally TLS).

Everything here is a blocking call that a viewer runs on a worker thread: long transfers
take ``progress(done, total)`` (``total`` is 0 while unknown) and ``cancelled()``, checked
for every instance. Every failure is a :class:`PacsError` that names the node and says what
happened and what to check; a cancel is a :class:`PacsCancelled`.

- :class:`PacsNode` and :class:`PacsConfig`: the PACS we talk to, kept in
  ``$XDG_CONFIG_HOME/ich-second-opinion/pacs.json`` (``$ICH_PACS_CONFIG`` overrides).
- :func:`echo` (C-ECHO), :func:`find_studies` / :func:`find_series` /
  :func:`find_instances` (C-FIND, Study Root), :func:`retrieve_study` (C-GET, or C-MOVE to
  our :class:`~ich_model.pacs_listener.Listener`) and :func:`send` (C-STORE).

A retrieval never leaves half a study in the local store (:mod:`ich_model.pacs_store`): it
is received into a partial folder and moved into place only when the PACS reported every
instance sent and the count matches what its C-FIND said the study holds.

Patient names and IDs travel in queries and answers but never reach a log: pynetdicom's
identifier logging is switched off below, and :class:`StudyMatch` leaves them out of its
``repr``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from ich_model import pacs_store

if TYPE_CHECKING:
    from ich_model.pacs_listener import Listener

log = logging.getLogger(__name__)

# Identifiers carry patient names and IDs; pynetdicom would log them at INFO/DEBUG.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_pynetdicom_log = logging.getLogger("pynetdicom")
if _pynetdicom_log.level == logging.NOTSET:
    # Its INFO lines narrate every PDU; our own log says what matters, once.
    _pynetdicom_log.setLevel(logging.WARNING)

APP_DIR = "ich-second-opinion"
CONFIG_NAME = "pacs.json"
CONFIG_ENV = "ICH_PACS_CONFIG"
CONFIG_VERSION = 1
#: Our AE title when a node names none.
DEFAULT_AE_TITLE = "ICHSO"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RESULTS = 500
#: Largest PDU we accept. pynetdicom's default (16 kB) cuts a 512 x 512 slice into 32 PDUs
#: and halves the C-GET rate; peers send at most their own limit anyway.
MAX_PDU = 1 << 20
RETRIEVE_METHODS = ("get", "move")

VERIFICATION = "1.2.840.10008.1.1"
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DATE = re.compile(r"\d{8}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

#: progress(done, total); total is 0 while unknown.
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class PacsError(Exception):
    """Talking to a PACS failed; the message names the node and what happened."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"PACS {node!r}: {message}")
        self.node = node
        self.reason = message


class PacsCancelled(PacsError):
    """The caller cancelled; nothing was left behind."""


class PacsConfigError(ValueError):
    """The PACS configuration is wrong; the message names the file, node and field."""


# ----------------------------------------------------------------------------- nodes


def ae_title_problem(value: Any, field_name: str) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{field_name} must be a non-empty AE title. Received: {field_name}={value!r}"
    if len(value) > 16 or "\\" in value or _CONTROL.search(value):
        return (
            f"{field_name} must be at most 16 characters without backslashes or control "
            f"characters. Received: {field_name}={value!r}"
        )
    return None


def port_problem(value: Any, field_name: str, allow_zero: bool = False) -> str | None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        return f"{field_name} must be an integer in {low}..65535. Received: {field_name}={value!r}"
    return None


@dataclass(frozen=True)
class PacsNode:
    """A PACS (or any DICOM Q/R SCP) we query, retrieve from and send to."""

    name: str
    ae_title: str
    host: str
    port: int
    #: our AE title when calling this node (the PACS must know it for C-FIND/GET/MOVE)
    calling_ae_title: str = DEFAULT_AE_TITLE
    tls: bool = False
    tls_ca_file: Path | None = None  # None: the system's trusted CAs
    tls_cert_file: Path | None = None  # our client certificate, when the PACS wants one
    tls_key_file: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: how :func:`retrieve_study` fetches by default: "get" (C-GET) or "move" (C-MOVE)
    retrieve_method: str = "get"

    def problems(self, check_files: bool = True) -> list[str]:
        """What is wrong with this node, each naming the field; empty when it is usable."""
        out: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            out.append(f"name must be a non-empty string. Received: name={self.name!r}")
        for f in ("ae_title", "calling_ae_title"):
            p = ae_title_problem(getattr(self, f), f)
            if p:
                out.append(p)
        if (
            not isinstance(self.host, str)
            or not self.host.strip()
            or any(c.isspace() for c in self.host)
        ):
            out.append(f"host must be a host name or IP address. Received: host={self.host!r}")
        p = port_problem(self.port, "port")
        if p:
            out.append(p)
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 3600:
            out.append(f"timeout_s must be a number of seconds in (0, 3600]. Received: {t!r}")
        if self.retrieve_method not in RETRIEVE_METHODS:
            out.append(
                f"retrieve_method must be one of {RETRIEVE_METHODS}. "
                f"Received: retrieve_method={self.retrieve_method!r}"
            )
        files = ("tls_ca_file", "tls_cert_file", "tls_key_file")
        if not self.tls:
            out.extend(f"{f} is set but tls is false" for f in files if getattr(self, f))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            out.append("tls_cert_file and tls_key_file must be given together")
        if check_files and self.tls:
            for f in files:
                v = getattr(self, f)
                if v is not None and not Path(v).is_file():
                    out.append(f"{f} does not exist or is not a file: {v}")
        return out

    def validate(self, check_files: bool = True) -> PacsNode:
        """Raise :class:`PacsConfigError` listing every problem; returns self for chaining."""
        problems = self.problems(check_files)
        if problems:
            raise PacsConfigError(f"PACS node {self.name!r}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            d[f] = None if d[f] is None else str(d[f])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "PACS node") -> PacsNode:
        """Build from JSON; unknown or missing fields are a :class:`PacsConfigError`."""
        if not isinstance(d, dict):
            raise PacsConfigError(f"{where} must be a JSON object. Received: {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PacsConfigError(f"{where}: unknown field {unknown[0]!r}{extra}")
        missing = [f for f in ("name", "ae_title", "host", "port") if f not in d]
        if missing:
            raise PacsConfigError(f"{where}: missing field(s) {', '.join(missing)}")
        values = dict(d)
        for f in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if values.get(f) not in (None, ""):
                values[f] = Path(str(values[f])).expanduser()
            else:
                values[f] = None
        return cls(**values)


@dataclass(frozen=True)
class ListenerSettings:
    """Our own C-STORE SCP, for studies a PACS pushes and for C-MOVE destinations."""

    enabled: bool = False
    ae_title: str = DEFAULT_AE_TITLE
    port: int = 11112
    #: address to listen on: loopback unless a PACS elsewhere must reach us ("0.0.0.0")
    bind_address: str = "127.0.0.1"
    store_dir: Path | None = None  # None: default_store_dir()
    #: a series is complete when no instance arrived for this long
    series_timeout_s: float = 10.0

    def problems(self) -> list[str]:
        out = [
            p
            for p in (ae_title_problem(self.ae_title, "ae_title"), port_problem(self.port, "port"))
            if p
        ]
        t = self.series_timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 3600:
            out.append(f"series_timeout_s must be in (0, 3600]. Received: {t!r}")
        if not isinstance(self.bind_address, str) or not self.bind_address:
            out.append(f"bind_address must be an IP address. Received: {self.bind_address!r}")
        return out


@dataclass(frozen=True)
class PacsConfig:
    """Every PACS node, and our listener."""

    nodes: tuple[PacsNode, ...] = ()
    listener: ListenerSettings = field(default_factory=ListenerSettings)

    def node(self, name: str) -> PacsNode:
        for n in self.nodes:
            if n.name == name:
                return n
        names = [n.name for n in self.nodes]
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else f" Known: {names}"
        raise KeyError(f"no PACS node named {name!r}.{extra}")

    def problems(self, check_files: bool = True) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for k, n in enumerate(self.nodes):
            out += [f"nodes[{k}] ({n.name!r}): {p}" for p in n.problems(check_files)]
            if n.name in seen:
                out.append(f"nodes[{k}]: the name {n.name!r} is used twice")
            seen.add(n.name)
        out += [f"listener: {p}" for p in self.listener.problems()]
        return out

    def validate(self, check_files: bool = True) -> PacsConfig:
        problems = self.problems(check_files)
        if problems:
            raise PacsConfigError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        listener = asdict(self.listener)
        listener["store_dir"] = (
            None if self.listener.store_dir is None else str(listener["store_dir"])
        )
        return {
            "version": CONFIG_VERSION,
            "nodes": [n.to_dict() for n in self.nodes],
            "listener": listener,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "PACS configuration") -> PacsConfig:
        if not isinstance(d, dict):
            raise PacsConfigError(f"{source}: must be a JSON object")
        version = d.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise PacsConfigError(
                f"{source}: version must be {CONFIG_VERSION}. Received: version={version!r}"
            )
        raw_nodes = d.get("nodes", [])
        if not isinstance(raw_nodes, list):
            raise PacsConfigError(f"{source}: nodes must be a list")
        nodes = tuple(
            PacsNode.from_dict(n, f"{source}: nodes[{k}]") for k, n in enumerate(raw_nodes)
        )
        raw_listener = d.get("listener", {})
        if not isinstance(raw_listener, dict):
            raise PacsConfigError(f"{source}: listener must be a JSON object")
        known = {f.name for f in fields(ListenerSettings)}
        unknown = sorted(set(raw_listener) - known)
        if unknown:
            raise PacsConfigError(f"{source}: listener: unknown field {unknown[0]!r}")
        values = dict(raw_listener)
        if values.get("store_dir"):
            values["store_dir"] = Path(str(values["store_dir"])).expanduser()
        else:
            values["store_dir"] = None
        return cls(nodes, ListenerSettings(**values))


def _xdg(var: str, fallback: str, environ: dict[str, str] | os._Environ[str]) -> Path:
    base = environ.get(var)
    return Path(base) if base else Path.home() / fallback


def default_config_path(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """``$ICH_PACS_CONFIG``, else ``$XDG_CONFIG_HOME/ich-second-opinion/pacs.json``."""
    override = environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config", environ) / APP_DIR / CONFIG_NAME


def default_store_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where retrieved and received studies go: ``$XDG_DATA_HOME/ich-second-opinion/pacs``."""
    return _xdg("XDG_DATA_HOME", ".local/share", environ) / APP_DIR / "pacs"


def load_config(path: Path | str | None = None, check_files: bool = False) -> PacsConfig:
    """Read and validate the configuration; a missing file is an empty configuration."""
    path = Path(path) if path is not None else default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PacsConfig()
    except OSError as exc:
        raise PacsConfigError(f"cannot read the PACS configuration {path}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PacsConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    try:
        config = PacsConfig.from_dict(raw, str(path))
    except TypeError as exc:
        raise PacsConfigError(f"{path}: {exc}") from exc
    problems = config.problems(check_files)
    if problems:
        raise PacsConfigError(f"{path}: " + "; ".join(problems))
    return config


def save_config(config: PacsConfig, path: Path | str | None = None) -> Path:
    """Validate, then write atomically (owner-only: it names hosts and key files)."""
    config.validate(check_files=False)
    path = Path(path) if path is not None else default_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- matches


@dataclass(frozen=True)
class StudyMatch:
    """One study a C-FIND found. Patient fields stay out of ``repr`` (and so out of logs)."""

    study_uid: str
    study_date: str = ""
    study_time: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    patient_birth_date: str = field(default="", repr=False)
    patient_sex: str = field(default="", repr=False)
    accession: str = field(default="", repr=False)


@dataclass(frozen=True)
class SeriesMatch:
    series_uid: str
    study_uid: str
    modality: str = ""
    series_number: int | None = None
    description: str = ""
    n_instances: int | None = None


@dataclass(frozen=True)
class InstanceMatch:
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    instance_number: int | None = None


@dataclass(frozen=True)
class RetrievedStudy:
    """A study now whole in the local store."""

    study_uid: str
    folder: Path  # <store>/<study>
    series_folders: tuple[Path, ...]
    n_instances: int
    seconds: float
    method: str


@dataclass(frozen=True)
class SendResult:
    sent: int
    warnings: int
    seconds: float


# ----------------------------------------------------------------------------- helpers


def dataset_text(ds: Dataset, keyword: str, limit: int = 256) -> str:
    try:
        v = ds.get(keyword, "")
    except Exception:  # a malformed value from the network must not end the query
        return ""
    if v is None:
        return ""
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        v = "\\".join(str(x) for x in v)
    return _CONTROL.sub(" ", str(v)).strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    t = dataset_text(ds, keyword, 12)
    try:
        return int(t) if t else None
    except ValueError:
        return None


def _query_text(value: str | None, field_name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field_name} must be a string. Received: {type(value).__name__}")
    if "\\" in value or _CONTROL.search(value) or len(value) > 64:
        # the value may identify a patient: name the field, not the value
        raise ValueError(
            f"{field_name} must be at most 64 characters without backslashes or control characters"
        )
    return value


def _dicom_date(value: date | str | None, field_name: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    text = str(value).replace("-", "") if len(str(value)) == 10 else str(value)
    if not _DATE.fullmatch(text):
        raise ValueError(
            f"{field_name} must be a date or 'YYYYMMDD' / 'YYYY-MM-DD'. "
            f"Received: {field_name}={value!r}"
        )
    return text


def _check_uid(uid: str, field_name: str) -> str:
    uid = str(uid).strip()
    if not (len(uid) <= 64 and _UID.fullmatch(uid)):
        raise ValueError(f"{field_name} must be a DICOM UID. Received: {field_name}={uid!r}")
    return uid


def _status_text(code: int, table: dict[int, tuple[str, str]]) -> str:
    meaning = table.get(code, ("", "unknown status"))[1]
    return f"0x{code:04X} ({meaning})"


def _ssl_context(node: PacsNode) -> ssl.SSLContext | None:
    if not node.tls:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(node.tls_ca_file) if node.tls_ca_file else None,
        )
    except (OSError, ssl.SSLError) as exc:
        raise PacsError(node.name, f"cannot use tls_ca_file {node.tls_ca_file}: {exc}") from exc
    if node.tls_cert_file is not None and node.tls_key_file is not None:
        try:
            ctx.load_cert_chain(str(node.tls_cert_file), str(node.tls_key_file))
        except (OSError, ssl.SSLError) as exc:
            raise PacsError(
                node.name,
                f"cannot use tls_cert_file {node.tls_cert_file} with tls_key_file "
                f"{node.tls_key_file}: {exc}",
            ) from exc
    return ctx


def _why_no_association(
    node: PacsNode,
    assoc: Association,
    state: dict[str, bool],
    seconds: float,
    connect_error: str,
) -> str:
    where = f"{node.host}:{node.port}"
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        reason = (
            f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}"
            if rsp is not None and hasattr(rsp, "reason_str")
            else "no reason given"
        )
        return (
            f"refused the association ({reason}); check that its AE title is "
            f"{node.ae_title!r} and that it knows our AE title {node.calling_ae_title!r} "
            f"at this machine's address"
        )
    if state.get("accepted"):
        return (
            "accepted the association but none of the services we asked for; "
            "it may not support this operation"
        )
    if not state.get("connected"):
        if node.tls and "SSL" in connect_error.upper():
            return (
                f"TLS handshake with {where} failed ({connect_error}); check tls_ca_file "
                "(the CA that signed the PACS's certificate) and that the certificate names "
                f"{node.host!r}"
            )
        detail = f" ({connect_error})" if connect_error else ""
        return (
            f"could not connect to {where}{detail}: nothing is listening there, or it is "
            "unreachable; check host, port and that the PACS is running"
        )
    if assoc.is_aborted and seconds < 0.9 * node.timeout_s:
        hint = (
            "; if it wants a client certificate, set tls_cert_file and tls_key_file"
            if node.tls
            else "; if it expects TLS, set tls"
        )
        return f"aborted the association request (or closed the connection) at {where}{hint}"
    # pynetdicom aborts itself when the ACSE timeout expires
    return (
        f"connected to {where} but got no answer to the association request within "
        f"{node.timeout_s:g} s"
    )


class _ConnectErrors(logging.Filter):
    """Keeps pynetdicom's connection errors (it logs them instead of raising)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("TCP Initialisation Error: "):
            self.seen.append((record.threadName or "", msg.split(": ", 1)[1]))
        return True

    def for_assoc(self, assoc: Association) -> str:
        names = {assoc.name, assoc.dul.name}
        return next((m for t, m in self.seen if t in names), "")


def no_delay(event: Any) -> None:
    """Switch Nagle's algorithm off on a new DICOM connection (an EVT_CONN_OPEN handler).

    DIMSE sends a command and its data set as separate PDUs and then waits for the answer:
    with Nagle on, each message waits for the peer's delayed ACK (40 ms on Linux), which
    made a C-STORE of a small slice ten times slower than its transfer.
    """
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log.debug("could not set TCP_NODELAY: %s", exc)


class _ReactorCheckpoint:
    """A stand-in for pynetdicom's ``Association._reactor_checkpoint`` whose pause holds.

    pynetdicom runs a reactor thread per association that takes any incoming DIMSE message
    no request is waiting for. Each request pauses it first (``clear()``, then spin until
    the reactor's ``_is_paused`` is true), sends, waits for the answer and calls ``set()``.
    But ``_is_paused`` is still true from the last pause while the reactor, woken by that
    ``set()``, has not run yet, so on a busy CPU the next request goes out at once; if its
    answer arrives before the reactor polls its queue, the reactor takes it, logs "Received
    unexpected C-STORE service message" and drops it, and the request waits out the DIMSE
    timeout (issue 10; pynetdicom issue #875 shows the same warning for C-FINDs in a row).
    TCP_NODELAY and our large PDUs only made answers fast enough to hit that window more often.

    Here ``clear()`` returns only once the reactor is blocked on the cleared checkpoint, and
    a reactor woken by ``set()`` that finds it cleared again stays blocked, so the pause
    pynetdicom spins for is real. :func:`_association` installs it on every association we
    request, before anything else uses it.
    """

    def __init__(self, reactor: threading.Thread) -> None:
        self._reactor = reactor
        self._cond = threading.Condition()
        self._open = True
        self._parked = False  # the reactor is blocked in wait() on a cleared checkpoint

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if threading.current_thread() is self._reactor:
                return  # pynetdicom's reactor releasing on its network timeout
            # a dead reactor never parks (pynetdicom then fakes _is_paused itself)
            while not self._parked and self._reactor.is_alive():
                self._cond.wait(0.01)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if threading.current_thread() is not self._reactor:
                return self._cond.wait_for(lambda: self._open, timeout)
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


@contextlib.contextmanager
def _association(
    node: PacsNode,
    contexts: Sequence[PresentationContext],
    roles: Sequence[Any] = (),
    handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> Iterator[Association]:
    """An established association; released on success, aborted on any error."""
    node.validate(check_files=False)
    ae = AE(ae_title=node.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.timeout_s
    ae.connection_timeout = node.timeout_s
    ae.requested_contexts = list(contexts)
    state: dict[str, bool] = {}

    def opened(event: Any) -> None:
        state["connected"] = True
        no_delay(event)

    def accepted(_event: Any) -> None:
        state["accepted"] = True

    ctx = _ssl_context(node)
    tls_args = (ctx, node.host) if ctx is not None else None
    t0 = time.monotonic()
    errors = _ConnectErrors()
    transport_log = logging.getLogger("pynetdicom.transport")
    transport_log.addFilter(errors)
    try:
        assoc = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            max_pdu=MAX_PDU,
            ext_neg=list(roles) or None,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, opened), (evt.EVT_ACCEPTED, accepted), *handlers],
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise PacsError(node.name, f"could not connect to {node.host}:{node.port}: {exc}") from exc
    finally:
        transport_log.removeFilter(errors)
    if not assoc.is_established:
        ae.shutdown()
        seconds = time.monotonic() - t0
        why = _why_no_association(node, assoc, state, seconds, errors.for_assoc(assoc))
        raise PacsError(node.name, why)
    # the reactor only ever found pynetdicom's checkpoint set, so it is not waiting on it
    assoc._reactor_checkpoint = _ReactorCheckpoint(assoc)  # type: ignore[assignment]
    ok = False
    try:
        yield assoc
        ok = True
    finally:
        if assoc.is_established:
            if ok:
                assoc.release()
            else:
                assoc.abort()
        ae.shutdown()


def _lost(node: PacsNode, assoc: Association, what: str, idle_s: float = 0.0) -> PacsError:
    """The error for an exchange that ended without a final response.

    pynetdicom aborts the association itself when its DIMSE timeout expires, so an abort
    after ``idle_s`` of silence close to the timeout is reported as a timeout.
    """
    if not assoc.is_aborted and assoc.is_alive():
        assoc.join(0.5)  # a peer's A-ABORT may still be on its way through pynetdicom
    if assoc.is_aborted and idle_s < 0.9 * node.timeout_s:
        return PacsError(node.name, f"aborted the association during {what}")
    return PacsError(
        node.name,
        f"stopped answering during {what} (nothing for {node.timeout_s:g} s, or the "
        "connection closed)",
    )


# ----------------------------------------------------------------------------- C-ECHO


def echo(node: PacsNode) -> float:
    """C-ECHO the node; returns the round trip in seconds (association included)."""
    t0 = time.perf_counter()
    with _association(node, [build_context(VERIFICATION)]) as assoc:
        asked = time.monotonic()
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise _lost(node, assoc, "C-ECHO", time.monotonic() - asked)
        if int(status.Status) != 0:
            raise PacsError(node.name, f"answered C-ECHO with status 0x{int(status.Status):04X}")
    seconds = time.perf_counter() - t0
    log.info("C-ECHO %s: %.3f s", node.name, seconds)
    return seconds


# ----------------------------------------------------------------------------- C-FIND


def _find(
    node: PacsNode,
    query: Dataset,
    what: str,
    max_results: int,
    cancelled: CancelFn | None,
) -> list[Dataset]:
    out: list[Dataset] = []
    with _association(node, [build_context(FIND_MODEL)]) as assoc:
        responses = assoc.send_c_find(query, FIND_MODEL)
        truncated = False
        for status, identifier in responses:
            if cancelled is not None and cancelled():
                raise PacsCancelled(node.name, f"{what} cancelled")
            if not status or "Status" not in status:
                raise _lost(node, assoc, what)
            code = int(status.Status)
            category = code_to_category(code)
            if category == "Pending":
                if identifier is not None and not truncated:
                    out.append(identifier)
                    if len(out) >= max_results:
                        truncated = True
                        assoc.send_c_cancel(1, query_model=FIND_MODEL)
                continue
            if category in ("Success", "Cancel"):
                break
            raise PacsError(
                node.name, f"{what} failed: {_status_text(code, QR_FIND_SERVICE_CLASS_STATUS)}"
            )
    if truncated:
        log.warning("%s on %s: more than %d matches; kept the first", what, node.name, max_results)
    return out


def find_studies(
    node: PacsNode,
    patient_id: str | None = None,
    patient_name: str | None = None,
    date_from: date | str | None = None,
    date_to: date | str | None = None,
    accession: str | None = None,
    modality: str | None = "CT",
    *,
    study_uid: str | None = None,
    max_results: int = DEFAULT_MAX_RESULTS,
    cancelled: CancelFn | None = None,
) -> list[StudyMatch]:
    """Studies matching every given key (C-FIND, Study Root, STUDY level).

    ``patient_name`` may use the DICOM wildcards ``*`` and ``?``. ``modality`` is matched
    against ModalitiesInStudy by the PACS and again here, since not every PACS matches
    that key. At most ``max_results`` studies are returned (the query is then cancelled).
    """
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = _check_uid(study_uid, "study_uid") if study_uid else ""
    q.PatientID = _query_text(patient_id, "patient_id")
    q.PatientName = _query_text(patient_name, "patient_name")
    q.PatientBirthDate = ""
    q.PatientSex = ""
    start = _dicom_date(date_from, "date_from")
    end = _dicom_date(date_to, "date_to")
    q.StudyDate = f"{start}-{end}" if (start or end) and start != end else start
    q.StudyTime = ""
    q.AccessionNumber = _query_text(accession, "accession")
    q.StudyDescription = ""
    q.ModalitiesInStudy = _query_text(modality, "modality")
    q.NumberOfStudyRelatedSeries = ""
    q.NumberOfStudyRelatedInstances = ""
    if any(not str(v.value).isascii() for v in q if v.value):
        q.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, only when needed: not every PACS has it
    found = _find(node, q, "study query", max_results, cancelled)
    out: list[StudyMatch] = []
    for ds in found:
        uid = dataset_text(ds, "StudyInstanceUID", 128)
        if not uid:
            continue
        modalities = tuple(m for m in dataset_text(ds, "ModalitiesInStudy").split("\\") if m)
        if modality and modalities and modality.upper() not in {m.upper() for m in modalities}:
            continue
        out.append(
            StudyMatch(
                study_uid=uid,
                study_date=dataset_text(ds, "StudyDate", 8),
                study_time=dataset_text(ds, "StudyTime", 16),
                description=dataset_text(ds, "StudyDescription"),
                modalities=modalities,
                n_series=_int(ds, "NumberOfStudyRelatedSeries"),
                n_instances=_int(ds, "NumberOfStudyRelatedInstances"),
                patient_name=dataset_text(ds, "PatientName"),
                patient_id=dataset_text(ds, "PatientID", 64),
                patient_birth_date=dataset_text(ds, "PatientBirthDate", 8),
                patient_sex=dataset_text(ds, "PatientSex", 16),
                accession=dataset_text(ds, "AccessionNumber", 64),
            )
        )
    out.sort(key=lambda s: (s.study_date, s.study_time), reverse=True)
    log.info("study query on %s: %d match(es)", node.name, len(out))
    return out


def find_series(
    node: PacsNode, study_uid: str, cancelled: CancelFn | None = None
) -> list[SeriesMatch]:
    """The series of one study (C-FIND, SERIES level), by series number."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = _check_uid(study_uid, "study_uid")
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesNumber = ""
    q.SeriesDescription = ""
    q.NumberOfSeriesRelatedInstances = ""
    found = _find(node, q, "series query", 10_000, cancelled)
    out = [
        SeriesMatch(
            series_uid=dataset_text(ds, "SeriesInstanceUID", 128),
            study_uid=study_uid,
            modality=dataset_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            description=dataset_text(ds, "SeriesDescription"),
            n_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
        )
        for ds in found
        if dataset_text(ds, "SeriesInstanceUID")
    ]
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    return out


def find_instances(
    node: PacsNode, study_uid: str, series_uid: str, cancelled: CancelFn | None = None
) -> list[InstanceMatch]:
    """The instances of one series (C-FIND, IMAGE level), by instance number."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = _check_uid(study_uid, "study_uid")
    q.SeriesInstanceUID = _check_uid(series_uid, "series_uid")
    q.SOPInstanceUID = ""
    q.SOPClassUID = ""
    q.InstanceNumber = ""
    found = _find(node, q, "instance query", 100_000, cancelled)
    out = [
        InstanceMatch(
            sop_uid=dataset_text(ds, "SOPInstanceUID", 128),
            sop_class_uid=dataset_text(ds, "SOPClassUID", 128),
            series_uid=series_uid,
            instance_number=_int(ds, "InstanceNumber"),
        )
        for ds in found
        if dataset_text(ds, "SOPInstanceUID")
    ]
    out.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_uid))
    return out


# ----------------------------------------------------------------------------- retrieve


@dataclass
class _Transfer:
    """Counts of one retrieval, shared by the C-STORE handler and the response loop."""

    node: PacsNode
    study_uid: str
    folder: Path
    progress: ProgressFn | None
    cancelled: CancelFn | None
    received: int = 0
    total: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    reported: tuple[int, int] = (-1, -1)
    refused: int = 0
    write_error: str = ""
    was_cancelled: bool = False

    def is_cancelled(self) -> bool:
        if not self.was_cancelled and self.cancelled is not None and self.cancelled():
            self.was_cancelled = True
        return self.was_cancelled

    def report(self) -> None:
        now = (self.received, max(self.total, self.received))
        if self.progress is not None and now != self.reported:
            self.reported = now
            self.progress(*now)

    def store(self, dataset: Dataset, encoded: bytes, sop_uid: str) -> int:
        """Write one received instance into the partial folder; returns a C-STORE status."""
        study = dataset_text(dataset, "StudyInstanceUID", 128)
        series = dataset_text(dataset, "SeriesInstanceUID", 128)
        if (
            study != self.study_uid
            or not series
            or dataset_text(dataset, "SOPInstanceUID", 128) != sop_uid
        ):
            self.refused += 1
            log.warning(
                "%s sent an instance that does not belong to study %s; refused",
                self.node.name,
                self.study_uid,
            )
            return 0xA900
        path = pacs_store.instance_path(self.folder, study, series, sop_uid)
        try:
            pacs_store.write_atomic(path, encoded)
        except OSError as exc:
            self.write_error = self.write_error or f"could not write {path}: {exc}"
            return 0xA700
        self.received += 1
        self.last_activity = time.monotonic()
        self.report()
        return 0x0000


def _retrieve_contexts() -> tuple[list[PresentationContext], list[Any]]:
    contexts = [build_context(GET_MODEL)]
    roles = []
    for uid in pacs_store.RETRIEVE_SOP_CLASSES:
        contexts.append(build_context(uid, list(pacs_store.RETRIEVE_TRANSFER_SYNTAXES)))
        roles.append(build_role(uid, scp_role=True))
    return contexts, roles


def _sub_ops(status: Dataset) -> tuple[int, int, int, int]:
    def n(k: str) -> int:
        v = status.get(k)
        return int(v) if v is not None else 0

    return (
        n("NumberOfRemainingSuboperations"),
        n("NumberOfCompletedSuboperations"),
        n("NumberOfFailedSuboperations"),
        n("NumberOfWarningSuboperations"),
    )


def _retrieve_identifier(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


def _run_retrieve(
    node: PacsNode,
    assoc: Association,
    responses: Iterator[tuple[Dataset, Dataset | None]],
    t: _Transfer,
    what: str,
    table: dict[int, tuple[str, str]],
) -> tuple[int, int, int]:
    """Follow C-GET/C-MOVE responses to the final one; returns (completed, failed, warning)."""
    for status, _identifier in responses:
        if t.is_cancelled():
            raise PacsCancelled(node.name, f"{what} of study {t.study_uid} cancelled")
        if not status or "Status" not in status:
            n = t.received
            total = f" of {t.total}" if t.total else ""
            raise PacsError(
                node.name,
                f"{_lost(node, assoc, what, time.monotonic() - t.last_activity).reason} "
                f"after {n}{total} instance(s) of study "
                f"{t.study_uid}; nothing was kept",
            )
        t.last_activity = time.monotonic()
        code = int(status.Status)
        remaining, completed, failed, warning = _sub_ops(status)
        category = code_to_category(code)
        if category == "Pending":
            t.total = max(t.total, remaining + completed + failed + warning)
            t.report()
            continue
        if category == "Cancel":
            raise PacsError(node.name, f"cancelled the {what} of study {t.study_uid} itself")
        if category == "Failure" and completed == 0:
            raise PacsError(
                node.name, f"{what} of study {t.study_uid} failed: {_status_text(code, table)}"
            )
        if t.write_error:  # our disk, not the PACS, failed: say so
            raise PacsError(node.name, f"study {t.study_uid}: {t.write_error}; nothing was kept")
        if category == "Failure" or failed:
            raise PacsError(
                node.name,
                f"sent only part of study {t.study_uid}: {completed} instance(s) arrived, "
                f"{failed} failed ({_status_text(code, table)}); nothing was kept",
            )
        return completed, failed, warning
    raise _lost(node, assoc, what)


def retrieve_study(
    node: PacsNode,
    study_uid: str,
    dest_dir: Path,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
    *,
    method: str | None = None,
    move_destination: str | None = None,
    listener: Listener | None = None,
    expected_instances: int | None = None,
) -> RetrievedStudy:
    """Fetch a whole study into the local store ``dest_dir``; returns where it landed.

    ``method`` "get" (C-GET, the default of the node) needs nothing on our side; "move"
    (C-MOVE) needs our running ``listener`` (its AE title, or ``move_destination``, must be
    registered at the PACS). The number of instances is checked against
    ``expected_instances`` (default: what a C-FIND says the study holds), so a PACS that
    silently sends part of a study is caught. On any failure or cancel the local store is
    left as it was.
    """
    study_uid = _check_uid(study_uid, "study_uid")
    method = method or node.retrieve_method
    if method not in RETRIEVE_METHODS:
        raise ValueError(f"method must be one of {RETRIEVE_METHODS}. Received: method={method!r}")
    if method == "move" and listener is None:
        raise ValueError("method='move' needs our running Listener (listener=...)")
    t0 = time.perf_counter()
    if expected_instances is None:
        matches = find_studies(node, modality=None, study_uid=study_uid, cancelled=cancelled)
        if not matches:
            raise PacsError(node.name, f"has no study {study_uid}")
        expected_instances = matches[0].n_instances
    dest_dir = Path(dest_dir)
    with pacs_store.partial_folder(dest_dir) as partial:
        t = _Transfer(node, study_uid, partial, progress, cancelled, total=expected_instances or 0)
        if method == "get":
            completed = _get(node, t)
        else:
            assert listener is not None
            completed = _move(node, t, listener, move_destination or listener.ae_title)
        n = t.received
        if t.write_error:
            raise PacsError(node.name, f"study {study_uid}: {t.write_error}; nothing was kept")
        if n == 0:
            raise PacsError(node.name, f"sent no instance of study {study_uid}")
        if n < completed or (expected_instances and n < expected_instances):
            expected = max(completed, expected_instances or 0)
            raise PacsError(
                node.name,
                f"sent only part of study {study_uid}: {n} of {expected} instance(s) "
                "arrived; nothing was kept",
            )
        series = pacs_store.commit_series(partial, dest_dir)
    seconds = time.perf_counter() - t0
    log.info(
        "retrieved study %s from %s by C-%s: %d instance(s), %d series, %.1f s",
        study_uid,
        node.name,
        method.upper(),
        n,
        len(series),
        seconds,
    )
    return RetrievedStudy(
        study_uid,
        pacs_store.study_folder(dest_dir, study_uid),
        tuple(series),
        n,
        seconds,
        method,
    )


def _get(node: PacsNode, t: _Transfer) -> int:
    contexts, roles = _retrieve_contexts()

    def on_store(event: Any) -> int:
        if t.is_cancelled():
            event.assoc.abort()
            return 0xA700
        try:
            dataset = event.dataset
        except Exception as exc:  # undecodable data from the network
            log.warning("%s sent an instance that cannot be decoded: %s", node.name, exc)
            t.refused += 1
            return 0xC210
        return t.store(dataset, event.encoded_dataset(), str(event.request.AffectedSOPInstanceUID))

    with _association(node, contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
        responses = assoc.send_c_get(_retrieve_identifier(t.study_uid), GET_MODEL)
        completed, _failed, _warning = _run_retrieve(
            node, assoc, responses, t, "C-GET", QR_GET_SERVICE_CLASS_STATUS
        )
    return completed


def _move(node: PacsNode, t: _Transfer, listener: Listener, destination: str) -> int:
    p = ae_title_problem(destination, "move_destination")
    if p:
        raise ValueError(p)
    with (
        listener.capture(t.study_uid, t.store, t.is_cancelled),
        _association(node, [build_context(MOVE_MODEL)]) as assoc,
    ):
        responses = assoc.send_c_move(_retrieve_identifier(t.study_uid), destination, MOVE_MODEL)
        try:
            completed, _failed, _warning = _run_retrieve(
                node,
                assoc,
                responses,
                t,
                "C-MOVE",
                QR_MOVE_SERVICE_CLASS_STATUS,
            )
        except PacsError as exc:
            if isinstance(exc, PacsCancelled) or t.received or " failed: 0x" not in exc.reason:
                raise
            # Orthanc answers an unknown destination with 0xC000, others with 0xA801
            known = "does not know" if "0xA801" in exc.reason else "may not know"
            raise PacsError(
                node.name,
                f"{exc.reason}. The PACS {known} our AE title {destination!r} as a C-MOVE "
                f"destination: register it with this machine's address and port {listener.port}",
            ) from exc
    return completed


# ----------------------------------------------------------------------------- C-STORE


def _send_plan(node: PacsNode, files: Sequence[Path]) -> list[tuple[Path, str, str]]:
    plan = []
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class = str(ds.file_meta.MediaStorageSOPClassUID or ds.SOPClassUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            raise PacsError(
                node.name, f"cannot send {f}: not a readable DICOM file ({exc})"
            ) from exc
        plan.append((Path(f), sop_class, ts))
    return plan


def _store_contexts(plan: Sequence[tuple[Path, str, str]]) -> list[PresentationContext]:
    wanted: dict[str, set[str]] = {}
    for _path, sop_class, ts in plan:
        wanted.setdefault(sop_class, set()).add(ts)
    contexts = []
    for sop_class, syntaxes in sorted(wanted.items()):
        # uncompressed files convert into either uncompressed syntax; compressed ones go as
        # they are, each in a context of its own
        contexts.append(build_context(sop_class, sorted(pacs_store.UNCOMPRESSED)))
        contexts += [
            build_context(sop_class, [ts])
            for ts in sorted(syntaxes)
            if not pacs_store.is_uncompressed(ts)
        ]
    if len(contexts) > 128:
        raise ValueError(f"too many kinds of object to send in one association ({len(contexts)})")
    return contexts


def send(
    node: PacsNode,
    files: Sequence[Path | str],
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> SendResult:
    """C-STORE files (our SR and key images, typically) to the node, in one association.

    Every file is offered even when one is refused; then a :class:`PacsError` names the
    refused ones. Warning statuses (the PACS coerced an attribute) count as stored.
    """
    t0 = time.perf_counter()
    plan = _send_plan(node, [Path(f) for f in files])
    if not plan:
        return SendResult(0, 0, 0.0)
    failures: list[str] = []
    warnings = 0
    sent = 0
    with _association(node, _store_contexts(plan)) as assoc:
        for k, (path, _sop_class, _ts) in enumerate(plan):
            if cancelled is not None and cancelled():
                raise PacsCancelled(node.name, f"sending cancelled after {sent} of {len(plan)}")
            asked = time.monotonic()
            try:
                status = assoc.send_c_store(path, msg_id=(k % 65535) + 1)
            except (ValueError, AttributeError) as exc:
                failures.append(f"{path.name}: {exc}")
                continue
            if not status or "Status" not in status:
                lost = _lost(node, assoc, "C-STORE", time.monotonic() - asked)
                raise PacsError(node.name, f"{lost.reason} after {sent} of {len(plan)} file(s)")
            code = int(status.Status)
            category = code_to_category(code)
            if category == "Success":
                sent += 1
            elif category == "Warning":
                sent += 1
                warnings += 1
            else:
                failures.append(f"{path.name}: {_status_text(code, STORAGE_SERVICE_CLASS_STATUS)}")
            if progress is not None:
                progress(k + 1, len(plan))
    if failures:
        raise PacsError(
            node.name,
            f"refused {len(failures)} of {len(plan)} file(s): " + "; ".join(failures[:5]),
        )
    seconds = time.perf_counter() - t0
    log.info("sent %d file(s) to %s in %.1f s", sent, node.name, seconds)
    return SendResult(sent, warnings, seconds)


def with_node(config: PacsConfig, node: PacsNode) -> PacsConfig:
    """The configuration with ``node`` added, or replacing the node of the same name."""
    nodes = [n for n in config.nodes if n.name != node.name] + [node]
    return replace(config, nodes=tuple(nodes))
