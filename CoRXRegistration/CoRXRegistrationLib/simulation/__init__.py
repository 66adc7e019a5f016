"""Serial 177Lu SPECT/CT simulation with exact ground truth (anatomy, kinetics, motion, imaging)."""
from .series import SimulatedSeries, SimulationConfig, simulate_series, write_series

__all__ = ["SimulatedSeries", "SimulationConfig", "simulate_series", "write_series"]
