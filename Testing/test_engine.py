"""Registration engine: preprocessing geometry, native outputs, activity preservation, bad input, CLI."""
import json

import numpy as np
import pytest
import torch

from CoRXRegistrationLib.cli import main as corx_main
from CoRXRegistrationLib.engine import (FIELD_STEP_MM, DeviceError, load_model, prepare_fixed, quantised, register,
                                        select_device, write_registration)
from CoRXRegistrationLib.geometry import Geometry, GeometryError, displacement_voxels_to_lps
from CoRXRegistrationLib.imageio import read_displacement_field, read_image
from CoRXRegistrationLib.network import build_network, named_config
from CoRXRegistrationLib.network.checkpoint import save_checkpoint
from CoRXRegistrationLib.preprocess import PreprocessConfig, network_grid, to_network
from CoRXRegistrationLib.resample import resample

TINY_PREP = PreprocessConfig(grid_size=(64, 64, 64), spacing_mm=7.74)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(named_config("corx-tiny"))
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", net, TINY_PREP.to_dict())


def session(series, i):
    return series.sessions()[i]


def test_network_grid_is_centred_on_the_body_with_fixed_spect_directions(small_series):
    fixed = session(small_series, 0)
    grid = network_grid(fixed, TINY_PREP)
    assert grid.shape == (64, 64, 64) and grid.spacing == (7.74,) * 3
    np.testing.assert_allclose(grid.direction, fixed.spect_geometry.direction)
    body = np.argwhere(fixed.ct > -500)
    lo, hi = body.min(0)[::-1], body.max(0)[::-1]
    np.testing.assert_allclose(grid.centre_lps(), fixed.ct_geometry.index_to_lps((lo + hi) / 2), atol=1e-3)
    ct, spect = to_network(fixed, grid, TINY_PREP)
    assert 0.0 <= ct.min() and ct.max() <= 1.0 and spect.max() == pytest.approx(1.0)


def test_register_produces_native_outputs_on_the_fixed_grids(small_series, tiny_model, tmp_path):
    fixed, moving = session(small_series, 0), session(small_series, 2)
    seen = []
    result = register(fixed, moving, model=tiny_model, device="cpu", refine_iterations=2,
                      progress=lambda f, t="": seen.append(f))
    assert seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))
    assert result.field_spect.shape == fixed.spect_geometry.shape + (3,)
    assert result.warped_spect.shape == fixed.spect_geometry.shape
    assert result.warped_ct.shape == fixed.ct_geometry.shape and result.warped_ct_geometry is fixed.ct_geometry
    # the SPECT field is held at the resolution it is stored with, so the files and the maps agree
    np.testing.assert_array_equal(quantised(result.field_spect, FIELD_STEP_MM), result.field_spect)
    assert np.isfinite(result.field_spect).all() and np.isfinite(result.jacobian_spect).all()
    for stage in ("identity", "registered"):
        assert set(result.metrics[stage]) == {"ct_l1", "ct_ssim", "spect_ssim", "spect_lncc",
                                              "jacobian_nonpositive_percent"}
    files = write_registration(result, tmp_path / "reg")
    field, g = read_displacement_field(files["field_spect"])
    assert g.same_grid(fixed.spect_geometry) and np.allclose(field, result.field_spect, atol=1e-4)
    import SimpleITK as sitk
    rgb = sitk.ReadImage(files["deformation_rgb"])
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetPixelID() == sitk.sitkVectorUInt8
    assert rgb.GetSize() == fixed.spect_geometry.size_xyz
    with pytest.raises(FileExistsError):
        write_registration(result, tmp_path / "reg")
    summary = json.loads((tmp_path / "reg" / "metrics.json").read_text())
    assert summary["grids"]["warped_ct"] == "fixed CT"


