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

import json
import math
import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.io import ome_zarr as oz

DEFAULT_PERCENTILES = (2.0, 99.8)  # csbdeep.data.PercentileNormalizer defaults
DEFAULT_TILE = 1024
DEFAULT_BATCH = 4
MAX_TILE = 8192
UINT16_RANGE = (-0.5, 2.5)  # normalised units covered by --dtype uint16 (step 4.6e-5)
_MODEL_LOCKS: dict[tuple, threading.Lock] = defaultdict(threading.Lock)


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


def _spans(p0: int, p1: int, tile: int, halo: int, grid: int, padded: int) -> list[tuple[int, int, int, int]]:
    """Split output range [p0, p1) (padded coords) into tiles; return (out0, out1, in0, in1) per tile.

    ``in0``/``in1`` extend the tile by the halo, outwards to the grid, clipped to the padded image.
    """
    out = []
    for o0 in range(p0, p1, tile):
        o1 = min(o0 + tile, p1)
        i0 = max(0, (o0 - halo) // grid * grid)
        i1 = min(padded, -(-(o1 + halo) // grid) * grid)
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


def _predict_block(task: dict) -> int:
    """Read one output block plus halo, normalise, run the model tile by tile, crop, write, mark done."""
    from l2l_scale.model import configure_tf_threads, get_cached_model

    configure_tf_threads(_worker_threads())
    model = get_cached_model(task["model"], task["weights"], task["precision"])
    src = zarr.open_array(store=task["src_store"], path=task["src_path"], mode="r")
    dst = zarr.open_array(store=task["dst_store"], path="0", mode="r+")
    (H, W), grid = task["hw"], task["grid"]
    pad_y, pad_x = _pad_split(H, grid), _pad_split(W, grid)
    (ay, ax), Hp, Wp = (pad_y[0], pad_x[0]), H + sum(pad_y), W + sum(pad_x)
    oy0, oy1, ox0, ox1 = task["region"]
    ty = _spans(oy0 + ay, oy1 + ay, task["tile"], task["halo"], grid, Hp)
    tx = _spans(ox0 + ax, ox1 + ax, task["tile"], task["halo"], grid, Wp)
    # Read the union of all tiles' inputs once, mapping padded coords back into the image by reflection.
    y_idx = _reflect_index(np.arange(ty[0][2], ty[-1][3]) - ay, H)
    x_idx = _reflect_index(np.arange(tx[0][2], tx[-1][3]) - ax, W)
    ylo, yhi, xlo, xhi = int(y_idx.min()), int(y_idx.max()) + 1, int(x_idx.min()), int(x_idx.max()) + 1
    raw = np.stack([oz.read_region(src, _index(task["src_dims"], task["plane"], c, slice(ylo, yhi), slice(xlo, xhi)),
                                   task["input"]) for c in task["channels"]], axis=-1)
    raw = raw[y_idx - ylo][:, x_idx - xlo]
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise InputError(f"{task['input']}: image contains NaN or Inf; replace them (e.g. with 0) before predicting")
    lo = np.asarray(task["lo"], np.float32)
    hi = np.asarray(task["hi"], np.float32)
    x = (raw.astype(np.float32) - lo) / (hi - lo + np.float32(1e-20))  # csbdeep normalize_mi_ma, float32
    base_y, base_x = ty[0][2], tx[0][2]
    result = np.empty((oy1 - oy0, ox1 - ox0, task["n_out"]), np.float32)
    tiles = [(a, b) for a in ty for b in tx]
    by_shape: dict[tuple[int, int], list] = defaultdict(list)
    for a, b in tiles:
        by_shape[(a[3] - a[2], b[3] - b[2])].append((a, b))
    lock = _MODEL_LOCKS[(task["model"], task["weights"])]
    for group in by_shape.values():
        for k in range(0, len(group), task["batch"]):
            chunk = group[k:k + task["batch"]]
            xb = np.stack([x[a[2] - base_y:a[3] - base_y, b[2] - base_x:b[3] - base_x] for a, b in chunk])
            with lock:  # one model call at a time per process; other threads meanwhile read and write
                yb = model.predict_batch(xb)
            for (a, b), yt in zip(chunk, yb):
                result[a[0] - ay - oy0:a[1] - ay - oy0, b[0] - ax - ox0:b[1] - ax - ox0] = \
                    yt[a[0] - a[2]:a[1] - a[2], b[0] - b[2]:b[1] - b[2]]
    if task["uint16"]:
        scale, offset = task["uint16"]
        result = np.clip(np.rint((result - offset) / scale), 0, 65535).astype(np.uint16)
    dst[_index(task["dst_dims"], task["plane"], slice(None), slice(oy0, oy1), slice(ox0, ox1))] = \
        np.moveaxis(result, -1, 0)
    if task["marker"]:
        Path(task["marker"]).parent.mkdir(parents=True, exist_ok=True)
        Path(task["marker"]).touch()
    return 1


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
            chunks: int | None = None, halo: int | None = None, precision: str = "fp32") -> Path:
    """Restore an OME-Zarr image, plate or folder with a CARE/L2L model, tile by tile on the Dask cluster.

    Parameters
    ----------
    model : path
        CSBDeep model folder (``config.json`` + ``weights_best.h5``/``weights_last.h5``, optional
        ``l2l_scale.json``).
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
    precision : {"fp32", "bf16", "fp16"}
        Compute precision of the network (see :mod:`l2l_scale.model.backend`); fp32 is exact. Recorded in the
        provenance; ``resume`` refuses a different one. bf16/fp16 are refused on CPUs without instructions for
        them (unless the cluster's workers have GPUs).

    Returns
    -------
    Path
        The output path.
    """
    from l2l_scale.cluster import compute_with_progress, current_client, worker_resources
    from l2l_scale.model import check_backend, check_precision, sha256_file
    from l2l_scale.preprocess.normalize import parse_percentiles

    model_dir, input_path, output = Path(model), Path(input), Path(output)
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
    chunk = int(chunks or plan.tile)
    if chunk < 16:
        raise ConfigError(f"chunk {chunk} is too small; use --chunks 256 or more")
    in_names = _resolve_channels(channels, meta, spec)
    out_names = _output_names(in_names, meta, spec)
    q = parse_percentiles(percentiles if percentiles is not None else
                          (meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES)
    kind = oz.dataset_kind(input_path)
    refs = oz.list_images(input_path)
    oz.check_output(output, overwrite=overwrite, inputs=[input_path])  # fail before computing statistics
    images = {}
    for ref in refs:
        img = oz.open_image(ref.path)
        if not {"y", "x"} <= set(img.dims):
            raise InputError(f"{ref.path}: image has no y/x axes; l2l-scale restores 2D planes")
        if "c" not in img.dims:
            img = img.expand_dims("c", axis=1 if "t" in img.dims else 0).assign_coords(c=["0"])
        oz.select_channels(img, in_names)  # validates names with a clear error
        images[ref.key] = img
    norm = _norm_values(input_path, refs, in_names, q, norm_scope, norm_stats)
    checksum = sha256_file(weights_file)
    params = {"model": str(model_dir), "weights": weights_file.name, "channels": in_names, "tile": plan.tile,
              "batch": plan.batch, "halo": plan.halo, "grid": plan.grid, "chunks": chunk, "dtype": dtype,
              "percentiles": list(q), "norm_scope": norm_scope, "norm_stats": norm_stats, "precision": precision}
    uint16 = ((UINT16_RANGE[1] - UINT16_RANGE[0]) / 65535.0, UINT16_RANGE[0]) if dtype == "uint16" else None

    with oz.atomic_output(output, overwrite=overwrite, resume=resume, inputs=[input_path]) as tmp:
        progress = tmp / oz.PROGRESS_DIR
        run_file = progress / "run.json"
        run = {"model_checksum": checksum, "input": str(input_path.resolve()), **params}
        if resume and run_file.exists():
            previous = {"precision": "fp32", **json.loads(run_file.read_text())}  # runs from before --precision
            changed = sorted(k for k in run if previous.get(k) != run[k])
            if changed:
                raise OutputError(f"{output}: the unfinished run used different {', '.join(changed)}; rerun "
                                  "with the same options, or with --overwrite to start again")
        if kind == "plate":
            layout: dict[tuple[str, str], list[str]] = {}
            for ref in refs:
                r, c, f = oz.split_field_key(ref.key)
                layout.setdefault((r, c), []).append(f)
            root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            oz.write_plate_layout(root, layout, name=output.name.removesuffix(".zarr"))

        groups, tasks, total = [], [], 0
        for ref in refs:
            img = images[ref.key]
            lo_hi = norm[ref.key]
            prov = oz.provenance(params, str(ref.path), model={"path": str(model_dir.resolve()),
                                                              "weights": weights_file.name, "sha256": checksum,
                                                              "metadata": meta},
                                 normalization={"percentiles": list(q), "scope": norm_scope,
                                                "values": {ch: list(v) for ch, v in lo_hi.items()},
                                                "output_units": "normalised (input percentiles -> 0, 1)"},
                                 **({"uint16": {"scale": uint16[0], "offset": uint16[1],
                                                "meaning": "value = stored * scale + offset"}} if uint16 else {}))
            gpath = _out_group_path(tmp, ref, kind)
            dims = tuple(img.dims)
            out_shape = tuple(spec.n_channel_out if d == "c" else n for d, n in zip(dims, img.shape))
            if resume and (gpath / "zarr.json").exists():
                group, plans = oz.reopen_image_group(gpath)
            else:
                group = zarr.open_group(str(gpath), mode="w", zarr_format=3)
                plans = oz.create_image_group(
                    group, dims, out_shape, np.dtype(dtype), oz.default_chunks(out_shape, dims, chunk),
                    img.attrs["pixel_size"], out_names, name=gpath.name.removesuffix(".zarr"),
                    attrs_extra={"l2l_scale": prov}, fill_value=0)
            groups.append((ref, group, plans, dims, out_names))
            tasks_img, n_img = _block_tasks(img, ref, dims, gpath, plans[0], model_dir, weights_file, in_names, lo_hi,
                                            plan, spec, uint16, progress / "blocks" / (ref.key or "image"), precision)
            tasks += tasks_img
            total += n_img
        # Recorded after the groups exist: creating the root image group clears the folder it lives in.
        progress.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(run, indent=2))
        if tasks:
            from dask import delayed

            compute_with_progress([delayed(_predict_block, pure=False)(t) for t in tasks],
                                  f"predicting {len(tasks)} blocks", resources=resources)
        print(f"computed {len(tasks)} of {total} blocks" + (f" ({total - len(tasks)} were already finished)"
                                                           if total > len(tasks) else ""))
        for ref, group, plans, dims, names in groups:
            oz.write_lower_levels(group, plans, dims, done_dir=progress / "levels" / (ref.key or "image"),
                                  label=f"pyramid {ref.key}".rstrip())
            oz.finish_image_group(group, dims, names)
    return output


def _block_tasks(img: Any, ref: Any, dims: tuple, gpath: Path, level0: Any, model_dir: Path, weights_file: Path,
                 channels: list[str], lo_hi: dict, plan: TilePlan, spec: Any, uint16: Any,
                 done_dir: Path, precision: str) -> tuple[list[dict], int]:
    """One task description per output chunk (per t/z plane) that has no completion marker yet."""
    H, W = img.sizes["y"], img.sizes["x"]
    src_store, src_path = str(ref.path), img.attrs["array"]
    c_names = [str(c) for c in img.coords["c"].values]
    plane_dims = [d for d in dims if d in ("t", "z")]
    cy, cx = level0.chunks[dims.index("y")], level0.chunks[dims.index("x")]
    tasks, total = [], 0
    for plane_idx in np.ndindex(*[img.sizes[d] for d in plane_dims]):
        plane = dict(zip(plane_dims, map(int, plane_idx)))
        for by, y0 in enumerate(range(0, H, cy)):
            for bx, x0 in enumerate(range(0, W, cx)):
                total += 1
                marker = done_dir / ".".join(map(str, (*plane_idx, by, bx)))
                if marker.exists():
                    continue
                tasks.append({
                    "model": str(model_dir), "weights": weights_file.name, "input": str(ref.path),
                    "src_store": src_store, "src_path": src_path, "src_dims": dims,
                    "dst_store": str(gpath), "dst_dims": dims, "plane": plane,
                    "channels": [c_names.index(c) for c in channels],
                    "lo": [lo_hi[c][0] for c in channels], "hi": [lo_hi[c][1] for c in channels],
                    "hw": (H, W), "grid": plan.grid,
                    "tile": plan.tile, "halo": plan.halo, "batch": plan.batch, "n_out": spec.n_channel_out,
                    "region": (y0, min(y0 + cy, H), x0, min(x0 + cx, W)), "uint16": uint16,
                    "marker": str(marker), "precision": precision,
                })
    return tasks, total
