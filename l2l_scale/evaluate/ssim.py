"""The SSIM engine: SSIM (Wang et al. 2004) and MS-SSIM (Wang et al. 2003) on patch sets and whole images.

How to call them (a patch set or one whole image) and the data range are described in
:mod:`l2l_scale.evaluate.metrics`. The engine computes TensorFlow's definitions (``tf.image.ssim`` and
``tf.image.ssim_multiscale``) in float64 numpy; SSIM equals skimage's ``structural_similarity`` with Gaussian
weights and population covariances.

Whole images (dask)
-------------------
SSIM and MS-SSIM are means over the *valid* region of the local-statistics map (no padded pixels), the region
both ``skimage`` (it crops the filter radius) and TensorFlow (``padding='VALID'``) average over. Each scale is
computed with :func:`dask.array.overlap.overlap` with a halo of the Gaussian filter's radius
``(filter_size - 1) // 2`` and ``boundary='none'``: every block with its halo yields exactly the valid map pixels
of its core, so the blocks tile the global valid region without overlap or gap, and each block returns the sums of
its SSIM and contrast-structure values. For MS-SSIM the 2x2 average-pooling chain is computed blockwise on chunks
that are multiples of ``2 ** (M - 1)`` (rechunked once if needed): interior chunks stay even at every scale, and
only the last block of an odd-sized scale is padded, by repeating its last row/column exactly as TensorFlow's
``SYMMETRIC`` padding does. The per-pixel maps are therefore bit-identical to the in-memory computation; only the
order of the final float64 summations differs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import dask.array as da
import numpy as np

from l2l_scale.errors import ConfigError
from l2l_scale.evaluate.blockwise import _blockwise, _f64, _Plan, _prepare, _run, resolve_data_range

__all__ = ["L2L_WEIGHTS_3", "MS_SSIM_PRESETS", "WANG_WEIGHTS", "min_side_ms_ssim", "ms_ssim", "ssim"]

#: Wang et al. (2003) 5-scale MS-SSIM weights (TensorFlow's default ``power_factors``).
WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: The paper's 3-scale weights (Materials and Methods, "Training the CNN").
L2L_WEIGHTS_3 = (0.2096, 0.4659, 0.3245)
#: M -> (weights, Gaussian filter size) as in the paper: Wang's filter 11 for M = 1 and 3; 7 for M = 5, the
#: largest filter that fits a 128 px patch at 5 scales.
MS_SSIM_PRESETS: dict[int, tuple[tuple[float, ...], int]] = {
    1: ((1.0,), 11),
    3: (L2L_WEIGHTS_3, 11),
    5: (WANG_WEIGHTS, 7),
}


# ------------------------------------------------------------------------------------------ SSIM, MS-SSIM


def _gauss_kernel(size: int, sigma: float) -> np.ndarray:
    """1-D normalised Gaussian; its outer product is TensorFlow's ``_fspecial_gauss`` and skimage's window."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def _valid_filter(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation over the last two axes, 'valid' region only (no padded pixel ever enters).

    A tap loop rather than scipy.ndimage: every output pixel is the same sequence of float operations wherever
    it lies in the array, which makes blockwise results bit-identical to whole-array ones.
    """
    f = k.size
    h, w = x.shape[-2] - f + 1, x.shape[-1] - f + 1
    tmp = k[0] * x[..., 0:h, :]
    for j in range(1, f):
        tmp += k[j] * x[..., j:j + h, :]
    out = k[0] * tmp[..., :, 0:w]
    for j in range(1, f):
        out += k[j] * tmp[..., :, j:j + w]
    return out


def _ssim_sums(x: np.ndarray, y: np.ndarray, k: np.ndarray, c1: float, c2: float) -> tuple:
    """Sums of the SSIM and contrast-structure maps over the valid region of the last two axes, and its size.

    Same formulas as TensorFlow's ``_ssim_helper`` (luminance * contrast-structure, population covariances),
    which equal skimage's with ``use_sample_covariance=False``.
    """
    f = k.size
    h, w = x.shape[-2] - f + 1, x.shape[-1] - f + 1
    batch = x.shape[:-2]
    if h <= 0 or w <= 0:
        return np.zeros(batch), np.zeros(batch), 0.0
    x, y = _f64(x), _f64(y)
    mx, my = _valid_filter(x, k), _valid_filter(y, k)
    exy = _valid_filter(x * y, k)
    ex2y2 = _valid_filter(x * x + y * y, k)
    num0 = 2.0 * mx * my
    den0 = mx * mx + my * my
    lum = (num0 + c1) / (den0 + c1)
    cs = (2.0 * exy - num0 + c2) / (ex2y2 - den0 + c2)
    return np.sum(lum * cs, axis=(-2, -1)), np.sum(cs, axis=(-2, -1)), float(h * w)


def _ssim_block(xb: np.ndarray, yb: np.ndarray, k: np.ndarray, c1: float, c2: float) -> np.ndarray:
    s, c, n = _ssim_sums(xb, yb, k, c1, c2)
    return np.array([float(s), float(c), n])


def _downsample2(x: np.ndarray) -> np.ndarray:
    """TensorFlow's MS-SSIM step: pad an odd last axis by repeating its last row/column, then 2x2 mean pool."""
    x = _f64(x)
    if x.shape[-2] % 2:
        x = np.concatenate([x, x[..., -1:, :]], axis=-2)
    if x.shape[-1] % 2:
        x = np.concatenate([x, x[..., :, -1:]], axis=-1)
    return (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) * 0.25


