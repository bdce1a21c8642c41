"""OME-Zarr (NGFF 0.4 / 0.5) images and HCS plates as dask-backed xarray.

Reading and writing are kept apart (as in ome-zarr-py): :func:`open_image`, :func:`open_dataset` and
:func:`read_info` only ever open stores read-only; :func:`write_image` and :func:`write_plate` write NGFF 0.5
(zarr v3) into a temporary sibling path and rename it at the end, so a crash never leaves something that
looks like a finished OME-Zarr.

We write with zarr directly rather than through ``ome_zarr.writer`` because we need three things it does not
give: each pyramid level is computed from the previous level *on disk* (the expensive graph runs once and
memory stays bounded), block-level completion records for ``--resume``, and the atomic rename.
"""

from __future__ import annotations

import functools
import gzip
import json
import lzma
import os
import re
import shlex
import shutil
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.io import lock
from l2l_scale.io.atomic import write_json

SUPPORTED_VERSIONS = ("0.4", "0.5")
WRITE_VERSION = "0.5"
DIM_ORDER = ("t", "c", "z", "y", "x")
SPATIAL = ("z", "y", "x")
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
DEFAULT_CHUNK = 1024
TOP_LEVEL_MAX = 1024
PARTIAL_SUFFIX = ".partial"
PROGRESS_DIR = ".l2l-progress"
_COLORS = ("FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")


# --------------------------------------------------------------------------------------------- provenance


_COMMAND_LINE: str | None = None


def set_command_line(argv: Sequence[str]) -> None:
    """Record the ``l2l-scale`` command line for provenance (called once by the CLI)."""
    global _COMMAND_LINE
    _COMMAND_LINE = shlex.join(["l2l-scale", *argv])


