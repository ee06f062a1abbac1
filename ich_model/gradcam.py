"""Grad-CAM without TensorFlow: the converted ONNX model and the LSTM head in numpy.

Grad-CAM (Selvaraju et al. 2017) weighs the last convolutional activations ``A[i, j, c]``
by ``mean_ij d y_k / d A[i, j, c]``. In this network the activations reach the head only
through global average pooling, ``g[c] = mean_ij A[i, j, c]``, so that mean is simply
``(d y_k / d g[c]) / (h w)``: the gradient of the small head (reshape to 32 timesteps, LSTM,
dense, sigmoid) with respect to the pooled features. ONNX Runtime gives ``A`` (the
conversion exports it as a second output of the model that scores) and numpy gives the
head's gradient, by backpropagation through time over 32 steps of 64 units.

Why: the first Grad-CAM used to import TensorFlow and build the Keras model on the model
thread (4.5 s, and a 266 ms stall of the GUI thread while TensorFlow's modules
initialised holding the GIL). This path needs neither. The head weights come from the
``.weights.h5`` file (h5py) and are checked on every map: the numpy head must reproduce
ONNX Runtime's probabilities, or :class:`GradcamUnavailable` sends the caller back to the
TensorFlow path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: ONNX node that feeds global average pooling: the ``last_conv_act`` activations.
POOL_OPS = ("GlobalAveragePool", "ReduceMean")
#: The numpy head must agree with ONNX Runtime's probabilities within this.
HEAD_TOLERANCE = 1e-4


class GradcamUnavailable(RuntimeError):
    """This model cannot take the ONNX + numpy path (the caller falls back to TensorFlow)."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


