"""Volume-of-interest (VOI) results: activity per time point, organ-based TIA, dose statistics.

The organ-based TIA: the VOI's total activity per time point (MBq) is integrated as the voxels are
(:func:`.voxel_tia.integrate_curves`): by the paper's Eq. 6 over every point (``eq6_*``) and over the
washout phase (``washout_*``); ``organ_tia_mbq_h`` is the one of the chosen ``integration``.
Multi-exponential models (bi-exponential with uptake, tri-exponential) are fitted too and the best is
chosen by AICc among the models for which AICc is defined (n >= k + 2 time points).
"""
from __future__ import annotations

import numpy as np

from .dose import dose_statistics
from .nuclides import LU177, Nuclide
from .timecurves import MODELS, fit_model, information_criterion
from .voxel_tia import DEFAULT_INTEGRATION, MODEL_CODES, check_integration, integrate_curves


def voi_curve_fits(times_h, totals_mbq: np.ndarray, nuclide: Nuclide = LU177,
                   integration: str = DEFAULT_INTEGRATION) -> list:
    """Fit every VOI curve (rows of ``totals_mbq``, MBq). Returns one dict per VOI (MBq h)."""
    check_integration(integration)
    t = np.asarray(times_h, float)
    y = np.atleast_2d(np.asarray(totals_mbq, float))
    n = len(t)
    lam_phys = nuclide.decay_constant_per_h
    out = [dict() for _ in range(len(y))]
    if n >= 2:
        for name in ("eq6", "washout"):
            fit = integrate_curves(t, y.T, lam_phys, name, iterations=30, dtype=np.float64)
            for i, row in enumerate(out):
                row[f"{name}_model"] = MODEL_CODES[int(fit["model"][i])]
                row[f"{name}_tia_mbq_h"] = float(fit["tia"][i])
                if name == "eq6":
                    lam = float(fit["lambda_eff"][i])
                    row["mono_a0_mbq"] = float(fit["a0"][i])
                    row["mono_t_eff_h"] = float(np.log(2) / lam) if lam > 0 else float("nan")
        for row in out:
            row["time_integration"] = integration
            row["organ_tia_mbq_h"] = row[f"{integration}_tia_mbq_h"]
        scores = {}
        for name, model in MODELS.items():
            if n < model.n_params + 1:
                continue
            pm, rss = fit_model(name, t, y, iterations=60)
            tia = model.integral(pm)
            valid = np.isfinite(tia) & (model.terminal_rate(pm) >= lam_phys * 0.999)
            aicc = information_criterion(rss, n, model.n_params, corrected=True)
            scores[name] = np.where(valid, aicc, np.nan)
            for i, row in enumerate(out):
                row[f"{name}_tia_mbq_h"] = float(tia[i]) if valid[i] else float("nan")
                row[f"{name}_aicc"] = float(aicc[i]) if valid[i] else float("nan")
        for i, row in enumerate(out):
            cands = {k: v[i] for k, v in scores.items() if np.isfinite(v[i])}
            best = min(cands, key=cands.get) if cands else None
            row["best_model"] = best or integration
            row["best_tia_mbq_h"] = row[f"{best}_tia_mbq_h"] if best else row["organ_tia_mbq_h"]
    return out


def time_labels(times_h) -> list:
    """Column tags for times (``24h``, ``0.5h``), with as many digits as it takes to tell them apart."""
    for digits in range(6, 17):
        labels = [f"{float(t):.{digits}g}h" for t in times_h]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"times {list(times_h)} cannot be told apart")


def voi_table(segments: dict, activities, times_h, voxel_volume_ml: float, tia_map=None, dose_map=None,
              nuclide: Nuclide = LU177, integration: str = DEFAULT_INTEGRATION) -> list:
    """One row per segment: volume, activity per time point, organ-based TIA (``integration``) and
    voxel TIA, dose.

    segments: name -> boolean mask on the SPECT grid. Empty segments get status 'empty'.
    """
    rows, totals, names = [], [], []
    tags = time_labels(times_h)
    for name, mask in segments.items():
        n_vox = int(mask.sum())
        row = {"segment": name, "voxels": n_vox, "volume_ml": n_vox * voxel_volume_ml,
               "status": "ok" if n_vox else "empty (no voxel inside the SPECT field of view)"}
        for tag, a in zip(tags, activities):
            vals = a[mask]
            row[f"mean_bq_ml_{tag}"] = float(vals.mean()) if n_vox else float("nan")
            row[f"total_mbq_{tag}"] = float(vals.sum(dtype=np.float64) * voxel_volume_ml / 1e6)
        if tia_map is not None:
            row["voxel_tia_sum_mbq_h"] = float(tia_map[mask].sum(dtype=np.float64) * voxel_volume_ml / 1e6)
        if dose_map is not None:
            row.update(dose_statistics(dose_map[mask]) if n_vox else dose_statistics(np.empty(0)))
        rows.append(row)
        if n_vox:
            totals.append([row[f"total_mbq_{tag}"] for tag in tags])
            names.append(len(rows) - 1)
    if totals:
        for idx, fit in zip(names, voi_curve_fits(times_h, np.array(totals), nuclide, integration)):
            rows[idx].update(fit)
    return rows
