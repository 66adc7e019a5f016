"""Bad and hostile input, table-driven: every case through the command line, the Logic or the batch.

Each command-line case asserts the exit code (2 = refused), that the message names the file, field or
value, that no file that existed before (inputs, the user's own files in the output folder) changed
or vanished, and that no partial output is left. The cases and their count are listed in
docs/reliability.md.
"""
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from CoRXRegistrationLib.cli import main
from CoRXRegistrationLib.geometry import Geometry
from CoRXRegistrationLib.imageio import read_image, read_segmentation, write_image
from CoRXRegistrationLib.series_io import SeriesError, find_series, read_series

ROOT = Path(__file__).resolve().parents[1]
TIMES = ["4", "24", "48", "120"]


# --------------------------------------------------------------------------- the workspace
class Workspace:
    """Copies of a small simulated series: ``spect_<h>`` the true activity on the reference SPECT grid
    (what a registered series looks like), ``ct`` the reference CT, ``seg`` its segmentation, and the
    four native volumes of time points 4 h and 24 h for registration."""

    def __init__(self, root: Path, series_dir: Path):
        self.root = root
        self.inputs = root / "inputs"
        self.inputs.mkdir(parents=True)
        raw = json.loads((series_dir / "series.json").read_text())
        tps = raw["time_points"]
        for tp, h in zip(tps, TIMES):
            shutil.copy(series_dir / tp["truth"]["activity"], self.inputs / f"spect_{h}.nii.gz")
        shutil.copy(series_dir / tps[0]["ct"], self.inputs / "ct.nii.gz")
        shutil.copy(series_dir / raw["truth"]["segmentation"], self.inputs / "seg.seg.nrrd")
        for role, tp in (("fixed", tps[0]), ("moving", tps[1])):
            shutil.copy(series_dir / tp["ct"], self.inputs / f"{role}_ct.nii.gz")
            shutil.copy(series_dir / tp["spect"], self.inputs / f"{role}_spect.nii.gz")
        self.series = root / "series"
        shutil.copytree(series_dir, self.series)
        self.spect_g = read_image(self.inputs / "spect_4.nii.gz")[1]
        self.n = 0

    def path(self, name: str) -> Path:
        return self.inputs / name

    def spects(self) -> list:
        return [str(self.path(f"spect_{h}.nii.gz")) for h in TIMES]

    def out(self) -> Path:
        self.n += 1
        return self.root / "out" / f"case{self.n}"

    def variant(self, name: str, array, geometry=None) -> str:
        """A new input file holding ``array`` (on the SPECT grid unless told)."""
        path = self.path(name)
        write_image(path, np.asarray(array), geometry or self.spect_g)
        return str(path)

    def cut(self, source: str, name: str, keep: float = 0.5) -> str:
        data = self.path(source).read_bytes()
        self.path(name).write_bytes(data[: int(len(data) * keep)])
        return str(self.path(name))

    def tia(self, out, spects=None, times=None, *extra) -> list:
        return ["tia", "--spect", *(spects or self.spects()), "--times", *(times or TIMES), "--out", str(out), *extra]

    def register(self, out, fixed_ct=None, fixed_spect=None, moving_ct=None, moving_spect=None, *extra) -> list:
        return ["register", "--fixed-ct", fixed_ct or str(self.path("fixed_ct.nii.gz")),
                "--fixed-spect", fixed_spect or str(self.path("fixed_spect.nii.gz")),
                "--moving-ct", moving_ct or str(self.path("moving_ct.nii.gz")),
                "--moving-spect", moving_spect or str(self.path("moving_spect.nii.gz")),
                "--out", str(out), "--device", "cpu", *extra]

    def manifest(self, name: str, edit) -> Path:
        """A user manifest (corx-series/1) for the copied series, changed by ``edit(dict)``."""
        raw = json.loads((self.series / "series.json").read_text())
        user = {"format": "corx-series/1", "patient_id": "P001", "reference_index": 0,
                "time_points": [{"hours": tp["hours"], "ct": str(self.series / tp["ct"]),
                                 "spect": str(self.series / tp["spect"])} for tp in raw["time_points"]]}
        user = edit(user) or user
        folder = self.root / "manifests" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "series.json").write_text(json.dumps(user))
        return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, small_series_dir):
    return Workspace(tmp_path_factory.mktemp("bad_input"), small_series_dir)


def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def array_of(ws, name):
    return read_image(ws.path(name))[0]


