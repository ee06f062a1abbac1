"""Our own C-STORE SCP: studies a PACS pushes to us, and the target of our C-MOVEs.

Pushed instances land in ``<store>/.incoming/<study>/<series>/`` (each file written under a
temporary name and renamed). DICOM has no "series finished" message, so a series counts as
complete when no instance has arrived for ``series_timeout_s``, or ``release_grace_s`` after
the association that sent it was released (a sender that opens one association per
instance is then not cut into pieces). The complete series is moved to
``<store>/<study>/<series>/`` and ``on_series_complete(folder)`` is called on the listener's
own thread. An instance of that series arriving later starts the cycle again, so the
callback may see a folder twice, the second time with more in it.

Instances of a study that :func:`ich_model.pacs.retrieve_study` is fetching by C-MOVE are
routed to that retrieval (:meth:`Listener.capture`), which commits them only when the whole
study has arrived. Whatever was still incoming when the listener stopped is completed
after the next start: every such file was acknowledged to its sender, so it is kept.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from ich_model import pacs_store
from ich_model.pacs import (
    MAX_PDU,
    VERIFICATION,
    CancelFn,
    ListenerSettings,
    ae_title_problem,
    dataset_text,
    default_store_dir,
    no_delay,
    port_problem,
)

log = logging.getLogger(__name__)

#: store(dataset, encoded file bytes, SOP Instance UID) -> C-STORE status
StoreFn = Callable[[Dataset, bytes, str], int]
SeriesCallback = Callable[[Path], None]

_REFUSED = 0xA700  # Refused: out of resources (the polite "not now")
_BAD_DATA = 0xA900  # Data set does not match SOP class
_CANNOT_UNDERSTAND = 0xC000


class ListenerError(Exception):
    """The listener cannot start; the message names the address and the reason."""


@dataclass
class _Incoming:
    folder: Path
    count: int = 0
    last: float = 0.0
    senders: set[int] = field(default_factory=set)
    released_at: float | None = None


@dataclass
class _Capture:
    store: StoreFn
    cancelled: CancelFn | None


class Listener:
    """A C-STORE SCP on its own thread; ``start()``/``stop()`` or use it as a context."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        store_dir: Path,
        on_series_complete: SeriesCallback | None = None,
        *,
        bind_address: str = "127.0.0.1",
        series_timeout_s: float = 10.0,
        release_grace_s: float = 1.0,
        allowed_calling_aets: Sequence[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        checks = (ae_title_problem(ae_title, "ae_title"), port_problem(port, "port", True))
        problems = [p for p in checks if p]
        if series_timeout_s <= 0 or release_grace_s < 0:
            problems.append(
                "series_timeout_s must be positive and release_grace_s not negative. Received: "
                f"series_timeout_s={series_timeout_s}, release_grace_s={release_grace_s}"
            )
        if problems:
            raise ValueError("listener: " + "; ".join(problems))
        self.ae_title = ae_title
        self._requested_port = port
        self.store_dir = Path(store_dir)
        self.on_series_complete = on_series_complete
        self.bind_address = bind_address
        self.series_timeout_s = float(series_timeout_s)
        self.release_grace_s = float(release_grace_s)
        self.allowed_calling_aets = list(allowed_calling_aets) if allowed_calling_aets else None
        self.ssl_context = ssl_context
        self._incoming_root = self.store_dir / pacs_store.INCOMING
        self._lock = threading.Lock()
        self._pending: dict[Path, _Incoming] = {}
        self._captures: dict[str, _Capture] = {}
        self._discard_until: dict[str, float] = {}
        self._ae: AE | None = None
        self._server: Any = None
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    @classmethod
    def from_settings(
        cls, settings: ListenerSettings, on_series_complete: SeriesCallback | None = None
    ) -> Listener:
        return cls(
            settings.ae_title,
            settings.port,
            settings.store_dir or default_store_dir(),
            on_series_complete,
            bind_address=settings.bind_address,
            series_timeout_s=settings.series_timeout_s,
        )

    # ------------------------------------------------------------------ life cycle

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when created with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    def start(self) -> Listener:
        if self._server is not None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        pacs_store.sweep_partials(self.store_dir)
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.allowed_calling_aets:
            ae.require_calling_aet = self.allowed_calling_aets
        ae.maximum_associations = 10
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
        ]
        self._adopt_leftovers()
        try:
            self._server = ae.start_server(
                (self.bind_address, self._requested_port),
                block=False,
                evt_handlers=handlers,  # type: ignore[arg-type]
                ssl_context=self.ssl_context,
            )
        except OSError as exc:
            raise ListenerError(
                f"listener {self.ae_title!r} cannot listen on {self.bind_address}:"
                f"{self._requested_port}: {exc.strerror or exc} (is another program using "
                "the port?)"
            ) from exc
        self._ae = ae
        self._stop.clear()
        self._monitor = threading.Thread(
            target=self._watch, name=f"ich-listener-{self.ae_title}", daemon=True
        )
        self._monitor.start()
        log.info(
            "listener %s on %s:%d, storing into %s",
            self.ae_title,
            self.bind_address,
            self.port,
            self.store_dir,
        )
        return self

    def stop(self) -> None:
        """Stop listening; series still incoming are completed after the next start."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
        self._stop.set()
        self._wake.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10)
            self._monitor = None
        with self._lock:
            self._pending.clear()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pending(self) -> list[tuple[Path, int]]:
        """Series being received: (incoming folder, instances so far)."""
        with self._lock:
            return [(p.folder, p.count) for p in self._pending.values()]

    # ------------------------------------------------------------------ C-MOVE capture

    @contextlib.contextmanager
    def capture(
        self, study_uid: str, store: StoreFn, cancelled: CancelFn | None = None
    ) -> Iterator[None]:
        """Route instances of ``study_uid`` to ``store`` while the block runs.

        If the block fails or is cancelled, stragglers of that study that the PACS still
        sends are refused for ``series_timeout_s``, so they never appear as a pushed series.
        """
        if self._server is None:
            raise ListenerError(f"listener {self.ae_title!r} is not running")
        with self._lock:
            if study_uid in self._captures:
                raise RuntimeError(f"study {study_uid} is already being retrieved")
            self._captures[study_uid] = _Capture(store, cancelled)
            self._discard_until.pop(study_uid, None)
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._captures.pop(study_uid, None)
                if not ok:
                    self._discard_until[study_uid] = time.monotonic() + self.series_timeout_s

    # ------------------------------------------------------------------ handlers

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
        except Exception as exc:  # undecodable data from the network
            log.warning("listener %s: an instance could not be decoded: %s", self.ae_title, exc)
            return _CANNOT_UNDERSTAND
        sop = str(event.request.AffectedSOPInstanceUID)
        study = dataset_text(ds, "StudyInstanceUID", 128)
        series = dataset_text(ds, "SeriesInstanceUID", 128)
        if not study or not series or dataset_text(ds, "SOPInstanceUID", 128) != sop:
            log.warning("listener %s: refused an instance without consistent UIDs", self.ae_title)
            return _BAD_DATA
        now = time.monotonic()
        with self._lock:
            capture = self._captures.get(study)
            discard = self._discard_until.get(study, 0.0) > now
        if capture is not None:
            if capture.cancelled is not None and capture.cancelled():
                return _REFUSED
            return capture.store(ds, event.encoded_dataset(), sop)
        if discard:
            return _REFUSED
        path = pacs_store.instance_path(self._incoming_root, study, series, sop)
        data = event.encoded_dataset()
        sender = id(event.assoc)
        with self._lock:  # the watcher never moves a folder while a file goes into it
            try:
                pacs_store.write_atomic(path, data)
            except OSError as exc:
                log.error("listener %s: could not write %s: %s", self.ae_title, path, exc)
                return _REFUSED
            inc = self._pending.get(path.parent)
            if inc is None:
                inc = self._pending[path.parent] = _Incoming(path.parent)
            inc.count += 1
            inc.last = time.monotonic()
            inc.senders.add(sender)
            inc.released_at = None
        return 0x0000

    def _on_end(self, event: Any) -> None:
        sender = id(event.assoc)
        now = time.monotonic()
        with self._lock:
            for inc in self._pending.values():
                if sender in inc.senders:
                    inc.senders.discard(sender)
                    if not inc.senders:
                        inc.released_at = now
        self._wake.set()

    # ------------------------------------------------------------------ completion

    def _adopt_leftovers(self) -> None:
        """Series left incoming by an earlier run: complete them after the grace period."""
        if not self._incoming_root.is_dir():
            return
        now = time.monotonic()
        with self._lock:
            for study in self._incoming_root.iterdir():
                for series in study.iterdir() if study.is_dir() else ():
                    n = len(list(series.glob("*" + pacs_store.SUFFIX))) if series.is_dir() else 0
                    if n:
                        self._pending[series] = _Incoming(series, n, now, set(), now)
        if self._pending:
            log.info("listener %s: %d series left incoming", self.ae_title, len(self._pending))

    def _due(self, inc: _Incoming, now: float) -> bool:
        if now - inc.last >= self.series_timeout_s:
            return True
        return inc.released_at is not None and now - inc.released_at >= self.release_grace_s

    def _watch(self) -> None:
        tick = max(0.05, min(0.5, self.release_grace_s / 4, self.series_timeout_s / 4))
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            for folder in self._complete_due():
                if self.on_series_complete is None:
                    continue
                try:
                    self.on_series_complete(folder)
                except Exception:
                    log.exception("listener %s: on_series_complete failed", self.ae_title)

    def _complete_due(self) -> list[Path]:
        done: list[Path] = []
        now = time.monotonic()
        with self._lock:
            for key, inc in list(self._pending.items()):
                if not self._due(inc, now):
                    continue
                del self._pending[key]
                dst = self.store_dir / inc.folder.parent.name / inc.folder.name
                try:
                    pacs_store.merge_series(inc.folder, dst)
                except OSError as exc:
                    log.error("listener %s: could not move %s: %s", self.ae_title, inc.folder, exc)
                    continue
                with contextlib.suppress(OSError):
                    inc.folder.parent.rmdir()  # the study folder, once its last series moved
                log.info("listener %s: series complete, %d instance(s)", self.ae_title, inc.count)
                done.append(dst)
            stale = [s for s, t in self._discard_until.items() if t < now]
            for s in stale:
                del self._discard_until[s]
        return done
