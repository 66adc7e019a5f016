"""The paper's training loss (Eq. 2-5): MSE(CT) + lambda_SPECT * LNCC loss(SPECT) + lambda_reg * diffusion."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import lncc


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    return torch.mean((fixed - warped) ** 2)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Negative mean local squared NCC (lower is better), as VoxelMorph/TransMorph."""
    return -lncc(fixed, warped, window).mean()


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
                      weights: LossWeights = LossWeights()):
    """Total loss and its parts (floats). The paper trains TransMorph with this same loss; only its
    inputs are CT-only. ``weights.spect = 0`` gives a CT-only loss."""
    parts = {"ct_mse": mse(fixed_ct, warped_ct), "regularisation": diffusion(displacement)}
    total = parts["ct_mse"] + weights.regularisation * parts["regularisation"]
    if weights.spect:
        parts["spect_lncc"] = lncc_loss(fixed_spect, warped_spect, weights.lncc_window)
        total = total + weights.spect * parts["spect_lncc"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
