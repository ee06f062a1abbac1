"""Where the model runs: ONNX Runtime on the CPU, TensorFlow on a GPU or as the fallback.

Why ONNX Runtime: on an ordinary CPU, Keras ``predict`` reaches about a third of the
machine's float32 matrix-multiply rate on the Xception-LSTM, ONNX Runtime about 80%
(benchmarks/bench_inference.py measures both). The Keras weights stay the single source
of truth; they are converted once (tf2onnx through ``keras.Model.export``, which keeps
the LSTM a single ``LSTM`` operator when the model is built with ``inference=True``),
checked against Keras on probe slices, and cached under a name keyed by the weights'
sha256 and :data:`CONVERTER_VERSION`. With the cached file present, scoring never
imports TensorFlow.

Choosing: ``runtime=`` (or the ``ICH_RUNTIME`` environment variable) is one of
:data:`RUNTIME_CHOICES`. ``auto`` takes TensorFlow when a GPU is present and ONNX Runtime
otherwise; a failed conversion falls back to TensorFlow with a logged warning. The
int8 model (static quantisation, calibrated on real slices) is used only after
:func:`accept_int8` (run by ``ich-train quantize``) has measured it against float32 on the
weights' own validation slices and found it within tolerance: its record, next to the
int8 file, names the weights' hash and the kind of CPU (:func:`cpu_key`) it holds for;
anywhere else float32 is used, and the log says why.

This module imports neither TensorFlow nor ONNX Runtime at import time.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ich_model.weights import Manifest, sha256_file

log = logging.getLogger(__name__)

RUNTIME_ENV = "ICH_RUNTIME"
CACHE_ENV = "ICH_CACHE_DIR"
RUNTIME_CHOICES = ("auto", "onnx", "onnx-int8", "tensorflow")
#: Bump when the conversion changes: cached files of other versions are then ignored.
#: 2: the last convolutional activations are a second output (Grad-CAM without TensorFlow).
CONVERTER_VERSION = 2
OPSET = 17
#: Largest difference from Keras a converted model may show on the probe slices.
ONNX_TOLERANCE = 1e-4
APP_DIR = "ich-second-opinion"
#: int8 is accepted only within these of float32 on validation slices.
INT8_AUC_TOLERANCE = 0.005
INT8_LOG_LOSS_RELATIVE = 0.02


class ConversionError(Exception):
    """The Keras -> ONNX conversion failed or its output differs from Keras; names the file."""


class Backend(Protocol):
    """What the Predictor needs from a runtime."""

    description: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model inputs ``[n, s, s, 3]`` float32 -> probabilities ``[n, 6]`` float32."""
        ...


# ----------------------------------------------------------------------------- choosing


