"""Seeded chest-X-ray-like phantoms with known attributes and their true counterfactuals.

A phantom is rendered like a radiograph: every structure contributes an additive attenuation
("density") map, and the pixel value is a pointwise function of the summed density plus a noise
field. All random variation (anatomy, device placement, textures, noise) is drawn from the seed
in a fixed order that never depends on the attribute values, so rendering the same seed with one
attribute changed (the *true counterfactual*) changes pixels only where that attribute's density
layer is non-zero, which is exactly what `attribute_mask` returns.

Coordinates: anatomical (x, y) in roughly [-1, 1]; x grows to the image right (the patient's left
on a PA film), y grows downwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DeviceKind = Literal["pacemaker", "tube", "ecg"]
DEVICE_KINDS: tuple[str, ...] = ("pacemaker", "tube", "ecg")
ATTRIBUTES: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pacemaker",
    "tube",
    "ecg",
    "devices",
    "sex",
    "age",
)


class PhantomAttributes(BaseModel):
    """What a phantom shows. `devices` is a set of kinds: "pacemaker", "tube", "ecg"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cardiomegaly: bool = False
    pleural_effusion: bool = False
    devices: frozenset[DeviceKind] = frozenset()
    sex: Literal["female", "male"] = "male"
    age: int = Field(50, ge=0, le=120)
    # How much fluid a pleural effusion shows: 1 is frank basal fluid; small values leave a subtle
    # blunting of the costophrenic angle (the fluid's height and its lateral meniscus scale with it).
    effusion_severity: float = Field(1.0, gt=0.0, le=1.0)

    def intervene(self, intervention: dict[str, Any]) -> PhantomAttributes:
        """These attributes with `intervention` applied.

        Keys are attribute names (`cardiomegaly`, `pleural_effusion`, `devices`, `sex`, `age`)
        or a device kind (`pacemaker`, `tube`, `ecg`) mapped to a bool that adds/removes it.
        """
        values = self.model_dump()
        devices = set(values["devices"])
        for key, value in intervention.items():
            if key in DEVICE_KINDS:
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"intervention[{key!r}] must be a bool, got {value!r}")
                devices = devices | {key} if value else devices - {key}
            elif key == "devices":
                devices = set(value)
            elif key in PhantomAttributes.model_fields:
                values[key] = value
            else:
                raise ValueError(f"intervention: unknown attribute {key!r}; expected one of {ATTRIBUTES}")
        values["devices"] = frozenset(devices)
        return PhantomAttributes.model_validate(values)


# ----------------------------------------------------------------------------------------------
# Per-subject random draws (never depend on attributes)


@dataclass(frozen=True)
class _Anatomy:
    scale: float
    shift_x: float
    shift_y: float
    rotation: float  # radians
    body_half_width: float
    lung_half_width: float
    lung_top: float
    diaphragm_y: float
    right_dome_lift: float  # the right hemidiaphragm (image left) sits higher
    heart_z: float  # standardised heart-size jitter, shared by normal and enlarged hearts
    heart_x: float
    heart_y: float
    rib_spacing: float
    rib_top: float
    rib_curve: float
    effusion_side: int  # -1 image-left only, +1 image-right only, 0 both
    effusion_height: float
    breast_size: float
    breast_y: float
    pacemaker_side: int
    pacemaker_x: float
    pacemaker_y: float
    pacemaker_angle: float
    lead_bend: float
    tube_ng: bool  # naso-gastric tube (down into the stomach) rather than an ET tube
    tube_tip_y: float
    tube_bend: float
    ecg_xy: np.ndarray  # (5, 2) electrode centres
    ecg_count: int
    ecg_wire_angle: np.ndarray  # (5,)
    gain: float
    offset: float
    gamma: float
    heel: float
    noise_sigma: float
    lung_texture: np.ndarray  # (24, 24) standard normal
    bone_texture: np.ndarray  # (32, 32) standard normal


