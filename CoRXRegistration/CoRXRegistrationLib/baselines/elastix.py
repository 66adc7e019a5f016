"""Elastix as the paper configured it: CT-CT affine then B-spline, advanced Mattes mutual information,
up to 1000 iterations per resolution, on the 128^3 network-grid images; the CT-derived field is then
applied to SPECT. Runs the real elastix through the ``itk-elastix`` wheel (optional dependency:
``pip install itk-elastix`` / the project's ``baseline`` extra)."""
from __future__ import annotations

import tempfile

import numpy as np

from ..geometry import Geometry


class ElastixUnavailable(RuntimeError):
    """itk-elastix is not installed."""


def _itk():
    try:
        import itk
        itk.ElastixRegistrationMethod  # noqa: B018  (raises if the elastix module is missing)
        return itk
    except (ImportError, AttributeError) as exc:
        raise ElastixUnavailable("the Elastix baseline needs the itk-elastix wheel: pip install itk-elastix "
                                 "(or install the project with the 'baseline' extra)") from exc


def _to_itk(itk, array: np.ndarray, geometry: Geometry):
    image = itk.image_from_array(np.ascontiguousarray(array, np.float32))
    image.SetOrigin([float(v) for v in geometry.origin])
    image.SetSpacing([float(v) for v in geometry.spacing])
    image.SetDirection(itk.matrix_from_array(geometry.direction_matrix.astype(np.float64)))
    return image


def paper_parameter_maps(itk, iterations: int = 1000, resolutions: int = 4):
    """Affine + B-spline maps with AdvancedMattesMutualInformation and ``iterations`` per resolution."""
    params = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        m = params.GetDefaultParameterMap(kind, resolutions)
        # The paper names no penalty; the default B-spline map's bending-energy term is removed rather
        # than weighted 0 (same field, without the cost of evaluating a term that does not count).
        m["Metric"] = ["AdvancedMattesMutualInformation"]
        for key in [k for k in m.keys() if k.startswith("Metric") and k[6:7].isdigit()]:
            del m[key]
        m["MaximumNumberOfIterations"] = [str(int(iterations))]
        m["ResultImageFormat"] = ["nii"]
        params.AddParameterMap(m)
    return params


def elastix_register_ct(fixed_ct: np.ndarray, moving_ct: np.ndarray, geometry: Geometry, iterations: int = 1000,
                        resolutions: int = 4, threads: int | None = None, fixed_mask: np.ndarray | None = None) -> np.ndarray:
    """Register moving CT to fixed CT (both on ``geometry``); returns the (Z, Y, X, 3) LPS-mm field in the
    resampling convention (fixed point p -> moving point p + u(p)), as elastix's own transform maps.
    ``fixed_mask`` (bool, on ``geometry``): where elastix samples its metric (not in the paper's set-up)."""
    itk = _itk()
    fixed = _to_itk(itk, fixed_ct, geometry)
    moving = _to_itk(itk, moving_ct, geometry)
    method = itk.ElastixRegistrationMethod.New(fixed, moving)
    if fixed_mask is not None:
        mask = itk.image_from_array(np.ascontiguousarray(fixed_mask, np.uint8))
        mask.CopyInformation(fixed)
        method.SetFixedMask(mask)
    method.SetParameterObject(paper_parameter_maps(itk, iterations, resolutions))
    method.SetLogToConsole(False)
    if threads:
        method.SetNumberOfThreads(int(threads))
    method.UpdateLargestPossibleRegion()
    transformix = itk.TransformixFilter.New(moving)
    transformix.SetTransformParameterObject(method.GetTransformParameterObject())
    transformix.SetComputeDeformationField(True)
    transformix.SetLogToConsole(False)
    with tempfile.TemporaryDirectory(prefix="corx-elastix-") as tmp:   # transformix writes files: not into cwd
        transformix.SetOutputDirectory(tmp)
        transformix.UpdateLargestPossibleRegion()
        out = np.array(itk.array_from_image(transformix.GetOutputDeformationField()), np.float32)
    if out.shape != geometry.shape + (3,):
        raise RuntimeError(f"elastix returned a field of shape {out.shape}, expected {geometry.shape + (3,)}")
    return out
