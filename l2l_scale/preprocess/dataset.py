"""Writing one output image per input image in the input's layout (image, HCS plate or folder), for the
pre-processing steps that transform each image on its own (``register``, ``baseline``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import xarray as xr

from l2l_scale.errors import InputError


def write_dataset(kind: str, items: Sequence[tuple[str, xr.DataArray, Mapping[str, Any]]], output: str | Path, *,
                  root_provenance: Mapping[str, Any] | None = None, overwrite: bool = False, resume: bool = False,
                  inputs: Sequence[str | Path] = (), chunks: Any = None, label: str = "writing") -> Path:
    """Write one output image per input image, in the input's layout (image, HCS plate, or folder).

    All images, blocks and pyramid levels are written in one run (:func:`l2l_scale.cluster.compute_waves`).

    Parameters
    ----------
    kind : {"image", "plate", "well", "folder"}
        The input's :func:`~l2l_scale.io.read.dataset_kind`. A plate is written as a plate with the same
        row/column/field layout, a folder (or well) as a folder of ``<key>.zarr`` images.
    items : sequence of (key, image, provenance)
        ``key`` as in :func:`~l2l_scale.io.read.list_images`; each image gets its own provenance (e.g. its
        own registration shifts).
    output : path
        Written atomically: it appears only when every image is complete.
    root_provenance : mapping, optional
        Stored on the plate group (plates only).
    resume : bool
        Finish an interrupted run with the same options: only blocks without a completion record are written.
    chunks : int or mapping, optional
        y/x chunk size, see :func:`~l2l_scale.io.write.write_image`.
    """
    import zarr

    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.output import PROGRESS_DIR, atomic_output, check_run
    from l2l_scale.io.write import image_write_tasks, split_field_key, write_plate_layout
    from l2l_scale.io.blockwrite import BlockWriter

    output = Path(output)
    # What the images are made of; when and by which command line they were made may differ on resume.
    run = {key: {k: v for k, v in prov.items() if k not in ("created", "command")} for key, _, prov in items}
    with atomic_output(output, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        progress = tmp / PROGRESS_DIR
        if resume:
            check_run(progress, {"images": run}, output, resume)
        if kind == "plate":
            layout: dict[tuple[str, str], list[str]] = {}
            for key, _, _ in items:
                r, c, f = split_field_key(key)
                layout.setdefault((r, c), []).append(f)
            root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            write_plate_layout(root, {rc: sorted(f, key=int) for rc, f in layout.items()},
                               name=output.name.removesuffix(".zarr"),
                               attrs_extra={"l2l_scale": dict(root_provenance)} if root_provenance else None)

        def units():
            for key, img, prov in items:
                if kind == "image":
                    dest, name = tmp, output.name.removesuffix(".zarr")
                elif kind == "plate":
                    r, c, f = split_field_key(key)
                    dest, name = tmp / r / c / f, f"{r}{c}-{f}"
                else:
                    dest, name = tmp / f"{key}.zarr", key
                yield image_write_tasks(dest, img, writer, unit=key, chunks=chunks, name=name, resume=resume,
                                        attrs_extra={"l2l_scale": dict(prov)} if prov else None)

        writer = BlockWriter(progress if resume else None)
        compute_waves(units(), label, n_units=len(items), unit_name="fields" if kind == "plate" else "images")
    return output


def _plane_image(img: xr.DataArray, path: Any) -> xr.DataArray:
    """The (c, y, x) view of an image whose other axes (t, z) are singletons."""
    if not {"y", "x"} <= set(img.dims):
        raise InputError(f"{path}: image has no y/x axes; register handles 2-D fields")
    extra = [d for d in img.dims if d not in ("c", "y", "x")]
    big = [d for d in extra if img.sizes[d] > 1]
    if big:
        raise InputError(f"{path}: image has {', '.join(f'{d}={img.sizes[d]}' for d in big)}; register handles 2-D "
                         "fields, convert one plane per image")
    img = img.isel({d: 0 for d in extra}, drop=True)
    if "c" not in img.dims:
        img = img.expand_dims("c").assign_coords(c=["0"])
    return img.transpose("c", "y", "x")


def _yx_chunk(img: xr.DataArray) -> dict[str, int]:
    return {d: int(img.data.chunks[img.dims.index(d)][0]) for d in ("y", "x")}