def _draw_anatomy(seed: int) -> _Anatomy:
    """All per-subject random variation except the pixel noise, in a fixed draw order."""
    rng = np.random.default_rng(seed)
    u = rng.random(40)

    def lerp(i: int, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * u[i])

    ecg = rng.random((5, 2))
    ecg_xy = np.stack([(ecg[:, 0] * 2 - 1) * 0.75, -0.75 + ecg[:, 1] * 1.3], axis=1)
    ecg_angle = rng.random(5) * 2 * np.pi
    lung_texture = rng.standard_normal((24, 24))
    bone_texture = rng.standard_normal((32, 32))
    return _Anatomy(
        scale=lerp(0, 0.9, 1.04),
        shift_x=lerp(1, -0.05, 0.05),
        shift_y=lerp(2, -0.04, 0.05),
        rotation=math.radians(lerp(3, -4.0, 4.0)),
        body_half_width=lerp(4, 0.84, 0.96),
        lung_half_width=lerp(5, 0.32, 0.37),
        lung_top=lerp(6, -0.82, -0.72),
        diaphragm_y=lerp(7, 0.5, 0.62),
        right_dome_lift=lerp(8, 0.0, 0.06),
        heart_z=lerp(9, -1.0, 1.0),
        heart_x=lerp(10, 0.06, 0.12),
        heart_y=lerp(11, 0.22, 0.3),
        rib_spacing=lerp(12, 0.125, 0.145),
        rib_top=lerp(13, -0.84, -0.78),
        rib_curve=lerp(14, 0.8, 1.15),
        effusion_side=int(np.floor(u[15] * 3)) - 1,
        effusion_height=lerp(16, 0.2, 0.34),
        breast_size=lerp(17, 0.85, 1.15),
        breast_y=lerp(18, 0.38, 0.5),
        pacemaker_side=1 if u[19] < 0.8 else -1,  # usually the patient's left
        pacemaker_x=lerp(20, 0.38, 0.55),
        pacemaker_y=lerp(21, -0.66, -0.52),
        pacemaker_angle=lerp(22, -0.4, 0.4),
        lead_bend=lerp(23, -0.08, 0.08),
        tube_ng=bool(u[24] < 0.5),
        tube_tip_y=lerp(25, -0.42, -0.28),
        tube_bend=lerp(26, -0.04, 0.04),
        ecg_xy=ecg_xy,
        ecg_count=3 + int(np.floor(u[27] * 3)),
        ecg_wire_angle=ecg_angle,
        gain=lerp(28, 1.15, 1.45),
        offset=lerp(29, -0.04, 0.04),
        gamma=lerp(30, 0.85, 1.15),
        heel=lerp(31, -0.08, 0.08),
        noise_sigma=lerp(32, 0.012, 0.03),
        lung_texture=lung_texture,
        bone_texture=bone_texture,
    )


# ----------------------------------------------------------------------------------------------
# Geometry helpers (vectorised over the pixel grid)


