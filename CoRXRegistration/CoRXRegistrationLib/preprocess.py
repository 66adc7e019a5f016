"""Native SPECT/CT volumes <-> the network grid (128^3 at 3.87 mm by default).

The network grid is defined from the *fixed* time point: the fixed SPECT's axis directions,
isotropic ``spacing_mm``, centred on the body (CT above ``body_threshold_hu``). With
``prealign="rigid"`` the moving CT is first fitted rigidly to the fixed CT on that grid
(:mod:`network.rigid`) and the network corrects what is left. Fixed and moving
CT and SPECT are resampled onto it in physical (LPS) space, so each scanner position is the
starting point the network corrects. Intensities: CT windowed to [0, 1]; SPECT clipped at 0 and
min-max ("minmax") or min-max then log ("log", the paper's fix for early high-contrast scans)
normalised. Fields go back to the native grids with :func:`field_on_native_grid`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .geometry import Geometry, GeometryError, mask_index_bounds
from .resample import resample, resample_field, warp_with_field

SPECT_NORMALISATIONS = ("minmax", "log")
PREALIGN_METHODS = ("none", "rigid")


@dataclass(frozen=True)
class PreprocessConfig:
    """How native volumes become network inputs (stored inside every checkpoint)."""
    grid_size: tuple = (128, 128, 128)
    spacing_mm: float = 3.87
    ct_window_hu: tuple = (-1000.0, 1000.0)
    spect_normalisation: str = "log"
    log_dynamic_range: float = 100.0
    body_threshold_hu: float = -500.0
    prealign: str = "rigid"

    def __post_init__(self):
        object.__setattr__(self, "grid_size", tuple(int(v) for v in self.grid_size))
        object.__setattr__(self, "ct_window_hu", tuple(float(v) for v in self.ct_window_hu))
        if self.spect_normalisation not in SPECT_NORMALISATIONS:
            raise ValueError(f"spect_normalisation must be one of {SPECT_NORMALISATIONS}, "
                             f"got {self.spect_normalisation!r}")
        if self.prealign not in PREALIGN_METHODS:
            raise ValueError(f"prealign must be one of {PREALIGN_METHODS}, got {self.prealign!r}")
        if self.ct_window_hu[1] <= self.ct_window_hu[0] or self.spacing_mm <= 0:
            raise ValueError("ct_window_hu must be (low, high) with low < high and spacing_mm > 0")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def body_level(self) -> float:
        """The body threshold on the normalised CT scale."""
        lo, hi = self.ct_window_hu
        return float(np.clip((self.body_threshold_hu - lo) / (hi - lo), 0.0, 1.0))

    @staticmethod
    def from_dict(d: dict) -> "PreprocessConfig":
        """Checkpoints written before pre-alignment existed were trained without it ("none")."""
        known = {f.name for f in fields(PreprocessConfig)}
        return PreprocessConfig(**{"prealign": "none", **{k: v for k, v in d.items() if k in known}})


@dataclass
class SpectCt:
    """One session: CT (HU) and SPECT (Bq/mL), each with its own geometry."""
    ct: np.ndarray
    ct_geometry: Geometry
    spect: np.ndarray
    spect_geometry: Geometry
    label: str = "time point"

    def validate(self) -> None:
        for name, arr, geom in (("CT", self.ct, self.ct_geometry), ("SPECT", self.spect, self.spect_geometry)):
            arr = np.asarray(arr)
            if arr.ndim != 3:
                raise GeometryError(f"{self.label} {name} must be a 3D volume, got shape {arr.shape}")
            if tuple(arr.shape) != geom.shape:
                raise GeometryError(f"{self.label} {name} array shape {arr.shape} does not match its geometry "
                                    f"{geom.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{self.label} {name} contains NaN or infinite voxels")
        if float(np.max(self.spect)) <= 0:
            raise ValueError(f"{self.label} SPECT has no positive counts (empty image)")

    def same_scans(self, other: "SpectCt") -> bool:
        """Whether both sessions hold the very same CT and SPECT (values and grids)."""
        return (self.ct_geometry.same_grid(other.ct_geometry) and self.spect_geometry.same_grid(other.spect_geometry)
                and np.array_equal(self.ct, other.ct) and np.array_equal(self.spect, other.spect))


def network_grid(fixed: SpectCt, cfg: PreprocessConfig) -> Geometry:
    """The network grid for a fixed session: fixed-SPECT directions, centred on the body."""
    body = np.asarray(fixed.ct) > cfg.body_threshold_hu
    bounds = mask_index_bounds(body)
    centre = fixed.ct_geometry.centre_lps() if bounds is None else \
        fixed.ct_geometry.index_to_lps((bounds[0] + bounds[1]) / 2.0)
    return Geometry.centred(cfg.grid_size, (cfg.spacing_mm,) * 3, centre, fixed.spect_geometry.direction_matrix)


def normalise_ct(ct_hu: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    lo, hi = cfg.ct_window_hu
    return np.clip((np.asarray(ct_hu, np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalise_spect(spect: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Clip at 0, min-max to [0, 1]; "log" then maps a -> log(1 + R a) / log(1 + R)."""
    a = np.clip(np.asarray(spect, np.float32), 0.0, None)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if cfg.spect_normalisation == "log":
        r = cfg.log_dynamic_range
        a = np.log1p(r * a) / np.log1p(r)
    return a.astype(np.float32)


