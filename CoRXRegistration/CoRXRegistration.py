"""CoRXRegistration: serial SPECT/CT registration with CoRX-NET (Module, Widget, Logic, Test).

The Logic works on MRML nodes only through ``slicer.util`` and MRML classes, so it runs in
Slicer, in ``Slicer --no-main-window --python-script`` and under plain Python with the
``slicer-core`` wheel (the tests). Arrays and geometry go to ``CoRXRegistrationLib``.
"""

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


def sessionFromNodes(ctNode, spectNode, label=""):
    """A CoRXRegistrationLib SpectCt (arrays + LPS geometry) from a CT and a SPECT volume node."""
    from CoRXRegistrationLib.preprocess import SpectCt
    return SpectCt(slicer.util.arrayFromVolume(ctNode).astype(np.float32), volumeNodeGeometry(ctNode),
                   slicer.util.arrayFromVolume(spectNode).astype(np.float32), volumeNodeGeometry(spectNode),
                   label=label or spectNode.GetName())


def addTableNode(rows, name):
    """A vtkMRMLTableNode with one column per key of ``rows`` (list of dicts; strings or numbers)."""
    import vtk
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    keys = list(rows[0]) if rows else []
    for key in keys:
        column = vtk.vtkStringArray() if isinstance(rows[0][key], str) else vtk.vtkDoubleArray()
        column.SetName(key)
        for r in rows:
            column.InsertNextValue(r[key])
        table.AddColumn(column)
    return table


def placeInFolder(nodes, folderName, parentItem=None):
    """Group ``nodes`` under a subject-hierarchy folder (created once per name and parent); returns its item."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = parentItem if parentItem else sh.GetSceneItemID()
    folder = sh.GetItemChildWithName(parent, folderName) or sh.CreateFolderItem(parent, folderName)
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:                       # in Slicer the subject hierarchy already holds every new node
            sh.SetItemParent(item, folder)
        else:                          # plain MRML scene (slicer-core): add the item ourselves
            sh.CreateItem(folder, node)
    return folder


def jacobianColorNode():
    """A diverging colour table for Jacobian determinants shown over [0, 2]: blue (compression) -
    white (1, volume kept) - red (expansion); entry 0 is black, so values <= 0 (folding) are black."""
    name = "CoRX Jacobian (black = folding)"
    existing = slicer.mrmlScene.GetFirstNodeByName(name)
    if existing is not None:
        return existing
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    for i in range(n):
        x = i / (n - 1) * 2.0                      # Jacobian value of this entry
        if i == 0:
            rgb = (0.0, 0.0, 0.0)
        elif x < 1.0:
            rgb = (x, x, 1.0)                      # blue -> white
        else:
            rgb = (1.0, 2.0 - x, 2.0 - x)          # white -> red
        node.SetColor(i, f"{x:.3f}", *rgb, 1.0)
    return node


def showJacobian(jacobianNode, jacobian):
    """Display the Jacobian over [0, 2] with :func:`jacobianColorNode`; record the folding count as attributes."""
    jacobianNode.CreateDefaultDisplayNodes()
    display = jacobianNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobianColorNode().GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(2.0, 1.0)
    folded = int(np.count_nonzero(np.asarray(jacobian) <= 0))
    jacobianNode.SetAttribute("CoRX.FoldedVoxels", str(folded))
    jacobianNode.SetAttribute("CoRX.FoldedPercent", f"{100.0 * folded / max(np.asarray(jacobian).size, 1):.4f}")
    return folded


def saveNode(node, path):
    """Write ``node`` with its default storage node (volume, transform, table), as Slicer's Save does."""
    storage = node.CreateDefaultStorageNode()
    slicer.mrmlScene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise OSError(f"could not write {node.GetName()} to {path}")
    return path


