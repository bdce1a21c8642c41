"""Label contrast (Michelson and RMS, the paper's recipe) against analytic cases and a plain numpy version."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.preprocess.contrast import label_contrast


def _reference(img, sigma=2.0, percentiles=(1.0, 99.0), top_fraction=0.10, clip=True):
    """The recipe written out with a full sort (independent of the implementation's partition)."""
    g = ndimage.gaussian_filter(np.asarray(img, np.float64), sigma) if sigma else np.asarray(img, np.float64)
    lo, hi = np.percentile(g, percentiles)
    n = (g - lo) / (hi - lo)
    if clip:
        n = np.clip(n, 0, 1)
    v = np.sort(n.ravel())
    sample = v[v.size - int(np.ceil(top_fraction * v.size)):]
    return (sample.max() - sample.min()) / (sample.max() + sample.min()), sample.std()


def _bars(rng, background=100.0, bar=400.0, noise=5.0, step=128):
    """Flat background with bright 2-px vertical bars every ``step`` columns plus Gaussian noise."""
    img = np.full((128, 256), background)
    img[:, ::step] = bar
    img[:, 1::step] = bar
    return img + rng.normal(0, noise, img.shape)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("top_fraction", [0.10, 0.25, 0.03])
def test_matches_numpy_reference_on_bars(clip, top_fraction):
    img = _bars(np.random.default_rng(0), step=32)
    got = label_contrast(img, top_fraction=top_fraction, clip=clip)
    np.testing.assert_allclose(got, _reference(img, top_fraction=top_fraction, clip=clip), rtol=1e-12)


def test_analytic_binary_images():
    # 5 % of pixels at 1, the rest 0, no smoothing: P1 = 0, P99 = 1; the top 10 % is half ones, half zeros.
    img = np.zeros((100, 100))
    img[:5] = 1.0
    m, r = label_contrast(img, sigma=0)
    assert m == pytest.approx(1.0) and r == pytest.approx(0.5)
    # 30 % at 1: the top 10 % are all ones -> no contrast within the sample.
    img = np.zeros((100, 100))
    img[:30] = 1.0
    assert label_contrast(img, sigma=0) == pytest.approx((0.0, 0.0))


def test_background_lowers_contrast():
    """The L2L situation: the same bars on top of a diffuse background give a lower contrast."""
    rng = np.random.default_rng(1)
    clean = _bars(rng, background=100.0, bar=400.0)
    hazy = _bars(rng, background=100.0, bar=400.0)
    hazy[:, 40:200] += 150.0  # cytosolic haze over most of the field
    m_clean, r_clean = label_contrast(clean)
    m_hazy, r_hazy = label_contrast(hazy)
    # sparse bars on a dark field: the 90th percentile is background, Michelson ~ 1
    assert m_clean > 0.9 and m_hazy < 0.4 and r_hazy < r_clean, (m_clean, m_hazy, r_clean, r_hazy)


def test_invariant_to_offset_and_gain():
    img = _bars(np.random.default_rng(2))
    np.testing.assert_allclose(label_contrast(img), label_contrast(3.0 * img + 1000.0), rtol=1e-9)


def test_accepts_dask_xarray_and_singleton_axes():
    img = _bars(np.random.default_rng(3))
    want = label_contrast(img)
    assert label_contrast(da.from_array(img, chunks=64)) == pytest.approx(want)
    assert label_contrast(xr.DataArray(img[None], dims=("c", "y", "x"))) == pytest.approx(want)


@pytest.mark.parametrize("img", [np.zeros((64, 64)), np.full((64, 64), 7, np.uint16)])
def test_constant_image_raises_input_error(img):
    with pytest.raises(InputError, match="constant.*check the channel selection"):
        label_contrast(img)


def test_bad_images_and_options():
    with pytest.raises(InputError, match="2-D"):
        label_contrast(np.ones((2, 8, 8)))
    bad = np.ones((16, 16))
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        label_contrast(bad)
    with pytest.raises(ConfigError, match="top_fraction"):
        label_contrast(np.eye(16), top_fraction=0)
    with pytest.raises(ConfigError, match="percentiles"):
        label_contrast(np.eye(16), percentiles=(99, 1))


def test_clipped_one_percent_sample_needs_a_higher_percentile():
    """Clipped at the 99th percentile, the brightest 1 % are all 1: refused, with the fix in the message."""
    img = _bars(np.random.default_rng(4))
    with pytest.raises(ConfigError, match=r"percentiles=\(2, 99.5\)"):
        label_contrast(img, top_fraction=0.01)
    m, r = label_contrast(img, top_fraction=0.01, percentiles=(2, 99.5))
    np.testing.assert_allclose((m, r), _reference(img, percentiles=(2, 99.5), top_fraction=0.01), rtol=1e-12)
    assert label_contrast(img, top_fraction=0.01, clip=False)[0] > 0
