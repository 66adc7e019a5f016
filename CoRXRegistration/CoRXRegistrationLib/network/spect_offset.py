"""SPECT/CT offset: the translation between the moving SPECT and the field its CT gives.

Within one session the SPECT and the CT are not perfectly registered: the patient moves between the
two acquisitions (or the couch sags) and the SPECT averages many breaths. The mismatch is mostly a
translation of a few mm, and it differs from session to session, so a field that aligns the CTs
exactly still misplaces the moving SPECT by the difference of the two sessions' mismatches. A
CT-driven method cannot see it; the SPECT can.

The fit: one translation t (voxels of the network grid, channels (z, y, x)) added to the CT-driven
displacement u, maximising the local squared NCC (9^3 box) between the fixed SPECT and the moving
SPECT sampled at p + u(p) + t, over the box around the fixed SPECT's uptake (normalised SPECT above
``uptake_level``). Three parameters cannot turn activity change (washout, bladder filling) into
motion the way a deformable SPECT term can. L-BFGS with a strong-Wolfe line search, deterministic.
A fit larger than ``max_offset_mm`` or one that does not raise the LNCC is not applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metrics import local_cc_squared
from .transform import warp


@dataclass(frozen=True)
class SpectOffsetConfig:
    """window: LNCC box (voxels); uptake_level: on the normalised fixed SPECT ([0, 1]); the fit region
    is the bounding box of the voxels above it, grown by half a window plus ``margin_voxels``;
    max_iterations: L-BFGS iterations; max_offset_mm: larger fits are rejected (the simulated and the
    usual clinical SPECT/CT mismatch is below 1 cm per session)."""
    window: int = 9
    uptake_level: float = 0.3
    margin_voxels: int = 2
    max_iterations: int = 15
    max_offset_mm: float = 15.0


@dataclass
class SpectOffsetFit:
    offset_voxels: tuple          # (z, y, x) on the network grid; zeros when not applied
    applied: bool
    reason: str                   # why it was not applied ("" when applied)
    lncc_before: float = float("nan")
    lncc_after: float = float("nan")
    evaluations: int = 0


def _uptake_box(fixed_spect: torch.Tensor, config: SpectOffsetConfig):
    """(origin, slices) of the fit region, or None when no voxel reaches the uptake level."""
    above = (fixed_spect[0, 0] > config.uptake_level).nonzero()
    if above.numel() == 0:
        return None
    grow = config.window // 2 + config.margin_voxels
    lo = (above.min(dim=0).values - grow).clamp_min(0).tolist()
    hi = [min(int(h) + grow + 1, n) for h, n in zip(above.max(dim=0).values.tolist(), fixed_spect.shape[2:])]
    return tuple(lo), (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))


def fit_spect_offset(fixed_spect: torch.Tensor, moving_spect: torch.Tensor, displacement: torch.Tensor,
                     spacing_mm: float, config: SpectOffsetConfig = SpectOffsetConfig()) -> SpectOffsetFit:
    """Fit the translation (see module docstring). Images (1, 1, Z, Y, X) normalised as the network's
    inputs, ``displacement`` (1, 3, Z, Y, X) voxels of the same grid (resampling convention);
    ``spacing_mm``: the grid's isotropic voxel size, for the ``max_offset_mm`` check."""
    if fixed_spect.shape[0] != 1 or displacement.shape[0] != 1:
        raise ValueError("the SPECT/CT offset is fitted one pair at a time (batch 1)")
    zero = (0.0, 0.0, 0.0)
    box = _uptake_box(fixed_spect, config)
    if box is None:
        return SpectOffsetFit(zero, False, f"no fixed SPECT voxel above {config.uptake_level} of its maximum "
                                           f"(normalised) to fit on")
    origin, region = box
    fixed = fixed_spect[region].detach()
    field = displacement[region].detach()
    moving = moving_spect.detach()

    def lncc_at(t):
        return local_cc_squared(fixed, warp(moving, field + t, origin=origin), config.window).mean()

    t = torch.zeros(1, 3, 1, 1, 1, dtype=field.dtype, device=field.device, requires_grad=True)
    optimiser = torch.optim.LBFGS([t], lr=1.0, max_iter=config.max_iterations, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        optimiser.zero_grad()
        loss = -lncc_at(t)
        loss.backward()
        return loss

    with torch.enable_grad():
        before = -float(optimiser.step(closure).detach())      # L-BFGS returns its first evaluation: t = 0
    with torch.no_grad():
        after = float(lncc_at(t))
    offset = tuple(float(v) for v in t.detach().flatten().cpu())
    size_mm = float(torch.linalg.vector_norm(t.detach())) * spacing_mm
    fit = SpectOffsetFit(offset, True, "", before, after, evaluations)
    if not torch.isfinite(t).all() or not math.isfinite(after):
        fit.offset_voxels, fit.applied, fit.reason = zero, False, "the fit did not converge (non-finite values)"
    elif size_mm > config.max_offset_mm:
        fit.offset_voxels, fit.applied = zero, False
        fit.reason = (f"the fitted offset ({size_mm:.1f} mm) exceeds {config.max_offset_mm:g} mm; it is more likely "
                      f"activity change than SPECT/CT mismatch")
    elif after <= before:
        fit.offset_voxels, fit.applied, fit.reason = zero, False, "no offset raises the SPECT LNCC"
    return fit
