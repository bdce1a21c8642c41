"""Training losses of the Label2label paper: L1, L2, SSIM and multi-scale SSIM (MS-SSIM).

The paper (Kölln et al. 2022, Methods "Training the CNN" and the review history) trains with

* ``l1``: the CARE default, mean absolute error;
* ``l2``: mean squared error;
* ``ssim``: 1 - SSIM (M = 1 scale), Gaussian filter size 11, sigma 1.5;
* ``ms-ssim3``: 1 - MS-SSIM with M = 3 scales, weights (0.2096, 0.4659, 0.3245), filter size 11;
* ``ms-ssim5``: 1 - MS-SSIM with M = 5 scales, the weights of Wang et al. (2003)
  (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) and filter size 7, the largest that fits a 128 px patch at 5 scales;
* ``ms-ssim``: custom weights (one per scale) and filter size.

Loss = 1 - mean MS-SSIM (Zhao et al. 2016), computed with :func:`tf.image.ssim_multiscale` (``tf.image.ssim``
for M = 1), so the values are TensorFlow's (of each channel, averaged). Where a scale's contrast-structure term
is not positive, TensorFlow's MS-SSIM is flat (its ``relu``) and its gradient NaN; there the loss keeps its value
and takes the gradient of L1 instead (see :func:`make_loss`).

Dynamic range (``max_val``)
---------------------------
The paper does not state it. Patches are percentile-normalised (low percentile -> 0, high percentile -> 1, as in
CSBDeep), so the dynamic range is 1 by construction and we use ``max_val=1.0`` for every batch. The data are not
clipped: clipping would cut the gradient of over-shooting predictions, and a per-batch dynamic range would make
the loss scale depend on the batch content. SSIM's stabilising constants are therefore ``(0.01)^2`` and
``(0.03)^2`` in normalised units, the values of Wang et al. for a unit range.

Patch size
----------
``tf.image.ssim_multiscale`` halves the image M - 1 times and needs the filter to fit the smallest scale:
each side must be at least ``(filter_size - 1) * 2**(M - 1) + 1``. :func:`check_patch_size` raises a
:class:`~l2l_scale.errors.ConfigError` naming the smallest patch and the largest filter that would work.

Every loss returns one value per sample (shape ``[batch]``); the training loop averages over the global batch.
TensorFlow is imported lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from l2l_scale.errors import ConfigError

__all__ = [
    "LOSSES",
    "LossSpec",
    "check_patch_size",
    "loss_spec",
    "make_loss",
    "min_patch_size",
]

MS_SSIM3_WEIGHTS = (0.2096, 0.4659, 0.3245)
WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_FILTER_SIZE = 11  # Wang et al. 2004; the paper's SSIM and 3S-SSIM
MS_SSIM5_FILTER_SIZE = 7  # the paper's 5S-SSIM: the largest filter that fits 128 px at 5 scales
LOSSES = ("l1", "l2", "ssim", "ms-ssim3", "ms-ssim5", "ms-ssim")
_SSIM_K = (0.01, 0.03)


@dataclass(frozen=True)
class LossSpec:
    """A validated loss configuration.

    Attributes
    ----------
    name : str
        One of :data:`LOSSES`.
    weights : tuple of float
        MS-SSIM weights, one per scale (``(1.0,)`` for ``ssim``; empty for ``l1``/``l2``).
    filter_size : int
        Gaussian filter size of (MS-)SSIM (0 for ``l1``/``l2``).
    filter_sigma : float
        Gaussian filter sigma (1.5, Wang et al.).
    max_val : float
        Dynamic range of the (normalised) images, see the module notes.
    """

    name: str
    weights: tuple[float, ...] = field(default=())
    filter_size: int = 0
    filter_sigma: float = 1.5
    max_val: float = 1.0

    @property
    def scales(self) -> int:
        """Number of scales M (0 for pixel losses)."""
        return len(self.weights)

    @property
    def is_ssim(self) -> bool:
        """True for the SSIM family."""
        return self.scales > 0

    def to_dict(self) -> dict:
        """JSON-able description (recorded in ``l2l_scale.json``)."""
        out: dict = {"name": self.name}
        if self.is_ssim:
            out.update(scales=self.scales, weights=list(self.weights), filter_size=self.filter_size,
                       filter_sigma=self.filter_sigma, max_val=self.max_val,
                       definition="1 - mean(tf.image.ssim_multiscale)" if self.scales > 1 else "1 - mean(tf.image.ssim)")
            if self.scales > 1:
                out["gradient_where_flat"] = "l1"  # see make_loss
        else:
            out["definition"] = "mean |y - y_pred|" if self.name == "l1" else "mean (y - y_pred)^2"
        return out


def loss_spec(name: str = "l1", *, weights: Sequence[float] | None = None, filter_size: int | None = None,
              filter_sigma: float = 1.5, max_val: float = 1.0) -> LossSpec:
    """Validate a loss name and its (MS-)SSIM parameters.

    Parameters
    ----------
    name : str
        ``l1``, ``l2``, ``ssim``, ``ms-ssim3``, ``ms-ssim5`` or ``ms-ssim`` (custom ``weights``).
    weights : sequence of float, optional
        MS-SSIM weights, one per scale, first = finest. Overrides the preset weights of ``ms-ssim3``/``ms-ssim5``
        (then their number must match); required for ``ms-ssim``.
    filter_size : int, optional
        Gaussian filter size (default 11, or 7 for ``ms-ssim5``).
    filter_sigma, max_val : float
        Gaussian sigma and dynamic range.

    Returns
    -------
    LossSpec

    Raises
    ------
    ConfigError
        Unknown name, weights for a pixel loss, wrong number of weights, negative weights or a bad filter size.
    """
    name = str(name).lower().strip()
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    if name in ("l1", "l2"):
        if weights is not None or filter_size is not None:
            raise ConfigError(f"loss {name} takes no SSIM weights or filter size; drop them or use --loss ms-ssim")
        return LossSpec(name)
    preset = {"ssim": (1.0,), "ms-ssim3": MS_SSIM3_WEIGHTS, "ms-ssim5": WANG_WEIGHTS, "ms-ssim": None}[name]
    if weights is not None:
        try:
            w = tuple(float(v) for v in weights)
        except (TypeError, ValueError):
            raise ConfigError(f"SSIM weights {weights!r} must be numbers, one per scale") from None
        if not w:
            raise ConfigError("SSIM weights are empty; give one weight per scale, e.g. 0.2096,0.4659,0.3245")
        if preset is not None and len(w) != len(preset):
            raise ConfigError(f"loss {name} has {len(preset)} scale(s) but {len(w)} weights were given; give "
                              f"{len(preset)} weights or use --loss ms-ssim for another number of scales")
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ConfigError(f"SSIM weights {list(w)} must be non-negative numbers with a positive sum")
    elif preset is None:
        raise ConfigError("loss ms-ssim needs weights, one per scale (e.g. --ssim-weights 0.2,0.5,0.3); or use "
                          "ms-ssim3 / ms-ssim5")
    else:
        w = preset
    if filter_size is None:
        filter_size = MS_SSIM5_FILTER_SIZE if name == "ms-ssim5" else DEFAULT_FILTER_SIZE
    if isinstance(filter_size, bool) or int(filter_size) != filter_size or filter_size < 1:
        raise ConfigError(f"SSIM filter size {filter_size!r} must be a positive integer, e.g. 11 or 7")
    if not (filter_sigma > 0 and math.isfinite(filter_sigma)):
        raise ConfigError(f"SSIM filter sigma {filter_sigma!r} must be a positive number, e.g. 1.5")
    if not (max_val > 0 and math.isfinite(max_val)):
        raise ConfigError(f"SSIM max_val {max_val!r} must be a positive number (1.0 for normalised data)")
    return LossSpec(name, w, int(filter_size), float(filter_sigma), float(max_val))


def min_patch_size(spec: LossSpec) -> int:
    """Smallest patch side that the loss fits: ``(filter_size - 1) * 2**(M - 1) + 1`` (1 for pixel losses)."""
    if not spec.is_ssim:
        return 1
    return (spec.filter_size - 1) * 2 ** (spec.scales - 1) + 1


def check_patch_size(spec: LossSpec, patch_size: int) -> None:
    """Raise a :class:`ConfigError` if the (MS-)SSIM loss does not fit ``patch_size`` x ``patch_size`` patches.

    The message names the smallest patch size that fits, and the largest filter size that fits this patch.
    """
    need = min_patch_size(spec)
    if patch_size >= need:
        return
    largest = (patch_size - 1) // 2 ** (spec.scales - 1) + 1
    hint = (f"or use a filter size <= {largest} (--ssim-filter-size {largest})" if largest >= 1 else
            "or use fewer scales")
    raise ConfigError(
        f"loss {spec.name} ({spec.scales} scale(s), filter size {spec.filter_size}) needs patches of at least "
        f"{need} px but the patches are {patch_size} px; recreate them with --patch-size {need} or larger, {hint}"
    )


def make_loss(spec: LossSpec) -> Callable:
    """The loss as a function ``loss(y_true, y_pred) -> [batch]`` of ``[B, H, W, C]`` float tensors.

    The per-sample values are ``mean |d|`` (l1), ``mean d^2`` (l2), ``1 - tf.image.ssim(...)`` (ssim) or
    ``1 - tf.image.ssim_multiscale(...)`` (ms-ssim*, each channel scored as its own image), averaged over the
    channels. The mean over the batch is the loss of the paper's Eq. 5.
    """
    import tensorflow as tf

    if spec.name == "l1":
        def l1(y_true, y_pred):
            return tf.reduce_mean(tf.abs(y_pred - y_true), axis=[1, 2, 3])
        return l1
    if spec.name == "l2":
        def l2(y_true, y_pred):
            return tf.reduce_mean(tf.square(y_pred - y_true), axis=[1, 2, 3])
        return l2
    k1, k2 = _SSIM_K
    if spec.scales == 1:
        def ssim(y_true, y_pred):
            return 1.0 - tf.image.ssim(y_true, y_pred, max_val=spec.max_val, filter_size=spec.filter_size,
                                       filter_sigma=spec.filter_sigma, k1=k1, k2=k2)
        return ssim
    weights = list(spec.weights)

    def ms_ssim(y_true, y_pred):
        # tf.image.ssim_multiscale takes relu(cs) ** w per scale. Where a scale's cs <= 0 (a prediction that
        # anti-correlates with the target there) the value is 0 and flat, and its gradient is NaN (0 ** (w - 1)
        # times 0): one such patch made the batch's update NaN, and training diverged. A zero gradient instead is
        # no better: on the sparse nucleus channel of nuclei-membrane 91 % of the patches stayed there for all 20
        # epochs (predictions negative, PCC 0.19 against the target). So a flat patch-channel gets the gradient of
        # its L1 loss, which pulls the prediction back to the target, and its value stays TensorFlow's.
        # Each channel is scored as its own image, so that a flat channel does not hide another's gradient.
        n_channels = tf.shape(y_true)[-1]
        t, p = _channels_as_images(y_true), _channels_as_images(y_pred)
        score = tf.image.ssim_multiscale(t, _finite_gradient(p), max_val=spec.max_val, power_factors=weights,
                                         filter_size=spec.filter_size, filter_sigma=spec.filter_sigma, k1=k1, k2=k2)
        l1 = tf.reduce_mean(tf.abs(p - t), axis=[1, 2, 3])
        flat = tf.equal(tf.stop_gradient(score), 0.0)
        pull = tf.where(flat, l1 - tf.stop_gradient(l1), tf.zeros_like(l1))  # value 0, L1's gradient where flat
        return tf.reduce_mean(tf.reshape(1.0 - score + pull, [-1, n_channels]), axis=1)
    return ms_ssim


def _channels_as_images(a):
    """``[B, H, W, C]`` -> ``[B * C, H, W, 1]``, sample-major (each channel of each sample an image)."""
    import tensorflow as tf

    a = tf.transpose(a, [0, 3, 1, 2])
    return tf.reshape(a, tf.concat([[-1], tf.shape(a)[2:], [1]], 0))


def _finite_gradient(x):
    """Identity whose gradient has its NaN/Inf entries set to zero.

    Every op of the SSIM is per image, so the NaN of a flat MS-SSIM (see :func:`make_loss`) fills exactly the
    gradient of that image, and zero is the gradient of its flat value. A NaN in the data still shows as a NaN
    loss, which stops training.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def identity(v):
        def grad(g):
            return tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
        return tf.identity(v), grad

    return identity(x)
