"""Sampling the patches of one image: foreground positions on a coarse grid, zoom and rotation, normalisation.

What a patch is
---------------
Each image (an image, a plate field, a folder entry) is one *pair*: its input channel(s) and target channel(s).
Patches are sampled at random positions from non-background areas, with CSBDeep's
``no_background_patches(threshold=0.4, percentile=99.9)`` rule: a position is eligible if the maximum of the
target over a window of half the patch size around it exceeds ``threshold`` x the ``percentile``-th percentile
of the whole target image. Several targets (``foreground``): ``"csbdeep"``, CSBDeep's own rule for a (C, Y, X)
target, where the middle channel decides against the percentile of all target channels pooled (see
:func:`l2l_scale.patches._deciding_targets`), or ``"any"``, where each channel counts against its own.

With ``augment`` half of the patches per image are raw and half come from augmented images, as in the paper:
the image is zoomed by each factor of ``zooms`` (an equal share of the augmented patches each) and each zoomed
image is rotated by a random multiple of 90 degrees. A patch is sampled from the augmented image without building
it: the source region of side ``size = round(patch_size / zoom)`` is read from zarr and

    patch = np.rot90(scipy.ndimage.zoom(region, patch_size / size, order=1, mode="nearest", grid_mode=True), k)

(bilinear; ``grid_mode=True`` makes the effective zoom exactly ``patch_size / size``). The eligibility window is
measured in augmented pixels, i.e. ``(patch_size // 2) / zoom`` source pixels. With ``poisson`` every region is
replaced by Poisson samples of its raw intensities first (the paper's near-binary STED caveolae data), from a
generator seeded by (seed, image key, patch index). Input and target are normalised with each image's exact
percentiles (:mod:`l2l_scale.preprocess.normalize`): ``(v - lo) / (hi - lo + 1e-20)`` in float32, unclipped,
CSBDeep's ``normalize_mi_ma``.

Dask-friendly sampling
----------------------
One task per image reads the target channel(s) once, chunk by chunk, and keeps only their ``f`` x ``f`` block
maxima (``f`` a power of two <= a quarter of the smallest eligibility window), so the max filter and the
threshold are evaluated on a coarse grid that is ``f**2`` times smaller than the image. Positions are drawn
uniformly among eligible coarse cells plus a uniform offset inside the cell: the same rule as CSBDeep up to
``f`` pixels at the window border. Then every patch region (with its zoom margin) is read from zarr through a
small cache of decoded chunks, in chunk order, and written to a per-image staging file (:func:`_image_task`),
which :mod:`l2l_scale.patch_store` gathers into the store. Memory per task is bounded by a few chunks, never by
the image size.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from l2l_scale.io.atomic import write_json

_CACHE_BYTES = 256 << 20
_EPS = np.float32(1e-20)
# CSBDeep's sample_percentiles(pmin=(1, 3), pmax=(99.5, 99.9)). Each image's percentiles are computed exactly at
# 41 levels per range (one histogram pass) and interpolated linearly in between for every drawn level: exact
# per-patch percentiles would need the image's sorted values in every task.
SAMPLED_LOW, SAMPLED_HIGH = (1.0, 3.0), (99.5, 99.9)
_GRID_LOW = tuple(float(v) for v in np.linspace(*SAMPLED_LOW, 41))
_GRID_HIGH = tuple(float(v) for v in np.linspace(*SAMPLED_HIGH, 41))


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _image_rng(seed: int, key: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _key_seed(key), *extra])


# ------------------------------------------------------------------------------------------- reading regions


def _selection(dims: Sequence[str], plane: dict, channels: Any, ysl: slice, xsl: slice) -> tuple:
    return tuple(ysl if d == "y" else xsl if d == "x" else channels if d == "c" else plane.get(d, 0) for d in dims)


class _RegionReader:
    """Read (channels, y, x) regions of one zarr image plane through an LRU cache of decoded chunk tiles.

    Patches are read in chunk order, so neighbouring patches reuse the same decoded chunks instead of decoding
    them once per patch. The cache is bounded in bytes.
    """

    def __init__(self, arr: zarr.Array, dims: Sequence[str], plane: dict, channels: Sequence[int],
                 cache_bytes: int = _CACHE_BYTES):
        self.arr, self.dims, self.plane = arr, tuple(dims), dict(plane)
        self.channels = [int(c) for c in channels]
        self.H, self.W = arr.shape[self.dims.index("y")], arr.shape[self.dims.index("x")]
        self.cy, self.cx = arr.chunks[self.dims.index("y")], arr.chunks[self.dims.index("x")]
        tile_bytes = len(self.channels) * self.cy * self.cx * arr.dtype.itemsize
        self.capacity = max(4, int(cache_bytes // max(tile_bytes, 1)))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def read_direct(self, channels: Sequence[int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read a region without the cache, as (channels, y, x)."""
        sel = _selection(self.dims, self.plane, list(channels), slice(y0, y1), slice(x0, x1))
        out = self.arr.get_orthogonal_selection(sel)
        return self._to_cyx(out, keep_c=True)

    def _to_cyx(self, block: np.ndarray, keep_c: bool) -> np.ndarray:
        # Drop the integer-indexed (t/z) axes: the remaining order follows dims among c, y, x.
        rest = [d for d in self.dims if d in ("c", "y", "x")]
        block = np.asarray(block)
        return np.moveaxis(block, [rest.index("c"), rest.index("y"), rest.index("x")], [0, 1, 2])

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        tile = self._cache.get(key)
        if tile is None:
            y0, x0 = ty * self.cy, tx * self.cx
            tile = self.read_direct(self.channels, y0, min(y0 + self.cy, self.H), x0, min(x0 + self.cx, self.W))
            self._cache[key] = tile
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return tile

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The region ``[y0, y1) x [x0, x1)`` of all reader channels, as (channels, y, x)."""
        out = np.empty((len(self.channels), y1 - y0, x1 - x0), dtype=self.arr.dtype)
        for ty in range(y0 // self.cy, (y1 - 1) // self.cy + 1):
            for tx in range(x0 // self.cx, (x1 - 1) // self.cx + 1):
                tile = self._tile(ty, tx)
                ty0, tx0 = ty * self.cy, tx * self.cx
                a0, a1 = max(y0, ty0), min(y1, ty0 + tile.shape[1])
                b0, b1 = max(x0, tx0), min(x1, tx0 + tile.shape[2])
                out[:, a0 - y0:a1 - y0, b0 - x0:b1 - x0] = tile[:, a0 - ty0:a1 - ty0, b0 - tx0:b1 - tx0]
        return out


# ------------------------------------------------------------------------------------------------- sampling


def _coarse_factor(windows: Sequence[float]) -> int:
    """Largest power of two <= a quarter of the smallest eligibility window (at most 16)."""
    f = 1
    while f * 2 <= min(16.0, min(windows) / 4.0):
        f *= 2
    return f


def _coarse_max(reader: _RegionReader, channels: Sequence[int], f: int) -> np.ndarray:
    """Block maxima (``f`` x ``f``) of the given channels over the whole plane, read tile by tile."""
    H, W = reader.H, reader.W
    Hc, Wc = -(-H // f), -(-W // f)
    out = np.empty((len(channels), Hc, Wc), dtype=np.float32)
    ty = f * max(1, round(reader.cy / f))
    tx = f * max(1, round(reader.cx / f))
    for y0 in range(0, H, ty):
        for x0 in range(0, W, tx):
            y1, x1 = min(y0 + ty, H), min(x0 + tx, W)
            block = reader.read_direct(channels, y0, y1, x0, x1).astype(np.float32)
            h, w = -(-(y1 - y0) // f) * f, -(-(x1 - x0) // f) * f
            if (h, w) != block.shape[1:]:
                pad = np.full((block.shape[0], h, w), -np.inf, np.float32)
                pad[:, : y1 - y0, : x1 - x0] = block
                block = pad
            pooled = block.reshape(block.shape[0], h // f, f, w // f, f).max(axis=(2, 4))
            out[:, y0 // f:y0 // f + h // f, x0 // f:x0 // f + w // f] = pooled
    return out


def _eligible(coarse: np.ndarray, thresholds: Sequence[float], window: float, f: int) -> np.ndarray:
    """CSBDeep's rule on the coarse grid: max over the window > threshold (any deciding target channel)."""
    from scipy.ndimage import maximum_filter

    size = max(1, int(round(window / f)))
    mask = np.zeros(coarse.shape[1:], dtype=bool)
    for c, thr in enumerate(thresholds):
        if not np.isfinite(thr):  # a channel that does not decide (CSBDeep's rule for several targets)
            continue
        mask |= maximum_filter(coarse[c], size=size, mode="constant", cval=-np.inf) > thr
    return mask


