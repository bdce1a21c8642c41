"""The patch store: its layout, the tasks that write its chunks, and reading it back.

A zarr v3 group::

    X       float32 [N, P, P, C_in]    chunked by ``chunk_patches`` patches (about 16 MB per chunk)
    Y       float32 [N, P, P, C_out]
    table/  one int/float array per column, N rows: image, y, x, size, zoom, rotation, augmented, split, local

Rows ``[0, n_train)`` are training patches and ``[n_train, N)`` validation patches, each part in a shuffled order
(so every chunk mixes many images). ``table`` records where each patch came from: ``image`` indexes the
``images`` list of the attributes, ``(y, x)`` is the top-left corner of the source region of side ``size``
(source pixels), ``zoom`` the nominal zoom factor (1 for raw patches), ``rotation`` the number of
counter-clockwise quarter turns (``np.rot90``), ``split`` 0 = training, 1 = validation, ``local`` the patch's
index within its image (seeds its Poisson noise). The attributes (``l2l_scale_patches``) hold the channels, the
normalisation (percentiles and per-image values), the sampling and augmentation settings, the images and the
provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from l2l_scale.config import PatchConfig
from l2l_scale.errors import InputError
from l2l_scale.io import journal
from l2l_scale.io.output import partial_path

FORMAT_VERSION = 1
ATTRS_KEY = "l2l_scale_patches"
TABLE_COLUMNS = ("image", "y", "x", "size", "zoom", "rotation", "augmented", "split", "local")
_TABLE_DTYPES = {"image": "int32", "y": "int32", "x": "int32", "size": "int32", "zoom": "float32",
                 "rotation": "int8", "augmented": "bool", "split": "uint8", "local": "int32"}
_TARGET_CHUNK_BYTES = 16 << 20


def _codec() -> BloscCodec:
    # lz4 with byte shuffle: float noise barely compresses, and the training input pipeline must decode fast.
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)


def _chunk_patches(cfg: PatchConfig, n_channels: int) -> int:
    if cfg.chunk_patches:
        return int(cfg.chunk_patches)
    per = cfg.patch_size**2 * n_channels * 4
    return int(min(512, max(32, round(_TARGET_CHUNK_BYTES / per))))


def _create_arrays(root: zarr.Group, shapes: dict[str, tuple[int, ...]], chunk: int) -> None:
    """Create ``X`` and ``Y`` (kept when a resumed run finds them with the right shape)."""
    for name, shape in shapes.items():
        if name in root and tuple(root[name].shape) == shape:
            continue
        root.create_array(name, shape=shape, chunks=(chunk,) + shape[1:], dtype="float32",
                          compressors=[_codec()], fill_value=0.0, overwrite=True,
                          dimension_names=["patch", "y", "x", "c"])


def _assemble_task(job: dict) -> int:
    """Gather the staged patches of one output chunk (rows of several images) and write the chunk."""
    X = zarr.open_array(store=job["store"], path="X", mode="r+")
    Y = zarr.open_array(store=job["store"], path="Y", mode="r+")
    a, b = job["rows"]
    images, local = np.asarray(job["image"]), np.asarray(job["local"])
    xs = np.empty((b - a,) + X.shape[1:], np.float32)
    ys = np.empty((b - a,) + Y.shape[1:], np.float32)
    for i in np.unique(images):
        pos = np.flatnonzero(images == i)
        order = np.argsort(local[pos], kind="stable")
        pos, idx = pos[order], local[pos][order]
        stage = Path(job["stage_dir"]) / f"{int(i)}"
        xs[pos] = np.load(stage.with_suffix(".X.npy"), mmap_mode="r")[idx]
        ys[pos] = np.load(stage.with_suffix(".Y.npy"), mmap_mode="r")[idx]
    X[a:b] = xs
    Y[a:b] = ys
    journal.record(*job["record"])  # after the chunk's data (see l2l_scale.io.journal)
    return b - a


def _write_table(root: zarr.Group, columns: dict[str, np.ndarray]) -> None:
    """Write the per-patch table, one array per column of :data:`TABLE_COLUMNS`."""
    table = root.require_group("table")
    n = len(columns["image"])
    for name in TABLE_COLUMNS:
        data = np.asarray(columns[name]).astype(_TABLE_DTYPES[name])
        table.create_array(name, shape=data.shape, chunks=(max(1, min(n, 1 << 16)),), dtype=data.dtype,
                           compressors=[_codec()], overwrite=True)[...] = data


# -------------------------------------------------------------------------------------------------- reading


@dataclass
class PatchStore:
    """An opened patch store (read-only).

    Attributes
    ----------
    path : Path
    X, Y : zarr.Array
        ``[N, P, P, C]`` float32 inputs and targets.
    meta : dict
        The ``l2l_scale_patches`` attributes.
    provenance : dict
        The store's ``l2l_scale`` provenance block.
    """

    path: Path
    X: Any
    Y: Any
    meta: dict
    provenance: dict

    @property
    def n_train(self) -> int:
        """Training rows ``[0, n_train)``."""
        return int(self.meta["n_train"])

    @property
    def n_validation(self) -> int:
        """Validation rows ``[n_train, N)``."""
        return int(self.meta["n_validation"])

    @property
    def n_patches(self) -> int:
        return int(self.X.shape[0])

    @property
    def patch_size(self) -> int:
        return int(self.X.shape[1])

    @property
    def chunk(self) -> int:
        """Patches per zarr chunk."""
        return int(self.X.chunks[0])

    @property
    def channels(self) -> dict:
        """``{"input": [...], "output": [...]}``."""
        return dict(self.meta["channels"])


def open_patches(path: str | Path) -> PatchStore:
    """Open a patch store written by :func:`create_patches`.

    Raises
    ------
    InputError
        Missing path, not a patch store, a newer format, or inconsistent arrays.
    """
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        hint = (f"; {partial} holds an unfinished run, finish it with 'l2l-scale patches ... --resume'"
                if partial.exists() else "; create it with 'l2l-scale patches'")
        raise InputError(f"patch store {path} does not exist{hint}")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception:  # zarr raises several types for "not a group"
        raise InputError(f"{path} is not a zarr group; create a patch store with 'l2l-scale patches'") from None
    meta = dict(root.attrs).get(ATTRS_KEY)
    if not isinstance(meta, dict) or "X" not in root or "Y" not in root:
        raise InputError(f"{path} is not an l2l-scale patch store (no X/Y arrays or '{ATTRS_KEY}' attributes); "
                         "create one with 'l2l-scale patches'")
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: patch store format {meta.get('format')} is newer than this l2l-scale reads "
                         f"({FORMAT_VERSION}); upgrade l2l-scale")
    X, Y = root["X"], root["Y"]
    if X.shape[0] != Y.shape[0] or X.shape[1:3] != Y.shape[1:3] or X.ndim != 4 or Y.ndim != 4:
        raise InputError(f"{path}: X {X.shape} and Y {Y.shape} do not match; recreate the patch store")
    if int(meta.get("n_train", -1)) + int(meta.get("n_validation", -1)) != X.shape[0]:
        raise InputError(f"{path}: the attributes count {meta.get('n_train')} + {meta.get('n_validation')} patches "
                         f"but X holds {X.shape[0]}; recreate the patch store")
    return PatchStore(path, X, Y, meta, dict(root.attrs).get("l2l_scale") or {})


def read_table(path: str | Path) -> dict[str, np.ndarray]:
    """The per-patch table of a store as numpy arrays (columns :data:`TABLE_COLUMNS` plus ``key``).

    ``key`` is each patch's source image key (``""`` for a single image, ``"A/1/0"`` for plate fields).
    """
    store = open_patches(path)
    root = zarr.open_group(str(store.path), mode="r")
    out = {name: np.asarray(root["table"][name][...]) for name in TABLE_COLUMNS}
    keys = np.array([im["key"] for im in store.meta["images"]], dtype=object)
    out["key"] = keys[out["image"]] if out["image"].size else np.zeros(0, dtype=object)
    return out