@dataclass(frozen=True)
class _Grid:
    x: np.ndarray  # (H, W) anatomical x of each pixel centre
    y: np.ndarray  # (H, W)
    px: float  # one pixel in anatomical units
    anatomy: _Anatomy

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel (row, col) slices covering the anatomical box [x0, x1] x [y0, y1]; None if off-image."""
        # Plain floats: this runs once per device segment, where numpy's per-call cost dominates.
        a, res = self.anatomy, self.x.shape[0]
        cos, sin, half = math.cos(a.rotation), math.sin(a.rotation), res / 2
        # The forward map of `_grid`: anatomy -> image coordinates in [-1, 1] -> pixel index.
        cols = [(a.scale * (cos * x - sin * y) + a.shift_x + 1) * half - 0.5 for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))]
        rows = [(a.scale * (sin * x + cos * y) + a.shift_y + 1) * half - 0.5 for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))]
        c0, c1 = max(math.floor(min(cols)), 0), min(math.ceil(max(cols)) + 1, res)
        r0, r1 = max(math.floor(min(rows)), 0), min(math.ceil(max(rows)) + 1, res)
        return None if c0 >= c1 or r0 >= r1 else (slice(r0, r1), slice(c0, c1))


def _grid(a: _Anatomy, resolution: int) -> _Grid:
    c = (np.arange(resolution) + 0.5) / resolution * 2 - 1  # pixel centres in [-1, 1]
    iy, ix = np.meshgrid(c, c, indexing="ij")
    # Image = anatomy rotated, scaled and shifted; invert that map for each pixel.
    cos, sin = math.cos(a.rotation), math.sin(a.rotation)
    dx, dy = ix - a.shift_x, iy - a.shift_y
    x = (cos * dx + sin * dy) / a.scale
    y = (-sin * dx + cos * dy) / a.scale
    return _Grid(x=x, y=y, px=2.0 / resolution / a.scale, anatomy=a)


def _sstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    """Smoothstep from 0 at e0 to 1 at e1; exactly 0 beyond e0 so layers have a sharp support."""
    t = np.minimum(np.maximum((v - e0) * (1.0 / (e1 - e0)), 0.0), 1.0)  # np.clip is slower on small arrays
    return t * t * (3.0 - 2.0 * t)


def _inside(sdf: np.ndarray, soft: float) -> np.ndarray:
    """Soft indicator of sdf < 0 with a transition of half-width `soft` (exactly 0 for sdf >= soft)."""
    return _sstep(soft, -soft, sdf)


def _ellipse_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    # Approximate signed distance: exact on the axes, good enough for soft edges.
    return (np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) - 1.0) * min(ax, ay)


def _segments_distance(g: _Grid, p0: np.ndarray, p1: np.ndarray, reach: float, chunk: int = 4) -> np.ndarray:
    """Distance of every pixel to the nearest of the segments p0[i]-p1[i] ((S, 2) each; a
    segment with p0 == p1 is a point).

    Segments are taken `chunk` at a time and only pixels in the chunk's window (its bounding
    box grown by `reach`) are computed; the rest get +inf. Every pixel closer than `reach` is
    exact, which is all thin devices need. Consecutive polyline segments share a compact
    window, so chunking trades a little wasted area for fewer numpy calls.
    """
    out = np.full(g.x.shape, np.inf)
    for i in range(0, len(p0), chunk):
        a, b = p0[i : i + chunk], p1[i : i + chunk]  # (C, 2)
        (x0, y0), (x1, y1) = np.minimum(a, b).min(axis=0).tolist(), np.maximum(a, b).max(axis=0).tolist()
        win = g.window(x0 - reach, y0 - reach, x1 + reach, y1 + reach)
        if win is None:
            continue
        px = g.x[win][None] - a[:, 0, None, None]  # (C, h, w)
        py = g.y[win][None] - a[:, 1, None, None]
        d = b - a
        dx, dy = d[:, 0, None, None], d[:, 1, None, None]
        inv_len2 = 1.0 / np.maximum(dx * dx + dy * dy, 1e-12)
        t = np.minimum(np.maximum((px * dx + py * dy) * inv_len2, 0.0), 1.0)
        view = out[win]  # basic slicing: a view, updated in place
        np.minimum(view, np.hypot(px - t * dx, py - t * dy).min(axis=0), out=view)
    return out


def _polyline_distance(g: _Grid, points: np.ndarray, reach: float) -> np.ndarray:
    """Distance of every pixel to a polyline of (P, 2) vertices (see `_segments_distance`)."""
    return _segments_distance(g, points[:-1], points[1:], reach)


def _bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 12) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (n, 2)


def _sample_field(field: np.ndarray, x: np.ndarray, y: np.ndarray, extent: float = 1.25) -> np.ndarray:
    """Bilinear lookup of a small seed-drawn field spanning [-extent, extent]^2 (resolution-independent)."""
    n = field.shape[0]
    k = (n - 1) / (2 * extent)
    fx = np.minimum(np.maximum((x + extent) * k, 0.0), n - 1.001)
    fy = np.minimum(np.maximum((y + extent) * k, 0.0), n - 1.001)
    j, i = fx.astype(np.intp), fy.astype(np.intp)
    tx, ty = fx - j, fy - i
    flat, idx = field.ravel(), i * n + j  # 1-D take is much cheaper than 2-D fancy indexing
    top = flat.take(idx) * (1 - tx) + flat.take(idx + 1) * tx
    bottom = flat.take(idx + n) * (1 - tx) + flat.take(idx + n + 1) * tx
    return top * (1 - ty) + bottom * ty


def _soft(g: _Grid, anatomical: float) -> float:
    """Edge half-width: the anatomical blur, but never sharper than about a pixel (anti-aliasing)."""
    return max(anatomical, 0.75 * g.px)


# ----------------------------------------------------------------------------------------------
# Density layers. Each returns an (H, W) float map that is exactly 0 outside its support.


def _diaphragm(a: _Anatomy, x: np.ndarray) -> np.ndarray:
    """y of the diaphragm dome under each x: highest mid-hemithorax, lowest at the costophrenic angles."""
    side_lift = np.where(x < 0, a.right_dome_lift, 0.0)
    u = np.abs(x) / a.body_half_width
    return a.diaphragm_y - side_lift - 0.16 * np.exp(-(((u - 0.45) / 0.22) ** 2))


def _lungs(g: _Grid, a: _Anatomy) -> np.ndarray:
    """Soft lung-field indicator (both lungs)."""
    soft = _soft(g, 0.02)
    cy = 0.5 * (a.lung_top + a.diaphragm_y + 0.1)
    ay = 0.5 * (a.diaphragm_y + 0.1 - a.lung_top)
    u = np.abs(g.x)
    # Superellipse, narrower towards the apex: broad lateral walls, rounded apex.
    hw = a.lung_half_width * (0.72 + 0.28 * _sstep(cy - ay, cy + 0.2 * ay, g.y))
    lx = u - (0.11 + hw)
    r = (np.abs(lx / hw) ** 2.4 + np.abs((g.y - cy) / ay) ** 2.0) ** (1 / 2.2)
    shape_sdf = (r - 1.0) * a.lung_half_width
    dome_sdf = g.y - _diaphragm(a, g.x)
    return _inside(np.maximum(shape_sdf, dome_sdf), soft)


def _base_density(g: _Grid, a: _Anatomy, lungs: np.ndarray) -> np.ndarray:
    """Body soft tissue, lung air, mediastinum, trachea, hila and vascular markings (seed only)."""
    soft = _soft(g, 0.03)
    # Body: an elliptic cylinder whose width tapers to the neck; density ∝ path length.
    taper = 0.38 + 0.62 * _sstep(-1.05, -0.6, g.y)
    half_w = a.body_half_width * taper
    chord = np.sqrt(np.clip(1.0 - (g.x / half_w) ** 2, 0.0, 1.0))
    body = _inside(np.abs(g.x) - half_w, soft) * (0.35 + 0.65 * chord)
    # Shoulders at the top corners.
    for side in (-1.0, 1.0):
        sdf = _ellipse_sdf(g.x, g.y, side * (a.body_half_width - 0.05), -1.02, 0.34, 0.22)
        body = np.maximum(body, 0.55 * _inside(sdf, 2 * soft))
    abdomen = 0.2 * _sstep(-0.05, 0.15, g.y - _diaphragm(a, g.x))  # below the diaphragm: liver/spleen
    trachea = 0.25 * _inside(np.maximum(np.abs(g.x + 0.01) - 0.035, g.y + 0.2), _soft(g, 0.015))
    # Air in the lungs removes density; vessels fan out from the hila.
    hilum_dist = np.minimum(np.hypot(g.x + 0.17, g.y + 0.05), np.hypot(g.x - 0.17, g.y + 0.02))
    texture = _sample_field(a.lung_texture, g.x, g.y)
    vessels = np.exp(-hilum_dist / 0.28) * (0.55 + 0.25 * texture) + 0.05 * texture
    lung_air = lungs * (0.95 - 0.3 * vessels)
    return 1.0 * body + abdomen - trachea - lung_air


def _bone_geometry(g: _Grid, a: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """(ribs + clavicles, spine) band profiles, each in [0, ~1]; independent of age."""
    soft = _soft(g, 0.012)
    u = np.abs(g.x)
    # Each pixel only meets the nearest rib of each family, so find that rib's index directly
    # instead of drawing all ten (keeps this O(H*W)).
    lateral = a.body_half_width * (0.55 + 0.35 * _sstep(-0.95, -0.3, g.y))  # the chest wall
    s = np.clip(u / lateral, 0.0, 1.3)  # normalised position from the spine to the chest wall
    arc = a.rib_curve * (0.34 * s**2 - 0.16 * s)  # posterior ribs: arcs, convex upwards
    k = np.clip(np.round((g.y - a.rib_top - arc) / a.rib_spacing), 0, 9)
    thick = 0.028 + 0.003 * k
    dist = np.abs(g.y - (a.rib_top + k * a.rib_spacing + arc))
    along = _sstep(0.04, 0.1, u) * _inside(s - 1.0, 0.06)  # from the spine to the chest wall
    cortex = 0.6 + 0.4 * _sstep(0.3 * thick, thick, dist)  # brighter cortical edges
    ribs = _inside(dist - thick, soft) * cortex * along
    # Anterior ribs: fainter, running from the chest wall down towards the sternum.
    arc_a = 0.22 + 0.28 * np.clip(1.0 - s, 0.0, None) ** 1.5
    k_a = np.clip(np.round((g.y - a.rib_top - arc_a) / a.rib_spacing), 0, 6)
    dist_a = np.abs(g.y - (a.rib_top + k_a * a.rib_spacing + arc_a))
    along_a = _sstep(0.15, 0.4, u) * _inside(s - 1.0, 0.06)
    ribs = np.maximum(ribs, 0.45 * _inside(dist_a - 0.8 * (0.028 + 0.003 * k_a), soft) * along_a)
    # Clavicles: from the sternal notch out and up to the shoulders.
    cl_centre = -0.74 - 0.18 * _sstep(0.05, 0.8, u) + 0.05 * (u - 0.4) ** 2
    clav = _inside(np.abs(g.y - cl_centre) - 0.032, soft) * _sstep(0.05, 0.12, u) * _inside(u - 0.78, 0.05)
    ribs = np.maximum(ribs, 1.1 * clav)
    # Spine: a vertical column with vertebral end-plates.
    vert = 0.8 + 0.2 * np.cos(g.y / a.rib_spacing * 2 * np.pi) ** 2
    spine = _inside(np.abs(g.x) - 0.075, soft) * _sstep(-1.1, -0.9, g.y) * vert
    return ribs, spine


def _bone(g: _Grid, a: _Anatomy, age: int) -> np.ndarray:
    """Ribs, clavicles and spine; bone density falls and the trabecular pattern coarsens with age."""
    ribs, spine = _bone_geometry(g, a)
    t = float(np.clip((age - 20) / 70.0, 0.0, 1.0))
    density = 0.3 - 0.14 * t
    coarse = 0.08 + 0.3 * t  # trabecular texture amplitude; < 1 keeps the support unchanged
    texture = _sample_field(a.bone_texture, g.x * 1.6, g.y * 1.6)
    tex = 1.0 + coarse * np.tanh(texture)
    return density * tex * (ribs + 0.7 * spine)


def _heart(g: _Grid, a: _Anatomy, enlarged: bool) -> np.ndarray:
    """Heart silhouette (soft indicator); cardiomegaly widens it (cardiothoracic ratio ≈ 0.45 vs ≈ 0.62)."""
    half_w = (0.46 if enlarged else 0.31) + 0.025 * a.heart_z
    half_h = (0.3 if enlarged else 0.22) + 0.015 * a.heart_z
    cx = a.heart_x + (0.07 if enlarged else 0.0)
    cy = a.heart_y + (0.05 if enlarged else 0.0)
    soft = _soft(g, 0.025)
    sdf = _ellipse_sdf(g.x, g.y, cx, cy, half_w, half_h)
    below = g.y - (_diaphragm(a, g.x) + 0.04)  # the heart sits on the diaphragm
    return _inside(np.maximum(sdf, below), soft)


def _effusion(g: _Grid, a: _Anatomy, lungs: np.ndarray, present: bool, severity: float = 1.0) -> np.ndarray:
    """Basal pleural fluid (soft indicator inside the lungs) with a meniscus rising laterally,
    which blunts the costophrenic angle; `severity` scales the fluid's height and meniscus."""
    if not present:
        return np.zeros_like(g.x)
    base = _diaphragm(a, g.x)
    u = np.abs(g.x) / a.body_half_width
    level = base - severity * (a.effusion_height + 0.25 * _sstep(0.45, 1.0, u) ** 1.5)
    side = np.ones_like(g.x) if a.effusion_side == 0 else (np.sign(g.x) == a.effusion_side).astype(np.float64)
    fluid = _sstep(0.0, 0.1, g.y - level)
    return fluid * side * (lungs > 0)


