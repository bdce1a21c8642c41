"""TIFF / OME-TIFF reading: one TIFF as a lazy, NGFF-shaped xarray (the pixel source of ``l2l-scale convert``).

:func:`read_tiff` opens one TIFF as a dask-backed :class:`xarray.DataArray` with dims in ``t, c, z, y, x`` order
(always with a ``c`` dim), coords in micrometres and the channel names as the ``c`` coord. Only metadata is
read; pixel data are read chunk by chunk when the graph runs. :mod:`l2l_scale.io.convert` writes such arrays as
OME-Zarr images, folders and plates.

How pixels are read
-------------------
* Compressed, tiled or otherwise non-contiguous data go through tifffile's zarr interface
  (``tifffile.imread(path, aszarr=True)`` opened with ``zarr.open(store, mode="r")``), which decodes only the
  tiles or strips a block needs.
* Uncompressed contiguous data (what ImageJ and ``tifffile.imwrite`` write by default) are memory-mapped
  read-only instead: such pages are stored as one strip, which the zarr interface would expose as a single
  chunk, so every block would read the whole page and memory would grow with the image.

Neither a ``ZarrTiffStore`` nor a memory map can be pickled (both hold open files), so the dask graph holds a
small picklable :class:`_TiffSource` (path, series, shape, dtype) that opens the file once per worker process.
That keeps the graph runnable on a distributed cluster, and lets every read failure (a truncated or corrupt
file) surface as an :class:`~l2l_scale.errors.InputError` instead of a codec error from deep inside a task.
"""

from __future__ import annotations

import math
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
import tifffile
import xarray as xr
import zarr
from dask.base import tokenize

from l2l_scale.errors import ChannelError, ConfigError, InputError, L2LError
from l2l_scale.io.atomic import say as _say
from l2l_scale.io.read import DIM_ORDER
from l2l_scale.io.write import DEFAULT_CHUNK

__all__ = ["read_tiff", "image_stem", "forget_handles", "TIFF_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff")
# tifffile series axis letters -> NGFF dims. 'S' (samples per pixel, e.g. RGB) are channels too.
_AXIS_MAP = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
# Letters a user may give with --axes.
_USER_AXES = set(_AXIS_MAP)
# Micrometres per unit, for OME-XML UnitsLength values and ImageJ 'unit' strings.
_UM_PER_UNIT = {
    "km": 1e9, "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "pm": 1e-6, "å": 1e-4, "Å": 1e-4, "angstrom": 1e-4,
    "in": 25400.0, "inch": 25400.0, "ft": 304800.0, "mil": 25.4, "pt": 25400.0 / 72,
}
# Screen/print resolutions many image writers put in by default; no microscope has 265-353 um pixels, so these
# say nothing about the physical pixel size.
_DEFAULT_DPI = (72.0, 96.0)
_OPEN_CACHE_SIZE = 8


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as a short single line, for embedding in our one-line error messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------------------ lazy pixel source


_open_lock = threading.Lock()
_open_cache: OrderedDict[tuple, Any] = OrderedDict()


@dataclass(frozen=True)
class _TiffSource:
    """A picklable, lazily opened view of one TIFF series, sliced by :func:`dask.array.from_array`.

    ``mtime_ns`` and ``size`` are part of the identity so a file replaced between graph construction and
    execution is reopened rather than served from a stale handle.
    """

    path: str
    series: int
    shape: tuple[int, ...]
    dtype: np.dtype
    memmap: bool
    mtime_ns: int
    size: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _array(self) -> Any:
        key = (self.path, self.series, self.memmap, self.mtime_ns, self.size)
        # Opened under the lock: parallel tasks of one file then share a single handle instead of racing to open.
        with _open_lock:
            arr = _open_cache.get(key)
            if arr is not None:
                _open_cache.move_to_end(key)
                return arr
            if self.memmap:
                # mode="r": the input is mapped read-only and can never be modified through the map.
                arr = tifffile.memmap(self.path, series=self.series, level=0, mode="r")
            else:
                arr = zarr.open(tifffile.imread(self.path, aszarr=True, series=self.series, level=0), mode="r")
            if tuple(arr.shape) != self.shape:
                raise InputError(f"{self.path}: the file changed while it was being converted "
                                 f"(shape {tuple(arr.shape)} != {self.shape}); convert it again")
            _open_cache[key] = arr
            # Evicted entries are only dereferenced, never closed here: a task in another thread may still be
            # reading from them, and CPython closes the file as soon as the last reference goes.
            while len(_open_cache) > _OPEN_CACHE_SIZE:
                _open_cache.popitem(last=False)
        return arr

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            # A memory-mapped block is copied: a view would keep the map open and is read-only downstream.
            block = np.array(self._array()[key]) if self.memmap else np.asarray(self._array()[key])
        except L2LError:
            raise
        except Exception as exc:  # tifffile/imagecodecs/zarr/mmap raise many types for a damaged file
            raise InputError(f"{self.path}: reading pixel data failed ({_one_line(exc)}); the TIFF is truncated "
                             "or corrupt, copy or export it again") from None
        # Big-endian files give big-endian blocks; the zarr writer and numpy maths want native byte order.
        return block.astype(block.dtype.newbyteorder("="), copy=False)


