"""Volumes from DICOM files: find the image series in a folder, and read one as an array with its
geometry (pydicom and numpy only; no torch).

Supported: CT (and other single-frame modalities) as one file per slice; NM/SPECT reconstructions
as one multi-frame file, either the NM image layout (orientation and position of the first frame in
the Detector Information Sequence, frames along row x column, apart by Spacing Between Slices) or
the enhanced layout (a Plane Position per frame in the Per-Frame Functional Groups). Stored values
become real values through the Rescale Slope/Intercept (per file or per frame) or, where present,
the Real World Value Mapping; what the values *mean* (HU, Bq/mL, counts) is left to
:mod:`CoRXRegistrationLib.quantification`. Geometry is LPS mm, arrays (z, y, x) as everywhere in CoRX.
Every refusal names the series (description and UID) and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .geometry import Geometry

# SOP classes that are not image volumes CoRX reads: listed as ignored, never an error
NON_IMAGE_MODALITIES = ("RTDOSE", "RTSTRUCT", "RTPLAN", "REG", "SEG", "SR", "PR", "KO", "DOC", "OT")
_POSITION_TOL_MM = 0.01


class DicomError(ValueError):
    """DICOM files that cannot be read as one volume unambiguously."""


@dataclass
class DicomSeries:
    """One image series: its files and the header of the first (pixel data not read)."""
    uid: str
    modality: str
    files: list
    header: object                    # pydicom Dataset of the first file, without pixels
    ignored: bool = False             # a non-image object (RT Dose, registration, ...)
    notes: list = field(default_factory=list)

    def attr(self, keyword: str, default=None):
        value = getattr(self.header, keyword, None)
        return default if value in (None, "") else value

    @property
    def patient_id(self) -> str:
        return str(self.attr("PatientID", "")).strip()

    @property
    def study_uid(self) -> str:
        return str(self.attr("StudyInstanceUID", "")).strip()

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.attr("FrameOfReferenceUID", "")).strip()

    @property
    def label(self) -> str:
        """How messages name the series: modality, description, number and UID."""
        desc = str(self.attr("SeriesDescription", "")).strip()
        number = self.attr("SeriesNumber")
        name = f"{self.modality} series" + (f" '{desc}'" if desc else "") + (f" #{number}" if number is not None
                                                                          else "")
        return f"{name} ({self.uid}, {len(self.files)} file{'s' if len(self.files) != 1 else ''})"


def is_dicom_file(path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_header(path):
    import pydicom
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:                                  # pydicom raises several kinds
        raise DicomError(f"{path}: not a readable DICOM file ({exc})") from None


def dicom_files(folder) -> list:
    """Every DICOM file under ``folder`` (recursively; DICOMDIR index files and hidden files left out)."""
    root = Path(folder)
    if root.is_file():
        return [root] if is_dicom_file(root) else []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR" and is_dicom_file(p))


def scan_dicom(folder) -> list:
    """[:class:`DicomSeries`] under ``folder``, grouped by Series Instance UID (in the order of their first
    file's name); a file without a series UID or a modality is refused, naming it."""
    groups = {}
    for path in dicom_files(folder):
        ds = _read_header(path)
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "").strip()
        modality = str(getattr(ds, "Modality", "") or "").strip().upper()
        if not uid or not modality:
            raise DicomError(f"{path}: a DICOM file without {'SeriesInstanceUID' if not uid else 'Modality'}; "
                             "CoRX cannot tell which series it belongs to")
        if uid in groups:
            if groups[uid].modality != modality:
                raise DicomError(f"series {uid} mixes modalities {groups[uid].modality} and {modality} ({path})")
            groups[uid].files.append(path)
        else:
            groups[uid] = DicomSeries(uid, modality, [path], ds, ignored=modality in NON_IMAGE_MODALITIES)
    return list(groups.values())


# ------------------------------------------------------------------ geometry

def _floats(value, n: int, what: str, series: DicomSeries) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], float)
    except (TypeError, ValueError):
        raise DicomError(f"{series.label}: {what} is missing or not numeric ({value!r})") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DicomError(f"{series.label}: {what} must hold {n} numbers, found {value!r}")
    return out


