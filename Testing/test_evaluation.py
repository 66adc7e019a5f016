"""Evaluation harness: every column finite on a tiny set; known deformations give known errors."""
import json
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from CoRXRegistrationLib.baselines import CT_DRIVEN, POST_FIT, ROW_ORDER, TRUTH_ROWS, base_method
from CoRXRegistrationLib.benchmark import PeakMemory
from CoRXRegistrationLib.evaluation import (MethodRunner, PAIRED_AGAINST, PAIR_COLUMNS, displacement_error_mm,
                                            evaluate_series,
                                            region_errors_mm, resume_settings, summarise, warped_label_dice)
from CoRXRegistrationLib.network import build_network, named_config
from CoRXRegistrationLib.network.checkpoint import save_checkpoint
from CoRXRegistrationLib.network.spect_offset import SpectOffsetConfig
from CoRXRegistrationLib.preprocess import PreprocessConfig

TINY_PREP = PreprocessConfig(grid_size=(32, 32, 32), spacing_mm=15.5)    # small grid: Elastix stays quick


def test_known_deformation_gives_known_error():
    truth = np.zeros((5, 6, 7, 3), np.float32)
    truth[..., 0] = 3.0
    field = np.zeros_like(truth)
    field[..., 1] = 4.0                              # error vector (-3, 4, 0): 5 mm everywhere
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 1:4, 1:4] = True
    e = displacement_error_mm(field, truth, mask)
    assert e["mean_mm"] == pytest.approx(5.0) and e["p95_mm"] == pytest.approx(5.0) and e["voxels"] == 27
    with pytest.raises(ValueError, match="empty mask"):
        displacement_error_mm(field, truth, np.zeros_like(mask))
    field[2, :, :, 1] = 16.0                         # one slice: error (-3, 16, 0) -> sqrt(265) mm
    slab = np.zeros_like(mask)
    slab[2] = True
    stats = region_errors_mm(field, truth, {"cube": mask, "slab": slab})
    assert stats["slab"]["mean_mm"] == pytest.approx(265 ** 0.5) and stats["slab"]["voxels"] == 42
    assert stats["cube"]["mean_mm"] == pytest.approx((18 * 5.0 + 9 * 265 ** 0.5) / 27)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is sampled from /proc (Linux)")
