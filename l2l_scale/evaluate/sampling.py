"""Foreground patch sampling for the patch-set metrics: CSBDeep's non-background rule on images of any size."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.evaluate.blockwise import _unwrap

__all__ = ["PatchSet", "cut_patches", "foreground_patches"]


@dataclass(frozen=True)
class PatchSet:
    """Matching patches of target, prediction and (optionally) input, and where they came from.

    Attributes
    ----------
    target, pred : numpy.ndarray
        ``[N, H, W]`` in the source dtype.
    input : numpy.ndarray or None
        ``[N, H, W]`` if an input image was given.
    corners : numpy.ndarray
        ``[N, 2]`` (row, column) of each patch's top-left pixel.
    """

    target: np.ndarray
    pred: np.ndarray
    input: np.ndarray | None
    corners: np.ndarray


def _row_counts_block(b: np.ndarray) -> np.ndarray:
    return np.count_nonzero(b, axis=1).astype(np.int64)[:, None]


def foreground_patches(target: Any, pred: Any, input: Any = None, *, patch_size: int | tuple[int, int] = 128,
                       n: int = 64, threshold: float = 0.4, percentile: float = 99.9,
                       seed: int | None = None) -> PatchSet:
    """Sample patches from non-background areas exactly as CSBDeep's ``create_patches`` with
    ``no_background_patches`` does.

    A patch centre is eligible where the maximum filter (size ``patch_size // 2``, zero padding) of the float32
    *target* exceeds ``threshold`` times its ``percentile``; ``n`` centres are drawn uniformly from the eligible
    ones (with replacement only if there are fewer than ``n``), using CSBDeep's own random procedure: with the
    same ``seed`` the patches equal those of ``csbdeep.data.sample_patches_from_multiple_stacks`` after
    ``np.random.seed(seed)``.

    Dask inputs are never loaded whole: the mask is a dask-image maximum filter (its halo derived from the filter
    size), the 99.9th percentile is exact (:func:`l2l_scale.preprocess.normalize.percentiles`), and only the
    per-row counts of eligible pixels, the blocks holding the chosen centres, and the patches are computed.

    Parameters
    ----------
    target, pred : array_like
        2-D images (numpy, dask or xarray) of the same shape; the mask comes from ``target``.
    input : array_like, optional
        The network input, sampled at the same positions.
    patch_size : int or (int, int)
        Patch height and width (the paper: 128).
    n : int
        Number of patches.
    threshold, percentile : float
        CSBDeep's ``no_background_patches`` parameters (defaults 0.4 and 99.9).
    seed : int, optional
        Seed of the legacy ``numpy.random.RandomState`` that CSBDeep's sampling draws from.

    Returns
    -------
    PatchSet

    Raises
    ------
    InputError
        Shapes differ or no eligible position exists.
    ConfigError
        Bad ``patch_size``, ``n``, ``threshold`` or ``percentile``.
    """
    names = ("target", "prediction", "input")
    arrays = [_unwrap(a, nm) for a, nm in zip((target, pred, input), names) if a is not None]
    for a, nm in zip(arrays, names):
        if a.ndim != 2:
            raise InputError(f"{nm} has shape {tuple(a.shape)}; foreground_patches needs 2-D images")
        if tuple(a.shape) != tuple(arrays[0].shape):
            raise InputError(f"{nm} shape {tuple(a.shape)} differs from target shape {tuple(arrays[0].shape)}; "
                             "pass images of the same size")
    ps = (int(patch_size), int(patch_size)) if np.isscalar(patch_size) else tuple(int(v) for v in patch_size)
    shape = tuple(arrays[0].shape)
    if len(ps) != 2 or not all(0 < s <= d for s, d in zip(ps, shape)):
        raise ConfigError(f"patch_size={patch_size!r} must be positive and fit the image {shape[0]}x{shape[1]}")
    if int(n) < 1:
        raise ConfigError(f"n={n!r} must be at least 1")
    if not (0 <= threshold <= 1 and 0 <= percentile <= 100):
        raise ConfigError(f"threshold={threshold} must be in [0, 1] and percentile={percentile} in [0, 100] "
                          "(CSBDeep defaults: 0.4, 99.9)")

    t = arrays[0]
    if isinstance(t, da.Array):
        from l2l_scale.preprocess.normalize import percentiles

        t32 = t.astype(np.float32)
        pct = np.float32(percentiles(t32, [percentile], channel_axis=None)[0])
    else:
        t32 = np.asarray(t, dtype=np.float32)
        pct = np.percentile(t32, percentile)
        t32 = da.from_array(t32, chunks=t32.shape)
    # CSBDeep compares in float32 (a Python float times a float32 scalar stays float32 under NEP 50).
    level = np.float32(threshold) * np.float32(pct)
    from dask_image.ndfilters import maximum_filter

    size = tuple(p // 2 if p > 1 else p for p in ps)
    mask = maximum_filter(t32, size=size, mode="constant") > level
    # Centres lie in [p // 2, d - p + p // 2]: row index in `valid` == the patch's top-left corner.
    valid = mask[ps[0] // 2: shape[0] - ps[0] + ps[0] // 2 + 1, ps[1] // 2: shape[1] - ps[1] + ps[1] // 2 + 1]
    nbx = valid.numblocks[1]
    counts = valid.map_blocks(_row_counts_block, chunks=(valid.chunks[0], (1,) * nbx), dtype=np.int64).compute()
    per_row = counts.sum(axis=1)
    total = int(per_row.sum())
    if total == 0:
        raise InputError(f"no non-background patch position: no target pixel exceeds {threshold} x its "
                         f"{percentile}th percentile; lower threshold or check the target channel")

    # CSBDeep's csbdeep.utils.choice: seed Python's `random` from the numpy RNG, then choices/sample.
    rs = np.random.RandomState(seed)
    py_rng = random.Random(int(rs.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32)))
    k = int(n)
    picks = py_rng.choices(range(total), k=k) if total < k else py_rng.sample(range(total), k=k)

    # Rank (row-major over eligible pixels, as np.where orders them) -> (row, block column, rank in block row).
    row_end = np.cumsum(per_row)
    col_edges = np.concatenate([[0], np.cumsum(valid.chunks[1])])
    row_edges = np.concatenate([[0], np.cumsum(valid.chunks[0])])
    wanted: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for j, rank in enumerate(picks):
        row = int(np.searchsorted(row_end, rank, side="right"))
        k_row = rank - (row_end[row] - per_row[row])
        block_end = np.cumsum(counts[row])
        bj = int(np.searchsorted(block_end, k_row, side="right"))
        k_block = int(k_row - (block_end[bj] - counts[row, bj]))
        bi = int(np.searchsorted(row_edges, row, side="right") - 1)
        wanted.setdefault((bi, bj), []).append((j, row, k_block))
    keys = list(wanted)
    blocks = dask.compute(*[valid.blocks[bi, bj] for bi, bj in keys])
    corners = np.zeros((k, 2), dtype=np.int64)
    for (bi, bj), block in zip(keys, blocks):
        for j, row, k_block in wanted[(bi, bj)]:
            col = np.flatnonzero(block[row - row_edges[bi]])[k_block]
            corners[j] = (row, col_edges[bj] + col)

    cut_all = cut_patches(arrays, corners, ps)
    return PatchSet(cut_all[0], cut_all[1], cut_all[2] if input is not None else None, corners)


def cut_patches(arrays: Sequence[Any], corners: np.ndarray, size: int | tuple[int, int]) -> list[np.ndarray]:
    """The patches at ``corners`` of every array, in one compute.

    Parameters
    ----------
    arrays : sequence of array_like
        2-D numpy or dask images of one shape.
    corners : numpy.ndarray
        ``[N, 2]`` (row, column) of each patch's top-left pixel, e.g. :attr:`PatchSet.corners`.
    size : int or (int, int)
        Patch height and width.

    Returns
    -------
    list of numpy.ndarray
        One ``[N, H, W]`` stack per array.
    """
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    # One compute for all patches of all images: chunks shared by several patches are read once. (da.stack
    # would first unify the patches' differing chunk grids, which explodes the graph.)
    pieces = list(dask.compute(*[a[r:r + h, c:c + w] for a in arrays for r, c in corners]))
    k = len(corners)
    return [np.stack(pieces[i * k:(i + 1) * k]) for i in range(len(arrays))]