def _axes(orientation, series: DicomSeries) -> tuple:
    """(row direction, column direction, normal) from Image Orientation (Patient), checked orthonormal."""
    iop = _floats(orientation, 6, "ImageOrientationPatient (0020,0037)", series)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{series.label}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _spacing_in_plane(pixel_spacing, series: DicomSeries) -> tuple:
    """(x, y) spacing in mm: PixelSpacing is (between rows, between columns)."""
    ps = _floats(pixel_spacing, 2, "PixelSpacing (0028,0030)", series)
    if np.any(ps <= 0):
        raise DicomError(f"{series.label}: PixelSpacing {list(ps)} must be positive")
    return float(ps[1]), float(ps[0])


def stack_geometry(positions, row, col, normal, spacing_xy, series: DicomSeries, shape_yx) -> tuple:
    """(Geometry, order) of slices at ``positions`` (N, 3) LPS: sorted along the normal, evenly spaced
    (within 1 % or 0.01 mm), no two at one place. ``order`` sorts the slices."""
    positions = np.asarray(positions, float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    if len(along) == 1:
        raise DicomError(f"{series.label}: a single slice is not a volume")
    steps = np.diff(along)
    if np.any(steps < _POSITION_TOL_MM):
        k = int(np.argmin(steps))
        raise DicomError(f"{series.label}: two slices at the same position ({along[k]:.2f} mm along the normal); "
                         "the series holds repeated or overlapping acquisitions")
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > max(_POSITION_TOL_MM, 0.01 * step)):
        k = int(np.argmax(np.abs(steps - step)))
        raise DicomError(f"{series.label}: slices are not evenly spaced (step {steps[k]:.3f} mm at slice {k + 1}, "
                         f"median {step:.3f} mm): a missing slice or a variable-thickness series")
    lateral = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(lateral).max() > max(0.05, 0.01 * step):
        raise DicomError(f"{series.label}: slice positions do not lie on a line along the slice normal "
                         "(a tilted-gantry or sheared series); CoRX reads only orthogonal grids")
    direction = np.column_stack([row, col, normal])
    g = Geometry((len(along), int(shape_yx[0]), int(shape_yx[1])), (spacing_xy[0], spacing_xy[1], step),
                 tuple(positions[0]), tuple(direction.ravel()))
    return g, order


# ------------------------------------------------------------------ values

def _pixels(path, series: DicomSeries):
    import pydicom
    ds = pydicom.dcmread(str(path))
    try:
        return ds, np.asarray(ds.pixel_array)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomError(f"{series.label}: cannot decode the pixel data of {path} (transfer syntax {syntax}: "
                         f"{exc}); export it uncompressed") from None


def _linear(item, slope_kw: str, intercept_kw: str) -> tuple:
    slope = getattr(item, slope_kw, None)
    intercept = getattr(item, intercept_kw, None)
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


_RWV_UNITS = {"bq/ml": "BQML", "{counts}": "CNTS", "{counts}/s": "CPS", "cnts": "CNTS", "hu": "HU", "[hnsf'u]": "HU"}


def _real_world(item):
    """(slope, intercept, units) of a Real World Value Mapping item, or None."""
    seq = getattr(item, "RealWorldValueMappingSequence", None)
    if not seq:
        return None
    m = seq[0]
    slope, intercept = _linear(m, "RealWorldValueSlope", "RealWorldValueIntercept")
    code = getattr(m, "MeasurementUnitsCodeSequence", None)
    value = str(getattr(code[0], "CodeValue", "")).strip() if code else ""
    return slope, intercept, _RWV_UNITS.get(value.lower(), value or None)


def header_units(header) -> str | None:
    """What the values of a series are, from its header alone: the real-world value mapping's unit (of the
    first frame, the shared groups or the top level), else Units (0054,1001)."""
    per_frame = getattr(header, "PerFrameFunctionalGroupsSequence", None) or []
    shared = (getattr(header, "SharedFunctionalGroupsSequence", None) or [None])[0]
    for item in (per_frame[0] if per_frame else None, shared, header):
        rwv = _real_world(item) if item is not None else None
        if rwv is not None and rwv[2]:
            return rwv[2]
    return str(getattr(header, "Units", "") or "").strip().upper() or None


@dataclass
class DicomVolume:
    """Real values (z, y, x) float32 and their geometry; ``units`` as the header states them
    (Units (0054,1001) or the real-world value mapping's unit), ``mapping`` says which."""
    values: np.ndarray
    geometry: Geometry
    units: str | None
    mapping: str
    series: DicomSeries


