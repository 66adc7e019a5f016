"""The IEC 61675-1 (NEMA NU 2) body phantom, imaged like a patient: the data a clinic calibrates
resolution and recovery coefficients with.

Shape (LPS mm, phantom axis along z): a D-shaped water body 300 mm wide — an anterior half-disc of
radius 147 mm joined to a 77 mm deep posterior block with rounded corners — 180 mm long; six fillable
spheres of inner diameter 10, 13, 17, 22, 28 and 37 mm with centres on a 57.2 mm circle around the axis,
in one transverse plane 70 mm from the lid; a central lung insert of 51 mm diameter (-800 HU, no
activity) along the whole length. The walls (PMMA) are not modelled: water and activity end at the
inner surface. Activity: ``background_bq_per_ml`` in the body, ``ratio`` times that in every sphere.

Voxel values on a grid are the exact fraction of each voxel inside each object (27 sub-samples per
voxel), so the partial volume of the small spheres is that of the grid, not of a coarse rasterisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry

SPHERE_DIAMETERS_MM = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
RING_RADIUS_MM = 57.2
LENGTH_MM = 180.0
SPHERE_PLANE_FROM_LID_MM = 70.0
LUNG_DIAMETER_MM = 51.0


@dataclass(frozen=True)
class IECPhantom:
    background_bq_per_ml: float = 20e3
    ratio: float = 8.0                     # sphere : background activity concentration
    centre_lps: tuple = (0.0, 0.0, 0.0)   # centre of the sphere plane on the phantom axis

    def sphere_centres(self) -> list:
        cx, cy, cz = self.centre_lps
        angles = np.deg2rad(np.arange(6) * 60.0)
        return [(cx + RING_RADIUS_MM * np.cos(a), cy + RING_RADIUS_MM * np.sin(a), cz) for a in angles]

    def z_range(self) -> tuple:
        """(lowest, highest) z of the water: the lid is at +z, 70 mm above the sphere plane."""
        top = self.centre_lps[2] + SPHERE_PLANE_FROM_LID_MM
        return top - LENGTH_MM, top

    def inside_body(self, p: np.ndarray) -> np.ndarray:
        x, y, z = p[..., 0] - self.centre_lps[0], p[..., 1] - self.centre_lps[1], p[..., 2]
        lo, hi = self.z_range()
        in_z = (z >= lo) & (z <= hi)
        front = (y <= 0) & (x ** 2 + y ** 2 <= 147.0 ** 2)                 # anterior (-y) half-disc
        corner = 77.0
        back = (y > 0) & (y <= 77.0) & (np.abs(x) <= 147.0)
        cx = np.abs(x) - (147.0 - corner)
        rounded = ~((cx > 0) & (y > 77.0 - corner) & (cx ** 2 + (y - (77.0 - corner)) ** 2 > corner ** 2))
        return in_z & (front | (back & rounded))

    def inside_lung(self, p: np.ndarray) -> np.ndarray:
        x, y = p[..., 0] - self.centre_lps[0], p[..., 1] - self.centre_lps[1]
        return self.inside_body(p) & (x ** 2 + y ** 2 <= (LUNG_DIAMETER_MM / 2) ** 2)

    def inside_sphere(self, p: np.ndarray, n: int) -> np.ndarray:
        c = np.asarray(self.sphere_centres()[n])
        return np.sum((p - c) ** 2, axis=-1) <= (SPHERE_DIAMETERS_MM[n] / 2) ** 2


def occupancy(phantom: IECPhantom, grid: Geometry, sub: int = 3) -> dict:
    """Fraction (0..1, float32 on ``grid``) of each voxel in: "body" (water, lung included), "lung",
    "sphere_<d>mm" for every sphere."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    ox, oy, oz = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    sub_ijk = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], axis=1)
    names = ["body", "lung"] + [f"sphere_{d:g}mm" for d in SPHERE_DIAMETERS_MM]
    out = {n: np.zeros(grid.shape, np.float32) for n in names}
    nz, ny, nx = grid.shape
    jj, ii = np.mgrid[:ny, :nx]
    for k in range(nz):
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1).astype(float)
        pts = grid.index_to_lps((ijk[:, None, :] + sub_ijk[None]).reshape(-1, 3)).reshape(ijk.shape[0], -1, 3)
        out["body"][k] = phantom.inside_body(pts).mean(axis=1).reshape(ny, nx)
        out["lung"][k] = phantom.inside_lung(pts).mean(axis=1).reshape(ny, nx)
        for n, d in enumerate(SPHERE_DIAMETERS_MM):
            out[f"sphere_{d:g}mm"][k] = phantom.inside_sphere(pts, n).mean(axis=1).reshape(ny, nx)
    return out


