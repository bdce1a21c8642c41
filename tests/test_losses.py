"""Training losses: values equal TensorFlow's (MS-)SSIM, the paper's weights, the patch-size check."""

from __future__ import annotations

import numpy as np
import pytest

from l2l_scale.errors import ConfigError
from l2l_scale.model.losses import (
    MS_SSIM3_WEIGHTS,
    WANG_WEIGHTS,
    check_patch_size,
    loss_spec,
    make_loss,
    min_patch_size,
)

tf = pytest.importorskip("tensorflow")


def _pair(n=3, size=64, c=1, seed=0):
    """A structured target and a noisy, offset prediction (both roughly in the normalised [0, 1] range)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 0.5 + 0.4 * np.sin(yy / 5.0 + rng.random()) * np.cos(xx / 7.0)
    y = np.stack([base + 0.05 * rng.standard_normal((size, size)) for _ in range(n * c)]).reshape(n, c, size, size)
    y = np.moveaxis(y, 1, -1).astype(np.float32)
    p = (0.8 * y + 0.1 + 0.1 * rng.standard_normal(y.shape)).astype(np.float32)
    return tf.constant(y), tf.constant(p)


@pytest.mark.parametrize("name,size,weights,filter_size", [
    ("ms-ssim3", 64, MS_SSIM3_WEIGHTS, 11),
    ("ms-ssim5", 128, WANG_WEIGHTS, 7),
])
def test_ms_ssim_equals_tensorflow(name, size, weights, filter_size):
    y, p = _pair(size=size, c=2)
    spec = loss_spec(name)
    assert spec.weights == weights and spec.filter_size == filter_size and spec.max_val == 1.0
    got = make_loss(spec)(y, p).numpy()

    def ref(a, b):
        return 1.0 - tf.image.ssim_multiscale(a, b, max_val=1.0, power_factors=list(weights),
                                              filter_size=filter_size, filter_sigma=1.5).numpy()

    assert got.shape == (3,)
    # Each channel is scored as its own image (see make_loss): TensorFlow's value of each channel, averaged, and its
    # two-channel call within the rounding of its own kernels (4e-7 here).
    per_channel = np.mean([ref(y[..., c:c + 1], p[..., c:c + 1]) for c in range(2)], axis=0)
    np.testing.assert_allclose(got, per_channel, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, ref(y, p), rtol=1e-5, atol=1e-6)
    one = make_loss(spec)(y[..., :1], p[..., :1]).numpy()
    np.testing.assert_array_equal(one, ref(y[..., :1], p[..., :1]))  # one channel: TensorFlow's call exactly
    assert np.all(got > 0)  # different images
    assert np.allclose(make_loss(spec)(y, y).numpy(), 0.0, atol=1e-5)  # identical images


def test_ms_ssim_where_flat_takes_the_l1_gradient():
    """Where a scale's cs <= 0, TensorFlow's MS-SSIM is 0 (flat) and its gradient NaN, which diverged training; a
    zero gradient left 91 % of a sparse channel's patches stuck there. Such a patch-channel keeps its value and
    takes its L1 gradient; every other patch and channel (also the other channel of that patch) takes TensorFlow's.
    """
    y, p = _pair(size=64, c=2)
    p = p.numpy()
    p[1, ..., 0] = 1.0 - y.numpy()[1, ..., 0]  # patch 1, channel 0: anti-correlated at every scale
    p = tf.Variable(p)

    def reference(a, b):
        return 1.0 - tf.image.ssim_multiscale(a, b, max_val=1.0, power_factors=list(MS_SSIM3_WEIGHTS), filter_size=11)

    with tf.GradientTape(persistent=True) as tape:
        ours = make_loss(loss_spec("ms-ssim3"))(y, p)
        ref = reference(y, p)
        total, total_ref = tf.reduce_sum(ours), tf.reduce_sum(ref)
    assert reference(y[1:2, ..., :1], p[1:2, ..., :1]).numpy()[0] == 1.0  # flat: MS-SSIM 0
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5)
    g, g_ref = tape.gradient(total, p).numpy(), tape.gradient(total_ref, p).numpy()
    assert np.isnan(g_ref[1, ..., 0]).all()  # the failure this guards against
    assert np.isfinite(g).all()
    # d/dp of mean over the 2 channels of mean |p - y| over 64 x 64 px
    l1_grad = np.sign(p.numpy()[1, ..., 0] - y.numpy()[1, ..., 0]) / (64 * 64 * 2)
    np.testing.assert_allclose(g[1, ..., 0], l1_grad, rtol=1e-6)
    for sample, channel in ((0, 0), (0, 1), (1, 1), (2, 0), (2, 1)):
        scale = np.abs(g_ref[sample, ..., channel]).max()
        assert scale > 1e-6
        # within rounding of TensorFlow's two-channel kernels (see test_ms_ssim_equals_tensorflow)
        np.testing.assert_allclose(g[sample, ..., channel], g_ref[sample, ..., channel], rtol=0, atol=1e-4 * scale)


def test_ssim_and_custom_weights():
    y, p = _pair()
    got = make_loss(loss_spec("ssim"))(y, p).numpy()
    ref = 1.0 - tf.image.ssim(y, p, max_val=1.0, filter_size=11, filter_sigma=1.5).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    spec = loss_spec("ms-ssim", weights=[0.5, 0.5], filter_size=9)
    got = make_loss(spec)(y, p).numpy()
    ref = 1.0 - tf.image.ssim_multiscale(y, p, 1.0, power_factors=[0.5, 0.5], filter_size=9).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert spec.to_dict()["weights"] == [0.5, 0.5]


def test_pixel_losses():
    y, p = _pair()
    d = p.numpy() - y.numpy()
    np.testing.assert_allclose(make_loss(loss_spec("l1"))(y, p).numpy(), np.abs(d).mean(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(make_loss(loss_spec("l2"))(y, p).numpy(), (d**2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_patch_size_check():
    assert min_patch_size(loss_spec("ms-ssim5")) == 97  # filter 7 at 5 scales fits the paper's 128 px patches
    check_patch_size(loss_spec("ms-ssim5"), 128)
    with pytest.raises(ConfigError, match=r"at least 161 px.*--patch-size 161.*filter size <= 8"):
        check_patch_size(loss_spec("ms-ssim5", filter_size=11), 128)
    with pytest.raises(ConfigError, match="at least 41 px"):
        check_patch_size(loss_spec("ms-ssim3"), 32)
    check_patch_size(loss_spec("l1"), 16)
    # The check agrees with TensorFlow: the smallest valid size works, one less fails inside TF.
    spec = loss_spec("ms-ssim3", filter_size=5)
    n = min_patch_size(spec)
    y, p = _pair(n=1, size=n)
    assert np.isfinite(make_loss(spec)(y, p).numpy()).all()
    y, p = _pair(n=1, size=n - 1)
    with pytest.raises(Exception):
        make_loss(spec)(y, p).numpy()


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ms-ssim7"), "unknown loss"),
    (dict(name="ms-ssim"), "needs weights"),
    (dict(name="ms-ssim3", weights=[0.5, 0.5]), "3 scale"),
    (dict(name="ms-ssim3", weights=[0.5, -0.5, 1.0]), "non-negative"),
    (dict(name="l1", filter_size=7), "takes no SSIM"),
    (dict(name="ssim", filter_size=0), "positive integer"),
])
def test_loss_spec_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=match):
        loss_spec(name, **kwargs)
