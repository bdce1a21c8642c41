"""Reading OME-Zarr (NGFF 0.4 / 0.5) images and HCS plates as dask-backed xarray.

Everything here opens stores read-only: an input is never opened for writing. :func:`open_image` reads an image
lazily, :func:`image_meta` and :func:`list_images` read only JSON metadata (fast enough for plates of thousands
of fields), and :func:`read_info` describes an image, plate, well or folder.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.io.output import PARTIAL_SUFFIX

SUPPORTED_VERSIONS = ("0.4", "0.5")
DIM_ORDER = ("t", "c", "z", "y", "x")
SPATIAL = ("z", "y", "x")


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


def _read_json(path: str) -> Any:
    # Plain strings rather than pathlib: pathlib's joins cost more than reading a field's small documents.
    with open(path, "rb") as f:
        return json.loads(f.read())


def _group_attrs(path: str | Path) -> dict:
    """A group's attributes read from its JSON (zarr v3 ``zarr.json``, v2 ``.zattrs``), without opening zarr.

    Listing a plate of thousands of fields then takes milliseconds, not seconds. Anything unusual (no such file,
    not a group, another store) goes through zarr and its errors.
    """
    try:
        meta = _read_json(os.path.join(path, "zarr.json"))
        if isinstance(meta, dict) and meta.get("node_type") == "group":
            return dict(meta.get("attributes") or {})
    except (OSError, ValueError):
        pass
    path = Path(path)
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


def _array_meta(path: str | Path) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """(shape, chunks, dtype) of a zarr array from its v3 JSON, else through zarr (v2, irregular grids)."""
    try:
        meta = _read_json(os.path.join(path, "zarr.json"))
        grid = meta["chunk_grid"]
        # Plain numeric types and a regular grid (what NGFF writers produce) are read here; zarr reads the rest.
        if meta.get("node_type") == "array" and grid.get("name") == "regular" and meta["data_type"] in _PLAIN_TYPES:
            shape, chunks = tuple(map(int, meta["shape"])), tuple(map(int, grid["configuration"]["chunk_shape"]))
            if len(shape) == len(chunks):
                return shape, chunks, np.dtype(meta["data_type"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    path = Path(path)
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
    path = path if isinstance(path, Path) else Path(path)  # Path(a Path) parses it again
    meta = _parse_multiscale(_group_attrs(path), path)  # a missing path fails there, as in require_exists
    ds, dims = meta.datasets[0], meta.dims
    shape, chunks, dtype = _array_meta(os.path.join(path, ds["path"]))
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
        wpath = os.path.join(path, well["path"])  # a string: pathlib cost more than the well's document
        if not os.path.exists(wpath):
            images = []
        else:
            _, wome = _ome_attrs(_group_attrs(wpath), Path(wpath))
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


def read_json(path: str | Path) -> dict:
    """Read a JSON file with a clear error."""
    path = require_exists(Path(path))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); regenerate it") from None
