"""Build the CARE U-Net of a :class:`~l2l_scale.model.spec.ModelSpec` with Keras layers.

The graph follows the layer plan (:func:`l2l_scale.model.spec._layer_plan`) that mirrors CSBDeep's
``custom_unet``, so CSBDeep's weights-only h5 files load into it and the other way round. Keras is imported
only when a network is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l2l_scale.model.spec import ModelSpec, _layer_plan

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

_PROB_EPS = 1e-3  # csbdeep custom_unet(eps_scale=1e-3): added to the predicted Laplace scale


def build_unet(spec: ModelSpec, precision: str = "fp32", *, random_init: bool = True) -> "keras.Model":
    """Build the CARE U-Net described by ``spec`` (random weights).

    The layer graph, layer order and named layers are those of ``csbdeep.internals.nets.common_unet``, so
    CSBDeep's weights-only h5 files load into it and the other way round. CSBDeep's probabilistic scale branch
    adds its epsilon with a ``Lambda`` layer; here it is a built-in ``Rescaling(scale=1, offset=eps)`` layer
    (no weights, same result), so the model never needs Python code to be serialised.

    Call it inside ``strategy.scope()`` to get distributed variables.

    Parameters
    ----------
    spec : ModelSpec
    precision : {"fp32", "bf16", "fp16"}
        Compute precision (see :mod:`l2l_scale.model.backend`): at bf16/fp16 the U-Net body runs under Keras'
        mixed policy and the output convolution, residual addition and last activation stay float32. Variables
        are float32 at every precision, so the same weights load.
    random_init : bool
        Glorot-uniform kernels (CSBDeep's). False: zero kernels, for a network whose weights are set next; it
        skips the random-number kernels, whose compilation takes seconds under JAX.

    Returns
    -------
    keras.Model
        Input ``[B, H, W, n_channel_in]`` (H, W multiples of ``spec.grid``); output ``[B, H, W, n_channel_out]``,
        or ``2 * n_channel_out`` channels (mean, scale) for a probabilistic network.
    """
    import keras
    from keras import layers

    from l2l_scale.model.backend import layer_dtypes

    body, head = layer_dtypes(precision)
    init = "glorot_uniform" if random_init else "zeros"
    inp = layers.Input((None, None, spec.n_channel_in), name="input")
    x = inp
    skips: list = []
    features = None
    for op in _layer_plan(spec):
        kind = op[0]
        if kind == "conv":
            _, name, filters, kern, act = op
            x = layers.Conv2D(
                filters, (kern, kern), padding="same", kernel_initializer=init, activation=act, name=name,
                dtype=body,
            )(x)
        elif kind == "pool":
            skips.append(x)
            x = layers.MaxPooling2D((2, 2), name=op[1], dtype=body)(x)
        elif kind == "up":
            x = layers.UpSampling2D((2, 2), name=op[1], dtype=body)(x)
        elif kind == "concat":
            x = layers.Concatenate(axis=-1, name=op[1], dtype=body)([x, skips.pop()])
        elif kind == "head":
            features = x
            x = layers.Conv2D(op[2], (1, 1), activation="linear", kernel_initializer=init, name=op[1], dtype=head)(x)
        elif kind == "residual":
            x = layers.Add(name=op[1], dtype=head)([x, inp])
        elif kind == "activation":
            x = layers.Activation(op[2], name=op[1], dtype=head)(x)
        elif kind == "prob_scale":
            _, conv_name, eps_name, concat_name, filters = op
            scale = layers.Conv2D(filters, (1, 1), activation="softplus", kernel_initializer=init, name=conv_name,
                                  dtype=head)(features)
            scale = layers.Rescaling(1.0, offset=_PROB_EPS, name=eps_name, dtype=head)(scale)
            x = layers.Concatenate(axis=-1, name=concat_name, dtype=head)([x, scale])
        else:  # pragma: no cover - guards against a plan/builder mismatch
            raise AssertionError(f"unknown layer plan entry {op!r}")
    return keras.Model(inputs=inp, outputs=x)
