"""TIAMapping: TIA, fit-quality and dose maps and VOI tables from registered SPECT (Module, Widget, Logic, Test).

The Logic converts nodes to arrays + geometry and calls ``TIAMappingLib.pipeline`` — the same
code as ``corx tia``.
"""
import numpy as np
import slicer

try:  # inside the Slicer application
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
except ImportError:  # plain Python with slicer-core
    ScriptedLoadableModule = ScriptedLoadableModuleWidget = ScriptedLoadableModuleTest = object

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

from CoRXRegistration import PAPER_CITATION, addTableNode, addVolumeNode, saveNode, volumeNodeGeometry
from TIAMappingLib.pipeline import compute_tia_outputs


class TIAMapping(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TIA Mapping"
        self.parent.categories = ["Nuclear Medicine"]
        self.parent.dependencies = ["CoRXRegistration"]
        self.parent.contributors = ["CoRX developers"]
        self.parent.helpText = ("Fits every voxel's time-activity curve of registered SPECT time points (Bq/mL) into a "
                                "time-integrated activity map (Bq h/mL, the paper's Eq. 6), with fit RMSE, model map, "
                                "absorbed dose (Gy, local deposition) and per-segment tables.")
        self.parent.acknowledgementText = "Method: " + PAPER_CITATION


class TIAMappingLogic(ScriptedLoadableModuleLogic):
    def computeTIA(self, spectVolumeNodes, timesHours, labelmapVolumeNode=None, segmentNames=None, ctVolumeNode=None):
        """TIA map (Bq h/mL), fit RMSE (Bq/mL), model map and dose (Gy, with CT) as new volume nodes.

        spectVolumeNodes: registered SPECT in Bq/mL on one grid, in time order; timesHours: hours
        after injection. VOIs from a label map volume node (value -> ``segmentNames``).
        Returns a dict of the new nodes and the VOI rows. Raises ValueError on bad input.
        """
        if len(spectVolumeNodes) != len(timesHours):
            raise ValueError(f"{len(spectVolumeNodes)} SPECT volumes but {len(timesHours)} times")
        geometry = volumeNodeGeometry(spectVolumeNodes[0])
        for node in spectVolumeNodes[1:]:
            geometry.require_same_grid(volumeNodeGeometry(node), "SPECT time points")
        activities = [slicer.util.arrayFromVolume(n).astype(np.float32) for n in spectVolumeNodes]
        segments = seg_geometry = ct = ct_geometry = None
        if labelmapVolumeNode is not None:
            labels = slicer.util.arrayFromVolume(labelmapVolumeNode)
            names = segmentNames or {}
            segments = {names.get(int(v), f"label_{int(v)}"): labels == v for v in np.unique(labels) if v != 0}
            seg_geometry = volumeNodeGeometry(labelmapVolumeNode)
        if ctVolumeNode is not None:
            ct, ct_geometry = slicer.util.arrayFromVolume(ctVolumeNode).astype(np.float32), volumeNodeGeometry(ctVolumeNode)
        out = compute_tia_outputs(activities, list(timesHours), geometry, segments, seg_geometry, ct, ct_geometry)
        nodes = {"tia": addVolumeNode(out.tia, geometry, "TIA (Bq h per mL)"),
                 "fit_rmse": addVolumeNode(out.fit_rmse, geometry, "TIA fit RMSE (Bq per mL)"),
                 "fit_model": addVolumeNode(out.fit_model, geometry, "TIA model used")}
        if out.dose is not None:
            nodes["dose"] = addVolumeNode(out.dose, geometry, "Absorbed dose (Gy)")
        nodes["voi_rows"] = out.voi_rows
        nodes["messages"] = out.messages
        if out.voi_rows:
            nodes["voiTable"] = addTableNode(out.voi_rows, "TIA VOI results")
            nodes["tacTable"], nodes["tacChart"] = self.timeActivityChart(out.voi_rows, list(timesHours))
        return nodes

    def timeActivityChart(self, voiRows, timesHours):
        """A table (hours, then MBq per segment) and a plot chart with one series per segment, as the
        Plots module shows them. Returns (table node, chart node)."""
        rows = [r for r in voiRows if r.get("status") == "ok"]
        columns = [{"hours": float(t), **{r["segment"]: float(r[f"total_mbq_{t:g}h"]) for r in rows}}
                   for t in timesHours]
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
        """Write each table node as ``<folder>/<node name>.csv``; returns the paths."""
        from pathlib import Path
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [saveNode(t, folder / ("".join(c if c.isalnum() or c in "-_" else "_" for c in t.GetName()) + ".csv"))
                for t in tableNodes]


class TIAMappingWidget(ScriptedLoadableModuleWidget):
    """Registered SPECT (checked volumes; hours typed, or read from names such as 'SPECT 24h deformed'),
    VOIs and CT in; TIA, fit RMSE, model and dose maps, the VOI table, a time-activity chart and CSV out."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TIAMapping.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TIAMappingLogic()
        self.result = None
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)

    def seriesFromInputs(self):
        """(SPECT nodes, hours) in time order: typed hours in the checked order, else hours from the names."""
        from CoRXRegistrationLib.series_io import hours_from_name
        nodes = list(self.ui.spectNodesSelector.checkedNodes())
        typed = self.ui.timesLineEdit.text.replace(",", " ").split()
        if typed:
            return nodes, [float(v) for v in typed]
        hours = [hours_from_name(n.GetName()) for n in nodes]
        missing = [n.GetName() for n, h in zip(nodes, hours) if h is None]
        if missing:
            raise ValueError(f"type the hours after injection: no hours in the names {missing}")
        order = sorted(range(len(nodes)), key=lambda i: hours[i])
        return [nodes[i] for i in order], [hours[i] for i in order]

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("Failed to compute the TIA map.", waitCursor=True):
            nodes, times = self.seriesFromInputs()
            self.result = self.logic.computeTIA(nodes, times, self.ui.labelmapSelector.currentNode(),
                                                ctVolumeNode=self.ui.ctSelector.currentNode())
            slicer.util.setSliceViewerLayers(background=self.result["tia"])
            if "voiTable" in self.result:
                self.ui.voiTableView.setMRMLTableNode(self.result["voiTable"])
                slicer.modules.plots.logic().ShowChartInLayout(self.result["tacChart"])
            self.ui.exportButton.enabled = "voiTable" in self.result
            self.ui.statusLabel.text = "; ".join(self.result["messages"]) or \
                f"TIA computed from {len(nodes)} time points ({', '.join(f'{t:g} h' for t in times)})."

    def onExport(self):
        with slicer.util.tryWithErrorDisplay("Failed to export the tables.", waitCursor=True):
            paths = self.logic.exportTables([self.result["voiTable"], self.result["tacTable"]],
                                            self.ui.exportDirectoryButton.directory)
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(p) for p in paths)


class TIAMappingTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_uniform_mono_exponential()

    def test_uniform_mono_exponential(self):
        from CoRXRegistrationLib.geometry import Geometry
        g = Geometry((4, 4, 4), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
        times = [4.0, 24.0, 48.0, 120.0]
        lam = np.log(2) / 50.0
        nodes = [addVolumeNode(np.full(g.shape, 1e5 * np.exp(-lam * t), np.float32), g, f"SPECT {t}h") for t in times]
        result = TIAMappingLogic().computeTIA(nodes, times)
        tia = slicer.util.arrayFromVolume(result["tia"])
        self.assertAlmostEqual(float(tia.mean()) / (1e5 / lam), 1.0, places=3)
        self.delayDisplay("TIAMapping test passed")
