"""Drift correction: estimate the translation between sequential acquisitions, apply it lazily, crop.

Label2label pairs are often acquired sequentially (one label after the other, or a Noise2Noise repeat), so the
stage may drift between them. ``l2l-scale register`` estimates one translation per moving channel and field,
applies it as a Dask graph and crops every channel to their common region (Kölln et al. 2022, Methods "Image
drift correction").

Sign convention
---------------
A shift ``(dy, dx)`` is what is *applied to the moving channel* to register it onto the reference (the
convention of :func:`skimage.registration.phase_cross_correlation` and :func:`scipy.ndimage.shift`):
``registered(y, x) = moving(y - dy, x - dx)``. Content that sits at ``p`` in the reference and at ``p + d`` in
the moving channel (a stage drift ``d``) gives the shift ``-d``; :func:`l2l_scale.synthetic.simulate` with
``drift=d`` is registered by ``-d``.

Estimation reads a coarse pyramid level and a sample of patches, never the whole image
------------------------------------------------------------------------------------
1. *Coarse guess.* The finest pyramid level whose larger side is at most ``COARSE_MAX`` px (a central crop of
   that size when the image has no such level) is read for both channels, and their cross-correlation gives a
   first estimate that may be large (up to about a quarter of the coarse image; the images are tapered with a
   Tukey window, which unlike a Hann window keeps structure near the edges). The pyramid's 2x means are
   centred identically for both channels, so the coarse shift scales exactly by the level's factor.
2. *Foreground patches.* Patch positions are drawn at random (``seed``) from non-background areas of the
   reference's coarse level, with CSBDeep's ``no_background_patches`` rule (a patch-sized maximum filter above
   0.4 of the 99.9th percentile; we subtract the 1st percentile first, so a camera offset does not make every
   pixel "foreground"). Only these windows are read at full resolution, the moving one displaced by the coarse
   guess rounded to whole pixels.
3. *Refinement*, by one of two methods:

   ``phase`` (default, sub-pixel)
       Each patch pair (128 px; larger when the coarse level is very coarse) is Gaussian-smoothed
       (sigma = 2), mean-subtracted and Hann-windowed; the cross-power spectra of all pairs are *summed* and
       the peak of their sum is located to 1/100 px with :func:`skimage.registration.phase_cross_correlation`
       (upsampled DFT; the summed spectrum is passed in Fourier space against a unit spectrum). We use the
       plain cross-power (``normalization=None``): spectral whitening (``"phase"``) amplifies the pixel noise
       of fluorescence patches and was measured to bias estimates toward whole pixels by 0.1-0.4 px;
       without the Hann window the patch edges cause a similar bias. Summing spectra rather than taking the
       median of per-patch shifts halved the error (measured on simulated actin: <= 0.04 px). The windowed
       estimate is unbiased only for small residuals, so if its whole-pixel part differs from the offset the
       patches were read at, the moving patches are read again at the new offset (at most ``_PHASE_ITER``
       rounds; one when the coarse guess is within half a pixel).
   ``ssim`` (the paper's method, whole pixels)
       Gaussian sigma = 2; 60 x 60 patch pairs (100 by default); the moving patch is displaced by every
       ``(i, j)`` in ``[-5, 5]^2`` so that both are cut to 50 x 50; the mean SSIM (Gaussian window 11,
       sigma 1.5, Wang et al. constants, each channel normalised to its coarse-level 1st/99.9th percentile so
       the data range is 1) is averaged over patches and the best displacement wins. If the best lies on the
       edge of the search window, the search is re-centred there (at most ``_SSIM_RECENTRE`` times), so the
       coarse guess only has to be within a few pixels. SSIM maps are computed for all 121 displacements of a
       patch at once; they equal :func:`skimage.metrics.structural_similarity` (tested).

All patch windows carry a halo of ``int(4 sigma + 0.5)`` px (scipy's Gaussian radius) that is cropped after
smoothing, so a smoothed patch equals the same region of the smoothed whole image.

Applying the shift
------------------
:func:`shift_image` runs :func:`scipy.ndimage.shift` (``mode="nearest"``) through ``map_overlap`` with
``boundary="none"`` and a halo derived by :func:`shift_halo` from the shift and the interpolation order: the
whole-pixel part of the shift, plus the interpolation kernel's reach, plus for spline orders >= 2 the length
after which the spline prefilter's impulse response has decayed below ``_SPLINE_TOL``. For orders 0 and 1 the
tiled result therefore equals ``scipy.ndimage.shift`` of the whole image exactly; for order 3 within 1e-6 of
the data range. The default order 1 (bilinear) keeps each output pixel a convex combination of input pixels.
Every channel is then cropped to the region where all moving channels have data (no extrapolated pixels).
Integer inputs keep their dtype (interpolated values are rounded). Whole-pixel shifts (``ssim``) crop only.

Channels not named as moving are kept and treated as aligned with the reference (acquired simultaneously
with it, like ``phalloidin`` and ``truth`` next to ``AC-15`` in the simulated data). With ``moving_image`` the
moving channels come from a second acquisition of the same field(s); they are appended to the first image's
channels (renamed ``<name>-moving`` if the name is taken).

The estimated shifts are printed by the CLI and stored in the output's provenance under ``registration``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from l2l_scale.errors import ChannelError, ConfigError, InputError

__all__ = [
    "METHODS",
    "ShiftEstimate",
    "common_region",
    "estimate_shift",
    "gaussian_halo",
    "register",
    "shift_halo",
    "shift_image",
    "ssim_search",
    "write_dataset",
]

METHODS = ("phase", "ssim")
DEFAULT_PATCHES = 100  # paper: 100 patch pairs per image
PHASE_PATCH = 128
SSIM_PATCH = 60  # paper: 60 x 60 patches ...
SSIM_SEARCH = 5  # ... displaced by up to +-5 px: 50 x 50 compared
SSIM_WIN = 11  # paper: SSIM filter size 11, sigma 1.5
SSIM_SIGMA = 1.5
SMOOTH_SIGMA = 2.0  # paper: Gaussian sigma = 2 before the comparison
COARSE_MAX = 1024  # the coarse guess uses the finest pyramid level with both sides <= this (our top level)
FOREGROUND_THRESHOLD = 0.4  # CSBDeep no_background_patches(threshold=0.4, percentile=99.9)
FOREGROUND_PERCENTILE = 99.9
UPSAMPLE = 100  # phase correlation resolution: 1/100 px
_SSIM_TRUNCATE = 3.5  # skimage: truncate=3.5 with sigma=1.5 gives the 11-px window
_SSIM_RECENTRE = 3
_PHASE_ITER = 3  # phase refinement rounds at most (a new round only if the whole-pixel offset changed)
_BATCH = 10  # patches per task
_SPLINE_TOL = 1e-6
# Largest |pole| of the B-spline prefilter per order (Unser 1999): its impulse response decays like |z|^n.
_SPLINE_POLE = {2: 3.0 - math.sqrt(8.0), 3: 2.0 - math.sqrt(3.0), 4: 0.361341225900220177,
                5: 0.430575347099973791}


# ------------------------------------------------------------------------------------------------- halos


def gaussian_halo(sigma: float, truncate: float = 4.0) -> int:
    """Radius of scipy's Gaussian kernel, ``int(truncate * sigma + 0.5)``: the halo a smoothed patch needs."""
    return int(truncate * float(sigma) + 0.5) if sigma > 0 else 0


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


