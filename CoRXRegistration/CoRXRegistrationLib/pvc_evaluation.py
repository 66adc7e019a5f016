"""Partial-volume correction measured against the truth (``corx evaluate-pvc``).

Per simulated series: the SPECT of every time point brought onto the reference grid by the true motion
("ideal" registration) and by CoRX, then VOI TIA without correction and with every correction
(rc, gtm, rbv) against the true VOI TIA, per VOI class (kidneys, liver, spleen, tumours by diameter);
the median voxel TIA error against the *true* TIA (not the PSF-blurred one); and, on the ideal
registration, the sensitivity to the FWHM mis-specified by +-2 mm and to the segmentation shifted by
one SPECT voxel. The FWHM and the recovery curve come from an IEC phantom imaged by the same chain as the
patients and calibrated by :func:`TIAMappingLib.pvc_calibration.calibrate_phantom` — never from the
simulator's own resolution.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .outputs import write_csv, write_text
from .resample import resample, resample_field

PVC_METHODS = ("none", "rc", "gtm", "rbv")
#: The true activity on the reference grid (no PSF, no noise), uncorrected: the error left by the time sampling,
#: the fit and the segmentation on the SPECT grid, which no correction can remove.
TRUE_ACTIVITY = "true activity (no PSF)"
#: The floor rows: the true activity integrated as the uncorrected and rbv values are (voxel TIA sum) and as
#: the rc and gtm values are (the VOI totals integrated in time), both on the SPECT grid; and the true VOI totals
#: (the whole VOI, on the phantom's grid) integrated in time: the error of the time integration alone.
FLOORS = ("true activity: voxel TIA sum (as none, rbv)", "true activity: VOI fit (as rc, gtm)",
          "true VOI totals: time integration alone")
TUMOUR_CLASSES = (("tumours < 2 cm", 0.0, 20.0), ("tumours 2-3 cm", 20.0, 30.0), ("tumours > 3 cm", 30.0, 1e9))


def phantom_calibration(imaging: str, out_dir, scanner: dict | None = None, fwhm_mm: float = 13.0, seed: int = 7):
    """Image the IEC phantom by the patients' chain and calibrate it; the calibration is kept in
    ``out_dir/pvc_calibration_<imaging>.json`` and read back by a later run."""
    from TIAMappingLib.pvc import read_calibration
    from TIAMappingLib.pvc_calibration import calibrate_phantom

    from .simulation.iec_phantom import IECPhantom, image_phantom, phantom_grid, sphere_table
    path = Path(out_dir) / f"pvc_calibration_{imaging}.json"
    if path.is_file():
        return read_calibration(path), path
    phantom = IECPhantom()
    grid = phantom_grid()
    done = image_phantom(phantom, grid, imaging, seed, fwhm_mm=fwhm_mm, scanner=scanner)
    spheres = {r["name"]: done["occupancy"][r["name"]] >= 0.5 for r in sphere_table(phantom)}
    cal = calibrate_phantom(done["spect"], grid, spheres, done["hu"], phantom.background_bq_per_ml * phantom.ratio,
                            phantom.background_bq_per_ml, source=f"IEC phantom, {imaging} imaging")
    write_text(path, json.dumps({**cal.to_dict(), "imaging": done["imaging"]}, indent=1, default=float))
    return read_calibration(path), path


def tumour_class(diameter_mm: float) -> str:
    return next(name for name, lo, hi in TUMOUR_CLASSES if lo <= diameter_mm < hi)


def voi_class(name: str, diameter_mm: float) -> str | None:
    if name.startswith("kidney"):
        return "kidneys"
    if name in ("liver", "spleen"):
        return name
    if name.startswith("tumour"):
        return tumour_class(diameter_mm)
    return None


def aligned_series(series, method: str, runner=None, cfg=None) -> list:
    """Every time point's SPECT on the reference SPECT grid: through the true SPECT motion ("ideal") or
    through the field of ``method`` (a :class:`.evaluation.MethodRunner` method)."""
    from .preprocess import network_grid
    ref, ref_g = series.config.reference_index, series.reference_spect_geometry
    sessions = series.sessions() if method != "ideal" else None
    grid = network_grid(sessions[ref], cfg) if sessions else None
    out = []
    for i in range(len(series.spect)):
        if i == ref:
            out.append(series.spect[i])
            continue
        if method == "ideal":
            field = series.truth_field_spect[i]
        else:
            field = resample_field(runner.run(method, sessions[ref], sessions[i], grid, cfg)[1], grid, ref_g)
        out.append(resample(np.clip(series.spect[i], 0, None), series.spect_geometry[i], ref_g, displacement=field))
    return out


def _shifted(grid, spect_grid):
    """``grid`` moved by one SPECT voxel along the SPECT's x axis (a one-voxel misregistration)."""
    from .geometry import Geometry
    step = spect_grid.direction_matrix[:, 0] * spect_grid.spacing[0]
    return Geometry(grid.shape, grid.spacing, tuple(np.asarray(grid.origin) + step), grid.direction)