def read_volume(series: DicomSeries) -> DicomVolume:
    """The series as one volume (see the module text for the layouts read)."""
    if series.ignored:
        raise DicomError(f"{series.label} is not an image volume")
    frames = int(series.attr("NumberOfFrames", 1) or 1)
    if frames > 1:
        if len(series.files) != 1:
            raise DicomError(f"{series.label}: {len(series.files)} multi-frame files in one series; "
                             "CoRX reads a reconstruction stored as one multi-frame file")
        return _read_multiframe(series)
    return _read_slices(series)


def _read_slices(series: DicomSeries) -> DicomVolume:
    positions, images, orientation, spacing, shape = [], [], None, None, None
    units = {str(series.attr("Units", "")).strip().upper() or None}
    for path in series.files:
        ds, px = _pixels(path, series)
        if px.ndim != 2:
            raise DicomError(f"{series.label}: {path} holds a {px.ndim}-D image where a slice was expected")
        iop = tuple(np.round(_floats(getattr(ds, "ImageOrientationPatient", None), 6,
                                     "ImageOrientationPatient (0020,0037)", series), 5))
        if orientation is None:
            orientation, spacing, shape = iop, _spacing_in_plane(getattr(ds, "PixelSpacing", None), series), px.shape
        elif iop != orientation or px.shape != shape:
            raise DicomError(f"{series.label}: {path} differs in orientation or size from the first slice; "
                             "the series mixes several scans")
        positions.append(_floats(getattr(ds, "ImagePositionPatient", None), 3, "ImagePositionPatient (0020,0032)",
                                 series))
        slope, intercept = _linear(ds, "RescaleSlope", "RescaleIntercept")
        images.append((px.astype(np.float64) * slope + intercept).astype(np.float32))
    row, col, normal = _axes(orientation, series)
    geometry, order = stack_geometry(positions, row, col, normal, spacing, series, shape)
    return DicomVolume(np.stack([images[k] for k in order]), geometry, next(iter(units)), "rescale", series)