def forget_handles(paths: Sequence[str | Path]) -> None:
    """Drop this process's cached handles of ``paths`` so the files are closed after a conversion."""
    names = {str(p) for p in paths}
    with _open_lock:
        for key in [k for k in _open_cache if k[0] in names]:
            del _open_cache[key]


# ------------------------------------------------------------------------------------------------ metadata


@dataclass
class _Meta:
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    memmap: bool
    ome: Any  # the Pixels element of this series in the OME-XML, or None
    imagej: dict | None
    resolution: tuple[float, float] | None  # pixels per unit, (x, y)
    resolution_unit: int | None
    n_series: int


def _open_meta(path: Path) -> _Meta:
    """Read everything we need from the TIFF header and IFDs; no pixel data."""
    filesize = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: TIFF holds no image series; check the file or export it again")
            series = tif.series[0]
            if series.is_pyramidal:
                # The data layer builds its own pyramid from full resolution; the other levels are not needed.
                series = series.levels[0]
            key = series.keyframe
            memmap = series.dataoffset is not None and key.is_memmappable and series.transform is None
            _check_complete(path, series, filesize, memmap)
            ome = _ome_pixels(tif.ome_metadata, 0) if tif.is_ome else None
            imagej = dict(tif.imagej_metadata or {}) if tif.is_imagej else None
            tags = key.tags
            resolution = None
            if "XResolution" in tags:
                resolution = tuple(float(v) for v in key.resolution)
            return _Meta(series.axes, tuple(series.shape), np.dtype(series.dtype), memmap, ome, imagej,
                         resolution, int(key.resolutionunit) if resolution else None, len(tif.series))
    except L2LError:
        raise
    except tifffile.TiffFileError as exc:
        if "not a tiff" in str(exc).lower():
            raise InputError(f"{path}: not a TIFF file; give TIFF/OME-TIFF, CZI/ND2/LIF (pip install "
                             "'l2l-scale[formats]') or convert other formats with bioformats2raw") from None
        raise InputError(f"{path}: unreadable TIFF ({_one_line(exc)}); the file is corrupt, copy or export it again") from None
    except (OSError, MemoryError) as exc:
        raise InputError(f"{path}: cannot read ({_one_line(exc)}); check the file and its permissions") from None
    except Exception as exc:  # struct.error, IndexError, ValueError... from a damaged header
        raise InputError(f"{path}: unreadable TIFF ({_one_line(exc)}); the file is truncated or corrupt, "
                         "copy or export it again") from None