METRIC_NORMALISATION = PreprocessConfig(spect_normalisation="minmax")   # the paper's metrics use min-max SPECT


def metric_images(ct_hu: np.ndarray, spect: np.ndarray) -> tuple:
    """(CT, SPECT) normalised as the paper's metrics expect, whatever a model was trained with."""
    return normalise_ct(ct_hu, METRIC_NORMALISATION), normalise_spect(spect, METRIC_NORMALISATION)


def onto_grid(session: SpectCt, grid: Geometry, cfg: PreprocessConfig) -> tuple:
    """(CT in HU, SPECT in Bq/mL) of one session resampled onto ``grid`` (float32, (Z, Y, X) each).
    CT outside its field of view is air; SPECT as :func:`spect_onto_grid`."""
    spect = spect_onto_grid(session, grid)
    # interpolated, not rounded, when the CT is stored as integers (a 16-bit CT file, a Slicer CT node)
    ct = warp_with_field(session.ct, session.ct_geometry, grid, fill=min(cfg.ct_window_hu[0], -1000.0),
                         round_integers=False)
    return ct, spect


def spect_onto_grid(session: SpectCt, grid: Geometry) -> np.ndarray:
    """The session's SPECT (Bq/mL) resampled onto ``grid``: 0 outside its field of view, negative
    values clipped to 0; refused where it does not overlap the grid."""
    session.validate()
    spect = resample(np.clip(np.asarray(session.spect, np.float32), 0, None), session.spect_geometry, grid)
    if float(spect.max()) <= 0:
        raise GeometryError(f"{session.label} SPECT does not overlap the network grid "
                            f"({grid.describe()}); check the volumes' origins")
    return spect


def field_of_view(session: SpectCt, grid: Geometry) -> np.ndarray:
    """Bool (Z, Y, X): voxel centres of ``grid`` inside both the CT and the SPECT volume of ``session``
    (within their first and last voxel centres). Outside, :func:`onto_grid` fills air and zero activity:
    a cut face of the scan, not a body edge."""
    points = grid.lps_grid()
    inside = np.ones(grid.shape, bool)
    for geometry in (session.ct_geometry, session.spect_geometry):
        ijk = geometry.lps_to_index(points)
        last = np.asarray(geometry.size_xyz, float) - 1.0
        inside &= np.all((ijk >= -1e-3) & (ijk <= last + 1e-3), axis=-1)
    return inside


def to_network(session: SpectCt, grid: Geometry, cfg: PreprocessConfig) -> tuple:
    """(CT, SPECT) of one session on the network grid, normalised as the network expects."""
    ct, spect = onto_grid(session, grid, cfg)
    return normalise_ct(ct, cfg), normalise_spect(spect, cfg)


def field_on_native_grid(field_lps_mm: np.ndarray, grid: Geometry, target: Geometry, cancel=None) -> np.ndarray:
    """The network-grid field (LPS mm) evaluated on a native fixed grid (trilinear upsampling)."""
    return resample_field(field_lps_mm, grid, target, cancel=cancel)
