"""TIAMapping: TIA, fit-quality and dose maps and VOI tables from registered SPECT (Module, Widget, Logic, Test).

The Logic converts nodes to arrays + geometry and calls ``TIAMappingLib.pipeline`` — the same
code as ``corx tia``. Nothing on this path needs torch.
"""
import numpy as np
import slicer

from CoRXRegistration import (PAPER_CITATION, Busy, PanelProgress, ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                              ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget, VTKObservationMixin,
                              addTableNode, addVolumeNode, callNow, readParameters, removeNodes, saveNode,
                              volumeNodeGeometry, writeParameters)
from TIAMappingLib.pipeline import compute_tia_outputs
from TIAMappingLib.voxel_tia import DEFAULT_INTEGRATION


class TIAMapping(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TIA Mapping"
        self.parent.categories = ["Nuclear Medicine"]
        self.parent.dependencies = ["CoRXRegistration"]
        self.parent.contributors = ["CoRX developers"]
        self.parent.helpText = ("Fits every voxel's time-activity curve of registered SPECT time points (Bq/mL) into a "
                                "time-integrated activity map (Bq h/mL: the paper's Eq. 6 over each curve's washout phase, "
                                "or over every point), with fit RMSE, model map, "
                                "absorbed dose (Gy, local deposition and 177Lu dose-voxel kernel) and per-segment "
                                "tables, optionally corrected for partial volume (recovery coefficients, geometric "
                                "transfer matrix, region-based voxel-wise) with a phantom-calibrated resolution.")
        self.parent.acknowledgementText = "Method: " + PAPER_CITATION


def updateCheckOrder(previous, checkedNow):
    """The order in which items were checked: ``previous`` (ids, in check order) without the ones no
    longer checked, then the newly checked ones. qMRMLCheckableNodeComboBox.checkedNodes() gives list
    order, not check order, so the panel keeps this itself."""
    now = list(checkedNow)
    return [i for i in previous if i in now] + [i for i in now if i not in previous]


class TIAMappingLogic(ScriptedLoadableModuleLogic):
    """TIA, dose and VOI tables from registered SPECT nodes; one computation at a time."""

    PARAMETER_DEFAULTS = {"ExportFolder": ""}

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self.busy = Busy()

    def parameters(self):
        return readParameters(self, self.PARAMETER_DEFAULTS)

    def setParameters(self, **values):
        writeParameters(self, self.PARAMETER_DEFAULTS, values)

    def seriesFromNodes(self, spectNodes, typedHours=""):
        """(SPECT nodes, hours) in time order. ``typedHours`` ("4 24 48" or "4, 24, 48") pairs with
        ``spectNodes`` in the order given (the panel gives the order of checking); without it the hours
        come from the names ('SPECT 24h deformed'). Raises ValueError naming what does not fit."""
        from CoRXRegistrationLib.series_io import hours_from_name
        nodes = list(spectNodes)
        if not nodes:
            raise ValueError("check the registered SPECT time points to use")
        typed = str(typedHours or "").replace(",", " ").split()
        if typed:
            try:
                hours = [float(v) for v in typed]
            except ValueError:
                raise ValueError(f"hours after injection must be numbers, got '{typedHours}'") from None
            if len(hours) != len(nodes):
                raise ValueError(f"{len(nodes)} SPECT volumes are checked but {len(hours)} hours were typed")
        else:
            hours = [hours_from_name(n.GetName()) for n in nodes]
            missing = [n.GetName() for n, h in zip(nodes, hours) if h is None]
            if missing:
                raise ValueError(f"type the hours after injection: no hours in the names {missing}")
        if len(set(hours)) != len(hours):
            raise ValueError(f"two SPECT volumes have the same time: {hours}")
        order = sorted(range(len(nodes)), key=lambda i: hours[i])
        return [nodes[i] for i in order], [hours[i] for i in order]

    def segmentsFromNode(self, voiNode, referenceVolumeNode, segmentNames=None):
        """VOI masks {name: bool array} and their geometry from a segmentation node (one mask per
        segment, named by the segment, exported onto ``referenceVolumeNode``'s grid; segments may
        overlap) or a label map volume node (one mask per value, named by ``segmentNames[value]``)."""
        if voiNode.IsA("vtkMRMLSegmentationNode"):
            import vtk
            segmentation = voiNode.GetSegmentation()
            masks, geometry = {}, volumeNodeGeometry(referenceVolumeNode)
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CoRX VOI export")
                try:
                    ids = vtk.vtkStringArray()
                    ids.InsertNextValue(segmentId)
                    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                            voiNode, ids, labelmap, referenceVolumeNode):
                        raise ValueError(f"segment '{segmentation.GetNthSegment(i).GetName()}' of "
                                         f"'{voiNode.GetName()}' could not be exported onto the SPECT grid")
                    masks[segmentation.GetNthSegment(i).GetName()] = slicer.util.arrayFromVolume(labelmap) > 0
                finally:
                    removeNodes([labelmap])
            return masks, geometry
        if voiNode.IsA("vtkMRMLLabelMapVolumeNode"):
            labels = slicer.util.arrayFromVolume(voiNode)
            names = segmentNames or {}
            masks = {names.get(int(v), f"label_{int(v)}"): labels == v for v in np.unique(labels) if v != 0}
            return masks, volumeNodeGeometry(voiNode)
        raise ValueError(f"'{voiNode.GetName()}' is a {voiNode.GetClassName()}: VOIs must be a segmentation "
                         "or a label map volume")

    def pvcSettings(self, method="none", fwhmText="", calibrationPath="", nTimes=1):
        """Partial-volume correction settings from the panel's text: ``fwhmText`` one FWHM or three (x y z, mm;
        empty: the calibration file's), ``calibrationPath`` a file from 'corx calibrate-pvc'."""
        from TIAMappingLib.pvc import PVCSettings
        typed = str(fwhmText or "").replace(",", " ").split()
        try:
            fwhm = [float(v) for v in typed] or None
        except ValueError:
            raise ValueError(f"the SPECT resolution must be one or three numbers of mm, got '{fwhmText}'") from None
        return PVCSettings.choose(method or "none", fwhm, str(calibrationPath or "") or None, None, nTimes,
                                  source="typed in the panel")

    def computeTIA(self, spectVolumeNodes, timesHours, voiNode=None, segmentNames=None, ctVolumeNode=None,
                   progress=None, cancel=None, runner=None, allow=(), pvc=None, integration=DEFAULT_INTEGRATION):
        """TIA map (Bq h/mL), fit RMSE (Bq/mL), model map and dose (Gy, with CT) as new volume nodes.

        spectVolumeNodes: registered SPECT in Bq/mL on one grid, in time order; timesHours: hours
        after injection. VOIs from a segmentation node or a label map (see :meth:`segmentsFromNode`).
        Returns a dict of the new nodes, "voi_rows" and "messages". ``progress(fraction, text)`` is told
        each step; ``cancel()`` stops between steps with Cancelled and leaves no new node. ``runner(compute)``
        runs the node-free computation (default: here; the panel: a worker thread). Inputs pass the
        checks of ``CoRXRegistrationLib.validate`` (SPECT in Bq/mL, CT in HU, times, segment coverage);
        ``allow``: checks to turn into warnings (in "messages"). ``pvc``: partial-volume correction
        (:meth:`pvcSettings`): the VOI rows gain the corrected values; rbv adds PV-corrected TIA and dose nodes.
        ``integration``: how each voxel and VOI curve is integrated in time, "washout" or "eq6" (the paper's
        Eq. 6 over every point; ``TIAMappingLib.voxel_tia``).
        Raises ValueError on bad input, LogicBusyError while another computation of this Logic runs.
        """
        if len(spectVolumeNodes) != len(timesHours):
            raise ValueError(f"{len(spectVolumeNodes)} SPECT volumes but {len(timesHours)} times")
        with self.busy("a TIA computation"):
            geometry = volumeNodeGeometry(spectVolumeNodes[0])
            for node in spectVolumeNodes[1:]:
                geometry.require_same_grid(volumeNodeGeometry(node), "SPECT time points")
            activities = [slicer.util.arrayFromVolume(n).astype(np.float32) for n in spectVolumeNodes]
            segments = seg_geometry = ct = ct_geometry = None
            if voiNode is not None:
                segments, seg_geometry = self.segmentsFromNode(voiNode, spectVolumeNodes[0], segmentNames)
            if ctVolumeNode is not None:
                ct_geometry = volumeNodeGeometry(ctVolumeNode)
                ct = slicer.util.arrayFromVolume(ctVolumeNode).astype(np.float32)
            out = (runner or callNow)(lambda: compute_tia_outputs(
                activities, list(timesHours), geometry, segments, seg_geometry, ct, ct_geometry, progress=progress,
                cancel=cancel, allow=allow, labels=[f"'{n.GetName()}' ({t:g} h)" for n, t in zip(spectVolumeNodes,
                                                                                                 timesHours)],
                ct_label=f"CT '{ctVolumeNode.GetName()}'" if ctVolumeNode is not None else "CT", pvc=pvc,
                integration=integration))
            return self._addOutputNodes(out, geometry, list(timesHours))

    def _addOutputNodes(self, out, geometry, timesHours):
        nodes = {}
        try:   # all or none
            nodes["tia"] = addVolumeNode(out.tia, geometry, "TIA (Bq h per mL)")
            nodes["fit_rmse"] = addVolumeNode(out.fit_rmse, geometry, "TIA fit RMSE (Bq per mL)")
            nodes["fit_model"] = addVolumeNode(out.fit_model, geometry, "TIA model used")
            if out.dose is not None:
                nodes["dose"] = addVolumeNode(out.dose, geometry, "Absorbed dose (Gy)")
            if out.dose_kernel is not None:
                nodes["dose_kernel"] = addVolumeNode(out.dose_kernel, geometry, "Absorbed dose, kernel (Gy)")
            if out.tia_pvc is not None:
                nodes["tia_pvc"] = addVolumeNode(out.tia_pvc, geometry, f"TIA {out.pvc.method}-corrected (Bq h per mL)")
            if out.dose_pvc is not None:
                nodes["dose_pvc"] = addVolumeNode(out.dose_pvc, geometry, f"Absorbed dose {out.pvc.method}-corrected (Gy)")
            if out.voi_rows:
                nodes["voiTable"] = addTableNode(out.voi_rows, "TIA VOI results")
                nodes["tacTable"], nodes["tacChart"] = self.timeActivityChart(out.voi_rows, timesHours)
        except Exception:
            removeNodes(nodes.values())
            raise
        nodes["voi_rows"] = out.voi_rows
        nodes["messages"] = out.messages
        return nodes

    def timeActivityChart(self, voiRows, timesHours):
        """A table (hours, then MBq per segment) and a plot chart with one series per segment, as the
        Plots module shows them. Returns (table node, chart node)."""
        from TIAMappingLib.voi import time_labels
        rows = [r for r in voiRows if r.get("status") == "ok"]
        columns = [{"hours": float(t), **{r["segment"]: float(r[f"total_mbq_{tag}"]) for r in rows}}
                   for t, tag in zip(timesHours, time_labels(timesHours))]
        table = addTableNode(columns, "Time-activity curves (MBq)")
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "Time-activity curves")
        chart.SetXAxisTitle("hours after injection")
        chart.SetYAxisTitle("VOI activity (MBq)")
        for r in rows:
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", r["segment"])
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("hours")
            series.SetYColumnName(r["segment"])
            series.SetPlotType(series.PlotTypeScatter)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return table, chart

    def exportTables(self, tableNodes, folder):
        """Write each table node as ``<folder>/<node name>.csv`` (atomically); returns the paths. The folder
        must be absolute and writable: a relative one would land in the application's working folder."""
        import os
        from pathlib import Path
        folder = Path(str(folder or ""))
        if not str(folder) or not folder.is_absolute():
            raise ValueError(f"choose an absolute folder for the tables (got '{folder}')")
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise ValueError(f"the folder {folder} is not writable; choose another one")
        return [saveNode(t, folder / ("".join(c if c.isalnum() or c in "-_" else "_" for c in t.GetName()) + ".csv"))
                for t in tableNodes]


class TIAMappingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Registered SPECT (checked volumes; hours typed in the order of checking, or read from names such
    as 'SPECT 24h deformed'), VOIs (segmentation or label map) and CT in; TIA, fit RMSE, model and dose
    maps, the VOI table, a time-activity chart and CSV out."""

    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its __init__
        self.result = None
        self.checkedOrder = []
        self.running = False
        self.cancelRequested = False
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TIAMapping.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)        # the .ui passes the scene on to every qMRML widget
        self.logic = TIAMappingLogic()
        self.ui.exportDirectoryButton.directory = self.logic.parameters()["ExportFolder"] or slicer.app.defaultScenePath
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.spectNodesSelector.connect("checkedNodesChanged()", self.onInputsChanged)
        self.ui.timesLineEdit.connect("textChanged(QString)", self.onInputsChanged)
        self.ui.exportDirectoryButton.connect("directoryChanged(QString)", self.onExportFolderChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.onInputsChanged()

    def cleanup(self):
        self.removeObservers()

    def checkedSeries(self):
        """(SPECT nodes, hours) in time order, the typed hours paired in the order of checking."""
        byId = {n.GetID(): n for n in self.ui.spectNodesSelector.checkedNodes()}
        self.checkedOrder = updateCheckOrder(self.checkedOrder, list(byId))
        return self.logic.seriesFromNodes([byId[i] for i in self.checkedOrder], self.ui.timesLineEdit.text)

    def onInputsChanged(self, *_):
        """Show how the checked volumes and hours pair up before anything is computed."""
        with slicer.util.tryWithErrorDisplay("Could not read the inputs."):
            try:
                nodes, hours = self.checkedSeries()
                self.ui.orderLabel.text = "; ".join(f"{n.GetName()}: {h:g} h" for n, h in zip(nodes, hours))
                ready = len(nodes) >= 1
            except ValueError as exc:
                self.ui.orderLabel.text = str(exc)
                ready = False
            self.ui.applyButton.enabled = ready and not self.running

    def onExportFolderChanged(self, folder):
        with slicer.util.tryWithErrorDisplay("Could not store the export folder."):
            self.logic.setParameters(ExportFolder=folder)

    def onSceneClosed(self, caller=None, event=None):
        with slicer.util.tryWithErrorDisplay("Could not reset the TIA panel."):
            self.result = None
            self.checkedOrder = []
            self.ui.exportButton.enabled = False
            self.onInputsChanged()

    def setRunning(self, running):
        self.running = running
        for widget in (self.ui.spectNodesSelector, self.ui.timesLineEdit, self.ui.voiSelector, self.ui.ctSelector,
                       self.ui.pvcComboBox, self.ui.psfFwhmLineEdit, self.ui.pvcCalibrationPathLineEdit,
                       self.ui.integrationComboBox,
                       self.ui.exportButton, self.ui.exportDirectoryButton):
            widget.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.enabled = not running

    def onCancel(self):
        self.cancelRequested = True
        self.ui.statusLabel.text = "Cancelling after the current step..."

    def onApply(self):
        from CoRXRegistrationLib.progress import Cancelled
        if self.running:
            return

        progress = PanelProgress(self.ui.progressBar, self.ui.statusLabel)   # compute on a worker, GUI stays live
        self.cancelRequested = False
        self.setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay("Failed to compute the TIA map.", waitCursor=True):
                nodes, times = self.checkedSeries()
                pvc = self.logic.pvcSettings(self.ui.pvcComboBox.currentText, self.ui.psfFwhmLineEdit.text,
                                             self.ui.pvcCalibrationPathLineEdit.currentPath, len(times))
                try:
                    self.result = self.logic.computeTIA(nodes, times, self.ui.voiSelector.currentNode(),
                                                        ctVolumeNode=self.ui.ctSelector.currentNode(),
                                                        progress=progress, cancel=lambda: self.cancelRequested,
                                                        runner=progress.run, pvc=pvc,
                                                        integration=self.ui.integrationComboBox.currentText)
                except Cancelled:
                    self.ui.statusLabel.text = "TIA cancelled; no map was made."
                    self.ui.progressBar.value = 0
                    return
                slicer.util.setSliceViewerLayers(background=self.result["tia"])
                if "voiTable" in self.result:
                    self.ui.voiTableView.setMRMLTableNode(self.result["voiTable"])
                    slicer.modules.plots.logic().ShowChartInLayout(self.result["tacChart"])
                self.ui.statusLabel.text = "; ".join(self.result["messages"]) or \
                    f"TIA computed from {len(nodes)} time points ({', '.join(f'{t:g} h' for t in times)})."
        finally:
            self.setRunning(False)
            self.ui.exportButton.enabled = bool(self.result and "voiTable" in self.result)

    def onExport(self):
        with slicer.util.tryWithErrorDisplay("Failed to export the tables.", waitCursor=True):
            paths = self.logic.exportTables([self.result["voiTable"], self.result["tacTable"]],
                                            self.ui.exportDirectoryButton.directory)
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(p) for p in paths)


class TIAMappingTest(ScriptedLoadableModuleTest):
    """Runs in Slicer and, through the same class, under pytest with slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_uniform_mono_exponential()
        self.setUp()
        self.test_segmentation_node_vois()

    def test_uniform_mono_exponential(self):
        from CoRXRegistrationLib.geometry import Geometry
        g = Geometry((4, 4, 4), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
        times = [4.0, 24.0, 48.0, 120.0]
        lam = np.log(2) / 50.0
        nodes = [addVolumeNode(np.full(g.shape, 1e5 * np.exp(-lam * t), np.float32), g, f"SPECT {t}h") for t in times]
        # a uniform 4^3 volume is neither sparse nor a patient's activity: those input checks are allowed
        result = TIAMappingLogic().computeTIA(nodes, times, allow=["spect-units", "spect-activity"])
        tia = slicer.util.arrayFromVolume(result["tia"])
        self.assertAlmostEqual(float(tia.mean()) / (1e5 / lam), 1.0, places=3)
        self.delayDisplay("uniform mono-exponential TIA passed")

    def test_segmentation_node_vois(self):
        """Two overlapping segments of one segmentation node, each with its own kinetics: one VOI row per
        segment (named by the segment, overlap counted in both), the organ TIA against the analytic
        value, and the time-activity chart, end to end on the SPECT grid."""
        from CoRXRegistrationLib.geometry import Geometry
        g = Geometry((16, 18, 20), (4.0, 4.0, 4.0), (-40.0, -36.0, -32.0))
        times = [4.0, 24.0, 48.0, 120.0]
        a_box, b_box = np.zeros(g.shape, bool), np.zeros(g.shape, bool)
        a_box[3:9, 4:12, 4:12], b_box[6:13, 8:15, 9:17] = True, True
        lam_a, lam_b = np.log(2) / 40.0, np.log(2) / 90.0
        spects = [addVolumeNode((np.where(a_box, 2e5 * np.exp(-lam_a * t), 0.0)
                                 + np.where(b_box & ~a_box, 5e4 * np.exp(-lam_b * t), 0.0)).astype(np.float32), g,
                                f"SPECT {t:g}h") for t in times]
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "VOIs")
        for name, mask in (("kidney", a_box), ("tumour", b_box)):
            labels = addVolumeNode(mask.astype(np.uint8), g, name, "vtkMRMLLabelMapVolumeNode")
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
            seg = segmentation.GetSegmentation()
            seg.GetNthSegment(seg.GetNumberOfSegments() - 1).SetName(name)
            removeNodes([labels])
        result = TIAMappingLogic().computeTIA(spects, times, segmentation)
        rows = {r["segment"]: r for r in result["voi_rows"]}
        self.assertEqual(sorted(rows), ["kidney", "tumour"])
        self.assertEqual(rows["kidney"]["voxels"], int(a_box.sum()))
        self.assertEqual(rows["tumour"]["voxels"], int(b_box.sum()))          # overlap kept in both VOIs
        kidney_mbq_h = 2e5 / lam_a * a_box.sum() * g.voxel_volume_ml / 1e6
        self.assertAlmostEqual(rows["kidney"]["eq6_tia_mbq_h"] / kidney_mbq_h, 1.0, places=3)
        tia = slicer.util.arrayFromVolume(result["tia"])
        tumour_voxel_sum = float(tia[b_box].sum(dtype=np.float64) * g.voxel_volume_ml / 1e6)
        self.assertAlmostEqual(rows["tumour"]["voxel_tia_sum_mbq_h"] / tumour_voxel_sum, 1.0, places=4)
        self.assertEqual(result["tacChart"].GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay("TIA with a segmentation node passed")
