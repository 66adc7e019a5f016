"""Results as DICOM objects a dosimetry or treatment-planning system imports (pydicom; no torch).

* :func:`write_rt_dose` -- the absorbed-dose map as **RT Dose** (Gy, unsigned 32-bit with Dose Grid
  Scaling, relative Grid Frame Offset Vector), on the reference SPECT grid, with the reference
  SPECT's patient, study and Frame of Reference UID. Dose Summation Type PLAN, without a
  Referenced RT Plan: a radiopharmaceutical therapy has no RT Plan.
* :func:`write_deformable_registration` -- one moving time point's displacement field as a
  **Deformable Spatial Registration** (Frame of Reference = the reference SPECT's, Source Frame of
  Reference = the moving SPECT's; identity pre/post matrices). Vector Grid Data holds, for each point
  of the grid (x fastest), the LPS mm vector from that point of the registered (reference) frame to
  the corresponding point of the source (moving) frame: the resampling convention of CoRX's NRRD
  fields.

The header helpers (:func:`new_dataset`, :func:`save_dataset`, :func:`frames_of`) serve the
simulator's DICOM export too. Files are written atomically.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from .geometry import Geometry, GeometryError
from .outputs import atomic_path

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
DEFORMABLE_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.3"
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription")


def ds_text(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.6e}"


def new_uid(*entropy) -> str:
    """A new UID; the same ``entropy`` (texts) gives the same UID (reproducible simulated series)."""
    from pydicom.uid import generate_uid
    return generate_uid(entropy_srcs=[str(e) for e in entropy]) if entropy else generate_uid()


def new_dataset(sop_class_uid: str, modality: str, reference=None, sop_instance_uid: str | None = None,
                when: datetime | None = None):
    """A dataset with file meta (explicit VR little endian), SOP common, the patient and study modules copied
    from ``reference`` (a header; none: left empty), a new series and equipment "CoRX"."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from . import __version__
    uid = sop_instance_uid or new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    if int(pydicom.__version__.split(".")[0]) < 3:            # pydicom 2.4 (Slicer 5.8) needs the encoding set
        ds.is_little_endian, ds.is_implicit_VR = True, False
    when = when or datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for kw in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        value = getattr(reference, kw, None) if reference is not None else None
        setattr(ds, kw, value if value is not None else "")
    if not ds.StudyInstanceUID:
        ds.StudyInstanceUID = new_uid()
    ds.Modality = modality
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "CoRX"
    ds.ManufacturerModelName = "CoRX"
    ds.SoftwareVersions = __version__
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    return ds


