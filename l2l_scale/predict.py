"""Overlapped tiled U-Net inference over OME-Zarr: one dask task per output block, halo cropped, never blended.

How tiled equals whole (invariant 1)
------------------------------------
CSBDeep predicts a whole image by reflect-padding it (split evenly, ``PadAndCropResizer``) to a multiple of the
U-Net grid ``g = 2**depth`` and running the network, whose 'same' convolutions zero-pad at the borders of that
padded image. Every task here computes one output block in those padded coordinates. It reads the block plus a
halo of at least the network's receptive field (computed from the architecture), widened outwards to the grid
so that pooling windows line up with the whole-image pass, and clipped at the padded image's border so the
network sees exactly the same border there. The halo is cropped off. Pixels farther than the receptive field
from a tile border do not depend on anything outside it, so the result equals the whole-image pass up to float
summation order.

What is written
---------------
The network output in normalised units (input percentiles mapped to 0 and 1), not rescaled to the input's
intensity range as ``CARE.predict`` does by default: an L2L output is a different label than its input, so the
input's intensity range has no meaning for it. The percentile values used are stored in the output's
``l2l_scale.normalization`` attributes. ``dtype="uint16"`` stores ``value = stored * scale + offset`` with the
scale and offset in ``l2l_scale.uint16``.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.io import journal
from l2l_scale.io.output import PROGRESS_DIR, atomic_output, check_output, check_run
from l2l_scale.io.prov import provenance
from l2l_scale.io.read import DIM_ORDER, channel_indices, dataset_kind, image_meta, list_images, read_region
from l2l_scale.io.write import (
    LevelPlan,
    create_image_group,
    default_chunks,
    pyramid_shapes,
    reopen_image_group,
    split_field_key,
    write_plate_layout,
)
from l2l_scale.io.blockwrite import finish_block
from l2l_scale.io.chunks import cached_array

DEFAULT_PERCENTILES = (2.0, 99.8)  # csbdeep.data.PercentileNormalizer defaults
DEFAULT_TILE = 1024
DEFAULT_BATCH = 4
MAX_TILE = 8192
UINT16_RANGE = (-0.5, 2.5)  # normalised units covered by --dtype uint16 (step 4.6e-5)
# Tile inputs are widened (beyond the halo) to a multiple of this many pixels per side. Measured on this AMX CPU
# with CSBDeep's default network: at bf16 a 1112^2 input (a 1024 tile plus its 44 px halo) ran at 4.05 MP/s and
# 1120^2 at 4.56 MP/s (1096^2: 3.93, 1088^2: 4.52), so the 1 % more pixels cost 10 % less time; fp32 ran at
# 0.72 MP/s whatever the size, so it is not widened.
_ALIGN = {"bf16": 32, "fp16": 32}
_MODEL_LOCKS: dict[tuple, threading.Lock] = {}  # one lock per loaded model and process; see _model_lock


def _model_lock(key: tuple) -> threading.Lock:
    """The lock that serialises calls of one model in this process.

    ``dict.setdefault`` is one atomic operation, so two worker threads asking for a new key at once get the same
    lock; a ``defaultdict`` lookup is atomic only as long as CPython's GIL happens to make it so.
    """
    return _MODEL_LOCKS.get(key) or _MODEL_LOCKS.setdefault(key, threading.Lock())


@dataclass(frozen=True)
class TilePlan:
    """How an image plane is cut: grid, halo, tile size and tiles per model call (all in pixels)."""

    grid: int
    halo: int
    tile: int
    batch: int

    @classmethod
    def for_model(cls, spec: Any, tile: int | None = None, batch: int | None = None,
                  halo: int | None = None) -> "TilePlan":
        """Derive grid and halo from the architecture and validate the requested tile, batch and halo sizes.

        A requested ``halo`` may only enlarge the derived one: anything below the receptive field would make tiles
        differ from the whole-image result.
        """
        grid = int(spec.grid)
        rf = int(spec.receptive_field)
        if halo is not None and halo < 0:
            raise ConfigError(f"halo {halo} is negative; omit --halo to use the model's receptive field ({rf} px)")
        if halo is not None and halo < rf:
            raise ConfigError(f"halo {halo} is smaller than the model's receptive field ({rf} px), so tiles would "
                              f"differ from the whole image; use --halo {rf} or more, or omit it")
        halo = int(math.ceil(max(rf, halo or 0) / grid) * grid)
        tile = int(tile or DEFAULT_TILE)
        batch = int(batch or DEFAULT_BATCH)
        if tile < grid or tile % grid:
            fix = max(grid, int(round(tile / grid)) * grid)
            raise ConfigError(f"tile {tile} is not a positive multiple of the U-Net grid {grid}; use --tile {fix}")
        if tile > MAX_TILE:
            raise ConfigError(f"tile {tile} is too large (one tile must fit in memory); use --tile {DEFAULT_TILE} "
                              f"or at most {MAX_TILE}")
        if batch < 1:
            raise ConfigError(f"batch {batch} must be at least 1; use --batch 1")
        return cls(grid, halo, tile, batch)


def _pad_split(n: int, grid: int) -> tuple[int, int]:
    """CSBDeep's ``PadAndCropResizer`` padding to a multiple of ``grid``: split evenly, extra at the end."""
    v = (grid - n % grid) % grid
    return v // 2, v - v // 2


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices into a length-``n`` axis for numpy's ``mode='reflect'`` padding (periodic with 2(n-1))."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    j = np.mod(idx, period)
    return np.where(j >= n, period - j, j)


