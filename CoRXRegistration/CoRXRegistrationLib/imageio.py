"""Reading and writing volumes and displacement fields with their geometry.

Images: NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) through SimpleITK; arrays come back
as (z, y, x) with a :class:`~CoRXRegistrationLib.geometry.Geometry` in LPS mm.

Displacement fields: (z, y, x, 3) arrays of LPS millimetre vectors in the *resampling*
(from-parent) convention: a point p of the fixed grid maps to p + u(p) in the moving image.
They are written as NRRD with ``displacement field type:=resampling``, which 3D Slicer
loads as a grid transform (checked with slicer-core in the tests).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageFileError(ValueError):
    """A file is missing, unreadable or holds something other than what was asked for."""


def _check_suffix(path: Path, suffixes=IMAGE_SUFFIXES) -> None:
    name = path.name.lower()
    if not any(name.endswith(s) for s in suffixes):
        raise ImageFileError(f"{path}: unsupported file type (use one of {', '.join(suffixes)})")


def geometry_of(image: sitk.Image) -> Geometry:
    size = image.GetSize()
    if len(size) != 3:
        raise ImageFileError(f"expected a 3D image, got {len(size)}D of size {size}")
    return Geometry(tuple(reversed(size)), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def to_sitk(array: np.ndarray, geometry: Geometry, is_vector: bool = False) -> sitk.Image:
    array = np.asarray(array)
    expected = geometry.shape + ((3,) if is_vector else ())
    if array.shape != expected:
        raise ImageFileError(f"array shape {array.shape} does not match geometry shape {expected}")
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _sitk_read(path: Path, what: str = "file") -> sitk.Image:
    if not path.is_file():
        raise ImageFileError(f"{path}: {what} not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports corrupt files this way
        raise ImageFileError(f"{path}: cannot be read ({str(exc).strip().splitlines()[-1]})") from exc


def read_image(path, dtype=np.float32, require_finite: bool = True):
    """Read a scalar 3D volume. Returns (array (z, y, x), Geometry)."""
    path = Path(path)
    _check_suffix(path)
    image = _sitk_read(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageFileError(f"{path}: expected a scalar volume, found "
                             f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    geometry = geometry_of(image)
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if require_finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n = int((~np.isfinite(array)).sum())
        raise ImageFileError(f"{path}: {n} voxels are NaN or infinite")
    return array, geometry


def write_image(path, array: np.ndarray, geometry: Geometry, compress: bool = True,
                overwrite: bool = True, is_vector: bool = False) -> Path:
    """Write a volume with its geometry (``is_vector``: last axis holds components, e.g. RGB);
    creates parent folders."""
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite")
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageFileError(f"{path}: refusing to write {int((~np.isfinite(array)).sum())} NaN/infinite voxels")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(array, geometry, is_vector=is_vector), str(path), useCompression=compress,
                    compressionLevel=1)
    return path


def write_displacement_field(path, field_lps_mm: np.ndarray, geometry: Geometry) -> Path:
    """Write a (z, y, x, 3) LPS-mm displacement field (resampling convention) as NRRD."""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        raise ImageFileError(f"{path}: displacement fields are written as .nrrd (Slicer grid transform)")
    field = np.asarray(field_lps_mm, dtype=np.float32)
    if not np.isfinite(field).all():
        raise ImageFileError(f"{path}: displacement field has NaN or infinite vectors")
    image = to_sitk(field, geometry, is_vector=True)
    image.SetMetaData("displacement field type", "resampling")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=1)
    return path


def read_displacement_field(path):
    """Read a displacement field file. Returns (field (z, y, x, 3) LPS mm, Geometry)."""
    path = Path(path)
    image = _sitk_read(path)
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ImageFileError(f"{path}: a displacement field needs 3 components per voxel, "
                             f"found {image.GetNumberOfComponentsPerPixel()}")
    if image.HasMetaDataKey("displacement field type") and \
            image.GetMetaData("displacement field type").strip() != "resampling":
        raise ImageFileError(f"{path}: only 'resampling' displacement fields are supported")
    return sitk.GetArrayFromImage(image).astype(np.float32), geometry_of(image)


def strip_image_suffix(name: str) -> str:
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)]
    return os.path.splitext(name)[0]


def read_segmentation(path, names=None):
    """Read segments from a label map (NIfTI/NRRD) or a Slicer ``.seg.nrrd``.

    Returns (dict name -> bool mask (z, y, x), Geometry). Label maps name their segments from
    ``names`` (label value -> name), else from a ``<file stem>.json`` sidecar holding such a
    mapping, else ``label_<value>``. Multi-layer .seg.nrrd files (overlapping segments) work.
    """
    path = Path(path)
    _check_suffix(path)
    image = _sitk_read(path, "segmentation file")
    keys = set(image.GetMetaDataKeys())
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 4 or (image.GetNumberOfComponentsPerPixel() > 1 and array.ndim == 4):
        raise ImageFileError(f"{path}: 4D segmentation files are not supported; save it as a 3D .seg.nrrd")
    geometry = geometry_of(image)
    layers = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
    segments = {}
    if "Segment0_LabelValue" in keys:
        i = 0
        while f"Segment{i}_LabelValue" in keys:
            name = image.GetMetaData(f"Segment{i}_Name") if f"Segment{i}_Name" in keys else f"segment_{i}"
            layer = int(image.GetMetaData(f"Segment{i}_Layer")) if f"Segment{i}_Layer" in keys else 0
            value = int(image.GetMetaData(f"Segment{i}_LabelValue"))
            segments[name] = layers[layer] == value
            i += 1
        return segments, geometry
    if layers.shape[0] != 1:
        raise ImageFileError(f"{path}: a label map must have one component per voxel")
    labels = layers[0]
    if np.issubdtype(labels.dtype, np.floating) and not np.allclose(labels, np.round(labels)):
        raise ImageFileError(f"{path}: a label map must hold whole numbers, found fractional values")
    labels = labels.astype(np.int64)
    if names is None:
        sidecar = path.with_name(strip_image_suffix(path.name) + ".json")
        if sidecar.is_file():
            import json
            names = {int(k): v for k, v in json.loads(sidecar.read_text()).items()}
    names = names or {}
    for value in np.unique(labels):
        if value != 0:
            segments[names.get(int(value), f"label_{int(value)}")] = labels == value
    return segments, geometry


def write_seg_nrrd(path, labelmap: np.ndarray, names: dict, geometry: Geometry, colors: dict | None = None) -> Path:
    """Write a label map as a Slicer segmentation (.seg.nrrd, one layer); names: value -> name."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ImageFileError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    image = to_sitk(np.asarray(labelmap, np.uint8), geometry)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    rng = np.random.default_rng(7)
    nz, ny, nx = geometry.shape
    for i, (value, name) in enumerate(sorted(names.items())):
        color = (colors or {}).get(value, tuple(rng.uniform(0.2, 1.0, 3)))
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{value}")
        image.SetMetaData(f"Segment{i}_Name", str(name))
        image.SetMetaData(f"Segment{i}_NameAutoGenerated", "0")
        image.SetMetaData(f"Segment{i}_Color", " ".join(f"{c:.3f}" for c in color))
        image.SetMetaData(f"Segment{i}_ColorAutoGenerated", "0")
        image.SetMetaData(f"Segment{i}_LabelValue", str(int(value)))
        image.SetMetaData(f"Segment{i}_Layer", "0")
        image.SetMetaData(f"Segment{i}_Extent", f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}")
        image.SetMetaData(f"Segment{i}_Tags", "|")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path