def edit_json(path: Path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


# --------------------------------------------------------------------------- command-line cases
def _nan_nifti(ws):
    a = array_of(ws, "spect_24.nii.gz")
    ws.variant("nan.nii", a)                                       # written finite, then NaN put in the bytes
    raw = bytearray(ws.path("nan.nii").read_bytes())
    raw[352 + 4 * 100: 352 + 4 * 101] = np.float32(np.nan).tobytes()
    ws.path("nan.nii").write_bytes(bytes(raw))
    with gzip.open(ws.path("nan.nii.gz"), "wb") as fh:
        fh.write(bytes(raw))
    return str(ws.path("nan.nii.gz"))


def _inf_nifti(ws):
    raw = bytearray(Path(_nan_nifti(ws)[:-3]).read_bytes())
    raw[352 + 4 * 100: 352 + 4 * 101] = np.float32(np.inf).tobytes()
    ws.path("inf.nii").write_bytes(bytes(raw))
    return str(ws.path("inf.nii"))


def _cut_raw(ws):
    """A MetaImage header with its raw data file cut short (written uncompressed, as .mhd + .raw)."""
    import SimpleITK as sitk
    from CoRXRegistrationLib.imageio import to_sitk
    sitk.WriteImage(to_sitk(array_of(ws, "spect_48.nii.gz"), ws.spect_g), str(ws.path("r.mhd")), False)
    raw = ws.path("r.raw")
    raw.write_bytes(raw.read_bytes()[:-4000])
    return str(ws.path("r.mhd"))


def _with(ws, i, path):
    spects = ws.spects()
    spects[i] = path
    return spects


def _existing(ws, name, *extra):
    out = ws.out()
    out.mkdir(parents=True)
    (out / name).write_text("the user's own file")
    return ws.tia(out, None, None, *extra)


def _partly_outside(ws):
    """The liver moved along k until its middle slice is the grid's last: about half of it outside."""
    segments, g = read_segmentation(ws.path("seg.seg.nrrd"))
    liver = segments["liver"]
    k = np.nonzero(liver.any(axis=(1, 2)))[0]
    shift_mm = (g.shape[0] - 1 - (k.min() + k.max()) / 2.0) * g.spacing[2]
    shifted = Geometry(g.shape, g.spacing, tuple(np.add(g.origin, g.direction_matrix[:, 2] * shift_mm)), g.direction)
    labels = liver.astype(np.uint8)
    write_image(ws.path("liver_shifted.nii.gz"), labels, shifted)
    (ws.path("liver_shifted.json")).write_text(json.dumps({"1": "liver"}))
    return str(ws.path("liver_shifted.nii.gz"))


def _wholly_outside(ws):
    segments, g = read_segmentation(ws.path("seg.seg.nrrd"))
    far = Geometry(g.shape, g.spacing, tuple(np.add(g.origin, (0.0, 0.0, 5000.0))), g.direction)
    write_image(ws.path("far.nii.gz"), segments["liver"].astype(np.uint8), far)
    return str(ws.path("far.nii.gz"))


def _ct_at_output(ws):
    out = ws.out()
    out.mkdir(parents=True)
    shutil.copy(ws.path("ct.nii.gz"), out / "dose.nii.gz")
    return ws.tia(out, None, None, "--ct", str(out / "dose.nii.gz"), "--overwrite")


def _input_at_register_output(ws):
    out = ws.out()
    out.mkdir(parents=True)
    shutil.copy(ws.path("moving_ct.nii.gz"), out / "warped_ct.nii.gz")
    return ws.register(out, None, None, str(out / "warped_ct.nii.gz"), None, "--overwrite")


def _existing_register_output(ws):
    out = ws.out()
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    # a model that does not exist: had the output been checked only after the work, this would be the error
    return ws.register(out, None, None, None, None, "--model", str(ws.root / "no_model.pt"))


def _foreign_folder(ws):
    out = ws.out()
    out.mkdir(parents=True)
    (out / "patient_ct.nii.gz").write_bytes(ws.path("ct.nii.gz").read_bytes())
    return ["simulate", "--preset", "small", "--out", str(out), "--overwrite"]


def _existing_series(ws):
    return ["simulate", "--preset", "small", "--out", str(ws.series)]


def _checkpoint(ws):
    path = ws.root / "run" / "best.pt"
    if not path.is_file():
        from CoRXRegistrationLib.network import build_network, named_config
        from CoRXRegistrationLib.network.checkpoint import save_checkpoint
        from CoRXRegistrationLib.preprocess import PreprocessConfig
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, build_network(named_config("corx-tiny")), PreprocessConfig().to_dict())
    return str(path)


def _export_over_card(ws):
    out = ws.out()
    out.mkdir(parents=True)
    (out / "m.json").write_text("the user's card")
    return ["export-model", "--checkpoint", _checkpoint(ws), "--out", str(out / "m.pt")]


def _bad_patient_files(ws):
    data = ws.root / "bad_data"
    data.mkdir(exist_ok=True)
    (data / "sim-0001.pt").write_bytes(b"not a torch file")
    (data / "sim-0002.pt").write_bytes(b"nor this")
    return ["train", "--data", str(data), "--out", str(ws.out()), "--network", "corx-tiny", "--max-steps", "1"]


def _duplicate_ids(ws):
    cohort = ws.root / "cohort_dup"
    for name in ("a", "b"):
        folder = ws.manifest(f"dup_{name}", lambda m: None)
        shutil.copytree(folder, cohort / name, dirs_exist_ok=True)
    return ["prepare-data", "--series", str(cohort), "--out", str(ws.out())]


def _existing_patient_file(ws):
    out = ws.out()
    out.mkdir(parents=True)
    (out / "P001.pt").write_text("the user's earlier file")
    return ["prepare-data", "--series", str(ws.manifest("prep", lambda m: None)), "--out", str(out)]


def _hours(value):
    def edit(m):
        m["time_points"][1]["hours"] = value
    return edit


def _key(key, value):
    def edit(m):
        m[key] = value
    return edit


def _tp_key(key, value):
    def edit(m):
        m["time_points"][0][key] = value
    return edit


