"""Domain-randomised simulation settings for supervised training: every training patient draws its
own protocol, resolution, counts, noise, motion, SPECT/CT mismatch and fields of view, so a network
trained on them cannot lean on one simulator setting. Drawn from ``default_rng([seed, 31])``: the
series' own random stream (anatomy, kinetics, motion) stays the one ``seed`` gives.
"""
from __future__ import annotations

import numpy as np

from .series import SimulationConfig

#: Protocols (hours after injection) drawn from, each time then jittered by up to +-15 %.
PROTOCOLS = ((4.0, 24.0, 48.0, 120.0), (0.5, 4.0, 24.0, 48.0), (1.0, 24.0, 72.0), (4.0, 24.0, 96.0, 168.0),
             (2.0, 20.0, 44.0, 68.0))


def randomised_config(seed: int, **overrides) -> SimulationConfig:
    """The clinical preset with per-patient randomised settings (see module doc); ``overrides`` win."""
    rng = np.random.default_rng([int(seed), 31])
    times = np.asarray(PROTOCOLS[int(rng.integers(len(PROTOCOLS)))], float)
    times = times * rng.uniform(0.85, 1.15, times.size)
    times = np.maximum.accumulate(times) + np.arange(times.size) * 0.1          # strictly increasing
    fwhm_low = float(rng.uniform(8.0, 15.0))
    spacing = float(rng.uniform(3.9, 4.8))
    settings = dict(
        seed=int(seed), times_h=tuple(round(float(t), 2) for t in times),
        reference_index=int(rng.integers(2)),
        spect_fwhm_mm=(fwhm_low, fwhm_low + float(rng.uniform(0.0, 4.0))),
        spect_spacing_mm=spacing,
        spect_shape_zyx=(int(rng.integers(70, 112)), 128, 128),                  # axial field of view 27-53 cm
        ct_shape_zyx=(int(rng.integers(84, 124)), 300, 300),
        counts_per_mbq_s=float(np.exp(rng.uniform(np.log(0.75), np.log(8.0)))),
        ct_noise_hu=float(rng.uniform(10.0, 60.0)),
        max_shift_mm=float(rng.uniform(8.0, 25.0)),
        max_rotation_deg=float(rng.uniform(2.0, 8.0)),
        max_breathing_mm=float(rng.uniform(5.0, 25.0)),
        spect_mismatch_scale=float(rng.uniform(0.5, 2.5)),
    )
    settings.update(overrides)
    return SimulationConfig.preset("clinical", **settings)
