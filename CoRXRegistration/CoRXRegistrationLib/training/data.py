"""Training data: each patient's series resampled once onto one network grid and stored as a
weights-only ``.pt`` file, so training never touches native volumes again.

A patient file holds (float16 unless noted): ``ct`` (T, Z, Y, X) normalised CT; ``spect_unit``
(T, Z, Y, X) SPECT divided by its maximum (float16 cannot hold Bq/mL); ``spect_max_bq_ml`` (T,);
``field_of_view`` (uint8 (T, Z, Y, X), 1 inside both scans; files packed before it lack it); ``hours``; ``grid`` (geometry dict); ``preprocess`` (dict); for simulated series also
``truth_displacement`` (T, 3, Z, Y, X) network voxels from the reference to each time point, the
field the SPECT follows (it includes the SPECT/CT mismatch), ``truth_displacement_ct`` the same for
the CT (files packed before it lack it), and ``labels`` (uint8, tissue labels on the network grid).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..geometry import Geometry, displacement_lps_to_voxels
from ..preprocess import (PreprocessConfig, field_of_view, network_grid, normalise_ct, normalise_spect,
                          onto_grid)
from ..resample import resample, resample_field

FORMAT = "corx-training-patient/1"


def pack_patient(patient_id: str, sessions: list, hours: list, reference_index: int, cfg: PreprocessConfig,
                 truth_fields: dict | None = None, truth_geometry: Geometry | None = None,
                 labels: np.ndarray | None = None, truth_fields_ct: dict | None = None) -> dict:
    """Resample a series onto the reference session's network grid and pack it (see module doc).
    truth_fields (SPECT), truth_fields_ct: time index -> (Z, Y, X, 3) LPS-mm field on ``truth_geometry``
    (reference -> index)."""
    grid = network_grid(sessions[reference_index], cfg)
    cts, spects, maxima, fovs = [], [], [], []
    for s in sessions:
        ct, spect = onto_grid(s, grid, cfg)
        peak = float(spect.max())
        cts.append(torch.from_numpy(normalise_ct(ct, cfg)).half())
        spects.append(torch.from_numpy(spect / peak).half())
        maxima.append(peak)
        fovs.append(torch.from_numpy(field_of_view(s, grid).astype(np.uint8)))
    packed = {"format": FORMAT, "patient_id": patient_id, "hours": [float(h) for h in hours],
              "reference_index": int(reference_index), "grid": grid.to_dict(), "preprocess": cfg.to_dict(),
              "ct": torch.stack(cts), "spect_unit": torch.stack(spects),
              "spect_max_bq_ml": torch.tensor(maxima, dtype=torch.float64), "field_of_view": torch.stack(fovs)}
    for key, fields_ in (("truth_displacement", truth_fields), ("truth_displacement_ct", truth_fields_ct)):
        if fields_ is None:
            continue
        disp = torch.zeros((len(sessions), 3) + grid.shape, dtype=torch.float16)
        for i, f in fields_.items():
            on_grid = resample_field(f, truth_geometry, grid)
            disp[i] = torch.from_numpy(displacement_lps_to_voxels(on_grid, grid)).half()
        packed[key] = disp
    if labels is not None:
        packed["labels"] = torch.from_numpy(resample(labels, truth_geometry, grid, mode="nearest").astype(np.uint8))
    return packed


def pack_simulated(series, cfg: PreprocessConfig) -> dict:
    """Pack a SimulatedSeries with its ground truth (fields and tissue labels)."""
    sim = series.config
    return pack_patient(f"sim-{sim.anatomy}-{sim.seed:04d}", series.sessions(), list(sim.times_h), sim.reference_index, cfg,
                        series.truth_field_spect, series.reference_spect_geometry, series.labels_spect,
                        series.truth_field_ct)


def save_patient(packed: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(packed, tmp)
    tmp.replace(path)
    return path


def load_patient(path) -> dict:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:                    # truncated, not a torch file, or pickled code
        raise ValueError(f"{path}: cannot be read as a CoRX training patient file "
                         f"({str(exc).strip().splitlines()[0][:200]}); run prepare-data again") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CoRX training patient file ({FORMAT})")
    return d


def session_tensors(patient: dict, index: int, cfg: PreprocessConfig) -> tuple:
    """(CT, SPECT) network inputs (1, 1, Z, Y, X) float32 for one time point of a packed patient."""
    ct = patient["ct"][index].float()[None, None]
    spect = normalise_spect(patient["spect_unit"][index].float().numpy(), cfg)
    return ct, torch.from_numpy(spect)[None, None]


def session_field_of_view(patient: dict, index: int) -> torch.Tensor:
    """(1, 1, Z, Y, X) float32, 1 inside the time point's CT and SPECT fields of view."""
    if "field_of_view" not in patient:
        raise ValueError(f"{patient.get('patient_id', 'patient')}: packed before fields of view were stored; "
                         f"run prepare-data again into a new folder (or train with --loss-mask none)")
    return patient["field_of_view"][index].float()[None, None]


def ordered_pairs(n_points: int) -> list:
    """Every ordered (fixed, moving) pair of distinct time points."""
    return [(f, m) for f in range(n_points) for m in range(n_points) if f != m]
