"""A series registered to its reference time point: every pair with the model loaded once, each pair's
files written while the next one registers, the per-pair summary, and the guard that keeps results out
of the input folder. Used by ``corx register-series``, ``corx dosimetry`` and the demo; it imports no
TIA, simulation or figure code, so the registration commands start quickly."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from TIAMappingLib.voi import time_labels

from .outputs import inside, registration_outputs
from .progress import TerminalProgress
from .resample import resample


def resampled_to_reference(sessions: list, reference_index: int, fields: dict | None = None) -> list:
    """SPECT (Bq/mL) of every time point on the reference SPECT grid; ``fields``: time index ->
    displacement (Z, Y, X, 3) LPS mm on that grid (none: only resampled, i.e. no registration)."""
    ref_g = sessions[reference_index].spect_geometry
    out = []
    for i, s in enumerate(sessions):
        if i == reference_index:
            out.append(np.asarray(s.spect, np.float32))
            continue
        field = (fields or {}).get(i)
        out.append(resample(np.clip(s.spect, 0, None), s.spect_geometry, ref_g, displacement=field))
    return out


def register_series(sessions: list, times_h, reference_index: int, out_dir, model="bundled", device="auto",
                    overwrite=True, protected=(), spect_offset=None, spect_offset_config=None, allow=(),
                    network_field=False, ct_grid="spect", keep_maps=True, release_sessions=False) -> tuple:
    """Register every time point to the reference with CoRX, the model loaded once; write each pair's
    outputs under ``out_dir/t<hours>h/`` (the warped CT on ``ct_grid``: "spect", the fixed SPECT grid, or "ct",
    its own; :func:`engine.register`). Every output set is checked before any work (``protected``:
    the user's inputs, never written; ``overwrite`` replaces whole earlier sets). Returns (SPECT list on
    the reference SPECT grid, time index -> {"field", "jacobian", "jacobian_nonpositive_percent_spect_grid",
    "metrics", "seconds", "timings_s", "device", "notes"}); ``keep_maps=False``: the fields, Jacobians and
    warped SPECT are written, not kept (None in their place; 0.03 GB per pair less memory);
    ``release_sessions=True``: each moving session's entry in ``sessions`` is set to None once it is
    registered (for a caller that has no further use for them: 0.025 GB per clinical time point). A pair's
    files are written in a background thread while the next pair registers (one write at a time; a failed
    write stops the series with its error, as a failed registration does)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from .engine import load_model, prepare_fixed, register, write_registration

    tags = time_labels(times_h)
    plans = {i: registration_outputs(Path(out_dir) / f"t{tags[i]}", protected) for i in range(len(times_h))
             if i != reference_index}
    for plan in plans.values():
        plan.prepare(overwrite)
    model = load_model(model)
    fixed = prepare_fixed(sessions[reference_index], model, allow)        # its grid and filtering made once
    aligned, pairs = [], {}
    with ThreadPoolExecutor(max_workers=1) as writer:
        writing = None
        for i, h in enumerate(times_h):
            if i == reference_index:
                aligned.append(np.asarray(sessions[i].spect, np.float32))
                continue
            result = register(fixed, sessions[i], model=model, device=device,
                              progress=TerminalProgress(f"register {h:g} h -> {times_h[reference_index]:g} h"),
                              spect_offset=spect_offset, spect_offset_config=spect_offset_config, allow=allow,
                              ct_grid=ct_grid)
            if release_sessions:
                sessions[i] = None
            if writing is not None:
                writing.result()                     # the previous pair's files, or its error
            if not network_field and result.field_spect is not None:   # only what the files hold, while written
                result = replace(result, field_network=None, spect_correction_mm=None, spect_organ_weight=None)
            writing = writer.submit(write_registration, result, plans[i], network_field=network_field)
            aligned.append(result.warped_spect if keep_maps else None)
            pairs[i] = {"field": result.field_spect if keep_maps else None,
                        "jacobian": result.jacobian_spect if keep_maps else None,
                        "jacobian_nonpositive_percent_spect_grid": result.jacobian_nonpositive_percent_spect,
                        "metrics": result.metrics, "seconds": round(result.timings_s["total"], 2),
                        "device": result.device, "notes": result.notes,
                        "timings_s": {k: round(v, 2) for k, v in result.timings_s.items()}}
            del result                               # the writer holds it until its files are written
        if writing is not None:
            writing.result()
    return aligned, pairs


def registration_summary(pairs: dict, times_h, series=None) -> dict:
    """Per moving time point: seconds, the paper's metrics and, for a simulated series, the
    displacement error against the true field in the body and in all VOIs (as ``corx evaluate``)."""
    summary = {}
    masks = None
    if series is not None:
        from .evaluation import displacement_error_mm, truth_masks
        masks = truth_masks(series)
        vois = masks["organs"] | masks.get("tumours", False)          # every VOI of the phantom
    for i, r in pairs.items():
        row = {k: r[k] for k in ("seconds", "device", "metrics", "timings_s")}
        row["jacobian_nonpositive_percent_spect_grid"] = r["jacobian_nonpositive_percent_spect_grid"]
        if masks is not None:
            truth = series.truth_field_spect[i]
            zero = np.zeros_like(truth)
            row.update({"displacement_error_body": displacement_error_mm(r["field"], truth, masks["body"]),
                        "displacement_error_vois": displacement_error_mm(r["field"], truth, vois),
                        "identity_error_body": displacement_error_mm(zero, truth, masks["body"]),
                        "identity_error_vois": displacement_error_mm(zero, truth, vois)})
        summary[f"{times_h[i]:g} h"] = row
    return summary


def check_outside_inputs(out, manifest) -> None:
    """Refuse an output folder inside the input series' folder, or one that holds any input file."""
    inputs = manifest.input_files()
    held = [f for f in inputs if inside(f, out)]
    if inside(out, manifest.folder) or held:
        raise ValueError(f"--out {out} lies inside the input series {manifest.folder} or holds its files; choose an "
                         "output folder outside it, so that nothing you gave is overwritten or mixed with results")
