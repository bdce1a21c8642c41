"""Load a CSBDeep CARE or l2l-scale model folder for prediction, without executing anything stored in it.

:func:`load_model` checks the folder (:mod:`l2l_scale.model.safety`), rebuilds the network from
``config.json`` (:func:`l2l_scale.model.build.build_unet`) and reads the weights-only h5 file into it.
:func:`check_model_folder` and :func:`weights_path` do the checks without importing TensorFlow, so a client can
refuse a bad folder before any work is scheduled.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from l2l_scale.errors import ChannelError, ModelError
from l2l_scale.model.build import build_unet
from l2l_scale.model.safety import _check_folder_safety, _check_h5
from l2l_scale.model.spec import (
    CONFIG_FILE,
    WEIGHTS_BEST,
    WEIGHTS_LAST,
    ModelSpec,
    _check_folder,
    _read_metadata,
    read_spec,
)


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
    _predict_fn_lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

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
        fn = self._predict_fn
        if fn is None:
            # Worker threads share one cached model: the first call builds (and traces) the one forward pass.
            with self._predict_fn_lock:
                if self._predict_fn is None:
                    from l2l_scale.model.backend import make_predict_fn

                    self._predict_fn = make_predict_fn(self.keras_model, self.spec.n_channel_in)
                fn = self._predict_fn
        y = fn(x)
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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (model checksums in provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