def resolve_runtime(runtime: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The requested runtime: the argument, else ``$ICH_RUNTIME``, else ``auto``."""
    source = "runtime"
    if runtime is None:
        runtime = environ.get(RUNTIME_ENV) or "auto"
        source = RUNTIME_ENV
    choice = runtime.strip().lower().replace("_", "-")
    if choice == "tf":
        choice = "tensorflow"
    if choice == "int8":
        choice = "onnx-int8"
    if choice not in RUNTIME_CHOICES:
        close = difflib.get_close_matches(choice, RUNTIME_CHOICES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{source} must be one of {', '.join(RUNTIME_CHOICES)}. Received: {runtime!r}.{hint}"
        )
    return choice


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing TensorFlow (which costs seconds)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    except OSError:
        pass
    return Path("/dev/nvidia0").exists() or Path("/dev/dxg").exists()  # dxg: WSL2


def physical_cores() -> int:
    """Physical cores this process may run on: ORT runs best with one thread per core."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[str] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            siblings = (topo / "thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        cores.add(siblings)
    return max(1, len(cores))


# ----------------------------------------------------------------------------- the cache


def cache_dirs(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Candidate cache folders, preferred first (the bundled resources may be read-only)."""
    out: list[Path] = []
    if environ.get(CACHE_ENV):
        out.append(Path(environ[CACHE_ENV]))
    if environ.get("XDG_CACHE_HOME"):
        out.append(Path(environ["XDG_CACHE_HOME"]) / APP_DIR)
    elif sys.platform == "win32" and environ.get("LOCALAPPDATA"):
        out.append(Path(environ["LOCALAPPDATA"]) / APP_DIR / "cache")
    elif sys.platform == "darwin":
        out.append(Path.home() / "Library" / "Caches" / APP_DIR)
    else:
        out.append(Path.home() / ".cache" / APP_DIR)
    user = environ.get("USER") or environ.get("USERNAME") or str(getattr(os, "getuid", lambda: 0)())
    out.append(Path(tempfile.gettempdir()) / f"{APP_DIR}-{user}")
    return out


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError:
        return False
    return True


def writable_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The first cache folder we can write to."""
    candidates = cache_dirs(environ)
    for folder in candidates:
        if _writable(folder):
            return folder
        log.warning("cache folder %s is not writable; trying the next one", folder)
    raise ConversionError(
        f"no writable cache folder (tried {', '.join(map(str, candidates))}); "
        f"set {CACHE_ENV} to a folder you can write to"
    )


def onnx_file_name(manifest: Manifest, precision: str = "float32") -> str:
    """Cache file name: weights hash and converter version, so other weights never match."""
    return f"ich-{manifest.sha256[:24]}-c{CONVERTER_VERSION}-{precision}.onnx"


def hash_record_path(onnx_path: Path) -> Path:
    """The sha256 of a converted float32 model, written beside it by :func:`export_onnx`
    (``sha256sum -c`` reads it)."""
    return onnx_path.with_name(onnx_path.name + ".sha256")


def write_hash_record(onnx_path: Path) -> Path:
    record = hash_record_path(onnx_path)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{sha256_file(onnx_path)}  {onnx_path.name}\n", encoding="utf-8")
    os.replace(tmp, record)
    return record


def altered(onnx_path: Path) -> str | None:
    """Why the converted model at ``onnx_path`` is not the file its converter wrote (a
    missing record, or a hash that differs); None when it is."""
    record = hash_record_path(onnx_path)
    try:
        recorded = record.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        return f"no readable hash record {record.name} ({type(exc).__name__})"
    if recorded != sha256_file(onnx_path):
        return f"its sha256 differs from {record.name}: the file changed after conversion"
    return None


def find_cached(
    manifest: Manifest,
    weights_path: Path,
    precision: str = "float32",
    environ: Mapping[str, str] = os.environ,
) -> Path | None:
    """A converted model next to the weights (packagers may ship one) or in a cache folder.

    A float32 file is taken only when it is the file its converter wrote (its sha256 matches
    the record beside it); one that is not is named in a warning and passed over. (An int8
    file's hash is in its acceptance record: :func:`accepted_int8`.)
    """
    name = onnx_file_name(manifest, precision)
    for folder in [Path(weights_path).parent, *cache_dirs(environ)]:
        path = folder / name
        if not path.is_file():
            continue
        problem = altered(path) if precision == "float32" else None
        if problem is None:
            return path
        log.warning("%s: not used, %s", path, problem)
    return None


def onnx_metadata(manifest: Manifest, precision: str) -> dict[str, str]:
    """What a converted file records about its source; checked again when it is loaded."""
    return {
        "ich.weights_sha256": manifest.sha256,
        "ich.converter_version": str(CONVERTER_VERSION),
        "ich.precision": precision,
        "ich.input_size": str(manifest.input_size),
    }


# ----------------------------------------------------------------------------- Keras side


def build_keras(manifest: Manifest, weights_path: Path) -> Any:
    """The inference build of the network with the verified weights (imports TensorFlow)."""
    from ich_model.model import ModelConfig, build_model
    from ich_model.weights import WeightsError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cfg = ModelConfig.from_dict(manifest.architecture)
    model = build_model(cfg, inference=True)
    try:
        model.load_weights(str(weights_path))
    except Exception as exc:  # h5 errors, shape mismatches
        raise WeightsError(
            f"{weights_path}: cannot load into {cfg.name} "
            f"(width {cfg.width}, input {cfg.input_size}): {exc}"
        ) from exc
    return model


def probe_inputs(input_size: int, hu_range: Sequence[float] | None = None) -> np.ndarray:
    """Slices to compare a converted model with Keras on: phantom head CT plus edge cases."""
    from ich_model.phantom import render_slice
    from ich_model.windowing import model_input

    rng = np.random.default_rng(7)
    slices = [
        model_input(render_slice(rng, 256, subtypes, level)[0], input_size, hu_range)
        for subtypes, level in ((("subdural",), 0.6), (("intraparenchymal",), 0.45))
    ]
    slices.append(rng.random((input_size, input_size, 3), dtype=np.float32))
    slices.append(np.zeros((input_size, input_size, 3), np.float32))
    return np.stack(slices).astype(np.float32)


def _keras_predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False), dtype=np.float32)