@dataclass(frozen=True)
class Head:
    """Keras LSTM (gates i, f, c, o; tanh / sigmoid) over ``timesteps``, then dense + sigmoid."""

    kernel: np.ndarray  # [features / timesteps, 4 u]
    recurrent: np.ndarray  # [u, 4 u]
    bias: np.ndarray  # [4 u]
    dense: np.ndarray  # [u, labels]
    dense_bias: np.ndarray  # [labels]
    timesteps: int

    @classmethod
    def from_weights_file(cls, path: Path, timesteps: int) -> Head:
        """Read the LSTM and the dense layer from a Keras 3 ``.weights.h5`` file."""
        import h5py

        try:
            with h5py.File(path, "r") as f:
                layers = f["layers"]
                lstm = [k for k in layers if k == "lstm" or k.startswith("lstm_")]
                dense = [k for k in layers if k == "dense" or k.startswith("dense_")]
                if len(lstm) != 1 or len(dense) != 1:
                    raise GradcamUnavailable(f"{path}: expected one LSTM and one dense layer")
                cell = layers[lstm[0]]["cell"]["vars"]
                out = layers[dense[0]]["vars"]
                arrays = [np.asarray(cell[k], np.float64) for k in ("0", "1", "2")]
                arrays += [np.asarray(out[k], np.float64) for k in ("0", "1")]
        except (OSError, KeyError) as exc:
            raise GradcamUnavailable(f"{path}: cannot read the LSTM head ({exc})") from exc
        kernel, recurrent, bias, dense_kernel, dense_bias = arrays
        head = cls(kernel, recurrent, bias, dense_kernel, dense_bias, timesteps=timesteps)
        u = head.recurrent.shape[0]
        if head.recurrent.shape != (u, 4 * u) or head.kernel.shape[1] != 4 * u:
            raise GradcamUnavailable(f"{path}: unexpected LSTM weight shapes")
        return head

    @property
    def features(self) -> int:
        return self.kernel.shape[0] * self.timesteps

    def forward(self, g: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Probabilities ``[labels]`` for pooled features ``g`` ``[features]``, and a tape."""
        x = np.asarray(g, np.float64).reshape(self.timesteps, -1)
        u = self.recurrent.shape[0]
        h = np.zeros(u)
        c = np.zeros(u)
        tape: dict[str, Any] = {"x": x, "h": [h], "c": [c], "gates": []}
        for t in range(self.timesteps):
            z = x[t] @ self.kernel + h @ self.recurrent + self.bias
            i, f = _sigmoid(z[:u]), _sigmoid(z[u : 2 * u])
            cc, o = np.tanh(z[2 * u : 3 * u]), _sigmoid(z[3 * u :])
            c = f * c + i * cc
            h = o * np.tanh(c)
            tape["gates"].append((i, f, cc, o))
            tape["h"].append(h)
            tape["c"].append(c)
        y = _sigmoid(h @ self.dense + self.dense_bias)
        tape["y"] = y
        return y, tape

    def gradient(self, g: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
        """``d y[label] / d g`` ``[features]`` (backpropagation through time), and ``y``."""
        y, tape = self.forward(g)
        u = self.recurrent.shape[0]
        dh = y[label] * (1.0 - y[label]) * self.dense[:, label]
        dc = np.zeros(u)
        dx = np.zeros_like(tape["x"])
        for t in reversed(range(self.timesteps)):
            i, f, cc, o = tape["gates"][t]
            c, c_prev = tape["c"][t + 1], tape["c"][t]
            tc = np.tanh(c)
            do = dh * tc
            dc = dc + dh * o * (1.0 - tc * tc)
            di, df, dcc = dc * cc, dc * c_prev, dc * i
            dz = np.concatenate(
                [di * i * (1 - i), df * f * (1 - f), dcc * (1 - cc * cc), do * o * (1 - o)]
            )
            dx[t] = self.kernel @ dz
            dh = self.recurrent @ dz
            dc = dc * f
        return dx.reshape(-1), y


def add_activations_output(proto: Any) -> str:
    """Make the activations that global pooling reads a second output of an ONNX graph
    (in place; the conversion does this once). Returns their name."""
    import onnx

    pool = [n for n in proto.graph.node if n.op_type in POOL_OPS]
    if len(pool) != 1:
        raise GradcamUnavailable("the ONNX graph has no single global pooling node")
    name = str(pool[0].input[0])
    if name not in [o.name for o in proto.graph.output]:
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return name


RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class OnnxGradcam:
    """Grad-CAM maps from ONNX Runtime (probabilities and activations) and the weights file.

    ``run`` maps model inputs ``[n, s, s, 3]`` to probabilities and activations: normally
    the scoring backend itself (``OnnxBackend.activations``; no second session), else a
    session of a float32 ONNX file made by :meth:`from_file`.
    """

    def __init__(self, run: RunFn, weights_path: Path, timesteps: int) -> None:
        self._run = run
        self.head = Head.from_weights_file(weights_path, timesteps)

    @classmethod
    def from_file(cls, onnx_path: Path, weights_path: Path, timesteps: int) -> OnnxGradcam:
        """From a float32 model file (when int8 scores); one converted before the
        activations were an output gets that output added in memory."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 0  # one map at a time: every core on it
        cpu = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(onnx_path), options, providers=cpu)
        names = [o.name for o in session.get_outputs()]
        if len(names) < 2:
            import onnx

            proto = onnx.load(str(onnx_path))
            add_activations_output(proto)
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=cpu)
            names = [o.name for o in session.get_outputs()]
        prob, conv = names[0], names[1]
        feed = session.get_inputs()[0].name

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p, a = session.run([prob, conv], {feed: x.astype(np.float32)})
            return np.asarray(p), np.asarray(a)

        return cls(run, weights_path, timesteps)

    def __call__(self, x: np.ndarray, label: int) -> np.ndarray:
        """Class-activation map ``[h, w]`` (not normalised) for one model input ``[s, s, 3]``."""
        prob, conv = self._run(x[None])
        a = np.asarray(conv[0], np.float64)
        channels = self.head.features
        if a.shape[0] == channels:  # NCHW, as tf2onnx usually leaves it
            a = np.moveaxis(a, 0, -1)
        elif a.shape[-1] != channels:
            raise GradcamUnavailable(f"activations of shape {a.shape}, expected {channels} maps")
        g = a.mean(axis=(0, 1))
        grad, y = self.head.gradient(g, label)
        diff = float(np.abs(y - prob[0]).max())
        if not diff <= HEAD_TOLERANCE:
            raise GradcamUnavailable(f"the numpy head differs from ONNX Runtime by {diff:.1e}")
        weights = grad / (a.shape[0] * a.shape[1])
        return np.maximum(a @ weights, 0.0).astype(np.float32)
