"""The README's main job at a reduced size: every promised file exists, is readable, sits on the
reference grid, and its registration numbers are the ones ``corx evaluate`` computes."""
import json

import numpy as np
import pytest

from CoRXRegistrationLib.demo import run_demo
from CoRXRegistrationLib.evaluation import MethodRunner, displacement_error_mm, truth_masks
from CoRXRegistrationLib.imageio import read_displacement_field, read_image, read_segmentation
from CoRXRegistrationLib.preprocess import network_grid
from CoRXRegistrationLib.resample import resample_field
from CoRXRegistrationLib.series_io import read_series
from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series

SEED = 11
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, preset="small", seed=SEED, device="cpu")
    return out, report


def test_every_promised_file_exists_on_the_reference_grid(demo):
    out, report = demo
    manifest = read_series(out / "series")
    ref = manifest.reference_index
    _, ref_g = read_image(manifest.spect_paths[ref])
    for key in ("no_registration", "corx_registration", "ideal_registration"):
        for name in ("tia", "fit_rmse", "fit_model", "fit_r2", "dose"):
            volume, g = read_image(out / key / f"{name}.nii.gz")
            assert g.same_grid(ref_g), (key, name)
            assert np.isfinite(volume).all()
        assert (out / key / "voi.csv").read_text().count("\n") > 3
    for h in [h for i, h in enumerate(manifest.hours) if i != ref]:
        folder = out / "corx_registration" / "registration" / f"t{h:g}h"
        field, g = read_displacement_field(folder / "field_spect.nrrd")
        assert g.same_grid(ref_g) and field.shape == ref_g.shape + (3,)
        jac, g = read_image(folder / "jacobian.nii.gz")
        assert g.same_grid(ref_g) and float(np.median(jac)) == pytest.approx(1.0, abs=0.1)
        warped, g = read_image(folder / "warped_spect.nii.gz")
        assert g.same_grid(ref_g) and warped.max() > 0
        assert json.loads((folder / "metrics.json").read_text())
    import matplotlib.image
    png = matplotlib.image.imread(out / "report.png")
    assert png.ndim == 3 and png.shape[0] > 500 and png.shape[1] > 800
    assert np.std(png[..., :3]) > 0.05                           # not a blank page
    md = (out / "report.md").read_text()
    assert "report.png" in md and "Timing" in md
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["registration"]) == {f"{h:g} h" for i, h in enumerate(manifest.hours) if i != ref}
    assert sum(saved["timing_share_pct"].values()) == pytest.approx(100.0, abs=1.0)


def test_registration_numbers_agree_with_evaluate(demo):
    """The demo's displacement error for one pair equals the evaluation harness's on the same series."""
    out, report = demo
    series = simulate_series(SimulationConfig.preset("small", seed=SEED))
    ref = series.config.reference_index
    i = 1 if ref != 1 else 2
    sessions = series.sessions()
    runner = MethodRunner({"corx": "bundled"}, device="cpu")
    cfg = runner.models["corx"].preprocess
    grid = network_grid(sessions[ref], cfg)
    field = resample_field(runner.fields("corx", sessions[ref], sessions[i], grid, cfg)[1], grid,
                           series.reference_spect_geometry)        # what the SPECT follows
    evaluated = displacement_error_mm(field, series.truth_field_spect[i], truth_masks(series)["body"])
    demo_row = report["registration"][f"{series.config.times_h[i]:g} h"]["displacement_error_body"]
    assert demo_row["mean_mm"] == pytest.approx(evaluated["mean_mm"], abs=0.05)
    assert demo_row["p95_mm"] == pytest.approx(evaluated["p95_mm"], abs=0.1)


def test_own_series_input(demo, tmp_path):
    """--input: a user's two-time-point series with a segmentation, no ground truth."""
    out, _ = demo
    src = out / "series"
    raw = json.loads((src / "series.json").read_text())
    own = {"format": "corx-series/1", "patient_id": "P001", "reference_index": 0,
           "segmentation": str(src / "truth" / "segmentation.seg.nrrd"),
           "time_points": [{k: (str(src / tp[k]) if k in ("ct", "spect") else tp[k]) for k in ("hours", "ct", "spect")}
                           for tp in raw["time_points"][:2]]}
    folder = tmp_path / "P001"
    folder.mkdir()
    (folder / "series.json").write_text(json.dumps(own))
    with pytest.raises(ValueError, match="inside the input series"):
        run_demo(src, input_path=src, device="cpu")            # would write into the user's series
    report = run_demo(tmp_path / "result", input_path=folder, device="cpu")
    assert report["vois"] == {}                                 # no truth to compare against
    rows = report["voi_tables"]["corx_registration"]
    segments, _ = read_segmentation(own["segmentation"])
    assert {r["segment"] for r in rows} == set(segments)
    assert list(report["registration"]) == [f"{raw['time_points'][1]['hours']:g} h"]
    assert "displacement_error_body" not in report["registration"][f"{raw['time_points'][1]['hours']:g} h"]
    assert (tmp_path / "result" / "report.png").is_file()
    assert (tmp_path / "result" / "corx_registration" / "tia.nii.gz").is_file()