def export_onnx(model: Any, manifest: Manifest, out: Path) -> Path:
    """Convert ``model`` with tf2onnx (via ``keras.Model.export``) and write ``out`` atomically.

    Nothing is downloaded. The converted file is checked against Keras on
    :func:`probe_inputs` before it replaces anything: a mismatch raises ``ConversionError``.
    """
    import onnx
    import tensorflow as tf

    size = manifest.input_size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="slices")
    t0 = time.perf_counter()
    quiet = [logging.getLogger(n) for n in ("tf2onnx", "absl")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():  # Keras's numpy-2 patch for tf2onnx warns
                warnings.simplefilter("ignore", FutureWarning)
                model.export(
                    str(tmp),
                    format="onnx",
                    input_signature=[spec],
                    opset_version=OPSET,
                    verbose=False,
                )
            proto = onnx.load(str(tmp))
        except Exception as exc:  # tf2onnx fails in many ways; any of them means fallback
            raise ConversionError(f"{out}: tf2onnx failed ({type(exc).__name__}: {exc})") from exc
        ops = {n.op_type for n in proto.graph.node}
        if "Loop" in ops or "LSTM" not in ops:
            raise ConversionError(
                f"{out}: the converted LSTM is not a plain LSTM operator (ops: {sorted(ops)}); "
                "was the model built with inference=True?"
            )
        from ich_model.gradcam import add_activations_output

        add_activations_output(proto)
        for key, value in onnx_metadata(manifest, "float32").items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        x = probe_inputs(size, manifest.hu_range)
        diff = float(np.abs(onnx_session(tmp, 1).predict(x) - _keras_predict(model, x)).max())
        if not diff <= ONNX_TOLERANCE:
            raise ConversionError(
                f"{out}: converted model differs from Keras by {diff:.2e} "
                f"(tolerance {ONNX_TOLERANCE:.0e}); not using it"
            )
        os.replace(tmp, out)
        write_hash_record(out)
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        tmp.unlink(missing_ok=True)
    log.info(
        "converted weights %s to ONNX in %.1f s (max diff from Keras %.1e): %s",
        manifest.short_hash,
        time.perf_counter() - t0,
        diff,
        out,
    )
    return out


# ----------------------------------------------------------------------------- backends


class OnnxBackend:
    """ONNX Runtime on the CPU, one single-threaded run per physical core on slices of a batch.

    Why data-parallel rather than one run with ``intra_op_num_threads = cores``: each core
    then works on its own slices with no barrier after every operator, which measured as
    fast on an idle machine and much faster on a busy one (a descheduled thread stalls
    every intra-op barrier). Batches smaller than the core count use an intra-op session.
    """

    def __init__(self, path: Path, threads: int | None = None, precision: str = "float32") -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(path)
        self.threads = max(1, threads or physical_cores())
        self.session = self._session(1)
        self._wide: Any = None  # intra-op session for small batches, made when first needed
        self._pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ich-ort")
            if self.threads > 1
            else None
        )
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        #: the last convolutional activations, where the conversion exported them (Grad-CAM)
        self.activations_name: str | None = outputs[1] if len(outputs) > 1 else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.precision = precision
        self.description = f"onnxruntime {ort.__version__} (CPU, {precision}, {self.threads} cores)"

    def _session(self, threads: int) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types for corrupt or foreign files
            raise ConversionError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from exc

    def _run(self, session: Any, x: np.ndarray) -> np.ndarray:
        # ORT releases the GIL in run(): the other cores and the windowing thread go on.
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return np.asarray(session.run([self.output_name], feed)[0], dtype=np.float32)

    def activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and last convolutional activations of a few slices, every core on
        them (Grad-CAM); needs a conversion that exported them (``activations_name``)."""
        if self.activations_name is None:
            raise ConversionError(f"{self.path}: no activations output")
        if len(x) < self.threads and self._pool is not None:
            if self._wide is None:
                self._wide = self._session(self.threads)
            session = self._wide
        else:
            session = self.session
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        prob, acts = session.run([self.output_name, self.activations_name], feed)
        return np.asarray(prob, np.float32), np.asarray(acts, np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:  # ORT aborts the process on an empty batch
            return np.zeros((0, int(self.session.get_outputs()[0].shape[-1])), np.float32)
        if self._pool is None:
            return self._run(self.session, x)
        if len(x) < self.threads:
            if self._wide is None:
                self._wide = self._session(self.threads)
            return self._run(self._wide, x)
        chunks = np.array_split(x, self.threads)
        futures = [self._pool.submit(self._run, self.session, c) for c in chunks[1:]]
        first = self._run(self.session, chunks[0])
        return np.concatenate([first, *(f.result() for f in futures)])


def onnx_session(path: Path, threads: int | None = None) -> OnnxBackend:
    return OnnxBackend(path, threads)


class TensorflowBackend:
    """The Keras model behind a ``tf.function`` (no eager calls: they cost gigabytes)."""

    def __init__(self, model: Any, note: str = "") -> None:
        import tensorflow as tf

        self.model = model
        self._tf = tf
        size = int(model.inputs[0].shape[1])
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        self.description = f"tensorflow {tf.__version__} ({device}{', ' + note if note else ''})"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self._fn(self._tf.constant(x)), dtype=np.float32)


@dataclass
class Loaded:
    """A backend and, when it was built on the way, the Keras model (Grad-CAM reuses it)."""

    backend: Backend
    keras_model: Any = None


def _matches(backend: OnnxBackend, manifest: Manifest, precision: str) -> bool:
    want = onnx_metadata(manifest, precision)
    got = {k: backend.metadata.get(k) for k in want}
    if got != want:
        log.warning("%s records %s, expected %s: converting again", backend.path, got, want)
        return False
    return True


def load_onnx_float32(
    manifest: Manifest,
    weights_path: Path,
    threads: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Loaded:
    """The cached float32 ONNX model, converting it first (with Keras) when it is missing."""
    cached = find_cached(manifest, weights_path, "float32", environ)
    if cached is not None:
        try:
            backend = OnnxBackend(cached, threads)
            if _matches(backend, manifest, "float32"):
                log.info("using cached ONNX model %s", cached)
                return Loaded(backend)
        except ConversionError as exc:
            log.warning("%s; converting again", exc)
    out = writable_cache_dir(environ) / onnx_file_name(manifest, "float32")
    if getattr(sys, "frozen", False):  # a bundled app cannot start ``python -m``
        model = build_keras(manifest, weights_path)
        export_onnx(model, manifest, out)
        return Loaded(OnnxBackend(out, threads), keras_model=model)
    convert_in_child(weights_path, out, environ)
    return Loaded(OnnxBackend(out, threads))


_children: set[Any] = set()
_children_lock = threading.Lock()


def cancel_conversions() -> int:
    """Kill every conversion child still running (a window closing); returns how many.
    The thread waiting for one then gets a :class:`ConversionError`."""
    with _children_lock:
        running = [p for p in _children if p.poll() is None]
    for proc in running:
        proc.kill()
    return len(running)


def convert_in_child(
    weights_path: Path, out: Path, environ: Mapping[str, str] = os.environ
) -> None:
    """:func:`export_onnx` in a child Python (``python -m ich_model.convert``).

    TensorFlow then never enters this process: no gigabyte of it left resident, no GUI
    thread stalled while its modules initialise holding the GIL, and a viewer closed
    during a first conversion need not wait for it (the child is killed).
    """
    import subprocess

    cmd = [sys.executable, "-m", "ich_model.convert", str(weights_path), str(out)]
    env = dict(environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with _children_lock:
        _children.add(proc)
    try:
        output, _ = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        with _children_lock:
            _children.discard(proc)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in output.splitlines() if ln.strip() and "0000 00:00" not in ln]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ConversionError(f"{weights_path}: conversion to ONNX failed: {why}")
    log.info("converted %s in a child process in %.1f s", weights_path, time.perf_counter() - t0)


def int8_record_path(onnx_path: Path) -> Path:
    """The acceptance record that sits next to an int8 model (``*.acceptance.json``)."""
    return onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".acceptance.json")


def _int8_verdict(manifest: Manifest, path: Path) -> tuple[int, str] | None:
    """Why the int8 model at ``path`` may not be used here, with the log level it deserves
    (expected situations are information, a rejected or altered model a warning); None
    when it may be used."""
    record = int8_record_path(path)
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return logging.INFO, f"{record}: no readable acceptance record ({exc})"
    if data.get("weights_sha256") != manifest.sha256:
        sha = str(data.get("weights_sha256"))[:12]
        return logging.WARNING, f"{record}: measured for other weights ({sha})"
    if not data.get("accepted"):
        reason = data.get("reason", "")
        return logging.WARNING, f"{record}: int8 was measured and not accepted ({reason})"
    if data.get("cpu") != cpu_key():
        return logging.INFO, (
            f"{record}: accepted on a {data.get('cpu')} CPU only; this one is {cpu_key()} "
            "(run `ich-train quantize` on this kind of CPU to measure it here)"
        )
    if data.get("int8_sha256") != sha256_file(path):
        return logging.WARNING, f"{record}: the int8 model changed after it was accepted"
    return None


def accepted_int8(
    manifest: Manifest, weights_path: Path, environ: Mapping[str, str] = os.environ
) -> Path | None:
    """The int8 model, if ``ich-train quantize`` accepted it for these weights on this kind
    of CPU: next to the weights (shipped) or in a cache folder, the first accepted one.

    Why not: logged (a rejected or altered model as a warning, a missing one or another
    kind of CPU as information), and the caller uses float32.
    """
    name = onnx_file_name(manifest, "int8")
    found = False
    for folder in [Path(weights_path).parent, *cache_dirs(environ)]:
        path = folder / name
        if not path.is_file():
            continue
        found = True
        verdict = _int8_verdict(manifest, path)
        if verdict is None:
            return path
        log.log(verdict[0], "%s: using float32", verdict[1])
    if not found:
        log.info(
            "no int8 model for weights %s (next to them or in the cache): using float32",
            manifest.short_hash,
        )
    return None


def load_backend(
    manifest: Manifest,
    weights_path: Path,
    runtime: str | None = None,
    threads: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Loaded:
    """The runtime that ``runtime`` (or ``$ICH_RUNTIME``) asks for; never fails for ONNX reasons.

    ``auto``: TensorFlow on a GPU, else ONNX Runtime (int8 only when accepted). Any ONNX
    failure falls back to TensorFlow on the CPU with a warning. Weight errors propagate.
    """
    choice = resolve_runtime(runtime, environ)
    if choice == "auto" and gpu_present():
        model = build_keras(manifest, weights_path)
        backend = TensorflowBackend(model)
        if "GPU" in backend.description:
            return Loaded(backend, model)
        log.info("a GPU is present but TensorFlow cannot use it; using ONNX Runtime")
    if choice == "tensorflow":
        model = build_keras(manifest, weights_path)
        return Loaded(TensorflowBackend(model), model)
    if choice in ("auto", "onnx-int8"):
        int8 = None
        try:
            int8 = accepted_int8(manifest, weights_path, environ)
            if int8 is not None:
                return Loaded(OnnxBackend(int8, threads, precision="int8"))
        except (ImportError, ConversionError) as exc:
            log.warning("cannot use the int8 model %s: %s", int8, exc)
        if choice == "onnx-int8":
            log.warning(
                "int8 requested but no accepted int8 model for weights %s: using float32 "
                "(`ich-train quantize` measures and records one)",
                manifest.short_hash,
            )
    try:
        return load_onnx_float32(manifest, weights_path, threads, environ)
    except (ImportError, ConversionError, OSError, ValueError, RuntimeError) as exc:
        log.warning(
            "ONNX Runtime unavailable for %s (%s: %s); falling back to TensorFlow",
            weights_path,
            type(exc).__name__,
            exc,
        )
    model = build_keras(manifest, weights_path)
    return Loaded(TensorflowBackend(model, note="fallback"), model)


# ----------------------------------------------------------------------------- int8


def cpu_key() -> str:
    """Int8 arithmetic differs between CPUs with and without VNNI; acceptance is per kind."""
    import platform

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{platform.machine()}:{'+'.join(isa) or 'baseline'}"


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over an array of model inputs."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 8) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)}
            for i in range(0, len(x), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_int8(
    float_path: Path, out: Path, calibration: np.ndarray, manifest: Manifest | None = None
) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights), calibrated on ``calibration``.

    ``calibration`` should be real slices through ``model_input``; everything but the
    convolutions (the LSTM and the last dense layer too) stays float32. Writes ``out``
    atomically.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError(f"{out}: no calibration slices")
    int8_record_path(out).unlink(missing_ok=True)  # a verdict on the old file is void
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name(f".{out.name}.{os.getpid()}.pre.onnx")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    try:
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp),
            _Calibration(name, calibration, batch=2),  # every tensor is kept per batch
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Convolutions only: quantising the ReLUs, additions and pools as well was both
            # slower in ONNX Runtime and further from float32 on RSNA validation slices.
            op_types_to_quantize=["Conv"],
            calibrate_method=CalibrationMethod.MinMax,
        )
        if manifest is not None:
            proto = onnx.load(str(tmp))
            for key, value in onnx_metadata(manifest, "int8").items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class Int8Report:
    """float32 vs int8 on labelled validation slices; ``accepted`` by the tolerances.

    The speeds (slices/s at ``batch``) are measured on the same pass, the two models
    taking turns batch by batch so that both see the same load; None when not measured.
    """

    n_slices: int
    auc_any_float32: float
    auc_any_int8: float
    log_loss_float32: float
    log_loss_int8: float
    max_abs_diff: float
    accepted: bool
    reason: str
    batch: int | None = None
    slices_per_s_float32: float | None = None
    slices_per_s_int8: float | None = None
    threshold: float | None = None
    any_calls_changed: int | None = None  # slices whose "any" call at ``threshold`` differs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_acceptance(
    y_true: np.ndarray,
    p_float32: np.ndarray,
    p_int8: np.ndarray,
    auc_tolerance: float = INT8_AUC_TOLERANCE,
    log_loss_relative: float = INT8_LOG_LOSS_RELATIVE,
) -> Int8Report:
    """Accept int8 when AUC(any) is within ``auc_tolerance`` and the RSNA weighted log loss
    within ``log_loss_relative`` (relative) of float32 on the same slices."""
    from ich_model.labels import LABELS
    from ich_model.metrics import roc_auc, weighted_log_loss

    k = LABELS.index("any")
    auc_f = roc_auc(y_true[:, k], p_float32[:, k])
    auc_q = roc_auc(y_true[:, k], p_int8[:, k])
    wll_f = weighted_log_loss(y_true, p_float32)
    wll_q = weighted_log_loss(y_true, p_int8)
    reasons = []
    if not np.isfinite(auc_f) or not np.isfinite(auc_q):
        reasons.append("AUC(any) undefined: the validation slices need both classes")
    elif abs(auc_q - auc_f) > auc_tolerance:
        reasons.append(f"AUC(any) {auc_q:.4f} vs {auc_f:.4f} (tolerance {auc_tolerance})")
    if abs(wll_q - wll_f) > log_loss_relative * wll_f:
        reasons.append(
            f"weighted log loss {wll_q:.4f} vs {wll_f:.4f} (tolerance {log_loss_relative:.0%})"
        )
    return Int8Report(
        n_slices=len(y_true),
        auc_any_float32=auc_f,
        auc_any_int8=auc_q,
        log_loss_float32=wll_f,
        log_loss_int8=wll_q,
        max_abs_diff=float(np.abs(p_int8 - p_float32).max()) if len(y_true) else 0.0,
        accepted=not reasons,
        reason="; ".join(reasons) or "within tolerance",
    )


def compare_int8(
    float_backend: Backend,
    int8_backend: Backend,
    validation: np.ndarray,
    validation_labels: np.ndarray,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    threshold: float | None = None,
) -> Int8Report:
    """Both models on every validation slice, taking turns batch by batch, judged by
    :func:`int8_acceptance` with the module's tolerances as they are at call time; with
    ``threshold`` (the operating one), also how many "any" calls int8 changes.

    Speed: slices/s from the median time of a full batch (the first one warms up), so
    that bursts of other work on a shared machine move it less than a total would.
    """
    n = len(validation)
    p_f = np.zeros((n, 6), np.float32)
    p_q = np.zeros((n, 6), np.float32)
    t_f: list[float] = []
    t_q: list[float] = []
    for start in range(0, n, batch):
        x = np.ascontiguousarray(validation[start : start + batch], dtype=np.float32)
        t0 = time.perf_counter()
        p_f[start : start + len(x)] = float_backend.predict(x)
        t1 = time.perf_counter()
        p_q[start : start + len(x)] = int8_backend.predict(x)
        t2 = time.perf_counter()
        if start > 0 and len(x) == batch:  # the first batch warms up; a short last one is off
            t_f.append(t1 - t0)
            t_q.append(t2 - t1)
        if progress is not None:
            progress(start + len(x), n)
    report = int8_acceptance(
        np.asarray(validation_labels, np.float32),
        p_f,
        p_q,
        auc_tolerance=INT8_AUC_TOLERANCE,
        log_loss_relative=INT8_LOG_LOSS_RELATIVE,
    )
    from ich_model.labels import LABELS

    k = LABELS.index("any")
    changed = (
        int(((p_f[:, k] >= threshold) != (p_q[:, k] >= threshold)).sum())
        if threshold is not None
        else None
    )
    return replace(
        report,
        batch=batch,
        slices_per_s_float32=batch / float(np.median(t_f)) if t_f else None,
        slices_per_s_int8=batch / float(np.median(t_q)) if t_q else None,
        threshold=threshold,
        any_calls_changed=changed,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def write_int8_record(
    int8_path: Path,
    manifest: Manifest,
    report: Int8Report,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The verdict next to the int8 file: what :func:`accepted_int8` checks (weights hash,
    the int8 file's hash, the kind of CPU) and what the model card shows."""
    import datetime

    import onnxruntime as ort

    record: dict[str, Any] = {
        **report.to_dict(),
        "weights_sha256": manifest.sha256,
        "int8_file": int8_path.name,
        "int8_sha256": sha256_file(int8_path),
        "cpu": cpu_key(),
        "cpu_model": _cpu_model(),
        "cores": physical_cores(),
        "onnxruntime": ort.__version__,
        "converter_version": CONVERTER_VERSION,
        "tolerances": {
            "auc_any": INT8_AUC_TOLERANCE,
            "weighted_log_loss_relative": INT8_LOG_LOSS_RELATIVE,
        },
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    record = {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()
    }
    path = int8_record_path(int8_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def accept_int8(
    manifest: Manifest,
    weights_path: Path,
    calibration: np.ndarray,
    validation: np.ndarray,
    validation_labels: np.ndarray,
    environ: Mapping[str, str] = os.environ,
    out_dir: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    threshold: float | None = None,
) -> Int8Report:
    """Quantise, measure against float32 and record the verdict next to the int8 file.

    ``calibration`` and ``validation`` are model inputs of different slices (calibrate on
    the training side of the split, validate on its held-out side); ``validation_labels``
    is ``[n, 6]`` in LABELS order. The int8 file and its record go to ``out_dir`` (default:
    the writable cache folder); ``extra`` is added to the record. Only an accepted record
    for these weights and this kind of CPU makes ``auto`` and ``onnx-int8`` use the model.
    """
    loaded = load_onnx_float32(manifest, weights_path, environ=environ)
    float_backend = loaded.backend
    if not isinstance(float_backend, OnnxBackend):
        raise ConversionError(f"{weights_path}: no float32 ONNX model to quantise")
    folder = Path(out_dir) if out_dir is not None else writable_cache_dir(environ)
    out = folder / onnx_file_name(manifest, "int8")
    t0 = time.perf_counter()
    quantize_int8(float_backend.path, out, calibration, manifest)
    quantise_s = time.perf_counter() - t0
    int8 = OnnxBackend(out, precision="int8")  # quantize_int8 removed any older record
    report = compare_int8(
        float_backend, int8, validation, validation_labels, batch, progress, threshold
    )
    write_int8_record(
        out,
        manifest,
        report,
        {
            "n_calibration": len(calibration),
            "float32_file": float_backend.path.name,
            "quantise_s": round(quantise_s, 1),
            **(extra or {}),
        },
    )
    log.info("int8 for weights %s: %s", manifest.short_hash, report.reason)
    return report
