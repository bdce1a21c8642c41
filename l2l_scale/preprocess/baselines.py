"""Classical restoration baselines (paper Table S1): Gaussian, rolling ball, white top-hat and CLAHE, tiled.

Kölln et al. (2022, Fig. S3, Table S1) compare Label2label with four classical filters, with per-dataset
parameters that :data:`PRESETS` holds (actin / tubulin / caveolae / PXN):

=============  ===========  ==========================================
method         parameter    actin / tubulin / caveolae / PXN
=============  ===========  ==========================================
gaussian       ``sigma``    2 / 2 / 3 / 2
rolling-ball   ``radius``   20 / 10 / 5 / 5
tophat         ``size``     11 / 25 / 13 / 17
clahe          ``grid``     11 / 7 / 7 / 7
=============  ===========  ==========================================

Every filter runs on one 2-D channel as a Dask graph and its tiled output equals the whole-image output of the
library function it wraps (tested):

``gaussian``
    :func:`dask_image.ndfilters.gaussian_filter` (it derives its halo ``ceil(4 sigma)`` itself) on float32
    data; equals :func:`scipy.ndimage.gaussian_filter` (the paper's function).
``rolling-ball``
    Background subtraction ``image - skimage.restoration.rolling_ball(image, radius=r)`` through
    ``map_overlap`` with the halo of the ball kernel (``ball_kernel(r).shape // 2``, i.e. ``r``). The paper used
    the ``opencv-rolling-ball`` package (an ImageJ port that shrinks the image for large radii); scikit-image's
    exact rolling ball is used here, so values differ slightly from the paper's.
``tophat``
    :func:`scipy.ndimage.white_tophat` with a ``size x size`` square (the paper's ``cv2.MORPH_RECT``) through
    ``map_overlap`` with halo ``2 * (size // 2)``: an opening is an erosion followed by a dilation, each
    reaching ``size // 2`` px.
``clahe``
    Contrast-limited adaptive histogram equalisation equal to :func:`skimage.exposure.equalize_adapthist` of
    the whole image (see below). ``grid`` is the number of contextual regions per side, as in the paper's
    ``cv2.createCLAHE(tileGridSize=(grid, grid))``: ``kernel_size = ceil(side / grid)`` px; ``kernel_size``
    may be given in px instead (better for mosaics much larger than the paper's 4096^2 images, where a fixed
    grid gives very large regions). The clip limit is scikit-image's (default 0.01); the paper used OpenCV's
    default ``clipLimit=40``, which on 256 bins corresponds to ``clip_limit = 40 / 256 = 0.156``.

All outputs are float32 (the filters are computed in float32, CLAHE in float64 then cast).

CLAHE: tiled output equal to the whole-image output
---------------------------------------------------
CLAHE is not a local filter: :func:`~skimage.exposure.equalize_adapthist` (i) rescales the image by its global
minimum/maximum to 14-bit grey levels, (ii) divides the image (reflect-padded by half a region at the start
and up to a full region at the end) into a *global* grid of contextual regions of ``kernel_size`` px, builds one
clipped histogram -> grey-level mapping (LUT) per region, (iii) maps every pixel through the LUTs of the four
nearest regions with bilinear weights, truncates to an integer, and (iv) rescales the result by *its* global
minimum/maximum to [0, 1]. So no halo can make independent tiles equal; instead :func:`clahe` runs four
Dask passes that reproduce those steps on the global grid:

1. global min/max of the input (a Dask reduction);
2. for every input block, the histograms of the parts of the regions it overlaps, computed on the 14-bit bins
   exactly as skimage computes them; the reflect padding of the last region is reproduced by counting the
   mirrored rows/columns again with their multiplicity. The partial histograms are summed into one
   ``(regions_y, regions_x, nbins)`` table and clipped/mapped with skimage's own ``clip_histogram`` and
   ``map_histogram``. The LUT table has ``ceil(ny / k) * ceil(nx / k) * nbins`` entries (242 KB for a grid of
   11 and 256 bins; it grows only if ``kernel_size`` is small compared with the image, and is refused above
   ``_MAX_TABLE`` entries);
3. every block maps its pixels through the LUT rows it needs (each task gets only the regions within one
   region of its block) with skimage's weights and float32 accumulation order, and a Dask reduction finds
   the global min/max of that result;
4. the same mapping again, rescaled by that min/max -> float32 output.

The result equals ``equalize_adapthist(image, kernel_size, clip_limit, nbins)`` of the whole image *exactly*
in float64 (and after the cast to float32), for integer images; float images are first rescaled to [0, 1]
with their global min/max (skimage requires floats in [-1, 1]), i.e. the result equals
``equalize_adapthist((image - min) / (max - min))`` computed in float64. Tested against scikit-image on
images whose size is and is not a multiple of the region size, with tiny chunks and with one chunk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError

__all__ = [
    "METHODS",
    "PARAMETERS",
    "PRESETS",
    "baseline",
    "clahe",
    "clahe_kernel_size",
    "gaussian",
    "resolve_parameters",
    "rolling_ball",
    "rolling_ball_halo",
    "run_baseline",
    "tophat_halo",
    "white_tophat",
]

METHODS = ("gaussian", "rolling-ball", "tophat", "clahe")
# The one parameter of Table S1 per method, and the optional CLAHE extras.
PARAMETERS = {"gaussian": ("sigma",), "rolling-ball": ("radius",), "tophat": ("size",),
              "clahe": ("grid", "kernel_size", "clip_limit", "nbins")}
PRESETS: dict[str, dict[str, dict[str, float]]] = {
    "actin": {"gaussian": {"sigma": 2}, "rolling-ball": {"radius": 20}, "tophat": {"size": 11},
              "clahe": {"grid": 11}},
    "tubulin": {"gaussian": {"sigma": 2}, "rolling-ball": {"radius": 10}, "tophat": {"size": 25},
                "clahe": {"grid": 7}},
    "caveolae": {"gaussian": {"sigma": 3}, "rolling-ball": {"radius": 5}, "tophat": {"size": 13},
                 "clahe": {"grid": 7}},
    "pxn": {"gaussian": {"sigma": 2}, "rolling-ball": {"radius": 5}, "tophat": {"size": 17},
            "clahe": {"grid": 7}},
}
CLAHE_CLIP_LIMIT = 0.01  # scikit-image's default
CLAHE_NBINS = 256
NR_OF_GRAY = 2**14  # skimage's CLAHE works on 14-bit grey levels
_MAX_TABLE = 1 << 27  # LUT entries (256 MB as uint16): refuse kernel sizes that make the global table larger
_TRUNCATE = 4.0


def _dask2d(image: Any) -> da.Array:
    from l2l_scale.preprocess.drift.shift import _dask2d as to2d

    return to2d(image)


def _float32(arr: da.Array) -> da.Array:
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


# ------------------------------------------------------------------------------------------ local filters


def gaussian(image: Any, sigma: float) -> da.Array:
    """Gaussian filter (``scipy.ndimage.gaussian_filter``, truncate 4, reflect) of a 2-D image, tiled, float32.

    The halo ``ceil(4 sigma)`` is derived by :func:`dask_image.ndfilters.gaussian_filter`.
    """
    from dask_image.ndfilters import gaussian_filter

    sigma = _positive(sigma, "sigma", "--sigma 2")
    return gaussian_filter(_float32(_dask2d(image)), sigma, mode="reflect", truncate=_TRUNCATE)


def rolling_ball_halo(radius: float) -> int:
    """Halo of the rolling ball: half the ball kernel's extent (its value at a pixel sees only the kernel)."""
    from skimage.restoration import ball_kernel

    return int(max(ball_kernel(radius, 2).shape) // 2)


def _rolling_ball_block(block: np.ndarray, radius: float) -> np.ndarray:
    from skimage.restoration import rolling_ball as sk_rolling_ball

    # workers=1: Dask already runs one task per core; skimage's own threads would oversubscribe them.
    background = sk_rolling_ball(block, radius=radius, workers=1)
    return (block - background).astype(np.float32, copy=False)


def rolling_ball(image: Any, radius: float) -> da.Array:
    """Rolling-ball background subtraction ``image - skimage.restoration.rolling_ball(image, radius)``, tiled.

    skimage pads with +inf (outside pixels never touch the ball), so a block at the image edge behaves like
    the whole image there (``boundary="none"``), and inner edges get the halo :func:`rolling_ball_halo`.
    """
    radius = _positive(radius, "radius", "--radius 20")
    arr = _float32(_dask2d(image))
    depth = rolling_ball_halo(radius)
    return arr.map_overlap(_rolling_ball_block, depth=depth, boundary="none", dtype=np.float32, radius=radius)


def tophat_halo(size: int) -> int:
    """Halo of a white top-hat with a ``size``-px square: erosion then dilation, each reaching ``size // 2``."""
    return 2 * (int(size) // 2)


def _tophat_block(block: np.ndarray, size: int) -> np.ndarray:
    return ndimage.white_tophat(block, size=(size, size), mode="reflect").astype(np.float32, copy=False)


def white_tophat(image: Any, size: int) -> da.Array:
    """White top-hat (``image - opening``) with a ``size x size`` square (``scipy.ndimage.white_tophat``), tiled."""
    value = _positive(size, "size", "--size 11")
    if value != int(value):
        raise ConfigError(f"top-hat size {size} must be a whole number of pixels; use e.g. --size 11")
    size = int(value)
    arr = _float32(_dask2d(image))
    return arr.map_overlap(_tophat_block, depth=tophat_halo(size), boundary="none", dtype=np.float32, size=size)


def _positive(value: Any, name: str, example: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number; use e.g. {example}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}={value!r} must be positive; use e.g. {example}")
    return v


# --------------------------------------------------------------------------------------------------- CLAHE


def clahe_kernel_size(shape: Sequence[int], grid: int | None = None,
                      kernel_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """Contextual region size in px: ``kernel_size``, or ``ceil(side / grid)`` (OpenCV's tileGridSize).

    Without either, skimage's default: 1/8 of each side.
    """
    if kernel_size is not None:
        ks = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        if len(ks) != 2 or any(int(k) != k or int(k) < 1 for k in ks):
            raise ConfigError(f"CLAHE kernel size {kernel_size!r} must be one or two positive integers (px)")
        return int(ks[0]), int(ks[1])
    if grid is not None:
        if int(grid) != grid or int(grid) < 1:
            raise ConfigError(f"CLAHE grid {grid!r} must be a positive integer (regions per side); use e.g. --grid 11")
        return tuple(max(1, math.ceil(n / int(grid))) for n in shape)  # type: ignore[return-value]
    return tuple(max(n // 8, 1) for n in shape)  # type: ignore[return-value]


class _Gray:
    """Elementwise part of skimage's CLAHE input conversion: image -> 14-bit grey level -> histogram bin."""

    def __init__(self, dtype: np.dtype, gmin: Any, gmax: Any, nbins: int):
        from skimage.util import img_as_uint

        self.is_float = np.issubdtype(dtype, np.floating)
        self.gmin, self.gmax = gmin, gmax
        if self.is_float:
            self.umin, self.umax = 0.0, 65535.0  # (x - min) / (max - min) spans exactly [0, 1]
        else:
            u = img_as_uint(np.array([gmin, gmax], dtype=dtype))
            self.umin, self.umax = float(u[0]), float(u[1])
        self.bin_size = 1 + NR_OF_GRAY // nbins

    def levels(self, block: np.ndarray) -> np.ndarray:
        from skimage.exposure import rescale_intensity
        from skimage.util import img_as_uint

        if self.is_float:
            block = (block.astype(np.float64) - self.gmin) / (self.gmax - self.gmin)
        u = img_as_uint(block)
        # skimage rescales with the image's own min/max; the global ones make every block agree.
        g = rescale_intensity(u, in_range=(self.umin, self.umax), out_range=(0, NR_OF_GRAY - 1))
        return np.round(g).astype(np.min_scalar_type(NR_OF_GRAY))

    def bins(self, block: np.ndarray) -> np.ndarray:
        return self.levels(block) // self.bin_size


def _axis_regions(n: int, k: int) -> tuple[int, np.ndarray]:
    """Regions along one axis and, per pixel, how often its reflection falls into the last region.

    skimage pads ``(k // 2, (k - n % k) % k + ceil(k / 2))`` with numpy's ``reflect`` and takes region ``t``
    from padded rows ``k // 2 + t k`` on: original rows ``t k .. (t + 1) k - 1``, except that the last region
    runs past the image into the reflected rows. ``extra[r]`` counts how often row ``r`` appears there.
    """
    pad_end = (k - n % k) % k + int(math.ceil(k / 2.0))
    idx = np.pad(np.arange(n), (k // 2, pad_end), mode="reflect")
    n_regions = (n + k // 2 + pad_end) // k - 1
    beyond = idx[k // 2 + n:k // 2 + n_regions * k]  # padded rows inside the last region
    return n_regions, np.bincount(beyond, minlength=n)


def _layers(start: int, stop: int, k: int, n_regions: int, extra: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(local rows, region per row, weight per row) layers of one block along one axis."""
    rows = np.arange(start, stop)
    own = rows // k
    weight = np.ones(len(rows), np.int64)
    ext = extra[start:stop]
    last = own == n_regions - 1
    weight[last] += ext[last]
    layers = [(np.arange(len(rows)), own, weight)]
    other = (~last) & (ext > 0)
    if other.any():
        layers.append((np.nonzero(other)[0], np.full(int(other.sum()), n_regions - 1), ext[other].astype(np.int64)))
    return layers


def _hist_block(block: np.ndarray, y0: int, x0: int, gray: _Gray, ks: tuple[int, int], regions: tuple[int, int],
                extras: tuple[np.ndarray, np.ndarray], nbins: int) -> tuple[int, int, np.ndarray]:
    bins = gray.bins(block)
    ly = _layers(y0, y0 + block.shape[0], ks[0], regions[0], extras[0])
    lx = _layers(x0, x0 + block.shape[1], ks[1], regions[1], extras[1])
    ty_lo = min(int(t.min()) for _, t, _ in ly)
    ty_hi = max(int(t.max()) for _, t, _ in ly)
    tx_lo = min(int(t.min()) for _, t, _ in lx)
    tx_hi = max(int(t.max()) for _, t, _ in lx)
    nty, ntx = ty_hi - ty_lo + 1, tx_hi - tx_lo + 1
    hist = np.zeros(nty * ntx * nbins, np.float64)
    for rows, ty, wy in ly:
        for cols, tx, wx in lx:
            sub = bins[np.ix_(rows, cols)].astype(np.int64)
            key = (((ty - ty_lo)[:, None] * ntx + (tx - tx_lo)[None, :]) * nbins + sub).ravel()
            w = (wy[:, None] * wx[None, :]).ravel()
            # Weights are small integers: the float64 sums are exact.
            hist += np.bincount(key, weights=None if np.all(w == 1) else w.astype(np.float64),
                                minlength=hist.size)
    return ty_lo, tx_lo, np.rint(hist).astype(np.int64).reshape(nty, ntx, nbins)


def _clahe_block(block: np.ndarray, y0: int, x0: int, luts: np.ndarray, t0: tuple[int, int], gray: _Gray,
                 ks: tuple[int, int], regions: tuple[int, int]) -> np.ndarray:
    """skimage's interpolation step for one block, given the LUT rows ``luts`` starting at region ``t0``."""
    bins = gray.bins(block).astype(np.intp)
    weights, tiles = [], []
    for axis, (start, n) in enumerate(((y0, block.shape[0]), (x0, block.shape[1]))):
        k = ks[axis]
        p = np.arange(start, start + n) + k // 2  # position in skimage's padded image
        b = p // k
        c = (p % k) / k  # skimage: np.arange(k) / k, the same float64 values
        tiles.append((np.clip(b - 1, 0, regions[axis] - 1) - t0[axis], np.clip(b, 0, regions[axis] - 1) - t0[axis]))
        weights.append((1 - c, c))
    result = np.zeros(block.shape, np.float32)
    # skimage sums the four neighbours in np.ndindex(2, 2) order, each product cast to float32 first.
    for ey, ex in ((0, 0), (0, 1), (1, 0), (1, 1)):
        mapped = luts[tiles[0][ey][:, None], tiles[1][ex][None, :], bins].astype(np.int64)
        coeff = weights[1][ex][None, :] * weights[0][ey][:, None]
        result += (mapped * coeff).astype(np.float32)
    return result.astype(np.min_scalar_type(NR_OF_GRAY))


def _rescale_block(block: np.ndarray, rmin: float, rmax: float) -> np.ndarray:
    from skimage.exposure import rescale_intensity

    return rescale_intensity(block.astype(np.float64), in_range=(rmin, rmax)).astype(np.float32)


# The two steps below are copied from scikit-image 0.26 (skimage/exposure/_adapthist.py, BSD-3-Clause,
# Copyright the scikit-image team) because skimage keeps them private: importing ``_adapthist`` would break on
# any internal rename. They must stay identical to skimage's for the exactness promise above, and
# tests/test_baselines.py checks the whole result against the public ``equalize_adapthist``, which fails if
# skimage's algorithm ever changes.
def _clip_histogram(hist: np.ndarray, clip_limit: int) -> np.ndarray:
    """Clip ``hist`` at ``clip_limit`` and redistribute the excess over the bins, as skimage does (in place)."""
    excess_mask = hist > clip_limit
    excess = hist[excess_mask]
    n_excess = excess.sum() - excess.size * clip_limit
    hist[excess_mask] = clip_limit
    bin_incr = n_excess // hist.size
    upper = clip_limit - bin_incr
    low_mask = hist < upper
    n_excess -= hist[low_mask].size * bin_incr
    hist[low_mask] += bin_incr
    mid_mask = np.logical_and(hist >= upper, hist < clip_limit)
    mid = hist[mid_mask]
    n_excess += mid.sum() - mid.size * clip_limit
    hist[mid_mask] = clip_limit
    while n_excess > 0:
        prev_n_excess = n_excess
        for index in range(hist.size):
            under_mask = hist < clip_limit
            step_size = max(1, np.count_nonzero(under_mask) // n_excess)
            under_mask = under_mask[index::step_size]
            hist[index::step_size][under_mask] += 1
            n_excess -= np.count_nonzero(under_mask)
            if n_excess <= 0:
                break
        if prev_n_excess == n_excess:
            break
    return hist


def _map_histogram(hist: np.ndarray, min_val: int, max_val: int, n_pixels: int) -> np.ndarray:
    """The equalising LUT of clipped histograms (last axis = bins), as skimage computes it."""
    out = np.cumsum(hist, axis=-1).astype(float)
    out *= (max_val - min_val) / n_pixels
    out += min_val
    np.clip(out, a_min=None, a_max=max_val, out=out)
    return out.astype(int)


def _block_grid(arr: da.Array):
    starts = [np.cumsum((0,) + c[:-1]) for c in arr.chunks]
    return arr.to_delayed(), starts


def clahe(image: Any, *, grid: int | None = None, kernel_size: int | Sequence[int] | None = None,
          clip_limit: float = CLAHE_CLIP_LIMIT, nbins: int = CLAHE_NBINS) -> da.Array:
    """CLAHE of a 2-D image, equal to :func:`skimage.exposure.equalize_adapthist` of the whole image.

    Parameters
    ----------
    image : dask.array.Array, numpy.ndarray or xarray.DataArray
        One 2-D channel, any chunking.
    grid : int, optional
        Contextual regions per side (the paper's OpenCV ``tileGridSize``); see :func:`clahe_kernel_size`.
    kernel_size : int or (int, int), optional
        Region size in px instead of ``grid``.
    clip_limit : float
        skimage's normalised clip limit (default 0.01; 0 disables clipping).
    nbins : int
        Histogram bins (default 256).

    Returns
    -------
    dask.array.Array
        float32 in [0, 1], the input's chunks. Passes 1 (min/max) and 2 (region histograms) run when this is
        called; the returned graph holds passes 3 and 4 (see the module notes).

    Raises
    ------
    InputError
        A constant or non-finite channel.
    ConfigError
        Invalid parameters, or a region table above ``_MAX_TABLE`` entries (use a larger kernel).
    """
    from l2l_scale.cluster import compute_with_progress

    arr = _dask2d(image)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"CLAHE needs an integer or float image, got {arr.dtype}; convert the channel first")
    ks = clahe_kernel_size(arr.shape, grid, kernel_size)
    if int(nbins) != nbins or not 2 <= int(nbins) <= NR_OF_GRAY:
        raise ConfigError(f"CLAHE nbins={nbins} must be an integer in 2..{NR_OF_GRAY}; use 256")
    nbins = int(nbins)
    if not (math.isfinite(float(clip_limit)) and float(clip_limit) >= 0):
        raise ConfigError(f"CLAHE clip limit {clip_limit!r} must be >= 0; use e.g. --clip-limit 0.01")
    (ry, ey), (rx, ex) = _axis_regions(arr.shape[0], ks[0]), _axis_regions(arr.shape[1], ks[1])
    if ry * rx * nbins > _MAX_TABLE:
        raise ConfigError(f"CLAHE kernel size {ks} makes {ry} x {rx} regions, too many for one table; use a larger "
                          "--kernel-size or a smaller --grid")

    # Pass 1: global min/max (skimage's rescale to 14 bits uses them).
    gmin, gmax = (v.item() for v in dask.compute(arr.min(), arr.max()))
    if np.issubdtype(arr.dtype, np.floating) and not (math.isfinite(gmin) and math.isfinite(gmax)):
        raise InputError("channel contains NaN or infinite values; CLAHE needs finite pixels")
    if not gmax > gmin:
        raise InputError(f"channel is constant ({gmin:g}); CLAHE is undefined, check the channel selection")
    gray = _Gray(arr.dtype, gmin, gmax, nbins)

    # Pass 2: histograms of the global region grid, summed from every block's share.
    blocks, starts = _block_grid(arr)
    tasks = [dask.delayed(_hist_block)(blocks[i, j], int(starts[0][i]), int(starts[1][j]), gray, ks, (ry, rx),
                                       (ey, ex), nbins)
             for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]
    table = np.zeros((ry, rx, nbins), np.int64)
    for ty, tx, part in compute_with_progress(tasks, f"CLAHE histograms ({ry} x {rx} regions)"):
        table[ty:ty + part.shape[0], tx:tx + part.shape[1]] += part
    elements = ks[0] * ks[1]
    clim = int(np.clip(clip_limit * elements, 1, None)) if clip_limit > 0 else elements
    hist = table.reshape(-1, nbins)
    hist = np.apply_along_axis(_clip_histogram, -1, hist, clip_limit=clim)
    luts = _map_histogram(hist, 0, NR_OF_GRAY - 1, elements).astype(np.uint16).reshape(ry, rx, nbins)

    # Passes 3 and 4: map every block through the LUTs of the regions around it (and only those).
    rows = []
    for i in range(blocks.shape[0]):
        row = []
        for j in range(blocks.shape[1]):
            y0, x0 = int(starts[0][i]), int(starts[1][j])
            h, w = arr.chunks[0][i], arr.chunks[1][j]
            t0 = (max(0, (y0 + ks[0] // 2) // ks[0] - 1), max(0, (x0 + ks[1] // 2) // ks[1] - 1))
            t1 = (min(ry, (y0 + h - 1 + ks[0] // 2) // ks[0] + 1), min(rx, (x0 + w - 1 + ks[1] // 2) // ks[1] + 1))
            sub = np.ascontiguousarray(luts[t0[0]:t1[0], t0[1]:t1[1]])
            out = dask.delayed(_clahe_block)(blocks[i, j], y0, x0, sub, t0, gray, ks, (ry, rx))
            row.append(da.from_delayed(out, (h, w), dtype=np.min_scalar_type(NR_OF_GRAY)))
        rows.append(row)
    mapped = da.block(rows)
    rmin, rmax = (float(v) for v in dask.compute(mapped.min(), mapped.max()))
    return mapped.map_blocks(_rescale_block, rmin, rmax, dtype=np.float32)


# ------------------------------------------------------------------------------------------ dispatch + CLI


def resolve_parameters(method: str, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The parameters of ``method``: the ``preset``'s (Table S1) updated by explicit, non-None ``overrides``.

    Raises
    ------
    ConfigError
        Unknown method or preset, a parameter the method does not take, or no parameter at all.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    params: dict[str, Any] = {}
    if preset is not None:
        key = str(preset).lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        params.update(PRESETS[key][method])
    given = {k: v for k, v in overrides.items() if v is not None}
    wrong = sorted(set(given) - set(PARAMETERS[method]))
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ConfigError(f"{flags} does not apply to {method}; it takes "
                          f"{', '.join('--' + p.replace('_', '-') for p in PARAMETERS[method])}")
    params.update(given)
    main = PARAMETERS[method][0]
    if method == "clahe":
        if "grid" not in params and "kernel_size" not in params:
            raise ConfigError("clahe needs --grid or --kernel-size (or --preset actin|tubulin|caveolae|pxn)")
        params.setdefault("clip_limit", CLAHE_CLIP_LIMIT)
        params.setdefault("nbins", CLAHE_NBINS)
        if "kernel_size" in params:
            params.pop("grid", None)  # an explicit region size wins over the preset's grid
    elif main not in params:
        raise ConfigError(f"{method} needs --{main} (or --preset actin|tubulin|caveolae|pxn)")
    return params


def baseline(method: str, image: Any, **params: Any) -> da.Array:
    """Apply one baseline (``gaussian``, ``rolling-ball``, ``tophat``, ``clahe``) to a 2-D image lazily."""
    if method == "gaussian":
        return gaussian(image, params["sigma"])
    if method == "rolling-ball":
        return rolling_ball(image, params["radius"])
    if method == "tophat":
        return white_tophat(image, params["size"])
    if method == "clahe":
        return clahe(image, grid=params.get("grid"), kernel_size=params.get("kernel_size"),
                     clip_limit=params.get("clip_limit", CLAHE_CLIP_LIMIT), nbins=params.get("nbins", CLAHE_NBINS))
    raise ConfigError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")


def _halo(method: str, params: Mapping[str, Any]) -> int | str:
    if method == "gaussian":
        return int(math.ceil(float(params["sigma"]) * _TRUNCATE))
    if method == "rolling-ball":
        return rolling_ball_halo(float(params["radius"]))
    if method == "tophat":
        return tophat_halo(int(params["size"]))
    return "global region table (no halo)"


def run_baseline(method: str, input: str | Path, output: str | Path, *, channels: Sequence[str],
                 preset: str | None = None, overwrite: bool = False, chunks: int | None = None,
                 resume: bool = False, command: str | None = None, **overrides: Any) -> Path:
    """Apply a baseline to channels of an image, plate or folder and write float32 OME-Zarr in the same layout.

    Parameters
    ----------
    method : {"gaussian", "rolling-ball", "tophat", "clahe"}
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    input, output : path
        OME-Zarr image, HCS plate or folder; the output keeps the layout.
    channels : sequence of str
        Channels to filter (each independently); the output holds only these.
    preset : {"actin", "tubulin", "caveolae", "pxn"}, optional
        Table S1 parameters; explicit ``overrides`` win.
    resume : bool
        Finish an interrupted run with the same options: only unfinished blocks are computed.
    **overrides
        ``sigma``, ``radius``, ``size``, ``grid``, ``kernel_size``, ``clip_limit``, ``nbins``.
    """
    from l2l_scale.io.output import check_output
    from l2l_scale.io.prov import provenance
    from l2l_scale.io.read import dataset_kind, list_images, open_image, select_channels
    from l2l_scale.preprocess.dataset import _plane_image, _yx_chunk, write_dataset

    params = resolve_parameters(method, preset, **overrides)
    channels = [str(c) for c in channels]
    if not channels:
        raise ConfigError("no channel given; name the channel(s) to filter with --channel")
    input, output = Path(input), Path(output)
    kind = dataset_kind(input)
    refs = list_images(input)
    check_output(output, overwrite=overwrite, inputs=[input])
    # Validate every field before computing anything (CLAHE runs two passes while building its graph).
    images = []
    for ref in refs:
        img = _plane_image(open_image(ref.path), ref.path)
        select_channels(img, channels)
        images.append((ref, img))
    record = {"method": method, "preset": preset, "channels": channels, **params, "halo": _halo(method, params)}
    items = []
    for ref, img in images:
        planes = [baseline(method, img.sel(c=ch), **params) for ch in channels]
        out = xr.DataArray(da.stack(planes), dims=("c", "y", "x"),
                           coords={"c": channels, "y": img.coords["y"].values, "x": img.coords["x"].values},
                           attrs={"pixel_size": dict(img.attrs.get("pixel_size") or {})})
        items.append((ref.key, out, provenance(record, str(ref.path), command=command, baseline=record)))
    chunk = chunks or _yx_chunk(images[0][1])
    root = provenance(record, str(input), command=command, baseline=record) if kind == "plate" else None
    return write_dataset(kind, items, output, root_provenance=root, overwrite=overwrite, resume=resume,
                         inputs=[input], chunks=chunk, label=f"{method}")
