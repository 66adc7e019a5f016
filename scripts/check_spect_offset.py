"""The SPECT-driven fit off, translation only, and as bundled, on simulated patients that were not
used to choose its settings.

Registers every moving time point of each series to its reference with the bundled model three
times: ``register(..., spect_offset=False)`` (the CT-driven field alone), the translation alone
(``SpectOffsetConfig(organ_shift=False)``, the engine of d52d405-03f5966) and the default (translation
plus the organ shift). Prints the SPECT-field error against the true motion in the body, organs and
tumours (mm), the fitted translation (LPS mm) and organ shift (mm, + superior), and the means.
Default: the validation patients of the training recipe (126, 127) and fresh seeds 6000-6002, SNUH
protocol, clinical preset. Usage (from the repository root, after `make setup`):

    .venv/bin/python scripts/check_spect_offset.py [--seeds 126 127 6000 6001 6002] [--protocol snuh|smc]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CoRXRegistration"), str(ROOT / "TIAMapping")]

from CoRXRegistrationLib.engine import load_model, register  # noqa: E402
from CoRXRegistrationLib.evaluation import PROTOCOL_SITES, region_errors_mm, truth_masks  # noqa: E402
from CoRXRegistrationLib.network.spect_offset import SpectOffsetConfig  # noqa: E402
from CoRXRegistrationLib.resample import resample_field  # noqa: E402
from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series  # noqa: E402

REGIONS = ("body", "organs", "tumours")
SETTINGS = {"no fit": dict(spect_offset=False),
            "translation only": dict(spect_offset_config=SpectOffsetConfig(organ_shift=False)),
            "bundled": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[126, 127, 6000, 6001, 6002])
    ap.add_argument("--protocol", choices=sorted(PROTOCOL_SITES), default="snuh")
    args = ap.parse_args()
    model = load_model("bundled")
    print("| seed | moving h | " + " | ".join(f"{name}: body / organs / tumours (mm)" for name in SETTINGS)
          + " | translation LPS (mm) | organ shift (mm) |")
    print("|---|---:|" + "---|" * (len(SETTINGS) + 2))
    rows = []
    for seed in args.seeds:
        series = simulate_series(SimulationConfig.preset("clinical", seed=seed, anatomy="procedural",
                                                         times_h=PROTOCOL_SITES[args.protocol][1]))
        masks, ref, sessions = truth_masks(series), series.config.reference_index, series.sessions()
        for i, hours in enumerate(series.config.times_h):
            if i == ref:
                continue
            errors = []
            for options in SETTINGS.values():
                r = register(sessions[ref], sessions[i], model=model, native_outputs=False, qa_metrics=False,
                             **options)
                field = resample_field(r.field_network_spect, r.grid, series.reference_spect_geometry)
                stats = region_errors_mm(field, series.truth_field_spect[i], masks)
                errors.append([stats[k]["mean_mm"] if k in stats else np.nan for k in REGIONS])
            rows.append(errors)
            cells = [" / ".join(f"{v:.2f}" for v in e) for e in errors]
            print(f"| {seed} | {hours:g} | {' | '.join(cells)} | "
                  f"{' '.join(f'{v:+.2f}' for v in r.spect_offset_mm)} | {r.spect_organ_shift_mm:+.2f} |", flush=True)
    a = np.asarray(rows)
    means = [" / ".join(f"{v:.2f}" for v in np.nanmean(a[:, k], axis=0)) for k in range(len(SETTINGS))]
    print(f"| mean ({len(a)} pairs) | | {' | '.join(means)} | | |")
    organs = a[:, :, 1]
    print(f"\norgan error, bundled against translation only: {np.mean(organs[:, 2] - organs[:, 1]):+.3f} mm "
          f"(lower in {int((organs[:, 2] < organs[:, 1]).sum())} of {len(a)} pairs); translation only against "
          f"no fit: lower in {int((organs[:, 1] < organs[:, 0]).sum())} of {len(a)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
