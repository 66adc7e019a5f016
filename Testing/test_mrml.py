"""Logic and adapters on a real MRML scene (slicer-core)."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from CoRXRegistrationLib.geometry import Geometry, lps_to_ras  # noqa: E402
from CoRXRegistrationLib.imageio import write_displacement_field, write_seg_nrrd  # noqa: E402


def read_with_storage(scene, node, storage, path):
    """Add ``node`` and its storage node to the scene and read ``path`` as Slicer's loaders do."""
    scene.AddNode(node)
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def oblique_geometry():
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return Geometry((6, 7, 8), (1.5, 2.0, 3.5), (10.0, -20.0, 30.0), direction.ravel())


def test_volume_round_trip_keeps_geometry_and_values(mrml_scene):
    from CoRXRegistration import addVolumeNode, volumeNodeGeometry
    g = oblique_geometry()
    array = np.arange(np.prod(g.shape), dtype=np.float32).reshape(g.shape)
    node = addVolumeNode(array, g, "oblique")
    back = volumeNodeGeometry(node)
    assert back.same_grid(g)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)
    # voxel (i, j, k) = (1, 2, 3) is where Geometry says, in RAS
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint([1, 2, 3, 1])[:3]
    np.testing.assert_allclose(ras, lps_to_ras(g.index_to_lps([1, 2, 3])), atol=1e-6)


