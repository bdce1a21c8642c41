"""The exact percentile engine: order keys, compiled histogram counting, and the radix-refinement passes.

:mod:`l2l_scale.preprocess.normalize` turns images and datasets into *sources* (channel-first dask arrays, or
:class:`l2l_scale.preprocess.stats_sources.ZarrSource` for OME-Zarr images read chunk by chunk) and *pools* (one
statistic each: the pooled values of some channels of some sources); :func:`_run_pools` runs the passes over
all of them at once. A source type with a ``run_pass`` attribute computes its own pass (see
:func:`_compute_batch`); dask arrays get one fused read+count task per block and a tree reduction.

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

"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import dask
import dask.array as da
import numpy as np

from l2l_scale.errors import ConfigError, InputError

METHOD_EXACT = "histogram-exact"
METHOD_TWO_PASS = "two-pass"

_DIGIT = 16  # bits resolved per histogram pass: at most 65536 bins (512 KiB of int64)
_GATHER_LIMIT = 1 << 22  # a bin with at most this many values is gathered and sorted instead of refined
_BATCH_BYTES = 1 << 28  # worst-case result bytes per compute on the client (plates with many fields)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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

def _count_loop(keys, select, sel_shift, prefix, shift, mask, base, out):
    """Add to ``out[digit - base]`` the count of every digit ``(key >> shift) & mask``, over the keys whose
    ``key >> sel_shift`` equals ``prefix`` (all keys when ``select`` is false). Compiled by numba, see
    :func:`_count_kernel`."""
    sel_shift, prefix, shift, mask = np.uint64(sel_shift), np.uint64(prefix), np.uint64(shift), np.uint64(mask)
    for i in range(keys.size):
        k = np.uint64(keys[i])
        if select and (k >> sel_shift) != prefix:
            continue
        out[np.intp((k >> shift) & mask) - base] += 1


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


def _histogram(keys: np.ndarray, bits: int, known: int, prefix: int) -> tuple[int, np.ndarray] | None:
    """Counts of the next ``min(16, bits - known)`` key bits, over the keys whose top ``known`` bits equal
    ``prefix``, trimmed: ``(first non-empty digit, int64 counts from there to the last one)``, or None if no key
    is selected. Image data uses few of the 65536 digits, so what travels through reductions stays small."""
    m = min(_DIGIT, bits - known)
    shift = bits - known - m
    kernel = _count_kernel()
    if known == 0 and 0 < keys.size <= 1 << (m + 2):
        # Few keys per digit (a 256^2 field): the span from min and max costs less than zeroing and scanning all
        # 2^m counts (5 us against 36 us at 65536 keys); with every key selected the digit is monotone in it.
        lo, hi = int(keys.min()) >> shift, int(keys.max()) >> shift
        out = np.zeros(hi - lo + 1, dtype=np.int64)
        kernel(keys, False, 0, 0, shift, (1 << m) - 1, lo, out)
        return lo, out
    out = np.zeros(1 << m, dtype=np.int64)
    # known == 0 selects every key; the shift by the full key width it would need is undefined.
    kernel(keys, known > 0, bits - known if known else 0, prefix, shift, (1 << m) - 1, 0, out)
    nz = out != 0
    first = int(nz.argmax())  # argmax stops at the first True: a quarter of flatnonzero's time over 65536 bins
    if not nz[first]:
        return None
    return first, out[first: out.size - int(nz[::-1].argmax())].copy()


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
        trimmed = _histogram(keys, bits, known, prefix)
        if trimmed is not None:
            result[(c, "hist", known, prefix)] = trimmed
    for known, prefix in gather[c]:
        hit = values[(keys >> (bits - known)) == prefix]
        if hit.size:
            result[(c, "gather", known, prefix)] = [hit]



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
        out[key] = items[0] if len(items) == 1 else _add_trimmed(items)
    return out


def _add_trimmed(items: Sequence[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    """The sum of trimmed histograms ``(first bin, counts)``, trimmed to their common range."""
    lo = min(o for o, _ in items)
    hi = max(o + c.size for o, c in items)
    acc = np.zeros(hi - lo, dtype=np.int64)
    for o, c in items:
        acc[o - lo: o - lo + c.size] += c
    return lo, acc


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
            # Kept trimmed, as they arrive: a plate of thousands of single-channel fields would otherwise
            # allocate, sum and scan a 65536-bin array per field (half a millisecond each on the client).
            self.acc[request] = _add_trimmed([self.acc[request], payload]) if request in self.acc else payload
        else:
            self.acc.setdefault(request, []).extend(payload)

    def absorb(self, ranks_for_n) -> None:
        """Use this pass's accumulated results to resolve or narrow every probe."""
        acc, self.acc = self.acc, {}
        if self.n is None:
            first, hist = acc.get(("hist", 0, 0), (0, np.zeros(1, dtype=np.int64)))
            self.n = int(hist.sum())
            if self.n == 0:
                raise InputError(f"{self.label} has no pixels; check the image and the channel selection")
            if self.dtype.kind == "f":
                lo_bin, hi_bin = _finite_key_bins(self.dtype, min(_DIGIT, self.bits))
                lo_i, hi_i = max(lo_bin - first, 0), max(hi_bin + 1 - first, 0)  # into the trimmed counts
                bad = int(hist[:lo_i].sum() + hist[hi_i:].sum())
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
            if p.pending in acc:
                first, hist = acc[p.pending]  # counts from bin ``first``
            else:  # (not as get's default: it would allocate 65536 bins per probe, kept or not)
                first, hist = 0, np.zeros(1 << m, dtype=np.int64)
            if p.pending not in cum_cache:
                cum_cache[p.pending] = np.cumsum(hist)
            cum = cum_cache[p.pending]
            j = int(np.searchsorted(cum, p.rank, side="right"))  # rank < the bin's count, so j < len(hist)
            below = int(cum[j - 1]) if j else 0
            digit = first + j
            p.rank -= below
            p.count = int(hist[j])
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


def percentiles_in_memory(values: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``np.percentile(values, qs)`` (method ``'linear'``, float64) of an in-memory array, with the same values.

    numpy selects all four order statistics of two percentiles in one ``np.partition`` with four ``kth``, which on
    numpy 2.4 costs 14x one with a single ``kth`` (0.77 ms against 0.055 ms for 65536 float32): half the time of
    finishing a 256^2 field of a plate went there. Each pair of neighbouring ranks ``(a, a + 1)`` takes one
    single-``kth`` partition here (at ``a + 1``; ``a`` is the largest value left of it), and the interpolation
    is numpy's (:func:`_lerp_like_numpy`, see the module notes for the one case where numpy wraps around).
    """
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        raise ValueError("percentiles of an empty array")
    order: dict[int, Any] = {}
    pairs = _rank_pairs(flat.size, np.asarray(qs, dtype=np.float64))
    for a, b, _ in pairs:
        if a not in order or b not in order:
            part = np.partition(flat, b)
            order[b] = part[b]
            if a != b:  # a == b - 1
                order[a] = part[:b].max()
    return np.array([_lerp_like_numpy(order[a], order[b], g) for a, b, g in pairs], dtype=np.float64)


def _run_pools(sources: list, pools: list[_Pool], qs: np.ndarray, *, max_passes: int | None = None,
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


def _batches(sources: list, per_member: dict) -> list[list[int]]:
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
        if hasattr(x, "run_pass"):  # the source type runs its own pass over these requests
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
    if requests:
        run_pass = sources[next(iter(requests))].run_pass
        per_source += list(run_pass(sources, batch, requests, label).items())
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
