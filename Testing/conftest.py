"""Shared fixtures: a real MRML scene (slicer-core) and a small simulated series."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for module_dir in ("CoRXRegistration", "TIAMapping"):  # the Slicer module files import by module name
    if str(ROOT / module_dir) not in sys.path:
        sys.path.insert(0, str(ROOT / module_dir))


@pytest.fixture
def mrml_scene():
    """A real MRML scene with the volumes and segmentations logics registered; sets slicer.mrmlScene."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield {"scene": scene, "volumes_logic": volumes_logic, "segmentations_logic": seg_logic}
    slicer.mrmlScene = previous
    scene.Clear(1)


@pytest.fixture(scope="session")
def small_series():
    """A noise-free small 4-time-point series (deterministic)."""
    pytest.importorskip("torch", reason="the simulator warps with torch (Slicer 5.8 package set has none)")
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
    cfg = SimulationConfig.preset("small", seed=11, ct_noise_hu=0.0, counts_per_mbq_s=0.0, n_tumours=3)
    return simulate_series(cfg)


@pytest.fixture(scope="session")
def small_series_dir(tmp_path_factory, small_series):
    from CoRXRegistrationLib.simulation import write_series
    out = tmp_path_factory.mktemp("series")
    write_series(small_series, out)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
