"""Distributed patch sampling and augmentation: OME-Zarr image pairs -> a zarr patch store for training.

``l2l-scale patches DATASET OUTPUT`` follows CSBDeep's ``create_patches`` (what the paper used) but runs as Dask
tasks that never load an input image whole.

What a patch is
---------------
Each image (an image, a plate field, a folder entry) is one *pair*: its input channel(s) and target channel(s).
Patches are sampled at random positions from non-background areas, with CSBDeep's
``no_background_patches(threshold=0.4, percentile=99.9)`` rule: a position is eligible if the maximum of the
target over a window of half the patch size around it exceeds ``threshold`` x the ``percentile``-th percentile
of the whole target image (several targets: any of them).

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
small cache of decoded chunks, in chunk order, and written to a per-image staging file. A second set of tasks
(one per output chunk) gathers the staged patches into the store in a shuffled order. Memory per task is bounded
by a few chunks, never by the image size.

Validation split
----------------
``split_by="pair"`` (default) puts whole images on one side: no image contributes to both training and
validation (the paper's cross-validation by image pair). ``split_by="patch"`` is CSBDeep's 90/10 split: all
patches are shuffled and the last ``validation_fraction`` are validation.

The patch store
---------------
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

Resumable and deterministic
---------------------------
Everything random derives from ``seed`` and the image key, so a rerun gives bit-identical arrays. The store is
written into ``OUTPUT.partial`` and renamed when complete; completion records (each image's staged table, and one
journal line per patch chunk, :mod:`l2l_scale.io.journal`) let ``resume=True`` finish only the unfinished tasks.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from l2l_scale.config import PatchConfig, patch_config
from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.io import journal
from l2l_scale.io.output import PROGRESS_DIR, atomic_output, check_output, check_run, partial_path
from l2l_scale.io.prov import provenance
from l2l_scale.io.read import list_images, open_image, select_channels
from l2l_scale.io.atomic import say as _say, write_json
from l2l_scale.io.blockwrite import RECORDS

__all__ = ["FORMAT_VERSION", "PatchStore", "create_patches", "open_patches", "read_table"]

FORMAT_VERSION = 1
ATTRS_KEY = "l2l_scale_patches"
TABLE_COLUMNS = ("image", "y", "x", "size", "zoom", "rotation", "augmented", "split", "local")
_TABLE_DTYPES = {"image": "int32", "y": "int32", "x": "int32", "size": "int32", "zoom": "float32",
                 "rotation": "int8", "augmented": "bool", "split": "uint8", "local": "int32"}
_TARGET_CHUNK_BYTES = 16 << 20
_CACHE_BYTES = 256 << 20
_EPS = np.float32(1e-20)
_SPLIT_SEED = 0x5011
_ORDER_SEED = 0x5012
# CSBDeep's sample_percentiles(pmin=(1, 3), pmax=(99.5, 99.9)). Each image's percentiles are computed exactly at
# 41 levels per range (one histogram pass) and interpolated linearly in between for every drawn level: exact
# per-patch percentiles would need the image's sorted values in every task.
SAMPLED_LOW, SAMPLED_HIGH = (1.0, 3.0), (99.5, 99.9)
_GRID_LOW = tuple(float(v) for v in np.linspace(*SAMPLED_LOW, 41))
_GRID_HIGH = tuple(float(v) for v in np.linspace(*SAMPLED_HIGH, 41))


def _codec() -> BloscCodec:
    # lz4 with byte shuffle: float noise barely compresses, and the training input pipeline must decode fast.
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)


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
    """CSBDeep's rule on the coarse grid: max over the window > threshold (any target channel)."""
    from scipy.ndimage import maximum_filter

    size = max(1, int(round(window / f)))
    mask = np.zeros(coarse.shape[1:], dtype=bool)
    for c, thr in enumerate(thresholds):
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
        return np.zeros((0, 6)), (f"no foreground: no position where the target exceeds {cfg['threshold']:g} x its "
                                   f"{cfg['filter_percentile']:g}th percentile")
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


