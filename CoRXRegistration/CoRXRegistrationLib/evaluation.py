"""Side-by-side evaluation of registration methods on simulated series with ground truth.

Every method registers the same (reference, moving) pairs of the same series in one process:
identity, Elastix (paper settings, CT-driven, via itk-elastix), TransMorph (CT only), CoRX without
cross-stitch, CoRX without its SPECT/CT offset, CoRX, CoRX + instance refinement; beside them the
truth rows, the simulator's true motion put on the network grid (the bound no field there can beat).
Each method yields a field for the CT and one for the SPECT (LPS mm, resampling convention) on the
network grid of the reference time point; they differ only for the methods that fit the SPECT/CT
offset (the CoRX rows but "corx-no-offset"). Everything after that is common:
the paper's metrics on the network grid (CT L1, CT SSIM, min-max SPECT SSIM, SPECT LNCC,
% Jacobian <= 0), displacement error against the true SPECT and CT fields in the body, organs and
tumours (mm, on the reference SPECT grid), and the TIA maps each method's registration gives
against the true TIA.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .geometry import displacement_lps_to_voxels
from .network.metrics import jacobian_determinant, registration_metrics
from .network.spect_offset import SpectOffsetConfig
from .network.transform import warp
from .baselines import CT_DRIVEN, POST_FIT, ROW_ORDER, ROWS, TRUTH_ROWS, base_method
from .benchmark import PeakMemory
from .outputs import write_csv, write_text
from .preprocess import PreprocessConfig, SpectCt, metric_images, network_grid, normalise_ct, onto_grid
from .resample import resample, resample_field

#: Methods with one field for CT and SPECT that need no network.
CLASSICAL = ("identity",) + tuple(m for m in CT_DRIVEN if m not in TRUTH_ROWS) + ("elastix-ct-spect",)


def displacement_error_map_mm(field_lps_mm: np.ndarray, truth_lps_mm: np.ndarray) -> np.ndarray:
    """|u - u_true| per voxel (mm, float64); both fields on one grid."""
    if field_lps_mm.shape != truth_lps_mm.shape:
        raise ValueError(f"field {field_lps_mm.shape} and truth {truth_lps_mm.shape} are on different grids")
    return np.linalg.norm(np.asarray(field_lps_mm, np.float64) - truth_lps_mm, axis=-1)


def error_statistics_mm(error_map_mm: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and 95th percentile of an error map (mm) inside ``mask``."""
    m = np.asarray(mask, bool)
    if not m.any():
        raise ValueError("empty mask: no voxels to measure the displacement error in")
    err = error_map_mm[m]
    return {"mean_mm": float(err.mean()), "p95_mm": float(np.percentile(err, 95)), "voxels": int(m.sum())}


