"""CoRXRegistration: serial SPECT/CT registration with CoRX-NET (Module, Widget, Logic, Test).

The Logic works on MRML nodes only through ``slicer.util`` and MRML classes, so it runs in
Slicer, in ``Slicer --no-main-window --python-script`` and under plain Python with the
``slicer-core`` wheel (the tests). Arrays and geometry go to ``CoRXRegistrationLib``.
Nothing here imports torch or matplotlib at load time: Slicer bundles neither, and a module whose
import fails is not created. torch comes through the PyTorch extension on first use.
"""

import numpy as np
import slicer
from slicer.util import VTKObservationMixin

try:  # inside the Slicer application
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
except ImportError:  # plain Python with slicer-core: the Logic and the self-tests run, the GUI classes do not
    import unittest

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        """What Slicer's base class gives a Logic: its module name and a singleton parameter node."""

        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """The self-tests run as plain unittest cases; delayDisplay only prints."""

        def delayDisplay(self, message, msec=None):
            print(message)

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
    """Geometry (LPS) of a volume node. Raises ValueError for a node under a transform that is not
    hardened: its voxels are not where its IJK-to-RAS matrix says, and using them would be silently wrong."""
    import vtk
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        raise ValueError(f"'{volumeNode.GetName()}' is under the transform '{transform.GetName()}': harden it first "
                         "(Data module: right-click the transform, 'Harden transform') or remove the transform")
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
    """A vtkMRMLTableNode with one column per key found in any of ``rows`` (list of dicts), in order of
    first appearance. A column holding any string is a text column; the others are numbers. A row
    without a key gets an empty cell (text) or NaN (number)."""
    import vtk
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    for key in keys:
        values = [row.get(key) for row in rows]
        text = any(isinstance(v, str) for v in values)
        column = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        column.SetName(key)
        for v in values:
            column.InsertNextValue(("" if v is None else str(v)) if text else (float("nan") if v is None else float(v)))
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
    display.SetInterpolate(0)               # voxels as they are: a folding voxel stays a black square
    folded = int(np.count_nonzero(np.asarray(jacobian) <= 0))
    jacobianNode.SetAttribute("CoRX.FoldedVoxels", str(folded))
    jacobianNode.SetAttribute("CoRX.FoldedPercent", f"{100.0 * folded / max(np.asarray(jacobian).size, 1):.4f}")
    return folded


def _applicationLogic():
    """Slicer's application logic; under slicer-core one made for slicer.mrmlScene (with its colour
    tables, which volume display nodes need), kept for the scene's lifetime."""
    app = getattr(slicer, "app", None)
    if app is not None:
        return app.applicationLogic()
    scene = slicer.mrmlScene
    cached = getattr(scene, "_corxApplicationLogic", None)
    if cached is None:
        logic = slicer.vtkSlicerApplicationLogic()
        logic.SetMRMLScene(scene)
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLScene(scene)
        cached = scene._corxApplicationLogic = (logic, colors)
    return cached[0]


def renderSliceView(background, foreground=None, foregroundOpacity=0.5, orientation="Axial", offsetMm=None,
                    sizePx=(320, 320)):
    """What a slice view shows: ``background`` and optional ``foreground`` volume nodes composed by
    Slicer's own slice logic with their display nodes (colour tables, window/level, opacity) as they
    are. Returns an RGB uint8 array (rows top to bottom, columns left to right as on screen).
    ``offsetMm``: the slice position along the view's normal (RAS mm); default: the volume's centre."""
    from vtk.util.numpy_support import vtk_to_numpy
    appLogic = _applicationLogic()
    for node in (background, foreground):
        if node is not None and node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    sliceNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSliceNode")    # takes the scene's default presets
    sliceNode.UnRegister(None)
    if not sliceNode.HasSliceOrientationPreset(orientation):             # slicer-core: no application set them
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(slicer.mrmlScene)
        sliceNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSliceNode")
        sliceNode.UnRegister(None)
    if not sliceNode.HasSliceOrientationPreset(orientation):
        raise ValueError(f"unknown slice orientation {orientation!r}; use Axial, Sagittal or Coronal")
    sliceNode.SetName(slicer.mrmlScene.GenerateUniqueName("CoRX snapshot"))
    sliceNode.SetLayoutName(sliceNode.GetName())
    slicer.mrmlScene.AddNode(sliceNode)
    logic = slicer.vtkMRMLSliceLogic()
    try:
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(slicer.mrmlScene)
        logic.SetSliceNode(sliceNode)
        sliceNode.SetOrientation(orientation)
        sliceNode.SetDimensions(int(sizePx[1]), int(sizePx[0]), 1)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(foregroundOpacity))
        logic.FitSliceToAll()
        if offsetMm is not None:
            logic.SetSliceOffset(float(offsetMm))
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return np.ascontiguousarray(rgba[::-1, :, :3])
    finally:
        composite = logic.GetSliceCompositeNode()
        logic.SetMRMLScene(None)
        removeNodes([composite, sliceNode])


