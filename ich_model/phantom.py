"""Synthetic head CT with labelled hemorrhages of every subtype.

Tests, the demo study and CI need head CT without real patients, and training can pretrain
on unlimited labelled slices made on the fly. Each slice is drawn as a map of tissue
classes (OpenCV polygons and lines in millimetre coordinates), turned into HU through a
look-up table, blurred and given noise. Labels are counted from the drawn blood pixels, so
they always match what is on the image.

Levels: ``t = 0`` is the skull base, ``t = 1`` the vertex. Image axes follow DICOM LPS with
ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``: columns run to the patient's left, rows to
posterior, so the dependent (supine) side is the bottom of the image.

Anatomy, lesions and noise of a :class:`PhantomSpec` come from separate random streams:
the same seed with and without a hemorrhage gives the same head with the same noise, and
the two volumes differ only where the blood is.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import IntEnum
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from ich_model.labels import LABELS, SHORT_NAMES

log = logging.getLogger(__name__)

SUBTYPES: tuple[str, ...] = LABELS[:5]

#: Smallest blood area that makes a slice positive: 20 pixels at 0.45 mm (512 matrix).
MIN_BLOOD_AREA_MM2 = 20 * 0.45**2
#: Field of view of the default 512 x 0.45 mm matrix; ``make_phantom_dataset`` keeps it.
DEFAULT_FOV_MM = 512 * 0.45
#: Stored value = HU - RESCALE_INTERCEPT.
RESCALE_INTERCEPT = -1024
_AIR_FLOOR = -1024.0  # ich_model.dicom_io.AIR_HU
STUDY_DESCRIPTION = "CT HEAD (phantom)"
MANUFACTURER = "ICH second opinion phantom"

_SHIFT = 3  # OpenCV sub-pixel bits: coordinates are drawn to 1/8 pixel
_HEAD_HEIGHT_MM = 180.0  # skull base to vertex: converts z extents in mm to levels
_T_WIDEST = 0.45
_N_CONTOUR = 160
_THETA = np.linspace(0.0, 2.0 * np.pi, _N_CONTOUR, endpoint=False)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_UNIT24 = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)


class Tissue(IntEnum):
    """Classes of the tissue map drawn before conversion to HU."""

    AIR = 0
    SCALP = 1
    BONE = 2  # cortical tables, skull base
    DIPLOE = 3
    CSF = 4  # convexity rim, fissures, third and fourth ventricles
    SULCUS = 5
    CISTERN = 6
    VENTRICLE_RIGHT = 7  # patient right, image left (x < 0)
    VENTRICLE_LEFT = 8
    GREY = 9
    WHITE = 10
    DEEP_GREY = 11
    FALX = 12
    OEDEMA = 13
    SINUS_AIR = 14
    BRAINSTEM = 15
    EPIDURAL = 16  # the five blood classes follow LABELS order
    INTRAPARENCHYMAL = 17
    INTRAVENTRICULAR = 18
    SUBARACHNOID = 19
    SUBDURAL = 20


_BLOOD0 = int(Tissue.EPIDURAL)
BLOOD_TISSUE: dict[str, Tissue] = {s: Tissue(_BLOOD0 + i) for i, s in enumerate(SUBTYPES)}


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_subtypes(subtypes: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in subtypes:
        if s not in SUBTYPES:
            raise ValueError(
                f"unknown hemorrhage subtype. Received: {s!r}; expected one of {SUBTYPES}."
                + _did_you_mean(str(s), SUBTYPES)
            )
        if s not in out:
            out.append(s)
    return tuple(sorted(out, key=SUBTYPES.index))  # one spec, one name, whatever the order


@dataclass(frozen=True)
class PhantomSpec:
    """What to render. ``pixel_spacing`` is honoured as given: keep ``matrix * pixel_spacing``
    near 230 mm (see :meth:`for_matrix`) or the head is cropped."""

    subtypes: tuple[str, ...] = ()
    n_slices: int = 40
    matrix: int = 512
    pixel_spacing: float = 0.45
    slice_thickness: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "subtypes", _check_subtypes(self.subtypes))
        if self.n_slices < 1:
            raise ValueError(f"n_slices must be at least 1. Received: n_slices={self.n_slices}")
        if not 16 <= self.matrix <= 4096:
            raise ValueError(f"matrix must be in 16..4096. Received: matrix={self.matrix}")
        if self.pixel_spacing <= 0 or self.slice_thickness <= 0:
            raise ValueError(
                "pixel_spacing and slice_thickness must be positive. Received: "
                f"pixel_spacing={self.pixel_spacing}, slice_thickness={self.slice_thickness}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative. Received: seed={self.seed}")

    @classmethod
    def for_matrix(
        cls,
        matrix: int,
        subtypes: Sequence[str] = (),
        n_slices: int = 40,
        slice_thickness: float = 5.0,
        seed: int = 0,
    ) -> PhantomSpec:
        """A spec whose pixel spacing keeps the default 230 mm field of view at ``matrix``,
        so small test matrices still hold the whole head."""
        return cls(
            tuple(subtypes), n_slices, matrix, DEFAULT_FOV_MM / matrix, slice_thickness, seed
        )

    @property
    def levels(self) -> np.ndarray:
        """Head level of each slice, feet to head (skull base to just below the vertex)."""
        if self.n_slices == 1:
            return np.array([0.5])
        return np.linspace(0.02, 0.97, self.n_slices)


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class _Anatomy:
    """One head: sizes, tissue HU, sulcal pattern, pose and image quality."""

    a: float  # inner-table semi-axis, left-right (mm) at the widest level
    b: float  # inner-table semi-axis, front-back
    harm: np.ndarray  # [k, 2]: amplitude and phase of contour harmonics 2..k+1
    skull: float  # skull thickness (mm)
    scalp: float
    rim: float  # convexity CSF (mm): grows with atrophy
    ribbon: float  # cortical ribbon (mm)
    vent: float  # ventricle size factor
    sulcus_w: float
    sulci: np.ndarray  # [m, 12] per-sulcus parameters, see _sample_anatomy
    lut: np.ndarray  # [256] HU per tissue class
    texture: np.ndarray  # [256] bone inhomogeneity amplitude per class
    noise: float  # HU
    blur_mm: float
    yaw: float  # radians
    offset: tuple[float, float]  # mm, image-aligned

    @property
    def size(self) -> float:
        return 0.5 * (self.a + self.b)


def _sample_anatomy(rng: np.random.Generator, pose: float = 1.0) -> _Anatomy:
    scale = rng.uniform(0.93, 1.05)
    m = int(rng.integers(36, 46))
    base = np.sort(rng.uniform(0, 2 * np.pi) + np.arange(m) * 2 * np.pi / m)
    sulci = np.stack(
        [
            base + rng.uniform(-0.45, 0.45, m) * 2 * np.pi / m,  # angle
            rng.uniform(0.03, 0.10, m),  # angle wander amplitude (rad)
            rng.uniform(1.5, 4.0, m),  # wander frequency (per unit level)
            rng.uniform(0, 1, m),  # wander phase
            rng.uniform(4.0, 17.0, m),  # depth (mm)
            rng.uniform(0, 1, m),  # depth phase
            rng.uniform(1.0, 3.0, m),  # visibility frequency
            rng.uniform(0, 1, m),  # visibility phase
            rng.uniform(-0.45, 0.45, m),  # tilt from the radial direction
            rng.uniform(-0.5, 0.5, m),  # bend
            rng.choice([-1.0, 1.0], m) * rng.uniform(0.6, 1.2, m),  # side-branch direction
            rng.uniform(0, 1, m),  # side branch when > 0.55
        ],
        axis=1,
    )
    atrophy = rng.uniform(0.0, 1.0) ** 2
    gm, wm = rng.uniform(35.0, 39.0), rng.uniform(27.0, 30.0)
    lut = np.zeros(256, np.float32)
    lut[Tissue.AIR] = -1000.0
    lut[Tissue.SCALP] = rng.uniform(30.0, 50.0)
    lut[Tissue.BONE] = rng.uniform(1350.0, 1700.0)
    lut[Tissue.DIPLOE] = rng.uniform(600.0, 900.0)
    lut[[Tissue.CSF, Tissue.SULCUS, Tissue.CISTERN]] = rng.uniform(2.0, 8.0)
    lut[[Tissue.VENTRICLE_RIGHT, Tissue.VENTRICLE_LEFT]] = lut[Tissue.CSF]
    lut[Tissue.GREY] = gm
    lut[Tissue.WHITE] = wm
    lut[Tissue.DEEP_GREY] = gm - rng.uniform(1.0, 4.0)
    lut[Tissue.BRAINSTEM] = wm + rng.uniform(1.0, 4.0)
    lut[Tissue.FALX] = rng.uniform(40.0, 48.0)
    lut[Tissue.OEDEMA] = rng.uniform(15.0, 20.0)
    lut[Tissue.SINUS_AIR] = rng.uniform(-980.0, -900.0)
    texture = np.zeros(256, np.float32)
    texture[Tissue.BONE] = rng.uniform(80.0, 160.0)
    texture[Tissue.DIPLOE] = rng.uniform(120.0, 220.0)
    return _Anatomy(
        a=67.0 * scale * rng.uniform(0.95, 1.05),
        b=84.0 * scale * rng.uniform(0.96, 1.04),
        harm=np.stack([rng.normal(0, 0.007, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1),
        skull=rng.uniform(4.2, 6.0),
        scalp=rng.uniform(3.5, 6.0),
        rim=0.5 + 1.5 * atrophy,
        ribbon=rng.uniform(2.8, 3.8),
        vent=0.85 + 0.6 * atrophy + rng.uniform(-0.05, 0.1),
        sulcus_w=1.0 + 0.8 * atrophy,
        sulci=sulci,
        lut=lut,
        texture=texture,
        noise=rng.uniform(3.0, 6.0),
        blur_mm=rng.uniform(0.35, 0.5),
        yaw=math.radians(rng.uniform(-4.0, 4.0) * pose),
        offset=(rng.uniform(-4.0, 4.0) * pose, rng.uniform(-4.0, 4.0) * pose),
    )


def _scale(t: float) -> float:
    """Width of the head at level ``t`` relative to its widest level."""
    if t >= _T_WIDEST:
        v = 1.0 - ((t - _T_WIDEST) / 0.58) ** 2
        return math.sqrt(v) if v > 0 else 0.0
    return 1.0 - 0.25 * ((_T_WIDEST - t) / _T_WIDEST) ** 2


def _obliquity(anat: _Anatomy, t: float) -> float:
    """How much thicker a shell looks where the slice cuts it obliquely (near the vertex)."""
    ds = (_scale(t + 0.005) - _scale(t - 0.005)) / 0.01
    slope = abs(ds) * anat.size / _HEAD_HEIGHT_MM
    return min(math.sqrt(1.0 + slope * slope), 3.5)


def _bump(t: float, centre: float, half: float) -> float:
    """How much of a structure a level shows: 1 at ``centre``, 0 beyond ``centre +- half``."""
    v = 1.0 - ((t - centre) / half) ** 2
    return math.sqrt(v) if v > 0 else 0.0


def _inner_radius(anat: _Anatomy, theta: np.ndarray, t: float) -> np.ndarray:
    """Radius of the inner table (mm) at angles ``theta`` (0 = patient left, pi/2 = posterior)."""
    c, s = np.cos(theta), np.sin(theta)
    r = anat.a * anat.b / np.sqrt((anat.b * c) ** 2 + (anat.a * s) ** 2)
    wobble = np.ones_like(theta)
    for k, (amp, ph) in enumerate(anat.harm, start=2):
        wobble += amp * np.cos(k * theta + ph)
    r = r * wobble * (1.0 + 0.03 * s)  # a little wider at the back
    if t < 0.3:  # the anterior skull base rises: less brain in front at low levels
        r = r * (1.0 - 0.35 * (0.3 - t) / 0.3 * np.clip(-s, 0.0, 1.0) ** 2)
    return np.asarray(r * _scale(t))


def _polar(r: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
    if theta is None:
        return np.stack([r * _COS, r * _SIN], axis=-1)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    x, y = ax * np.cos(_UNIT24), ay * np.sin(_UNIT24)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=-1)


# ----------------------------------------------------------------------------- canvas


class _Canvas:
    """A tissue map with drawing in head millimetres (rotated by the head's yaw)."""

    def __init__(self, size: int, spacing: float, anat: _Anatomy) -> None:
        self.size = size
        self.spacing = spacing
        self.tissue = np.zeros((size, size), np.uint8)
        c, s = math.cos(anat.yaw), math.sin(anat.yaw)
        self._rot = np.array([[c, s], [-s, c]])  # row vectors: p @ rot == R(yaw) p
        self._yaw = (c, s)
        half = (size - 1) / 2.0
        self.cx = half + anat.offset[0] / spacing
        self.cy = half + anat.offset[1] / spacing
        self._k = (1 << _SHIFT) / spacing

    def image_y(self, pts: np.ndarray) -> np.ndarray:
        """Image-aligned y (mm from the head centre, posterior positive) of head points."""
        return np.asarray(self._yaw[1] * pts[..., 0] + self._yaw[0] * pts[..., 1])

    def px(self, pts: np.ndarray) -> np.ndarray:
        p = pts @ self._rot
        p = p * self._k
        p[..., 0] += self.cx * (1 << _SHIFT)
        p[..., 1] += self.cy * (1 << _SHIFT)
        return np.rint(p).astype(np.int32)

    def fill(self, polys: Sequence[np.ndarray], tissue: int) -> None:
        if polys:
            cv2.fillPoly(self.tissue, [self.px(p) for p in polys], int(tissue), cv2.LINE_8, _SHIFT)

    def lines(self, lines: Sequence[np.ndarray], tissue: int, width_mm: float) -> None:
        if len(lines):
            w = max(1, round(width_mm / self.spacing))
            pts = [self.px(p) for p in lines]
            cv2.polylines(self.tissue, pts, False, int(tissue), w, cv2.LINE_8, _SHIFT)


@dataclass(frozen=True)
class _Level:
    """Geometry shared by everything drawn on one slice."""

    t: float
    s: float  # head scale at this level
    oblique: float
    r_in: np.ndarray  # inner-table radius on _THETA


# ----------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class _Lesion:
    subtype: str
    hu: float
    t0: float  # centre level
    tz: float  # half extent in level units

    def weight(self, t: float) -> float:
        v = 1.0 - ((t - self.t0) / self.tz) ** 2
        return v if v > 0 else 0.0


@dataclass(frozen=True)
class _ExtraAxial(_Lesion):
    theta: float  # centre angle
    half_angle: float
    thickness: float  # mm at the centre
    crescent: bool  # subdural (long, flat) or epidural (short lens)


@dataclass(frozen=True)
class _Parenchymal(_Lesion):
    x: float
    y: float
    radius: float
    harm: tuple[tuple[float, float], ...]
    oedema: float


@dataclass(frozen=True)
class _Ventricular(_Lesion):
    sides: tuple[int, ...]
    y_level: float  # image-aligned mm: blood below (posterior to) this line


@dataclass(frozen=True)
class _Subarachnoid(_Lesion):
    theta: float  # sulcal sector centre (nan: no sulcal blood)
    half_angle: float
    cistern_t0: float  # nan: no cisternal blood
    cistern_tz: float
    sylvian: tuple[int, ...]


#: Levels where each subtype can sit (the lesion centre).
_RANGE: dict[str, tuple[float, float]] = {
    "epidural": (0.34, 0.80),
    "intraparenchymal": (0.32, 0.80),
    "intraventricular": (0.39, 0.55),
    "subarachnoid": (0.21, 0.88),
    "subdural": (0.38, 0.85),
}
_CISTERNS = (0.21, 0.33)
_DRAW_ORDER = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")
_LOWEST_BLOOD = 0.25  # below this the skull base would overlap convexity lesions


def _pick_centre(
    rng: np.random.Generator,
    lo: float,
    hi: float,
    tz: float,
    levels: np.ndarray | None,
    level: float | None,
) -> float:
    """Centre level of a lesion: on a slice of the volume, or near the requested level."""
    if levels is not None:
        inside = levels[(levels >= lo) & (levels <= hi)]
        if inside.size == 0:
            nearest = levels[np.argmin(np.abs(np.clip(levels, lo, hi) - levels))]
            log.warning("no slice between levels %.2f and %.2f; lesion may not show", lo, hi)
            return float(np.clip(nearest, lo, hi))
        t = float(rng.choice(inside))
        step = float(np.min(np.diff(levels))) if levels.size > 1 else 1.0
        return t + rng.uniform(-1, 1) * min(0.25 * step, 0.3 * tz)
    if level is None:
        return float(rng.uniform(lo, hi))
    return float(np.clip(level + rng.uniform(-0.7, 0.7) * tz, lo, hi))


def _sample_lesion(
    subtype: str,
    rng: np.random.Generator,
    anat: _Anatomy,
    levels: np.ndarray | None = None,
    level: float | None = None,
) -> _Lesion:
    lo, hi = _RANGE[subtype]
    if subtype in ("epidural", "subdural"):
        crescent = subtype == "subdural"
        tz = rng.uniform(0.08, 0.18) if crescent else rng.uniform(0.03, 0.055)
        t0 = _pick_centre(rng, lo, hi, tz, levels, level)
        tz = min(tz, max(t0 - _LOWEST_BLOOD, 0.02))
        side = rng.choice([0.0, np.pi])
        if crescent:
            theta = side + rng.uniform(-0.9, 0.9)
            half, thick = rng.uniform(0.6, 1.2), rng.uniform(3.5, 10.0)
        else:  # usually temporoparietal, sometimes frontal or occipital
            theta = (
                side + rng.uniform(-0.7, 0.7)
                if rng.random() < 0.8
                else rng.choice([-1, 1]) * (np.pi / 2 + rng.uniform(-0.5, 0.5))
            )
            r = float(_inner_radius(anat, np.array([theta]), t0)[0])
            half, thick = rng.uniform(16.0, 30.0) / max(r, 20.0), rng.uniform(10.0, 22.0)
        return _ExtraAxial(
            subtype,
            float(rng.uniform(50.0, 75.0) if crescent else rng.uniform(58.0, 78.0)),
            t0,
            float(tz),
            float(theta),
            float(half),
            float(thick),
            crescent,
        )
    if subtype == "intraparenchymal":
        radius = rng.uniform(6.0, 20.0)
        tz = radius * rng.uniform(0.8, 1.2) / _HEAD_HEIGHT_MM
        t0 = _pick_centre(rng, lo, hi, tz, levels, level)
        tz = min(tz, max(t0 - _LOWEST_BLOOD, 0.02))
        s = _scale(t0)
        if rng.random() < 0.4 and 0.35 < t0 < 0.55:  # hypertensive: basal ganglia / thalamus
            x = rng.choice([-1.0, 1.0]) * rng.uniform(12.0, 26.0)
            y = rng.uniform(-8.0, 10.0)
        else:
            ang, rr = rng.uniform(0, 2 * np.pi), 0.55 * math.sqrt(rng.uniform(0.05, 1.0))
            x, y = rr * anat.a * s * math.cos(ang), rr * anat.b * s * math.sin(ang)
        harm = tuple(
            (float(rng.uniform(0.03, 0.12)), float(rng.uniform(0, 2 * np.pi))) for _ in range(3)
        )
        oedema = float(rng.uniform(1.5, 4.0)) if rng.random() < 0.7 else 0.0
        return _Parenchymal(
            subtype,
            float(rng.uniform(55.0, 80.0)),
            t0,
            float(tz),
            float(x),
            float(y),
            float(radius),
            harm,
            oedema,
        )
    if subtype == "intraventricular":
        tz = rng.uniform(0.05, 0.12)
        t0 = _pick_centre(rng, lo, hi, tz, levels, level)
        sides = ((-1,), (1,), (-1, 1))[int(rng.integers(0, 3))]
        canvas = _Canvas(8, 1.0, anat)  # only for the image-aligned frame
        y_max = -np.inf
        for side in sides:
            for poly in _ventricle_polys(anat, t0, side):
                y_max = max(y_max, float(canvas.image_y(poly).max()))
        if not np.isfinite(y_max):
            y_max = 30.0
        y_level = y_max - rng.uniform(6.0, 16.0) * anat.vent
        return _Ventricular(subtype, float(rng.uniform(55.0, 75.0)), t0, float(tz), sides, y_level)
    # subarachnoid: sulci of a convexity sector and/or the basal cisterns
    tz = rng.uniform(0.06, 0.14)
    t0 = _pick_centre(rng, lo, hi, tz, levels, level)
    cisternal = t0 <= _CISTERNS[1] + 0.02 or rng.random() < 0.25
    sulcal = t0 > _CISTERNS[1] + 0.02 or rng.random() < 0.3
    theta, half = (
        (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.4, 0.9)))
        if sulcal
        else (
            math.nan,
            0.0,
        )
    )
    if cisternal:
        ct0 = t0 if t0 <= _CISTERNS[1] + 0.02 else _pick_centre(rng, *_CISTERNS, 0.05, levels, None)
        ct0 = float(np.clip(ct0, *_CISTERNS))
        ctz = float(rng.uniform(0.05, 0.1))
    else:
        ct0, ctz = math.nan, 0.0
    sylvian = ((-1,), (1,), (-1, 1))[int(rng.integers(0, 3))]
    return _Subarachnoid(
        subtype, float(rng.uniform(55.0, 75.0)), t0, float(tz), theta, half, ct0, ctz, sylvian
    )


