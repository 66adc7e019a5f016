"""CoRXRegistration: serial SPECT/CT registration with CoRX-NET (Module, Widget, Logic, Test).

The Logic works on MRML nodes only through ``slicer.util`` and MRML classes, so it runs in
Slicer, in ``Slicer --no-main-window --python-script`` and under plain Python with the
``slicer-core`` wheel (the tests). Arrays and geometry go to ``CoRXRegistrationLib``.
"""
import os

import numpy as np
import slicer

try:  # inside the Slicer application
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
except ImportError:  # plain Python with slicer-core: the Logic is usable, the GUI classes are not
    ScriptedLoadableModule = ScriptedLoadableModuleWidget = ScriptedLoadableModuleTest = object

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

from CoRXRegistrationLib.geometry import Geometry, lps_to_ras

PAPER_CITATION = ("K.M. Kim et al., CoRX-NET: an unsupervised deep image registration network with feature "
                  "sharing for accurate voxel-based dosimetry, Medical Physics 2024.")


class CoRXRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CoRX Registration"
        self.parent.categories = ["Nuclear Medicine"]
        self.parent.dependencies = []
        self.parent.contributors = ["CoRX developers"]
        self.parent.helpText = ("Registers every time point of a serial SPECT/CT series to a reference time point "
                                "with the CoRX-NET deep network (SPECT and CT together) and shows deformed volumes, "
                                "Jacobian and deformation overlays. The same Logic runs from the Python console "
                                "and in batch mode.")
        self.parent.acknowledgementText = "Method: " + PAPER_CITATION


# --------------------------------------------------------------------------- MRML adapters
def volumeNodeGeometry(volumeNode) -> Geometry:
    """Geometry (LPS) of a scalar volume node."""
    import vtk
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    dims = volumeNode.GetImageData().GetDimensions()
    return Geometry.from_ijk_to_ras(tuple(reversed(dims)), ijk_to_ras)


def addVolumeNode(array, geometry: Geometry, name: str, nodeClass="vtkMRMLScalarVolumeNode"):
    """New volume node in slicer.mrmlScene holding ``array`` (z, y, x) at ``geometry``."""
    import vtk
    node = slicer.mrmlScene.AddNewNodeByClass(nodeClass, name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, geometry.ijk_to_ras[r, c])
    node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def gridTransformNodeFromField(field_lps_mm, geometry: Geometry, name: str):
    """Grid transform node (from-parent, RAS vectors) from an LPS-mm resampling displacement field."""
    import vtk
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    grid = slicer.vtkOrientedGridTransform()  # vtkAddon class, exposed on the slicer module
    image = vtk.vtkImageData()
    image.SetDimensions(*geometry.size_xyz)
    image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    ras = geometry.ijk_to_ras
    spacing = geometry.spacing
    image.SetOrigin(*ras[:3, 3])
    image.SetSpacing(*spacing)
    direction = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, ras[r, c] / spacing[c])
    grid.SetDisplacementGridData(image)
    grid.SetGridDirectionMatrix(direction)
    grid.SetInterpolationModeToLinear()
    node.SetAndObserveTransformFromParent(grid)
    slicer.util.arrayFromGridTransform(node)[:] = lps_to_ras(field_lps_mm)
    slicer.util.arrayFromGridTransformModified(node)
    return node


class CoRXRegistrationLogic(ScriptedLoadableModuleLogic):
    """Console/batch entry points. Registration itself arrives with the CoRX model."""

    def loadSeries(self, manifestPath, loadTruth=True):
        """Load a CoRX series (``series.json``) as volume nodes; returns {"ct": [...], "spect": [...], ...}."""
        import json
        from pathlib import Path

        from CoRXRegistrationLib.imageio import read_displacement_field, read_image

        manifestPath = Path(manifestPath)
        manifest = json.loads(manifestPath.read_text())
        base = manifestPath.parent
        out = {"ct": [], "spect": [], "times_h": [], "truth_transforms": {}}
        for point in manifest["time_points"]:
            tag = f"{point['hours']:g}h"
            for key in ("ct", "spect"):
                array, geometry = read_image(base / point[key])
                out[key].append(addVolumeNode(array, geometry, f"{key.upper()} {tag}"))
            out["times_h"].append(point["hours"])
            if loadTruth and "field_spect" in point.get("truth", {}):
                field, g = read_displacement_field(base / point["truth"]["field_spect"])
                out["truth_transforms"][point["hours"]] = gridTransformNodeFromField(field, g, f"True SPECT field {tag}")
        return out


# --------------------------------------------------------------------------- GUI
class CoRXRegistrationWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoRXRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CoRXRegistrationLogic()
        self.ui.loadSeriesButton.connect("clicked(bool)", self.onLoadSeries)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.applyButton.enabled = False
        self.ui.statusLabel.text = "Registration with the bundled CoRX model is not available in this version."

    def onLoadSeries(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the series.", waitCursor=True):
            loaded = self.logic.loadSeries(self.ui.manifestPathLineEdit.currentPath)
            self.ui.statusLabel.text = f"Loaded {len(loaded['ct'])} time points."

    def onApply(self):
        slicer.util.errorDisplay("Registration with the bundled CoRX model is not available in this version.")


class CoRXRegistrationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_grid_transform_moves_point()

    def test_grid_transform_moves_point(self):
        g = Geometry((4, 5, 6), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0))
        field = np.zeros(g.shape + (3,), np.float32)
        field[..., 0] = 1.5  # +1.5 mm towards patient left (LPS x)
        node = gridTransformNodeFromField(field, g, "shift")
        p = g.index_to_lps([2, 2, 1])
        ras = lps_to_ras(p)
        moved = node.GetTransformFromParent().TransformPoint(list(ras))
        self.assertAlmostEqual(moved[0], ras[0] - 1.5, places=4)
        self.delayDisplay("CoRXRegistration test passed")
