"""The README's main job on the embedded default: a simulated patient, end to end.

Every time point is registered to the reference with the bundled CoRX model; TIA, dose and VOI
tables are computed from the registered SPECT and set between the two bounds every method sits
between: *no registration* (each SPECT only resampled onto the reference grid) and *ideal
registration* (warped with the simulator's true field). All three are checked against the truth.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from TIAMappingLib.pipeline import compute_tia_outputs, write_tia_outputs
from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION, INTEGRATIONS

from .evaluation import tia_truth_comparison
from .imageio import read_segmentation, write_image
from .outputs import write_text
from .progress import TerminalProgress
from .resample import resample
from .series_registration import check_outside_inputs, register_series, registration_summary, resampled_to_reference
from .simulation import SimulationConfig, simulate_series, write_series
from .simulation.preview import save_series_preview
from .figures import save_demo_figure


def _load_input(input_path, out: Path, overwrite: bool, preset: str, seed: int, anatomy: str) -> dict:
    """The series to run on: the user's own (manifest or folder) or a freshly simulated one."""
    if input_path is not None:
        from .series_io import read_series
        manifest = read_series(input_path)
        check_outside_inputs(out, manifest)
        sessions = [manifest.session(i) for i in range(len(manifest.hours))]
        seg = manifest.raw.get("segmentation")
        segments, seg_g = read_segmentation(manifest.folder / seg) if seg else (None, None)
        return {"sessions": sessions, "times_h": list(manifest.hours), "reference_index": manifest.reference_index,
                "segments": segments, "segmentation_geometry": seg_g, "series": None, "manifest": manifest.path,
                "series_manifest": manifest,
                "title": f"CoRX on {manifest.patient_id}"}
    cfg = SimulationConfig.preset(preset, seed=seed, anatomy=anatomy)
    series = simulate_series(cfg, progress=TerminalProgress("simulate"))
    manifest = write_series(series, out / "series", overwrite=overwrite)
    save_series_preview(series, out / "series" / "preview.png")
    segments, seg_g = series.voi_segmentation()     # the phantom's 2 mm labels: finer than truth/segmentation
    return {"sessions": series.sessions(), "times_h": list(cfg.times_h), "reference_index": cfg.reference_index,
            "segments": segments, "segmentation_geometry": seg_g, "series": series, "manifest": manifest,
            "title": f"CoRX demo: simulated 177Lu-DOTATATE patient (seed {seed}, {anatomy}, {preset})"}


def demo_pvc(method: str, data: dict, out: Path):
    """The demo's partial-volume correction: for a simulated patient, calibrated on the IEC phantom imaged by
    the same (Gaussian) chain into ``out/phantom``; for a user's series, from its manifest (else none)."""
    from TIAMappingLib.pvc import PVCSettings
    if method == "none":
        return PVCSettings()
    if data["series"] is None:
        manifest = data["series_manifest"]
        if manifest.psf_fwhm_mm() is None and manifest.pvc_calibration() is None:
            print("note: no psf_fwhm_mm or pvc_calibration in the series: no partial-volume correction")
            return PVCSettings()
        return PVCSettings.for_series(method, manifest=manifest, n_times=len(data["times_h"]))
    from .pvc_evaluation import phantom_calibration
    cal, path = phantom_calibration("gaussian", out / "phantom")
    return PVCSettings(method, cal.resolution, cal.recovery, str(path))


