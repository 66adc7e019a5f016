"""The ``corx`` command line. Sub-commands: simulate, export-dicom, tia, demo, register, register-series,
dosimetry, model-info, prepare-data, train, export-model, evaluate, benchmark.

Errors in the input end the command with exit code 2 and one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .baselines import ROW_ORDER, registering_rows
from .geometry import GeometryError
from .imageio import ImageFileError
from .memory import one_malloc_arena
from .progress import TerminalProgress

# The comparison rows of `corx evaluate`, trained by the bundled model's recipe (NETWORK=transmorph-cpu or
# corx-cpu-nocs scripts/train_model.sh); only in a source checkout, not part of the Slicer extension.
COMPARISON_MODELS = Path(__file__).resolve().parents[2] / "training_checkpoints" / "models"
COMPARISON_TRANSMORPH = COMPARISON_MODELS / "transmorph-cpu.pt"
COMPARISON_CORX_NOCS = COMPARISON_MODELS / "corx-cpu-nocs.pt"


def _allow(args) -> frozenset:
    from .validate import allowed_checks
    return allowed_checks(getattr(args, "allow", None))


def _series_options(args) -> dict:
    """read_series' DICOM options from --injection, --cps-per-mbq and --calibration (None: the manifest's)."""
    from .dicom_times import parse_user_datetime
    from .quantification import calibration_entries, read_calibration_file
    injection = parse_user_datetime(args.injection) if getattr(args, "injection", None) else None
    calibration = None
    if getattr(args, "cps_per_mbq", None) is not None:
        calibration = calibration_entries(args.cps_per_mbq, "--cps-per-mbq")
    elif getattr(args, "calibration", None):
        calibration = read_calibration_file(args.calibration)
    return {"injection": injection, "calibration": calibration}


def _print_provenance(manifest) -> None:
    for row in manifest.provenance():
        spect = row["spect"]
        if isinstance(spect, dict):
            print(f"{row['hours']:>7g} h: {spect['series']}: {spect.get('units')} -> Bq/mL ({spect.get('conversion')}; "
                  f"decay: {spect.get('decay')})")


def _scanner_settings(args) -> dict | None:
    """ScannerConfig fields from --scanner-views/-iterations/-subsets (None: its defaults); fewer or more views
    keep the same 30 min acquisition."""
    scanner = {k: v for k, v in (("views", args.scanner_views),
                                 ("osem_iterations", getattr(args, "scanner_iterations", None)),
                                 ("osem_subsets", getattr(args, "scanner_subsets", None))) if v is not None}
    if args.scanner_views:
        scanner["seconds_per_view"] = 1800.0 / args.scanner_views
    return scanner or None


def _cmd_simulate(args) -> int:
    from .simulation import SimulationConfig, simulate_series, write_series
    from .simulation.preview import save_series_preview
    from .simulation.series import series_outputs

    scanner = _scanner_settings(args)
    cfg = SimulationConfig.preset(args.preset, seed=args.seed, anatomy=args.anatomy,
                                  times_h=tuple(args.times), reference_index=args.reference_index,
                                  injected_mbq=args.injected_mbq, imaging=args.imaging, scanner=scanner)
    cfg.validate()                                # before any file is looked at
    plan = series_outputs(cfg, args.out)          # before simulating: refuses a folder of other files
    if not args.overwrite:
        plan.prepare(overwrite=False)             # and an existing series
    t0 = time.perf_counter()
    series = simulate_series(cfg, progress=TerminalProgress(f"simulate seed {args.seed}"))
    t_sim = time.perf_counter() - t0
    manifest = write_series(series, args.out, overwrite=args.overwrite)
    preview = save_series_preview(series, Path(args.out) / "preview.png")
    print(f"wrote {manifest} and {preview}")
    print(f"simulation {t_sim:.1f} s, writing {time.perf_counter() - t0 - t_sim:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in series.timing_s.items()))
    return 0


def _cmd_simulate_phantom(args) -> int:
    from .imageio import write_image, write_seg_nrrd
    from .outputs import OutputSet, write_text
    from .simulation.iec_phantom import IECPhantom, image_phantom, phantom_grid, sphere_table

    names = ["spect.nii.gz", "ct.nii.gz", "truth_activity.nii.gz", "spheres.seg.nrrd", "phantom.json"]
    plan = OutputSet(args.out, names).prepare(args.overwrite)
    phantom = IECPhantom(background_bq_per_ml=args.background_kbq_per_ml * 1e3, ratio=args.ratio)
    grid = phantom_grid(args.spacing_mm)
    scanner = _scanner_settings(args)
    t0 = time.perf_counter()
    done = image_phantom(phantom, grid, args.imaging, args.seed, fwhm_mm=args.fwhm_mm, scanner=scanner)
    import numpy as np
    labels = np.zeros(grid.shape, np.uint8)
    table = sphere_table(phantom)
    for n, row in enumerate(table, start=1):
        labels[(done["occupancy"][row["name"]] >= 0.5) & (labels == 0)] = n
    write_image(plan.path("spect.nii.gz"), done["spect"], grid)
    write_image(plan.path("ct.nii.gz"), done["hu"], grid)
    write_image(plan.path("truth_activity.nii.gz"), done["activity"], grid)
    write_seg_nrrd(plan.path("spheres.seg.nrrd"), labels, {n: row["name"] for n, row in enumerate(table, 1)}, grid)
    write_text(plan.path("phantom.json"), json.dumps({
        "phantom": "IEC 61675-1 body phantom (walls not modelled)", "background_bq_per_ml": phantom.background_bq_per_ml,
        "ratio": phantom.ratio, "spheres": table, "imaging": done["imaging"], "grid": grid.to_dict(),
        "total_activity_mbq": float(done["activity"].sum(dtype=np.float64) * grid.voxel_volume_ml / 1e6)},
        indent=2, default=float))
    print(f"IEC body phantom ({args.imaging}) in {time.perf_counter() - t0:.0f} s: wrote {args.out}")
    return 0


def _cmd_calibrate_pvc(args) -> int:
    import numpy as np

    from TIAMappingLib.pvc import PVCError
    from TIAMappingLib.pvc_calibration import calibrate_phantom

    from .imageio import read_image, read_segmentation
    from .outputs import OutputSet, write_text
    from .resample import resample

    if args.phantom:
        folder = Path(args.phantom)
        try:
            info = json.loads((folder / "phantom.json").read_text())
        except (OSError, ValueError) as e:
            raise PVCError(f"{folder}: not a phantom folder from corx simulate-phantom ({e})") from None
        spect_path, ct_path, seg_path = folder / "spect.nii.gz", folder / "ct.nii.gz", folder / "spheres.seg.nrrd"
        sphere, background = info["background_bq_per_ml"] * info["ratio"], info["background_bq_per_ml"]
    else:
        missing = [o for o, v in (("--spect", args.spect), ("--ct", args.ct), ("--spheres", args.spheres),
                                  ("--sphere-kbq-ml", args.sphere_kbq_ml),
                                  ("--background-kbq-ml", args.background_kbq_ml)) if v is None]
        if missing:
            raise PVCError("give a simulate-phantom folder, or your phantom with " + ", ".join(missing))
        spect_path, ct_path, seg_path = Path(args.spect), Path(args.ct), Path(args.spheres)
        sphere, background = args.sphere_kbq_ml * 1e3, args.background_kbq_ml * 1e3
    out = Path(args.out)
    plan = OutputSet(out.parent, [out.name], inputs=[spect_path, ct_path, seg_path]).prepare(args.overwrite)
    spect, g = read_image(spect_path)
    ct, ct_g = read_image(ct_path)
    if not ct_g.same_grid(g):
        ct = resample(ct, ct_g, g, fill=-1000.0)
    segments, seg_g = read_segmentation(seg_path)
    if not seg_g.same_grid(g):
        segments = {n: resample(m.astype(np.uint8), seg_g, g, mode="nearest") > 0 for n, m in segments.items()}
    cal = calibrate_phantom(spect, g, segments, ct, sphere, background, args.diameters, source=str(spect_path))
    write_text(plan.path(out.name), json.dumps(cal.to_dict(), indent=1, default=float))
    print(f"{cal.resolution.describe()}; recovery " + ", ".join(f"{r['segment']} {r['recovery']:.3f}"
                                                           for r in cal.record["spheres"]))
    print(f"background measured {cal.record['background_measured_bq_per_ml'] / 1e3:.2f} kBq/mL (true "
          f"{background / 1e3:.2f}); wrote {out}")
    return 0


def _cmd_evaluate_pvc(args) -> int:
    from .pvc_evaluation import run_pvc_evaluation
    result = run_pvc_evaluation(args.out, calibration=args.pvc_calibration, registrations=tuple(args.registrations),
                                model=args.model, preset=args.preset, sensitivity=not args.no_sensitivity,
                                integrations=args.time_integration, **_held_out(args))
    print(result["markdown"])
    return 0


def _cmd_tia(args) -> int:
    from TIAMappingLib.pipeline import run_tia_files

    t0 = time.perf_counter()
    outputs = run_tia_files(args.spect, args.times, args.out, segmentation=args.segmentation, ct=args.ct,
                            population_half_life_h=args.stp_half_life, overwrite=args.overwrite, allow=_allow(args),
                            pvc=_pvc_settings(args, len(args.times)), integration=args.time_integration)
    for msg in outputs.messages:
        print(f"note: {msg}")
    _print_voi_rows(outputs.voi_rows)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, preset=args.preset, seed=args.seed, anatomy=args.anatomy, overwrite=True, model=args.model,
             device=args.device, input_path=args.input, allow=_allow(args), pvc=args.pvc,
             integration=args.time_integration)
    return 0


def _cmd_model_info(args) -> int:
    from .network import NAMED_CONFIGS, PAPER_PARAMETER_COUNTS, build_network, count_parameters

    print(f"{'configuration':<18} {'parameters':>12} {'paper (Table 2)':>16} {'difference':>11}  description")
    for name, cfg in NAMED_CONFIGS.items():
        n = count_parameters(build_network(cfg))
        paper = PAPER_PARAMETER_COUNTS.get(name)
        diff = f"{100.0 * (n - paper) / paper:+.3f} %" if paper else ""
        kind = "TransMorph (CT only)" if cfg.architecture == "transmorph" else \
            ("CoRX-NET" + (" + cross-stitch" if cfg.cross_stitch else " without cross-stitch"))
        detail = (f"{kind}; embed {cfg.embed_dim}, depths {list(cfg.depths)}, heads {list(cfg.num_heads)}, "
                  f"window {list(cfg.window_size)}, field at {'full' if cfg.flow_level == 0 else 'half'} resolution, "
                  f"input {'x'.join(map(str, cfg.image_size))}")
        print(f"{name:<18} {n:>12,} {f'{paper:,}' if paper else '-':>16} {diff:>11}  {detail}")
    if args.checkpoint:
        from .engine import load_model
        from .network.checkpoint import file_sha256
        m = load_model(args.checkpoint)
        print(f"\n{m.source}: {m.network.config.name}, {count_parameters(m.network):,} parameters, "
              f"sha256 {file_sha256(m.source)[:16]}..., preprocessing {m.preprocess.to_dict()}")
    return 0


def _read_while_importing_torch(read):
    """``read()`` in a thread while this one imports torch (about 1 s; SimpleITK reads and decompresses
    without holding the interpreter), so a command's start-up and the reading of its inputs overlap."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(read)
        importlib.import_module("torch")
        return reading.result()


