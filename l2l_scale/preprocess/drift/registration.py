"""The ``register`` job: estimate one shift per moving channel and field, apply it, crop every channel to the
common region and write the image, plate or folder."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.preprocess.dataset import _plane_image, _yx_chunk, write_dataset
from l2l_scale.preprocess.drift.estimate import COARSE_MAX, DEFAULT_PATCHES, METHODS, estimate_shift
from l2l_scale.preprocess.drift.shift import common_region, shift_halo, shift_image


def _coarse_level(path: Path) -> int | None:
    """Index of the finest pyramid level with both sides <= COARSE_MAX (None: the image has no such level)."""
    from l2l_scale.io.read import open_image

    img0 = open_image(path)
    for level in range(int(img0.attrs["n_levels"])):
        lvl = open_image(path, level)
        if max(lvl.sizes["y"], lvl.sizes["x"]) <= COARSE_MAX:
            return level
    return None


def _same_geometry(a: xr.DataArray, b: xr.DataArray, pa: Any, pb: Any) -> None:
    if (a.sizes["y"], a.sizes["x"]) != (b.sizes["y"], b.sizes["x"]):
        raise InputError(f"{pb}: image is {b.sizes['y']} x {b.sizes['x']} px but {pa} is {a.sizes['y']} x "
                         f"{a.sizes['x']}; register acquisitions of the same field at the same size")
    psa, psb = a.attrs.get("pixel_size") or {}, b.attrs.get("pixel_size") or {}
    for d in ("y", "x"):
        va, vb = float(psa.get(d, 1.0)), float(psb.get(d, 1.0))
        if not math.isclose(va, vb, rel_tol=1e-6):
            raise InputError(f"{pb}: pixel size {vb:g} differs from {va:g} in {pa}; resample one acquisition to the "
                             "other's pixel size before registering")


def register(input: str | Path, output: str | Path, *, reference: str, moving: Sequence[str], method: str = "phase",
             moving_image: str | Path | None = None, max_shift: float | None = None,
             n_patches: int = DEFAULT_PATCHES, order: int = 1, seed: int = 0, overwrite: bool = False,
             chunks: int | None = None, resume: bool = False, command: str | None = None) -> dict[str, dict]:
    """Register channels of an image, plate or folder onto a reference channel and write the result.

    Parameters
    ----------
    input, output : path
        OME-Zarr image, HCS plate or folder; the output keeps the layout, and every field gets its own shifts.
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    reference : str
        Reference channel name (it is never moved).
    moving : sequence of str
        Channels to register. With ``moving_image`` they are channels of that image.
    method : {"phase", "ssim"}
        See :func:`estimate_shift`.
    moving_image : path, optional
        A second acquisition of the same field(s) (same layout, shape and pixel size) to take the moving
        channels from; they are appended to the output (``<name>-moving`` if the name is taken).
    max_shift : float, optional
        Largest plausible shift in px (default: a quarter of the smaller side); larger estimates are errors.
    n_patches : int
        Foreground patch pairs per estimate (paper: 100).
    order : int
        Interpolation order of the applied shift (default 1; ``ssim`` shifts are whole pixels: crop only).
    seed : int
        Patch sampling seed (combined with each field's key).
    overwrite : bool
        Replace an existing output.
    resume : bool
        Finish an interrupted run with the same options (see :func:`write_dataset`).
    chunks : int, optional
        Output chunk side (default: the input's).

    Returns
    -------
    dict
        ``{field key: {"reference", "method", "order", "shifts": {channel: [dy, dx]}, "estimates": {...},
        "crop": {"y": [start, stop], "x": [...]}}}`` (key ``""`` for a single image).
    """
    from l2l_scale.io.output import check_output
    from l2l_scale.io.prov import provenance
    from l2l_scale.io.read import dataset_kind, list_images, open_image, select_channels

    input, output = Path(input), Path(output)
    moving = [str(m) for m in moving]
    if method not in METHODS:
        raise ConfigError(f"unknown registration method {method!r}; use one of {', '.join(METHODS)}")
    if not moving:
        raise ConfigError("no moving channel given; name the channels to register with --moving")
    if moving_image is None and reference in moving:
        raise ConfigError(f"channel {reference!r} is both the reference and a moving channel; drop it from --moving")
    shift_halo((0.0, 0.0), order)  # validates the order
    inputs = [input] + ([Path(moving_image)] if moving_image is not None else [])
    kind = dataset_kind(input)
    refs = list_images(input)
    check_output(output, overwrite=overwrite, inputs=inputs)  # fail before any computation
    mrefs = None
    if moving_image is not None:
        mkind = dataset_kind(moving_image)
        mlist = list_images(moving_image)
        mrefs = {r.key: r for r in mlist}
        if mkind != kind or set(mrefs) != {r.key for r in refs}:
            raise InputError(f"{moving_image}: its layout ({mkind}, {len(mlist)} images) does not match {input} "
                             f"({kind}, {len(refs)} images); give a moving image with the same fields")

    params = {"reference": reference, "moving": moving, "method": method, "moving_image": moving_image,
              "max_shift": max_shift, "n_patches": n_patches, "order": order, "seed": seed}
    results: dict[str, dict] = {}
    items = []
    for ref in refs:
        img = _plane_image(open_image(ref.path), ref.path)
        names = [str(c) for c in img.coords["c"].values]
        select_channels(img, [reference])
        level = _coarse_level(ref.path)
        if mrefs is None:
            mov_img, mpath, mlevel = img, ref.path, level
            select_channels(img, moving)
        else:
            mpath = mrefs[ref.key].path
            mov_img = _plane_image(open_image(mpath), mpath)
            _same_geometry(img, mov_img, ref.path, mpath)
            select_channels(mov_img, moving)
            mlevel = _coarse_level(mpath)
        ref_c = mov_c = None
        if level is not None and level == mlevel:
            ref_c = _plane_image(open_image(ref.path, level), ref.path).sel(c=reference)
            mov_c = _plane_image(open_image(mpath, level), mpath)
        field_seed = [int(seed), zlib.crc32(ref.key.encode())]
        estimates = {}
        for ch in moving:
            est = estimate_shift(img.sel(c=reference), mov_img.sel(c=ch), method=method,
                                 reference_coarse=ref_c, moving_coarse=None if mov_c is None else mov_c.sel(c=ch),
                                 n_patches=n_patches, max_shift=max_shift, seed=field_seed)
            estimates[ch] = est
        shape = (img.sizes["y"], img.sizes["x"])
        ys, xs = common_region(shape, [e.shift for e in estimates.values()])
        channels, out_names = [], []
        for name in names:
            arr = img.sel(c=name).data
            if mrefs is None and name in estimates:
                channels.append(_shifted_crop(arr, estimates[name].shift, ys, xs, order))
            else:
                channels.append(arr[ys, xs])
            out_names.append(name)
        out_moving = {}
        if mrefs is not None:
            for ch in moving:
                new = ch if ch not in out_names else f"{ch}-moving"
                if new in out_names:
                    raise ChannelError(f"{mpath}: channel {ch!r} clashes with {new!r} of {ref.path}; rename one")
                data = _cast_like(mov_img.sel(c=ch).data, img.dtype)
                channels.append(_shifted_crop(data, estimates[ch].shift, ys, xs, order))
                out_names.append(new)
                out_moving[ch] = new
        out = xr.DataArray(da.stack(channels), dims=("c", "y", "x"),
                           coords={"c": out_names, "y": img.coords["y"].values[ys], "x": img.coords["x"].values[xs]},
                           attrs={"pixel_size": dict(img.attrs.get("pixel_size") or {})})
        info = {
            "reference": reference,
            "method": method,
            "order": order if any(not float(v).is_integer() for e in estimates.values() for v in e.shift)
            else "whole-pixel shifts: cropped, not interpolated",
            "shifts": {out_moving.get(ch, ch): list(e.shift) for ch, e in estimates.items()},
            "estimates": {out_moving.get(ch, ch): e.as_dict() for ch, e in estimates.items()},
            "crop": {"y": [ys.start, ys.stop], "x": [xs.start, xs.stop]},
            "convention": "registered(y, x) = moving(y - dy, x - dx)",
        }
        if mrefs is not None:
            info["moving_image"] = str(mpath)
        results[ref.key] = info
        prov = provenance(params, [str(ref.path)] + ([str(mpath)] if mrefs is not None else []), command=command,
                          registration=info)
        items.append((ref.key, out, prov))
    chunk = chunks or _yx_chunk(open_image(refs[0].path))
    root = (provenance(params, [str(p) for p in inputs], command=command, registration={"fields": results})
            if kind == "plate" else None)
    write_dataset(kind, items, output, root_provenance=root, overwrite=overwrite, resume=resume, inputs=inputs,
                  chunks=chunk, label="registering")
    return results


def _shifted_crop(arr: da.Array, shift: Sequence[float], ys: slice, xs: slice, order: int) -> da.Array:
    """The common region of a shifted channel; whole-pixel shifts are a crop of the input, no interpolation."""
    if all(float(v).is_integer() for v in shift):
        dy, dx = int(shift[0]), int(shift[1])
        return arr[ys.start - dy:ys.stop - dy, xs.start - dx:xs.stop - dx]
    return shift_image(arr, shift, order=order)[ys, xs]


def _cast_like(arr: da.Array, dtype: np.dtype) -> da.Array:
    """A second acquisition's channel in the first image's dtype (channels of one image share a dtype)."""
    if arr.dtype == dtype:
        return arr
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return da.clip(da.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)
