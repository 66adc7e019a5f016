"""A user's series to dose: every time point registered onto the reference with CoRX, then TIA,
absorbed dose and the VOI table, with standard outputs where the series came from DICOM.

What ``corx dosimetry`` and the batch write (OUT = the output folder)::

    OUT/registration/t<h>h/    per moving time point, as ``corx register`` writes
    OUT/tia/                   tia, fit_rmse, fit_r2, fit_model, dose (NIfTI), voi.csv, dvh.csv,
                               tia_summary.json, voi.json (the VOI table with units)
    OUT/dicom/rtdose.dcm       DICOM input only: the dose as RT Dose on the reference SPECT grid,
                               reference SPECT's Frame of Reference UID
    OUT/dicom/registration_t<h>h.dcm   DICOM input only: each moving time point's SPECT field as a
                               Deformable Spatial Registration (reference <- moving)
    OUT/dosimetry.json         inputs and how their values were converted, hours, registration QA
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from TIAMappingLib.pipeline import TIA_OUTPUTS, compute_tia_outputs, write_tia_outputs
from TIAMappingLib.voi import time_labels
from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION

from .imageio import read_segmentation
from .outputs import OutputSet, write_text


def dicom_output_names(manifest) -> list:
    """The DICOM objects written for a series whose reference SPECT is DICOM (none otherwise: no frame of
    reference to place them on); a registration only for a moving SPECT from DICOM."""
    if not hasattr(manifest.spect_paths[manifest.reference_index], "series"):
        return []
    tags = time_labels(manifest.hours)
    return ["rtdose.dcm"] + [f"registration_t{tags[i]}.dcm" for i in range(len(manifest.hours))
                             if i != manifest.reference_index and hasattr(manifest.spect_paths[i], "series")]


def write_dicom_results(plan: OutputSet, manifest, dose, geometry, fields: dict, prefix: str = "") -> list:
    """RT Dose (with a dose map) and one Deformable Spatial Registration per moving time point
    (``fields``: time index -> SPECT field on the reference SPECT grid) into ``plan`` (names
    :func:`dicom_output_names`, after ``prefix``)."""
    from .dicom_write import write_deformable_registration, write_rt_dose
    ref = manifest.reference_index
    fixed = manifest.spect_paths[ref]
    tags = time_labels(manifest.hours)
    written = []
    if dose is not None:
        written.append(write_rt_dose(plan.path(prefix + "rtdose.dcm"), dose, geometry, fixed.series.header,
                                     f"177Lu dose {manifest.hours[ref]:g} h frame (CoRX)"))
    for i, field in sorted(fields.items()):
        moving = manifest.spect_paths[i]
        if not hasattr(moving, "series"):
            continue
        written.append(write_deformable_registration(
            plan.path(f"{prefix}registration_t{tags[i]}.dcm"), field, geometry, fixed.series, moving.series,
            f"SPECT {manifest.hours[i]:g} h onto {manifest.hours[ref]:g} h (CoRX)"))
    return written


def _segments(manifest, segmentation):
    rel = segmentation or manifest.raw.get("segmentation")
    if not rel:
        return None, None
    path = Path(segmentation) if segmentation else manifest.folder / rel
    return read_segmentation(path)


def run_dosimetry(manifest, out_dir, model="bundled", device="auto", overwrite=False, allow=(),
                  segmentation=None, log=print, pvc=None, integration: str = DEFAULT_INTEGRATION) -> dict:
    """Register, map and write (module text). ``manifest``: a
    :class:`~CoRXRegistrationLib.series_io.SeriesManifest` (files or DICOM); ``segmentation``: a label map or
    .seg.nrrd on any grid (default: the manifest's); ``pvc``: :class:`TIAMappingLib.pvc.PVCSettings`;
    ``integration``: the time integration (:data:`TIAMappingLib.voxel_tia.INTEGRATIONS`). Every output
    is checked before any work."""
    from .series_registration import check_outside_inputs, register_series, registration_summary
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_outside_inputs(out, manifest)
    inputs = manifest.input_files() + ([Path(segmentation)] if segmentation else [])
    tia_plan = OutputSet(out / "tia", [*TIA_OUTPUTS, "voi.json"], inputs=inputs).prepare(overwrite)
    dicom_names = dicom_output_names(manifest)
    dicom_plan = OutputSet(out / "dicom", dicom_names, inputs=inputs).prepare(overwrite) if dicom_names else None
    summary_plan = OutputSet(out, ["dosimetry.json"], inputs=inputs).prepare(overwrite)
    segments, seg_g = _segments(manifest, segmentation)
    sessions = manifest.sessions()
    hours, ref = list(manifest.hours), manifest.reference_index
    log(f"{manifest.patient_id}: {len(hours)} time points {hours} h, reference {hours[ref]:g} h")
    aligned, pairs = register_series(sessions, hours, ref, out / "registration", model=model, device=device,
                                     overwrite=overwrite, protected=inputs, allow=allow)
    ref_g = sessions[ref].spect_geometry
    outputs = compute_tia_outputs(aligned, hours, ref_g, segments, seg_g, np.asarray(sessions[ref].ct, np.float32),
                                  sessions[ref].ct_geometry, allow=allow,
                                  labels=[f"SPECT {h:g} h" for h in hours], ct_label=f"CT {hours[ref]:g} h", pvc=pvc,
                                  integration=integration)
    sources = [str(s) for s in manifest.spect_paths]
    write_tia_outputs(outputs, tia_plan, hours, sources)
    write_text(tia_plan.path("voi.json"), json.dumps({
        "units": {"volume_ml": "mL", "tia": "MBq*h", "dose": "Gy", "activity": "MBq"},
        "times_h": hours, "reference_h": hours[ref], "vois": outputs.voi_rows}, indent=2, default=float))
    written = write_dicom_results(dicom_plan, manifest, outputs.dose, ref_g,
                                  {i: p["field"] for i, p in pairs.items()}) if dicom_plan else []
    report = {"patient_id": manifest.patient_id, "series": str(manifest.path), "hours": hours,
              "reference_index": ref, "injection": manifest.raw.get("injection"), "inputs": manifest.provenance(),
              "notes": list(manifest.raw.get("notes", [])) + outputs.messages,
              "registration": registration_summary(pairs, hours), "dicom_outputs": [str(p) for p in written],
              "seconds": round(time.perf_counter() - t0, 1)}
    write_text(summary_plan.path("dosimetry.json"), json.dumps(report, indent=2, default=str))
    return {"outputs": outputs, "pairs": pairs, "report": report, "dicom": written}
