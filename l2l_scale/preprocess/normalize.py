"""Exact normalisation statistics: per-channel percentiles of whole images and datasets.

Label2label (like CSBDeep) maps the low/high percentile of every channel to 0/1 before training and
prediction. DESIGN invariant 2: the percentiles are those of the *whole* image (or of the whole dataset),
computed once, never per tile, and stored with the outputs and the model. This module computes them exactly
and out of core, as Dask graphs whose memory is bounded by chunk size, and reads/writes the stats JSON. How
they are exact: :mod:`l2l_scale.preprocess.percentile_engine`; how OME-Zarr images are read for them:
:mod:`l2l_scale.preprocess.stats_sources`.

The stats JSON (``l2l-scale stats --json``) is versioned by its ``"l2l_scale_stats"`` key; see
:func:`dataset_stats`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.preprocess.percentile_engine import (
    _DIGIT,
    METHOD_EXACT,
    METHOD_TWO_PASS,
    _finish,
    _key_bits,
    _Pool,
    _run_pools,
)
from l2l_scale.preprocess.stats_sources import ZarrSource

__all__ = [
    "STATS_VERSION",
    "dataset_stats",
    "load_stats",
    "normalize",
    "parse_percentiles",
    "percentiles",
    "stats_for",
    "write_stats",
]

STATS_VERSION = 1
SCOPES = ("image", "dataset")


# ------------------------------------------------------------------------------------------- percentiles args


def parse_percentiles(text_or_seq: str | Sequence[float]) -> tuple[float, float]:
    """Parse a low/high percentile pair such as ``"1,99.9"`` or ``(1, 99.9)``.

    Parameters
    ----------
    text_or_seq : str or sequence of float
        Two numbers in [0, 100], low first, separated by a comma (or whitespace) in a string.

    Returns
    -------
    (float, float)
        ``(low, high)`` with ``0 <= low < high <= 100``.

    Raises
    ------
    ConfigError
        Not two numbers, a number outside [0, 100], or ``low >= high``.
    """
    hint = "give two percentiles like '1,99.9'"
    if isinstance(text_or_seq, str):
        parts = [p for p in re.split(r"[,\s]+", text_or_seq.strip()) if p]
    elif isinstance(text_or_seq, Iterable):
        parts = list(text_or_seq)
    else:
        raise ConfigError(f"percentiles {text_or_seq!r} are not two numbers; {hint}")
    if len(parts) != 2:
        raise ConfigError(f"percentiles {text_or_seq!r} are not two numbers; {hint}")
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"percentiles {text_or_seq!r} are not two numbers; {hint}") from None
    if not (0.0 <= lo <= 100.0 and 0.0 <= hi <= 100.0):  # also rejects NaN
        raise ConfigError(f"percentiles {lo:g},{hi:g} must lie in [0, 100]; {hint}")
    if lo >= hi:
        raise ConfigError(f"low percentile {lo:g} must be below the high percentile {hi:g}; {hint}")
    return lo, hi


def _check_q(q: Any) -> np.ndarray:
    try:
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    except (TypeError, ValueError):
        raise ConfigError(f"percentiles {q!r} are not numbers; give numbers in [0, 100]") from None
    if qs.ndim != 1 or qs.size == 0:
        raise ConfigError(f"percentiles {q!r} must be a flat, non-empty list of numbers in [0, 100]")
    if not np.all((qs >= 0) & (qs <= 100)):
        raise ConfigError(f"percentiles {qs.tolist()} must lie in [0, 100]")
    return qs


# ---------------------------------------------------------------------------------------------- array input


def _channel_first(data: Any, channel_axis: int | str | None) -> tuple[da.Array, list[str], bool]:
    """(dask array with channels first, channel names, whether the caller asked for no channel axis)."""
    if isinstance(data, xr.DataArray):
        arr = data.data if isinstance(data.data, da.Array) else da.from_array(np.asarray(data.data))
        if channel_axis is None:
            return arr[None], ["0"], True
        if isinstance(channel_axis, str):
            if channel_axis not in data.dims:
                if channel_axis != "c":
                    raise ConfigError(f"channel axis {channel_axis!r} is not a dimension of the image "
                                      f"{tuple(data.dims)}; name one of them or pass None")
                return arr[None], ["0"], False  # an image without a c dim is one channel
            axis = data.dims.index(channel_axis)
        else:
            axis = _int_axis(channel_axis, arr.ndim)
        names = ([str(v) for v in data.coords[data.dims[axis]].values] if data.dims[axis] in data.coords
                 else [str(i) for i in range(arr.shape[axis])])
        return da.moveaxis(arr, axis, 0), names, False
    if isinstance(data, np.ndarray) or not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks="auto")
    if channel_axis is None:
        return data[None], ["0"], True
    if isinstance(channel_axis, str):
        raise ConfigError(f"channel_axis={channel_axis!r} names a dimension, but a plain array has none; "
                          "pass an integer axis, None, or an xarray.DataArray")
    axis = _int_axis(channel_axis, data.ndim)
    return da.moveaxis(data, axis, 0), [str(i) for i in range(data.shape[axis])], False


def _int_axis(axis: Any, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= int(axis) < ndim:
        raise ConfigError(f"channel axis {axis!r} does not exist in a {ndim}-D array; pass 0..{ndim - 1} or None")
    return int(axis) % ndim


def _check_source(x: da.Array, label: str) -> da.Array:
    """``x`` validated, in native byte order: the key mapping reinterprets bits, and OME-Zarr 0.4 written by
    Java tools (bioformats2raw) is often big-endian."""
    _key_bits(x.dtype)
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise InputError(f"{label} has unknown chunk sizes; call compute_chunk_sizes() on it first")
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def percentiles(data: da.Array | xr.DataArray | np.ndarray, q: Sequence[float], *,
                channel_axis: int | str | None = "c", max_passes: int | None = None,
                return_bound: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """Exact per-channel percentiles of a (dask-backed) image, computed out of core.

    Parameters
    ----------
    data : dask.array.Array, xarray.DataArray or numpy.ndarray
        The image. Nothing is loaded into memory at once: every pass is a Dask graph over its chunks and runs
        on the current scheduler (a distributed client if one is active).
    q : sequence of float
        Percentiles in [0, 100].
    channel_axis : int, str or None
        The channel axis: a dim name for a DataArray (the default ``"c"``; a DataArray without a ``c`` dim is
        one channel), an integer axis, or ``None`` to pool all values into one result.
    max_passes : int, optional
        Stop after this many passes over the data (wide dtypes only; 8/16-bit data always needs one). The
        result is then within the returned error bound of the exact value. Default: run until exact.
    return_bound : bool
        Also return the error bound (0.0 when exact).

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n_channels, len(q))``, or ``(len(q),)`` with ``channel_axis=None``. Row ``c`` equals
        ``np.percentile(channel_c, q)`` (method ``'linear'``) exactly.
    float
        The error bound, with ``return_bound=True``.

    Raises
    ------
    InputError
        Float data with NaN or Inf, an empty image, or an unsupported dtype.
    ConfigError
        Percentiles outside [0, 100] or a channel axis that does not exist.
    """
    qs = _check_q(q)
    x, names, pooled = _channel_first(data, channel_axis)
    x = _check_source(x, "the image")
    pools = [_Pool([(0, c)], np.dtype(x.dtype), _key_bits(x.dtype), f"channel {name}")
             for c, name in enumerate(names)]
    _run_pools([x], pools, qs, max_passes=max_passes)
    results = [_finish(pool, qs) for pool in pools]
    values = np.stack([r[0] for r in results])
    bound = max(r[3] for r in results)
    if pooled:
        values = values[0]
    return (values, bound) if return_bound else values


# ------------------------------------------------------------------------------------------ dataset + JSON


def dataset_stats(path: str | Path, *, q: str | Sequence[float] = (1.0, 99.9), scope: str = "image",
                  channels: Sequence[str] | None = None, max_passes: int | None = None,
                  progress: bool = False) -> dict:
    """Exact low/high percentiles of every channel of an image, plate or folder of images.

    Parameters
    ----------
    path : str or Path
        An OME-Zarr image, HCS plate, well or folder of images (see :func:`l2l_scale.io.list_images`).
    q : str or (float, float)
        Low and high percentile (see :func:`parse_percentiles`).
    scope : {"image", "dataset"}
        ``"image"``: one normalisation per image. ``"dataset"``: one per channel, pooled over all images
        (exact: their histograms add up); per-image entries are included too. Channels are pooled by name,
        so every image must have them and share one dtype.
    channels : sequence of str, optional
        Only these channels (names, or indices).
    max_passes : int, optional
        See :func:`percentiles`.
    progress : bool
        Show a progress bar per pass (the CLI turns it on).

    Returns
    -------
    dict
        JSON-able::

            {"l2l_scale_stats": 1, "percentiles": [lo_q, hi_q], "scope": ..., "source": path,
             "method": "histogram-exact" | "two-pass", "passes": n, "error_bound": 0.0,
             "images": {key: {channel: {"lo", "hi", "min", "max", "count", "dtype"}}},
             "dataset": {channel: {...}}}   # "dataset" only with scope "dataset"

        ``key`` is the image's key in the dataset ("" for a single image, "A/1/0" for plate fields).
    """
    from l2l_scale import __version__
    from l2l_scale.io.read import list_images
    from l2l_scale.preprocess.stats_sources import worker_threads

    lo_q, hi_q = parse_percentiles(q)
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is not one of {', '.join(SCOPES)}; use 'image' or 'dataset'")
    qs = np.array([lo_q, hi_q])
    refs = list_images(path)
    out: dict[str, Any] = {"l2l_scale_stats": STATS_VERSION, "percentiles": [lo_q, hi_q], "scope": scope,
                           "source": str(path)}
    if scope == "image" and len(refs) >= _PER_IMAGE_TASKS_FROM * worker_threads():
        images, passes, bound = _stats_in_image_tasks(refs, channels, qs, max_passes, progress)
        bits = [_key_bits(np.dtype(e["dtype"])) for chans in images.values() for e in chans.values()]
        return {**out, "method": METHOD_EXACT if all(b <= _DIGIT for b in bits) else METHOD_TWO_PASS,
                "passes": passes, "error_bound": bound, "l2l_scale_version": __version__, "images": images}
    sources, names_per = zip(*(_image_source(ref, channels) for ref in refs))
    image_pools = _image_pools(refs, sources, names_per)
    pools = [pool for chans in image_pools.values() for pool in chans.values()]
    dataset_pools: dict[str, _Pool] = {}
    if scope == "dataset":
        first = refs[0].key or str(refs[0].path)
        for ref, names, x in zip(refs, names_per, sources):
            here = ref.key or str(ref.path)
            if sorted(names) != sorted(names_per[0]):
                raise ChannelError(f"image {here!r} has channels {names} but image {first!r} has "
                                   f"{names_per[0]}; dataset scope pools channels by name: pass --channels with "
                                   "channels every image has")
            if x.dtype != sources[0].dtype:
                raise InputError(f"image {here!r} is {x.dtype} but image {first!r} is {sources[0].dtype}; "
                                 "dataset scope needs one dtype: use scope 'image' or convert the images")
        dtype = np.dtype(sources[0].dtype)
        for name in names_per[0]:
            members = [(s, names.index(name)) for s, names in enumerate(names_per)]
            pool = _Pool(members, dtype, _key_bits(dtype), f"channel {name!r} of the dataset")
            dataset_pools[name] = pool
            pools.append(pool)
    passes = _run_pools(list(sources), pools, qs, max_passes=max_passes,
                        progress="stats" if progress else None)
    bounds: list[float] = [0.0]
    images = {key: {name: _entry(pool, qs, bounds) for name, pool in chans.items()}
              for key, chans in image_pools.items()}
    out.update({"method": METHOD_EXACT if all(p.bits <= _DIGIT for p in pools) else METHOD_TWO_PASS,
                "passes": passes, "error_bound": 0.0, "l2l_scale_version": __version__, "images": images})
    if scope == "dataset":
        out["dataset"] = {name: _entry(pool, qs, bounds) for name, pool in dataset_pools.items()}
    out["error_bound"] = float(max(bounds))
    return out


def pooled_percentiles(images: Sequence[tuple[str, str | Path, Sequence[str]]], q: float, *,
                       progress: bool = False) -> dict[str, float]:
    """The exact ``q``-th percentile of several channels of each image, their values pooled together.

    What CSBDeep's ``no_background_patches`` thresholds a several-channel target against
    (``np.percentile(y, percentile)`` over all of its channels).

    Parameters
    ----------
    images : sequence of (key, path, channel names)
        One entry per image: its key in the dataset, its OME-Zarr path and the channels to pool.
    q : float
        Percentile, 0-100.
    progress : bool
        Show a progress bar per pass.

    Returns
    -------
    dict
        ``{key: value}``, equal to ``np.percentile`` of the stacked channels.
    """
    from types import SimpleNamespace

    qs = np.array([0.0, float(q)])
    refs = [SimpleNamespace(key=key, path=Path(path)) for key, path, _ in images]
    sources, pools = [], []
    for s, (ref, (_, _, channels)) in enumerate(zip(refs, images)):
        source, names = _image_source(ref, list(channels))
        sources.append(source)
        dtype = np.dtype(source.dtype)
        pools.append(_Pool([(s, c) for c in range(len(names))], dtype, _key_bits(dtype),
                           f"channels {names} of image {ref.key or str(ref.path)!r}"))
    _run_pools(sources, pools, qs, progress="foreground levels" if progress else None)
    return {ref.key: float(_finish(pool, qs)[0][1]) for ref, pool in zip(refs, pools)}


# Scope "image" over at least this many images per worker thread: each task reads and finishes whole images, so
# a plate of thousands of small fields costs the client one small dict per field, not its metadata, histograms
# and percentile search (about 0.4 ms a field, more than reading a 256^2 field's pixels).
_PER_IMAGE_TASKS_FROM = 2


def _image_source(ref, channels: Sequence[str] | None) -> tuple[ZarrSource, list[str]]:
    """The engine's source for one image's selected channels, and their names (checked)."""
    from l2l_scale.io.read import channel_indices, image_meta

    meta = image_meta(ref.path)
    axis = meta.dims.index("c") if "c" in meta.dims else None
    if channels:
        if axis is None:
            raise ChannelError(f"image {ref.key or ref.path} has no channel axis; drop --channels")
        idx = channel_indices(meta.channel_names, list(channels))
    else:
        idx = list(range(meta.shape[axis])) if axis is not None else [0]
    names = [meta.channel_names[i] for i in idx] if axis is not None else ["0"]
    _key_bits(meta.dtype)
    if len(set(names)) != len(names):
        raise InputError(f"image {ref.key or str(ref.path)!r} has duplicate channel names {names}; give every "
                         "channel a unique name")
    return ZarrSource(str(ref.path), meta.array, axis, tuple(idx), meta.shape, meta.chunks,
                      meta.dtype.newbyteorder("=")), names


def _image_pools(refs, sources, names_per) -> dict[str, dict[str, _Pool]]:
    """One pool per channel of every image: ``{image key: {channel name: pool}}``."""
    out: dict[str, dict[str, _Pool]] = {}
    for s, (ref, names) in enumerate(zip(refs, names_per)):
        dtype = np.dtype(sources[s].dtype)
        out[ref.key] = {name: _Pool([(s, c)], dtype, _key_bits(dtype),
                                    f"channel {name!r} of image {ref.key or str(ref.path)!r}")
                        for c, name in enumerate(names)}
    return out


def _entry(pool: _Pool, qs: np.ndarray, bounds: list[float]) -> dict:
    """A pool's stats JSON entry; its error bound is appended to ``bounds``."""
    vals, mn, mx, err = _finish(pool, qs)
    bounds.append(err)
    return {"lo": float(vals[0]), "hi": float(vals[1]), "min": _py(mn), "max": _py(mx), "count": int(pool.n),
            "dtype": str(pool.dtype)}