def _breast(g: _Grid, a: _Anatomy, female: bool) -> np.ndarray:
    """Breast soft-tissue shadow over the lower lung fields (female phantoms only)."""
    if not female:
        return np.zeros_like(g.x)
    out = np.zeros_like(g.x)
    soft = _soft(g, 0.04)
    for side in (-1.0, 1.0):
        cx, cy = side * 0.5 * a.body_half_width, a.breast_y
        ax, ay = 0.36 * a.breast_size, 0.3 * a.breast_size
        sdf = _ellipse_sdf(g.x, g.y, cx, cy, ax, ay)
        r = np.clip(1.0 + sdf / min(ax, ay), 0.0, 1.0)
        thickness = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0)) + 0.2
        fade_up = _sstep(cy - ay, cy + 0.2 * ay, g.y)  # the shadow fades towards the upper chest
        out = out + 0.3 * _inside(sdf, soft) * thickness * fade_up
    return out * _inside(np.abs(g.x) - a.body_half_width, soft)


_METAL = 3.0


def _pacemaker(g: _Grid, a: _Anatomy, present: bool) -> np.ndarray:
    """Generator box in the infraclavicular chest with a lead through the SVC into the right ventricle."""
    if not present:
        return np.zeros_like(g.x)
    cx, cy = a.pacemaker_side * a.pacemaker_x, a.pacemaker_y
    soft = _soft(g, 0.01)
    box = np.zeros_like(g.x)
    reach = 0.11 + soft  # covers the rotated box
    win = g.window(cx - reach, cy - reach, cx + reach, cy + reach)
    if win is not None:
        cos, sin = math.cos(a.pacemaker_angle), math.sin(a.pacemaker_angle)
        x, y = g.x[win] - cx, g.y[win] - cy
        box_sdf = np.maximum(np.abs(cos * x + sin * y) - 0.085, np.abs(cos * y - sin * x) - 0.06)
        box[win] = _inside(box_sdf, soft) * (1.0 - 0.25 * _inside(box_sdf + 0.035, soft))  # battery outline
    start = (cx - a.pacemaker_side * 0.05, cy + 0.02)
    svc = (-0.06 + a.lead_bend, -0.25)
    apex = (a.heart_x + 0.12, a.heart_y + 0.12)  # right-ventricular apex of the normal heart
    path = np.concatenate([_bezier(start, (0.5 * (cx + svc[0]), cy - 0.1), svc, 8),
                           _bezier(svc, (-0.12, a.heart_y - 0.05), apex, 10)[1:]])
    half, lead_soft = max(0.008, 0.4 * g.px), _soft(g, 0.006)
    lead = _inside(_polyline_distance(g, path, half + lead_soft) - half, lead_soft)
    return _METAL * np.maximum(box, 0.7 * lead)


