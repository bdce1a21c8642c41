"""Dual-label simulator with ground truth, lazy and chunk-independent.

:func:`simulate` returns a dask-backed :class:`xarray.DataArray` ``(c, y, x)`` of ``uint16`` that looks like one
field of view of a Label2label acquisition (Kölln et al., J Cell Sci 2022): an *input-like* label (the lower
contrast antibody: the structure plus diffuse cytosolic background, unspecific puncta and a different intensity
along the structure), a *target-like* label (specific, low background), optionally a second noise realisation
of the input for Noise2Noise (``n2n=True``), and the noise-free ``truth``.

How it stays chunk-independent
------------------------------
* The scene is continuous geometry in pixel units. Space is cut into coarse *cell tiles* (one cell each, pitch
  ``StructureSpec.cell_pitch_um``); every tile draws its cell and its primitives (fibres, microtubules, plaques,
  puncta) from an RNG seeded by ``(seed, structure, tile index)``. All primitives of a tile stay within the
  tile grown by ``_REACH`` x pitch, so a chunk regenerates exactly the tiles that can touch it.
* Line and point primitives are sampled as weighted points and splatted bilinearly (the fractional parts are
  taken in global coordinates, so the weights do not depend on the chunk); cell and nucleus masks and the
  cytosolic background are analytic functions evaluated per pixel.
* Each channel is blurred with its own Gaussian PSF on the chunk grown by a halo of ``ceil(4 sigma) + 1`` px
  (``scipy.ndimage.gaussian_filter``, ``truncate=4``) and cropped.
* Noise lives on a fixed global grid of 256 x 256 tiles, each with its own RNG seeded by
  ``(seed, structure, channel, noise tile)``: exact Poisson photon counts (numpy's sampler needs the whole
  tile, so a chunk renders the noise tiles it overlaps in full) plus Gaussian read noise.

The result: any chunking gives bit-identical pixels, and one chunk task needs O(chunk) memory. All channels of a
region are rendered by one task (they share the geometry) and split per channel by a dask rechunk.

Drift (Noise2Noise repeat)
--------------------------
``drift=(dy, dx)`` renders the repeat of the input label from the same geometry moved by ``+drift`` (points are
moved, analytic fields are evaluated at ``(y - dy, x - dx)``): content at position ``p`` in the input appears at
``p + drift`` in the repeat, ``repeat(y, x) ~ input(y - dy, x - dx)``. Hence
``skimage.registration.phase_cross_correlation(input, repeat)`` returns ``-drift`` (the shift that registers the
repeat onto the input).

Calibration
-----------
Intensities were tuned so that the label contrast (:func:`l2l_scale.preprocess.contrast.label_contrast`, the
paper's recipe, unclipped) and the raw input-vs-target PSNR land near the paper's values. Measured on
``simulate(structure, 2048, seed=s)``, mean +- s.d. over seeds 0-3; PSNR on foreground 128^2 patches after
percentile normalisation of both channels (paper Table 2 percentiles; caveolae after a Gaussian sigma=1.5):

.. CALIBRATION-TABLE (filled in by the numbers measured with ``_calibration``)

Channel names and pixel sizes
-----------------------------
=================  ===========  ======================  =====================  ==========
structure          input        target(s)               truth                  pixel (nm)
=================  ===========  ======================  =====================  ==========
actin              AC-15        phalloidin              truth                  45 (confocal)
tubulin            DM1A         YOL1/34                 truth                  45 (confocal)
adhesions          5H11         Y113                    truth                  45 (confocal)
caveolae           D1P6W        4H312                   truth                  10 (STED)
nuclei-membrane    superposed   SYTOX, CD44             truth-SYTOX,           70.8 (confocal)
                                                        truth-CD44
=================  ===========  ======================  =====================  ==========

The confocal pixel is the 184.5 um field of a Leica SP8 63x/1.4 objective at zoom 1 sampled with 4096 px
(2608 px for the separation data), as in the paper's Table 2. ``nuclei-membrane`` is the separation task: its
input is the sum of both markers and it has two truths because there are two structures; it has no
Noise2Noise repeat.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from l2l_scale.errors import ConfigError

__all__ = ["STRUCTURES", "StructureSpec", "channel_names", "simulate"]

_NOISE_TILE = 256  # global noise grid (px); chunk-independent noise is generated per noise tile
_TRUNCATE = 4.0  # Gaussian PSF truncation in sigmas, fixes the halo
_REACH = 0.15  # a tile's primitives stay within the tile grown by this fraction of the pitch
_MIN_SIZE = 16


# --------------------------------------------------------------------------------------------------------------
# Structure specifications
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StructureSpec:
    """One simulated dual-label dataset.

    Attributes
    ----------
    name : str
        Key in :data:`STRUCTURES`.
    input : str
        Channel name of the input-like (lower contrast) label.
    targets : tuple of str
        Channel name(s) of the target-like label(s); two for the separation task.
    pixel_size_nm : float
        Pixel size in nanometres (square pixels).
    modality : str
        ``"confocal"`` or ``"STED"``.
    psf_fwhm_nm : (float, float)
        Lateral PSF FWHM of the input and the target label.
    cell_pitch_um : float
        Pitch of the jittered cell grid (one cell per tile).
    contrast_fraction : float
        Brightest fraction used as the contrast sample (paper: 0.10, 0.01 for STED caveolae).
    percentiles : (float, float)
        Normalisation percentiles of the paper's Table 2 for this dataset.
    contrast_percentiles : (float, float)
        Percentiles for :func:`~l2l_scale.preprocess.contrast.label_contrast` (paper: 1/99; the caveolae use
        their Table 2 percentiles 2/99.5 because a clipped 1 % sample needs a high percentile above 99).
    description : str
        What is simulated.
    params : dict
        Rendering parameters (photon levels, densities, modulation strengths), see ``_render_block``.
    """

    name: str
    input: str
    targets: tuple[str, ...]
    pixel_size_nm: float
    modality: str
    psf_fwhm_nm: tuple[float, float]
    cell_pitch_um: float
    contrast_fraction: float
    percentiles: tuple[float, float]
    description: str
    params: dict = field(default_factory=dict)
    contrast_percentiles: tuple[float, float] = (1.0, 99.0)

    @property
    def truths(self) -> tuple[str, ...]:
        """Ground-truth channel names (``truth``, or ``truth-<target>`` when there are several targets)."""
        return ("truth",) if len(self.targets) == 1 else tuple(f"truth-{t}" for t in self.targets)

    @property
    def pixel_size_um(self) -> float:
        """Pixel size in micrometres."""
        return self.pixel_size_nm / 1000.0

    def psf_sigma_px(self) -> tuple[float, float]:
        """Gaussian PSF sigma (px) of the input and the target label."""
        f = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)) * self.pixel_size_nm)
        return self.psf_fwhm_nm[0] * f, self.psf_fwhm_nm[1] * f


# Photon levels are expected photons per pixel at the peak of a typical isolated element (one fibre, one
# microtubule, one plaque, one caveola) in the noise-free image; ``*_bg`` is the cytosolic level inside the cell.
# ``*_mod`` is the s.d. of the log of the smooth multiplicative intensity modulation along the structure.
_COMMON = dict(dark=0.3, adu=16.0, offset_adu=100.0, read_adu=6.0, truth_gain=1000.0, fill=0.9)

STRUCTURES: dict[str, StructureSpec] = {
    "actin": StructureSpec(
        name="actin", input="AC-15", targets=("phalloidin",), pixel_size_nm=45.0, modality="confocal",
        psf_fwhm_nm=(230.0, 220.0), cell_pitch_um=46.0, contrast_fraction=0.10, percentiles=(1.0, 99.9),
        description="HeLa actin: curved stress fibres and bundles, cortical ring, short meshwork filaments",
        params=dict(_COMMON, tg_peak=20.0, tg_bg=0.2, in_peak=6.0, in_bg=7.0, in_nuc=0.6,
                    punct_density=0.25, punct_peak=12.0, in_mod=0.45, tg_mod=0.1),
    ),
    "tubulin": StructureSpec(
        name="tubulin", input="DM1A", targets=("YOL1/34",), pixel_size_nm=45.0, modality="confocal",
        psf_fwhm_nm=(235.0, 225.0), cell_pitch_um=40.0, contrast_fraction=0.10, percentiles=(1.0, 99.9),
        description="MeT5A microtubules: dense network of curved filaments radiating from a centrosome",
        params=dict(_COMMON, tg_peak=12.0, tg_bg=0.5, in_peak=5.0, in_bg=6.0, in_nuc=0.5,
                    punct_density=0.2, punct_peak=8.0, in_mod=0.3, tg_mod=0.35),
    ),
    "adhesions": StructureSpec(
        name="adhesions", input="5H11", targets=("Y113",), pixel_size_nm=45.0, modality="confocal",
        psf_fwhm_nm=(235.0, 225.0), cell_pitch_um=40.0, contrast_fraction=0.10, percentiles=(1.0, 99.9),
        description="paxillin: elongated focal-adhesion plaques at the cell edge, oriented radially",
        params=dict(_COMMON, tg_peak=30.0, tg_bg=1.0, in_peak=12.0, in_bg=8.0, in_nuc=0.7,
                    punct_density=0.15, punct_peak=10.0, in_mod=0.35, tg_mod=0.1),
    ),
    "caveolae": StructureSpec(
        name="caveolae", input="D1P6W", targets=("4H312",), pixel_size_nm=10.0, modality="STED",
        psf_fwhm_nm=(75.0, 70.0), cell_pitch_um=40.0, contrast_fraction=0.01, percentiles=(2.0, 99.5),
        description="caveolae: 60-100 nm puncta over the cell area, STED",
        params=dict(_COMMON, tg_peak=8.0, tg_bg=0.05, in_peak=2.0, in_bg=1.2, in_nuc=1.0,
                    punct_density=3.0, punct_peak=1.5, in_mod=0.6, tg_mod=0.3,
                    caveolae_density=3.0, dark=0.05, read_adu=3.0),
        contrast_percentiles=(2.0, 99.5),
    ),
    "nuclei-membrane": StructureSpec(
        name="nuclei-membrane", input="superposed", targets=("SYTOX", "CD44"), pixel_size_nm=70.8,
        modality="confocal", psf_fwhm_nm=(220.0, 220.0), cell_pitch_um=40.0, contrast_fraction=0.10,
        percentiles=(2.0, 99.8),
        description="separation: filled nuclei (SYTOX) and plasma-membrane outline (CD44), input is their sum",
        params=dict(_COMMON, sytox_peak=40.0, cd44_peak=15.0, cd44_bg=1.5, sup_sytox=0.8, sup_cd44=0.8,
                    nuc_texture=0.25),
    ),
}


def _spec(structure: str) -> StructureSpec:
    try:
        return STRUCTURES[structure]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown structure {structure!r}; use one of: {', '.join(STRUCTURES)}"
        ) from None


def channel_names(structure: str, n2n: bool = False) -> list[str]:
    """Channel names of :func:`simulate`, in order.

    Input-like label first, then the target-like label(s), then ``<input>-repeat`` when ``n2n``, then the
    ground truth last (``truth``; ``truth-SYTOX``, ``truth-CD44`` for ``nuclei-membrane``).

    Raises
    ------
    ConfigError
        Unknown structure, or ``n2n`` for the separation task.
    """
    spec = _spec(structure)
    if n2n and len(spec.targets) > 1:
        raise ConfigError(f"structure {structure!r} has no Noise2Noise repeat; drop --n2n")
    names = [spec.input, *spec.targets]
    if n2n:
        names.append(f"{spec.input}-repeat")
    return names + list(spec.truths)


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def simulate(
    structure: str = "actin",
    size: int | tuple[int, int] = 2048,
    *,
    seed: int = 0,
    n2n: bool = False,
    drift: tuple[float, float] = (0.0, 0.0),
    chunks: int = 1024,
):
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
        Chunk edge in pixels (at least 16); chunks are ``(1, chunks, chunks)``.

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
        raise ConfigError("drift only applies to the Noise2Noise repeat; add --n2n or drop --drift")
    names = channel_names(structure, n2n)

    def _axis_chunks(n):
        return tuple(min(chunk, n - i) for i in range(0, n, chunk))

    data = da.map_blocks(
        _render_block,
        dtype=np.uint16,
        chunks=((len(names),), _axis_chunks(ny), _axis_chunks(nx)),
        meta=np.empty((0, 0, 0), np.uint16),
        name=f"l2l-simulate-{structure}",
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


# --------------------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------------------


def _zz(i: int) -> int:
    """Zig-zag map of any integer to a non-negative one (SeedSequence needs non-negative entropy)."""
    i = int(i)
    return 2 * i if i >= 0 else -2 * i - 1


def _rng(seed: int, structure: str, *keys: int) -> np.random.Generator:
    code = zlib.crc32(structure.encode())  # stable across processes, unlike hash()
    return np.random.default_rng([_zz(seed), code, *(_zz(k) for k in keys)])


# --------------------------------------------------------------------------------------------------------------
# Cells: analytic soft masks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipse:
    """Rotated ellipse with low-order radial wobble, evaluated analytically (``rho < 1`` inside)."""

    cy: float
    cx: float
    a: float  # semi-axis along the rotated u axis (px)
    b: float
    cos: float
    sin: float
    harm: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # cos2, sin2, cos3, sin3 amplitudes

    @property
    def radius(self) -> float:
        """Upper bound of the distance from the centre to the ``rho == 1`` outline."""
        return max(self.a, self.b) * (1.0 + sum(abs(h) for h in self.harm))

    def rho(self, y, x):
        """Normalised radius: 1 on the (wobbly) outline; broadcasts ``y`` against ``x``."""
        dy = y - self.cy
        dx = x - self.cx
        u = (dx * self.cos + dy * self.sin) / self.a
        v = (dy * self.cos - dx * self.sin) / self.b
        r = np.sqrt(u * u + v * v)
        if not any(self.harm):
            return r
        rs = np.maximum(r, 1e-12)
        c = u / rs
        s = v / rs
        h2c, h2s, h3c, h3s = self.harm
        # cos/sin of 2 phi and 3 phi from c = cos(phi), s = sin(phi): no atan2 per pixel.
        wob = 1.0 + h2c * (c * c - s * s) + h2s * (2.0 * c * s) + h3c * (4.0 * c**3 - 3.0 * c) + h3s * (3.0 * s - 4.0 * s**3)
        return r / wob

    def outline(self, rho: float, step: float):
        """Points on the level set ``rho`` (``step`` px apart, approximately), and the outward angle."""
        n = max(16, int(2 * math.pi * max(self.a, self.b) * rho / step))
        phi = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        c, s = np.cos(phi), np.sin(phi)
        h2c, h2s, h3c, h3s = self.harm
        wob = 1.0 + h2c * np.cos(2 * phi) + h2s * np.sin(2 * phi) + h3c * np.cos(3 * phi) + h3s * np.sin(3 * phi)
        u = rho * wob * c * self.a
        v = rho * wob * s * self.b
        x = self.cx + u * self.cos - v * self.sin
        y = self.cy + u * self.sin + v * self.cos
        return y, x


@dataclass(frozen=True)
class _Waves:
    """Smooth random field: sum of plane waves, unit variance, evaluated at points or separably on a grid."""

    ky: np.ndarray
    kx: np.ndarray
    phase: np.ndarray

    @classmethod
    def draw(cls, rng, n: int, wavelength: tuple[float, float]):
        lam = rng.uniform(*wavelength, n)
        ang = rng.uniform(0, math.pi, n)
        k = 2 * math.pi / lam
        return cls(k * np.sin(ang), k * np.cos(ang), rng.uniform(0, 2 * math.pi, n))

    def at(self, y, x):
        out = np.zeros(np.broadcast(y, x).shape)
        for ky, kx, ph in zip(self.ky, self.kx, self.phase):
            out += np.cos(ky * y + kx * x + ph)
        return out * math.sqrt(2.0 / len(self.ky))

    def grid(self, y, x):
        """Same as ``at(y[:, None], x[None, :])``, via cos(a + b) = cos a cos b - sin a sin b (cheaper)."""
        out = np.zeros((y.size, x.size))
        for ky, kx, ph in zip(self.ky, self.kx, self.phase):
            ay = ky * y + ph
            bx = kx * x
            out += np.cos(ay)[:, None] * np.cos(bx)[None, :] - np.sin(ay)[:, None] * np.sin(bx)[None, :]
        return out * math.sqrt(2.0 / len(self.ky))


@dataclass
class _Tile:
    """One cell tile: the cell, its nucleus and the primitives drawn for it (global pixel coordinates)."""

    cell: _Ellipse
    nucleus: _Ellipse
    bg_waves: _Waves
    edge: float  # soft-edge width of the cell mask in rho units
    sy: np.ndarray  # structure points
    sx: np.ndarray
    sw: np.ndarray  # weight (1 = typical element)
    sm_in: np.ndarray  # multiplicative intensity of the input label at each point
    sm_tg: np.ndarray  # ... and of the target label
    py: np.ndarray  # unspecific puncta of the input label
    px: np.ndarray
    pw: np.ndarray  # peak photons of each punctum


def _draw_cell(rng, ty: int, tx: int, pitch: float):
    cy = (ty + 0.5 + rng.uniform(-0.1, 0.1)) * pitch
    cx = (tx + 0.5 + rng.uniform(-0.1, 0.1)) * pitch
    a = rng.uniform(0.33, 0.42) * pitch
    b = a * rng.uniform(0.6, 0.95)
    th = rng.uniform(0, math.pi)
    harm = tuple(rng.uniform(-0.05, 0.05, 4))
    cell = _Ellipse(cy, cx, a, b, math.cos(th), math.sin(th), harm)
    # nucleus: an ellipse near the centre, roughly aligned with the cell
    off = rng.uniform(0, 0.15, 2) * np.array([b, a])
    na = a * rng.uniform(0.28, 0.36)
    nb = na * rng.uniform(0.7, 0.95)
    nth = th + rng.normal(0, 0.3)
    nucleus = _Ellipse(cy + off[0], cx + off[1], na, nb, math.cos(nth), math.sin(nth))
    return cell, nucleus


def _inside(cell: _Ellipse, y, x, rho_max: float):
    return cell.rho(y, x) < rho_max


def _lognormal(rng, sd, n):
    """Positive factors with mean 1 and log-s.d. ``sd``."""
    return np.exp(rng.normal(-0.5 * sd * sd, sd, n))


# --------------------------------------------------------------------------------------------------------------
# Structure primitives (one cell tile)
# --------------------------------------------------------------------------------------------------------------


def _polyline_points(y0, x0, heading, ds):
    """Integrate headings (n_lines, n_steps) into points starting at (y0, x0)."""
    y = y0[:, None] + np.cumsum(np.sin(heading) * ds, axis=1)
    x = x0[:, None] + np.cumsum(np.cos(heading) * ds, axis=1)
    return y, x


def _prims_actin(rng, cell, nucleus, um, n_fibres=(10, 22)):
    ys, xs, ws = [], [], []
    R = max(cell.a, cell.b)
    # Stress fibres: long, gently bowed chords, mostly along one dominant direction per cell, 0.1-0.4 um wide
    # (1-4 parallel lines 1.6 px apart), tapered over 1 um at both ends.
    n = int(rng.integers(*n_fibres))
    th_d = rng.uniform(0, math.pi)
    th = th_d + rng.normal(0, 0.25, n)
    off = rng.uniform(-0.85, 0.85, n) * min(cell.a, cell.b)
    bow = rng.normal(0, 0.05, n) * R
    half = rng.uniform(0.3, 1.0, n) * 1.2 * R  # half-length before clipping to the cell
    centre = rng.uniform(-0.4, 0.4, n) * R
    lines = rng.choice([2, 3, 4, 5], n)
    w = _lognormal(rng, 0.25, n)
    s = np.arange(-1.2 * R, 1.2 * R, 1.0)
    c, sn = np.cos(th)[:, None], np.sin(th)[:, None]
    for k in range(4):
        sel = lines > k
        if not sel.any():
            continue
        lat = (k - (lines[sel] - 1) / 2.0)[:, None] * 1.6
        perp = off[sel, None] + lat + bow[sel, None] * (1 - (s[None, :] / (1.2 * R)) ** 2)
        y = cell.cy + s[None, :] * sn[sel] + perp * c[sel]
        x = cell.cx + s[None, :] * c[sel] - perp * sn[sel]
        dist = half[sel, None] - np.abs(s[None, :] - centre[sel, None])  # distance to the fibre end
        taper = np.clip(dist / um, 0.0, 1.0)
        keep = (taper > 0) & _inside(cell, y, x, 0.95)
        ys.append(y[keep]); xs.append(x[keep]); ws.append((w[sel, None] * taper)[keep])
    # Cortical ring just inside the membrane.
    y, x = cell.outline(0.965, 1.0)
    ys.append(y); xs.append(x); ws.append(np.full(y.size, 1.0))
    # Short, faint meshwork filaments near the edge.
    n = int(rng.integers(60, 120))
    L = rng.uniform(0.8, 3.0, n) * um
    rho0 = rng.uniform(0.55, 0.92, n)
    phi = rng.uniform(0, 2 * math.pi, n)
    u, v = rho0 * np.cos(phi) * cell.a, rho0 * np.sin(phi) * cell.b
    y0 = cell.cy + u * cell.sin + v * cell.cos
    x0 = cell.cx + u * cell.cos - v * cell.sin
    th = rng.uniform(0, 2 * math.pi, n)
    t = np.arange(0, 3.0 * um, 1.0)
    y = y0[:, None] + t[None, :] * np.sin(th)[:, None]
    x = x0[:, None] + t[None, :] * np.cos(th)[:, None]
    keep = (t[None, :] < L[:, None]) & _inside(cell, y, x, 0.95)
    ys.append(y[keep]); xs.append(x[keep]); ws.append(np.full(int(keep.sum()), 0.3))
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)


def _prims_tubulin(rng, cell, nucleus, um):
    R = max(cell.a, cell.b)
    # Centrosome next to the nucleus.
    phi = rng.uniform(0, 2 * math.pi)
    cy = nucleus.cy + 1.15 * nucleus.b * math.sin(phi)
    cx = nucleus.cx + 1.15 * nucleus.a * math.cos(phi)
    n = int(rng.integers(160, 240))
    th0 = rng.uniform(0, 2 * math.pi, n)
    r0 = rng.uniform(0.3, 3.0, n) * um  # start a little away from the centrosome: no 200-fold aster
    n_steps = int(1.6 * R)
    # Persistence length ~10 um: heading random walk with variance ds / Lp per 1-px step.
    dth = rng.normal(0, math.sqrt(1.0 / (10.0 * um)), (n, n_steps))
    heading = th0[:, None] + np.cumsum(dth, axis=1)
    y, x = _polyline_points(cy + r0 * np.sin(th0), cx + r0 * np.cos(th0), heading, 1.0)
    L = rng.uniform(0.35, 1.0, n) * 1.6 * R
    inside = _inside(cell, y, x, 0.96)
    # a microtubule ends where it first leaves the cell (or at its own length)
    alive = np.logical_and.accumulate(inside, axis=1) & (np.arange(n_steps)[None, :] < L[:, None])
    w = np.where(rng.random(n) < 0.1, 2.0, 1.0)
    return y[alive], x[alive], np.broadcast_to(w[:, None], y.shape)[alive]


def _prims_adhesions(rng, cell, nucleus, um):
    ys, xs, ws = [], [], []
    n = int(rng.integers(45, 90))
    # Plaques gather at the cell ends along the long axis; radial orientation.
    phi = rng.vonmises(0.0, 0.8, n) + rng.choice([0.0, math.pi], n)
    rho0 = rng.uniform(0.8, 0.93, n)
    length = np.clip(rng.lognormal(math.log(2.0), 0.4, n), 0.7, 5.0) * um
    width = rng.uniform(0.3, 0.55, n) * um
    bright = _lognormal(rng, 0.35, n)
    jitter = rng.normal(0, 0.2, n)
    sp = 0.7  # lattice spacing (px): smooth after the PSF
    for i in range(n):
        u0 = rho0[i] * math.cos(phi[i]) * cell.a
        v0 = rho0[i] * math.sin(phi[i]) * cell.b
        y0 = cell.cy + u0 * cell.sin + v0 * cell.cos
        x0 = cell.cx + u0 * cell.cos - v0 * cell.sin
        th = math.atan2(y0 - cell.cy, x0 - cell.cx) + jitter[i]
        hl, hw = length[i] / 2, width[i] / 2
        gu, gv = np.meshgrid(np.arange(-hl, hl + sp, sp), np.arange(-hw, hw + sp, sp), indexing="ij")
        r2 = (gu / hl) ** 2 + (gv / hw) ** 2
        m = r2 <= 1.0
        gu, gv = gu[m], gv[m]
        # plaque centre sits a half-length inside so the plaque ends near the membrane
        py = y0 + (gu - 0.3 * hl) * math.sin(th) + gv * math.cos(th)
        px = x0 + (gu - 0.3 * hl) * math.cos(th) - gv * math.sin(th)
        # peak 1 at the target PSF for a plaque that is wider than the PSF: areal density 1 / sp^2 -> level 1
        w = bright[i] * np.sqrt(1.0 - r2[m] * 0.8)
        ys.append(py); xs.append(px); ws.append(w)
    # Nascent adhesions: small dots along the edge.
    y, x = cell.outline(0.9, 1.0)
    pick = rng.random(y.size) < 40.0 / max(y.size, 1)
    for dy, dx in ((0, 0), (0.7, 0), (0, 0.7), (0.7, 0.7)):
        ys.append(y[pick] + dy); xs.append(x[pick] + dx); ws.append(np.full(int(pick.sum()), 0.6))
    y, x, w = np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)
    keep = _inside(cell, y, x, 0.99)
    return y[keep], x[keep], w[keep] * sp * sp  # lattice points carry their area


def _prims_caveolae(rng, cell, nucleus, um, density):
    area_um2 = math.pi * cell.a * cell.b / um**2
    n = rng.poisson(density * area_um2)
    # Half of the caveolae sit in clusters (rosettes), half scattered.
    n_cl = max(1, n // 12)
    cly, clx = _uniform_in(rng, cell, n_cl, 0.95)
    k = rng.integers(0, n_cl, n // 2)
    sy, sx = _uniform_in(rng, cell, n - n // 2, 0.95)
    cy = np.concatenate([cly[k] + rng.normal(0, 0.12 * um, k.size), sy])
    cx = np.concatenate([clx[k] + rng.normal(0, 0.12 * um, k.size), sx])
    r = rng.uniform(0.030, 0.050, cy.size) * um  # 60-100 nm diameter
    rot = rng.uniform(0, 2 * math.pi, cy.size)
    ang = rot[:, None] + np.arange(8)[None, :] * (2 * math.pi / 8)
    y = cy[:, None] + r[:, None] * np.sin(ang)
    x = cx[:, None] + r[:, None] * np.cos(ang)
    w = np.broadcast_to(_lognormal(rng, 0.35, cy.size)[:, None], y.shape)
    keep = _inside(cell, y, x, 0.99)
    return y[keep], x[keep], w[keep]


def _uniform_in(rng, cell, n, rho_max):
    """``n`` points uniform in the cell (rejection sampling, fixed number of RNG draws per round)."""
    ys, xs, got = [np.zeros(0)], [np.zeros(0)], 0
    R = cell.radius
    while got < n:
        m = max(64, 2 * (n - got))
        y = cell.cy + rng.uniform(-R, R, m)
        x = cell.cx + rng.uniform(-R, R, m)
        ok = _inside(cell, y, x, rho_max)
        ys.append(y[ok]); xs.append(x[ok]); got += int(ok.sum())
    return np.concatenate(ys)[:n], np.concatenate(xs)[:n]


def _prims_membrane(rng, cell, nucleus, um):
    ys, xs, ws = [], [], []
    y, x = cell.outline(0.985, 1.0)
    ys.append(y); xs.append(x); ws.append(np.full(y.size, 1.0))
    # Ruffles / microvilli: short radial protrusions of the membrane.
    n = int(rng.integers(20, 50))
    phi = rng.uniform(0, 2 * math.pi, n)
    t = np.arange(0, 1.5 * um, 1.0)
    rho = 0.985 - t[None, :] / max(cell.a, cell.b)
    u = rho * np.cos(phi)[:, None] * cell.a
    v = rho * np.sin(phi)[:, None] * cell.b
    y = cell.cy + u * cell.sin + v * cell.cos
    x = cell.cx + u * cell.cos - v * cell.sin
    L = rng.uniform(0.3, 1.5, n)[:, None] * um
    keep = np.broadcast_to(t[None, :] < L, y.shape)
    ys.append(y[keep]); xs.append(x[keep]); ws.append(np.full(int(keep.sum()), 0.5))
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)


def _make_tile(spec: StructureSpec, seed: int, ty: int, tx: int) -> _Tile | None:
    """Cell and primitives of one tile, or None for an empty tile. Deterministic in (spec, seed, ty, tx)."""
    rng = _rng(seed, spec.name, 1, ty, tx)
    p = spec.params
    pitch = spec.cell_pitch_um / spec.pixel_size_um
    um = 1.0 / spec.pixel_size_um  # px per micrometre
    if rng.random() >= p["fill"]:
        return None
    cell, nucleus = _draw_cell(rng, ty, tx, pitch)
    bg_waves = _Waves.draw(rng, 3, (8 * um, 25 * um))
    if spec.name == "actin":
        sy, sx, sw = _prims_actin(rng, cell, nucleus, um)
    elif spec.name == "tubulin":
        sy, sx, sw = _prims_tubulin(rng, cell, nucleus, um)
    elif spec.name == "adhesions":
        sy, sx, sw = _prims_adhesions(rng, cell, nucleus, um)
    elif spec.name == "caveolae":
        sy, sx, sw = _prims_caveolae(rng, cell, nucleus, um, p["caveolae_density"])
    else:
        sy, sx, sw = _prims_membrane(rng, cell, nucleus, um)
    sw = np.ascontiguousarray(sw, dtype=np.float64)
    # Label-specific intensity along the structure: a smooth random field (2-6 um) per label.
    if "in_mod" in p:
        w_in = _Waves.draw(rng, 4, (2 * um, 6 * um))
        w_tg = _Waves.draw(rng, 4, (2 * um, 6 * um))
        sm_in = np.exp(p["in_mod"] * w_in.at(sy, sx) - 0.5 * p["in_mod"] ** 2)
        sm_tg = np.exp(p["tg_mod"] * w_tg.at(sy, sx) - 0.5 * p["tg_mod"] ** 2)
        # Unspecific binding of the input antibody: small bright puncta in the cytoplasm.
        n = rng.poisson(p["punct_density"] * math.pi * cell.a * cell.b / um**2)
        py, px = _uniform_in(rng, cell, n, 0.97)
        pw = p["punct_peak"] * _lognormal(rng, 0.5, n)
    else:
        sm_in = sm_tg = np.ones_like(sw)
        py = px = pw = np.zeros(0)
    return _Tile(cell, nucleus, bg_waves, 0.04, sy, sx, sw, sm_in, sm_tg, py, px, pw)


# --------------------------------------------------------------------------------------------------------------
# Rendering one region
# --------------------------------------------------------------------------------------------------------------


def _halo(sigma: float) -> int:
    return int(math.ceil(_TRUNCATE * sigma)) + 1


def _tiles_for(spec, seed, y0, y1, x0, x1):
    """Tiles whose primitives can land in [y0, y1) x [x0, x1), in a fixed (row-major) order."""
    pitch = spec.cell_pitch_um / spec.pixel_size_um
    reach = _REACH * pitch
    ty0, ty1 = math.floor((y0 - reach) / pitch), math.floor((y1 + reach) / pitch)
    tx0, tx1 = math.floor((x0 - reach) / pitch), math.floor((x1 + reach) / pitch)
    out = []
    for ty in range(ty0, ty1 + 1):
        for tx in range(tx0, tx1 + 1):
            t = _make_tile(spec, seed, ty, tx)
            if t is not None:
                out.append(t)
    return out


def _splat(y, x, w, oy, ox, shape):
    """Bilinear splat of weighted points into an array whose pixel (0, 0) is at global (oy, ox).

    Fractions are taken in global coordinates, so a point's weights do not depend on the region.
    """
    ny, nx = shape
    out = np.zeros(ny * nx)
    if y.size == 0:
        return out.reshape(shape)
    fy = np.floor(y)
    fx = np.floor(x)
    ty = y - fy
    tx = x - fx
    iy = fy.astype(np.int64) - oy
    ix = fx.astype(np.int64) - ox
    for dy, wy in ((0, 1.0 - ty), (1, ty)):
        for dx, wx in ((0, 1.0 - tx), (1, tx)):
            yy = iy + dy
            xx = ix + dx
            ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            out += np.bincount(yy[ok] * nx + xx[ok], weights=(w * wy * wx)[ok], minlength=ny * nx)
    return out.reshape(shape)


def _fields(tiles, ys, xs, nuc_level, texture=None):
    """Cytosolic field (cell mask, ``nuc_level`` over the nucleus, smooth +-25 % texture) and nucleus field."""
    cyto = np.zeros((ys.size, xs.size))
    nuc = np.zeros((ys.size, xs.size))
    for t in tiles:
        R = t.cell.radius * (1 + t.edge) + 2
        sl = _window(ys, xs, t.cell.cy, t.cell.cx, R)
        if sl is None:
            continue
        yy, xx = ys[sl[0]][:, None], xs[sl[1]][None, :]
        cm = np.clip((1.0 - t.cell.rho(yy, xx)) / t.edge, 0.0, 1.0)
        nm = np.clip((1.0 - t.nucleus.rho(yy, xx)) / 0.08, 0.0, 1.0)
        tex = 1.0 + 0.25 * t.bg_waves.grid(ys[sl[0]], xs[sl[1]])
        val = cm * (1.0 - (1.0 - nuc_level) * nm) * tex
        np.maximum(cyto[sl], val, out=cyto[sl])
        if texture is not None:
            tn = np.clip(1.0 + texture * t.bg_waves.grid(ys[sl[0]] * 6.0, xs[sl[1]] * 6.0), 0.0, None)
            np.maximum(nuc[sl], nm * cm * tn, out=nuc[sl])
    return cyto, nuc


def _window(ys, xs, cy, cx, R):
    iy0 = int(np.searchsorted(ys, cy - R)); iy1 = int(np.searchsorted(ys, cy + R, side="right"))
    ix0 = int(np.searchsorted(xs, cx - R)); ix1 = int(np.searchsorted(xs, cx + R, side="right"))
    if iy0 >= iy1 or ix0 >= ix1:
        return None
    return slice(iy0, iy1), slice(ix0, ix1)


def _blur(a, sigma):
    return ndimage.gaussian_filter(a, sigma, truncate=_TRUNCATE, mode="constant")


def _cat(tiles, attr):
    return np.concatenate([getattr(t, attr) for t in tiles]) if tiles else np.zeros(0)


def _expected(spec, tiles, oy, ox, shape, shift=(0.0, 0.0), which=("input", "target", "truth")):
    """Noise-free photon images (and truth) on the extended region; ``shift`` moves the whole scene."""
    p = spec.params
    s_in, s_tg = spec.psf_sigma_px()
    dy, dx = shift
    ys = np.arange(oy, oy + shape[0], dtype=np.float64) - dy
    xs = np.arange(ox, ox + shape[1], dtype=np.float64) - dx
    sy, sx = _cat(tiles, "sy") + dy, _cat(tiles, "sx") + dx
    sw = _cat(tiles, "sw")
    out = {}
    if spec.name == "nuclei-membrane":
        _, nuc = _fields(tiles, ys, xs, 1.0, texture=p["nuc_texture"])
        cyto, _ = _fields(tiles, ys, xs, 1.0)
        mem = _splat(sy, sx, sw * math.sqrt(2 * math.pi) * s_tg, oy, ox, shape)
        b_nuc, b_mem, b_cyto = _blur(nuc, s_tg), _blur(mem, s_tg), _blur(cyto, s_tg)
        sytox = p["sytox_peak"] * b_nuc
        cd44 = p["cd44_peak"] * b_mem + p["cd44_bg"] * b_cyto
        out["input"] = p["dark"] + p["sup_sytox"] * sytox + p["sup_cd44"] * cd44
        out["SYTOX"] = p["dark"] + sytox
        out["CD44"] = p["dark"] + cd44
        out["truth-SYTOX"] = p["truth_gain"] * b_nuc
        out["truth-CD44"] = p["truth_gain"] * b_mem
        return out

    cyto, _ = _fields(tiles, ys, xs, p["in_nuc"])
    line = math.sqrt(2 * math.pi) * s_tg  # a unit-weight line peaks at 1 after the target PSF
    if spec.name in ("adhesions",):
        line = 1.0  # plaque lattices carry area weights already (level 1 inside a plaque)
    if spec.name == "caveolae":
        line = 2 * math.pi * (s_tg**2 + 0.5 * (0.04 / spec.pixel_size_um) ** 2) / 8  # ring of 8 -> peak ~1
    if "input" in which:
        d_in = _splat(sy, sx, sw * _cat(tiles, "sm_in") * line * p["in_peak"], oy, ox, shape)
        d_in += _splat(_cat(tiles, "py") + dy, _cat(tiles, "px") + dx, _cat(tiles, "pw") * 2 * math.pi * s_in**2,
                       oy, ox, shape)
        d_in += p["in_bg"] * cyto
        out["input"] = p["dark"] + _blur(d_in, s_in)
    if "target" in which:
        d_tg = _splat(sy, sx, sw * _cat(tiles, "sm_tg") * line * p["tg_peak"], oy, ox, shape)
        d_tg += p["tg_bg"] * cyto
        out["target"] = p["dark"] + _blur(d_tg, s_tg)
    if "truth" in which:
        out["truth"] = p["truth_gain"] * _blur(_splat(sy, sx, sw * line, oy, ox, shape), s_tg)
    return out


def _noisy(spec, seed, channel: int, lam, oy, ox):
    """Poisson-Gaussian noise on the global noise-tile grid; ``lam`` covers whole noise tiles from (oy, ox)."""
    p = spec.params
    out = np.empty(lam.shape, dtype=np.float64)
    T = _NOISE_TILE
    for iy in range(0, lam.shape[0], T):
        for ix in range(0, lam.shape[1], T):
            rng = _rng(seed, spec.name, 2, channel, (oy + iy) // T, (ox + ix) // T)
            tile = lam[iy:iy + T, ix:ix + T]
            counts = rng.poisson(np.maximum(tile, 0.0))
            read = rng.standard_normal(tile.shape, dtype=np.float32)
            out[iy:iy + T, ix:ix + T] = p["offset_adu"] + p["adu"] * counts + p["read_adu"] * read
    return out


def _to_u16(a):
    return np.clip(np.rint(a), 0, 65535).astype(np.uint16)


def _render_block(structure, seed, n2n, drift, block_info=None):
    """Render every channel of one region (one dask task)."""
    spec = STRUCTURES[structure]
    info = block_info[None]
    (_, _), (y0, y1), (x0, x1) = info["array-location"]
    T = _NOISE_TILE
    # Noise tiles are sampled whole, so render the region grown to the noise grid, plus the PSF halo.
    ay0, ay1 = (y0 // T) * T, -(-y1 // T) * T
    ax0, ax1 = (x0 // T) * T, -(-x1 // T) * T
    h = _halo(max(spec.psf_sigma_px()))
    oy, ox = ay0 - h, ax0 - h
    shape = (ay1 - ay0 + 2 * h, ax1 - ax0 + 2 * h)
    dmax = int(math.ceil(max(abs(drift[0]), abs(drift[1])))) + 1
    tiles = _tiles_for(spec, seed, oy - dmax, oy + shape[0] + dmax, ox - dmax, ox + shape[1] + dmax)

    inner = (slice(h, shape[0] - h), slice(h, shape[1] - h))
    crop = (slice(y0 - ay0, y1 - ay0), slice(x0 - ax0, x1 - ax0))
    exp = _expected(spec, tiles, oy, ox, shape)
    planes = []
    if len(spec.targets) == 1:
        planes.append(_noisy(spec, seed, 1, exp["input"][inner], ay0, ax0))
        planes.append(_noisy(spec, seed, 2, exp["target"][inner], ay0, ax0))
        if n2n:
            rep = exp if drift == (0.0, 0.0) else _expected(spec, tiles, oy, ox, shape, drift, which=("input",))
            planes.append(_noisy(spec, seed, 9, rep["input"][inner], ay0, ax0))
        planes.append(exp["truth"][inner])
    else:
        planes.append(_noisy(spec, seed, 1, exp["input"][inner], ay0, ax0))
        for i, t in enumerate(spec.targets):
            planes.append(_noisy(spec, seed, 2 + i, exp[t][inner], ay0, ax0))
        for t in spec.targets:
            planes.append(exp[f"truth-{t}"][inner])
    return np.stack([_to_u16(pl[crop]) for pl in planes])


# --------------------------------------------------------------------------------------------------------------
# Calibration against the paper (used by the tests and to fill the module docstring table)
# --------------------------------------------------------------------------------------------------------------


def _normalise(img, percentiles):
    lo, hi = np.percentile(img, percentiles)
    return (img - lo) / max(hi - lo, 1e-12)


def _foreground_psnr(inp, tgt, percentiles, patch=128, smooth=0.0):
    """Mean PSNR (data range 1) of input vs target over non-background ``patch``^2 tiles.

    Both images are normalised to ``percentiles`` (whole image, unclipped, as CSBDeep does). Tiles are kept
    where CSBDeep's ``no_background_patches`` rule holds at the tile centre: the max filter (``patch / 2``) of
    the target exceeds 0.4 x its 99.9th percentile. ``smooth`` applies a Gaussian first (paper: 1.5 for
    caveolae).
    """
    a = np.asarray(inp, np.float64)
    b = np.asarray(tgt, np.float64)
    if smooth:
        a, b = ndimage.gaussian_filter(a, smooth), ndimage.gaussian_filter(b, smooth)
    a, b = _normalise(a, percentiles), _normalise(b, percentiles)
    fg = ndimage.maximum_filter(b, patch // 2, mode="constant") > 0.4 * np.percentile(b, 99.9)
    vals = []
    for y in range(0, b.shape[0] - patch + 1, patch):
        for x in range(0, b.shape[1] - patch + 1, patch):
            if fg[y + patch // 2, x + patch // 2]:
                mse = np.mean((a[y:y + patch, x:x + patch] - b[y:y + patch, x:x + patch]) ** 2)
                vals.append(10 * np.log10(1.0 / mse))
    return float(np.mean(vals)) if vals else float("nan")


def _calibration(structure: str, size: int = 2048, seed: int = 0) -> dict:
    """Contrast of input and target and their raw foreground PSNR for one simulated image."""
    from l2l_scale.preprocess.contrast import label_contrast

    spec = _spec(structure)
    arr = simulate(structure, size, seed=seed).values
    inp, tgt = arr[0], arr[1]
    kw = dict(top_fraction=spec.contrast_fraction, percentiles=spec.contrast_percentiles)
    m_in, r_in = label_contrast(inp, **kw)
    m_tg, r_tg = label_contrast(tgt, **kw)
    smooth = 1.5 if structure == "caveolae" else 0.0
    return {
        "michelson": (m_in, m_tg),
        "rms": (r_in, r_tg),
        "psnr": _foreground_psnr(inp, tgt, spec.percentiles, smooth=smooth),
    }
