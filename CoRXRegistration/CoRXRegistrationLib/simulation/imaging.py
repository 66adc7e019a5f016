"""Image formation: low-dose CT and quantitative 177Lu SPECT of a moved anatomy.

CT: CT numbers of the phantom sampled at the session's anatomy positions (trilinear,
partial volume), plus white Gaussian noise (low-dose, SD ~25 HU), stored as int16 HU.

SPECT: the activity concentration (Bq/mL) is averaged onto a <= 4 mm emission grid,
blurred by the system resolution (isotropic Gaussian, FWHM 12-15 mm at 208 keV) and by
breathing (extra Gaussian along z), sampled at the session's anatomy positions and given
Poisson noise of ``counts = A * V * S * T`` (A Bq/mL, V voxel mL, S counts/s per MBq,
T acquisition s), then converted back to Bq/mL. Blurring in the anatomy frame before the
(near-rigid, locally volume-preserving) motion is an approximation of blurring after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..geometry import Geometry
from ..resample import resample

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class EmissionGrid:
    """The phantom grid pooled by an integer factor (activity is averaged, not sampled)."""

    geometry: Geometry
    factor: int

    @staticmethod
    def for_phantom(phantom_geometry: Geometry, max_spacing_mm: float = 4.0) -> "EmissionGrid":
        f = max(1, int(max_spacing_mm // phantom_geometry.spacing[0]))
        shape = tuple(n // f for n in phantom_geometry.shape)
        sp = tuple(s * f for s in phantom_geometry.spacing)
        origin = phantom_geometry.index_to_lps(np.full(3, (f - 1) / 2.0))
        return EmissionGrid(Geometry(shape, sp, tuple(origin), phantom_geometry.direction), f)

    def pool(self, volume: np.ndarray) -> np.ndarray:
        if self.factor == 1:
            return volume.astype(np.float32, copy=False)
        nz, ny, nx = (n * self.factor for n in self.geometry.shape)
        t = torch.from_numpy(np.ascontiguousarray(volume[:nz, :ny, :nx], dtype=np.float32))
        return F.avg_pool3d(t[None, None], self.factor)[0, 0].numpy()


def blur(volume: np.ndarray, geometry: Geometry, fwhm_mm: float, extra_z_sigma_mm: float = 0.0) -> np.ndarray:
    """Gaussian blur with FWHM (mm) in all directions plus an extra SD along z (mm)."""
    s = fwhm_mm * FWHM_TO_SIGMA
    sz = np.hypot(s, extra_z_sigma_mm)
    sigma_vox = (sz / geometry.spacing[2], s / geometry.spacing[1], s / geometry.spacing[0])
    return ndimage.gaussian_filter(volume, sigma_vox, mode="constant").astype(np.float32)


# The motion fields live on a 5 mm grid; on a large CT grid they are evaluated every 3.75 mm
# and interpolated in between: 4x faster, deviation from the exact field p99 0.06 mm, at most
# ~0.3 mm at sliding interfaces (measured), far below the CT voxel size.
FIELD_EVAL_SPACING_MM = 3.75


def render_ct(hu: np.ndarray, phantom_geometry: Geometry, grid: Geometry, inverse_map, rng,
              noise_hu: float = 25.0) -> np.ndarray:
    """CT (int16 HU) on ``grid``; ``inverse_map(points) -> displacement`` to anatomy positions."""
    ct = resample(hu, phantom_geometry, grid, displacement=inverse_map, mode="linear", fill=-1000.0,
                  displacement_spacing_mm=FIELD_EVAL_SPACING_MM)
    if noise_hu > 0:
        ct += rng.standard_normal(ct.shape, dtype=np.float32) * np.float32(noise_hu)
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16)


def render_spect(emission: np.ndarray, emission_geometry: Geometry, grid: Geometry, inverse_map, rng,
                 counts_per_mbq_s: float, acquisition_s: float) -> np.ndarray:
    """Noisy quantitative SPECT (float32 Bq/mL) on ``grid`` from a blurred emission volume."""
    expected = np.clip(resample(emission, emission_geometry, grid, displacement=inverse_map), 0.0, None)
    counts_per_bq_per_ml = grid.voxel_volume_ml * counts_per_mbq_s * 1e-6 * acquisition_s
    if counts_per_bq_per_ml <= 0:
        return expected
    counts = rng.poisson(expected.astype(np.float64) * counts_per_bq_per_ml)
    return (counts / counts_per_bq_per_ml).astype(np.float32)
