"""Rendering one region: bilinear splatting, analytic fields, the PSF blur and Poisson-Gaussian noise on a global
noise grid, so that any chunking gives bit-identical pixels (see :mod:`l2l_scale.synthetic`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from l2l_scale.synthetic.cells import _rng
from l2l_scale.synthetic.structures import STRUCTURES
from l2l_scale.synthetic.tiles import _tiles_for

_NOISE_TILE = 256  # global noise grid (px); chunk-independent noise is generated per noise tile
_TRUNCATE = 4.0  # Gaussian PSF truncation in sigmas, fixes the halo


def _halo(sigma: float) -> int:
    """Blur halo: scipy's kernel radius for ``truncate=4`` is ``int(4 sigma + 0.5)``; this is at least that."""
    return int(math.ceil(_TRUNCATE * sigma)) + 1


class _Splat:
    """Bilinear splatting of a fixed set of points into one region, for several weight vectors.

    The region's pixel (0, 0) is at global (oy, ox). Fractions are taken in global coordinates, so a
    point's bilinear weights do not depend on the region, and points are kept in their global order, so every
    pixel sums its contributions in the same order for any chunking (bit-identical results).
    """

    def __init__(self, y, x, oy, ox, shape):
        self.shape = shape
        ny, nx = shape
        fy, fx = np.floor(y), np.floor(x)
        iy = fy.astype(np.int64) - oy
        ix = fx.astype(np.int64) - ox
        # keep points whose 2 x 2 footprint touches the region
        sel = np.flatnonzero((iy >= -1) & (iy < ny) & (ix >= -1) & (ix < nx))
        ty, tx = y[sel] - fy[sel], x[sel] - fx[sel]
        iy, ix = iy[sel], ix[sel]
        self.parts = []
        for dy, wy in ((0, 1.0 - ty), (1, ty)):
            for dx, wx in ((0, 1.0 - tx), (1, tx)):
                yy, xx = iy + dy, ix + dx
                ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
                self.parts.append((yy[ok] * nx + xx[ok], sel[ok], (wy * wx)[ok]))

    def __call__(self, w):
        n = self.shape[0] * self.shape[1]
        out = np.zeros(n)
        for flat, idx, bw in self.parts:
            out += np.bincount(flat, weights=w[idx] * bw, minlength=n)
        return out.reshape(self.shape)


def _fields(tiles, ys, xs, nuc_level, texture=None):
    """Analytic per-pixel fields on the grid ``ys`` x ``xs`` (global coordinates).

    Returns the cytosolic field (soft cell mask, ``nuc_level`` over the nucleus, smooth +-25 % texture) and, when
    ``texture`` is given, the nucleus field (soft nucleus mask with a chromatin texture of that strength).
    """
    cyto = np.zeros((ys.size, xs.size))
    nuc = np.zeros((ys.size, xs.size)) if texture is not None else None
    for t in tiles:
        sl = _window(ys, xs, t.cell.cy, t.cell.cx, t.cell.radius + 2)  # the soft mask is 0 beyond rho = 1
        if sl is None:
            continue
        cm = np.clip((1.0 - t.cell.rho(ys[sl[0]][:, None], xs[sl[1]][None, :])) / t.edge, 0.0, 1.0)
        cm *= 1.0 + 0.25 * t.bg_waves.grid(ys[sl[0]], xs[sl[1]])
        sn = _window(ys, xs, t.nucleus.cy, t.nucleus.cx, t.nucleus.radius + 2)
        if sn is not None:
            nm = np.clip((1.0 - t.nucleus.rho(ys[sn[0]][:, None], xs[sn[1]][None, :])) / 0.08, 0.0, 1.0)
            # the nucleus window lies inside the cell window
            rel = (slice(sn[0].start - sl[0].start, sn[0].stop - sl[0].start),
                   slice(sn[1].start - sl[1].start, sn[1].stop - sl[1].start))
            cm[rel] *= 1.0 - (1.0 - nuc_level) * nm
            if texture is not None:
                tn = np.clip(1.0 + texture * t.nuc_waves.grid(ys[sn[0]], xs[sn[1]]), 0.0, None)
                np.maximum(nuc[sn], nm * tn, out=nuc[sn])
        np.maximum(cyto[sl], cm, out=cyto[sl])
    return cyto, nuc


def _coarse_fields(spec, tiles, oy, ox, shape, shift, nuc_level, texture=None):
    """:func:`_fields` on a region, evaluated every ``q`` px and linearly interpolated.

    The fields are smooth on the scale of ``q`` (about 0.1 um) and are blurred by the PSF afterwards. The
    coarse nodes sit at multiples of ``q`` in *scene* coordinates, and each pixel's node index and fraction are
    computed from its own global position, so every chunking interpolates identically and a shifted scene
    (``shift``, the Noise2Noise drift) is the same interpolated field evaluated at ``(y - dy, x - dx)``.
    """
    q = max(1, int(0.1 / spec.pixel_size_um))
    axes = []
    for o, n, d in ((oy, shape[0], shift[0]), (ox, shape[1], shift[1])):
        pos = np.arange(o, o + n, dtype=np.float64) - d  # scene coordinate of each pixel
        node = np.floor(pos / q)
        frac = (pos - node * q) / q
        node = node.astype(np.int64)
        axes.append((node - node[0], frac, (node[0] + np.arange(node[-1] - node[0] + 2)) * float(q)))
    (iy, ty, gy), (ix, tx, gx) = axes
    coarse = _fields(tiles, gy, gx, nuc_level, texture)
    out = []
    for c in coarse:
        if c is None:
            out.append(None)
            continue
        rows = c[iy] * (1.0 - ty)[:, None] + c[iy + 1] * ty[:, None]
        out.append(rows[:, ix] * (1.0 - tx)[None, :] + rows[:, ix + 1] * tx[None, :])
    return tuple(out)


