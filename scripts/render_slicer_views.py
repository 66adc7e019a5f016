"""Render what the CoRX Registration panel leaves in Slicer's slice views, with Slicer's own slice logic
(slicer-core), for one simulated pair: the reference-vs-moving SPECT fusion before and after
registration, the Jacobian with its colour table and the RGB deformation volume. Writes
docs/slicer_views.png (and prints where the uptake sits before and after).

    .venv/bin/python scripts/render_slicer_views.py [--seed 1001] [--out docs/slicer_views.png]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CoRXRegistration"), str(ROOT / "TIAMapping")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1001, help="simulated patient (the demo's by default)")
    parser.add_argument("--moving-index", type=int, default=1, help="time point registered onto the first")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "slicer_views.png")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer

    scene = slicer.vtkMRMLScene()
    keep = [slicer.vtkSlicerVolumesLogic(), slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in keep:
        logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    import CoRXRegistration as reg
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series

    s = simulate_series(SimulationConfig.preset("clinical", seed=args.seed))
    i, times = args.moving_index, s.config.times_h
    cts = [reg.addVolumeNode(s.ct[k].astype(np.float32), s.ct_geometry[k], f"CT {times[k]:g}h") for k in (0, i)]
    spects = [reg.addVolumeNode(s.spect[k], s.spect_geometry[k], f"SPECT {times[k]:g}h") for k in (0, i)]
    out = reg.CoRXRegistrationLogic().registerSeries(cts, spects, [times[0], times[i]], 0, device="cpu")
    pair = out["pairs"][times[i]]
    reg._applicationLogic()
    reg.CoRXRegistrationLogic.styleFusion(spects[0], spects[1])
    reg.CoRXRegistrationLogic.styleFusion(spects[0], pair["deformedSPECT"])
    # a coronal slice through the hottest part of the reference SPECT (kidneys / tumours)
    ref = slicer.util.arrayFromVolume(spects[0])
    hot = np.argwhere(ref >= np.percentile(ref, 99.5)).mean(axis=0)          # (k, j, i)
    ras = reg.lps_to_ras(s.spect_geometry[0].index_to_lps(hot[::-1]))
    size = (300, 300)
    panels = [("before: reference SPECT (grey) + moving SPECT (heat)",
               reg.renderSliceView(spects[0], spects[1], 0.5, "Coronal", ras[1], size)),
              ("after CoRX: reference + deformed SPECT",
               reg.renderSliceView(spects[0], pair["deformedSPECT"], 0.5, "Coronal", ras[1], size)),
              ("Jacobian (blue < 1 < red, black = folding)",
               reg.renderSliceView(pair["jacobian"], None, 0.0, "Coronal", ras[1], size)),
              ("deformation RGB (R L-R, G A-P, B I-S; grey = none)",
               reg.renderSliceView(pair["deformationRGB"], None, 0.0, "Coronal", ras[1], size))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    m = pair["result"].metrics
    fig.suptitle(f"CoRX Registration in Slicer's slice views (slicer-core slice logic): simulated patient seed "
                 f"{args.seed}, {times[i]:g} h onto {times[0]:g} h; SPECT LNCC {m['identity']['spect_lncc']:.3f} -> "
                 f"{m['registered']['spect_lncc']:.3f}, Jacobian <= 0: "
                 f"{pair['jacobian'].GetAttribute('CoRX.FoldedPercent')} %", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}; SPECT LNCC {m['identity']['spect_lncc']:.4f} -> {m['registered']['spect_lncc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