def _frame_items(ds, keyword: str, shared):
    """Per frame, the first item of functional group ``keyword`` (per-frame, else shared)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []
    out = []
    for item in per_frame:
        seq = getattr(item, keyword, None) or getattr(shared, keyword, None)
        out.append(seq[0] if seq else None)
    return out


def _read_multiframe(series: DicomSeries) -> DicomVolume:
    ds, px = _pixels(series.files[0], series)
    if px.ndim == 2:
        px = px[None]
    if px.ndim != 3:
        raise DicomError(f"{series.label}: pixel data of shape {px.shape} is not a stack of grey frames")
    n = px.shape[0]
    units = str(getattr(ds, "Units", "") or "").strip().upper() or None
    shared_seq = getattr(ds, "SharedFunctionalGroupsSequence", None)
    shared = shared_seq[0] if shared_seq else None
    if getattr(ds, "PerFrameFunctionalGroupsSequence", None):             # enhanced layout
        if len(ds.PerFrameFunctionalGroupsSequence) != n:
            raise DicomError(f"{series.label}: {len(ds.PerFrameFunctionalGroupsSequence)} per-frame groups for "
                             f"{n} frames")
        planes = _frame_items(ds, "PlanePositionSequence", shared)
        orients = _frame_items(ds, "PlaneOrientationSequence", shared)
        measures = _frame_items(ds, "PixelMeasuresSequence", shared)
        if any(p is None for p in planes) or orients[0] is None or measures[0] is None:
            raise DicomError(f"{series.label}: the functional groups lack a plane position, orientation or pixel "
                             "measures for some frame")
        if len({tuple(np.round([float(v) for v in o.ImageOrientationPatient], 5)) for o in orients}) > 1:
            raise DicomError(f"{series.label}: frames of different orientations")
        positions = [_floats(p.ImagePositionPatient, 3, "PlanePositionSequence ImagePositionPatient", series)
                     for p in planes]
        orientation, spacing = orients[0].ImageOrientationPatient, _spacing_in_plane(measures[0].PixelSpacing, series)
        values = np.empty(px.shape, np.float32)
        mapping = "rescale"
        transforms = _frame_items(ds, "PixelValueTransformationSequence", shared)
        for k in range(n):
            item = getattr(ds, "PerFrameFunctionalGroupsSequence")[k]
            rwv = _real_world(item) or (_real_world(shared) if shared is not None else None)
            if rwv is not None:
                slope, intercept, units = rwv[0], rwv[1], rwv[2] or units
                mapping = "real world value mapping"
            elif transforms[k] is not None:
                slope, intercept = _linear(transforms[k], "RescaleSlope", "RescaleIntercept")
            else:
                slope, intercept = _linear(ds, "RescaleSlope", "RescaleIntercept")
            values[k] = px[k].astype(np.float64) * slope + intercept
        row, col, normal = _axes(orientation, series)
    else:                                                                   # NM image layout
        detector = (getattr(ds, "DetectorInformationSequence", None) or [None])[0]
        source = detector if detector is not None and getattr(detector, "ImagePositionPatient", None) else ds
        row, col, normal = _axes(getattr(source, "ImageOrientationPatient", None), series)
        origin = _floats(getattr(source, "ImagePositionPatient", None), 3, "ImagePositionPatient (0020,0032)", series)
        step = getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None)
        if step in (None, "") or float(step) == 0:
            raise DicomError(f"{series.label}: neither SpacingBetweenSlices (0018,0088) nor SliceThickness "
                             "(0018,0050) gives the distance between frames")
        positions = [origin + k * abs(float(step)) * normal for k in range(n)]
        spacing = _spacing_in_plane(getattr(ds, "PixelSpacing", None), series)
        rwv = _real_world(ds)
        if rwv is not None:
            slope, intercept, units, mapping = rwv[0], rwv[1], rwv[2] or units, "real world value mapping"
        else:
            (slope, intercept), mapping = _linear(ds, "RescaleSlope", "RescaleIntercept"), "rescale"
        values = (px.astype(np.float64) * slope + intercept).astype(np.float32)
    geometry, order = stack_geometry(positions, row, col, normal, spacing, series, px.shape[1:])
    return DicomVolume(np.ascontiguousarray(values[order]), geometry, units, mapping, series)


# ------------------------------------------------------------------ CoRX's own DICOM results, read back

def read_rt_dose(path) -> tuple:
    """(dose (z, y, x) Gy float64 with Dose Grid Scaling applied, Geometry, header) of an RT Dose file
    (relative or absolute Grid Frame Offset Vector; frames in either order)."""
    import pydicom
    ds = pydicom.dcmread(str(path))
    series = DicomSeries(str(getattr(ds, "SeriesInstanceUID", "")), "RTDOSE", [Path(path)], ds)
    if getattr(ds, "Modality", "") != "RTDOSE":
        raise DicomError(f"{path}: not an RT Dose (modality {getattr(ds, 'Modality', '?')})")
    px = np.asarray(ds.pixel_array, np.float64)
    px = px[None] if px.ndim == 2 else px
    row, col, normal = _axes(ds.ImageOrientationPatient, series)
    origin = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", series)
    offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector], float)
    if len(offsets) != px.shape[0]:
        raise DicomError(f"{path}: {len(offsets)} grid frame offsets for {px.shape[0]} frames")
    if offsets[0] != 0:                              # absolute: z coordinates of an axial dose
        offsets = offsets - origin[2]
    positions = origin[None] + offsets[:, None] * normal[None]
    geometry, order = stack_geometry(positions, row, col, normal, _spacing_in_plane(ds.PixelSpacing, series),
                                     series, px.shape[1:])
    return px[order] * float(ds.DoseGridScaling), geometry, ds


def read_deformable_registration(path) -> tuple:
    """(field (z, y, x, 3) LPS mm, Geometry, registered Frame of Reference UID, source Frame of Reference
    UID) of a Deformable Spatial Registration's first deformable grid."""
    import pydicom
    ds = pydicom.dcmread(str(path))
    series = DicomSeries(str(getattr(ds, "SeriesInstanceUID", "")), "REG", [Path(path)], ds)
    try:
        item = ds.DeformableRegistrationSequence[0]
        grid = item.DeformableRegistrationGridSequence[0]
    except (AttributeError, IndexError):
        raise DicomError(f"{path}: not a deformable spatial registration (no deformable grid)") from None
    nx, ny, nz = (int(v) for v in grid.GridDimensions)
    field = np.frombuffer(grid.VectorGridData, "<f4").reshape(nz, ny, nx, 3)
    row, col, normal = _axes(grid.ImageOrientationPatient, series)
    origin = _floats(grid.ImagePositionPatient, 3, "ImagePositionPatient", series)
    sx, sy, sz = (float(v) for v in grid.GridResolution)
    g = Geometry((nz, ny, nx), (sx, sy, sz), tuple(origin), tuple(np.column_stack([row, col, normal]).ravel()))
    return field.copy(), g, str(ds.FrameOfReferenceUID), str(item.SourceFrameOfReferenceUID)
