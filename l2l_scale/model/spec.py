"""What a model folder says, read without TensorFlow: the network (``config.json``) and ``l2l_scale.json``.

A model folder is the one CSBDeep writes (``config.json`` + weights-only ``weights_best.h5`` /
``weights_last.h5``), plus an optional ``l2l_scale.json`` with channel names, normalisation and provenance.

:class:`ModelSpec` describes the network. One layer plan (:func:`_layer_plan`) mirrors
``csbdeep.internals.nets.custom_unet`` layer for layer; :func:`l2l_scale.model.build.build_unet` builds from it,
so CSBDeep's order-based h5 weight loading works in both directions, and the same plan gives the receptive field
(:func:`_receptive_field`), so the halo of tiled prediction is computed, never guessed.

Nothing here imports TensorFlow/Keras, so :func:`read_spec`, :func:`read_metadata` and
:attr:`ModelSpec.receptive_field` are cheap to call on a Dask client that never runs the network.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from l2l_scale.errors import ModelError

CONFIG_FILE = "config.json"
METADATA_FILE = "l2l_scale.json"
WEIGHTS_BEST = "weights_best.h5"
WEIGHTS_LAST = "weights_last.h5"

_N_CONV_PER_DEPTH = 2  # CSBDeep's common_unet always uses 2 convolutions per level


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


def _read_json_object(path: Path, fix: str) -> dict:
    """A model folder's JSON file as a dict, or a :class:`ModelError` that names the file and ``fix``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path} ({exc}); {fix}") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not a JSON object; {fix}")
    return obj


# ----------------------------------------------------------------------------------------------------------
# Reading l2l_scale.json
# ----------------------------------------------------------------------------------------------------------


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