def displacement_error_mm(field_lps_mm: np.ndarray, truth_lps_mm: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and 95th percentile of |u - u_true| (mm) inside ``mask``; both fields on one grid."""
    return error_statistics_mm(displacement_error_map_mm(field_lps_mm, truth_lps_mm), mask)


def region_errors_mm(field_lps_mm: np.ndarray, truth_lps_mm: np.ndarray, masks: dict) -> dict:
    """|u - u_true| (mm) in each mask: name -> :func:`error_statistics_mm`; both fields on one grid."""
    error = displacement_error_map_mm(field_lps_mm, truth_lps_mm)
    return {name: error_statistics_mm(error, mask) for name, mask in masks.items()}


def truth_masks(series) -> dict:
    """Body, organ and tumour masks on the reference SPECT grid."""
    vois = series.phantom.voi_labels()
    organs = [c for n, codes in vois.items() if not n.startswith("tumour") for c in codes]
    tumours = [c for n, codes in vois.items() if n.startswith("tumour") for c in codes]
    masks = {"body": series.labels_spect > 0, "organs": np.isin(series.labels_spect, organs)}
    if tumours and np.isin(series.labels_spect, tumours).any():
        masks["tumours"] = np.isin(series.labels_spect, tumours)
    return masks


def warped_label_dice(series, index: int, field_spect: np.ndarray) -> dict:
    """Dice of each VOI between the reference labels and the session's own labels pulled onto the
    reference SPECT grid through ``field_spect`` (nearest neighbour). The true field itself scores
    below 1 where two nearest-neighbour resamplings on the SPECT grid shift boundaries."""
    warped = resample(series.labels_session_spect[index], series.spect_geometry[index],
                      series.reference_spect_geometry, displacement=field_spect, mode="nearest")
    out = {}
    for name, codes in series.phantom.voi_labels().items():
        a, b = np.isin(series.labels_spect, codes), np.isin(warped, codes)
        total = int(a.sum()) + int(b.sum())
        out[name] = 2.0 * float((a & b).sum()) / total if total else float("nan")
    return out


def voi_segments(series) -> dict:
    return {name: np.isin(series.labels_spect, codes) for name, codes in series.phantom.voi_labels().items()}


class MethodRunner:
    """Produces each method's fields on the network grid (LPS mm) for one pair, with the seconds and
    peak memory it took. A CT-driven field is kept for the pair's post-fit row ("ants-syn+fit"), whose
    time is the base method's plus the fit's."""

    def __init__(self, models: dict, elastix_iterations: int = 1000, refine_iterations: int = 20,
                 device: str = "auto", elastix_resolutions: int = 4, threads: int | None = None):
        from .engine import load_model
        self.models = {k: load_model(v) for k, v in models.items()}
        self.elastix_iterations, self.refine_iterations, self.device = elastix_iterations, refine_iterations, device
        self.elastix_resolutions, self.threads = elastix_resolutions, threads
        self.wanted = set(ROW_ORDER)       # the rows of this run (evaluate_series sets it)
        self._kept = {}          # (base method, pair) -> (fixed, moving, field, seconds, peak MB), until its
        #                          post-fit row uses it (evaluate_series forgets the rest at each series)

    @staticmethod
    def model_key(method: str) -> str:
        """The model a network method runs (corx-refine and corx-no-offset run the corx model)."""
        return "corx" if method in ("corx-refine", "corx-no-offset") else method

    def skipped(self) -> dict:
        """method -> why it cannot run here (a missing optional package or checkpoint)."""
        from .baselines.ants import ants_available
        from .baselines.elastix import elastix_available
        out = {}
        for reason, methods in ((elastix_available(), ("elastix", "elastix-masked", "elastix-dd", "elastix-ct-spect")),
                                (ants_available(), ("ants-syn",))):
            if reason:
                out.update({m: reason for m in methods})
        for method in ("transmorph", "corx-nocs"):
            if method not in self.models:
                out[method] = f"no {method} checkpoint given"
        if "corx" not in self.models:
            out.update({m: "no CoRX model given" for m in ("corx", "corx-no-offset", "corx-refine")})
        elif self.refine_iterations <= 0:
            out["corx-refine"] = "refinement iterations set to 0"
        for b in CT_DRIVEN:                  # a post-fit row needs its base method, and CoRX's preprocessing
            if b in out or "corx" not in self.models:
                out[b + POST_FIT] = out.get(b, "no CoRX model given (the fit is CoRX's)")
        return out

    def available(self) -> list:
        skipped = self.skipped()
        return [m for m in ROW_ORDER if m not in skipped]

    def spect_offset(self, method: str) -> bool:
        """Whether a network method's SPECT field includes the SPECT/CT offset (the engine's default
        for a model that reads the SPECT; never for corx-no-offset)."""
        return method != "corx-no-offset" and self.models[self.model_key(method)].reads_spect

    def forget(self) -> None:
        """Drop the kept CT-driven fields, so the next post-fit row measures its base method again."""
        self._kept = {}

    def keep(self, method: str, fixed: SpectCt, moving: SpectCt, field: np.ndarray, seconds: float,
             peak_mb: float) -> None:
        """Keep a CT-driven field of this pair (measured or read back) for its post-fit row, when that
        row will run (:attr:`wanted`)."""
        if method in CT_DRIVEN and method + POST_FIT in self.wanted:
            self._kept[(method, id(fixed), id(moving))] = (fixed, moving, field, seconds, peak_mb)

    def run(self, method: str, fixed: SpectCt, moving: SpectCt, grid, cfg: PreprocessConfig, truth=None) -> tuple:
        """(what the CT follows, what the SPECT follows, seconds, peak MB); one array twice for
        methods whose one field moves both, so the caller converts and stores it once. ``truth``: the
        pair's true (CT, SPECT) fields on ``grid``, LPS mm, for the rows of :data:`TRUTH_ROWS`."""
        base = base_method(method)
        kept = self._kept.pop((base, id(fixed), id(moving)), None) if base != method else None
        if kept is not None and kept[0] is fixed and kept[1] is moving:       # used once, then dropped
            field, base_s, base_mb = kept[2:]
        else:
            t0 = time.perf_counter()
            with PeakMemory() as memory:
                field, field_spect = self.fields(base, fixed, moving, grid, cfg, truth)
            base_s, base_mb = time.perf_counter() - t0, memory.peak_mb
            if base == method:
                self.keep(method, fixed, moving, field, base_s, base_mb)
                return field, field_spect, base_s, base_mb
        from .engine import fit_spect_to_field
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            field_spect, _, _ = fit_spect_to_field(fixed, moving, field, grid, cfg)
        return field, field_spect, base_s + time.perf_counter() - t0, float(np.nanmax([base_mb, memory.peak_mb]))

    def fields(self, method: str, fixed: SpectCt, moving: SpectCt, grid, cfg: PreprocessConfig, truth=None) -> tuple:
        """(what the CT follows, what the SPECT follows) of a method without a post-fit; one array twice
        for methods whose one field moves both (``truth``: see :meth:`run`)."""
        if method in TRUTH_ROWS:
            if truth is None:
                raise ValueError(f"the {method} row needs the pair's true fields (a simulated series)")
            return (truth[0], truth[0]) if method == "truth-ct" else truth
        if method in CLASSICAL:
            field = self._classical_field(method, fixed, moving, grid, cfg)
            return field, field
        from .engine import register
        key = self.model_key(method)
        refine = self.refine_iterations if method == "corx-refine" else 0
        result = register(fixed, moving, model=self.models[key], device=self.device, refine_iterations=refine,
                          native_outputs=False, qa_metrics=False,   # metrics are computed alike for every method
                          spect_offset=self.spect_offset(method))
        if not result.grid.same_grid(grid):
            raise ValueError(f"model '{key}' uses another network grid ({result.grid.describe()}) than the "
                             f"evaluation ({grid.describe()}); evaluate models with one preprocessing together")
        if not self.spect_offset(method) and result.spect_correction_mm is None:
            return result.field_network, result.field_network
        return result.field_network, result.field_network_spect

    def _classical_field(self, method: str, fixed: SpectCt, moving: SpectCt, grid, cfg: PreprocessConfig):
        if method == "identity":
            return np.zeros(grid.shape + (3,), np.float32)
        if method == "rigid":
            from .geometry import displacement_voxels_to_lps
            from .network.rigid import rigid_prealign
            fixed_ct, moving_ct = (torch.from_numpy(normalise_ct(onto_grid(s, grid, cfg)[0], cfg))[None, None]
                                   for s in (fixed, moving))
            u, _ = rigid_prealign(fixed_ct, moving_ct, cfg.body_level)
            return displacement_voxels_to_lps(u[0].numpy(), grid)
        (fixed_ct, fixed_spect), (moving_ct, moving_spect) = onto_grid(fixed, grid, cfg), onto_grid(moving, grid, cfg)
        if method == "ants-syn":
            from .baselines.ants import ants_register_ct
            return ants_register_ct(fixed_ct, moving_ct, grid)
        from .baselines import elastix
        common = dict(iterations=self.elastix_iterations, resolutions=self.elastix_resolutions, threads=self.threads)
        if method == "elastix-ct-spect":
            return elastix.elastix_register_ct_spect(fixed_ct, moving_ct, fixed_spect, moving_spect, grid, **common)
        if method in ("elastix", "elastix-masked", "elastix-dd"):
            from .network.rigid import RigidConfig, field_of_view_band
            mask = None
            if method == "elastix-masked":
                band = field_of_view_band(torch.from_numpy(normalise_ct(fixed_ct, cfg))[None, None], cfg.body_level,
                                          RigidConfig().margin_voxels)
                mask = band[0, 0].numpy() > 0
            step = "DisplacementDistribution" if method == "elastix-dd" else "Original"
            return elastix.elastix_register_ct(fixed_ct, moving_ct, grid, fixed_mask=mask, step_estimation=step,
                                               **common)
        raise ValueError(f"unknown method {method!r}")