def test_displacement_field_file_loads_as_grid_transform_with_right_sign(mrml_scene, tmp_path):
    g = oblique_geometry()
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in g.shape), indexing="ij")
    field = np.zeros(g.shape + (3,), np.float32)
    field[..., 0] = 1.5 + 0.25 * x    # + mm LPS x = towards patient left = - mm in RAS x
    field[..., 1] = 0.125 * y - 0.5 * z
    field[..., 2] = -2.0 + 0.5 * z    # inferior where negative
    path = write_displacement_field(tmp_path / "f.nrrd", field, g)     # components stored plane by plane
    node = read_with_storage(mrml_scene["scene"], slicer.vtkMRMLGridTransformNode(),
                             slicer.vtkMRMLTransformStorageNode(), path)
    for k, j, i in [(3, 3, 2), (1, 5, 7), (5, 0, 4)]:             # (z, y, x) voxel indices
        p = lps_to_ras(g.index_to_lps([i, j, k]))
        moved = node.GetTransformFromParent().TransformPoint(list(p))
        lps = field[k, j, i]
        np.testing.assert_allclose(np.subtract(moved, p), [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_rgb_deformation_file_loads_as_a_vector_volume(mrml_scene, tmp_path):
    from CoRXRegistrationLib.imageio import write_image
    g = oblique_geometry()
    rgb = np.random.default_rng(0).integers(0, 256, g.shape + (3,), dtype=np.uint8)
    path = write_image(tmp_path / "rgb.nrrd", rgb, g, is_vector=True)
    node = read_with_storage(mrml_scene["scene"], slicer.vtkMRMLVectorVolumeNode(),
                             slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), rgb)


def test_grid_transform_node_from_field_matches_file_convention(mrml_scene):
    from CoRXRegistration import gridTransformNodeFromField
    g = oblique_geometry()
    field = np.zeros(g.shape + (3,), np.float32)
    field[..., 1] = 3.0   # 3 mm posterior
    node = gridTransformNodeFromField(field, g, "posterior shift")
    p = lps_to_ras(g.index_to_lps([4, 3, 2]))
    moved = node.GetTransformFromParent().TransformPoint(list(p))
    np.testing.assert_allclose(np.subtract(moved, p), [0.0, -3.0, 0.0], atol=1e-4)


def test_seg_nrrd_loads_into_a_segmentation_node(mrml_scene, tmp_path):
    g = Geometry((5, 6, 7), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    labels = np.zeros(g.shape, np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[3:5, 2:5, 2:6] = 2
    path = write_seg_nrrd(tmp_path / "s.seg.nrrd", labels, {1: "liver", 2: "tumour_1"}, g)
    node = read_with_storage(mrml_scene["scene"], slicer.vtkMRMLSegmentationNode(),
                             slicer.vtkMRMLSegmentationStorageNode(), path)
    seg = node.GetSegmentation()
    names = sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments()))
    assert names == ["liver", "tumour_1"]


def test_tia_logic_on_nodes_matches_library(mrml_scene, tmp_path):
    from CoRXRegistration import addVolumeNode
    from TIAMapping import TIAMappingLogic
    g = oblique_geometry()
    times = [4.0, 24.0, 48.0, 120.0]
    lam = np.log(2) / 60.0
    base = np.linspace(1e4, 1e5, np.prod(g.shape)).reshape(g.shape).astype(np.float32)
    nodes = [addVolumeNode(base * np.exp(-lam * t), g, f"SPECT {t:g}h") for t in times]
    labels = np.zeros(g.shape, np.int16)
    labels[:3] = 1
    label_node = addVolumeNode(labels, g, "VOIs", "vtkMRMLLabelMapVolumeNode")
    result = TIAMappingLogic().computeTIA(nodes, times, label_node, {1: "upper"},     # a small ramp: neither
                                          allow=["spect-units", "spect-activity"])   # sparse nor a patient's
    tia = slicer.util.arrayFromVolume(result["tia"])
    np.testing.assert_allclose(tia, base / lam, rtol=1e-3)
    row = result["voi_rows"][0]
    assert row["segment"] == "upper"
    expected_sum = float((base[:3] / lam).sum() * g.voxel_volume_ml / 1e6)
    assert row["voxel_tia_sum_mbq_h"] == pytest.approx(expected_sum, rel=1e-3)
    # statistics agree with numpy on the same arrays
    assert row["mean_bq_ml_24h"] == pytest.approx(float((base[:3] * np.exp(-lam * 24.0)).mean()), rel=1e-5)
    # VOI table, time-activity chart (one series per segment) and CSV export
    assert result["voiTable"].GetNumberOfRows() == 1
    table = result["tacTable"]
    assert table.GetNumberOfRows() == 4
    total_24h = float((base[:3] * np.exp(-lam * 24.0)).sum() * g.voxel_volume_ml / 1e6)
    assert float(table.GetTable().GetColumnByName("upper").GetValue(1)) == pytest.approx(total_24h, rel=1e-5)
    assert result["tacChart"].GetNumberOfPlotSeriesNodes() == 1
    paths = TIAMappingLogic().exportTables([result["voiTable"], table], tmp_path / "tables")
    assert [p.name for p in paths] == ["TIA_VOI_results.csv", "Time-activity_curves__MBq_.csv"]
    assert "upper" in paths[0].read_text()


def test_tia_logic_rejects_mismatched_grids(mrml_scene):
    from CoRXRegistration import addVolumeNode
    from TIAMapping import TIAMappingLogic
    g = oblique_geometry()
    g2 = Geometry(g.shape, g.spacing, (11.0, -20.0, 30.0), g.direction)
    a = addVolumeNode(np.ones(g.shape, np.float32), g, "a")
    b = addVolumeNode(np.ones(g.shape, np.float32), g2, "b")
    with pytest.raises(ValueError, match="different grids"):
        TIAMappingLogic().computeTIA([a, b], [4.0, 24.0])


def test_load_simulated_series_into_scene(mrml_scene, small_series_dir):
    from CoRXRegistration import CoRXRegistrationLogic, volumeNodeGeometry
    from CoRXRegistrationLib.imageio import read_image
    loaded = CoRXRegistrationLogic().loadSeries(small_series_dir / "series.json")
    assert len(loaded["ct"]) == 4 and len(loaded["truth_transforms"]) == 3
    _, g = read_image(small_series_dir / "spect_024h.nii.gz")
    assert volumeNodeGeometry(loaded["spect"][1]).same_grid(g)


def test_register_series_logic_on_real_nodes(mrml_scene, small_series, tmp_path):
    """registerSeries on volume nodes: outputs on the reference grids, a QA table, and a transform node
    that moves points exactly as the library's field says (checked by hardening a transform)."""
    import torch
    from CoRXRegistration import CoRXRegistrationLogic, addVolumeNode, volumeNodeGeometry
    from CoRXRegistrationLib.network import build_network, named_config
    from CoRXRegistrationLib.network.checkpoint import save_checkpoint
    from CoRXRegistrationLib.preprocess import PreprocessConfig

    torch.manual_seed(0)
    net = build_network(named_config("corx-tiny"))
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))   # a known 0.5-voxel x shift on the network grid
    prep = PreprocessConfig(grid_size=(64, 64, 64), spacing_mm=7.74, prealign="none")    # the field is the head's
    model = save_checkpoint(tmp_path / "tiny.pt", net, prep.to_dict())
    s = small_series
    cts = [addVolumeNode(ct.astype(np.float32), g, f"CT {i}") for i, (ct, g) in enumerate(zip(s.ct, s.ct_geometry))]
    spects = [addVolumeNode(sp, g, f"SPECT {i}") for i, (sp, g) in enumerate(zip(s.spect, s.spect_geometry))]
    out = CoRXRegistrationLogic().registerSeries(cts[:2], spects[:2], [4.0, 24.0], 0, model=str(model), device="cpu",
                                                 spectOffset=False)      # the SPECT field too is the head's alone
    nodes = out["pairs"][24.0]
    assert nodes["transform"].GetAttribute("CoRX.SPECTOffsetMm") == "0.000 0.000 0.000"
    assert nodes["transform"].GetAttribute("CoRX.SPECTOrganShiftMmSuperior") == "0.000"
    assert volumeNodeGeometry(nodes["deformedSPECT"]).same_grid(s.spect_geometry[0])
    assert volumeNodeGeometry(nodes["deformedCT"]).same_grid(s.ct_geometry[0])
    assert nodes["deformationRGB"].IsA("vtkMRMLVectorVolumeNode")
    assert out["qaTable"].GetNumberOfRows() == 1 and out["registeredSPECT"][0] is spects[0]
    # the grid transform node moves a point by the library's field, converted to RAS
    result = nodes["result"]
    g = s.spect_geometry[0]
    ijk = np.array([30, 32, 28])
    p = g.index_to_lps(ijk)
    expected = p + result.field_spect[ijk[2], ijk[1], ijk[0]]
    moved = nodes["transform"].GetTransformFromParent().TransformPoint(list(lps_to_ras(p)))
    np.testing.assert_allclose(lps_to_ras(np.array(moved)), expected, atol=1e-3)
    # the known shift: 0.5 half-resolution voxels = 0.5 * 63/31 network voxels of 7.74 mm along LPS +x
    np.testing.assert_allclose(result.field_spect[ijk[2], ijk[1], ijk[0]], [0.5 * 63 / 31 * 7.74, 0, 0], atol=0.2)
    # and the to-parent (inverse) direction maps the moving point back onto the fixed point
    inverse = nodes["transform"].GetTransformToParent().TransformPoint(list(lps_to_ras(expected)))
    np.testing.assert_allclose(lps_to_ras(np.array(inverse)), p, atol=0.05)
    # outputs grouped per time point in the subject hierarchy; Jacobian shown with its folding count
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    for key in ("transform", "deformedSPECT", "deformedCT", "jacobian", "deformationRGB"):
        item = sh.GetItemByDataNode(nodes[key])
        assert sh.GetItemName(sh.GetItemParent(item)) == "CoRX 24h", key
    jac = slicer.util.arrayFromVolume(nodes["jacobian"])
    assert int(nodes["jacobian"].GetAttribute("CoRX.FoldedVoxels")) == int((jac <= 0).sum())
    colors = slicer.mrmlScene.GetNodeByID(nodes["jacobian"].GetDisplayNode().GetColorNodeID())
    assert colors.GetName().startswith("CoRX Jacobian") and colors.GetNumberOfColors() == 256
    # the SPECT-driven fit, translation only: the organ shift stays 0 on the transform and in the QA table
    fitted = CoRXRegistrationLogic().registerSeries(cts[:2], spects[:2], [4.0, 24.0], 0, model=str(model),
                                                    device="cpu", spectOrganShift=False)
    assert fitted["pairs"][24.0]["transform"].GetAttribute("CoRX.SPECTOrganShiftMmSuperior") == "0.000"
    assert fitted["qaTable"].GetTable().GetColumnByName("SPECT organ shift (mm, + superior)").GetValue(0) == 0.0
    # a fixed session prepared once must be that of the fixed nodes given with it: other grids are refused
    from CoRXRegistration import sessionFromNodes
    from CoRXRegistrationLib.engine import prepare_fixed
    reference = prepare_fixed(sessionFromNodes(cts[0], spects[0]), str(model))
    g = s.spect_geometry[0]
    moved = addVolumeNode(s.spect[0], Geometry(g.shape, g.spacing, np.add(g.origin, (5.0, 0.0, 0.0)), g.direction),
                          "SPECT 0 elsewhere")
    with pytest.raises(ValueError, match="prepared from other volumes than the fixed CT 'CT 0' and SPECT 'SPECT 0 "):
        CoRXRegistrationLogic().registerPair(cts[0], moved, cts[1], spects[1], model=str(model), device="cpu",
                                             fixedReference=reference)


