"""Difference maps of two 2-D images as Dask graphs: the local RMS difference and the local SSIM.

Both are Dask ``map_overlap`` graphs whose halo is the filter radius (``int(truncate * sigma + 0.5)``, SciPy's),
with reflecting borders, so the tiled maps equal the whole-image filters. ``l2l-scale evaluate`` writes them for
every restoration (see :mod:`l2l_scale.evaluate.evaluate`).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ConfigError

__all__ = ["rms_map", "ssim_map"]


def _radius(sigma: float, truncate: float) -> int:
    """SciPy's Gaussian kernel radius, which is also the halo a tile needs."""
    return int(truncate * float(sigma) + 0.5)


def _as_dask(a: Any) -> da.Array:
    a = a.data if isinstance(a, xr.DataArray) else a
    return a if isinstance(a, da.Array) else da.from_array(np.asarray(a))


def _rms_block(a: np.ndarray, b: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    from scipy import ndimage

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    local = ndimage.gaussian_filter(d * d, sigma, truncate=truncate, mode="reflect")
    return np.sqrt(np.maximum(local, 0.0)).astype(np.float32)


def rms_map(a: Any, b: Any, *, sigma: float = 2.0, truncate: float = 4.0) -> da.Array:
    """Local RMS difference ``sqrt(G_sigma * (a - b)^2)`` of two 2-D images, as a Dask graph.

    Parameters
    ----------
    a, b : array_like
        2-D images of one shape (numpy, dask or xarray), e.g. the normalised input and a restoration.
    sigma : float
        Gaussian sigma in px of the local mean (> 0).
    truncate : float
        Kernel radius in sigmas; the tile halo is ``int(truncate * sigma + 0.5)``.

    Returns
    -------
    dask.array.Array
        float32, in the units of ``a`` and ``b``; equals the whole-image SciPy filter (``mode='reflect'``).
    """
    if not (np.isfinite(sigma) and sigma > 0 and truncate > 0):
        raise ConfigError(f"rms sigma={sigma} and truncate={truncate} must be positive; use e.g. --rms-sigma 2")
    a, b = _as_dask(a), _as_dask(b).rechunk(_as_dask(a).chunks)
    depth = _radius(sigma, truncate)
    return da.map_overlap(_rms_block, a, b, depth=depth, boundary="reflect", dtype=np.float32,
                          sigma=float(sigma), truncate=float(truncate))


def _ssim_block(a: np.ndarray, b: np.ndarray, sigma: float, truncate: float, c1: float, c2: float) -> np.ndarray:
    from scipy import ndimage

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def g(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=truncate, mode="reflect")

    mx, my = g(x), g(y)
    vx = g(x * x) - mx * mx
    vy = g(y * y) - my * my
    cxy = g(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.astype(np.float32)


def ssim_map(a: Any, b: Any, *, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
             k1: float = 0.01, k2: float = 0.03) -> da.Array:
    """Local SSIM map of two 2-D images (Gaussian window), as a Dask graph.

    The map of ``skimage.metrics.structural_similarity(a, b, data_range=..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, full=True)`` (its window radius is ``int(3.5 * 1.5 + 0.5) = 5``): 1 where the
    images agree locally, lower where structure or contrast differs.

    Parameters
    ----------
    a, b : array_like
        2-D images of one shape.
    data_range : float
        Sets ``C1 = (k1 R)^2`` and ``C2 = (k2 R)^2`` (1 for percentile-normalised images).
    sigma, truncate : float
        Gaussian window; the tile halo is ``int(truncate * sigma + 0.5)``.
    k1, k2 : float
        SSIM constants.

    Returns
    -------
    dask.array.Array
        float32 in [-1, 1].
    """
    if not (np.isfinite(sigma) and sigma > 0 and truncate > 0 and data_range > 0):
        raise ConfigError(f"ssim sigma={sigma}, truncate={truncate} and data_range={data_range} must be positive")
    a, b = _as_dask(a), _as_dask(b).rechunk(_as_dask(a).chunks)
    depth = _radius(sigma, truncate)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return da.map_overlap(_ssim_block, a, b, depth=depth, boundary="reflect", dtype=np.float32,
                          sigma=float(sigma), truncate=float(truncate), c1=c1, c2=c2)