def _images_task(refs, channels, qs: np.ndarray, max_passes: int | None) -> tuple[dict, int, float]:
    """Scope-"image" stats of whole images inside one task: ``({key: {channel: entry}}, passes, error bound)``."""
    import dataclasses

    sources, names_per = zip(*(_image_source(ref, channels) for ref in refs.value))
    sources = [dataclasses.replace(x, local=True) for x in sources]  # read here, not in tasks of their own
    image_pools = _image_pools(refs.value, sources, names_per)
    passes = _run_pools(sources, [p for chans in image_pools.values() for p in chans.values()], qs,
                        max_passes=max_passes)
    bounds: list[float] = [0.0]
    images = {key: {name: _entry(pool, qs, bounds) for name, pool in chans.items()}
              for key, chans in image_pools.items()}
    return images, passes, max(bounds)


def _stats_in_image_tasks(refs, channels, qs, max_passes, progress) -> tuple[dict, int, float]:
    """Scope-"image" stats of many images, a few tasks per worker thread each finishing whole images."""
    import dask
    from dask import delayed

    from l2l_scale.cluster import compute_with_progress
    from l2l_scale.io.read import image_meta
    from l2l_scale.preprocess.stats_sources import _TASK_BYTES, _Opaque, worker_processes

    # Tasks of up to _TASK_BYTES of pixels (estimated from the first image), at least one per worker process, and
    # one per thread only for images of 1 MiB or more. Small images are mostly Python work under the GIL (about
    # 0.15 ms each against 0.2 ms of decoding a 256^2 uint16 field), and two threads of one process contending for
    # it took 1.5x as long as one thread alone (256 fields of 256^2, 2 cores); larger ones decode without it.
    from l2l_scale.preprocess.stats_sources import worker_threads

    first = image_meta(refs[0].path)
    per_image = math.prod(first.shape) * first.dtype.itemsize
    least = worker_threads() if per_image >= 1 << 20 else worker_processes()
    n_tasks = min(len(refs), max(least, math.ceil(per_image * len(refs) / _TASK_BYTES)))
    bounds = np.linspace(0, len(refs), n_tasks + 1).astype(int)
    chans = tuple(channels) if channels else None
    parts = [delayed(_images_task, pure=False)(_Opaque(refs[a:b]), chans, qs, max_passes)
             for a, b in zip(bounds[:-1], bounds[1:])]
    results = compute_with_progress(parts, "stats") if progress else dask.compute(*parts)
    images: dict[str, dict] = {}
    for part, _, _ in results:
        images.update(part)
    return ({ref.key: images[ref.key] for ref in refs}, max(r[1] for r in results),
            float(max(r[2] for r in results)))


