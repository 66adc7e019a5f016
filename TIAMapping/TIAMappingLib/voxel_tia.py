"""Voxel time-integrated activity (TIA) maps: the paper's Equation 6, over every time point or over
the washout phase.

Input: registered SPECT volumes A_i (Bq/mL) on one grid at times t_i (h after injection).

``integration="eq6"`` (the paper): per voxel a mono-exponential A0 exp(-l_eff t) is fitted to every
point (least squares, Bq/mL), then

* l_eff > l_phys and the fit is sound:  TIA = A0 / l_eff                      (model 1)
* l_eff <= l_phys (slower than decay, or rising): trapezoids from (0, 0) over the
  measured points + A_n / l_phys (physical-decay tail)                          (model 2)
* the fit failed or exploded (non-finite, or A0 > ``explode_factor`` x max A_i):
  the same trapezoid + tail                                                      (model 3)

``integration="washout"`` (the default): Eq. 6 over the points from the curve's peak on. A curve that
falls from its first point is integrated exactly as above. One that peaks at t_k > t_1 (uptake still
rising at the first scans) gets the trapezoids from (0, 0) to (t_k, A_k) for its uptake phase plus
Eq. 6 from t_k on: A_k' / l_eff with A_k' and l_eff fitted to the points t_k ... t_n (model 5), or, if
that fit is slower than decay or fails, the trapezoids to t_n + A_n / l_phys (models 2, 3; a curve
peaking at its last point is model 2). Fitting a mono-exponential through a rising uptake phase bends
the fitted rate below the true washout (a curve that rises from 0.5 to 4 h and washes out with an
80 h half-life is fitted slower than decay, and its physical-decay tail after 48 h overestimates the
TIA by about half); the washout phase alone does not.

* one time point only: single-time-point estimate with a population T_eff     (model 4)
* no activity in any time point: TIA = 0                                        (model 0)

Output units: TIA Bq h/mL; fit RMSE Bq/mL (of the mono-exponential fit over the points it used); R^2
over those points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .nuclides import LU177, Nuclide
from .timecurves import fit_mono_fast, single_time_point_tia, trapezoid_from_zero, trapezoid_with_physical_tail

MODEL_CODES = {0: "no activity", 1: "mono-exponential (Eq. 6)", 2: "trapezoid + physical tail (slow or rising)",
               3: "trapezoid + physical tail (fit failed)", 4: "single time point (population T_eff)",
               5: "trapezoid to the peak + mono-exponential washout"}
#: integration -> what it does (``compute_voxel_tia``'s and the VOI table's ``integration``)
INTEGRATIONS = {"washout": "Eq. 6 over the washout phase: trapezoids from injection to the peak, the mono-exponential "
                           "fitted from the peak on",
                "eq6": "the paper's Eq. 6: one mono-exponential fitted to every time point"}
DEFAULT_INTEGRATION = "washout"


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


def check_integration(integration: str) -> str:
    if integration not in INTEGRATIONS:
        raise TIAInputError(f"time integration must be one of {sorted(INTEGRATIONS)}, got {integration!r}")
    return integration


def _eq6(t, y, lam_phys: float, explode_factor: float, iterations: int, dtype) -> tuple:
    """Eq. 6 of time-major curves ``y`` (n, N) at times ``t`` (h, t[0] may be > 0): (TIA from t = 0,
    model code 1/2/3, A0 at t = 0, l_eff, residual sum of squares (NaN where not fitted))."""
    p, rss = fit_mono_fast(t, y, iterations=iterations, time_major=True, dtype=dtype)
    fitted = np.all(np.isfinite(p), axis=1)
    with np.errstate(all="ignore"):
        mono_tia = p[:, 0] / p[:, 1]
    sound = fitted & np.isfinite(mono_tia) & (p[:, 0] > 0) & (p[:, 0] <= explode_factor * y.max(axis=0))
    fast = sound & (p[:, 1] > lam_phys)
    tia = np.where(fast, mono_tia, trapezoid_with_physical_tail(t, y, lam_phys, time_major=True))
    code = np.where(fast, 1, np.where(sound, 2, 3)).astype(np.uint8)
    return tia, code, np.where(fitted, p[:, 0], 0.0), np.where(fitted, p[:, 1], 0.0), np.where(fitted, rss, np.nan)


def integrate_curves(t, y, lam_phys: float, integration: str = DEFAULT_INTEGRATION, explode_factor: float = 10.0,
                     iterations: int = 4, dtype=np.float32) -> dict:
    """TIA of time-major curves ``y`` (n >= 2 times, N curves; unit U) at times ``t`` (h after injection) by
    ``integration`` (module docstring). Returns arrays of N: "tia" (U h), "model" (MODEL_CODES), "a0" (U, the
    fitted mono-exponential extrapolated to t = 0), "lambda_eff" (1/h), "rmse" and "r2" of that fit over the
    points it used (0 where none)."""
    check_integration(integration)
    t = np.asarray(t, np.float64)
    y = np.asarray(y, dtype)
    n, count = y.shape
    out = {"tia": np.zeros(count, dtype), "model": np.zeros(count, np.uint8), "a0": np.zeros(count, dtype),
           "lambda_eff": np.zeros(count, dtype), "rmse": np.zeros(count, dtype), "r2": np.zeros(count, dtype)}
    peak = None if integration == "eq6" else np.argmax(y, axis=0)     # eq6: every curve from its first point
    for k in range(1 if peak is None else n):
        sel = slice(None) if peak is None else np.flatnonzero(peak == k)
        ys = y[k:, sel]
        if ys.shape[1] == 0:
            continue
        uptake = trapezoid_from_zero(t[:k + 1], y[:k + 1, sel], time_major=True) if k else 0.0
        if k == n - 1:                                    # peak at the last point: rising throughout
            out["tia"][sel] = uptake + y[k, sel] / lam_phys
            out["model"][sel] = 2
            continue
        tail, code, a0, lam, rss = _eq6(t[k:] - t[k] if k else t, ys, lam_phys, explode_factor, iterations, dtype)
        out["tia"][sel] = uptake + tail
        out["model"][sel] = np.where(code == 1, 5, code) if k else code
        with np.errstate(over="ignore", invalid="ignore"):
            out["a0"][sel] = np.nan_to_num(a0 * np.exp(lam * t[k]), nan=0.0, posinf=0.0) if k else a0
        out["lambda_eff"][sel] = lam
        mean = ys.mean(axis=0)
        ss_tot = sum((row - mean) ** 2 for row in ys)
        with np.errstate(all="ignore"):
            out["rmse"][sel] = np.nan_to_num(np.sqrt(rss / len(ys)), nan=0.0)
            out["r2"][sel] = np.nan_to_num(np.where(ss_tot > 0, 1.0 - rss / ss_tot, 1.0), nan=0.0)
    return out


def compute_voxel_tia(activities, times_h, nuclide: Nuclide = LU177, explode_factor: float = 10.0,
                      population_half_life_h: float | None = None, mask=None,
                      integration: str = DEFAULT_INTEGRATION) -> VoxelTIAResult:
    """TIA map from registered SPECT volumes (list/array of (z, y, x) in Bq/mL); ``integration``: "washout"
    or "eq6" (module docstring)."""
    check_integration(integration)
    stack, n_neg = check_activity_series(activities, times_h)
    t = check_times(times_h)
    shape = stack.shape[1:]
    y = stack.reshape(len(t), -1)                           # time-major (n, N)
    n_vox = y.shape[1]
    maps = {k: np.zeros(n_vox, np.float32) for k in ("tia", "rmse", "r2", "a0", "lambda_eff")}
    maps["model"] = np.zeros(n_vox, np.uint8)
    active = y.max(axis=0) > 0
    if mask is not None:
        active &= np.asarray(mask, bool).ravel()
    ya = y if active.all() else y[:, active]                # (n, N_active) float32
    if len(t) == 1:
        if population_half_life_h is None:
            raise TIAInputError("one time point: give a population effective half-life for the single-time-point method")
        maps["tia"][active] = single_time_point_tia(ya[0], t[0], population_half_life_h)
        maps["model"][active] = 4
    elif ya.size:
        # 4 iterations: converged (RSS within 1e-6 of 20 iterations); float32: see fit_mono_fast
        for key, values in integrate_curves(t, ya, nuclide.decay_constant_per_h, integration, explode_factor).items():
            maps[key][active] = values
    return VoxelTIAResult(*(maps[k].reshape(shape) for k in ("tia", "rmse", "r2", "model", "a0", "lambda_eff")),
                          n_neg, tuple(float(v) for v in t))
