"""The real-anatomy validation phantom (patient15, 177Lu-DOTATATE; MIT licence, see shared/data).

Interfile pair, 16-bit unsigned little-endian, 108 x 70 x 90 voxels (C order: z, y, x) of
3.9063 x 3.9063 mm in-plane and 4.4196 mm slices:

* ``*_attn.i33``: CT number + 1000 (HU = value - 1000); the carbon-fibre couch carries ~3000.
* ``*_src.i33``: the same, except organ/tumour voxels hold region codes (below).

Orientation, checked on the data: the liver (right upper abdomen) lies at lower x index than
the spleen, so i runs towards the patient's left (+x LPS); the couch lies at low j, so j runs
posterior -> anterior (-y LPS); the liver is at low k and the pelvis at high k, so k runs
superior -> inferior (-z LPS). Code 17000 ("L" kidney) lies on the spleen side: it is the
left kidney. The arrays are flipped to an identity-direction LPS frame here.

This anatomy is for validation only and must never be used for training.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..geometry import Geometry
from . import anatomy as A

SHAPE_ZYX = (90, 70, 108)
SPACING_XYZ = (3.9063, 3.9063, 4.4196)
REGION_CODES = {15000: A.LIVER, 16000: A.SPLEEN, 17000: A.KIDNEY_L_CORTEX, 18000: A.KIDNEY_R_CORTEX,
                19000: A.TUMOUR_BASE, 20000: A.TUMOUR_BASE + 1, 21000: A.TUMOUR_BASE + 2}
ZIP_NAME = "patient_LuDOTATATE_phantoms.zip"


def default_zip_path() -> Path:
    env = os.environ.get("CORX_PATIENT15_ZIP")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]
    return root.parent / "shared" / "data" / "patient15_LuDOTATATE" / ZIP_NAME


def _read_interfile(zf: zipfile.ZipFile, stem: str) -> np.ndarray:
    header = zf.read(f"{stem}.h33").decode("latin-1")
    keys = {m.group(1).strip().lower(): m.group(2).strip()
            for m in re.finditer(r"^!?([^:=\n]+):=\s*(.*)$", header, flags=re.M)}
    nx, ny = int(keys["matrix size [1]"]), int(keys["matrix size [2]"])
    nz = int(keys["number of slices"])
    if (nz, ny, nx) != SHAPE_ZYX or keys.get("number of bytes per pixel") != "2":
        raise ValueError(f"{stem}: unexpected Interfile layout {(nz, ny, nx)}")
    order = "<" if keys.get("imagedata byte order", "LITTLEENDIAN").upper().startswith("LITTLE") else ">"
    data = np.frombuffer(zf.read(f"{stem}.i33"), dtype=f"{order}u2")
    if data.size != nz * ny * nx:
        raise ValueError(f"{stem}.i33 holds {data.size} values, expected {nz * ny * nx}")
    return data.reshape(SHAPE_ZYX).astype(np.int32)


def load_patient15(zip_path=None):
    """Return (hu, region_labels, geometry) in an identity-direction LPS frame centred at 0."""
    path = Path(zip_path) if zip_path else default_zip_path()
    if not path.is_file():
        raise FileNotFoundError(f"patient15 data not found at {path} (set CORX_PATIENT15_ZIP)")
    with zipfile.ZipFile(path) as zf:
        attn = _read_interfile(zf, "patient15_LuDOTATATE_attn")
        src = _read_interfile(zf, "patient15_LuDOTATATE_src")
    # flip j (anterior -> posterior) and k (inferior -> superior) so that i, j, k = +x, +y, +z LPS
    attn = attn[::-1, ::-1, :]
    src = src[::-1, ::-1, :]
    regions = np.zeros(SHAPE_ZYX, np.uint8)
    for code, label in REGION_CODES.items():
        regions[src == code] = label
    hu = (attn - 1000).astype(np.float32)
    geometry = Geometry.centred(SHAPE_ZYX, SPACING_XYZ)
    return np.ascontiguousarray(hu), np.ascontiguousarray(regions), geometry


def patient15_phantom(rng, zip_path=None, spacing_mm=None) -> A.Phantom:
    """Phantom from patient15: clinician-segmented organs/tumours, other tissues by CT number."""
    hu, regions, g = load_patient15(zip_path)
    couch = hu > 1500.0
    hu[couch] = -1000.0
    body = hu > -500.0
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(body, lab, index=range(1, n + 1))
        body = lab == (1 + int(np.argmax(sizes)))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    hu[~filled] = -1000.0
    labels = np.zeros(g.shape, np.uint8)
    labels[filled] = A.SOFT_TISSUE
    labels[filled & (hu < -400.0)] = A.LUNG
    labels[filled & (hu >= -200.0) & (hu < -30.0)] = A.FAT
    labels[filled & (hu >= 150.0)] = A.MARROW
    labels[filled & (hu >= 300.0)] = A.BONE
    organ = regions > 0
    labels[organ] = regions[organ]
    tumours = []
    for i in range(3):
        m = regions == A.TUMOUR_BASE + i
        pts = g.index_to_lps(np.argwhere(m)[:, ::-1].astype(float))
        d = 2.0 * (m.sum() * g.voxel_volume_ml * 1000.0 * 3.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
        tumours.append(A.Tumour("lesion", tuple(float(v) for v in pts.mean(axis=0)), float(d),
                                float(hu[m].mean()), A.TUMOUR_BASE + i))
    uptake, washout = A.modulation_maps(rng, g, labels, tumours)
    return A.Phantom(g, labels, hu, uptake, washout, tumours, name="patient15")
