"""Ground-truth measures of a registration (the metrics the paper could not have)."""
from __future__ import annotations

import numpy as np


def displacement_error_mm(field_lps_mm: np.ndarray, truth_lps_mm: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and 95th percentile of |u - u_true| (mm) inside ``mask``; both fields on one grid."""
    if field_lps_mm.shape != truth_lps_mm.shape:
        raise ValueError(f"field {field_lps_mm.shape} and truth {truth_lps_mm.shape} are on different grids")
    m = np.asarray(mask, bool)
    if not m.any():
        raise ValueError("empty mask: no voxels to measure the displacement error in")
    err = np.linalg.norm(np.asarray(field_lps_mm, np.float64) - truth_lps_mm, axis=-1)[m]
    return {"mean_mm": float(err.mean()), "p95_mm": float(np.percentile(err, 95)), "voxels": int(m.sum())}
