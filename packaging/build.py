"""Build the ich-viewer desktop bundle for Linux: one self-contained folder and its .tar.gz.

    .venv/bin/python packaging/build.py [--dist DIR] [--work DIR] [--no-tar] ...

Steps: PyInstaller runs packaging/ich-viewer.spec into DIST/ich-viewer/; the launcher
files (.desktop, icon, install.sh) and a README go next to the executable; the bundled
weights, if any, are converted to ONNX once here so the app never has to at first start;
the big libraries lose their symbol tables; the size and the oldest glibc it runs on are
printed; DIST/ich-viewer-VERSION-linux-ARCH.tar.gz is written. Needs PyInstaller in the
environment that runs this script (``pip install pyinstaller``) and binutils (strip,
readelf; without them the bundle is bigger and nothing else changes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = HERE / "ich-viewer.spec"
NAME = "ich-viewer"
LAUNCHER_FILES = ("ich-viewer.desktop", "ich-viewer.svg", "ich-viewer.png", "install.sh")
BUNDLED_WEIGHTS = ROOT / "resources" / "weights" / "ich_xception_lstm.weights.h5"
#: Strip a library only when this much of it is symbol table.
MIN_STRIP_GAIN = 256 * 1024
#: Lines of TensorFlow's C++ logging that PyInstaller's helper processes print.
_NOISE = re.compile(r"^(I0000|E0000|W0000|WARNING: All log messages before absl|To enable the)")


@dataclass(frozen=True)
class Result:
    """What a build produced, for the summary and for tests."""

    folder: Path
    archive: Path | None
    folder_bytes: int
    n_files: int
    archive_bytes: int
    glibc: str
    seconds: dict[str, float]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _stream(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``, echoing its output without TensorFlow's C++ log lines."""
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not _NOISE.match(line):
                sys.stdout.write(line)
        return proc.wait()


def run_pyinstaller(dist: Path, work: Path, clean: bool, log_level: str) -> Path:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONNOUSERSITE="1")
    env.pop("KERAS_BACKEND", None)  # the bundle is built for (and with) the TensorFlow backend
    cmd = [sys.executable, "-m", "PyInstaller", str(SPEC), "--noconfirm"]
    cmd += ["--distpath", str(dist), "--workpath", str(work), "--log-level", log_level]
    if clean:
        cmd.append("--clean")
    rc = _stream(cmd, env)
    if rc != 0:
        raise SystemExit(f"build.py: PyInstaller failed (exit status {rc}); see the log above")
    folder = dist / NAME
    if not (folder / NAME).is_file():
        raise SystemExit(f"build.py: PyInstaller finished but {folder / NAME} is missing")
    return folder