def provenance(parameters: Mapping[str, Any] | None = None, inputs: Any = None, **extra: Any) -> dict:
    """Build the ``l2l_scale`` provenance block stored in every output's attributes.

    Parameters
    ----------
    parameters : mapping, optional
        The parameters of the step (JSON-serialisable; paths are turned into strings).
    inputs : str, Path or list, optional
        The input path(s) the output was derived from.
    **extra
        Further entries, e.g. ``normalization=...`` or ``model=...``.
    """
    from l2l_scale import __version__

    block = {
        "version": __version__,
        "command": _COMMAND_LINE or shlex.join(["python", *sys.argv]),
        "parameters": _jsonable(dict(parameters or {})),
        "input": _jsonable(inputs),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    block.update(_jsonable(extra))
    return block


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ImageRef:
    """One image of a dataset: its group path and its key inside the dataset (``""``, ``"A/1/0"``, a name)."""

    path: Path
    key: str = ""


@dataclass
class MultiscaleMeta:
    """The parsed multiscales metadata of one NGFF image group."""

    version: str
    axes: list[dict]
    datasets: list[dict]
    channel_names: list[str]
    omero: dict | None
    provenance: dict | None
    name: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(a["name"] for a in self.axes)


def require_exists(path: str | Path) -> Path:
    """Return ``path`` as a Path, or raise InputError if it does not exist."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: path does not exist; check the spelling or create it first")
    return path


def _open_group(path: Path) -> zarr.Group:
    path = require_exists(Path(path))
    try:
        # mode="r" opens the store read-only: the input is never opened for writing.
        return zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise InputError(
            f"{path}: not an OME-Zarr group ({type(exc).__name__}); convert TIFFs with 'l2l-scale convert'"
        ) from None


def _group_attrs(path: Path) -> dict:
    """A group's attributes read from its JSON (zarr v3 ``zarr.json``, v2 ``.zattrs``), without opening zarr.

    Listing a plate of thousands of fields then takes milliseconds, not seconds. Anything unusual (no such file,
    not a group, another store) goes through zarr and its errors.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
        if isinstance(meta, dict) and meta.get("node_type") == "group":
            return dict(meta.get("attributes") or {})
    except (OSError, ValueError):
        pass
    try:
        if (path / ".zgroup").is_file():
            attrs = path / ".zattrs"
            return dict(json.loads(attrs.read_bytes())) if attrs.is_file() else {}
    except (OSError, ValueError, TypeError):
        pass
    return dict(_open_group(path).attrs)


def _ome_attrs(group: zarr.Group | dict, path: Path) -> tuple[str, dict]:
    """Return (version, attributes holding multiscales/plate/well) for NGFF 0.4 or 0.5."""
    attrs = dict(group if isinstance(group, dict) else group.attrs)
    if "ome" in attrs:  # NGFF 0.5 keeps everything under the "ome" key
        ome = dict(attrs["ome"])
        version = str(ome.get("version", ""))
    elif any(k in attrs for k in ("multiscales", "plate", "well")):
        ome = attrs
        version = ""
        for key in ("multiscales", "plate", "well"):
            if key in attrs:
                block = attrs[key][0] if isinstance(attrs[key], list) else attrs[key]
                version = str(block.get("version", ""))
                break
    else:
        raise InputError(
            f"{path}: not an OME-Zarr image or plate (no NGFF metadata); convert TIFFs with 'l2l-scale convert'"
        )
    if version not in SUPPORTED_VERSIONS:
        raise InputError(
            f"{path}: unsupported NGFF version {version or '(missing)'!r}; l2l-scale reads "
            f"{' and '.join(SUPPORTED_VERSIONS)}, convert it with ome-zarr-py or bioformats2raw"
        )
    return version, ome


def _read_multiscale(path: Path) -> tuple[zarr.Group, MultiscaleMeta]:
    group = _open_group(path)
    return group, _parse_multiscale(dict(group.attrs), path)


def _parse_multiscale(attrs: dict, path: Path) -> MultiscaleMeta:
    version, ome = _ome_attrs(attrs, path)
    if "multiscales" not in ome:
        kind = "an HCS plate" if "plate" in ome else "a well" if "well" in ome else "not an image"
        raise InputError(f"{path}: is {kind}, not an image; open one field, e.g. {path}/A/1/0")
    ms = ome["multiscales"][0]
    try:
        axes = [a if isinstance(a, dict) else {"name": a} for a in ms["axes"]]
        datasets = list(ms["datasets"])
    except (KeyError, TypeError):
        raise InputError(f"{path}: multiscales metadata lacks axes or datasets; the NGFF metadata is broken") from None
    names = [a.get("name") for a in axes]
    if any(n not in DIM_ORDER for n in names) or len(set(names)) != len(names):
        raise InputError(f"{path}: unsupported axes {names}; l2l-scale reads axes named t, c, z, y, x")
    omero = ome.get("omero")
    channel_names: list[str] = []
    if "c" in names and omero and omero.get("channels"):
        channel_names = [str(ch.get("label", i)) for i, ch in enumerate(omero["channels"])]
    return MultiscaleMeta(version, axes, datasets, channel_names, omero, attrs.get("l2l_scale"), ms.get("name"),
                          {k: v for k, v in ome.items() if k not in ("multiscales", "omero", "version")})


# What a damaged chunk raises here: codecs raise RuntimeError (blosc, zstd), gzip/zlib errors or EOFError
# (truncated streams), and a chunk of the wrong size fails its reshape with ValueError. Everything else (a
# MemoryError, a timeout or refused connection to an object store, a permission error) says nothing about the
# data and must surface as itself, so it is not caught.
_DECODE_ERRORS = (RuntimeError, ValueError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
_NOT_DAMAGE = (NotImplementedError, RecursionError)


class _CheckedArray:
    """A zarr array whose failed chunk reads become one clear :class:`InputError`.

    zarr/numcodecs raise many types for a corrupt or truncated chunk (see ``_DECODE_ERRORS``). Wrapping the read
    keeps the message short and names the image and region; the array pickles like zarr's own. Errors that are not
    about the stored bytes (memory, network, permissions) pass through unchanged.
    """

    def __init__(self, array: zarr.Array, path: Path):
        self.array, self.path = array, path
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self.array[key]
        except _DECODE_ERRORS as exc:
            if isinstance(exc, _NOT_DAMAGE):
                raise
            region = ", ".join(f"{k.start}:{k.stop}" if isinstance(k, slice) else str(k)
                               for k in (key if isinstance(key, tuple) else (key,)))
            raise InputError(f"{self.path}: cannot read region [{region}] ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else 'corrupt data'}); the OME-Zarr "
                             "is damaged, copy or convert it again") from None


def checked_dask(array: zarr.Array, path: Path) -> da.Array:
    """A dask array over ``array`` (chunked like it) whose read errors name the image and the fix."""
    from dask.base import tokenize

    name = "read-" + tokenize(str(path), array.path, array.shape, str(array.dtype))
    return da.from_array(_CheckedArray(array, path), chunks=array.chunks, name=name, asarray=False, lock=False)


def read_region(array: zarr.Array, key: Any, path: Path) -> np.ndarray:
    """Read ``array[key]`` with the same clear error as :func:`checked_dask`."""
    return _CheckedArray(array, path)[key]


def _scale_translation(transforms: Sequence[dict], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, trans = np.ones(ndim), np.zeros(ndim)
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=float)
        elif t.get("type") == "translation" and "translation" in t:
            trans = trans + np.asarray(t["translation"], dtype=float)
    return scale, trans


def open_image(path: str | Path, level: int = 0, *, field: str | None = None) -> xr.DataArray:
    """Open an NGFF 0.4/0.5 image lazily as a dask-backed :class:`xarray.DataArray`.

    Parameters
    ----------
    path : str or Path
        The image group, or an HCS plate together with ``field``.
    level : int
        Pyramid level, 0 = full resolution. Negative values count from the coarsest level.
    field : str, optional
        ``"A/1/0"`` (row/column/field) when ``path`` is a plate.

    Returns
    -------
    xarray.DataArray
        Dims from the NGFF axes; ``y``/``x`` (and ``z``, ``t``) coords are physical pixel positions from
        ``coordinateTransformations``; the ``c`` coord holds the omero channel names. ``attrs`` carry
        ``pixel_size`` (per spatial dim), ``units``, ``ngff_version``, ``path``, ``level``, ``n_levels`` and the
        ``l2l_scale`` provenance of the image, if any. No pixel data is read.
    """
    path = Path(path)
    if field:
        path = path / field
    group, meta = _read_multiscale(path)
    n_levels = len(meta.datasets)
    if not -n_levels <= level < n_levels:
        raise ConfigError(f"{path}: pyramid level {level} does not exist; choose 0..{n_levels - 1}")
    ds = meta.datasets[level]
    try:
        arr = group[ds["path"]]
    except KeyError:
        raise InputError(f"{path}: pyramid level {ds['path']!r} is listed but missing; the OME-Zarr is incomplete") from None
    dims = meta.dims
    if arr.ndim != len(dims):
        raise InputError(f"{path}: array has {arr.ndim} dims but the axes name {len(dims)}; the NGFF metadata is broken")
    if 0 in arr.shape:
        raise InputError(f"{path}: image is empty (shape {tuple(arr.shape)}); check the acquisition or conversion")
    data = checked_dask(arr, path)
    scale, trans = _scale_translation(ds.get("coordinateTransformations", []), len(dims))
    ms_scale, ms_trans = _scale_translation(meta.extra.get("coordinateTransformations", []), len(dims))
    scale, trans = scale * ms_scale, trans * ms_scale + ms_trans
    coords: dict[str, Any] = {}
    for i, d in enumerate(dims):
        if d == "c":
            names = meta.channel_names if len(meta.channel_names) == arr.shape[i] else [str(k) for k in range(arr.shape[i])]
            coords["c"] = names
        else:
            coords[d] = trans[i] + scale[i] * np.arange(arr.shape[i])
    units = {a["name"]: a.get("unit") for a in meta.axes if a.get("unit")}
    attrs = {
        "pixel_size": {d: float(scale[i]) for i, d in enumerate(dims) if d in SPATIAL},
        "units": units,
        "ngff_version": meta.version,
        "path": str(path),
        "level": level % n_levels,
        "n_levels": n_levels,
        "name": meta.name,
        "array": ds["path"],
    }
    if meta.provenance:
        attrs["l2l_scale"] = meta.provenance
    return xr.DataArray(data, dims=dims, coords=coords, attrs=attrs, name=meta.name)


@dataclass(frozen=True)
class ImageMeta:
    """What planners need of one image's level 0, as :func:`open_image` sees it, but without zarr/xarray objects."""

    path: Path
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    array: str
    channel_names: list[str]
    pixel_size: dict[str, float]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.dims, self.shape))


