"""Vendor microscopy formats (Zeiss CZI, Nikon ND2, Leica LIF) read lazily through bioio and its plugins.

:func:`read_vendor` returns the same dask-backed :class:`xarray.DataArray` as :func:`l2l_scale.io.tiff.read_tiff`
(dims a subsequence of ``t, c, z, y, x`` that always includes ``c``, micrometre coords, channel names as the ``c``
coord), so ``convert`` writes a vendor file like a TIFF. Pixels are read plane by plane (bioio's dask chunks)
when the graph runs; the graph pickles, so it runs on distributed workers. The first scene is read.

The readers are optional: ``pip install 'l2l-scale[formats]'`` installs bioio with the CZI plugin; ND2 and LIF
need ``bioio-nd2`` / ``bioio-lif``. For any other format, bioformats2raw writes NGFF 0.4, which l2l-scale
reads directly (see the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from l2l_scale.errors import ChannelError, InputError

# suffix -> the bioio plugin that reads it (pip name)
VENDOR_SUFFIXES = {".czi": "bioio-czi", ".nd2": "bioio-nd2", ".lif": "bioio-lif"}


def is_vendor_file(path: str | Path) -> bool:
    """True for a file name that :func:`read_vendor` handles (by suffix)."""
    return Path(path).suffix.lower() in VENDOR_SUFFIXES


def _plugin_missing(path: Path) -> InputError:
    plugin = VENDOR_SUFFIXES[path.suffix.lower()]
    extra = "pip install 'l2l-scale[formats]'" if plugin == "bioio-czi" else f"pip install bioio {plugin}"
    return InputError(f"{path}: reading {path.suffix.lower()} files needs bioio and {plugin}; install them with "
                      f"{extra}, or convert with bioformats2raw (NGFF 0.4, read directly)")


def read_vendor(path: str | Path, *, pixel_size: float | tuple | Mapping | None = None,
                channel_names: Sequence[str] | None = None, chunks: int | None = None) -> Any:
    """Open a CZI/ND2/LIF file lazily as a dask-backed DataArray in NGFF dim order.

    Parameters
    ----------
    path : str or Path
    pixel_size : float, (y, x), (z, y, x) or mapping, optional
        Pixel size in micrometres; overrides the file's metadata.
    channel_names : sequence of str, optional
        One name per channel; overrides the metadata.
    chunks : int, optional
        y/x dask chunk size (default: bioio's, one plane); ``convert`` writes with its own chunks.

    Returns
    -------
    xarray.DataArray
        As :func:`l2l_scale.io.tiff.read_tiff`: singleton ``t``/``z`` dropped, ``c`` kept.

    Raises
    ------
    InputError
        bioio or the format's plugin is not installed, or the file cannot be read.
    ChannelError
        ``channel_names`` does not match the channel count.
    """
    import xarray as xr

    from l2l_scale.io.tiff import _override_pixel_size

    path = Path(path)
    try:
        from bioio import BioImage
        from bioio_base.exceptions import UnsupportedFileFormatError
    except ImportError:
        raise _plugin_missing(path) from None
    try:
        img = BioImage(path)
        data = img.reader.xarray_dask_data  # dims T, C, Z, Y, X (bioio's standard order)
        sizes = img.physical_pixel_sizes
        names = [str(c) for c in img.channel_names]
    except UnsupportedFileFormatError:
        raise _plugin_missing(path) from None
    except Exception as exc:  # readers raise their own errors for corrupt files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{path}: cannot read this {path.suffix} file ({first}); check that it is complete") from None
    arr = data.data
    dims = [d.lower() for d in data.dims]
    if tuple(dims) != ("t", "c", "z", "y", "x"):
        raise InputError(f"{path}: unexpected dims {''.join(data.dims)} (RGB or mosaic data?); export the image "
                         "as OME-TIFF or convert it with bioformats2raw")
    keep = [d for d, n in zip(dims, arr.shape) if d in ("c", "y", "x") or n > 1]
    arr = arr[tuple(slice(None) if d in keep else 0 for d in dims)]
    if chunks:
        arr = arr.rechunk({keep.index("y"): int(chunks), keep.index("x"): int(chunks)})
    if isinstance(channel_names, str):
        channel_names = [s.strip() for s in channel_names.split(",")]
    ch_source = "metadata"
    if channel_names is not None:
        if len(channel_names) != arr.shape[keep.index("c")]:
            raise ChannelError(f"{path}: {len(channel_names)} channel names for {arr.shape[keep.index('c')]} "
                               "channels; pass one name per channel")
        names, ch_source = [str(n) for n in channel_names], "--channel-names"
    ps_source = "metadata" if sizes.Y else "default 1.0"
    px = {d: float(v) for d, v in zip("zyx", (sizes.Z, sizes.Y, sizes.X)) if v and d in keep}
    if pixel_size is not None:
        px.update(_override_pixel_size(pixel_size))
        ps_source = "--pixel-size"
    px = {d: px.get(d, 1.0) for d in ("z", "y", "x") if d in keep}
    coords = {"c": names, **{d: np.arange(arr.shape[keep.index(d)]) * px[d] for d in px}}
    reader = type(img.reader).__module__.split(".")[0]
    return xr.DataArray(arr, dims=keep, coords=coords, name=path.stem,
                        attrs={"pixel_size": px, "source": str(path), "reader": reader,
                               "metadata_source": {"pixel_size": ps_source, "channel_names": ch_source}})