# ----------------------------------------------------------------------------- drawing

# Lateral ventricle centre line of the patient's left side (x > 0), mirrored for the right:
# x, y (mm), half width (mm), level of the widest section, half extent in level.
_VENTRICLE = np.array(
    [
        [7.0, -32.0, 1.5, 0.50, 0.12],
        [10.0, -24.0, 4.5, 0.48, 0.12],
        [9.0, -10.0, 3.0, 0.54, 0.12],
        [10.0, 2.0, 3.0, 0.55, 0.11],
        [14.0, 14.0, 4.5, 0.50, 0.14],
        [18.0, 24.0, 6.0, 0.47, 0.11],
        [18.5, 34.0, 3.5, 0.45, 0.10],
        [15.5, 42.0, 1.2, 0.45, 0.09],
    ]
)


def _ventricle_polys(anat: _Anatomy, t: float, side: int) -> list[np.ndarray]:
    """Outline(s) of one lateral ventricle at level ``t`` (split where it is not cut)."""
    v = _VENTRICLE
    w = np.array([hw * _bump(t, c, h) for hw, c, h in v[:, 2:]]) * anat.vent
    if w.max() < 0.4:
        return []
    k = np.array([anat.a / 67.0, anat.b / 84.0])
    pts = v[:, :2] * k
    pts[:, 0] = pts[:, 0] * side + side * 2.0 * (anat.vent - 1.0)
    return _tube(pts, w, 6, 0.4)


