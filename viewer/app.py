"""``ich-viewer [PATH ...]``: open a head CT and show the model's second opinion.

Without PATH the bundled demo study opens (if it is installed). The window appears
at once; TensorFlow and the weights load in the background. ``--screenshot FILE``
loads the study, waits for the model, saves a picture of the window and exits
(for documentation and tests; it never waits on a dialog).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from PySide6.QtCore import QEventLoop, QObject, QTimer
from PySide6.QtWidgets import QApplication

from ich_model import NOT_FOR_DIAGNOSIS, __version__
from ich_model.labels import LABELS
from ich_model.weights import RESOURCES
from ich_model.windowing import WindowPreset
from viewer.qt_batch import install_batch
from viewer.qt_main_window import SETTINGS_APP, SETTINGS_ORG, QtMainWindow
from viewer.qt_pacs import install_pacs
from viewer.qt_theme import apply_dark_theme

log = logging.getLogger(__name__)

DEMO_STUDY = RESOURCES / "demo"
_SETTLE_POLLS = 3  # quiet polls of 100 ms before a screenshot is taken

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ich-viewer",
        description="Head CT viewer with an intracranial hemorrhage second opinion "
        f"({NOT_FOR_DIAGNOSIS}).",
    )
    p.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="DICOM folder, files or DICOMDIR (default: the bundled demo study)",
    )
    p.add_argument(
        "--weights", type=Path, metavar="FILE", help="weights (.weights.h5) or their manifest"
    )
    p.add_argument(
        "--screenshot",
        type=Path,
        metavar="FILE.png",
        help="load the study, wait for the model, save a PNG of the window and exit",
    )
    p.add_argument(
        "--slice",
        type=int,
        metavar="K",
        help="with --screenshot: show slice K (1 = feet end); default: the most likely 'any' slice",
    )
    p.add_argument(
        "--window",
        choices=[w.name.lower() for w in WindowPreset],
        default="brain",
        help="window preset to start with (default: brain)",
    )
    p.add_argument("--heatmap", action="store_true", help="show the Grad-CAM heat map")
    p.add_argument("--heatmap-label", choices=LABELS, default="any", help="label of the heat map")
    p.add_argument(
        "--size", default="1440x900", metavar="WxH", help="window size (default 1440x900)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="with --screenshot: give up after this many s"
    )
    p.add_argument(
        "--exit-after-show",
        action="store_true",
        help="print the time the window was first painted (time.time()) and exit (benchmarks)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"ich-viewer {__version__}")
    return p


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(
            f"ich-viewer: --size must look like 1440x900. Received: {text!r}"
        ) from None
    return max(w, 640), max(h, 480)


def install_excepthook(window: QtMainWindow) -> ExceptHook:
    """Show unexpected errors (in slots and event handlers) instead of aborting; returns the
    previous hook so that it can be put back."""
    previous = sys.excepthook
    ref = weakref.ref(window)

    def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(etype, KeyboardInterrupt):
            previous(etype, value, tb)
            return
        log.error("unexpected error:\n%s", "".join(traceback.format_exception(etype, value, tb)))
        w = ref()
        if w is not None:
            w.report_error(f"Unexpected error: {etype.__name__}: {value}")

    sys.excepthook = hook
    return previous


class _ScreenshotRunner(QObject):
    """Waits until the window is idle, sets the requested view, waits again, saves, quits."""

    def __init__(self, window: QtMainWindow, args: argparse.Namespace, loop: QEventLoop) -> None:
        super().__init__(window)
        self.window = window
        self.args = args
        self.loop = loop
        self.rc = 0
        self._quiet = 0
        self._stage = 0
        self._deadline = time.monotonic() + args.timeout
        self._timer = QTimer(self)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        self._timer.start()

    def _poll(self) -> None:
        timed_out = time.monotonic() > self._deadline
        self._quiet = 0 if self.window.is_busy() else self._quiet + 1
        if self._quiet < _SETTLE_POLLS and not timed_out:
            return
        if timed_out:
            log.error(
                "--screenshot: still busy after %.0f s; saving what is shown", self.args.timeout
            )
            self.rc = 1
        if self._stage == 0 and not timed_out:
            self._stage, self._quiet = 1, 0
            self._set_view()
            return
        self._save()

    def _set_view(self) -> None:
        w, a = self.window, self.args
        if a.slice is not None:
            w.set_slice(a.slice - 1)
        elif w.scores is not None:
            k = w.scores.argmax("any")
            if k is not None:
                w.set_slice(k)
        if a.heatmap:
            w.findings.heatmap_label.setCurrentIndex(LABELS.index(a.heatmap_label))
            w.set_heatmap_enabled(True)

    def _save(self) -> None:
        self._timer.stop()
        w = self.window
        if (self.args.paths or DEMO_STUDY.is_dir()) and w.series is None:
            self.rc = 1
        QApplication.processEvents()
        path: Path = self.args.screenshot
        path.parent.mkdir(parents=True, exist_ok=True)
        if not w.grab().save(str(path), "PNG"):
            log.error("%s: cannot write the screenshot", path)
            self.rc = 1
        else:
            log.info("screenshot saved to %s", path)
        self.loop.quit()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.perf_counter()
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication([sys.argv[0]])
    app.setApplicationName(SETTINGS_APP)
    app.setOrganizationName(SETTINGS_ORG)
    app.setApplicationVersion(__version__)
    apply_dark_theme(app)

    screenshot = args.screenshot is not None
    window = QtMainWindow(
        weights=args.weights,
        dialogs=not screenshot,
        remember=not (screenshot or args.exit_after_show),
        load_model=not args.exit_after_show,
    )
    # File ▸ Batch score folder…, File ▸ Export DICOM SR and key images…, the PACS menu
    install_batch(window)
    install_pacs(window, autostart=not (screenshot or args.exit_after_show))
    previous_hook = install_excepthook(window)
    try:
        window.apply_preset(WindowPreset[args.window.upper()])
        if screenshot or args.exit_after_show:
            window.resize(*_parse_size(args.size))
        window.show()
        if args.exit_after_show:
            app.processEvents()
            print(
                f"shown {time.time():.6f} after {time.perf_counter() - t0:.3f} s in main",
                flush=True,
            )
            return 0
        paths = list(args.paths) or ([DEMO_STUDY] if DEMO_STUDY.is_dir() else [])
        if paths:
            window.open_paths(paths)
        if screenshot:
            loop = QEventLoop()
            runner = _ScreenshotRunner(window, args, loop)
            loop.exec()
            return runner.rc
        return int(app.exec())
    finally:
        window.shutdown()
        window.close()
        window.deleteLater()
        sys.excepthook = previous_hook


if __name__ == "__main__":
    raise SystemExit(main())
