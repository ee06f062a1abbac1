"""How responsive the viewer is. Prints numbers; not a test.

- time to first window: ``python -m viewer.app --exit-after-show`` in a subprocess, from
  launch to the first painted window (the app prints ``time.time()`` then), median of runs;
- the longest stall of the GUI thread while the model loads, while it scores a 40-slice
  512 x 512 phantom series (idle, and while scrolling at 20 Hz), and while it computes a
  Grad-CAM map: a 10 ms QTimer records the largest gap between its ticks (target < 100 ms);
- frames per second while scrolling that series (key presses, each followed by the full
  repaint) with the probability overlay and strip shown, with and without the heat map
  (target >= 30).

By default the model is the paper's full-width Xception-LSTM at 299 px with seeded random
weights (timing does not depend on training), made once in ``$ICH_CACHE_DIR/bench`` (or the
temp folder), the same file ``bench_inference.py`` uses. The runtime is what the app picks
(``$ICH_RUNTIME``, default auto). Pause other CPU-heavy jobs for stable numbers.

    python benchmarks/bench_viewer.py [--weights FILE] [--platform offscreen|xcb]
        [--runs 5] [--frames 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def bench_folder() -> Path:
    folder = Path(os.environ.get("ICH_CACHE_DIR") or tempfile.gettempdir()) / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def default_weights(folder: Path, size: int = 299) -> Path:
    """The paper's full-width model at ``size`` with seeded random weights (made in a child)."""
    path = folder / f"bench-xception-lstm-{size}.weights.h5"
    if not path.is_file():
        code = (
            "import keras, sys; from pathlib import Path;"
            "from ich_model.model import ModelConfig, build_model, save_weights;"
            f"cfg = ModelConfig(input_size={size}); keras.utils.set_random_seed(0);"
            f"save_weights(build_model(cfg), cfg, Path({str(path)!r}), trained=False,"
            " hu_range=(0.0, 80.0))"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return path


def phantom(folder: Path) -> Path:
    from ich_model.phantom import PhantomSpec, write_series

    study = folder / "phantom-40"
    if not study.is_dir():
        write_series(study, PhantomSpec(n_slices=40, subtypes=("subdural",), seed=3))
    return study


# ----------------------------------------------------------------------------- first window


def first_window(runs: int, platform: str) -> list[float]:
    env = {**os.environ, "QT_QPA_PLATFORM": platform, "PYTHONPATH": str(ROOT)}
    out = []
    for _ in range(runs):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "viewer.app", "--exit-after-show"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("shown ")), "")
        if not line:
            raise SystemExit(f"--exit-after-show printed nothing: {proc.stderr[-2000:]}")
        out.append(float(line.split()[1]) - t0)
    return out


# ----------------------------------------------------------------------------- in process


class StallMeter:
    """A 10 ms QTimer on the GUI thread; the largest gap between ticks is the longest stall."""

    def __init__(self) -> None:
        from PySide6.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last = 0.0
        self.gaps: list[float] = []

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last:
            self.gaps.append(now - self.last)
        self.last = now

    def start(self) -> None:
        self.gaps, self.last = [], 0.0
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        g = sorted(self.gaps) or [0.0]
        return {
            "max_ms": 1e3 * g[-1],
            "p99_ms": 1e3 * g[int(0.99 * (len(g) - 1))],
            "ticks": float(len(g)),
        }


def run_until(
    condition: Callable[[], bool], timeout: float, every: Callable[[], Any] | None = None
) -> float:
    """Spin the event loop (in 5 ms slices, like exec()) until ``condition``; returns seconds."""
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    t0 = time.perf_counter()
    next_call = t0
    while not condition():
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.WaitForMoreEvents, 5)
        if every is not None and time.perf_counter() >= next_call:
            every()
            next_call += 0.05
    return time.perf_counter() - t0


def fps(window: Any, frames: int) -> float:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    view = window.slice_view
    n = window.n_slices
    window.set_slice(0)
    QApplication.processEvents()
    step = Qt.Key.Key_Up
    t0 = time.perf_counter()
    for _ in range(frames):
        if window.current_index == n - 1:
            step = Qt.Key.Key_Down
        elif window.current_index == 0:
            step = Qt.Key.Key_Up
        QTest.keyClick(view, step)
        view.viewport().repaint()  # the frame is drawn now, not coalesced with the next
        window.strip.repaint()
        QApplication.processEvents()
    return frames / (time.perf_counter() - t0)


