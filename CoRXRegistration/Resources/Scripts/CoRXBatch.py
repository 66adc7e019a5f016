"""CoRX batch: registration + TIA + dose for one or many patients, without the GUI.

In Slicer:   Slicer --no-main-window --python-script CoRXBatch.py --input SERIES --output DIR
Plain Python with slicer-core (tests, servers):   python CoRXBatch.py --input SERIES --output DIR

SERIES is a ``series.json`` (format corx-series/1), its folder, a folder of such folders, or a folder
of DICOM files (one series per patient in it; SPECT in counts needs ``--cps-per-mbq`` or
``--calibration``; DICOM input also gives ``dicom/rtdose.dcm`` and a deformable registration per
moving time point). A
manifest may name a ``"segmentation"`` (label map or .seg.nrrd on the reference SPECT frame; a
simulated series' truth segmentation is used otherwise) for the VOI table and dose statistics.
Per patient, DIR/<patient_id>/ receives: the grid transform of every moving time point (NRRD
displacement field, from-parent/resampling, LPS), deformed SPECT and CT, Jacobian and RGB
deformation volumes, the TIA, fit-RMSE, model and dose maps, the QA and VOI tables (CSV) and
``batch.log``. The exit code is 0 only if every patient succeeded, 1 if some failed (a bad manifest or
a repeated patient id fails that patient; the others still run), 2 if nothing could start (bad
arguments, no readable manifest, an output folder inside SERIES or unwritable); nothing under SERIES is
written. A patient's earlier results are replaced (as a whole) only with ``--overwrite``. Inputs pass
the checks of ``CoRXRegistrationLib.validate``; ``--allow CHECK`` turns one into a logged warning. Each patient is processed in an emptied scene, so memory does not grow per patient.
Installed extension: the script is ``<extension>/lib/Slicer-X.Y/qt-scripted-modules/Resources/Scripts/CoRXBatch.py``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
for candidate in (HERE.parents[2], HERE.parents[3] / "TIAMapping"):   # <repo>/CoRXRegistration, <repo>/TIAMapping
    if (candidate / "CoRXRegistration.py").is_file() or (candidate / "TIAMapping.py").is_file():
        sys.path.insert(0, str(candidate))


def _scene():
    """Slicer's scene inside the application; a fresh scene with the logics it needs under slicer-core."""
    import slicer
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer.mrmlScene
    scene = slicer.vtkMRMLScene()
    for logic_class in (slicer.vtkSlicerVolumesLogic, slicer.vtkSlicerSegmentationsModuleLogic):
        logic = logic_class()
        logic.SetMRMLScene(scene)
        _KEEP.append(logic)
    slicer.mrmlScene = scene
    return scene


_KEEP = []   # module logics must outlive the scene they serve


def _labelmap_node(manifest, log):
    """The manifest's segmentation as a label map volume node and its value -> name mapping."""
    import numpy as np

    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.imageio import read_segmentation
    rel = manifest.raw.get("segmentation") or manifest.raw.get("truth", {}).get("segmentation")
    if not rel:
        log.info("no segmentation in the manifest: maps only, no VOI table")
        return None, None
    segments, geometry = read_segmentation(manifest.folder / rel)
    labels = np.zeros(geometry.shape, np.uint16)
    names = {}
    for value, (name, mask) in enumerate(segments.items(), start=1):
        labels[mask & (labels == 0)] = value
        names[value] = name
    log.info("segmentation %s: %d segments", rel, len(names))
    return addVolumeNode(labels, geometry, "VOIs", "vtkMRMLLabelMapVolumeNode"), names


def patient_outputs(manifest, out: Path):
    """Every file :func:`process_patient` writes for ``manifest`` into ``out``."""
    from CoRXRegistrationLib.outputs import OutputSet
    from TIAMappingLib.voi import time_labels

    tags = time_labels(manifest.hours)
    names = [name.format(tags[i]) for i in range(len(manifest.hours)) if i != manifest.reference_index
             for name in ("transform_{}.nrrd", "spect_{}_deformed.nrrd", "ct_{}_deformed.nrrd", "jacobian_{}.nrrd",
                          "deformation_rgb_{}.nrrd")]
    names += ["registration_qa.csv", "tia.nrrd", "fit_rmse.nrrd", "fit_model.nrrd", "dose.nrrd", "dose_kernel.nrrd", "tia_pvc.nrrd",
              "dose_pvc.nrrd", "voi.csv", "voi.json"]
    from CoRXRegistrationLib.dosimetry import dicom_output_names
    names += [f"dicom/{name}" for name in dicom_output_names(manifest)]
    return OutputSet(out, names, inputs=manifest.input_files())


