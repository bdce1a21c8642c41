"""Evaluation metrics: agreement with skimage / TensorFlow / CSBDeep, dask == in-memory, paper definitions, errors."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage
from skimage import metrics as skm

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.evaluate import metrics as M

pytestmark = pytest.mark.timeout(300)


def _pair(shape, seed=0, noise=0.1):
    """A smooth target in [0, 1] and a noisier, blurred, correlated 'restoration'."""
    rng = np.random.default_rng(seed)
    sig = [0] * len(shape)
    sig[-2:] = [2, 2]
    if len(shape) == 4:
        sig = [0, 2, 2, 0]
    t = ndimage.gaussian_filter(rng.random(shape), sig)
    t = (t - t.min()) / (t.max() - t.min())
    p = ndimage.gaussian_filter(t + noise * rng.standard_normal(shape), [s / 2 for s in sig])
    return t, p


@pytest.fixture(scope="module")
def big_pair():
    return _pair((700, 900), seed=1)


# ------------------------------------------------------------------------------- agreement with references


@pytest.mark.parametrize("shape", [(5, 64, 48), (4, 40, 40, 2)])
def test_patch_metrics_match_skimage(shape):
    t, p = _pair(shape, seed=2)
    ps, nr, ss = M.psnr(t, p, data_range=1.0), M.nrmse(t, p), M.ssim(t, p, data_range=1.0)
    assert ps.shape == nr.shape == ss.shape == (shape[0],)
    for i in range(shape[0]):
        assert ps[i] == pytest.approx(skm.peak_signal_noise_ratio(t[i], p[i], data_range=1.0), abs=1e-6)
        assert nr[i] == pytest.approx(skm.normalized_root_mse(t[i], p[i], normalization="min-max"), abs=1e-6)
        ref = skm.structural_similarity(t[i], p[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, channel_axis=-1 if len(shape) == 4 else None)
        assert ss[i] == pytest.approx(ref, abs=1e-6)
    # data_range=None follows skimage's PSNR rule: 1 for a float target in [0, 1].
    assert M.psnr(t, p)[0] == pytest.approx(skm.peak_signal_noise_ratio(t[0], p[0]), abs=1e-6)
    for norm in ("euclidean", "mean"):
        assert M.nrmse(t, p, normalization=norm)[1] == pytest.approx(
            skm.normalized_root_mse(t[1], p[1], normalization=norm), abs=1e-6)


def test_image_metrics_match_skimage_uint16():
    t, p = _pair((90, 110), seed=3)
    t16, p16 = (t * 50000).astype(np.uint16), (np.clip(p, 0, 1) * 50000).astype(np.uint16)
    assert M.psnr(t16, p16) == pytest.approx(skm.peak_signal_noise_ratio(t16, p16), abs=1e-6)
    assert M.nrmse(t16, p16) == pytest.approx(skm.normalized_root_mse(t16, p16, normalization="min-max"), abs=1e-6)
    with pytest.warns(UserWarning):  # skimage warns that it guesses 65535 for uint16; we document the same rule
        ref = skm.structural_similarity(t16, p16, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert M.ssim(t16, p16) == pytest.approx(ref, abs=1e-6)


def test_ms_ssim_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    cases = [((2, 128, 128, 1), 5), ((2, 128, 128, 2), 3), ((2, 131, 129, 1), 3), ((2, 128, 128, 1), 1),
             ((2, 97, 101, 1), 5)]  # 97: the smallest side for M=5, filter 7; odd sides exercise TF's padding
    for k, (shape, m) in enumerate(cases):
        t, p = _pair(shape, seed=10 + k)
        t, p = t.astype(np.float32), p.astype(np.float32)
        p[0] = 1 - p[0]  # an anti-correlated patch: TF clips negative cs/SSIM at 0 (relu)
        weights, f = M.MS_SSIM_PRESETS[m]
        ref = tf.image.ssim_multiscale(t, p, max_val=1.0, power_factors=weights, filter_size=f, filter_sigma=1.5,
                                       k1=0.01, k2=0.03).numpy()
        ours = M.ms_ssim(t, p, scales=m, data_range=1.0)
        np.testing.assert_allclose(ours, ref, atol=1e-4, err_msg=f"{shape} M={m}")
        assert ours[1] > 0.3  # a meaningful (non-clipped) comparison
    # Custom weights/filter and a uint16 pair (TF rescales uint16 to [0, 1] and max_val with it).
    t, p = _pair((2, 100, 100, 1), seed=20)
    t16, p16 = (t * 60000).astype(np.uint16), (np.clip(p, 0, 1) * 60000).astype(np.uint16)
    ref = tf.image.ssim_multiscale(t16, p16, max_val=65535, power_factors=(0.3, 0.7), filter_size=9,
                                   filter_sigma=1.5).numpy()
    np.testing.assert_allclose(M.ms_ssim(t16, p16, weights=(0.3, 0.7), filter_size=9), ref, atol=1e-4)


# ------------------------------------------------------------------------------ whole images: dask == memory


def test_whole_image_dask_equals_in_memory(big_pair):
    t, p = big_pair
    td, pd = da.from_array(t, chunks=128), da.from_array(p, chunks=128)
    assert td.numblocks == (6, 8)
    pairs = [
        (M.psnr(t, p, data_range=1.0), M.psnr(td, pd, data_range=1.0)),
        (M.nrmse(t, p), M.nrmse(td, pd)),
        (M.pcc(t, p), M.pcc(td, pd)),
        (M.pcc(t, p, mask_threshold=0.6), M.pcc(td, pd, mask_threshold=0.6)),
        (M.ssim(t, p, data_range=1.0), M.ssim(td, pd, data_range=1.0)),
        (M.ms_ssim(t, p, scales=5, data_range=1.0), M.ms_ssim(td, pd, scales=5, data_range=1.0)),
        (M.tolerance_level(t, p).value, M.tolerance_level(td, pd).value),
    ]
    for mem, lazy in pairs:
        assert isinstance(lazy, float)
        assert lazy == pytest.approx(mem, rel=1e-10, abs=1e-12)
    # ... and the in-memory whole-image values are the references' (data_range=None: 1 for [0, 1] floats).
    assert M.psnr(td, pd) == pytest.approx(skm.peak_signal_noise_ratio(t, p), abs=1e-6)
    assert M.ssim(td, pd, data_range=1.0) == pytest.approx(
        skm.structural_similarity(t, p, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False), abs=1e-6)
    assert M.pcc(td, pd) == pytest.approx(np.corrcoef(t.ravel(), p.ravel())[0, 1], abs=1e-12)
    # xarray inputs (dims from OME-Zarr, singleton channel dropped) and table1 in one compute.
    xt = xr.DataArray(td[None], dims=("c", "y", "x"))
    xp = xr.DataArray(pd[None], dims=("c", "y", "x"))
    row = M.table1_metrics(xt, xp, data_range=1.0)
    assert row["ms_ssim_5"] == pytest.approx(pairs[5][0], rel=1e-10)
    assert row["ms_ssim_1"] == pytest.approx(max(pairs[4][0], 0.0), rel=1e-10)
    assert row["psnr"] == pytest.approx(pairs[0][0], rel=1e-12)


def test_ms_ssim_odd_image_irregular_chunks(big_pair):
    """Odd sides at every scale (TF's padding) and chunks that are not multiples of 2**(M-1)."""
    t, p = (a[:333, :299] for a in big_pair)
    td, pd = da.from_array(t, chunks=(60, 70)), da.from_array(p, chunks=(60, 70))
    for m in (3, 5):
        assert M.ms_ssim(td, pd, scales=m, data_range=1.0) == pytest.approx(
            M.ms_ssim(t, p, scales=m, data_range=1.0), rel=1e-10)
    # Same image as a single patch == whole image.
    assert M.ms_ssim(t[None], p[None], scales=5, data_range=1.0)[0] == pytest.approx(
        M.ms_ssim(t, p, scales=5, data_range=1.0), rel=1e-12)


# ------------------------------------------------------------------------------------ paper definitions


def _tl_reference(t, p, r, denominator="below"):
    """Eq. 7 of VirFluoNet written out plainly, threshold by threshold."""
    e = np.abs(p - t).ravel()
    totals = []
    for i in range(100):
        thr = i / 100 * r
        below = e[e <= thr]
        ie = (below.sum() / (below.size if denominator == "below" else e.size) if below.size else 0.0) / r
        se = np.count_nonzero(e > thr) / e.size
        totals.append(ie + se)
    i = int(np.argmin(totals))
    return totals[i], i / 100


def test_tolerance_level_follows_eq7():
    t, p = _pair((3, 50, 60), seed=4, noise=0.2)
    res = M.tolerance_level(t, p, data_range=1.0)
    for k in range(3):
        value, level = _tl_reference(t[k], p[k], 1.0)
        assert res.value[k] == pytest.approx(value, abs=1e-12)
        assert res.level[k] == pytest.approx(level)
    assert res.intensity_error.shape == res.spatial_error.shape == (3, 100)
    all_ = M.tolerance_level(t[0], p[0], data_range=1.0, denominator="all")
    assert all_.value == pytest.approx(_tl_reference(t[0], p[0], 1.0, "all")[0], abs=1e-12)
    # 8-bit data as in the paper: thresholds are % of 255; a perfect prediction has TL 0 at 0 %.
    t8 = (t[0] * 255).astype(np.uint8)
    p8 = (np.clip(p[0], 0, 1) * 255).astype(np.uint8)
    res8 = M.tolerance_level(t8, p8)
    assert res8.value == pytest.approx(_tl_reference(t8.astype(float), p8.astype(float), 255.0)[0], abs=1e-12)
    assert res8.threshold == pytest.approx(res8.level * 255)
    perfect = M.tolerance_level(t8, t8)
    assert perfect.value == 0.0 and perfect.level == 0.0


def test_pcc_and_segmentation_pcc():
    t, p = _pair((3, 40, 50), seed=5)
    r = M.pcc(t, p)
    for k in range(3):
        assert r[k] == pytest.approx(np.corrcoef(t[k].ravel(), p[k].ravel())[0, 1], abs=1e-12)
    sel = t[0] > 0.5
    assert M.pcc(t[0], p[0], mask_threshold=0.5) == pytest.approx(np.corrcoef(t[0][sel], p[0][sel])[0, 1],
                                                                 abs=1e-12)


def test_contrast_reuses_label_contrast():
    from l2l_scale.preprocess.contrast import label_contrast

    t, _ = _pair((2, 64, 64), seed=6)
    mich, rms = M.contrast(t)
    assert (mich[1], rms[1]) == label_contrast(t[1])
    assert M.contrast(t[0], top_fraction=0.2) == label_contrast(t[0], top_fraction=0.2)


def test_foreground_patches_match_csbdeep():
    from csbdeep.data import no_background_patches
    from csbdeep.data.generate import sample_patches_from_multiple_stacks

    rng = np.random.default_rng(7)
    y = np.zeros((300, 400), np.float32)
    y[100:140, 50:90] = 1
    y[250:260, 300:390] = 0.8
    y = ndimage.gaussian_filter(y, 2) + 0.01 * rng.random(y.shape).astype(np.float32)
    x = y + 0.1 * rng.random(y.shape).astype(np.float32)
    for n in (6, 40):  # 40 > eligible positions? no: both without replacement; replacement checked below
        np.random.seed(11)
        ref_y, ref_x = sample_patches_from_multiple_stacks((y, x), (64, 64), n,
                                                           patch_filter=no_background_patches(0.4, 99.9))
        ours = M.foreground_patches(y, x, patch_size=64, n=n, seed=11)
        np.testing.assert_array_equal(ours.target, ref_y)
        np.testing.assert_array_equal(ours.pred, ref_x)
        lazy = M.foreground_patches(da.from_array(y, chunks=70), da.from_array(x, chunks=(50, 90)), x,
                                    patch_size=64, n=n, seed=11)
        np.testing.assert_array_equal(lazy.target, ref_y)
        np.testing.assert_array_equal(lazy.input, ref_x)
        r, c = lazy.corners[0]
        np.testing.assert_array_equal(y[r:r + 64, c:c + 64], ref_y[0])
    # Sampling with replacement (fewer eligible centres than patches), a tiny bright spot.
    z = np.zeros((80, 80), np.float32)
    z[40, 40] = 1
    np.random.seed(3)
    ref_z, = sample_patches_from_multiple_stacks((z,), (64, 64), 500, patch_filter=no_background_patches())
    np.testing.assert_array_equal(M.foreground_patches(z, z, patch_size=64, n=500, seed=3).target, ref_z)
    with pytest.raises(InputError, match="no non-background"):
        M.foreground_patches(np.zeros((80, 80)), np.zeros((80, 80)), patch_size=64)


def _line_image(sigma=2.0, angle_deg=30.0, size=160, noise=0.02, seed=8):
    yy, xx = np.mgrid[:size, :size].astype(float)
    th = np.deg2rad(angle_deg)
    c = size / 2
    d = (yy - c) * np.cos(th) - (xx - c) * np.sin(th)
    img = np.exp(-0.5 * (d / sigma) ** 2) + 0.1
    return img + noise * np.random.default_rng(seed).standard_normal(img.shape), th


def test_fwhm_automatic_and_given_lines():
    img, th = _line_image()
    expected = 2 * np.sqrt(2 * np.log(2)) * 2.0
    res = M.fwhm(img, n=5, length=30, linewidth=20, pixel_size=0.05, seed=0)
    s = res.summary()
    assert s["n_ok"] >= 3
    assert s["mean_px"] == pytest.approx(expected, rel=0.04)
    assert s["mean"] == pytest.approx(expected * 0.05, rel=0.04)
    # Automatic profiles run across the line: along the normal (cos th, -sin th) up to sign.
    d = res.lines[:, 1] - res.lines[:, 0]
    np.testing.assert_allclose(np.abs(d @ np.array([np.cos(th), -np.sin(th)])), 30, rtol=0.02)
    # A user line, physical units from the direction with anisotropic pixels, and from xarray coords.
    c = 80
    line = [((c - 15 * np.cos(th), c + 15 * np.sin(th)), (c + 15 * np.cos(th), c - 15 * np.sin(th)))]
    one = M.fwhm(img, lines=line, pixel_size=(0.1, 0.05))
    assert one.fwhm_px[0] == pytest.approx(expected, rel=0.04)
    assert one.fwhm[0] == pytest.approx(one.fwhm_px[0] * np.hypot(np.cos(th) * 0.1, np.sin(th) * 0.05))
    xim = xr.DataArray(img, dims=("y", "x"), coords={"y": np.arange(160) * 0.04, "x": np.arange(160) * 0.04})
    assert M.fwhm(xim, lines=line).fwhm[0] == pytest.approx(one.fwhm_px[0] * 0.04)
    with pytest.raises(InputError, match="no thin bright structure"):
        M.fwhm(np.full((64, 64), 0.3))


# --------------------------------------------------------------------------------------------------- errors


def test_errors():
    t, p = _pair((64, 64))
    with pytest.raises(InputError, match=r"\(64, 64\).*\(64, 60\)"):
        M.psnr(t, p[:, :60])
    with pytest.raises(InputError, match=r"comparing a float restoration with a uint16 target without "
                                         r"normalisation; normalise both \(e\.g\. --normalize percentile\)"):
        M.ssim((t * 1000).astype(np.uint16), p.astype(np.float32), data_range=1.0)
    with pytest.raises(InputError, match="uint8 restoration with a uint16 target"):
        M.nrmse(t.astype(np.uint16), p.astype(np.uint8))
    with pytest.raises(InputError, match="pass data_range"):
        M.psnr(t * 3, p)
    with pytest.raises(ConfigError, match="at least 161 px"):
        M.ms_ssim(np.zeros((2, 128, 128)), np.zeros((2, 128, 128)), scales=5, filter_size=11, data_range=1.0)
    with pytest.raises(ConfigError, match="at least 97 px per side, got 96x128"):
        M.ms_ssim(np.zeros((96, 128)), np.zeros((96, 128)), scales=5, data_range=1.0)
    assert M.min_side_ms_ssim(5, 7) == 97 <= 128 < M.min_side_ms_ssim(5, 9)
    with pytest.raises(ConfigError, match="one weight per scale"):
        M.ms_ssim(t, p, scales=3, weights=(0.5, 0.5))
    with pytest.raises(ConfigError, match="normalization"):
        M.nrmse(t, p, normalization="range")
    with pytest.raises(InputError, match="select one channel"):
        M.psnr(xr.DataArray(np.stack([t, t]), dims=("c", "y", "x")), xr.DataArray(np.stack([p, p]),
                                                                                  dims=("c", "y", "x")))
