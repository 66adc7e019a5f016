"""The paper's training loss (Eq. 2-5): MSE(CT) + lambda_SPECT * LNCC loss(SPECT) + lambda_reg * diffusion."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import local_cc_squared


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over every voxel, or over ``mask`` (weights in [0, 1], broadcastable to ``values``)."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mse(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _mean((fixed - warped) ** 2, mask)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mean local squared NCC (lower is better), as VoxelMorph/TransMorph."""
    return -_mean(local_cc_squared(fixed, warped, window), mask)


def diffusion(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of the displacement (voxels), averaged over the 3 axes."""
    dz = displacement[:, :, 1:] - displacement[:, :, :-1]
    dy = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    dx = displacement[:, :, :, :, 1:] - displacement[:, :, :, :, :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


@dataclass(frozen=True)
class LossWeights:
    """Paper defaults: lambda_SPECT = 0.1, lambda_reg = 8e-4; LNCC window 9^3."""
    spect: float = 0.1
    regularisation: float = 8e-4
    lncc_window: int = 9


def registration_loss(fixed_ct, warped_ct, fixed_spect, warped_spect, displacement,
                      weights: LossWeights = LossWeights(), mask: torch.Tensor | None = None):
    """Total loss and its parts (floats). The paper trains TransMorph with this same loss; only its
    inputs are CT-only. ``weights.spect = 0`` gives a CT-only loss. ``mask`` (B, 1, Z, Y, X): where the
    image terms count (e.g. inside both fields of view, :func:`overlap_mask`); the smoothness term
    always covers the whole field."""
    parts = {"ct_mse": mse(fixed_ct, warped_ct, mask), "regularisation": diffusion(displacement)}
    total = parts["ct_mse"] + weights.regularisation * parts["regularisation"]
    if weights.spect:
        parts["spect_lncc"] = lncc_loss(fixed_spect, warped_spect, weights.lncc_window, mask)
        total = total + weights.spect * parts["spect_lncc"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def overlap_mask(fixed_fov: torch.Tensor, moving_fov: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """1 where a fixed voxel and the moving point it samples both lie inside their scans' fields of
    view, else 0 (B, 1, Z, Y, X). Outside, the images hold fill values (air, no activity), and a loss
    that counts them rewards stretching one scan's cut face onto the other's. Not differentiated:
    the field must not learn to move the overlap away from where it fits badly."""
    from .transform import warp
    with torch.no_grad():
        return ((fixed_fov > 0.5) & (warp(moving_fov, displacement, padding="zeros") > 0.999)).to(displacement.dtype)