_PLAIN_TYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64"}


def _array_meta(path: Path) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """(shape, chunks, dtype) of a zarr array from its v3 JSON, else through zarr (v2, irregular grids)."""
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
        grid = meta["chunk_grid"]
        # Plain numeric types and a regular grid (what NGFF writers produce) are read here; zarr reads the rest.
        if meta.get("node_type") == "array" and grid.get("name") == "regular" and meta["data_type"] in _PLAIN_TYPES:
            shape, chunks = tuple(map(int, meta["shape"])), tuple(map(int, grid["configuration"]["chunk_shape"]))
            if len(shape) == len(chunks):
                return shape, chunks, np.dtype(meta["data_type"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        arr = zarr.open_array(store=str(path.parent), path=path.name, mode="r")
    except Exception:
        raise InputError(f"{path.parent}: pyramid level {path.name!r} is listed but missing; the OME-Zarr is "
                         "incomplete") from None
    return tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)


def image_meta(path: str | Path) -> ImageMeta:
    """Level 0 of an NGFF image from its JSON metadata alone: dims, shape, dtype, chunks, channels, pixel size.

    The same checks and values as :func:`open_image` (which it matches field for field), about ten times faster:
    planning a plate of thousands of fields must not cost seconds per hundred fields.
    """
    path = Path(path)
    meta = _parse_multiscale(_group_attrs(require_exists(path)), path)
    ds, dims = meta.datasets[0], meta.dims
    shape, chunks, dtype = _array_meta(path / ds["path"])
    if len(shape) != len(dims):
        raise InputError(f"{path}: array has {len(shape)} dims but the axes name {len(dims)}; the NGFF metadata is broken")
    if 0 in shape:
        raise InputError(f"{path}: image is empty (shape {shape}); check the acquisition or conversion")
    scale, _ = _scale_translation(ds.get("coordinateTransformations", []), len(dims))
    ms_scale, _ = _scale_translation(meta.extra.get("coordinateTransformations", []), len(dims))
    scale = scale * ms_scale
    n_c = shape[dims.index("c")] if "c" in dims else 0
    names = meta.channel_names if len(meta.channel_names) == n_c else [str(k) for k in range(n_c)]
    return ImageMeta(path, dims, shape, dtype, chunks, ds["path"], names,
                     {d: float(scale[i]) for i, d in enumerate(dims) if d in SPATIAL})


def _read_plate(path: Path) -> tuple[str, dict]:
    group = _open_group(path)
    version, ome = _ome_attrs(group, path)
    if "plate" not in ome:
        raise InputError(f"{path}: not an HCS plate (no 'plate' metadata)")
    return version, ome["plate"]


def list_fields(path: str | Path, *, empty: list[str] | None = None) -> list[str]:
    """List the fields of an HCS plate as ``"row/column/field"`` keys, in plate order.

    A well listed in the plate metadata without fields (no images, or no well group at all: an acquisition that
    skipped it) contributes none; with ``empty`` given, its path is appended there.
    """
    path = Path(path)
    _, plate = _read_plate(path)
    keys = []
    for well in plate.get("wells", []):
        wpath = path / well["path"]
        if not wpath.exists():
            images = []
        else:
            _, wome = _ome_attrs(_group_attrs(wpath), wpath)
            images = wome.get("well", {}).get("images", [])
        if not images and empty is not None:
            empty.append(well["path"])
        keys.extend(f"{well['path']}/{img['path']}" for img in images)
    return keys


def _kind(path: Path) -> str:
    """'image', 'plate', 'well' or 'folder' for an existing path."""
    path = require_exists(path)
    if path.is_dir() and not ((path / "zarr.json").exists() or (path / ".zattrs").exists() or (path / ".zgroup").exists()):
        return "folder"
    _, ome = _ome_attrs(_group_attrs(path), path)
    for kind, key in (("image", "multiscales"), ("plate", "plate"), ("well", "well")):
        if key in ome:
            return kind
    raise InputError(f"{path}: OME-Zarr group is neither image, plate nor well")


def list_images(path: str | Path) -> list[ImageRef]:
    """Every image of a dataset: one image, every field of a plate, or every OME-Zarr image in a folder.

    Returns
    -------
    list of ImageRef
        ``key`` is ``""`` for a single image, ``"A/1/0"`` for plate fields and the folder entry's name
        (without ``.zarr``) for folders. Output writers reproduce this layout.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "image":
        return [ImageRef(path, "")]
    if kind == "plate":
        empty: list[str] = []
        keys = list_fields(path, empty=empty)
        if not keys:
            raise InputError(f"{path}: the plate has no fields (every well is empty); check the acquisition or "
                             "its conversion")
        if empty:
            print(f"{path}: {len(empty)} well(s) without fields are skipped: {', '.join(empty)}", file=sys.stderr)
        return [ImageRef(path / k, k) for k in keys]
    if kind == "well":
        _, wome = _ome_attrs(_open_group(path), path)
        return [ImageRef(path / im["path"], im["path"]) for im in wome["well"].get("images", [])]
    refs = []
    for child in sorted(path.iterdir()):
        is_group = (child / "zarr.json").exists() or (child / ".zattrs").exists()
        if child.is_dir() and is_group and not child.name.endswith(PARTIAL_SUFFIX):
            try:
                if _kind(child) == "image":
                    refs.append(ImageRef(child, child.name.removesuffix(".zarr")))
            except InputError:
                continue
    if not refs:
        raise InputError(f"{path}: folder holds no OME-Zarr images; convert TIFFs with 'l2l-scale convert'")
    return refs


def dataset_kind(path: str | Path) -> str:
    """'image', 'plate', 'well' or 'folder'."""
    return _kind(Path(path))


def select_channels(image: xr.DataArray, channels: Sequence[str | int]) -> xr.DataArray:
    """Select channels by name (or integer index) with a clear error for unknown names."""
    names = [str(c) for c in image.coords["c"].values] if "c" in image.dims else []
    return image.isel(c=channel_indices(names, channels))


def channel_indices(names: Sequence[str], channels: Sequence[str | int]) -> list[int]:
    """Indices of ``channels`` (names, or integer indices) among ``names``, with a clear error for unknown ones."""
    idx = []
    for ch in channels:
        if isinstance(ch, (int, np.integer)) or (isinstance(ch, str) and ch.isdigit() and ch not in names):
            i = int(ch)
            if not 0 <= i < len(names):
                raise ChannelError(f"channel index {i} out of range; the image has channels {names}")
            idx.append(i)
        elif ch in names:
            idx.append(names.index(ch))
        else:
            raise ChannelError(f"unknown channel {ch!r}; the image has channels {names} (see 'l2l-scale info')")
    return idx


def read_info(path: str | Path) -> dict:
    """Describe an image, plate or folder: shape, dims, dtype, chunks, pixel size, levels, channels, provenance."""
    path = Path(path)
    kind = _kind(path)
    info: dict[str, Any] = {"path": str(path), "kind": kind}
    if kind == "plate":
        version, plate = _read_plate(path)
        info["ngff_version"] = version
        info["plate"] = {
            "name": plate.get("name"),
            "rows": [r["name"] for r in plate.get("rows", [])],
            "columns": [c["name"] for c in plate.get("columns", [])],
            "wells": [w["path"] for w in plate.get("wells", [])],
            "fields": list_fields(path),
        }
        info["provenance"] = dict(_open_group(path).attrs).get("l2l_scale")
        first = info["plate"]["fields"][0] if info["plate"]["fields"] else None
        if first:
            info["field"] = read_info(path / first)
        return info
    if kind == "folder":
        info["images"] = [r.key for r in list_images(path)]
        return info
    if kind == "well":
        info["images"] = [r.key for r in list_images(path)]
        return info
    group, meta = _read_multiscale(path)
    img = open_image(path)
    info.update(
        ngff_version=meta.version,
        name=meta.name,
        dims=list(img.dims),
        shape=list(img.shape),
        dtype=str(img.dtype),
        chunks=list(group[meta.datasets[0]["path"]].chunks),
        pixel_size=img.attrs["pixel_size"],
        units=img.attrs["units"],
        levels=[list(group[d["path"]].shape) for d in meta.datasets],
        channels=meta.channel_names,
        provenance=meta.provenance,
    )
    return info


# ------------------------------------------------------------------------------------------------ writing


def _normalise_input(data: Any, dims: Sequence[str] | None, pixel_size: Any, channel_names: Sequence[str] | None):
    """Turn a DataArray / dask / numpy array into (dask array, dims, pixel sizes, channel names)."""
    if isinstance(data, xr.DataArray):
        dims = tuple(dims or data.dims)
        arr = data.data if isinstance(data.data, da.Array) else da.from_array(np.asarray(data.data))
        if channel_names is None and "c" in data.coords:
            channel_names = [str(c) for c in data.coords["c"].values]
        if pixel_size is None and not isinstance(data.attrs.get("pixel_size"), (dict, type(None))):
            pixel_size = data.attrs["pixel_size"]
        elif pixel_size is None:
            pixel_size = dict(data.attrs.get("pixel_size") or {})
            for d in SPATIAL:
                if d in data.coords and data.sizes[d] > 1 and d not in pixel_size:
                    pixel_size[d] = float(data.coords[d].values[1] - data.coords[d].values[0])
    else:
        arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
        dims = tuple(dims or {2: "yx", 3: "cyx", 4: "czyx", 5: "tczyx"}.get(arr.ndim, ""))
    if len(dims) != arr.ndim:
        raise ConfigError(f"dims {dims} do not match the array's {arr.ndim} dimensions; pass dims explicitly")
    if any(d not in DIM_ORDER for d in dims) or list(dims) != sorted(dims, key=DIM_ORDER.index):
        raise ConfigError(f"dims {dims} must be a subsequence of {DIM_ORDER} (NGFF axis order); transpose first")
    if isinstance(pixel_size, (int, float)):
        pixel_size = {d: float(pixel_size) for d in dims if d in ("y", "x")}
    elif isinstance(pixel_size, (tuple, list)):
        sp = [d for d in dims if d in SPATIAL]
        if len(pixel_size) != len(sp):
            raise ConfigError(f"pixel size {tuple(pixel_size)} needs one value per spatial dim {sp}")
        pixel_size = dict(zip(sp, map(float, pixel_size)))
    pixel_size = {d: float((pixel_size or {}).get(d, 1.0)) for d in dims if d in SPATIAL}
    if any(not np.isfinite(v) or v <= 0 for v in pixel_size.values()):
        raise ConfigError(f"pixel size {pixel_size} must be positive; pass --pixel-size in micrometres")
    if "c" in dims:
        n_c = arr.shape[dims.index("c")]
        channel_names = [str(c) for c in (channel_names or range(n_c))]
        if len(channel_names) != n_c:
            raise ChannelError(f"{len(channel_names)} channel names given for {n_c} channels; give one name per channel")
    else:
        channel_names = []
    return arr, dims, pixel_size, channel_names


def default_chunks(shape: Sequence[int], dims: Sequence[str], chunk: int | Mapping[str, int] | None = None) -> tuple[int, ...]:
    """Chunk shape for writing: ``chunk`` (default 1024) in y/x, 1 on every other axis, clipped to the shape."""
    if isinstance(chunk, Mapping):
        sizes = {d: int(chunk.get(d, DEFAULT_CHUNK if d in ("y", "x") else 1)) for d in dims}
    else:
        c = int(chunk or DEFAULT_CHUNK)
        sizes = {d: (c if d in ("y", "x") else 1) for d in dims}
    if any(v < 1 for v in sizes.values()):
        raise ConfigError(f"chunk sizes {sizes} must be positive")
    return tuple(max(1, min(sizes[d], n)) for d, n in zip(dims, shape))


def pyramid_shapes(shape: Sequence[int], dims: Sequence[str], top_max: int = TOP_LEVEL_MAX) -> list[tuple[int, ...]]:
    """Shapes of the 2x-mean pyramid: halve y/x (trimming odd pixels) until the largest side is <= ``top_max``."""
    shapes = [tuple(shape)]
    yx = [i for i, d in enumerate(dims) if d in ("y", "x")]
    while max(shapes[-1][i] for i in yx) > top_max and min(shapes[-1][i] for i in yx) >= 2:
        shapes.append(tuple(n // 2 if i in yx else n for i, n in enumerate(shapes[-1])))
    return shapes


def _axes_meta(dims: Sequence[str], space_unit: str = "micrometer") -> list[dict]:
    axes = []
    for d in dims:
        ax = {"name": d, "type": AXIS_TYPES[d]}
        if d in SPATIAL:
            ax["unit"] = space_unit
        elif d == "t":
            ax["unit"] = "second"
        axes.append(ax)
    return axes


def _level_transforms(dims: Sequence[str], pixel_size: Mapping[str, float], level: int) -> list[dict]:
    # Mean of 2^k x 2^k pixels is centred half a (coarse - fine) pixel further in: translate accordingly.
    f = 2**level
    scale = [pixel_size[d] * f if d in ("y", "x") else pixel_size.get(d, 1.0) for d in dims]
    trans = [pixel_size[d] * (f - 1) / 2 if d in ("y", "x") else 0.0 for d in dims]
    out = [{"type": "scale", "scale": scale}]
    if any(trans):
        out.append({"type": "translation", "translation": trans})
    return out


def omero_metadata(channel_names: Sequence[str], windows: Sequence[tuple[float, float, float, float]]) -> dict:
    """The NGFF ``omero`` block: one channel entry (label, colour, display window) per name."""
    channels = []
    for i, (name, (lo, hi, mn, mx)) in enumerate(zip(channel_names, windows)):
        channels.append({
            "label": name,
            "color": _COLORS[i % len(_COLORS)] if len(channel_names) > 1 else "FFFFFF",
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"start": lo, "end": hi, "min": mn, "max": mx},
        })
    return {"channels": channels, "rdefs": {"model": "color" if len(channel_names) > 1 else "greyscale"}}


def display_windows(top: np.ndarray, dims: Sequence[str], percentiles=(0.1, 99.9)) -> list[tuple[float, float, float, float]]:
    """omero display windows (start, end, min, max) per channel from percentiles of a (small) pyramid level."""
    arr = np.asarray(top)
    if "c" in dims:
        arr = np.moveaxis(arr, dims.index("c"), 0)
    else:
        arr = arr[None]
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        full = (float(info.min), float(info.max))
    else:
        full = None
    out = []
    for ch in arr:
        flat = ch.reshape(-1)
        flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
        if flat.size == 0:
            lo = hi = mn = mx = 0.0
        else:
            lo, hi = (float(v) for v in np.percentile(flat, percentiles))
            mn, mx = full or (float(flat.min()), float(flat.max()))
        if hi <= lo:
            hi = lo + 1.0
        out.append((lo, hi, mn, mx))
    return out


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)


@dataclass
class LevelPlan:
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]


def create_image_group(group: zarr.Group | Path, dims, shape, dtype, chunks, pixel_size, channel_names, *, name,
                       attrs_extra, top_max=TOP_LEVEL_MAX, fill_value=0) -> list[LevelPlan]:
    """Create the (empty) pyramid arrays and the NGFF 0.5 metadata of an image group; return the level plans.

    ``group`` is an open group, or the local folder of a new one. On a local filesystem the metadata documents
    are written as files directly (zarr's own array documents, made once per shape): through the zarr API each
    group cost about 8 ms of client time, seconds for a plate of hundreds of fields. The group document, which
    makes the image visible, is written last.
    """
    plans = []
    for level, lshape in enumerate(pyramid_shapes(shape, dims, top_max)):
        plans.append(LevelPlan(str(level), lshape, tuple(min(c, n) for c, n in zip(chunks, lshape))))
    ms = {
        "name": name or "image",
        "axes": _axes_meta(dims),
        "datasets": [{"path": p.path, "coordinateTransformations": _level_transforms(dims, pixel_size, i)}
                     for i, p in enumerate(plans)],
    }
    ome: dict[str, Any] = {"version": WRITE_VERSION, "multiscales": [ms]}
    if channel_names:
        ome["omero"] = omero_metadata(channel_names, [(0.0, 1.0, 0.0, 1.0)] * len(channel_names))
    attrs = {"ome": ome, **(attrs_extra or {})}
    root = _local_root(group)
    if root is None:
        for p in plans:
            group.create_array(p.path, shape=p.shape, dtype=dtype, chunks=p.chunks, compressors=[_compressor()],
                               dimension_names=list(dims), fill_value=fill_value, overwrite=True)
        group.attrs.update(attrs)
        return plans
    existing = {} if isinstance(group, Path) else dict(group.attrs)
    for p in plans:
        (root / p.path).mkdir(parents=True, exist_ok=True)
        (root / p.path / "zarr.json").write_bytes(
            _array_document(p.shape, np.dtype(dtype).str, p.chunks, tuple(dims), fill_value))
    doc = {"attributes": _jsonable({**existing, **attrs}), "zarr_format": 3, "node_type": "group"}
    (root / "zarr.json").write_text(json.dumps(doc, indent=2))
    return plans


def _local_root(group: zarr.Group | Path) -> Path | None:
    """The folder of a group on the local filesystem, or None for other stores."""
    from zarr.storage import LocalStore

    if isinstance(group, Path):
        return group
    if isinstance(group.store, LocalStore) and not group.read_only:
        return Path(group.store.root) / group.path
    return None


@functools.lru_cache(maxsize=256)
def _array_document(shape: tuple, dtype: str, chunks: tuple, dims: tuple, fill_value: Any) -> bytes:
    """The ``zarr.json`` zarr writes for such an array (made in memory, so the format stays zarr's)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    arr = zarr.create_array(MemoryStore(), shape=shape, dtype=np.dtype(dtype), chunks=chunks,
                            compressors=[_compressor()], dimension_names=list(dims), fill_value=fill_value)
    return arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def reopen_image_group(root: Path) -> tuple[zarr.Group, list[LevelPlan]]:
    """Open an unfinished image group (inside a ``.partial`` output) to resume writing it."""
    group = zarr.open_group(str(root), mode="r+")
    plans = [LevelPlan(d["path"], group[d["path"]].shape, group[d["path"]].chunks)
             for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return group, plans


def finish_image_group(group: zarr.Group, dims, channel_names) -> None:
    """Set the omero display windows from the (small) top pyramid level once all levels are written."""
    if not channel_names:
        return
    ome = dict(group.attrs["ome"])
    top = group[ome["multiscales"][0]["datasets"][-1]["path"]][...]
    ome["omero"] = omero_metadata(channel_names, display_windows(top, dims))
    group.attrs["ome"] = ome


def check_run(progress: Path, run: dict, output: Path, resume: bool) -> None:
    """Record a run's options in ``progress/run.json``; resuming with other options is refused.

    A resumed run finishes the blocks of the first one, so both must compute the same thing.
    """
    run_file = progress / "run.json"
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        changed = sorted(k for k in set(run) | set(previous) if previous.get(k) != run.get(k))
        if changed:
            raise OutputError(f"{output}: the unfinished run used different {', '.join(changed)}; rerun with the same "
                              "options, or with --overwrite to start again")
    progress.mkdir(parents=True, exist_ok=True)
    write_json(run_file, _jsonable(run))


def partial_path(path: Path) -> Path:
    """The temporary sibling an output is written to before the final rename."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def check_output(path: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output that exists (without ``overwrite``), equals or contains an input, or is not writable."""
    path = Path(path)
    resolved = path.resolve()
    for inp in inputs:
        ir = Path(inp).resolve()
        if resolved == ir or ir in resolved.parents or resolved in ir.parents:
            raise OutputError(f"{path}: output overlaps the input {inp}; choose an output path outside the input")
    lock.check_unlocked(path)  # before "exists": a run in progress explains a partial output better
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists; pass --overwrite to replace it or choose another path")
    parent = resolved.parent
    if not parent.exists():
        raise OutputError(f"{parent}: output folder does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable; choose a writable location")
    return path


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                  inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only when the block succeeds.

    On failure the temporary directory is removed, unless ``resume`` is set: then it is kept so that a rerun
    with ``--resume`` finishes only the missing blocks. An existing ``path`` is replaced only after the new
    output is complete. The whole block holds ``<path>.lock`` (:mod:`l2l_scale.io.lock`): a second run writing
    the same output is refused with a message naming the first, and a crashed run's lock is detected as stale.
    """
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    # Held from before the partial directory is touched until after the final rename, so a second run can
    # neither delete (--overwrite) nor resume a partial output that a live run is still writing.
    with lock.OutputLock(path):
        tmp = partial_path(path)
        if tmp.exists() and not resume:
            if not overwrite:
                raise OutputError(f"{tmp} holds an interrupted run; pass --resume to finish it or --overwrite to "
                                  "start again")
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(exist_ok=resume)
        except OSError as exc:
            raise OutputError(f"{tmp}: cannot create output ({exc.strerror}); check free space and "
                              "permissions") from None
        try:
            yield tmp
            shutil.rmtree(tmp / PROGRESS_DIR, ignore_errors=True)
            old = path.with_name(path.name + ".replaced")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:
            if not resume:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise OutputError(f"{path}: writing failed ({exc.strerror or exc}); check free space and "
                                  "permissions") from exc
            raise


def image_write_tasks(root: Path, data: Any, writer: Any, *, unit: str = "", dims=None, pixel_size=None,
                      channel_names=None, chunks=None, name=None, attrs_extra=None, resume: bool = False,
                      top_max: int = TOP_LEVEL_MAX) -> list:
    """Create (or, resuming, reopen) the image group at ``root`` and return the tasks that fill it.

    ``writer`` is the run's :class:`~l2l_scale.io.blockwrite.BlockWriter`; ``unit`` names the image in its
    completion records. The tasks write every pyramid level and the display windows, and are meant to be
    computed together with those of the run's other images (:func:`l2l_scale.cluster.compute_waves`).
    """
    arr, dims, pixel_size, channel_names = _normalise_input(data, dims, pixel_size, channel_names)
    wchunks = default_chunks(arr.shape, dims, chunks)
    if resume and (root / "zarr.json").exists() and "ome" in zarr.open_group(str(root), mode="r").attrs:
        group, plans = reopen_image_group(root)
        if plans[0].shape != tuple(arr.shape):
            raise OutputError(f"{root}: the unfinished output has shape {plans[0].shape}, not {arr.shape}; "
                              "rerun with --overwrite instead of --resume")
    else:
        # Written as files into the (new) folder: an image at the output's root holds the run's progress folder,
        # which opening the group with mode "w" would delete.
        root.mkdir(parents=True, exist_ok=True)
        plans = create_image_group(Path(root), dims, arr.shape, arr.dtype, wchunks, pixel_size, channel_names,
                                   name=name, attrs_extra=attrs_extra, top_max=top_max)
    image = writer.image(unit, root, plans, dims, channel_names, attrs_extra)
    image.add_array(arr)
    return image.tasks()


def write_image(data: Any, path: str | Path, *, dims: Sequence[str] | None = None, pixel_size: Any = None,
                channel_names: Sequence[str] | None = None, chunks: int | Mapping[str, int] | None = None,
                provenance: Mapping[str, Any] | None = None, name: str | None = None, overwrite: bool = False,
                resume: bool = False, inputs: Sequence[str | Path] = (), label: str = "writing",
                top_max: int = TOP_LEVEL_MAX) -> Path:
    """Write an image as an NGFF 0.5 (zarr v3) multiscale pyramid, streaming chunk by chunk.

    Parameters
    ----------
    data : xarray.DataArray, dask.array.Array or numpy.ndarray
        The image. A DataArray carries its dims, channel names (``c`` coord) and pixel size (``attrs`` or the
        spacing of its coords).
    path : str or Path
        The output group. It is written to ``<path>.partial`` and renamed when complete.
    dims : sequence of str, optional
        Axis names for plain arrays (default by ndim: yx, cyx, czyx, tczyx).
    pixel_size : float, sequence or mapping, optional
        Physical pixel size in micrometres.
    channel_names : sequence of str, optional
        Names for the omero channel metadata.
    chunks : int or mapping, optional
        y/x chunk size (default 1024; 1 on other axes), or a per-dim mapping.
    provenance : mapping, optional
        Stored as the ``l2l_scale`` attribute (see :func:`provenance`).
    overwrite, resume : bool
        Replace an existing output / continue an interrupted write of the same data.
    inputs : sequence of path
        Inputs the output must not overlap.

    Returns
    -------
    Path
        The finished output path.
    """
    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.blockwrite import BlockWriter

    path = Path(path)
    extra = {"l2l_scale": dict(provenance)} if provenance else None
    with atomic_output(path, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        writer = BlockWriter(tmp / PROGRESS_DIR if resume else None)
        tasks = image_write_tasks(tmp, data, writer, dims=dims, pixel_size=pixel_size, channel_names=channel_names,
                                  chunks=chunks, name=name or path.name.removesuffix(".zarr"), attrs_extra=extra,
                                  resume=resume, top_max=top_max)
        compute_waves([tasks], label, n_units=1, unit_name="images")
    return path


_WELL_RE = re.compile(r"^([A-Za-z]+)/?(\d+)$")


def _split_well(well: str) -> tuple[str, str]:
    m = _WELL_RE.match(str(well).strip())
    if not m:
        raise ConfigError(f"well {well!r} is not like 'A/1' or 'B03'; name wells by row letters and column number")
    return m.group(1).upper(), str(int(m.group(2)))


def write_plate_layout(root: zarr.Group, layout: Mapping[tuple[str, str], Sequence[str]], *, name: str,
                       attrs_extra: Mapping[str, Any] | None = None) -> None:
    """Write NGFF 0.5 plate and well metadata for ``{(row, column): [field, ...]}`` into ``root``."""
    rows = sorted({r for r, _ in layout}, key=lambda r: (len(r), r))
    cols = sorted({c for _, c in layout}, key=int)
    wells = [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)}
             for r, c in sorted(layout, key=lambda rc: (rows.index(rc[0]), cols.index(rc[1])))]
    plate = {
        "name": name,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": wells,
        "field_count": max(len(f) for f in layout.values()),
    }
    root.attrs.update({"ome": {"version": WRITE_VERSION, "plate": plate}, **(attrs_extra or {})})
    for (r, c), flds in layout.items():
        wgroup = root.require_group(f"{r}/{c}")
        wgroup.attrs.update({"ome": {"version": WRITE_VERSION, "well": {"images": [{"path": str(f)} for f in flds]}}})


def split_field_key(key: str) -> tuple[str, str, str]:
    """``"A/1/0"`` -> ``("A", "1", "0")`` with validation (keys become paths: no '..' or absolute parts)."""
    parts = str(key).strip("/").split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ConfigError(f"plate key {key!r} is not 'row/column/field'")
    row, col = _split_well("/".join(parts[:2]))
    return row, col, str(int(parts[2]))


def write_plate(fields: Mapping[tuple[str, str | int] | str, Any], path: str | Path, *, name: str | None = None,
                provenance: Mapping[str, Any] | None = None, overwrite: bool = False, resume: bool = False,
                inputs: Sequence[str | Path] = (), label: str = "writing plate", **image_kwargs: Any) -> Path:
    """Write an HCS plate (NGFF 0.5): ``{(well, field): image}`` or ``{"A/1/0": image}``.

    Every field is written with :func:`write_image`'s pyramid layout inside ``row/column/field``, all fields
    and levels in one run; the whole plate appears at ``path`` only when every field is complete.
    """
    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.blockwrite import BlockWriter

    path = Path(path)
    layout: dict[tuple[str, str], dict[str, Any]] = {}
    for key, img in fields.items():
        if isinstance(key, str):
            row, col, fld = split_field_key(key)
        else:
            (row, col), fld = _split_well(key[0]), str(int(key[1]))
        layout.setdefault((row, col), {})[fld] = img
    extra = {"l2l_scale": dict(provenance)} if provenance else {}
    with atomic_output(path, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        root = zarr.open_group(str(tmp), mode="a" if resume else "w", zarr_format=3)
        write_plate_layout(root, {(r, c): sorted(f, key=int) for (r, c), f in layout.items()},
                           name=name or path.name.removesuffix(".zarr"), attrs_extra=extra)
        writer = BlockWriter(tmp / PROGRESS_DIR if resume else None)
        keys = [(r, c, f) for (r, c), flds in sorted(layout.items()) for f in sorted(flds, key=int)]
        units = (image_write_tasks(tmp / r / c / f, layout[(r, c)][f], writer, unit=f"{r}/{c}/{f}",
                                   name=f"{r}{c}-{f}", attrs_extra=extra or None, resume=resume, **image_kwargs)
                 for r, c, f in keys)
        compute_waves(units, label, n_units=len(keys))
    return path


def read_json(path: str | Path) -> dict:
    """Read a JSON file with a clear error."""
    path = require_exists(Path(path))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); regenerate it") from None