def min_side_ms_ssim(scales: int, filter_size: int) -> int:
    """Smallest image side that MS-SSIM with ``scales`` and ``filter_size`` accepts (TensorFlow's rule).

    ``(filter_size - 1) * 2 ** (scales - 1) + 1``: e.g. 97 for the paper's M = 5 with filter 7, 161 with Wang's 11.
    """
    return (int(filter_size) - 1) * 2 ** (int(scales) - 1) + 1


def _ms_params(scales: int | None, weights: Sequence[float] | None,
               filter_size: int | None) -> tuple[tuple[float, ...], int]:
    if weights is None:
        m = 5 if scales is None else int(scales)
        if m not in MS_SSIM_PRESETS:
            raise ConfigError(f"scales={scales!r} has no preset weights; use scales=1, 3 or 5, or pass weights=")
        weights, default_f = MS_SSIM_PRESETS[m]
    else:
        weights = tuple(float(w) for w in weights)
        if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
            raise ConfigError(f"weights={weights!r} must be non-negative numbers, one per scale; "
                              f"e.g. {WANG_WEIGHTS}")
        if scales is not None and int(scales) != len(weights):
            raise ConfigError(f"scales={scales} but {len(weights)} weights given; pass one weight per scale")
        default_f = MS_SSIM_PRESETS.get(len(weights), (None, 11))[1]
    f = default_f if filter_size is None else int(filter_size)
    if f < 1 or f % 2 == 0:
        raise ConfigError(f"filter_size={filter_size!r} must be a positive odd integer; use 11 (Wang) or 7 (M=5)")
    return tuple(weights), f


def _check_side(shape2d: tuple, m: int, f: int) -> None:
    need = min_side_ms_ssim(m, f)
    if min(shape2d) < need:
        what = "SSIM" if m == 1 else f"MS-SSIM with M={m} scales"
        raise ConfigError(f"{what} and filter_size={f} needs images/patches of at least {need} px per side, got "
                          f"{shape2d[0]}x{shape2d[1]}; use larger patches, fewer scales or a smaller filter_size")


def _ms_ssim_patches(t: np.ndarray, p: np.ndarray, weights: tuple, k: np.ndarray, c1: float, c2: float,
                     relu: bool) -> np.ndarray:
    """Per-patch (M)S-SSIM of [N, H, W] or [N, H, W, C] (channels averaged at the end, as TensorFlow does)."""
    x, y = _f64(t), _f64(p)
    if x.ndim == 4:
        x, y = np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1)
    else:
        x, y = x[:, None], y[:, None]
    total = np.ones(x.shape[:2])
    m = len(weights)
    for s, w in enumerate(weights):
        if s:
            x, y = _downsample2(x), _downsample2(y)
        ssum, csum, n = _ssim_sums(x, y, k, c1, c2)
        value = (ssum if s == m - 1 else csum) / n
        if relu:
            value = np.maximum(value, 0.0)
        total = total * value ** w if relu else value
    return total.mean(axis=1)


