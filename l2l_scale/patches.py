"""Distributed patch sampling and augmentation: OME-Zarr image pairs -> a zarr patch store for training.

``l2l-scale patches DATASET OUTPUT`` follows CSBDeep's ``create_patches`` (what the paper used) but runs as Dask
tasks that never load an input image whole.

How one image's patches are sampled, augmented and normalised is described in :mod:`l2l_scale.patch_sampling`;
the store's layout in :mod:`l2l_scale.patch_store`. This module runs the two phases as Dask tasks: one task per
image samples and stages its patches, then one task per output chunk gathers the staged patches into the store in
a shuffled order.

Validation split
----------------
``split_by="pair"`` (default) puts whole images on one side: no image contributes to both training and
validation (the paper's cross-validation by image pair). ``split_by="patch"`` is CSBDeep's 90/10 split: all
patches are shuffled and the last ``validation_fraction`` are validation.

Resumable and deterministic
---------------------------
Everything random derives from ``seed`` and the image key, so a rerun gives bit-identical arrays. The store is
written into ``OUTPUT.partial`` and renamed when complete; completion records (each image's staged table, and one
journal line per patch chunk, :mod:`l2l_scale.io.journal`) let ``resume=True`` finish only the unfinished tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from l2l_scale.config import PatchConfig, patch_config
from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.io import journal
from l2l_scale.io.output import PROGRESS_DIR, atomic_output, check_output, check_run
from l2l_scale.io.prov import provenance
from l2l_scale.io.read import list_images, open_image, select_channels
from l2l_scale.io.atomic import say as _say, write_json
from l2l_scale.io.blockwrite import RECORDS
from l2l_scale.patch_sampling import SAMPLED_HIGH, SAMPLED_LOW, _GRID_HIGH, _GRID_LOW, _image_task, _region_size
from l2l_scale.patch_store import (
    ATTRS_KEY,
    FORMAT_VERSION,
    TABLE_COLUMNS,
    PatchStore,
    _assemble_task,
    _chunk_patches,
    _create_arrays,
    _write_table,
    open_patches,
    read_table,
)

__all__ = ["ATTRS_KEY", "FORMAT_VERSION", "TABLE_COLUMNS", "PatchStore", "create_patches", "open_patches",
           "read_table"]

_SPLIT_SEED = 0x5011
_ORDER_SEED = 0x5012


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


def _deciding_targets(n: int) -> list[int]:
    """The target channels whose foreground counts under CSBDeep's rule, of ``n`` (in the store's order).

    CSBDeep's ``no_background_patches`` max-filters the (C, Y, X) target with half the patch size along every
    axis, C included (``C // 2``, or 1 for one channel), and a patch spans all channels, so the only valid
    centre along C is index ``C // 2``: channel ``C // 2`` alone for 2 or 3 targets, the ``C // 2`` channels
    around it (scipy's footprint) for more.
    """
    k = n // 2 if n > 1 else 1
    first = n // 2 - k // 2
    return list(range(first, first + k))


def _pools_targets(cfg: PatchConfig, targets: list[str]) -> bool:
    """Whether the foreground threshold is the percentile of all target channels pooled (CSBDeep's rule)."""
    return cfg.foreground == "csbdeep" and len(targets) > 1


def _rule_text(cfg: PatchConfig, targets: list[str], levels: list[float | None]) -> str:
    """The foreground rule of one image, for the messages about images without foreground."""
    deciding = [t for t, v in zip(targets, levels) if v is not None]
    perc = f"{cfg.threshold:g} x the {cfg.filter_percentile:g}th percentile"
    if len(targets) == 1:
        return f"target {deciding[0]!r} exceeds {perc} of its own values"
    if not _pools_targets(cfg, targets):
        return f"any of the targets {deciding} exceeds {perc} of its own values"
    return (f"target(s) {deciding} exceed {perc} of all targets {targets} together (CSBDeep's rule; "
            "--foreground any lets every target count)")


def _filter_levels(dataset: Path, cfg: PatchConfig, stats: dict, images: list[_Image], progress: Path) -> dict:
    """Per image, the threshold base of each target channel (in its order): ``None`` where it does not decide.

    ``any`` (and one target): each channel's own ``filter_percentile``-th percentile. ``csbdeep`` with several
    targets: the percentile of all target channels pooled, for the deciding channels (:func:`_deciding_targets`).
    """
    from l2l_scale.preprocess.normalize import dataset_stats, pooled_percentiles

    cached = progress / "filter.json"
    if cached.exists():
        return json.loads(cached.read_text())
    # CSBDeep's rule is the default (issue 14): under "any", nuclei-membrane's sparse SYTOX channel held ~40 % more
    # signal in the patches than under create_patches, its restored nuclei came out brighter than the labels'
    # and raw PSNR against them was 0.25 dB below CARE.train's over 6 seeds (bench_train_quality.py).
    pooled_rule = [im for im in images if _pools_targets(cfg, im.target_names)]
    own = [im for im in images if not _pools_targets(cfg, im.target_names)]
    levels: dict[str, list[float | None]] = {}
    if own:
        targets = sorted({t for im in own for t in im.target_names})
        if stats.get("scope") == "image" and float(stats["percentiles"][1]) == cfg.filter_percentile and all(
                t in stats["images"].get(im.key, {}) for im in own for t in im.target_names):
            per = {im.key: {t: float(stats["images"][im.key][t]["hi"]) for t in im.target_names} for im in own}
        else:
            fs = dataset_stats(dataset, q=(0.0, cfg.filter_percentile), scope="image", channels=targets,
                               progress=True)
            per = {k: {t: float(v[t]["hi"]) for t in targets} for k, v in fs["images"].items()}
        levels.update({im.key: [per[im.key][t] for t in im.target_names] for im in own})
    if pooled_rule:
        pooled = pooled_percentiles([(im.key, im.path, im.target_names) for im in pooled_rule],
                                    cfg.filter_percentile, progress=True)
        for im in pooled_rule:
            deciding = _deciding_targets(len(im.target_names))
            levels[im.key] = [pooled[im.key] if j in deciding else None for j in range(len(im.target_names))]
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
                   overwrite: bool = False, resume: bool = False, command: str | None = None,
                   **values: Any) -> Path:
    """Sample normalised (and augmented) training patches from a dataset into a zarr patch store.

    Parameters
    ----------
    dataset : path
        OME-Zarr image, HCS plate or folder of images; each image is one input/target pair.
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
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
        levels = _filter_levels(dataset, cfg, stats, images, progress)
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
            thresholds = [math.inf if v is None else cfg.threshold * float(v) for v in levels[im.key]]
            job = {"key": im.key, "store": str(im.path), "array": im.array, "dims": im.dims, "plane": im.plane,
                   "input_idx": im.input_idx, "target_idx": im.target_idx, "lo": [v[0] for v in lohi],
                   "hi": [v[1] for v in lohi], "grid": grid.get(im.key), "thresholds": thresholds,
                   "rule": _rule_text(cfg, im.target_names, levels[im.key]), "config": cfg_d,
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
            raise InputError(f"{dataset}: no image has foreground to sample patches from ({staged[0]['reason']}); "
                             "check the target channel or lower --threshold")
        img_rows, loc_rows, n_train = _layout(images, counts, val_images, cfg)
        N = int(img_rows.size)
        if n_train == 0:
            raise InputError(f"{dataset}: every patch went to validation; lower --validation-fraction or add images")
        if N - n_train == 0 and cfg.validation_fraction > 0:
            _say("warning: the validation split is empty (its images have no foreground); training will monitor "
                 "the training loss")

        # Phase 2: one task per output chunk gathers its (shuffled) rows from the staged images.
        shapes = {"X": (N, p, p, len(in_names)), "Y": (N, p, p, len(tg_names))}
        _create_arrays(root, shapes, chunk)
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
        _write_table(root, columns)
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
                         "foreground": cfg.foreground,
                         "rule": "max over (patch_size // 2) / zoom source px > threshold x percentile(target)" + (
                             f"; target channels {_deciding_targets(len(tg_names))} decide, against the percentile "
                             "of all targets pooled (CSBDeep)" if _pools_targets(cfg, tg_names) else
                             "; any target channel, each against its own percentile" if len(tg_names) > 1 else "")},
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
        root.attrs.update({ATTRS_KEY: meta, "l2l_scale": provenance(cfg_d, str(dataset), command=command)})
        _say(f"{N} patches ({n_train} training, {N - n_train} validation) of {p}x{p} px from "
             f"{sum(1 for c in counts if c)} image(s)")
    return output
