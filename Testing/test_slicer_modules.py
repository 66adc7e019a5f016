"""The Slicer modules as Slicer runs them: .ui wiring, packaging, and the Logic's behaviour on a real
MRML scene (slicer-core) — tables, saving, transforms, cancel, re-entrancy, settings, segmentations,
the batch, and the modules' own self-tests. The widget itself needs a Slicer application; what of it
can be checked without one is checked statically here."""
import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["CoRXRegistration", "TIAMapping"]
BATCH = ROOT / "CoRXRegistration" / "Resources" / "Scripts" / "CoRXBatch.py"


# --------------------------------------------------------------------------- static: .ui and widget code
@pytest.mark.parametrize("module", MODULES)
def test_every_qmrml_widget_gets_the_scene_through_a_ui_connection(module):
    """uiWidget.setMRMLScene reaches only the top widget; each qMRML widget needs its connection."""
    root = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()
    top = root.find("widget")
    mrml = {w.get("name") for w in top.iter("widget") if w.get("class", "").startswith("qMRML") and w is not top}
    connected = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                 for c in root.iter("connection")}
    missing = [name for name in sorted(mrml) if (top.get("name"), "mrmlSceneChanged(vtkMRMLScene*)", name,
                                                  "setMRMLScene(vtkMRMLScene*)") not in connected]
    assert not missing, f"{module}.ui: no scene connection for {missing}"


def test_tia_panel_takes_segmentations_and_offers_no_create_or_delete():
    root = ET.parse(ROOT / "TIAMapping" / "Resources" / "UI" / "TIAMapping.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}

    def prop(widget, name):
        p = widget.find(f"property[@name='{name}']")
        return None if p is None else (p.findtext("bool") or [s.text for s in p.iter("string")])

    assert "vtkMRMLSegmentationNode" in prop(widgets["voiSelector"], "nodeTypes")
    for name in ("voiSelector", "ctSelector", "spectNodesSelector"):
        assert prop(widgets[name], "addEnabled") == "false" and prop(widgets[name], "removeEnabled") == "false", name
    labels = " ".join(w.findtext("property[@name='text']/string") or "" for w in widgets.values()
                      if w.get("class") == "QLabel")
    assert "VOIs" in labels and "CT" in labels


def widget_methods(module):
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Widget")
    return {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}


def with_calls(function, name):
    """The ``with`` items of ``function`` that call ``...name(...)``."""
    return [item.context_expr for node in ast.walk(function) if isinstance(node, ast.With) for item in node.items
            if isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "attr", "") == name]


@pytest.mark.parametrize("module", MODULES)
def test_every_handler_shows_its_errors(module):
    """A click must never fail silently: every on... handler (but Cancel) runs in tryWithErrorDisplay."""
    silent = [name for name, f in widget_methods(module).items()
              if name.startswith("on") and name != "onCancel" and not with_calls(f, "tryWithErrorDisplay")]
    assert not silent, f"{module}Widget handlers without tryWithErrorDisplay: {silent}"


def test_torch_install_question_is_not_under_a_wait_cursor():
    apply = widget_methods("CoRXRegistration")["onApply"]
    for node in ast.walk(apply):
        if isinstance(node, ast.With):
            calls = {getattr(c.func, "id", getattr(c.func, "attr", "")) for c in ast.walk(node) if isinstance(c, ast.Call)}
            if "ensureTorch" in calls:
                kwargs = {k.arg for item in node.items for k in getattr(item.context_expr, "keywords", [])}
                assert "waitCursor" not in kwargs