def _cmd_register(args) -> int:
    from .outputs import registration_outputs
    from .series_io import read_sessions, source_files, volume_source

    allow = _allow(args)
    options = _series_options(args)
    sources = [volume_source(p, kind, options["calibration"], options["injection"])
               for p, kind in ((args.fixed_ct, "ct"), (args.fixed_spect, "spect"), (args.moving_ct, "ct"),
                               (args.moving_spect, "spect"))]
    inputs = [f for s in sources for f in source_files(s)]
    plan = registration_outputs(args.out, protected=inputs).prepare(args.overwrite)     # before any work
    fixed, moving = _read_while_importing_torch(
        lambda: read_sessions([(sources[0], sources[1], "fixed"), (sources[2], sources[3], "moving")]))
    from .engine import register, write_registration
    from .network.spect_offset import SpectOffsetConfig
    result = register(fixed, moving, model=args.model, device=args.device, refine_iterations=args.refine,
                      progress=TerminalProgress("register"), spect_offset=False if args.no_spect_offset else None,
                      spect_offset_config=SpectOffsetConfig(organ_shift=not args.no_organ_shift), allow=allow,
                      ct_grid="ct" if args.native_ct else "spect")
    files = write_registration(result, plan, network_field=args.network_field)
    for note in result.notes:
        print(f"note: {note}")
    for stage in ("identity", "registered"):
        m = result.metrics[stage]
        print(f"{stage:>10}: CT L1 {m['ct_l1']:.4f}  CT SSIM {m['ct_ssim']:.4f}  SPECT SSIM {m['spect_ssim']:.4f}  "
              f"SPECT LNCC {m['spect_lncc']:.4f}  Jacobian<=0 {m['jacobian_nonpositive_percent']:.3f} %")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings_s.items()))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def _cmd_register_series(args) -> int:
    from .series_registration import check_outside_inputs, register_series, registration_summary
    from .outputs import OutputSet, write_text
    from .series_io import read_series

    t0 = time.perf_counter()
    allow = _allow(args)
    manifest = read_series(args.series, **_series_options(args))
    out = Path(args.out)
    check_outside_inputs(out, manifest)
    qa = OutputSet(out, ["registration_qa.json"]).prepare(args.overwrite)
    sessions = _read_while_importing_torch(manifest.sessions)
    from .network.spect_offset import SpectOffsetConfig
    print(f"{manifest.patient_id}: {len(manifest.hours)} time points {manifest.hours} h, reference "
          f"{manifest.hours[manifest.reference_index]:g} h; {_threads_line()}")
    _, pairs = register_series(sessions, manifest.hours, manifest.reference_index, out, model=args.model,
                               device=args.device, overwrite=args.overwrite,
                               protected=manifest.input_files(),
                               spect_offset=False if args.no_spect_offset else None,
                               spect_offset_config=SpectOffsetConfig(organ_shift=not args.no_organ_shift),
                               allow=allow, network_field=args.network_field,
                               ct_grid="ct" if args.native_ct else "spect", keep_maps=False,
                               release_sessions=True)
    summary = registration_summary(pairs, manifest.hours)
    write_text(qa.path("registration_qa.json"), json.dumps({"series": str(manifest.path), "pairs": summary,
                                                            "inputs": manifest.provenance()}, indent=2, default=str))
    _print_provenance(manifest)
    for i, row in pairs.items():
        for note in row["notes"]:
            print(f"note ({manifest.hours[i]:g} h): {note}")
    for tp, row in summary.items():
        m = row["metrics"]
        print(f"{tp:>7}: SPECT LNCC {m['identity']['spect_lncc']:.4f} -> {m['registered']['spect_lncc']:.4f}, "
              f"Jacobian <= 0 {row['jacobian_nonpositive_percent_spect_grid']:.3f} %, {row['seconds']:.1f} s")
    print(f"registered {len(pairs)} time points in {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0


def _cmd_dosimetry(args) -> int:
    from .dosimetry import run_dosimetry
    from .series_io import read_series

    manifest = read_series(args.series, **_series_options(args))
    result = run_dosimetry(manifest, args.out, model=args.model, device=args.device, overwrite=args.overwrite,
                           allow=_allow(args), segmentation=args.segmentation,
                           pvc=_pvc_settings(args, len(manifest.hours), manifest), integration=args.time_integration)
    _print_provenance(manifest)
    for msg in result["outputs"].messages:
        print(f"note: {msg}")
    _print_voi_rows(result["outputs"].voi_rows)
    for path in result["dicom"]:
        print(f"DICOM: {path}")
    print(f"{manifest.patient_id}: dosimetry of {len(manifest.hours)} time points in "
          f"{result['report']['seconds']:.1f} s; wrote {args.out}")
    return 0


def _cmd_export_dicom(args) -> int:
    from .dicom_export import export_dicom
    from .dicom_times import parse_user_datetime
    from .series_io import read_series

    manifest = read_series(args.series)
    done = export_dicom(manifest, args.out, units=args.units, style=args.style, cps_per_mbq=args.cps_per_mbq,
                        injection=parse_user_datetime(args.injection), overwrite=args.overwrite)
    extra = f"; scanner calibration in {done['calibration']}" if done["calibration"] else ""
    print(f"wrote {len(done['files'])} DICOM files ({args.style}, {args.units}) to {args.out}{extra}")
    return 0


def _cmd_prepare_data(args) -> int:
    from .preprocess import PreprocessConfig
    from .training.prepare import prepare_series, prepare_simulated

    cfg = PreprocessConfig(spect_normalisation=args.spect_normalisation)
    if args.series:
        files = prepare_series(args.out, args.series, cfg, overwrite=args.overwrite)
    else:
        files = prepare_simulated(args.out, range(args.first_seed, args.first_seed + args.simulate), args.preset, cfg)
    print(f"{len(files)} patient files in {args.out}")
    return 0


def _cmd_train(args) -> int:
    from .training.loop import TrainConfig, train

    try:
        overrides = json.loads(args.network_overrides) if args.network_overrides else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--network-overrides is not valid JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--network-overrides must be a JSON object of configuration fields, got {overrides!r}")
    cfg = TrainConfig(data=args.data, out=args.out, network=args.network, network_overrides=overrides,
                      epochs=args.epochs, lr=args.lr, val_patients=args.val_patients, seed=args.seed,
                      augment=not args.no_augment, checkpoint_every=args.checkpoint_every,
                      max_minutes=args.max_minutes, max_steps=args.max_steps, epoch_steps=args.epoch_steps,
                      lambda_spect=args.lambda_spect, lambda_reg=args.lambda_reg, prealign=args.prealign,
                      init=args.init, loss_mask=args.loss_mask, loss=args.loss, organ_weight=args.organ_weight,
                      lambda_spect_field=args.lambda_spect_field, randomise_intensity=args.randomise_intensity,
                      lambda_image=args.lambda_image)
    result = train(cfg, resume=not args.restart, progress=TerminalProgress("train"))
    print(f"stopped: {result['stopped']} at step {result['step']}; checkpoint {result['checkpoint']}")
    return 0


def _cmd_export_model(args) -> int:
    from .training.export import export_model

    card = export_model(args.checkpoint, args.out, run_dir=args.run, half=not args.float32, overwrite=args.overwrite)
    print(f"wrote {args.out} ({card['parameters']:,} parameters, sha256 {card['sha256'][:16]}...) and its model card")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import run_evaluation

    models = {"corx": args.model}
    for method, given, committed in (("transmorph", args.transmorph, COMPARISON_TRANSMORPH),
                                     ("corx-nocs", args.corx_nocs, COMPARISON_CORX_NOCS)):
        source = given or (committed if committed.is_file() else None)
        if source:
            models[method] = str(source)
    if args.quick:
        result = run_evaluation(args.out, seeds=[5000] if args.seeds is None else args.seeds, patient15=False,
                                protocols={"3 time points (4-48 h)": (4.0, 24.0, 48.0)}, models=models,
                                preset="small", elastix_iterations=min(args.elastix_iterations, 100),
                                refine_iterations=min(args.refine, 5), device=args.device, methods=args.methods,
                                resume=not args.fresh)
    else:
        result = run_evaluation(args.out, models=models, preset=args.preset,
                                elastix_iterations=args.elastix_iterations, refine_iterations=args.refine,
                                device=args.device, methods=args.methods, resume=not args.fresh, **_held_out(args))
    print(result["markdown"])
    return 0


VALIDATION_DIR = Path("output") / "validation-scanner"


def _cmd_simulate_validation(args) -> int:
    """The fixed validation series of `corx evaluate` (held-out seeds and patient15, both protocols), simulated
    once into OUT/<protocol>_<anatomy>_<seed>/ with the reconstructions kept in OUT/cache/; resumable."""
    import shutil

    from .evaluation import PROTOCOL_SITES
    from .simulation import SimulationConfig, simulate_series, write_series
    out = Path(args.out)
    items = [(site, "procedural", seed) for site in args.protocols for seed in args.seeds]
    items += [] if args.no_patient15 else [(site, "patient15", 0) for site in args.protocols]
    t_all = time.perf_counter()
    for n, (site, anatomy, seed) in enumerate(items, start=1):
        folder = out / f"{site}_{anatomy}_{seed}"
        if (folder / "series.json").is_file():
            print(f"[{n}/{len(items)}] {folder.name}: done earlier")
            continue
        cfg = SimulationConfig.preset(args.preset, seed=seed, anatomy=anatomy, times_h=PROTOCOL_SITES[site][1],
                                      imaging=args.imaging)
        t0 = time.perf_counter()
        series = simulate_series(cfg, progress=TerminalProgress(f"[{n}/{len(items)}] {folder.name}"),
                                 scanner_cache=out / "cache")
        partial = out / f".partial-{folder.name}"
        shutil.rmtree(partial, ignore_errors=True)
        write_series(series, partial)
        partial.replace(folder)
        print(f"[{n}/{len(items)}] {folder.name}: {time.perf_counter() - t0:.0f} s")
    print(f"{len(items)} validation series in {out} ({time.perf_counter() - t_all:.0f} s this run)")
    return 0


def _cmd_benchmark(args) -> int:
    import torch

    from .benchmark import (benchmark_commands, benchmark_networks, benchmark_registration, benchmark_voxel_tia,
                            format_command_table, format_network_table, format_stage_table)
    from .network import PAPER_PARAMETER_COUNTS

    print(f"torch {torch.__version__}; {_threads_line()}")
    if not args.skip_networks:
        rows = benchmark_networks(args.configs, repeats=args.repeats, device=args.device)
        print(format_network_table(rows, PAPER_PARAMETER_COUNTS))
    if not args.skip_tia:
        r = benchmark_voxel_tia(repeats=args.repeats)
        print(f"\nvoxel TIA {r['shape']}: median {r['median_s']:.2f} s (min {r['min_s']:.2f} s, "
              f"{r['threads']} threads)")
    if not args.skip_register:
        bench = benchmark_registration(repeats=args.repeats, device=args.device)
        print(f"\nregister() and writing its files, one clinical pair (24 h onto 4 h, seed 5000), bundled model, "
              f"warm process ({_threads_line()}):\n" + format_stage_table(bench))
    if args.commands:
        rows = benchmark_commands(repeats=args.repeats, device=args.device,
                                  log=lambda line: print(line, file=sys.stderr))
        print("\nwhole commands, each a fresh process (start-up, reading, registering, writing), clinical "
              "series seed 5000:\n" + format_command_table(rows))
    if args.methods:
        from .baselines.elastix import elastix_available, set_threads
        from .benchmark import benchmark_methods, format_method_table
        rows = benchmark_methods(args.methods, repeats=args.repeats, device=args.device,
                                 log=lambda line: print(line, file=sys.stderr))
        elastix = "" if elastix_available() else f", itk-elastix {set_threads(None)} threads"   # "" = available
        print(f"\none clinical pair (24 h onto 4 h, seed 5000), side by side in one process ({_threads_line()}"
              f"{elastix}):\n" + format_method_table(rows))
    return 0


def _threads_line() -> str:
    from .engine import threads_in_use
    return f"{threads_in_use()}, {os.cpu_count()} cores"


def _add_model_options(parser) -> None:
    parser.add_argument("--model", default="bundled", help="'bundled' or a checkpoint path")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def _add_dicom_options(parser) -> None:
    parser.add_argument("--injection", help="DICOM input: injection date and time (YYYY-MM-DD HH:MM), overriding the "
                                            "headers' radiopharmaceutical start")
    cal = parser.add_mutually_exclusive_group()
    cal.add_argument("--cps-per-mbq", type=float, help="DICOM input in counts (CNTS): the scanner's 177Lu sensitivity "
                                                       "(cps/MBq), for every SPECT")
    cal.add_argument("--calibration", help="DICOM input in counts: a corx-calibration/1 JSON file of factors per "
                                           "scanner/collimator")


def _add_validation_options(parser, seeds_note: str = "") -> None:
    """The held-out series an evaluation runs on: --seeds, --no-patient15, --protocols, --imaging, --scanner-cache."""
    parser.add_argument("--seeds", type=int, nargs="*",
                        help=f"held-out simulation seeds (training used 100-127; default 5000 5001 5002{seeds_note}; "
                             "--seeds with none: patient15 only)")
    parser.add_argument("--no-patient15", action="store_true", help="leave out the patient15-anatomy series")
    parser.add_argument("--protocols", nargs="+", choices=["snuh", "smc"], default=["snuh", "smc"],
                        help="the paper's time-point protocols to run: SNUH 4, 24, 48, 120 h; SMC 0.5, 4, 24, 48 h "
                             "(parts of one full run can go to separate processes with the same --out)")
    parser.add_argument("--imaging", choices=["gaussian", "scanner"], default="gaussian",
                        help="simulated SPECT: gaussian (image-space blur, fast) or scanner (projection + OSEM; "
                             "reconstructions reused from --scanner-cache)")
    parser.add_argument("--scanner-cache", default=str(VALIDATION_DIR / "cache"),
                        help="reconstructions of the scanner imaging, filled by corx simulate-validation "
                             "(default output/validation-scanner/cache)")


def _held_out(args, default=(5000, 5001, 5002)) -> dict:
    """run_evaluation's / run_pvc_evaluation's series options from :func:`_add_validation_options`."""
    from .evaluation import PROTOCOL_SITES
    return {"seeds": list(default) if args.seeds is None else args.seeds, "patient15": not args.no_patient15,
            "protocols": dict(PROTOCOL_SITES[site] for site in args.protocols), "imaging": args.imaging,
            "scanner_cache": args.scanner_cache if args.imaging == "scanner" else None}


def _add_pvc_options(parser) -> None:
    from TIAMappingLib.pvc import METHODS
    parser.add_argument("--pvc", choices=METHODS, default="none",
                        help="partial-volume correction of the VOI values: rc (recovery coefficients), gtm (geometric "
                             "transfer matrix), rbv (GTM + voxel-wise: also corrected SPECT, TIA and dose maps)")
    parser.add_argument("--psf-fwhm-mm", type=float, nargs="+", metavar="MM",
                        help="reconstructed SPECT resolution for the correction: one FWHM or three (x, y, z); "
                             "default: series.json's psf_fwhm_mm, else the --pvc-calibration's")
    parser.add_argument("--pvc-calibration", metavar="JSON",
                        help="a phantom calibration from corx calibrate-pvc (FWHM and recovery curve)")


def _add_integration_option(parser, several: bool = False) -> None:
    from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION, INTEGRATIONS
    text = "; ".join(f"{k}: {v}" for k, v in INTEGRATIONS.items())
    if several:
        parser.add_argument("--time-integration", nargs="+", choices=list(INTEGRATIONS), default=[DEFAULT_INTEGRATION],
                            help=f"time integrations to compare, side by side ({text}; default {DEFAULT_INTEGRATION})")
    else:
        parser.add_argument("--time-integration", choices=list(INTEGRATIONS), default=DEFAULT_INTEGRATION,
                            help=f"how each voxel's and VOI's time-activity curve is integrated ({text}; default "
                                 f"{DEFAULT_INTEGRATION})")


def _pvc_settings(args, n_times: int, manifest=None):
    """The PVC settings from --pvc, --psf-fwhm-mm, --pvc-calibration and the manifest (command line first)."""
    from TIAMappingLib.pvc import PVCSettings
    return PVCSettings.for_series(args.pvc, args.psf_fwhm_mm, args.pvc_calibration, manifest, n_times)


def _print_voi_rows(rows) -> None:
    for row in rows:
        if row["status"] != "ok":
            print(f"warning: segment '{row['segment']}': {row['status']}")
            continue
        dose = f", mean dose {row['mean_gy']:.2f} Gy" if "mean_gy" in row else ""
        text = (f"{row['segment']:>24}: {row['volume_ml']:8.1f} mL, organ TIA {row.get('organ_tia_mbq_h', float('nan')):10.1f}"
                f" MBq h, voxel TIA sum {row['voxel_tia_sum_mbq_h']:10.1f} MBq h{dose}")
        if "pvc_tia_mbq_h" in row:
            text += f", {row['pvc']}-corrected {row['pvc_tia_mbq_h']:10.1f} MBq h (x{row['pvc_factor']:.2f})"
            if row.get("pvc_warning"):
                text += f"  [{row['pvc_warning']}]"
        print(text)


def _add_allow(parser) -> None:
    from .validate import CHECKS
    parser.add_argument("--allow", nargs="+", choices=list(CHECKS), metavar="CHECK", default=[],
                        help="turn these input checks into warnings (printed and stored with the results); "
                             "one of: " + ", ".join(CHECKS))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="corx", description="CoRX: SPECT/CT registration and 177Lu voxel dosimetry. "
                                "Units: CT in HU, SPECT in Bq/mL, times in hours after injection, distances in mm.")
    p.add_argument("--version", action="version", version=f"corx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a serial 177Lu-DOTATATE SPECT/CT series with ground truth")
    s.add_argument("--out", required=True, help="output folder (series.json, volumes, truth/, preview.png)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the simulated patient (default 0)")
    s.add_argument("--anatomy", choices=["procedural", "patient15"], default="procedural",
                   help="patient15 is the real-anatomy validation phantom: never train on it")
    s.add_argument("--times", type=float, nargs="+", default=[4.0, 24.0, 48.0, 120.0], help="hours after injection")
    s.add_argument("--reference-index", type=int, default=0, help="index of the reference (fixed) time point")
    s.add_argument("--injected-mbq", type=float, default=7400.0, help="injected activity in MBq (default 7400)")
    s.add_argument("--preset", choices=["clinical", "small"], default="clinical",
                   help="clinical grids (CT 1.5x1.5x3.75 mm, SPECT 4.42 mm) or small ones (CT 3x3x5 mm, SPECT 7 mm)")
    s.add_argument("--imaging", choices=["gaussian", "scanner"], default="gaussian",
                   help="gaussian: image-space blur and Poisson noise (fast); scanner: projection with attenuation "
                        "and collimator response, Poisson counts, OSEM (needs the 'scanner' extra, minutes per time "
                        "point)")
    s.add_argument("--scanner-views", type=int,
                   help="scanner imaging: views over 360 degrees in the same 30 min (default 60 x 30 s)")
    s.add_argument("--scanner-iterations", type=int, help="scanner imaging: OSEM iterations (default 4)")
    s.add_argument("--scanner-subsets", type=int, help="scanner imaging: OSEM subsets (default 10)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing series in --out")
    s.set_defaults(func=_cmd_simulate)

    ph = sub.add_parser("simulate-phantom", help="the IEC (NEMA) body phantom with six spheres, imaged like a "
                                                 "patient: for resolution and recovery calibration")
    ph.add_argument("--out", required=True, help="output folder: spect, ct, truth_activity, spheres.seg.nrrd, "
                                                 "phantom.json")
    ph.add_argument("--imaging", choices=["gaussian", "scanner"], default="scanner", help="as for simulate")
    ph.add_argument("--ratio", type=float, default=8.0, help="sphere : background concentration (default 8)")
    ph.add_argument("--background-kbq-per-ml", type=float, default=20.0, help="background (default 20 kBq/mL)")
    ph.add_argument("--fwhm-mm", type=float, default=13.0, help="gaussian imaging: FWHM (default 13 mm)")
    ph.add_argument("--spacing-mm", type=float, default=4.42, help="SPECT voxel size (default 4.42 mm, 128^2)")
    ph.add_argument("--scanner-views", type=int, help="scanner imaging: views in the same 30 min (default 60)")
    ph.add_argument("--seed", type=int, default=0, help="noise seed")
    ph.add_argument("--overwrite", action="store_true", help="replace an earlier phantom in --out")
    ph.set_defaults(func=_cmd_simulate_phantom)

    xd = sub.add_parser("export-dicom", help="write a series (e.g. a simulated one) as scanner-like DICOM: CT slices "
                                             "and an NM multi-frame SPECT per session")
    xd.add_argument("series", help="a series.json or its folder")
    xd.add_argument("--out", required=True, help="output folder for the DICOM files")
    xd.add_argument("--units", choices=["BQML", "CNTS"], default="BQML",
                    help="SPECT values: Bq/mL, or counts of a scanner of --cps-per-mbq (then calibration.json too)")
    xd.add_argument("--style", choices=["classic", "enhanced"], default="classic",
                    help="classic: NM image layout, one rescale, DA/TM times; enhanced: per-frame functional groups, "
                         "real-world value mapping, decay-corrected to the administration, DT times with UTC offset")
    xd.add_argument("--cps-per-mbq", type=float, default=9.6, help="sensitivity of the simulated scanner (cps/MBq)")
    xd.add_argument("--injection", default="2026-03-02 09:30", help="injection date and time (YYYY-MM-DD HH:MM)")
    xd.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    xd.set_defaults(func=_cmd_export_dicom)

    t = sub.add_parser("tia", help="TIA, fit-quality, dose maps and VOI tables from registered SPECT volumes")
    t.add_argument("--spect", nargs="+", required=True, help="registered SPECT volumes (Bq/mL, one grid)")
    t.add_argument("--times", type=float, nargs="+", required=True, help="hours after injection, one per SPECT")
    t.add_argument("--segmentation", help="label map or Slicer .seg.nrrd (any grid; resampled onto the SPECT)")
    t.add_argument("--ct", help="CT in HU (any grid) for the mass density of the dose calculation")
    t.add_argument("--stp-half-life", type=float,
                   help="population effective half-life in hours, for a single time point "
                        "(mono-exponential through it)")
    t.add_argument("--out", required=True, help="output folder for the maps (NIfTI) and tables (CSV)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the earlier result set in --out (all of it: no stale dose or VOI table is kept)")
    _add_pvc_options(t)
    _add_integration_option(t)
    _add_allow(t)
    t.set_defaults(func=_cmd_tia)

    sv = sub.add_parser("simulate-validation", help="the fixed validation series (held-out seeds, patient15, both "
                                                    "protocols), e.g. in scanner imaging; resumable, for evaluate")
    sv.add_argument("--out", default=str(VALIDATION_DIR), help="folder of the series and their cache/ "
                                                               "(default output/validation-scanner)")
    sv.add_argument("--imaging", choices=["gaussian", "scanner"], default="scanner", help="as for simulate")
    sv.add_argument("--seeds", type=int, nargs="+", default=[5000, 5001, 5002],
                    help="held-out procedural patients (default 5000 5001 5002, as corx evaluate)")
    sv.add_argument("--protocols", nargs="+", choices=["snuh", "smc"], default=["snuh", "smc"],
                    help="the paper's time-point protocols (as for evaluate)")
    sv.add_argument("--no-patient15", action="store_true", help="leave out the patient15-anatomy series")
    sv.add_argument("--preset", choices=["clinical", "small"], default="clinical", help="grid sizes (see simulate)")
    sv.set_defaults(func=_cmd_simulate_validation)

    d = sub.add_parser("demo", help="the main job on a simulated patient, end to end, into an output folder")
    d.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    d.add_argument("--input", help="your own series (a series.json or its folder) instead of a simulated one")
    d.add_argument("--seed", type=int, default=1001, help="simulated patient (default 1001, held out of training)")
    d.add_argument("--anatomy", choices=["procedural", "patient15"], default="procedural",
                   help="procedural anatomy or the real patient15 anatomy (validation only)")
    d.add_argument("--preset", choices=["clinical", "small"], default="clinical", help="grid sizes (see simulate)")
    d.add_argument("--pvc", choices=["none", "rc", "gtm", "rbv"], default="rbv",
                   help="partial-volume correction beside the uncorrected values (default rbv; a simulated patient "
                        "is corrected with the IEC phantom calibrated by the same imaging chain)")
    _add_integration_option(d)
    _add_model_options(d)
    _add_allow(d)
    d.set_defaults(func=_cmd_demo)

    mi = sub.add_parser("model-info", help="parameter counts of every named network next to the paper's")
    mi.add_argument("--checkpoint", help="also describe this checkpoint ('bundled' for the shipped model)")
    mi.set_defaults(func=_cmd_model_info)

    r = sub.add_parser("register", help="register a moving SPECT/CT onto a fixed SPECT/CT with a CoRX model")
    for name, what in (("fixed-ct", "the reference CT (HU)"), ("fixed-spect", "the reference SPECT (Bq/mL)"),
                       ("moving-ct", "the CT to align (HU)"), ("moving-spect", "the SPECT to align (Bq/mL)")):
        r.add_argument(f"--{name}", required=True, help=f"{what}: NIfTI, NRRD, MHA, or a DICOM series (file or "
                                                        "folder)")
    r.add_argument("--out", required=True, help="output folder: fields (LPS mm), warped volumes, Jacobian, metrics")
    _add_model_options(r)
    r.add_argument("--refine", type=int, default=0, help="instance-optimisation iterations after the network")
    r.add_argument("--no-spect-offset", action="store_true",
                   help="do not fit the SPECT/CT offset and organ shift: the SPECT follows the CT-driven field "
                        "exactly")
    r.add_argument("--no-organ-shift", action="store_true",
                   help="fit the SPECT/CT translation only, not the cranio-caudal shift of the uptake organs")
    r.add_argument("--network-field", action="store_true",
                   help="also write the CT-driven field on the network grid (field_network.nrrd, about 23 MB)")
    r.add_argument("--native-ct", action="store_true",
                   help="warp the moving CT onto the fixed CT's own grid (full resolution, ~10 MB more per pair); "
                        "default: onto the fixed SPECT grid, the grid of the dosimetry")
    r.add_argument("--overwrite", action="store_true", help="replace the earlier result set in --out")
    _add_dicom_options(r)
    _add_allow(r)
    r.set_defaults(func=_cmd_register)

    rs = sub.add_parser("register-series", help="register every time point of a series.json onto its reference "
                                                "(the model loaded once)")
    rs.add_argument("series", help="a series.json (format corx-series/1) or its folder")
    rs.add_argument("--out", required=True, help="output folder: t<hours>h/ per moving time point (as register "
                                                 "writes), registration_qa.json")
    _add_model_options(rs)
    rs.add_argument("--no-spect-offset", action="store_true", help="as for register")
    rs.add_argument("--no-organ-shift", action="store_true", help="as for register")
    rs.add_argument("--network-field", action="store_true", help="as for register")
    rs.add_argument("--native-ct", action="store_true", help="as for register")
    rs.add_argument("--overwrite", action="store_true", help="replace the earlier result sets in --out")
    _add_dicom_options(rs)
    _add_allow(rs)
    rs.set_defaults(func=_cmd_register_series)

    do = sub.add_parser("dosimetry", help="a series (series.json or a folder of DICOM files) to TIA and dose: "
                                          "registration, maps, VOI table; RT Dose and registrations as DICOM")
    do.add_argument("series", help="a series.json, its folder, or a folder of one patient's DICOM files")
    do.add_argument("--out", required=True, help="output folder: registration/, tia/, dicom/, dosimetry.json")
    do.add_argument("--segmentation", help="label map or .seg.nrrd for the VOI table (default: the manifest's)")
    _add_model_options(do)
    do.add_argument("--overwrite", action="store_true", help="replace the earlier result sets in --out")
    _add_dicom_options(do)
    _add_pvc_options(do)
    _add_integration_option(do)
    _add_allow(do)
    do.set_defaults(func=_cmd_dosimetry)

    cp = sub.add_parser("calibrate-pvc", help="SPECT resolution (FWHM) and recovery curve from a phantom scan, for "
                                              "--pvc: a folder from simulate-phantom, or your own scan")
    cp.add_argument("phantom", nargs="?", help="a folder written by corx simulate-phantom (spect.nii.gz, ct.nii.gz, "
                                               "spheres.seg.nrrd, phantom.json)")
    cp.add_argument("--spect", help="your phantom's reconstructed SPECT (Bq/mL)")
    cp.add_argument("--ct", help="its CT (HU): the body outline")
    cp.add_argument("--spheres", help="segmentation with one segment per sphere (names stating the diameter, e.g. "
                                      "sphere_37mm, or --diameters)")
    cp.add_argument("--diameters", type=float, nargs="+", metavar="MM", help="inner sphere diameters, in segment order")
    cp.add_argument("--sphere-kbq-ml", type=float, help="true sphere concentration at scan time (kBq/mL)")
    cp.add_argument("--background-kbq-ml", type=float, help="true background concentration at scan time (kBq/mL)")
    cp.add_argument("--out", required=True, help="the calibration file to write (JSON), e.g. pvc_calibration.json")
    cp.add_argument("--overwrite", action="store_true", help="replace an earlier calibration file")
    cp.set_defaults(func=_cmd_calibrate_pvc)

    ep = sub.add_parser("evaluate-pvc", help="partial-volume correction against the truth on held-out simulated "
                                             "series: VOI TIA error per class, rc/gtm/rbv vs uncorrected")
    ep.add_argument("--out", default="output/eval-pvc", help="folder for pvc_report.md, pvc.csv, the calibration")
    _add_validation_options(ep)
    ep.add_argument("--pvc-calibration", help="a calibration from corx calibrate-pvc (default: the IEC phantom "
                                              "imaged like the patients, calibrated into --out)")
    ep.add_argument("--registrations", nargs="+", choices=["ideal", "corx"], default=["ideal", "corx"],
                    help="ideal: the true motion; corx: the bundled model")
    ep.add_argument("--preset", choices=["clinical", "small"], default="clinical", help="grid sizes")
    ep.add_argument("--no-sensitivity", action="store_true", help="skip the FWHM +-2 mm and shifted-segmentation runs")
    _add_integration_option(ep, several=True)
    _add_model_options(ep)
    ep.set_defaults(func=_cmd_evaluate_pvc)

    pd = sub.add_parser("prepare-data", help="pack training patients onto the network grid")
    pd.add_argument("--out", required=True, help="folder for the packed patient files")
    src = pd.add_mutually_exclusive_group(required=True)
    src.add_argument("--simulate", type=int, help="number of simulated procedural patients")
    src.add_argument("--series", help="a series.json, or a folder of series folders (your own data)")
    pd.add_argument("--first-seed", type=int, default=100, help="seed of the first simulated patient (default 100)")
    pd.add_argument("--preset", choices=["clinical", "small", "randomised"], default="clinical",
                    help="grid sizes (see simulate); randomised: clinical grids with each patient's protocol, "
                         "resolution, counts, noise, motion and field of view drawn at random (supervised training)")
    pd.add_argument("--spect-normalisation", choices=["log", "minmax"], default="log",
                    help="SPECT intensity normalisation: min-max then log (the paper's, default) or min-max")
    pd.add_argument("--overwrite", action="store_true",
                    help="with --series: replace earlier patient files of the same ids (simulated patients already "
                         "in --out are kept, so an interrupted preparation continues)")
    pd.set_defaults(func=_cmd_prepare_data)

    tr = sub.add_parser("train", help="unsupervised or supervised training (resumes from OUT/last.pt); works under torchrun")
    tr.add_argument("--data", required=True, help="folder of patient files from prepare-data")
    tr.add_argument("--out", required=True, help="run folder: last.pt (resume), best.pt, history")
    tr.add_argument("--network", default="corx-cpu", help="a named configuration (corx model-info lists them)")
    tr.add_argument("--network-overrides", help='JSON, e.g. \'{"diffeomorphic": true}\'')
    tr.add_argument("--epochs", type=int, default=10, help="passes over the training pairs (default 10)")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    tr.add_argument("--lambda-spect", type=float, default=0.1, help="weight of the SPECT LNCC term (paper 0.1)")
    tr.add_argument("--lambda-reg", type=float, default=8e-4, help="weight of the diffusion regulariser (paper 8e-4)")
    tr.add_argument("--val-patients", type=int, default=2, help="patients held out for validation (default 2)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the split, shuffles and augmentation")
    tr.add_argument("--no-augment", action="store_true", help="no left-right flips or z rotations (+-5 degrees)")
    tr.add_argument("--checkpoint-every", type=int, default=25, help="steps between saves of last.pt (default 25)")
    tr.add_argument("--max-minutes", type=float, help="stop (and checkpoint) after this many minutes of wall time")
    tr.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many steps in all")
    tr.add_argument("--epoch-steps", type=int,
                    help="steps per epoch, each followed by validation (default: every training pair once)")
    tr.add_argument("--prealign", choices=["rigid", "none"], default="rigid",
                    help="rigid CT-CT fit before the network (stored in the model and used again at inference)")
    tr.add_argument("--init", help="start from this model's weights (fine-tuning), e.g. the bundled model")
    tr.add_argument("--loss-mask", choices=["fov", "none"], default="fov",
                    help="fov: the image terms count only where both scans hold data (not their cut faces); "
                         "none: everywhere, as the bundled v1 was trained")
    tr.add_argument("--loss", choices=["unsupervised", "supervised", "both"], default="unsupervised",
                    help="unsupervised: the paper's image loss (default; your own data); supervised: endpoint error "
                         "against the true CT and SPECT fields of simulated patients; both: their sum")
    tr.add_argument("--organ-weight", type=float, default=3.0,
                    help="supervised: extra weight of the uptake organs and tumours in the endpoint error (default 3)")
    tr.add_argument("--lambda-spect-field", type=float, default=1.0,
                    help="supervised: weight of the SPECT field's endpoint error (default 1)")
    tr.add_argument("--lambda-image", type=float, default=1.0,
                    help="both: weight of the paper's image terms beside the endpoint error (mm; default 1, at which "
                         "they barely count; scripts/measure_loss_gradients.py compares their gradients)")
    tr.add_argument("--randomise-intensity", action="store_true",
                    help="draw each image's contrast, brightness and noise at random per step")
    tr.add_argument("--restart", action="store_true", help="ignore OUT/last.pt")
    tr.set_defaults(func=_cmd_train)

    ex = sub.add_parser("export-model", help="float16 weights + model card from a training checkpoint")
    ex.add_argument("--checkpoint", required=True, help="a training checkpoint (e.g. run/best.pt)")
    ex.add_argument("--out", required=True, help="the model file to write (.pt); its card goes beside it (.json, .md)")
    ex.add_argument("--run", help="training folder (history and wall time for the card)")
    ex.add_argument("--float32", action="store_true", help="keep float32 weights (default float16)")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export (weights and card together)")
    ex.set_defaults(func=_cmd_export_model)

    ev = sub.add_parser("evaluate", help="CoRX vs ANTs SyN, Elastix (three set-ups), TransMorph and ablations on "
                                         "series with ground truth")
    ev.add_argument("--out", default="output/evaluation", help="report, tables, figures and resume/ (default "
                                                                "output/evaluation)")
    _add_validation_options(ev, "; with --quick 5000")
    ev.add_argument("--model", default="bundled", help="the CoRX checkpoint")
    ev.add_argument("--transmorph", help="a TransMorph checkpoint trained the same way (default: the committed "
                                         "training_checkpoints/models/transmorph-cpu.pt of a source checkout)")
    ev.add_argument("--corx-nocs", help="a CoRX-without-cross-stitch checkpoint trained the same way (default: the "
                                        "committed training_checkpoints/models/corx-cpu-nocs.pt when present)")
    ev.add_argument("--elastix-iterations", type=int, default=1000,
                    help="Elastix iterations per resolution (paper set-up: 1000, 4 resolutions)")
    ev.add_argument("--refine", type=int, default=20, help="refinement iterations of the corx-refine method")
    ev.add_argument("--preset", choices=["clinical", "small"], default="clinical", help="grid sizes (see simulate)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    ev.add_argument("--quick", action="store_true",
                    help="small patients (seed 5000 unless --seeds), 3 time points (4-48 h), 100 Elastix iterations, "
                         "5 refinement iterations")
    ev.add_argument("--methods", nargs="+", choices=ROW_ORDER, metavar="METHOD",
                    help="a subset (default: every available): " + ", ".join(ROW_ORDER))
    ev.add_argument("--fresh", action="store_true",
                    help="measure every field again (default: reuse the fields of 30 s or more, e.g. Elastix's, that "
                         "an interrupted run with the same settings left in OUT/resume/)")
    ev.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser("benchmark", help="forward time and peak memory per configuration; voxel TIA time; "
                                         "register() time per pair")
    b.add_argument("--configs", nargs="+", default=["corx-paper", "corx-paper-nocs", "transmorph-paper",
                                                    "corx-cpu", "corx-cpu-nocs", "transmorph-cpu"],
                   help="network configurations to time (default: the paper's and the CPU-sized ones)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up; the median is printed")
    b.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    b.add_argument("--skip-networks", action="store_true", help="skip the forward-pass table")
    b.add_argument("--skip-tia", action="store_true", help="skip timing the voxel TIA fit")
    b.add_argument("--skip-register", action="store_true",
                   help="skip timing register() and writing its files, stage by stage, on a clinical pair")
    b.add_argument("--commands", action="store_true",
                   help="also time the whole corx register and corx register-series commands, each a fresh process")
    b.add_argument("--methods", nargs="+", choices=registering_rows(), metavar="METHOD", default=[],
                   help="also time these registration methods side by side on one clinical pair, with the whole "
                        "corx register() (e.g. ants-syn elastix-dd elastix-ct-spect corx); one of: "
                        + ", ".join(registering_rows()))
    b.set_defaults(func=_cmd_benchmark)
    return p


def main(argv=None) -> int:
    """Run one sub-command. Bad input, a refused output or a failed write: one line on stderr, exit 2
    (nothing partial is left); Ctrl-C: exit 130."""
    one_malloc_arena()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, GeometryError, ImageFileError, OSError, RuntimeError) as exc:
        print(f"corx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
