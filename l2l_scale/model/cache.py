"""The per-process model cache (one load per Dask worker process) and the TensorFlow thread limit."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from l2l_scale.model.loading import LoadedModel, _select_weights, load_model
from l2l_scale.model.spec import CONFIG_FILE, METADATA_FILE, _check_folder

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
