"""The lazy simulated image: :func:`simulate` validates its options and builds one dask task per region."""

from __future__ import annotations

import math
import operator

import numpy as np

from l2l_scale.errors import ConfigError
from l2l_scale.synthetic.render import _render_block
from l2l_scale.synthetic.structures import _spec, channel_names

_MIN_SIZE = 16


def simulate(
    structure: str = "actin",
    size: int | tuple[int, int] = 2048,
    *,
    seed: int = 0,
    n2n: bool = False,
    drift: tuple[float, float] = (0.0, 0.0),
    chunks: int = 1024,
) -> "xarray.DataArray":  # noqa: F821 (imported lazily)
    """Simulate one dual-label field of view, lazily.

    Parameters
    ----------
    structure : str
        One of :data:`STRUCTURES`: ``actin``, ``tubulin``, ``adhesions``, ``caveolae``, ``nuclei-membrane``.
    size : int or (int, int)
        Image size ``n`` or ``(ny, nx)`` in pixels, at least 16.
    seed : int
        Scene and noise seed; the same seed gives the same pixels for any ``chunks``.
    n2n : bool
        Add ``<input>-repeat``, a second acquisition of the input label (same expectation, independent noise).
    drift : (float, float)
        ``(dy, dx)`` in pixels (sub-pixel allowed) of the repeat relative to the input: content at ``p`` in the
        input is at ``p + drift`` in the repeat. ``phase_cross_correlation(input, repeat)`` returns ``-drift``.
        Needs ``n2n``.
    chunks : int
        Chunk edge in pixels (at least 16); chunks are ``(1, chunks, chunks)``. Multiples of 256 (the noise
        grid) are cheapest: other sizes render the 256 px noise tiles they overlap in full.

    Returns
    -------
    xarray.DataArray
        Dask-backed, dims ``("c", "y", "x")``, ``uint16``. Coordinates: ``c`` channel names
        (:func:`channel_names`), ``y``/``x`` pixel positions in micrometres. Attributes: ``pixel_size``
        ``(py, px)`` in micrometres, ``unit`` and ``l2l_synthetic`` (structure, seed, size, n2n, drift, input,
        target, pixel_size_nm).

    Raises
    ------
    ConfigError
        Unknown structure, size or chunks below 16, drift without ``n2n``, ``n2n`` for ``nuclei-membrane``.
    """
    import dask.array as da
    import xarray as xr

    spec = _spec(structure)
    ny, nx = _parse_size(size)
    chunk = _parse_int(chunks, "chunks", "--chunks 1024")
    if chunk < _MIN_SIZE:
        raise ConfigError(f"chunks={chunk} is below {_MIN_SIZE} px; use e.g. --chunks 1024")
    seed = _parse_int(seed, "seed", "--seed 0")
    try:
        dy, dx = (float(d) for d in drift)
    except (TypeError, ValueError):
        raise ConfigError(f"drift={drift!r} is not two numbers (dy, dx) in pixels; use e.g. --drift 2.3 -1.7") from None
    if not (math.isfinite(dy) and math.isfinite(dx)):
        raise ConfigError(f"drift={drift!r} is not finite; use e.g. --drift 2.3 -1.7")
    if (dy, dx) != (0.0, 0.0) and not n2n:
        if len(spec.targets) > 1:
            raise ConfigError(f"drift only applies to a Noise2Noise repeat, which {structure!r} has not; drop --drift")
        raise ConfigError("drift only applies to the Noise2Noise repeat; add --n2n or drop --drift")
    names = channel_names(structure, n2n)

    def _axis_chunks(n):
        return tuple(min(chunk, n - i) for i in range(0, n, chunk))

    data = da.map_blocks(
        _render_block,
        dtype=np.uint16,
        chunks=((len(names),), _axis_chunks(ny), _axis_chunks(nx)),
        meta=np.empty((0, 0, 0), np.uint16),
        token=f"l2l-simulate-{structure}",
        structure=structure,
        seed=seed,
        n2n=bool(n2n),
        drift=(dy, dx),
    )
    # One task renders every channel of a region (they share the geometry); the rechunk only slices.
    data = data.rechunk((1, chunk, chunk))

    ps = spec.pixel_size_um
    target = spec.targets[0] if len(spec.targets) == 1 else list(spec.targets)
    return xr.DataArray(
        data,
        dims=("c", "y", "x"),
        coords={"c": names, "y": np.arange(ny) * ps, "x": np.arange(nx) * ps},
        name=f"synthetic-{structure}",
        attrs={
            "pixel_size": (ps, ps),
            "unit": "micrometer",
            "l2l_synthetic": {
                "structure": structure,
                "seed": seed,
                "size": [ny, nx],
                "n2n": bool(n2n),
                "drift": [dy, dx],
                "input": spec.input,
                "target": target,
                "pixel_size_nm": spec.pixel_size_nm,
            },
        },
    )


def _parse_int(value, what: str, example: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what}={value!r} is not an integer; use e.g. {example}") from None


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ConfigError(f"size={size!r} must be one number or (ny, nx); use e.g. --size 2048")
        ny, nx = (_parse_int(s, "size", "--size 2048") for s in size)
    else:
        ny = nx = _parse_int(size, "size", "--size 2048")
    if min(ny, nx) < _MIN_SIZE:
        raise ConfigError(f"size={size!r} is below {_MIN_SIZE} px; use e.g. --size 2048")
    return ny, nx
