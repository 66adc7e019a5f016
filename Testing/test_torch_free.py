"""What Slicer gives a module without the PyTorch extension: no torch, no matplotlib.

Each check runs in a fresh interpreter where importing torch or matplotlib raises, as on a fresh
Slicer install. The TIA path (library, ``corx tia``, the TIAMapping Logic) must work there, and the
module files must load. This file also runs under Python 3.9 with Slicer 5.8's package versions
(``make test`` does both); the MRML part needs slicer-core, which has no 3.9 wheel.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "matplotlib"):
                raise ImportError(f"{{name}} is not installed (as in a fresh Slicer)")
    sys.meta_path.insert(0, _NoTorch())
    sys.path[:0] = [{str(ROOT / 'CoRXRegistration')!r}, {str(ROOT / 'TIAMapping')!r}]
""")


def run_blocked(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_the_blocker_blocks(tmp_path):
    done = run_blocked("import torch", tmp_path)
    assert done.returncode != 0 and "not installed" in done.stderr


def test_tia_command_runs_without_torch(tmp_path):
    """`corx tia` end to end (maps, dose, VOI table) in a process that cannot import torch."""
    done = run_blocked("""
        import numpy as np
        from CoRXRegistrationLib.geometry import Geometry
        from CoRXRegistrationLib.imageio import write_image
        from CoRXRegistrationLib.cli import main
        g = Geometry((6, 7, 8), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
        lam = np.log(2) / 60.0
        times = [4.0, 24.0, 48.0, 120.0]
        paths = [str(write_image(f"s{t:g}.nii.gz", np.full(g.shape, 1e5 * np.exp(-lam * t), np.float32), g))
                 for t in times]
        labels = np.zeros(g.shape, np.uint8); labels[2:4, 2:5, 2:6] = 1
        write_image("labels.nii.gz", labels, g)
        write_image("ct.nii.gz", np.zeros(g.shape, np.float32), g)
        code = main(["tia", "--spect", *paths, "--times", *map(str, times), "--segmentation", "labels.nii.gz",
                     "--ct", "ct.nii.gz", "--out", "out",      # uniform test volumes: not a patient's SPECT/CT
                     "--allow", "spect-units", "spect-activity", "ct-units"])
        assert code == 0, code
        import sys
        assert "torch" not in sys.modules and "matplotlib" not in sys.modules
        print("OK")
    """, tmp_path)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "tia_summary.json").read_text())
    assert summary["units"]["tia"] == "Bq*h/mL"
    for name in ("tia.nii.gz", "dose.nii.gz", "voi.csv"):
        assert (tmp_path / "out" / name).is_file(), name


def test_module_files_load_and_tia_logic_runs_without_torch(tmp_path):
    """Slicer imports CoRXRegistration.py and TIAMapping.py at start-up: no torch there. The TIAMapping
    self-test (Logic end to end with a segmentation node), filling the series table from volume
    names and describing the bundled model all work without it."""
    pytest.importorskip("slicer")
    done = run_blocked("""
        import slicer
        scene = slicer.vtkMRMLScene()
        logics = [slicer.vtkSlicerVolumesLogic(), slicer.vtkSlicerSegmentationsModuleLogic()]
        for logic in logics:
            logic.SetMRMLScene(scene)
        slicer.mrmlScene = scene
        import CoRXRegistration, TIAMapping
        TIAMapping.TIAMappingTest().runTest()
        import numpy as np
        from CoRXRegistrationLib.geometry import Geometry
        g = Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        for name in ("CT 4h", "SPECT 4h", "CT 24h", "SPECT 24h"):
            CoRXRegistration.addVolumeNode(np.zeros(g.shape, np.float32), g, name)
        found, source = CoRXRegistration.CoRXRegistrationLogic().seriesFromScene()
        assert [h for h, _, _ in found] == [4.0, 24.0] and source == "volume names", found
        assert CoRXRegistration.describeModel("").startswith("bundled")
        import sys
        assert "torch" not in sys.modules and "matplotlib" not in sys.modules
        print("OK")
    """, tmp_path)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("version", ["3.9", "3.12"])
def test_every_module_and_lib_file_compiles_under_slicers_pythons(version):
    """Slicer 5.8 runs Python 3.9, Slicer >= 5.10 Python 3.12: no syntax either cannot read."""
    import shutil
    candidates = sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    candidates += [shutil.which(f"python{version}")]
    python = next((c for c in candidates if c and subprocess.run([c, "--version"], capture_output=True).returncode == 0),
                  None)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    files = [str(p) for module in ("CoRXRegistration", "TIAMapping") for p in (ROOT / module).rglob("*.py")]
    code = ("import sys\nbad=[]\nfor f in sys.argv[1:]:\n    try: compile(open(f).read(), f, 'exec')\n"
            "    except SyntaxError as e: bad.append(f'{f}:{e.lineno}: {e.msg}')\nprint('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([python, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