def _percentile_grid(images: list, progress: Path) -> dict:
    """Each image's exact percentiles of its input and target channels at the sampling grid (cached for resume)."""
    from l2l_scale.preprocess.normalize import percentiles

    cached = progress / "percentile_grid.json"
    if cached.exists():
        return json.loads(cached.read_text())
    grid = {}
    for im in images:
        data = select_channels(open_image(im.path), im.input_names + im.target_names)
        plane = data.isel({d: 0 for d in ("t", "z") if d in data.dims})
        v = percentiles(plane, list(_GRID_LOW + _GRID_HIGH), channel_axis="c")
        grid[im.key] = {"low": v[:, :len(_GRID_LOW)].tolist(), "high": v[:, len(_GRID_LOW):].tolist()}
    write_json(cached, grid, indent=None)
    return grid


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


# ----------------------------------------------------------------------------------------------- the driver


@dataclass
class _Image:
    index: int
    key: str
    path: Path
    array: str
    dims: tuple[str, ...]
    plane: dict
    shape: tuple[int, int]
    input_idx: list[int]
    target_idx: list[int]
    input_names: list[str]
    target_names: list[str]


def _inspect(refs: list, cfg: PatchConfig) -> list[_Image]:
    """Open every image lazily, resolve channels and check shapes before any work starts."""
    images = []
    for i, ref in enumerate(refs):
        img = open_image(ref.path)
        label = ref.key or str(ref.path)
        if not {"y", "x"} <= set(img.dims):
            raise InputError(f"{ref.path}: image has no y/x axes; l2l-scale samples 2D patches")
        for d in ("t", "z"):
            if d in img.dims and img.sizes[d] != 1:
                raise InputError(f"{ref.path}: image has {img.sizes[d]} {d}-planes; patches are sampled from 2D "
                                 f"images, split the {d} axis into separate images first")
        if "c" not in img.dims:
            raise ChannelError(f"{ref.path}: image has no channel axis; a training pair needs input and target "
                               "channels in one image")
        names = [str(c) for c in img.coords["c"].values]
        ins = [str(c) for c in select_channels(img, cfg.input_channels).coords["c"].values]
        tgs = [str(c) for c in select_channels(img, cfg.target_channels).coords["c"].values]
        if set(ins) & set(tgs):
            raise ChannelError(f"image {label!r}: channel(s) {sorted(set(ins) & set(tgs))} are both input and "
                               "target; choose different --input-channel and --target-channel")
        H, W = img.sizes["y"], img.sizes["x"]
        need = max([cfg.patch_size] + ([_region_size(cfg.patch_size, z) for z in cfg.zooms] if cfg.augment else []))
        if min(H, W) < need:
            what = "the patch size" if need == cfg.patch_size else "the zoomed source region of the smallest zoom"
            raise InputError(f"image {label!r} is {H}x{W} px, smaller than {what} ({need} px); use a smaller "
                             "--patch-size" + ("" if need == cfg.patch_size else " or larger --zooms"))
        plane = {d: 0 for d in ("t", "z") if d in img.dims}
        images.append(_Image(i, ref.key, Path(ref.path), img.attrs["array"], tuple(img.dims), plane, (H, W),
                             [names.index(c) for c in ins], [names.index(c) for c in tgs], ins, tgs))
    return images


def _chunk_patches(cfg: PatchConfig, n_channels: int) -> int:
    if cfg.chunk_patches:
        return int(cfg.chunk_patches)
    per = cfg.patch_size**2 * n_channels * 4
    return int(min(512, max(32, round(_TARGET_CHUNK_BYTES / per))))


def _norm_stats(dataset: Path, cfg: PatchConfig, channels: list[str], progress: Path) -> dict:
    from l2l_scale.preprocess.normalize import dataset_stats, load_stats

    cached = progress / "stats.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if cfg.norm_stats:
        stats = load_stats(cfg.norm_stats)
    else:
        stats = dataset_stats(dataset, q=cfg.percentiles, scope=cfg.norm_scope, channels=channels, progress=True)
    write_json(cached, stats, indent=None)
    return stats