def test_peak_memory_of_a_block_after_another_freed_memory():
    """A block's figure is what it allocates, also when an earlier block left freed heap pages
    behind (many small allocations, so the C heap, not mmap, holds them)."""
    def small_allocations(n=150_000):
        arrays = [np.ones(128) for _ in range(n)]          # ~1.1 kB each, ~170 MB in all
        return arrays, np.ones(128)                         # the last one pins the top of the heap
    first, pin = small_allocations()
    expected_mb = 150_000 * (first[0].nbytes + 100) / 2 ** 20
    del first
    with PeakMemory() as memory:
        second, pin2 = small_allocations()
    assert 0.8 * expected_mb < memory.peak_mb < 1.6 * expected_mb


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_harness_on_a_tiny_set_fills_every_column(tmp_path):
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
    small_series = simulate_series(SimulationConfig.preset("small", seed=21, times_h=(4.0, 48.0), n_tumours=2))
    torch.manual_seed(0)
    net = build_network(named_config("corx-tiny", image_size=(32, 32, 32)))
    model = save_checkpoint(tmp_path / "tiny.pt", net, TINY_PREP.to_dict())
    runner = MethodRunner({"corx": str(model)}, elastix_iterations=20, refine_iterations=2, device="cpu",
                          elastix_resolutions=2)
    methods = runner.available()
    assert methods == [m for m in ROW_ORDER if m not in ("transmorph", "corx-nocs")]    # no such checkpoints
    assert set(runner.skipped()) == {"transmorph", "corx-nocs"}
    settings = resume_settings(runner, "small", TINY_PREP)
    assert set(settings) == {m for m in methods if base_method(m) not in TRUTH_ROWS}   # nothing stored of the truth
    # a stored field with the offset names the offset fit's settings: new settings, field measured again
    offset_settings = json.loads(json.dumps(asdict(SpectOffsetConfig())))
    assert json.loads(settings["corx"])["spect_offset"] == offset_settings
    assert json.loads(settings["corx-no-offset"])["spect_offset"] is False
    pairs, tia = evaluate_series(small_series, runner, methods, TINY_PREP, "tiny", log=lambda *a: None,
                                 figure_path=tmp_path / "figure.png", resume_dir=tmp_path / "resume",
                                 resume_settings=settings, resume_min_seconds=0.0)
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "figure.png").shape[0] > 500
    assert len(pairs) == len(methods)              # one (reference, moving) pair per method
    for row in pairs:
        for key, _ in PAIR_COLUMNS:
            assert np.isfinite(row[key]), (row["method"], key)
    identity = [r for r in pairs if r["method"] == "identity"]
    for r in identity:                               # identity error is the true motion's size
        i = small_series.config.times_h.index(r["moving_h"])
        truth = np.linalg.norm(small_series.truth_field_spect[i], axis=-1)[small_series.labels_spect > 0]
        assert r["spect_error_body_mean_mm"] == pytest.approx(truth.mean(), rel=1e-4)
        assert r["jacobian_nonpositive_percent"] == 0.0
        motion = np.linalg.norm(small_series.truth_field_spect[i], axis=-1)
        for name, codes in small_series.phantom.voi_labels().items():   # per VOI, the same on its own voxels
            voi = np.isin(small_series.labels_spect, codes)
            if voi.any():
                assert r[f"spect_error_voi_{name}_mean_mm"] == pytest.approx(motion[voi].mean(), rel=1e-4)
    assert all(np.isfinite(v) for r in pairs for k, v in r.items() if k.startswith("spect_error_voi_"))
    # the SPECT/CT offset moves only the SPECT: the CT field (and its error) is the network's either way
    with_offset, without = (next(r for r in pairs if r["method"] == m) for m in ("corx", "corx-no-offset"))
    assert with_offset["ct_error_body_mean_mm"] == pytest.approx(without["ct_error_body_mean_mm"], rel=1e-6)
    assert with_offset["ct_ssim"] == pytest.approx(without["ct_ssim"], rel=1e-6)
    for base in CT_DRIVEN:           # a post-fit row: the base's CT field, measured once, its time included
        fitted, alone = (next(r for r in pairs if r["method"] == m) for m in (base + POST_FIT, base))
        assert fitted["ct_error_body_mean_mm"] == pytest.approx(alone["ct_error_body_mean_mm"], rel=1e-6)
        assert fitted["seconds"] > alone["seconds"]
    # the truth rows: the true SPECT motion through the network grid is far below any method; the true CT
    # motion leaves the SPECT/CT mismatch in the SPECT error only, and the fit after it removes part of it
    row = {m: next(r for r in pairs if r["method"] == m) for m in ("identity", "rigid", "truth-ct", "truth-ct+fit",
                                                                    "truth-spect")}
    assert row["truth-spect"]["spect_error_body_mean_mm"] < 0.3 * row["rigid"]["spect_error_body_mean_mm"]
    assert row["truth-ct"]["ct_error_body_mean_mm"] < 0.3 * row["rigid"]["ct_error_body_mean_mm"]
    assert row["truth-ct"]["spect_error_body_mean_mm"] > row["truth-spect"]["spect_error_body_mean_mm"] + 0.3
    assert row["truth-ct+fit"]["spect_error_organs_mean_mm"] < row["truth-ct"]["spect_error_organs_mean_mm"]
    assert row["truth-ct+fit"]["ct_error_body_mean_mm"] == pytest.approx(row["truth-ct"]["ct_error_body_mean_mm"])
    i = 1
    true_dice = warped_label_dice(small_series, i, small_series.truth_field_spect[i])
    none_dice = warped_label_dice(small_series, i, np.zeros_like(small_series.truth_field_spect[i]))
    organs = [n for n in true_dice if not n.startswith("tumour")]
    assert np.mean([true_dice[n] for n in organs]) > np.mean([none_dice[n] for n in organs]) + 0.02
    assert np.mean([true_dice[n] for n in organs]) > 0.8
    assert identity[0]["dice_organs_mean"] == pytest.approx(np.mean([none_dice[n] for n in organs]))
    assert {r["method"] for r in tia} == set(methods)
    assert all(np.isfinite(r["median_abs_voxel_error_pct_vs_psf_truth"]) for r in tia)
    md = summarise(pairs, tia, methods)
    assert "| elastix |" in md and "speed vs ants-syn" in md
    truth_lines = [line for line in md[:md.index("Paired over pairs")].splitlines() if line.startswith("| truth-")]
    assert len(truth_lines) == 3 and all(line.endswith("| - |") for line in truth_lines)   # no speed for them
    paired = md[md.index("Paired over pairs, corx minus each row"):].splitlines()
    assert [line.split(" | ")[0] for line in paired[4:10]] == ["| " + m for m in PAIRED_AGAINST]
    per_voi = md[md.index("SPECT-field error per VOI class"):].splitlines()
    assert per_voi[2].startswith("| method | kidneys | liver | spleen |") and "tumours" in per_voi[2]
    assert len([line for line in per_voi[4:4 + len(methods)] if line.startswith("| ")]) == len(methods)

    # an interrupted run continued: stored fields are read back (same rows, no registration run);
    # other settings for that method, or a stored file cut short, are measured again; another network
    # model leaves the stored Elastix fields valid
    class CountingRunner(MethodRunner):
        calls = 0

        def fields(self, *args):
            CountingRunner.calls += 1
            return super().fields(*args)

    again = CountingRunner({"corx": str(model)}, elastix_iterations=20, refine_iterations=2, device="cpu",
                           elastix_resolutions=2)
    resumed, _ = evaluate_series(small_series, again, ["identity", "elastix"], TINY_PREP, "tiny", log=lambda *a: None,
                                 resume_dir=tmp_path / "resume", resume_settings=settings)
    assert CountingRunner.calls == 0 and all(r["resumed"] for r in resumed)
    for r in resumed:
        first = next(p for p in pairs if p["method"] == r["method"])
        assert {k: v for k, v in r.items() if k != "resumed"} == {k: v for k, v in first.items() if k != "resumed"}
    (tmp_path / "resume" / "identity_48h.npz").write_bytes(b"cut short")
    cut, _ = evaluate_series(small_series, again, ["identity"], TINY_PREP, "tiny", log=lambda *a: None,
                             resume_dir=tmp_path / "resume", resume_settings=settings)
    assert CountingRunner.calls == 1 and not cut[0]["resumed"]
    torch.manual_seed(1)
    other_model = save_checkpoint(tmp_path / "other.pt", build_network(named_config("corx-tiny", image_size=(32, 32, 32))),
                                  TINY_PREP.to_dict())
    new_model = CountingRunner({"corx": str(other_model)}, elastix_iterations=20, refine_iterations=2, device="cpu",
                               elastix_resolutions=2)
    new_settings = resume_settings(new_model, "small", TINY_PREP)
    assert new_settings["elastix"] == settings["elastix"] and new_settings["corx"] != settings["corx"]
    rows, _ = evaluate_series(small_series, new_model, ["elastix", "corx"], TINY_PREP, "tiny", log=lambda *a: None,
                              resume_dir=tmp_path / "resume", resume_settings=new_settings)
    assert CountingRunner.calls == 2 and [r["resumed"] for r in rows] == [True, False]
    more_iterations = CountingRunner({"corx": str(model)}, elastix_iterations=30, refine_iterations=2, device="cpu",
                                     elastix_resolutions=2)
    other, _ = evaluate_series(small_series, more_iterations, ["elastix"], TINY_PREP, "tiny", log=lambda *a: None,
                               resume_dir=tmp_path / "resume",
                               resume_settings=resume_settings(more_iterations, "small", TINY_PREP))
    assert CountingRunner.calls == 3 and not other[0]["resumed"]


