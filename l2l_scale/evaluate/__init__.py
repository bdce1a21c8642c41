"""Evaluation: image-quality metrics (:mod:`l2l_scale.evaluate.metrics`), cross-validation and reports."""

from l2l_scale.evaluate.metrics import (  # noqa: F401
    FWHMResult,
    PatchSet,
    ToleranceLevel,
    contrast,
    foreground_patches,
    fwhm,
    ms_ssim,
    nrmse,
    pcc,
    psnr,
    ssim,
    table1_metrics,
    tolerance_level,
)
from l2l_scale.evaluate.evaluate import evaluate  # noqa: F401,E402
from l2l_scale.evaluate.images import ImageSpec  # noqa: F401,E402
from l2l_scale.evaluate.maps import rms_map, ssim_map  # noqa: F401,E402
from l2l_scale.evaluate.report import load_crossval, load_results, report  # noqa: F401,E402