def process_patient(manifest, out, model: str, device: str, log, allow=(), pvc=None, integration: str | None = None) -> dict:
    """Register, map and write one patient into ``out`` (an output set from :func:`patient_outputs`,
    already prepared); ``pvc``: :class:`TIAMappingLib.pvc.PVCSettings` (None: uncorrected); ``integration``: the
    time integration (``TIAMappingLib.voxel_tia.INTEGRATIONS``; None: its default)."""
    import CoRXRegistration as reg
    import TIAMapping as tia
    from TIAMappingLib.voi import time_labels
    from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION

    t0 = time.perf_counter()
    logic = reg.CoRXRegistrationLogic()
    loaded = logic.loadSeries(manifest, loadTruth=False)
    ref = manifest.reference_index
    log.info("%s: %d time points %s h, reference %g h", manifest.patient_id, len(manifest.hours), manifest.hours,
             manifest.hours[ref])

    def progress(fraction, text=""):
        log.info("  registration %3.0f %% %s", 100.0 * fraction, text)
    registered = logic.registerSeries(loaded["ct"], loaded["spect"], manifest.hours, referenceIndex=ref, model=model,
                                      device=device, progress=progress, allow=allow)
    written = []
    tag_of = dict(zip(manifest.hours, time_labels(manifest.hours)))
    for hours, nodes in registered["pairs"].items():
        tag = tag_of[hours]
        written += [reg.saveNode(nodes["transform"], out.path(f"transform_{tag}.nrrd")),
                    reg.saveNode(nodes["deformedSPECT"], out.path(f"spect_{tag}_deformed.nrrd")),
                    reg.saveNode(nodes["deformedCT"], out.path(f"ct_{tag}_deformed.nrrd")),
                    reg.saveNode(nodes["jacobian"], out.path(f"jacobian_{tag}.nrrd")),
                    reg.saveNode(nodes["deformationRGB"], out.path(f"deformation_rgb_{tag}.nrrd"))]
        r = nodes["result"]
        for note in r.notes:
            if "allowed by --allow" in note or note.startswith("warning"):
                log.warning("  %s: %s", tag, note)
        log.info("  %s -> %g h: %.1f s, SPECT LNCC %.3f -> %.3f, Jacobian <= 0 %.3f %%", tag, manifest.hours[ref],
                 r.timings_s["total"], r.metrics["identity"]["spect_lncc"], r.metrics["registered"]["spect_lncc"],
                 r.metrics["registered"]["jacobian_nonpositive_percent"])
    written.append(reg.saveNode(registered["qaTable"], out.path("registration_qa.csv")))
    labelmap, names = _labelmap_node(manifest, log)
    if pvc is not None and pvc.method != "none":
        log.info("  partial-volume correction %s, %s", pvc.method,
                 "; ".join(r.describe() for r in pvc.resolutions(len(manifest.hours))))
    maps = tia.TIAMappingLogic().computeTIA(registered["registeredSPECT"], manifest.hours, voiNode=labelmap,
                                            segmentNames=names, ctVolumeNode=loaded["ct"][ref], allow=allow, pvc=pvc,
                                            integration=integration or DEFAULT_INTEGRATION)
    for key in ("tia", "fit_rmse", "fit_model", "dose", "dose_kernel", "tia_pvc", "dose_pvc"):
        if key in maps:
            written.append(reg.saveNode(maps[key], out.path(f"{key}.nrrd")))
    if maps["voi_rows"]:
        import json

        from CoRXRegistrationLib.outputs import write_text
        written.append(reg.saveNode(reg.addTableNode(maps["voi_rows"], "VOI results"), out.path("voi.csv")))
        written.append(write_text(out.path("voi.json"), json.dumps(
            {"units": {"volume_ml": "mL", "tia": "MBq*h", "dose": "Gy", "activity": "MBq"},
             "times_h": list(manifest.hours), "reference_h": manifest.hours[ref], "vois": maps["voi_rows"]},
            indent=2, default=float)))
    from CoRXRegistrationLib.dosimetry import dicom_output_names, write_dicom_results
    if dicom_output_names(manifest):
        import slicer
        fields = {manifest.hours.index(h): nodes["result"].field_spect for h, nodes in registered["pairs"].items()}
        dose = slicer.util.arrayFromVolume(maps["dose"]) if "dose" in maps else None
        written += write_dicom_results(out, manifest, dose, reg.volumeNodeGeometry(loaded["spect"][ref]), fields,
                                       prefix="dicom/")
        log.info("  DICOM: RT Dose and %d deformable registrations in %s", len(fields), out.folder / "dicom")
    for row in manifest.provenance():
        if isinstance(row["spect"], dict):
            log.info("  %g h: %s: %s -> Bq/mL (%s; decay: %s)", row["hours"], row["spect"]["series"],
                     row["spect"].get("units"), row["spect"].get("conversion"), row["spect"].get("decay"))
    for message in maps["messages"]:
        log.warning("  %s", message)
    log.info("  %s done in %.1f s: %d files", manifest.patient_id, time.perf_counter() - t0, len(written))
    return {"patient": manifest.patient_id, "files": [str(p) for p in written]}


def _log(output: Path):
    """The batch logger: stdout and ``output/batch.log``."""
    log = logging.getLogger("corx.batch")
    log.setLevel(logging.INFO)
    for old in log.handlers:
        old.close()
    log.handlers[:] = [logging.StreamHandler(sys.stdout), logging.FileHandler(output / "batch.log", mode="w")]
    for h in log.handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return log