def _window(ys, xs, cy, cx, R):
    iy0 = int(np.searchsorted(ys, cy - R)); iy1 = int(np.searchsorted(ys, cy + R, side="right"))
    ix0 = int(np.searchsorted(xs, cx - R)); ix1 = int(np.searchsorted(xs, cx + R, side="right"))
    if iy0 >= iy1 or ix0 >= ix1:
        return None
    return slice(iy0, iy1), slice(ix0, ix1)


def _blur(a, sigma):
    # mode is irrelevant: the halo is cropped off; 'constant' avoids reflecting content back in.
    return ndimage.gaussian_filter(a, sigma, truncate=_TRUNCATE, mode="constant")


def _cat(tiles, attr):
    return np.concatenate([getattr(t, attr) for t in tiles]) if tiles else np.zeros(0)


def _expected(spec, tiles, oy, ox, shape, shift=(0.0, 0.0), which=("input", "target", "truth")):
    """Noise-free photon images (and truth) on a region; ``shift`` (dy, dx) moves the whole scene."""
    p = spec.params
    s_in, s_tg = spec.psf_sigma_px()
    dy, dx = shift
    sy, sx = _cat(tiles, "sy"), _cat(tiles, "sx")
    if shift != (0.0, 0.0):
        sy, sx = sy + dy, sx + dx
    splat = _Splat(sy, sx, oy, ox, shape)
    sw = _cat(tiles, "sw")
    out = {}
    if spec.name == "nuclei-membrane":
        # analytic fields at (y - dy, x - dx) == the scene moved by +shift
        cyto, nuc = _coarse_fields(spec, tiles, oy, ox, shape, shift, 1.0, texture=p["nuc_texture"])
        mem = splat(sw * math.sqrt(2 * math.pi) * s_tg)
        b_nuc, b_mem, b_cyto = _blur(nuc, s_tg), _blur(mem, s_tg), _blur(cyto, s_tg)
        sytox = p["sytox_peak"] * b_nuc
        cd44 = p["cd44_peak"] * b_mem + p["cd44_bg"] * b_cyto
        out["input"] = p["dark"] + p["sup_sytox"] * sytox + p["sup_cd44"] * cd44
        out["SYTOX"] = p["dark"] + sytox
        out["CD44"] = p["dark"] + cd44
        out["truth-SYTOX"] = p["truth_gain"] * b_nuc
        out["truth-CD44"] = p["truth_gain"] * b_mem
        return out

    cyto, _ = _coarse_fields(spec, tiles, oy, ox, shape, shift, p["in_nuc"])
    if spec.name == "adhesions":
        norm = 1.0  # plaque lattices carry areal weights: level ~1 inside a plaque
    elif spec.name == "caveolae":
        norm = 2 * math.pi * (s_tg**2 + 0.5 * (0.04 / spec.pixel_size_um) ** 2) / 8  # ring of 8 -> peak ~1
    else:
        norm = math.sqrt(2 * math.pi) * s_tg  # a unit-density line peaks at 1 after the target PSF
    if "input" in which:
        d_in = splat(sw * _cat(tiles, "sm_in") * (norm * p["in_peak"]))
        pts = _Splat(_cat(tiles, "py") + dy, _cat(tiles, "px") + dx, oy, ox, shape)
        d_in += pts(_cat(tiles, "pw") * (2 * math.pi * s_in**2))  # a punctum peaks at pw after the PSF
        d_in += p["in_bg"] * cyto
        out["input"] = p["dark"] + _blur(d_in, s_in)
    if "target" in which:
        d_tg = splat(sw * _cat(tiles, "sm_tg") * (norm * p["tg_peak"]))
        d_tg += p["tg_bg"] * cyto
        out["target"] = p["dark"] + _blur(d_tg, s_tg)
    if "truth" in which:
        out["truth"] = p["truth_gain"] * _blur(splat(sw * norm), s_tg)
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
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
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
    if len(spec.targets) == 1:
        lams = [(1, exp["input"]), (2, exp["target"])]
        if n2n:
            rep = exp if drift == (0.0, 0.0) else _expected(spec, tiles, oy, ox, shape, drift, which=("input",))
            lams.append((9, rep["input"]))
        clean = [exp["truth"]]
    else:
        lams = [(1, exp["input"])] + [(2 + i, exp[t]) for i, t in enumerate(spec.targets)]
        clean = [exp[f"truth-{t}"] for t in spec.targets]
    planes = [_noisy(spec, seed, ch, lam[inner], ay0, ax0)[crop] for ch, lam in lams]
    planes += [c[inner][crop] for c in clean]
    return np.stack([_to_u16(pl) for pl in planes])
