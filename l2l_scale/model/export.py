"""Write a model folder that both l2l-scale and CSBDeep (``CARE(None, name, basedir)``) load.

``config.json`` carries all fields of ``csbdeep.models.Config`` and the weights are written in Keras' legacy
weights-only h5 layout (what CSBDeep and Keras 2 ``load_weights`` read), in CSBDeep's layer order and names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from l2l_scale.errors import ModelError, OutputError
from l2l_scale.io.atomic import atomic_write
from l2l_scale.model.build import build_unet
from l2l_scale.model.loading import sha256_file
from l2l_scale.model.spec import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_BEST,
    WEIGHTS_LAST,
    ModelSpec,
    _validate_metadata,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

_TRAIN_DEFAULTS: dict[str, Any] = {  # csbdeep.models.Config defaults, written so CSBDeep can retrain the model
    "train_epochs": 100,
    "train_steps_per_epoch": 400,
    "train_learning_rate": 0.0004,
    "train_batch_size": 16,
    "train_tensorboard": True,
    "train_reduce_lr": {"factor": 0.5, "patience": 10, "min_delta": 0},
}



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
