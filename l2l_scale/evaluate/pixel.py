"""Pixel metrics: PSNR, NRMSE, the Pearson correlation coefficient, VirFluoNet's tolerance level and contrast.

How to call them (a patch set or one whole image) and the data range are described in
:mod:`l2l_scale.evaluate.metrics`.

NRMSE normalisation
-------------------
The paper does not name the normalisation, but its numbers fix it. For Table 1's input rows
``NRMSE ~= 10 ** (-PSNR / 20)`` (16.67 dB -> 0.147 vs 0.150; 17.20 -> 0.138 vs 0.140; 14.91 -> 0.180 vs 0.181;
18.73 -> 0.116 vs 0.118), i.e. the RMSE divided by a value just below the PSNR's data range of 1: the target
patch's intensity range. This is skimage's ``normalization='min-max'``, our default. ``'euclidean'`` (skimage's
default, ``||t - p|| / ||t||``) would give several times larger values on sparse fluorescence patches. Patch sets
use each patch's own min-max range, as skimage called per patch does; a whole image uses the image's range.

Patch sets and whole images
---------------------------
* Patch sets are small in-memory arrays: PSNR and NRMSE are ``skimage.metrics`` called on every patch (in
  float64). skimage has no PCC with FRM's mask and no tolerance level; those are vectorised over the patches.
* Whole images are global sums: every block yields partial sums (and min/max), which are combined exactly; the
  PCC combines per-block centred moments (Chan et al.'s parallel formula) so that there is no catastrophic
  cancellation on large images. The tolerance level sorts each block's absolute errors and counts/sums them
  below every threshold.
* Contrast is in-memory only (see its docstring).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.evaluate.blockwise import (
    _blockwise,
    _f64,
    _Plan,
    _patch_axes,
    _prepare,
    _run,
    _scalar_or_array,
    _unwrap,
    resolve_data_range,
)

__all__ = ["ToleranceLevel", "contrast", "nrmse", "pcc", "psnr", "tolerance_level"]

_NRMSE_NORMS = ("min-max", "euclidean", "mean")


# ---------------------------------------------------------------------------------------------- PSNR, NRMSE


def _err_stats(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """[n, sum (p - t)^2, min t, max t, sum t, sum t^2] of one block."""
    t, p = _f64(t), _f64(p)
    d = p - t
    return np.array([float(t.size), np.sum(d * d), np.min(t), np.max(t), np.sum(t), np.sum(t * t)])


def _combine_err(s: np.ndarray) -> np.ndarray:
    return np.array([s[:, 0].sum(), s[:, 1].sum(), s[:, 2].min(), s[:, 3].max(), s[:, 4].sum(), s[:, 5].sum()])


def _psnr_from(s: np.ndarray, data_range: float) -> np.ndarray:
    mse = s[..., 1] / s[..., 0]
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def _nrmse_from(s: np.ndarray, normalization: str) -> np.ndarray:
    rmse = np.sqrt(s[..., 1] / s[..., 0])
    if normalization == "min-max":
        denom = s[..., 3] - s[..., 2]
    elif normalization == "euclidean":
        denom = np.sqrt(s[..., 5] / s[..., 0])
    else:
        denom = s[..., 4] / s[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return rmse / denom


def _per_patch(func: Callable, t: np.ndarray, p: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``func`` (a ``skimage.metrics`` function) of every patch pair, in float64 like the whole-image sums."""
    with np.errstate(divide="ignore", invalid="ignore"):  # identical or constant patches give inf / nan
        return np.array([func(ti, pi, **kwargs) for ti, pi in zip(_f64(t), _f64(p))], dtype=np.float64)