def add_launcher_files(folder: Path, info: dict[str, object]) -> None:
    for name in LAUNCHER_FILES:
        shutil.copy2(HERE / name, folder / name)
    (folder / "install.sh").chmod(0o755)
    shutil.copy2(HERE / "README.md", folder / "README.md")
    (folder / "BUILD-INFO.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def convert_bundled_weights(folder: Path) -> Path | None:
    """The bundled weights as ONNX next to their copy in the bundle, where the runtime looks
    first (ich_model.runtime.find_cached); None (and a note) when there is nothing to do or
    the conversion fails: the app then converts at first use."""
    if not BUNDLED_WEIGHTS.is_file():
        print("no bundled weights (resources/weights): the app will say 'no model weights found'")
        return None
    from ich_model.runtime import ConversionError, altered, convert_in_child, onnx_file_name
    from ich_model.weights import read_manifest

    manifest, _ = read_manifest(BUNDLED_WEIGHTS)
    out = folder / "_internal" / "resources" / "weights" / onnx_file_name(manifest, "float32")
    if not out.is_file() or altered(out):  # resources/weights ships it (ich-train install)
        try:
            convert_in_child(BUNDLED_WEIGHTS, out)
        except ConversionError as exc:
            print(f"note: {exc}; the app will convert the weights at first use")
            return None
    size = human(out.stat().st_size)
    print(f"bundled weights as ONNX: {out.relative_to(folder)} ({size})")
    return out


def _elf_files(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield p


def _readelf(args: list[str], path: Path) -> str:
    proc = subprocess.run(["readelf", *args, str(path)], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def _strip_gain(path: Path) -> int:
    """Bytes of symbol table and debug info in ``path``; 0 for a library that auditwheel
    rewrote with patchelf (RUNPATH into a ``*.libs`` folder): strip can break those."""
    if ".libs" in path.parent.name:
        return 0
    dynamic = _readelf(["-d", "-W"], path)
    if re.search(r"\((RUNPATH|RPATH)\).*\.libs", dynamic):
        return 0
    gain = 0
    for m in re.finditer(
        r"\]\s+(\.symtab|\.strtab|\.debug\w*)\s+\S+\s+\S+\s+(\S+)\s+(\S+)",
        _readelf(["-S", "-W"], path),
    ):
        gain += int(m.group(3), 16)
    return gain


def strip_libraries(folder: Path) -> int:
    """Strip symbol tables (not the dynamic symbols) from the libraries under ``_internal``
    where it saves something; the executable itself carries PyInstaller's archive and is
    never touched. Returns the bytes saved."""
    if shutil.which("strip") is None or shutil.which("readelf") is None:
        print("note: strip/readelf not found (binutils): libraries left unstripped")
        return 0
    files = list(_elf_files(folder / "_internal"))
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        gains = list(pool.map(_strip_gain, files))
    todo = [f for f, g in zip(files, gains, strict=True) if g >= MIN_STRIP_GAIN]
    before = sum(f.stat().st_size for f in todo)

    def strip(path: Path) -> None:
        subprocess.run(["strip", "--strip-all", "--preserve-dates", str(path)], check=True)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(strip, todo))
    saved = before - sum(f.stat().st_size for f in todo)
    print(f"stripped {len(todo)} libraries: {human(saved)} saved")
    return saved


def oldest_glibc(folder: Path) -> str:
    """The newest GLIBC_x.y symbol version any bundled binary needs: the bundle runs on
    Linux distributions with this glibc or newer."""
    if shutil.which("readelf") is None:
        return "unknown"
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        texts = pool.map(lambda p: _readelf(["-V", "-W"], p), _elf_files(folder))
        versions = {
            tuple(int(x) for x in v.split("."))
            for t in texts
            for v in re.findall(r"Name: GLIBC_(\d+(?:\.\d+)+)", t)
        }
    return ".".join(map(str, max(versions))) if versions else "unknown"


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under ``folder``; symbolic links count nothing."""
    total = n = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
                n += 1
    return total, n


def make_archive(folder: Path, out: Path, top: str, level: int) -> Path:
    """``out`` (.tar.gz) with ``folder`` as ``top/``, owned by root, in sorted order."""

    def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:gz", compresslevel=level, format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=top, filter=owner)  # tarfile sorts directory listings
    tmp.replace(out)
    return out


def largest(folder: Path, n: int = 5) -> list[tuple[int, str]]:
    sizes = [
        (p.stat().st_size, str(p.relative_to(folder)))
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    return sorted(sizes, reverse=True)[:n]


def build(
    dist: Path,
    work: Path,
    *,
    tar: bool = True,
    strip: bool = True,
    onnx: bool = True,
    clean: bool = False,
    level: int = 6,
    log_level: str = "WARN",
) -> Result:
    if not sys.platform.startswith("linux"):
        raise SystemExit("build.py: this recipe builds the Linux bundle; run it on Linux")
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        raise SystemExit(
            "build.py: PyInstaller is not installed in this environment: "
            f"{sys.executable} -m pip install pyinstaller"
        ) from None
    from PyInstaller import __version__ as pyinstaller_version

    version = project_version()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    folder = run_pyinstaller(dist, work, clean, log_level)
    seconds["pyinstaller"] = time.perf_counter() - t

    t = time.perf_counter()
    if onnx:
        convert_bundled_weights(folder)
    seconds["onnx"] = time.perf_counter() - t
    t = time.perf_counter()
    if strip:
        strip_libraries(folder)
    seconds["strip"] = time.perf_counter() - t

    glibc = oldest_glibc(folder)
    info = {
        "name": NAME,
        "version": version,
        "commit": git_commit(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": f"linux-{platform.machine()}",
        "python": platform.python_version(),
        "pyinstaller": pyinstaller_version,
        "glibc_min": glibc,
        "weights_bundled": BUNDLED_WEIGHTS.is_file(),
    }
    add_launcher_files(folder, info)
    size, n_files = folder_size(folder)

    archive = None
    archive_bytes = 0
    t = time.perf_counter()
    if tar:
        top = f"{NAME}-{version}"
        out = dist / f"{top}-linux-{platform.machine()}.tar.gz"
        archive = make_archive(folder, out, top, level)
        archive_bytes = archive.stat().st_size
    seconds["archive"] = time.perf_counter() - t
    return Result(folder, archive, size, n_files, archive_bytes, glibc, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "build" / "pyinstaller",
        help="PyInstaller's work folder; reused by the next build (default build/pyinstaller/)",
    )
    p.add_argument("--no-tar", action="store_true", help="skip the .tar.gz")
    p.add_argument("--no-strip", action="store_true", help="keep the libraries' symbol tables")
    p.add_argument(
        "--no-onnx", action="store_true", help="do not convert the bundled weights to ONNX here"
    )
    p.add_argument("--clean", action="store_true", help="empty PyInstaller's caches first")
    p.add_argument(
        "--compresslevel", type=int, default=6, choices=range(1, 10), metavar="1-9",
        help="gzip level of the archive (default 6)",
    )  # fmt: skip
    p.add_argument("--log-level", default="WARN", help="PyInstaller's log level (default WARN)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    r = build(
        args.dist.resolve(),
        args.work.resolve(),
        tar=not args.no_tar,
        strip=not args.no_strip,
        onnx=not args.no_onnx,
        clean=args.clean,
        level=args.compresslevel,
        log_level=args.log_level,
    )
    total = time.perf_counter() - t0
    print()
    print(f"bundle   {r.folder}  {human(r.folder_bytes)} in {r.n_files} files")
    if r.archive is not None:
        print(f"archive  {r.archive}  {human(r.archive_bytes)}")
    print(f"runs on  Linux {platform.machine()} with glibc {r.glibc} or newer")
    print("largest  " + "\n         ".join(f"{human(s):>10}  {n}" for s, n in largest(r.folder)))
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items() if v >= 0.5)
    print(f"time     {total / 60:.1f} min ({steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
