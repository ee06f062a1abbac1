"""The paper's CNN-LSTM (Ko et al.): Xception, average pooling, LSTM over 32 steps, 6 sigmoids.

Xception is written out here rather than taken from ``keras.applications`` so that
nothing is ever downloaded and so that a narrower variant (fewer filters, fewer
middle-flow blocks, the same separable-convolution modules) can be built for
CPU training. At ``width=1.0, middle_blocks=8`` it is layer for layer the
Xception of Chollet (2017) as Keras builds it (20,861,480 parameters).

Importing this module imports Keras; the viewer only reaches it from its worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
from keras import layers

from ich_model.labels import LABELS

#: Filters of the full Xception (entry blocks, middle, exit, last two separable convs).
_ENTRY = (128, 256, 728)
_EXIT = (728, 1024)
_TAIL = (1536, 2048)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in the weights' manifest."""

    input_size: int = 299
    width: float = 1.0  # filter multiplier of the Xception backbone
    middle_blocks: int = 8  # middle-flow blocks (8 in Xception)
    timesteps: int = 32  # the pooled features are read by the LSTM as timesteps x (F / timesteps)
    lstm_units: int = 64
    dropout: float = 0.3
    recurrent_dropout: float = 0.2
    n_labels: int = len(LABELS)
    name: str = "xception_lstm"

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ValueError(
                f"input_size must be at least 32. Received: input_size={self.input_size}"
            )
        if not 0.0 < self.width <= 4.0:
            raise ValueError(f"width must be in (0, 4]. Received: width={self.width}")
        if self.middle_blocks < 0:
            raise ValueError(
                f"middle_blocks must be >= 0. Received: middle_blocks={self.middle_blocks}"
            )
        if self.features % self.timesteps:
            raise ValueError(
                f"the {self.features} pooled features do not split into "
                f"{self.timesteps} timesteps. "
                f"Received: width={self.width}, timesteps={self.timesteps}"
            )

    def filters(self, n: int) -> int:
        """Scale a filter count by ``width``, to a multiple of 8 (at least 8)."""
        return max(8, round(n * self.width / 8.0) * 8)

    @property
    def features(self) -> int:
        return self.filters(_TAIL[1])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _sep(x: Any, filters: int, name: str) -> Any:
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sepconv")(
        x
    )
    return layers.BatchNormalization(name=f"{name}_sepconv_bn")(x)


def build_backbone(cfg: ModelConfig, inputs: Any) -> Any:
    """Xception's entry, middle and exit flows, ending in global average pooling."""
    f = cfg.filters
    x = layers.Conv2D(f(32), 3, strides=2, use_bias=False, name="block1_conv1")(inputs)
    x = layers.BatchNormalization(name="block1_conv1_bn")(x)
    x = layers.Activation("relu", name="block1_conv1_act")(x)
    x = layers.Conv2D(f(64), 3, use_bias=False, name="block1_conv2")(x)
    x = layers.BatchNormalization(name="block1_conv2_bn")(x)
    x = layers.Activation("relu", name="block1_conv2_act")(x)

    for i, n in enumerate(_ENTRY, start=2):
        residual = layers.Conv2D(
            f(n), 1, strides=2, padding="same", use_bias=False, name=f"block{i}_res"
        )(x)
        residual = layers.BatchNormalization(name=f"block{i}_res_bn")(residual)
        if i > 2:
            x = layers.Activation("relu", name=f"block{i}_sepconv1_act")(x)
        x = _sep(x, f(n), f"block{i}_1")
        x = layers.Activation("relu", name=f"block{i}_sepconv2_act")(x)
        x = _sep(x, f(n), f"block{i}_2")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"block{i}_pool")(x)
        x = layers.add([x, residual], name=f"block{i}_add")

    for b in range(cfg.middle_blocks):
        residual = x
        name = f"middle{b + 1}"
        for j in range(3):
            x = layers.Activation("relu", name=f"{name}_sepconv{j + 1}_act")(x)
            x = _sep(x, f(728), f"{name}_{j + 1}")
        x = layers.add([x, residual], name=f"{name}_add")

    residual = layers.Conv2D(
        f(_EXIT[1]), 1, strides=2, padding="same", use_bias=False, name="exit_res"
    )(x)
    residual = layers.BatchNormalization(name="exit_res_bn")(residual)
    x = layers.Activation("relu", name="exit_sepconv1_act")(x)
    x = _sep(x, f(_EXIT[0]), "exit_1")
    x = layers.Activation("relu", name="exit_sepconv2_act")(x)
    x = _sep(x, f(_EXIT[1]), "exit_2")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="exit_pool")(x)
    x = layers.add([x, residual], name="exit_add")

    x = _sep(x, f(_TAIL[0]), "tail_1")
    x = layers.Activation("relu", name="tail_1_act")(x)
    x = _sep(x, f(_TAIL[1]), "tail_2")
    x = layers.Activation("relu", name="last_conv_act")(x)  # Grad-CAM reads this layer
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def build_model(cfg: ModelConfig | None = None, inference: bool = False) -> keras.Model:
    """The Xception-LSTM classifier: input ``[n, size, size, 3]`` in [0, 1], output ``[n, 6]``.

    ``inference=True`` builds the same network with ``recurrent_dropout=0`` (it only
    acts in training) so that cuDNN and ONNX export keep a plain LSTM; the weights
    are interchangeable with the training build.
    """
    cfg = cfg or ModelConfig()
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="slices")
    # Xception expects [-1, 1]; the windows give [0, 1].
    x = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
    pooled = build_backbone(cfg, x)
    seq = layers.Reshape((cfg.timesteps, cfg.features // cfg.timesteps), name="to_timesteps")(
        pooled
    )
    seq = layers.LSTM(
        cfg.lstm_units,
        dropout=0.0 if inference else cfg.dropout,
        recurrent_dropout=0.0 if inference else cfg.recurrent_dropout,
        name="lstm",
    )(seq)
    outputs = layers.Dense(
        cfg.n_labels, activation="sigmoid", dtype="float32", name="probabilities"
    )(seq)
    return keras.Model(inputs, outputs, name=cfg.name)


def gradcam_model(model: keras.Model) -> keras.Model:
    """A model with two outputs: the last convolutional activations and the probabilities."""
    return keras.Model(model.inputs, [model.get_layer("last_conv_act").output, model.output])


def save_weights(
    model: keras.Model,
    cfg: ModelConfig,
    path: Any,
    *,
    trained: bool,
    hu_range: tuple[float, float] | None = None,
    threshold: float = 0.5,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    summary: str = "",
) -> Any:
    """Save ``model``'s weights as ``.weights.h5`` with its manifest; returns the manifest path."""
    import datetime
    from pathlib import Path

    from ich_model.weights import WEIGHTS_SUFFIX, Manifest, write_manifest

    path = Path(path)
    if not path.name.endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"weights file name must end in {WEIGHTS_SUFFIX}. Received: {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(path))
    manifest = Manifest(
        architecture=cfg.to_dict(),
        sha256="",
        weights_file=path.name,
        hu_range=hu_range,
        trained=trained,
        threshold=threshold,
        training=training or {},
        metrics=metrics or {},
        summary=summary,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return write_manifest(path, manifest)