def _series_cmd(name, edit):
    return lambda ws: ["register-series", str(ws.manifest(name, edit)), "--out", str(ws.out()), "--device", "cpu"]


def _series_with_cut_spect(ws):
    cut = ws.cut("moving_spect.nii.gz", "moving_spect_cut.nii.gz")
    return _series_cmd("cut_spect", lambda m: m["time_points"][1].update(spect=cut))(ws)


def _series_out_inside(ws):
    folder = ws.manifest("inside", lambda m: None)
    return ["register-series", str(folder), "--out", str(folder / "results"), "--device", "cpu"]


def _series_existing(ws):
    folder = ws.manifest("existing", lambda m: None)
    out = ws.out()
    (out / "t24h").mkdir(parents=True)
    (out / "t24h" / "field_spect.nrrd").write_text("an earlier result")
    return ["register-series", str(folder), "--out", str(out), "--device", "cpu", "--model",
            str(ws.root / "no_model.pt")]


def _scaled(ws, factor, name):
    return ws.variant(name, array_of(ws, "spect_24.nii.gz") * factor)


def _spacing(ws, spacing, name):
    g = ws.spect_g
    return ws.variant(name, array_of(ws, "spect_24.nii.gz"), Geometry(g.shape, spacing, g.origin, g.direction))