class CoRXRegistrationLogic(ScriptedLoadableModuleLogic):
    """Console/batch entry points: load a series, register pairs or a whole series on MRML nodes."""

    def registerPair(self, fixedCTNode, fixedSPECTNode, movingCTNode, movingSPECTNode, model="bundled",
                     device="auto", refineIterations=0, progress=None, cancel=None, name="moving",
                     spectOffset=None, spectOrganShift=True):
        """Register the moving SPECT/CT onto the fixed one with CoRX.

        Returns a dict of new nodes: "transform" (grid transform, from-parent, on the fixed SPECT grid:
        what the moving SPECT follows, the CT-driven field plus the SPECT/CT offset, recorded in its
        attribute CoRX.SPECTOffsetMm as LPS mm, plus the cranio-caudal shift of the uptake organs,
        attribute CoRX.SPECTOrganShiftMmSuperior; apply it to the moving SPECT and what was drawn on it),
        "deformedSPECT" (Bq/mL) and "deformedCT" (HU, CT-driven field, without the offset) on the fixed grids,
        "jacobian" (det of the deformation gradient; <= 0 is folding) and "deformationRGB" (R, G, B =
        left-right, anterior-posterior, inferior-superior displacement; grey = none), plus "result"
        (the library's RegistrationResult with metrics and timings). ``spectOffset``: None fits the
        SPECT/CT offset and organ shift when the model reads the SPECT, False never;
        ``spectOrganShift=False`` fits the translation only.
        """
        from CoRXRegistrationLib.engine import register
        from CoRXRegistrationLib.network.metrics import deformation_rgb
        from CoRXRegistrationLib.network.spect_offset import SpectOffsetConfig

        fixed = sessionFromNodes(fixedCTNode, fixedSPECTNode, "fixed")
        moving = sessionFromNodes(movingCTNode, movingSPECTNode, name)
        result = register(fixed, moving, model=model, device=device, refine_iterations=refineIterations,
                          progress=progress, cancel=cancel, spect_offset=spectOffset,
                          spect_offset_config=SpectOffsetConfig(organ_shift=spectOrganShift))
        g_spect, g_ct = result.fixed_spect_geometry, result.fixed_ct_geometry
        nodes = {"transform": gridTransformNodeFromField(result.field_spect, g_spect, f"CoRX transform {name}"),
                 "deformedSPECT": addVolumeNode(result.warped_spect, g_spect, f"SPECT {name} deformed"),
                 "deformedCT": addVolumeNode(result.warped_ct, g_ct, f"CT {name} deformed"),
                 "jacobian": addVolumeNode(result.jacobian_spect, g_spect, f"Jacobian {name}"),
                 "deformationRGB": addVolumeNode(deformation_rgb(result.field_spect).numpy(), g_spect,
                                                 f"Deformation RGB {name}", "vtkMRMLVectorVolumeNode"),
                 "result": result}
        showJacobian(nodes["jacobian"], result.jacobian_spect)
        nodes["transform"].SetAttribute("CoRX.FixedSPECT", fixedSPECTNode.GetID())
        nodes["transform"].SetAttribute("CoRX.MovingSPECT", movingSPECTNode.GetID())
        nodes["transform"].SetAttribute("CoRX.SPECTOffsetMm", " ".join(f"{v:.3f}" for v in result.spect_offset_mm))
        nodes["transform"].SetAttribute("CoRX.SPECTOrganShiftMmSuperior", f"{result.spect_organ_shift_mm:.3f}")
        placeInFolder([v for k, v in nodes.items() if k != "result"], f"CoRX {name}")
        return nodes

    def registerSeries(self, ctNodes, spectNodes, timesH, referenceIndex=0, model="bundled", device="auto",
                       refineIterations=0, progress=None, cancel=None, spectOffset=None, spectOrganShift=True):
        """Register every time point to ``referenceIndex``. Returns {"pairs": {hours: nodes},
        "qaTable": table node with the paper's metrics per pair, "registeredSPECT": SPECT node per time
        point on the reference SPECT grid (the reference's own node for the reference)}."""
        from CoRXRegistrationLib.engine import load_model
        if not (len(ctNodes) == len(spectNodes) == len(timesH)) or len(timesH) < 2:
            raise ValueError("give one CT, one SPECT and one time (h) per time point, at least 2 time points")
        if not 0 <= referenceIndex < len(timesH):
            raise ValueError(f"reference index {referenceIndex} is not one of the {len(timesH)} time points")
        loaded = load_model(model)
        pairs, rows, registered = {}, [], []
        others = [i for i in range(len(timesH)) if i != referenceIndex]
        for n, i in enumerate(others):
            sub = None if progress is None else (lambda f, t="", n=n: progress((n + f) / len(others), t))
            nodes = self.registerPair(ctNodes[referenceIndex], spectNodes[referenceIndex], ctNodes[i],
                                      spectNodes[i], model=loaded, device=device,
                                      refineIterations=refineIterations, progress=sub, cancel=cancel,
                                      name=f"{timesH[i]:g}h", spectOffset=spectOffset,
                                      spectOrganShift=spectOrganShift)
            pairs[timesH[i]] = nodes
            m = nodes["result"].metrics
            rows.append({"moving (h)": f"{timesH[i]:g}", "fixed (h)": f"{timesH[referenceIndex]:g}",
                         **{f"{k} before": float(v) for k, v in m["identity"].items()},
                         **{f"{k} after": float(v) for k, v in m["registered"].items()},
                         "SPECT/CT offset (mm)": float(np.linalg.norm(nodes["result"].spect_offset_mm)),
                         "SPECT organ shift (mm, + superior)": float(nodes["result"].spect_organ_shift_mm),
                         "seconds": float(nodes["result"].timings_s["total"])})
        for i in range(len(timesH)):
            registered.append(spectNodes[i] if i == referenceIndex else pairs[timesH[i]]["deformedSPECT"])
        return {"pairs": pairs, "qaTable": addTableNode(rows, "CoRX registration QA"),
                "registeredSPECT": registered}

    def seriesFromDicom(self, volumeNodes, injection=None, fileForInstance=None):
        """[(hours after injection, CT node, SPECT node)] in time order, from the DICOM headers of the
        volumes loaded through Slicer's DICOM module (their "DICOM.instanceUIDs" attribute): SPECT
        acquisition start minus the radiopharmaceutical start date-time, each SPECT paired with the CT
        acquired within 2 h of it. ``injection``: a datetime or "YYYY-MM-DD HH:MM" that overrides the
        headers. ``fileForInstance``: UID -> file path (default: Slicer's DICOM database). Raises
        DicomTimeError naming the problem (no dated injection, SPECT without CT, ...)."""
        from CoRXRegistrationLib.dicom_times import (DicomTimeError, parse_user_datetime, read_dicom_timing,
                                                     series_from_dicom_timings)
        if fileForInstance is None:
            database = getattr(slicer, "dicomDatabase", None)
            if database is None:
                raise DicomTimeError("Slicer's DICOM database is not open")
            fileForInstance = database.fileForInstance
        nodes, timings = {}, {}
        for node in volumeNodes:
            uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
            path = fileForInstance(uids[0]) if uids else None
            if path:
                nodes[node.GetID()] = node
                timings[node.GetID()] = read_dicom_timing(path)
        if not timings:
            raise DicomTimeError("none of the volumes was loaded from DICOM")
        if isinstance(injection, str):
            injection = parse_user_datetime(injection) if injection.strip() else None
        rows = series_from_dicom_timings(timings, injection)
        return [(hours, nodes[ct], nodes[spect]) for hours, ct, spect in rows]

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
def ensureTorch():
    """Import torch, installing it on first use through the PyTorch extension (never at module import)."""
    try:
        import torch
        return torch
    except ImportError:
        pass
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("CoRX needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer and try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.1")
    if torch is None:
        raise RuntimeError("PyTorch was not installed; CoRX cannot run without it.")
    return torch


