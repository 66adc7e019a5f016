"""Reading and writing volumes and displacement fields with their geometry.

Images: NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) through SimpleITK; arrays come back
as (z, y, x) with a :class:`~CoRXRegistrationLib.geometry.Geometry` in LPS mm.

Displacement fields: (z, y, x, 3) arrays of LPS millimetre vectors in the *resampling*
(from-parent) convention: a point p of the fixed grid maps to p + u(p) in the moving image.
They are written as NRRD with ``displacement field type:=resampling``, which 3D Slicer
loads as a grid transform (checked with slicer-core in the tests).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry
from .outputs import atomic_path

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


def _check_shape(array: np.ndarray, geometry: Geometry, is_vector: bool) -> None:
    expected = geometry.shape + ((3,) if is_vector else ())
    if array.shape != expected:
        raise ImageFileError(f"array shape {array.shape} does not match geometry shape {expected}")


def to_sitk(array: np.ndarray, geometry: Geometry, is_vector: bool = False) -> sitk.Image:
    array = np.asarray(array)
    _check_shape(array, geometry, is_vector)
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


# NIfTI datatype code -> numpy dtype of one value (complex and RGB(A) types count their parts as values)
_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                1280: "u8", 128: "u1", 2304: "u1", 32: "f4", 1792: "f8"}
_NIFTI_COMPONENTS = {128: 3, 2304: 4, 32: 2, 1792: 2}


def _nifti_layout(head: bytes, path: Path) -> tuple:
    """(data offset, number of values, numpy dtype) from a NIfTI-1 or NIfTI-2 header."""
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            code = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if size == 540:
            code = struct.unpack(endian + "h", head[12:14])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        raise ImageFileError(f"{path}: not a NIfTI file (header size is neither 348 nor 540)")
    if code not in _NIFTI_TYPES or not 1 <= dim[0] <= 7:
        raise ImageFileError(f"{path}: unsupported NIfTI data type {code} or dimension count {dim[0]}")
    count = int(np.prod([max(int(d), 1) for d in dim[1:dim[0] + 1]], dtype=np.int64)) * _NIFTI_COMPONENTS.get(code, 1)
    offset = max(offset, 352 if size == 348 else 544)
    return offset, count, np.dtype(endian + _NIFTI_TYPES[code])


_NRRD_SIZES = {"uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1, "signed char": 1, "int8": 1, "int8_t": 1,
               "char": 1, "short": 2, "int16": 2, "int16_t": 2, "ushort": 2, "unsigned short": 2, "uint16": 2,
               "uint16_t": 2, "int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4,
               "uint32_t": 4, "float": 4, "double": 8, "longlong": 8, "int64": 8, "int64_t": 8, "ulonglong": 8,
               "uint64": 8, "uint64_t": 8}


def _check_nrrd_complete(path: Path) -> None:
    """An attached raw or gzip NRRD holds as many bytes as its header promises (O(1): file size or
    the gzip trailer's stored length)."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
        end = head.find(b"\n\n")
        if not head.startswith(b"NRRD") or end < 0:
            return
        fields = {}
        for line in head[:end].decode("latin-1").splitlines()[1:]:
            if ":" in line and not line.startswith("#") and ":=" not in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "data file" in fields or "datafile" in fields or fields.get("type", "").lower() not in _NRRD_SIZES:
            return
        nbytes = int(np.prod([int(v) for v in fields.get("sizes", "0").split()], dtype=np.int64)) \
            * _NRRD_SIZES[fields["type"].lower()]
        size = path.stat().st_size
        encoding = fields.get("encoding", "raw").lower()
        if encoding == "raw" and size - (end + 2) < nbytes:
            raise ImageFileError(f"{path}: the file is cut short: {size - end - 2} of {nbytes} bytes of voxel data")
        if encoding in ("gzip", "gz"):
            fh.seek(-4, os.SEEK_END)
            if struct.unpack("<I", fh.read(4))[0] != nbytes % 2 ** 32:
                raise ImageFileError(f"{path}: the compressed voxel data are cut short or corrupt")


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage_complete(path: Path) -> None:
    """A MetaImage (.mha with LOCAL data, or .mhd with its raw file) holds all the bytes its header
    promises; compressed data are inflated once to count them (some SimpleITK releases read a short
    file with only a printed warning)."""
    import zlib

    with open(path, "rb") as fh:
        head = fh.read(65536)
    fields, offset = {}, 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return
    if fields.get("ElementType") not in _MET_SIZES:
        return
    nbytes = int(np.prod([int(v) for v in fields.get("DimSize", "0").split()], dtype=np.int64)) \
        * _MET_SIZES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1") or 1)
    source = fields["ElementDataFile"]
    if source == "LOCAL":
        data_path, start = path, offset
    elif " " in source or source.upper() == "LIST" or "%" in source:
        return                                      # slice lists: left to the reader
    else:
        data_path, start = path.parent / source, 0
        if not data_path.is_file():
            raise ImageFileError(f"{path}: its data file {data_path} does not exist")
    if fields.get("CompressedData", "False").lower() == "true":
        with open(data_path, "rb") as fh:
            fh.seek(start)
            inflater = zlib.decompressobj()
            got = len(inflater.decompress(fh.read())) + len(inflater.flush())
        if not inflater.eof or got < nbytes:
            raise ImageFileError(f"{path}: the compressed voxel data are cut short or corrupt")
    elif data_path.stat().st_size - start < nbytes:
        raise ImageFileError(f"{path}: the file is cut short: {data_path.stat().st_size - start} of {nbytes} "
                             "bytes of voxel data")


def check_file_complete(path) -> None:
    """Refuse a NIfTI, NRRD or MetaImage file whose voxel data are cut short, and a NIfTI holding
    NaN/infinite values.

    SimpleITK's NIfTI reader fills a missing tail with zeros and reads NaN as 0, so neither would be
    seen in the array; its MetaImage reader (2.3) reads a short file with only a printed warning.
    This check also verifies files just written. Compressed NIfTI float data are decompressed once
    here; integer data are checked by their stored length only."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nrrd"):
        return _check_nrrd_complete(path)
    if name.endswith((".mha", ".mhd")):
        return _check_metaimage_complete(path)
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                stored = struct.unpack("<I", fh.read(4))[0]
            with gzip.open(path, "rb") as fh:
                head = fh.read(544)
                offset, count, dtype = _nifti_layout(head, path)
                expected = offset + count * dtype.itemsize
                if dtype.kind != "f" and stored == expected % 2 ** 32:
                    return
                fh.seek(0)
                raw = fh.read()
        else:
            with open(path, "rb") as fh:
                head = fh.read(544)
                offset, count, dtype = _nifti_layout(head, path)
                expected = offset + count * dtype.itemsize
                if dtype.kind != "f" and path.stat().st_size >= expected:
                    return
                fh.seek(0)
                raw = fh.read()
    except (EOFError, gzip.BadGzipFile, OSError, struct.error) as exc:
        raise ImageFileError(f"{path}: the file is cut short or corrupt ({exc}); it cannot be read whole") from None
    if len(raw) < expected:
        raise ImageFileError(f"{path}: the file is cut short: {len(raw) - offset} of {expected - offset} bytes of "
                             "voxel data are present")
    if dtype.kind == "f":
        values = np.frombuffer(raw, dtype, count, offset)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ImageFileError(f"{path}: {bad} voxels are NaN or infinite")


def _sitk_read(path: Path, what: str = "file") -> sitk.Image:
    if not path.is_file():
        raise ImageFileError(f"{path}: {what} not found")
    check_file_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports corrupt and truncated NRRD/MetaImage files this way
        raise ImageFileError(f"{path}: cannot be read ({str(exc).strip().splitlines()[-1]})") from exc


def _verifier(path: Path, size_xyz, components: int):
    """The check of a written temporary file: complete voxel data, header readable, size and components
    as written."""
    def verify(tmp):
        try:
            check_file_complete(tmp)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(tmp))
            reader.ReadImageInformation()
        except (ImageFileError, RuntimeError) as exc:
            raise OSError(f"{path}: the written file is incomplete (disk full?): {exc}") from None
        if tuple(reader.GetSize()) != tuple(size_xyz) or reader.GetNumberOfComponents() != components:
            raise OSError(f"{path}: the written file does not read back as written")
    return verify


def _write_sitk(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    """Write through a temporary file, check it (:func:`_verifier`), then rename into place. (Vector
    NRRDs go through :func:`_write_array`, which stores their components plane by plane.)"""
    with atomic_path(path, _verifier(path, image.GetSize(), image.GetNumberOfComponentsPerPixel())) as tmp:
        # zlib level 3: a third smaller than level 1 for a displacement field, about 0.07 s more for one on
        # a 128 x 128 x 96 SPECT grid (the NIfTI writer keeps its own level)
        sitk.WriteImage(image, str(tmp), useCompression=compress, compressionLevel=3)
    return path


def _write_array(array: np.ndarray, geometry: Geometry, path: Path, compress: bool = True, is_vector: bool = False,
                 metadata: dict | None = None) -> Path:
    """:func:`_write_sitk` of an array on its geometry; a vector NRRD is written from the array itself
    (no SimpleITK copy of it; :func:`_write_planar_nrrd`)."""
    if not (is_vector and path.name.lower().endswith(".nrrd")):
        image = to_sitk(array, geometry, is_vector=is_vector)
        for key, value in (metadata or {}).items():
            image.SetMetaData(key, value)
        return _write_sitk(image, path, compress)
    _check_shape(array, geometry, is_vector)
    with atomic_path(path, _verifier(path, geometry.size_xyz, array.shape[-1])) as tmp:
        _write_planar_nrrd(array, geometry, metadata or {}, tmp, compress)
    return path


_NRRD_TYPES = {"uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32", "float32": "float",
               "float64": "double"}


def _write_planar_nrrd(array: np.ndarray, geometry: Geometry, metadata: dict, path: Path,
                       compress: bool = True) -> None:
    """A vector image as NRRD with its components on the slowest axis ("kinds: domain domain domain
    vector"), each component a whole volume: smooth fields and RGB maps compress to 0.6-0.75 and 0.4 of
    the interleaved layout SimpleITK writes. ITK's NRRD reader (Slicer's transform and volume loaders,
    SimpleITK) moves the vector axis back on reading; the header keeps the image's metadata
    (e.g. ``displacement field type``). gzip level 5: 9 % smaller than level 3 in the same time on a
    displacement field (level 6 is 2.3x slower for 8 % more). ``array`` (z, y, x, c) on ``geometry``;
    ``metadata``: header fields."""
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if dtype.name not in _NRRD_TYPES:
        raise ImageFileError(f"{path}: no NRRD type for {array.dtype}")
    planar = np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=dtype)   # (c, z, y, x): x fastest, c slowest
    spacing, direction = geometry.spacing, geometry.direction_matrix
    vectors = " ".join("(" + ",".join(repr(float(v)) for v in direction[:, i] * spacing[i]) + ")" for i in range(3))
    x, y, z = geometry.size_xyz
    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html",
             f"type: {_NRRD_TYPES[dtype.name]}", "dimension: 4", "space: left-posterior-superior",
             f"sizes: {x} {y} {z} {planar.shape[0]}", f"space directions: {vectors} none",
             "kinds: domain domain domain vector", "endian: little",
             f"encoding: {'gzip' if compress else 'raw'}",
             "space origin: (" + ",".join(repr(float(v)) for v in geometry.origin) + ")"]
    lines += [f"{key}:={value}" for key, value in metadata.items()]
    data = planar.data                           # the planar copy's own buffer: no third copy of the volume
    with open(path, "wb") as fh:
        fh.write(("\n".join(lines) + "\n\n").encode("ascii"))
        fh.write(gzip.compress(data, compresslevel=5, mtime=0) if compress else data)


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
    creates parent folders; atomic (temporary name, checked, renamed)."""
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite")
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageFileError(f"{path}: refusing to write {int((~np.isfinite(array)).sum())} NaN/infinite voxels")
    return _write_array(array, geometry, path, compress, is_vector)


def write_displacement_field(path, field_lps_mm: np.ndarray, geometry: Geometry) -> Path:
    """Write a (z, y, x, 3) LPS-mm displacement field (resampling convention) as NRRD."""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        raise ImageFileError(f"{path}: displacement fields are written as .nrrd (Slicer grid transform)")
    field = np.asarray(field_lps_mm, dtype=np.float32)
    if not np.isfinite(field).all():
        raise ImageFileError(f"{path}: displacement field has NaN or infinite vectors")
    return _write_array(field, geometry, path, is_vector=True, metadata={"displacement field type": "resampling"})


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
    if image.GetDimension() == 4:
        raise ImageFileError(f"{path}: 4D segmentation files are not supported; save it as a 3D .seg.nrrd")
    geometry = geometry_of(image)
    layers = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)   # one layer per component
    segments = {}
    if "Segment0_LabelValue" in keys:
        i = 0
        while f"Segment{i}_LabelValue" in keys:
            name = image.GetMetaData(f"Segment{i}_Name") if f"Segment{i}_Name" in keys else f"segment_{i}"
            layer = int(image.GetMetaData(f"Segment{i}_Layer")) if f"Segment{i}_Layer" in keys else 0
            value = int(image.GetMetaData(f"Segment{i}_LabelValue"))
            if not 0 <= layer < layers.shape[0]:
                raise ImageFileError(f"{path}: segment '{name}' is on layer {layer}, but the file has "
                                     f"{layers.shape[0]} layer(s)")
            if name in segments:
                raise ImageFileError(f"{path}: two segments are named '{name}'; rename one")
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
    return _write_sitk(image, path)