def _metric_tensors(session: SpectCt, grid, cfg: PreprocessConfig) -> tuple:
    return tuple(torch.from_numpy(a)[None, None] for a in metric_images(*onto_grid(session, grid, cfg)))


def _resumed_fields(path, settings: str):
    """(CT field, SPECT field, seconds, peak MB) stored by an earlier run with the same ``settings``, or None."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["settings"]) != settings:
                return None
            field_ct = z["field"]
            field_spect = z["field_spect"] if "field_spect" in z.files else field_ct   # CT-driven: one array
            return field_ct, field_spect, float(z["seconds"]), float(z["peak_memory_mb"])
    except (OSError, ValueError, KeyError):          # a file cut short by the interruption: measure again
        return None


def _store_fields(path, settings: str, field_ct: np.ndarray, field_spect: np.ndarray, seconds: float,
                  peak_mb: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    spect = {} if field_spect is field_ct else {"field_spect": field_spect.astype(np.float32)}
    np.savez(partial, settings=np.array(settings), field=field_ct.astype(np.float32), seconds=np.float64(seconds),
             peak_memory_mb=np.float64(peak_mb), **spect)
    partial.replace(path)                            # whole or absent, never half-written


def evaluate_series(series, runner: MethodRunner, methods: list, cfg: PreprocessConfig, dataset: str,
                    log=print, figure_path=None, resume_dir=None, resume_settings: dict | None = None,
                    resume_min_seconds: float = 30.0) -> tuple:
    """Register every moving time point to the reference with every method; returns (pair rows, TIA rows).
    With ``figure_path``, draws the last moving time point for every method (:func:`figures.save_methods_figure`).
    With ``resume_dir``, a field that took at least ``resume_min_seconds`` is stored there with its seconds
    and peak memory, and read back instead of recomputed by a later run with the same settings for that
    method (``resume_settings``: method -> string, see :func:`resume_settings`; a method without one is
    neither stored nor read; the row then has ``resumed`` True), so a long run can be interrupted and continued."""
    from TIAMappingLib.pipeline import compute_tia_outputs

    sessions = series.sessions()
    ref = series.config.reference_index
    ref_g = series.reference_spect_geometry
    grid = network_grid(sessions[ref], cfg)
    images = [_metric_tensors(s, grid, cfg) for s in sessions]
    masks = truth_masks(series)
    segments = voi_segments(series)
    voi_masks = {VOI_ERROR + name: mask for name, mask in segments.items() if mask.any()}   # row keys, VOIs present
    patient = f"{series.config.anatomy}-{series.config.seed}"
    runner.forget()
    runner.wanted = set(methods)
    pair_rows, tia_rows = [], []
    shown = max(i for i in range(len(sessions)) if i != ref)
    figure = {"warped": {}, "fields": {}, "jacobians": {}}
    for method in methods:
        aligned = []
        for i, h in enumerate(series.config.times_h):
            if i == ref:
                aligned.append(series.spect[i])
                continue
            settings = (resume_settings or {}).get(method)
            stored = None if resume_dir is None or settings is None else Path(resume_dir) / f"{method}_{h:g}h.npz"
            resumed = _resumed_fields(stored, settings)
            if resumed is not None:
                field_ct, field, seconds, peak_mb = resumed
                runner.keep(method, sessions[ref], sessions[i], field_ct, seconds, peak_mb)
            else:
                truth = None
                if base_method(method) in TRUTH_ROWS:         # the true motion as a field of the network grid
                    truth = tuple(resample_field(t[i], ref_g, grid)
                                  for t in (series.truth_field_ct, series.truth_field_spect))
                field_ct, field, seconds, peak_mb = runner.run(method, sessions[ref], sessions[i], grid, cfg, truth)
                if stored is not None and seconds >= resume_min_seconds:
                    _store_fields(stored, settings, field_ct, field, seconds, peak_mb)
            one_field = field_ct is field              # CT-driven methods (no offset): convert and resample once
            disp = torch.from_numpy(displacement_lps_to_voxels(field, grid))[None]
            disp_ct = disp if one_field else torch.from_numpy(displacement_lps_to_voxels(field_ct, grid))[None]
            (fct, fsp), (mct, msp) = images[ref], images[i]
            row = {"dataset": dataset, "patient": patient, "moving_h": h, "method": method, "seconds": seconds,
                   "peak_memory_mb": peak_mb, "resumed": resumed is not None,
                   **registration_metrics(fct, warp(mct, disp_ct), fsp, warp(msp, disp), disp_ct)}
            field_spect = resample_field(field, grid, ref_g)
            if series.labels_session_spect:
                dice = warped_label_dice(series, i, field_spect)
                for group, names in (("organs", [n for n in dice if not n.startswith("tumour")]),
                                     ("tumours", [n for n in dice if n.startswith("tumour")])):
                    values = [dice[n] for n in names if np.isfinite(dice[n])]
                    row[f"dice_{group}_mean"] = float(np.mean(values)) if values else float("nan")
            field_ct_ref = field_spect if one_field else resample_field(field_ct, grid, ref_g)
            errors = {"spect": region_errors_mm(field_spect, series.truth_field_spect[i], masks | voi_masks),
                      "ct": region_errors_mm(field_ct_ref, series.truth_field_ct[i], masks)}
            for truth_name, stats in errors.items():
                for mask_name in masks:
                    row[f"{truth_name}_error_{mask_name}_mean_mm"] = stats[mask_name]["mean_mm"]
                    row[f"{truth_name}_error_{mask_name}_p95_mm"] = stats[mask_name]["p95_mm"]
            for name in voi_masks:                   # per VOI: where a method gains or loses against rigid
                row[name + "_mean_mm"] = errors["spect"][name]["mean_mm"]
            pair_rows.append(row)
            aligned.append(resample(np.clip(series.spect[i], 0, None), series.spect_geometry[i], ref_g,
                                    displacement=field_spect))
            if i == shown:
                figure["warped"][method], figure["fields"][method] = aligned[-1], field_spect
                vox = torch.from_numpy(displacement_lps_to_voxels(field_spect, ref_g))
                figure["jacobians"][method] = jacobian_determinant(vox)[0].numpy()
            log(f"{dataset} {patient} {h:g} h {method}: {seconds:.1f} s{' (resumed)' if resumed else ''}, "
                f"SPECT error body {row['spect_error_body_mean_mm']:.2f} mm, LNCC {row['spect_lncc']:.4f}")
        outputs = compute_tia_outputs(aligned, series.config.times_h, ref_g, segments, ref_g)
        for name, r in tia_truth_comparison(outputs, series).items():
            tia_rows.append({"dataset": dataset, "patient": patient, "method": method, "voi": name, **r})
    if figure_path is not None:
        from .figures import save_methods_figure
        ct = resample(series.ct[ref].astype(np.float32), series.reference_ct_geometry, ref_g, fill=-1000.0)
        save_methods_figure(figure_path, ct_hu=ct, geometry=ref_g, fixed_spect=series.spect[ref],
                            moving_spect=resample(np.clip(series.spect[shown], 0, None), series.spect_geometry[shown],
                                                  ref_g),
                            profile_voxel=_largest_tumour_centre(series), title=f"{dataset}: {patient}, "
                            f"{series.config.times_h[shown]:g} h -> {series.config.times_h[ref]:g} h", **figure)
    return pair_rows, tia_rows


def _largest_tumour_centre(series):
    """(z, y, x) voxel of the largest tumour's centre on the reference SPECT grid (else the liver's, else None)."""
    vois = series.phantom.voi_labels()
    best = None
    for name, codes in vois.items():
        mask = np.isin(series.labels_spect, codes)
        rank = (name.startswith("tumour"), int(mask.sum()))
        if mask.any() and (name.startswith("tumour") or name == "liver") and (best is None or rank > best[0]):
            best = (rank, tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0)))
    return best[1] if best else None


def tia_truth_comparison(outputs, series) -> dict:
    """Per VOI: voxel-TIA sum and organ TIA vs the true VOI TIA, median voxel error vs the true TIA and vs
    the PSF-blurred true TIA, the median voxel fit RMSE; with a partial-volume correction its VOI TIA and
    error (and, with a corrected map, its median voxel error vs the true TIA)."""
    truth = series.voi_truth
    table = {}
    for row in outputs.voi_rows:
        name = row["segment"]
        if name not in truth or row["status"] != "ok":
            continue
        true_tia = truth[name]["tia_mbq_h"]
        mask = np.isin(series.labels_spect, truth[name]["labels"])
        with np.errstate(divide="ignore", invalid="ignore"):
            vox_err = np.abs(outputs.tia[mask] / series.truth_tia_psf[mask] - 1.0)
            vox_true = np.abs(outputs.tia[mask] / series.truth_tia[mask] - 1.0)
        extra = {}
        if "pvc_tia_mbq_h" in row:
            extra = {"pvc": row["pvc"], "pvc_tia_mbq_h": round(row["pvc_tia_mbq_h"], 1),
                     "pvc_voi_tia_error_pct": round(100.0 * (row["pvc_tia_mbq_h"] / true_tia - 1.0), 2),
                     "pvc_warning": row.get("pvc_warning", "")}
            if outputs.tia_pvc is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    e = np.abs(outputs.tia_pvc[mask] / series.truth_tia[mask] - 1.0)
                extra["pvc_median_abs_voxel_error_pct_vs_true"] = round(float(np.nanmedian(e) * 100), 2)
        table[name] = {"true_tia_mbq_h": round(true_tia, 1),
                       "voxel_tia_sum_mbq_h": round(row["voxel_tia_sum_mbq_h"], 1),
                       "organ_tia_mbq_h": round(row.get("organ_tia_mbq_h", float("nan")), 1),
                       "voi_tia_error_pct": round(100.0 * (row["voxel_tia_sum_mbq_h"] / true_tia - 1.0), 2),
                       "median_abs_voxel_error_pct_vs_psf_truth": round(float(np.nanmedian(vox_err) * 100), 2),
                       "median_abs_voxel_error_pct_vs_true": round(float(np.nanmedian(vox_true) * 100), 2),
                       "median_fit_rmse_bq_ml": round(float(np.median(outputs.fit_rmse[mask])), 1),
                       "mean_dose_gy": round(row.get("mean_gy", float("nan")), 3), **extra}
    return table


# The paper's two imaging protocols (its Table 1): SNUH 4, 24, 48, 120 h (training and internal test) and
# SMC 0.5, 4, 24, 48 h (external validation); the first time point is the fixed reference.
PROTOCOL_SITES = {"snuh": ("4, 24, 48, 120 h (paper's SNUH protocol)", (4.0, 24.0, 48.0, 120.0)),
                  "smc": ("0.5, 4, 24, 48 h (paper's SMC protocol)", (0.5, 4.0, 24.0, 48.0))}
PROTOCOLS = dict(PROTOCOL_SITES.values())       # name -> hours, the run's default
PAIR_COLUMNS = [("ct_l1", "CT L1"), ("ct_ssim", "CT SSIM"), ("spect_ssim", "SPECT SSIM"), ("spect_lncc", "SPECT LNCC"),
                ("jacobian_nonpositive_percent", "% Jacobian <= 0"),
                ("spect_error_body_mean_mm", "SPECT-field error body (mm)"),
                ("spect_error_organs_mean_mm", "organs (mm)"), ("spect_error_tumours_mean_mm", "tumours (mm)"),
                ("spect_error_organs_p95_mm", "organs p95 (mm)"), ("ct_error_body_mean_mm", "CT-field error body (mm)"),
                ("dice_organs_mean", "Dice organs"), ("dice_tumours_mean", "Dice tumours"),
                ("seconds", "s / pair"), ("peak_memory_mb", "peak memory (MB)")]


def _mean_sd(values) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not v.size:
        return "-"
    return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if v.size > 1 else f"{v.mean():.4g}"


VOI_ERROR = "spect_error_voi_"       # pair-row keys VOI_ERROR + <voi> + "_mean_mm"


def _class_error(row: dict, names: list):
    """Mean of the row's per-VOI SPECT-field errors (mm) over ``names``; None where it has none."""
    values = [row[f"{VOI_ERROR}{n}_mean_mm"] for n in names if f"{VOI_ERROR}{n}_mean_mm" in row]
    return float(np.mean(values)) if values else None