# --------------------------------------------------------------------------------------------- estimation


@dataclass
class ShiftEstimate:
    """The result of :func:`estimate_shift`.

    Attributes
    ----------
    shift : (float, float)
        ``(dy, dx)`` to apply to the moving channel (see the module notes for the sign).
    method : str
        ``"phase"`` or ``"ssim"``.
    coarse : (float, float)
        The coarse-level guess, in full-resolution pixels.
    n_patches : int
        Foreground patch pairs used.
    score : float, optional
        Mean SSIM at the chosen displacement (``ssim`` only).
    """

    shift: tuple[float, float]
    method: str
    coarse: tuple[float, float]
    n_patches: int
    score: float | None = None

    def as_dict(self) -> dict:
        """JSON-ready form for the provenance."""
        out = {"shift": [float(v) for v in self.shift], "method": self.method,
               "coarse": [round(float(v), 3) for v in self.coarse], "n_patches": int(self.n_patches)}
        if self.score is not None:
            out["mean_ssim"] = round(float(self.score), 6)
        return out


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


def _hann(n: int) -> np.ndarray:
    w = np.hanning(n)
    return np.outer(w, w)


def _smooth_crop(win: np.ndarray, sigma: float, halo: int) -> np.ndarray:
    win = np.asarray(win, dtype=np.float64)
    if sigma > 0:
        win = ndimage.gaussian_filter(win, sigma, truncate=4.0)
    return win[halo:win.shape[0] - halo, halo:win.shape[1] - halo] if halo else win