def test_settings_are_restored_before_signals_are_connected_and_on_scene_load():
    setup = widget_methods("CoRXRegistration")["setup"]
    calls = [n for n in ast.walk(setup) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    first_connect = min(c.lineno for c in calls if c.func.attr == "connect")
    restore = min(c.lineno for c in calls if c.func.attr == "updateGUIFromParameters")
    assert restore < first_connect
    source = ast.unparse(setup)
    assert "EndImportEvent" in source and "onSceneLoaded" in source
    # the model path is read once typing pauses, not on every keystroke
    assert re.search(r"currentPathChanged.*modelTimer\.start", source)
    assert "currentPathChanged(QString)', self.onModelChanged" not in source


def test_series_rows_are_removed_by_their_own_button():
    code = (ROOT / "CoRXRegistration" / "CoRXRegistration.py").read_text()
    assert "currentRow()" not in code
    assert "removeTimePointButton" not in (ROOT / "CoRXRegistration" / "Resources" / "UI" / "CoRXRegistration.ui").read_text()


def test_no_torch_attribute_that_older_releases_lack():
    for path in (ROOT / "CoRXRegistration").rglob("*.py"):
        assert not re.search(r"except\s+\(?\s*torch\.OutOfMemoryError", path.read_text()), path


def test_out_of_memory_is_recognised_on_a_torch_without_the_new_class(monkeypatch):
    import torch
    from CoRXRegistrationLib.engine import RegistrationCancelled, is_out_of_memory
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    monkeypatch.delattr(torch.cuda, "OutOfMemoryError", raising=False)
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(RegistrationCancelled("registration cancelled"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_extension_catalog_entry_matches_the_cmake_metadata():
    """The index's JSON entry: the schema's required keys, nothing it forbids (additionalProperties false)."""
    entry = json.loads((ROOT / "CoRX.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert entry["build_dependencies"] == depends
    assert entry["scm_url"].startswith(re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', cmake).group(1))
    assert entry["tier"] in (1, 3, 5)


def test_readme_gives_the_installed_batch_path():
    assert "qt-scripted-modules/Resources/Scripts/CoRXBatch.py" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- Logic on a real scene
slicer = pytest.importorskip("slicer")


from test_engine import tiny_model  # noqa: E402,F401  the small untrained checkpoint fixture the engine tests use


def series_nodes(series, n=None):
    from CoRXRegistration import addVolumeNode
    s = series
    times = list(s.config.times_h)[:n]
    cts = [addVolumeNode(ct.astype(np.float32), g, f"CT {h:g}h") for ct, g, h in zip(s.ct, s.ct_geometry, times)]
    spects = [addVolumeNode(sp, g, f"SPECT {h:g}h") for sp, g, h in zip(s.spect, s.spect_geometry, times)]
    return cts, spects, times


def node_names(scene):
    return sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))


def test_table_takes_every_column_of_every_row(mrml_scene):
    from CoRXRegistration import addTableNode
    table = addTableNode([{"segment": "a", "voxels": 3}, {"segment": "b", "voxels": 0, "eq6_model": "mono"},
                          {"segment": "c", "tia": 2.5}], "t")
    t = table.GetTable()
    assert [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())] == ["segment", "voxels", "eq6_model", "tia"]
    assert t.GetColumnByName("eq6_model").GetValue(1) == "mono" and t.GetColumnByName("eq6_model").GetValue(0) == ""
    assert np.isnan(t.GetColumnByName("tia").GetValue(0)) and t.GetColumnByName("tia").GetValue(2) == 2.5


def test_voi_table_with_an_empty_segment_becomes_a_full_table(mrml_scene):
    """voi_table gives fit columns only to non-empty segments; the MRML table must still carry them."""
    from CoRXRegistration import addTableNode
    from TIAMappingLib.voi import voi_table
    times = [4.0, 24.0, 48.0]
    act = [np.full((4, 4, 4), 1e5 * np.exp(-0.02 * t), np.float32) for t in times]
    inside = np.zeros((4, 4, 4), bool)
    inside[1:3, 1:3, 1:3] = True
    rows = voi_table({"empty": np.zeros((4, 4, 4), bool), "liver": inside}, act, times, 0.064)
    table = addTableNode(rows, "VOI").GetTable()
    assert table.GetColumnByName("eq6_model").GetValue(1) == "mono-exponential (Eq. 6)"
    assert table.GetColumnByName("eq6_model").GetValue(0) == ""
    assert table.GetNumberOfRows() == 2


def test_save_node_attaches_one_storage_node_and_writes_atomically(mrml_scene, tmp_path):
    from CoRXRegistration import addVolumeNode, saveNode
    from CoRXRegistrationLib.geometry import Geometry
    from CoRXRegistrationLib.imageio import read_image
    scene = mrml_scene["scene"]
    g = Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    node = addVolumeNode(np.arange(60, dtype=np.float32).reshape(g.shape), g, "v")
    before = scene.GetNumberOfNodesByClass("vtkMRMLStorageNode")
    for _ in range(3):
        saveNode(node, tmp_path / "v.nrrd")
    assert scene.GetNumberOfNodesByClass("vtkMRMLStorageNode") == before + 1
    assert node.GetStorageNode() is not None and node.GetStorageNode().GetFileName() == str(tmp_path / "v.nrrd")
    assert read_image(tmp_path / "v.nrrd")[0].max() == 59
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]          # no partial file left
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match="a_file"):
        saveNode(node, tmp_path / "a_file" / "v.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "v.nrrd"]


def test_volume_under_a_transform_is_refused_by_name(mrml_scene, small_series, tiny_model):
    from CoRXRegistration import CoRXRegistrationLogic
    from TIAMapping import TIAMappingLogic
    cts, spects, times = series_nodes(small_series, 2)
    shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "table shift")
    spects[1].SetAndObserveTransformNodeID(shift.GetID())
    with pytest.raises(ValueError, match="'SPECT 24h' is under the transform 'table shift'.*harden"):
        CoRXRegistrationLogic().registerSeries(cts, spects, times, model=tiny_model, device="cpu")
    with pytest.raises(ValueError, match="'SPECT 24h' is under the transform"):
        TIAMappingLogic().computeTIA([spects[0], spects[1]], times)


def test_cancel_keeps_finished_pairs_and_leaves_nothing_half_made(mrml_scene, small_series, tiny_model):
    from CoRXRegistration import CoRXRegistrationLogic
    cts, spects, times = series_nodes(small_series, 3)
    before = set(node_names(slicer.mrmlScene))
    state = {"second": False}

    def progress(fraction, text=""):
        if fraction >= 0.5:                    # the second pair has started
            state["second"] = True

    out = CoRXRegistrationLogic().registerSeries(cts, spects, times, 0, model=tiny_model, device="cpu",
                                                 progress=progress, cancel=lambda: state["second"])
    assert out["cancelled"] and out["message"] == "cancelled after 1 of 2 time points"
    assert list(out["pairs"]) == [times[1]] and out["registeredSPECT"] is None
    assert out["qaTable"].GetNumberOfRows() == 1
    made = set(node_names(slicer.mrmlScene)) - before
    assert not any(f"{times[2]:g}h" in name for name in made), made
    assert f"SPECT {times[1]:g}h deformed" in made


def test_a_second_run_during_a_run_is_refused(mrml_scene, small_series, tiny_model):
    """processEvents during Apply lets a user click again: the Logic refuses the nested run."""
    from CoRXRegistration import CoRXRegistrationLogic, LogicBusyError
    from TIAMapping import TIAMappingLogic
    cts, spects, times = series_nodes(small_series, 2)
    logic, nested = CoRXRegistrationLogic(), []

    def progress(fraction, text=""):
        if not nested:
            with pytest.raises(LogicBusyError, match="still running") as info:
                logic.registerSeries(cts, spects, times, model=tiny_model, device="cpu")
            nested.append(info.value)

    out = logic.registerSeries(cts, spects, times, model=tiny_model, device="cpu", progress=progress)
    assert nested and not out["cancelled"]
    logic.registerSeries(cts, spects, times, model=tiny_model, device="cpu", spectOffset=False)  # free again
    tia_logic, tia_nested = TIAMappingLogic(), []

    def tia_progress(fraction, text=""):
        if not tia_nested:
            with pytest.raises(LogicBusyError):
                tia_logic.computeTIA(spects[:1] * 2, [4.0, 24.0])
            tia_nested.append(True)

    reference = [spects[0], out["pairs"][times[1]]["deformedSPECT"]]
    tia_logic.computeTIA(reference, times, progress=tia_progress)
    assert tia_nested


def test_panel_runner_computes_on_a_worker_while_the_gui_thread_pumps(mrml_scene, small_series, tiny_model):
    """The panel's runner: the computation off the GUI thread, the GUI thread pumping events meanwhile,
    nodes made on the GUI thread; the worker's exception is raised on the caller."""
    import threading
    from CoRXRegistration import CoRXRegistrationLogic, runKeepingGUIAlive
    cts, spects, times = series_nodes(small_series, 2)
    pumps, threads = [], set()

    def pump():
        pumps.append(threading.current_thread().name)

    out = CoRXRegistrationLogic().registerSeries(
        cts, spects, times, model=tiny_model, device="cpu",
        progress=lambda f, t="": threads.add(threading.current_thread().name),
        runner=lambda compute: runKeepingGUIAlive(compute, pump, interval_s=0.01))
    assert threads == {"CoRX compute"} and pumps and set(pumps) == {threading.current_thread().name}
    assert out["pairs"][times[1]]["deformedSPECT"].GetScene() is slicer.mrmlScene
    with pytest.raises(ZeroDivisionError):
        runKeepingGUIAlive(lambda: 1 / 0, lambda: None)


def test_long_steps_stop_inside_when_cancelled():
    """Cancel is asked inside the long steps (rigid iterations, SPECT fit evaluations, resampling chunks),
    not only between them, so it takes effect within about a second."""
    import torch
    from CoRXRegistrationLib.geometry import Geometry
    from CoRXRegistrationLib.network.rigid import rigid_prealign
    from CoRXRegistrationLib.network.spect_offset import fit_spect_offset
    from CoRXRegistrationLib.progress import Cancelled
    from CoRXRegistrationLib.resample import resample
    image = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(Cancelled, match="rigid"):
        rigid_prealign(image, image, 0.1, cancel=lambda: True)
    with pytest.raises(Cancelled, match="SPECT/CT offset"):
        fit_spect_offset(image, image, torch.zeros(1, 3, 16, 16, 16), 4.0, cancel=lambda: True)
    g = Geometry((16, 16, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(Cancelled, match="resampling"):
        resample(np.ones(g.shape, np.float32), g, g, displacement=np.zeros(g.shape + (3,), np.float32),
                 cancel=lambda: True)


def test_tia_reports_progress_and_cancel_leaves_no_node(mrml_scene):
    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.geometry import Geometry
    from CoRXRegistrationLib.progress import Cancelled
    from TIAMapping import TIAMappingLogic
    g = Geometry((4, 4, 4), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    times = [4.0, 24.0, 48.0]
    nodes = [addVolumeNode(np.full(g.shape, 1e5 * np.exp(-0.02 * t), np.float32), g, f"S {t:g}h") for t in times]
    labels = addVolumeNode(np.ones(g.shape, np.int16), g, "L", "vtkMRMLLabelMapVolumeNode")
    ct = addVolumeNode(np.zeros(g.shape, np.float32), g, "CT")
    seen = []
    synthetic = ["spect-units", "spect-activity", "ct-units"]          # uniform test volumes, not a patient
    TIAMappingLogic().computeTIA(nodes, times, labels, ctVolumeNode=ct, progress=lambda f, t="": seen.append(f),
                                 allow=synthetic)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 4
    before = node_names(slicer.mrmlScene)
    with pytest.raises(Cancelled):
        TIAMappingLogic().computeTIA(nodes, times, labels, ctVolumeNode=ct, cancel=lambda: True, allow=synthetic)
    assert node_names(slicer.mrmlScene) == before


def test_tia_logic_corrects_partial_volume_from_the_panel_settings(mrml_scene):
    """A hot ball in a warm body blurred by 12 mm: gtm/rbv from the panel's text raise the ball's TIA towards
    the truth, rbv adds corrected TIA and dose nodes, and typed nonsense is refused by name."""
    from scipy import ndimage

    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.geometry import Geometry
    from TIAMapping import TIAMappingLogic
    g = Geometry.centred((20, 24, 24), (4.0, 4.0, 4.0))
    r = np.linalg.norm(g.lps_grid(), axis=-1)
    ball = r <= 14.0
    truth = np.where(ball, 2e5, np.where(r < 44.0, 2e4, 0.0))
    times = [4.0, 24.0, 48.0]
    sigma = 12.0 / 2.3548 / 4.0
    nodes = [addVolumeNode(ndimage.gaussian_filter(truth * np.exp(-0.015 * t), sigma).astype(np.float32), g,
                           f"S {t:g}h") for t in times]
    labels = addVolumeNode(ball.astype(np.int16), g, "L", "vtkMRMLLabelMapVolumeNode")
    ct = addVolumeNode(np.where(r < 44.0, 0.0, -1000.0).astype(np.float32), g, "CT")
    logic = TIAMappingLogic()
    allow = ["spect-activity"]
    plain = logic.computeTIA(nodes, times, labels, {1: "ball"}, ctVolumeNode=ct, allow=allow)
    rbv = logic.computeTIA(nodes, times, labels, {1: "ball"}, ctVolumeNode=ct, allow=allow,
                           pvc=logic.pvcSettings("rbv", "12", "", len(times)))
    true_tia = 2e5 / 0.015 * ball.sum() * g.voxel_volume_ml / 1e6
    before, after = plain["voi_rows"][0]["voxel_tia_sum_mbq_h"], rbv["voi_rows"][0]["pvc_tia_mbq_h"]
    assert before < 0.8 * true_tia and abs(after / true_tia - 1.0) < 0.1
    assert "tia_pvc" in rbv and "dose_pvc" in rbv and "rbv-corrected" in rbv["tia_pvc"].GetName()
    with pytest.raises(ValueError, match="numbers of mm"):
        logic.pvcSettings("gtm", "twelve", "", 3)
    with pytest.raises(ValueError, match="needs the SPECT resolution"):
        logic.pvcSettings("gtm", "", "", 3)


def test_tia_logic_integrates_as_the_panel_says(mrml_scene):
    """The panel's time integration reaches the maps and the VOI table: a curve rising to 4 h and washing out
    is integrated from its peak by default (model 5) and by one fit through every point with "eq6" (model 2)."""
    import slicer

    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.geometry import Geometry
    from TIAMapping import TIAMappingLogic
    g = Geometry.centred((6, 6, 6), (4.0, 4.0, 4.0))
    times = [0.5, 4.0, 24.0, 48.0]
    values = [3e4, 1e5, 1e5 * np.exp(-np.log(2) / 80.0 * 20.0), 1e5 * np.exp(-np.log(2) / 80.0 * 44.0)]
    hot = np.zeros((6, 6, 6), bool)
    hot[2:4, 2:4, 2:4] = True
    nodes = [addVolumeNode(np.where(hot, v, 0.0).astype(np.float32), g, f"S {t:g}h") for v, t in zip(values, times)]
    labels = addVolumeNode(hot.astype(np.int16), g, "L", "vtkMRMLLabelMapVolumeNode")
    logic = TIAMappingLogic()
    allow = ["spect-activity"]
    washout = logic.computeTIA(nodes, times, labels, {1: "hot"}, allow=allow)
    paper = logic.computeTIA(nodes, times, labels, {1: "hot"}, allow=allow, integration="eq6")
    assert (slicer.util.arrayFromVolume(washout["fit_model"])[hot] == 5).all()
    assert (slicer.util.arrayFromVolume(paper["fit_model"])[hot] == 2).all()
    rows = washout["voi_rows"][0], paper["voi_rows"][0]
    assert [r["time_integration"] for r in rows] == ["washout", "eq6"]
    assert rows[1]["organ_tia_mbq_h"] > 1.3 * rows[0]["organ_tia_mbq_h"]


def test_parameters_round_trip_through_a_saved_scene(mrml_scene, tmp_path):
    from CoRXRegistration import CoRXRegistrationLogic
    scene = mrml_scene["scene"]
    CoRXRegistrationLogic().setParameters(Device="cpu", RefineIterations=12, ReferenceIndex=2, ModelPath="/m.pt")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    scene.Clear(1)
    assert CoRXRegistrationLogic().parameters()["Device"] == "auto"          # a fresh scene has the defaults
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Import()
    p = CoRXRegistrationLogic().parameters()
    assert (p["Device"], p["RefineIterations"], p["ReferenceIndex"], p["ModelPath"]) == ("cpu", 12, 2, "/m.pt")
    with pytest.raises(ValueError, match="RefineIterations"):
        CoRXRegistrationLogic().setParameters(RefineIterations=-1)
    with pytest.raises(ValueError, match="unknown parameter"):
        CoRXRegistrationLogic().setParameters(Devise="cpu")


def test_typed_hours_pair_in_the_order_of_checking():
    from TIAMapping import updateCheckOrder
    assert updateCheckOrder([], ["b", "a"]) == ["b", "a"]
    assert updateCheckOrder(["c", "a"], ["a", "b", "c"]) == ["c", "a", "b"]        # list order a, b, c
    assert updateCheckOrder(["c", "a", "b"], ["b", "c"]) == ["c", "b"]


def test_series_from_nodes_sorts_by_time_and_names_problems(mrml_scene):
    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.geometry import Geometry
    from TIAMapping import TIAMappingLogic
    g = Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    late, early = (addVolumeNode(np.zeros(g.shape, np.float32), g, n) for n in ("SPECT 48h deformed", "SPECT 4h"))
    logic = TIAMappingLogic()
    nodes, hours = logic.seriesFromNodes([late, early], "48, 4")
    assert [n.GetName() for n in nodes] == ["SPECT 4h", "SPECT 48h deformed"] and hours == [4.0, 48.0]
    assert logic.seriesFromNodes([late, early])[1] == [4.0, 48.0]                      # from the names
    with pytest.raises(ValueError, match="2 SPECT volumes are checked but 3 hours"):
        logic.seriesFromNodes([late, early], "4 24 48")
    with pytest.raises(ValueError, match="same time"):
        logic.seriesFromNodes([late, early], "4 4")
    with pytest.raises(ValueError, match="must be numbers"):
        logic.seriesFromNodes([late, early], "4 h, 48 h")


def test_tables_are_not_exported_to_the_working_folder(mrml_scene, tmp_path):
    from CoRXRegistration import addTableNode
    from TIAMapping import TIAMappingLogic
    table = addTableNode([{"segment": "a", "tia": 1.0}], "VOI results")
    for folder in (".", "", "relative/dir"):
        with pytest.raises(ValueError, match="absolute folder"):
            TIAMappingLogic().exportTables([table], folder)
    assert [p.name for p in TIAMappingLogic().exportTables([table], tmp_path)] == ["VOI_results.csv"]
    code = (ROOT / "TIAMapping" / "TIAMapping.py").read_text()
    assert "exportDirectoryButton.directory = " in code and "defaultScenePath" in code


def test_self_tests_of_both_modules(mrml_scene):
    """The ScriptedLoadableModuleTests a user runs in Slicer, run here on slicer-core."""
    from CoRXRegistration import CoRXRegistrationTest
    from TIAMapping import TIAMappingTest
    CoRXRegistrationTest().runTest()
    TIAMappingTest().runTest()


# --------------------------------------------------------------------------- what the user sees
def test_rendered_jacobian_shows_folding_black_and_volume_change_in_colour(mrml_scene):
    """Slicer's slice logic composes the Jacobian with its colour table: folding black, 1 white, growth red."""
    from CoRXRegistration import addVolumeNode, renderSliceView, showJacobian
    from CoRXRegistrationLib.geometry import Geometry
    g = Geometry((20, 30, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    smooth = np.ones(g.shape, np.float32)
    smooth[8:12, 10:20, 10:30] = 1.8
    folded = smooth.copy()
    folded[8:12, 14:16, 18:22] = -0.5
    images = []
    for name, jac in (("smooth", smooth), ("folded", folded)):
        node = addVolumeNode(jac, g, name)
        showJacobian(node, jac)
        images.append(renderSliceView(node, sizePx=(200, 300)))
    smooth_img, folded_img = images
    changed = np.any(smooth_img != folded_img, axis=-1)
    assert 20 < changed.sum() < 2000
    assert (folded_img[changed] == 0).all()                                      # folding: black
    assert (smooth_img[changed] == [255, 52, 52]).all()                          # J = 1.8: red
    assert ((smooth_img >= 250).all(axis=-1)).sum() > 10000                      # J = 1: white


def test_rendered_deformed_spect_sits_on_the_ct_where_the_truth_says(mrml_scene):
    """A hot block imaged 8 mm to the patient's left of its CT marker: the moving SPECT shows beside the
    marker on screen (patient left = screen right), the SPECT deformed by the true field on it."""
    from CoRXRegistration import addVolumeNode, renderSliceView
    from CoRXRegistrationLib.geometry import Geometry
    from CoRXRegistrationLib.resample import resample
    g = Geometry((40, 40, 40), (2.0, 2.0, 2.0), (-40.0, -40.0, -40.0))
    ct = np.full(g.shape, -100.0, np.float32)
    ct[16:24, 10:18, 12:20] = 1000.0
    moving = np.zeros(g.shape, np.float32)
    moving[16:24, 10:18, 16:24] = 5e5                      # +4 voxels = +8 mm along LPS x (patient left)
    truth = np.broadcast_to(np.float32([8.0, 0.0, 0.0]), g.shape + (3,)).copy()
    deformed = resample(moving, g, g, displacement=truth)

    def bright_column(array, name):
        image = renderSliceView(addVolumeNode(array, g, name), sizePx=(240, 240)).astype(float).mean(axis=-1)
        rows, cols = np.nonzero(image > 0.5 * image.max())
        return cols.mean(), rows.mean()
    marker = bright_column(ct, "CT")
    before, after = bright_column(moving, "moving SPECT"), bright_column(deformed, "deformed SPECT")
    assert abs(after[0] - marker[0]) < 1.0 and abs(after[1] - marker[1]) < 1.0, (marker, after)
    assert before[0] - marker[0] > 10.0, (marker, before)                          # 8 mm = 24 px at 1/3 mm per px


# --------------------------------------------------------------------------- the batch
def run_batch(*args, timeout=120):
    return subprocess.run([sys.executable, str(BATCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_batch_exits_with_a_reason_when_the_output_cannot_be_made(tmp_path, small_series_dir):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should go")
    done = run_batch("--input", small_series_dir, "--output", blocker)
    assert done.returncode == 2 and "cannot write to the output folder" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    done = run_batch("--input", small_series_dir)                          # argparse: bad arguments
    assert done.returncode == 2 and "--output" in done.stderr


def test_batch_main_never_raises(monkeypatch, tmp_path):
    sys.path.insert(0, str(BATCH.parent))
    try:
        import CoRXBatch
    finally:
        sys.path.remove(str(BATCH.parent))

    def broken(args):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(CoRXBatch, "run", broken)
    assert CoRXBatch.main(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2


def test_batch_empties_the_scene_after_every_patient(mrml_scene, small_series_dir, tmp_path, tiny_model):
    from test_batch import two_point_series
    sys.path.insert(0, str(BATCH.parent))
    try:
        import CoRXBatch
    finally:
        sys.path.remove(str(BATCH.parent))
    cohort = tmp_path / "cohort"
    for pid in ("P1", "P2"):
        two_point_series(small_series_dir, cohort / pid, pid)
    scene = mrml_scene["scene"]
    counts = []
    original = CoRXBatch.process_patient

    def counting(*args, **kwargs):
        counts.append(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode"))
        return original(*args, **kwargs)
    CoRXBatch.process_patient = counting
    try:
        code = CoRXBatch.main(["--input", str(cohort), "--output", str(tmp_path / "out"), "--model", str(tiny_model),
                               "--device", "cpu"])
    finally:
        CoRXBatch.process_patient = original
    assert code == 0
    assert counts == [0, 0] and scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0
    assert (tmp_path / "out" / "P2" / "tia.nrrd").is_file()
