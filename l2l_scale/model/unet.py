"""CARE-compatible U-Net: build, load, export, receptive field and safe model folders.

A model folder is the one CSBDeep writes (``config.json`` + weights-only ``weights_best.h5`` /
``weights_last.h5``), plus an optional ``l2l_scale.json`` with channel names, normalisation and provenance.
Folders written by :func:`export_model` load in CSBDeep (``CARE(None, name, basedir)``) and CSBDeep CARE
folders load here.

The network is rebuilt from ``config.json`` by :func:`build_unet`, which follows one layer plan
(:func:`_layer_plan`) that mirrors ``csbdeep.internals.nets.custom_unet`` layer for layer, so CSBDeep's
order-based h5 weight loading works in both directions. The same plan gives the receptive field
(:func:`_receptive_field`), so the halo of tiled prediction is computed, never guessed.

Safety: nothing in a model folder is ever executed. Only JSON and HDF5 arrays are read; folders holding pickles,
``.keras`` archives or full-model h5 files with ``Lambda`` layers or custom objects are refused.

TensorFlow/Keras are imported lazily, so :func:`read_spec` and :attr:`ModelSpec.receptive_field` are cheap to
call on a Dask client that never runs the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from l2l_scale.errors import ChannelError, ModelError, OutputError
from l2l_scale.io.atomic import atomic_write

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

CONFIG_FILE = "config.json"
METADATA_FILE = "l2l_scale.json"
WEIGHTS_BEST = "weights_best.h5"
WEIGHTS_LAST = "weights_last.h5"

_N_CONV_PER_DEPTH = 2  # CSBDeep's common_unet always uses 2 convolutions per level
_PROB_EPS = 1e-3  # csbdeep custom_unet(eps_scale=1e-3): added to the predicted Laplace scale
_UNSAFE_SUFFIXES = {
    ".keras": "a full Keras model archive (it can carry code)",
    ".pkl": "a pickle (loading it runs code)",
    ".pickle": "a pickle (loading it runs code)",
    ".joblib": "a joblib pickle (loading it runs code)",
    ".dill": "a dill pickle (loading it runs code)",
    ".pt": "a PyTorch pickle (loading it runs code)",
    ".pth": "a PyTorch pickle (loading it runs code)",
}
_LAMBDA_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda"}
_MAX_SCANNED_FILES = 10000
_TRAIN_DEFAULTS: dict[str, Any] = {  # csbdeep.models.Config defaults, written so CSBDeep can retrain the model
    "train_epochs": 100,
    "train_steps_per_epoch": 400,
    "train_learning_rate": 0.0004,
    "train_batch_size": 16,
    "train_tensorboard": True,
    "train_reduce_lr": {"factor": 0.5, "patience": 10, "min_delta": 0},
}


# ----------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a CARE U-Net (the network part of CSBDeep's ``config.json``).

    Parameters
    ----------
    n_dim : int
        Spatial dimensions; only 2 is supported.
    n_channel_in, n_channel_out : int
        Input and output channels (a probabilistic network outputs ``2 * n_channel_out``: mean and scale).
    unet_n_depth : int
        Number of down-sampling levels (>= 1).
    unet_kern_size : int
        Odd convolution kernel size.
    unet_n_first : int
        Filters of the first level (doubled per level).
    unet_last_activation : str
        ``"linear"`` or ``"relu"`` (the values CSBDeep accepts).
    unet_residual : bool
        Add the input to the output (needs ``n_channel_in == n_channel_out``).
    probabilistic : bool
        Per-pixel Laplace mean and scale (CSBDeep ``probabilistic=True``); prediction returns the mean.
    axes : str
        Network axes, ``"YXC"``.

    Raises
    ------
    ModelError
        If a value is out of range or the combination is not a valid 2D CARE network.
    """

    n_dim: int = 2
    n_channel_in: int = 1
    n_channel_out: int = 1
    unet_n_depth: int = 2
    unet_kern_size: int = 5
    unet_n_first: int = 32
    unet_last_activation: str = "linear"
    unet_residual: bool = True
    probabilistic: bool = False
    axes: str = "YXC"

    def __post_init__(self) -> None:
        if self.n_dim == 3 or "Z" in self.axes:
            raise ModelError(
                "3D CARE models are not supported yet; use a 2D model (axes 'YXC') or predict the z-slices "
                "with a 2D model"
            )
        if self.n_dim != 2 or self.axes != "YXC":
            raise ModelError(
                f"unsupported network axes {self.axes!r} (n_dim={self.n_dim}); l2l-scale runs 2D CARE models "
                "with axes 'YXC' only"
            )
        for name in ("n_channel_in", "n_channel_out", "unet_n_depth", "unet_kern_size", "unet_n_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ModelError(f"{name} must be an integer >= 1, got {value!r}; fix the model config")
        if self.unet_kern_size % 2 != 1:
            raise ModelError(
                f"unet_kern_size must be odd, got {self.unet_kern_size}; use 3 or 5 (CSBDeep's defaults)"
            )
        if self.unet_last_activation not in ("linear", "relu"):
            raise ModelError(
                f"unet_last_activation must be 'linear' or 'relu' (as in CSBDeep), got "
                f"{self.unet_last_activation!r}; fix the model config"
            )
        for name in ("unet_residual", "probabilistic"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ModelError(f"{name} must be true or false, got {getattr(self, name)!r}; fix the model config")
        if self.unet_residual and self.n_channel_in != self.n_channel_out:
            raise ModelError(
                f"a residual U-Net needs as many input as output channels ({self.n_channel_in} != "
                f"{self.n_channel_out}); set unet_residual to false"
            )

    @property
    def grid(self) -> int:
        """Down-sampling factor ``2**unet_n_depth``: tile sizes and offsets must be multiples of it."""
        return 2**self.unet_n_depth

    @property
    def receptive_field(self) -> int:
        """One-sided receptive-field radius in pixels, counted from the layer plan (see :func:`_receptive_field`)."""
        return _receptive_field(self)

    @property
    def halo(self) -> int:
        """Smallest grid-aligned halo that covers the receptive field: ``ceil(receptive_field / grid) * grid``."""
        return math.ceil(self.receptive_field / self.grid) * self.grid


# ----------------------------------------------------------------------------------------------------------
# Layer plan: the single description used by the builder and by the receptive-field count
# ----------------------------------------------------------------------------------------------------------


def _layer_plan(spec: ModelSpec) -> list[tuple]:
    """List the operations of CSBDeep's ``custom_unet`` in construction order.

    Each entry is a tuple whose first item is the kind:

    - ``("conv", name, filters, kernel, activation)``: 'same'-padded convolution at the current level
    - ``("pool", name)``: 2x2 max pooling, pushes the current tensor as a skip connection first
    - ``("up", name)``: 2x nearest up-sampling
    - ``("concat", name)``: concatenation with the most recent skip connection (popped)
    - ``("head", name, filters)``: the 1x1 output convolution, applied to the U-Net features
    - ``("residual", name)``: add the network input
    - ``("activation", name, activation)``: the last activation
    - ``("prob_scale", conv_name, eps_name, concat_name, filters)``: softplus 1x1 scale branch (+eps), concatenated

    Unnamed layers in CSBDeep get Keras' automatic names; the names here are those of a fresh Python
    process, which keeps files readable (h5 loading itself is order based, not name based).
    """
    k, nf, depth = spec.unet_kern_size, spec.unet_n_first, spec.unet_n_depth
    plan: list[tuple] = []
    for n in range(depth):
        for i in range(_N_CONV_PER_DEPTH):
            plan.append(("conv", f"down_level_{n}_no_{i}", nf * 2**n, k, "relu"))
        plan.append(("pool", f"max_{n}"))
    for i in range(_N_CONV_PER_DEPTH - 1):
        plan.append(("conv", f"middle_{i}", nf * 2**depth, k, "relu"))
    plan.append(("conv", f"middle_{_N_CONV_PER_DEPTH}", nf * 2 ** max(0, depth - 1), k, "relu"))
    for j, n in enumerate(reversed(range(depth))):
        suffix = "" if j == 0 else f"_{j}"
        plan.append(("up", f"up_sampling2d{suffix}"))
        plan.append(("concat", f"concatenate{suffix}"))
        for i in range(_N_CONV_PER_DEPTH - 1):
            plan.append(("conv", f"up_level_{n}_no_{i}", nf * 2**n, k, "relu"))
        # csbdeep's unet_block gets last_activation=None, so its last conv is also relu
        plan.append(("conv", f"up_level_{n}_no_{_N_CONV_PER_DEPTH}", nf * 2 ** max(0, n - 1), k, "relu"))
    plan.append(("head", "conv2d", spec.n_channel_out))
    if spec.unet_residual:
        plan.append(("residual", "add"))
    plan.append(("activation", "activation", spec.unet_last_activation))
    if spec.probabilistic:
        plan.append(("prob_scale", "conv2d_1", "scale_eps", f"concatenate_{depth}", spec.n_channel_out))
    return plan


def _receptive_field(spec: ModelSpec) -> int:
    """Exact one-sided receptive-field radius of the network, in input pixels.

    Follows :func:`_layer_plan` forwards and tracks which indices of each tensor one input pixel ``p`` can
    influence, as an interval ``[a, b]`` in that tensor's own (down-sampled) pixel units:

    - a k x k 'same' convolution widens it by ``(k - 1) / 2`` on each side (``(k-1)/2 * 2**level`` input pixels);
    - 2x2 max pooling maps it to ``[floor(a/2), floor(b/2)]``;
    - 2x nearest up-sampling maps it to ``[2a, 2b + 1]``;
    - a concatenation or residual addition takes the hull of the merged branches.

    Pooling makes the result depend on ``p mod 2**depth``, so every phase is evaluated and the largest distance
    between ``p`` and an influenced output pixel is returned. The influence radius equals the dependency radius
    (the set of input/output pixel pairs is the same), so a halo of this size makes tiles equal the whole image.
    For CSBDeep's U-Net it equals ``(k-1)/2 * (4 * (2**d - 1) + 2 * 2**d) + 2**d - 1``.
    """
    radius = 0
    for p in range(spec.grid):
        a = b = p
        skips: list[tuple[int, int]] = []
        features = (a, b)
        for op in _layer_plan(spec):
            kind = op[0]
            if kind == "conv":
                r = (op[3] - 1) // 2
                a, b = a - r, b + r
            elif kind == "pool":
                skips.append((a, b))
                a, b = a // 2, b // 2
            elif kind == "up":
                a, b = 2 * a, 2 * b + 1
            elif kind == "concat":
                sa, sb = skips.pop()
                a, b = min(a, sa), max(b, sb)
            elif kind == "head":
                features = (a, b)  # 1x1 conv: no widening; remembered for the probabilistic branch
            elif kind == "residual":
                a, b = min(a, p), max(b, p)
            elif kind == "prob_scale":
                a, b = min(a, features[0]), max(b, features[1])
        radius = max(radius, p - a, b - p)
    return radius


# ----------------------------------------------------------------------------------------------------------
# Reading config.json
# ----------------------------------------------------------------------------------------------------------


def _normalize_axes(axes: Any) -> str:
    """Normalise CSBDeep axes the way ``BaseConfig`` does: upper case, no sample axis, channel last."""
    if not isinstance(axes, str) or not axes:
        raise ModelError(f"'axes' must be a string such as 'YXC', got {axes!r}")
    axes = axes.upper().replace("S", "")
    if "C" not in axes:
        axes += "C"
    return axes


def read_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """Read and validate the network description in ``<model_dir>/config.json``.

    Missing ``unet_*`` keys take CSBDeep's defaults, as ``csbdeep.models.Config`` does for old configs.

    Parameters
    ----------
    model_dir : str or path
        A CSBDeep CARE or l2l-scale model folder.

    Returns
    -------
    ModelSpec

    Raises
    ------
    ModelError
        If the folder or ``config.json`` is missing or unreadable, or the config is not a 2D CARE network.
    """
    folder = _check_folder(model_dir)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(
            f"no {CONFIG_FILE} in model folder {folder}; pass the folder that contains config.json and the "
            "weights (a CSBDeep CARE or l2l-scale model)"
        )
    cfg = _read_json_object(cfg_path, "restore the file from the original model folder")
    for key, kind in (("n_rays", "StarDist"), ("n2v_perc_pix", "Noise2Void"), ("n2v_manipulator", "Noise2Void")):
        if key in cfg:
            raise ModelError(
                f"{cfg_path} describes a {kind} model, not a CARE model; use a CSBDeep CARE or l2l-scale model"
            )
    try:
        axes = _normalize_axes(cfg.get("axes", "YX"))
        n_dim = cfg.get("n_dim", len(axes.replace("C", "")))
        n_in = cfg.get("n_channel_in", 1)
        n_out = cfg.get("n_channel_out", 1)
        spec = ModelSpec(
            n_dim=n_dim,
            n_channel_in=n_in,
            n_channel_out=n_out,
            unet_n_depth=cfg.get("unet_n_depth", 2),
            unet_kern_size=cfg.get("unet_kern_size", 5 if n_dim == 2 else 3),
            unet_n_first=cfg.get("unet_n_first", 32),
            unet_last_activation=cfg.get("unet_last_activation", "linear"),
            unet_residual=cfg.get("unet_residual", n_in == n_out),
            probabilistic=cfg.get("probabilistic", False),
            axes=axes,
        )
    except ModelError as exc:
        raise ModelError(f"{cfg_path}: {exc}") from None
    shape = cfg.get("unet_input_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 3 or shape[-1] != spec.n_channel_in):
        raise ModelError(
            f"{cfg_path}: unet_input_shape {shape!r} does not match n_channel_in={spec.n_channel_in}; "
            "fix or remove unet_input_shape"
        )
    return spec


def _check_folder(model_dir: str | os.PathLike) -> Path:
    folder = Path(model_dir).expanduser()
    if not folder.exists():
        raise ModelError(
            f"model folder not found: {folder}; pass the folder that contains config.json and the weights"
        )
    if not folder.is_dir():
        raise ModelError(
            f"model path {folder} is a file, not a folder; pass the folder that contains config.json and the "
            "weights"
        )
    return folder


# ----------------------------------------------------------------------------------------------------------
# Building the network
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model folder loaded for prediction.

    Attributes
    ----------
    path : Path
        The model folder (resolved).
    spec : ModelSpec
    keras_model : keras.Model
    weights_file : Path
        The weights file that was loaded.
    metadata : dict
        Contents of ``l2l_scale.json``, or ``{}`` for a plain CSBDeep folder.
    checksum : str
        sha256 (hex) of ``weights_file``; identifies the model in output provenance.
    precision : str
        ``fp32``, ``bf16`` or ``fp16``: the compute precision the network was built with.
    """

    path: Path
    spec: ModelSpec
    keras_model: Any = field(repr=False)
    weights_file: Path
    metadata: dict
    checksum: str
    precision: str = "fp32"
    _predict_fn: Any = field(default=None, init=False, repr=False, compare=False)

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Run the network on a normalised batch.

        Parameters
        ----------
        x : numpy.ndarray
            ``[B, H, W, n_channel_in]``, already normalised (as in training); H and W multiples of ``spec.grid``.

        Returns
        -------
        numpy.ndarray
            float32 ``[B, H, W, n_channel_out]``; the Laplace mean for a probabilistic model (what CSBDeep's
            ``CARE.predict`` returns). No intensity rescaling is applied.

        Raises
        ------
        ChannelError
            If the channel count does not match the model.
        ModelError
            If the array is not 4D or H, W are not multiples of the grid.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ModelError(f"predict_batch expects a [B, H, W, C] array, got shape {x.shape}; add the batch axis")
        if x.shape[-1] != self.spec.n_channel_in:
            raise ChannelError(
                f"model {self.path.name} expects {self.spec.n_channel_in} input channel(s), got {x.shape[-1]}; "
                "select the input channel(s) the model was trained on"
            )
        g = self.spec.grid
        if x.shape[1] % g or x.shape[2] % g:
            raise ModelError(
                f"tile size {x.shape[1]}x{x.shape[2]} is not a multiple of the U-Net grid {g}; pad the tile to a "
                f"multiple of {g}"
            )
        if self._predict_fn is None:
            from l2l_scale.model.backend import make_predict_fn

            self._predict_fn = make_predict_fn(self.keras_model, self.spec.n_channel_in)
        y = self._predict_fn(x)
        return np.asarray(y[..., : self.spec.n_channel_out], dtype=np.float32)


def load_model(model_dir: str | os.PathLike, weights: str | None = None, precision: str = "fp32") -> LoadedModel:
    """Load a CSBDeep CARE or l2l-scale model folder, without executing anything stored in it.

    Works under every Keras backend that ``KERAS_BACKEND`` names (TensorFlow, JAX, PyTorch): the network is built
    from Keras layers and the h5 weights are read with h5py, so JAX and PyTorch never import TensorFlow.

    Parameters
    ----------
    model_dir : str or path
        Folder with ``config.json`` and weights-only h5 files.
    weights : str, optional
        Name of the weights file inside the folder. Default: ``weights_best.h5``, else ``weights_last.h5``.
    precision : {"fp32", "bf16", "fp16"}
        Compute precision (see :func:`build_unet`); the CPU check is the caller's (:func:`check_precision`).

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        Missing folder/config/weights, a corrupt or mismatching weights file, an unsupported (3D) network, or an
        unsafe folder (pickles, ``.keras`` archives, h5 models with ``Lambda`` layers or custom objects).
    ConfigError
        ``KERAS_BACKEND`` names a backend that is not installed or not supported.
    """
    from l2l_scale.model.backend import check_backend

    check_backend()
    folder = _check_folder(model_dir).resolve()
    spec = read_spec(folder)
    _check_folder_safety(folder)
    weights_file = _select_weights(folder, weights)
    _check_h5(weights_file)
    metadata = _read_metadata(folder, spec)
    checksum = sha256_file(weights_file)
    keras_model = build_unet(spec, precision, random_init=False)
    try:
        keras_model.load_weights(str(weights_file))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"weights in {weights_file} do not fit the network described by {folder / CONFIG_FILE} ({first_line}); "
            "use the config.json that was saved with these weights"
        ) from exc
    return LoadedModel(
        path=folder, spec=spec, keras_model=keras_model, weights_file=weights_file, metadata=metadata,
        checksum=checksum, precision=precision,
    )


def weights_path(model_dir: str | os.PathLike, weights: str | None = None) -> Path:
    """The weights file :func:`load_model` would load (no TensorFlow import, nothing loaded).

    Parameters
    ----------
    model_dir : str or path
    weights : str, optional
        File name inside the folder; default ``weights_best.h5``, else ``weights_last.h5``.

    Returns
    -------
    Path

    Raises
    ------
    ModelError
        If the folder or the weights file is missing, or ``weights`` is not a plain h5 file name.
    """
    return _select_weights(_check_folder(model_dir).resolve(), weights)


def check_model_folder(model_dir: str | os.PathLike, weights: str | None = None) -> Path:
    """Everything :func:`load_model` checks before building the network, without importing TensorFlow.

    Lets a client refuse an unsafe or corrupt model folder before any work is scheduled on a cluster.

    Returns
    -------
    Path
        The weights file that would be loaded.
    """
    folder = _check_folder(model_dir).resolve()
    _check_folder_safety(folder)
    path = _select_weights(folder, weights)
    _check_h5(path)
    return path


def read_metadata(model_dir: str | os.PathLike) -> dict:
    """Read ``<model_dir>/l2l_scale.json`` (``{}`` for a plain CSBDeep folder), validated against ``config.json``.

    No TensorFlow import: safe on a Dask client.

    Raises
    ------
    ModelError
        If ``config.json`` or ``l2l_scale.json`` is unreadable or they disagree (e.g. channel counts).
    """
    folder = _check_folder(model_dir).resolve()
    return _read_metadata(folder, read_spec(folder))


def _select_weights(folder: Path, weights: str | None) -> Path:
    if weights is not None:
        if Path(weights).name != weights or weights in (".", ".."):
            raise ModelError(
                f"weights must be a file name inside the model folder, got {weights!r}; e.g. weights='weights_last.h5'"
            )
        if not weights.endswith((".h5", ".hdf5")):
            raise ModelError(f"weights file {weights!r} is not an .h5/.hdf5 weights file; pass e.g. 'weights_last.h5'")
        path = folder / weights
        if not path.is_file():
            raise ModelError(f"weights file not found: {path}; pass one of {_list_h5(folder) or 'no h5 files'}")
        return path
    for name in (WEIGHTS_BEST, WEIGHTS_LAST):
        if (folder / name).is_file():
            return folder / name
    others = _list_h5(folder)
    hint = f"pass weights= one of {others}" if others else "copy the weights file (weights_best.h5) into the folder"
    raise ModelError(f"no weights file ({WEIGHTS_BEST} or {WEIGHTS_LAST}) in model folder {folder}; {hint}")


def _list_h5(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".h5", ".hdf5"))


def _check_h5(path: Path) -> None:
    """Refuse an h5 file that is corrupt or holds a model config with code (Lambda layers, custom objects)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            model_config = f.attrs.get("model_config")
            root = f["model_weights"] if ("layer_names" not in f.attrs and "model_weights" in f) else f
            has_layers = "layer_names" in root.attrs or "layer_names0" in root.attrs
    except OSError as exc:
        raise ModelError(
            f"cannot read weights file {path} (corrupt or not an HDF5 file: {exc}); restore it from the original "
            "model folder or pass weights='weights_last.h5'"
        ) from exc
    if model_config is not None:
        problem = _unsafe_model_config(model_config)
        if problem:
            raise ModelError(
                f"refusing {path}: it is a full Keras model with {problem}, which can run code; export a "
                "weights-only file (model.save_weights) next to config.json instead"
            )
    if not has_layers:
        raise ModelError(
            f"{path} is an HDF5 file but not Keras/CSBDeep weights (no 'layer_names'); use the weights_best.h5 "
            "written by CSBDeep or l2l-scale"
        )


def _unsafe_model_config(raw: Any) -> str | None:
    """Name the code-carrying part of a Keras h5 ``model_config`` (None if it only uses built-in layers)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        cfg = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return "an unreadable model_config"
    import keras

    stack = [cfg]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        cls = node.get("class_name")
        if cls in _LAMBDA_LAYERS:
            return f"a {cls} layer"
        module = node.get("module")
        registered = node.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            return f"custom object {registered!r}"
        if isinstance(module, str) and not module.startswith("keras"):
            return f"custom object {cls!r} from module {module!r}"
        layers_list = node.get("config", {}).get("layers") if isinstance(node.get("config"), dict) else None
        if isinstance(layers_list, list):
            for layer in layers_list:
                lcls = layer.get("class_name") if isinstance(layer, dict) else None
                if not isinstance(lcls, str):
                    continue
                if not hasattr(keras.layers, lcls) and lcls not in ("Functional", "Sequential", "Model"):
                    return f"custom layer {lcls!r}"
        stack.extend(node.values())
    return None


def _check_folder_safety(folder: Path) -> None:
    """Refuse model folders that hold files whose loading would execute code.

    Nothing here is loaded except JSON and HDF5 arrays, but a folder that ships pickles or full models is not a
    CSBDeep/l2l-scale model folder and other tools would run that code; refusing it is the safe default.
    """
    count = 0
    for path in folder.rglob("*"):
        count += 1
        if count > _MAX_SCANNED_FILES:
            raise ModelError(
                f"model folder {folder} holds more than {_MAX_SCANNED_FILES} files; pass the folder with "
                "config.json and the weights, not a parent folder"
            )
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in _UNSAFE_SUFFIXES:
            raise ModelError(
                f"refusing model folder {folder}: {path.name} is {_UNSAFE_SUFFIXES[suffix]}; keep only config.json, "
                "l2l_scale.json and weights-only .h5 files in the model folder"
            )
        if suffix in (".npy", ".npz") and _numpy_has_objects(path):
            raise ModelError(
                f"refusing model folder {folder}: {path.name} holds a Python-object (pickled) array; remove it from "
                "the model folder"
            )
        if suffix in (".h5", ".hdf5") and path.parent == folder:
            _check_h5_safety_only(path)


def _check_h5_safety_only(path: Path) -> None:
    # Other h5 files in the folder are not loaded, so only code-carrying ones matter (not corrupt ones).
    import h5py

    try:
        with h5py.File(path, "r") as f:
            model_config = f.attrs.get("model_config")
    except OSError:
        return
    if model_config is not None:
        problem = _unsafe_model_config(model_config)
        if problem:
            raise ModelError(
                f"refusing {path}: it is a full Keras model with {problem}, which can run code; remove it from the "
                "model folder and keep weights-only files"
            )


def _numpy_has_objects(path: Path) -> bool:
    """True if a .npy/.npz file holds an object array (a pickle); only the array headers are read."""
    import zipfile

    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                return _npy_header_has_objects(f)
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    if _npy_header_has_objects(f):
                        return True
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # unreadable, so nobody can unpickle it either
    return False


def _npy_header_has_objects(f) -> bool:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        dtype = np.lib.format.read_array_header_1_0(f)[2]
    elif version == (2, 0):
        dtype = np.lib.format.read_array_header_2_0(f)[2]
    else:  # no public reader for newer header versions: be conservative
        return True
    return bool(dtype.hasobject)


def _read_json_object(path: Path, fix: str) -> dict:
    """A model folder's JSON file as a dict, or a :class:`ModelError` that names the file and ``fix``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path} ({exc}); {fix}") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not a JSON object; {fix}")
    return obj


def _read_metadata(folder: Path, spec: ModelSpec) -> dict:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    meta = _read_json_object(path, "fix or delete the file (the model loads without it)")
    try:
        _validate_metadata(meta, spec)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return meta


def _validate_metadata(meta: Mapping, spec: ModelSpec) -> None:
    channels = meta.get("channels")
    if channels is not None:
        if not isinstance(channels, Mapping):
            raise ModelError("'channels' must be {'input': [...], 'output': [...]}; fix the metadata")
        for key, n in (("input", spec.n_channel_in), ("output", spec.n_channel_out)):
            names = channels.get(key)
            if names is None:
                continue
            if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names) or len(names) != n:
                raise ModelError(
                    f"channels.{key} must list {n} channel name(s) (the model has {n}), got {names!r}; fix the metadata"
                )
    norm = meta.get("normalization")
    if norm is not None:
        pct = norm.get("percentiles") if isinstance(norm, Mapping) else None
        if pct is not None:
            ok = (
                isinstance(pct, (list, tuple)) and len(pct) == 2
                and all(isinstance(v, (int, float, np.integer, np.floating)) for v in pct)
                and 0 <= pct[0] < pct[1] <= 100
            )
            if not ok:
                raise ModelError(
                    f"normalization.percentiles must be [lo, hi] with 0 <= lo < hi <= 100, got {pct!r}; "
                    "fix the metadata"
                )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (model checksums in provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Per-process cache and TF threads
# ----------------------------------------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def get_cached_model(model_dir: str | os.PathLike, weights: str | None = None,
                     precision: str = "fp32") -> LoadedModel:
    """Load a model once per process (e.g. once per Dask worker) and reuse it.

    The cache key includes the modification times of ``config.json``, the weights file and ``l2l_scale.json``,
    so a model folder that is re-exported in place is reloaded. A lock makes concurrent worker threads share one
    load. The last few models are kept.

    Parameters
    ----------
    model_dir : str or path
    weights, precision : str, optional
        As in :func:`load_model`.

    Returns
    -------
    LoadedModel
        The same object for repeated calls with an unchanged folder.
    """
    folder = _check_folder(model_dir).resolve()
    with _CACHE_LOCK:
        weights_file = _select_weights(folder, weights) if (folder / CONFIG_FILE).is_file() else None
        stamps = tuple(
            p.stat().st_mtime_ns if p is not None and p.is_file() else None
            for p in (folder / CONFIG_FILE, weights_file, folder / METADATA_FILE)
        )
        key = (str(folder), weights, precision, stamps)
        model = _CACHE.get(key)
        if model is None:
            model = load_model(folder, weights, precision)
            _CACHE[key] = model
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return model


def configure_tf_threads(n_threads: int) -> None:
    """Limit TensorFlow's intra- and inter-op thread pools, before the first TF operation in this process.

    Dask workers run several tasks at once; without a limit every TF call would use all cores. If TF is already
    initialised the settings cannot change any more; that is ignored. Under ``KERAS_BACKEND=torch`` it limits
    PyTorch's threads instead, under JAX nothing (see :func:`l2l_scale.model.backend.configure_threads`).

    Parameters
    ----------
    n_threads : int
        Threads per pool; 0 keeps TensorFlow's default.
    """
    from l2l_scale.errors import ConfigError

    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 0:
        raise ConfigError(f"n_threads must be an integer >= 0 (0 = TensorFlow default), got {n_threads!r}")
    from l2l_scale.model.backend import configure_threads

    configure_threads(int(n_threads))


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def export_model(
    keras_model: "keras.Model",
    spec: ModelSpec,
    model_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any],
    weights_best: Sequence[np.ndarray] | str | os.PathLike | None = None,
    train_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model folder that both l2l-scale and CSBDeep (``CARE(None, name, basedir)``) load.

    Writes ``config.json`` (all fields of ``csbdeep.models.Config``, as CSBDeep writes them),
    ``weights_best.h5`` and ``weights_last.h5`` (CSBDeep's weights-only legacy h5 format) and ``l2l_scale.json``.
    Each file is written to a temporary name and renamed, and ``config.json`` comes last, so a crash never leaves
    a folder that looks complete.

    Parameters
    ----------
    keras_model : keras.Model
        The trained network; its weights must fit ``build_unet(spec)`` (they are copied in layer order).
        Its current weights become ``weights_last.h5``.
    spec : ModelSpec
    model_dir : str or path
        Output folder (created). CSBDeep loads it as ``CARE(None, name=folder.name, basedir=folder.parent)``.
    metadata : mapping
        ``l2l_scale.json`` content: ``channels`` ({"input": [...], "output": [...]}), ``normalization``
        ({"percentiles": [lo, hi], "values": {...}}), ``loss``, ``preset``, ``provenance`` (and any extra keys).
        ``l2l_scale_version`` and the weights' sha256 are added.
    weights_best : sequence of arrays, path, or None
        Weights of the best epoch: ``keras_model.get_weights()``-style arrays or an h5 weights file (e.g. a
        Keras checkpoint). None: same as the current weights.
    train_params : mapping, optional
        CSBDeep ``train_*`` values to record in ``config.json`` (e.g. ``{"train_learning_rate": 2e-4}``);
        CSBDeep's defaults otherwise.
    overwrite : bool
        Replace an existing model in ``model_dir``.

    Returns
    -------
    Path
        The model folder.

    Raises
    ------
    OutputError
        If ``model_dir`` already holds a model and ``overwrite`` is false, or it cannot be written.
    ModelError
        If the weights do not fit ``spec`` or the metadata is inconsistent with it.
    """
    from l2l_scale import __version__

    folder = Path(model_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"model output {folder} is a file; choose a folder path")
    existing = [n for n in (CONFIG_FILE, WEIGHTS_BEST, WEIGHTS_LAST, METADATA_FILE) if (folder / n).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"model folder {folder} already holds a model ({', '.join(existing)}); choose a new folder or pass "
            "overwrite=True"
        )
    if not isinstance(metadata, Mapping):
        raise ModelError(f"metadata must be a dict, got {type(metadata).__name__}; pass metadata={{...}}")
    _validate_metadata(metadata, spec)
    train = dict(_TRAIN_DEFAULTS)
    for key, value in (train_params or {}).items():
        if key not in _TRAIN_DEFAULTS and key != "train_loss":
            raise ModelError(f"unknown CSBDeep training parameter {key!r}; use one of {sorted(_TRAIN_DEFAULTS)}")
        train[key] = value

    meta = dict(metadata)
    meta["l2l_scale_version"] = __version__
    _dumps(meta)  # fail on non-JSON metadata before anything is written
    last_model = _canonical_copy(keras_model, spec)
    if weights_best is None:
        best_model = last_model
    else:
        best_model = build_unet(spec, random_init=False)
        if isinstance(weights_best, (str, os.PathLike)):
            try:
                best_model.load_weights(str(weights_best))
            except (ValueError, KeyError, OSError) as exc:
                raise ModelError(
                    f"cannot use {weights_best} as weights_best ({exc}); pass a checkpoint of this network"
                ) from exc
        else:
            _set_weights(best_model, list(weights_best), "weights_best")

    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / WEIGHTS_LAST, lambda p: _write_legacy_h5(last_model, p))
        atomic_write(folder / WEIGHTS_BEST, lambda p: _write_legacy_h5(best_model, p))
        meta["weights"] = {n: {"sha256": sha256_file(folder / n)} for n in (WEIGHTS_BEST, WEIGHTS_LAST)}
        atomic_write(folder / METADATA_FILE, lambda p: p.write_text(_dumps(meta), encoding="utf-8"))
        config = _csbdeep_config(spec, train)
        atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config), encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write model folder {folder} ({exc}); check permissions and free space") from exc
    return folder


def _csbdeep_config(spec: ModelSpec, train: Mapping[str, Any]) -> dict:
    """``vars(csbdeep.models.Config(...))`` for this network, in CSBDeep's key order."""
    return {
        "n_dim": spec.n_dim,
        "axes": spec.axes,
        "n_channel_in": spec.n_channel_in,
        "n_channel_out": spec.n_channel_out,
        "train_checkpoint": WEIGHTS_BEST,
        "train_checkpoint_last": WEIGHTS_LAST,
        "train_checkpoint_epoch": "weights_now.h5",
        "probabilistic": bool(spec.probabilistic),
        "unet_residual": bool(spec.unet_residual),
        "unet_n_depth": spec.unet_n_depth,
        "unet_kern_size": spec.unet_kern_size,
        "unet_n_first": spec.unet_n_first,
        "unet_last_activation": spec.unet_last_activation,
        "unet_input_shape": [None] * spec.n_dim + [spec.n_channel_in],
        # CSBDeep only accepts 'laplace' for probabilistic and 'mse'/'mae' otherwise; the real loss (e.g.
        # MS-SSIM) is recorded in l2l_scale.json
        "train_loss": train.get("train_loss") or ("laplace" if spec.probabilistic else "mae"),
        **{k: train[k] for k in _TRAIN_DEFAULTS},
    }


def _canonical_copy(keras_model: "keras.Model", spec: ModelSpec) -> "keras.Model":
    """Copy the weights into a freshly built network, so the file gets CSBDeep's layer order and names."""
    model = build_unet(spec, random_init=False)
    try:
        weights = keras_model.get_weights()
    except AttributeError as exc:
        raise ModelError(f"keras_model must be a Keras model, got {type(keras_model).__name__}") from exc
    _set_weights(model, weights, "keras_model")
    return model


def _set_weights(model: "keras.Model", weights: list, what: str) -> None:
    expected = [tuple(w.shape) for w in model.weights]
    got = [tuple(np.shape(w)) for w in weights]
    if expected != got:
        raise ModelError(
            f"{what} does not fit the network described by the spec ({len(got)} arrays vs {len(expected)} "
            "expected, or different shapes); build the network with build_unet(spec)"
        )
    model.set_weights(weights)


def _write_legacy_h5(model: "keras.Model", path: Path) -> None:
    """Write weights in Keras' legacy weights-only h5 layout (what CSBDeep and Keras 2 ``load_weights`` read)."""
    import h5py
    import keras

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
        f.attrs["backend"] = keras.backend.backend().encode("utf8")
        f.attrs["keras_version"] = str(keras.__version__).encode("utf8")
        for layer in sorted(model.layers, key=lambda lay: lay.name):
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights  # Keras' legacy h5 order
            names = [str(w.path).encode("utf8") for w in weights]
            group.attrs["weight_names"] = names
            for name, w in zip(names, weights):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(w))
        top = f.create_group("top_level_model_weights")
        top.attrs["weight_names"] = []


def _dumps(obj: Any) -> str:
    def _default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.dumps(obj, indent=2, default=_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"metadata cannot be written as JSON ({exc}); use plain numbers, strings, lists and dicts"
        ) from exc