def save_dataset(ds, path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically, and check it reads back."""
    import pydicom

    def verify(tmp):
        pydicom.dcmread(str(tmp), stop_before_pixels=True)

    with atomic_path(path, verify) as tmp:
        if int(pydicom.__version__.split(".")[0]) < 3:
            ds.save_as(str(tmp), write_like_original=False)
        else:
            ds.save_as(str(tmp), enforce_file_format=True)
    return Path(path)


def frames_of(geometry: Geometry) -> tuple:
    """(ImageOrientationPatient, ImagePositionPatient of the first frame, reversed): DICOM frames run along
    row x column; a grid whose third axis points the other way is written with its slices reversed.
    Refuses a grid whose axes are not orthogonal."""
    d = geometry.direction_matrix
    row, col, k = d[:, 0], d[:, 1], d[:, 2]
    normal = np.cross(row, col)
    if abs(abs(float(normal @ k)) - 1.0) > 1e-4:
        raise GeometryError(f"grid {geometry.describe()} is not orthogonal; DICOM frames need slices along the "
                            "normal of their rows and columns")
    reverse = float(normal @ k) < 0
    nz = geometry.shape[0]
    first = geometry.index_to_lps(np.array([[0.0, 0.0, nz - 1.0 if reverse else 0.0]]))[0]
    return [ds_text(v) for v in (*row, *col)], [ds_text(v) for v in first], reverse


def _frame_of_reference(ds, reference) -> None:
    ds.FrameOfReferenceUID = str(getattr(reference, "FrameOfReferenceUID", "") or new_uid())
    ds.PositionReferenceIndicator = ""


def write_rt_dose(path, dose_gy: np.ndarray, geometry: Geometry, reference=None, description: str = "") -> Path:
    """The dose map (z, y, x) in Gy on ``geometry`` as an RT Dose file; ``reference``: the reference SPECT's
    header (patient, study, Frame of Reference). Refuses negative or non-finite doses."""
    dose = np.asarray(dose_gy, np.float64)
    if dose.shape != geometry.shape:
        raise GeometryError(f"dose of shape {dose.shape} on a grid of shape {geometry.shape}")
    if not np.all(np.isfinite(dose)) or dose.min() < 0:
        raise ValueError("the dose map holds negative or non-finite values; RT Dose stores doses >= 0 Gy")
    iop, ipp, reverse = frames_of(geometry)
    if reverse:
        dose = dose[::-1]
    top = float(dose.max())
    scaling = top / (2 ** 32 - 1) if top > 0 else 1.0
    stored = np.round(dose / scaling).astype("<u4")
    ds = new_dataset(RT_DOSE_STORAGE, "RTDOSE", reference)
    _frame_of_reference(ds, reference)
    ds.SeriesDescription = (description or "CoRX absorbed dose")[:64]
    ds.ImageOrientationPatient, ds.ImagePositionPatient = iop, ipp
    sx, sy, sz = geometry.spacing
    ds.PixelSpacing = [ds_text(sy), ds_text(sx)]
    ds.SliceThickness = ds_text(sz)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.NumberOfFrames, ds.Rows, ds.Columns = dose.shape
    from pydicom.tag import Tag
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [ds_text(k * sz) for k in range(dose.shape[0])]
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseComment = (description or "177Lu absorbed dose (CoRX)")[:64]
    ds.DoseGridScaling = ds_text(scaling)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return save_dataset(ds, path)


def _referenced_series(series) -> object:
    import pydicom
    from pydicom.dataset import Dataset
    item = Dataset()
    item.SeriesInstanceUID = series.uid
    instances = []
    for f in series.files:
        h = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        instances.append(ref)
    item.ReferencedInstanceSequence = instances
    return item


def write_deformable_registration(path, field_lps_mm: np.ndarray, geometry: Geometry, fixed, moving,
                                  description: str = "") -> Path:
    """A displacement field (z, y, x, 3) LPS mm (resampling: reference point -> moving point) on
    ``geometry`` (the reference SPECT grid) as a Deformable Spatial Registration; ``fixed``, ``moving``:
    the reference and moving SPECT series (:class:`~CoRXRegistrationLib.dicom_read.DicomSeries`)."""
    from pydicom.dataset import Dataset

    field = np.asarray(field_lps_mm, np.float32)
    if field.shape != geometry.shape + (3,):
        raise GeometryError(f"field of shape {field.shape} on a grid of shape {geometry.shape}")
    if not np.all(np.isfinite(field)):
        raise ValueError("the displacement field holds non-finite values")
    iop, ipp, reverse = frames_of(geometry)
    if reverse:
        field = field[::-1]
    ds = new_dataset(DEFORMABLE_REGISTRATION_STORAGE, "REG", fixed.header)
    _frame_of_reference(ds, fixed.header)
    ds.SeriesDescription = (description or "CoRX deformable registration")[:64]
    ds.ContentLabel = "CORX_DEFORMABLE"
    ds.ContentDescription = (description or "CoRX deformable registration")[:64]
    ds.ContentCreatorName = ""
    ds.ReferencedSeriesSequence = [_referenced_series(fixed), _referenced_series(moving)]
    grid = Dataset()
    grid.ImageOrientationPatient, grid.ImagePositionPatient = iop, ipp
    nz, ny, nx = geometry.shape
    grid.GridDimensions = [nx, ny, nz]
    grid.GridResolution = [float(s) for s in geometry.spacing]
    grid.VectorGridData = np.ascontiguousarray(field.astype("<f4")).tobytes()
    identity = Dataset()
    identity.FrameOfReferenceTransformationMatrixType = "RIGID"
    identity.FrameOfReferenceTransformationMatrix = [ds_text(v) for v in np.eye(4).ravel()]
    item = Dataset()
    item.SourceFrameOfReferenceUID = moving.frame_of_reference_uid or new_uid()
    item.DeformableRegistrationGridSequence = [grid]
    item.PreDeformationMatrixRegistrationSequence = [identity]
    item.PostDeformationMatrixRegistrationSequence = [identity]
    ds.DeformableRegistrationSequence = [item]
    return save_dataset(ds, path)