def activity_and_hu(phantom: IECPhantom, grid: Geometry) -> tuple:
    """(activity Bq/mL, HU, occupancy) on ``grid``: background in the water outside the lung insert and the
    spheres, ``ratio`` x background in the spheres; water 0 HU, lung -800 HU, air -1000 HU."""
    occ = occupancy(phantom, grid)
    spheres = sum(occ[f"sphere_{d:g}mm"] for d in SPHERE_DIAMETERS_MM)
    water = np.clip(occ["body"] - occ["lung"] - spheres, 0.0, 1.0)
    activity = phantom.background_bq_per_ml * (water + phantom.ratio * spheres)
    hu = -1000.0 * (1.0 - occ["body"]) - 800.0 * occ["lung"]
    return activity.astype(np.float32), hu.astype(np.float32), occ


def sphere_table(phantom: IECPhantom) -> list:
    """Per sphere: diameter, volume (mL), true concentration (Bq/mL) and centre (LPS mm)."""
    return [{"name": f"sphere_{d:g}mm", "diameter_mm": d, "volume_ml": float(np.pi / 6 * d ** 3 / 1000.0),
             "concentration_bq_per_ml": phantom.background_bq_per_ml * phantom.ratio,
             "centre_lps_mm": [round(float(v), 3) for v in c]}
            for d, c in zip(SPHERE_DIAMETERS_MM, phantom.sphere_centres())]


def phantom_grid(spacing_mm: float = 4.42, shape_xy: int = 128, centre_lps=(0.0, 0.0, 0.0)) -> Geometry:
    """A SPECT grid holding the whole phantom (its 180 mm plus two slices each side)."""
    nz = int(np.ceil((LENGTH_MM + 4 * spacing_mm) / spacing_mm))
    lid = centre_lps[2] + SPHERE_PLANE_FROM_LID_MM
    middle = (centre_lps[0], centre_lps[1], lid - LENGTH_MM / 2)
    return Geometry.centred((nz, shape_xy, shape_xy), (spacing_mm,) * 3, middle)


def image_phantom(phantom: IECPhantom, grid: Geometry, imaging: str = "gaussian", seed: int = 0,
                  fwhm_mm: float = 13.0, counts_per_mbq_s: float = 3.0, acquisition_s: float = 1800.0,
                  scanner: dict | None = None) -> dict:
    """The phantom imaged like a patient: {"spect" (Bq/mL), "activity", "hu", "occupancy", "imaging"}.
    ``imaging`` "gaussian": blur of ``fwhm_mm`` and Poisson noise of ``counts_per_mbq_s`` x ``acquisition_s``
    (as :func:`.imaging.render_spect`); "scanner": projection + OSEM (:mod:`.scanner`, ``scanner`` settings)."""
    activity, hu, occ = activity_and_hu(phantom, grid)
    rng = np.random.default_rng(seed)
    if imaging == "scanner":
        from .scanner import ScannerConfig, hu_to_mu, image_spect
        cfg = ScannerConfig(**(scanner or {}))
        spect, info = image_spect(activity, hu_to_mu(hu, cfg.energy_kev, cfg.ct_kvp), grid, cfg, rng)
        record = {"mode": "scanner", "scanner": cfg.to_dict(), **info}
    elif imaging == "gaussian":
        from .imaging import blur
        expected = np.clip(blur(activity, grid, fwhm_mm), 0.0, None)
        per_bq_ml = grid.voxel_volume_ml * counts_per_mbq_s * 1e-6 * acquisition_s
        spect = (rng.poisson(expected.astype(np.float64) * per_bq_ml) / per_bq_ml).astype(np.float32)
        record = {"mode": "gaussian", "spect_fwhm_mm": fwhm_mm, "counts_per_mbq_s": counts_per_mbq_s,
                  "acquisition_s": acquisition_s}
    else:
        raise ValueError(f"imaging must be 'gaussian' or 'scanner', found {imaging!r}")
    return {"spect": spect, "activity": activity, "hu": hu, "occupancy": occ, "imaging": record}