def in_process(args: argparse.Namespace, weights: Path, study: Path) -> None:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from viewer.qt_main_window import QtMainWindow
    from viewer.qt_theme import apply_dark_theme

    app = QApplication.instance() or QApplication([sys.argv[0]])
    apply_dark_theme(app)  # type: ignore[arg-type]
    settings = QSettings(str(bench_folder() / "bench-viewer.ini"), QSettings.Format.IniFormat)
    meter = StallMeter()

    meter.start()
    t0 = time.perf_counter()
    window = QtMainWindow(weights=weights, settings=settings, dialogs=False, remember=False)
    window.resize(1440, 900)
    window.show()
    run_until(lambda: window.model_state != "loading", 900)
    load = meter.stop()
    print(
        f"model load ({window.model_state}, {time.perf_counter() - t0:.1f} s): "
        f"longest GUI stall {load['max_ms']:.0f} ms (p99 {load['p99_ms']:.0f} ms)"
    )
    if window.model_state != "ready":
        raise SystemExit(f"the model did not load: {window.errors}")
    print(f"  runtime: {window.findings.status_label.text()}")

    done: list[bool] = []
    window.scoringFinished.connect(done.append)
    window.open_paths([study])
    run_until(lambda: window.series is not None, 300)
    meter.start()
    seconds = run_until(lambda: bool(done), 1800)
    idle = meter.stop()
    n = window.n_slices
    print(
        f"scoring {n} slices of 512 x 512 ({seconds:.1f} s, {n / seconds:.2f} slices/s), "
        f"GUI idle: longest stall {idle['max_ms']:.0f} ms (p99 {idle['p99_ms']:.0f} ms, "
        f"{idle['ticks']:.0f} ticks)"
    )

    done.clear()
    window.rescore()
    direction = [1]

    def scroll() -> None:
        if window.current_index in (0, n - 1):
            direction[0] = -direction[0] if window.current_index == n - 1 else 1
        window.set_slice(window.current_index + direction[0])

    meter.start()
    seconds = run_until(lambda: bool(done), 1800, every=scroll)
    busy = meter.stop()
    print(
        f"scoring again while scrolling at 20 Hz ({seconds:.1f} s): longest stall "
        f"{busy['max_ms']:.0f} ms (p99 {busy['p99_ms']:.0f} ms)"
    )

    rate = fps(window, args.frames)
    print(f"scrolling, probability overlay and strip shown: {rate:.0f} frames/s")

    meter.start()
    window.set_slice(n // 2)
    window.findings.heatmap_label.setCurrentIndex(1)  # intraparenchymal
    window.set_heatmap_enabled(True)
    seconds = run_until(lambda: not window.is_busy(), 900)
    cam = meter.stop()
    print(
        f"first Grad-CAM ({seconds:.1f} s, includes opening its ONNX session): longest stall "
        f"{cam['max_ms']:.0f} ms (p99 {cam['p99_ms']:.0f} ms)"
    )
    window.set_slice(n // 2 + 1)
    meter.start()
    seconds = run_until(lambda: not window.is_busy(), 900)
    cam2 = meter.stop()
    print(
        f"next Grad-CAM ({seconds:.2f} s with the 150 ms debounce): longest stall "
        f"{cam2['max_ms']:.0f} ms"
    )

    # Rendering cost does not depend on the map: reuse this one for every slice.
    import numpy as np

    rgba = next((v for v in window._heat_cache.values() if v is not None), None)
    if rgba is None:
        rgba = np.zeros((*window.series.hu.shape[1:], 4), np.uint8)
        rgba[..., 0] = rgba[..., 3] = 200
    for k in range(n):
        window._heat_cache[(window._token, k, window._heat_label)] = rgba
    rate = fps(window, args.frames)
    print(f"scrolling with the heat map as well: {rate:.0f} frames/s")
    window.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, help="weights to use (default: full-size random)")
    p.add_argument("--platform", default="offscreen", help="QT_QPA_PLATFORM (offscreen, xcb)")
    p.add_argument("--runs", type=int, default=5, help="launches for the first-window time")
    p.add_argument("--frames", type=int, default=300, help="frames per scrolling measurement")
    args = p.parse_args(argv)
    os.environ["QT_QPA_PLATFORM"] = args.platform
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} (other jobs skew every number)")

    times = first_window(args.runs, args.platform)
    print(
        f"first window ({args.platform}): median {statistics.median(times):.2f} s, "
        f"max {max(times):.2f} s over {len(times)} launches (target < 2 s)"
    )
    folder = bench_folder()
    weights = args.weights or default_weights(folder)
    print(f"weights: {weights}")
    in_process(args, weights, phantom(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
