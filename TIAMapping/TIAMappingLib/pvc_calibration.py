"""Calibrate the partial-volume correction from a phantom scan: the SPECT resolution (FWHM) and the
recovery-coefficient curve, as a clinic does with the IEC (NEMA) body phantom.

Input: the reconstructed phantom SPECT (Bq/mL), its CT (HU, for the body outline), a segmentation of the
spheres (one segment per sphere; its centre is the segment's centroid, its diameter the nominal inner
diameter given or read from the segment name, e.g. ``sphere_37mm``), the true sphere and background
concentrations (Bq/mL, at scan time). Every sphere is the exact ball of its nominal diameter (voxel
fractions from 5 x 5 x 5 sub-samples), so the recovery is the clinic's (mean in the physical sphere /
true concentration) and does not depend on how coarsely the spheres were segmented.

FWHM: the Gaussian whose blur of the piecewise-constant phantom (spheres, background in the body,
nothing in air and lung) reproduces the measured sphere means best (least squares over the spheres of
the relative differences; one isotropic FWHM). Needs no torch.
"""
from __future__ import annotations

import re

import numpy as np

from CoRXRegistrationLib.geometry import Geometry

from .pvc import (BODY_HU, Calibration, PVCError, RecoveryCurve, Regions, Resolution, regional_means,
                  transfer_matrix)

_DIAMETER = re.compile(r"(\d+(?:\.\d+)?)\s*mm", re.IGNORECASE)


def sphere_diameter_mm(name: str) -> float:
    """The diameter a segment name states (``sphere_37mm`` -> 37.0)."""
    m = _DIAMETER.search(name)
    if not m:
        raise PVCError(f"segment '{name}': its name states no diameter (e.g. sphere_37mm); give the diameters")
    return float(m.group(1))


def ball_fraction(centre_lps, diameter_mm: float, geometry: Geometry, sub: int = 5) -> np.ndarray:
    """Fraction of each voxel of ``geometry`` inside the ball (float32)."""
    r = diameter_mm / 2.0
    out = np.zeros(geometry.shape, np.float32)
    ijk_c = geometry.lps_to_index(np.asarray(centre_lps, float))
    reach = r / np.asarray(geometry.spacing) + 1.5
    lo = np.maximum(np.floor(ijk_c - reach).astype(int), 0)
    hi = np.minimum(np.ceil(ijk_c + reach).astype(int) + 1, np.asarray(geometry.size_xyz))
    if np.any(hi <= lo):
        raise PVCError(f"a sphere at LPS {np.round(centre_lps, 1).tolist()} mm lies outside the SPECT grid")
    off = (np.arange(sub) + 0.5) / sub - 0.5
    o = np.stack(np.meshgrid(off, off, off, indexing="ij"), -1).reshape(-1, 3)
    ii, jj, kk = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float)
    pts = geometry.index_to_lps((ijk[:, None, :] + o[None]).reshape(-1, 3)).reshape(len(ijk), -1, 3)
    inside = (np.sum((pts - np.asarray(centre_lps)) ** 2, axis=-1) <= r * r).mean(axis=1)
    out[kk.ravel(), jj.ravel(), ii.ravel()] = inside
    return out


def calibrate_phantom(spect: np.ndarray, geometry: Geometry, spheres: dict, ct_hu: np.ndarray,
                      sphere_bq_per_ml: float, background_bq_per_ml: float, diameters_mm=None,
                      fwhm_range_mm=(3.0, 40.0), source: str = "") -> Calibration:
    """FWHM and recovery curve from a phantom (arrays on ``geometry``; ``spheres``: name -> bool mask on
    ``geometry``; ``ct_hu`` on ``geometry``). Returns a :class:`Calibration` whose ``record`` holds the
    per-sphere table and the fit quality."""
    from scipy.optimize import minimize_scalar

    names = [n for n, m in spheres.items() if m.any()]
    if len(names) < 3:
        raise PVCError(f"a phantom calibration needs at least 3 non-empty sphere segments, found {len(names)}")
    if not (sphere_bq_per_ml > 0 and background_bq_per_ml >= 0 and sphere_bq_per_ml > background_bq_per_ml):
        raise PVCError(f"sphere concentration {sphere_bq_per_ml} and background {background_bq_per_ml} Bq/mL: "
                       "the spheres must be hotter than a non-negative background")
    if ct_hu.shape != spect.shape:
        raise PVCError(f"phantom CT {ct_hu.shape} is not on the SPECT grid {spect.shape}; resample it first")
    diam = dict(zip(names, diameters_mm)) if diameters_mm is not None else {n: sphere_diameter_mm(n) for n in names}
    balls = []
    for n in names:
        centre = geometry.index_to_lps(np.argwhere(spheres[n]).mean(axis=0)[::-1])
        balls.append(ball_fraction(centre, diam[n], geometry))
    hot = np.clip(np.sum(balls, axis=0), 0.0, 1.0)
    body = (ct_hu > BODY_HU).astype(np.float32)
    fractions = np.stack(balls + [(1.0 - hot) * body, (1.0 - hot) * (1.0 - body)])
    regions = Regions(names + ["background (body)", "background (air, lung)"], fractions, names,
                      np.eye(len(names), len(names) + 2), geometry.voxel_volume_ml)
    volumes = regions.volume_ml[:len(names)]
    observed = regional_means(spect, regions)
    truth = np.array([sphere_bq_per_ml] * len(names) + [background_bq_per_ml, 0.0])
    rc = observed[:len(names)] / sphere_bq_per_ml

    def misfit(fwhm):
        predicted = transfer_matrix(regions, geometry, Resolution.of(fwhm)).matrix @ truth
        return float(np.sum(((predicted[:len(names)] - observed[:len(names)]) / sphere_bq_per_ml) ** 2))

    best = minimize_scalar(misfit, bounds=fwhm_range_mm, method="bounded", options={"xatol": 0.02})
    fwhm = float(best.x)
    if min(abs(fwhm - fwhm_range_mm[0]), abs(fwhm - fwhm_range_mm[1])) < 0.1:
        raise PVCError(f"phantom calibration: the best FWHM {fwhm:.1f} mm is at the edge of {fwhm_range_mm} mm; "
                       "check the concentrations and the sphere segmentation")
    predicted = transfer_matrix(regions, geometry, Resolution.of(fwhm)).matrix @ truth
    curve = RecoveryCurve.fit(volumes, rc)
    table = [{"segment": n, "diameter_mm": diam[n], "volume_ml": round(float(v), 4), "recovery": round(float(r), 4),
              "recovery_gaussian_model": round(float(p / sphere_bq_per_ml), 4),
              "recovery_curve": round(float(curve(v)), 4)}
             for n, v, r, p in zip(names, volumes, rc, predicted)]
    record = {"fwhm_fit_rms_recovery": round(float(np.sqrt(best.fun / len(names))), 4),
              "background_measured_bq_per_ml": round(float(observed[len(names)]), 1),
              "background_true_bq_per_ml": background_bq_per_ml, "sphere_true_bq_per_ml": sphere_bq_per_ml,
              "spheres": table, "source": source,
              "method": "isotropic Gaussian FWHM fitted to the sphere means (GTM forward model); recovery = mean in "
                        "the nominal sphere / true concentration"}
    return Calibration(Resolution.of(fwhm, f"phantom calibration{' ' + source if source else ''}"), curve, record)