def saveNode(node, path):
    """Write ``node`` (volume, transform, table) to ``path`` with its storage node, as Slicer's Save does:
    the node's own storage node, or a default one that is attached to the node (no orphan piles up).
    The file is written under a temporary name in the same folder, checked (complete voxel data) and
    renamed, so a failed write leaves neither a partial file nor a damaged older one."""
    from pathlib import Path

    from CoRXRegistrationLib.imageio import ImageFileError, check_file_complete
    from CoRXRegistrationLib.outputs import atomic_path

    def verify(tmp):
        try:
            check_file_complete(tmp)
        except ImageFileError as exc:
            raise OSError(f"could not write '{node.GetName()}' to {path} completely (disk full?): {exc}") from None

    path = Path(path)
    storage = node.GetStorageNode()
    if storage is None:
        storage = slicer.mrmlScene.AddNode(node.CreateDefaultStorageNode())
        node.SetAndObserveStorageNodeID(storage.GetID())
    with atomic_path(path, verify) as partial:
        storage.SetFileName(str(partial))
        if not storage.WriteData(node):
            raise OSError(f"could not write '{node.GetName()}' to {path}")
    storage.SetFileName(str(path))
    return path


def callNow(compute):
    """The default runner: run ``compute()`` here and now."""
    return compute()


def runKeepingGUIAlive(compute, pump, interval_s=0.05):
    """Run ``compute()`` (no MRML or Qt inside: arrays in, arrays out) on a worker thread and call
    ``pump()`` on this thread every ``interval_s`` until it ends — the panel pumps Qt events and shows
    the progress the worker recorded, so the GUI never freezes and Cancel is seen at once. Returns
    compute's result or raises its exception here."""
    import threading
    box = {}

    def work():
        try:
            box["value"] = compute()
        except BaseException as exc:          # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=work, name="CoRX compute", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(interval_s)
        pump()
    if "error" in box:
        raise box["error"]
    return box["value"]


class PanelProgress:
    """A panel's progress: ``progress(fraction, text)`` may be called on the worker thread and only
    records; :meth:`pump` (GUI thread) shows it in the bar and label and processes Qt events;
    :meth:`run` is the runner the Logic takes."""

    def __init__(self, progressBar, statusLabel):
        self.progressBar, self.statusLabel = progressBar, statusLabel
        self.state = (0.0, "starting")

    def __call__(self, fraction, text=""):
        self.state = (float(fraction), str(text))

    def pump(self):
        fraction, text = self.state
        self.progressBar.value = int(100 * fraction)
        self.statusLabel.text = text
        slicer.app.processEvents()

    def run(self, compute):
        return runKeepingGUIAlive(compute, self.pump)


def removeNodes(nodes):
    """Remove ``nodes`` (None and non-nodes skipped) from slicer.mrmlScene, with their display and storage nodes."""
    for node in nodes:
        if node is None or not hasattr(node, "GetScene") or node.GetScene() is None:
            continue
        helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        helpers += [node.GetStorageNode()] if hasattr(node, "GetStorageNode") else []
        for n in [node] + [h for h in helpers if h is not None]:
            slicer.mrmlScene.RemoveNode(n)


class LogicBusyError(RuntimeError):
    """A long operation of this Logic was started while another one is still running."""


class Busy:
    """Guard against re-entrant runs: ``with self.busy("registration"):`` raises LogicBusyError while
    another guarded run of the same Logic is in progress (e.g. a second Apply during processEvents)."""

    def __init__(self):
        self.running = None

    def __call__(self, what):
        if self.running:
            raise LogicBusyError(f"cannot start {what}: {self.running} is still running; wait or cancel it")
        self.running = what
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.running = None
        return False


def readParameters(logic, defaults):
    """The Logic's parameter node as a dict of strings, ``defaults`` filling what it does not hold."""
    node = logic.getParameterNode()
    return {key: (node.GetParameter(key) if node.GetParameter(key) != "" else value) for key, value in defaults.items()}


def writeParameters(logic, defaults, values):
    """Store ``values`` (keys of ``defaults``) on the Logic's parameter node, saved with the scene."""
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(defaults)}")
    node = logic.getParameterNode()
    for key, value in values.items():
        node.SetParameter(key, str(value))


DEVICES = ("auto", "cpu", "cuda", "mps")


