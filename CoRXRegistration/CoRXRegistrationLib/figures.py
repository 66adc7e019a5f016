"""PNG figures a physicist reads before trusting a number (matplotlib, no display needed).

All panels are coronal slices of volumes on one reference SPECT grid, head up and the patient's
right on the image left (radiological). SPECT is shown in Bq/mL over the CT (HU, soft-tissue
window); the deformation RGB image is :func:`network.metrics.deformation_rgb` (mid-grey = no
motion); the Jacobian determinant uses a diverging map centred on 1 with folding (<= 0) in black.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from TIAMappingLib.voi import time_labels

from .outputs import atomic_path
from .simulation.preview import coronal


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def coronal_index(geometry_shape: tuple, mask: np.ndarray | None) -> int:
    """The coronal plane through the centre of ``mask`` (e.g. the kidneys), else mid-grid."""
    if mask is not None and np.any(mask):
        return int(np.argwhere(mask)[:, 1].mean())
    return geometry_shape[1] // 2


def spect_over_ct(ax, ct_hu, spect, y_index: int, aspect: float, vmax: float, title: str):
    ax.imshow(coronal(ct_hu, y_index), cmap="gray", vmin=-300, vmax=400, aspect=aspect)
    sp = coronal(spect, y_index)
    ax.imshow(np.ma.masked_less(sp, 0.05 * vmax), cmap="hot", alpha=0.65, vmin=0, vmax=vmax, aspect=aspect)
    ax.set_title(title, fontsize=8)


def deformation_panel(ax, field_lps_mm, y_index: int, aspect: float, max_mm: float, title: str):
    from .network.metrics import deformation_rgb
    rgb = deformation_rgb(field_lps_mm, max_mm=max_mm).numpy()
    ax.imshow(coronal(rgb, y_index), aspect=aspect)
    ax.set_title(title, fontsize=8)


def jacobian_panel(fig, ax, jacobian, y_index: int, aspect: float, title: str):
    plt = _pyplot()
    cmap = plt.get_cmap("RdBu_r").with_extremes(under="black")
    im = ax.imshow(coronal(jacobian, y_index), cmap=cmap, vmin=1e-6, vmax=2.0, aspect=aspect)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def _save(fig, path, dpi: int) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        _pyplot().close(fig)
    return path


def _clean(axes):
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])


def save_demo_figure(path, *, ct_hu, geometry, times_h, reference_index: int, spect_unregistered: list,
                     spect_registered: list, fields: dict, jacobians: dict, tia_map, voi_rows: list,
                     voi_errors: dict, coronal_mask=None, title: str = "", footer: str = "") -> Path:
    """The demo's one-page report.

    ct_hu: reference CT on ``geometry``; spect_*: one SPECT (Bq/mL) per time point on ``geometry``
    (the reference's own at ``reference_index``); fields/jacobians: time index -> CoRX field
    (Z, Y, X, 3) LPS mm / Jacobian on ``geometry``; tia_map: Bq h/mL; voi_rows: the VOI table of
    the CoRX TIA (activity per time point, mono-exponential fit); voi_errors: method -> VOI ->
    median voxel-TIA error (%) against the truth (may be empty for a user's own series).
    """
    plt = _pyplot()
    moving = [i for i in range(len(times_h)) if i != reference_index]
    aspect = geometry.spacing[2] / geometry.spacing[0]
    y = coronal_index(geometry.shape, coronal_mask)
    vmax = float(np.percentile(spect_registered[reference_index], 99.9))
    max_mm = max([float(np.abs(f).max()) for f in fields.values()] + [1.0])
    rows = len(moving) + 1
    fig = plt.figure(figsize=(15, 3.4 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, 5)
    ref_h = times_h[reference_index]
    for r, i in enumerate(moving):
        axes = [fig.add_subplot(grid[r, c]) for c in range(5)]
        h = times_h[i]
        spect_over_ct(axes[0], ct_hu, spect_registered[reference_index], y, aspect, vmax,
                      f"fixed: {ref_h:g} h SPECT on {ref_h:g} h CT")
        spect_over_ct(axes[1], ct_hu, spect_unregistered[i], y, aspect, vmax,
                      f"moving: {h:g} h SPECT, not registered")
        spect_over_ct(axes[2], ct_hu, spect_registered[i], y, aspect, vmax, f"{h:g} h SPECT deformed by CoRX")
        deformation_panel(axes[3], fields[i], y, aspect, max_mm,
                          f"deformation RGB (x, y, z; +-{max_mm:.0f} mm)")
        jac = jacobians[i]
        jacobian_panel(fig, axes[4], jac, y, aspect,
                       f"Jacobian det (<= 0: {100.0 * float(np.mean(jac <= 0)):.2f} % of voxels)")
        _clean(axes)
    tia_ax = fig.add_subplot(grid[-1, 0])
    im = tia_ax.imshow(coronal(tia_map, y) / 1e6, cmap="inferno", aspect=aspect)
    tia_ax.set_title("TIA with CoRX (MBq h/mL)", fontsize=8)
    fig.colorbar(im, ax=tia_ax, fraction=0.046, pad=0.02)
    _clean([tia_ax])
    _time_activity_panel(fig.add_subplot(grid[-1, 1:3]), times_h, voi_rows)
    _error_panel(fig.add_subplot(grid[-1, 3:5]), voi_errors)
    fig.suptitle(title + ("\n" + footer if footer else ""), fontsize=10)
    return _save(fig, path, dpi=80)


def _time_activity_panel(ax, times_h, voi_rows: list):
    """Measured VOI activity (MBq) per time point with the mono-exponential fit, log scale."""
    t_fine = np.linspace(0.0, max(times_h) * 1.1, 200)
    colours = _pyplot().get_cmap("tab10")
    measured = []
    for k, row in enumerate(r for r in voi_rows if r.get("status") == "ok"):
        c = colours(k % 10)
        values = [row[f"total_mbq_{tag}"] for tag in time_labels(times_h)]
        measured += [v for v in values if v > 0]
        ax.plot(times_h, values, "o", color=c, ms=4, label=row["segment"])
        a0, t_eff = row.get("mono_a0_mbq"), row.get("mono_t_eff_h")
        if a0 and t_eff and np.isfinite(t_eff) and t_eff > 0:
            ax.plot(t_fine, a0 * np.exp(-np.log(2) * t_fine / t_eff), "-", color=c, lw=1)
    ax.set_yscale("log")
    if measured:
        ax.set_ylim(min(measured) / 3.0, max(measured) * 3.0)
    ax.set_xlabel("hours after injection", fontsize=8)
    ax.set_ylabel("VOI activity (MBq)", fontsize=8)
    ax.set_title("time-activity curves (points) and mono-exponential fits (lines)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncol=2, loc="lower left")


def _error_panel(ax, voi_errors: dict):
    """Grouped bars: median |voxel TIA error| (%) per VOI for each method."""
    if not voi_errors:
        ax.axis("off")
        ax.text(0.5, 0.5, "no ground truth for this series", ha="center", va="center", fontsize=8)
        return
    methods = list(voi_errors)
    vois = list(next(iter(voi_errors.values())))
    x = np.arange(len(vois))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ax.bar(x + k * width, [voi_errors[m][v] for v in vois], width, label=m.replace("_", " "))
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels(vois, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("median |voxel TIA error| (%)", fontsize=8)
    ax.set_title("voxel TIA vs truth", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def save_methods_figure(path, *, ct_hu, geometry, fixed_spect, moving_spect, warped: dict, fields: dict,
                        jacobians: dict, profile_voxel=None, title: str = "") -> Path:
    """One pair, every method (as the paper's Fig. 2/6): a row per method with the warped SPECT over
    the fixed CT, its deformation RGB image and Jacobian, plus SPECT line profiles along z (head-foot)
    through ``profile_voxel`` (z, y, x on ``geometry``, e.g. a tumour centre). Arrays on ``geometry``;
    ``warped``/``fields``/``jacobians``: method -> SPECT (Bq/mL) / field (LPS mm) / Jacobian."""
    plt = _pyplot()
    methods = list(warped)
    aspect = geometry.spacing[2] / geometry.spacing[0]
    z0, y0, x0 = profile_voxel if profile_voxel is not None else tuple(n // 2 for n in geometry.shape)
    vmax = float(np.percentile(fixed_spect, 99.9))
    max_mm = max([float(np.abs(f).max()) for f in fields.values()] + [1.0])
    rows = len(methods) + 1
    fig = plt.figure(figsize=(13, 3.0 * rows + 0.5), layout="constrained")
    grid = fig.add_gridspec(rows, 4)
    top = [fig.add_subplot(grid[0, c]) for c in range(3)]
    spect_over_ct(top[0], ct_hu, fixed_spect, y0, aspect, vmax, "fixed SPECT on fixed CT")
    spect_over_ct(top[1], ct_hu, moving_spect, y0, aspect, vmax, "moving SPECT, not registered")
    top[2].imshow(coronal(np.abs(moving_spect - fixed_spect), y0), cmap="magma", aspect=aspect)
    top[2].set_title("|moving - fixed| SPECT", fontsize=8)
    for ax in top:
        ax.axhline(geometry.shape[0] - 1 - z0, color="cyan", lw=0.4)
        ax.axvline(x0, color="cyan", lw=0.6)
    _clean(top)
    profile = fig.add_subplot(grid[0, 3])
    z_mm = (np.arange(geometry.shape[0]) - z0) * geometry.spacing[2]
    profile.plot(z_mm, fixed_spect[:, y0, x0] / 1e3, "k-", lw=1.5, label="fixed")
    profile.plot(z_mm, moving_spect[:, y0, x0] / 1e3, "k:", lw=1, label="moving")
    for m in methods:
        profile.plot(z_mm, warped[m][:, y0, x0] / 1e3, lw=1, label=m)
    profile.set_xlim(-80, 80)
    profile.set_xlabel("z from the profile point (mm)", fontsize=8)
    profile.set_ylabel("SPECT (kBq/mL)", fontsize=8)
    profile.set_title("line profile (cyan cross)", fontsize=8)
    profile.tick_params(labelsize=7)
    profile.legend(fontsize=6)
    for r, m in enumerate(methods, start=1):
        axes = [fig.add_subplot(grid[r, c]) for c in range(3)]
        spect_over_ct(axes[0], ct_hu, warped[m], y0, aspect, vmax, f"{m}: warped SPECT on fixed CT")
        deformation_panel(axes[1], fields[m], y0, aspect, max_mm, f"{m}: deformation RGB (+-{max_mm:.0f} mm)")
        jac = jacobians[m]
        jacobian_panel(fig, axes[2], jac, y0, aspect,
                       f"{m}: Jacobian (<= 0: {100.0 * float(np.mean(jac <= 0)):.2f} %)")
        _clean(axes)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=75)
