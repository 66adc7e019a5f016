"""Absorbed dose by dose-voxel-kernel convolution (177Lu), beside local deposition.

The kernel (``Resources/Kernels``, from PyTheranostics 0.1, Apache-2.0: see its NOTICE) is the dose per
decay around a source voxel of 4.7952 mm in ICRP soft tissue, mGy/(MBq s), 51^3 voxels (122 mm either
side). Dose (Gy) = (decays per voxel, MBq s) convolved with the kernel / 1000, then scaled by 1/rho
per voxel (rho from the CT, g/mL; voxels below 0.1 g/mL get 0, as for local deposition).

On a grid of another voxel size two ways (``grid_method``):

- ``"rescale"`` (default): the kernel is brought to the grid's voxel size. Off the source voxel the
  kernel is a smooth function of distance (photons and the tail of the electrons): its logarithm is
  interpolated trilinearly at the new voxel offsets (the source voxel's own value replaced by the
  log-linear extrapolation of its neighbours for that); the new source voxel takes the rest of the
  energy, so that the kernel's total (absorbed energy per decay within the 245 mm cube) is unchanged.
  The TIA is never resampled.
- ``"resample"``: the TIA is brought onto a 4.7952 mm grid with the same centre and orientation by volume
  overlap (every decay kept), convolved there, and the dose brought back by the same overlaps. This
  smooths twice; its cost is measured in docs/pvc.md (``scripts/measure_kernel_dose.py``).

Needs no torch.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import signal

from CoRXRegistrationLib.geometry import Geometry

KERNEL_FILE = Path(__file__).resolve().parent.parent / "Resources" / "Kernels" / "lu177_dvk_4.7952mm.npz"
KERNEL_VOXEL_MM = 4.7952
TISSUES = ("soft_tissue", "cortical_bone")


@lru_cache(maxsize=2)
def load_kernel(tissue: str = "soft_tissue") -> np.ndarray:
    """The 51^3 kernel (mGy/(MBq s), float64), mirrored from the stored octant."""
    if tissue not in TISSUES:
        raise ValueError(f"dose kernel tissue {tissue!r}: use one of {TISSUES}")
    with np.load(KERNEL_FILE, allow_pickle=False) as data:
        octant = data[tissue].astype(np.float64)
    half = np.concatenate([octant[:0:-1], octant], axis=0)
    half = np.concatenate([half[:, :0:-1], half], axis=1)
    kernel = np.concatenate([half[:, :, :0:-1], half], axis=2)
    kernel.flags.writeable = False              # cached and shared
    return kernel


def kernel_grid(geometry: Geometry) -> Geometry:
    """A grid of 4.7952 mm voxels covering ``geometry``'s extent, with its orientation and centre."""
    extent = np.asarray(geometry.size_xyz, float) * np.asarray(geometry.spacing)
    size_xyz = np.maximum(np.ceil(extent / KERNEL_VOXEL_MM).astype(int), 1)
    return Geometry.centred(tuple(int(n) for n in size_xyz[::-1]), (KERNEL_VOXEL_MM,) * 3, geometry.centre_lps(),
                            geometry.direction_matrix)


