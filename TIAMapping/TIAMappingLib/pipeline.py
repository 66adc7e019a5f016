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

from .dose import cumulative_dvh, dose_statistics, hu_to_density, local_deposition_dose
from .kernel_dose import kernel_dose
from .nuclides import LU177, Nuclide
from .pvc import PVCError, PVCResult, PVCSettings, correct_series, make_regions
from .voi import time_labels, voi_curve_fits, voi_table
from .voxel_tia import (DEFAULT_INTEGRATION, INTEGRATIONS, MODEL_CODES, TIAInputError, check_activity_series,
                        check_integration, check_times, compute_voxel_tia)


@dataclass
class TIAOutputs:
    geometry: Geometry
    tia: np.ndarray
    fit_rmse: np.ndarray
    fit_r2: np.ndarray
    fit_model: np.ndarray
    dose: np.ndarray | None
    voi_rows: list
    dvh: dict                       # segment -> (bin edges Gy, {"local" | "kernel" | "local_pvc": fraction})
    messages: list = field(default_factory=list)
    pvc: PVCResult | None = None    # partial-volume correction (None: not asked)
    tia_pvc: np.ndarray | None = None      # rbv: voxel TIA of the corrected SPECT (Bq h/mL)
    dose_pvc: np.ndarray | None = None     # rbv with CT: its dose (Gy)
    dose_kernel: np.ndarray | None = None  # with CT: dose-voxel-kernel convolution (Gy)
    integration: str = DEFAULT_INTEGRATION  # how the curves were integrated (voxel_tia.INTEGRATIONS)


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
                        labels=None, ct_label: str = "CT", segmentation_label: str = "segmentation",
                        pvc: PVCSettings | None = None, integration: str = DEFAULT_INTEGRATION) -> TIAOutputs:
    """Everything ``corx tia`` writes, as arrays on the SPECT grid.

    Inputs pass the validation layer first (:mod:`CoRXRegistrationLib.validate`: SPECT in Bq/mL, CT in
    HU, times, segment coverage; ``allow``: checks turned into warnings, kept in ``messages``;
    ``labels``, ``ct_label``, ``segmentation_label``: how to name each SPECT, the CT and the segmentation
    in messages). ``pvc``: partial-volume correction of the VOI values (and, with ``rbv``, of the maps:
    :mod:`.pvc`); it needs the segmentation. ``integration``: how voxel and VOI curves are integrated in
    time, "washout" or "eq6" (:mod:`.voxel_tia`). ``progress(fraction, text)`` is told each step;
    ``cancel() -> bool`` is asked between steps and stops the work with
    :class:`CoRXRegistrationLib.progress.Cancelled`. Needs no torch."""
    def report(fraction, text):
        check_cancel(cancel, f"before {text}")
        if progress is not None:
            progress(fraction, text)

    messages = []
    times = check_times(times_h)
    check_integration(integration)
    labels = labels or [f"SPECT at {t:g} h" for t in times]
    check_hours(times, "times", nuclide.half_life_h, allow, messages)
    for a, label in zip(activities, labels):
        check_spect(a, geometry, label, allow, messages)
    if ct_hu is not None:
        check_ct(ct_hu, ct_geometry, ct_label, allow, messages)
    correcting = pvc is not None and pvc.method != "none"
    if correcting and not segments:
        raise PVCError(f"partial-volume correction ({pvc.method}) needs a segmentation of the VOIs")
    resolutions = pvc.resolutions(len(times)) if correcting else None
    report(0.0, "voxel time-activity fits")
    result = compute_voxel_tia(activities, times_h, nuclide, population_half_life_h=population_half_life_h,
                               integration=integration)
    if result.negative_voxels_clipped:
        messages.append(f"{result.negative_voxels_clipped} slightly negative voxel values (within the tolerance of "
                        "the spect-units check) were set to 0")
    dose = density = dose_k = None
    if ct_hu is not None:
        report(0.5, "absorbed dose")
        ct_on_spect = resample(ct_hu, ct_geometry, geometry, fill=-1000.0) if not ct_geometry.same_grid(geometry) \
            else np.asarray(ct_hu, np.float32)
        density = hu_to_density(ct_on_spect)
        dose, n_light = local_deposition_dose(result.tia, density, nuclide)
        if n_light:
            messages.append(f"{n_light} voxels with activity but density < 0.1 g/mL (air) get no local dose")
        dose_k = kernel_dose(result.tia, geometry, density) if nuclide is LU177 else None
    rows, dvh, corrected, tia_pvc, dose_pvc = [], {}, None, None, None
    if segments:
        report(0.6, "VOI tables")
        masks, outside = segments_on_grid(segments, seg_geometry or geometry, geometry, messages, allow,
                                          segmentation_label)
        stack = check_activity_series(activities, times_h)[0]
        rows = voi_table(masks, stack, list(result.times_h), geometry.voxel_volume_ml, result.tia, dose, nuclide,
                         integration)
        for row in rows:
            row["outside_fov_percent"] = round(100.0 * outside[row["segment"]], 3)
            m = masks[row["segment"]]
            if dose_k is not None and m.any():
                row.update({f"{k}_kernel": v for k, v in dose_statistics(dose_k[m]).items()})
        if correcting:
            report(0.7, f"partial-volume correction ({pvc.method})")
            regions = make_regions(segments, seg_geometry or geometry, geometry,
                                   body_hu=None if ct_hu is None else ct_on_spect)
            corrected = correct_series(list(stack), geometry, regions, pvc.method, resolutions, pvc.recovery)
            if corrected.corrected_images is not None:
                tia_pvc = compute_voxel_tia(corrected.corrected_images, times_h, nuclide,
                                            population_half_life_h=population_half_life_h,
                                            integration=integration).tia
                if density is not None:
                    dose_pvc = local_deposition_dose(tia_pvc, density, nuclide)[0]
            add_pvc_columns(rows, corrected, list(result.times_h), tia_pvc, dose_pvc, nuclide, integration)
            messages += [f"segment '{name}': {w}" for name, ws in corrected.warnings.items() for w in ws]
        if dose is not None:
            maps = {"local": dose, "kernel": dose_k, "local_pvc": dose_pvc}
            for name, m in masks.items():
                if m.any():
                    top = max(float(d[m].max()) for d in maps.values() if d is not None)
                    edges = np.linspace(0.0, top * 1.02 + 1e-9, 101)
                    dvh[name] = (edges, {k: cumulative_dvh(d[m], edges) for k, d in maps.items() if d is not None})
    if progress is not None:
        progress(1.0, "done")
    return TIAOutputs(geometry, result.tia, result.fit_rmse, result.fit_r2, result.model, dose, rows, dvh, messages,
                      corrected, tia_pvc, dose_pvc, dose_k, integration)