def _check_complete(path: Path, series: Any, filesize: int, memmap: bool) -> None:
    """Refuse a truncated file now, from the IFD offsets, rather than halfway through writing it."""
    if memmap:
        end = int(series.dataoffset) + int(series.size) * np.dtype(series.dtype).itemsize
    else:
        end = 0
        for page in series.pages:
            if page is None:
                continue
            for off, cnt in zip(page.dataoffsets, page.databytecounts):
                if off and cnt:  # offset 0 marks a sparse (missing) tile, which reads as fill value
                    end = max(end, int(off) + int(cnt))
    if end > filesize:
        raise InputError(f"{path}: TIFF is truncated (pixel data end at byte {end} but the file has {filesize} "
                         "bytes); copy or export it again")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_pixels(xml: str | None, index: int) -> Any:
    """The ``Pixels`` element of image ``index`` in an OME-XML string, or None."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root if _local(el.tag) == "Image"]
    if index >= len(images):
        return None
    for el in images[index]:
        if _local(el.tag) == "Pixels":
            return el
    return None


def _to_um(value: float, unit: str | None, default: str | None = "µm") -> float | None:
    unit = (unit or default or "").strip()
    # ImageJ writes the micro sign escaped in its text header.
    unit = unit.replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    factor = _UM_PER_UNIT.get(unit, _UM_PER_UNIT.get(unit.lower()))
    if factor is None or not (value and math.isfinite(value) and value > 0):
        return None
    return float(value) * factor


def _pixel_size_from_metadata(meta: _Meta) -> tuple[dict[str, float], str | None]:
    """Physical pixel size (um) from OME-XML, ImageJ or resolution tags, in that order."""
    if meta.ome is not None:
        a = meta.ome.attrib
        out = {}
        for d in ("x", "y", "z"):
            v = a.get(f"PhysicalSize{d.upper()}")
            um = _to_um(float(v), a.get(f"PhysicalSize{d.upper()}Unit")) if v else None
            if um is not None:
                out[d] = um
        if "x" in out:
            out.setdefault("y", out["x"])
            return out, "OME-XML"
    res = meta.resolution
    if meta.imagej is not None:
        unit = meta.imagej.get("unit")
        out = {}
        if res and unit:
            x = _to_um(1.0 / res[0], unit, None) if res[0] else None
            y = _to_um(1.0 / res[1], unit, None) if res[1] else None
            if x is not None:
                out = {"x": x, "y": y if y is not None else x}
        spacing = meta.imagej.get("spacing")
        if out and spacing and unit:
            z = _to_um(float(spacing), unit, None)
            if z is not None:
                out["z"] = z
        if out:
            return out, "ImageJ"
    if res and meta.resolution_unit in (tifffile.RESUNIT.INCH, tifffile.RESUNIT.CENTIMETER):
        per = 25400.0 if meta.resolution_unit == tifffile.RESUNIT.INCH else 1e4
        if meta.resolution_unit == tifffile.RESUNIT.INCH and all(r in _DEFAULT_DPI for r in res):
            return {}, None
        if res[0] > 0 and res[1] > 0:
            return {"x": per / res[0], "y": per / res[1]}, "resolution tags"
    return {}, None


def _override_pixel_size(pixel_size: Any) -> dict[str, float]:
    if isinstance(pixel_size, Mapping):
        out = {str(k): v for k, v in pixel_size.items()}
    elif isinstance(pixel_size, (int, float, np.number)):
        out = {"y": pixel_size, "x": pixel_size}
    elif isinstance(pixel_size, (tuple, list)) and len(pixel_size) in (1, 2, 3):
        vals = list(pixel_size)
        out = {"y": vals[0], "x": vals[0]} if len(vals) == 1 else dict(zip(("z", "y", "x")[3 - len(vals):], vals))
    else:
        raise ConfigError(f"pixel size {pixel_size!r} is not a number, (y, x) or (z, y, x); pass --pixel-size in "
                          "micrometres, e.g. --pixel-size 0.065")
    try:
        out = {d: float(v) for d, v in out.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"pixel size {pixel_size!r} is not numeric; pass --pixel-size in micrometres") from None
    if set(out) - {"z", "y", "x"} or any(not math.isfinite(v) or v <= 0 for v in out.values()):
        raise ConfigError(f"pixel size {pixel_size!r} must be positive sizes for z/y/x; pass --pixel-size in "
                          "micrometres, e.g. --pixel-size 0.065")
    return out


def _channel_names_from_metadata(meta: _Meta, n_c: int, n_planes: int) -> list[str] | None:
    if meta.ome is not None:
        chans = [el for el in meta.ome if _local(el.tag) == "Channel"]
        if len(chans) == n_c and any(el.get("Name") for el in chans):
            return [el.get("Name") or str(i) for i, el in enumerate(chans)]
    if meta.imagej is not None:
        labels = meta.imagej.get("Labels")
        if isinstance(labels, (list, tuple)) and labels:
            labels = [str(v) for v in labels]
            if len(labels) == n_c:
                return labels
            # ImageJ labels every plane, channels varying fastest: take them if they repeat per channel.
            if n_c > 1 and len(labels) == n_planes and all(v == labels[i % n_c] for i, v in enumerate(labels)):
                return labels[:n_c]
    return None


# --------------------------------------------------------------------------------------------------- axes


def _ambiguous_message(path: Path, axes: str, bad: str) -> str:
    examples = []
    for fill in ("CZT", "ZCT"):
        it = iter(fill)
        examples.append("".join(next(it) if a in bad else ("C" if a == "S" else a) for a in axes))
    return (f"{path}: TIFF axes '{axes}' are ambiguous; pass --axes, e.g. --axes {examples[0]} or "
            f"{examples[1]}")


def _resolve_axes(path: Path, meta: _Meta, axes: str | None) -> str:
    """The axis letters (tifffile style, one per array dim) to use for this file."""
    if axes is not None:
        user = str(axes).strip().upper()
        if len(user) != len(meta.shape):
            raise ConfigError(f"--axes {axes!r} has {len(user)} letters but {path.name} has {len(meta.shape)} "
                              f"dims (shape {meta.shape}, tifffile axes '{meta.axes}'); give one letter per dim")
        if set(user) - _USER_AXES or len(set(user)) != len(user) or not {"Y", "X"} <= set(user):
            raise ConfigError(f"--axes {axes!r} must use each of T, C, Z, Y, X (and S for samples) at most once "
                              "and include Y and X, e.g. --axes CYX")
        return user
    bad = {a for a, n in zip(meta.axes, meta.shape) if a not in _AXIS_MAP and n > 1}
    if bad:
        raise InputError(_ambiguous_message(path, meta.axes, "".join(sorted(bad))))
    if not {"Y", "X"} <= set(meta.axes):
        raise InputError(f"{path}: TIFF axes '{meta.axes}' have no Y and X; pass --axes naming every dim, "
                         "e.g. --axes CYX")
    return meta.axes


def _to_ngff(arr: da.Array, letters: str) -> tuple[da.Array, tuple[str, ...]]:
    """Map tifffile axis letters to NGFF dims, merging C and S, dropping size-1 unknown axes, adding ``c``."""
    keep = [i for i, a in enumerate(letters) if a in _AXIS_MAP]
    drop = tuple(i for i in range(arr.ndim) if i not in keep)
    if drop:  # only size-1 unknown axes reach here (_resolve_axes refused the others)
        arr = arr[tuple(0 if i in drop else slice(None) for i in range(arr.ndim))]
        letters = "".join(letters[i] for i in keep)
    if "C" in letters and "S" in letters:
        # Several multi-sample planes (e.g. RGB per channel): S becomes the faster-varying part of c.
        order = [i for i, a in enumerate(letters) if a not in "CS"]
        pos = min(letters.index("C"), letters.index("S"))
        order[pos:pos] = [letters.index("C"), letters.index("S")]
        arr = arr.transpose(order)
        letters = "".join(letters[i] for i in order)
        i = letters.index("C")
        arr = arr.reshape(arr.shape[:i] + (arr.shape[i] * arr.shape[i + 1],) + arr.shape[i + 2:])
        letters = letters.replace("S", "")
    dims = [_AXIS_MAP[a] for a in letters]
    if "c" not in dims:
        # Downstream steps select channels by name, so every image has a c dim, even a single-channel one.
        arr = arr[None]
        dims = ["c", *dims]
    order = sorted(range(len(dims)), key=lambda i: DIM_ORDER.index(dims[i]))
    return arr.transpose(order), tuple(dims[i] for i in order)


# ------------------------------------------------------------------------------------------------ reading


def read_tiff(path: str | Path, *, axes: str | None = None, pixel_size: float | tuple | Mapping | None = None,
              channel_names: Sequence[str] | None = None, chunks: int | None = None) -> xr.DataArray:
    """Open a TIFF or OME-TIFF lazily as a dask-backed DataArray in NGFF dim order.

    Parameters
    ----------
    path : str or Path
        A TIFF, ImageJ hyperstack, OME-TIFF or (tiled) BigTIFF. The first image series is read; for a
        pyramidal file its full-resolution level.
    axes : str, optional
        tifffile-style axis letters, one per dim of the series (``T``, ``C``, ``Z``, ``Y``, ``X``, ``S``), e.g.
        ``"CYX"``. Needed when the file does not say what its pages are (tifffile axes ``I`` or ``Q``).
    pixel_size : float, (y, x), (z, y, x) or mapping, optional
        Pixel size in micrometres; overrides the metadata. A single number sets y and x.
    channel_names : sequence of str, optional
        One name per channel; overrides the metadata.
    chunks : int, optional
        y/x size of the dask chunks (default 1024, the data layer's write chunk, so no rechunking is needed).

    Returns
    -------
    xarray.DataArray
        Dims a subsequence of ``t, c, z, y, x`` that always includes ``c``; ``z``/``y``/``x`` coords in
        micrometres, ``c`` coord the channel names. ``attrs["pixel_size"]`` maps y, x (and z) to
        micrometres, ``attrs["source"]`` is the path and ``attrs["metadata_source"]`` says where the pixel size
        and channel names came from. No pixel data are read.

    Raises
    ------
    InputError
        The path is missing, not a TIFF, truncated or corrupt, or its axes are ambiguous.
    ConfigError
        ``axes`` or ``pixel_size`` is invalid.
    ChannelError
        ``channel_names`` does not give one unique name per channel.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: path does not exist; check the spelling")
    if not path.is_file():
        raise InputError(f"{path}: not a file; give a TIFF file, or convert the folder with 'l2l-scale convert'")
    meta = _open_meta(path)
    if meta.n_series > 1:
        _say(f"warning: {path}: holds {meta.n_series} image series; converting only the first")
    letters = _resolve_axes(path, meta, axes)

    stat = path.stat()
    source = _TiffSource(str(path), 0, meta.shape, meta.dtype, meta.memmap, stat.st_mtime_ns, stat.st_size)
    yx = int(chunks or DEFAULT_CHUNK)
    if yx < 1:
        raise ConfigError(f"chunk size {chunks} must be positive; pass --chunks e.g. 1024")
    # 1 on plane axes (each TIFF page is read separately anyway), whole samples (S is interleaved in a pixel).
    src_chunks = tuple(min(yx, n) if a in "YX" else (n if a == "S" else 1) for a, n in zip(letters, meta.shape))
    name = "tiff-" + tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, src_chunks)
    arr = da.from_array(source, chunks=src_chunks, name=name, lock=False, asarray=False, fancy=False,
                        meta=np.empty((0,) * len(meta.shape), dtype=meta.dtype.newbyteorder("=")))
    arr, dims = _to_ngff(arr, letters)
    sizes = dict(zip(dims, arr.shape))

    # Pixel size: --pixel-size, else OME-XML, ImageJ, resolution tags; 1.0 with a warning if nothing says.
    found, ps_source = _pixel_size_from_metadata(meta)
    given = _override_pixel_size(pixel_size) if pixel_size is not None else {}
    spatial = [d for d in ("z", "y", "x") if d in dims]
    psize: dict[str, float] = {}
    missing = []
    for d in spatial:
        if d in given:
            psize[d] = given[d]
        elif d in found:
            psize[d] = found[d]
        else:
            psize[d] = 1.0
            missing.append(d)
    if given:
        ps_source = "--pixel-size" if not (set(spatial) - set(given)) else f"--pixel-size + {ps_source or 'default'}"
    if missing:
        _say(f"warning: {path}: no {'/'.join(missing)} pixel size in the TIFF metadata; using 1.0 um, pass "
             "--pixel-size UM to set it")

    n_c = sizes["c"]
    n_planes = int(np.prod([n for a, n in zip(letters, meta.shape) if a not in "YXS"], dtype=np.int64))
    if channel_names is not None:
        if isinstance(channel_names, str):
            channel_names = [s.strip() for s in channel_names.split(",")]
        names = [str(c) for c in channel_names]
        if len(names) != n_c:
            raise ChannelError(f"{len(names)} channel names given but {path.name} has {n_c} channel(s); "
                               "give one name per channel with --channel-names")
        if len(set(names)) != len(names) or not all(names):
            raise ChannelError(f"channel names {names} must be unique and non-empty; fix --channel-names")
        ch_source = "--channel-names"
    else:
        names = _channel_names_from_metadata(meta, n_c, n_planes)
        ch_source = "OME-XML" if names and meta.ome is not None else "ImageJ" if names else None
        if names is None or len(set(names)) != len(names):
            names, ch_source = [str(i) for i in range(n_c)], None

    coords: dict[str, Any] = {"c": names}
    for d in spatial:
        coords[d] = np.arange(sizes[d]) * psize[d]
    if "t" in dims:
        coords["t"] = np.arange(sizes["t"], dtype=float)
    attrs = {
        "pixel_size": psize,
        "source": str(path),
        "metadata_source": {"pixel_size": ps_source or "default 1.0", "channel_names": ch_source or "index"},
        "tiff_axes": meta.axes,
    }
    return xr.DataArray(arr, dims=dims, coords=coords, attrs=attrs, name=image_stem(path))


def image_stem(path: Path) -> str:
    """A TIFF's file name without its ``.ome.tif(f)`` / ``.tif(f)`` suffix: the name of the image written from it."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
