"""CoRX registration library: pure Python (numpy, torch, SimpleITK), no Slicer or Qt imports.

Modules: geometry (grids and LPS/RAS conventions), imageio (files), resample (warping),
simulation (serial SPECT/CT with ground truth), cli (the ``corx`` command).
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

#: The bundled CoRX weights; their model card is the same name with ``.json`` (and ``.md``). Defined
#: here, without torch, so the Slicer panel can describe the model before PyTorch is installed.
BUNDLED_MODEL = _Path(__file__).resolve().parent.parent / "Resources" / "Models" / "corx-bundled.pt"
