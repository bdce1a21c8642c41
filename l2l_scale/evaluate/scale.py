"""Scale-invariant comparison: the affine fit of a restoration to its reference before scoring.

CARE (Weigert et al. 2018) scores a restoration after the least-squares affine map ``alpha * pred + beta`` that
best matches the ground truth (``csbdeep.utils.normalize_minmse``). Label2label compares against a *different*
label, and a simulator's truth has its own units, so the intensity scale of a restoration relative to its
reference is arbitrary: percentile normalisation fixes the 1st and 99.9th percentiles, not the scale in between.
PSNR, NRMSE and (MS-)SSIM punish such a scale difference; PCC does not. ``l2l-scale evaluate`` therefore
reports both: the raw metrics (columns ``psnr``, ``nrmse``, ``ms_ssim_*``) and the same metrics after the fit
(``psnr_fit``, ``nrmse_fit``, ``ms_ssim_*_fit``).
"""

from __future__ import annotations

from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np

__all__ = ["affine_coefficients", "affine_coefficients_many", "affine_fit"]

# csbdeep.utils.normalize_minmse's regulariser of the prediction's variance.
_EPS = 1e-10


def _sums(target: Any, pred: Any) -> tuple:
    t = da.asarray(target).astype(np.float64).ravel()
    p = da.asarray(pred).astype(np.float64).ravel()
    return t.size, (t.sum(), p.sum(), (p * p).sum(), (t * p).sum())


def _coefficients(n: int, st: float, sp: float, spp: float, stp: float) -> tuple[float, float]:
    mt, mp = st / n, sp / n
    # Centred sums from raw moments are exact enough in float64 for normalised images (values of order 1).
    var_p = (spp - n * mp * mp) / max(n - 1, 1)
    cov = (stp - n * mt * mp) / max(n - 1, 1)
    alpha = cov / (var_p + _EPS)
    return float(alpha), float(mt - alpha * mp)


def affine_coefficients_many(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[float, float]]:
    """:func:`affine_coefficients` of every ``(target, pred)`` pair, in one Dask compute."""
    parts = [_sums(t, p) for t, p in pairs]
    values = dask.compute(*[s for _, s in parts])
    return [_coefficients(n, *v) for (n, _), v in zip(parts, values)]


def affine_coefficients(target: Any, pred: Any) -> tuple[float, float]:
    """``(alpha, beta)`` minimising ``mean((alpha * pred + beta - target) ** 2)``, as ``normalize_minmse``.

    ``alpha = cov(pred, target) / (var(pred) + 1e-10)`` with unbiased (co)variances (``np.cov``) and
    ``beta = mean(target) - alpha * mean(pred)``. Dask inputs are reduced in one pass over their chunks, in float64.

    Parameters
    ----------
    target, pred : numpy.ndarray or dask.array.Array
        Arrays of the same shape.
    """
    return affine_coefficients_many([(target, pred)])[0]


def affine_fit(target: Any, pred: Any) -> Any:
    """``pred`` mapped affinely onto ``target`` in the least-squares sense (see :func:`affine_coefficients`).

    Returns the same kind of array as ``pred`` (numpy stays numpy, dask stays lazy), float32.
    """
    alpha, beta = affine_coefficients(target, pred)
    if isinstance(pred, da.Array):
        return (pred.astype(np.float64) * alpha + beta).astype(np.float32)
    return (np.asarray(pred, np.float64) * alpha + beta).astype(np.float32)