def _tube(g: _Grid, a: _Anatomy, present: bool) -> np.ndarray:
    """ET tube ending above the carina, or a naso-gastric tube down into the stomach."""
    if not present:
        return np.zeros_like(g.x)
    if a.tube_ng:
        path = np.concatenate([_bezier((-0.02, -1.3), (0.04 + a.tube_bend, -0.2), (0.03, 0.55), 10),
                               _bezier((0.03, 0.55), (0.08, 0.8), (0.3, 0.72), 6)[1:]])
    else:
        path = _bezier((-0.01, -1.3), (a.tube_bend, -0.8), (-0.01, a.tube_tip_y), 8)
    half, soft = max(0.011, 0.5 * g.px), _soft(g, 0.004)
    dist = _polyline_distance(g, path, 1.25 * half + soft)
    wall = _inside(np.abs(dist - half) - 0.25 * half, soft)  # radiopaque walls, lucent lumen
    return 0.8 * _METAL * np.maximum(wall, 0.6 * _inside(dist - half, soft))


def _ecg(g: _Grid, a: _Anatomy, present: bool) -> np.ndarray:
    """A few round ECG electrodes (bright snap in a ring) with short wire stubs."""
    if not present:
        return np.zeros_like(g.x)
    soft = _soft(g, 0.006)
    centres = a.ecg_xy[: a.ecg_count]  # (N, 2)
    angles = a.ecg_wire_angle[: a.ecg_count]
    r = _segments_distance(g, centres, centres, 0.053 + soft, chunk=1)  # distance to the nearest electrode centre
    ring = _inside(np.abs(r - 0.045) - 0.008, soft)
    snap = _inside(r - 0.018, soft)
    direction = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # a short wire stub leaves each ring
    half = max(0.005, 0.3 * g.px)
    wire = _segments_distance(g, centres + 0.05 * direction, centres + 0.2 * direction, half + soft, chunk=1)
    wire = _inside(wire - half, soft)
    return _METAL * np.maximum(np.maximum(0.6 * ring, snap), 0.5 * wire)


