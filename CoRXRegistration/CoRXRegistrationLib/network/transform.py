"""Spatial transformer on the network grid, velocity integration, field resizing.

Displacements here are (B, 3, Z, Y, X) in voxels of the grid they live on, channels (z, y, x),
resampling convention: warped(p) = moving(p + u(p)). Conversion to millimetres happens only in
``preprocess.py`` (network grid <-> LPS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def _identity_grid(shape: tuple, device, dtype) -> torch.Tensor:
    """Voxel coordinates (3, Z, Y, X), channels (z, y, x)."""
    return torch.stack(torch.meshgrid(*(torch.arange(n, device=device, dtype=dtype) for n in shape),
                                      indexing="ij"))


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "linear",
         padding: str = "border", origin: tuple | None = None) -> torch.Tensor:
    """Sample ``image`` (B, C, Z, Y, X) at p + u(p). ``mode``: "linear" for images, "nearest" for label maps.

    Outside the grid: "border" repeats the edge (images normalised to a background), "zeros" gives 0.
    ``origin`` (voxel index (z, y, x) in ``image``): ``displacement`` covers only the block of the
    image grid starting there, and the result is that block; by default it covers the whole grid.
    """
    return sample_on(image, sampling_grid(image.shape, displacement, origin), mode, padding)


def sampling_grid(image_shape, displacement: torch.Tensor, origin: tuple | None = None) -> torch.Tensor:
    """grid_sample coordinates (B, Z, Y, X, [x, y, z]) in [-1, 1] (align_corners) of the points p + u(p) in an
    image of ``image_shape`` (B, C, Z, Y, X); ``origin`` as for :func:`warp`."""
    if displacement.dim() != 5 or displacement.shape[1] != 3:
        raise ValueError(f"displacement must be (B, 3, Z, Y, X), got {tuple(displacement.shape)}")
    shape, grid_shape = tuple(displacement.shape[2:]), tuple(image_shape[2:])
    if origin is None and grid_shape != shape:
        raise ValueError(f"image grid {grid_shape} differs from displacement grid {shape}")
    if origin is not None and any(o < 0 or o + n > m for o, n, m in zip(origin, shape, grid_shape)):
        raise ValueError(f"block {shape} at {tuple(origin)} does not lie inside the image grid {grid_shape}")
    if not (torch.is_grad_enabled() and displacement.requires_grad):
        return _sampling_grid_in_place(displacement, grid_shape, origin or (0, 0, 0))
    if origin is None:
        coords = _identity_grid(shape, displacement.device, displacement.dtype)[None] + displacement
    else:
        offset = torch.tensor(origin, device=displacement.device, dtype=displacement.dtype).view(1, 3, 1, 1, 1)
        coords = _identity_grid(shape, displacement.device, displacement.dtype)[None] + offset + displacement
    return voxels_to_sampling(coords, grid_shape)


def _sampling_grid_in_place(displacement: torch.Tensor, grid_shape, origin) -> torch.Tensor:
    """:func:`sampling_grid` without gradients, the same operations on the same values channel by channel
    into the output (one volume of working memory instead of four; 4.6x faster on a 128^3 grid)."""
    b, _, *shape = displacement.shape
    out = torch.empty((b, *shape, 3), device=displacement.device, dtype=displacement.dtype)
    for c in range(3):                           # voxel channel c (z, y, x) is grid_sample's 2 - c
        view = [1, 1, 1]
        view[c] = shape[c]
        position = (torch.arange(shape[c], device=displacement.device, dtype=displacement.dtype)
                    + float(origin[c])).view(1, *view)
        channel = out[..., 2 - c]
        torch.add(position, displacement[:, c], out=channel)
        channel.mul_(2.0).div_(float(max(grid_shape[c] - 1, 1))).sub_(1.0)
    return out


def voxels_to_sampling(voxels: torch.Tensor, grid_shape, positions: bool = True) -> torch.Tensor:
    """(B, 3, ...) voxel ``positions`` (else displacements), channels (z, y, x), in a grid of ``grid_shape``
    (Z, Y, X) -> grid_sample units (B, ..., [x, y, z]); positions map to [-1, 1] (align_corners)."""
    size = torch.tensor([max(n - 1, 1) for n in grid_shape], device=voxels.device, dtype=voxels.dtype)
    scaled = 2.0 * voxels / size.view((1, 3) + (1,) * (voxels.dim() - 2))
    return (scaled - 1.0 if positions else scaled).movedim(1, -1).flip(-1)


def sample_on(image: torch.Tensor, grid: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """``image`` (B, C, Z, Y, X) sampled at grid_sample coordinates ``grid`` (:func:`sampling_grid`)."""
    src = image if image.is_floating_point() else image.to(grid.dtype)
    out = F.grid_sample(src, grid, mode=_MODES[mode], padding_mode=padding, align_corners=True)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of p -> p + first(p) -> then + second(p + first(p))."""
    return first + warp(second, first, padding="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp(v) of a stationary velocity field (voxels), 2^steps compositions."""
    if steps < 0:
        raise ValueError("integration steps must be >= 0")
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def upsample_displacement(displacement: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Resize a voxel displacement field to ``shape`` (corner-aligned) and rescale its voxel units."""
    old = displacement.shape[2:]
    out = F.interpolate(displacement, size=tuple(shape), mode="trilinear", align_corners=True)
    factors = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(shape, old)], dtype=out.dtype,
                           device=out.device)
    return out * factors.view(1, 3, 1, 1, 1)
