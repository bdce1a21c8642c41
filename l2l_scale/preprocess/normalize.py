"""Exact normalisation statistics: per-channel percentiles of whole images and datasets.

Label2label (like CSBDeep) maps the low/high percentile of every channel to 0/1 before training and
prediction. DESIGN invariant 2: the percentiles are those of the *whole* image (or of the whole dataset),
computed once, never per tile, and stored with the outputs and the model. This module computes them exactly
and out of core, as Dask graphs whose memory is bounded by chunk size, and reads/writes the stats JSON.

How the percentiles are exact
-----------------------------
Every supported dtype (bool, u/int 8-64, float 16-64) is mapped to an unsigned *key* of the same width W whose
order is the value order (flip the sign bit of signed ints; for floats flip the sign bit of positives and all
bits of negatives). Percentiles are then order statistics of keys, found by radix refinement:

* pass 1 counts the top ``min(16, W)`` bits of every key: one compiled counting loop per chunk and channel (fused
  with reading the chunk), trimmed to its non-empty range and summed by a dask tree reduction (fan-in 8), all
  channels and images in the same graph. For 8- and 16-bit data (uint8/uint16/int16, float16) this histogram
  holds every distinct value, so pass 1 is exact: ``method="histogram-exact"``.
* For wider dtypes the bin holding each needed rank is known after pass 1; pass 2 either gathers the values of
  that bin and sorts them (when it holds at most ``_GATHER_LIMIT`` values) or counts the next 16 bits of its
  keys. float32/int32 are therefore always exact after two passes (``method="two-pass"``); 64-bit data whose
  needed bins are overfull (many values sharing the top 32 bits) may take up to four.
* ``max_passes`` stops early; the bin a rank is known to lie in then bounds the error, which is reported as
  ``error_bound`` (0.0 whenever the result is exact).

The final value uses numpy's ``'linear'`` formula operation for operation (virtual index ``(n - 1) * q / 100``,
``a + (b - a) * g``, or ``b - (b - a) * (1 - g)`` when ``g >= 0.5``), so the result ``==``
``np.percentile(channel, q)``. One exception, where numpy is wrong: numpy subtracts neighbouring order
statistics in the input dtype, which wraps around for signed ints whose neighbours are more than the dtype's
maximum apart (``np.percentile(np.int16([-30000, 30000]), 50)`` is 32768); we subtract exactly, i.e. we equal
``np.percentile(channel.astype(np.int64), q)`` there.

Non-finite float values (NaN, +-Inf) are detected for free from the pass-1 histogram: their keys fill the bins
of the all-ones exponent, which hold nothing else.

The stats JSON (``l2l-scale stats --json``) is versioned by its ``"l2l_scale_stats"`` key; see
:func:`dataset_stats`.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ChannelError, ConfigError, InputError

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
METHOD_EXACT = "histogram-exact"
METHOD_TWO_PASS = "two-pass"

_DIGIT = 16  # bits resolved per histogram pass: at most 65536 bins (512 KiB of int64)
_GATHER_LIMIT = 1 << 22  # a bin with at most this many values is gathered and sorted instead of refined
_BATCH_BYTES = 1 << 28  # worst-case result bytes per compute on the client (plates with many fields)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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


# ------------------------------------------------------------------------------------------ order-keyed bits


def _key_bits(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.itemsize not in _UINT:
        raise InputError(f"dtype {dtype} is not supported for percentiles; convert the image to an integer "
                         "or float32 type first")
    return dtype.itemsize * 8


def _to_key(block: np.ndarray) -> np.ndarray:
    """Map values to unsigned keys of the same width whose unsigned order is the value order."""
    kind, w = block.dtype.kind, block.dtype.itemsize
    if kind == "u":
        return block
    u = _UINT[w]
    bits = block.view(u)
    if kind == "b":
        return bits
    sign = u(1 << (8 * w - 1))
    if kind == "i":
        return bits ^ sign
    # Floats: positives get the sign bit set (above all negatives); negatives are inverted (larger magnitude
    # -> smaller key). neg is 0 or 1, so neg * all-ones is the inversion mask.
    neg = bits >> u(8 * w - 1)
    return bits ^ ((neg * u(np.iinfo(u).max)) | sign)


def _from_key(key: int, dtype: np.dtype) -> np.generic:
    """Inverse of :func:`_to_key` for one key."""
    dtype = np.dtype(dtype)
    w = dtype.itemsize * 8
    u = _UINT[dtype.itemsize]
    key = int(key)
    if dtype.kind == "i":
        key ^= 1 << (w - 1)
    elif dtype.kind == "f":
        key = key ^ (1 << (w - 1)) if key >> (w - 1) else ~key & ((1 << w) - 1)
    return np.array(key, dtype=u).view(dtype)[()]


def _finite_key_bins(dtype: np.dtype, m: int) -> tuple[int, int]:
    """First and last pass-1 bin (top ``m`` key bits) that hold finite floats; the rest hold only NaN/Inf.

    The top 16 bits hold the sign and the whole exponent of float16/32/64, so the all-ones exponent (NaN, Inf)
    owns whole bins.
    """
    w = np.dtype(dtype).itemsize * 8
    big = np.array([np.finfo(dtype).max], dtype=dtype)
    lo_key = int(_to_key(-big)[0])
    hi_key = int(_to_key(big)[0])
    return lo_key >> (w - m), hi_key >> (w - m)


# ----------------------------------------------------------------------------------------- per-block kernels

def _count_loop(keys, select, sel_shift, prefix, shift, mask, out):
    """Add to ``out`` the count of every ``(key >> shift) & mask``, over the keys whose ``key >> sel_shift``
    equals ``prefix`` (all keys when ``select`` is false). Compiled by numba, see :func:`_count_kernel`."""
    sel_shift, prefix, shift, mask = np.uint64(sel_shift), np.uint64(prefix), np.uint64(shift), np.uint64(mask)
    for i in range(keys.size):
        k = np.uint64(keys[i])
        if select and (k >> sel_shift) != prefix:
            continue
        out[np.intp((k >> shift) & mask)] += 1


_kernel_lock = threading.Lock()
_kernel: Any = None


def _count_kernel() -> Any:
    """The compiled counting loop, built on first use (importing numba costs a fraction of a second).

    Why not ``np.bincount``: it holds the GIL, casts its input to intp and scans it for its maximum first, so it
    costs about 1.1 ms per megapixel of uint16 against 0.3 ms for this loop, which also releases the GIL. On two
    cores that is the difference between ``stats`` taking 1.6x and about 1.2x the time of reading the image
    once (``benchmarks/bench_stats.py``), and it fuses the prefix selection of pass 2 into the same loop.
    ``cache=True`` keeps the machine code on disk, so each new worker process does not compile again: in
    ``$NUMBA_CACHE_DIR`` if set, else in the user cache folder, never next to this file (numba's default): a
    cache written into site-packages stays behind after ``pip uninstall`` and turns ``l2l_scale`` into a
    namespace package for a later editable install.
    """
    global _kernel
    with _kernel_lock:
        if _kernel is None:
            import numba
            from numba.core import config as numba_config

            folder = numba_config.CACHE_DIR or _user_cache_dir()
            previous = numba_config.CACHE_DIR
            try:
                if folder is None:  # no writable cache folder: compile once per process
                    _kernel = numba.njit(nogil=True)(_count_loop)
                else:
                    # numba picks the cache folder when the function is decorated; set it for this one only.
                    numba_config.CACHE_DIR = folder
                    try:
                        _kernel = numba.njit(nogil=True, cache=True)(_count_loop)
                    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only setups)
                        _kernel = numba.njit(nogil=True)(_count_loop)
            finally:
                numba_config.CACHE_DIR = previous
    return _kernel


def _user_cache_dir() -> str | None:
    """A writable folder for the kernel cache under the user's cache folder, or None."""
    import platformdirs

    folder = os.path.join(platformdirs.user_cache_dir("l2l-scale"), "numba")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _histogram(keys: np.ndarray, bits: int, known: int, prefix: int) -> np.ndarray:
    """Counts of the next ``min(16, bits - known)`` key bits, over the keys whose top ``known`` bits equal
    ``prefix``: an int64 array with one entry per possible digit."""
    m = min(_DIGIT, bits - known)
    out = np.zeros(1 << m, dtype=np.int64)
    # known == 0 selects every key; the shift by the full key width it would need is undefined.
    _count_kernel()(keys, known > 0, bits - known if known else 0, prefix, bits - known - m,
                    (1 << m) - 1, out)
    return out


def _trim(counts: np.ndarray) -> tuple[int, np.ndarray] | None:
    """A histogram as ``(first non-empty bin, counts from there)``: image data uses few of the 65536 bins, so
    the per-chunk results that travel through the reduction tree are small."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    return int(nz[0]), counts[nz[0]: nz[-1] + 1].copy()


def _block_stats(block: np.ndarray, hist: tuple, gather: tuple, bits: int,
                 block_info: dict | None = None) -> np.ndarray:
    """Everything one pass needs from one block, as one object cell (shape ``(1,) * ndim``).

    ``hist[c]`` and ``gather[c]`` list ``(known_bits, prefix)`` requests for channel ``c`` (axis 0). For a
    hist request the keys whose top ``known_bits`` equal ``prefix`` are counted by their next
    ``min(16, bits - known_bits)`` bits; for a gather request those values themselves are returned. The cell
    holds ``{(channel, kind, known_bits, prefix): payload}``: a trimmed histogram or a list of value arrays.
    """
    c0 = block_info[0]["array-location"][0][0] if block_info else 0
    result: dict[tuple, Any] = {}
    for i in range(block.shape[0]):
        _channel_stats(block[i], c0 + i, hist, gather, bits, result)
    cell = np.empty((1,) * block.ndim, dtype=object)
    cell[(0,) * block.ndim] = result
    return cell


def _channel_stats(values: np.ndarray, c: int, hist: tuple, gather: tuple, bits: int, result: dict) -> None:
    """Add to ``result`` what channel ``c``'s requests want from ``values`` (see :func:`_block_stats`)."""
    if not hist[c] and not gather[c]:
        return
    values = values.ravel()
    keys = _to_key(values)
    for known, prefix in hist[c]:
        trimmed = _trim(_histogram(keys, bits, known, prefix))
        if trimmed is not None:
            result[(c, "hist", known, prefix)] = trimmed
    for known, prefix in gather[c]:
        hit = values[(keys >> (bits - known)) == prefix]
        if hit.size:
            result[(c, "gather", known, prefix)] = [hit]


@dataclass(frozen=True)
class _ZarrSource:
    """One image's level 0 read chunk by chunk straight from zarr: no dask array or xarray object per image.

    A plate of thousands of small fields spent most of its statistics time building per-field dask graphs
    (about 15 ms a field against 1 ms of reading); these sources are grouped into a few tasks per thread instead.
    ``shape`` and ``dtype`` are those of the selected channels, channel first, as for a dask source.
    """

    store: str
    array: str
    axis: int | None  # the channel axis in the zarr array (None: no channel axis)
    channels: tuple[int, ...]  # selected channels, as indices along ``axis``
    array_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        rest = [n for i, n in enumerate(self.array_shape) if i != self.axis]
        return (len(self.channels), *rest)

    def chunk_regions(self) -> list[tuple[slice, ...]]:
        """The regions of the array's chunks holding a selected channel."""
        grid = [range(0, n, c) for n, c in zip(self.array_shape, self.chunks)]
        out = []
        for start in np.ndindex(*[len(g) for g in grid]):
            region = tuple(slice(g[i], min(g[i] + c, n)) for g, i, c, n in zip(grid, start, self.chunks,
                                                                                self.array_shape))
            if self.axis is None or any(region[self.axis].start <= ch < region[self.axis].stop
                                        for ch in self.channels):
                out.append(region)
        return out


class _Opaque:
    def __init__(self, value: Any):
        self.value = value


def _zarr_chunks_stats(items: _Opaque) -> dict:
    """One task of a pass over zarr sources: ``{source index: {(channel, kind, known, prefix): payload}}``.

    ``items.value`` lists ``(source, source index, chunk region, hist requests, gather requests)``.
    """
    import zarr

    from l2l_scale.io.read import read_region

    out: dict[int, dict] = {}
    arrays: dict[tuple[str, str], Any] = {}
    for src, s, region, hist, gather in items.value:
        key = (src.store, src.array)
        if key not in arrays:
            arrays[key] = zarr.open_array(store=src.store, path=src.array, mode="r")
        block = read_region(arrays[key], region, Path(src.store))
        if not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        if src.axis is None:
            block, first = block[None], 0
        else:
            block, first = np.moveaxis(block, src.axis, 0), region[src.axis].start
        part: dict[tuple, Any] = {}
        for c, ch in enumerate(src.channels):
            if first <= ch < first + block.shape[0]:
                _channel_stats(block[ch - first], c, hist, gather, _key_bits(src.dtype), part)
        out[s] = _merge([out[s], part]) if s in out else part
    return out


def _merge_sources(*parts: dict) -> dict:
    """Merge results of :func:`_zarr_chunks_stats` (or of this function) per source."""
    out: dict[int, list] = {}
    for part in parts:
        for s, res in part.items():
            out.setdefault(s, []).append(res)
    return {s: _merge(items) if len(items) > 1 else items[0] for s, items in out.items()}


_TASK_BYTES = 1 << 27  # at most this many bytes of pixels per task of a pass over zarr sources


def _zarr_pass(sources: list, batch: list[int], requests: dict[int, tuple[tuple, tuple]], label: str | None) -> dict:
    """One pass over the zarr sources in ``batch``, their chunks spread over a few tasks per worker thread."""
    from dask import delayed

    from l2l_scale.cluster import compute_with_progress, current_client

    items = [(sources[s], s, region, *requests[s]) for s in batch if s in requests
             for region in sources[s].chunk_regions()]
    if not items:
        return {}
    nbytes = sum(math.prod(r.stop - r.start for r in it[2]) * it[0].dtype.itemsize for it in items)
    client = current_client()
    threads = (sum(client.nthreads().values()) if client is not None else
               (dask.config.get("num_workers", None) or os.cpu_count() or 1))
    n_tasks = min(len(items), max(4 * threads, math.ceil(nbytes / _TASK_BYTES)))
    bounds = np.linspace(0, len(items), n_tasks + 1).astype(int)
    # Each task's items travel as one opaque object: dask would otherwise walk every nested tuple and slice.
    parts = [delayed(_zarr_chunks_stats, pure=False)(_Opaque(items[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    while len(parts) > 8:
        parts = [delayed(_merge_sources, pure=False)(*parts[i:i + 8]) for i in range(0, len(parts), 8)]
    merged = compute_with_progress(parts, label) if label else dask.compute(*parts)
    return _merge_sources(*merged)


def _merge(parts: Sequence[dict]) -> dict:
    """Combine per-block results: histograms add up, gathered values are collected."""
    hists: dict[tuple, list] = {}
    out: dict[tuple, Any] = {}
    for part in parts:
        for key, payload in part.items():
            if key[1] == "hist":
                hists.setdefault(key, []).append(payload)
            else:
                out[key] = out.get(key, []) + payload
    for key, items in hists.items():
        if len(items) == 1:
            out[key] = items[0]
            continue
        lo = min(o for o, _ in items)
        hi = max(o + c.size for o, c in items)
        acc = np.zeros(hi - lo, dtype=np.int64)
        for o, c in items:
            acc[o - lo: o - lo + c.size] += c
        out[key] = (lo, acc)
    return out


def _cells(parts: Any) -> Iterator[np.ndarray]:
    if isinstance(parts, (list, tuple)):
        for part in parts:
            yield from _cells(part)
    else:
        yield parts


def _reduce_leaf(cell: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return cell


def _reduce_merge(parts: Any, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    """combine/aggregate step of :func:`_reduce_blocks`: ``parts`` are nested lists of object cells."""
    cells = list(_cells(parts))
    shape = cells[0].shape if keepdims else ()
    out = np.empty(shape, dtype=object)
    out[(0,) * len(shape)] = _merge([c.flat[0] for c in cells])
    return out


_REDUCTION_NAME = "l2l-stats-blocks"


def _reduce_blocks(cells: da.Array, split_every: int = 8) -> da.Array:
    """A dask tree reduction (fan-in ``split_every``) of the per-block object cells to one 0-d cell.

    ``da.reduction`` rather than hand-built Delayed trees: the graph is built in microseconds and reading a
    chunk, counting it and the reduction's first step fuse into one task, as for ``arr.sum()``.
    """
    return da.reduction(cells, _reduce_leaf, _reduce_merge, combine=_reduce_merge, axis=tuple(range(cells.ndim)),
                        keepdims=False, dtype=object, concatenate=False, split_every=split_every,
                        meta=np.empty((), dtype=object), name=_REDUCTION_NAME)


# ------------------------------------------------------------------------------------------------- the engine


@dataclass
class _Probe:
    """Where one needed order statistic is known to be: in the keys starting with ``prefix`` (``known`` bits)."""

    known: int
    prefix: int
    rank: int  # rank inside that prefix bin
    count: int  # values inside that prefix bin
    pending: tuple | None = None  # the request made for it in the current pass


@dataclass
class _Pool:
    """One statistic: the pooled values of ``members`` = [(source index, channel index), ...]."""

    members: list[tuple[int, int]]
    dtype: np.dtype
    bits: int
    label: str
    n: int | None = None
    probes: dict[int, _Probe] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)  # rank -> exact value (dtype scalar)
    acc: dict[tuple, Any] = field(default_factory=dict)

    def requests(self) -> set[tuple]:
        if self.n is None:
            return {("hist", 0, 0)}
        out = set()
        for p in self.probes.values():
            kind = "gather" if p.count <= _GATHER_LIMIT else "hist"
            p.pending = (kind, p.known, p.prefix)
            out.add(p.pending)
        return out

    def add(self, request: tuple, payload: Any) -> None:
        """Accumulate one member's result for ``request``: a trimmed histogram or a list of value arrays."""
        if request[0] == "hist":
            if request not in self.acc:
                self.acc[request] = np.zeros(1 << min(_DIGIT, self.bits - request[1]), dtype=np.int64)
            offset, counts = payload
            self.acc[request][offset: offset + counts.size] += counts
        else:
            self.acc.setdefault(request, []).extend(payload)

    def absorb(self, ranks_for_n) -> None:
        """Use this pass's accumulated results to resolve or narrow every probe."""
        acc, self.acc = self.acc, {}
        if self.n is None:
            hist = acc.get(("hist", 0, 0), np.zeros(1, dtype=np.int64))
            self.n = int(hist.sum())
            if self.n == 0:
                raise InputError(f"{self.label} has no pixels; check the image and the channel selection")
            if self.dtype.kind == "f":
                lo_bin, hi_bin = _finite_key_bins(self.dtype, min(_DIGIT, self.bits))
                bad = int(hist[:lo_bin].sum() + hist[hi_bin + 1:].sum())
                if bad:
                    raise InputError(f"{self.label} contains NaN or Inf ({bad} pixels); percentiles need finite "
                                     "data: fix or mask the input (e.g. replace them by 0) first")
            self.probes = {r: _Probe(0, 0, r, self.n, ("hist", 0, 0)) for r in ranks_for_n(self.n)}
        done = []
        sorted_cache: dict[tuple, np.ndarray] = {}
        cum_cache: dict[tuple, np.ndarray] = {}  # probes of one pass often share a request (pass 1: all do)
        for r, p in self.probes.items():
            kind = p.pending[0]
            if kind == "gather":
                if p.pending not in sorted_cache:
                    sorted_cache[p.pending] = np.sort(np.concatenate(acc[p.pending]))  # holds p.count values
                self.values[r] = sorted_cache[p.pending][p.rank]
                done.append(r)
                continue
            m = min(_DIGIT, self.bits - p.known)
            hist = acc.get(p.pending, np.zeros(1 << m, dtype=np.int64))
            if p.pending not in cum_cache:
                cum_cache[p.pending] = np.cumsum(hist[: 1 << m])
            cum = cum_cache[p.pending]
            digit = int(np.searchsorted(cum, p.rank, side="right"))
            below = int(cum[digit - 1]) if digit else 0
            p.rank -= below
            p.count = int(hist[digit])
            p.prefix = (p.prefix << m) | digit
            p.known += m
            if p.known == self.bits:
                self.values[r] = _from_key(p.prefix, self.dtype)
                done.append(r)
        for r in done:
            del self.probes[r]

    def estimate(self, rank: int) -> tuple[Any, float]:
        """(value, error bound) of a rank: exact, or the middle of the bin it is known to lie in."""
        if rank in self.values:
            return self.values[rank], 0.0
        p = self.probes[rank]
        free = self.bits - p.known
        lo = float(_from_key(p.prefix << free, self.dtype))
        hi = float(_from_key(((p.prefix + 1) << free) - 1, self.dtype))
        return (lo + hi) / 2.0, (hi - lo) / 2.0


def _rank_pairs(n: int, qs: np.ndarray) -> list[tuple[int, int, np.float64]]:
    """(lower rank, upper rank, gamma) per percentile, with the float operations of numpy's 'linear' method.

    See ``numpy.lib._function_base_impl._quantile``: virtual index ``(n - 1) * (q / 100)``, its floor and
    fraction; at or beyond the last index both neighbours are the last value.
    """
    virtual = (n - 1) * np.true_divide(qs, 100)
    prev = np.floor(virtual)
    pairs = []
    for v, p in zip(virtual, prev):
        if v >= n - 1:
            pairs.append((n - 1, n - 1, np.float64(0.0)))
        else:
            pairs.append((int(p), int(p) + 1, np.float64(v - p)))
    return pairs


def _needed_ranks(qs: np.ndarray):
    def ranks(n: int) -> list[int]:
        out = {0, n - 1}  # min and max come for free
        for a, b, _ in _rank_pairs(n, qs):
            out.update((a, b))
        return sorted(out)
    return ranks


def _lerp_like_numpy(a: Any, b: Any, t: np.float64) -> np.float64:
    """numpy's ``_lerp`` for one pair of order statistics; ``a``/``b`` are dtype scalars or float64 estimates."""
    if isinstance(a, (np.integer, np.bool_)) and isinstance(b, (np.integer, np.bool_)):
        diff = np.float64(int(b) - int(a))  # exact even where numpy's in-dtype subtraction would wrap
    else:
        diff = np.float64(b - a)  # float dtypes subtract in their own precision, exactly as numpy does
    if t >= 0.5:
        return np.float64(b) - diff * (np.float64(1.0) - t)
    return np.float64(a) + diff * t


def _finish(pool: _Pool, qs: np.ndarray) -> tuple[np.ndarray, Any, Any, float]:
    """(percentiles, min, max, error bound) of a pool whose passes are done."""
    out = np.empty(qs.size, dtype=np.float64)
    bound = 0.0
    for i, (lo_rank, hi_rank, gamma) in enumerate(_rank_pairs(pool.n, qs)):
        a, ea = pool.estimate(lo_rank)
        b, eb = pool.estimate(hi_rank)
        out[i] = _lerp_like_numpy(a, b, gamma)
        bound = max(bound, ea, eb)
    mn, emn = pool.estimate(0)
    mx, emx = pool.estimate(pool.n - 1)
    return out, mn, mx, max(bound, emn, emx)


def _run_pools(sources: list[da.Array], pools: list[_Pool], qs: np.ndarray, *, max_passes: int | None = None,
               progress: str | None = None) -> int:
    """Run the passes for all pools over all (channel-first) sources; returns the number of passes made."""
    if max_passes is not None and (not isinstance(max_passes, (int, np.integer)) or max_passes < 1):
        raise ConfigError(f"max_passes {max_passes!r} must be a positive integer (or None for exact results)")
    ranks_for_n = _needed_ranks(qs)
    member_pools: dict[tuple[int, int], list[_Pool]] = {}
    for pool in pools:
        for mem in pool.members:
            member_pools.setdefault(mem, []).append(pool)
    passes = 0
    while True:
        wanted = {id(pool): pool.requests() for pool in pools if pool.n is None or pool.probes}
        if not wanted or (max_passes is not None and passes >= max_passes):
            return passes
        # Per source and channel, the union of what the pools containing it want.
        per_member: dict[tuple[int, int], set[tuple]] = {}
        for mem, mpools in member_pools.items():
            reqs = set().union(*(wanted.get(id(p), set()) for p in mpools))
            if reqs:
                per_member[mem] = reqs
        for batch in _batches(sources, per_member):
            _compute_batch(sources, batch, per_member, member_pools, wanted, progress, passes + 1)
        for pool in pools:
            if id(pool) in wanted:
                pool.absorb(ranks_for_n)
        passes += 1


def _batches(sources: list[da.Array], per_member: dict) -> list[list[int]]:
    """Groups of source indices whose results together stay below ``_BATCH_BYTES`` on the client (at worst
    one full histogram per request and channel)."""
    rows: dict[int, int] = {}
    for (s, _), reqs in per_member.items():
        rows[s] = max(rows.get(s, 0), len(reqs))
    batches, current, size = [], [], 0
    for s in sorted(rows):
        nbytes = sources[s].shape[0] * rows[s] * (1 << min(_DIGIT, _key_bits(sources[s].dtype))) * 8
        if current and size + nbytes > _BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(s)
        size += nbytes
    if current:
        batches.append(current)
    return batches


def _compute_batch(sources, batch, per_member, member_pools, wanted, progress, pass_no) -> None:
    """One pass over the sources in ``batch``: one fused read+count task per block, one reduction tree each
    (dask sources), or a few tasks per worker thread over all chunks (zarr sources)."""
    trees, slots, n_blocks = [], [], 0
    requests: dict[int, tuple[tuple, tuple]] = {}
    for s in batch:
        x = sources[s]
        hist = tuple(tuple(sorted((r[1], r[2]) for r in per_member.get((s, c), ()) if r[0] == "hist"))
                     for c in range(x.shape[0]))
        gather = tuple(tuple(sorted((r[1], r[2]) for r in per_member.get((s, c), ()) if r[0] == "gather"))
                       for c in range(x.shape[0]))
        if not any(hist) and not any(gather):
            continue
        if isinstance(x, _ZarrSource):
            requests[s] = (hist, gather)
            continue
        cells = x.map_blocks(_block_stats, hist=hist, gather=gather, bits=_key_bits(x.dtype),
                             chunks=tuple((1,) * len(c) for c in x.chunks), dtype=object,
                             meta=np.empty((0,) * x.ndim, dtype=object))
        n_blocks += math.prod(cells.numblocks)
        trees.append(_reduce_blocks(cells))
        slots.append(s)
    label = f"{progress} (pass {pass_no})" if progress else None
    results = list(_compute_with_block_progress(trees, n_blocks, label) if label else dask.compute(*trees)) \
        if trees else []
    per_source = [(s, np.asarray(cell, dtype=object).flat[0]) for s, cell in zip(slots, results)]
    per_source += list(_zarr_pass(sources, batch, requests, label).items()) if requests else []
    for s, merged in per_source:
        for (c, kind, known, prefix), payload in merged.items():
            req = (kind, known, prefix)
            for pool in member_pools.get((s, c), ()):
                if req in wanted.get(id(pool), ()):
                    pool.add(req, payload)


def _compute_with_block_progress(trees: list, n_blocks: int, label: str) -> tuple:
    """Compute the reduction trees with a progress bar that counts image blocks, not trees.

    With a distributed client the shared helper shows per-tree progress (the dashboard shows the blocks).
    """
    from l2l_scale.cluster import compute_with_progress, current_client

    if current_client() is not None:
        return tuple(compute_with_progress(trees, label))
    from dask.callbacks import Callback
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False, redirect_stdout=False) as bar:
        job = bar.add_task(label, total=n_blocks)

        class _Blocks(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                # Per-block tasks are the reduction's first step: "l2l-stats-blocks-<token>" (the later steps
                # are "-partial-" and "-aggregate-"). Cosmetic only: the bar is completed at the end anyway.
                name = key[0] if isinstance(key, tuple) else str(key)
                rest = name[len(_REDUCTION_NAME):] if name.startswith(_REDUCTION_NAME) else "-partial"
                if not rest.startswith(("-partial", "-aggregate")):
                    bar.advance(job)

        with _Blocks():
            results = dask.compute(*trees)
        bar.update(job, completed=n_blocks)
        return results


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
    from l2l_scale.io.read import channel_indices, image_meta, list_images

    lo_q, hi_q = parse_percentiles(q)
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is not one of {', '.join(SCOPES)}; use 'image' or 'dataset'")
    qs = np.array([lo_q, hi_q])
    refs = list_images(path)
    sources, names_per = [], []
    for ref in refs:
        meta = image_meta(ref.path)
        axis = meta.dims.index("c") if "c" in meta.dims else None
        if channels:
            if axis is None:
                raise ChannelError(f"image {ref.key or ref.path} has no channel axis; drop --channels")
            idx = channel_indices(meta.channel_names, list(channels))
        else:
            idx = list(range(meta.shape[axis])) if axis is not None else [0]
        names = [meta.channel_names[i] for i in idx] if axis is not None else ["0"]
        label = f"image {ref.key or str(ref.path)!r}"
        _key_bits(meta.dtype)
        x = _ZarrSource(str(ref.path), meta.array, axis, tuple(idx), meta.shape, meta.chunks,
                        meta.dtype.newbyteorder("="))
        if len(set(names)) != len(names):
            raise InputError(f"{label} has duplicate channel names {names}; give every channel a unique name")
        sources.append(x)
        names_per.append(names)
    pools: list[_Pool] = []
    image_pools: dict[str, dict[str, _Pool]] = {}
    for s, (ref, names) in enumerate(zip(refs, names_per)):
        dtype = np.dtype(sources[s].dtype)
        image_pools[ref.key] = {}
        for c, name in enumerate(names):
            label = f"channel {name!r} of image {ref.key or str(ref.path)!r}"
            pool = _Pool([(s, c)], dtype, _key_bits(dtype), label)
            image_pools[ref.key][name] = pool
            pools.append(pool)
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
    passes = _run_pools(sources, pools, qs, max_passes=max_passes,
                        progress="stats" if progress else None)

    bound = 0.0

    def entry(pool: _Pool) -> dict:
        nonlocal bound
        vals, mn, mx, err = _finish(pool, qs)
        bound = max(bound, err)
        return {"lo": float(vals[0]), "hi": float(vals[1]), "min": _py(mn), "max": _py(mx),
                "count": int(pool.n), "dtype": str(pool.dtype)}

    out: dict[str, Any] = {
        "l2l_scale_stats": STATS_VERSION,
        "percentiles": [lo_q, hi_q],
        "scope": scope,
        "source": str(path),
        "method": METHOD_EXACT if all(p.bits <= _DIGIT for p in pools) else METHOD_TWO_PASS,
        "passes": passes,
        "error_bound": 0.0,
        "l2l_scale_version": __version__,
        "images": {key: {name: entry(pool) for name, pool in chans.items()} for key, chans in image_pools.items()},
    }
    if scope == "dataset":
        out["dataset"] = {name: entry(pool) for name, pool in dataset_pools.items()}
    out["error_bound"] = float(bound)
    return out


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