def _skimage_ssim(t: np.ndarray, p: np.ndarray, data_range: float, sigma: float, k1: float,
                  k2: float) -> np.ndarray:
    """``skimage.metrics.structural_similarity`` of every patch, in float64 (channels last, averaged)."""
    from skimage.metrics import structural_similarity

    channel_axis = -1 if t.ndim == 4 else None
    return np.array([structural_similarity(ti, pi, data_range=data_range, gaussian_weights=True, sigma=sigma,
                                           use_sample_covariance=False, K1=k1, K2=k2, channel_axis=channel_axis)
                     for ti, pi in zip(_f64(t), _f64(p))], dtype=np.float64)


def _dask_downsample(x: da.Array) -> da.Array:
    chunks = tuple(tuple((c + 1) // 2 for c in cs) for cs in x.chunks)
    return da.map_blocks(_downsample2, x, chunks=chunks, dtype=np.float64)


def _ms_chunks(x: da.Array, q: int, r: int) -> da.Array:
    """Regular chunks that are multiples of ``q = 2 ** (M - 1)`` (even at every scale) and >= ``r * q``."""
    new = []
    for size, cs in zip(x.shape, x.chunks):
        c = max(max(cs), r * q, q)
        c = -(-c // q) * q
        new.append(min(c, -(-size // q) * q))
    if all(len(set(cs[:-1])) <= 1 and cs[0] == c for cs, c in zip(x.chunks, new)):
        return x
    return x.rechunk(tuple(new))


def _ms_ssim_image_parts(t: Any, p: Any, weights: tuple, k: np.ndarray, c1: float, c2: float) -> list:
    """Per scale: per-block [sum SSIM, sum cs, n] (numpy, or lazy dask with the halos described above)."""
    m, f = len(weights), k.size
    r = (f - 1) // 2
    if not isinstance(t, da.Array):
        parts, x, y = [], _f64(t), _f64(p)
        for s in range(m):
            if s:
                x, y = _downsample2(x), _downsample2(y)
            parts.append(_ssim_block(x, y, k, c1, c2)[None, None, :])
        return parts
    x = _ms_chunks(t.astype(np.float64), 2 ** (m - 1), r)
    y = p.astype(np.float64).rechunk(x.chunks)
    parts = []
    block = functools.partial(_ssim_block, k=k, c1=c1, c2=c2)
    for s in range(m):
        if s:
            x, y = _dask_downsample(x), _dask_downsample(y)
        if r:
            xo = da.overlap.overlap(x, depth={0: r, 1: r}, boundary={0: "none", 1: "none"})
            yo = da.overlap.overlap(y, depth={0: r, 1: r}, boundary={0: "none", 1: "none"})
        else:
            xo, yo = x, y
        parts.append(_blockwise(block, (xo, yo), 3))
    return parts


def _ms_ssim_finish(parts: list[np.ndarray], weights: tuple, relu: bool) -> float:
    m = len(weights)
    total = 1.0
    for s, (w, a) in enumerate(zip(weights, parts)):
        ssum, csum, n = a[:, 0].sum(), a[:, 1].sum(), a[:, 2].sum()
        value = (ssum if s == m - 1 else csum) / n
        if not relu:
            return float(value)
        total *= max(value, 0.0) ** w
    return float(total)


def _ms_ssim_plan(target: Any, pred: Any, weights: tuple, f: int, filter_sigma: float, k1: float, k2: float,
                  data_range: float | None, relu: bool) -> _Plan:
    kind, t, p = _prepare(target, pred)
    if not (filter_sigma > 0 and k1 >= 0 and k2 >= 0):
        raise ConfigError(f"filter_sigma={filter_sigma}, k1={k1}, k2={k2}: need filter_sigma > 0 and k1, k2 >= 0; "
                          "use Wang's 1.5, 0.01, 0.03")
    hw = tuple(t.shape[1:3]) if kind == "patches" else tuple(t.shape)
    _check_side(hw, len(weights), f)
    r = resolve_data_range(t, data_range)
    k = _gauss_kernel(f, filter_sigma)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    if kind == "patches":
        # skimage has no MS-SSIM and no TensorFlow relu, and its Gaussian is always cut at 3.5 sigma: it serves
        # plain SSIM patch sets whose filter_size is that window; the rest is the engine (TensorFlow's definition).
        if not relu and len(weights) == 1 and f == 2 * int(3.5 * filter_sigma + 0.5) + 1:
            values = _skimage_ssim(t, p, r, filter_sigma, k1, k2)
        else:
            values = _ms_ssim_patches(t, p, weights, k, c1, c2, relu)
        return _Plan([], lambda _: values)
    parts = _ms_ssim_image_parts(t, p, weights, k, c1, c2)
    return _Plan(parts, lambda ps: _ms_ssim_finish(ps, weights, relu))


def ssim(target: Any, pred: Any, *, data_range: float | None = None, filter_size: int = 11,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004): mean over the valid region of the local SSIM map.

    Equals ``skimage.metrics.structural_similarity(target, pred, data_range=..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`` (its window is 11 px for sigma 1.5; it crops the filter radius
    before averaging, i.e. the valid region) and ``tf.image.ssim``.

    Parameters
    ----------
    target, pred : array_like
        A whole image or a patch set (see :mod:`l2l_scale.evaluate.metrics`); channels are averaged per patch.
    data_range : float, optional
        See :func:`resolve_data_range`.
    filter_size : int
        Odd Gaussian window size (11 as in Wang et al.; skimage's is ``2 * int(3.5 * sigma + 0.5) + 1``).
    filter_sigma, k1, k2 : float
        Gaussian sigma and the stabilising constants ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``.

    Returns
    -------
    float or numpy.ndarray
        In [-1, 1]; one value for an image, shape ``(N,)`` for a patch set.

    Raises
    ------
    ConfigError
        A side shorter than ``filter_size``.
    """
    _, f = _ms_params(1, (1.0,), filter_size)
    return _run([_ms_ssim_plan(target, pred, (1.0,), f, filter_sigma, k1, k2, data_range, relu=False)])[0]


def ms_ssim(target: Any, pred: Any, *, scales: int | None = None, weights: Sequence[float] | None = None,
            filter_size: int | None = None, filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
            data_range: float | None = None) -> float | np.ndarray:
    """Multi-scale SSIM (Wang et al. 2003) exactly as ``tf.image.ssim_multiscale`` computes it, in numpy.

    At scales ``0 .. M-2`` the mean contrast-structure term, at scale ``M-1`` the mean SSIM, each clipped at 0
    (TensorFlow's ``relu``) and raised to its weight; between scales a 2x2 mean pool (odd sides padded by
    repeating the last row/column). With ``M = 1`` this is ``max(SSIM, 0)``.

    Parameters
    ----------
    target, pred : array_like
        A whole image or a patch set (see :mod:`l2l_scale.evaluate.metrics`); channels are averaged after the product.
    scales : int, optional
        M. Presets (:data:`MS_SSIM_PRESETS`, the paper's): 1 -> weight (1,), filter 11; 3 -> (0.2096, 0.4659,
        0.3245), filter 11; 5 -> Wang's weights, filter 7. Default 5 unless ``weights`` are given.
    weights : sequence of float, optional
        One exponent per scale (TensorFlow's ``power_factors``); overrides the preset.
    filter_size : int, optional
        Odd Gaussian filter size; default from the preset (11 for custom weights except M = 5).
    filter_sigma, k1, k2 : float
        As in ``tf.image.ssim_multiscale``.
    data_range : float, optional
        TensorFlow's ``max_val``; see :func:`resolve_data_range`.

    Returns
    -------
    float or numpy.ndarray
        In [0, 1]; one value for an image, shape ``(N,)`` for a patch set.

    Raises
    ------
    ConfigError
        A side shorter than ``(filter_size - 1) * 2 ** (M - 1) + 1`` (the message names that smallest side),
        or inconsistent ``scales``/``weights``/``filter_size``.
    """
    w, f = _ms_params(scales, weights, filter_size)
    return _run([_ms_ssim_plan(target, pred, w, f, filter_sigma, k1, k2, data_range, relu=True)])[0]