def run_demo(out_dir, preset="clinical", seed=1001, anatomy="procedural", overwrite=True, model="bundled",
             device="auto", input_path=None, allow=(), pvc: str = "rbv", integration: str = DEFAULT_INTEGRATION) -> dict:
    """Series -> CoRX registration of every time point -> TIA, dose, VOI tables -> report.

    With ``input_path`` (a series.json or its folder) the user's own series is used; a manifest
    may name a ``"segmentation"`` on the reference SPECT frame for VOI tables. Otherwise a patient
    is simulated and every result is also checked against its ground truth, next to *no
    registration* and *ideal registration* (the simulator's true field). ``pvc``: the partial-volume
    correction beside the uncorrected values (:func:`demo_pvc`); ``integration``: the time integration
    (:data:`TIAMappingLib.voxel_tia.INTEGRATIONS`)."""
    out = Path(out_dir)
    timing = {}
    t0 = time.perf_counter()
    data = _load_input(input_path, out, overwrite, preset, seed, anatomy)
    timing["load_or_simulate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    pvc_settings = demo_pvc(pvc if data["segments"] else "none", data, out)
    timing["pvc_calibration"] = time.perf_counter() - t1
    sessions, times_h, ref, series = data["sessions"], data["times_h"], data["reference_index"], data["series"]
    ref_g = sessions[ref].spect_geometry
    t1 = time.perf_counter()
    corx_aligned, pairs = register_series(sessions, times_h, ref, out / "corx_registration" / "registration",
                                          model=model, device=device, overwrite=overwrite, allow=allow)
    timing["corx_registration"] = time.perf_counter() - t1
    methods = {"no_registration": lambda: resampled_to_reference(sessions, ref),
               "corx_registration": lambda: corx_aligned}
    if series is not None:
        methods["ideal_registration"] = lambda: resampled_to_reference(sessions, ref, series.truth_field_spect)
    tables, voi_rows, aligned_by, tia_by = {}, {}, {}, {}
    for key, align in methods.items():
        bar = TerminalProgress(f"TIA ({key.replace('_', ' ')})")
        t1 = time.perf_counter()
        bar(0.0, "align SPECT")
        aligned = aligned_by[key] = align()
        bar(0.3, "voxel TIA, dose, VOIs")
        outputs = compute_tia_outputs(aligned, times_h, ref_g, data["segments"], data["segmentation_geometry"],
                                      np.asarray(sessions[ref].ct, np.float32), sessions[ref].ct_geometry,
                                      allow=allow, pvc=pvc_settings, integration=integration)
        write_tia_outputs(outputs, out / key, list(times_h), [str(data["manifest"])], overwrite=overwrite)
        for i, a in enumerate(aligned):
            write_image(out / key / f"spect_on_reference_{times_h[i]:g}h.nii.gz", a, ref_g)
        voi_rows[key], tia_by[key] = outputs.voi_rows, outputs.tia
        if series is not None:
            tables[key] = tia_truth_comparison(outputs, series)
        timing[f"tia_{key}"] = time.perf_counter() - t1
        bar(1.0, "done")
    report = {"series": str(data["manifest"]), "registration": registration_summary(pairs, times_h, series),
              "vois": tables, "voi_tables": voi_rows, "partial_volume_correction": pvc_settings.to_dict(),
              "time_integration": {"method": integration, "description": INTEGRATIONS[integration]}}
    t1 = time.perf_counter()
    ct_ref_on_spect = resample(np.asarray(sessions[ref].ct, np.float32), sessions[ref].ct_geometry, ref_g,
                               fill=-1000.0)
    kidneys = None
    if data["segments"]:
        kidneys = np.zeros(data["segmentation_geometry"].shape, bool)
        for name, m in data["segments"].items():
            if "kidney" in name:
                kidneys |= m
        if not data["segmentation_geometry"].same_grid(ref_g):
            kidneys = resample(kidneys.astype(np.uint8), data["segmentation_geometry"], ref_g, mode="nearest") > 0
    errors = {k: {v: r["median_abs_voxel_error_pct_vs_psf_truth"] for v, r in t.items()} for k, t in tables.items()}
    save_demo_figure(out / "report.png", ct_hu=ct_ref_on_spect, geometry=ref_g, times_h=times_h,
                     reference_index=ref, spect_unregistered=aligned_by["no_registration"],
                     spect_registered=corx_aligned, fields={i: p["field"] for i, p in pairs.items()},
                     jacobians={i: p["jacobian"] for i, p in pairs.items()}, tia_map=tia_by["corx_registration"],
                     voi_rows=voi_rows["corx_registration"], voi_errors=errors, coronal_mask=kidneys,
                     title=data["title"], footer=_footer(report))
    timing["report"] = time.perf_counter() - t1
    timing["total"] = time.perf_counter() - t0
    report["timing_s"] = {k: round(v, 2) for k, v in timing.items()}
    report["timing_share_pct"] = {k: round(100.0 * v / timing["total"], 1) for k, v in timing.items() if k != "total"}
    write_text(out / "report.json", json.dumps(report, indent=2))
    write_text(out / "report.md", _markdown(report))
    print(_markdown(report))
    return report


def _footer(report: dict) -> str:
    """One line per registered time point: seconds, device and (simulated series) the error."""
    parts = []
    for tp, r in report["registration"].items():
        err = r.get("displacement_error_body")
        extra = f", error {err['mean_mm']:.1f} mm vs {r['identity_error_body']['mean_mm']:.1f} unregistered" \
            if err else ""
        parts.append(f"{tp}: {r['seconds']:.1f} s on {r['device']}{extra}")
    return "CoRX registration (body mean): " + "; ".join(parts)


def _markdown(report: dict) -> str:
    lines = ["# CoRX report", "", f"Series: `{report['series']}`", "", "![report](report.png)", "",
             "## Registration to the reference (CoRX)", ""]
    reg = report.get("registration", {})
    truth = any("displacement_error_body" in r for r in reg.values())
    head = "| time point | s | SPECT LNCC before -> after | SPECT SSIM before -> after | Jacobian <= 0 (%) |"
    if truth:
        head += " displacement error body, mean / p95 (mm) | VOIs mean (mm) | no registration body / VOIs (mm) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for tp, r in reg.items():
        m0, m1 = r["metrics"]["identity"], r["metrics"]["registered"]
        row = (f"| {tp} | {r['seconds']:.1f} | {m0['spect_lncc']:.3f} -> {m1['spect_lncc']:.3f} | "
               f"{m0['spect_ssim']:.3f} -> {m1['spect_ssim']:.3f} | {m1['jacobian_nonpositive_percent']:.3f} |")
        if truth:
            eb, ev, ib, iv = (r["displacement_error_body"], r["displacement_error_vois"], r["identity_error_body"],
                              r["identity_error_vois"])
            row += (f" {eb['mean_mm']:.2f} / {eb['p95_mm']:.2f} | {ev['mean_mm']:.2f} | "
                    f"{ib['mean_mm']:.2f} / {iv['mean_mm']:.2f} |")
        lines.append(row)
    lines.append("")
    integration = report.get("time_integration")
    if integration:
        lines += [f"Time integration of every voxel and VOI curve: **{integration['method']}** "
                  f"({integration['description']}).", ""]
    for key, table in report["vois"].items():
        pvc = report.get("partial_volume_correction", {}).get("method", "none")
        head = ("| VOI | true TIA (MBq h) | voxel TIA sum | error (%) | organ TIA | median voxel error vs "
                "true TIA (%) | vs PSF truth (%) | mean dose (Gy) |")
        if pvc != "none":
            head += f" {pvc}-corrected TIA | error (%) | {pvc} voxel error vs true TIA (%) | warning |"
        lines += [f"## TIA against the truth: {key.replace('_', ' ')}", "", head, "|---|" + "---:|" * (head.count("|") - 2)]
        for name, r in table.items():
            row = (f"| {name} | {r['true_tia_mbq_h']:.0f} | {r['voxel_tia_sum_mbq_h']:.0f} | {r['voi_tia_error_pct']:+.1f} | "
                   f"{r['organ_tia_mbq_h']:.0f} | {r['median_abs_voxel_error_pct_vs_true']:.1f} | "
                   f"{r['median_abs_voxel_error_pct_vs_psf_truth']:.1f} | {r['mean_dose_gy']:.2f} |")
            if pvc != "none":
                row += (f" {r.get('pvc_tia_mbq_h', float('nan')):.0f} | {r.get('pvc_voi_tia_error_pct', float('nan')):+.1f} |"
                        f" {r.get('pvc_median_abs_voxel_error_pct_vs_true', float('nan')):.1f} | {r.get('pvc_warning', '')} |")
            lines.append(row)
        lines.append("")
    if not report["vois"]:
        for key, rows in report.get("voi_tables", {}).items():
            if not rows:
                continue
            lines += [f"## VOIs: {key.replace('_', ' ')}", "",
                      "| VOI | volume (mL) | organ TIA (MBq h) | voxel TIA sum (MBq h) | mean dose (Gy) |",
                      "|---|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r['segment']} | {r['volume_ml']:.1f} | {r.get('organ_tia_mbq_h', float('nan')):.0f} | "
                             f"{r.get('voxel_tia_sum_mbq_h', float('nan')):.0f} | {r.get('mean_gy', float('nan')):.2f} |")
            lines.append("")
    share = report.get("timing_share_pct", {})
    lines += ["## Timing", "", "| step | s | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {share.get(k, 100.0):.0f} % |" for k, v in report["timing_s"].items()]
    lines.append("")
    return "\n".join(lines)