def _plan_kinds(cfg: dict) -> list[dict]:
    """The patch kinds of one image: raw, then one per zoom factor, with their counts."""
    n = cfg["patches_per_image"]
    n_aug = n // 2 if cfg["augment"] else 0
    kinds = [{"zoom": 1.0, "n": n - n_aug, "augmented": False}]
    if n_aug:
        zooms = cfg["zooms"]
        for j, z in enumerate(zooms):
            kinds.append({"zoom": float(z), "n": n_aug // len(zooms) + (1 if j < n_aug % len(zooms) else 0),
                          "augmented": True})
    return kinds


def _region_size(patch: int, zoom: float) -> int:
    return max(1, int(round(patch / zoom)))


def _sample(job: dict, reader: _RegionReader) -> tuple[np.ndarray, str | None]:
    """Plan the patches of one image: rows (y, x, size, zoom, rotation, augmented) or a reason for none."""
    cfg, p = job["config"], job["config"]["patch_size"]
    rng = _image_rng(cfg["seed"], job["key"])
    kinds = _plan_kinds(cfg)
    rotations = [int(rng.integers(4)) if (k["augmented"] and cfg["rotate"]) else 0 for k in kinds]
    windows = [(p // 2) / k["zoom"] for k in kinds]
    f = _coarse_factor(windows)
    coarse = _coarse_max(reader, job["target_idx"], f)
    Hc, Wc = coarse.shape[1:]
    H, W = reader.H, reader.W
    masks = [_eligible(coarse, job["thresholds"], w, f) for w in windows]
    union = np.logical_or.reduce(masks)
    cyy, cxx = np.arange(Hc) * f, np.arange(Wc) * f

    def inside(s: int) -> np.ndarray:
        """Coarse cells holding a valid centre: the source region of side ``s`` lies inside the image."""
        rminy, rmaxy, rminx, rmaxx = s // 2, H - s + s // 2, s // 2, W - s + s // 2
        return ((cyy + f - 1 >= rminy) & (cyy <= rmaxy))[:, None] & ((cxx + f - 1 >= rminx) & (cxx <= rmaxx))[None, :]

    if not (masks[0] & inside(p)).any():
        return np.zeros((0, 6)), f"no foreground: no position where {job['rule']}"
    rows = []
    for kind, rot, mask in zip(kinds, rotations, masks):
        if kind["n"] == 0:
            continue
        s = _region_size(p, kind["zoom"])
        rminy, rmaxy, rminx, rmaxx = s // 2, H - s + s // 2, s // 2, W - s + s // 2
        okay = inside(s)
        cand = np.flatnonzero(mask & okay)
        if cand.size == 0:  # a zoomed window without foreground inside its margin: use any eligible window
            cand = np.flatnonzero(union & okay)
        if cand.size == 0:
            cand = np.flatnonzero(okay)
        idx = rng.choice(cand.size, size=kind["n"], replace=cand.size < kind["n"])
        off = rng.integers(0, f, size=(kind["n"], 2))
        cy, cx = np.divmod(cand[idx], Wc)
        ry = np.clip(cy * f + off[:, 0], rminy, rmaxy)
        rx = np.clip(cx * f + off[:, 1], rminx, rmaxx)
        for y, x in zip(ry, rx):
            rows.append((int(y) - s // 2, int(x) - s // 2, s, kind["zoom"], rot, kind["augmented"]))
    return np.array(rows, dtype=np.float64).reshape(-1, 6), None


def _augment(region: np.ndarray, patch: int, rotation: int) -> np.ndarray:
    """Zoom a (C, s, s) float32 region to (C, patch, patch) and rotate it by ``rotation`` quarter turns."""
    from scipy import ndimage

    s = region.shape[-1]
    if s != patch:
        region = np.stack([ndimage.zoom(ch, patch / s, order=1, mode="nearest", grid_mode=True) for ch in region])
    if rotation:
        region = np.rot90(region, rotation, axes=(1, 2))
    return region


def _image_task(job: dict) -> int:
    """Sample, read, augment, normalise and stage the patches of one image (one Dask task)."""
    from numpy.lib.format import open_memmap

    cfg, p = job["config"], job["config"]["patch_size"]
    arr = zarr.open_array(store=job["store"], path=job["array"], mode="r")
    reader = _RegionReader(arr, job["dims"], job["plane"], job["input_idx"] + job["target_idx"])
    plan, reason = _sample(job, reader)
    stage = Path(job["stage"])
    n = len(plan)
    if n:
        n_in = len(job["input_idx"])
        lo = np.asarray(job["lo"], np.float32)[:, None, None]
        hi = np.asarray(job["hi"], np.float32)[:, None, None]
        X = open_memmap(stage.with_suffix(".X.npy"), mode="w+", dtype=np.float32, shape=(n, p, p, n_in))
        Y = open_memmap(stage.with_suffix(".Y.npy"), mode="w+", dtype=np.float32,
                        shape=(n, p, p, len(job["target_idx"])))
        # Chunk order: neighbouring patches share decoded chunks in the reader's cache.
        order = np.lexsort((plan[:, 1] // reader.cx, plan[:, 0] // reader.cy))
        for j in order:
            y, x, s, rot = int(plan[j, 0]), int(plan[j, 1]), int(plan[j, 2]), int(plan[j, 4])
            region = reader.read(y, y + s, x, x + s).astype(np.float32)
            if cfg["poisson"]:
                region = _image_rng(cfg["seed"], job["key"], 1, int(j)).poisson(np.maximum(region, 0)).astype(
                    np.float32)
            region = _augment(region, p, rot)
            if job.get("grid"):
                lo, hi = _drawn_levels(job, int(j))
            region = (region - lo) / (hi - lo + _EPS)
            X[j] = np.moveaxis(region[:n_in], 0, -1)
            Y[j] = np.moveaxis(region[n_in:], 0, -1)
        X.flush()
        Y.flush()
        del X, Y
    # The table is the completion marker: it is written (atomically) only after the staged arrays.
    write_json(stage.with_suffix(".json"), {"n": n, "rows": plan.tolist(), "reason": reason}, indent=None)
    return n


def _drawn_levels(job: dict, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch ``j``'s per-channel (lo, hi) at percentiles drawn as CSBDeep's ``sample_percentiles``.

    One draw per patch for all its channels (CSBDeep's ``norm_percentiles`` uses one (pmin, pmax) for x and y),
    from a generator seeded by (seed, image key, patch index), so reruns are bit-identical.
    """
    g = job["grid"]
    rng = _image_rng(job["config"]["seed"], job["key"], 2, j)
    ql, qh = rng.uniform(*SAMPLED_LOW), rng.uniform(*SAMPLED_HIGH)
    lo = np.array([np.interp(ql, _GRID_LOW, v) for v in g["low"]], np.float32)[:, None, None]
    hi = np.array([np.interp(qh, _GRID_HIGH, v) for v in g["high"]], np.float32)[:, None, None]
    return lo, hi
