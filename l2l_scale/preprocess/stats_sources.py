"""OME-Zarr images as sources of the percentile engine, read chunk by chunk straight from their arrays.

A plate of thousands of small fields spent most of its statistics time building per-field dask graphs (about
15 ms a field against 1 ms of reading); these sources are grouped into a few tasks per worker thread instead,
and their chunks are read through :func:`l2l_scale.io.chunks.cached_array` (no zarr-python per chunk). With
scope "image" over many images, whole images go to each task (``local`` sources, read inside it), so the client
handles one small dict per image (:func:`l2l_scale.preprocess.normalize.dataset_stats`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from l2l_scale.preprocess.percentile_engine import _channel_stats, _key_bits, _merge

@dataclass(frozen=True)
class ZarrSource:
    """One image's level 0 read chunk by chunk: no dask array or xarray object per image.

    ``shape`` and ``dtype`` are those of the selected channels, channel first, as for a dask source; the engine
    calls :meth:`run_pass` for a pass over such sources.
    """

    store: str
    array: str
    axis: int | None  # the channel axis in the zarr array (None: no channel axis)
    channels: tuple[int, ...]  # selected channels, as indices along ``axis``
    array_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    local: bool = False  # read in the calling task (which already holds whole images), not in tasks of its own

    @staticmethod
    def run_pass(sources: list, batch: list[int], requests: dict, label: str | None) -> dict:
        """One pass of the engine over the sources in ``batch`` (see :func:`_zarr_pass`)."""
        return _zarr_pass(sources, batch, requests, label)

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


def worker_threads() -> int:
    """Threads that will run tasks: the distributed client's workers', else the local scheduler's."""
    from l2l_scale.cluster import current_client

    client = current_client()
    if client is not None:
        return sum(client.nthreads().values())
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def worker_processes() -> int:
    """Worker processes that will run tasks (1 for dask's local schedulers)."""
    from l2l_scale.cluster import current_client

    client = current_client()
    return len(client.nthreads()) if client is not None else 1


class _Opaque:
    def __init__(self, value: Any):
        self.value = value


def _zarr_chunks_stats(items: _Opaque) -> dict:
    """One task of a pass over zarr sources: ``{source index: {(channel, kind, known, prefix): payload}}``.

    ``items.value`` lists ``(source, source index, chunk region, hist requests, gather requests)``.
    """
    from l2l_scale.io.chunks import cached_array
    from l2l_scale.io.read import read_region

    out: dict[int, dict] = {}
    for src, s, region, hist, gather in items.value:
        block = read_region(cached_array(src.store, src.array, "r"), region, Path(src.store))
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

    from l2l_scale.cluster import compute_with_progress

    items = [(sources[s], s, region, *requests[s]) for s in batch if s in requests
             for region in sources[s].chunk_regions()]
    if not items:
        return {}
    if items[0][0].local:
        return _zarr_chunks_stats(_Opaque(items))
    nbytes = sum(math.prod(r.stop - r.start for r in it[2]) * it[0].dtype.itemsize for it in items)
    n_tasks = min(len(items), max(4 * worker_threads(), math.ceil(nbytes / _TASK_BYTES)))
    bounds = np.linspace(0, len(items), n_tasks + 1).astype(int)
    # Each task's items travel as one opaque object: dask would otherwise walk every nested tuple and slice.
    parts = [delayed(_zarr_chunks_stats, pure=False)(_Opaque(items[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    while len(parts) > 8:
        parts = [delayed(_merge_sources, pure=False)(*parts[i:i + 8]) for i in range(0, len(parts), 8)]
    merged = compute_with_progress(parts, label) if label else dask.compute(*parts)
    return _merge_sources(*merged)