def overlap_matrix(n_from: int, spacing_from: float, n_to: int, spacing_to: float) -> np.ndarray:
    """(n_to, n_from) lengths (mm) by which the voxels of two centred 1-D grids overlap."""
    edges_from = (np.arange(n_from + 1) - n_from / 2.0) * spacing_from
    edges_to = (np.arange(n_to + 1) - n_to / 2.0) * spacing_to
    lo = np.maximum(edges_to[:-1, None], edges_from[None, :-1])
    hi = np.minimum(edges_to[1:, None], edges_from[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def _apply_separable(volume: np.ndarray, matrices) -> np.ndarray:
    """``volume`` (z, y, x) with one matrix applied along each axis (matrices in z, y, x order)."""
    out = np.asarray(volume, np.float64)
    for axis, m in enumerate(matrices):
        out = np.moveaxis(np.tensordot(m, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out


class KernelGridMap:
    """Volume-overlap maps between ``geometry`` and the kernel grid of the same centre and orientation."""

    def __init__(self, geometry: Geometry):
        self.grid = kernel_grid(geometry)
        # overlap lengths (mm) per axis, z, y, x
        self.overlaps = [overlap_matrix(n, s, m, KERNEL_VOXEL_MM) for n, s, m in
                         zip(geometry.shape, reversed(geometry.spacing), self.grid.shape)]

    def to_kernel(self, concentration: np.ndarray) -> np.ndarray:
        """Mean concentration in each kernel voxel (its content over its volume: every decay kept)."""
        return _apply_separable(concentration, self.overlaps) / KERNEL_VOXEL_MM ** 3

    def from_kernel(self, volume: np.ndarray) -> np.ndarray:
        """Each voxel of ``geometry`` the volume-weighted mean of the kernel voxels it overlaps."""
        return _apply_separable(volume, [m.T / np.maximum(m.sum(axis=0), 1e-12)[:, None] for m in self.overlaps])


@lru_cache(maxsize=8)
def kernel_for_spacing(spacing_xyz: tuple, tissue: str = "soft_tissue") -> np.ndarray:
    """The kernel (mGy/(MBq s)) for voxels of ``spacing_xyz`` mm (array order z, y, x), reaching as far
    (122 mm) as the original; see the module text ("rescale")."""
    from scipy import ndimage
    k = load_kernel(tissue)
    c = k.shape[0] // 2
    if np.allclose(spacing_xyz, KERNEL_VOXEL_MM, rtol=1e-6):
        return k
    smooth = np.log(k)                          # a new array: the cached kernel stays as it is
    smooth[c, c, c] = 2.0 * smooth[c, c, c + 1] - smooth[c, c, c + 2]       # the source voxel, off-voxel law
    reach = c * KERNEL_VOXEL_MM
    half = [int(np.floor(reach / s)) for s in reversed(spacing_xyz)]          # z, y, x
    axes = [np.arange(-h, h + 1) * s / KERNEL_VOXEL_MM + c for h, s in zip(half, reversed(spacing_xyz))]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    out = np.exp(ndimage.map_coordinates(smooth, coords, order=1, mode="nearest"))
    voxel_ml = float(np.prod(spacing_xyz))
    total = float(k.sum()) * KERNEL_VOXEL_MM ** 3               # mGy mm^3 per MBq s: energy per decay
    centre = tuple(half)
    out[centre] = 0.0
    out[centre] = (total - float(out.sum()) * voxel_ml) / voxel_ml
    if out[centre] <= 0:
        raise ValueError(f"cannot rescale the dose kernel to {spacing_xyz} mm voxels")
    out.flags.writeable = False
    return out


def kernel_dose(tia_bq_h_ml: np.ndarray, geometry: Geometry, density_g_ml=None, min_density_g_ml: float = 0.1,
                tissue: str = "soft_tissue", grid_method: str = "rescale") -> np.ndarray:
    """Absorbed dose (Gy, float32, on ``geometry``) from a TIA map (Bq h/mL) by kernel convolution."""
    tia = np.asarray(tia_bq_h_ml, np.float64)
    if grid_method not in ("rescale", "resample"):
        raise ValueError(f"grid_method {grid_method!r}: use 'rescale' or 'resample'")
    native = np.allclose(geometry.spacing, KERNEL_VOXEL_MM, rtol=1e-3) or grid_method == "rescale"
    kernel = kernel_for_spacing(tuple(round(s, 6) for s in geometry.spacing), tissue) if native else load_kernel(tissue)
    if native:
        decays_mbq_s = tia * geometry.voxel_volume_ml * 3600.0 / 1e6
    else:
        maps = KernelGridMap(geometry)
        decays_mbq_s = maps.to_kernel(tia) * maps.grid.voxel_volume_ml * 3600.0 / 1e6
    dose = signal.fftconvolve(decays_mbq_s, kernel, mode="same") / 1000.0
    dose = np.clip(dose, 0.0, None)
    if not native:
        dose = maps.from_kernel(dose)
    dose = dose.astype(np.float32)
    if density_g_ml is not None:
        rho = np.asarray(density_g_ml, np.float64)
        if rho.shape != dose.shape:
            raise ValueError(f"density grid {rho.shape} differs from the TIA grid {dose.shape}")
        with np.errstate(divide="ignore", invalid="ignore"):
            dose = np.where(rho < min_density_g_ml, 0.0, dose / rho).astype(np.float32)
    return dose
