"""Rigid CT-to-CT pre-alignment on the network grid, before the network sees the pair.

Patient repositioning between sessions (couch translation up to a few cm, a few degrees of
rotation) is the largest part of the motion; a deformable network with local attention windows
corrects it poorly, a six-parameter fit corrects it well. The fit: rotation (Euler angles about
the grid's z, y, x axes, radians) about the grid centre plus a translation (voxels), Adam on the
mean squared difference of the normalised CTs, coarse to fine (average-pooled by 4, then by 2).

The cost is taken only between the first and last axial slices that hold body in the fixed CT,
shrunk by ``margin_voxels``: where the CT field of view cuts the body, the cut face would
otherwise pull the fit towards the couch position. The network grid is isotropic, so voxel
units are fine for rotations. Displacements are (B, 3, Z, Y, X) voxels, channels (z, y, x),
resampling convention as :mod:`transform`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..preprocess import PREALIGN_METHODS
from ..progress import check_cancel
from .optimisers import Adam
from .transform import _identity_grid, sample_on, warp


@dataclass(frozen=True)
class RigidConfig:
    """levels: (pooling factor, Adam iterations) coarse to fine; learning rates per unit of the
    parameters: radians for rotation, voxels of the full grid for translation."""
    levels: tuple = ((4, 60), (2, 15))
    lr_rotation: float = 0.01
    lr_translation_voxels: float = 0.2
    margin_voxels: int = 8


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """R = Rz Ry Rx acting on (z, y, x) voxel coordinates; ``angles`` = (about z, about y, about x)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[0]), torch.zeros_like(c[0])

    def mat(rows):
        return torch.stack([torch.stack(r) for r in rows])
    # the axis a rotation is "about" keeps its coordinate; the other two turn in their plane
    about_z = mat([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
    about_y = mat([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
    about_x = mat([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
    return about_z @ about_y @ about_x


def _grid_centre(shape: tuple, device, dtype=torch.float32) -> torch.Tensor:
    """(3,) voxel coordinates (z, y, x) of the centre of a grid of ``shape``: what the rotation turns about."""
    return torch.tensor([(n - 1) / 2.0 for n in shape], device=device, dtype=dtype)


def rigid_displacement(params: torch.Tensor, shape: tuple) -> torch.Tensor:
    """(1, 3, Z, Y, X) displacement of p -> R (p - c) + c + t, c the centre of the grid ``shape``;
    params = (3 angles, 3 translations)."""
    p = _identity_grid(tuple(shape), params.device, params.dtype).reshape(3, -1)
    centre = _grid_centre(shape, params.device, params.dtype).view(3, 1)
    moved = rotation_matrix(params[:3]) @ (p - centre) + centre + params[3:].view(3, 1)
    return (moved - p).reshape(1, 3, *shape)


def _centred_points(shape: tuple, lo: int, hi: int, device) -> torch.Tensor:
    """(N, 3) voxel coordinates (z, y, x) minus the grid centre of the axial slices lo..hi-1 of ``shape``."""
    return _identity_grid(tuple(shape), device, torch.float32)[:, lo:hi].reshape(3, -1).T - _grid_centre(shape, device)


def rigid_sampling_points(params: torch.Tensor, centred: torch.Tensor, shape: tuple) -> torch.Tensor:
    """grid_sample coordinates (N, [x, y, z]) in [-1, 1] (align_corners) of the images p -> R (p - c) + c + t
    of points given as p - c (``centred``, (N, 3) voxels (z, y, x), c the centre of the grid ``shape``): one
    product, what :func:`rigid_displacement` followed by :func:`transform.voxels_to_sampling` gives."""
    to_unit = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=params.device, dtype=params.dtype)
    # the centre maps to 0 in grid_sample units, so x = D R (p - c) + D t with D = diag(2 / (n - 1)),
    # the rows put in grid_sample's (x, y, z) order
    m = (to_unit.view(3, 1) * rotation_matrix(params[:3])).flip(0)
    return torch.addmm((to_unit * params[3:]).flip(0), centred, m.T)


def field_of_view_band(fixed_ct: torch.Tensor, body_level: float, margin: int) -> torch.Tensor:
    """1 between the first and last axial slices holding body, shrunk by ``margin`` slices, else 0."""
    body_slices = (fixed_ct[0, 0] > body_level).flatten(1).any(1).nonzero().flatten()
    weight = torch.zeros_like(fixed_ct)
    if body_slices.numel() == 0:
        raise ValueError("rigid pre-alignment: the fixed CT holds no body above the threshold")
    lo, hi = int(body_slices.min()) + margin, int(body_slices.max()) - margin
    if hi <= lo:                                   # a short axial field of view: use what there is
        lo, hi = int(body_slices.min()), int(body_slices.max())
    weight[:, :, lo:hi + 1] = 1.0
    return weight


def rigid_prealign(fixed_ct: torch.Tensor, moving_ct: torch.Tensor, body_level: float,
                   cfg: RigidConfig = RigidConfig(), cancel=None) -> tuple:
    """Fit the rigid transform taking fixed-grid points to the moving CT (one pair, B = 1).

    ``body_level``: the normalised-CT value of the body threshold; ``cancel() -> bool`` is asked every
    iteration (:class:`..progress.Cancelled`). Returns (displacement
    (1, 3, Z, Y, X) voxels, parameters (6,): angles in radians, translation in voxels)."""
    if fixed_ct.shape[0] != 1 or moving_ct.shape != fixed_ct.shape:
        raise ValueError(f"rigid pre-alignment takes one pair of equal grids, got {tuple(fixed_ct.shape)} "
                         f"and {tuple(moving_ct.shape)}")
    fixed_ct, moving_ct = fixed_ct.detach().float(), moving_ct.detach().float()
    weight = field_of_view_band(fixed_ct, body_level, cfg.margin_voxels)
    params = torch.zeros(6, device=fixed_ct.device, requires_grad=True)
    scale = torch.tensor([1.0] * 3 + [cfg.lr_translation_voxels / cfg.lr_rotation] * 3, device=fixed_ct.device)
    with torch.enable_grad():
        for factor, iterations in cfg.levels:
            f, m, w = (F.avg_pool3d(x, factor) if factor > 1 else x for x in (fixed_ct, moving_ct, weight))
            level_scale = scale * torch.tensor([1.0] * 3 + [1.0 / factor] * 3, device=fixed_ct.device)
            opt = Adam([params], lr=cfg.lr_rotation)
            shape = tuple(f.shape[2:])
            # slices of zero weight add nothing to the cost or its gradient: sample only the band
            band = (w[0, 0].flatten(1).amax(1) > 0).nonzero().flatten()
            lo, hi = int(band.min()), int(band.max()) + 1
            f, w = f[:, :, lo:hi], w[:, :, lo:hi]
            centred = _centred_points(shape, lo, hi, fixed_ct.device)                 # made once per level
            for _ in range(iterations):
                check_cancel(cancel, "during the rigid pre-alignment")
                points = rigid_sampling_points(params * level_scale, centred, shape).view(1, *f.shape[2:], 3)
                cost = (w * (sample_on(m, points) - f) ** 2).sum() / w.sum()
                opt.zero_grad()
                cost.backward()
                opt.step()
    final = (params * scale).detach()
    return rigid_displacement(final, tuple(fixed_ct.shape[2:])), final


def prealign_moving(method: str, fixed_ct: torch.Tensor, moving_ct: torch.Tensor, moving_spect: torch.Tensor,
                    body_level: float, cancel=None) -> tuple:
    """The pre-alignment a model was trained with, applied to a pair's moving images.

    Returns (displacement (1, 3, Z, Y, X) voxels, moving CT, moving SPECT) with the moving images
    resampled through it; the network's own field ``d`` then gives the total field
    ``transform.compose(d, displacement)``."""
    if method not in PREALIGN_METHODS:
        raise ValueError(f"unknown pre-alignment {method!r}; expected one of {PREALIGN_METHODS}")
    if method == "none":
        return torch.zeros((1, 3) + tuple(fixed_ct.shape[2:]), device=fixed_ct.device), moving_ct, moving_spect
    u, _ = rigid_prealign(fixed_ct, moving_ct, body_level, cancel=cancel)
    both = warp(torch.cat([moving_ct, moving_spect], 1), u)      # one set of sampling weights for the two
    return u, both[:, :1], both[:, 1:]