def add_pvc_columns(rows: list, corrected: PVCResult, times_h, tia_pvc=None, dose_pvc=None, nuclide=LU177,
                    integration: str = DEFAULT_INTEGRATION) -> None:
    """Add the corrected values to the VOI rows: per time point the corrected total (MBq), the corrected VOI TIA
    (``pvc_tia_mbq_h``: rc/gtm the corrected totals integrated by ``integration``, rbv the voxel-TIA sum of the corrected
    map), the factor against the uncorrected voxel-TIA sum, the recovery, the noise gain and the warnings."""
    regions = corrected.regions
    index = {name: s for s, name in enumerate(regions.segments)}
    tags = time_labels(times_h)
    fits = voi_curve_fits(times_h, corrected.segment_totals_mbq.T, nuclide, integration)
    volumes = regions.segment_volume_ml()
    for row in rows:
        s = index.get(row["segment"])
        if s is None:
            continue
        row["pvc"] = corrected.method
        row["pvc_fwhm_mm"] = round(float(np.mean([r.mean_mm for r in corrected.resolutions])), 3)
        row["pvc_volume_ml"] = float(volumes[s])
        for t, tag in enumerate(tags):
            row[f"pvc_total_mbq_{tag}"] = float(corrected.segment_totals_mbq[t, s])
        if tia_pvc is not None:
            fraction = regions.segment_fraction(s)
            row["pvc_tia_mbq_h"] = float((fraction * tia_pvc).sum(dtype=np.float64) * regions.voxel_volume_ml / 1e6)
            if dose_pvc is not None:
                inside = fraction >= 0.5
                row.update({f"{k}_pvc": v for k, v in dose_statistics(dose_pvc[inside]).items()})
        else:
            row["pvc_tia_mbq_h"] = fits[s].get("organ_tia_mbq_h", float("nan"))
        uncorrected = row.get("voxel_tia_sum_mbq_h", float("nan"))
        row["pvc_factor"] = row["pvc_tia_mbq_h"] / uncorrected if uncorrected else float("nan")
        row["pvc_recovery"] = float(np.nanmean(corrected.segment_recovery[:, s]))
        if corrected.noise_gain is not None:
            row["pvc_noise_gain"] = float(corrected.noise_gain[s])
        row["pvc_warning"] = "; ".join(corrected.warnings.get(row["segment"], []))


