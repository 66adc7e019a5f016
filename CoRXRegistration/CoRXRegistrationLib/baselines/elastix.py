"""Elastix as the paper configured it: CT-CT affine then B-spline, advanced Mattes mutual information,
up to 1000 iterations per resolution, on the 128^3 network-grid images; the CT-derived field is then
applied to SPECT. Also the same maps with the displacement-distribution step-size estimation (what a
well-tuned Elastix uses: the default estimation costs most of the run time) and a multi-metric CT + SPECT
variant. Runs the real elastix through the ``itk-elastix`` wheel (optional dependency:
``pip install itk-elastix`` / the project's ``baseline`` extra)."""
from __future__ import annotations

import tempfile

import numpy as np

from ..geometry import Geometry


class ElastixUnavailable(RuntimeError):
    """itk-elastix is not installed."""


def elastix_available() -> str:
    """'' when itk-elastix imports, else why not (one line)."""
    try:
        _itk()
        return ""
    except ElastixUnavailable as exc:
        return str(exc)


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


#: ``ASGDParameterEstimationMethod`` values: elastix's default ("Original", the paper set-up: the step
#: size from exact gradients at many samples, most of its run time) and "DisplacementDistribution"
#: (Qiao et al. 2016: the step size from the distribution of voxel displacements, far cheaper).
STEP_ESTIMATIONS = ("Original", "DisplacementDistribution")

#: The SPECT-aware multi-metric set-up: CT Mattes MI and SPECT normalised correlation, weights per metric.
CT_SPECT_METRICS = ("AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation")
CT_SPECT_WEIGHTS = (1.0, 0.5)


def set_threads(threads: int | None) -> int:
    """Set ITK's global default thread count (``None``: leave it; ITK's default is every core) and
    return it. elastix reads it from there; ``ElastixRegistrationMethod.SetNumberOfThreads`` crashes
    itk-elastix 0.25 (InsightSoftwareConsortium/ITKElastix #160, #295), so it is never used."""
    itk = _itk()
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    return int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())


def paper_parameter_maps(itk, iterations: int = 1000, resolutions: int = 4, step_estimation: str = "Original",
                         metrics=("AdvancedMattesMutualInformation",), weights=None):
    """Affine + B-spline maps with ``metrics`` (the paper: AdvancedMattesMutualInformation alone) and
    ``iterations`` per resolution; ``step_estimation``: one of :data:`STEP_ESTIMATIONS`. With two
    metrics, one per (fixed, moving) image pair, each image has its own pyramid, interpolator and
    sampler and ``weights`` weigh the metrics."""
    if step_estimation not in STEP_ESTIMATIONS:
        raise ValueError(f"step_estimation must be one of {STEP_ESTIMATIONS}, got {step_estimation!r}")
    n = len(metrics)
    params = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        m = params.GetDefaultParameterMap(kind, resolutions)
        # The paper names no penalty; the default B-spline map's bending-energy term is removed rather
        # than weighted 0 (same field, without the cost of evaluating a term that does not count).
        for key in [k for k in m.keys() if k.startswith("Metric") and k[6:7].isdigit()]:
            del m[key]
        m["Metric"] = list(metrics)
        if n > 1:
            m["Registration"] = ["MultiMetricMultiResolutionRegistration"]
            for key in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler"):
                m[key] = [m[key][0]] * n
            for i, w in enumerate(weights or [1.0] * n):
                m[f"Metric{i}Weight"] = [str(float(w))]
        m["MaximumNumberOfIterations"] = [str(int(iterations))]
        m["ASGDParameterEstimationMethod"] = [step_estimation]
        m["ResultImageFormat"] = ["nii"]
        params.AddParameterMap(m)
    return params


def _run(itk, fixed_images, moving_images, params, fixed_mask, threads):
    """Run elastix on the image pairs (first pair: the transformix reference) and return the dense field."""
    set_threads(threads)
    method = itk.ElastixRegistrationMethod.New(fixed_images[0], moving_images[0])
    for fixed, moving in zip(fixed_images[1:], moving_images[1:]):
        method.AddFixedImage(fixed)
        method.AddMovingImage(moving)
    if fixed_mask is not None:
        mask = itk.image_from_array(np.ascontiguousarray(fixed_mask, np.uint8))
        mask.CopyInformation(fixed_images[0])
        method.SetFixedMask(mask)
    method.SetParameterObject(params)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    transformix = itk.TransformixFilter.New(moving_images[0])
    transformix.SetTransformParameterObject(method.GetTransformParameterObject())
    transformix.SetComputeDeformationField(True)
    transformix.SetLogToConsole(False)
    with tempfile.TemporaryDirectory(prefix="corx-elastix-") as tmp:   # transformix writes files: not into cwd
        transformix.SetOutputDirectory(tmp)
        transformix.UpdateLargestPossibleRegion()
        return np.array(itk.array_from_image(transformix.GetOutputDeformationField()), np.float32)


def _checked(out: np.ndarray, geometry: Geometry) -> np.ndarray:
    if out.shape != geometry.shape + (3,):
        raise RuntimeError(f"elastix returned a field of shape {out.shape}, expected {geometry.shape + (3,)}")
    return out


def elastix_register_ct(fixed_ct: np.ndarray, moving_ct: np.ndarray, geometry: Geometry, iterations: int = 1000,
                        resolutions: int = 4, threads: int | None = None, fixed_mask: np.ndarray | None = None,
                        step_estimation: str = "Original") -> np.ndarray:
    """Register moving CT to fixed CT (both on ``geometry``); returns the (Z, Y, X, 3) LPS-mm field in the
    resampling convention (fixed point p -> moving point p + u(p)), as elastix's own transform maps.
    ``fixed_mask`` (bool, on ``geometry``): where elastix samples its metric (not in the paper's set-up);
    ``threads``: ITK's global thread count (None: every core); ``step_estimation``: see :data:`STEP_ESTIMATIONS`."""
    itk = _itk()
    images = [_to_itk(itk, a, geometry) for a in (fixed_ct, moving_ct)]
    params = paper_parameter_maps(itk, iterations, resolutions, step_estimation)
    return _checked(_run(itk, images[:1], images[1:], params, fixed_mask, threads), geometry)


def elastix_register_ct_spect(fixed_ct: np.ndarray, moving_ct: np.ndarray, fixed_spect: np.ndarray,
                              moving_spect: np.ndarray, geometry: Geometry, iterations: int = 1000,
                              resolutions: int = 4, threads: int | None = None, weights=CT_SPECT_WEIGHTS,
                              step_estimation: str = "DisplacementDistribution") -> np.ndarray:
    """One transform from both modalities (a SPECT-aware classical registration): CT Mattes MI plus
    SPECT normalised correlation (:data:`CT_SPECT_METRICS`, ``weights``), affine then B-spline, all four
    images on ``geometry`` (HU and Bq/mL or normalised; NCC is blind to the SPECT's scale). Returns the
    field as :func:`elastix_register_ct`, which the CT and the SPECT both follow."""
    itk = _itk()
    fixed = [_to_itk(itk, a, geometry) for a in (fixed_ct, fixed_spect)]
    moving = [_to_itk(itk, a, geometry) for a in (moving_ct, moving_spect)]
    params = paper_parameter_maps(itk, iterations, resolutions, step_estimation, CT_SPECT_METRICS, weights)
    return _checked(_run(itk, fixed, moving, params, None, threads), geometry)