def run(args) -> int:
    from CoRXRegistrationLib.outputs import inside
    from CoRXRegistrationLib.validate import allowed_checks

    output, source = Path(args.output), Path(args.input)
    try:
        allow = allowed_checks(args.allow)
    except ValueError as exc:
        print(f"CoRX batch: --allow: {exc}", file=sys.stderr)
        return 2
    root = source.parent if source.is_file() else source
    if inside(output, root):
        print(f"CoRX batch: the output folder {output} lies inside the input {root}; choose one outside it",
              file=sys.stderr)
        return 2
    try:
        output.mkdir(parents=True, exist_ok=True)
        log = _log(output)
    except OSError as exc:
        print(f"CoRX batch: cannot write to the output folder {output}: {exc}", file=sys.stderr)
        return 2
    errors = []
    try:
        from CoRXRegistrationLib.dicom_times import parse_user_datetime
        from CoRXRegistrationLib.quantification import calibration_entries, read_calibration_file
        from CoRXRegistrationLib.series_io import find_series
        calibration = (calibration_entries(args.cps_per_mbq, "--cps-per-mbq") if args.cps_per_mbq is not None
                       else read_calibration_file(args.calibration) if args.calibration else None)
        injection = parse_user_datetime(args.injection) if args.injection else None
        series = find_series(args.input, errors, injection=injection, calibration=calibration)
    except Exception as exc:                       # a clear one-line reason, non-zero exit
        log.error("cannot read the input %s: %s", args.input, exc)
        return 2
    for path, message in errors:                   # bad manifests fail their patient; the others run
        log.error("%s: %s", path, message)
    if not series:
        log.error("no patient can be processed: every manifest under %s was refused", args.input)
        return 2
    scene = _scene()
    failed = [str(path) for path, _ in dict(errors).items()]
    for manifest in series:
        try:
            from TIAMappingLib.pvc import PVCSettings
            pvc = PVCSettings.for_series(args.pvc, args.psf_fwhm_mm, args.pvc_calibration, manifest,
                                         len(manifest.hours))
            out = patient_outputs(manifest, output / manifest.patient_id).prepare(args.overwrite)
            process_patient(manifest, out, args.model, args.device, log, allow, pvc, args.time_integration)
        except Exception as exc:
            log.error("%s failed: %s", manifest.patient_id, exc)
            log.debug(traceback.format_exc())
            failed.append(manifest.patient_id)
        finally:
            scene.Clear(0)                        # the next patient starts in an empty scene
    total = len(series) + len(dict(errors))
    log.info("%d of %d patients processed%s", total - len(failed), total,
             f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


def main(argv=None) -> int:
    """Parse the arguments and run; never raises: every failure is a message and an exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="series.json, its folder, or a folder of series folders")
    parser.add_argument("--output", required=True, help="output folder (one sub-folder per patient)")
    parser.add_argument("--model", default="bundled", help="'bundled' or a CoRX checkpoint")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--overwrite", action="store_true", help="replace a patient's earlier results as a whole")
    parser.add_argument("--injection", help="DICOM input: injection date and time (YYYY-MM-DD HH:MM)")
    parser.add_argument("--cps-per-mbq", type=float, help="DICOM input in counts: the scanner's sensitivity (cps/MBq)")
    parser.add_argument("--calibration", help="DICOM input in counts: a corx-calibration/1 JSON file")
    parser.add_argument("--allow", nargs="+", default=[], metavar="CHECK",
                        help="turn these input checks into logged warnings (see CoRXRegistrationLib.validate)")
    parser.add_argument("--pvc", choices=["none", "rc", "gtm", "rbv"], default="none",
                        help="partial-volume correction of the VOI values (rbv: also tia_pvc and dose_pvc maps)")
    parser.add_argument("--psf-fwhm-mm", type=float, nargs="+", metavar="MM",
                        help="SPECT resolution for --pvc: one FWHM or three (x y z); default: the manifest's "
                             "psf_fwhm_mm, else --pvc-calibration's")
    parser.add_argument("--pvc-calibration", help="a phantom calibration from corx calibrate-pvc")
    from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION, INTEGRATIONS
    parser.add_argument("--time-integration", choices=list(INTEGRATIONS), default=DEFAULT_INTEGRATION,
                        help="how each voxel and VOI curve is integrated in time: " +
                             "; ".join(f"{k}: {v}" for k, v in INTEGRATIONS.items()))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                     # argparse has printed the reason
        return 0 if exc.code == 0 else 2
    try:
        return run(args)
    except BaseException as exc:                  # KeyboardInterrupt too: Slicer must still exit
        print(f"CoRX batch stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 2


def _exit(code: int) -> None:
    """Leave with ``code``: inside Slicer through the application (a window-less Slicer left running
    after a script error would never end), else through sys.exit."""
    try:
        import slicer
        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)
            return
    except ImportError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