# (id, argv builder, words the message must hold)
CLI_CASES = [
    # 1. files that cannot be read whole
    ("spect-nii-gz-cut-in-half", lambda ws: ws.tia(ws.out(), _with(ws, 1, ws.cut("spect_24.nii.gz", "c.nii.gz"))),
     ["c.nii.gz", "cut short"]),
    ("spect-nii-cut-in-half", lambda ws: ws.tia(ws.out(), _with(ws, 1, ws.cut(
        Path(ws.variant("plain.nii", array_of(ws, "spect_24.nii.gz"))).name, "c.nii"))), ["c.nii", "cut short"]),
    ("spect-nifti-nan", lambda ws: ws.tia(ws.out(), _with(ws, 1, _nan_nifti(ws))), ["nan.nii.gz", "NaN"]),
    ("spect-nifti-inf", lambda ws: ws.tia(ws.out(), _with(ws, 1, _inf_nifti(ws))), ["inf.nii", "infinite"]),
    ("spect-nrrd-cut", lambda ws: ws.tia(ws.out(), _with(ws, 2, ws.cut(Path(ws.variant(
        "s.nrrd", array_of(ws, "spect_48.nii.gz"))).name, "c.nrrd"))), ["c.nrrd"]),
    ("spect-mha-cut", lambda ws: ws.tia(ws.out(), _with(ws, 2, ws.cut(Path(ws.variant(
        "s.mha", array_of(ws, "spect_48.nii.gz"))).name, "c.mha"))), ["c.mha", "cut short"]),
    ("spect-mhd-raw-cut", lambda ws: ws.tia(ws.out(), _with(ws, 2, _cut_raw(ws))), ["r.mhd", "cut short"]),
    ("spect-empty-file", lambda ws: ws.tia(ws.out(), _with(ws, 0, ws.cut("spect_4.nii.gz", "zero.nii.gz", 0.0))),
     ["zero.nii.gz"]),
    ("spect-not-an-image", lambda ws: (ws.path("text.nii.gz").write_text("hello"),
                                       ws.tia(ws.out(), _with(ws, 0, str(ws.path("text.nii.gz")))))[1],
     ["text.nii.gz"]),
    ("ct-cut-in-half", lambda ws: ws.tia(ws.out(), None, None, "--ct", ws.cut("ct.nii.gz", "ct_cut.nii.gz")),
     ["ct_cut.nii.gz", "cut short"]),
    ("segmentation-cut-in-half", lambda ws: ws.tia(ws.out(), None, None, "--segmentation",
                                                   ws.cut("seg.seg.nrrd", "seg_cut.seg.nrrd")), ["seg_cut.seg.nrrd"]),
    ("register-fixed-ct-cut", lambda ws: ws.register(ws.out(), ws.cut("fixed_ct.nii.gz", "fct_cut.nii.gz")),
     ["fct_cut.nii.gz", "cut short"]),
    ("register-moving-spect-nan", lambda ws: ws.register(ws.out(), None, None, None, _nan_nifti(ws)),
     ["nan.nii.gz", "NaN"]),
    ("register-series-spect-cut", _series_with_cut_spect, ["moving_spect_cut.nii.gz", "cut short"]),
    # 2. values that cannot be what they claim
    ("register-ct-spect-swapped", lambda ws: ws.register(ws.out(), str(ws.path("fixed_spect.nii.gz")),
                                                         str(ws.path("fixed_ct.nii.gz"))), ["fixed CT", "HU"]),
    ("register-moving-spect-is-ct", lambda ws: ws.register(ws.out(), None, None, None,
                                                           str(ws.path("moving_ct.nii.gz"))),
     ["moving SPECT", "negative"]),
    ("tia-ct-is-a-spect", lambda ws: ws.tia(ws.out(), None, None, "--ct", str(ws.path("spect_4.nii.gz"))),
     ["CT", "ct-units"]),
    ("tia-spect-is-a-ct", lambda ws: ws.tia(ws.out(), _with(ws, 1, ws.variant("ct_on_spect.nii.gz", np.where(
        array_of(ws, "spect_24.nii.gz") > 0, 40.0, -1000.0)))), ["ct_on_spect.nii.gz", "negative"]),
    ("tia-spect-all-zero", lambda ws: ws.tia(ws.out(), _with(ws, 2, ws.variant(
        "zeros.nii.gz", np.zeros(ws.spect_g.shape, np.float32)))), ["zeros.nii.gz", "no activity", "spect-empty"]),
    ("tia-spect-negative", lambda ws: ws.tia(ws.out(), _with(ws, 1, _scaled(ws, -1.0, "flipped.nii.gz"))),
     ["flipped.nii.gz", "negative", "spect-units"]),
    ("tia-spect-partly-negative", lambda ws: ws.tia(ws.out(), _with(ws, 1, ws.variant(
        "dipped.nii.gz", array_of(ws, "spect_24.nii.gz") - 0.2 * array_of(ws, "spect_24.nii.gz").max()))),
     ["dipped.nii.gz", "negative values down to"]),
    ("tia-spect-in-mbq-per-ml", lambda ws: ws.tia(ws.out(), _with(ws, 1, _scaled(ws, 1e-6, "mbq.nii.gz"))),
     ["mbq.nii.gz", "spect-activity"]),
    ("tia-times-in-minutes", lambda ws: ws.tia(ws.out(), None, ["240", "1440", "2880", "7200"]),
     ["7200", "half-lives"]),
    ("tia-ct-without-rescale", lambda ws: ws.tia(ws.out(), None, None, "--ct", ws.variant(
        "ct_raw.nii.gz", array_of(ws, "ct.nii.gz") + 1024.0, read_image(ws.path("ct.nii.gz"))[1])),
     ["ct_raw.nii.gz", "ct-units"]),
    ("tia-spacing-1e5-mm", lambda ws: ws.tia(ws.out(), [_spacing(ws, (1e5, 1e5, 1e5), "huge.nii.gz")] * 2,
                                             ["4", "24"]), ["huge.nii.gz", "spacing"]),
    ("tia-spacing-in-metres", lambda ws: ws.tia(ws.out(), [_spacing(ws, (0.004, 0.004, 0.004), "m.nii.gz")] * 2,
                                                ["4", "24"]), ["m.nii.gz", "spacing"]),
    ("tia-unknown-allow", lambda ws: ws.tia(ws.out(), None, None, "--allow", "everything"), ["everything"]),
    # partial-volume correction that cannot be done as asked
    ("tia-pvc-rc-without-curve", lambda ws: ws.tia(ws.out(), None, None, "--segmentation", ws.path("seg.seg.nrrd"),
                                                   "--pvc", "rc", "--psf-fwhm-mm", "12"),
     ["recovery curve", "calibrate-pvc"]),
    ("tia-pvc-without-resolution", lambda ws: ws.tia(ws.out(), None, None, "--segmentation", ws.path("seg.seg.nrrd"),
                                                     "--pvc", "gtm"), ["SPECT resolution", "calibrate-pvc"]),
    ("tia-pvc-fwhm-out-of-range", lambda ws: ws.tia(ws.out(), None, None, "--segmentation", ws.path("seg.seg.nrrd"),
                                                    "--pvc", "gtm", "--psf-fwhm-mm", "0.5"), ["0.5", "1-60 mm"]),
    ("tia-pvc-without-segmentation", lambda ws: ws.tia(ws.out(), None, None, "--pvc", "gtm", "--psf-fwhm-mm", "12"),
     ["needs a segmentation"]),
    ("tia-pvc-calibration-is-not-one", lambda ws: ws.tia(ws.out(), None, None, "--segmentation",
                                                         ws.path("seg.seg.nrrd"), "--pvc", "gtm", "--pvc-calibration",
                                                         ws.path("seg.seg.nrrd")), ["seg.seg.nrrd", "PVC calibration"]),
    ("calibrate-pvc-without-concentrations", lambda ws: ["calibrate-pvc", "--spect", ws.path("spect_4.nii.gz"), "--ct",
                                                         ws.path("ct.nii.gz"), "--spheres", ws.path("seg.seg.nrrd"),
                                                         "--out", ws.out() / "cal.json"],
     ["--sphere-kbq-ml", "--background-kbq-ml"]),
    # 3. outputs never overwrite the user's files
    ("tia-existing-voi-csv", lambda ws: _existing(ws, "voi.csv"), ["voi.csv", "--overwrite"]),
    ("tia-existing-dose", lambda ws: _existing(ws, "dose.nii.gz"), ["dose.nii.gz", "--overwrite"]),
    ("tia-existing-fit-r2", lambda ws: _existing(ws, "fit_r2.nii.gz"), ["fit_r2.nii.gz"]),
    ("tia-existing-summary", lambda ws: _existing(ws, "tia_summary.json"), ["tia_summary.json"]),
    ("tia-input-ct-is-an-output", _ct_at_output, ["dose.nii.gz", "is the input"]),
    ("tia-out-is-a-file", lambda ws: ws.tia(ws.path("ct.nii.gz")), ["is a file"]),
    ("register-input-is-an-output", _input_at_register_output, ["warped_ct.nii.gz", "is the input"]),
    ("register-existing-output-before-work", _existing_register_output, ["metrics.json", "--overwrite"]),
    ("simulate-into-foreign-folder", _foreign_folder, ["no series.json"]),
    ("simulate-over-existing-series", _existing_series, ["series.json", "--overwrite"]),
    ("simulate-one-time-point", lambda ws: ["simulate", "--times", "24", "--out", str(ws.out())],
     ["at least 2 time points"]),
    ("export-card-as-out", lambda ws: ["export-model", "--checkpoint", _checkpoint(ws), "--out",
                                       str(ws.out() / "m.json")], ["m.json", ".pt"]),
    ("export-out-is-checkpoint", lambda ws: ["export-model", "--checkpoint", _checkpoint(ws), "--out",
                                             _checkpoint(ws)], ["best.pt", "is the input"]),
    ("export-over-existing-card", _export_over_card, ["m.json", "--overwrite"]),
    ("register-series-out-inside-series", _series_out_inside, ["inside the input series"]),
    ("register-series-existing-results", _series_existing, ["field_spect.nrrd", "--overwrite"]),
    # 5. manifest fields are checked, not trusted
    ("manifest-hours-null", _series_cmd("hours_null", _hours(None)), ["time_points[1].hours", "None"]),
    ("manifest-hours-text", _series_cmd("hours_text", _hours("24")), ["time_points[1].hours", "'24'"]),
    ("manifest-ct-number", _series_cmd("ct_number", _tp_key("ct", 123)), ["time_points[0].ct", "123"]),
    ("manifest-spect-empty", _series_cmd("spect_empty", _tp_key("spect", "")), ["time_points[0].spect"]),
    ("manifest-top-level-list", _series_cmd("list", lambda m: [m]), ["JSON object", "list"]),
    ("manifest-reference-fraction", _series_cmd("ref_frac", _key("reference_index", 0.7)),
     ["reference_index", "0.7"]),
    ("manifest-reference-bool", _series_cmd("ref_bool", _key("reference_index", True)), ["reference_index"]),
    ("manifest-reference-out-of-range", _series_cmd("ref_range", _key("reference_index", 9)), ["reference_index", "9"]),
    ("manifest-time-points-not-a-list", _series_cmd("tp_dict", _key("time_points", {"0": 1})), ["time_points"]),
    ("manifest-patient-id-empty", _series_cmd("id_empty", _key("patient_id", "")), ["patient_id"]),
    ("manifest-patient-id-dots", _series_cmd("id_dots", _key("patient_id", "../..")), ["patient_id", "'../..'"]),
    ("manifest-patient-id-object", _series_cmd("id_obj", _key("patient_id", {"a": 1})), ["patient_id"]),
    ("manifest-hours-decreasing", _series_cmd("hours_down", _hours(1.0)), ["strictly increasing"]),
    ("manifest-missing-segmentation", _series_cmd("seg_missing", _key("segmentation", "nope.seg.nrrd")),
     ["segmentation", "nope.seg.nrrd"]),
    ("manifest-wrong-format", _series_cmd("format", _key("format", "corx-series/2")), ["format"]),
    ("prepare-data-duplicate-patient-ids", _duplicate_ids, ["P001", "2 manifests"]),
    ("prepare-data-existing-patient-file", _existing_patient_file, ["P001.pt", "--overwrite"]),
    # 7. training
    ("train-unreadable-patient-file", _bad_patient_files, ["sim-0001.pt", "prepare-data"]),
    ("train-unknown-network-field", lambda ws: ["train", "--data", str(ws.root), "--out", str(ws.out()),
                                                "--network", "corx-tiny", "--network-overrides", '{"nonsense": 1}'],
     ["nonsense", "fields are"]),
    ("train-overrides-not-json", lambda ws: ["train", "--data", str(ws.root), "--out", str(ws.out()),
                                             "--network-overrides", "{diffeomorphic}"], ["--network-overrides"]),
    # 9. segments
    ("tia-segment-partly-outside", lambda ws: ws.tia(ws.out(), None, None, "--segmentation", _partly_outside(ws)),
     ["liver", "outside the SPECT field of view", "segment-outside"]),
    ("tia-segmentation-wholly-outside", lambda ws: ws.tia(ws.out(), None, None, "--segmentation", _wholly_outside(ws),
                                                          "--allow", "segment-outside"),
     ["far.nii.gz", "every segment lies outside"]),
]


