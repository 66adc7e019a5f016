"""Image geometry and the one place where coordinate conventions are converted.

Conventions (used everywhere in CoRX):

* Arrays are numpy C-order with shape ``(z, y, x)`` = ``(k, j, i)``.
* Physical space is **LPS** in millimetres (ITK, DICOM, files). Slicer uses **RAS**;
  convert only with :func:`lps_to_ras` / :func:`ras_to_lps` or :meth:`Geometry.ijk_to_ras`.
* ``spacing`` and ``origin`` are in ``(x, y, z)`` order as in ITK/SimpleITK; ``origin`` is
  the LPS position of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction`` is a 3x3 matrix whose *columns* are the LPS unit vectors of the i, j, k
  axes (ITK's direction cosines).

  ``p_lps = origin + direction @ (spacing * [i, j, k])``
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class GeometryError(ValueError):
    """Raised when image grids are inconsistent or invalid."""


@dataclass(frozen=True)
class Geometry:
    """A regular 3D voxel grid in LPS millimetres.

    shape: array shape (z, y, x); spacing: mm (x, y, z); origin: LPS mm (x, y, z);
    direction: 3x3 direction cosines (columns = i, j, k axes in LPS).
    """

    shape: tuple
    spacing: tuple
    origin: tuple
    direction: tuple = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) for o in self.origin)
        direction = tuple(float(d) for d in np.asarray(self.direction, float).ravel())
        if len(shape) != 3 or min(shape) < 1:
            raise GeometryError(f"shape must be 3 positive integers (z, y, x), got {self.shape}")
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise GeometryError(f"spacing must be 3 positive finite mm values, got {self.spacing}")
        if len(origin) != 3 or not all(np.isfinite(origin)):
            raise GeometryError(f"origin must be 3 finite mm values, got {self.origin}")
        d = np.asarray(direction).reshape(3, 3)
        if len(direction) != 9 or not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise GeometryError(f"direction must be an orthonormal 3x3 matrix, got {d.tolist()}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ matrices
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix as Slicer's volume nodes use it."""
        m = self.index_to_lps_matrix
        out = np.eye(4)
        out[:3, :] = LPS_TO_RAS @ m[:3, :]
        return out

    @property
    def voxel_volume_ml(self) -> float:
        """Voxel volume in millilitres (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def size_xyz(self) -> tuple:
        return tuple(reversed(self.shape))

    # ------------------------------------------------------------------ mapping
    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices (..., 3) in (i, j, k) order -> LPS mm (..., 3)."""
        ijk = np.asarray(ijk, float)
        a = self.direction_matrix @ np.diag(self.spacing)
        return ijk @ a.T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS mm (..., 3) -> continuous indices (..., 3) in (i, j, k) order."""
        lps = np.asarray(lps, float)
        a_inv = np.diag(1.0 / np.asarray(self.spacing)) @ self.direction_matrix.T
        return (lps - np.asarray(self.origin)) @ a_inv.T

    def lps_grid(self, dtype=np.float32) -> np.ndarray:
        """LPS coordinates of every voxel centre, shape (z, y, x, 3)."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=dtype) for n in self.shape), indexing="ij")
        ijk = np.stack([i, j, k], axis=-1)
        a = (self.direction_matrix @ np.diag(self.spacing)).astype(dtype)
        return ijk @ a.T + np.asarray(self.origin, dtype)

    def centre_lps(self) -> np.ndarray:
        """LPS position of the grid centre (mm)."""
        return self.index_to_lps((np.asarray(self.size_xyz, float) - 1.0) / 2.0)

    def extent_lps(self) -> tuple:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
        corners *= np.asarray(self.size_xyz, float) - 1.0
        pts = self.index_to_lps(corners)
        return pts.min(axis=0), pts.max(axis=0)

    # ------------------------------------------------------------------ comparisons
    def same_grid(self, other: "Geometry", tol_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def require_same_grid(self, other: "Geometry", what: str = "images") -> None:
        if not self.same_grid(other):
            raise GeometryError(
                f"{what} are on different grids: {self.describe()} vs {other.describe()}; "
                "resample them onto one grid first"
            )

    def describe(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        org = ", ".join(f"{o:.1f}" for o in self.origin)
        return f"{'x'.join(map(str, self.size_xyz))} voxels of {sp} mm at LPS ({org})"

    # ------------------------------------------------------------------ construction
    @staticmethod
    def centred(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], centre_lps=(0.0, 0.0, 0.0),
                direction=None) -> "Geometry":
        """A grid of the given shape and spacing whose centre lies at ``centre_lps``."""
        d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
        half = (np.asarray(list(reversed(shape_zyx)), float) - 1.0) / 2.0 * np.asarray(spacing_xyz, float)
        origin = np.asarray(centre_lps, float) - d @ half
        return Geometry(tuple(shape_zyx), tuple(spacing_xyz), tuple(origin), tuple(d.ravel()))

    def to_dict(self) -> dict:
        return {"shape_zyx": list(self.shape), "spacing_xyz_mm": list(self.spacing),
                "origin_lps_mm": list(self.origin), "direction": list(self.direction)}

    @staticmethod
    def from_dict(d: dict) -> "Geometry":
        return Geometry(d["shape_zyx"], d["spacing_xyz_mm"], d["origin_lps_mm"], d["direction"])

    @staticmethod
    def from_ijk_to_ras(shape_zyx, ijk_to_ras: np.ndarray) -> "Geometry":
        """Inverse of :attr:`ijk_to_ras` (e.g. from a Slicer volume node)."""
        m = np.asarray(ijk_to_ras, float)
        lps = LPS_TO_RAS @ m[:3, :]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return Geometry(tuple(shape_zyx), tuple(spacing), tuple(lps[:3, 3]), tuple(direction.ravel()))


def mask_index_bounds(mask: np.ndarray):
    """(first, last) voxel index (i, j, k) holding any of a (z, y, x) ``mask``, inclusive, as int arrays; None
    for an empty mask. From the mask's projections on each axis: no index list of the whole mask."""
    along = [np.flatnonzero(np.asarray(mask).any(axis=other)) for other in ((0, 1), (0, 2), (1, 2))]   # i, j, k
    if not along[0].size:
        return None
    return np.array([a[0] for a in along]), np.array([a[-1] for a in along])


def displacement_lps_to_voxels(field_lps_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(Z, Y, X, 3) LPS-mm displacement on ``geometry`` -> (3, Z, Y, X) voxel displacement, channels (z, y, x)."""
    a_inv = np.diag(1.0 / np.asarray(geometry.spacing)) @ geometry.direction_matrix.T
    ijk = np.asarray(field_lps_mm, np.float32) @ a_inv.T.astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(ijk[..., ::-1], -1, 0))


def displacement_voxels_to_lps(displacement_voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(3, Z, Y, X) voxel displacement, channels (z, y, x) -> (Z, Y, X, 3) LPS mm on ``geometry``."""
    a = geometry.direction_matrix @ np.diag(geometry.spacing)
    ijk = np.moveaxis(np.asarray(displacement_voxels, np.float32), 0, -1)[..., ::-1]
    return np.ascontiguousarray(ijk @ a.T.astype(np.float32))


def lps_to_ras(points_or_vectors: np.ndarray) -> np.ndarray:
    """Negate x and y: LPS <-> RAS for points and displacement vectors (..., 3)."""
    out = np.array(points_or_vectors, dtype=float, copy=True)
    out[..., 0] *= -1.0
    out[..., 1] *= -1.0
    return out


ras_to_lps = lps_to_ras
