"""Estimating the shift between two channels from a coarse guess and foreground patches (``phase`` or the
paper's ``ssim`` search; the method is described in :mod:`l2l_scale.preprocess.drift`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.preprocess.drift.shift import _dask2d


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


# ------------------------------------------------------------------------------------------------- halos


def gaussian_halo(sigma: float, truncate: float = 4.0) -> int:
    """Radius of scipy's Gaussian kernel, ``int(truncate * sigma + 0.5)``: the halo a smoothed patch needs."""
    return int(truncate * float(sigma) + 0.5) if sigma > 0 else 0


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