def test_a_ct_read_as_16_bit_integers_registers_as_the_same_ct_in_float(small_series_dir, tiny_model):
    """A 16-bit CT file stays int16 in memory (half the memory); the network still sees it interpolated,
    not rounded, so the registration is that of the same CT held as float32."""
    from CoRXRegistrationLib.preprocess import SpectCt
    from CoRXRegistrationLib.series_io import read_series
    sessions = read_series(small_series_dir).sessions()
    assert all(s.ct.dtype == np.int16 and s.spect.dtype == np.float32 for s in sessions)
    as_float = [SpectCt(s.ct.astype(np.float32), s.ct_geometry, s.spect, s.spect_geometry) for s in sessions]
    a = register(sessions[0], sessions[1], model=tiny_model, device="cpu")
    b = register(as_float[0], as_float[1], model=tiny_model, device="cpu")
    np.testing.assert_array_equal(a.field_spect, b.field_spect)
    np.testing.assert_array_equal(a.warped_spect, b.warped_spect)
    np.testing.assert_array_equal(a.warped_ct, np.rint(b.warped_ct).astype(np.int16))


def test_warped_ct_on_the_spect_grid_is_the_same_warp_sampled_there(small_series, tiny_model, tmp_path):
    """``ct_grid="spect"`` (what ``corx register`` writes by default) warps the moving CT through the same
    CT-driven field onto the fixed SPECT grid; the warp onto the CT grid, resampled there, agrees with it
    up to the two interpolations."""
    import SimpleITK as sitk
    fixed, moving = session(small_series, 0), session(small_series, 2)
    native = register(fixed, moving, model=tiny_model, device="cpu", qa_metrics=False)
    small = register(fixed, moving, model=tiny_model, device="cpu", qa_metrics=False, ct_grid="spect")
    np.testing.assert_array_equal(native.field_network, small.field_network)
    assert small.warped_ct_geometry is fixed.spect_geometry and small.warped_ct.shape == fixed.spect_geometry.shape
    resampled = resample(native.warped_ct, fixed.ct_geometry, fixed.spect_geometry, fill=-1000.0)
    body = resampled > -500
    assert body.mean() > 0.05
    assert np.median(np.abs(resampled - small.warped_ct)[body]) < 40.0      # HU, after 2 vs 1 interpolation
    files = write_registration(small, tmp_path / "small")
    image = sitk.ReadImage(files["warped_ct"])
    assert image.GetSize() == fixed.spect_geometry.size_xyz and image.GetPixelID() == sitk.sitkInt16
    assert json.loads((tmp_path / "small" / "metrics.json").read_text())["grids"]["warped_ct"] == "fixed SPECT"
    with pytest.raises(ValueError, match="ct_grid"):
        register(fixed, moving, model=tiny_model, device="cpu", ct_grid="native")


def test_stored_values_keep_their_sign():
    values = np.array([-1.3, -1e-4, 0.0, 1e-4, 0.9991, 2.5], np.float32)
    q = quantised(values, 2.0 ** -8, keep_sign=True)
    assert np.all(np.abs(q - values) <= 2.0 ** -8)
    assert np.all((q > 0) == (values > 0)) and q.dtype == np.float32
    assert np.all(np.rint(q * 256) == q * 256)
    nearest = quantised(values, 2.0 ** -8)
    assert np.all(np.abs(nearest - values) <= 2.0 ** -9) and nearest[3] == 0.0


def test_spect_warp_preserves_voi_activity_for_a_known_translation(small_series):
    """Warping a SPECT by a translation keeps the activity of a VOI within interpolation error."""
    g = small_series.spect_geometry[0]
    spect = small_series.spect[0]
    labels = small_series.labels_spect
    shift = np.array([5.3, -3.1, 4.4], np.float32)          # mm, not a multiple of the voxel size
    moved_grid = Geometry(g.shape, g.spacing, tuple(np.asarray(g.origin) + shift), g.direction)
    # the same activity recorded by a scanner whose frame is displaced: moving(p) lives at p + shift
    field = np.broadcast_to(shift, g.shape + (3,)).copy()
    warped = resample(spect, moved_grid, g, displacement=field)
    np.testing.assert_allclose(warped, spect, atol=1e-3 * spect.max())
    # and a genuine sub-voxel shift: total activity in a large VOI (liver) changes < 1 %
    shifted = resample(spect, g, g, displacement=np.broadcast_to(np.float32([2.2, 0, 0]), g.shape + (3,)).copy())
    back = resample(shifted, g, g, displacement=np.broadcast_to(np.float32([-2.2, 0, 0]), g.shape + (3,)).copy())
    liver = np.isin(labels, [l for l, n in small_series.phantom.label_names().items() if n == "liver"])
    assert liver.sum() > 100
    assert back[liver].sum() == pytest.approx(spect[liver].sum(), rel=0.01)