def _voi_groups(vois) -> dict:
    """VOI names by the classes the tables report (kidneys, liver, spleen, bladder, tumours); empty classes dropped."""
    vois = sorted(vois)
    groups = {"kidneys": [v for v in vois if v.startswith("kidney")], "liver": [v for v in vois if v == "liver"],
              "spleen": [v for v in vois if v == "spleen"], "bladder": [v for v in vois if v == "bladder"],
              "tumours": [v for v in vois if v.startswith("tumour")]}
    return {k: v for k, v in groups.items() if v}


#: The speed column's reference: the strongest classical baseline present (ANTs SyN first).
SPEED_REFERENCES = ("ants-syn", "elastix-dd", "elastix", "elastix-masked")

#: The paired comparison: CoRX against each of these rows present, over the pairs both ran.
PAIRED_AGAINST = ("corx-no-offset", "rigid+fit", "ants-syn", "ants-syn+fit", "elastix-dd+fit", "elastix-ct-spect")
PAIRED_ERRORS = (("spect_error_body_mean_mm", "body"), ("spect_error_organs_mean_mm", "organs"),
                 ("spect_error_tumours_mean_mm", "tumours"))


def paired_differences(rows: list, method: str, other: str, key: str) -> np.ndarray:
    """Per pair present for both methods: ``method``'s value of ``key`` minus ``other``'s."""
    by_pair = {}
    for r in rows:
        if r["method"] in (method, other) and r.get(key) is not None and np.isfinite(r[key]):
            by_pair.setdefault((r["dataset"], r["patient"], r["moving_h"]), {})[r["method"]] = r[key]
    return np.asarray([v[method] - v[other] for v in by_pair.values() if len(v) == 2], float)


