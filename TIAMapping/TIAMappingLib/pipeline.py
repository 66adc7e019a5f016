"""From registered SPECT files to TIA, fit-quality, model and dose maps and VOI tables.

This is what ``corx tia`` runs; the Slicer module and the batch script call the same
array-level function :func:`compute_tia_outputs`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CoRXRegistrationLib.geometry import Geometry, GeometryError
from CoRXRegistrationLib.imageio import read_image, read_segmentation, write_image
from CoRXRegistrationLib.progress import check_cancel
from CoRXRegistrationLib.resample import resample

from .dose import cumulative_dvh, hu_to_density, local_deposition_dose
from .nuclides import LU177, Nuclide
from .voi import voi_table
from .voxel_tia import MODEL_CODES, TIAInputError, check_activity_series, check_times, compute_voxel_tia


@dataclass
class TIAOutputs:
    geometry: Geometry
    tia: np.ndarray
    fit_rmse: np.ndarray
    fit_r2: np.ndarray
    fit_model: np.ndarray
    dose: np.ndarray | None
    voi_rows: list
    dvh: dict                       # segment -> (bin edges Gy, fraction)
    messages: list = field(default_factory=list)


def segments_on_grid(segments: dict, seg_geometry: Geometry, target: Geometry, messages: list) -> dict:
    """Bring masks onto the SPECT grid (nearest neighbour) and report empty/outside segments."""
    out = {}
    for name, mask in segments.items():
        if seg_geometry.same_grid(target):
            m = mask
        else:
            m = resample(mask.astype(np.uint8), seg_geometry, target, mode="nearest") > 0
        if not mask.any():
            messages.append(f"segment '{name}' is empty")
        elif not m.any():
            messages.append(f"segment '{name}' lies outside the SPECT field of view")
        out[name] = m
    if not seg_geometry.same_grid(target) and segments:
        messages.append("segmentation resampled onto the SPECT grid (nearest neighbour)")
    return out


def compute_tia_outputs(activities, times_h, geometry: Geometry, segments=None, seg_geometry=None,
                        ct_hu=None, ct_geometry=None, nuclide: Nuclide = LU177,
                        population_half_life_h=None, progress=None, cancel=None) -> TIAOutputs:
    """Everything ``corx tia`` writes, as arrays on the SPECT grid.

    ``progress(fraction, text)`` is told each step; ``cancel() -> bool`` is asked between steps and
    stops the work with :class:`CoRXRegistrationLib.progress.Cancelled`. Needs no torch."""
    def report(fraction, text):
        check_cancel(cancel, f"before {text}")
        if progress is not None:
            progress(fraction, text)

    messages = []
    report(0.0, "voxel time-activity fits")
    result = compute_voxel_tia(activities, times_h, nuclide, population_half_life_h=population_half_life_h)
    if result.negative_voxels_clipped:
        messages.append(f"{result.negative_voxels_clipped} negative voxel values (interpolation undershoot) "
                        "were set to 0")
    dose = None
    if ct_hu is not None:
        report(0.6, "absorbed dose")
        ct_on_spect = resample(ct_hu, ct_geometry, geometry, fill=-1000.0) if not ct_geometry.same_grid(geometry) \
            else np.asarray(ct_hu, np.float32)
        dose, n_light = local_deposition_dose(result.tia, hu_to_density(ct_on_spect), nuclide)
        if n_light:
            messages.append(f"{n_light} voxels with activity but density < 0.1 g/mL (air) get no local dose")
    rows, dvh = [], {}
    if segments:
        report(0.8, "VOI tables")
        masks = segments_on_grid(segments, seg_geometry or geometry, geometry, messages)
        rows = voi_table(masks, check_activity_series(activities, times_h)[0], list(result.times_h), geometry.voxel_volume_ml,
                         result.tia, dose, nuclide)
        if dose is not None:
            for name, m in masks.items():
                if m.any():
                    edges = np.linspace(0.0, float(dose[m].max()) * 1.02 + 1e-9, 101)
                    dvh[name] = (edges, cumulative_dvh(dose[m], edges))
    if progress is not None:
        progress(1.0, "done")
    return TIAOutputs(geometry, result.tia, result.fit_rmse, result.fit_r2, result.model, dose, rows, dvh, messages)


def run_tia_files(spect_paths, times_h, out_dir, segmentation=None, ct=None, population_half_life_h=None,
                  overwrite: bool = False) -> TIAOutputs:
    """Read files, compute, write ``tia.nii.gz``, ``fit_rmse.nii.gz``, ``fit_model.nii.gz``,
    ``fit_r2.nii.gz``, ``dose.nii.gz`` (with CT), ``voi.csv`` and ``dvh.csv`` (with segmentation)."""
    times = check_times(times_h)
    if len(spect_paths) != len(times):
        raise TIAInputError(f"{len(spect_paths)} SPECT files but {len(times)} times")
    activities, geometry = [], None
    for path, t_h in zip(spect_paths, times):
        a, g = read_image(path)
        if geometry is None:
            geometry = g
        elif not g.same_grid(geometry):
            raise GeometryError(f"{path} ({t_h:g} h) is on a different grid than {spect_paths[0]}: "
                                f"{g.describe()} vs {geometry.describe()}; register the series first")
        activities.append(a)
    segments = seg_geometry = ct_hu = ct_geometry = None
    if segmentation:
        segments, seg_geometry = read_segmentation(segmentation)
        if not segments:
            raise TIAInputError(f"{segmentation}: no segment found (all voxels are 0)")
    if ct:
        ct_hu, ct_geometry = read_image(ct)
    outputs = compute_tia_outputs(activities, times, geometry, segments, seg_geometry, ct_hu, ct_geometry,
                                  population_half_life_h=population_half_life_h)
    write_tia_outputs(outputs, out_dir, list(times), [str(p) for p in spect_paths], overwrite)
    return outputs


def write_tia_outputs(outputs: TIAOutputs, out_dir, times_h, sources, overwrite=False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "tia.nii.gz"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out folder or pass --overwrite")
    g = outputs.geometry
    write_image(target, outputs.tia, g)
    write_image(out / "fit_rmse.nii.gz", outputs.fit_rmse, g)
    write_image(out / "fit_r2.nii.gz", outputs.fit_r2, g)
    write_image(out / "fit_model.nii.gz", outputs.fit_model, g)
    if outputs.dose is not None:
        write_image(out / "dose.nii.gz", outputs.dose, g)
    if outputs.voi_rows:
        keys = list(dict.fromkeys(k for row in outputs.voi_rows for k in row))
        with open(out / "voi.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(outputs.voi_rows)
    if outputs.dvh:
        with open(out / "dvh.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["segment", "dose_gy", "volume_fraction"])
            for name, (edges, frac) in outputs.dvh.items():
                writer.writerows([name, f"{e:.6g}", f"{f:.6g}"] for e, f in zip(edges, frac))
    (out / "tia_summary.json").write_text(json.dumps({
        "units": {"tia": "Bq*h/mL", "fit_rmse": "Bq/mL", "dose": "Gy", "voi_tia": "MBq*h"},
        "nuclide": LU177.name, "half_life_h": LU177.half_life_h, "nuclear_data": LU177.source,
        "times_h": times_h, "inputs": sources, "fit_model_codes": MODEL_CODES,
        "messages": outputs.messages}, indent=2))
    return out
