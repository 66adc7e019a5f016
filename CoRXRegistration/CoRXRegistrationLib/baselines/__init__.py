"""Classical registration methods for side-by-side comparison (Elastix through itk-elastix, ANTs SyN
through antspyx; both in the project's ``baseline`` extra), and the rows ``corx evaluate`` reports.

No module here imports torch, itk or ants at load, so the command line can list the rows cheaply."""

#: Rows that register nothing: the simulator's true motion put on the network grid, as every method's
#: field is, then read back on the reference SPECT grid. What no field on that grid can beat.
TRUTH_ROWS = ("truth-ct", "truth-spect")

#: Methods whose one field (from the CTs) moves both the CT and the SPECT.
CT_DRIVEN = ("rigid", "elastix", "elastix-masked", "elastix-dd", "ants-syn", "truth-ct")

#: Suffix of a row that follows a CT-driven method with CoRX's SPECT/CT offset and organ-shift fit.
POST_FIT = "+fit"

#: Every row of ``corx evaluate``, in report order; what each one is.
ROWS = {
    "identity": "no registration",
    "rigid": "CoRX's rigid CT-CT pre-alignment alone (what the network starts from)",
    "elastix": "Elastix, the paper's set-up: affine + B-spline, Mattes MI, 1000 iterations x 4 resolutions",
    "elastix-masked": "the same Elastix with its metric sampled in the axial band the rigid stage uses",
    "elastix-dd": "the paper's Elastix maps with the displacement-distribution step-size estimation",
    "elastix-ct-spect": "Elastix multi-metric: CT Mattes MI (weight 1) + SPECT normalised correlation "
                        "(weight 0.5), one transform, displacement-distribution step sizes",
    "ants-syn": "ANTs SyN (antspyx 'SyN' recipe: affine then SyN, Mattes MI), CT-driven",
    "transmorph": "TransMorph (CT only), trained like the bundled model",
    "corx-nocs": "CoRX without cross-stitch units, trained like the bundled model",
    "corx-no-offset": "the bundled CoRX network's own field (rigid + network), CT-driven",
    "corx": "the bundled CoRX: rigid + network + SPECT/CT offset and organ-shift fit",
    "corx-refine": "CoRX with instance refinement",
    "truth-ct": "not a method: the true CT motion on the network grid, moving the CT and the SPECT alike (the best "
                "any CT-driven field can do; its SPECT error is the SPECT/CT mismatch the CTs cannot show)",
    "truth-spect": "not a method: the true SPECT motion on the network grid (what the grid alone costs)",
}
for _base in CT_DRIVEN:
    ROWS[_base + POST_FIT] = f"{_base} followed by CoRX's SPECT/CT offset and organ-shift fit"

ROW_ORDER = ["identity", "rigid", "rigid+fit", "elastix", "elastix+fit", "elastix-masked", "elastix-masked+fit",
             "elastix-dd", "elastix-dd+fit", "elastix-ct-spect", "ants-syn", "ants-syn+fit", "transmorph",
             "corx-nocs", "corx-no-offset", "corx", "corx-refine", "truth-ct", "truth-ct+fit", "truth-spect"]
assert sorted(ROW_ORDER) == sorted(ROWS)


def registering_rows() -> list:
    """The rows of :data:`ROW_ORDER` that register (all but those built on :data:`TRUTH_ROWS`)."""
    return [m for m in ROW_ORDER if base_method(m) not in TRUTH_ROWS]


def base_method(method: str) -> str:
    """The CT-driven method a post-fit row starts from ("ants-syn+fit" -> "ants-syn"); else ``method``."""
    return method[:-len(POST_FIT)] if method.endswith(POST_FIT) else method