def true_voi_totals_mbq(series, names) -> dict:
    """The true activity (MBq) of each VOI at each time point, from the phantom's own labels and curves (the
    grid the true VOI TIA is computed on), so a VOI total is compared with the whole VOI's activity."""
    from .simulation.kinetics import VoxelKinetics
    ph = series.phantom
    kinetics = VoxelKinetics(ph.labels, ph.uptake_scale, ph.washout_scale, series.curves)
    masks = {n: np.isin(ph.labels, series.voi_truth[n]["labels"]) for n in names if n in series.voi_truth}
    out = {n: [] for n in masks}
    for t in series.config.times_h:
        a = kinetics.activity(t)
        for n, m in masks.items():
            out[n].append(float(a[m].sum(dtype=np.float64)) * ph.geometry.voxel_volume_ml / 1e6)
    return out


def _half_counts(images: list, series, grid) -> list:
    """Gaussian-mode images with the noise of half the counts: each voxel's value redrawn as Poisson counts
    around it at the simulator's counts per Bq/mL (V S T), which adds the variance the counts already gave
    (A / (V S T)) and stays non-negative (seeded)."""
    cfg = series.config
    per_bq_ml = grid.voxel_volume_ml * cfg.counts_per_mbq_s * 1e-6 * cfg.acquisition_s
    rng = np.random.default_rng([cfg.seed, 25])
    return [(rng.poisson(np.clip(a, 0, None).astype(np.float64) * per_bq_ml) / per_bq_ml).astype(np.float32)
            for a in images]


def half_counts_series(series, scanner_cache=None):
    """Scanner mode: the same patient, motion and truth imaged with half the acquisition time per view (half
    the counts; new Poisson draws, each reconstructed again: minutes per time point, kept in ``scanner_cache``)."""
    from dataclasses import replace

    from .simulation import simulate_series
    cfg = series.config
    scanner = {**(cfg.scanner or {}), "seconds_per_view": cfg.scanner_config().seconds_per_view / 2.0}
    return simulate_series(replace(cfg, scanner=scanner, scanner_truth_recon=False), scanner_cache=scanner_cache)


