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
paper's Table 2, (2, 99.5): then half of the 1 % sample lies below the clip and the paper's caveolae numbers
are reproducible (see :mod:`l2l_scale.synthetic`). This is our reading, not stated in the paper.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError

__all__ = ["label_contrast"]


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
        If ``top_fraction`` or ``percentiles`` are out of range, or if with ``clip`` the sample would lie
        entirely above the high percentile (``top_fraction <= 1 - high / 100``), which makes the contrast 0.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"top_fraction={top_fraction} is outside (0, 1]; use e.g. 0.1 (or 0.01 for STED caveolae)")
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ConfigError(f"percentiles={percentiles} must satisfy 0 <= low < high <= 100; use e.g. (1, 99)")

    if clip and top_fraction <= 1.0 - hi_p / 100.0 + 1e-12:
        raise ConfigError(
            f"top_fraction={top_fraction:g} with clipping at the {hi_p:g}th percentile makes every sample pixel 1; "
            f"raise the high percentile (e.g. percentiles=(2, 99.5) for a 1% sample) or pass clip=False"
        )

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