#: At most this many time points get a partial-volume-corrected SPECT file (spect_pvc_<n>.nii.gz).
MAX_PVC_TIME_POINTS = 16
TIA_OUTPUTS = ("tia.nii.gz", "fit_rmse.nii.gz", "fit_r2.nii.gz", "fit_model.nii.gz", "dose.nii.gz",
               "dose_kernel.nii.gz", "voi.csv",
               "dvh.csv", "tia_summary.json", "tia_pvc.nii.gz", "dose_pvc.nii.gz",
               *(f"spect_pvc_{n}.nii.gz" for n in range(1, MAX_PVC_TIME_POINTS + 1)))


def run_tia_files(spect_paths, times_h, out_dir, segmentation=None, ct=None, population_half_life_h=None,
                  overwrite: bool = False, allow=(), pvc: PVCSettings | None = None,
                  integration: str = DEFAULT_INTEGRATION) -> TIAOutputs:
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
                                 ct_label=f"CT {ct}", segmentation_label=str(segmentation), pvc=pvc,
                                 integration=integration)
    write_tia_outputs(result, outputs, list(times), [str(p) for p in spect_paths])
    return result


def pvc_record(corrected: PVCResult | None, times_h) -> dict:
    """What the correction did, for tia_summary.json."""
    if corrected is None:
        return {"method": "none"}
    rec = {"method": corrected.method, "model": "stationary Gaussian PSF; " + {
               "rc": "VOI mean / recovery coefficient of a sphere of the VOI's volume",
               "gtm": "geometric transfer matrix (Rousset 1998) over the segments and background",
               "rbv": "region-based voxel-wise correction (Thomas 2011), regional totals from GTM"}[corrected.method],
           "resolution": [r.to_dict() for r in corrected.resolutions], "regions": corrected.regions.names,
           "warnings": corrected.warnings}
    if corrected.condition is not None:
        rec["transfer_matrix_condition"] = corrected.condition
    if corrected.corrected_images is not None:
        rec["corrected_spect_files"] = {f"spect_pvc_{n}.nii.gz": t for n, t in enumerate(times_h, start=1)
                                        if n <= MAX_PVC_TIME_POINTS}
    return rec


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
    if outputs.dose_kernel is not None:
        write_image(out.path("dose_kernel.nii.gz"), outputs.dose_kernel, g)
    if outputs.tia_pvc is not None:
        write_image(out.path("tia_pvc.nii.gz"), outputs.tia_pvc, g)
        for n, image in enumerate(outputs.pvc.corrected_images[:MAX_PVC_TIME_POINTS], start=1):
            write_image(out.path(f"spect_pvc_{n}.nii.gz"), image, g)
    if outputs.dose_pvc is not None:
        write_image(out.path("dose_pvc.nii.gz"), outputs.dose_pvc, g)
    if outputs.voi_rows:
        write_csv(out.path("voi.csv"), list(dict.fromkeys(k for row in outputs.voi_rows for k in row)),
                  outputs.voi_rows)
    if outputs.dvh:
        kinds = list(dict.fromkeys(k for _, fractions in outputs.dvh.values() for k in fractions))
        column = {"local": "volume_fraction", "kernel": "volume_fraction_kernel", "local_pvc": "volume_fraction_pvc"}
        write_csv(out.path("dvh.csv"), ["segment", "dose_gy"] + [column[k] for k in kinds],
                  [[name, f"{e:.6g}"] + [f"{fractions[k][n]:.6g}" if k in fractions else "" for k in kinds]
                   for name, (edges, fractions) in outputs.dvh.items() for n, e in enumerate(edges)])
    write_text(out.path("tia_summary.json"), json.dumps({
        "units": {"tia": "Bq*h/mL", "fit_rmse": "Bq/mL", "dose": "Gy", "voi_tia": "MBq*h"},
        "dose_methods": {"dose": "local deposition of the electron energy (photons escape)",
                         "dose_kernel": "177Lu dose-voxel kernel (ICRP soft tissue, 4.7952 mm, PyTheranostics 0.1 "
                                        "data), scaled by 1/density; other grids resampled to the kernel's and back"},
        "nuclide": LU177.name, "half_life_h": LU177.half_life_h, "nuclear_data": LU177.source,
        "times_h": times_h, "inputs": sources, "fit_model_codes": MODEL_CODES,
        "time_integration": {"method": outputs.integration, "description": INTEGRATIONS[outputs.integration]},
        "partial_volume_correction": pvc_record(outputs.pvc, times_h),
        "messages": outputs.messages}, indent=2))
    return out.folder