def test_bad_inputs_give_clear_errors(small_series, tiny_model):
    fixed = session(small_series, 0)
    nan = session(small_series, 1)
    nan.spect = nan.spect.copy()
    nan.spect[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        register(fixed, nan, model=tiny_model, device="cpu")
    wrong = session(small_series, 1)
    wrong.ct = wrong.ct[:-1]
    with pytest.raises(GeometryError, match="does not match its geometry"):
        register(fixed, wrong, model=tiny_model, device="cpu")
    empty = session(small_series, 1)
    empty.spect = np.zeros_like(empty.spect)
    with pytest.raises(ValueError, match="no positive"):
        register(fixed, empty, model=tiny_model, device="cpu")
    far = session(small_series, 1)
    g = far.spect_geometry
    far.spect_geometry = Geometry(g.shape, g.spacing, tuple(np.asarray(g.origin) + 5000.0), g.direction)
    with pytest.raises(GeometryError, match="does not overlap"):
        register(fixed, far, model=tiny_model, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            select_device("cuda")
    assert select_device("auto")[0].type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu")


def test_cancel_stops_the_registration(small_series, tiny_model):
    from CoRXRegistrationLib.engine import RegistrationCancelled
    with pytest.raises(RegistrationCancelled):
        register(session(small_series, 0), session(small_series, 1), model=tiny_model, device="cpu",
                 cancel=lambda: True)


def test_corx_register_command_and_model_info(small_series_dir, tiny_model, tmp_path, capsys):
    d = small_series_dir
    manifest = json.loads((d / "series.json").read_text())
    tp = manifest["time_points"]
    args = ["register", "--fixed-ct", str(d / tp[0]["ct"]), "--fixed-spect", str(d / tp[0]["spect"]),
            "--moving-ct", str(d / tp[1]["ct"]), "--moving-spect", str(d / tp[1]["spect"]),
            "--model", str(tiny_model), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert corx_main(args) == 0
    out = capsys.readouterr().out
    assert "registered:" in out and (tmp_path / "out" / "field_spect.nrrd").is_file()
    assert "threads" in out and "SimpleITK" in out                # how many threads it used
    _, ct_grid = read_image(tmp_path / "out" / "warped_ct.nii.gz")
    _, spect_grid = read_image(d / tp[0]["spect"])
    assert ct_grid.same_grid(spect_grid)                           # by default on the fixed SPECT grid
    assert corx_main(args[:-1] + [str(tmp_path / "native"), "--native-ct"]) == 0
    _, native_grid = read_image(tmp_path / "native" / "warped_ct.nii.gz")
    assert native_grid.same_grid(read_image(d / tp[0]["ct"])[1])
    capsys.readouterr()
    assert "spect_organ_shift_mm_superior" in json.loads((tmp_path / "out" / "metrics.json").read_text())
    translation = args.copy()
    translation[translation.index("--out") + 1] = str(tmp_path / "translation")
    assert corx_main(translation + ["--no-organ-shift"]) == 0
    summary = json.loads((tmp_path / "translation" / "metrics.json").read_text())
    assert summary["spect_organ_shift_mm_superior"] == 0.0 and "organ" not in capsys.readouterr().out
    assert corx_main(args) == 2                      # refuses to overwrite without --overwrite
    bad = args.copy()
    bad[bad.index("--model") + 1] = str(tmp_path / "nope.pt")
    bad[bad.index("--out") + 1] = str(tmp_path / "out2")
    assert corx_main(bad) == 2
    assert "does not exist" in capsys.readouterr().err
    assert corx_main(["model-info"]) == 0
    info = capsys.readouterr().out
    assert "20,800,563" in info and "9,557,138" in info


def test_a_network_spect_head_moves_the_spect_and_not_the_ct(small_series, tmp_path):
    """A model with a SPECT head: its correction (here a constant 0.5 voxel = 3.87 mm along the grid's z, set
    through the head's bias) is added to the field the SPECT follows, before any post-fit, and the CT keeps the
    network field."""
    torch.manual_seed(0)
    net = build_network(named_config("corx-tiny", spect_correction=True))
    with torch.no_grad():
        net.spect_head.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
    path = save_checkpoint(tmp_path / "head.pt", net, TINY_PREP.to_dict())
    fixed, moving = session(small_series, 0), session(small_series, 2)
    plain = register(fixed, moving, model=path, device="cpu", spect_offset=False, native_outputs=False,
                     qa_metrics=False)
    expected = displacement_voxels_to_lps(np.array([0.5, 0.0, 0.0], np.float32).reshape(3, 1, 1, 1), plain.grid)
    # the correction acts before the rigid pre-alignment's rotation (a few degrees): equal up to that turn
    deviation = np.linalg.norm(plain.spect_correction_mm - expected.reshape(3), axis=-1)
    assert float(deviation.max()) < 0.35 and float(deviation.mean()) < 0.1
    np.testing.assert_allclose(plain.field_network_spect - plain.field_network, plain.spect_correction_mm, atol=1e-4)
    fitted = register(fixed, moving, model=path, device="cpu", native_outputs=False, qa_metrics=False)
    np.testing.assert_array_equal(fitted.field_network, plain.field_network)
    np.testing.assert_allclose(fitted.field_network_spect - fitted.field_network - fitted.spect_offset_mm,
                               plain.spect_correction_mm + (0 if fitted.spect_organ_weight is None else
                               np.stack([np.zeros_like(fitted.spect_organ_weight)] * 2 +
                                        [fitted.spect_organ_shift_mm * fitted.spect_organ_weight], -1)), atol=1e-3)


def test_load_model_reports_preprocessing(tiny_model):
    m = load_model(tiny_model)
    assert m.preprocess.grid_size == (64, 64, 64) and m.network.config.name == "corx-tiny"


def test_a_prepared_fixed_session_gives_the_results_of_the_session_itself(small_series, tiny_model, tmp_path):
    fixed = session(small_series, 0)
    prepared = prepare_fixed(fixed, tiny_model)
    for i in (1, 2):      # the second pair reuses the fixed side of the QA metrics and the fit made by the first
        moving = session(small_series, i)
        own, shared = (register(f, moving, model=tiny_model, device="cpu") for f in (fixed, prepared))
        for name in ("field_spect", "warped_spect", "warped_ct", "jacobian_spect", "field_network"):
            np.testing.assert_array_equal(getattr(own, name), getattr(shared, name), err_msg=name)
        assert own.metrics == shared.metrics and own.spect_organ_shift_mm == shared.spect_organ_shift_mm
        assert own.notes == shared.notes
    assert prepared.metric_reference is not None and len(prepared.offset_references) == 1
    other = save_checkpoint(tmp_path / "other.pt", build_network(named_config("corx-tiny")),
                            PreprocessConfig(grid_size=(48, 48, 48), spacing_mm=10.3).to_dict())
    with pytest.raises(ValueError, match="prepared for a model with other preprocessing"):
        register(prepared, session(small_series, 1), model=other, device="cpu")


def test_qa_metrics_can_be_skipped_for_speed(small_series, tiny_model):
    result = register(session(small_series, 0), session(small_series, 1), model=tiny_model, device="cpu",
                      native_outputs=False, qa_metrics=False)
    assert result.metrics == {} and "metrics" not in result.timings_s and result.field_spect is None
    assert result.field_network.shape == result.grid.shape + (3,)


def test_corx_register_series_registers_every_time_point_once_and_refuses_before_work(small_series_dir, tiny_model,
                                                                                      tmp_path, capsys):
    import json

    from CoRXRegistrationLib.cli import main
    from CoRXRegistrationLib.imageio import read_displacement_field, read_image
    out = tmp_path / "series_out"
    assert main(["register-series", str(small_series_dir), "--out", str(out), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "threads" in printed and "registered 3 time points" in printed
    qa = json.loads((out / "registration_qa.json").read_text())
    assert list(qa["pairs"]) == ["24 h", "48 h", "120 h"]
    manifest = json.loads((small_series_dir / "series.json").read_text())
    _, reference = read_image(small_series_dir / manifest["time_points"][0]["spect"])
    for hours in (24, 48, 120):
        field, g = read_displacement_field(out / f"t{hours}h" / "field_spect.nrrd")
        assert g.same_grid(reference) and np.isfinite(field).all()
    # a second run without --overwrite stops before any registration, naming the folder
    before = (out / "t24h" / "field_spect.nrrd").stat().st_mtime_ns
    assert main(["register-series", str(small_series_dir), "--out", str(out), "--model", str(tiny_model),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "exists (an earlier result)" in err and "--overwrite" in err
    assert (out / "t24h" / "field_spect.nrrd").stat().st_mtime_ns == before
    # an output folder inside the input series is refused
    assert main(["register-series", str(small_series_dir), "--out", str(small_series_dir / "reg")]) == 2
    assert "inside the input series" in capsys.readouterr().err


def test_a_series_that_keeps_neither_maps_nor_sessions_writes_the_same_results(small_series, tiny_model, tmp_path):
    """What ``corx register-series`` asks of register_series to hold less: the maps written, not kept,
    and each moving session let go once registered; the files and the summary are those of the default."""
    from CoRXRegistrationLib.imageio import read_displacement_field, read_image
    from CoRXRegistrationLib.series_registration import register_series, registration_summary
    times = list(small_series.config.times_h)
    kept_sessions, lean_sessions = small_series.sessions(), small_series.sessions()
    kept = register_series(kept_sessions, times, 0, tmp_path / "kept", model=tiny_model, device="cpu")
    lean = register_series(lean_sessions, times, 0, tmp_path / "lean", model=tiny_model, device="cpu",
                           keep_maps=False, release_sessions=True)
    assert lean_sessions[0] is not None and lean_sessions[1:] == [None] * (len(times) - 1)
    assert all(s is not None for s in kept_sessions)
    assert lean[0][1:] == [None] * (len(times) - 1) and all(a is not None for a in kept[0])
    for i, pair in lean[1].items():
        assert pair["field"] is None and pair["jacobian"] is None
        assert pair["jacobian_nonpositive_percent_spect_grid"] == 100.0 * float(np.mean(kept[1][i]["jacobian"] <= 0))
        tag = f"t{times[i]:g}h"
        for name in ("warped_spect.nii.gz", "jacobian.nii.gz", "warped_ct.nii.gz"):
            np.testing.assert_array_equal(read_image(tmp_path / "kept" / tag / name)[0],
                                          read_image(tmp_path / "lean" / tag / name)[0], err_msg=name)
        np.testing.assert_array_equal(read_displacement_field(tmp_path / "kept" / tag / "field_spect.nrrd")[0],
                                      read_displacement_field(tmp_path / "lean" / tag / "field_spect.nrrd")[0])
    drop_seconds = (lambda summary: {t: {k: v for k, v in row.items() if k not in ("seconds", "timings_s")}
                                     for t, row in summary.items()})
    assert drop_seconds(registration_summary(lean[1], times)) == drop_seconds(registration_summary(kept[1], times))


def test_the_registration_commands_do_not_import_scipy(small_series_dir, tiny_model, tmp_path):
    """What a user waits for includes start-up: ``corx register`` and ``corx register-series`` import no
    scipy (about 0.2 s with its libraries; only the TIA, PVC and dose code needs it), although every
    command's parser lists the PVC methods."""
    import subprocess
    import sys
    d = small_series_dir
    tp = json.loads((d / "series.json").read_text())["time_points"]
    pair = ["--fixed-ct", d / tp[0]["ct"], "--fixed-spect", d / tp[0]["spect"], "--moving-ct", d / tp[1]["ct"],
            "--moving-spect", d / tp[1]["spect"]]
    code = ("import sys; from CoRXRegistrationLib.cli import main; code = main(sys.argv[1:]); "
            "print(code, sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))")
    common = ["--model", str(tiny_model), "--device", "cpu"]
    for argv in (["register", *map(str, pair), "--out", str(tmp_path / "pair")],
                 ["register-series", str(d), "--out", str(tmp_path / "series")]):
        done = subprocess.run([sys.executable, "-c", code, *argv, *common], capture_output=True, text=True,
                              check=True)
        assert done.stdout.strip().splitlines()[-1] == "0 []", (argv[0], done.stdout[-500:], done.stderr[-500:])
