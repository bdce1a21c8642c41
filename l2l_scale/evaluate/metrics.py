"""Image-quality metrics of restorations against a target label, on patch sets and on whole images.

The metrics of Label2label (Kölln et al., J Cell Sci 2022, Table 1): PSNR, NRMSE and MS-SSIM with M = 1, 3 and 5
scales; SSIM; Michelson and RMS contrast; the Pearson correlation coefficient (PCC) of LaChance & Cohen (FRM);
the tolerance level of VirFluoNet; and FWHMs of line profiles across thin structures. This module is where they
are imported from; they are implemented in

* :mod:`l2l_scale.evaluate.pixel`: PSNR, NRMSE, PCC, the tolerance level, contrast;
* :mod:`l2l_scale.evaluate.ssim`: the SSIM / MS-SSIM engine;
* :mod:`l2l_scale.evaluate.sampling`: foreground patches (CSBDeep's rule);
* :mod:`l2l_scale.evaluate.profiles`: FWHM of line profiles;
* :mod:`l2l_scale.evaluate.blockwise`: the argument rules below and the blockwise reduction of whole images;

and :func:`table1_metrics` here combines them into the paper's Table 1 row.

Two ways to call every metric
-----------------------------
The shape of the arguments decides:

* **Patch set**: ``[N, H, W]`` or ``[N, H, W, C]`` (numpy, or dask which is read into memory). The result is one
  value per patch, shape ``(N,)``; the paper reports the mean over the non-background validation patches (see
  :func:`foreground_patches` and :func:`table1_metrics`). Channels are averaged per patch, as
  ``skimage.metrics.structural_similarity(channel_axis=-1)`` and ``tf.image.ssim_multiscale`` do. PSNR, NRMSE
  and SSIM (with skimage's window for ``filter_sigma``) of a patch set are ``skimage.metrics`` called per patch
  (in float64).
* **Whole image**: one 2-D plane ``[Y, X]`` of any size: numpy, dask, or an ``xarray.DataArray`` with ``y``/``x``
  dims (singleton ``t``/``c``/``z`` are dropped; select one channel first). The result is one float. Dask
  inputs are reduced blockwise and never loaded whole: PSNR, NRMSE, PCC and the tolerance level as exact
  combinations of per-block statistics, SSIM and MS-SSIM over blocks with halos whose maps are bit-identical to
  the in-memory ones (see each module's notes). A multi-channel single image is passed one channel at a time
  (or as a patch set ``image[None]``). Contrast and FWHM are in-memory only (see their docstrings).

Data range convention
---------------------
Metrics compare the arrays as given; they never normalise. The paper percentile-normalises both images before
computing metrics, so the usual call is on normalised float images with ``data_range=1.0``.
``data_range=None`` takes the range from the *target* exactly as ``skimage.metrics.peak_signal_noise_ratio``
does: the maximum of the target's dtype range (65535 for uint16, 1 for floats in [0, 1]) or the full dtype range
(e.g. 2 for floats in [-1, 1]) when the target has negative values; a float target outside [-1, 1] raises
:class:`~l2l_scale.errors.InputError` asking for an explicit ``data_range``. The same range is used by every
metric (PSNR, SSIM's constants, MS-SSIM's ``max_val``, the tolerance level's thresholds), so PSNR/SSIM equal
skimage's and MS-SSIM equals TensorFlow's for the same explicit range. (skimage's ``structural_similarity``
refuses float images without ``data_range``; we apply the PSNR rule instead of refusing.)

A float image compared with an integer one (a float restoration against a raw uint16 target) is almost always a
forgotten normalisation, and its metrics are meaningless, so it raises :class:`~l2l_scale.errors.InputError`
whatever ``data_range`` is; so do two different integer dtypes. Cast both to float explicitly if the
intensities really are on the same scale.

A float ``target`` with ``data_range=None`` costs one extra pass (its min/max). :func:`table1_metrics` computes all
of Table 1's metrics of a whole image in one Dask compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from l2l_scale.evaluate.blockwise import _Plan, _run, _unwrap, resolve_data_range
from l2l_scale.evaluate.pixel import (
    ToleranceLevel,
    _nrmse_plan,
    _psnr_plan,
    contrast,
    nrmse,
    pcc,
    psnr,
    tolerance_level,
)
from l2l_scale.evaluate.profiles import FWHMResult, fwhm
from l2l_scale.evaluate.sampling import PatchSet, foreground_patches
from l2l_scale.evaluate.ssim import (
    L2L_WEIGHTS_3,
    MS_SSIM_PRESETS,
    WANG_WEIGHTS,
    _ms_ssim_plan,
    min_side_ms_ssim,
    ms_ssim,
    ssim,
)

__all__ = [
    "TABLE1_KEYS",
    "FWHMResult",
    "MS_SSIM_PRESETS",
    "PatchSet",
    "ToleranceLevel",
    "WANG_WEIGHTS",
    "L2L_WEIGHTS_3",
    "contrast",
    "foreground_patches",
    "fwhm",
    "min_side_ms_ssim",
    "ms_ssim",
    "nrmse",
    "pcc",
    "psnr",
    "resolve_data_range",
    "ssim",
    "table1_metrics",
    "tolerance_level",
]

#: The keys of :func:`table1_metrics`, in the order of :func:`_table1_plans`.
TABLE1_KEYS = ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1")


def _table1_plans(target: Any, pred: Any, data_range: float) -> list[_Plan]:
    """The plans of :data:`TABLE1_KEYS` for one pair (``data_range`` already resolved), for :func:`_run`."""
    plans = [_psnr_plan(target, pred, data_range), _nrmse_plan(target, pred, "min-max")]
    for m in (5, 3, 1):
        w, f = MS_SSIM_PRESETS[m]
        plans.append(_ms_ssim_plan(target, pred, w, f, 1.5, 0.01, 0.03, data_range, relu=True))
    return plans


def table1_metrics(target: Any, pred: Any, *, data_range: float | None = None) -> dict[str, float]:
    """The paper's Table 1 row: PSNR, NRMSE (min-max) and MS-SSIM with M = 5, 3, 1 (presets).

    Parameters
    ----------
    target, pred : array_like
        A patch set (values are means over the patches, as in the paper) or a whole image (one Dask compute).
    data_range : float, optional
        See :func:`resolve_data_range`; 1.0 for percentile-normalised images.

    Returns
    -------
    dict
        ``{"psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1"}``.

    Notes
    -----
    The paper filters the STED caveolae images with a Gaussian (sigma 1.5) before computing these.
    """
    r = resolve_data_range(_unwrap(target, "target"), data_range)
    values = _run(_table1_plans(target, pred, r))
    return {k: float(np.mean(v)) for k, v in zip(TABLE1_KEYS, values)}
