"""Label contrast: which of two labels is the input and which the target.

The paper (Kölln et al. 2022, Results "Label2label for reducing depolymerised beta-actin") decides the
input/target order of a label pair by their mean Michelson and RMS contrast (Peli 1990):

1. Gaussian filter, sigma = 2 px;
2. normalise to the 1st/99th percentile;
3. the brightest 10 % of the pixels are "the sample" (1 % for the STED caveolae data);
4. Michelson = (max - min) / (max + min) of the sample, RMS = standard deviation of the sample.

The label with the higher contrast is the target.

Clipping
--------
The paper does not say whether the normalised image is clipped to [0, 1]. We clip by default (Peli's contrasts
are defined for intensities in [0, 1]; without clipping a few hot pixels dominate the Michelson contrast), so the
sample maximum is 1 and Michelson = (1 - s) / (1 + s), where s is the normalised intensity at the
(1 - top_fraction) quantile. ``clip=False`` gives the unclipped variant (CSBDeep's ``normalize`` default).

A clipped sample that is no larger than the part of the image above the high percentile is all ones: with the
default 1st/99th percentiles and the paper's 1 % sample for the STED caveolae every sample pixel is 1 and the
contrast is 0 by construction, which contradicts the paper's 0.27 / 0.98. That combination raises
:class:`~l2l_scale.errors.ConfigError`. For the caveolae we use the dataset's normalisation percentiles of the
paper's Table 2, (2, 99.5): then half of the 1 % sample lies below the clip and the contrast is informative
again (see :mod:`l2l_scale.synthetic`). This is our reading, not stated in the paper.

The sample RMS of a clipped sample has a floor: the top tenth of a 10 % sample is exactly 1, so
RMS >= 0.3 x (1 - mean of the rest). Line-like target images give ~0.3, above the paper's 0.17-0.22; see the
calibration notes in :mod:`l2l_scale.synthetic`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError

__all__ = ["dataset_contrast", "image_contrast", "label_contrast", "recommend"]


def label_contrast(
    image: np.ndarray,
    *,
    sigma: float = 2.0,
    percentiles: tuple[float, float] = (1.0, 99.0),
    top_fraction: float = 0.10,
    clip: bool = True,
) -> tuple[float, float]:
    """Michelson and RMS contrast of one label image with the paper's recipe (Peli 1990).

    Parameters
    ----------
    image : array_like
        One 2-D channel (numpy, dask or xarray; singleton axes are dropped). Read fully into memory.
    sigma : float
        Gaussian filter sigma in pixels applied before everything else (paper: 2). ``0`` disables it.
    percentiles : (float, float)
        Low/high percentiles mapped to 0 and 1 (paper: 1st/99th).
    top_fraction : float
        Fraction of the brightest pixels taken as the sample (paper: 0.10; 0.01 for STED caveolae).
        The sample is exactly ``ceil(top_fraction * n_pixels)`` pixels.
    clip : bool
        Clip the normalised image to [0, 1] before sampling (default), see the module notes.

    Returns
    -------
    michelson, rms : float
        ``(max - min) / (max + min)`` and the standard deviation (``ddof=0``) of the normalised sample.

    Raises
    ------
    InputError
        If the image is not 2-D, contains non-finite values, or is constant (its low and high percentiles
        coincide), which would otherwise give NaN.
    ConfigError
        If ``sigma``, ``top_fraction`` or ``percentiles`` are out of range, or if with ``clip`` the sample would
        lie entirely above the high percentile (``top_fraction <= 1 - high / 100``), which makes the contrast 0.
    """
    lo_p, hi_p = _check_contrast_params(sigma, percentiles, top_fraction, clip)

    img = np.squeeze(np.asarray(image))
    if img.ndim != 2:
        raise InputError(f"label_contrast needs one 2-D channel, got shape {np.shape(image)}; select a single channel")
    img = img.astype(np.float64, copy=False)
    if not np.all(np.isfinite(img)):
        raise InputError("channel contains NaN or infinite values; check the channel selection or the input file")
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma)

    lo, hi = np.percentile(img, [lo_p, hi_p])
    if not hi > lo:
        raise InputError(
            f"channel is constant (its {lo_p:g}th and {hi_p:g}th percentiles are both {lo:g}), contrast is undefined; "
            "check the channel selection"
        )
    norm = (img - lo) / (hi - lo)
    if clip:
        norm = np.clip(norm, 0.0, 1.0)

    flat = norm.ravel()
    k = max(1, int(np.ceil(top_fraction * flat.size)))
    # partition, not sort: O(n) and the sample is a set, so its order does not matter.
    sample = np.partition(flat, flat.size - k)[flat.size - k:]
    vmax, vmin = float(sample.max()), float(sample.min())
    denom = vmax + vmin
    if denom <= 0:
        # Only possible when the brightest pixels sit at or below the low percentile (e.g. a negative image).
        raise InputError("brightest pixels are not above the background level, contrast is undefined; "
                         "check the channel selection")
    return (vmax - vmin) / denom, float(sample.std())


# ------------------------------------------------------------------------------ dataset level, out of core

# ``dataset_contrast`` (``l2l-scale contrast``) gives the numbers of :func:`label_contrast` for images far larger
# than memory. We compute at full resolution rather than on a pyramid level, because a 2x mean is itself a
# smoothing that would change the contrast. Each channel takes three Dask passes, every one with memory bounded
# by chunk size:
#
# 1-2. the Gaussian (``dask_image.ndfilters.gaussian_filter``, halo ceil(4 sigma) derived from sigma) in float64,
#      stored as float32, and the exact low/high percentiles *and* the threshold of the brightest
#      ``top_fraction`` (the order statistic at rank n - k, as the percentile 100 (n - k) / (n - 1)) with
#      :func:`l2l_scale.preprocess.normalize.percentiles` (exact for float32 in two histogram passes);
# 3.   the sample moments: count, sum and sum of squares of the normalised values above the threshold (the
#      sample is every pixel above it plus as many copies of the threshold as make k pixels, which is what
#      ``np.partition`` selects), and the maximum for the unclipped Michelson contrast.
#
# The only difference from :func:`label_contrast` is the float32 rounding of the smoothed image (relative
# 6e-8; tested to agree within 1e-5).


def _check_contrast_params(sigma: float, percentiles: tuple[float, float], top_fraction: float,
                           clip: bool) -> tuple[float, float]:
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"top_fraction={top_fraction} is outside (0, 1]; use e.g. 0.1 (or 0.01 for STED caveolae)")
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ConfigError(f"percentiles={percentiles} must satisfy 0 <= low < high <= 100; use e.g. (1, 99)")
    if clip and top_fraction <= 1.0 - hi_p / 100.0 + 1e-12:
        raise ConfigError(
            f"top_fraction={top_fraction:g} with clipping at the {hi_p:g}th percentile makes every sample pixel 1; "
            f"raise the high percentile (e.g. percentiles=(2, 99.5) for a 1% sample) or pass clip=False")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"sigma={sigma} must be >= 0 (paper: 2)")
    return lo_p, hi_p


def image_contrast(image, *, sigma: float = 2.0, percentiles: tuple[float, float] = (1.0, 99.0),
                   top_fraction: float = 0.10, clip: bool = True, label: str = "channel") -> tuple[float, float]:
    """Michelson and RMS contrast like :func:`label_contrast`, computed out of core with Dask.

    Parameters
    ----------
    image : dask.array.Array, xarray.DataArray or numpy.ndarray
        One 2-D channel (singleton axes are dropped); never loaded into memory at once.
    sigma, percentiles, top_fraction, clip
        As :func:`label_contrast`.
    label : str
        Names the channel in error messages.

    Returns
    -------
    michelson, rms : float

    Raises
    ------
    InputError
        Non-finite values, or a constant channel (equal low and high percentiles after smoothing).
    ConfigError
        Parameters out of range (see :func:`label_contrast`).
    """
    import dask
    import dask.array as da
    import xarray as xr

    from l2l_scale.preprocess.normalize import percentiles as exact_percentiles

    lo_p, hi_p = _check_contrast_params(sigma, percentiles, top_fraction, clip)
    arr = image.data if isinstance(image, xr.DataArray) else image
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr))
    arr = arr.squeeze() if arr.ndim > 2 else arr
    if arr.ndim != 2:
        raise InputError(f"{label}: contrast needs one 2-D channel, got shape {arr.shape}; select a single channel")
    x = arr.astype(np.float64)
    if sigma > 0:
        from dask_image.ndfilters import gaussian_filter

        x = gaussian_filter(x, sigma, mode="reflect", truncate=4.0)
    x = x.astype(np.float32)
    n = int(arr.shape[0]) * int(arr.shape[1])
    k = max(1, int(np.ceil(top_fraction * n)))
    q_t = 100.0 * (n - k) / (n - 1) if n > 1 else 0.0
    try:
        lo, hi, t = (float(v) for v in exact_percentiles(x, [lo_p, hi_p, min(100.0, q_t)], channel_axis=None))
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None
    if not hi > lo:
        raise InputError(f"{label}: channel is constant (its {lo_p:g}th and {hi_p:g}th percentiles are both {lo:g}), "
                         "contrast is undefined; check the channel selection")

    def norm(v):
        out = (v - lo) / (hi - lo)
        return np.clip(out, 0.0, 1.0) if clip else out

    f_t = float(norm(np.float64(t)))
    above = x > t
    d = da.where(above, norm(x.astype(np.float64)) - f_t, 0.0)  # moments about f(t): no cancellation
    count, s1, s2, vmax = dask.compute(above.sum(), d.sum(), (d * d).sum(), x.max())
    count = int(count)
    # The sample: every pixel above t, plus (k - count) copies of t (they add 0 to the shifted sums).
    mean = float(s1) / k
    var = max(float(s2) / k - mean * mean, 0.0)
    vmin = f_t
    vmax_n = float(norm(np.float64(vmax))) if count else f_t
    denom = vmax_n + vmin
    if denom <= 0:
        raise InputError(f"{label}: brightest pixels are not above the background level, contrast is undefined; "
                         "check the channel selection")
    return (vmax_n - vmin) / denom, float(np.sqrt(var))


def dataset_contrast(path, channels, *, top_fraction: float = 0.10, sigma: float = 2.0,
                     percentiles: tuple[float, float] = (1.0, 99.0), clip: bool = True) -> dict:
    """Label contrast of channels over every image of an image, plate or folder, and the input/target choice.

    Parameters
    ----------
    path : str or Path
        OME-Zarr image, HCS plate or folder (each image / field counts once).
    channels : sequence of str
        At least two channel names (the labels to compare).
    top_fraction, sigma, percentiles, clip
        The recipe, see :func:`label_contrast` (paper: 0.1 (0.01 for caveolae), 2, (1, 99)).

    Returns
    -------
    dict
        ``{"parameters", "images": {key: {channel: {"michelson", "rms"}}}, "channels": {channel: {"michelson":
        {"mean", "sd"}, "rms": {...}, "n"}}, "recommendation": {"input", "target", "reason"}}``. ``sd`` is the
        sample standard deviation over images (ddof=1; 0 for one image). Image keys are ``""`` for a single
        image, ``"A/1/0"`` for plate fields, names for folders.

    Raises
    ------
    ConfigError
        Fewer than two channels, or parameters out of range.
    ChannelError
        An unknown channel.
    InputError
        A constant channel in some image (named in the message), or unreadable input.
    """
    from l2l_scale.io.read import list_images, open_image, select_channels

    channels = [str(c) for c in channels]
    if len(channels) < 2 or len(set(channels)) != len(channels):
        raise ConfigError(f"give at least two different channels to compare, e.g. --channels AC-15,phalloidin "
                          f"(got {channels})")
    _check_contrast_params(sigma, percentiles, top_fraction, clip)
    refs = list_images(path)
    images = []
    for ref in refs:  # open and validate everything before the first (expensive) pass
        img = open_image(ref.path)
        select_channels(img, channels)
        extra = [d for d in img.dims if d not in ("c", "y", "x")]
        if any(img.sizes[d] > 1 for d in extra):
            raise InputError(f"{ref.path}: contrast handles 2-D fields, this image has "
                             f"{', '.join(f'{d}={img.sizes[d]}' for d in extra)}")
        images.append((ref, img.isel({d: 0 for d in extra})))
    per_image: dict[str, dict] = {}
    for ref, img in images:
        where = f"{ref.path}" if not ref.key else f"{ref.key}"
        per_image[ref.key] = {}
        for ch in channels:
            m, r = image_contrast(img.sel(c=ch), sigma=sigma, percentiles=tuple(percentiles),
                                  top_fraction=top_fraction, clip=clip, label=f"{where} channel {ch!r}")
            per_image[ref.key][ch] = {"michelson": m, "rms": r}
    summary = {}
    for ch in channels:
        entry = {"n": len(per_image)}
        for metric in ("michelson", "rms"):
            vals = np.array([per_image[k][ch][metric] for k in per_image])
            entry[metric] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        summary[ch] = entry
    return {
        "parameters": {"sigma": sigma, "percentiles": list(percentiles), "top_fraction": top_fraction, "clip": clip},
        "images": per_image,
        "channels": summary,
        "recommendation": recommend(summary),
    }


def recommend(summary: dict) -> dict:
    """Input and target from mean contrasts: the label with the higher contrast is the target (the paper's rule).

    Channels are ranked by mean Michelson contrast; the reason states whether the RMS contrast agrees and
    whether the difference exceeds the spread over images.
    """
    ranked = sorted(summary, key=lambda c: (summary[c]["michelson"]["mean"], summary[c]["rms"]["mean"]))
    low, high = ranked[0], ranked[-1]
    m_lo, m_hi = summary[low]["michelson"], summary[high]["michelson"]
    r_lo, r_hi = summary[low]["rms"], summary[high]["rms"]
    rms_agrees = r_hi["mean"] > r_lo["mean"]
    reason = (f"{high} has the higher Michelson contrast ({m_hi['mean']:.2f} vs {m_lo['mean']:.2f})"
              + (f" and RMS contrast ({r_hi['mean']:.2f} vs {r_lo['mean']:.2f})" if rms_agrees else
                 f", but its RMS contrast is not higher ({r_hi['mean']:.2f} vs {r_lo['mean']:.2f}); the choice "
                 "follows the Michelson contrast")
              + "; the higher-contrast label is the target (Kölln et al. 2022)")
    if m_hi["mean"] - m_lo["mean"] <= m_hi["sd"] + m_lo["sd"]:
        reason += "; the difference is within the spread over images, so the choice is uncertain"
    return {"input": low, "target": high, "reason": reason}


def save_contrast(result: dict, path, *, overwrite: bool = False, inputs=()) -> Path:
    """Write a :func:`dataset_contrast` result as JSON, atomically (refuses an existing file without overwrite)."""
    from l2l_scale.io.atomic import write_json
    from l2l_scale.io.output import check_output

    path = check_output(Path(path), overwrite=overwrite, inputs=inputs)
    return write_json(path, result)