def _dicom_nodes(folder):
    """Volume nodes as Slicer's DICOM module loads them (stored values with the rescale applied, the
    instance UIDs attribute) and the UID -> file map of its database."""
    import pydicom

    from CoRXRegistration import addVolumeNode
    from CoRXRegistrationLib.dicom_read import read_volume, scan_dicom
    files, nodes = {}, []
    for s in scan_dicom(folder):
        uids = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in s.files]
        files.update(zip(uids, map(str, s.files)))
        v = read_volume(s)
        node = addVolumeNode(v.values, v.geometry, f"{s.modality} {s.header.StudyDescription}")
        node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
        nodes.append(node)
    return nodes, files


def test_series_from_dicom_headers_of_volume_nodes(mrml_scene, tmp_path):
    """Nodes loaded from DICOM carry their instance UIDs; the Logic reads their files: hours from the
    headers, every SPECT in Bq/mL (counts converted with the panel's calibration, the loaded node kept)."""
    from CoRXRegistration import CoRXRegistrationLogic, addVolumeNode
    from CoRXRegistrationLib.dicom_export import export_dicom
    from CoRXRegistrationLib.dicom_times import DicomTimeError
    from CoRXRegistrationLib.quantification import CalibrationError
    from CoRXRegistrationLib.series_io import read_series
    from test_dicom import HOURS, _write_series
    (tmp_path / "nifti").mkdir()
    nifti = read_series(_write_series(tmp_path / "nifti"))
    truth = nifti.sessions()
    export_dicom(nifti, tmp_path / "counts", units="CNTS")
    nodes, files = _dicom_nodes(tmp_path / "counts")
    nodes.append(addVolumeNode(np.zeros((2, 2, 2), np.float32), Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
                               "not from DICOM"))
    logic = CoRXRegistrationLogic()
    with pytest.raises(CalibrationError, match=r"CNTS \(counts\), not Bq/mL, and no calibration factor"):
        logic.seriesFromDicom(nodes, fileForInstance=files.get)
    found = logic.seriesFromDicom(nodes, fileForInstance=files.get, calibration="9.6")
    assert [h for h, _, _ in found] == HOURS
    for (h, ct, spect), session in zip(found, truth):
        assert ct.GetName().startswith("CT") and spect.GetName().endswith("(Bq/mL)")
        values = slicer.util.arrayFromVolume(spect)
        assert np.abs(values - session.spect).max() <= 3e-5 * session.spect.max()
        assert "CNTS" in spect.GetAttribute("CoRX.quantification")
    loaded = [n for n in nodes if n.GetName().startswith("NM")]
    assert all(slicer.util.arrayFromVolume(n).max() < 0.01 * truth[0].spect.max() for n in loaded)   # still counts
    again = logic.seriesFromDicom(nodes, "2026-03-02 10:30", files.get, calibration=9.6)
    assert [h for h, _, _ in again] == [h - 1.0 for h in HOURS]
    assert len([n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if n.GetAttribute("CoRX.sourceInstanceUIDs")]) == 3                      # replaced, not piled up
    with pytest.raises(ValueError, match="as a number of cps/MBq"):
        logic.seriesFromDicom(nodes, fileForInstance=files.get, calibration="nine")
    export_dicom(nifti, tmp_path / "bqml")
    bq_nodes, bq_files = _dicom_nodes(tmp_path / "bqml")
    spects = [spect for _, _, spect in logic.seriesFromDicom(bq_nodes, fileForInstance=bq_files.get)]
    assert all(spect in bq_nodes for spect in spects)             # already Bq/mL: the loaded node itself
    with pytest.raises(DicomTimeError, match="none of the volumes was loaded from DICOM"):
        logic.seriesFromDicom(nodes[-1:], fileForInstance=files.get)
