"""Inter-session motion and intra-session SPECT/CT mismatch with exact ground truth.

A session's anatomy is the reference anatomy moved by a smooth invertible map
``T(a) = a + v(a)`` (LPS mm), composed of, in order:

1. local deformation: bladder filling (radial, smooth) and bowel displacement (Gaussian bumps);
2. respiration: cranio-caudal (and some anterior) shift of everything inside the rib cage and
   abdominal wall, largest at the diaphragm and fading towards the lung apex and the pelvis; the
   chest wall, spine and pelvis do not move, so organs *slide* along them (the transition is a
   few mm wide: only a shear, which cannot fold);
3. rigid repositioning on the couch (rotation about the body centre, translation).

``v`` is evaluated analytically on a motion grid (5 mm) and interpolated trilinearly
elsewhere; its inverse ``W`` (``T^-1(y) = y + W(y)``) is computed on the same grid by
fixed-point iteration. In a session the SPECT is displaced from the CT by a small shift and
blurred cranio-caudally by breathing during the long acquisition.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from ..geometry import Geometry, displacement_lps_to_voxels
from ..network.metrics import jacobian_determinant as network_jacobian
from ..resample import resample, sample_at, sample_vectors
from . import anatomy as A


@dataclass
class SessionMotion:
    rotation_deg: tuple = (0.0, 0.0, 0.0)       # about LPS x, y, z through the body centre
    translation_mm: tuple = (0.0, 0.0, 0.0)
    breathing_mm: float = 0.0                    # + = deeper inspiration than the reference (diaphragm down)
    bladder_volume_ratio: float = 1.0
    bowel_bumps: list = field(default_factory=list)   # [(centre(3), displacement(3), sigma_mm)]
    spect_shift_mm: tuple = (0.0, 0.0, 0.0)      # SPECT relative to CT within this session
    spect_breathing_blur_mm: float = 0.0         # Gaussian SD along z

    @property
    def is_identity(self) -> bool:
        return (not any(self.rotation_deg) and not any(self.translation_mm) and self.breathing_mm == 0.0
                and self.bladder_volume_ratio == 1.0 and not self.bowel_bumps)

    def to_dict(self) -> dict:
        return {"rotation_deg": [round(float(v), 3) for v in self.rotation_deg],
                "translation_mm": [round(float(v), 3) for v in self.translation_mm],
                "breathing_mm": round(float(self.breathing_mm), 3),
                "bladder_volume_ratio": round(float(self.bladder_volume_ratio), 3),
                "bowel_bumps": [{"centre_lps_mm": [round(float(c), 1) for c in b[0]],
                                 "displacement_mm": [round(float(d), 2) for d in b[1]],
                                 "sigma_mm": round(float(b[2]), 1)} for b in self.bowel_bumps],
                "spect_shift_mm": [round(float(v), 3) for v in self.spect_shift_mm],
                "spect_breathing_blur_mm": round(float(self.spect_breathing_blur_mm), 3)}


def sample_spect_mismatch(rng, scale: float = 1.0) -> dict:
    """A session's SPECT/CT mismatch: a shift (LPS mm, SD 1, 1, 2 mm times ``scale``, at most 4 mm times
    ``scale`` per axis) and the breathing blur of the SPECT (mm)."""
    shift = np.clip(rng.normal(0.0, [scale, scale, 2.0 * scale]), -4.0 * scale, 4.0 * scale)
    return {"spect_shift_mm": tuple(float(s) for s in shift),
            "spect_breathing_blur_mm": float(rng.uniform(2.0, 4.0))}


def sample_session_motion(rng, landmarks: "Landmarks", max_shift_mm=15.0, max_rotation_deg=5.0,
                          max_breathing_mm=15.0, spect_mismatch_scale=1.0) -> SessionMotion:
    t = rng.uniform(-10.0, 10.0, 3)
    t *= min(1.0, max_shift_mm / max(np.linalg.norm(t), 1e-6))
    rot = (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(-max_rotation_deg, max_rotation_deg))
    bumps = []
    if landmarks.bowel_box is not None:
        lo, hi = landmarks.bowel_box
        for _ in range(int(rng.integers(3, 7))):
            sigma = rng.uniform(20.0, 35.0)
            d = rng.normal(0.0, 1.0, 3)
            d *= rng.uniform(0.1, 0.3) * sigma / max(np.linalg.norm(d), 1e-6)
            bumps.append((rng.uniform(lo, hi), d, sigma))
    return SessionMotion(rotation_deg=tuple(float(r) for r in rot), translation_mm=tuple(float(v) for v in t),
                         breathing_mm=float(rng.uniform(-max_breathing_mm, max_breathing_mm)),
                         bladder_volume_ratio=float(rng.uniform(0.6, 1.5)) if landmarks.bladder else 1.0,
                         bowel_bumps=bumps, **sample_spect_mismatch(rng, spect_mismatch_scale))


@dataclass
class Landmarks:
    """What the motion model needs to know of an anatomy, measured from its label map."""

    body_centre: np.ndarray
    diaphragm_z: float
    bladder: tuple | None            # (centre, radius mm)
    bowel_box: tuple | None          # (lo, hi) LPS mm
    grid: Geometry                   # motion grid
    sliding: np.ndarray              # (z, y, x) in [0, 1]: 1 = moves cranio-caudally with breathing
    sliding_ap: np.ndarray           # smoother version driving the anterior-posterior component

    @staticmethod
    def from_phantom(phantom: A.Phantom, spacing_mm: float = 5.0, margin_mm: float = 40.0) -> "Landmarks":
        g = phantom.geometry
        lo, hi = g.extent_lps()
        lo, hi = lo - margin_mm, hi + margin_mm
        shape = tuple(int(np.ceil((h - l) / spacing_mm)) + 1 for l, h in zip(lo[::-1], hi[::-1]))
        grid = Geometry(shape, (spacing_mm,) * 3, tuple(lo))
        labels = resample(phantom.labels, g, grid, mode="nearest")
        pts = grid.lps_grid()
        body = labels != A.AIR
        centre = pts[body].mean(axis=0) if body.any() else grid.centre_lps()
        organ = np.isin(labels, (A.LIVER, A.SPLEEN))
        z_d = float(pts[..., 2][organ].max()) if organ.any() else float(centre[2] + 60.0)
        bladder = None
        if (labels == A.BLADDER).any():
            bp = pts[labels == A.BLADDER]
            bladder = (bp.mean(axis=0), float((len(bp) * spacing_mm ** 3 * 3 / (4 * np.pi)) ** (1 / 3)))
        bowel_box = None
        if (labels == A.BOWEL).any():
            bp = pts[labels == A.BOWEL]
            bowel_box = (bp.min(axis=0), bp.max(axis=0))
        depth = ndimage.distance_transform_edt(body, sampling=spacing_mm)
        bone = ndimage.binary_dilation(np.isin(labels, (A.BONE, A.MARROW)), iterations=2)
        inner = (depth > 22.0) & ~bone
        # Sharp across the sliding interface (x, y: a shear cannot fold) but smooth along z, where
        # a steep change of the cranio-caudal shift would compress tissue to folding.
        inner = inner.astype(np.float32)
        sliding = ndimage.gaussian_filter(inner, (15.0 / spacing_mm, 4.0 / spacing_mm, 4.0 / spacing_mm))
        sliding_ap = ndimage.gaussian_filter(inner, 15.0 / spacing_mm)
        return Landmarks(np.asarray(centre, float), z_d, bladder, bowel_box, grid, sliding, sliding_ap)


def _rotation_matrix(deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _breathing_profile(z, z_d):
    """1 just below the diaphragm, fading to 0 at 220 mm below and 160 mm above it."""
    below = np.clip(1.0 - (z_d - 60.0 - z) / 160.0, 0.0, 1.0)
    above = np.clip(1.0 - (z - z_d) / 160.0, 0.0, 1.0)
    return np.where(z > z_d, above, np.where(z > z_d - 60.0, 1.0, below))


def forward_displacement(points: np.ndarray, motion: SessionMotion, lm: Landmarks) -> np.ndarray:
    """v(a) = T(a) - a at reference-anatomy points (N, 3), LPS mm."""
    a = np.asarray(points, np.float64)
    p = a.copy()
    if lm.bladder is not None and motion.bladder_volume_ratio != 1.0:
        c, radius = lm.bladder
        d = a - c
        e = motion.bladder_volume_ratio ** (1.0 / 3.0) - 1.0
        w = np.exp(-np.sum(d * d, axis=-1) / (2.0 * (1.5 * radius) ** 2))
        p += e * d * w[:, None]
    for centre, disp, sigma in motion.bowel_bumps:
        w = np.exp(-np.sum((a - centre) ** 2, axis=-1) / (2.0 * sigma ** 2))
        p += w[:, None] * np.asarray(disp)[None]
    if motion.breathing_mm != 0.0:
        both = torch.from_numpy(np.stack([lm.sliding, lm.sliding_ap]))
        g, g_ap = sample_at(both, lm.grid, torch.from_numpy(p.astype(np.float32)), padding="border").numpy()
        s = motion.breathing_mm * _breathing_profile(p[:, 2], lm.diaphragm_z)
        p[:, 1] -= 0.25 * s * g_ap
        p[:, 2] -= s * g
    r = _rotation_matrix(motion.rotation_deg)
    y = lm.body_centre + (p - lm.body_centre) @ r.T + np.asarray(motion.translation_mm)
    return (y - a).astype(np.float32)


@dataclass
class SessionField:
    """Forward field v and inverse field W of one session on the motion grid."""

    grid: Geometry
    forward: np.ndarray   # (z, y, x, 3): T(a) = a + v(a)
    inverse: np.ndarray   # (z, y, x, 3): T^-1(y) = y + W(y)
    inverse_residual_mm: float

    def forward_at(self, points_lps) -> np.ndarray:
        return sample_vectors(self.forward, self.grid, points_lps)

    def inverse_at(self, points_lps) -> np.ndarray:
        return sample_vectors(self.inverse, self.grid, points_lps)

    def jacobian_determinant(self) -> np.ndarray:
        return jacobian_determinant(self.forward, self.grid.spacing)


def jacobian_determinant(field_zyx3: np.ndarray, spacing_xyz) -> np.ndarray:
    """det(I + grad u) of a displacement field (z, y, x, 3), identity direction, spacing in mm."""
    grid = Geometry(field_zyx3.shape[:3], spacing_xyz, (0.0, 0.0, 0.0))
    voxels = torch.from_numpy(displacement_lps_to_voxels(field_zyx3, grid))
    return network_jacobian(voxels)[0].numpy().astype(np.float32)


class FoldingError(RuntimeError):
    """A sampled motion field is not invertible (Jacobian determinant too small)."""


MIN_JACOBIAN = 0.2


def sample_invertible_session(rng, lm: Landmarks, tries: int = 8, **limits):
    """Sample a session motion whose field is invertible (det J >= 0.2 everywhere); returns (motion, field)."""
    for _ in range(tries):
        motion = sample_session_motion(rng, lm, **limits)
        try:
            return motion, session_field(motion, lm)
        except FoldingError:
            continue
    raise FoldingError(f"no invertible motion found in {tries} tries; reduce the motion limits")


def session_field(motion: SessionMotion, lm: Landmarks, iterations: int = 50, tol_mm: float = 0.01) -> SessionField:
    """Forward field on the motion grid and its inverse by fixed-point iteration W = -v(y + W)."""
    grid = lm.grid
    if motion.is_identity:
        zero = np.zeros(grid.shape + (3,), np.float32)
        return SessionField(grid, zero, zero.copy(), 0.0)
    pts = torch.from_numpy(grid.lps_grid().reshape(-1, 3))
    v = forward_displacement(pts.numpy(), motion, lm).reshape(grid.shape + (3,))
    jmin = float(jacobian_determinant(v, grid.spacing).min())
    if jmin < MIN_JACOBIAN:
        raise FoldingError(f"motion field folds or nearly folds (min det J = {jmin:.3f})")
    v_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 0)))
    sample = lambda p: sample_at(v_t, grid, p, padding="border").T  # noqa: E731  (N, 3)
    w = -torch.from_numpy(v.reshape(-1, 3)).clone()
    for _ in range(iterations):
        w_new = -sample(pts + w)
        change = float((w_new - w).abs().max())
        w = w_new
        if change < tol_mm:
            break
    residual = float((w + sample(pts + w)).abs().max())
    return SessionField(grid, v, w.numpy().reshape(grid.shape + (3,)).astype(np.float32), residual)