def psnr(target: Any, pred: Any, *, data_range: float | None = None) -> float | np.ndarray:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB.

    Equals ``skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=...)`` (computed in float64).

    Parameters
    ----------
    target, pred : array_like
        A whole image (2-D numpy/dask/xarray) or a patch set ([N, H, W] or [N, H, W, C]); see
        :mod:`l2l_scale.evaluate.metrics`.
    data_range : float, optional
        See :func:`resolve_data_range`.

    Returns
    -------
    float or numpy.ndarray
        One value for an image, shape ``(N,)`` for a patch set; ``inf`` for identical images.
    """
    return _run([_psnr_plan(target, pred, data_range)])[0]


def _psnr_plan(target: Any, pred: Any, data_range: float | None) -> _Plan:
    kind, t, p = _prepare(target, pred)
    r = resolve_data_range(t, data_range)
    if kind == "patches":
        from skimage.metrics import peak_signal_noise_ratio

        values = _per_patch(peak_signal_noise_ratio, t, p, data_range=r)
        return _Plan([], lambda _: values)
    return _Plan([_blockwise(_err_stats, (t, p), 6)], lambda parts: float(_psnr_from(_combine_err(parts[0]), r)))


def nrmse(target: Any, pred: Any, *, normalization: str = "min-max") -> float | np.ndarray:
    """Normalised root-mean-square error ``RMSE / denominator``.

    Equals ``skimage.metrics.normalized_root_mse(target, pred, normalization=...)``.

    Parameters
    ----------
    target, pred : array_like
        A whole image or a patch set (see :mod:`l2l_scale.evaluate.metrics`).
    normalization : {'min-max', 'euclidean', 'mean'}
        Denominator: the target's intensity range (default; the one that reproduces the paper's Table 1, see the
        module notes), its root-mean-square, or its mean. For patch sets each patch uses its own target.

    Returns
    -------
    float or numpy.ndarray
        One value for an image, shape ``(N,)`` for a patch set (``inf``/``nan`` for a constant target patch with
        ``'min-max'``).
    """
    return _run([_nrmse_plan(target, pred, normalization)])[0]


def _nrmse_plan(target: Any, pred: Any, normalization: str) -> _Plan:
    norm = str(normalization).lower()
    if norm not in _NRMSE_NORMS:
        raise ConfigError(f"normalization={normalization!r} is not one of {_NRMSE_NORMS}; use 'min-max' (the paper)")
    kind, t, p = _prepare(target, pred)
    if kind == "patches":
        from skimage.metrics import normalized_root_mse

        values = _per_patch(normalized_root_mse, t, p, normalization=norm)
        return _Plan([], lambda _: values)
    return _Plan([_blockwise(_err_stats, (t, p), 6)], lambda parts: float(_nrmse_from(_combine_err(parts[0]), norm)))


# ------------------------------------------------------------------------------------------------------ PCC


def _moment_stats(t: np.ndarray, p: np.ndarray, threshold: float | None = None,
                  axes: tuple | None = None) -> np.ndarray:
    """[n, mean t, mean p, S_tt, S_pp, S_tp] (centred sums) of the pixels selected by ``t > threshold``."""
    t, p = _f64(t), _f64(p)
    w = np.ones_like(t) if threshold is None else (t > threshold).astype(np.float64)
    n = np.sum(w, axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mt = np.sum(w * t, axis=axes) / n
        mp = np.sum(w * p, axis=axes) / n
    mt, mp = np.where(n > 0, mt, 0.0), np.where(n > 0, mp, 0.0)
    shape = n.shape + (1,) * (t.ndim - np.ndim(n)) if axes else ()
    dt = (t - np.reshape(mt, shape)) * w
    dp = (p - np.reshape(mp, shape)) * w
    return np.stack([n, mt, mp, np.sum(dt * dt, axis=axes), np.sum(dp * dp, axis=axes),
                     np.sum(dt * dp, axis=axes)], axis=-1)


def _combine_moments(s: np.ndarray) -> np.ndarray:
    """Exact merge of per-block centred moments (law of total covariance / Chan et al. 1979)."""
    n = s[:, 0]
    big_n = n.sum()
    if big_n == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    mt = np.sum(n * s[:, 1]) / big_n
    mp = np.sum(n * s[:, 2]) / big_n
    et, ep = s[:, 1] - mt, s[:, 2] - mp
    return np.array([big_n, mt, mp, np.sum(s[:, 3] + n * et * et), np.sum(s[:, 4] + n * ep * ep),
                     np.sum(s[:, 5] + n * et * ep)])


def _pcc_from(s: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return s[..., 5] / np.sqrt(s[..., 3] * s[..., 4])


def pcc(target: Any, pred: Any, *, mask_threshold: float | None = None) -> float | np.ndarray:
    """Pearson correlation coefficient of the pixel intensities (LaChance & Cohen, FRM, Methods).

    Parameters
    ----------
    target, pred : array_like
        A whole image or a patch set (see :mod:`l2l_scale.evaluate.metrics`). Channels of a patch are pooled.
    mask_threshold : float, optional
        FRM's "segmentation PCC": only pixels whose *target* intensity exceeds this value count.

    Returns
    -------
    float or numpy.ndarray
        In [-1, 1]; ``nan`` when either side is constant (or no pixel passes the mask).
    """
    return _run([_pcc_plan(target, pred, mask_threshold)])[0]


def _pcc_plan(target: Any, pred: Any, mask_threshold: float | None) -> _Plan:
    kind, t, p = _prepare(target, pred)
    thr = None if mask_threshold is None else float(mask_threshold)
    if kind == "patches":  # skimage.metrics has no PCC, let alone FRM's masked one: vectorised over the patches
        s = _moment_stats(t, p, thr, _patch_axes(t))
        return _Plan([], lambda _: _pcc_from(s))
    func = functools.partial(_moment_stats, threshold=thr)
    return _Plan([_blockwise(func, (t, p), 6)], lambda parts: float(_pcc_from(_combine_moments(parts[0]))))


# ---------------------------------------------------------------------------------------- tolerance level


@dataclass(frozen=True)
class ToleranceLevel:
    """VirFluoNet's tolerance level and its curves (arrays gain a leading patch axis for patch sets).

    Attributes
    ----------
    value : float or numpy.ndarray
        ``TL = min_i [beta1 IE(i) + beta2 SE(i)]``.
    level : float or numpy.ndarray
        The threshold at the minimum as a fraction of the data range (the paper's ``i`` / 100); the first one
        if several tie.
    threshold : float or numpy.ndarray
        The same threshold in intensity units (``level * data_range``).
    levels : numpy.ndarray
        All threshold fractions swept.
    intensity_error, spatial_error : numpy.ndarray
        IE and SE at every level.
    """

    value: Any
    level: Any
    threshold: Any
    levels: np.ndarray
    intensity_error: np.ndarray
    spatial_error: np.ndarray


def _tl_block(t: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[n, count(|e| <= thr_i)..., sum(|e| for |e| <= thr_i)...] of one block."""
    e = np.sort(np.abs(_f64(p) - _f64(t)), axis=None)
    idx = np.searchsorted(e, thresholds, side="right")
    csum = np.concatenate([[0.0], np.cumsum(e)])
    return np.concatenate([[float(e.size)], idx.astype(np.float64), csum[idx]])


def _tl_finish(s: np.ndarray, levels: np.ndarray, r: float, betas: tuple, denominator: str) -> tuple:
    """(value, level, threshold, IE, SE) from summed block stats ``s`` (..., 1 + 2L)."""
    nl = levels.size
    n, cnt, sums = s[..., :1], s[..., 1:1 + nl], s[..., 1 + nl:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mae = sums / (cnt if denominator == "below" else n)
    ie = np.where(cnt > 0, mae, 0.0) / r
    se = (n - cnt) / n
    total = betas[0] * ie + betas[1] * se
    i = np.argmin(total, axis=-1)
    value = np.take_along_axis(total, i[..., None], axis=-1)[..., 0]
    return value, levels[i], levels[i] * r, ie, se


def tolerance_level(target: Any, pred: Any, *, data_range: float | None = None,
                    levels: Sequence[float] | None = None, betas: tuple[float, float] = (1.0, 1.0),
                    denominator: str = "below") -> ToleranceLevel:
    """VirFluoNet's tolerance level (VirFluoNet paper, J Biomed Opt, Sec. 2.5 "Quantitative Index of Predicted
    Image Error", Eq. 7; ``papers/virfluonet-jbo.txt``).

    ``TL = min_i [beta1 * IE(O, G, i) + beta2 * SE(O, G, i)]``, where ``i`` sweeps the absolute-error threshold
    from 0 % to 99 % of the data range ("bit-depth range"), in 1 % steps:

    * ``IE`` ("intensity error"): the MAE of the two images *below* the threshold, normalised by the data range
      ("maximum bit depth"): the mean of ``|O - G|`` over pixels with ``|O - G| <= t_i``, divided by the range
      (0 if no pixel is below).
    * ``SE`` ("spatial error"): the area fraction of pixels whose error is outside the tolerance,
      ``|O - G| > t_i``.
    * ``beta1 = beta2`` ("set as equal in this study"; Eq. 7 sums the terms, so both are 1).

    The paper leaves open whether the below-threshold MAE is averaged over the below-threshold pixels (our
    reading of "the MAE of two images below the threshold level", ``denominator="below"``) or over all pixels
    (``denominator="all"``). Its Discussion mentions normalising by the mean ground-truth signal and the signal
    area fraction instead; we follow the Methods' Eq. 7 definition.

    Parameters
    ----------
    target, pred : array_like
        G and O: a whole image or a patch set (one TL per patch).
    data_range : float, optional
        The "bit-depth range" (255 in the paper's 8-bit data); see :func:`resolve_data_range`.
    levels : sequence of float, optional
        Threshold fractions of the data range; default ``0.00, 0.01, ..., 0.99``.
    betas : (float, float)
        Weights of IE and SE.
    denominator : {'below', 'all'}
        See above.

    Returns
    -------
    ToleranceLevel
        The minimum, the level and threshold at which it occurs, and the IE/SE curves.
    """
    if denominator not in ("below", "all"):
        raise ConfigError(f"denominator={denominator!r} must be 'below' or 'all'")
    lv = np.arange(100) / 100.0 if levels is None else np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size == 0 or np.any(lv < 0) or np.any(~np.isfinite(lv)):
        raise ConfigError(f"levels={levels!r} must be a non-empty list of fractions >= 0, e.g. np.arange(100) / 100")
    b = tuple(float(x) for x in betas)
    if len(b) != 2 or any(x < 0 for x in b):
        raise ConfigError(f"betas={betas!r} must be two non-negative weights, e.g. (1, 1)")
    kind, t, p = _prepare(target, pred)
    r = resolve_data_range(t, data_range)
    thresholds = lv * r
    if kind == "patches":  # VirFluoNet's index is not in skimage.metrics
        s = np.stack([_tl_block(ti, pi, thresholds) for ti, pi in zip(t, p)])
    else:
        part = _blockwise(functools.partial(_tl_block, thresholds=thresholds), (t, p), 1 + 2 * lv.size)
        s = _run([_Plan([part], lambda ps: ps[0].sum(axis=0))])[0]
    value, level, thr, ie, se = _tl_finish(s, lv, r, b, denominator)
    return ToleranceLevel(_scalar_or_array(value), _scalar_or_array(level), _scalar_or_array(thr), lv, ie, se)


# ----------------------------------------------------------------------------------------------- contrast


def contrast(image: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Michelson and RMS contrast with the paper's recipe, via :func:`l2l_scale.preprocess.contrast.label_contrast`.

    Parameters
    ----------
    image : array_like
        One 2-D image (read into memory; ``label_contrast`` is in-memory) or a patch set ``[N, H, W]``.
    **kwargs
        Passed to ``label_contrast`` (``sigma``, ``percentiles``, ``top_fraction``, ``clip``).

    Returns
    -------
    michelson, rms : float or numpy.ndarray
        Floats for an image, arrays of shape ``(N,)`` for a patch set.
    """
    from l2l_scale.preprocess.contrast import label_contrast

    a = _unwrap(image, "image")
    if a.ndim == 2:
        return label_contrast(np.asarray(a), **kwargs)
    if a.ndim == 3:
        pairs = np.array([label_contrast(np.asarray(patch), **kwargs) for patch in a])
        return pairs[:, 0], pairs[:, 1]
    raise InputError(f"contrast needs a 2-D image or a patch set [N, H, W], got shape {tuple(a.shape)}; "
                     "select one channel")