def _tube(
    centre: np.ndarray, half_width: np.ndarray, upsample: int = 6, min_width: float = 0.0
) -> list[np.ndarray]:
    """Outline(s) of a band of varying width around a centre line, split where it is thinner
    than ``min_width``."""
    n = upsample * (len(centre) - 1) + 1
    u = np.linspace(0, len(centre) - 1, n)
    knots = np.arange(len(centre))
    c = np.stack([np.interp(u, knots, centre[:, i]) for i in range(2)], axis=1)
    ww = np.interp(u, knots, half_width)
    d = np.gradient(c, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
    out = []
    on = ww > min_width
    idx = np.flatnonzero(np.diff(np.r_[0, on.astype(np.int8), 0]))
    for a, b in zip(idx[::2], idx[1::2], strict=True):
        if b - a < 2:
            continue
        cc, wr, nn = c[a:b], ww[a:b, None], nrm[a:b]
        out.append(np.concatenate([cc + nn * wr, (cc - nn * wr)[::-1]]))
    return out


def _sulci(anat: _Anatomy, lv: _Level) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sulcal centre lines ``[m, 5, 2]`` (surface inwards), side branches ``[m, 3, 2]`` and
    each sulcus's angle at this level."""
    p = anat.sulci
    t = lv.t
    theta = p[:, 0] + p[:, 1] * np.sin(2 * np.pi * (p[:, 2] * t + p[:, 3]))
    r = _inner_radius(anat, theta, t)
    depth = p[:, 4] * (0.7 + 0.3 * np.sin(2 * np.pi * (2.0 * t + p[:, 5]))) * lv.oblique
    depth = np.minimum(depth, 0.4 * r)[:, None]
    frac = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    tilt, bend = p[:, 8, None], p[:, 9, None]
    lateral = depth * (tilt * frac + 2.0 * bend * frac * (1.0 - frac))
    rr = r[:, None] - depth * frac
    lines = _polar(rr, theta[:, None] + lateral / np.maximum(rr, 5.0))
    # a side branch leaving the middle of the sulcus
    bfrac = np.array([0.0, 0.5, 1.0])
    start = 0.45 * depth
    blat = lateral[:, 2:3] + p[:, 10, None] * 0.45 * depth * bfrac
    brr = r[:, None] - start - 0.3 * depth * bfrac
    branches = _polar(brr, theta[:, None] + blat / np.maximum(brr, 5.0))
    return lines, branches, theta


def _angle_in(theta: np.ndarray, centre: float, half: float) -> np.ndarray:
    return np.asarray(np.abs(np.angle(np.exp(1j * (theta - centre)))) <= half)


def _ring(r_outer: np.ndarray, r_inner: np.ndarray) -> list[np.ndarray]:
    return [_polar(r_outer), _polar(r_inner)]


def _draw_level(canvas: _Canvas, anat: _Anatomy, lesions: Sequence[_Lesion], t: float) -> None:
    """Draw one axial level of the head into ``canvas.tissue``.

    Inside out: brain, then skull base, then the skull and scalp as rings on top (they clip
    whatever was drawn past the inner table), then the hemorrhages.
    """
    s = _scale(t)
    if s <= 0.02:
        return
    ob = _obliquity(anat, t)
    base = float(np.clip((0.22 - t) / 0.2, 0.0, 1.0))  # skull-base weight
    r_in = np.maximum(_inner_radius(anat, _THETA, t), 0.0)
    lv = _Level(t, s, ob, r_in)
    thick = anat.skull * ob * (1.0 + 0.25 * _SIN**2 - 0.3 * _COS**4) * (1.0 + 0.6 * base)
    T = Tissue
    if r_in.min() >= 4.0:
        _draw_brain(canvas, anat, lesions, lv)
        if base > 0:
            _draw_skull_base(canvas, anat, lv, base)
    canvas.fill(_ring(r_in + thick + anat.scalp * ob, r_in + thick), T.SCALP)
    canvas.fill(_ring(r_in + thick, r_in + 0.7 * thick), T.BONE)
    canvas.fill(_ring(r_in + 0.7 * thick, r_in + 0.3 * thick), T.DIPLOE)
    canvas.fill(_ring(r_in + 0.3 * thick, r_in), T.BONE)
    if r_in.min() < 4.0:
        canvas.fill([_polar(r_in)], T.BONE)  # the vertex: a cap of bone
        return
    # hemorrhages, deepest first so the extra-axial ones lie on top (SAH is in the brain)
    for les in sorted(lesions, key=lambda x: _DRAW_ORDER.index(x.subtype)):
        w = les.weight(t)
        if w <= 0:
            continue
        if isinstance(les, _Ventricular):
            _draw_ivh(canvas, les)
        elif isinstance(les, _Parenchymal):
            _draw_iph(canvas, anat, les, lv, w)
        elif isinstance(les, _ExtraAxial):
            _draw_extra_axial(canvas, anat, les, t, w)


def _draw_brain(canvas: _Canvas, anat: _Anatomy, lesions: Sequence[_Lesion], lv: _Level) -> None:
    """Cortex, white matter, deep grey, sulci and fissures, cisterns, ventricles."""
    T = Tissue
    t, r_in, ob = lv.t, lv.r_in, lv.oblique
    canvas.fill([_polar(r_in)], T.CSF)
    rim = anat.rim * ob
    canvas.fill([_polar(r_in - rim)], T.GREY)
    r_wm = r_in - rim - anat.ribbon * ob * (1.0 + 0.25 * np.sin(7 * _THETA + anat.harm[0, 1]))
    if r_wm.min() > 3.0:
        canvas.fill([_polar(r_wm)], T.WHITE)
    sah = next((x for x in lesions if isinstance(x, _Subarachnoid)), None)
    ka, kb = anat.a / 67.0, anat.b / 84.0

    # deep grey nuclei: caudate heads, lentiform nuclei, thalami
    g = _bump(t, 0.44, 0.1)
    if g > 0:
        polys = []
        for sd in (-1, 1):
            polys += [
                _ellipse(sd * 14 * ka, -17 * kb, 5 * g, 7 * g),
                _ellipse(sd * 23 * ka, -3 * kb, 5.5 * g, 13 * g, sd * 0.25),
                _ellipse(sd * 10 * ka, 8 * kb, 8 * g, 10 * g),
            ]
        canvas.fill(polys, T.DEEP_GREY)

    # sulci lined with cortex; blood fills those of a convexity SAH
    lines, branches, theta = _sulci(anat, lv)
    vis = np.sin(2 * np.pi * (anat.sulci[:, 6] * t + anat.sulci[:, 7])) > -0.6
    has_branch = vis & (anat.sulci[:, 11] > 0.55)
    bleed = np.zeros_like(vis)
    if sah is not None and not math.isnan(sah.theta) and sah.weight(t) > 0:
        bleed = _angle_in(theta, sah.theta, sah.half_angle * (0.5 + 0.5 * sah.weight(t)))
    gm_lines = lines.copy()
    gm_lines[:, -1] = lines[:, -1] + (lines[:, -1] - lines[:, -2]) * 0.5
    top = float(_inner_radius(anat, np.array([-np.pi / 2]), t)[0])
    bottom = float(_inner_radius(anat, np.array([np.pi / 2]), t)[0])
    fissures = []  # interhemispheric
    if t > 0.66:
        fissures.append(np.array([[0.0, -top], [0.0, bottom]]))
    elif t > 0.26:
        fissures.append(np.array([[0.0, -top], [0.0, -0.6 * top]]))
        if t > 0.36:
            fissures.append(np.array([[0.0, bottom], [0.0, 0.6 * bottom]]))
    sylvian = []
    syl = _bump(t, 0.32, 0.1)
    if syl > 0:
        for sd in (-1, 1):
            edge = float(_inner_radius(anat, np.array([np.pi if sd < 0 else 0.0]), t)[0])
            start = (14 + 22 * max(0.0, t - 0.3) / 0.12) * ka
            sylvian.append(
                np.array(
                    [
                        [sd * start, -12 * kb],
                        [sd * 30 * ka, -17 * kb],
                        [sd * (0.5 * (30 * ka + edge)), -13 * kb],
                        [sd * edge, -9 * kb],
                    ]
                )
            )
    sheath = anat.sulcus_w + 2 * anat.ribbon
    canvas.lines([*gm_lines[vis | bleed], *branches[has_branch], *fissures], T.GREY, sheath)
    canvas.lines(sylvian, T.GREY, 6.0)
    canvas.lines([*lines[vis & ~bleed], *branches[has_branch & ~bleed]], T.SULCUS, anat.sulcus_w)
    canvas.lines(fissures, T.CSF, anat.sulcus_w + 0.8)
    if canvas.spacing < 0.6:
        canvas.lines(fissures, T.FALX, 0.5)
    if bleed.any():
        w = max(anat.sulcus_w, 1.6)
        canvas.lines([*lines[bleed], *branches[has_branch & bleed]], T.SUBARACHNOID, w)

    # brainstem, basal cisterns, sylvian fissures, third and fourth ventricles
    cist = T.CISTERN
    if sah is not None and abs(t - sah.cistern_t0) < sah.cistern_tz:  # False for nan
        cist = T.SUBARACHNOID
    pons = _bump(t, 0.12, 0.09)
    if pons > 0:
        canvas.fill([_ellipse(0, 5 * kb, 12 * pons, 11 * pons)], T.BRAINSTEM)
        canvas.fill([_ellipse(0, 16 * kb, 4 * pons * anat.vent, 2.5 * pons)], T.CSF)
    mid = _bump(t, 0.27, 0.08)
    if mid > 0:
        cy = 4 * kb
        canvas.fill([_ellipse(0, cy, 14.5 * mid, 13.5 * mid)], cist)  # ambient cistern
        canvas.fill([_ellipse(0, cy - 1.0, 12 * mid, 11 * mid)], T.BRAINSTEM)
        ang = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.array([9.0, 5.0] * 5) * (0.4 + 0.6 * mid)
        star = np.stack([rad * np.sin(ang), -rad * np.cos(ang) - 17 * kb], axis=1)
        canvas.fill([star], cist)  # suprasellar
        canvas.fill([_ellipse(0, cy + 15.5 * mid, 5 * mid, 3 * mid)], cist)  # quadrigeminal
    for sd, line in zip((-1, 1) if sylvian else (), sylvian, strict=True):
        if cist == T.SUBARACHNOID and sah is not None and sd in sah.sylvian:
            canvas.lines([line], T.SUBARACHNOID, 2.0)
        else:
            canvas.lines([line], T.CISTERN if t < _CISTERNS[1] + 0.04 else T.SULCUS, 1.8)
    third = _bump(t, 0.41, 0.08)
    if third > 0:
        canvas.lines([np.array([[0.0, -8 * kb], [0.0, 6 * kb]])], T.CSF, 2.0 * anat.vent * third)

    # lateral ventricles (temporal horns low down)
    th = _bump(t, 0.31, 0.05)
    for sd, vt in ((-1, T.VENTRICLE_RIGHT), (1, T.VENTRICLE_LEFT)):
        if th > 0:
            horn = np.array([[sd * 26 * ka, -6 * kb], [sd * 30 * ka, 4 * kb]])
            canvas.lines([horn], vt, 2.5 * th * anat.vent)
        canvas.fill(_ventricle_polys(anat, t, sd), vt)


def _draw_skull_base(canvas: _Canvas, anat: _Anatomy, lv: _Level, base: float) -> None:
    """Petrous ridges with mastoid air cells, clivus, sphenoid sinus, orbital roofs."""
    T = Tissue
    t = lv.t
    kb = anat.b / 84.0
    ax = float(_inner_radius(anat, np.array([0.0]), t)[0])
    pet = _bump(t, 0.12, 0.09)
    if pet > 0:
        ridges = []
        for sd in (-1, 1):
            centre = np.array([[sd * (ax + 3), 14.0], [sd * 0.6 * ax, 6.0], [sd * 15.0, -6.0]])
            ridges += _tube(centre, np.array([7.0, 4.5, 2.0]) * pet, 4)
        canvas.fill(ridges, T.BONE)
        if pet > 0.4:
            cells = [
                _ellipse(sd * (ax - dx), 12.0 + dy, 1.8, 1.5)
                for sd in (-1, 1)
                for dx, dy in ((6, 1), (9, 4), (7, 6), (11, 1), (12, 5))
            ]
            canvas.fill(cells, T.SINUS_AIR)
    sph = _bump(t, 0.1, 0.08)
    if sph > 0:
        canvas.fill([_ellipse(0, -14 * kb, 9 * sph, 6 * sph)], T.BONE)
        canvas.fill([_ellipse(0, -30 * kb, 15 * sph, 10 * sph)], T.BONE)
        canvas.fill([_ellipse(0, -30 * kb, 12 * sph, 7.5 * sph)], T.SINUS_AIR)
    roof = float(np.clip((0.15 - t) / 0.1, 0.0, 1.0))
    if roof > 0:  # orbital roofs cut obliquely: a bony shelf in front
        theta = np.linspace(-np.pi + 0.5, -0.5, 41)
        r = _inner_radius(anat, theta, t)
        u = (theta + np.pi / 2) / (np.pi / 2 - 0.5)
        depth = 0.38 * r * roof * (1 - u**2) * (1.0 + 0.12 * np.cos(9 * u))
        canvas.fill([np.concatenate([_polar(r, theta), _polar(r - depth, theta)[::-1]])], T.BONE)


def _draw_ivh(canvas: _Canvas, les: _Ventricular) -> None:
    """Blood layering in the dependent (posterior) part of the ventricles: a fluid level."""
    row = math.ceil(canvas.cy + les.y_level / canvas.spacing)
    if row >= canvas.size:
        return
    sub = canvas.tissue[max(row, 0) :]
    for side in les.sides:
        vt = Tissue.VENTRICLE_RIGHT if side < 0 else Tissue.VENTRICLE_LEFT
        sub[sub == vt] = Tissue.INTRAVENTRICULAR


def _draw_iph(canvas: _Canvas, anat: _Anatomy, les: _Parenchymal, lv: _Level, w: float) -> None:
    rho = math.hypot(les.x / (anat.a * lv.s), les.y / (anat.b * lv.s))
    room = (1.0 - rho) * min(anat.a, anat.b) * lv.s - anat.rim - 3.0
    r = min(les.radius * math.sqrt(w), room)
    if r < 0.8:
        return
    wob = np.ones_like(_UNIT24)
    for k, (amp, ph) in enumerate(les.harm, start=2):
        wob += amp * np.cos(k * _UNIT24 + ph + 3.0 * lv.t)
    centre = np.array([les.x, les.y])
    if les.oedema > 0:
        ro = min(r + les.oedema, room + 2.0)
        canvas.fill([centre + _polar(ro * wob, _UNIT24)], Tissue.OEDEMA)
    canvas.fill([centre + _polar(r * wob, _UNIT24)], Tissue.INTRAPARENCHYMAL)


def _draw_extra_axial(
    canvas: _Canvas, anat: _Anatomy, les: _ExtraAxial, t: float, w: float
) -> None:
    """Epidural: a short biconvex lens; subdural: a long thin crescent. Both on the inner table."""
    k = math.sqrt(w)
    if les.crescent:
        half, thick = les.half_angle * (0.6 + 0.4 * k), les.thickness * w**0.35
    else:
        half, thick = les.half_angle * (0.35 + 0.65 * k), les.thickness * k
    u = np.linspace(-1.0, 1.0, 33)
    theta = les.theta + u * half
    r = _inner_radius(anat, theta, t)
    prof = (1 - np.abs(u) ** 2.5) ** 0.8 if les.crescent else np.sqrt(1 - u**2)
    depth = np.minimum(thick * prof, 0.3 * r)
    if depth.max() * 2 < canvas.spacing:
        return
    poly = np.concatenate([_polar(r, theta), _polar(r - depth, theta)[::-1]])
    canvas.fill([poly], BLOOD_TISSUE[les.subtype])


# ----------------------------------------------------------------------------- to HU


def labels_from_tissue(tissue: np.ndarray, pixel_spacing: float) -> np.ndarray:
    """Slice labels ``uint8 [6]`` (LABELS order) from a tissue map: a subtype is present when
    its blood covers at least MIN_BLOOD_AREA_MM2."""
    counts = np.bincount(tissue.ravel(), minlength=256)[_BLOOD0 : _BLOOD0 + 5]
    min_px = max(1, math.ceil(MIN_BLOOD_AREA_MM2 / pixel_spacing**2 - 1e-9))
    out = np.zeros(len(LABELS), np.uint8)
    out[:5] = counts >= min_px
    out[5] = out[:5].any()
    return out


def _noise_gain(sigma: float) -> float:
    k = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma)
    return float(1.0 / np.sum(k**2))


