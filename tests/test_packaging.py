"""The desktop bundle (packaging/, issue 9): build it with PyInstaller, unpack the .tar.gz
somewhere else, install it for a throw-away user, and run the built executable.

The runs cover what the bundle must carry besides the viewer: the demo study and the
resources path, ONNX Runtime with a tf2onnx conversion at first use, TensorFlow (Grad-CAM),
pydicom's JPEG / JPEG-LS / JPEG 2000 / RLE decoders found through pylibjpeg's entry
points, and Qt's offscreen and (under Xvfb) X11 platforms. The screenshots are kept in
build/test-packaging/screenshots/.

Slow (PyInstaller takes minutes): marked ``slow`` and ``packaging``; skipped when
PyInstaller is not installed. PyInstaller's work folder is build/test-packaging/ and is
reused, so a rerun with unchanged inputs skips most of the analysis; the bundle itself
goes to a temporary folder that is removed afterwards (screenshots are kept).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from tests.xvfb import xvfb_display

pytestmark = [
    pytest.mark.slow,
    pytest.mark.packaging,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bundle is Linux only"),
]

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
DEMO = ROOT / "resources" / "demo"
BUNDLED_WEIGHTS = ROOT / "resources" / "weights" / "ich_xception_lstm.weights.h5"
WORK = ROOT / "build" / "test-packaging"
SCREENSHOTS = WORK / "screenshots"  # kept for people and CI artifacts (build/ is git-ignored)
#: Without resources/ (weights, demo) the stripped bundle is about 1.5 GiB, nearly all
#: TensorFlow; more means something big came in (another framework, unused Qt modules).
MAX_BUNDLE_BYTES = int(1.6 * 2**30)
#: Qt libraries the viewer never uses and the bundle must not carry.
UNWANTED_QT = ("Qml", "Quick", "WebEngine", "3D", "Multimedia", "Pdf", "Designer", "Test")
APP_TIMEOUT_S = 300


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ich_packaging_build", PACKAGING / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Bundle:
    folder: Path  # the bundle unpacked from the .tar.gz (not the one PyInstaller wrote)
    archive: Path
    result: object  # packaging/build.py's Result


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    pytest.importorskip(
        "PyInstaller",
        reason="PyInstaller is not installed (pip install pyinstaller, in the dev extra); "
        "the desktop bundle cannot be built",
    )
    build = _load_build()
    base = tmp_path_factory.mktemp("bundle")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        result = build.build(base / "dist", WORK, tar=True, strip=True, onnx=True, level=1)
        print(
            f"bundle {build.human(result.folder_bytes)} in {result.n_files} files, archive "
            f"{build.human(result.archive_bytes)}, glibc {result.glibc}, {result.seconds}"
        )
        unpacked = base / "unpacked"
        with tarfile.open(result.archive) as tar:
            tar.extractall(unpacked, filter="tar")
        (folder,) = unpacked.iterdir()
        shutil.rmtree(result.folder)  # from here on only the unpacked copy exists
        yield Bundle(folder, result.archive, result)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away user: settings, Keras config and the model cache land here."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def installed(bundle: Bundle, home: Path) -> Iterator[Path]:
    """install.sh run for the throw-away user; yields the command it put on the PATH."""
    env = _clean_env(home)
    run = subprocess.run(
        [str(bundle.folder / "install.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    yield home / ".local" / "bin" / "ich-viewer"
    subprocess.run([str(bundle.folder / "install.sh"), "--uninstall"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def compressed_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The demo series with every slice compressed, cycling through the lossless transfer
    syntaxes we can write here: JPEG 2000, RLE, JPEG-LS and, with dcmtk, JPEG lossless."""
    folder = tmp_path_factory.mktemp("compressed")
    syntaxes: list[str] = ["j2k", "rle", "jls"]
    if shutil.which("dcmcjpeg"):
        syntaxes.append("jpeg-lossless")
    for k, src in enumerate(sorted(DEMO.glob("*.dcm"))):
        kind = syntaxes[k % len(syntaxes)]
        out = folder / src.name
        if kind == "jpeg-lossless":
            subprocess.run(["dcmcjpeg", "+e1", str(src), str(out)], check=True, timeout=60)
        else:
            ds = pydicom.dcmread(src)
            ds.compress({"j2k": JPEG2000Lossless, "rle": RLELossless, "jls": JPEGLSLossless}[kind])
            ds.save_as(out)
        # the fixture itself is right: each file decodes to the original pixels here
        assert np.array_equal(pydicom.dcmread(out).pixel_array, pydicom.dcmread(src).pixel_array)
    return folder, syntaxes