class CoRXRegistrationWidget(ScriptedLoadableModuleWidget):
    """Series table (CT, SPECT, hours), reference, model, device and refinement; Apply registers every
    time point with a progress bar and Cancel; settings live in the module's parameter node."""

    PARAMETERS = ("ModelPath", "Device", "RefineIterations", "ReferenceIndex")

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoRXRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CoRXRegistrationLogic()
        self.lastOutputs = None
        self.cancelRequested = False
        self.ui.seriesTable.setHorizontalHeaderLabels(["CT", "SPECT", "hours"])
        self.ui.seriesTable.horizontalHeader().setStretchLastSection(True)
        self.ui.loadSeriesButton.connect("clicked(bool)", self.onLoadSeries)
        self.ui.fillFromSceneButton.connect("clicked(bool)", self.onFillFromScene)
        self.ui.addTimePointButton.connect("clicked(bool)", lambda _=False: self.addRow())
        self.ui.removeTimePointButton.connect("clicked(bool)", self.onRemoveRow)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        for widget, signal in ((self.ui.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ui.refineSpinBox, "valueChanged(int)"),
                               (self.ui.referenceComboBox, "currentIndexChanged(int)")):
            widget.connect(signal, self.updateParameterNode)
        self.restoreParameters()
        self.onModelChanged()
        self.updateButtons()

    # ---- parameter node: settings saved with the scene
    def restoreParameters(self):
        node = self.logic.getParameterNode()
        self.ui.modelPathLineEdit.currentPath = node.GetParameter("ModelPath") or ""
        self.ui.deviceComboBox.currentText = node.GetParameter("Device") or "auto"
        self.ui.refineSpinBox.value = int(node.GetParameter("RefineIterations") or 0)

    def updateParameterNode(self, *_):
        node = self.logic.getParameterNode()
        node.SetParameter("ModelPath", self.ui.modelPathLineEdit.currentPath)
        node.SetParameter("Device", self.ui.deviceComboBox.currentText)
        node.SetParameter("RefineIterations", str(self.ui.refineSpinBox.value))
        node.SetParameter("ReferenceIndex", str(max(self.ui.referenceComboBox.currentIndex, 0)))
        self.updateButtons()

    # ---- the series table
    def addRow(self, ctNode=None, spectNode=None, hours=0.0):
        import qt
        table = self.ui.seriesTable
        row = table.rowCount
        table.insertRow(row)
        for column, (node, cls) in enumerate(((ctNode, "vtkMRMLScalarVolumeNode"), (spectNode, "vtkMRMLScalarVolumeNode"))):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = [cls]
            combo.noneEnabled = True
            combo.addEnabled = combo.removeEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            combo.setCurrentNode(node)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
            table.setCellWidget(row, column, combo)
        spin = qt.QDoubleSpinBox()
        spin.setRange(0.0, 10000.0)
        spin.setSuffix(" h")
        spin.value = hours
        spin.connect("valueChanged(double)", self.updateButtons)
        table.setCellWidget(row, 2, spin)
        self.refreshReferenceChoices()

    def onRemoveRow(self):
        row = self.ui.seriesTable.currentRow()
        if row >= 0:
            self.ui.seriesTable.removeRow(row)
            self.refreshReferenceChoices()

    def rows(self):
        table = self.ui.seriesTable
        return [(table.cellWidget(r, 0).currentNode(), table.cellWidget(r, 1).currentNode(),
                 float(table.cellWidget(r, 2).value)) for r in range(table.rowCount)]

    def refreshReferenceChoices(self):
        combo = self.ui.referenceComboBox
        previous = int(self.logic.getParameterNode().GetParameter("ReferenceIndex") or 0)
        combo.clear()
        for ct, spect, hours in self.rows():
            combo.addItem(f"{hours:g} h")
        self.ui.overlayComboBox.clear()
        for _, _, hours in self.rows():
            self.ui.overlayComboBox.addItem(f"{hours:g} h")
        combo.currentIndex = min(previous, max(combo.count - 1, 0))
        self.updateButtons()

    def onLoadSeries(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the series.", waitCursor=True):
            loaded = self.logic.loadSeries(self.ui.manifestPathLineEdit.currentPath)
            self.ui.seriesTable.setRowCount(0)
            for ct, spect, hours in zip(loaded["ct"], loaded["spect"], loaded["times_h"]):
                self.addRow(ct, spect, hours)
            self.ui.statusLabel.text = f"Loaded {len(loaded['ct'])} time points."

    def onFillFromScene(self):
        """DICOM acquisition times where the volumes came from DICOM, else hours in the volume names."""
        from CoRXRegistrationLib.dicom_times import DicomTimeError
        from CoRXRegistrationLib.series_io import series_from_names
        volumeNodes = list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        if any(n.GetAttribute("DICOM.instanceUIDs") for n in volumeNodes):
            try:
                found = self.logic.seriesFromDicom(volumeNodes, self.ui.injectionLineEdit.text)
            except DicomTimeError as e:
                slicer.util.errorDisplay(f"Hours after injection could not be read from DICOM: {e}")
                return
            source = "DICOM acquisition times"
        else:
            volumes = {n.GetName(): n for n in volumeNodes}
            found = [(h, volumes[ct], volumes[spect]) for h, ct, spect in series_from_names(list(volumes))]
            source = "volume names"
        if not found:
            slicer.util.errorDisplay("No CT/SPECT pairs with hours in their names (e.g. 'CT 24h', 'SPECT 24h') "
                                     "were found; fill the table by hand.")
            return
        self.ui.seriesTable.setRowCount(0)
        for hours, ct, spect in found:
            self.addRow(ct, spect, hours)
        self.ui.statusLabel.text = f"Found {len(found)} time points from {source}; check them before Apply."

    # ---- model
    def onModelChanged(self, *_):
        path = self.ui.modelPathLineEdit.currentPath or "bundled"
        try:
            from CoRXRegistrationLib.network.checkpoint import read_checkpoint
            from CoRXRegistrationLib.engine import BUNDLED_MODEL
            payload = read_checkpoint(BUNDLED_MODEL if path == "bundled" else path)
            net, prep = payload["config"], payload.get("preprocess", {})
            self.ui.modelInfoLabel.text = (f"{net.get('name')}: diffeomorphic {net.get('diffeomorphic')}, SPECT "
                                           f"{prep.get('spect_normalisation')}, pre-alignment "
                                           f"{prep.get('prealign', 'none')} (fixed by the model's training)")
        except Exception as exc:
            self.ui.modelInfoLabel.text = f"cannot read the model: {exc}"
        self.updateParameterNode()

    # ---- run
    def updateButtons(self, *_):
        rows = self.rows() if hasattr(self.ui, "seriesTable") else []
        complete = len(rows) >= 2 and all(ct and spect for ct, spect, _ in rows)
        increasing = all(b[2] > a[2] for a, b in zip(rows, rows[1:]))
        self.ui.applyButton.enabled = complete and increasing
        self.ui.applyButton.toolTip = "" if complete and increasing else \
            "Give at least 2 time points, each with a CT and a SPECT, in increasing hours"

    def onCancel(self):
        self.cancelRequested = True
        self.ui.statusLabel.text = "Cancelling after the current step..."

    def onApply(self):
        def progress(fraction, text=""):
            self.ui.progressBar.value = int(100 * fraction)
            self.ui.statusLabel.text = text
            slicer.app.processEvents()          # keeps the GUI (and Cancel) responsive between steps

        rows = self.rows()
        self.cancelRequested = False
        self.ui.applyButton.enabled = False
        self.ui.cancelButton.enabled = True
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                ensureTorch()
                out = self.logic.registerSeries([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                                referenceIndex=max(self.ui.referenceComboBox.currentIndex, 0),
                                                model=self.ui.modelPathLineEdit.currentPath or "bundled",
                                                device=self.ui.deviceComboBox.currentText,
                                                refineIterations=self.ui.refineSpinBox.value, progress=progress,
                                                cancel=lambda: self.cancelRequested)
                self.lastOutputs = out
                folded = ", ".join(f"{h:g} h: {n['jacobian'].GetAttribute('CoRX.FoldedPercent')} %"
                                   for h, n in out["pairs"].items())
                self.ui.statusLabel.text = (f"Registered {len(out['pairs'])} time points (Jacobian <= 0: {folded}); "
                                            f"QA in table '{out['qaTable'].GetName()}'.")
                self.ui.progressBar.value = 100
        finally:
            self.ui.cancelButton.enabled = False
            self.updateButtons()

    def onShowOverlay(self):
        """Reference SPECT in the background, the chosen time point's deformed SPECT fused on top."""
        if not self.lastOutputs:
            slicer.util.errorDisplay("Register the series first.")
            return
        rows = self.rows()
        ref = max(self.ui.referenceComboBox.currentIndex, 0)
        hours = rows[self.ui.overlayComboBox.currentIndex][2] if rows else None
        pair = self.lastOutputs["pairs"].get(hours)
        if pair is None:
            slicer.util.errorDisplay("Choose a registered (non-reference) time point.")
            return
        slicer.util.setSliceViewerLayers(background=rows[ref][1], foreground=pair["deformedSPECT"],
                                         foregroundOpacity=0.5, fit=True)


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