def _to_hu(
    tissue: np.ndarray,
    anat: _Anatomy,
    lesions: Sequence[_Lesion],
    spacing: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Tissue map -> HU: look-up table, bone inhomogeneity, scanner blur, correlated noise."""
    lut = anat.lut.copy()
    for les in lesions:
        lut[BLOOD_TISSUE[les.subtype]] = les.hu
    hu = np.asarray(cv2.LUT(tissue, lut), np.float32)
    n = tissue.shape[0]
    coarse = rng.standard_normal((6, 6)).astype(np.float32)
    texture = cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC)
    hu += np.asarray(cv2.LUT(tissue, anat.texture) * texture, np.float32)
    sigma = max(0.5, anat.blur_mm / spacing)
    hu = np.asarray(cv2.GaussianBlur(hu, (0, 0), sigma), np.float32)
    noise = cv2.GaussianBlur(rng.standard_normal((n, n), dtype=np.float32), (0, 0), 0.6)
    hu += np.asarray(noise * np.float32(anat.noise * _noise_gain(0.6)), np.float32)
    # nothing below the loader's air floor, so HU survive a round trip through DICOM
    return np.maximum(hu, np.float32(_AIR_FLOOR), dtype=np.float32)


_Rng = np.random.Generator


def _streams(seed: int, n_lesions: int) -> tuple[_Rng, list[_Rng], _Rng]:
    """Separate streams, so adding a lesion changes neither the head nor the noise."""
    anatomy = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    lesions = [
        np.random.default_rng(np.random.SeedSequence([seed, 1, i])) for i in range(n_lesions)
    ]
    noise = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return anatomy, lesions, noise


def render_volume_with_tissue(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`render_volume`, plus the tissue map ``uint8 [z, y, x]`` (:class:`Tissue`)
    that tests use to check where each structure lies."""
    fov = spec.matrix * spec.pixel_spacing
    if fov < 200.0:
        log.warning("field of view %.0f mm is smaller than the head; the head is cropped", fov)
    arng, lrngs, nrng = _streams(spec.seed, len(SUBTYPES))
    anat = _sample_anatomy(arng)
    levels = spec.levels
    lesions = [
        _sample_lesion(s, lrngs[SUBTYPES.index(s)], anat, levels=levels) for s in spec.subtypes
    ]
    n, m = spec.n_slices, spec.matrix
    hu = np.empty((n, m, m), np.float32)
    tissue = np.empty((n, m, m), np.uint8)
    labels = np.zeros((n, len(LABELS)), np.uint8)
    for i, t in enumerate(levels):
        canvas = _Canvas(m, spec.pixel_spacing, anat)
        _draw_level(canvas, anat, lesions, float(t))
        tissue[i] = canvas.tissue
        hu[i] = _to_hu(canvas.tissue, anat, lesions, spec.pixel_spacing, nrng)
        labels[i] = labels_from_tissue(canvas.tissue, spec.pixel_spacing)
    missing = [s for s in spec.subtypes if not labels[:, LABELS.index(s)].any()]
    if missing:
        log.warning("phantom seed %d: %s not visible on any slice", spec.seed, ", ".join(missing))
    return hu, labels, tissue


def render_volume(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """HU volume float32 [z, y, x] (z from feet to head) and per-slice labels uint8 [z, 6]
    in LABELS order ("any" = OR of the five)."""
    hu, labels, _ = render_volume_with_tissue(spec)
    return hu, labels


def render_slice_with_tissue(
    rng: np.random.Generator,
    size: int,
    subtypes: Sequence[str],
    level: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`render_slice`, plus the slice's tissue map (uint8, :class:`Tissue`)."""
    subtypes = _check_subtypes(subtypes)
    if level is None:
        lo = max([_RANGE[s][0] for s in subtypes], default=0.02)
        hi = min([_RANGE[s][1] for s in subtypes], default=0.97)
        level = float(rng.uniform(lo, hi)) if lo < hi else float(rng.uniform(0.39, 0.55))
    elif not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1]. Received: level={level}")
    anat = _sample_anatomy(rng, pose=2.5)
    lesions = [_sample_lesion(s, rng, anat, level=level) for s in subtypes]
    spacing = float(rng.uniform(215.0, 245.0)) / size
    canvas = _Canvas(size, spacing, anat)
    _draw_level(canvas, anat, lesions, level)
    hu = _to_hu(canvas.tissue, anat, lesions, spacing, rng)
    return hu, labels_from_tissue(canvas.tissue, spacing), canvas.tissue


def render_slice(
    rng: np.random.Generator,
    size: int,
    subtypes: Sequence[str],
    level: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One random axial 2-D slice in HU (float32 [size, size]) and its 6 labels, for on-the-fly
    training. ``level`` in [0, 1] is where in the head (None: random, where the requested
    subtypes can be). A requested subtype is labelled 0 only when it truly does not show."""
    hu, labels, _ = render_slice_with_tissue(rng, size, subtypes, level)
    return hu, labels


# ----------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class PhantomSeries:
    """Where a written phantom series lies and its per-slice truth."""

    folder: Path
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    study_uid: str
    series_uid: str
    labels: np.ndarray = field(compare=False)  # [z, 6] uint8, in file order (feet -> head)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["ich-phantom", *(str(p) for p in parts)]))


def _ds(x: float) -> str:
    """A decimal string that fits DICOM's 16 characters."""
    out = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if out in ("-0", "") else out[:16]


def _describe(spec: PhantomSpec) -> str:
    what = "+".join(SHORT_NAMES[s] for s in spec.subtypes) or "normal"
    return f"Phantom head {spec.slice_thickness:g}mm: {what}"


def _digits(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10**n


def write_series(
    folder: Path,
    spec: PhantomSpec,
    patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Head",
    study_uid: str | None = None,
    series_description: str | None = None,
) -> PhantomSeries:
    """Write one CT DICOM series (one file per slice) into folder.

    UIDs come from the seed, patient and slice index, so the same call writes the same files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu, labels = render_volume(spec)
    description = series_description or _describe(spec)
    key = (spec.seed, patient_id, spec.subtypes, spec.n_slices, spec.matrix, spec.pixel_spacing)
    study_uid = str(study_uid or _uid("study", *key))
    series_uid = _uid("series", study_uid, description, *key)
    frame_uid = _uid("frame", series_uid)
    day = date(2024, 1, 1) + timedelta(days=_digits(f"{spec.seed}{patient_id}", 3) % 365)
    birth = date(1940, 1, 1) + timedelta(days=_digits(patient_id, 6) % (50 * 365))
    accession = f"PH{_digits(study_uid, 8):08d}"
    n, m, ps = spec.n_slices, spec.matrix, spec.pixel_spacing
    xy0 = -(m - 1) / 2.0 * ps
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), -32768, 32767).astype("<i2")
    files, sops = [], []
    for i in range(n):
        sop = _uid("image", series_uid, i)
        z = (i - (n - 1) / 2.0) * spec.slice_thickness
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ICH_PHANTOM_1"
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = day.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.ContentTime = f"{12 + i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}"
        ds.AccessionNumber = accession
        ds.ReferringPhysicianName = ""  # type 2 in the General Study module: present, empty
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "ich_model.phantom"
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.SeriesDescription = description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = "MF"[_digits(patient_id, 4) % 2]
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = _ds(spec.slice_thickness)
        ds.KVP = "120"
        ds.SpacingBetweenSlices = _ds(spec.slice_thickness)
        ds.ConvolutionKernel = "H30s"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(xy0), _ds(xy0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = m
        ds.PixelSpacing = [_ds(ps), _ds(ps)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[i].tobytes()
        path = folder / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    log.debug("wrote phantom series %s (%d slices)", description, n)
    return PhantomSeries(folder, tuple(files), tuple(sops), study_uid, series_uid, labels)


def write_labels_csv(path: Path, series: Sequence[PhantomSeries]) -> None:
    """Per-slice truth in the RSNA 2019 long format ('ID,Label', 'ID_<SOPInstanceUID>_<label>')
    so the phantom dataset scores with the same tools as the challenge data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Label"])
        for s in series:
            for sop, row in zip(s.sop_uids, s.labels, strict=True):
                for label, v in zip(LABELS, row, strict=True):
                    w.writerow([f"ID_{sop}_{label}", int(v)])


#: The cycle of the "balanced" mix: normal heads, each subtype alone, then mixes.
_BALANCED: tuple[tuple[str, ...], ...] = (
    (),
    ("epidural",),
    ("intraparenchymal",),
    ("intraventricular",),
    ("subarachnoid",),
    ("subdural",),
    ("subdural", "subarachnoid"),
    ("intraparenchymal", "intraventricular"),
    (),
    ("epidural", "subarachnoid"),
    ("subdural", "intraparenchymal", "subarachnoid"),
    ("intraventricular", "subarachnoid"),
)
SUBTYPE_MIXES = ("balanced", "random", "normal")


def _mix(kind: str, n: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    if kind == "balanced":
        return [_BALANCED[i % len(_BALANCED)] for i in range(n)]
    if kind == "normal":
        return [()] * n
    if kind == "random":
        out: list[tuple[str, ...]] = []
        for _ in range(n):
            k = 0 if rng.random() < 0.35 else int(rng.integers(1, 4))
            picked = rng.choice(len(SUBTYPES), size=k, replace=False)
            out.append(tuple(SUBTYPES[j] for j in sorted(picked)))
        return out
    raise ValueError(
        f"unknown subtype_mix. Received: {kind!r}; expected one of {SUBTYPE_MIXES}."
        + _did_you_mean(kind, SUBTYPE_MIXES)
    )


def make_phantom_dataset(
    out_dir: Path,
    n_studies: int,
    n_slices: int = 40,
    matrix: int = 512,
    seed: int = 0,
    subtype_mix: str = "balanced",
) -> list[PhantomSeries]:
    """Write n_studies studies (one series each, in out_dir/<patient_id>/...) covering every
    subtype (including normal heads and mixes) and out_dir/labels.csv. Deterministic for a seed.

    The field of view stays at 230 mm whatever the matrix, so small test datasets hold whole heads.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
    mixes = _mix(subtype_mix, n_studies, rng)
    written = []
    for i, subtypes in enumerate(mixes):
        patient_id = f"PHANTOM-{i + 1:04d}"
        study_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        spec = PhantomSpec.for_matrix(matrix, subtypes=subtypes, n_slices=n_slices, seed=study_seed)
        written.append(
            write_series(out_dir / patient_id / "CT", spec, patient_id, f"Phantom^Head{i + 1:04d}")
        )
    write_labels_csv(out_dir / "labels.csv", written)
    log.info("wrote %d phantom studies and labels.csv", len(written))
    return written
