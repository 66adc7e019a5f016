"""CoRX registration library: pure Python (numpy, torch, SimpleITK), no Slicer or Qt imports.

Modules: geometry (grids and LPS/RAS conventions), imageio (files), resample (warping),
simulation (serial SPECT/CT with ground truth), cli (the ``corx`` command).
"""
__version__ = "0.1.0"
