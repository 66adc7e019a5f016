"""Voxel time-integrated activity (TIA) maps with the paper's Equation 6.

Input: registered SPECT volumes A_i (Bq/mL) on one grid at times t_i (h after injection).
Per voxel a mono-exponential A0 exp(-l_eff t) is fitted (least squares, Bq/mL). Then

* l_eff > l_phys and the fit is sound:  TIA = A0 / l_eff                      (model 1)
* l_eff <= l_phys (slower than decay, or rising): trapezoids from (0, 0) over the
  measured points + A_n / l_phys (physical-decay tail)                          (model 2)
* the fit failed or exploded (non-finite, or A0 > ``explode_factor`` x max A_i):
  the same trapezoid + tail                                                      (model 3)
* one time point only: single-time-point estimate with a population T_eff     (model 4)
* no activity in any time point: TIA = 0                                        (model 0)

Output units: TIA Bq h/mL; fit RMSE Bq/mL (mono-exponential fit, every fitted voxel); R^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .nuclides import LU177, Nuclide
from .timecurves import fit_mono_fast, single_time_point_tia, trapezoid_with_physical_tail

MODEL_CODES = {0: "no activity", 1: "mono-exponential (Eq. 6)", 2: "trapezoid + physical tail (slow or rising)",
               3: "trapezoid + physical tail (fit failed)", 4: "single time point (population T_eff)"}


class TIAInputError(ValueError):
    """The SPECT series or its times cannot give a valid TIA map."""


@dataclass
class VoxelTIAResult:
    tia: np.ndarray              # Bq h/mL
    fit_rmse: np.ndarray         # Bq/mL
    fit_r2: np.ndarray           # dimensionless
    model: np.ndarray            # uint8 codes, see MODEL_CODES
    a0: np.ndarray               # Bq/mL (mono fit)
    lambda_eff: np.ndarray       # 1/h (mono fit)
    negative_voxels_clipped: int
    times_h: tuple

    def model_counts(self) -> dict:
        counts = np.bincount(self.model.ravel(), minlength=len(MODEL_CODES))
        return {MODEL_CODES[i]: int(c) for i, c in enumerate(counts) if c}


def check_times(times_h) -> np.ndarray:
    t = np.asarray(times_h, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise TIAInputError("give at least one time point (hours after injection)")
    if not np.all(np.isfinite(t)):
        raise TIAInputError(f"times must be finite numbers of hours, got {list(times_h)}")
    if np.any(t < 0):
        raise TIAInputError(f"times must be >= 0 h after injection, got {list(times_h)}")
    if np.any(np.diff(t) <= 0):
        raise TIAInputError(f"times must be strictly increasing, got {list(times_h)}")
    return t


def check_activity_series(activities, times_h):
    """Validate a (T, z, y, x) series; returns (float32 copy with negatives clipped, n clipped)."""
    t = check_times(times_h)
    if len(activities) != len(t):
        raise TIAInputError(f"{len(activities)} SPECT volumes but {len(t)} time points")
    shapes = {np.shape(a) for a in activities}
    if len(shapes) != 1:
        raise TIAInputError(f"SPECT volumes have different shapes {sorted(shapes)}; register/resample them onto one grid")
    stack = np.stack([np.asarray(a, np.float32) for a in activities])
    if stack.ndim != 4:
        raise TIAInputError(f"expected 3D SPECT volumes, got shape {stack.shape[1:]}")
    bad = ~np.isfinite(stack)
    if bad.any():
        idx = int(np.argmax(bad.reshape(len(t), -1).any(axis=1)))
        raise TIAInputError(f"SPECT at {t[idx]:g} h has {int(bad[idx].sum())} NaN/infinite voxels")
    negative = stack < 0
    n_neg = int(negative.sum())
    if n_neg:
        stack[negative] = 0.0  # interpolation undershoot: clipped, counted and reported
    return stack, n_neg


def compute_voxel_tia(activities, times_h, nuclide: Nuclide = LU177, explode_factor: float = 10.0,
                      population_half_life_h: float | None = None, mask=None) -> VoxelTIAResult:
    """TIA map from registered SPECT volumes (list/array of (z, y, x) in Bq/mL)."""
    stack, n_neg = check_activity_series(activities, times_h)
    t = check_times(times_h)
    shape = stack.shape[1:]
    lam_phys = nuclide.decay_constant_per_h
    y = stack.reshape(len(t), -1)                           # time-major (n, N)
    n_vox = y.shape[1]
    tia = np.zeros(n_vox, np.float32)
    rmse = np.zeros(n_vox, np.float32)
    r2 = np.zeros(n_vox, np.float32)
    a0 = np.zeros(n_vox, np.float32)
    lam = np.zeros(n_vox, np.float32)
    model = np.zeros(n_vox, np.uint8)
    active = y.max(axis=0) > 0
    if mask is not None:
        active &= np.asarray(mask, bool).ravel()
    ya = y if active.all() else y[:, active]                # (n, N_active) float32
    if len(t) == 1:
        if population_half_life_h is None:
            raise TIAInputError("one time point: give a population effective half-life for the single-time-point method")
        tia[active] = single_time_point_tia(ya[0], t[0], population_half_life_h)
        model[active] = 4
    elif ya.size:
        # 4 iterations: converged (RSS within 1e-6 of 20 iterations); float32: see fit_mono_fast
        p, rss = fit_mono_fast(t, ya, iterations=4, time_major=True, dtype=np.float32)
        fitted = np.all(np.isfinite(p), axis=1)
        with np.errstate(all="ignore"):
            mono_tia = p[:, 0] / p[:, 1]
        sound = fitted & np.isfinite(mono_tia) & (p[:, 0] > 0) & (p[:, 0] <= explode_factor * ya.max(axis=0))
        fast = sound & (p[:, 1] > lam_phys)
        trap = trapezoid_with_physical_tail(t, ya, lam_phys, time_major=True)
        tia[active] = np.where(fast, mono_tia, trap)
        model[active] = np.where(fast, 1, np.where(sound, 2, 3))
        rss = np.where(fitted, rss, np.nan)
        mean = ya.mean(axis=0)
        ss_tot = sum((row - mean) ** 2 for row in ya)
        with np.errstate(all="ignore"):
            rmse[active] = np.sqrt(rss / len(t))
            r2[active] = np.where(ss_tot > 0, 1.0 - rss / ss_tot, 1.0)
        a0[active] = np.where(fitted, p[:, 0], 0.0)
        lam[active] = np.where(fitted, p[:, 1], 0.0)
        rmse[~np.isfinite(rmse)] = 0.0
        r2[~np.isfinite(r2)] = 0.0
    return VoxelTIAResult(tia.reshape(shape), rmse.reshape(shape), r2.reshape(shape), model.reshape(shape),
                          a0.reshape(shape), lam.reshape(shape), n_neg, tuple(float(v) for v in t))
