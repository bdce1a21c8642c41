"""Calibration against the paper: label contrast and raw foreground PSNR of a simulated field (the table in
:mod:`l2l_scale.synthetic`; used by the tests)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from l2l_scale.synthetic.image import simulate
from l2l_scale.synthetic.structures import _spec


def _normalise(img, percentiles):
    lo, hi = np.percentile(img, percentiles)
    return (img - lo) / max(hi - lo, 1e-12)


def _foreground_psnr(inp, tgt, percentiles, patch=128, smooth=0.0):
    """Mean PSNR of input vs target over non-background ``patch``^2 tiles, the paper's Table 1 "Input" row.

    Both images are normalised to ``percentiles`` (whole image, unclipped, as CSBDeep does). Tiles are kept
    where CSBDeep's ``no_background_patches`` rule holds at the tile centre: the max filter (``patch / 2``) of
    the target exceeds 0.4 x its 99.9th percentile. The data range of each tile is the target's max - min: in
    Table 1 PSNR = -20 log10(NRMSE) for every row, i.e. the PSNR range is the NRMSE's min-max normaliser.
    ``smooth`` applies a Gaussian first (paper: 1.5 for caveolae).
    """
    a = np.asarray(inp, np.float64)
    b = np.asarray(tgt, np.float64)
    if smooth:
        a, b = ndimage.gaussian_filter(a, smooth), ndimage.gaussian_filter(b, smooth)
    a, b = _normalise(a, percentiles), _normalise(b, percentiles)
    fg = ndimage.maximum_filter(b, patch // 2, mode="constant") > 0.4 * np.percentile(b, 99.9)
    vals = []
    for y in range(0, b.shape[0] - patch + 1, patch):
        for x in range(0, b.shape[1] - patch + 1, patch):
            if fg[y + patch // 2, x + patch // 2]:
                pa, pb = a[y:y + patch, x:x + patch], b[y:y + patch, x:x + patch]
                rmse = np.sqrt(np.mean((pa - pb) ** 2))
                vals.append(20 * np.log10((pb.max() - pb.min()) / rmse))
    return float(np.mean(vals)) if vals else float("nan")


def _calibration(structure: str, size: int = 2048, seed: int = 0) -> dict:
    """Contrast of input and target and their raw foreground PSNR for one simulated image."""
    from l2l_scale.preprocess.contrast import label_contrast

    spec = _spec(structure)
    arr = simulate(structure, size, seed=seed).values
    inp, tgt = arr[0], arr[1]
    kw = dict(top_fraction=spec.contrast_fraction, percentiles=spec.contrast_percentiles)
    m_in, r_in = label_contrast(inp, **kw)
    m_tg, r_tg = label_contrast(tgt, **kw)
    smooth = 1.5 if structure == "caveolae" else 0.0
    return {
        "michelson": (m_in, m_tg),
        "rms": (r_in, r_tg),
        "psnr": _foreground_psnr(inp, tgt, spec.percentiles, smooth=smooth),
    }
