"""Inference engine: register one (fixed, moving) SPECT/CT pair with a CoRX model.

``register(fixed, moving, model, device="auto", refine_iterations=0, progress=callback)``
first fits the moving CT rigidly to the fixed CT where the model was trained that way
(``PreprocessConfig.prealign``), then runs the network on the pre-aligned pair. For a model that
reads the SPECT (CoRX), it then fits the SPECT/CT offset (:mod:`network.spect_offset`): one
translation of the moving SPECT against the field its CT gives, since within a session SPECT and CT
are not exactly registered, plus one cranio-caudal shift of the uptake organs (breathing the
CT-driven field missed). It returns the total displacement field in LPS mm (resampling
convention: fixed point p maps to the moving point p + u(p)) on the network grid and on the native
fixed SPECT grid (it includes the offset and organ shift; the CT follows the network-grid field
without them), the moving CT and SPECT warped onto the native fixed grids, a Jacobian-determinant map and the paper's metrics
before and after registration. The SPECT warp samples concentration (Bq/mL); it does not
modulate by the Jacobian, so activity in a VOI is preserved up to interpolation where the
deformation is locally volume-preserving.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import BUNDLED_MODEL
from .geometry import Geometry, displacement_lps_to_voxels, displacement_voxels_to_lps
from .network.checkpoint import load_checkpoint
from .network.losses import LossWeights, registration_loss
from .network.metrics import jacobian_determinant, metric_reference, registration_metrics_against
from .network.networks import RegistrationNetwork
from .network.optimisers import Adam
from .network.rigid import prealign_moving
from .network.spect_offset import SpectOffsetConfig, fit_spect_offset, spect_offset_reference
from .network.transform import compose, integrate_velocity, warp
from .outputs import OutputSet, registration_outputs
from .progress import Cancelled, check_cancel
from .preprocess import (PreprocessConfig, SpectCt, field_on_native_grid, metric_images, network_grid,
                         normalise_ct, normalise_spect, onto_grid, spect_onto_grid)
from .resample import warp_with_field
from .validate import check_session


#: Where the moving CT can be warped to (``register(ct_grid=...)``).
CT_GRIDS = ("ct", "spect")
#: The stored SPECT field's resolution (mm): 1/16 mm, at most 0.031 mm from the computed field per
#: component (under 1 % of a 4.4 mm SPECT voxel); float32 noise below it does not compress.
FIELD_STEP_MM = 2.0 ** -4
#: The stored Jacobian's resolution: 1/128, about what central differences of a field stored to 1/16 mm on
#: 4.4 mm voxels resolve (1/16 / (2 x 4.4) = 1/141).
JACOBIAN_STEP = 2.0 ** -7


def quantised(values: np.ndarray, step: float, keep_sign: bool = False) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``step`` (a power of two: exact in float32), as float32;
    with ``keep_sign`` a positive value never becomes <= 0 (it becomes ``step``), so folding counted on a
    stored Jacobian is the folding computed."""
    v = np.asarray(values, np.float32)
    out = (np.rint(v / np.float32(step)) * np.float32(step)).astype(np.float32)
    if keep_sign:
        out[(v > 0) & (out <= 0)] = np.float32(step)
    return out


class DeviceError(RuntimeError):
    """The requested compute device does not exist on this machine."""