def _filter_levels(dataset: Path, cfg: PatchConfig, stats: dict, targets: list[str], progress: Path) -> dict:
    """The ``filter_percentile``-th percentile of every target channel of every image (the threshold base)."""
    from l2l_scale.preprocess.normalize import dataset_stats

    cached = progress / "filter.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if stats.get("scope") == "image" and float(stats["percentiles"][1]) == cfg.filter_percentile and all(
            t in entry for entry in stats["images"].values() for t in targets):
        levels = {k: {t: float(v[t]["hi"]) for t in targets} for k, v in stats["images"].items()}
    else:
        fs = dataset_stats(dataset, q=(0.0, cfg.filter_percentile), scope="image", channels=targets, progress=True)
        levels = {k: {t: float(v[t]["hi"]) for t in targets} for k, v in fs["images"].items()}
    write_json(cached, levels, indent=None)
    return levels


def _split_images(images: list[_Image], cfg: PatchConfig) -> set[int]:
    """Indices of the validation images for ``split_by='pair'``."""
    n = len(images)
    if cfg.split_by != "pair" or cfg.validation_fraction == 0:
        return set()
    if n < 2:
        raise ConfigError("a validation split by image pair needs at least 2 images but the dataset has 1; use "
                          "--split-by patch or --validation-fraction 0")
    n_val = min(n - 1, max(1, int(round(cfg.validation_fraction * n))))
    rng = np.random.default_rng([cfg.seed, _SPLIT_SEED])
    return {int(i) for i in rng.choice(n, size=n_val, replace=False)}


def _layout(images: list[_Image], counts: list[int], val_images: set[int], cfg: PatchConfig):
    """Global row order: shuffled training rows, then shuffled validation rows, as (image, local) arrays."""
    img = np.concatenate([np.full(c, i, np.int64) for i, c in enumerate(counts)] or [np.zeros(0, np.int64)])
    loc = np.concatenate([np.arange(c) for c in counts] or [np.zeros(0, np.int64)])
    rng = np.random.default_rng([cfg.seed, _ORDER_SEED])
    if cfg.split_by == "pair":
        is_val = np.isin(img, sorted(val_images))
        train_rows = np.flatnonzero(~is_val)
        val_rows = np.flatnonzero(is_val)
        train_rows = train_rows[rng.permutation(train_rows.size)]
        val_rows = val_rows[rng.permutation(val_rows.size)]
    else:  # CSBDeep: shuffle everything, the last fraction is validation
        perm = rng.permutation(img.size)
        n_val = int(round(cfg.validation_fraction * img.size))
        if cfg.validation_fraction > 0 and img.size > 1:
            n_val = min(max(n_val, 1), img.size - 1)
        train_rows, val_rows = perm[: img.size - n_val], perm[img.size - n_val:]
    order = np.concatenate([train_rows, val_rows])
    return img[order], loc[order], int(train_rows.size)