def evaluate_pvc_series(series, calibration, registrations: dict, dataset: str, log=print,
                        sensitivity: bool = True, integrations=("washout",), half_counts=None) -> list:
    """Rows (dataset, registration, case, pvc, time integration, voi, class, true/uncorrected/corrected TIA,
    errors); every integration of ``integrations`` (:data:`TIAMappingLib.voxel_tia.INTEGRATIONS`) at the
    calibrated FWHM, the sensitivity cases with the first. ``half_counts``: the SPECT of every time point
    with half the counts, on the reference grid through the true motion (scanner mode,
    :func:`half_counts_series`); Gaussian mode makes its own (:func:`_half_counts`)."""
    from TIAMappingLib.pipeline import compute_tia_outputs
    from TIAMappingLib.pvc import PVCSettings, Resolution

    from TIAMappingLib.voi import time_labels, voi_curve_fits

    from .evaluation import voi_segments
    ref, ref_g = series.config.reference_index, series.reference_spect_geometry
    segments, seg_g = series.voi_segmentation()
    on_spect = voi_segments(series)                  # the voxel errors: on the SPECT grid
    ct = resample(series.ct[ref].astype(np.float32), series.reference_ct_geometry, ref_g, fill=-1000.0)
    diameters = {f"tumour_{i + 1}_{t.kind}": t.diameter_mm for i, t in enumerate(series.phantom.tumours)}
    truth = series.voi_truth
    true_totals = true_voi_totals_mbq(series, list(segments))
    tags = time_labels(series.config.times_h)
    rows = []

    def record(registration, case, pvc, integration, name, value, activity=(), voxel_error=float("nan"),
               warning="", seconds=0.0, condition=float("nan")):
        true = truth[name]["tia_mbq_h"]
        rows.append({"dataset": dataset, "patient": f"{series.config.anatomy}-{series.config.seed}",
                     "registration": registration, "case": case, "pvc": pvc, "integration": integration,
                     "voi": name, "class": voi_class(name, diameters.get(name, 0.0)),
                     "diameter_mm": round(diameters.get(name, float("nan")), 1), "true_tia_mbq_h": true,
                     "tia_mbq_h": value, "error_pct": 100.0 * (value / true - 1.0),
                     "activity_error_pct": float(np.mean(activity)) if len(activity) else float("nan"),
                     "median_voxel_error_pct_vs_true": voxel_error, "warning": warning, "seconds": seconds,
                     "condition": condition})

    def run(case, aligned, registration, pvc_method, resolution, segs_g, integration=integrations[0]):
        settings = PVCSettings(pvc_method, resolution if pvc_method != "none" else None,
                               calibration.recovery if pvc_method == "rc" else None)
        t0 = time.perf_counter()
        out = compute_tia_outputs(aligned, series.config.times_h, ref_g, segments, segs_g, ct, ref_g, pvc=settings,
                                  integration=integration)
        seconds = time.perf_counter() - t0
        tia_map = out.tia_pvc if out.tia_pvc is not None else out.tia
        for row in out.voi_rows:
            name = row["segment"]
            if name not in truth or row["status"] != "ok" or voi_class(name, diameters.get(name, 0.0)) is None:
                continue
            value = row["voxel_tia_sum_mbq_h"] if pvc_method == "none" else row["pvc_tia_mbq_h"]
            key = "total_mbq_" if pvc_method == "none" else "pvc_total_mbq_"
            activity = [100.0 * (row[key + tag] / t - 1.0) for tag, t in zip(tags, true_totals.get(name, [])) if t > 0]
            mask = on_spect[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                vox = np.abs(tia_map[mask] / series.truth_tia[mask] - 1.0)
            if registration == TRUE_ACTIVITY:      # the floors: both ways of integrating, on the true activity
                record(registration, case, FLOORS[1], integration, name, row.get("organ_tia_mbq_h", float("nan")),
                       activity, seconds=seconds)
            record(registration, case, FLOORS[0] if registration == TRUE_ACTIVITY else pvc_method, integration, name,
                   value, activity, float(np.nanmedian(vox) * 100.0) if pvc_method in ("none", "rbv") else float("nan"),
                   row.get("pvc_warning", ""), seconds, out.pvc.condition if out.pvc is not None else float("nan"))

    base = calibration.resolution
    names = [n for n in true_totals if n in truth and voi_class(n, diameters.get(n, 0.0)) is not None]
    for integration in integrations:
        if TRUE_ACTIVITY in registrations and names:       # the time integration alone, on the whole VOIs
            fits = voi_curve_fits(series.config.times_h, np.array([true_totals[n] for n in names]),
                                  integration=integration)
            for name, fit in zip(names, fits):
                record(TRUE_ACTIVITY, "calibrated FWHM", FLOORS[2], integration, name, fit["organ_tia_mbq_h"], [0.0])
        for registration, images in registrations.items():
            for pvc_method in PVC_METHODS if registration != TRUE_ACTIVITY else ("none",):
                run("calibrated FWHM", images, registration, pvc_method, base, seg_g, integration)
            log(f"{dataset}: {registration} done ({integration} integration)")
    if sensitivity and "ideal" in registrations:
        images = registrations["ideal"]
        for delta in (-2.0, 2.0):
            res = Resolution.of(np.asarray(base.fwhm_mm) + delta, f"calibrated {delta:+g} mm")
            for pvc_method in ("gtm", "rbv"):
                run(f"FWHM {delta:+g} mm", images, "ideal", pvc_method, res, seg_g)
        for pvc_method in PVC_METHODS:
            run("segmentation shifted 1 voxel", images, "ideal", pvc_method, base, _shifted(seg_g, ref_g))
        noisy = _half_counts(images, series, ref_g) if series.config.imaging == "gaussian" else half_counts
        if noisy is not None:
            for pvc_method in PVC_METHODS:
                run("half the counts", noisy, "ideal", pvc_method, base, seg_g)
        log(f"{dataset}: sensitivity done")
    return rows


CLASSES = ("kidneys", "liver", "spleen") + tuple(c[0] for c in TUMOUR_CLASSES)


def headline_pvc(rows: list) -> str:
    """Markdown: per protocol and registration (calibrated FWHM), per class the mean VOI activity error over the
    time points (signed, %: what the correction acts on) and the mean |VOI TIA error| (%, against the true TIA:
    what a user reports); then the sensitivity of the mean |activity error| over every VOI (ideal registration)."""
    lines = []
    protocols = list(dict.fromkeys(r["dataset"].split(", ", 1)[-1] for r in rows))
    registrations = [g for g in ("ideal", "corx") if any(r["registration"] == g for r in rows)]
    for protocol in protocols:
        mine = [r for r in rows if r["dataset"].endswith(protocol) and r["case"] == "calibrated FWHM"]
        present = [c for c in CLASSES if any(r["class"] == c for r in mine)]
        lines += [f"**{protocol}** — activity error (signed) / \\|TIA error\\|, %; VOIs in brackets", "",
                  "| registration | correction | " + " | ".join(
                      f"{c} ({len({(r['patient'], r['voi']) for r in mine if r['class'] == c})})" for c in present) + " |",
                  "|---|---|" + "---:|" * len(present)]
        for label, floor_name in (("true VOI totals | time integration alone", FLOORS[2]),
                                  ("true activity | none", FLOORS[0])):
            floor = [r for r in mine if r["pvc"] == floor_name]
            if floor:
                lines.append(f"| {label} | " + " | ".join(
                    f"{np.nanmean([r['activity_error_pct'] for r in floor if r['class'] == c]):+.1f} / "
                    f"{np.mean([abs(r['error_pct']) for r in floor if r['class'] == c]):.1f}" for c in present) + " |")
        for g in registrations:
            for m in PVC_METHODS:
                sel = [r for r in mine if r["registration"] == g and r["pvc"] == m]
                if not sel:
                    continue
                cells = [f"{np.nanmean([r['activity_error_pct'] for r in sel if r['class'] == c]):+.1f} / "
                         f"{np.mean([abs(r['error_pct']) for r in sel if r['class'] == c]):.1f}" for c in present]
                lines.append(f"| {g} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    cases = list(dict.fromkeys(r["case"] for r in rows if r["registration"] == "ideal"))
    if len(cases) > 1:
        lines += ["**Sensitivity** (ideal registration, every protocol): mean \\|activity error\\| over every VOI, %",
                  "", "| case | " + " | ".join(PVC_METHODS) + " |", "|---|" + "---:|" * len(PVC_METHODS)]
        for case in cases:
            cells = []
            for m in PVC_METHODS:
                v = [abs(r["activity_error_pct"]) for r in rows if r["registration"] == "ideal" and r["case"] == case
                     and r["pvc"] == m and np.isfinite(r["activity_error_pct"])]
                cells.append(f"{np.mean(v):.1f}" if v else "-")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compare_integrations(rows: list) -> str:
    """Markdown, when rows hold more than one time integration: per protocol, registration and correction
    (calibrated FWHM), the mean |VOI TIA error| over every VOI for each integration and, against the first,
    how many VOIs each other one makes better / worse."""
    integrations = list(dict.fromkeys(r["integration"] for r in rows))
    if len(integrations) < 2:
        return ""
    first, others = integrations[0], integrations[1:]
    lines = ["| protocol | registration | correction | " + " | ".join(f"{i} (%)" for i in integrations) + " | " +
             " | ".join(f"{first} better / worse than {o}" for o in others) + " |",
             "|---|---|---|" + "---:|" * (len(integrations) + len(others))]
    mine = [r for r in rows if r["case"] == "calibrated FWHM"]
    keys = list(dict.fromkeys((r["dataset"].split(", ", 1)[-1], r["registration"], r["pvc"]) for r in mine))
    for protocol, registration, pvc in keys:
        errors = {i: {(r["patient"], r["dataset"], r["voi"]): abs(r["error_pct"]) for r in mine
                      if r["integration"] == i and r["registration"] == registration and r["pvc"] == pvc
                      and r["dataset"].endswith(protocol)} for i in integrations}
        cells = [f"{np.mean(list(errors[i].values())):.1f}" if errors[i] else "-" for i in integrations]
        for o in others:
            common = errors[first].keys() & errors[o].keys()
            cells.append(f"{sum(errors[first][k] < errors[o][k] for k in common)} / "
                         f"{sum(errors[first][k] > errors[o][k] for k in common)}")
        lines.append(f"| {protocol} | {registration} | {pvc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pvc_report(rows: list, cal, cal_path, header: str, seconds: float) -> str:
    """The whole pvc_report.md: the headline per time integration, every case for the first."""
    from TIAMappingLib.voxel_tia import INTEGRATIONS
    integrations = list(dict.fromkeys(r["integration"] for r in rows))
    lines = ["# CoRX partial-volume correction against the truth", "", header + "; resolution from the "
             f"phantom calibration `{Path(cal_path).name}`: {cal.resolution.describe()}; recovery curve "
             f"{cal.recovery.to_dict() if cal.recovery else '-'}.", "",
             "VOI activity error = corrected (or uncorrected) VOI total / true VOI total - 1, mean over the "
             "time points. VOI TIA error = corrected (or uncorrected voxel-TIA sum) / true VOI TIA - 1; rc and "
             "gtm: the corrected VOI totals integrated in time; rbv: voxel-TIA sum of the corrected map. The "
             "true-activity rows are the floor no correction can go below (time sampling, time integration, "
             "segmentation on the SPECT grid).", "", "## Headline", ""]
    if len(integrations) > 1:
        lines += ["**Time integrations compared**: mean \\|VOI TIA error\\| over every VOI, %", "",
                  compare_integrations(rows)]
    for integration in integrations:
        lines += [f"### Time integration: {integration} ({INTEGRATIONS[integration]})", "",
                  headline_pvc([r for r in rows if r["integration"] == integration])]
    lines += [f"## Every case (time integration: {integrations[0]})", "",
              summarise_pvc([r for r in rows if r["integration"] == integrations[0]]), f"Wall time {seconds:.0f} s.", ""]
    return "\n".join(lines)


def summarise_pvc(rows: list) -> str:
    """Markdown: mean |VOI TIA error| (%) per class and correction, per registration and case; the median
    voxel error against the true TIA; and how many VOIs each correction made worse than uncorrected by > 2 points."""
    classes = ["kidneys", "liver", "spleen"] + [c[0] for c in TUMOUR_CLASSES]
    lines = []
    keys = list(dict.fromkeys((r["dataset"].split(", ", 1)[-1], r["registration"], r["case"]) for r in rows
                              if r["registration"] != TRUE_ACTIVITY))
    for protocol, registration, case in keys:
        mine = [r for r in rows if r["dataset"].endswith(protocol)]
        floor = [r for r in mine if r["registration"] == TRUE_ACTIVITY]
        sel = floor + [r for r in mine if r["registration"] == registration and r["case"] == case]
        methods = [m for m in FLOORS + PVC_METHODS if any(r["pvc"] == m for r in sel)]
        present = [c for c in classes if any(r["class"] == c for r in sel)]
        lines += [f"**{protocol}: {registration} registration, {case}** — VOI TIA error % (mean signed / mean "
                  "|error|) and, after the bar, the mean VOI activity error % over the time points (signed); VOIs per "
                  "class in brackets", "",
                  "| correction | " + " | ".join(f"{c} ({sum(1 for r in sel if r['class'] == c and r['pvc'] == methods[0])})"
                                                 for c in present) + " | median voxel error vs true TIA | worse by > 2 points |",
                  "|---|" + "---:|" * (len(present) + 2)]
        none = {(r["patient"], r["dataset"], r["voi"]): abs(r["error_pct"]) for r in sel if r["pvc"] == "none"}
        for m in methods:
            cells = []
            for c in present:
                e = [r["error_pct"] for r in sel if r["pvc"] == m and r["class"] == c]
                a = [r["activity_error_pct"] for r in sel if r["pvc"] == m and r["class"] == c]
                cells.append(f"{np.mean(e):+.1f} / {np.mean(np.abs(e)):.1f} \\| {np.nanmean(a):+.1f}")
            vox = [r["median_voxel_error_pct_vs_true"] for r in sel if r["pvc"] == m
                   and np.isfinite(r["median_voxel_error_pct_vs_true"])]
            worse = [r for r in sel if r["pvc"] == m and (r["patient"], r["dataset"], r["voi"]) in none
                     and abs(r["error_pct"]) > none[(r["patient"], r["dataset"], r["voi"])] + 2.0]
            n = sum(1 for r in sel if r["pvc"] == m)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.median(vox):.1f} % |" if vox else
                         f"| {m} | " + " | ".join(cells) + " | - |")
            lines[-1] += f" {len(worse)} of {n} |" if m in PVC_METHODS[1:] else " - |"
        lines.append("")
    return "\n".join(lines)


def run_pvc_evaluation(out_dir, seeds=(5000, 5001, 5002), patient15: bool = True, protocols=None,
                       imaging: str = "gaussian", scanner_cache=None, calibration=None, registrations=("ideal", "corx"),
                       model: str = "bundled", preset: str = "clinical", sensitivity: bool = True,
                       integrations=("washout",), log=print) -> dict:
    """The whole PVC comparison; writes pvc_report.md, pvc.csv and pvc_report.json into ``out_dir``.
    ``integrations``: the time integrations compared (the first also in the sensitivity cases).
    ``calibration``: a file from corx calibrate-pvc; None: the IEC phantom imaged like the patients
    (``imaging``) and calibrated here."""
    from TIAMappingLib.pvc import read_calibration

    from .evaluation import PROTOCOLS, MethodRunner
    from .preprocess import PreprocessConfig
    from .simulation import SimulationConfig, simulate_series

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if calibration:
        cal, cal_path = read_calibration(calibration), Path(calibration)
    else:
        cal, cal_path = phantom_calibration(imaging, out)
    log(f"PVC calibration: {cal.resolution.describe()}, {cal_path}")
    runner = MethodRunner({"corx": model}) if any(r != "ideal" for r in registrations) else None
    cfg = runner.models["corx"].preprocess if runner else PreprocessConfig()
    datasets = [("simulated (held out)", "procedural", s) for s in seeds]
    if patient15:
        datasets.append(("patient15 anatomy (external)", "patient15", 0))
    rows = []
    for proto, times in (protocols or PROTOCOLS).items():
        for dataset, anatomy, seed in datasets:
            series = simulate_series(SimulationConfig.preset(preset, seed=int(seed), anatomy=anatomy, times_h=times,
                                                             imaging=imaging), scanner_cache=scanner_cache)
            name = f"{dataset}, {proto}"
            if runner is not None:
                runner.forget()
            images = {TRUE_ACTIVITY: series.truth_activity,
                      **{r: aligned_series(series, r, runner, cfg) for r in registrations}}
            half = None
            if sensitivity and imaging == "scanner" and "ideal" in registrations:
                log(f"{name}: imaging again with half the counts (minutes per time point the first time)")
                half = aligned_series(half_counts_series(series, scanner_cache), "ideal")
            rows += evaluate_pvc_series(series, cal, images, name, log, sensitivity, tuple(integrations), half)
    header = f"Seeds {list(seeds)}{' + patient15' if patient15 else ''}; SPECT imaging {imaging}; preset {preset}"
    report = pvc_report(rows, cal, cal_path, header, time.perf_counter() - t0)
    write_text(out / "pvc_report.md", report)
    write_csv(out / "pvc.csv", list(dict.fromkeys(k for r in rows for k in r)), rows)
    write_text(out / "pvc_report.json", json.dumps({"rows": rows, "calibration": cal.to_dict(), "header": header},
                                                   indent=1, default=float))
    return {"rows": rows, "markdown": report}
