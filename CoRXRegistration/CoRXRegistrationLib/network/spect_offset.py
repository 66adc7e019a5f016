"""SPECT/CT offset: the translation between the moving SPECT and the field its CT gives, and the
cranio-caudal shift of the uptake organs that the CT-driven field missed.

Within one session the SPECT and the CT are not perfectly registered: the patient moves between the
two acquisitions (or the couch sags) and the SPECT averages many breaths. The mismatch is mostly a
translation of a few mm, and it differs from session to session, so a field that aligns the CTs
exactly still misplaces the moving SPECT by the difference of the two sessions' mismatches. A
CT-driven method cannot see it; the SPECT can.

Breathing moves the abdominal organs cranio-caudally against the chest wall, spine and pelvis. The
CT shows that sliding poorly (soft tissue against soft tissue) and a smooth field follows it poorly,
so the CT-driven field leaves most organs shifted along z by a few mm. The SPECT shows the organs.

The fit: one translation t (voxels of the network grid, channels (z, y, x)) plus one cranio-caudal
shift s (mm along LPS +z) carried by the uptake weight w (the fixed SPECT's uptake mask, blurred by a
Gaussian of ``organ_sigma_mm`` and scaled to a maximum of 1), added to the CT-driven displacement u:
the moving SPECT is sampled at p + u(p) + t + w(p) s c, c = +1 mm along z in voxels. It maximises the
local squared NCC (9^3 box) between the fixed SPECT and that sample over the box around the fixed
SPECT's uptake (normalised SPECT above ``uptake_level``). Four parameters cannot turn activity change
(washout, bladder filling) into motion the way a deformable SPECT term can. L-BFGS with a
strong-Wolfe line search, deterministic. A fit that does not raise the LNCC is not applied; a
translation larger than ``max_offset_mm`` is not applied; an organ shift larger than
``max_organ_shift_mm`` is dropped and the translation fitted alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..progress import check_cancel
from .metrics import gaussian_blur, local_cc_squared_against, local_statistics, mean_local_cc_squared_and_gradient
from .optimisers import lbfgs_minimise
from .transform import _identity_grid, sample_on, voxels_to_sampling


@dataclass(frozen=True)
class SpectOffsetConfig:
    """window: LNCC box (voxels); uptake_level: on the normalised fixed SPECT ([0, 1]); the fit region
    is the bounding box of the voxels above it, grown by half a window plus ``margin_voxels``;
    max_iterations: L-BFGS iterations; step_tolerance_voxels: the fit ends after two iterations in a row
    that move the parameters (t in voxels, s in voxels along z) by less, and a line search stops narrowing
    below it (0.01 voxel, 0.04 mm on the bundled grid: below the 1/16 mm the SPECT field is stored to; the
    LNCC's float32 noise at the optimum is larger than its change there); max_offset_mm: larger fits are
    rejected (the simulated and the usual clinical SPECT/CT mismatch is below 1 cm per session);
    organ_shift: fit the cranio-caudal shift of the uptake organs too; organ_sigma_mm: SD of the Gaussian that spreads the uptake mask into
    the weight w (4 voxels of the bundled 3.87 mm grid); max_organ_shift_mm: larger organ shifts are
    dropped (breathing moves the organs by up to about 2 cm)."""
    window: int = 9
    uptake_level: float = 0.3
    margin_voxels: int = 2
    max_iterations: int = 15
    step_tolerance_voxels: float = 0.01
    max_offset_mm: float = 15.0
    organ_shift: bool = True
    organ_sigma_mm: float = 15.5
    max_organ_shift_mm: float = 20.0


@dataclass
class SpectOffsetFit:
    offset_voxels: tuple          # (z, y, x) on the network grid; zeros when not applied
    applied: bool
    reason: str                   # why it was not applied ("" when applied)
    lncc_before: float = float("nan")
    lncc_after: float = float("nan")
    evaluations: int = 0
    organ_shift_mm: float = 0.0   # along LPS +z where the organ weight is 1; 0 when not fitted or dropped
    organ_weight: torch.Tensor | None = None    # (1, 1, Z, Y, X) in [0, 1] on the network grid
    organ_note: str = ""          # why the organ shift was dropped ("" otherwise)


def _uptake_box(fixed_spect: torch.Tensor, config: SpectOffsetConfig):
    """(origin, slices) of the fit region, or None when no voxel reaches the uptake level."""
    above = (fixed_spect[0, 0] > config.uptake_level).nonzero()
    if above.numel() == 0:
        return None
    grow = config.window // 2 + config.margin_voxels
    lo = (above.min(dim=0).values - grow).clamp_min(0).tolist()
    hi = [min(int(h) + grow + 1, n) for h, n in zip(above.max(dim=0).values.tolist(), fixed_spect.shape[2:])]
    return tuple(lo), (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))


def uptake_weight(fixed_spect: torch.Tensor, config: SpectOffsetConfig, spacing_mm: float) -> torch.Tensor:
    """w: the fixed SPECT's uptake mask (normalised SPECT above ``uptake_level``) blurred by a Gaussian
    of ``organ_sigma_mm`` and scaled to a maximum of 1; (1, 1, Z, Y, X)."""
    w = gaussian_blur((fixed_spect.detach() > config.uptake_level).to(fixed_spect.dtype),
                      config.organ_sigma_mm / spacing_mm)
    return w / w.max().clamp_min(1e-12)


@dataclass(frozen=True)
class SpectOffsetReference:
    """What the fit needs of the fixed SPECT, computed once for every moving SPECT fitted to it
    (:func:`spect_offset_reference`): the fit region, the fixed SPECT's local statistics there and the
    uptake weight (None where the organ shift is not fitted)."""
    origin: tuple
    region: tuple
    statistics: tuple
    weight: torch.Tensor | None
    config: SpectOffsetConfig
    spacing_mm: float


def spect_offset_reference(fixed_spect: torch.Tensor, config: SpectOffsetConfig = SpectOffsetConfig(),
                           spacing_mm: float = 1.0) -> SpectOffsetReference | None:
    """The fixed SPECT's part of :func:`fit_spect_offset` (same arguments); None when no voxel reaches the
    uptake level."""
    box = _uptake_box(fixed_spect, config)
    if box is None:
        return None
    origin, region = box
    weight = uptake_weight(fixed_spect, config, spacing_mm) if config.organ_shift else None
    return SpectOffsetReference(origin, region, local_statistics(fixed_spect[region].detach(), config.window),
                                weight, config, float(spacing_mm))


def fit_spect_offset(fixed_spect: torch.Tensor, moving_spect: torch.Tensor, displacement: torch.Tensor,
                     spacing_mm: float, config: SpectOffsetConfig = SpectOffsetConfig(),
                     cranio_caudal_voxels=(1.0, 0.0, 0.0), cancel=None,
                     reference: SpectOffsetReference | None = None) -> SpectOffsetFit:
    """Fit the translation and the organ shift (see module docstring). Images (1, 1, Z, Y, X) normalised
    as the network's inputs, ``displacement`` (1, 3, Z, Y, X) voxels of the same grid (resampling
    convention); ``spacing_mm``: the grid's isotropic voxel size; ``cranio_caudal_voxels``: +1 mm along
    LPS z as a displacement in voxels, channels (z, y, x) (the default: an axial grid of 1 mm voxels);
    ``cancel() -> bool`` is asked at every evaluation (:class:`..progress.Cancelled`); ``reference``: the
    fixed SPECT's part already made (:func:`spect_offset_reference` of ``fixed_spect`` with this ``config``
    and ``spacing_mm``), e.g. for every time point of a series."""
    if fixed_spect.shape[0] != 1 or displacement.shape[0] != 1:
        raise ValueError("the SPECT/CT offset is fitted one pair at a time (batch 1)")
    zero = (0.0, 0.0, 0.0)
    if reference is not None and (reference.config != config or reference.spacing_mm != float(spacing_mm)):
        raise ValueError("the SPECT/CT offset reference was made with other settings than this fit's")
    reference = reference or spect_offset_reference(fixed_spect, config, spacing_mm)
    if reference is None:
        return SpectOffsetFit(zero, False, f"no fixed SPECT voxel above {config.uptake_level} of its maximum "
                                           f"(normalised) to fit on")
    origin, region, fixed, weight = reference.origin, reference.region, reference.statistics, reference.weight
    field = displacement[region].detach()
    moving = moving_spect.detach()
    per_mm = torch.as_tensor(cranio_caudal_voxels, dtype=field.dtype, device=field.device).view(1, 3, 1, 1, 1)
    voxels_per_mm = float(torch.linalg.vector_norm(per_mm))
    along = per_mm / voxels_per_mm          # unit vector: s is fitted in voxels, as t is

    # the fit region's points p + u(p) in grid_sample units, made once; t and s move them linearly
    offset = torch.tensor(origin, device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)
    positions = _identity_grid(tuple(field.shape[2:]), field.device, field.dtype)[None] + offset
    shape = tuple(moving.shape[2:])
    base = voxels_to_sampling(positions + field, shape)                       # (1, Z, Y, X, 3)
    weight_region = None if weight is None else weight[region][0, 0, ..., None]

    def sampled(t, s):
        points = base + voxels_to_sampling(t, shape, positions=False)
        if weight is not None:
            points = points + weight_region * voxels_to_sampling(s * along, shape, positions=False)
        return sample_on(moving, points)

    def split(x: torch.Tensor) -> tuple:
        x = x.to(field.dtype).to(field.device)
        return x[:3].view(1, 3, 1, 1, 1), (x[3] if weight is not None else x.new_zeros(()))

    def negative_lncc_and_gradient(x: torch.Tensor) -> tuple:
        check_cancel(cancel, "during the SPECT/CT offset fit")
        with torch.enable_grad():
            p = x.detach().to(field.dtype).to(field.device).clone().requires_grad_(True)
            t, s = split(p)
            b = sampled(t, s)
            value, d_b = mean_local_cc_squared_and_gradient(fixed, b.detach())
            (d_p,) = torch.autograd.grad(b, p, grad_outputs=d_b)
        return -float(value), -d_p

    x, start, evaluations = lbfgs_minimise(negative_lncc_and_gradient, torch.zeros(4 if weight is not None else 3),
                                           max_iterations=config.max_iterations,
                                           tolerance_step=config.step_tolerance_voxels)
    before = -start
    t, s = split(x)
    with torch.no_grad():
        after = float(local_cc_squared_against(fixed, sampled(t, s)).mean())
    offset = tuple(float(v) for v in t.flatten().cpu())
    size_mm = float(torch.linalg.vector_norm(t)) * spacing_mm
    organ_mm = float(s) / voxels_per_mm
    if weight is not None and math.isfinite(organ_mm) and abs(organ_mm) > config.max_organ_shift_mm:
        alone_config = replace(config, organ_shift=False)
        alone = fit_spect_offset(fixed_spect, moving_spect, displacement, spacing_mm, alone_config,
                                 cranio_caudal_voxels,
                                 reference=replace(reference, weight=None, config=alone_config))
        alone.organ_note = (f"organ shift not applied: the fitted {organ_mm:+.1f} mm exceeds "
                            f"{config.max_organ_shift_mm:g} mm; the translation was fitted alone")
        return alone
    fit = SpectOffsetFit(offset, True, "", before, after, evaluations,
                         organ_mm if weight is not None else 0.0, weight)
    if not torch.isfinite(t).all() or not math.isfinite(after) or not math.isfinite(organ_mm):
        fit.reason = "the fit did not converge (non-finite values)"
    elif size_mm > config.max_offset_mm:
        fit.reason = (f"the fitted offset ({size_mm:.1f} mm) exceeds {config.max_offset_mm:g} mm; it is more likely "
                      f"activity change than SPECT/CT mismatch")
    elif after <= before:
        fit.reason = "no offset raises the SPECT LNCC"
    if fit.reason:
        fit.offset_voxels, fit.applied, fit.organ_shift_mm = zero, False, 0.0
    return fit