def _cross_power(ref: np.ndarray, mov: np.ndarray, window: np.ndarray) -> np.ndarray:
    r = (ref - ref.mean()) * window
    m = (mov - mov.mean()) * window
    return np.fft.fft2(r) * np.conj(np.fft.fft2(m))


def _peak_shift(cross_power: np.ndarray, upsample: int) -> np.ndarray:
    """Sub-pixel peak of a cross-power spectrum, via skimage's upsampled DFT (public API, Fourier space)."""
    from skimage.registration import phase_cross_correlation

    shift = phase_cross_correlation(cross_power, np.ones_like(cross_power), space="fourier",
                                    upsample_factor=upsample, normalization=None)[0]
    return np.asarray(shift, dtype=np.float64)


def _phase_batch(pairs: list, sigma: float, halo: int, size: int) -> np.ndarray:
    window = _hann(size)
    acc = np.zeros((size, size), np.complex128)
    for ref, mov in pairs:
        acc += _cross_power(_smooth_crop(ref, sigma, halo), _smooth_crop(mov, sigma, halo), window)
    return acc


def ssim_search(ref: np.ndarray, mov: np.ndarray, search: int = SSIM_SEARCH, *, data_range: float = 1.0,
                win_size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Mean SSIM of a reference patch against every displacement of a moving patch (the paper's search).

    Parameters
    ----------
    ref, mov : numpy.ndarray
        Equal-sized patches (e.g. 60 x 60).
    search : int
        Displacements ``(i, j)`` in ``[-search, search]^2``; both patches are cut to ``size - 2 * search``
        (50 x 50 for the paper's values): ``ref[s:-s, s:-s]`` against ``mov[s+i:-s+i, s+j:-s+j]``.
    data_range, win_size, sigma
        As :func:`skimage.metrics.structural_similarity` with ``gaussian_weights=True`` and
        ``use_sample_covariance=False`` (Wang et al. 2004), which this equals.

    Returns
    -------
    numpy.ndarray
        ``(2 search + 1, 2 search + 1)`` mean SSIM, indexed by ``(i + search, j + search)``.
    """
    s = int(search)
    ny, nx = ref.shape
    if mov.shape != ref.shape or min(ny, nx) - 2 * s < win_size:
        raise ConfigError(f"patches of shape {ref.shape} are too small for a +-{s} px search with an SSIM "
                          f"window of {win_size}; use larger patches")
    core = np.asarray(ref, np.float64)[s:ny - s, s:nx - s]
    mov = np.asarray(mov, np.float64)
    stack = np.stack([mov[s + i:ny - s + i, s + j:nx - s + j] for i in range(-s, s + 1) for j in range(-s, s + 1)])
    # skimage filters with a Gaussian of radius int(3.5 * 1.5 + 0.5) = 5 (the 11-px window) and averages the
    # SSIM map without its (win_size - 1) / 2 border, so every averaged value depends only on pixels inside
    # the patch and the boundary mode does not matter.
    truncate = ((win_size - 1) // 2) / sigma

    def g(x):
        return ndimage.gaussian_filter(x, sigma, truncate=truncate, mode="reflect", axes=(-2, -1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = g(core), g(stack)
    uxx, uyy, uxy = g(core * core), g(stack * stack), g(core[None] * stack)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    smap = smap[:, pad:smap.shape[1] - pad, pad:smap.shape[2] - pad]
    return smap.mean(axis=(1, 2), dtype=np.float64).reshape(2 * s + 1, 2 * s + 1)


def _ssim_batch(pairs: list, sigma: float, halo: int, search: int, norm_r: tuple, norm_m: tuple) -> np.ndarray:
    acc = np.zeros((2 * search + 1,) * 2)
    for ref, mov in pairs:
        r = (_smooth_crop(ref, sigma, halo) - norm_r[0]) / norm_r[1]
        m = (_smooth_crop(mov, sigma, halo) - norm_m[0]) / norm_m[1]
        acc += ssim_search(r, m, search)
    return acc


def _coarse_pair(ref_c: Any, mov_c: Any, ref0: da.Array) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """Read the coarse images: (ref, mov, factor per axis, offset per axis in full-resolution pixels)."""
    if ref_c is None:
        # No pyramid level given: a central crop of the full-resolution image is the coarse image (factor 1).
        ny, nx = ref0.shape
        cy, cx = min(ny, COARSE_MAX), min(nx, COARSE_MAX)
        y0, x0 = (ny - cy) // 2, (nx - cx) // 2
        return None, None, (1, 1), (y0, x0, cy, cx)  # type: ignore[return-value]
    rc, mc = _dask2d(ref_c), _dask2d(mov_c)
    if rc.shape != mc.shape:
        raise InputError(f"coarse levels differ in shape ({rc.shape} vs {mc.shape}); the images do not match")
    factor = tuple(max(1, int(round(n0 / nc))) for n0, nc in zip(ref0.shape, rc.shape))
    return rc, mc, factor, (0, 0, rc.shape[0], rc.shape[1])


def estimate_shift(reference: Any, moving: Any, *, method: str = "phase", reference_coarse: Any = None,
                   moving_coarse: Any = None, n_patches: int = DEFAULT_PATCHES, patch: int | None = None,
                   sigma: float = SMOOTH_SIGMA, search: int = SSIM_SEARCH, upsample: int = UPSAMPLE,
                   max_shift: float | None = None, seed: int | Sequence[int] = 0) -> ShiftEstimate:
    """Estimate the translation that registers ``moving`` onto ``reference``.

    Parameters
    ----------
    reference, moving : xarray.DataArray, dask.array.Array or numpy.ndarray
        Full-resolution 2-D (y, x) images of the same shape. Only patches of them are read.
    method : {"phase", "ssim"}
        Sub-pixel cross-correlation of summed patch spectra (default), or the paper's SSIM search (whole
        pixels). See the module notes.
    reference_coarse, moving_coarse : array-like, optional
        The same images at a coarse pyramid level (2^k downsampled), for the first guess and for finding
        foreground. Without them a central ``COARSE_MAX``-px crop of the full-resolution images is used.
    n_patches : int
        Foreground patch pairs (paper: 100).
    patch : int, optional
        Patch side: default 128 for ``phase`` (at least 8x the coarse factor) and 60 for ``ssim``.
    sigma : float
        Gaussian smoothing before comparing (paper: 2).
    search : int
        SSIM search radius in px (paper: 5).
    upsample : int
        Phase correlation resolution, ``1/upsample`` px.
    max_shift : float, optional
        Largest plausible shift in px (default: a quarter of the smaller image side).
    seed : int or sequence of int
        Seed of the patch positions.

    Returns
    -------
    ShiftEstimate

    Raises
    ------
    InputError
        Shapes differ, no foreground is found, or the shift exceeds ``max_shift`` / leaves no overlap.
    ConfigError
        Unknown method or invalid numbers.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown registration method {method!r}; use one of {', '.join(METHODS)}")
    if int(n_patches) < 1:
        raise ConfigError(f"n_patches={n_patches} must be at least 1 (paper: 100)")
    ref0, mov0 = _dask2d(reference), _dask2d(moving)
    if ref0.shape != mov0.shape:
        raise InputError(f"reference and moving images differ in shape ({ref0.shape} vs {mov0.shape}); register "
                         "acquisitions of the same field at the same size")
    ny, nx = ref0.shape
    limit = float(max_shift) if max_shift is not None else min(ny, nx) / 4.0
    if not limit > 0:
        raise ConfigError(f"max shift {max_shift} must be positive (pixels)")
    rng = np.random.default_rng(seed)

    # --- 1. coarse guess ------------------------------------------------------------------------------------
    rc, mc, factor, (oy, ox, cy, cx) = _coarse_pair(reference_coarse, moving_coarse, ref0)
    if rc is None:
        rc, mc = ref0[oy:oy + cy, ox:ox + cx], mov0[oy:oy + cy, ox:ox + cx]
    rc, mc = (np.asarray(a, dtype=np.float64) for a in dask.compute(rc, mc))
    rcs, mcs = ndimage.gaussian_filter(rc, 1.0), ndimage.gaussian_filter(mc, 1.0)
    # A Tukey window only tapers the borders: a Hann window would hide structure near the image edges, which
    # may be all there is (a field showing the corner of one cell).
    coarse = _peak_shift(_cross_power(rcs, mcs, _tukey(rcs.shape)), 10) * np.asarray(factor, float)
    _check_limit(coarse, limit, "coarse estimate")
    guess = -np.round(coarse).astype(int)  # whole-pixel drift: reference content at p is near p + guess in moving

    # --- 2. foreground patch positions -----------------------------------------------------------------------
    lo, hi = np.percentile(rcs, [1.0, FOREGROUND_PERCENTILE])
    if not hi > lo:
        raise InputError("reference channel is constant at the coarse level; no structure to register on, check "
                         "the channel selection")
    size = int(patch or (max(PHASE_PATCH, 8 * max(factor)) if method == "phase" else SSIM_PATCH))
    halo = gaussian_halo(sigma)
    # Slack for re-reading the moving patches around an improved whole-pixel guess.
    slack = search * (_SSIM_RECENTRE + 1) if method == "ssim" else max(4, size // 16)
    reach = max(1, size // (2 * max(factor)))
    mask = ndimage.maximum_filter(rcs, size=reach) - lo > FOREGROUND_THRESHOLD * (hi - lo)
    cand = np.argwhere(mask)
    order = rng.permutation(len(cand))
    need = halo + slack
    starts = []
    for idx in order:
        j, i = cand[idx]
        y0 = oy + int(j) * factor[0] + int(rng.integers(factor[0])) - size // 2
        x0 = ox + int(i) * factor[1] + int(rng.integers(factor[1])) - size // 2
        ok = all(need <= p and p + size + need <= n and need <= p + g and p + g + size + need <= n
                 for p, g, n in ((y0, guess[0], ny), (x0, guess[1], nx)))
        if ok:
            starts.append((y0, x0))
            if len(starts) == n_patches:
                break
    if not starts:
        raise InputError(f"no foreground patch of {size} px fits both channels at drift {guess.tolist()} px; check "
                         "the channel selection, or the image is too small for the shift")

    # --- 3. refinement on full-resolution patches --------------------------------------------------------------
    def windows(offset):
        pairs = []
        for y0, x0 in starts:
            ref_w = ref0[y0 - halo:y0 + size + halo, x0 - halo:x0 + size + halo]
            my, mx = y0 + offset[0], x0 + offset[1]
            mov_w = mov0[my - halo:my + size + halo, mx - halo:mx + size + halo]
            pairs.append((ref_w, mov_w))
        return [pairs[k:k + _BATCH] for k in range(0, len(pairs), _BATCH)]

    from l2l_scale.cluster import compute_with_progress

    score = None
    if method == "phase":
        offset = guess.copy()
        for _ in range(_PHASE_ITER):
            tasks = [dask.delayed(_phase_batch)(b, sigma, halo, size) for b in windows(offset)]
            spectrum = sum(compute_with_progress(tasks, f"phase correlation ({len(starts)} patches)"))
            shift = _peak_shift(spectrum, upsample) - offset
            better = -np.round(shift).astype(int)
            # The windowed estimate is unbiased only for small residuals: if the whole-pixel part moved, read
            # the moving patches again at the new offset (rarely needed: the coarse guess is usually < 0.5 px off).
            if np.array_equal(better, offset) or np.any(np.abs(better - guess) > slack):
                break
            offset = better
    else:
        norm_r = _norm(rcs)
        norm_m = _norm(mcs)
        offset = guess.copy()
        for _ in range(_SSIM_RECENTRE + 1):
            tasks = [dask.delayed(_ssim_batch)(b, sigma, halo, search, norm_r, norm_m) for b in windows(offset)]
            table = sum(compute_with_progress(tasks, f"SSIM search ({len(starts)} patches)")) / len(starts)
            best = np.unravel_index(int(np.argmax(table)), table.shape)
            step = np.asarray(best) - search
            score = float(table[best])
            if np.all(np.abs(step) < search):
                break
            offset = offset + step  # the best lies on the edge of the window: search again around it
        shift = -(offset + step).astype(float)
    _check_limit(shift, limit, "estimated shift")
    shift = np.round(shift, 4) + 0.0  # the estimate is on a 1/upsample grid; + 0.0 drops -0.0
    return ShiftEstimate((float(shift[0]), float(shift[1])), method, (float(coarse[0]), float(coarse[1])),
                         len(starts), score)


def _tukey(shape: tuple[int, int], alpha: float = 0.2) -> np.ndarray:
    from scipy.signal.windows import tukey

    return np.outer(tukey(shape[0], alpha), tukey(shape[1], alpha))


def _norm(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1.0, FOREGROUND_PERCENTILE])
    return float(lo), float(hi - lo) if hi > lo else 1.0


def _check_limit(shift: np.ndarray, limit: float, what: str) -> None:
    if np.max(np.abs(shift)) > limit:
        raise InputError(f"{what} ({shift[0]:.1f}, {shift[1]:.1f}) px exceeds the maximum shift of {limit:g} px; "
                         "check that both channels show the same field, or raise --max-shift if the drift is real")


# ------------------------------------------------------------------------------------------ dataset level


def write_dataset(kind: str, items: Sequence[tuple[str, xr.DataArray, Mapping[str, Any]]], output: str | Path, *,
                  root_provenance: Mapping[str, Any] | None = None, overwrite: bool = False, resume: bool = False,
                  inputs: Sequence[str | Path] = (), chunks: Any = None, label: str = "writing") -> Path:
    """Write one output image per input image, in the input's layout (image, HCS plate, or folder).

    All images, blocks and pyramid levels are written in one run (:func:`l2l_scale.cluster.compute_waves`).

    Parameters
    ----------
    kind : {"image", "plate", "well", "folder"}
        The input's :func:`~l2l_scale.io.read.dataset_kind`. A plate is written as a plate with the same
        row/column/field layout, a folder (or well) as a folder of ``<key>.zarr`` images.
    items : sequence of (key, image, provenance)
        ``key`` as in :func:`~l2l_scale.io.read.list_images`; each image gets its own provenance (e.g. its
        own registration shifts).
    output : path
        Written atomically: it appears only when every image is complete.
    root_provenance : mapping, optional
        Stored on the plate group (plates only).
    resume : bool
        Finish an interrupted run with the same options: only blocks without a completion record are written.
    chunks : int or mapping, optional
        y/x chunk size, see :func:`~l2l_scale.io.write.write_image`.
    """
    import zarr

    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.output import PROGRESS_DIR, atomic_output, check_run
    from l2l_scale.io.write import image_write_tasks, split_field_key, write_plate_layout
    from l2l_scale.io.blockwrite import BlockWriter

    output = Path(output)
    # What the images are made of; when and by which command line they were made may differ on resume.
    run = {key: {k: v for k, v in prov.items() if k not in ("created", "command")} for key, _, prov in items}
    with atomic_output(output, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        progress = tmp / PROGRESS_DIR
        if resume:
            check_run(progress, {"images": run}, output, resume)
        if kind == "plate":
            layout: dict[tuple[str, str], list[str]] = {}
            for key, _, _ in items:
                r, c, f = split_field_key(key)
                layout.setdefault((r, c), []).append(f)
            root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            write_plate_layout(root, {rc: sorted(f, key=int) for rc, f in layout.items()},
                               name=output.name.removesuffix(".zarr"),
                               attrs_extra={"l2l_scale": dict(root_provenance)} if root_provenance else None)

        def units():
            for key, img, prov in items:
                if kind == "image":
                    dest, name = tmp, output.name.removesuffix(".zarr")
                elif kind == "plate":
                    r, c, f = split_field_key(key)
                    dest, name = tmp / r / c / f, f"{r}{c}-{f}"
                else:
                    dest, name = tmp / f"{key}.zarr", key
                yield image_write_tasks(dest, img, writer, unit=key, chunks=chunks, name=name, resume=resume,
                                        attrs_extra={"l2l_scale": dict(prov)} if prov else None)

        writer = BlockWriter(progress if resume else None)
        compute_waves(units(), label, n_units=len(items), unit_name="fields" if kind == "plate" else "images")
    return output


def _plane_image(img: xr.DataArray, path: Any) -> xr.DataArray:
    """The (c, y, x) view of an image whose other axes (t, z) are singletons."""
    if not {"y", "x"} <= set(img.dims):
        raise InputError(f"{path}: image has no y/x axes; register handles 2-D fields")
    extra = [d for d in img.dims if d not in ("c", "y", "x")]
    big = [d for d in extra if img.sizes[d] > 1]
    if big:
        raise InputError(f"{path}: image has {', '.join(f'{d}={img.sizes[d]}' for d in big)}; register handles 2-D "
                         "fields, convert one plane per image")
    img = img.isel({d: 0 for d in extra}, drop=True)
    if "c" not in img.dims:
        img = img.expand_dims("c").assign_coords(c=["0"])
    return img.transpose("c", "y", "x")


def _coarse_level(path: Path) -> int | None:
    """Index of the finest pyramid level with both sides <= COARSE_MAX (None: the image has no such level)."""
    from l2l_scale.io.read import open_image

    img0 = open_image(path)
    for level in range(int(img0.attrs["n_levels"])):
        lvl = open_image(path, level)
        if max(lvl.sizes["y"], lvl.sizes["x"]) <= COARSE_MAX:
            return level
    return None


def _same_geometry(a: xr.DataArray, b: xr.DataArray, pa: Any, pb: Any) -> None:
    if (a.sizes["y"], a.sizes["x"]) != (b.sizes["y"], b.sizes["x"]):
        raise InputError(f"{pb}: image is {b.sizes['y']} x {b.sizes['x']} px but {pa} is {a.sizes['y']} x "
                         f"{a.sizes['x']}; register acquisitions of the same field at the same size")
    psa, psb = a.attrs.get("pixel_size") or {}, b.attrs.get("pixel_size") or {}
    for d in ("y", "x"):
        va, vb = float(psa.get(d, 1.0)), float(psb.get(d, 1.0))
        if not math.isclose(va, vb, rel_tol=1e-6):
            raise InputError(f"{pb}: pixel size {vb:g} differs from {va:g} in {pa}; resample one acquisition to the "
                             "other's pixel size before registering")


def register(input: str | Path, output: str | Path, *, reference: str, moving: Sequence[str], method: str = "phase",
             moving_image: str | Path | None = None, max_shift: float | None = None,
             n_patches: int = DEFAULT_PATCHES, order: int = 1, seed: int = 0, overwrite: bool = False,
             chunks: int | None = None, resume: bool = False) -> dict[str, dict]:
    """Register channels of an image, plate or folder onto a reference channel and write the result.

    Parameters
    ----------
    input, output : path
        OME-Zarr image, HCS plate or folder; the output keeps the layout, and every field gets its own shifts.
    reference : str
        Reference channel name (it is never moved).
    moving : sequence of str
        Channels to register. With ``moving_image`` they are channels of that image.
    method : {"phase", "ssim"}
        See :func:`estimate_shift`.
    moving_image : path, optional
        A second acquisition of the same field(s) (same layout, shape and pixel size) to take the moving
        channels from; they are appended to the output (``<name>-moving`` if the name is taken).
    max_shift : float, optional
        Largest plausible shift in px (default: a quarter of the smaller side); larger estimates are errors.
    n_patches : int
        Foreground patch pairs per estimate (paper: 100).
    order : int
        Interpolation order of the applied shift (default 1; ``ssim`` shifts are whole pixels: crop only).
    seed : int
        Patch sampling seed (combined with each field's key).
    overwrite : bool
        Replace an existing output.
    resume : bool
        Finish an interrupted run with the same options (see :func:`write_dataset`).
    chunks : int, optional
        Output chunk side (default: the input's).

    Returns
    -------
    dict
        ``{field key: {"reference", "method", "order", "shifts": {channel: [dy, dx]}, "estimates": {...},
        "crop": {"y": [start, stop], "x": [...]}}}`` (key ``""`` for a single image).
    """
    from l2l_scale.io.output import check_output
    from l2l_scale.io.prov import provenance
    from l2l_scale.io.read import dataset_kind, list_images, open_image, select_channels

    input, output = Path(input), Path(output)
    moving = [str(m) for m in moving]
    if method not in METHODS:
        raise ConfigError(f"unknown registration method {method!r}; use one of {', '.join(METHODS)}")
    if not moving:
        raise ConfigError("no moving channel given; name the channels to register with --moving")
    if moving_image is None and reference in moving:
        raise ConfigError(f"channel {reference!r} is both the reference and a moving channel; drop it from --moving")
    shift_halo((0.0, 0.0), order)  # validates the order
    inputs = [input] + ([Path(moving_image)] if moving_image is not None else [])
    kind = dataset_kind(input)
    refs = list_images(input)
    check_output(output, overwrite=overwrite, inputs=inputs)  # fail before any computation
    mrefs = None
    if moving_image is not None:
        mkind = dataset_kind(moving_image)
        mlist = list_images(moving_image)
        mrefs = {r.key: r for r in mlist}
        if mkind != kind or set(mrefs) != {r.key for r in refs}:
            raise InputError(f"{moving_image}: its layout ({mkind}, {len(mlist)} images) does not match {input} "
                             f"({kind}, {len(refs)} images); give a moving image with the same fields")

    params = {"reference": reference, "moving": moving, "method": method, "moving_image": moving_image,
              "max_shift": max_shift, "n_patches": n_patches, "order": order, "seed": seed}
    results: dict[str, dict] = {}
    items = []
    for ref in refs:
        img = _plane_image(open_image(ref.path), ref.path)
        names = [str(c) for c in img.coords["c"].values]
        select_channels(img, [reference])
        level = _coarse_level(ref.path)
        if mrefs is None:
            mov_img, mpath, mlevel = img, ref.path, level
            select_channels(img, moving)
        else:
            mpath = mrefs[ref.key].path
            mov_img = _plane_image(open_image(mpath), mpath)
            _same_geometry(img, mov_img, ref.path, mpath)
            select_channels(mov_img, moving)
            mlevel = _coarse_level(mpath)
        ref_c = mov_c = None
        if level is not None and level == mlevel:
            ref_c = _plane_image(open_image(ref.path, level), ref.path).sel(c=reference)
            mov_c = _plane_image(open_image(mpath, level), mpath)
        field_seed = [int(seed), zlib.crc32(ref.key.encode())]
        estimates = {}
        for ch in moving:
            est = estimate_shift(img.sel(c=reference), mov_img.sel(c=ch), method=method,
                                 reference_coarse=ref_c, moving_coarse=None if mov_c is None else mov_c.sel(c=ch),
                                 n_patches=n_patches, max_shift=max_shift, seed=field_seed)
            estimates[ch] = est
        shape = (img.sizes["y"], img.sizes["x"])
        ys, xs = common_region(shape, [e.shift for e in estimates.values()])
        channels, out_names = [], []
        for name in names:
            arr = img.sel(c=name).data
            if mrefs is None and name in estimates:
                channels.append(_shifted_crop(arr, estimates[name].shift, ys, xs, order))
            else:
                channels.append(arr[ys, xs])
            out_names.append(name)
        out_moving = {}
        if mrefs is not None:
            for ch in moving:
                new = ch if ch not in out_names else f"{ch}-moving"
                if new in out_names:
                    raise ChannelError(f"{mpath}: channel {ch!r} clashes with {new!r} of {ref.path}; rename one")
                data = _cast_like(mov_img.sel(c=ch).data, img.dtype)
                channels.append(_shifted_crop(data, estimates[ch].shift, ys, xs, order))
                out_names.append(new)
                out_moving[ch] = new
        out = xr.DataArray(da.stack(channels), dims=("c", "y", "x"),
                           coords={"c": out_names, "y": img.coords["y"].values[ys], "x": img.coords["x"].values[xs]},
                           attrs={"pixel_size": dict(img.attrs.get("pixel_size") or {})})
        info = {
            "reference": reference,
            "method": method,
            "order": order if any(not float(v).is_integer() for e in estimates.values() for v in e.shift)
            else "whole-pixel shifts: cropped, not interpolated",
            "shifts": {out_moving.get(ch, ch): list(e.shift) for ch, e in estimates.items()},
            "estimates": {out_moving.get(ch, ch): e.as_dict() for ch, e in estimates.items()},
            "crop": {"y": [ys.start, ys.stop], "x": [xs.start, xs.stop]},
            "convention": "registered(y, x) = moving(y - dy, x - dx)",
        }
        if mrefs is not None:
            info["moving_image"] = str(mpath)
        results[ref.key] = info
        prov = provenance(params, [str(ref.path)] + ([str(mpath)] if mrefs is not None else []),
                          registration=info)
        items.append((ref.key, out, prov))
    chunk = chunks or _yx_chunk(open_image(refs[0].path))
    root = provenance(params, [str(p) for p in inputs], registration={"fields": results}) if kind == "plate" else None
    write_dataset(kind, items, output, root_provenance=root, overwrite=overwrite, resume=resume, inputs=inputs,
                  chunks=chunk, label="registering")
    return results


def _shifted_crop(arr: da.Array, shift: Sequence[float], ys: slice, xs: slice, order: int) -> da.Array:
    """The common region of a shifted channel; whole-pixel shifts are a crop of the input, no interpolation."""
    if all(float(v).is_integer() for v in shift):
        dy, dx = int(shift[0]), int(shift[1])
        return arr[ys.start - dy:ys.stop - dy, xs.start - dx:xs.stop - dx]
    return shift_image(arr, shift, order=order)[ys, xs]


def _cast_like(arr: da.Array, dtype: np.dtype) -> da.Array:
    """A second acquisition's channel in the first image's dtype (channels of one image share a dtype)."""
    if arr.dtype == dtype:
        return arr
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return da.clip(da.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def _yx_chunk(img: xr.DataArray) -> dict[str, int]:
    return {d: int(img.data.chunks[img.dims.index(d)][0]) for d in ("y", "x")}
