"""A one-page PNG of a simulated series so a person can check it looks like SPECT/CT."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..outputs import atomic_path
from ..resample import resample


def coronal(volume: np.ndarray, y_index: int) -> np.ndarray:
    """Coronal slice (z, x) shown head up; the patient's right on the image left (radiological)."""
    return volume[:, y_index, :][::-1]


def save_series_preview(series, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = series.config
    n = len(cfg.times_h)
    ref_g = series.reference_spect_geometry
    # coronal plane through the kidneys (or the body centre)
    labels = series.labels_spect
    kid = np.isin(labels, (6, 7, 8, 9))
    y_idx = int(np.argwhere(kid)[:, 1].mean()) if kid.any() else ref_g.shape[1] // 2
    fig, axes = plt.subplots(2, n + 1, figsize=(3.0 * (n + 1), 6.4), squeeze=False)
    vmax = float(np.percentile(series.spect[cfg.reference_index], 99.9))
    for i, t_h in enumerate(cfg.times_h):
        sp_g = series.spect_geometry[i]
        ct_on_spect = resample(series.ct[i].astype(np.float32), series.ct_geometry[i], sp_g, fill=-1000.0)
        yi = min(y_idx, sp_g.shape[1] - 1)
        ax = axes[0, i]
        ax.imshow(coronal(ct_on_spect, yi), cmap="gray", vmin=-300, vmax=400, aspect=sp_g.spacing[2] / sp_g.spacing[0])
        sp = coronal(series.spect[i], yi)
        ax.imshow(np.ma.masked_less(sp, 0.1 * vmax), cmap="hot", alpha=0.6, vmin=0, vmax=vmax,
                  aspect=sp_g.spacing[2] / sp_g.spacing[0])
        ref = " (reference)" if i == cfg.reference_index else ""
        ax.set_title(f"{t_h:g} h SPECT/CT{ref}", fontsize=9)
        axes[1, i].imshow(sp, cmap="gray_r", vmin=0, vmax=vmax * (1.0 if i == cfg.reference_index else 0.7),
                          aspect=sp_g.spacing[2] / sp_g.spacing[0])
        axes[1, i].set_title(f"{t_h:g} h SPECT (Bq/mL)", fontsize=9)
    tia = coronal(series.truth_tia_psf, y_idx)
    im = axes[0, n].imshow(tia / 1e6, cmap="inferno", aspect=ref_g.spacing[2] / ref_g.spacing[0])
    axes[0, n].set_title("true TIA (MBq h/mL, PSF)", fontsize=9)
    fig.colorbar(im, ax=axes[0, n], fraction=0.046)
    axes[1, n].imshow(coronal(labels, y_idx), cmap="tab20", vmin=0, vmax=40, interpolation="nearest",
                      aspect=ref_g.spacing[2] / ref_g.spacing[0])
    axes[1, n].set_title("organ / tumour labels", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Simulated 177Lu-DOTATATE series, seed {cfg.seed} ({cfg.anatomy}); coronal, patient right on the left",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path
