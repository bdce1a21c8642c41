"""The images that ``l2l-scale evaluate`` compares: ``PATH[:CHANNEL]`` specs and their 2-D planes.

An image is named ``PATH[:CHANNEL]``: an OME-Zarr image (a plate field as ``PLATE.zarr/A/1/0``) and a channel
name or index. Without a channel the image must have exactly one. Every image is reduced to one 2-D ``(y, x)``
plane; all must have the target's shape and pixel size. Predictions stored as ``uint16`` by ``l2l-scale predict``
are decoded with the scale and offset in their provenance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ChannelError, ConfigError, InputError
from l2l_scale.io.read import open_image, select_channels

__all__ = ["ImageSpec", "load_image", "parse_method"]

_RESERVED = ("input", "target", "truth")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class ImageSpec:
    """One 2-D image to compare: an OME-Zarr image path and an optional channel (name or index)."""

    path: Path
    channel: str | None = None

    @classmethod
    def parse(cls, spec: "str | Path | ImageSpec | tuple") -> "ImageSpec":
        """Parse ``PATH[:CHANNEL]`` (a path that exists as written is never split), ``(path, channel)`` or a spec.

        Raises
        ------
        ConfigError
            An empty path or channel.
        """
        if isinstance(spec, ImageSpec):
            return spec
        if isinstance(spec, tuple):
            path, channel = spec
            return cls(Path(path), None if channel is None else str(channel))
        if isinstance(spec, Path):
            return cls(spec)
        text = str(spec).strip()
        path, channel = text, None
        # A colon may be part of an existing path (or a Windows drive): split only when the whole text is no path.
        if not Path(text).exists() and ":" in text:
            head, tail = text.rsplit(":", 1)
            if "/" not in tail and "\\" not in tail:
                path, channel = head, tail
        if not path or channel == "":
            raise ConfigError(f"image spec {text!r} is not PATH[:CHANNEL]; e.g. sim.zarr:phalloidin")
        return cls(Path(path), channel)

    def __str__(self) -> str:
        return f"{self.path}:{self.channel}" if self.channel is not None else str(self.path)


def parse_method(text: str) -> tuple[str, ImageSpec]:
    """Parse a ``NAME=PATH[:CHANNEL]`` method option; without ``NAME=`` the name is the file name without ``.zarr``.

    Raises
    ------
    ConfigError
        An invalid or reserved name.
    """
    text = str(text).strip()
    name, _, rest = text.partition("=")
    if not rest:
        spec = ImageSpec.parse(text)
        name = spec.path.name.removesuffix(".zarr") if spec.path.name else str(spec.path)
    else:
        spec = ImageSpec.parse(rest)
    _check_name(name)
    return name, spec


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(f"method name {name!r} must start with a letter or digit and use only letters, digits and "
                          "_.+-; e.g. --method l2l-ssim=restored.zarr")
    if name in _RESERVED:
        raise ConfigError(f"method name {name!r} is reserved for the --{name} image; choose another name, "
                          f"e.g. --method {name}-restored=...")


@dataclass
class _Image:
    """A loaded image: where it came from and its 2-D dask data (decoded, not yet normalised)."""

    name: str
    role: str  # "input", "method", "target" or "truth"
    spec: ImageSpec
    data: xr.DataArray  # dims (y, x)
    channel: str | None
    lo: float | None = None
    hi: float | None = None
    norm: da.Array | None = None  # what the metrics see (normalised and smoothed)
    provenance: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"the {self.role}" if self.role != "method" else f"method {self.name!r}"

    def describe(self) -> dict:
        ps = self.data.attrs.get("pixel_size", {})
        return {
            "name": self.name,
            "role": self.role,
            "spec": str(self.spec),
            "path": str(self.spec.path.resolve()),
            "channel": self.channel,
            "shape": [int(n) for n in self.data.shape],
            "dtype": str(self.data.dtype),
            "stored_dtype": self.extra.get("stored_dtype", str(self.data.dtype)),
            "pixel_size": {d: float(ps[d]) for d in ("y", "x") if d in ps},
            "unit": (self.data.attrs.get("units") or {}).get("x"),
            "normalization": None if self.lo is None else {"lo": self.lo, "hi": self.hi},
            "provenance": self.provenance,
        }


def load_image(spec: "str | Path | ImageSpec | tuple", *, what: str = "image") -> tuple[xr.DataArray, str | None]:
    """Open an image spec lazily as one 2-D ``(y, x)`` DataArray.

    Parameters
    ----------
    spec : str, Path, ImageSpec or (path, channel)
        ``PATH[:CHANNEL]``; see the module notes.
    what : str
        Names the image in error messages (e.g. ``"the target"``).

    Returns
    -------
    (xarray.DataArray, str or None)
        The plane (dask-backed; ``uint16`` predictions decoded to float32 with their stored scale and offset)
        and the channel name.

    Raises
    ------
    InputError
        Not an image, or more than one z/t plane.
    ChannelError
        No channel given for a multi-channel image, or an unknown channel.
    """
    spec = ImageSpec.parse(spec)
    img = open_image(spec.path)
    channel = None
    if "c" in img.dims:
        names = [str(c) for c in img.coords["c"].values]
        if spec.channel is None:
            if len(names) != 1:
                raise ChannelError(f"{what} {spec.path} has channels {names}; name one as {spec.path}:CHANNEL")
            img = img.isel(c=0)
        else:
            try:
                img = select_channels(img, [spec.channel]).isel(c=0)
            except ChannelError as exc:
                raise ChannelError(f"{what} {spec.path}: {exc}") from None
        channel = str(img.coords["c"].values)
        img = img.drop_vars("c")
    elif spec.channel is not None:
        raise ChannelError(f"{what} {spec.path} has no channel axis; drop ':{spec.channel}' from the spec")
    for d in [d for d in img.dims if d not in ("y", "x")]:
        if img.sizes[d] > 1:
            raise InputError(f"{what} {spec.path} has {img.sizes[d]} planes along {d!r}; evaluate compares 2-D "
                             "images, write the plane to compare as its own image first")
        img = img.isel({d: 0}, drop=True)
    img = img.transpose("y", "x")
    u16 = (img.attrs.get("l2l_scale") or {}).get("uint16")
    if u16 and img.dtype == np.uint16:
        # 'l2l-scale predict --dtype uint16' stores value = stored * scale + offset.
        scale, offset = np.float32(u16["scale"]), np.float32(u16["offset"])
        img = (img.astype(np.float32) * scale + offset).assign_attrs(img.attrs, stored_dtype="uint16")
    return img, channel


def _pixel_size(img: xr.DataArray) -> tuple[float, float]:
    ps = img.attrs.get("pixel_size") or {}
    return float(ps.get("y", 1.0)), float(ps.get("x", 1.0))


def _check_compatible(images: Sequence[_Image]) -> None:
    """Every image has the target's shape and pixel size (the first image is the target)."""
    ref = images[0]
    rshape, rps = tuple(ref.data.shape), _pixel_size(ref.data)
    for im in images[1:]:
        shape, ps = tuple(im.data.shape), _pixel_size(im.data)
        if shape != rshape:
            raise InputError(f"{im.label} {im.spec} is {shape[0]}x{shape[1]} px but the target {ref.spec} is "
                             f"{rshape[0]}x{rshape[1]} px; compare images of the same field (crop or register "
                             "them first)")
        if not np.allclose(ps, rps, rtol=1e-6, atol=0.0):
            raise InputError(f"{im.label} {im.spec} has pixel size {ps[0]:g}x{ps[1]:g} but the target {ref.spec} "
                             f"has {rps[0]:g}x{rps[1]:g}; compare images at the same resolution (same pyramid "
                             "level and magnification)")
