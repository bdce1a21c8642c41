"""Writing NGFF 0.5 (zarr v3) images, multiscale pyramids and HCS plates.

:func:`write_image` and :func:`write_plate` write into ``<output>.partial`` and rename it when complete
(:mod:`l2l_scale.io.output`); their block tasks run through :mod:`l2l_scale.io.blockwrite`.

We write arrays with zarr directly rather than through ``ome_zarr.writer.write_image`` because we need three
things it does not give: each pyramid level is computed from the previous level *on disk* (the expensive graph
runs once and memory stays bounded), block-level completion records for ``--resume``, and the atomic rename.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from l2l_scale.errors import ChannelError, ConfigError, OutputError
from l2l_scale.io.output import PROGRESS_DIR, atomic_output
from l2l_scale.io.prov import jsonable
from l2l_scale.io.read import DIM_ORDER, SPATIAL

WRITE_VERSION = "0.5"
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
DEFAULT_CHUNK = 1024
TOP_LEVEL_MAX = 1024
_COLORS = ("FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")


def _normalise_input(data: Any, dims: Sequence[str] | None, pixel_size: Any, channel_names: Sequence[str] | None):
    """Turn a DataArray / dask / numpy array into (dask array, dims, pixel sizes, channel names)."""
    if isinstance(data, xr.DataArray):
        dims = tuple(dims or data.dims)
        arr = data.data if isinstance(data.data, da.Array) else da.from_array(np.asarray(data.data))
        if channel_names is None and "c" in data.coords:
            channel_names = [str(c) for c in data.coords["c"].values]
        if pixel_size is None and not isinstance(data.attrs.get("pixel_size"), (dict, type(None))):
            pixel_size = data.attrs["pixel_size"]
        elif pixel_size is None:
            pixel_size = dict(data.attrs.get("pixel_size") or {})
            for d in SPATIAL:
                if d in data.coords and data.sizes[d] > 1 and d not in pixel_size:
                    pixel_size[d] = float(data.coords[d].values[1] - data.coords[d].values[0])
    else:
        arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
        dims = tuple(dims or {2: "yx", 3: "cyx", 4: "czyx", 5: "tczyx"}.get(arr.ndim, ""))
    if len(dims) != arr.ndim:
        raise ConfigError(f"dims {dims} do not match the array's {arr.ndim} dimensions; pass dims explicitly")
    if any(d not in DIM_ORDER for d in dims) or list(dims) != sorted(dims, key=DIM_ORDER.index):
        raise ConfigError(f"dims {dims} must be a subsequence of {DIM_ORDER} (NGFF axis order); transpose first")
    if isinstance(pixel_size, (int, float)):
        pixel_size = {d: float(pixel_size) for d in dims if d in ("y", "x")}
    elif isinstance(pixel_size, (tuple, list)):
        sp = [d for d in dims if d in SPATIAL]
        if len(pixel_size) != len(sp):
            raise ConfigError(f"pixel size {tuple(pixel_size)} needs one value per spatial dim {sp}")
        pixel_size = dict(zip(sp, map(float, pixel_size)))
    pixel_size = {d: float((pixel_size or {}).get(d, 1.0)) for d in dims if d in SPATIAL}
    if any(not np.isfinite(v) or v <= 0 for v in pixel_size.values()):
        raise ConfigError(f"pixel size {pixel_size} must be positive; pass --pixel-size in micrometres")
    if "c" in dims:
        n_c = arr.shape[dims.index("c")]
        channel_names = [str(c) for c in (channel_names or range(n_c))]
        if len(channel_names) != n_c:
            raise ChannelError(f"{len(channel_names)} channel names given for {n_c} channels; give one name per channel")
    else:
        channel_names = []
    return arr, dims, pixel_size, channel_names


def default_chunks(shape: Sequence[int], dims: Sequence[str], chunk: int | Mapping[str, int] | None = None) -> tuple[int, ...]:
    """Chunk shape for writing: ``chunk`` (default 1024) in y/x, 1 on every other axis, clipped to the shape."""
    if isinstance(chunk, Mapping):
        sizes = {d: int(chunk.get(d, DEFAULT_CHUNK if d in ("y", "x") else 1)) for d in dims}
    else:
        c = int(chunk or DEFAULT_CHUNK)
        sizes = {d: (c if d in ("y", "x") else 1) for d in dims}
    if any(v < 1 for v in sizes.values()):
        raise ConfigError(f"chunk sizes {sizes} must be positive")
    return tuple(max(1, min(sizes[d], n)) for d, n in zip(dims, shape))


def pyramid_shapes(shape: Sequence[int], dims: Sequence[str], top_max: int = TOP_LEVEL_MAX) -> list[tuple[int, ...]]:
    """Shapes of the 2x-mean pyramid: halve y/x (trimming odd pixels) until the largest side is <= ``top_max``."""
    shapes = [tuple(shape)]
    yx = [i for i, d in enumerate(dims) if d in ("y", "x")]
    while max(shapes[-1][i] for i in yx) > top_max and min(shapes[-1][i] for i in yx) >= 2:
        shapes.append(tuple(n // 2 if i in yx else n for i, n in enumerate(shapes[-1])))
    return shapes


def _axes_meta(dims: Sequence[str], space_unit: str = "micrometer") -> list[dict]:
    axes = []
    for d in dims:
        ax = {"name": d, "type": AXIS_TYPES[d]}
        if d in SPATIAL:
            ax["unit"] = space_unit
        elif d == "t":
            ax["unit"] = "second"
        axes.append(ax)
    return axes


def _level_transforms(dims: Sequence[str], pixel_size: Mapping[str, float], level: int) -> list[dict]:
    # Mean of 2^k x 2^k pixels is centred half a (coarse - fine) pixel further in: translate accordingly.
    f = 2**level
    scale = [pixel_size[d] * f if d in ("y", "x") else pixel_size.get(d, 1.0) for d in dims]
    trans = [pixel_size[d] * (f - 1) / 2 if d in ("y", "x") else 0.0 for d in dims]
    out = [{"type": "scale", "scale": scale}]
    if any(trans):
        out.append({"type": "translation", "translation": trans})
    return out


def omero_metadata(channel_names: Sequence[str], windows: Sequence[tuple[float, float, float, float]]) -> dict:
    """The NGFF ``omero`` block: one channel entry (label, colour, display window) per name."""
    channels = []
    for i, (name, (lo, hi, mn, mx)) in enumerate(zip(channel_names, windows)):
        channels.append({
            "label": name,
            "color": _COLORS[i % len(_COLORS)] if len(channel_names) > 1 else "FFFFFF",
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"start": lo, "end": hi, "min": mn, "max": mx},
        })
    return {"channels": channels, "rdefs": {"model": "color" if len(channel_names) > 1 else "greyscale"}}


def display_windows(top: np.ndarray, dims: Sequence[str], percentiles=(0.1, 99.9)) -> list[tuple[float, float, float, float]]:
    """omero display windows (start, end, min, max) per channel from percentiles of a (small) pyramid level."""
    from l2l_scale.preprocess.percentile_engine import percentiles_in_memory

    arr = np.asarray(top)
    if "c" in dims:
        arr = np.moveaxis(arr, dims.index("c"), 0)
    else:
        arr = arr[None]
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        full = (float(info.min), float(info.max))
    else:
        full = None
    out = []
    for ch in arr:
        flat = ch.reshape(-1)
        flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
        if flat.size == 0:
            lo = hi = mn = mx = 0.0
        else:
            lo, hi = (float(v) for v in percentiles_in_memory(flat, percentiles))  # == np.percentile, faster
            mn, mx = full or (float(flat.min()), float(flat.max()))
        if hi <= lo:
            hi = lo + 1.0
        out.append((lo, hi, mn, mx))
    return out


def _compressor() -> BloscCodec:
    # zstd level 3 (zstd's own default), not 5: measured on 1024^2 chunks, its ratio is within 1 % of level 5's
    # (uint16 image 2.52 vs 2.53, float32 restoration 1.21 vs 1.22) at 1.7x and 3.2x the encoding speed. At
    # level 5, writing a bf16 restoration cost a fifth of the model's time on the same cores.
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)


@dataclass
class LevelPlan:
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]


def create_image_group(group: zarr.Group | Path, dims, shape, dtype, chunks, pixel_size, channel_names, *, name,
                       attrs_extra, top_max=TOP_LEVEL_MAX, fill_value=0) -> list[LevelPlan]:
    """Create the (empty) pyramid arrays and the NGFF 0.5 metadata of an image group; return the level plans.

    ``group`` is an open group, or the local folder of a new one. On a local filesystem the metadata documents
    are written as files directly (zarr's own array documents, made once per shape): through the zarr API each
    group cost about 8 ms of client time, seconds for a plate of hundreds of fields. The group document, which
    makes the image visible, is written last.
    """
    plans = []
    for level, lshape in enumerate(pyramid_shapes(shape, dims, top_max)):
        plans.append(LevelPlan(str(level), lshape, tuple(min(c, n) for c, n in zip(chunks, lshape))))
    # ome_zarr.writer.write_multiscales_metadata gives this same block, but only by rewriting an open group's
    # zarr.json three times (~2 ms an image, seconds a plate); it cannot return it for our one-file write.
    ms = {
        "name": name or "image",
        "axes": _axes_meta(dims),
        "datasets": [{"path": p.path, "coordinateTransformations": _level_transforms(dims, pixel_size, i)}
                     for i, p in enumerate(plans)],
    }
    ome: dict[str, Any] = {"version": WRITE_VERSION, "multiscales": [ms]}
    if channel_names:
        ome["omero"] = omero_metadata(channel_names, [(0.0, 1.0, 0.0, 1.0)] * len(channel_names))
    attrs = {"ome": ome, **(attrs_extra or {})}
    root = _local_root(group)
    if root is None:
        for p in plans:
            group.create_array(p.path, shape=p.shape, dtype=dtype, chunks=p.chunks, compressors=[_compressor()],
                               dimension_names=list(dims), fill_value=fill_value, overwrite=True)
        group.attrs.update(attrs)
        return plans
    existing = {} if isinstance(group, Path) else dict(group.attrs)
    for p in plans:
        (root / p.path).mkdir(parents=True, exist_ok=True)
        (root / p.path / "zarr.json").write_bytes(
            _array_document(p.shape, np.dtype(dtype).str, p.chunks, tuple(dims), fill_value))
    doc = {"attributes": jsonable({**existing, **attrs}), "zarr_format": 3, "node_type": "group"}
    # Unindented: only then does json use its C encoder. Indented, a field's document (its provenance carries the
    # model's metadata) cost 0.5 ms to encode, and it is written twice per field of a plate (here and when
    # finished, see blockwrite.finish_block).
    (root / "zarr.json").write_text(json.dumps(doc))
    return plans


def _local_root(group: zarr.Group | Path) -> Path | None:
    """The folder of a group on the local filesystem, or None for other stores."""
    from zarr.storage import LocalStore

    if isinstance(group, Path):
        return group
    if isinstance(group.store, LocalStore) and not group.read_only:
        return Path(group.store.root) / group.path
    return None


@functools.lru_cache(maxsize=256)
def _array_document(shape: tuple, dtype: str, chunks: tuple, dims: tuple, fill_value: Any) -> bytes:
    """The ``zarr.json`` zarr writes for such an array (made in memory, so the format stays zarr's)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    arr = zarr.create_array(MemoryStore(), shape=shape, dtype=np.dtype(dtype), chunks=chunks,
                            compressors=[_compressor()], dimension_names=list(dims), fill_value=fill_value)
    return arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def reopen_image_group(root: Path) -> tuple[zarr.Group, list[LevelPlan]]:
    """Open an unfinished image group (inside a ``.partial`` output) to resume writing it."""
    group = zarr.open_group(str(root), mode="r+")
    plans = [LevelPlan(d["path"], group[d["path"]].shape, group[d["path"]].chunks)
             for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return group, plans


def finish_image_group(group: zarr.Group, dims, channel_names) -> None:
    """Set the omero display windows from the (small) top pyramid level once all levels are written."""
    if not channel_names:
        return
    ome = dict(group.attrs["ome"])
    top = group[ome["multiscales"][0]["datasets"][-1]["path"]][...]
    ome["omero"] = omero_metadata(channel_names, display_windows(top, dims))
    group.attrs["ome"] = ome


def image_write_tasks(root: Path, data: Any, writer: Any, *, unit: str = "", dims=None, pixel_size=None,
                      channel_names=None, chunks=None, name=None, attrs_extra=None, resume: bool = False,
                      top_max: int = TOP_LEVEL_MAX) -> list:
    """Create (or, resuming, reopen) the image group at ``root`` and return the tasks that fill it.

    ``writer`` is the run's :class:`~l2l_scale.io.blockwrite.BlockWriter`; ``unit`` names the image in its
    completion records. The tasks write every pyramid level and the display windows, and are meant to be
    computed together with those of the run's other images (:func:`l2l_scale.cluster.compute_waves`).
    """
    arr, dims, pixel_size, channel_names = _normalise_input(data, dims, pixel_size, channel_names)
    wchunks = default_chunks(arr.shape, dims, chunks)
    if resume and (root / "zarr.json").exists() and "ome" in zarr.open_group(str(root), mode="r").attrs:
        group, plans = reopen_image_group(root)
        if plans[0].shape != tuple(arr.shape):
            raise OutputError(f"{root}: the unfinished output has shape {plans[0].shape}, not {arr.shape}; "
                              "rerun with --overwrite instead of --resume")
    else:
        # Written as files into the (new) folder: an image at the output's root holds the run's progress folder,
        # which opening the group with mode "w" would delete.
        root.mkdir(parents=True, exist_ok=True)
        plans = create_image_group(Path(root), dims, arr.shape, arr.dtype, wchunks, pixel_size, channel_names,
                                   name=name, attrs_extra=attrs_extra, top_max=top_max)
    image = writer.image(unit, root, plans, dims, channel_names, attrs_extra)
    image.add_array(arr)
    return image.tasks()


def write_image(data: Any, path: str | Path, *, dims: Sequence[str] | None = None, pixel_size: Any = None,
                channel_names: Sequence[str] | None = None, chunks: int | Mapping[str, int] | None = None,
                provenance: Mapping[str, Any] | None = None, name: str | None = None, overwrite: bool = False,
                resume: bool = False, inputs: Sequence[str | Path] = (), label: str = "writing",
                top_max: int = TOP_LEVEL_MAX) -> Path:
    """Write an image as an NGFF 0.5 (zarr v3) multiscale pyramid, streaming chunk by chunk.

    Parameters
    ----------
    data : xarray.DataArray, dask.array.Array or numpy.ndarray
        The image. A DataArray carries its dims, channel names (``c`` coord) and pixel size (``attrs`` or the
        spacing of its coords).
    path : str or Path
        The output group. It is written to ``<path>.partial`` and renamed when complete.
    dims : sequence of str, optional
        Axis names for plain arrays (default by ndim: yx, cyx, czyx, tczyx).
    pixel_size : float, sequence or mapping, optional
        Physical pixel size in micrometres.
    channel_names : sequence of str, optional
        Names for the omero channel metadata.
    chunks : int or mapping, optional
        y/x chunk size (default 1024; 1 on other axes), or a per-dim mapping.
    provenance : mapping, optional
        Stored as the ``l2l_scale`` attribute (see :func:`l2l_scale.io.prov.provenance`).
    overwrite, resume : bool
        Replace an existing output / continue an interrupted write of the same data.
    inputs : sequence of path
        Inputs the output must not overlap.

    Returns
    -------
    Path
        The finished output path.
    """
    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.blockwrite import BlockWriter

    path = Path(path)
    extra = {"l2l_scale": dict(provenance)} if provenance else None
    with atomic_output(path, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        writer = BlockWriter(tmp / PROGRESS_DIR if resume else None)
        tasks = image_write_tasks(tmp, data, writer, dims=dims, pixel_size=pixel_size, channel_names=channel_names,
                                  chunks=chunks, name=name or path.name.removesuffix(".zarr"), attrs_extra=extra,
                                  resume=resume, top_max=top_max)
        compute_waves([tasks], label, n_units=1, unit_name="images")
    return path


_WELL_RE = re.compile(r"^([A-Za-z]+)/?(\d+)$")


def _split_well(well: str) -> tuple[str, str]:
    m = _WELL_RE.match(str(well).strip())
    if not m:
        raise ConfigError(f"well {well!r} is not like 'A/1' or 'B03'; name wells by row letters and column number")
    return m.group(1).upper(), str(int(m.group(2)))


def write_plate_layout(root: zarr.Group, layout: Mapping[tuple[str, str], Sequence[str]], *, name: str,
                       attrs_extra: Mapping[str, Any] | None = None) -> None:
    """Write NGFF 0.5 plate and well metadata for ``{(row, column): [field, ...]}`` into ``root``."""
    # Imported here: ome_zarr costs about a second of imports that the other steps never need.
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_well_metadata

    rows = sorted({r for r, _ in layout}, key=lambda r: (len(r), r))
    cols = sorted({c for _, c in layout}, key=int)
    wells = [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)}
             for r, c in sorted(layout, key=lambda rc: (rows.index(rc[0]), cols.index(rc[1])))]
    plate = {
        "name": name,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": wells,
        "field_count": max(len(f) for f in layout.values()),
    }
    # Not ome_zarr.writer.write_plate_metadata: it also puts "version" inside the plate block (its workaround for
    # ome-zarr-models#218), where 0.5 keeps it only at the top ("ome": {"version"}).
    root.attrs.update({"ome": {"version": WRITE_VERSION, "plate": plate}, **(attrs_extra or {})})
    folder = _local_root(root)
    for (r, c), flds in layout.items():
        images = [{"path": str(f)} for f in flds]
        if folder is None:
            write_well_metadata(root.require_group(f"{r}/{c}"), images, fmt=FormatV05())
            continue
        # The block write_well_metadata writes for 0.5, as one file: through zarr's group API a well cost 3 ms of
        # client time before any field could start (0.2 s for 64 wells). Fields' groups are written below it.
        (folder / r / c).mkdir(parents=True, exist_ok=True)
        doc = {"attributes": {"ome": {"version": WRITE_VERSION, "well": {"images": images}}},
               "zarr_format": 3, "node_type": "group"}
        (folder / r / c / "zarr.json").write_text(json.dumps(doc))


def split_field_key(key: str) -> tuple[str, str, str]:
    """``"A/1/0"`` -> ``("A", "1", "0")`` with validation (keys become paths: no '..' or absolute parts)."""
    parts = str(key).strip("/").split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ConfigError(f"plate key {key!r} is not 'row/column/field'")
    row, col = _split_well("/".join(parts[:2]))
    return row, col, str(int(parts[2]))


def write_plate(fields: Mapping[tuple[str, str | int] | str, Any], path: str | Path, *, name: str | None = None,
                provenance: Mapping[str, Any] | None = None, overwrite: bool = False, resume: bool = False,
                inputs: Sequence[str | Path] = (), label: str = "writing plate", **image_kwargs: Any) -> Path:
    """Write an HCS plate (NGFF 0.5): ``{(well, field): image}`` or ``{"A/1/0": image}``.

    Every field is written with :func:`write_image`'s pyramid layout inside ``row/column/field``, all fields
    and levels in one run; the whole plate appears at ``path`` only when every field is complete.
    """
    from l2l_scale.cluster import compute_waves
    from l2l_scale.io.blockwrite import BlockWriter

    path = Path(path)
    layout: dict[tuple[str, str], dict[str, Any]] = {}
    for key, img in fields.items():
        if isinstance(key, str):
            row, col, fld = split_field_key(key)
        else:
            (row, col), fld = _split_well(key[0]), str(int(key[1]))
        layout.setdefault((row, col), {})[fld] = img
    extra = {"l2l_scale": dict(provenance)} if provenance else {}
    with atomic_output(path, overwrite=overwrite, resume=resume, inputs=inputs) as tmp:
        root = zarr.open_group(str(tmp), mode="a" if resume else "w", zarr_format=3)
        write_plate_layout(root, {(r, c): sorted(f, key=int) for (r, c), f in layout.items()},
                           name=name or path.name.removesuffix(".zarr"), attrs_extra=extra)
        writer = BlockWriter(tmp / PROGRESS_DIR if resume else None)
        keys = [(r, c, f) for (r, c), flds in sorted(layout.items()) for f in sorted(flds, key=int)]
        units = (image_write_tasks(tmp / r / c / f, layout[(r, c)][f], writer, unit=f"{r}/{c}/{f}",
                                   name=f"{r}{c}-{f}", attrs_extra=extra or None, resume=resume, **image_kwargs)
                 for r, c, f in keys)
        compute_waves(units, label, n_units=len(keys))
    return path