def _py(value: Any) -> int | float:
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    return float(value)


def write_stats(stats: dict, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a stats dict as JSON, atomically (a crash never leaves half a file).

    Raises
    ------
    OutputError
        ``path`` exists and ``overwrite`` is false, or its folder is missing or not writable.
    InputError
        ``stats`` is not a valid stats dict.
    """
    from l2l_scale.io.atomic import write_json
    from l2l_scale.io.output import check_output

    path = check_output(path, overwrite=overwrite)
    _validate(stats, "")
    return write_json(path, stats)


def _validate(stats: Any, path: str | Path) -> dict:
    where = f"{path}: " if path else ""
    fix = "regenerate it with 'l2l-scale stats INPUT --json OUT.json'"
    if not isinstance(stats, dict) or "l2l_scale_stats" not in stats:
        raise InputError(f"{where}not an l2l-scale stats file (no 'l2l_scale_stats' key); {fix}")
    version = stats["l2l_scale_stats"]
    if not isinstance(version, int) or version < 1:
        raise InputError(f"{where}stats format version {version!r} is invalid; {fix}")
    if version > STATS_VERSION:
        raise InputError(f"{where}stats format version {version} is newer than this l2l-scale reads "
                         f"({STATS_VERSION}); upgrade l2l-scale")
    try:
        parse_percentiles(stats.get("percentiles"))
    except ConfigError:
        raise InputError(f"{where}'percentiles' is not a valid low/high pair; {fix}") from None
    if stats.get("scope") not in SCOPES:
        raise InputError(f"{where}'scope' is {stats.get('scope')!r}, not one of {SCOPES}; {fix}")
    tables = [("images", img) for img in (stats.get("images") or {}).values()] if isinstance(
        stats.get("images"), dict) else None
    if tables is None:
        raise InputError(f"{where}'images' is missing or not a mapping; {fix}")
    if stats["scope"] == "dataset":
        if not isinstance(stats.get("dataset"), dict):
            raise InputError(f"{where}scope is 'dataset' but the 'dataset' entry is missing; {fix}")
        tables.append(("dataset", stats["dataset"]))
    for name, table in tables:
        if not isinstance(table, dict):
            raise InputError(f"{where}an entry of '{name}' is not a mapping of channels; {fix}")
        for ch, e in table.items():
            ok = isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)
                                             for k in ("lo", "hi"))
            if not ok:
                raise InputError(f"{where}channel {ch!r} in '{name}' lacks numeric 'lo'/'hi'; {fix}")
    return stats


def load_stats(path: str | Path) -> dict:
    """Read and validate a stats JSON written by :func:`write_stats` / ``l2l-scale stats --json``.

    Raises
    ------
    InputError
        Missing file, invalid JSON, or not a (supported) stats file.
    """
    from l2l_scale.io.read import read_json

    return _validate(read_json(path), path)


def stats_for(stats: dict | str | Path, image_key: str, channel: str) -> tuple[float, float]:
    """The (lo, hi) normalisation of one channel of one image.

    With scope ``"dataset"`` the dataset-wide values are returned for every image (``image_key`` is not
    checked, so they can normalise new images of the same kind).

    Parameters
    ----------
    stats : dict or path
        A stats dict (from :func:`dataset_stats` or :func:`load_stats`) or the path of a stats JSON.
    image_key : str
        The image's key in its dataset (``ImageRef.key``: ``""`` for a single image, ``"A/1/0"``).
    channel : str
        The channel name.

    Raises
    ------
    InputError
        The image is not in the stats (scope "image").
    ChannelError
        The channel is not in the stats.
    """
    if isinstance(stats, (str, Path)):
        stats = load_stats(stats)
    fix = "compute stats for this input with 'l2l-scale stats'"
    if stats.get("scope") == "dataset":
        table, where = stats["dataset"], "the dataset statistics"
    else:
        images = stats.get("images") or {}
        if image_key not in images:
            known = ", ".join(repr(k) for k in list(images)[:5]) + (" ..." if len(images) > 5 else "")
            raise InputError(f"image {image_key!r} is not in the statistics (they cover {known}); {fix}")
        table, where = images[image_key], f"the statistics of image {image_key!r}"
    entry = table.get(str(channel))
    if entry is None:
        raise ChannelError(f"channel {channel!r} is not in {where} (channels {list(table)}); check the channel "
                           f"name or {fix}")
    return float(entry["lo"]), float(entry["hi"])


# ------------------------------------------------------------------------------------------------- normalise


def normalize(data: Any, lo: Any, hi: Any, *, clip: bool = False, eps: float = 1e-20,
              dtype: Any = np.float32, channel_axis: int | str | None = "c") -> Any:
    """Map ``lo`` to 0 and ``hi`` to 1: ``(x - lo) / (hi - lo + eps)``, as ``csbdeep.utils.normalize_mi_ma``.

    Parameters
    ----------
    data : numpy.ndarray, dask.array.Array or xarray.DataArray
        The image; dask and xarray inputs stay lazy.
    lo, hi : float or sequence of float
        Scalars, or one value per channel along ``channel_axis``.
    clip : bool
        Clip the result to [0, 1].
    eps : float
        Added to the denominator, as in CSBDeep.
    dtype : numpy dtype or None
        Compute and return in this dtype (CSBDeep's default float32); ``None`` keeps the input's.
    channel_axis : int or str
        Where per-channel ``lo``/``hi`` apply: a dim name for a DataArray, an integer axis otherwise.

    Raises
    ------
    InputError
        ``hi <= lo`` for a channel: the channel is constant (or the percentiles are swapped).
    """
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.asarray(hi, dtype=np.float64)
    if lo_a.ndim > 1 or hi_a.ndim > 1 or lo_a.shape != hi_a.shape:
        raise ConfigError(f"lo {lo!r} and hi {hi!r} must be two scalars or two lists of equal length")
    names: list[str] | None = None
    axis = None
    if isinstance(data, xr.DataArray) and isinstance(channel_axis, str) and channel_axis in data.coords:
        names = [str(v) for v in np.ravel(data.coords[channel_axis].values)]
    if lo_a.ndim == 1 and lo_a.size == 1 and not (names and len(names) > 1):
        lo_a, hi_a = lo_a[0], hi_a[0]  # one value for a one-channel image is a scalar
    if lo_a.ndim == 1:
        if isinstance(data, xr.DataArray) and isinstance(channel_axis, str) and channel_axis in data.dims:
            axis = data.dims.index(channel_axis)
        elif isinstance(channel_axis, (int, np.integer)):
            axis = _int_axis(channel_axis, np.ndim(data))
        else:
            raise ConfigError(f"{lo_a.size} per-channel values given but the image has no channel axis "
                              f"{channel_axis!r}; pass scalars or the channel axis")
        if lo_a.size != np.shape(data)[axis]:
            raise ConfigError(f"{lo_a.size} per-channel values for {np.shape(data)[axis]} channels; "
                              "give one lo/hi per channel")
    bad = np.flatnonzero(~(np.ravel(hi_a) > np.ravel(lo_a)))  # also catches NaN
    if bad.size:
        i = int(bad[0])
        if lo_a.ndim:
            what = f"channel {names[i] if names and len(names) == lo_a.size else i}"
        else:
            what = f"channel {names[0]}" if names and len(names) == 1 else "the channel"
        l, h = float(np.ravel(lo_a)[i]), float(np.ravel(hi_a)[i])
        if l == h:
            raise InputError(f"{what} is constant (percentiles lo == hi == {l:g}); check the channel "
                             "selection or the percentiles")
        raise InputError(f"{what} has lo {l:g} not below hi {h:g}; check the channel selection or the "
                         "percentiles (low first)")
    if axis is not None:
        shape = [1] * np.ndim(data)
        shape[axis] = lo_a.size
        lo_a, hi_a = lo_a.reshape(shape), hi_a.reshape(shape)
        if isinstance(data, xr.DataArray):
            dim = data.dims[axis]
            lo_a = xr.DataArray(lo_a.reshape(-1), dims=(dim,))
            hi_a = xr.DataArray(hi_a.reshape(-1), dims=(dim,))
    x = data
    if dtype is not None:
        dt = np.dtype(dtype).type
        x = x.astype(dt)
        lo_a = lo_a.astype(dt) if lo_a.ndim else dt(lo_a)
        hi_a = hi_a.astype(dt) if hi_a.ndim else dt(hi_a)
        eps = dt(eps)
    out = (x - lo_a) / (hi_a - lo_a + eps)
    if clip:
        out = out.clip(0, 1)
    return out
