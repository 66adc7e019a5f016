"""Build a training-data folder: simulated patients (procedural anatomies) or the user's own series."""
from __future__ import annotations

import time
from pathlib import Path

from ..outputs import OutputSet
from ..preprocess import PreprocessConfig
from ..series_io import find_series
from .data import pack_patient, pack_simulated, save_patient


def prepare_simulated(out_dir, seeds, preset: str = "clinical", cfg: PreprocessConfig = PreprocessConfig(),
                      log=print) -> list:
    """Simulate one procedural patient per seed and pack it (with truth) as ``sim-XXXX.pt``; ``preset``
    "randomised" draws each patient's settings (:mod:`simulation.randomised`, for supervised training).
    Existing files are kept, so an interrupted preparation continues where it stopped."""
    from ..simulation import SimulationConfig, simulate_series
    from ..simulation.randomised import randomised_config

    written = []
    for seed in seeds:
        path = Path(out_dir) / f"sim-{seed:04d}.pt"
        if not path.is_file():
            t = time.perf_counter()
            sim = randomised_config(int(seed)) if preset == "randomised" else \
                SimulationConfig.preset(preset, seed=int(seed))
            series = simulate_series(sim)
            save_patient(pack_simulated(series, cfg), path)
            log(f"{path.name}: {time.perf_counter() - t:.1f} s")
        written.append(path)
    return written


def prepare_series(out_dir, root, cfg: PreprocessConfig = PreprocessConfig(), log=print,
                   overwrite: bool = False) -> list:
    """Pack every series manifest under ``root`` (the user's own unlabeled data; no truth) as
    ``<patient_id>.pt``; every file is checked before any work (an existing one is replaced only with
    ``overwrite``)."""
    manifests = find_series(root)
    plan = OutputSet(out_dir, [f"{m.patient_id}.pt" for m in manifests],
                     inputs=[f for m in manifests for f in (m.path, *m.ct_paths, *m.spect_paths)]).prepare(overwrite)
    written = []
    for manifest in manifests:
        sessions = [manifest.session(i) for i in range(len(manifest.hours))]
        path = plan.path(f"{manifest.patient_id}.pt")
        save_patient(pack_patient(manifest.patient_id, sessions, manifest.hours, manifest.reference_index, cfg), path)
        log(f"{path.name}: {len(sessions)} time points")
        written.append(path)
    return written
