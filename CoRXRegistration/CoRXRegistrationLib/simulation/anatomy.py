"""Torso anatomies for simulation: label codes, CT numbers and procedural phantoms.

A :class:`Phantom` is the anatomy in its own *reference frame* (LPS mm, identity
direction): a label map, a CT-number map (HU) and two smooth per-voxel modulation maps
used by the biokinetics (activity amplitude ``uptake_scale`` and washout-rate scale
``washout_scale``, both dimensionless, 1 = region average).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..geometry import Geometry

# ---------------------------------------------------------------- label codes
AIR, SOFT_TISSUE, FAT, LUNG, LIVER, SPLEEN = 0, 1, 2, 3, 4, 5
KIDNEY_R_CORTEX, KIDNEY_R_MEDULLA, KIDNEY_L_CORTEX, KIDNEY_L_MEDULLA = 6, 7, 8, 9
BLADDER, BONE, MARROW, BOWEL, BOWEL_GAS, AORTA, HEART = 10, 11, 12, 13, 14, 15, 16
TUMOUR_BASE = 20  # tumour i (0-based) has label TUMOUR_BASE + i

LABEL_NAMES = {
    AIR: "air", SOFT_TISSUE: "soft_tissue", FAT: "fat", LUNG: "lung", LIVER: "liver",
    SPLEEN: "spleen", KIDNEY_R_CORTEX: "kidney_right_cortex", KIDNEY_R_MEDULLA: "kidney_right_medulla",
    KIDNEY_L_CORTEX: "kidney_left_cortex", KIDNEY_L_MEDULLA: "kidney_left_medulla", BLADDER: "bladder",
    BONE: "cortical_bone", MARROW: "red_marrow", BOWEL: "bowel", BOWEL_GAS: "bowel_gas",
    AORTA: "aorta", HEART: "heart",
}

# CT numbers (HU) of each tissue on a low-dose, non-contrast CT. Liver metastases differ
# from liver by only a few HU, so they are nearly invisible under CT noise (as clinically).
TISSUE_HU = {
    AIR: -1000.0, SOFT_TISSUE: 45.0, FAT: -100.0, LUNG: -830.0, LIVER: 58.0, SPLEEN: 48.0,
    KIDNEY_R_CORTEX: 33.0, KIDNEY_R_MEDULLA: 28.0, KIDNEY_L_CORTEX: 33.0, KIDNEY_L_MEDULLA: 28.0,
    BLADDER: 8.0, BONE: 850.0, MARROW: 230.0, BOWEL: 35.0, BOWEL_GAS: -750.0, AORTA: 42.0, HEART: 42.0,
}

# Volumes of interest reported by the simulator and the evaluation: name -> label codes.
ORGAN_VOIS = {
    "liver": (LIVER,),
    "spleen": (SPLEEN,),
    "kidney_right": (KIDNEY_R_CORTEX, KIDNEY_R_MEDULLA),
    "kidney_left": (KIDNEY_L_CORTEX, KIDNEY_L_MEDULLA),
    "bladder": (BLADDER,),
}


@dataclass
class Tumour:
    kind: str            # "liver", "pancreas", "nodal", "bone"
    centre_lps: tuple    # mm
    diameter_mm: float
    hu: float
    label: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "centre_lps_mm": [round(c, 2) for c in self.centre_lps],
                "diameter_mm": round(self.diameter_mm, 2), "hu": round(self.hu, 1), "label": self.label}


@dataclass
class Phantom:
    geometry: Geometry
    labels: np.ndarray          # uint8 (z, y, x)
    hu: np.ndarray              # float32 (z, y, x)
    uptake_scale: np.ndarray    # float32, multiplies activity concentration
    washout_scale: np.ndarray   # float32, multiplies biological clearance rates
    tumours: list = field(default_factory=list)
    name: str = "procedural"

    def voi_labels(self) -> dict:
        """Name -> label codes for every organ and tumour present in this phantom."""
        present = set(np.unique(self.labels).tolist())
        vois = {n: codes for n, codes in ORGAN_VOIS.items() if any(c in present for c in codes)}
        for i, t in enumerate(self.tumours):
            if t.label in present:
                vois[f"tumour_{i + 1}_{t.kind}"] = (t.label,)
        return vois

    def label_names(self) -> dict:
        names = dict(LABEL_NAMES)
        for i, t in enumerate(self.tumours):
            names[t.label] = f"tumour_{i + 1}_{t.kind}"
        return names


class _Canvas:
    """Paints analytic shapes into a label map, evaluating each only in its bounding box."""

    def __init__(self, geometry: Geometry):
        self.g = geometry
        self.labels = np.zeros(geometry.shape, np.uint8)
        sx, sy, sz = geometry.spacing
        ox, oy, oz = geometry.origin
        nz, ny, nx = geometry.shape
        self.axes = (oz + sz * np.arange(nz), oy + sy * np.arange(ny), ox + sx * np.arange(nx))

    def block(self, lo, hi):
        sl, coords = [], []
        for ax, a, b in zip(self.axes, (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])):
            i0 = int(np.searchsorted(ax, a))
            i1 = int(np.searchsorted(ax, b, side="right"))
            sl.append(slice(i0, max(i0, i1)))
            coords.append(ax[i0:max(i0, i1)])
        z, y, x = coords
        return tuple(sl), (x[None, None, :], y[None, :, None], z[:, None, None])

    def paint(self, inside, lo, hi, label, only_on=None):
        sl, (x, y, z) = self.block(lo, hi)
        if any(s.stop <= s.start for s in sl):
            return
        m = inside(x, y, z)
        m = np.broadcast_to(m, tuple(s.stop - s.start for s in sl))
        view = self.labels[sl]
        if only_on is not None:
            m = m & np.isin(view, only_on)
        view[m] = label


def _ellipsoid(c, r, rot=None):
    c = np.asarray(c, float)
    r = np.asarray(r, float)

    def inside(x, y, z):
        d = [x - c[0], y - c[1], z - c[2]]
        if rot is not None:
            d = [rot[0, 0] * d[0] + rot[1, 0] * d[1] + rot[2, 0] * d[2],
                 rot[0, 1] * d[0] + rot[1, 1] * d[1] + rot[2, 1] * d[2],
                 rot[0, 2] * d[0] + rot[1, 2] * d[1] + rot[2, 2] * d[2]]
        return (d[0] / r[0]) ** 2 + (d[1] / r[1]) ** 2 + (d[2] / r[2]) ** 2 <= 1.0

    rmax = float(r.max())
    return inside, c - rmax, c + rmax


def _rotation(rng, max_deg):
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_noise(rng, shape, sigma_vox, coarse=4):
    """Zero-mean, unit-SD smooth random field (generated coarse, then upsampled)."""
    small = tuple(max(2, -(-n // coarse)) for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), max(sigma_vox / coarse, 0.5))
    f = ndimage.zoom(f, [n / s for n, s in zip(shape, small)], order=1)[: shape[0], : shape[1], : shape[2]]
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


def procedural_phantom(rng: np.random.Generator, spacing_mm: float = 2.0, n_tumours=None) -> Phantom:
    """A randomised torso (upper thorax to pelvis) with 1-6 tumours, in LPS mm.

    The body centre is at the origin; +x = patient left, +y = posterior, +z = superior.
    """
    box = np.array([420.0, 300.0, 460.0])  # x, y, z extent in mm
    shape = tuple(int(round(b / spacing_mm)) for b in box[::-1])
    g = Geometry.centred(shape, (spacing_mm,) * 3)
    cv = _Canvas(g)
    u = rng.uniform
    size = u(0.88, 1.08)
    ax0, ay0 = 165.0 * size * u(0.95, 1.05), 112.0 * size * u(0.92, 1.08)
    fat = u(8.0, 22.0)
    z_d = u(45.0, 80.0)          # diaphragm (liver dome) level
    z_lo, z_hi = -box[2] / 2, box[2] / 2

    def body_axes(z):  # body semi-axes vary with z: narrower waist, wider pelvis/chest
        f = 1.0 + 0.06 * np.cos((z - 20.0) / 140.0) - 0.05 * np.exp(-((z + 40.0) / 70.0) ** 2)
        return ax0 * f, ay0 * f

    def in_ellipse_z(shrink, cy=0.0):
        def inside(x, y, z):
            axz, ayz = body_axes(z)
            return ((x / (axz - shrink)) ** 2 + ((y - cy) / (ayz - shrink)) ** 2) <= 1.0
        return inside

    lo, hi = (-box[0] / 2, -box[1] / 2, z_lo), (box[0] / 2, box[1] / 2, z_hi)
    cv.paint(in_ellipse_z(0.0), lo, hi, FAT)
    cv.paint(in_ellipse_z(fat), lo, hi, SOFT_TISSUE)
    rc = fat + 14.0  # inner rib-cage boundary, measured in from the skin

    def dome(x, y):
        return z_d + 20.0 * np.exp(-((x + 70.0) ** 2 + y ** 2) / (2 * 70.0 ** 2)) \
            + 12.0 * np.exp(-((x - 70.0) ** 2 + y ** 2) / (2 * 70.0 ** 2))

    ribcage = in_ellipse_z(rc + 6.0)
    for side in (-1, 1):  # lungs: above the dome, inside the rib cage
        inside, l0, h0 = _ellipsoid((side * 75.0 * size, 5.0, z_d + 110.0), (70.0 * size, 85.0 * size, 140.0))
        cv.paint(lambda x, y, z, f=inside: f(x, y, z) & (z > dome(x, y) + 4.0) & ribcage(x, y, z), l0, h0, LUNG)
    inside, l0, h0 = _ellipsoid((25.0 + u(-8, 8), -35.0, z_d + 55.0), (55.0, 45.0, 55.0) * np.array(u(0.9, 1.1, 3)),
                                _rotation(rng, 10))
    cv.paint(inside, l0, h0, HEART, only_on=(SOFT_TISSUE, LUNG))
    inside, l0, h0 = _ellipsoid((-55.0 * size + u(-10, 10), u(-8, 8), z_d - 50.0),
                                np.array([100.0, 85.0, 82.0]) * size * u(0.9, 1.1, 3), _rotation(rng, 8))
    cv.paint(lambda x, y, z: inside(x, y, z) & (z <= dome(x, y)) & in_ellipse_z(rc)(x, y, z), l0, h0, LIVER)
    inside, l0, h0 = _ellipsoid((95.0 * size + u(-8, 8), 45.0 + u(-8, 8), z_d - 40.0 + u(-10, 10)),
                                np.array([32.0, 28.0, 55.0]) * u(0.85, 1.2, 3), _rotation(rng, 15))
    cv.paint(lambda x, y, z: inside(x, y, z) & (z <= dome(x, y)) & in_ellipse_z(rc)(x, y, z), l0, h0, SPLEEN,
             only_on=(SOFT_TISSUE, FAT, LIVER))
    kidney_z = []
    for side, cortex, medulla in ((-1, KIDNEY_R_CORTEX, KIDNEY_R_MEDULLA), (1, KIDNEY_L_CORTEX, KIDNEY_L_MEDULLA)):
        kz = z_d - (125.0 if side < 0 else 108.0) + u(-12, 12)
        kidney_z.append(kz)
        c = np.array([side * 72.0 * size + u(-6, 6), 52.0 + u(-6, 6), kz])
        r = np.array([30.0, 26.0, 55.0]) * u(0.88, 1.12, 3)
        rot = _rotation(rng, 12)
        inside, l0, h0 = _ellipsoid(c, r, rot)
        cv.paint(inside, l0, h0, cortex)
        inside, l0, h0 = _ellipsoid(c + np.array([-side * 6.0, 0, 0]), r * 0.55, rot)
        cv.paint(inside, l0, h0, medulla)
    # aorta, descending in front of the spine
    spine_y = ay0 * 0.48
    aorta_x, aorta_y = 18.0 + u(-5, 5), spine_y - 30.0
    cv.paint(lambda x, y, z: ((x - aorta_x) ** 2 + (y - aorta_y) ** 2 <= 12.0 ** 2),
             (aorta_x - 13, aorta_y - 13, z_d - 190.0), (aorta_x + 13, aorta_y + 13, z_d + 40.0), AORTA,
             only_on=(SOFT_TISSUE, FAT, LUNG, LIVER))
    # bladder and bowel
    z_b = z_lo + u(55.0, 75.0)
    bladder_r = np.array([45.0, 36.0, 32.0]) * u(0.75, 1.15)
    inside, l0, h0 = _ellipsoid((u(-8, 8), -25.0, z_b), bladder_r)
    cv.paint(inside, l0, h0, BLADDER, only_on=(SOFT_TISSUE, FAT))
    bowel_lo = np.array([-105.0, -85.0, z_b + 35.0]) * np.array([size, size, 1.0])
    bowel_hi = np.array([105.0, 35.0, min(kidney_z) - 10.0]) * np.array([size, size, 1.0])
    for _ in range(int(rng.integers(12, 18))):
        c = u(bowel_lo, bowel_hi)
        inside, l0, h0 = _ellipsoid(c, u(14.0, 28.0, 3), _rotation(rng, 40))
        cv.paint(inside, l0, h0, BOWEL, only_on=(SOFT_TISSUE,))
    bowel_vox = np.argwhere(cv.labels == BOWEL)
    if len(bowel_vox):
        for _ in range(int(rng.integers(6, 12))):
            p = g.index_to_lps(bowel_vox[rng.integers(len(bowel_vox))][::-1].astype(float))
            inside, l0, h0 = _ellipsoid(p, [u(5.0, 14.0)] * 3)
            cv.paint(inside, l0, h0, BOWEL_GAS, only_on=(BOWEL,))
    # spine: vertebral bodies (cortical shell, marrow), discs, posterior elements
    z_spine_lo = z_b + 10.0
    for zc in np.arange(z_hi + 10.0, z_spine_lo, -31.0):
        zb0, zb1 = zc - 13.0, zc + 13.0
        cv.paint(lambda x, y, z: (x ** 2 + (y - spine_y) ** 2 <= 20.0 ** 2), (-21, spine_y - 21, zb0),
                 (21, spine_y + 21, zb1), BONE)
        cv.paint(lambda x, y, z: (x ** 2 + (y - spine_y) ** 2 <= 16.5 ** 2), (-17, spine_y - 17, zb0 + 2.5),
                 (17, spine_y + 17, zb1 - 2.5), MARROW)
        cv.paint(lambda x, y, z: (np.abs(x) <= 5.0) | ((np.abs(x) <= 28.0) & (np.abs(y - spine_y - 38.0) <= 5.0)),
                 (-28, spine_y + 22, zb0 + 4.0), (28, spine_y + 52, zb1 - 4.0), BONE)
    cv.paint(lambda x, y, z: (x ** 2 + (y - spine_y - 27.0) ** 2 <= 7.5 ** 2), (-8, spine_y + 19, z_spine_lo),
             (8, spine_y + 35, z_hi), SOFT_TISSUE, only_on=(BONE, MARROW))
    # ribs: bands in the chest wall from below the diaphragm upwards
    for zr in np.arange(z_d - 70.0, z_hi, 24.0):
        def rib(x, y, z, zr=zr):
            axz, ayz = body_axes(z)
            r_out = (x / (axz - fat - 4.0)) ** 2 + (y / (ayz - fat - 4.0)) ** 2
            r_in = (x / (axz - rc)) ** 2 + (y / (ayz - rc)) ** 2
            tilt = zr + 0.06 * y
            return (r_out <= 1.0) & (r_in > 1.0) & (np.abs(z - tilt) <= 4.5) & ((np.abs(x) > 30.0) | (y > 0))
        cv.paint(rib, (-box[0] / 2, -box[1] / 2, zr - 20), (box[0] / 2, box[1] / 2, zr + 20), BONE,
                 only_on=(SOFT_TISSUE, FAT))
    # pelvis: iliac wings as curved bony plates with marrow, sacrum
    for side in (-1, 1):
        c = np.array([side * 88.0 * size, 38.0, z_b + 75.0])
        inside_o, l0, h0 = _ellipsoid(c, (52.0, 22.0, 62.0), _rotation(rng, 5))
        cv.paint(lambda x, y, z, f=inside_o: f(x, y, z) & (z < c[2] + 40.0), l0, h0, BONE,
                 only_on=(SOFT_TISSUE, FAT, BOWEL))
        inside_i, l0, h0 = _ellipsoid(c, (45.0, 15.0, 55.0))
        cv.paint(lambda x, y, z, f=inside_i: f(x, y, z) & (z < c[2] + 36.0), l0, h0, MARROW, only_on=(BONE,))
    inside, l0, h0 = _ellipsoid((0.0, spine_y + 10.0, z_b + 30.0), (45.0, 20.0, 45.0))
    cv.paint(inside, l0, h0, MARROW, only_on=(SOFT_TISSUE, FAT, BOWEL))

    labels = cv.labels
    # tumours
    n_t = int(rng.integers(1, 7)) if n_tumours is None else int(n_tumours)
    tumours = []
    kinds = rng.choice(["liver", "liver", "pancreas", "nodal", "bone"], size=n_t)
    liver_vox = np.argwhere(labels == LIVER)
    marrow_vox = np.argwhere((labels == MARROW))
    for i, kind in enumerate(kinds):
        d = float(u(10.0, 50.0) if kind in ("liver", "pancreas") else u(10.0, 32.0))
        if kind == "liver" and len(liver_vox):
            c = g.index_to_lps(liver_vox[rng.integers(len(liver_vox))][::-1].astype(float))
            hu = TISSUE_HU[LIVER] + u(-8.0, 8.0)
            host = (LIVER, SOFT_TISSUE, FAT)
        elif kind == "bone" and len(marrow_vox):
            c = g.index_to_lps(marrow_vox[rng.integers(len(marrow_vox))][::-1].astype(float))
            hu = u(120.0, 400.0)
            host = (MARROW, BONE, SOFT_TISSUE)
        elif kind == "nodal":
            c = np.array([aorta_x + rng.choice([-1, 1]) * u(22, 32), aorta_y - u(0, 15), u(z_b + 60, z_d - 60)])
            hu = u(35.0, 48.0)
            host = (SOFT_TISSUE, FAT, BOWEL)
        else:
            kind = "pancreas"
            c = np.array([u(-10, 40), u(0, 25), max(kidney_z) + u(10, 30)])
            hu = u(35.0, 50.0)
            host = (SOFT_TISSUE, FAT, BOWEL, LIVER, SPLEEN)
        label = TUMOUR_BASE + i
        r = d / 2.0 * u(0.85, 1.15, 3)
        inside, l0, h0 = _ellipsoid(c, r, _rotation(rng, 30))
        cv.paint(inside, l0, h0, label, only_on=host)
        tumours.append(Tumour(str(kind), tuple(float(v) for v in c), d, float(hu), label))

    lut = np.full(256, TISSUE_HU[SOFT_TISSUE], np.float32)
    for code, val in TISSUE_HU.items():
        lut[code] = val
    for t in tumours:
        lut[t.label] = t.hu
    hu_map = lut[labels]
    uptake, washout = modulation_maps(rng, g, labels, tumours)
    return Phantom(g, labels, hu_map, uptake, washout, tumours, name="procedural")


def modulation_maps(rng, g: Geometry, labels: np.ndarray, tumours: list):
    """Smooth voxel-level variation: mild in organs (SD 8 %), strong in tumours with necrosis."""
    sigma_vox = 10.0 / g.spacing[0]
    uptake = (1.0 + 0.08 * smooth_noise(rng, g.shape, sigma_vox)).astype(np.float32)
    washout = (1.0 + 0.05 * smooth_noise(rng, g.shape, sigma_vox)).astype(np.float32)
    het = smooth_noise(rng, g.shape, 4.0 / g.spacing[0], coarse=2)
    for t in tumours:
        m = labels == t.label
        if not m.any():
            continue
        pts = g.index_to_lps(np.argwhere(m)[:, ::-1].astype(float))
        r = np.linalg.norm(pts - np.asarray(t.centre_lps), axis=-1) / (t.diameter_mm / 2.0)
        core = 1.0
        if t.diameter_mm > 32.0:  # necrotic core in large tumours
            core = 0.15 + 0.85 / (1.0 + np.exp(-(r - 0.45) / 0.06))
        uptake[m] = np.clip((1.0 + 0.3 * het[m]) * core, 0.05, None)
        washout[m] = np.clip(rng.uniform(0.7, 1.3) * (1.0 + 0.15 * het[m]), 0.3, None)
    np.clip(uptake, 0.5, None, out=uptake, where=labels < TUMOUR_BASE)
    return uptake, washout