def create_patches(dataset: str | Path, output: str | Path, config: PatchConfig | None = None, *,
                   overwrite: bool = False, resume: bool = False, **values: Any) -> Path:
    """Sample normalised (and augmented) training patches from a dataset into a zarr patch store.

    Parameters
    ----------
    dataset : path
        OME-Zarr image, HCS plate or folder of images; each image is one input/target pair.
    output : path
        The patch store (a zarr v3 group, usually ``*.zarr``), written via ``OUTPUT.partial``.
    config : PatchConfig, optional
        All settings; or pass them as keyword arguments (``preset=``, ``mode=``, ``input_channels=``,
        ``target_channels=``, ``patch_size=``, ``patches_per_image=``, ``augment=``, ...), see
        :func:`l2l_scale.config.patch_config`.
    overwrite, resume : bool
        Replace an existing store / finish an interrupted run (only unfinished tasks are computed; the result is
        bit-identical to an uninterrupted run).

    Returns
    -------
    Path
        The patch store.

    Raises
    ------
    ChannelError
        Unknown channels, or channel counts that do not fit the mode.
    InputError
        Images that are not 2D, too small for the patch size, or no foreground anywhere.
    OutputError, ConfigError
        Existing output, overlapping input/output, changed options on resume, invalid settings.
    """
    from dask import delayed

    from l2l_scale.cluster import compute_with_progress
    from l2l_scale.preprocess.normalize import stats_for

    cfg = config if config is not None else patch_config(**values)
    if config is not None and values:
        raise ConfigError("pass either a PatchConfig or keyword settings, not both")
    dataset, output = Path(dataset), Path(output)
    refs = list_images(dataset)
    check_output(output, overwrite=overwrite, inputs=[dataset])
    images = _inspect(refs, cfg)
    in_names, tg_names = images[0].input_names, images[0].target_names
    for im in images[1:]:
        if (len(im.input_names), len(im.target_names)) != (len(in_names), len(tg_names)):
            raise ChannelError(f"image {im.key!r} resolves to channels {im.input_names} -> {im.target_names} but "
                               f"image {images[0].key!r} to {in_names} -> {tg_names}; select channels by name")
    all_names = sorted({n for im in images for n in im.input_names + im.target_names})
    p = cfg.patch_size
    chunk = _chunk_patches(cfg, max(len(in_names), len(tg_names)))
    val_images = _split_images(images, cfg)

    with atomic_output(output, overwrite=overwrite, resume=resume, inputs=[dataset]) as tmp:
        root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
        progress = tmp / PROGRESS_DIR
        stage_dir = progress / "staging"
        run = {"dataset": str(dataset.resolve()), "images": [im.key or str(im.path) for im in images],
               "config": cfg.model_dump(mode="json"), "format": FORMAT_VERSION, "chunk_patches": chunk}
        check_run(progress, run, output, resume)
        stage_dir.mkdir(parents=True, exist_ok=True)
        stats = _norm_stats(dataset, cfg, all_names, progress)
        levels = _filter_levels(dataset, cfg, stats, sorted({n for im in images for n in im.target_names}), progress)
        grid = _percentile_grid(images, progress) if cfg.sample_percentiles else {}
        cfg_d = cfg.model_dump(mode="json")

        # Phase 1: one task per image samples, augments, normalises and stages its patches.
        norm_values: dict[str, dict[str, list[float]]] = {}
        tasks = []
        for im in images:
            chans = im.input_names + im.target_names
            lohi = [stats_for(stats, im.key, c) for c in chans]
            norm_values[im.key] = {c: [lo, hi] for c, (lo, hi) in zip(chans, lohi)}
            if (stage_dir / f"{im.index}.json").exists():
                continue
            per_image = levels.get(im.key) or {}
            thresholds = [cfg.threshold * float(per_image[t]) for t in im.target_names]
            job = {"key": im.key, "store": str(im.path), "array": im.array, "dims": im.dims, "plane": im.plane,
                   "input_idx": im.input_idx, "target_idx": im.target_idx, "lo": [v[0] for v in lohi],
                   "hi": [v[1] for v in lohi], "grid": grid.get(im.key), "thresholds": thresholds, "config": cfg_d,
                   "stage": str(stage_dir / f"{im.index}")}
            tasks.append(delayed(_image_task, pure=False)(job))
        if tasks:
            compute_with_progress(tasks, f"sampling patches ({len(tasks)} images)")
        done = len(images) - len(tasks)
        _say(f"sampled {len(tasks)} of {len(images)} images" + (f" ({done} were already finished)" if done else ""))
        staged = [json.loads((stage_dir / f"{im.index}.json").read_text()) for im in images]
        counts = [int(s["n"]) for s in staged]
        for im, s in zip(images, staged):
            if not s["n"]:
                _say(f"warning: image {im.key or im.path} gives no patches ({s['reason']}); it is skipped")
        if not sum(counts):
            raise InputError(f"{dataset}: no image has foreground to sample patches from (target above "
                             f"{cfg.threshold:g} x its {cfg.filter_percentile:g}th percentile); check the target "
                             "channel or lower --threshold")
        img_rows, loc_rows, n_train = _layout(images, counts, val_images, cfg)
        N = int(img_rows.size)
        if n_train == 0:
            raise InputError(f"{dataset}: every patch went to validation; lower --validation-fraction or add images")
        if N - n_train == 0 and cfg.validation_fraction > 0:
            _say("warning: the validation split is empty (its images have no foreground); training will monitor "
                 "the training loss")

        # Phase 2: one task per output chunk gathers its (shuffled) rows from the staged images.
        shapes = {"X": (N, p, p, len(in_names)), "Y": (N, p, p, len(tg_names))}
        for name, shape in shapes.items():
            if name in root and tuple(root[name].shape) == shape:
                continue
            root.create_array(name, shape=shape, chunks=(chunk,) + shape[1:], dtype="float32",
                              compressors=[_codec()], fill_value=0.0, overwrite=True,
                              dimension_names=["patch", "y", "x", "c"])
        tasks = []
        records = progress / RECORDS
        done = journal.finished(records)
        for t, a in enumerate(range(0, N, chunk)):
            b = min(a + chunk, N)
            if f"chunk:{t}" in done:
                continue
            tasks.append(delayed(_assemble_task, pure=False)({
                "store": str(tmp), "rows": (a, b), "image": img_rows[a:b].tolist(), "local": loc_rows[a:b].tolist(),
                "stage_dir": str(stage_dir), "record": (str(records), f"chunk:{t}")}))
        if tasks:
            compute_with_progress(tasks, f"writing {len(tasks)} patch chunks")
        n_chunks = len(range(0, N, chunk))
        _say(f"wrote {len(tasks)} of {n_chunks} patch chunks" +
             (f" ({n_chunks - len(tasks)} were already finished)" if n_chunks > len(tasks) else ""))

        # The table and the attributes are small and written by the client last.
        plans = [np.asarray(s["rows"], dtype=np.float64).reshape(-1, 6) for s in staged]
        rows = np.stack([plans[i][j] for i, j in zip(img_rows, loc_rows)]) if N else np.zeros((0, 6))
        split = np.zeros(N, np.uint8)
        split[n_train:] = 1
        columns = {"image": img_rows, "y": rows[:, 0], "x": rows[:, 1], "size": rows[:, 2], "zoom": rows[:, 3],
                   "rotation": rows[:, 4], "augmented": rows[:, 5] > 0, "split": split, "local": loc_rows}
        table = root.require_group("table")
        for name in TABLE_COLUMNS:
            data = np.asarray(columns[name]).astype(_TABLE_DTYPES[name])
            table.create_array(name, shape=data.shape, chunks=(max(1, min(N, 1 << 16)),), dtype=data.dtype,
                               compressors=[_codec()], overwrite=True)[...] = data
        image_info = [{"key": im.key, "path": str(im.path), "n_patches": c,
                       "split": "validation" if (cfg.split_by == "pair" and im.index in val_images) else
                       ("training" if cfg.split_by == "pair" else "mixed"),
                       **({"skipped": s["reason"]} if not c else {})}
                      for im, c, s in zip(images, counts, staged)]
        meta = {
            "format": FORMAT_VERSION,
            "mode": cfg.mode,
            "channels": {"input": in_names, "output": tg_names},
            "patch_size": p,
            "n_patches": N,
            "n_train": n_train,
            "n_validation": N - n_train,
            "chunk_patches": chunk,
            "split": {"by": cfg.split_by, "validation_fraction": cfg.validation_fraction,
                      "rows": "training rows [0, n_train), validation rows [n_train, n_patches)"},
            "sampling": {"patches_per_image": cfg.patches_per_image, "threshold": cfg.threshold,
                         "filter_percentile": cfg.filter_percentile, "seed": cfg.seed,
                         "rule": "max over (patch_size // 2) / zoom source px > threshold x percentile(target)"},
            "augment": {"enabled": cfg.augment, "zooms": list(cfg.zooms) if cfg.augment else [],
                        "rotate": cfg.rotate and cfg.augment, "poisson": cfg.poisson,
                        "recipe": "np.rot90(scipy.ndimage.zoom(region, patch_size / size, order=1, mode='nearest', "
                                  "grid_mode=True), rotation)"},
            "normalization": {"percentiles": [float(v) for v in stats["percentiles"]], "scope": stats.get("scope"),
                              "source": cfg.norm_stats or "computed", "values": norm_values,
                              "formula": "(v - lo) / (hi - lo + 1e-20), float32, unclipped",
                              **({"sampled": {"low": list(SAMPLED_LOW), "high": list(SAMPLED_HIGH),
                                              "rule": "per patch, uniform (csbdeep sample_percentiles); lo/hi "
                                                      "interpolated from exact percentiles at 41 levels per range"}}
                                 if cfg.sample_percentiles else {})},
            "images": image_info,
            "preset": cfg.preset,
            "config": cfg_d,
        }
        root.attrs.update({ATTRS_KEY: meta, "l2l_scale": provenance(cfg_d, str(dataset))})
        _say(f"{N} patches ({n_train} training, {N - n_train} validation) of {p}x{p} px from "
             f"{sum(1 for c in counts if c)} image(s)")
    return output


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
