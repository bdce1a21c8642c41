"""CARE-compatible U-Net models: build, load, export, receptive field (see :mod:`l2l_scale.model.unet`)."""

from l2l_scale.model.backend import PRECISIONS, check_backend, check_precision
from l2l_scale.model.unet import (
    LoadedModel,
    ModelSpec,
    build_unet,
    check_model_folder,
    configure_tf_threads,
    export_model,
    get_cached_model,
    load_model,
    read_metadata,
    read_spec,
    sha256_file,
    weights_path,
)

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
