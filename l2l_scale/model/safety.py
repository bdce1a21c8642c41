"""Refuse model folders and files whose loading could execute code.

Nothing in a model folder is ever executed. Only JSON and HDF5 arrays are read; folders holding pickles,
``.keras`` archives or full-model h5 files with ``Lambda`` layers or custom objects are refused, and so are
h5 files that are corrupt or not Keras/CSBDeep weights. Only file headers and attributes are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from l2l_scale.errors import ModelError

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