@pytest.mark.parametrize("case_id, build, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_refuses(ws, capsys, case_id, build, words):
    argv = [str(a) for a in build(ws)]
    before = checksums(ws.root)
    try:
        code = main(argv)
    except SystemExit as exc:                  # argparse refuses an unknown choice itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, f"{case_id}: exit {code}; {err}"
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("corx", "usage")), err
    for word in words:
        assert word in err, f"{case_id}: {word!r} not in {err!r}"
    after = checksums(ws.root)
    assert {k: after.get(k) for k in before} == before, f"{case_id}: a file that existed changed or vanished"
    assert not [k for k in after if ".partial-" in k], "partial file left"
    new = sorted(set(after) - set(before))
    assert not new, f"{case_id}: refused but wrote {new}"


# --------------------------------------------------------------------------- overrides, replacement, writes
def test_allowed_check_becomes_a_recorded_warning(ws, capsys):
    out = ws.out()
    spects = _with(ws, 2, ws.variant("zeros2.nii.gz", np.zeros(ws.spect_g.shape, np.float32)))
    assert main(ws.tia(out, spects, None, "--allow", "spect-empty")) == 0
    messages = json.loads((out / "tia_summary.json").read_text())["messages"]
    assert any("zeros2.nii.gz" in m and "allowed by --allow spect-empty" in m for m in messages)


