"""Display windows and the model-input builder.

Pure numpy/OpenCV functions: no I/O, no globals. The viewer, batch scoring and
training all call these, so what the model saw in training is what it sees in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import cv2
import numpy as np


class WindowPreset(Enum):
    """The paper's three windows as (level, width) in HU."""

    BRAIN = (40.0, 80.0)
    BONE = (400.0, 1800.0)
    SUBDURAL = (80.0, 200.0)

    @property
    def level(self) -> float:
        return self.value[0]

    @property
    def width(self) -> float:
        return self.value[1]


#: Channel order of the model input (R, G, B).
MODEL_WINDOWS: tuple[WindowPreset, ...] = (
    WindowPreset.BRAIN,
    WindowPreset.BONE,
    WindowPreset.SUBDURAL,
)


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU linearly to [0, 1] over ``[level - width/2, level + width/2]``, clipped.

    This is the linear VOI LUT of DICOM PS3.3 C.11.2.1.2 without the off-by-half
    pixel convention, scaled to [0, 1] rather than to an output bit depth.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive. Received: width={width}")
    lo = level - width / 2.0
    out = np.asarray((np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / width))
    if out.ndim == 0:
        return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def window_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """The window as an 8-bit grey image, for display and picture exports."""
    return (apply_window(hu, level, width) * 255.0 + 0.5).astype(np.uint8)


def resize_slice(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D (or H x W x C) float image to ``size`` x ``size`` with area/linear filtering."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def model_input(
    hu: np.ndarray,
    size: int,
    hu_range: Sequence[float] | None = None,
    windows: Sequence[WindowPreset] = MODEL_WINDOWS,
) -> np.ndarray:
    """One slice in HU -> the model's ``size x size x 3`` float32 input in [0, 1].

    The slice is resized first (in HU), then windowed three ways and stacked.
    ``hu_range`` clips HU before windowing: weights trained on pictures that were
    already windowed (8-bit PNG/JPG) record the HU range those pictures carried,
    and inference from DICOM clips to the same range so both see the same input.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one 2-D slice. Received: shape={hu.shape}")
    small = resize_slice(hu, size)
    if hu_range is not None:
        small = np.clip(small, hu_range[0], hu_range[1])
    return np.stack([apply_window(small, w.level, w.width) for w in windows], axis=-1)


def model_input_batch(
    volume: np.ndarray,
    size: int,
    hu_range: Sequence[float] | None = None,
) -> np.ndarray:
    """Stack of slices ``[z, y, x]`` in HU -> ``[z, size, size, 3]`` float32.

    The same values as :func:`model_input` slice by slice (the same float32 operations in
    the same order); only the resize is per slice, the clip and the windows run once on
    the whole stack, without a temporary per window.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected slices [z, y, x]. Received: shape={volume.shape}")
    n = volume.shape[0]
    out = np.empty((n, size, size, len(MODEL_WINDOWS)), dtype=np.float32)
    small = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        small[i] = resize_slice(volume[i], size)
    if hu_range is not None:
        np.clip(small, hu_range[0], hu_range[1], out=small)
    scratch = np.empty_like(small)
    for c, w in enumerate(MODEL_WINDOWS):
        # apply_window(), written into the channel
        lo = w.level - w.width / 2.0
        np.subtract(small, np.float32(lo), out=scratch)
        np.multiply(scratch, np.float32(1.0 / w.width), out=scratch)
        np.clip(scratch, 0.0, 1.0, out=out[..., c])
    return out


def uint8_to_hu(image: np.ndarray, hu_low: float, hu_high: float) -> np.ndarray:
    """Invert a picture that was windowed to 8 bits: value 0 -> ``hu_low``, 255 -> ``hu_high``.

    Used for training on PNG/JPG slices; the range is recorded in the weights' manifest.
    """
    img = np.asarray(image, dtype=np.float32)
    return hu_low + img * np.float32((hu_high - hu_low) / 255.0)
