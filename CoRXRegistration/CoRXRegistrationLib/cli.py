"""The ``corx`` command line. Sub-commands: simulate, tia, demo.

Errors in the input end the command with exit code 2 and one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .geometry import GeometryError
from .imageio import ImageFileError
from .progress import TerminalProgress


def _cmd_simulate(args) -> int:
    from .simulation import SimulationConfig, simulate_series, write_series
    from .simulation.preview import save_series_preview

    cfg = SimulationConfig.preset(args.preset, seed=args.seed, anatomy=args.anatomy,
                                  times_h=tuple(args.times), reference_index=args.reference_index,
                                  injected_mbq=args.injected_mbq)
    t0 = time.perf_counter()
    series = simulate_series(cfg, progress=TerminalProgress(f"simulate seed {args.seed}"))
    t_sim = time.perf_counter() - t0
    manifest = write_series(series, args.out, overwrite=args.overwrite)
    preview = save_series_preview(series, Path(args.out) / "preview.png")
    print(f"wrote {manifest} and {preview}")
    print(f"simulation {t_sim:.1f} s, writing {time.perf_counter() - t0 - t_sim:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in series.timing_s.items()))
    return 0


def _cmd_tia(args) -> int:
    from TIAMappingLib.pipeline import run_tia_files

    t0 = time.perf_counter()
    outputs = run_tia_files(args.spect, args.times, args.out, segmentation=args.segmentation, ct=args.ct,
                            population_half_life_h=args.stp_half_life, overwrite=args.overwrite)
    for msg in outputs.messages:
        print(f"note: {msg}")
    for row in outputs.voi_rows:
        if row["status"] != "ok":
            print(f"warning: segment '{row['segment']}': {row['status']}")
        else:
            dose = f", mean dose {row['mean_gy']:.2f} Gy" if "mean_gy" in row else ""
            print(f"{row['segment']:>24}: {row['volume_ml']:8.1f} mL, organ TIA {row.get('eq6_tia_mbq_h', float('nan')):10.1f} MBq h,"
                  f" voxel TIA sum {row['voxel_tia_sum_mbq_h']:10.1f} MBq h{dose}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, preset=args.preset, seed=args.seed, anatomy=args.anatomy, overwrite=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corx", description="CoRX: SPECT/CT registration and 177Lu voxel dosimetry")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a serial 177Lu-DOTATATE SPECT/CT series with ground truth")
    s.add_argument("--out", required=True, help="output folder (series.json, volumes, truth/, preview.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--anatomy", choices=["procedural", "patient15"], default="procedural",
                   help="patient15 is the real-anatomy validation phantom: never train on it")
    s.add_argument("--times", type=float, nargs="+", default=[4.0, 24.0, 48.0, 120.0], help="hours after injection")
    s.add_argument("--reference-index", type=int, default=0, help="index of the reference (fixed) time point")
    s.add_argument("--injected-mbq", type=float, default=7400.0)
    s.add_argument("--preset", choices=["clinical", "small"], default="clinical")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("tia", help="TIA, fit-quality, dose maps and VOI tables from registered SPECT volumes")
    t.add_argument("--spect", nargs="+", required=True, help="registered SPECT volumes (Bq/mL, one grid)")
    t.add_argument("--times", type=float, nargs="+", required=True, help="hours after injection, one per SPECT")
    t.add_argument("--segmentation", help="label map or Slicer .seg.nrrd (any grid; resampled onto the SPECT)")
    t.add_argument("--ct", help="CT in HU (any grid) for the mass density of the dose calculation")
    t.add_argument("--stp-half-life", type=float, help="population effective half-life (h) for one time point")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_cmd_tia)

    d = sub.add_parser("demo", help="the main job on a simulated patient, end to end, into an output folder")
    d.add_argument("--out", default="output/demo")
    d.add_argument("--seed", type=int, default=1001)
    d.add_argument("--anatomy", choices=["procedural", "patient15"], default="procedural")
    d.add_argument("--preset", choices=["clinical", "small"], default="clinical")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, GeometryError, ImageFileError, FileNotFoundError, FileExistsError) as exc:
        print(f"corx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