#: The user cancelled a registration: the one cancellation error of the library (also raised by the
#: rigid, SPECT-fit and resampling steps), under the engine's historical name.
RegistrationCancelled = Cancelled


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error on any torch the PyTorch extension may give: the
    ``torch.OutOfMemoryError`` class exists only in recent releases (``torch.cuda.OutOfMemoryError``
    in older ones), and older or non-CUDA back-ends raise a plain RuntimeError saying so."""
    classes = tuple(c for c in (getattr(torch, "OutOfMemoryError", None),
                                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if c is not None)
    return (bool(classes) and isinstance(exc, classes)) or (isinstance(exc, RuntimeError)
                                                          and "out of memory" in str(exc).lower())


@dataclass
class RegistrationModel:
    """A network with the preprocessing it was trained with."""
    network: RegistrationNetwork
    preprocess: PreprocessConfig
    source: str = "in memory"
    meta: dict = field(default_factory=dict)

    @property
    def reads_spect(self) -> bool:
        """CoRX reads SPECT and CT; a TransMorph is CT-only (and so fits no SPECT/CT offset)."""
        return self.network.config.architecture == "corx"


def load_model(spec=None, device="cpu") -> RegistrationModel:
    """``spec``: None or "bundled" (the shipped model), a checkpoint path, or a RegistrationModel."""
    if isinstance(spec, RegistrationModel):
        return spec
    path = BUNDLED_MODEL if spec in (None, "bundled") else Path(spec)
    network, payload = load_checkpoint(path, device)
    return RegistrationModel(network, PreprocessConfig.from_dict(payload["preprocess"]), str(path),
                             payload.get("meta", {}))


def threads_in_use() -> str:
    """The threads torch and SimpleITK (resampling, warping) use: every core they see by default."""
    import SimpleITK as sitk
    return (f"torch {torch.get_num_threads()} threads, SimpleITK "
            f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads")


def select_device(requested: str = "auto") -> tuple:
    """(torch.device, message). "auto": CUDA, else Apple MPS, else CPU. An explicit GPU that is not
    there raises DeviceError naming what is missing."""
    requested = (requested or "auto").lower()
    has_cuda = torch.cuda.is_available()
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if has_cuda:
            return torch.device("cuda"), f"using GPU {torch.cuda.get_device_name(0)}"
        if has_mps:
            return torch.device("mps"), "using Apple GPU (MPS)"
        return torch.device("cpu"), f"no GPU found; using CPU ({threads_in_use()})"
    if requested in ("gpu", "cuda") or requested.startswith("cuda:"):
        if not has_cuda:
            raise DeviceError(f"device '{requested}' requested but no CUDA GPU is available "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                              "use device 'auto' or 'cpu'")
        return torch.device("cuda" if requested == "gpu" else requested), f"using GPU {requested}"
    if requested == "mps":
        if not has_mps:
            raise DeviceError("device 'mps' requested but Apple MPS is not available; use 'auto' or 'cpu'")
        return torch.device("mps"), "using Apple GPU (MPS)"
    if requested == "cpu":
        return torch.device("cpu"), f"using CPU ({threads_in_use()})"
    raise DeviceError(f"unknown device '{requested}'; choose auto, cpu, cuda (gpu) or mps")


@dataclass
class RegistrationResult:
    """All outputs of one pair. Fields are (Z, Y, X, 3) LPS mm, resampling convention.
    ``field_network`` is CT-driven (rigid + network + refinement); the SPECT follows it plus the network's
    own SPECT correction (``spect_correction_mm``, models with a SPECT head) plus ``spect_offset_mm`` plus
    the organ shift ``spect_organ_weight * spect_organ_shift_mm`` along LPS +z
    (``field_network_spect``; :mod:`network.spect_offset`)."""
    grid: Geometry                        # network grid
    field_network: np.ndarray             # on ``grid``, what the CT follows
    fixed_spect_geometry: Geometry
    fixed_ct_geometry: Geometry
    spect_correction_mm: np.ndarray | None = None   # (Z, Y, X, 3) LPS mm on ``grid``: the network's SPECT head
    spect_offset_mm: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))   # LPS (x, y, z)
    spect_organ_shift_mm: float = 0.0      # cranio-caudal, + = superior (LPS +z), where the weight is 1
    spect_organ_weight: np.ndarray | None = None   # (Z, Y, X) in [0, 1] on ``grid``
    field_spect: np.ndarray | None = None  # on the fixed SPECT grid, with the SPECT/CT offset
    warped_spect: np.ndarray | None = None  # Bq/mL on the fixed SPECT grid
    warped_ct: np.ndarray | None = None     # HU on ``warped_ct_geometry``
    warped_ct_geometry: Geometry | None = None   # the fixed CT grid (ct_grid="ct") or the fixed SPECT grid ("spect")
    jacobian_spect: np.ndarray | None = None  # det(I + grad u) on the fixed SPECT grid
    metrics: dict = field(default_factory=dict)   # {"identity": {...}, "registered": {...}}
    timings_s: dict = field(default_factory=dict)
    device: str = "cpu"
    notes: list = field(default_factory=list)

    @property
    def jacobian_nonpositive_percent_spect(self) -> float | None:
        """Percentage of fixed SPECT voxels where det(I + grad u) <= 0 (folding); None without native outputs."""
        return None if self.jacobian_spect is None else float(100.0 * np.mean(self.jacobian_spect <= 0))

    @property
    def field_network_spect(self) -> np.ndarray:
        """What the SPECT follows on the network grid: the CT-driven field plus the network's SPECT
        correction plus the SPECT/CT offset plus the organ shift."""
        return spect_field(self.field_network, self.spect_offset_mm, self.spect_organ_shift_mm, self.spect_organ_weight,
                           self.spect_correction_mm)


def spect_field(field_network: np.ndarray, offset_mm, organ_shift_mm: float = 0.0,
                organ_weight: np.ndarray | None = None, correction_mm: np.ndarray | None = None) -> np.ndarray:
    """The field the SPECT follows (LPS mm): the CT-driven ``field_network`` plus the network's SPECT
    correction ``correction_mm`` (same grid) plus the SPECT/CT offset ``offset_mm`` (LPS x, y, z) plus
    ``organ_weight * organ_shift_mm`` along LPS +z; a new array."""
    out = np.asarray(field_network, np.float32) + np.asarray(offset_mm, np.float32)
    if correction_mm is not None:
        out += np.asarray(correction_mm, np.float32)
    if organ_weight is not None and organ_shift_mm != 0.0:
        out[..., 2] += np.float32(organ_shift_mm) * organ_weight
    return out


def _cranio_caudal_voxels(grid: Geometry) -> np.ndarray:
    """+1 mm along LPS z as a displacement in voxels of ``grid``, channels (z, y, x)."""
    return displacement_lps_to_voxels(np.array([[[[0.0, 0.0, 1.0]]]], np.float32), grid).reshape(3)


def _fit_in_mm(fit, grid: Geometry) -> tuple:
    """(offset LPS mm, organ shift mm, organ weight (Z, Y, X) or None) of a SpectOffsetFit on ``grid``."""
    offset_mm = displacement_voxels_to_lps(np.asarray(fit.offset_voxels, np.float32).reshape(3, 1, 1, 1),
                                           grid).reshape(3)
    weight = None if fit.organ_weight is None else fit.organ_weight[0, 0].detach().float().cpu().numpy()
    return offset_mm, float(fit.organ_shift_mm), weight


def fit_spect_to_field(fixed: SpectCt, moving: SpectCt, field_network: np.ndarray, grid: Geometry,
                       cfg: PreprocessConfig, config: SpectOffsetConfig | None = None) -> tuple:
    """CoRX's SPECT/CT offset and organ-shift fit (:mod:`network.spect_offset`) after any CT-driven
    field ``field_network`` (LPS mm on the network ``grid``, resampling convention), the SPECTs
    normalised as ``cfg`` says; returns (the field the SPECT follows on ``grid``, the fit, its note).
    This is the step :func:`register` runs after the network, applicable to a classical field too."""
    fsp, msp = (_tensor(normalise_spect(spect_onto_grid(s, grid), cfg), "cpu") for s in (fixed, moving))
    disp = torch.from_numpy(displacement_lps_to_voxels(np.asarray(field_network, np.float32), grid))[None]
    fit = fit_spect_offset(fsp, msp, disp, float(grid.spacing[0]), config or SpectOffsetConfig(),
                           _cranio_caudal_voxels(grid))
    offset_mm, organ_mm, weight = _fit_in_mm(fit, grid)
    return spect_field(field_network, offset_mm, organ_mm, weight), fit, spect_offset_note(fit, offset_mm)


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(device)


def predict_displacement(network: RegistrationNetwork, fixed_ct, moving_ct, fixed_spect, moving_spect,
                         with_spect: bool = False):
    """Network forward without gradients; returns (B, 3, Z, Y, X) voxels (with ``with_spect``: the CT and
    the SPECT field, :meth:`RegistrationNetwork.forward`)."""
    network.eval()
    with torch.no_grad():
        return network(fixed_ct, moving_ct, fixed_spect, moving_spect, with_spect=with_spect)


def refine_displacement(displacement, fixed_ct, moving_ct, fixed_spect, moving_spect, iterations: int,
                        weights: LossWeights = LossWeights(), lr: float = 0.05, diffeomorphic: bool = False,
                        progress=None, cancel=None) -> torch.Tensor:
    """Instance optimisation: correct a predicted field on this pair with the training loss.

    The correction w acts in fixed space before the prediction (T = T_pred o T_w); with
    ``diffeomorphic`` w = exp(v) by scaling and squaring, so the result stays a diffeomorphism
    wherever the prediction is one. Adam, ``lr`` voxels per step."""
    predicted = displacement.detach()
    v = torch.zeros_like(predicted, requires_grad=True)
    opt = Adam([v], lr=lr)
    for it in range(iterations):
        check_cancel(cancel, "during refinement")
        with torch.enable_grad():
            w = integrate_velocity(v, 5) if diffeomorphic else v
            total = compose(w, predicted)
            loss, _ = registration_loss(fixed_ct, warp(moving_ct, total), fixed_spect, warp(moving_spect, total),
                                        total, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            progress((it + 1) / iterations, f"refine {it + 1}/{iterations}")
    with torch.no_grad():
        w = integrate_velocity(v, 5) if diffeomorphic else v
        return compose(w, predicted)


def spect_offset_note(fit, mm: np.ndarray) -> str:
    """One line for the user: the SPECT/CT offset ``mm`` (LPS) and organ shift of ``fit``, or why none
    was applied."""
    if not fit.applied:
        return f"SPECT/CT offset not applied: {fit.reason}"
    organ = (f"; uptake organs shifted {fit.organ_shift_mm:+.2f} mm cranio-caudally (LPS z)"
             if fit.organ_weight is not None else "")
    return (f"SPECT/CT offset (moving SPECT against its CT-driven field) ({mm[0]:+.2f}, {mm[1]:+.2f}, "
            f"{mm[2]:+.2f}) mm LPS, {np.linalg.norm(mm):.2f} mm{organ}; SPECT LNCC over the uptake box "
            f"{fit.lncc_before:.4f} -> {fit.lncc_after:.4f}" + (f"; {fit.organ_note}" if fit.organ_note else ""))


@dataclass
class FixedReference:
    """The fixed session prepared once for every moving session registered to it (a series' reference
    time point; :func:`prepare_fixed`): its network grid, its CT (HU) and SPECT (Bq/mL) on that grid and
    normalised for the model, its validation notes, and the fixed images' part of the QA metrics and of the
    SPECT/CT fit, made at their first use. :func:`register` takes it in place of the fixed session; the
    results are those of the session itself."""
    session: SpectCt
    preprocess: PreprocessConfig
    grid: Geometry
    raw: tuple | None             # (CT HU, SPECT Bq/mL) on ``grid``; dropped once metric_reference is made
    inputs: tuple                 # (CT, SPECT) normalised as the model's inputs
    notes: list                   # the validation layer's warnings for the fixed session
    metric_reference: tuple | None = None                  # :func:`network.metrics.metric_reference`
    offset_references: dict = field(default_factory=dict)  # (device, SpectOffsetConfig) -> the fit's part


def prepare_fixed(fixed: SpectCt, model=None, allow=()) -> FixedReference:
    """Validate the fixed session and put it on ``model``'s network grid once (``allow``: as for
    :func:`register`), for registering many moving sessions to it."""
    fixed.validate()
    notes = []
    check_session(fixed, allow, notes)
    cfg = load_model(model, "cpu").preprocess
    grid = network_grid(fixed, cfg)
    ct, sp = onto_grid(fixed, grid, cfg)
    return FixedReference(fixed, cfg, grid, (ct, sp), (normalise_ct(ct, cfg), normalise_spect(sp, cfg)), notes)


def register(fixed: SpectCt, moving: SpectCt, model=None, device: str = "auto", refine_iterations: int = 0,
             progress=None, cancel=None, native_outputs: bool = True, qa_metrics: bool = True,
             spect_offset: bool | None = None, spect_offset_config: SpectOffsetConfig | None = None,
             allow=(), ct_grid: str = "ct") -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (see module docstring). ``progress(fraction, text)`` and
    ``cancel() -> bool`` are optional callbacks; cancelling raises RegistrationCancelled (= progress.Cancelled),
    also from inside the long steps.
    ``qa_metrics=False`` skips the paper's metrics before/after (about 2.7 s of SSIM on 2 CPU cores).
    ``spect_offset``: fit the SPECT/CT offset; None = when the model reads the SPECT (CoRX, not TransMorph);
    ``spect_offset_config``: the fit's settings (None: the defaults; ``SpectOffsetConfig(organ_shift=False)``:
    translation only). ``fixed``: a session, or a :class:`FixedReference` of one (:func:`prepare_fixed`,
    the same model) when many moving sessions are registered to it: the same results, the fixed side's
    work done once. Both sessions pass the validation layer first (:func:`validate.check_session`;
    ``allow``: checks turned into warnings, kept in ``notes``; with a FixedReference it applies to the moving
    session, the fixed one having been checked by :func:`prepare_fixed`). ``ct_grid``: the fixed grid the moving CT is
    warped onto, "ct" (its own, full resolution) or "spect" (the dosimetry grid: a QA image about 3x faster
    to make and 8x smaller to store). The SPECT field is stored at FIELD_STEP_MM; the SPECT warp and the
    Jacobian use that stored field, so the files and the maps agree exactly."""
    if ct_grid not in CT_GRIDS:
        raise ValueError(f"ct_grid must be one of {CT_GRIDS}, got {ct_grid!r}")
    report = progress or (lambda f, t="": None)
    spect_offset_config = spect_offset_config or SpectOffsetConfig()
    timings, notes = {}, []

    t0 = time.perf_counter()
    model = load_model(model, "cpu")
    reference = fixed if isinstance(fixed, FixedReference) else prepare_fixed(fixed, model, allow)
    if reference.preprocess != model.preprocess:
        raise ValueError("the fixed reference was prepared for a model with other preprocessing than this one")
    fixed, cfg, grid = reference.session, reference.preprocess, reference.grid
    notes.extend(reference.notes)
    moving.validate()
    check_session(moving, allow, notes)
    identical = fixed.same_scans(moving)
    torch_device, message = select_device(device)
    notes.append(message)
    if spect_offset is None:
        spect_offset = model.reads_spect
    elif spect_offset and not model.reads_spect:
        raise ValueError(f"the SPECT/CT offset needs a model that reads the SPECT; '{model.network.config.name}' "
                         f"is CT-only")
    report(0.02, "preprocessing")
    cranio_caudal = _cranio_caudal_voxels(grid)
    raw_moving = onto_grid(moving, grid, cfg)
    inputs = [reference.inputs, (normalise_ct(raw_moving[0], cfg), normalise_spect(raw_moving[1], cfg))]
    timings["preprocess"] = time.perf_counter() - t0
    check_cancel(cancel, "after preprocessing")

    def run_on(dev):
        net = model.network.to(dev)
        (fct, fsp), (mct, msp) = [(_tensor(c, dev), _tensor(s, dev)) for c, s in inputs]
        t = time.perf_counter()
        report(0.15, f"{cfg.prealign} pre-alignment")
        initial, mct_pre, msp_pre = prealign_moving(cfg.prealign, fct, mct, msp, cfg.body_level, cancel=cancel)
        timings["prealign"] = time.perf_counter() - t
        check_cancel(cancel, "after pre-alignment")
        t = time.perf_counter()
        report(0.3, f"network on {dev.type}")
        own, own_spect = predict_displacement(net, fct, mct_pre, fsp, msp_pre, with_spect=True)
        disp = compose(own, initial)
        # the network's SPECT correction where it has a SPECT head, as the difference of the composed fields
        correction = None if own_spect is own else compose(own_spect, initial) - disp
        del own, own_spect
        timings["network"] = time.perf_counter() - t
        check_cancel(cancel, "after the network")
        if refine_iterations > 0:
            t = time.perf_counter()
            sub = (lambda f, txt="": report(0.5 + 0.3 * f, txt))
            disp = refine_displacement(disp, fct, mct, fsp, msp, refine_iterations,
                                       diffeomorphic=model.network.config.diffeomorphic, progress=sub, cancel=cancel)
            timings["refine"] = time.perf_counter() - t
        if not spect_offset:
            return disp, correction, None
        check_cancel(cancel, "before the SPECT/CT offset")
        t = time.perf_counter()
        report(0.8, "SPECT/CT offset")
        spacing = float(grid.spacing[0])
        key = (str(dev), spect_offset_config)
        if key not in reference.offset_references:
            reference.offset_references[key] = spect_offset_reference(fsp, spect_offset_config, spacing)
        fit = fit_spect_offset(fsp, msp, disp if correction is None else disp + correction, spacing,
                               spect_offset_config, cranio_caudal, cancel=cancel,
                               reference=reference.offset_references[key])
        timings["spect_offset"] = time.perf_counter() - t
        return disp, correction, fit

    try:
        displacement, correction, offset_fit = run_on(torch_device)
    except RuntimeError as exc:
        if torch_device.type == "cpu" or not is_out_of_memory(exc):
            raise
        notes.append(f"out of memory on {torch_device}; fell back to CPU")
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
        torch_device = torch.device("cpu")
        displacement, correction, offset_fit = run_on(torch_device)
    model.network.to("cpu")
    inputs.clear()                               # the normalised network inputs: not needed any more

    t = time.perf_counter()
    disp_cpu = displacement.detach().float().cpu()
    offset_mm, organ_mm, organ_weight = np.zeros(3, np.float32), 0.0, None
    if offset_fit is not None:
        offset_mm, organ_mm, organ_weight = _fit_in_mm(offset_fit, grid)
        notes.append(spect_offset_note(offset_fit, offset_mm))
    field_network = displacement_voxels_to_lps(disp_cpu[0].numpy(), grid)
    if identical:
        mean_mm = float(np.linalg.norm(field_network, axis=-1).mean())
        notes.append(f"warning: the fixed and moving scans are identical; the mean displacement {mean_mm:.2f} mm "
                     "is the method's noise floor, not motion")
    if correction is not None:
        correction = displacement_voxels_to_lps(correction.detach().float().cpu()[0].numpy(), grid)
        size = np.linalg.norm(correction, axis=-1)
        notes.append(f"network SPECT correction (its SPECT head, added to the field the SPECT follows): mean "
                     f"{float(size.mean()):.2f} mm, largest {float(size.max()):.2f} mm")
    result = RegistrationResult(grid, field_network, fixed.spect_geometry, fixed.ct_geometry, correction,
                                spect_offset_mm=offset_mm, spect_organ_shift_mm=organ_mm,
                                spect_organ_weight=organ_weight, timings_s=timings,
                                device=str(torch_device), notes=notes)
    if qa_metrics:
        disp_spect = torch.from_numpy(displacement_lps_to_voxels(result.field_network_spect, grid))[None]
        mct, msp = (_tensor(a, "cpu") for a in metric_images(*raw_moving))
        del raw_moving
        check_cancel(cancel, "before the QA metrics")
        report(0.82, "QA metrics")
        if reference.metric_reference is None:
            reference.metric_reference = metric_reference(*(_tensor(a, "cpu") for a in metric_images(*reference.raw)))
            reference.raw = None                 # what it was kept for is made
        identity, registered = registration_metrics_against(reference.metric_reference,
                                                            [(mct, msp, None),
                                                             (warp(mct, disp_cpu), warp(msp, disp_spect), disp_cpu)])
        result.metrics = {"identity": identity, "registered": registered}
        del disp_spect, mct, msp                 # 0.06 GB the native outputs need room for
        timings["metrics"] = time.perf_counter() - t
    del displacement, disp_cpu                   # kept in the result as field_network
    raw_moving = None
    if native_outputs:
        check_cancel(cancel, "before native-resolution outputs")
        report(0.85, "native-resolution outputs")
        t = time.perf_counter()
        result.field_spect = quantised(field_on_native_grid(result.field_network_spect, grid, fixed.spect_geometry,
                                                            cancel), FIELD_STEP_MM)
        result.warped_spect = warp_with_field(np.clip(moving.spect, 0, None), moving.spect_geometry,
                                              fixed.spect_geometry, result.field_spect)
        check_cancel(cancel, "before warping the CT")
        # the CT grid is the largest: its field is interpolated from the network grid inside the warp,
        # never built at CT resolution
        result.warped_ct_geometry = fixed.ct_geometry if ct_grid == "ct" else fixed.spect_geometry
        result.warped_ct = warp_with_field(moving.ct, moving.ct_geometry, result.warped_ct_geometry, field_network,
                                           grid, fill=-1000.0)
        check_cancel(cancel, "before the Jacobian")
        vox = torch.from_numpy(displacement_lps_to_voxels(result.field_spect, fixed.spect_geometry))
        result.jacobian_spect = jacobian_determinant(vox)[0].numpy()
        timings["native"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report(1.0, "done")
    return result


def write_registration(result: RegistrationResult, out_dir, protected=(), overwrite: bool = False,
                       network_field: bool = False) -> dict:
    """Write a RegistrationResult: the Slicer-loadable displacement field (NRRD, resampling, LPS mm) on
    the fixed SPECT grid, warped CT/SPECT, Jacobian, RGB deformation, metrics; the CT-driven field on
    the network grid only with ``network_field``. ``out_dir``: a folder (checked here: never an input in
    ``protected``, an existing result only with ``overwrite``, which replaces the whole earlier set) or
    an :class:`OutputSet` from :func:`registration_outputs` already prepared. Files are written atomically."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from .imageio import write_displacement_field, write_image
    from .network.metrics import deformation_rgb
    from .outputs import write_text

    plan = out_dir if isinstance(out_dir, OutputSet) else registration_outputs(out_dir, protected).prepare(overwrite)
    files = {Path(n).name.split(".")[0]: plan.path(n) for n in plan.names}
    writes = []                                  # largest first; two at a time (compression runs unlocked)
    if result.field_spect is not None:
        spect_grid = result.fixed_spect_geometry
        writes += [lambda: write_displacement_field(files["field_spect"], result.field_spect, spect_grid),
                   lambda: write_image(files["deformation_rgb"], deformation_rgb(result.field_spect).numpy(),
                                       spect_grid, is_vector=True),
                   lambda: write_image(files["warped_spect"], result.warped_spect, spect_grid),
                   lambda: write_image(files["warped_ct"],
                                       np.clip(np.rint(result.warped_ct), -32768, 32767).astype(np.int16),
                                       result.warped_ct_geometry or result.fixed_ct_geometry),
                   lambda: write_image(files["jacobian"], quantised(result.jacobian_spect, JACOBIAN_STEP,
                                                                    keep_sign=True), spect_grid)]
    if network_field or result.field_spect is None:
        writes.insert(0, lambda: write_displacement_field(files["field_network"], result.field_network, result.grid))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(w) for w in writes]:
            done.result()                        # the first failure is raised, as writing in turn would
    summary = {"metrics": result.metrics, "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
               "device": result.device, "notes": result.notes, "network_grid": result.grid.to_dict(),
               "spect_offset_mm_lps": [round(float(v), 3) for v in result.spect_offset_mm],
               "spect_organ_shift_mm_superior": round(float(result.spect_organ_shift_mm), 3),
               "jacobian_nonpositive_percent_spect_grid": result.jacobian_nonpositive_percent_spect,
               "units": {"fields": "mm, LPS, resampling (fixed point -> moving point)", "warped_spect": "Bq/mL",
                         "warped_ct": "HU"},
               "grids": {"field_spect, warped_spect, jacobian, deformation_rgb": "fixed SPECT",
                         "warped_ct": "fixed CT" if result.warped_ct_geometry is None
                         or result.warped_ct_geometry == result.fixed_ct_geometry else "fixed SPECT"},
               "stored_resolution": {"field_spect_mm": FIELD_STEP_MM, "jacobian": JACOBIAN_STEP},
               "fields": {"field_spect": "what the SPECT follows: CT-driven field + the network's SPECT correction "
                                         "(models with a SPECT head) + SPECT/CT offset + organ shift (uptake "
                                         "weight x shift, along LPS z)",
                          "field_network": "CT-driven field on the network grid (without the SPECT/CT offset); "
                                           "written only on request (--network-field)"}}
    write_text(files["metrics"], json.dumps(summary, indent=2))
    return {k: str(v) for k, v in files.items() if v.exists()}
