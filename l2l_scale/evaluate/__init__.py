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