def _tiny_corx_checkpoint(tmp_path):
    """An untrained corx-tiny (32³) checkpoint with seed-0 weights: enough to run the harness end to end."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", build_network(named_config("corx-tiny", image_size=(32, 32, 32))),
                           TINY_PREP.to_dict())


def test_run_covers_both_paper_protocols_each_with_its_own_files(tmp_path):
    """The paper's SNUH (4-120 h) and SMC (0.5-48 h) protocols both run, a 0.5 h reference included, and two
    protocols with the same number of time points no longer share a figure (nor a resume folder: same name)."""
    from CoRXRegistrationLib.evaluation import PROTOCOLS, run_evaluation
    assert sorted(PROTOCOLS.values()) == [(0.5, 4.0, 24.0, 48.0), (4.0, 24.0, 48.0, 120.0)]
    model = _tiny_corx_checkpoint(tmp_path)
    result = run_evaluation(tmp_path / "out", seeds=[21], patient15=False, models={"corx": str(model)},
                            preset="small", methods=["identity", "corx"], device="cpu", log=lambda *a: None)
    moving = {name: sorted(r["moving_h"] for r in result["pairs"] if r["method"] == "identity" and name in r["dataset"])
              for name in PROTOCOLS}
    assert moving == {name: list(times[1:]) for name, times in PROTOCOLS.items()}
    assert {r["dataset"] for r in result["tia"]} == {r["dataset"] for r in result["pairs"]}
    figures = sorted(p.name for p in (tmp_path / "out").glob("figure_*.png"))
    assert figures == ["figure_procedural_21_4tp_0p5_4_24_48.png", "figure_procedural_21_4tp_4_24_48_120.png"]
    # the report opens with the tables over all 6 pairs (4, 24 and 48 h are moving times in both protocols)
    headers = [line for line in result["markdown"].splitlines() if line.startswith("### ")]
    assert headers[0] == "### all 2 datasets and protocols (6 pairs)" and len(headers) == 3
    body_column = 1 + [c for _, c in PAIR_COLUMNS].index("SPECT-field error body (mm)")
    all_identity = next(line for line in result["markdown"].splitlines() if line.startswith("| identity |"))
    mean_body = np.mean([r["spect_error_body_mean_mm"] for r in result["pairs"] if r["method"] == "identity"])
    assert float(all_identity.split("|")[body_column + 1].split("±")[0]) == pytest.approx(mean_body, rel=1e-3)


def test_cli_runs_only_the_protocols_asked_for(tmp_path):
    """`corx evaluate --protocols smc` runs the SMC series alone, so parts of one full run can go to separate
    processes sharing OUT/resume/."""
    import json

    from CoRXRegistrationLib.cli import main as corx_main
    model = _tiny_corx_checkpoint(tmp_path)
    assert corx_main(["evaluate", "--out", str(tmp_path / "out"), "--seeds", "21", "--no-patient15",
                      "--preset", "small", "--model", str(model), "--methods", "identity", "--device", "cpu", "--protocols", "smc"]) == 0
    pairs = json.loads((tmp_path / "out" / "report.json").read_text())["pairs"]
    assert sorted({r["dataset"] for r in pairs}) == ["simulated (held out), 0.5, 4, 24, 48 h (paper's SMC protocol)"]
    assert sorted(r["moving_h"] for r in pairs) == [4.0, 24.0, 48.0]