def test_overwrite_replaces_the_whole_result_set(ws, capsys):
    out = ws.out()
    assert main(ws.tia(out, None, None, "--ct", str(ws.path("ct.nii.gz")), "--segmentation",
                       str(ws.path("seg.seg.nrrd")))) == 0
    assert {"dose.nii.gz", "voi.csv", "dvh.csv"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("the user's own file")
    assert main(ws.tia(out, None, None, "--overwrite")) == 0
    names = {p.name for p in out.iterdir()}
    assert "dose.nii.gz" not in names and "voi.csv" not in names and "dvh.csv" not in names   # no stale results
    assert (out / "notes.txt").read_text() == "the user's own file"                         # not ours: kept


def test_a_refused_run_with_overwrite_keeps_the_earlier_results(ws, capsys):
    out = ws.out()
    assert main(ws.tia(out, None, None, "--ct", str(ws.path("ct.nii.gz")))) == 0
    before = checksums(out)
    spects = _with(ws, 1, ws.cut("spect_24.nii.gz", "cut_again.nii.gz"))
    assert main(ws.tia(out, spects, None, "--ct", str(ws.path("ct.nii.gz")), "--overwrite")) == 2
    assert checksums(out) == before                     # removed only when new results are written


def test_segment_outside_allowed_is_reported_per_segment(ws, capsys):
    out = ws.out()
    assert main(ws.tia(out, None, None, "--segmentation", _partly_outside(ws), "--allow", "segment-outside")) == 0
    row = next(r for r in (out / "voi.csv").read_text().splitlines()[1:] if r.startswith("liver"))
    header = (out / "voi.csv").read_text().splitlines()[0].split(",")
    outside = float(row.split(",")[header.index("outside_fov_percent")])
    assert 5.0 < outside < 100.0


def test_overlapping_multi_layer_seg_nrrd_is_read(ws):
    import SimpleITK as sitk
    g = ws.spect_g
    a, b = np.zeros(g.shape, np.uint8), np.zeros(g.shape, np.uint8)
    a[5:15, 10:30, 10:30], b[10:20, 20:40, 20:40] = 1, 1
    image = sitk.GetImageFromArray(np.stack([a, b], axis=-1), isVector=True)
    image.SetSpacing(g.spacing), image.SetOrigin(g.origin), image.SetDirection(g.direction)
    for i, name in enumerate(("kidney", "tumour")):
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", "1")
        image.SetMetaData(f"Segment{i}_Layer", str(i))
    path = ws.root / "layers.seg.nrrd"
    sitk.WriteImage(image, str(path), True)
    segments, sg = read_segmentation(path)
    assert sg.same_grid(g) and segments["kidney"].sum() == a.sum() and segments["tumour"].sum() == b.sum()
    assert (segments["kidney"] & segments["tumour"]).any()                  # the overlap is in both


def test_times_that_print_alike_get_distinct_columns(ws, capsys):
    out = ws.out()
    assert main(ws.tia(out, None, ["4", "24.0000001", "24.0000002", "120"], "--segmentation",
                       str(ws.path("seg.seg.nrrd")))) == 0
    header = (out / "voi.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header))
    assert "total_mbq_24.0000001h" in header and "total_mbq_24.0000002h" in header


def test_full_disk_leaves_no_partial_output_and_exits_2(ws):
    """A real write failure (the file-size limit of the process, as on a full disk): exit 2 naming the file,
    no output file left, neither whole nor cut short."""
    out = ws.out()
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path[:0] = {[str(ROOT / 'CoRXRegistration'), str(ROOT / 'TIAMapping')]!r}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
        from CoRXRegistrationLib.cli import main
        sys.exit(main({ws.tia(out)!r}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "disk full" in done.stderr or "cannot be written" in done.stderr, done.stderr
    left = [p.name for p in out.iterdir()] if out.is_dir() else []
    assert all(not n.endswith((".nii.gz", ".csv", ".json")) or (out / n).stat().st_size > 0 for n in left)
    for name in left:                                                     # what is there reads back whole
        if name.endswith(".nii.gz"):
            read_image(out / name)
    assert not [n for n in left if ".partial-" in n]
    assert "tia.nii.gz" not in left or "tia_summary.json" not in left     # the run did not complete


def test_patient_ids_are_made_safe_and_unique(ws):
    folder = ws.manifest("traversal", _key("patient_id", "../../x"))
    assert read_series(folder).patient_id == "x"
    assert read_series(ws.manifest("slash", _key("patient_id", "a/b"))).patient_id == "a_b"
    cohort = ws.root / "cohort_mixed"
    shutil.copytree(ws.manifest("good1", _key("patient_id", "P1")), cohort / "p1")
    shutil.copytree(ws.manifest("good2", _key("patient_id", "P2")), cohort / "p2")
    shutil.copytree(ws.manifest("twin", _key("patient_id", "p2")), cohort / "p3")   # same id, other case
    shutil.copytree(ws.manifest("bad", _hours(None)), cohort / "p4")
    errors = []
    found = find_series(cohort, errors)
    assert [m.patient_id for m in found] == ["P1"]
    assert len(errors) == 3 and any("time_points[1].hours" in e for _, e in errors)
    shutil.rmtree(cohort / "p4")
    with pytest.raises(SeriesError, match="2 manifests"):                 # without an error list: refused
        find_series(cohort)


def test_dicom_utc_offsets_are_applied_and_bad_dates_named(tmp_path):
    from datetime import datetime

    from CoRXRegistrationLib.dicom_times import DicomTimeError, read_dicom_timing, series_from_dicom_timings
    pydicom = pytest.importorskip("pydicom")

    def header(path, modality, date, time, offset=None, injection=None):
        ds = pydicom.Dataset()
        ds.Modality, ds.AcquisitionDate, ds.AcquisitionTime = modality, date, time
        if offset:
            ds.TimezoneOffsetFromUTC = offset
        if injection:
            item = pydicom.Dataset()
            item.RadiopharmaceuticalStartDateTime = injection
            ds.RadiopharmaceuticalInformationSequence = [item]
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        try:
            ds.save_as(str(path), enforce_file_format=True)          # pydicom 3
        except TypeError:
            ds.save_as(str(path), write_like_original=False)         # pydicom 2.4 (Slicer 5.8)
        return read_dicom_timing(path)

    # the injection is stated on UTC+1 (10:00 = 09:00 UTC); the 24 h session on UTC+2 (summer time, 11:00 = 09:00 UTC)
    t = {"ct4": header(tmp_path / "a.dcm", "CT", "20260301", "140000", "+0100"),
         "nm4": header(tmp_path / "b.dcm", "NM", "20260301", "140000", "+0100", "20260301100000+0100"),
         "ct24": header(tmp_path / "c.dcm", "CT", "20260302", "110000", "+0200"),
         "nm24": header(tmp_path / "d.dcm", "NM", "20260302", "110000", "+0200", "20260301100000+0100")}
    hours = [h for h, _, _ in series_from_dicom_timings(t)]
    assert hours == [4.0, 24.0]                                          # not 25 h
    mixed = dict(t, ct24=header(tmp_path / "e.dcm", "CT", "20260302", "110000"))
    with pytest.raises(DicomTimeError, match="UTC offset"):
        series_from_dicom_timings(mixed)
    with warnings.catch_warnings():                   # pydicom itself warns of the invalid values it writes
        warnings.simplefilter("ignore")
        with pytest.raises(DicomTimeError, match=r"f\.dcm.*AcquisitionDate.*20261301"):
            header(tmp_path / "f.dcm", "CT", "20261301", "120000")
        with pytest.raises(DicomTimeError, match=r"g\.dcm.*AcquisitionDate/AcquisitionTime.*256100"):
            header(tmp_path / "g.dcm", "CT", "20260301", "256100")
    assert series_from_dicom_timings(t, injection=datetime(2026, 3, 1, 10, 0))[1][0] == 24.0


def test_identical_scans_are_named_in_the_notes(small_series, tmp_path):
    torch = pytest.importorskip("torch")
    from CoRXRegistrationLib.engine import register
    from CoRXRegistrationLib.network import build_network, named_config
    from CoRXRegistrationLib.network.checkpoint import save_checkpoint
    from CoRXRegistrationLib.preprocess import PreprocessConfig
    torch.manual_seed(0)
    fixed = small_series.sessions()[0]
    model = build_network(named_config("corx-tiny"))
    path = save_checkpoint(tmp_path / "tiny.pt", model,
                           PreprocessConfig(grid_size=(64, 64, 64), spacing_mm=7.74).to_dict())
    result = register(fixed, fixed, model=path, device="cpu", native_outputs=False, qa_metrics=False)
    assert any("identical" in n and "noise floor" in n for n in result.notes)


# --------------------------------------------------------------------------- the Logic
def _logic_register(ws, swap=False, ct_as_spect=False):
    import CoRXRegistration as reg
    loaded = reg.CoRXRegistrationLogic().loadSeries(ws.series / "series.json", loadTruth=False)
    cts, spects = loaded["ct"], loaded["spect"]
    if swap:
        cts, spects = spects, cts
    if ct_as_spect:
        spects = [spects[0], cts[1], *spects[2:]]
    return reg.CoRXRegistrationLogic().registerSeries(cts, spects, loaded["times_h"], model="bundled", device="cpu")


def _logic_tia(ws, spect_factor=1.0, ct="ct.nii.gz", times=(4.0, 24.0, 48.0, 120.0), zero=None):
    import CoRXRegistration as reg
    import TIAMapping as tia
    nodes = []
    for i, h in enumerate(TIMES):
        a, g = read_image(ws.path(f"spect_{h}.nii.gz"))
        nodes.append(reg.addVolumeNode(np.zeros_like(a) if i == zero else a * spect_factor, g, f"SPECT {h}h"))
    c, cg = read_image(ws.path(ct))
    return tia.TIAMappingLogic().computeTIA(nodes, list(times), ctVolumeNode=reg.addVolumeNode(c, cg, "CT"))


def _logic_bad_manifest(ws):
    import CoRXRegistration as reg
    return reg.CoRXRegistrationLogic().loadSeries(ws.manifest("logic_bad", _hours(None)) / "series.json")


LOGIC_CASES = [
    ("logic-register-ct-spect-swapped", lambda ws: _logic_register(ws, swap=True), ["CT", "HU"]),
    ("logic-register-ct-as-spect", lambda ws: _logic_register(ws, ct_as_spect=True), ["SPECT", "negative"]),
    ("logic-tia-ct-is-a-spect", lambda ws: _logic_tia(ws, ct="spect_4.nii.gz"), ["CT", "ct-units"]),
    ("logic-tia-negative-spect", lambda ws: _logic_tia(ws, spect_factor=-1.0), ["'SPECT 4h'", "negative",
                                                                                 "spect-units"]),
    ("logic-tia-empty-time-point", lambda ws: _logic_tia(ws, zero=2), ["'SPECT 48h'", "spect-empty"]),
    ("logic-tia-times-in-minutes", lambda ws: _logic_tia(ws, times=(240.0, 1440.0, 2880.0, 7200.0)), ["7200"]),
    ("logic-load-series-bad-manifest", _logic_bad_manifest, ["time_points[1].hours"]),
]


@pytest.mark.parametrize("case_id, build, words", LOGIC_CASES, ids=[c[0] for c in LOGIC_CASES])
def test_logic_refuses_before_making_nodes(ws, mrml_scene, case_id, build, words):
    import slicer
    with pytest.raises(ValueError) as refused:
        build(ws)
    for word in words:
        assert word in str(refused.value), f"{case_id}: {word!r} not in {refused.value}"
    made = [mrml_scene["scene"].GetNthNodeByClass(i, "vtkMRMLNode").GetName()
            for i in range(mrml_scene["scene"].GetNumberOfNodesByClass("vtkMRMLNode"))]
    assert not [n for n in made if "deformed" in n or n.startswith(("TIA", "Dose", "CoRX transform"))], made
    assert slicer.mrmlScene is mrml_scene["scene"]


# --------------------------------------------------------------------------- the batch
SCRIPT = ROOT / "CoRXRegistration" / "Resources" / "Scripts" / "CoRXBatch.py"


def _batch_inside(ws):
    cohort = ws.root / "batch_inside"
    shutil.copytree(ws.manifest("bi", lambda m: None), cohort / "p1", dirs_exist_ok=True)
    return ["--input", cohort, "--output", cohort / "results"]


def _batch_all_bad(ws):
    cohort = ws.root / "batch_bad"
    shutil.copytree(ws.manifest("bb1", _hours(None)), cohort / "p1", dirs_exist_ok=True)
    shutil.copytree(ws.manifest("bb2", _key("reference_index", 0.7)), cohort / "p2", dirs_exist_ok=True)
    return ["--input", cohort, "--output", ws.out()]


def _batch_duplicates(ws):
    cohort = ws.root / "batch_dup"
    for name in ("p1", "p2"):
        shutil.copytree(ws.manifest(f"bd_{name}", lambda m: None), cohort / name, dirs_exist_ok=True)
    return ["--input", cohort, "--output", ws.out()]


BATCH_CASES = [
    ("batch-output-inside-input", _batch_inside, ["inside the input"]),
    ("batch-every-manifest-bad", _batch_all_bad, ["time_points[1].hours", "reference_index", "no patient"]),
    ("batch-duplicate-patient-ids", _batch_duplicates, ["P001", "2 manifests"]),
    ("batch-unknown-allow", lambda ws: ["--input", ws.series, "--output", ws.out(), "--allow", "everything"],
     ["everything"]),
]


@pytest.mark.parametrize("case_id, build, words", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batch_refuses(ws, case_id, build, words):
    pytest.importorskip("slicer")
    argv = [str(a) for a in build(ws)]
    before = checksums(ws.root)
    done = subprocess.run([sys.executable, str(SCRIPT), *argv, "--device", "cpu"], capture_output=True, text=True,
                          timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    for word in words:
        assert word in said, f"{case_id}: {word!r} not in {said}"
    after = checksums(ws.root)
    assert {k: after.get(k) for k in before} == before
    assert not [k for k in set(after) - set(before) if not k.endswith("batch.log")], "refused but wrote results"


# --------------------------------------------------------------------------- the page that lists them
TABLE_TESTS = ("test_command_line_refuses", "test_logic_refuses_before_making_nodes", "test_batch_refuses",
               "test_every_case_is_listed_in_the_reliability_page")


def test_every_case_is_listed_in_the_reliability_page():
    """docs/reliability.md names every case and states the counts the tables hold."""
    page = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    for case_id, _, _ in CLI_CASES + LOGIC_CASES + BATCH_CASES:
        assert case_id in page, case_id
    others = [n for n in globals() if n.startswith("test_") and n not in TABLE_TESTS]
    total = len(CLI_CASES) + len(LOGIC_CASES) + len(BATCH_CASES) + len(others)
    assert f"runs {total} bad-input cases" in page
    for title, table in (("Command line", CLI_CASES), ("Logic", LOGIC_CASES), ("Batch", BATCH_CASES),
                         ("And", others)):
        assert f"{title} ({len(table)})" in page, title
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"{total} bad-input cases are tested ({len(CLI_CASES)} command line, {len(LOGIC_CASES)} Logic, "
            f"{len(BATCH_CASES)} batch, {len(others)} more)") in readme
