"""CARE-compatible U-Net models: spec and receptive field, build, safe loading, per-process cache, export.

:mod:`~l2l_scale.model.spec` (``config.json``/``l2l_scale.json``, no TensorFlow), :mod:`~l2l_scale.model.build`,
:mod:`~l2l_scale.model.safety` and :mod:`~l2l_scale.model.loading`, :mod:`~l2l_scale.model.cache`,
:mod:`~l2l_scale.model.export` (CSBDeep model folders).
"""

from l2l_scale.model.backend import PRECISIONS, check_backend, check_precision
from l2l_scale.model.build import build_unet
from l2l_scale.model.cache import configure_tf_threads, get_cached_model
from l2l_scale.model.export import export_model
from l2l_scale.model.loading import LoadedModel, check_model_folder, load_model, sha256_file, weights_path
from l2l_scale.model.spec import ModelSpec, read_metadata, read_spec

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "PRECISIONS",
    "build_unet",
    "check_backend",
    "check_model_folder",
    "check_precision",
    "configure_tf_threads",
    "export_model",
    "get_cached_model",
    "load_model",
    "read_metadata",
    "read_spec",
    "sha256_file",
    "weights_path",
]
