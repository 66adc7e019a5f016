"""From registered SPECT files to TIA, fit-quality, model and dose maps and VOI tables.

This is what ``corx tia`` runs; the Slicer module and the batch script call the same
array-level function :func:`compute_tia_outputs`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CoRXRegistrationLib.geometry import Geometry, GeometryError
from CoRXRegistrationLib.imageio import read_image, read_segmentation, write_image
from CoRXRegistrationLib.progress import check_cancel
from CoRXRegistrationLib.outputs import OutputSet, write_csv, write_text
from CoRXRegistrationLib.resample import resample
from CoRXRegistrationLib.validate import check_ct, check_hours, check_segment_coverage, check_spect

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


def fraction_outside(mask: np.ndarray, mask_geometry: Geometry, target: Geometry) -> float:
    """Fraction of a mask's voxels whose centres lie outside ``target``'s field of view."""
    if mask_geometry.same_grid(target):
        return 0.0
    kji = np.argwhere(mask)
    if not len(kji):
        return 0.0
    ijk = target.lps_to_index(mask_geometry.index_to_lps(kji[:, ::-1].astype(float)))
    size = np.asarray(target.size_xyz, float)
    outside = np.any((ijk < -0.5) | (ijk > size - 0.5), axis=1)
    return float(outside.mean())


def segments_on_grid(segments: dict, seg_geometry: Geometry, target: Geometry, messages: list, allow=(),
                     source: str = "segmentation") -> tuple:
    """Bring masks onto the SPECT grid (nearest neighbour). Returns (name -> mask, name -> fraction of
    the segment outside the SPECT field of view); refuses a segmentation wholly outside it and, unless
    allowed, a segment more than 5 % outside (check ``segment-outside``)."""
    out, outside = {}, {}
    for name, mask in segments.items():
        if seg_geometry.same_grid(target):
            m = mask
        else:
            m = resample(mask.astype(np.uint8), seg_geometry, target, mode="nearest") > 0
        if not mask.any():
            messages.append(f"segment '{name}' is empty")
        out[name] = m
        outside[name] = fraction_outside(mask, seg_geometry, target)
    check_segment_coverage({k: f for k, f in outside.items() if segments[k].any()}, source, allow, messages)
    if not seg_geometry.same_grid(target) and segments:
        messages.append("segmentation resampled onto the SPECT grid (nearest neighbour)")
    return out, outside


def compute_tia_outputs(activities, times_h, geometry: Geometry, segments=None, seg_geometry=None,
                        ct_hu=None, ct_geometry=None, nuclide: Nuclide = LU177,
                        population_half_life_h=None, progress=None, cancel=None, allow=(),
                        labels=None, ct_label: str = "CT", segmentation_label: str = "segmentation") -> TIAOutputs:
    """Everything ``corx tia`` writes, as arrays on the SPECT grid.

    Inputs pass the validation layer first (:mod:`CoRXRegistrationLib.validate`: SPECT in Bq/mL, CT in
    HU, times, segment coverage; ``allow``: checks turned into warnings, kept in ``messages``;
    ``labels``, ``ct_label``, ``segmentation_label``: how to name each SPECT, the CT and the segmentation
    in messages). ``progress(fraction, text)`` is told each step;
    ``cancel() -> bool`` is asked between steps and stops the work with
    :class:`CoRXRegistrationLib.progress.Cancelled`. Needs no torch."""
    def report(fraction, text):
        check_cancel(cancel, f"before {text}")
        if progress is not None:
            progress(fraction, text)

    messages = []
    times = check_times(times_h)
    labels = labels or [f"SPECT at {t:g} h" for t in times]
    check_hours(times, "times", nuclide.half_life_h, allow, messages)
    for a, label in zip(activities, labels):
        check_spect(a, geometry, label, allow, messages)
    if ct_hu is not None:
        check_ct(ct_hu, ct_geometry, ct_label, allow, messages)
    report(0.0, "voxel time-activity fits")
    result = compute_voxel_tia(activities, times_h, nuclide, population_half_life_h=population_half_life_h)
    if result.negative_voxels_clipped:
        messages.append(f"{result.negative_voxels_clipped} slightly negative voxel values (within the tolerance of "
                        "the spect-units check) were set to 0")
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
        masks, outside = segments_on_grid(segments, seg_geometry or geometry, geometry, messages, allow,
                                          segmentation_label)
        rows = voi_table(masks, check_activity_series(activities, times_h)[0], list(result.times_h), geometry.voxel_volume_ml,
                         result.tia, dose, nuclide)
        for row in rows:
            row["outside_fov_percent"] = round(100.0 * outside[row["segment"]], 3)
        if dose is not None:
            for name, m in masks.items():
                if m.any():
                    edges = np.linspace(0.0, float(dose[m].max()) * 1.02 + 1e-9, 101)
                    dvh[name] = (edges, cumulative_dvh(dose[m], edges))
    if progress is not None:
        progress(1.0, "done")
    return TIAOutputs(geometry, result.tia, result.fit_rmse, result.fit_r2, result.model, dose, rows, dvh, messages)


TIA_OUTPUTS = ("tia.nii.gz", "fit_rmse.nii.gz", "fit_r2.nii.gz", "fit_model.nii.gz", "dose.nii.gz", "voi.csv",
               "dvh.csv", "tia_summary.json")


def run_tia_files(spect_paths, times_h, out_dir, segmentation=None, ct=None, population_half_life_h=None,
                  overwrite: bool = False, allow=()) -> TIAOutputs:
    """Read files, compute, write ``tia.nii.gz``, ``fit_rmse.nii.gz``, ``fit_model.nii.gz``,
    ``fit_r2.nii.gz``, ``dose.nii.gz`` (with CT), ``voi.csv`` and ``dvh.csv`` (with segmentation),
    ``tia_summary.json``. The output set is checked before anything is read (no input is ever an
    output; ``overwrite`` replaces the whole earlier set)."""
    times = check_times(times_h)
    if len(spect_paths) != len(times):
        raise TIAInputError(f"{len(spect_paths)} SPECT files but {len(times)} times")
    outputs = OutputSet(out_dir, TIA_OUTPUTS, inputs=[*spect_paths, segmentation, ct]).prepare(overwrite)
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
    result = compute_tia_outputs(activities, times, geometry, segments, seg_geometry, ct_hu, ct_geometry,
                                 population_half_life_h=population_half_life_h, allow=allow,
                                 labels=[f"{p} ({t:g} h)" for p, t in zip(spect_paths, times)],
                                 ct_label=f"CT {ct}", segmentation_label=str(segmentation))
    write_tia_outputs(result, outputs, list(times), [str(p) for p in spect_paths])
    return result


def write_tia_outputs(outputs: TIAOutputs, out, times_h, sources, overwrite=False) -> Path:
    """Write the maps and tables into ``out`` (an :class:`OutputSet` already prepared, or a folder:
    then the set is checked and prepared here)."""
    if not isinstance(out, OutputSet):
        out = OutputSet(out, TIA_OUTPUTS, inputs=sources).prepare(overwrite)
    g = outputs.geometry
    write_image(out.path("tia.nii.gz"), outputs.tia, g)
    write_image(out.path("fit_rmse.nii.gz"), outputs.fit_rmse, g)
    write_image(out.path("fit_r2.nii.gz"), outputs.fit_r2, g)
    write_image(out.path("fit_model.nii.gz"), outputs.fit_model, g)
    if outputs.dose is not None:
        write_image(out.path("dose.nii.gz"), outputs.dose, g)
    if outputs.voi_rows:
        write_csv(out.path("voi.csv"), list(dict.fromkeys(k for row in outputs.voi_rows for k in row)),
                  outputs.voi_rows)
    if outputs.dvh:
        write_csv(out.path("dvh.csv"), ["segment", "dose_gy", "volume_fraction"],
                  [[name, f"{e:.6g}", f"{f:.6g}"] for name, (edges, frac) in outputs.dvh.items()
                   for e, f in zip(edges, frac)])
    write_text(out.path("tia_summary.json"), json.dumps({
        "units": {"tia": "Bq*h/mL", "fit_rmse": "Bq/mL", "dose": "Gy", "voi_tia": "MBq*h"},
        "nuclide": LU177.name, "half_life_h": LU177.half_life_h, "nuclear_data": LU177.source,
        "times_h": times_h, "inputs": sources, "fit_model_codes": MODEL_CODES,
        "messages": outputs.messages}, indent=2))
    return out.folder
