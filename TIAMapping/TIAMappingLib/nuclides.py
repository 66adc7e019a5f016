"""Nuclear data used by CoRX, each value with its source.

Half-life of 177Lu: 6.647(4) d — ENSDF evaluation, F.G. Kondev, Nuclear Data Sheets 159
(2019) 1 (A = 177), as distributed by NNDC.
Mean energy emitted per decay as electrons (beta-minus, internal-conversion and Auger
electrons): 0.1479 MeV; as photons (gamma and X-rays): 0.0353 MeV — ICRP Publication 107,
"Nuclear Decay Data for Dosimetric Calculations", Ann. ICRP 38(3), 2008 (Lu-177 table).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEV_TO_J = 1.602176634e-13  # exact (SI 2019 definition of the elementary charge)


@dataclass(frozen=True)
class Nuclide:
    name: str
    half_life_h: float
    electron_energy_mev_per_decay: float   # locally absorbed in the local-deposition model
    photon_energy_mev_per_decay: float
    source: str

    @property
    def decay_constant_per_h(self) -> float:
        """Physical decay constant lambda_phys (1/h)."""
        return float(np.log(2.0) / self.half_life_h)

    @property
    def electron_energy_j_per_decay(self) -> float:
        return self.electron_energy_mev_per_decay * MEV_TO_J


LU177 = Nuclide(
    name="Lu-177",
    half_life_h=6.647 * 24.0,  # 159.528 h
    electron_energy_mev_per_decay=0.1479,
    photon_energy_mev_per_decay=0.0353,
    source="T1/2: ENSDF (Kondev, Nucl. Data Sheets 159, 2019); energies: ICRP Publication 107 (2008)",
)

NUCLIDES = {"Lu-177": LU177, "177Lu": LU177, "lu177": LU177}


def get_nuclide(name: str) -> Nuclide:
    try:
        return NUCLIDES[name] if name in NUCLIDES else NUCLIDES[name.lower().replace("-", "")]
    except KeyError:
        raise ValueError(f"unknown nuclide {name!r}; known: Lu-177") from None
