"""Applying a shift lazily, tile by tile, and the common region of shifted channels (the sign convention is in
:mod:`l2l_scale.preprocess.drift`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError


_SPLINE_TOL = 1e-6
# Largest |pole| of the B-spline prefilter per order (Unser 1999): its impulse response decays like |z|^n.
_SPLINE_POLE = {2: 3.0 - math.sqrt(8.0), 3: 2.0 - math.sqrt(3.0), 4: 0.361341225900220177,
                5: 0.430575347099973791}


def shift_halo(shift: Sequence[float], order: int = 1, tol: float = _SPLINE_TOL) -> tuple[int, ...]:
    """Halo (per axis) that makes a tiled :func:`scipy.ndimage.shift` equal to the whole-image one.

    Output pixel ``y`` reads input ``y - s``: the whole-pixel distance ``ceil(|s|)``, plus the interpolation
    kernel's reach ``order // 2 + 1``, plus, for spline orders >= 2, the number of pixels after which the
    prefilter's impulse response ``|z|^n`` (``z`` its largest pole) is below ``tol``.
    """
    if order not in range(6):
        raise ConfigError(f"interpolation order {order} is not 0-5; use 1 (bilinear) or 3 (cubic spline)")
    tail = math.ceil(math.log(tol) / math.log(_SPLINE_POLE[order])) if order >= 2 else 0
    return tuple(int(math.ceil(abs(float(s)))) + order // 2 + 1 + tail for s in shift)


# ------------------------------------------------------------------------------------------ applying shifts


def _shift_block(block: np.ndarray, shift: tuple[float, ...], order: int, mode: str, out_dtype: np.dtype) -> np.ndarray:
    out = ndimage.shift(block.astype(np.float64, copy=False), shift, order=order, mode=mode, prefilter=order > 1)
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(out_dtype)
    return out.astype(out_dtype, copy=False)


def shift_image(image: Any, shift: Sequence[float], *, order: int = 1, mode: str = "nearest") -> da.Array:
    """Translate a 2-D image lazily, tile by tile, equal to ``scipy.ndimage.shift`` of the whole image.

    Parameters
    ----------
    image : dask.array.Array, numpy.ndarray or xarray.DataArray
        A 2-D (y, x) image.
    shift : (float, float)
        ``(dy, dx)``: ``out(y, x) = image(y - dy, x - dx)``.
    order : int
        Spline order 0-5 (default 1, bilinear). The halo is derived by :func:`shift_halo`.
    mode : str
        scipy's boundary mode for pixels that come from outside the image (they are cropped by
        :func:`register`).

    Returns
    -------
    dask.array.Array
        Same shape, chunks and dtype; integer dtypes are rounded and clipped.
    """
    arr = _dask2d(image)
    shift = tuple(float(s) for s in shift)
    if len(shift) != arr.ndim:
        raise ConfigError(f"shift {shift} needs one value per image axis ({arr.ndim})")
    if not any(shift):
        return arr
    depth = dict(enumerate(shift_halo(shift, order)))
    # boundary="none": blocks at the image edge see the real edge, where scipy's mode applies as on the whole
    # image; inner edges get the derived halo.
    return arr.map_overlap(_shift_block, depth=depth, boundary="none", dtype=arr.dtype, shift=shift, order=order,
                           mode=mode, out_dtype=arr.dtype)


def common_region(shape: Sequence[int], shifts: Sequence[Sequence[float]]) -> tuple[slice, slice]:
    """The region where every shifted channel has data: ``0 <= y - dy <= n - 1`` for all shifts.

    Raises
    ------
    InputError
        If the region is empty (shifts as large as the image).
    """
    slices = []
    for axis, n in enumerate(shape):
        s = [float(sh[axis]) for sh in shifts] + [0.0]
        lo = max(0, max(math.ceil(v - 1e-9) for v in s))
        hi = min(n - 1, min(math.floor(n - 1 + v + 1e-9) for v in s))
        if hi < lo:
            raise InputError(f"shifts {[list(map(float, sh)) for sh in shifts]} leave no common region in an image of "
                             f"shape {tuple(shape)}; check that the channels show the same field")
        slices.append(slice(lo, hi + 1))
    return slices[0], slices[1]


def _dask2d(image: Any) -> da.Array:
    arr = image.data if isinstance(image, xr.DataArray) else image
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr))
    if arr.ndim != 2:
        squeezable = [i for i, n in enumerate(arr.shape) if n == 1]
        if arr.ndim - len(squeezable) == 2:
            arr = arr.squeeze(axis=tuple(squeezable[: arr.ndim - 2]))
    if arr.ndim != 2:
        raise InputError(f"expected one 2-D (y, x) plane, got shape {arr.shape}; select one channel of a 2-D image")
    return arr
