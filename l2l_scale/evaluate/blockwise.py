"""How every metric reads its arguments, and the blockwise reduction that whole images run on.

The argument rules of :mod:`l2l_scale.evaluate.metrics` (a patch set or one whole image, the dtype checks, the
data range) and the plans that the metric modules (:mod:`~l2l_scale.evaluate.pixel`,
:mod:`~l2l_scale.evaluate.ssim`) build: a plan holds per-block statistics of a whole image (numpy, or lazy dask
arrays of shape ``(blocks_y, blocks_x, k)``) and the function that finishes them into the metric's value.
:func:`_run` computes the dask parts of many plans in one pass over the data, so several metrics of several
image pairs read every chunk once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ConfigError, InputError

__all__ = ["resolve_data_range"]


# ------------------------------------------------------------------------------------------ input handling


def _unwrap(x: Any, name: str) -> np.ndarray | da.Array:
    """numpy/dask array of an argument; a DataArray with y/x dims becomes one (y, x) plane."""
    if isinstance(x, xr.DataArray):
        if "y" in x.dims and "x" in x.dims:
            singles = [d for d in x.dims if d not in ("y", "x") and x.sizes[d] == 1]
            x = x.squeeze(singles, drop=True)
            if x.ndim != 2:
                raise InputError(f"{name} has dims {x.dims} with more than one plane; select one channel/plane, "
                                 f"e.g. image.sel(c='phalloidin')")
            x = x.transpose("y", "x")
        return x.data
    if isinstance(x, (np.ndarray, da.Array)):
        return x
    return np.asarray(x)


def _dtype_word(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else str(dtype)


def _check_pair(t: Any, p: Any) -> None:
    """Same shape, and no float/integer or integer/integer dtype mix (see :mod:`l2l_scale.evaluate.metrics`)."""
    if tuple(t.shape) != tuple(p.shape):
        raise InputError(f"target shape {tuple(t.shape)} differs from prediction shape {tuple(p.shape)}; "
                         "compare images of the same size (crop or register them first)")
    for a, what in ((t, "target"), (p, "prediction")):
        if a.dtype.kind not in "buif":
            raise InputError(f"{what} has unsupported dtype {a.dtype}; pass integer or float images")
    tf, pf = t.dtype.kind == "f", p.dtype.kind == "f"
    if tf != pf:
        raise InputError(f"comparing a {_dtype_word(p.dtype)} restoration with a {_dtype_word(t.dtype)} target "
                         "without normalisation; normalise both (e.g. --normalize percentile)")
    if not tf and t.dtype != p.dtype:
        raise InputError(f"comparing a {p.dtype} restoration with a {t.dtype} target; convert both to one dtype "
                         "or normalise both (e.g. --normalize percentile)")


def _prepare(target: Any, pred: Any) -> tuple[str, Any, Any]:
    """Classify a pair as ``"image"`` (2-D, numpy or dask) or ``"patches"`` (numpy [N,H,W(,C)])."""
    t, p = _unwrap(target, "target"), _unwrap(pred, "prediction")
    _check_pair(t, p)
    if t.ndim == 2:
        if isinstance(t, da.Array) or isinstance(p, da.Array):
            if not isinstance(t, da.Array):
                t = da.from_array(t, chunks=p.chunks)
            if not isinstance(p, da.Array):
                p = da.from_array(p, chunks=t.chunks)
            if p.chunks != t.chunks:
                p = p.rechunk(t.chunks)
        return "image", t, p
    if t.ndim in (3, 4):
        return "patches", np.asarray(t), np.asarray(p)
    raise InputError(f"got arrays of shape {tuple(t.shape)}; pass one 2-D image [Y, X] or a patch set "
                     "[N, H, W] / [N, H, W, C]")


def _min_max(a: Any) -> tuple[float, float]:
    if isinstance(a, da.Array):
        lo, hi = dask.compute(a.min(), a.max())
    else:
        lo, hi = np.min(a), np.max(a)
    return float(lo), float(hi)


def resolve_data_range(target: Any, data_range: float | None = None) -> float:
    """The data range used by all metrics (see "Data range convention" in :mod:`l2l_scale.evaluate.metrics`).

    Parameters
    ----------
    target : array_like
        The target (reference) image or patch set.
    data_range : float, optional
        An explicit range is validated and returned. ``None`` follows
        ``skimage.metrics.peak_signal_noise_ratio``: the dtype's maximum if the target is non-negative, else the
        dtype's full range (skimage's ``dtype_range``, which is (-1, 1) for floats).

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        ``data_range`` is not a positive finite number.
    InputError
        ``data_range=None`` and a float target lies outside [-1, 1] (normalise it, or pass ``data_range``).
    """
    if data_range is not None:
        value = float(data_range)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"data_range={data_range!r} must be a positive number; use e.g. data_range=1.0 for "
                              "percentile-normalised images")
        return value
    t = _unwrap(target, "target")
    dtype = np.dtype(t.dtype)
    if dtype.kind == "b":
        return 1.0
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        lo, _ = _min_max(t)
        return float(info.max) if lo >= 0 else float(info.max) - float(info.min)
    lo, hi = _min_max(t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("target contains NaN or infinite values; check the input images")
    if lo < -1.0 or hi > 1.0:
        raise InputError(f"float target has values in [{lo:g}, {hi:g}], outside [-1, 1], so its data range is "
                         "unknown; pass data_range explicitly (e.g. data_range=1.0 for percentile-normalised images)")
    return 1.0 if lo >= 0 else 2.0


# ---------------------------------------------------------------------------- blockwise reduction plumbing


@dataclass
class _Plan:
    """A metric of a whole image: per-block statistics (numpy or lazy dask) and how to finish them."""

    parts: list  # arrays of shape (blocks_y, blocks_x, k)
    finish: Callable[[list[np.ndarray]], Any]


def _stats_block(*blocks: np.ndarray, func: Callable) -> np.ndarray:
    return np.asarray(func(*blocks), dtype=np.float64)[None, None, :]


def _blockwise(func: Callable, arrays: Sequence[Any], n_out: int) -> Any:
    """Apply ``func`` (blocks -> 1-D stats of length ``n_out``) to every block: shape (nby, nbx, n_out)."""
    wrapped = functools.partial(_stats_block, func=func)
    if not isinstance(arrays[0], da.Array):
        return wrapped(*arrays)
    nb = arrays[0].numblocks
    return da.map_blocks(wrapped, *arrays, new_axis=2, chunks=((1,) * nb[0], (1,) * nb[1], (n_out,)),
                         dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64))


def _run(plans: Sequence[_Plan]) -> list:
    """Compute every plan's dask parts in one pass over the data, then finish each."""
    lazy = [(i, j) for i, plan in enumerate(plans) for j, part in enumerate(plan.parts)
            if isinstance(part, da.Array)]
    values = dask.compute(*[plans[i].parts[j] for i, j in lazy]) if lazy else ()
    parts = [list(plan.parts) for plan in plans]
    for (i, j), v in zip(lazy, values):
        parts[i][j] = v
    return [plan.finish([np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1]) for a in p])
            for plan, p in zip(plans, parts)]


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _patch_axes(a: np.ndarray) -> tuple:
    return tuple(range(1, a.ndim))


def _scalar_or_array(v: Any) -> Any:
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else v