class CoRXRegistrationLogic(ScriptedLoadableModuleLogic):
    """Console/batch entry points: load a series, register pairs or a whole series on MRML nodes.

    Settings (model, device, refinement, reference) live in the module's parameter node, saved with
    the scene: :meth:`parameters` reads them, :meth:`setParameters` checks and stores them.
    """

    PARAMETER_DEFAULTS = {"ModelPath": "", "Device": "auto", "RefineIterations": "0", "ReferenceIndex": "0"}

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self.busy = Busy()

    def parameters(self):
        """Settings as typed values: ModelPath (str, "" = bundled), Device, RefineIterations, ReferenceIndex."""
        p = readParameters(self, self.PARAMETER_DEFAULTS)
        return {"ModelPath": p["ModelPath"], "Device": p["Device"] if p["Device"] in DEVICES else "auto",
                "RefineIterations": int(float(p["RefineIterations"])), "ReferenceIndex": int(float(p["ReferenceIndex"]))}

    def setParameters(self, **values):
        """Check and store settings; raises ValueError naming a bad value."""
        if "Device" in values and values["Device"] not in DEVICES:
            raise ValueError(f"Device must be one of {DEVICES}, got {values['Device']!r}")
        for key in ("RefineIterations", "ReferenceIndex"):
            if key in values and (not float(values[key]).is_integer() or int(values[key]) < 0):
                raise ValueError(f"{key} must be a whole number >= 0, got {values[key]!r}")
        writeParameters(self, self.PARAMETER_DEFAULTS, values)

    def registerPair(self, fixedCTNode, fixedSPECTNode, movingCTNode, movingSPECTNode, model="bundled",
                     device="auto", refineIterations=0, progress=None, cancel=None, name="moving",
                     spectOffset=None, spectOrganShift=True, runner=None, allow=(), fixedReference=None):
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
        ``spectOrganShift=False`` fits the translation only. ``runner(compute)`` runs the node-free
        computation (arrays in, arrays out) and returns its result: by default it is simply called; the
        panel runs it on a worker thread and keeps the GUI live (:func:`runKeepingGUIAlive`). Nodes are
        read before and made after it, on the calling (main) thread. Both sessions pass the input checks
        of ``CoRXRegistrationLib.validate`` (CT in HU, SPECT in Bq/mL, spacing); ``allow``: checks to
        turn into warnings (in the result's notes). ``fixedReference``: the fixed nodes' session already
        prepared (``CoRXRegistrationLib.engine.prepare_fixed``, as :meth:`registerSeries` does once for all
        its pairs); the same results. It must have been prepared from these fixed nodes: a reference whose
        grids are not theirs is refused (ValueError).
        """
        from CoRXRegistrationLib.engine import register
        from CoRXRegistrationLib.network.metrics import deformation_rgb
        from CoRXRegistrationLib.network.spect_offset import SpectOffsetConfig

        if fixedReference is not None and not (
                volumeNodeGeometry(fixedCTNode).same_grid(fixedReference.session.ct_geometry)
                and volumeNodeGeometry(fixedSPECTNode).same_grid(fixedReference.session.spect_geometry)):
            raise ValueError(f"fixedReference was prepared from other volumes than the fixed CT "
                             f"'{fixedCTNode.GetName()}' and SPECT '{fixedSPECTNode.GetName()}' (their grids differ)")
        fixed = fixedReference or sessionFromNodes(fixedCTNode, fixedSPECTNode, "fixed")
        moving = sessionFromNodes(movingCTNode, movingSPECTNode, name)
        result = (runner or callNow)(lambda: register(
            fixed, moving, model=model, device=device, refine_iterations=refineIterations, progress=progress,
            cancel=cancel, spect_offset=spectOffset, spect_offset_config=SpectOffsetConfig(organ_shift=spectOrganShift),
            allow=allow))
        g_spect, g_ct = result.fixed_spect_geometry, result.fixed_ct_geometry
        nodes = {}
        try:   # all the pair's nodes or none: a failure half-way removes what was made
            nodes["transform"] = gridTransformNodeFromField(result.field_spect, g_spect, f"CoRX transform {name}")
            nodes["deformedSPECT"] = addVolumeNode(result.warped_spect, g_spect, f"SPECT {name} deformed")
            nodes["deformedCT"] = addVolumeNode(result.warped_ct, result.warped_ct_geometry or g_ct, f"CT {name} deformed")
            nodes["jacobian"] = addVolumeNode(result.jacobian_spect, g_spect, f"Jacobian {name}")
            nodes["deformationRGB"] = addVolumeNode(deformation_rgb(result.field_spect).numpy(), g_spect,
                                                    f"Deformation RGB {name}", "vtkMRMLVectorVolumeNode")
            showJacobian(nodes["jacobian"], result.jacobian_spect)
            nodes["transform"].SetAttribute("CoRX.FixedSPECT", fixedSPECTNode.GetID())
            nodes["transform"].SetAttribute("CoRX.MovingSPECT", movingSPECTNode.GetID())
            nodes["transform"].SetAttribute("CoRX.SPECTOffsetMm", " ".join(f"{v:.3f}" for v in result.spect_offset_mm))
            nodes["transform"].SetAttribute("CoRX.SPECTOrganShiftMmSuperior", f"{result.spect_organ_shift_mm:.3f}")
            placeInFolder(list(nodes.values()), f"CoRX {name}")
        except Exception:
            removeNodes(nodes.values())
            raise
        nodes["result"] = result
        return nodes

    def registerSeries(self, ctNodes, spectNodes, timesH, referenceIndex=0, model="bundled", device="auto",
                       refineIterations=0, progress=None, cancel=None, spectOffset=None, spectOrganShift=True,
                       runner=None, allow=()):
        """Register every time point to ``referenceIndex``. Returns {"pairs": {hours: nodes},
        "qaTable": table node with the paper's metrics per registered pair, "registeredSPECT": SPECT node
        per time point on the reference SPECT grid (the reference's own node for the reference),
        "cancelled": bool, "message": one line for the user}.

        ``cancel() -> True`` stops at the next step: the pairs finished so far keep their nodes and
        QA rows, the pair under way leaves nothing, "registeredSPECT" is None (the series is
        incomplete) and "message" says "cancelled after N of M time points". ``runner``: see
        :meth:`registerPair`; ``allow``: see :meth:`registerPair`. Raises LogicBusyError while another
        registration of this Logic runs, ValueError on bad input (before any time point is registered)."""
        from CoRXRegistrationLib.engine import load_model
        if not (len(ctNodes) == len(spectNodes) == len(timesH)) or len(timesH) < 2:
            raise ValueError("give one CT, one SPECT and one time (h) per time point, at least 2 time points")
        if not 0 <= referenceIndex < len(timesH):
            raise ValueError(f"reference index {referenceIndex} is not one of the {len(timesH)} time points")
        with self.busy("a registration"):
            from CoRXRegistrationLib.validate import allowed_checks, check_ct, check_hours, check_spect
            allow = allowed_checks(allow)
            check_hours(sorted(timesH), "times", allow=allow)
            for i, (ct, spect) in enumerate(zip(ctNodes, spectNodes)):   # every input, before any work
                check_ct(slicer.util.arrayFromVolume(ct), volumeNodeGeometry(ct), f"{timesH[i]:g} h CT", allow)
                check_spect(slicer.util.arrayFromVolume(spect), volumeNodeGeometry(spect), f"{timesH[i]:g} h SPECT",
                            allow)
            loaded = (runner or callNow)(lambda: load_model(model))
            return self._registerEach(ctNodes, spectNodes, timesH, referenceIndex, loaded, device, refineIterations,
                                      progress, cancel, spectOffset, spectOrganShift, runner, allow)

    def _registerEach(self, ctNodes, spectNodes, timesH, referenceIndex, loaded, device, refineIterations,
                      progress, cancel, spectOffset, spectOrganShift, runner, allow):
        from CoRXRegistrationLib.engine import prepare_fixed
        from CoRXRegistrationLib.progress import Cancelled, check_cancel
        pairs, rows = {}, []
        session = sessionFromNodes(ctNodes[referenceIndex], spectNodes[referenceIndex], "fixed")
        reference = (runner or callNow)(lambda: prepare_fixed(session, loaded, allow))   # once for every pair
        others = [i for i in range(len(timesH)) if i != referenceIndex]
        cancelled = False
        for n, i in enumerate(others):
            sub = None if progress is None else (lambda f, t="", n=n: progress((n + f) / len(others), t))
            try:
                check_cancel(cancel, "before the next time point")
                nodes = self.registerPair(ctNodes[referenceIndex], spectNodes[referenceIndex], ctNodes[i],
                                          spectNodes[i], model=loaded, device=device,
                                          refineIterations=refineIterations, progress=sub, cancel=cancel,
                                          name=f"{timesH[i]:g}h", spectOffset=spectOffset,
                                          spectOrganShift=spectOrganShift, runner=runner, allow=allow,
                                          fixedReference=reference)
            except Cancelled:
                cancelled = True
                break
            pairs[timesH[i]] = nodes
            m = nodes["result"].metrics
            rows.append({"moving (h)": f"{timesH[i]:g}", "fixed (h)": f"{timesH[referenceIndex]:g}",
                         **{f"{k} before": float(v) for k, v in m["identity"].items()},
                         **{f"{k} after": float(v) for k, v in m["registered"].items()},
                         "SPECT/CT offset (mm)": float(np.linalg.norm(nodes["result"].spect_offset_mm)),
                         "SPECT organ shift (mm, + superior)": float(nodes["result"].spect_organ_shift_mm),
                         "seconds": float(nodes["result"].timings_s["total"])})
        if cancelled:
            registered, message = None, f"cancelled after {len(pairs)} of {len(others)} time points"
        else:
            registered = [spectNodes[i] if i == referenceIndex else pairs[timesH[i]]["deformedSPECT"]
                          for i in range(len(timesH))]
            message = f"registered {len(pairs)} time points onto {timesH[referenceIndex]:g} h"
        return {"pairs": pairs, "qaTable": addTableNode(rows, "CoRX registration QA"),
                "registeredSPECT": registered, "cancelled": cancelled, "message": message}

    def seriesFromScene(self, injection="", fileForInstance=None, calibration=None):
        """[(hours, CT node, SPECT node)] for the scene's scalar volumes, and where the hours came from:
        the DICOM headers when any volume was loaded from DICOM (:meth:`seriesFromDicom`, SPECTs in Bq/mL),
        else hours in the volume names ('CT 24h', 'SPECT 24h'). Raises ValueError when no pair is found."""
        from CoRXRegistrationLib.series_io import series_from_names
        volumeNodes = list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        if any(n.GetAttribute("DICOM.instanceUIDs") for n in volumeNodes):
            return (self.seriesFromDicom(volumeNodes, injection, fileForInstance, calibration),
                    "DICOM acquisition times")
        volumes = {n.GetName(): n for n in volumeNodes}
        found = [(h, volumes[ct], volumes[spect]) for h, ct, spect in series_from_names(list(volumes))]
        if not found:
            raise ValueError("No CT/SPECT pairs with hours in their names (e.g. 'CT 24h', 'SPECT 24h') were found; "
                             "fill the table by hand.")
        return found, "volume names"

    def showFusion(self, referenceSPECTNode, pair):
        """Slice views: the reference SPECT (grey) under the pair's deformed SPECT (PET heat) at 50 % opacity."""
        self.styleFusion(referenceSPECTNode, pair["deformedSPECT"])
        slicer.util.setSliceViewerLayers(background=referenceSPECTNode, foreground=pair["deformedSPECT"],
                                         foregroundOpacity=0.5, fit=True)

    @staticmethod
    def styleFusion(referenceSPECTNode, deformedSPECTNode):
        """Colours for a reference-vs-deformed fusion: the reference grey, the deformed SPECT in PET heat,
        both windowed over the same [0, 99.9th percentile of the reference] in Bq/mL, so equal
        concentrations look equal and misalignment shows as colour beside grey."""
        top = float(np.percentile(slicer.util.arrayFromVolume(referenceSPECTNode), 99.9)) or 1.0
        for node, colour in ((referenceSPECTNode, "vtkMRMLColorTableNodeGrey"),
                             (deformedSPECTNode, "vtkMRMLPETProceduralColorNodePET-Heat")):
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if slicer.mrmlScene.GetNodeByID(colour) is not None:
                display.SetAndObserveColorNodeID(colour)
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, top)

    def seriesFromDicom(self, volumeNodes, injection=None, fileForInstance=None, calibration=None):
        """[(hours after injection, CT node, SPECT node in Bq/mL)] in time order, from the DICOM headers of
        the volumes loaded through Slicer's DICOM module (their "DICOM.instanceUIDs" attribute): SPECT
        acquisition start minus the radiopharmaceutical start date-time, each SPECT paired with the CT
        acquired within 2 h of it. ``injection``: a datetime or "YYYY-MM-DD HH:MM" that overrides the
        headers. ``fileForInstance``: UID -> file path (default: Slicer's DICOM database).
        ``calibration``: cps/MBq (a number or its text) for a SPECT in counts (:meth:`spectInBqPerMl`).
        Raises DicomTimeError naming the problem (no dated injection, SPECT without CT, ...) and
        ValueError for a SPECT that cannot be put in Bq/mL."""
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
        from CoRXRegistrationLib.quantification import calibration_entries
        if isinstance(calibration, str):
            try:
                calibration = float(calibration) if calibration.strip() else None
            except ValueError:
                raise ValueError(f"calibration {calibration!r}: give the sensitivity as a number of cps/MBq") from None
        entries = calibration_entries(calibration, "calibration (cps/MBq)")
        return [(hours, nodes[ct], self.spectInBqPerMl(nodes[spect], hours, fileForInstance, entries))
                for hours, ct, spect in rows]

    def spectInBqPerMl(self, node, hours, fileForInstance, calibration=()):
        """The SPECT of a node loaded from DICOM in Bq/mL at acquisition start: its files read again by
        CoRX (units, calibration for counts, decay convention: CoRXRegistrationLib.quantification). The
        node itself when Slicer's values already are these, else a node "<name> (Bq/mL)" beside it (the
        loaded node is left as it is; a later call updates that node)."""
        import json
        from pathlib import Path

        import pydicom

        from CoRXRegistrationLib.dicom_read import DicomSeries
        from CoRXRegistrationLib.dicom_series import DicomSource
        uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
        files = [Path(fileForInstance(uid)) for uid in uids if fileForInstance(uid)]
        if not files:
            raise ValueError(f"{node.GetName()}: its DICOM files are not in the database")
        header = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        series = DicomSeries(str(getattr(header, "SeriesInstanceUID", "")), str(getattr(header, "Modality", "")),
                             files, header)
        source = DicomSource(series, "spect", hours, calibration)
        values, geometry = source.read()
        loaded = slicer.util.arrayFromVolume(node)
        if (volumeNodeGeometry(node).same_grid(geometry) and loaded.shape == values.shape
                and float(np.abs(loaded - values).max()) <= 1e-4 * max(float(np.abs(values).max()), 1.0)):
            return node
        key = " ".join(uids)
        for other in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if other.GetAttribute("CoRX.sourceInstanceUIDs") == key:
                slicer.mrmlScene.RemoveNode(other)
        quantified = addVolumeNode(values, geometry, f"{node.GetName()} (Bq/mL)")
        quantified.SetAttribute("CoRX.sourceInstanceUIDs", key)
        quantified.SetAttribute("CoRX.quantification", json.dumps(source.provenance, default=str))
        return quantified

    def loadSeries(self, manifestPath, loadTruth=True):
        """Load a CoRX series (``series.json``, checked against its schema, a folder of one patient's DICOM
        files, or a :class:`~CoRXRegistrationLib.series_io.SeriesManifest` already read) as volume nodes
        (CT in HU, SPECT in Bq/mL); returns {"ct": [...], "spect": [...], "times_h": [...],
        "truth_transforms": {hours: node}}."""
        from CoRXRegistrationLib.imageio import read_displacement_field
        from CoRXRegistrationLib.series_io import read_series, read_source

        manifest = manifestPath if hasattr(manifestPath, "spect_paths") else read_series(manifestPath)
        out = {"ct": [], "spect": [], "times_h": list(manifest.hours), "truth_transforms": {}}
        for i, hours in enumerate(manifest.hours):
            for key, source in (("ct", manifest.ct_paths[i]), ("spect", manifest.spect_paths[i])):
                array, geometry = read_source(source, key)
                out[key].append(addVolumeNode(array, geometry, f"{key.upper()} {hours:g}h"))
            truth = manifest.truth_path(i, "field_spect") if loadTruth else None
            if truth is not None:
                field, g = read_displacement_field(truth)
                out["truth_transforms"][hours] = gridTransformNodeFromField(field, g, f"True SPECT field {hours:g}h")
        return out


# --------------------------------------------------------------------------- GUI
def torchInstalled():
    """True when torch can be imported, checked without importing it (fast, no side effects)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def ensureTorch():
    """Import torch, installing it on first use through the PyTorch extension (never at module import).
    Call it outside a wait cursor: the extension asks the user before it downloads."""
    if torchInstalled():
        import torch
        return torch
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("CoRX needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer and try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.1")
    if torch is None:
        raise RuntimeError("PyTorch was not installed; CoRX cannot run without it.")
    return torch


def describeModel(path=""):
    """One line on the model a registration would use: ``path`` "" (or "bundled") is the bundled model,
    described from its card without torch; a checkpoint is read only when it exists and torch is
    installed. Never raises: the reason is the text."""
    import json
    from pathlib import Path
    from CoRXRegistrationLib import BUNDLED_MODEL
    if not path or path == "bundled":
        card_path = BUNDLED_MODEL.with_suffix(".json")
        try:
            card = json.loads(card_path.read_text())
            net, prep = card["config"], card["preprocess"]
        except (OSError, ValueError, KeyError) as exc:
            return f"cannot read the bundled model's card {card_path.name}: {exc}"
        source = f"bundled ({BUNDLED_MODEL.name})"
    elif not Path(path).is_file():
        return f"no model file at {path}"
    elif not torchInstalled():
        return "PyTorch is not installed yet: the model is read when you press Apply (PyTorch extension)"
    else:
        try:
            from CoRXRegistrationLib.network.checkpoint import read_checkpoint
            payload = read_checkpoint(path)
            net, prep = payload["config"], payload.get("preprocess", {})
        except Exception as exc:                      # a clear line in the panel instead of a traceback
            return f"cannot read the model: {exc}"
        source = Path(path).name
    return (f"{source}: {net.get('name')}, diffeomorphic {net.get('diffeomorphic')}, SPECT "
            f"{prep.get('spect_normalisation')}, pre-alignment {prep.get('prealign', 'none')} "
            "(fixed by the model's training)")


class CoRXRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Series table (CT, SPECT, hours, remove), reference, model, device and refinement; Apply registers
    every time point with a progress bar and Cancel; settings live in the module's parameter node."""

    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its __init__
        self.running = False
        self.cancelRequested = False
        self.updatingGUI = False
        self.lastOutputs = None
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoRXRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CoRXRegistrationLogic()
        self.ui.seriesTable.setColumnCount(4)
        self.ui.seriesTable.setHorizontalHeaderLabels(["CT", "SPECT", "hours", ""])
        self.ui.seriesTable.horizontalHeader().setStretchLastSection(False)
        self.modelTimer = qt.QTimer()            # ctkPathLineEdit signals every keystroke: read the model
        self.modelTimer.setSingleShot(True)      # once typing has paused
        self.modelTimer.setInterval(600)
        # Restore the saved settings first, then connect: restoring must not write defaults over them.
        self.updateGUIFromParameters()
        self.ui.loadSeriesButton.connect("clicked(bool)", self.onLoadSeries)
        self.ui.fillFromSceneButton.connect("clicked(bool)", self.onFillFromScene)
        self.ui.addTimePointButton.connect("clicked(bool)", self.onAddRow)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", lambda _=None: self.modelTimer.start())
        self.modelTimer.connect("timeout()", self.onModelChanged)
        for widget, signal in ((self.ui.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ui.refineSpinBox, "valueChanged(int)"),
                               (self.ui.referenceComboBox, "currentIndexChanged(int)")):
            widget.connect(signal, self.updateParameters)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneLoaded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.ui.modelInfoLabel.text = describeModel(self.ui.modelPathLineEdit.currentPath)
        self.updateButtons()

    def cleanup(self):
        self.modelTimer.stop()
        self.removeObservers()

    # ---- parameter node: settings saved with the scene
    def updateGUIFromParameters(self):
        p = self.logic.parameters()
        self.updatingGUI = True
        try:
            self.ui.modelPathLineEdit.currentPath = p["ModelPath"]
            self.ui.deviceComboBox.currentText = p["Device"]
            self.ui.refineSpinBox.value = p["RefineIterations"]
            if self.ui.referenceComboBox.count:
                self.ui.referenceComboBox.currentIndex = min(p["ReferenceIndex"], self.ui.referenceComboBox.count - 1)
        finally:
            self.updatingGUI = False

    def updateParameters(self, *_):
        if self.updatingGUI:
            return
        self.logic.setParameters(ModelPath=self.ui.modelPathLineEdit.currentPath,
                                 Device=self.ui.deviceComboBox.currentText,
                                 RefineIterations=self.ui.refineSpinBox.value,
                                 ReferenceIndex=max(self.ui.referenceComboBox.currentIndex, 0))
        self.updateButtons()

    def onSceneLoaded(self, caller=None, event=None):
        with slicer.util.tryWithErrorDisplay("Could not read CoRX settings from the scene."):
            self.updateGUIFromParameters()
            self.ui.modelInfoLabel.text = describeModel(self.ui.modelPathLineEdit.currentPath)

    def onSceneClosed(self, caller=None, event=None):
        with slicer.util.tryWithErrorDisplay("Could not reset the CoRX panel."):
            self.ui.seriesTable.setRowCount(0)
            self.lastOutputs = None
            self.refreshReferenceChoices()
            self.updateGUIFromParameters()

    # ---- the series table: one row per time point, its own Remove button (no "current row" guessing)
    def onAddRow(self):
        with slicer.util.tryWithErrorDisplay("Could not add a time point."):
            self.addRow()

    def addRow(self, ctNode=None, spectNode=None, hours=0.0):
        import qt
        table = self.ui.seriesTable
        row = table.rowCount
        table.insertRow(row)
        for column, node in enumerate((ctNode, spectNode)):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            combo.noneEnabled = True
            combo.addEnabled = combo.removeEnabled = combo.renameEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            combo.setCurrentNode(node)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
            table.setCellWidget(row, column, combo)
        spin = qt.QDoubleSpinBox()
        spin.setRange(0.0, 10000.0)
        spin.setDecimals(2)
        spin.setSuffix(" h")
        spin.value = hours
        spin.connect("valueChanged(double)", lambda _=None: self.refreshReferenceChoices())
        table.setCellWidget(row, 2, spin)
        remove = qt.QToolButton()
        remove.text = "Remove"
        remove.toolTip = "Remove this time point from the series"
        remove.connect("clicked(bool)", lambda _=False, button=remove: self.onRemoveRow(button))
        table.setCellWidget(row, 3, remove)
        self.refreshReferenceChoices()

    def onRemoveRow(self, button):
        with slicer.util.tryWithErrorDisplay("Could not remove the time point."):
            table = self.ui.seriesTable
            for row in range(table.rowCount):
                if table.cellWidget(row, 3) == button:
                    table.removeRow(row)
                    break
            self.refreshReferenceChoices()

    def rows(self):
        table = self.ui.seriesTable
        return [(table.cellWidget(r, 0).currentNode(), table.cellWidget(r, 1).currentNode(),
                 float(table.cellWidget(r, 2).value)) for r in range(table.rowCount)]

    def refreshReferenceChoices(self):
        previous = self.logic.parameters()["ReferenceIndex"]
        self.updatingGUI = True
        try:
            for combo in (self.ui.referenceComboBox, self.ui.overlayComboBox):
                combo.clear()
                for _, _, hours in self.rows():
                    combo.addItem(f"{hours:g} h")
            self.ui.referenceComboBox.currentIndex = min(previous, max(self.ui.referenceComboBox.count - 1, 0))
        finally:
            self.updatingGUI = False
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
        with slicer.util.tryWithErrorDisplay("Could not fill the table.", waitCursor=True):
            found, source = self.logic.seriesFromScene(self.ui.injectionLineEdit.text,
                                                       calibration=self.ui.calibrationLineEdit.text)
            self.ui.seriesTable.setRowCount(0)
            for hours, ct, spect in found:
                self.addRow(ct, spect, hours)
            self.ui.statusLabel.text = f"Found {len(found)} time points from {source}; check them before Apply."

    # ---- model
    def onModelChanged(self, *_):
        with slicer.util.tryWithErrorDisplay("Could not store the model setting."):
            self.ui.modelInfoLabel.text = describeModel(self.ui.modelPathLineEdit.currentPath)
            self.updateParameters()

    # ---- run
    def updateButtons(self, *_):
        rows = self.rows() if hasattr(self, "ui") else []
        complete = len(rows) >= 2 and all(ct and spect for ct, spect, _ in rows)
        hours = sorted(h for _, _, h in rows)
        distinct = all(b > a for a, b in zip(hours, hours[1:]))
        ready = complete and distinct and not self.running
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "" if ready else ("A registration is running" if self.running else
                                                        "Give at least 2 time points, each with a CT, a SPECT "
                                                        "and its own hours after injection")

    def setRunning(self, running):
        """While a registration runs only Cancel is live: no second Apply, no edits to the series."""
        self.running = running
        table = self.ui.seriesTable
        widgets = [self.ui.loadSeriesButton, self.ui.fillFromSceneButton, self.ui.addTimePointButton,
                   self.ui.manifestPathLineEdit, self.ui.injectionLineEdit, self.ui.calibrationLineEdit,
                   self.ui.referenceComboBox,
                   self.ui.modelPathLineEdit, self.ui.deviceComboBox, self.ui.refineSpinBox,
                   self.ui.showOverlayButton]
        widgets += [table.cellWidget(r, c) for r in range(table.rowCount) for c in range(table.columnCount)]
        for widget in widgets:
            if widget is not None:
                widget.enabled = not running
        self.ui.cancelButton.enabled = running
        self.updateButtons()

    def onCancel(self):
        self.cancelRequested = True
        self.ui.statusLabel.text = "Cancelling after the current step..."

    def onApply(self):
        if self.running:
            return
        torch = None
        with slicer.util.tryWithErrorDisplay("CoRX needs PyTorch."):   # no wait cursor over the install question
            torch = ensureTorch()
        if torch is None:
            return

        progress = PanelProgress(self.ui.progressBar, self.ui.statusLabel)   # compute on a worker, GUI stays live
        rows = self.rows()
        p = self.logic.parameters()
        self.cancelRequested = False
        self.setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                out = self.logic.registerSeries([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                                referenceIndex=p["ReferenceIndex"], model=p["ModelPath"] or "bundled",
                                                device=p["Device"], refineIterations=p["RefineIterations"],
                                                progress=progress, cancel=lambda: self.cancelRequested,
                                                runner=progress.run)
                self.lastOutputs = out
                folded = ", ".join(f"{h:g} h: {n['jacobian'].GetAttribute('CoRX.FoldedPercent')} %"
                                   for h, n in out["pairs"].items())
                self.ui.statusLabel.text = (f"{out['message'][0].upper()}{out['message'][1:]}"
                                            + (f" (Jacobian <= 0: {folded})" if folded else "")
                                            + (f"; QA in table '{out['qaTable'].GetName()}'." if out["pairs"] else "."))
                self.ui.progressBar.value = 0 if out["cancelled"] else 100
        finally:
            self.setRunning(False)

    def onShowOverlay(self):
        """Reference SPECT in the background, the chosen time point's deformed SPECT fused on top."""
        with slicer.util.tryWithErrorDisplay("Could not show the overlay."):
            if not self.lastOutputs:
                raise ValueError("Register the series first.")
            rows = self.rows()
            hours = rows[self.ui.overlayComboBox.currentIndex][2] if rows else None
            pair = self.lastOutputs["pairs"].get(hours)
            if pair is None:
                raise ValueError("Choose a registered (non-reference) time point.")
            reference = self.logic.parameters()["ReferenceIndex"]
            self.logic.showFusion(rows[reference][1], pair)


class CoRXRegistrationTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ``Slicer --testing``) and, through the same class, under pytest
    with slicer-core: the Logic end to end on a simulated series."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_grid_transform_moves_point()
        self.setUp()
        self.test_parameters_round_trip()
        self.setUp()
        self.test_register_simulated_series()

    def test_grid_transform_moves_point(self):
        g = Geometry((4, 5, 6), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0))
        field = np.zeros(g.shape + (3,), np.float32)
        field[..., 0] = 1.5  # +1.5 mm towards patient left (LPS x)
        node = gridTransformNodeFromField(field, g, "shift")
        p = g.index_to_lps([2, 2, 1])
        ras = lps_to_ras(p)
        moved = node.GetTransformFromParent().TransformPoint(list(ras))
        self.assertAlmostEqual(moved[0], ras[0] - 1.5, places=4)
        self.delayDisplay("grid transform moves a point by the field")

    def test_parameters_round_trip(self):
        logic = CoRXRegistrationLogic()
        self.assertEqual(logic.parameters()["Device"], "auto")
        logic.setParameters(Device="cpu", RefineIterations=7, ReferenceIndex=1, ModelPath="")
        again = CoRXRegistrationLogic().parameters()        # a new Logic reads the scene's parameter node
        self.assertEqual((again["Device"], again["RefineIterations"], again["ReferenceIndex"]), ("cpu", 7, 1))
        with self.assertRaises(ValueError):
            logic.setParameters(Device="tpu")
        self.delayDisplay("settings survive in the parameter node")

    def test_register_simulated_series(self):
        """Bundled model on a small simulated series: nodes on the reference grids, a QA row per pair,
        SPECT similarity up, no folding."""
        ensureTorch()
        from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
        s = simulate_series(SimulationConfig.preset("small", seed=3, n_tumours=2))
        cts = [addVolumeNode(ct.astype(np.float32), g, f"CT {h:g}h") for ct, g, h in zip(s.ct, s.ct_geometry, s.config.times_h)]
        spects = [addVolumeNode(sp, g, f"SPECT {h:g}h") for sp, g, h in zip(s.spect, s.spect_geometry, s.config.times_h)]
        out = CoRXRegistrationLogic().registerSeries(cts[:2], spects[:2], list(s.config.times_h[:2]), 0, device="cpu")
        self.assertFalse(out["cancelled"])
        pair = out["pairs"][s.config.times_h[1]]
        self.assertTrue(volumeNodeGeometry(pair["deformedSPECT"]).same_grid(s.spect_geometry[0]))
        m = pair["result"].metrics
        self.assertGreater(m["registered"]["spect_lncc"], m["identity"]["spect_lncc"])
        self.assertEqual(int(pair["jacobian"].GetAttribute("CoRX.FoldedVoxels")), 0)
        self.assertEqual(out["qaTable"].GetNumberOfRows(), 1)
        self.delayDisplay("CoRX registration of a simulated series passed")
