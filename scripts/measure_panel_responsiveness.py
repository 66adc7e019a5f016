"""How the registration panel feels: one clinical-size simulated pair registered through the Logic as the
panel runs it (computation on a worker thread, the GUI thread pumping every 50 ms), measured on
slicer-core. Prints the longest gap between two GUI pumps and how long Cancel takes to stop the run
when pressed at different moments (median and worst), next to the same registration run directly.

    .venv/bin/python scripts/measure_panel_responsiveness.py [--seed 3]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CoRXRegistration"), str(ROOT / "TIAMapping")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    import slicer
    scene = slicer.vtkMRMLScene()
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    import CoRXRegistration as reg
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
    s = simulate_series(SimulationConfig.preset("clinical", seed=args.seed))
    cts = [reg.addVolumeNode(s.ct[k].astype(np.float32), s.ct_geometry[k], f"CT {k}") for k in (0, 1)]
    spects = [reg.addVolumeNode(s.spect[k], s.spect_geometry[k], f"SPECT {k}") for k in (0, 1)]
    logic, hours = reg.CoRXRegistrationLogic(), [4.0, 24.0]

    t0 = time.perf_counter()
    logic.registerSeries(cts, spects, hours, device="cpu")
    direct = time.perf_counter() - t0
    pumps = []
    t0 = time.perf_counter()
    logic.registerSeries(cts, spects, hours, device="cpu",
                         runner=lambda c: reg.runKeepingGUIAlive(c, lambda: pumps.append(time.perf_counter())))
    threaded = time.perf_counter() - t0
    gaps = np.diff([t0] + pumps)
    latencies = []
    for at in np.arange(0.5, 0.9 * threaded, 0.5):
        start = time.perf_counter()
        out = logic.registerSeries(cts, spects, hours, device="cpu",
                                   cancel=lambda at=at, start=start: time.perf_counter() - start > at,
                                   runner=lambda c: reg.runKeepingGUIAlive(c, lambda: None))
        assert out["cancelled"], at
        latencies.append(time.perf_counter() - start - at)
    print("| what | value |\n|---|---:|")
    print(f"| one pair, Logic called directly (s) | {direct:.2f} |")
    print(f"| one pair, panel runner (worker thread + 50 ms pumps) (s) | {threaded:.2f} |")
    print(f"| GUI pumps during it | {len(pumps)} |")
    print(f"| longest gap between GUI pumps (s) | {gaps.max():.3f} |")
    print(f"| Cancel to stop, median / worst over {len(latencies)} moments (s) | "
          f"{np.median(latencies):.2f} / {max(latencies):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