def _spans(p0: int, p1: int, tile: int, halo: int, grid: int, padded: int,
           align: int = 0) -> list[tuple[int, int, int, int]]:
    """Split output range [p0, p1) (padded coords) into tiles; return (out0, out1, in0, in1) per tile.

    ``in0``/``in1`` extend the tile by the halo, outwards to the grid, clipped to the padded image. With
    ``align`` (a multiple of ``grid``) the input is widened further, on both sides where the image allows, to a
    multiple of ``align``: more context than the receptive field leaves the cropped output unchanged.
    """
    out = []
    for o0 in range(p0, p1, tile):
        o1 = min(o0 + tile, p1)
        i0 = max(0, (o0 - halo) // grid * grid)
        i1 = min(padded, -(-(o1 + halo) // grid) * grid)
        if align:
            extra = -(i1 - i0) % align
            left = extra // 2 // grid * grid
            i0, i1 = i0 - left, i1 + extra - left
            if i0 < 0:
                i0, i1 = 0, i1 - i0
            if i1 > padded:
                i0, i1 = max(0, i0 - (i1 - padded)), padded
        out.append((o0, o1, i0, i1))
    return out


def _index(dims: Sequence[str], plane: dict, c: Any, ysl: slice, xsl: slice) -> tuple:
    """Index tuple for one plane (t/z fixed), channel(s) ``c`` and a y/x region of an array with ``dims``."""
    return tuple(ysl if d == "y" else xsl if d == "x" else c if d == "c" else plane[d] for d in dims)


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return os.cpu_count() or 1


def _predict_block(task: dict, plane: dict, region: tuple, record: tuple[str, str] | None) -> int:
    """Read one output block plus halo, normalise, run the model tile by tile, crop, write, record it.

    ``task`` is shared by every block of the image; ``plane`` (t/z indices) and ``region`` pick the block.
    """
    return _predict_blocks(_Blocks([(task, plane, region, record)]), 0)


class _Blocks:
    """The blocks of one task, as one opaque object (dask would otherwise walk every nested tuple)."""

    def __init__(self, items: list, finish: list | None = None):
        self.items = items
        self.finish = finish or []  # finish_block arguments of images finished in this task


def _predict_blocks(blocks: _Blocks, per_call: int) -> int:
    """Predict several blocks (of one or several images) in one task, then write and record each.

    With ``per_call`` > 0 the tiles of all blocks are pooled by shape and every model call gets exactly
    ``per_call`` tiles (padded with zeros): a tile's result then never depends on which other tiles share its
    call, so a resumed run, which groups only the unfinished blocks, is bit-identical to an uninterrupted one.
    Small fields (a plate of 256^2 fields) run several times faster per pixel this way than one call per field.
    """
    from l2l_scale.model import configure_tf_threads, get_cached_model

    configure_tf_threads(_worker_threads())
    prepared = [_prepare_block(*item) for item in blocks.items]
    task0 = blocks.items[0][0]
    model = get_cached_model(task0["model"], task0["weights"], task0["precision"])
    lock = _model_lock((task0["model"], task0["weights"], task0["precision"]))
    by_shape: dict[tuple[int, int], list] = defaultdict(list)
    for blk in prepared:
        for a, b in blk.tiles:
            by_shape[(a[3] - a[2], b[3] - b[2])].append((blk, a, b))
    for group in by_shape.values():
        step = per_call or task0["batch"]
        for k in range(0, len(group), step):
            chunk = group[k:k + step]
            xb = np.stack([blk.x[a[2] - blk.y0:a[3] - blk.y0, b[2] - blk.x0:b[3] - blk.x0] for blk, a, b in chunk])
            if per_call and len(chunk) < per_call:
                xb = np.concatenate([xb, np.zeros((per_call - len(chunk), *xb.shape[1:]), xb.dtype)])
            with lock:  # one model call at a time per process; other threads meanwhile read and write
                yb = model.predict_batch(xb)
            for (blk, a, b), yt in zip(chunk, yb):
                blk.result[a[0] - blk.oy:a[1] - blk.oy, b[0] - blk.ox:b[1] - blk.ox] = \
                    yt[a[0] - a[2]:a[1] - a[2], b[0] - b[2]:b[1] - b[2]]
    written: dict[str, np.ndarray] = {}  # images written whole by this task: their level 0, for finish_block
    for (task, plane, region, record), blk in zip(blocks.items, prepared):
        result = blk.result
        if task["uint16"]:
            scale, offset = task["uint16"]
            result = np.clip(np.rint((result - offset) / scale), 0, 65535).astype(np.uint16)
        oy0, oy1, ox0, ox1 = region
        dst = cached_array(task["dst_store"], "0", "r+")
        value = np.moveaxis(result, -1, 0)
        dst[_index(task["dst_dims"], plane, slice(None), slice(oy0, oy1), slice(ox0, ox1))] = value
        if record is not None:
            journal.record(*record)
        if value.size == math.prod(dst.shape):  # the whole image (its t/z, if any, of size 1)
            written[task["dst_store"]] = value.reshape(dst.shape)
    for args in blocks.finish:  # after every write; a field written here is not read back
        finish_block(*args, top=written.get(args[0]))
    return len(blocks.items)


@dataclass
class _Prepared:
    """One block ready for the model: its normalised input ``x`` (origin ``y0, x0`` in padded coordinates),
    its tiles (``_spans`` pairs) and the result array, whose origin in padded coordinates is ``oy, ox``."""

    x: np.ndarray
    y0: int
    x0: int
    tiles: list
    result: np.ndarray
    oy: int
    ox: int


def _prepare_block(task: dict, plane: dict, region: tuple, record: Any) -> _Prepared:
    """Read and normalise the input of one block (plus halo) and cut it into tiles."""
    src = cached_array(task["src_store"], task["src_path"], "r")
    (H, W), grid = task["hw"], task["grid"]
    pad_y, pad_x = _pad_split(H, grid), _pad_split(W, grid)
    (ay, ax), Hp, Wp = (pad_y[0], pad_x[0]), H + sum(pad_y), W + sum(pad_x)
    oy0, oy1, ox0, ox1 = region
    ty = _spans(oy0 + ay, oy1 + ay, task["tile"], task["halo"], grid, Hp, task["align"])
    tx = _spans(ox0 + ax, ox1 + ax, task["tile"], task["halo"], grid, Wp, task["align"])
    # Read the union of all tiles' inputs once, mapping padded coords back into the image by reflection.
    # (Widened inputs of small tiles can reach past their neighbours', hence min and max.)
    y0, y1 = min(t[2] for t in ty), max(t[3] for t in ty)
    x0, x1 = min(t[2] for t in tx), max(t[3] for t in tx)
    y_idx = _reflect_index(np.arange(y0, y1) - ay, H)
    x_idx = _reflect_index(np.arange(x0, x1) - ax, W)
    ylo, yhi, xlo, xhi = int(y_idx.min()), int(y_idx.max()) + 1, int(x_idx.min()), int(x_idx.max()) + 1
    if hasattr(src, "keep_decoded"):
        cy, cx = (src.chunks[task["src_dims"].index(d)] for d in ("y", "x"))
        if ylo // cy != (yhi - 1) // cy or xlo // cx != (xhi - 1) // cx:  # the halo reaches other blocks' chunks
            # Blocks run about row by row, so the rows of chunks one read touches, plus one, across the image.
            rows = -(-(yhi - ylo) // cy) + 1
            src.keep_decoded(rows * -(-W // cx) * len(task["channels"]) * math.prod(src.chunks) * src.dtype.itemsize)
    raw = np.stack([read_region(src, _index(task["src_dims"], plane, c, slice(ylo, yhi), slice(xlo, xhi)),
                                task["input"]) for c in task["channels"]], axis=-1)
    raw = raw[y_idx - ylo][:, x_idx - xlo]
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise InputError(f"{task['input']}: image contains NaN or Inf; replace them (e.g. with 0) before predicting")
    lo = np.asarray(task["lo"], np.float32)
    hi = np.asarray(task["hi"], np.float32)
    x = (raw.astype(np.float32) - lo) / (hi - lo + np.float32(1e-20))  # csbdeep normalize_mi_ma, float32
    result = np.empty((oy1 - oy0, ox1 - ox0, task["n_out"]), np.float32)
    return _Prepared(x, y0, x0, [(a, b) for a in ty for b in tx], result, oy0 + ay, ox0 + ax)


def _model_info(model_dir: Path, weights: str | None) -> tuple[Any, dict, Path]:
    """Spec, l2l_scale.json metadata and weights file, without importing TensorFlow in the client."""
    from l2l_scale.model import check_model_folder, read_metadata, read_spec

    spec = read_spec(model_dir)
    return spec, read_metadata(model_dir), check_model_folder(model_dir, weights)


def _resolve_channels(channels: Sequence[str] | None, meta: dict, spec: Any) -> list[str]:
    names = list(channels or (meta.get("channels") or {}).get("input") or [])
    if not names:
        raise ChannelError("no input channel given and the model has no l2l_scale.json naming it; "
                           "pass --channel NAME (one per model input channel)")
    if len(names) != spec.n_channel_in:
        raise ChannelError(f"the model takes {spec.n_channel_in} input channel(s) but {len(names)} were selected "
                           f"({','.join(names)}); pass exactly {spec.n_channel_in} name(s) to --channel")
    return names


def _output_names(in_names: Sequence[str], meta: dict, spec: Any) -> list[str]:
    if spec.n_channel_out == len(in_names):
        return [f"{n}-restored" for n in in_names]
    out = list((meta.get("channels") or {}).get("output") or [])
    if len(out) == spec.n_channel_out:
        return [f"{n}-predicted" for n in out]
    return [f"restored-{i}" for i in range(spec.n_channel_out)]


def _norm_values(input_path: Path, refs: list, channels: list[str], q: tuple[float, float], scope: str,
                 norm_stats: str | None) -> dict[str, dict[str, tuple[float, float]]]:
    """{image key: {channel: (lo, hi)}}: read from a stats JSON, or computed exactly over image or dataset."""
    from l2l_scale.preprocess.normalize import dataset_stats, load_stats

    if norm_stats:
        stats = load_stats(norm_stats)
    else:
        stats = dataset_stats(input_path, q=q, scope=scope, channels=channels)
    values: dict[str, dict[str, tuple[float, float]]] = {}
    for ref in refs:
        if stats.get("scope") == "dataset":
            entry = stats.get("dataset") or {}
        else:
            entry = (stats.get("images") or {}).get(ref.key)
            if entry is None:
                raise InputError(f"{norm_stats}: no statistics for image {ref.key or '(the image)'}; "
                                 f"rerun 'l2l-scale stats {input_path}' to make them")
        per = {}
        for ch in channels:
            if ch not in entry:
                raise ChannelError(f"{norm_stats or 'statistics'}: no values for channel {ch!r}; "
                                   f"rerun 'l2l-scale stats' including it")
            lo, hi = float(entry[ch]["lo"]), float(entry[ch]["hi"])
            if not hi > lo:
                raise InputError(f"{ref.path}: channel {ch!r} is constant (percentiles {lo:g} == {hi:g}); "
                                 "check the channel selection or the percentiles")
            per[ch] = (lo, hi)
        values[ref.key] = per
    return values


def _out_group_path(root: Path, ref: Any, kind: str) -> Path:
    if kind == "image":
        return root
    if kind == "folder":
        return root / f"{ref.key}.zarr"
    return root / ref.key


def predict(model: str | Path, input: str | Path, output: str | Path, *, channels: Sequence[str] | None = None,
            tile: int | None = None, batch: int | None = None, dtype: str = "float32",
            percentiles: str | Sequence[float] | None = None, norm_stats: str | None = None,
            norm_scope: str = "image", weights: str | None = None, resume: bool = False, overwrite: bool = False,
            chunks: int | None = None, halo: int | None = None, dry_run: bool = False,
            precision: str = "fp32", command: str | None = None) -> Path | dict:
    """Restore an OME-Zarr image, plate or folder with a CARE/L2L model, tile by tile on the Dask cluster.

    Parameters
    ----------
    model : path
        CSBDeep model folder (``config.json`` + ``weights_best.h5``/``weights_last.h5``, optional
        ``l2l_scale.json``), a bioimage.io package (zip or folder, keras_hdf5 weights of a CARE U-Net) or a
        CSBDeep ``export_TF`` SavedModel zip (see :func:`l2l_scale.model.formats.resolve_model`).
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    input, output : path
        Input dataset (never opened for writing) and output ``.zarr``; a plate gives a plate with the same layout,
        a folder a folder of images.
    channels : sequence of str, optional
        Input channel names, one per model input channel (default: the model's ``l2l_scale.json``).
    tile, batch : int, optional
        Tile side without halo (a multiple of ``2**depth``) and tiles per model call.
    dtype : {"float32", "uint16"}
        Output type; uint16 stores a scale/offset.
    percentiles : "lo,hi" or pair, optional
        Normalisation percentiles (default: the model's, else CSBDeep's 2, 99.8).
    norm_stats : path, optional
        JSON from ``l2l-scale stats`` to take the values from instead of computing them.
    norm_scope : {"image", "dataset"}
        One normalisation per image, or one for the whole plate/folder.
    weights : str, optional
        Weights file in the model folder (default ``weights_best.h5``, else ``weights_last.h5``).
    resume, overwrite : bool
        Finish an interrupted run / replace an existing output.
    chunks : int, optional
        Output chunk side (default: the tile size). Each task computes one chunk.
    halo : int, optional
        Halo in pixels, at least the receptive field (the default, computed from the architecture).
    dry_run : bool
        Validate everything and build the whole task graph, wave by wave, without computing or writing
        anything; return ``{"images", "blocks", "tasks"}`` instead of the output path.
    precision : {"fp32", "bf16", "fp16"}
        Compute precision of the network (see :mod:`l2l_scale.model.backend`); fp32 is exact. Recorded in the
        provenance; ``resume`` refuses a different one. bf16/fp16 are refused on CPUs without instructions for
        them (unless the cluster's workers have GPUs).

    Returns
    -------
    Path or dict
        The output path (a dict with ``dry_run``).
    """
    from l2l_scale.cluster import current_client, worker_resources
    from l2l_scale.model import check_backend, check_precision, sha256_file
    from l2l_scale.preprocess.normalize import parse_percentiles

    from l2l_scale.model.formats import resolve_model

    model_dir, input_path, output = resolve_model(model), Path(input), Path(output)  # packages -> a model folder
    if dtype not in ("float32", "uint16"):
        raise ConfigError(f"dtype {dtype!r} is not supported; use float32 or uint16")
    if norm_scope not in ("image", "dataset"):
        raise ConfigError(f"norm scope {norm_scope!r} is not supported; use image or dataset")
    check_backend()
    spec, meta, weights_file = _model_info(model_dir, weights)
    client = current_client()
    resources = {"GPU": 1} if worker_resources(client).get("GPU") else None
    check_precision(precision, accelerator=resources is not None)
    plan = TilePlan.for_model(spec, tile, batch, halo)
    align = math.lcm(plan.grid, _ALIGN[precision]) if precision in _ALIGN else 0
    chunk = int(chunks or plan.tile)
    if chunk < 16:
        raise ConfigError(f"chunk {chunk} is too small; use --chunks 256 or more")
    in_names = _resolve_channels(channels, meta, spec)
    out_names = _output_names(in_names, meta, spec)
    q = parse_percentiles(percentiles if percentiles is not None else
                          (meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES)
    kind = dataset_kind(input_path)
    refs = list_images(input_path)
    check_output(output, overwrite=overwrite, inputs=[input_path])  # fail before computing statistics
    images = {}
    for ref in refs:
        img = image_meta(ref.path)  # metadata only: planning a field costs well under a millisecond
        if not {"y", "x"} <= set(img.dims):
            raise InputError(f"{ref.path}: image has no y/x axes; l2l-scale restores 2D planes")
        channel_indices(img.channel_names if "c" in img.dims else ["0"], in_names)  # clear error for bad names
        images[ref.key] = img
    norm = _norm_values(input_path, refs, in_names, q, norm_scope, norm_stats)
    checksum = sha256_file(weights_file)
    params = {"model": str(model_dir), "weights": weights_file.name, "channels": in_names, "tile": plan.tile,
              "batch": plan.batch, "halo": plan.halo, "grid": plan.grid, "chunks": chunk, "dtype": dtype,
              "percentiles": list(q), "norm_scope": norm_scope, "norm_stats": norm_stats, "precision": precision}
    uint16 = ((UINT16_RANGE[1] - UINT16_RANGE[0]) / 65535.0, UINT16_RANGE[0]) if dtype == "uint16" else None

    def units(tmp: Path, writer: Any, dry: bool):
        """Per image: create its output group, then yield its block, pyramid and finishing tasks."""
        from dask import delayed

        groups = _SmallBlocks(plan)

        for ref in refs:
            img, lo_hi = images[ref.key], norm[ref.key]
            gpath = _out_group_path(tmp, ref, kind)
            src_dims = tuple(img.dims)
            sizes = {"c": spec.n_channel_out, **{d: n for d, n in img.sizes.items() if d != "c"}}
            dims = tuple(d for d in DIM_ORDER if d in sizes)  # the output always has a channel axis
            out_shape = tuple(sizes[d] for d in dims)
            out_chunks = default_chunks(out_shape, dims, chunk)
            if dry:
                plans = [LevelPlan(str(i), s, tuple(min(c, n) for c, n in zip(out_chunks, s)))
                         for i, s in enumerate(pyramid_shapes(out_shape, dims))]
            elif resume and (gpath / "zarr.json").exists() and "ome" in zarr.open_group(str(gpath), mode="r").attrs:
                _, plans = reopen_image_group(gpath)
            else:
                prov = provenance(params, str(ref.path), command=command, model=model_prov,
                                  normalization={"percentiles": list(q), "scope": norm_scope,
                                                 "values": {ch: list(v) for ch, v in lo_hi.items()},
                                                 "output_units": "normalised (input percentiles -> 0, 1)"},
                                  **uint16_prov)
                # The root image of a single-image output holds the progress folder: it is never cleared.
                if gpath != tmp and gpath.exists():
                    shutil.rmtree(gpath)
                plans = create_image_group(gpath, dims, out_shape, np.dtype(dtype), out_chunks,
                                           img.pixel_size, out_names,
                                           name=gpath.name.removesuffix(".zarr"),
                                           attrs_extra={"l2l_scale": prov}, fill_value=0)
            image = writer.image(ref.key, gpath, plans, dims, out_names)
            # One shared description per image: each block task carries only its plane and region.
            ctx = dict({"model": str(model_dir), "weights": weights_file.name, "input": str(ref.path),
                           "src_store": str(ref.path), "src_path": img.array, "src_dims": src_dims,
                           "dst_store": str(gpath), "dst_dims": dims,
                           "channels": channel_indices(img.channel_names or ["0"], in_names),
                           "lo": [lo_hi[c][0] for c in in_names], "hi": [lo_hi[c][1] for c in in_names],
                           "hw": (img.sizes["y"], img.sizes["x"]), "grid": plan.grid, "tile": plan.tile,
                           "halo": plan.halo, "batch": plan.batch, "n_out": spec.n_channel_out, "uint16": uint16,
                           "precision": precision, "align": align})
            # traverse=False: ctx holds no dask objects, and walking it cost 0.35 ms of client time per field.
            _add_blocks(image, img.sizes, dims, plans[0], ctx, delayed(ctx, traverse=False), groups)
            yield from groups.ready(image)
        yield from groups.ready(None)

    if dry_run:
        from dask.base import collections_to_expr

        from l2l_scale.cluster import WAVE_TASKS
        from l2l_scale.io.blockwrite import BlockWriter

        writer, n_tasks, wave = BlockWriter(None), 0, []
        for _, tasks in units(output, writer, True):
            wave.extend(tasks)
            if len(wave) >= WAVE_TASKS:
                n_tasks += len(collections_to_expr(wave).__dask_graph__())
                wave = []
        n_tasks += len(collections_to_expr(wave).__dask_graph__()) if wave else 0
        return {"images": len(refs), "blocks": writer.total, "tasks": n_tasks}

    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.blockwrite import BlockWriter

    model_prov = {"path": str(model_dir.resolve()), "weights": weights_file.name, "sha256": checksum, "metadata": meta}
    uint16_prov = ({"uint16": {"scale": uint16[0], "offset": uint16[1], "meaning": "value = stored * scale + offset"}}
                   if uint16 else {})
    with atomic_output(output, overwrite=overwrite, resume=resume, inputs=[input_path]) as tmp:
        progress = tmp / PROGRESS_DIR
        run = {"model_checksum": checksum, "input": str(input_path.resolve()), **params}
        if resume:
            check_run(progress, run, output, resume)  # before anything is written
        if kind == "plate":
            layout: dict[tuple[str, str], list[str]] = {}
            for ref in refs:
                r, c, f = split_field_key(ref.key)
                layout.setdefault((r, c), []).append(f)
            root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            write_plate_layout(root, layout, name=output.name.removesuffix(".zarr"))
        elif kind == "image" and not (resume and (tmp / "zarr.json").exists()):
            zarr.open_group(str(tmp), mode="w", zarr_format=3)  # clears the folder before the records go in
        check_run(progress, run, output, False)
        writer = BlockWriter(progress)
        compute_waves(units(tmp, writer, False), "predicting blocks", n_units=len(refs),
                      unit_name="fields" if kind == "plate" else "images", resources=resources)
        total, computed = writer.total, writer.pending
        print(f"computed {computed} of {total} blocks" + (f" ({total - computed} were already finished)"
                                                          if total > computed else ""))
    return output


def _add_blocks(image: Any, sizes: dict, dims: tuple, level0: Any, ctx: dict, ctx_task: Any,
                groups: "_SmallBlocks") -> None:
    """One task per output chunk (per t/z plane) of level 0, small ones pooled across images by ``groups``;
    finished blocks get no task."""
    from dask import delayed

    H, W = sizes["y"], sizes["x"]
    plane_dims = [d for d in dims if d in ("t", "z")]
    cy, cx = level0.chunks[dims.index("y")], level0.chunks[dims.index("x")]
    for plane_idx in np.ndindex(*[sizes[d] for d in plane_dims]):
        plane = dict(zip(plane_dims, map(int, plane_idx)))
        for by, y0 in enumerate(range(0, H, cy)):
            for bx, x0 in enumerate(range(0, W, cx)):
                record = image.block_record(plane_idx, by, bx)
                if record is False:
                    continue
                region = (y0, min(y0 + cy, H), x0, min(x0 + cx, W))
                if not groups.add(image, (plane_idx, by, bx), (ctx, plane, region, record)):
                    image.add_task(plane_idx, by, bx, delayed(_predict_block, pure=False)(ctx_task, plane, region,
                                                                                         record))


class _SmallBlocks:
    """Pools blocks smaller than a quarter tile (the fields of a plate of small images) into shared tasks.

    One model call per 256^2 field costs several times more per pixel than a call on a full tile. Blocks of
    one shape are pooled, in plan order, into groups whose tiles fill one call of about a quarter of
    ``batch`` full tiles' pixels (the same per call for every block of that shape, see :func:`_predict_blocks`).
    Images are handed out (``ready``) once all their blocks have a task, several at a time when they share one.
    """

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.buffers: dict[tuple[int, int], list] = {}
        self.waiting: list = []  # images not handed out yet

    def per_call(self, h: int, w: int) -> int:
        return max(1, (self.plan.batch * self.plan.tile ** 2) // (4 * h * w))

    def add(self, image: Any, key: tuple, item: tuple) -> bool:
        """Pool ``item`` (ctx, plane, region, record) if its block is small; False when it gets its own task."""
        y0, y1, x0, x1 = item[2]
        h, w = y1 - y0, x1 - x0
        if h > self.plan.tile or w > self.plan.tile or 4 * h * w > self.plan.tile ** 2:
            return False
        buf = self.buffers.setdefault((h, w), [])
        buf.append((image, key, item, image.finish_in_block_task()))
        if len(buf) >= self.per_call(h, w):
            self._flush((h, w))
        return True

    def _flush(self, shape: tuple[int, int]) -> None:
        from dask import delayed

        buf = self.buffers.pop(shape)
        blocks = _Blocks([item for _, _, item, _ in buf], [fin for *_, fin in buf if fin is not None])
        task = delayed(_predict_blocks, pure=False)(blocks, self.per_call(*shape))
        for image, key, *_ in buf:
            image.add_task(*key, task)

    def ready(self, image: Any):
        """Yield ``(n, tasks)`` for the images whose blocks all have tasks (``image=None``: flush everything)."""
        if image is not None:
            self.waiting.append(image)
        else:
            for shape in list(self.buffers):
                self._flush(shape)
        # Only when nothing is pooled: then no task is shared with an image handed out later.
        if self.waiting and not self.buffers:
            done, self.waiting = self.waiting, []
            yield len(done), list({t.key: t for im in done for t in im.tasks()}.values())