def _layers(attrs: PhantomAttributes, g: _Grid, a: _Anatomy) -> dict[str, np.ndarray]:
    lungs = _lungs(g, a)
    return {
        "base": _base_density(g, a, lungs),
        "bone": _bone(g, a, attrs.age),
        "lungs": lungs,
        "heart": _heart(g, a, attrs.cardiomegaly),
        "effusion": _effusion(g, a, lungs, attrs.pleural_effusion, attrs.effusion_severity),
        "breast": _breast(g, a, attrs.sex == "female"),
        "pacemaker": _pacemaker(g, a, "pacemaker" in attrs.devices),
        "tube": _tube(g, a, "tube" in attrs.devices),
        "ecg": _ecg(g, a, "ecg" in attrs.devices),
    }


# ----------------------------------------------------------------------------------------------
# Public API


def _check(attrs: PhantomAttributes, seed: int, resolution: int) -> None:
    if not isinstance(attrs, PhantomAttributes):
        raise ValueError(f"attrs must be PhantomAttributes, got {type(attrs).__name__}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    if not 16 <= resolution <= 2048:
        raise ValueError(f"resolution must be in [16, 2048], got {resolution}")


# The draws that only show when an attribute is present (where a device sits, which side the fluid
# fills, the breast shadow's size). A source without the attribute says nothing about them, so the
# counterfactual that adds it is one of many equally true ones (`redraw`).
HIDDEN_DRAWS: dict[str, tuple[str, ...]] = {
    "pacemaker": ("pacemaker_side", "pacemaker_x", "pacemaker_y", "pacemaker_angle", "lead_bend"),
    "tube": ("tube_ng", "tube_tip_y", "tube_bend"),
    "ecg": ("ecg_xy", "ecg_count", "ecg_wire_angle"),
    "pleural_effusion": ("effusion_side", "effusion_height"),
    "sex": ("breast_size", "breast_y"),
}


def shows(attrs: PhantomAttributes, attribute: str) -> bool:
    """Whether `attribute`'s hidden draws (HIDDEN_DRAWS) are visible in a phantom with these attributes."""
    if attribute in DEVICE_KINDS:
        return attribute in attrs.devices
    if attribute == "sex":
        return attrs.sex == "female"
    return bool(getattr(attrs, attribute))


def render_phantom(
    attrs: PhantomAttributes, seed: int, resolution: int = 64, *, redraw: dict[str, int] | None = None
) -> np.ndarray:
    """Render one phantom as a (resolution, resolution) uint8 grayscale image.

    `redraw` {attribute: other seed} takes that attribute's HIDDEN_DRAWS from another seed's subject
    and everything else from `seed`: the same subject with its device placed, or its fluid drawn, as
    another subject's would be.
    """
    _check(attrs, seed, resolution)
    a = _draw_anatomy(int(seed))
    for attribute, other in (redraw or {}).items():
        if attribute not in HIDDEN_DRAWS:
            raise ValueError(f"redraw: {attribute!r} has no hidden draws; expected one of {tuple(HIDDEN_DRAWS)}")
        donor = _draw_anatomy(int(other))
        a = replace(a, **{name: getattr(donor, name) for name in HIDDEN_DRAWS[attribute]})
    g = _grid(a, resolution)
    # The pixel noise is drawn after the anatomy from its own stream, so it is identical for
    # every attribute setting (and the anatomy is identical across resolutions).
    noise = np.random.default_rng([int(seed), resolution]).standard_normal((resolution, resolution))
    L = _layers(attrs, g, a)
    # Density adds along the ray; every term is exactly 0 outside its layer's support and the
    # terms are combined pointwise, so a changed layer changes pixels only inside its support.
    # The heart and pleural fluid both displace lung air (max: they do not add up where they overlap).
    displaced = L["lungs"] * np.maximum(L["heart"], L["effusion"])
    mu = L["base"] + L["bone"] + 0.85 * displaced + 0.15 * L["heart"] + L["breast"]
    mu = mu + L["pacemaker"] + L["tube"] + L["ecg"]
    # Radiograph display: bright = attenuating. Pointwise, so edits stay local.
    signal = 1.0 - np.exp(-a.gain * np.maximum(mu, 0.0))
    heel = 1.0 + a.heel * g.y  # anode heel effect: a gentle exposure gradient
    value = np.clip(signal * heel + a.offset, 0.0, 1.0) ** a.gamma + a.noise_sigma * noise
    return np.round(np.clip(value, 0.0, 1.0) * 255.0).astype(np.uint8)


def true_counterfactual(
    attrs: PhantomAttributes, seed: int, intervention: dict[str, Any], resolution: int = 64
) -> np.ndarray:
    """The same subject (seed) rendered with `intervention` applied (see `PhantomAttributes.intervene`)."""
    return render_phantom(attrs.intervene(intervention), seed, resolution)


_ATTRIBUTE_LAYERS = {
    "cardiomegaly": ("heart",),
    "pleural_effusion": ("effusion",),
    "sex": ("breast",),
    "age": ("bone",),
    "pacemaker": ("pacemaker",),
    "tube": ("tube",),
    "ecg": ("ecg",),
    "devices": ("pacemaker", "tube", "ecg"),
}


def attribute_mask(attrs: PhantomAttributes, seed: int, attribute: str, resolution: int = 64) -> np.ndarray:
    """Boolean (H, W) region where changing `attribute` (to any value) can change pixels of this subject."""
    _check(attrs, seed, resolution)
    if attribute not in _ATTRIBUTE_LAYERS:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    a = _draw_anatomy(int(seed))
    g = _grid(a, resolution)
    lungs = _lungs(g, a)
    mask = np.zeros(g.x.shape, dtype=bool)
    for name in _ATTRIBUTE_LAYERS[attribute]:
        if name == "heart":  # both heart sizes
            maps = [_heart(g, a, False), _heart(g, a, True)]
        elif name == "effusion":
            maps = [_effusion(g, a, lungs, True, attrs.effusion_severity)]
        elif name == "breast":
            maps = [_breast(g, a, True)]
        elif name == "bone":  # the age factor is positive, so the support does not depend on age
            maps = [_bone(g, a, attrs.age)]
        else:
            maps = [{"pacemaker": _pacemaker, "tube": _tube, "ecg": _ecg}[name](g, a, True)]
        for m in maps:
            mask |= m != 0
    return mask


def lung_mask(seed: int, resolution: int = 64) -> np.ndarray:
    """Boolean (H, W) lung fields of this subject: the anatomy a lung segmenter would outline on the
    source, and the only place pleural fluid can appear (every side and height)."""
    _check(PhantomAttributes(), seed, resolution)
    a = _draw_anatomy(int(seed))
    return _lungs(_grid(a, resolution), a) > 0
