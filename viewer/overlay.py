"""What the slice view writes in its corners: plain data and formatting, no Qt.

Orientation letters follow DICOM PS3.3 C.7.6.2.1.1: the patient's left is +x,
posterior +y, head +z. A slice is shown as stored, which for ordinary axial CT is
the radiological convention (patient's right on the image's left, anterior up);
the letters make any other storage visible instead of silently flipping it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def direction_letter(vector: Sequence[float] | np.ndarray) -> str:
    """The patient direction a unit vector mostly points to ("L", "P", "H", ...)."""
    v = np.asarray(vector, dtype=np.float64)
    axis = int(np.argmax(np.abs(v)))
    return _AXIS_LETTERS[axis][1 if v[axis] > 0 else 0]


def orientation_letters(orientation: Sequence[float] | None) -> tuple[str, str, str, str]:
    """(left, right, top, bottom) edge letters of a slice shown as stored."""
    if orientation is None or len(orientation) != 6:
        return ("", "", "", "")
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    return (
        direction_letter(-row),
        direction_letter(row),
        direction_letter(-col),
        direction_letter(col),
    )


@dataclass(frozen=True)
class ProbabilityLine:
    short: str
    label: str
    probability: float | None
    above: bool


@dataclass(frozen=True)
class OverlayText:
    """Everything the view draws over the image; empty parts are not drawn."""

    top_left: tuple[str, ...] = ()
    top_right: tuple[str, ...] = ()
    bottom_left: tuple[str, ...] = ()
    probabilities: tuple[ProbabilityLine, ...] = ()
    probability_title: str = ""
    model_status: str = ""
    notice: str = ""
    banner: str = ""
    hint: str = ""
    edges: tuple[str, str, str, str] = ("", "", "", "")


def format_mm(value: float | None, digits: int = 1) -> str:
    return "?" if value is None else f"{value:.{digits}f} mm"


def format_percent(p: float | None) -> str:
    return "–" if p is None else f"{100.0 * p:.0f}%"


def _heat_lut() -> np.ndarray:
    """256 x RGBA: blue -> cyan -> yellow -> red, transparent where the map is low."""
    x = np.linspace(0.0, 1.0, 256)
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 60, 255], [0, 220, 255], [255, 230, 0], [255, 30, 0]], dtype=float)
    rgb = np.stack([np.interp(x, stops, colours[:, c]) for c in range(3)], axis=1)
    alpha = np.clip((x - 0.15) / 0.45, 0.0, 1.0) * 255.0
    return np.concatenate([rgb, alpha[:, None]], axis=1).round().astype(np.uint8)


HEAT_LUT = _heat_lut()


def heat_to_rgba(heat: np.ndarray) -> np.ndarray:
    """Grad-CAM map in [0, 1] ``[y, x]`` -> ``[y, x, 4]`` uint8 colours for display."""
    idx = (np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return HEAT_LUT[idx]