# ----------------------------------------------------------------------------- helpers


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No trace of the development environment: no venv, no PYTHONPATH, a fresh HOME."""
    keep = ("LANG", "LC_ALL", "TZ", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_RUNTIME_DIR=str(home / "run"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    (home / "run").mkdir(mode=0o700, exist_ok=True)
    env.update(extra)
    return env


def _run_app(exe: Path, args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run the bundled executable with ``-v``; its log (stdout and stderr) when it exits 0."""
    run = subprocess.run(
        [str(exe), *args, "-v", "--timeout", str(APP_TIMEOUT_S - 60)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=APP_TIMEOUT_S,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"exit status {run.returncode}\n{log[-6000:]}"
    return log


def _problems(log: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """Lines that mean the bundle lacks something: errors, tracebacks, and warnings from our
    packages (dropped slices, a missing decoder, the ONNX fallback)."""
    bad = re.compile(
        r"Traceback|ModuleNotFoundError|ImportError"
        r"|^[\d-]+ [\d:,]+ (ERROR|CRITICAL) "  # the app's log format (viewer.app)
        r"|^[\d-]+ [\d:,]+ WARNING (ich_model|viewer)[\w.]*: "
    )
    return [
        line
        for line in log.splitlines()
        if bad.search(line) and not any(a in line for a in allowed)
    ]


def _model_runtime(log: str) -> str:
    m = re.search(r"model \S+ loaded \((\w+)", log)
    assert m, "the model never loaded:\n" + log[-6000:]
    return m.group(1)


def _check_screenshot(path: Path, size: tuple[int, int] = (1440, 900)) -> None:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a PNG"
    assert image.shape[1::-1] == size
    assert float(image.std()) > 10.0  # not a blank window
    assert len(np.unique(image[::4, ::4].reshape(-1, 3), axis=0)) > 50


# ----------------------------------------------------------------------------- tests


def test_bundle_contents_and_size(bundle: Bundle) -> None:
    folder, internal = bundle.folder, bundle.folder / "_internal"
    assert os.access(folder / "ich-viewer", os.X_OK)
    assert os.access(folder / "install.sh", os.X_OK)
    for name in ("ich-viewer.desktop", "ich-viewer.svg", "ich-viewer.png", "README.md"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "BUILD-INFO.json").read_text())
    assert info["name"] == "ich-viewer" and info["weights_bundled"] == BUNDLED_WEIGHTS.is_file()

    demo = sorted(p.name for p in (internal / "resources" / "demo").glob("*.dcm"))
    assert demo == sorted(p.name for p in DEMO.glob("*.dcm"))
    assert (internal / "resources" / "weights" / BUNDLED_WEIGHTS.name).is_file() == (
        BUNDLED_WEIGHTS.is_file()
    )
    card = ROOT / "resources" / "MODEL_CARD.md"
    assert (internal / "resources" / "MODEL_CARD.md").is_file() == card.is_file()
    # pylibjpeg finds its plugins through these entry points
    eps = "".join(p.read_text() for p in internal.glob("pylibjpeg_*.dist-info/entry_points.txt"))
    for plugin in ("libjpeg:decode_pixel_data", "openjpeg:decode_pixel_data", "rle:decode_pixel"):
        assert plugin in eps
    for ext in ("_libjpeg.*.so", "_openjpeg.*.so", "rle/rle.*.so"):
        assert list(internal.glob(ext)), f"{ext}: a pylibjpeg plugin is missing"

    qt_libs = [p.name for p in (internal / "PySide6" / "Qt" / "lib").iterdir()]
    assert not [n for n in qt_libs if any(f"Qt6{u}" in n for u in UNWANTED_QT)], qt_libs
    for gone in (
        "tensorboard",
        "PySide6/Qt/translations",
        "PySide6/Qt/qml",
        "PySide6/Qt/plugins/platformthemes/libqgtk3.so",
        "tensorflow/include",
        "grpc",
    ):
        assert not (internal / gone).exists(), gone
    assert not list(internal.rglob("*_test.pyc")) and not list(internal.rglob("*_test.py"))

    resources = sum(p.stat().st_size for p in (internal / "resources").rglob("*") if p.is_file())
    size = bundle.result.folder_bytes - resources  # type: ignore[attr-defined]
    assert size < MAX_BUNDLE_BYTES, f"the bundle grew to {size / 2**30:.2f} GiB without weights"


def test_install_script_adds_command_menu_entry_and_icon(bundle: Bundle, installed: Path) -> None:
    share = installed.parent.parent / "share"
    assert installed.is_symlink() and installed.resolve() == (bundle.folder / "ich-viewer")
    desktop = (share / "applications" / "ich-viewer.desktop").read_text()
    assert f'Exec="{bundle.folder / "ich-viewer"}" %F' in desktop
    assert "Icon=ich-viewer" in desktop and "Type=Application" in desktop
    assert (share / "icons" / "hicolor" / "scalable" / "apps" / "ich-viewer.svg").is_file()
    assert (share / "icons" / "hicolor" / "256x256" / "apps" / "ich-viewer.png").is_file()


@pytest.fixture(scope="module")
def demo_run(installed: Path, home: Path, tiny_weights: Path, tmp_path_factory) -> tuple[str, Path]:
    """The installed command (a symlink), offscreen, on the bundled demo study, with weights
    that have no ONNX model yet: returns the log and the cache it converted into."""
    cache = tmp_path_factory.mktemp("model-cache")
    shot = SCREENSHOTS / "bundle-demo.png"
    env = _clean_env(home, QT_QPA_PLATFORM="offscreen", ICH_CACHE_DIR=str(cache))
    args = ["--weights", str(tiny_weights), "--screenshot", str(shot)]
    log = _run_app(installed, args, env, cwd=cache)
    print(f"screenshot: {shot}")
    return log, cache


def test_bundled_app_converts_and_scores_the_demo_study(demo_run: tuple[str, Path]) -> None:
    """tf2onnx converts the weights inside the bundle and ONNX Runtime scores them."""
    log, cache = demo_run
    assert not _problems(log), "\n".join(_problems(log))
    assert _model_runtime(log) == "onnxruntime"
    assert list(cache.glob("*.onnx")), "no ONNX model was converted"
    _check_screenshot(SCREENSHOTS / "bundle-demo.png")


def test_bundled_app_reads_compressed_series_and_shows_gradcam(
    bundle: Bundle,
    home: Path,
    tiny_weights: Path,
    compressed_series: tuple[Path, list[str]],
    demo_run: tuple[str, Path],
) -> None:
    """Every slice decodes inside the bundle (none dropped with a warning) and Grad-CAM runs
    on TensorFlow; on X11 under Xvfb when it is installed, else offscreen. Uses the ONNX
    model the demo run converted. JPEG lossless has no decoder but pylibjpeg-libjpeg here,
    so those slices show that the entry points work; JPEG 2000 and RLE could also fall back
    to Pillow and pydicom's own RLE decoder."""
    series, syntaxes = compressed_series
    print(f"transfer syntaxes: {', '.join(syntaxes)}")
    cache = demo_run[1]
    shot = SCREENSHOTS / "bundle-compressed-gradcam.png"
    with xvfb_display() as display:
        platform = {"DISPLAY": display, "QT_QPA_PLATFORM": "xcb"} if display else {}
        env = _clean_env(
            home, **(platform or {"QT_QPA_PLATFORM": "offscreen"}), ICH_CACHE_DIR=str(cache)
        )
        args = [str(series), "--weights", str(tiny_weights), "--screenshot", str(shot)]
        log = _run_app(bundle.folder / "ich-viewer", [*args, "--heatmap"], env, cwd=cache)
    print(f"screenshot: {shot} ({'X11' if display else 'offscreen'})")
    assert not _problems(log), "\n".join(_problems(log))
    assert _model_runtime(log) == "onnxruntime"
    _check_screenshot(shot)


def test_bundled_app_without_weights_argument(bundle: Bundle, home: Path, tmp_path: Path) -> None:
    """The bundled weights when there are any; otherwise the app says there are none."""
    shot = SCREENSHOTS / "bundle-default-weights.png"
    env = _clean_env(home, QT_QPA_PLATFORM="offscreen", ICH_CACHE_DIR=str(tmp_path / "cache"))
    log = _run_app(bundle.folder / "ich-viewer", ["--screenshot", str(shot)], env, cwd=tmp_path)
    if BUNDLED_WEIGHTS.is_file():
        assert not _problems(log), "\n".join(_problems(log))
        assert _model_runtime(log) == "onnxruntime"
        # converted at build time and shipped next to the weights: nothing to convert now
        assert not list((tmp_path / "cache").glob("*.onnx"))
    else:
        assert "no model weights found" in log
        assert not _problems(log, allowed=("no model weights found",))
    _check_screenshot(shot)


def test_icon_matches_its_generator() -> None:
    spec = importlib.util.spec_from_file_location("ich_make_icon", PACKAGING / "make_icon.py")
    assert spec is not None and spec.loader is not None
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    assert (PACKAGING / "ich-viewer.svg").read_text(encoding="utf-8") == make_icon.render_svg(), (
        "packaging/ich-viewer.svg is out of date: run packaging/make_icon.py"
    )
    png = cv2.imread(str(PACKAGING / "ich-viewer.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.shape == (256, 256, 4)