def paired_table(rows: list, methods: list, method: str = "corx") -> list:
    """Markdown lines: ``method`` minus each row of :data:`PAIRED_AGAINST` in SPECT-field error (mm), per
    pair: mean ± standard error and wins/losses (negative = ``method`` better); empty without ``method``."""
    others = [m for m in PAIRED_AGAINST if m in methods and m != method]
    if method not in methods or not others or not any(r["method"] == method for r in rows):
        return []
    out = [f"Paired over pairs, {method} minus each row (SPECT-field error, mm; mean ± SE; wins/losses of "
           f"{method}):", "", "| against | " + " | ".join(name for _, name in PAIRED_ERRORS) + " |",
           "|---|" + "---:|" * len(PAIRED_ERRORS)]
    for other in others:
        cells = []
        for key, _ in PAIRED_ERRORS:
            d = paired_differences(rows, method, other, key)
            if not d.size:
                cells.append("-")
                continue
            se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
            cells.append(f"{d.mean():+.2f} ± {se:.2f} ({int((d < 0).sum())}/{int((d > 0).sum())})")
        out.append(f"| {other} | " + " | ".join(cells) + " |")
    return out + [""]


def summarise(pair_rows: list, tia_rows: list, methods: list) -> str:
    """Markdown: per dataset, the paper's Table 2 columns plus truth errors (mean ± SD over pairs),
    speed relative to the strongest classical baseline present (:data:`SPEED_REFERENCES`), CoRX paired
    against the rows that decide what its network adds (:func:`paired_table`), the SPECT-field error per
    VOI class, and the TIA table (median voxel error and VOI TIA error per VOI class). With more than one
    dataset, the same tables over every pair come first."""
    lines = []
    datasets = list(dict.fromkeys(r["dataset"] for r in pair_rows))
    sections = [(d, [r for r in pair_rows if r["dataset"] == d], [r for r in tia_rows if r["dataset"] == d])
                for d in datasets]
    if len(datasets) > 1:
        sections.insert(0, (f"all {len(datasets)} datasets and protocols", pair_rows, tia_rows))
    for title, rows, trows in sections:
        n_pairs = len({(r["dataset"], r["patient"], r["moving_h"]) for r in rows})
        present = {r["method"] for r in rows}
        reference = next((m for m in SPEED_REFERENCES if m in present), None)
        ref_seconds = [r["seconds"] for r in rows if r["method"] == reference]
        lines += [f"### {title} ({n_pairs} pairs)", "",
                  "| method | " + " | ".join(c[1] for c in PAIR_COLUMNS) + f" | speed vs {reference or '-'} |",
                  "|---|" + "---:|" * (len(PAIR_COLUMNS) + 1)]
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            if not mine:
                continue
            speed = f"{np.median(ref_seconds) / np.median([r['seconds'] for r in mine]):.2g}x" \
                if ref_seconds and m not in ("identity", reference) and base_method(m) not in TRUTH_ROWS else "-"
            lines.append(f"| {m} | " + " | ".join(_mean_sd([r.get(k) for r in mine]) for k, _ in PAIR_COLUMNS)
                         + f" | {speed} |")
        lines.append("")
        lines += paired_table(rows, methods)
        lines.append("")
        groups = _voi_groups({k[len(VOI_ERROR):-len("_mean_mm")] for r in rows for k in r if k.startswith(VOI_ERROR)})
        if groups:
            lines += ["SPECT-field error per VOI class (mm; per pair, the mean of the class's VOI means):", "",
                      "| method | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
            for m in methods:
                mine = [r for r in rows if r["method"] == m]
                if mine:
                    lines.append(f"| {m} | " + " | ".join(_mean_sd([_class_error(r, names) for r in mine])
                                                          for names in groups.values()) + " |")
            lines.append("")
        if trows:
            groups = _voi_groups({r["voi"] for r in trows})
            lines += ["| method | " + " | ".join(f"{g}: voxel err % / VOI err %" for g in groups) + " |",
                      "|---|" + "---:|" * len(groups)]
            for m in methods:
                cells = []
                for names in groups.values():
                    sel = [r for r in trows if r["method"] == m and r["voi"] in names]
                    if not sel:
                        cells.append("-")
                        continue
                    cells.append(f"{np.median([r['median_abs_voxel_error_pct_vs_psf_truth'] for r in sel]):.1f} / "
                                 f"{np.mean([abs(r['voi_tia_error_pct']) for r in sel]):.1f}")
                if any(c != "-" for c in cells):
                    lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def resume_settings(runner: MethodRunner, preset: str, cfg: PreprocessConfig) -> dict:
    """Per method, what its stored field depends on besides its series (JSON): Elastix's on its
    iterations and resolutions, a network's on its model file's hash (and the refinement's iterations),
    so a new bundled model does not discard hours of stored Elastix fields; with the SPECT/CT offset, on
    the offset fit's settings too. A method whose model is not
    a file (in memory: nothing identifies it) has no entry, so nothing of it is stored."""
    import json
    from .network.checkpoint import file_sha256
    from .baselines.ants import SYN_SETTINGS
    from .baselines.elastix import CT_SPECT_METRICS, CT_SPECT_WEIGHTS
    common = {"preset": preset, "preprocess": cfg.to_dict()}
    out = {}
    for method in runner.available():
        own = {}
        base = base_method(method)
        if base in TRUTH_ROWS:                       # read from the series itself: nothing to store
            continue
        if base.startswith("elastix"):
            own = {"elastix_iterations": runner.elastix_iterations, "elastix_resolutions": runner.elastix_resolutions}
            if base == "elastix-dd":
                own["step_estimation"] = "DisplacementDistribution"
            elif base == "elastix-ct-spect":
                own.update(step_estimation="DisplacementDistribution", metrics=CT_SPECT_METRICS,
                           weights=CT_SPECT_WEIGHTS)
        elif base == "ants-syn":
            own = {"ants": SYN_SETTINGS}
        if method != base:
            own["spect_fit"] = asdict(SpectOffsetConfig())
        elif runner.model_key(method) in runner.models:
            source = runner.models[runner.model_key(method)].source
            if not Path(source).is_file():
                continue
            offset = asdict(SpectOffsetConfig()) if runner.spect_offset(method) else False   # what register() fits
            own = {"model_sha256": file_sha256(source), "device": runner.device, "spect_offset": offset}
            if method == "corx-refine":
                own["refine_iterations"] = runner.refine_iterations
        out[method] = json.dumps({"method": method, **common, **own}, sort_keys=True)
    return out


def run_evaluation(out_dir, seeds=(5000, 5001, 5002), patient15: bool = True, protocols=None, models=None,
                   preset: str = "clinical", elastix_iterations: int = 1000, refine_iterations: int = 20,
                   methods=None, device: str = "auto", log=print, resume: bool = True, imaging: str = "gaussian",
                   scanner_cache=None) -> dict:
    """The whole comparison; writes report.md, pairs.csv, tia.csv and report.json into ``out_dir``.
    ``resume``: slow fields (Elastix) are kept in ``out_dir/resume/`` and reused by a run with the same
    settings, so the full run can be continued after an interruption. ``imaging``: how the simulated SPECT
    is made ("scanner": projection + OSEM, its reconstructions kept in ``scanner_cache``, e.g. the folder
    ``corx simulate-validation`` fills)."""
    import json

    from .simulation import SimulationConfig, simulate_series

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runner = MethodRunner(models or {"corx": "bundled"}, elastix_iterations, refine_iterations, device)
    skipped = runner.skipped()
    unknown = [m for m in (methods or []) if m not in runner.available()]
    if unknown:
        raise ValueError("cannot run " + "; ".join(f"{m}: {skipped.get(m, 'unknown method')}" for m in unknown)
                         + f" (available: {', '.join(runner.available())})")
    not_run = {} if methods else skipped          # rows left out of a full run, and why
    methods = [m for m in runner.available() if m in (methods or runner.available())]
    cfg = runner.models["corx"].preprocess if "corx" in runner.models else PreprocessConfig()
    protocols = protocols or PROTOCOLS
    datasets = [("simulated (held out)", "procedural", s) for s in seeds]
    if patient15:
        datasets.append(("patient15 anatomy (external)", "patient15", 0))
    settings = resume_settings(runner, preset, cfg) if resume else None
    pair_rows, tia_rows, figures = [], [], []
    for proto_name, times in protocols.items():
        for dataset, anatomy, seed in datasets:
            series = simulate_series(SimulationConfig.preset(preset, seed=int(seed), anatomy=anatomy, times_h=times,
                                                             imaging=imaging), scanner_cache=scanner_cache)
            name = f"{dataset}, {proto_name}"
            hours = "_".join(f"{t:g}".replace(".", "p") for t in times)
            mode = "scanner_" if imaging == "scanner" else ""
            slug = "".join(c if c.isalnum() else "_" for c in f"{mode}{anatomy}_{seed}_{len(times)}tp_{hours}")
            resume_dir = out / "resume" / slug if settings else None
            p, t = evaluate_series(series, runner, methods, cfg, name, log=log,
                                   figure_path=out / f"figure_{slug}.png", resume_dir=resume_dir,
                                   resume_settings=settings)
            figures.append(f"![{name}](figure_{slug}.png)")
            pair_rows += p
            tia_rows += t
    itk_threads = ""
    if any(base_method(m).startswith("elastix") for m in methods):
        from .baselines.elastix import set_threads
        itk_threads = f", ITK (Elastix) {set_threads(None)} threads"
    report = ["# CoRX evaluation", "",
              f"Methods run side by side in one process on the same pairs; seeds {list(seeds)}"
              f"{' + patient15' if patient15 else ''}; preset {preset}; SPECT imaging {imaging}; "
              f"Elastix {elastix_iterations} iterations; "
              f"refinement {refine_iterations} iterations; torch {torch.__version__}, {torch.get_num_threads()} threads"
              f"{itk_threads}.", "", "| row | what it is |", "|---|---|",
              *(f"| `{m}` | {ROWS[m]} |" for m in methods), "",
              *(["Not run: " + "; ".join(f"{m} ({why})" for m, why in not_run.items()) + ".", ""] if not_run else []),
              summarise(pair_rows, tia_rows, methods),
              f"Wall time {time.perf_counter() - t_start:.0f} s.", ""]
    n_resumed = sum(bool(r["resumed"]) for r in pair_rows)
    if n_resumed:
        report += [f"{n_resumed} of {len(pair_rows)} method × pair results (field, seconds, peak memory) were measured "
                   f"by an earlier, interrupted run with the same settings and read from `{out / 'resume'}`; "
                   f"the wall time above does not include them.", ""]
    report += ["## Figures", "", *figures]
    write_text(out / "report.md", "\n".join(report) + "\n")
    for name, rows in (("pairs.csv", pair_rows), ("tia.csv", tia_rows)):
        write_csv(out / name, list(dict.fromkeys(k for r in rows for k in r)), rows)
    write_text(out / "report.json", json.dumps({"pairs": pair_rows, "tia": tia_rows, "methods": methods},
                                               indent=1, default=float))
    return {"pairs": pair_rows, "tia": tia_rows, "markdown": "\n".join(report)}
