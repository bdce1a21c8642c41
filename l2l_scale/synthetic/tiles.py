"""The structure generators: the primitives of each structure in one cell tile, and the tiles a region needs.

A tile's cell and primitives are drawn from an RNG seeded by ``(seed, structure, tile index)``, so any region
regenerates exactly the tiles that reach it (see :mod:`l2l_scale.synthetic`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from l2l_scale.synthetic.cells import (_JITTER, _WOBBLE, _draw_cell, _inside, _lognormal, _rng, _Tile, _to_xy,
                                       _uniform_in, _Waves)
from l2l_scale.synthetic.structures import StructureSpec


# --------------------------------------------------------------------------------------------------------------
# Structure primitives (one cell tile). ``um`` = px per micrometre; ``ds`` = point spacing along lines (px).
# --------------------------------------------------------------------------------------------------------------


def _prims_actin(rng, cell, nucleus, um, ds, p):
    ys, xs, ws = [], [], []
    R = max(cell.a, cell.b)
    # Stress fibres: long, gently bowed chords, mostly along one dominant direction per cell, 0.1-0.4 um wide
    # (2-6 parallel lines 1.6 px apart), tapered over 1 um at both ends.
    n = int(rng.integers(*p["count"]))
    th = rng.uniform(0, math.pi) + rng.normal(0, 0.25, n)
    off = rng.uniform(-0.85, 0.85, n) * min(cell.a, cell.b)
    bow = rng.normal(0, 0.05, n) * R
    half = rng.uniform(0.3, 1.0, n) * 1.2 * R  # half-length before clipping to the cell
    centre = rng.uniform(-0.4, 0.4, n) * R
    lines = rng.integers(2, 7, n)
    w = _lognormal(rng, 0.25, n)
    # a bundle is about as bright as a single fibre at its centre, only wider (2.2 px ~ the PSF sigma)
    w = w / np.array([np.exp(-(((np.arange(m) - (m - 1) / 2.0) * 1.6) ** 2) / (2 * 2.2**2)).sum() for m in lines])
    s = np.arange(-1.2 * R, 1.2 * R, ds)
    c, sn = np.cos(th)[:, None], np.sin(th)[:, None]
    for k in range(int(lines.max())):
        sel = lines > k
        lat = (k - (lines[sel] - 1) / 2.0)[:, None] * 1.6
        perp = off[sel, None] + lat + bow[sel, None] * (1 - (s[None, :] / (1.2 * R)) ** 2)
        y = cell.cy + s[None, :] * sn[sel] + perp * c[sel]
        x = cell.cx + s[None, :] * c[sel] - perp * sn[sel]
        taper = np.clip((half[sel, None] - np.abs(s[None, :] - centre[sel, None])) / um, 0.0, 1.0)
        keep = taper > 0
        keep[keep] = _inside(cell, y[keep], x[keep], 0.95)
        ys.append(y[keep]); xs.append(x[keep]); ws.append((w[sel, None] * taper)[keep] * ds)
    # Cortical ring just inside the membrane.
    y, x, seg = cell.outline(0.965, ds)
    ys.append(y); xs.append(x); ws.append(seg)
    # Short, faint meshwork filaments near the edge.
    n = int(rng.integers(20, 50))
    L = rng.uniform(0.8, 3.0, n) * um
    y0, x0 = _to_xy(cell, rng.uniform(0.55, 0.92, n), rng.uniform(0, 2 * math.pi, n))
    th = rng.uniform(0, 2 * math.pi, n)
    t = np.arange(0, 3.0 * um, ds)
    y = y0[:, None] + t[None, :] * np.sin(th)[:, None]
    x = x0[:, None] + t[None, :] * np.cos(th)[:, None]
    keep = (t[None, :] < L[:, None]) & _inside(cell, y, x, 0.95)
    ys.append(y[keep]); xs.append(x[keep]); ws.append(np.full(int(keep.sum()), 0.3 * ds))
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)


def _prims_tubulin(rng, cell, nucleus, um, ds, p):
    R = max(cell.a, cell.b)
    # Centrosome next to the nucleus.
    phi = rng.uniform(0, 2 * math.pi)
    cy, cx = _to_xy(nucleus, 1.15, phi)
    n = int(rng.integers(*p["count"]))
    th0 = rng.uniform(0, 2 * math.pi, n)
    r0 = rng.uniform(0.3, 3.0, n) * um  # start a little away from the centrosome: no 200-fold aster
    n_steps = int(1.6 * R / ds)
    # Persistence length ~20 um: heading random walk with variance ds / Lp per step.
    heading = th0[:, None] + np.cumsum(rng.normal(0, math.sqrt(ds / (20.0 * um)), (n, n_steps)), axis=1)
    y = (cy + r0 * np.sin(th0))[:, None] + np.cumsum(np.sin(heading) * ds, axis=1)
    x = (cx + r0 * np.cos(th0))[:, None] + np.cumsum(np.cos(heading) * ds, axis=1)
    L = rng.uniform(0.35, 1.0, n) * 1.6 * R
    alive = np.arange(n_steps)[None, :] * ds < L[:, None]
    # a microtubule ends where it first leaves the cell (only test the points that are still alive)
    inside = np.zeros_like(alive)
    inside[alive] = _inside(cell, y[alive], x[alive], 0.96)
    alive = np.logical_and.accumulate(inside, axis=1)
    w = np.where(rng.random(n) < 0.1, 2.0, 1.0) * ds
    return y[alive], x[alive], np.broadcast_to(w[:, None], y.shape)[alive]


def _prims_adhesions(rng, cell, nucleus, um, ds, p):
    ys, xs, ws = [], [], []
    n = int(rng.integers(*p["count"]))
    # Plaques gather at the cell ends along the long axis; radial orientation.
    phi = rng.vonmises(0.0, 0.8, n) + rng.choice([0.0, math.pi], n)
    rho0 = rng.uniform(0.8, 0.93, n)
    length = np.clip(rng.lognormal(math.log(2.0), 0.4, n), 0.7, 5.0) * um
    width = rng.uniform(0.3, 0.55, n) * um
    bright = _lognormal(rng, 0.35, n)
    jitter = rng.normal(0, 0.2, n)
    y0, x0 = _to_xy(cell, rho0, phi)
    sp = min(ds, 1.0)  # lattice spacing (px): smooth after the PSF
    for i in range(n):
        th = math.atan2(y0[i] - cell.cy, x0[i] - cell.cx) + jitter[i]
        hl, hw = length[i] / 2, width[i] / 2
        gu, gv = np.meshgrid(np.arange(-hl, hl + sp, sp), np.arange(-hw, hw + sp, sp), indexing="ij")
        r2 = (gu / hl) ** 2 + (gv / hw) ** 2
        m = r2 <= 1.0
        gu, gv = gu[m] - 0.3 * hl, gv[m]  # the plaque reaches a bit further out than its anchor
        ys.append(y0[i] + gu * math.sin(th) + gv * math.cos(th))
        xs.append(x0[i] + gu * math.cos(th) - gv * math.sin(th))
        # areal density bright / px^2 -> level ~bright inside a plaque wider than the PSF; rounded profile
        ws.append(bright[i] * np.sqrt(1.0 - 0.8 * r2[m]) * sp * sp)
    # Nascent adhesions: small dots along the edge.
    y, x, _ = cell.outline(0.9, 1.0)
    pick = rng.random(y.size) < 40.0 / max(y.size, 1)
    ys.append(y[pick]); xs.append(x[pick]); ws.append(np.full(int(pick.sum()), 1.2))
    y, x, w = np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)
    keep = _inside(cell, y, x, 0.99)
    return y[keep], x[keep], w[keep]


def _prims_caveolae(rng, cell, nucleus, um, ds, p):
    area_um2 = math.pi * cell.a * cell.b / um**2
    n = int(rng.poisson(p["count"] * area_um2))
    # Half of the caveolae sit in clusters (rosettes), half scattered.
    n_cl = max(1, n // 12)
    cly, clx = _uniform_in(rng, cell, n_cl, 0.95)
    k = rng.integers(0, n_cl, n // 2)
    sy, sx = _uniform_in(rng, cell, n - n // 2, 0.95)
    cy = np.concatenate([cly[k] + rng.normal(0, 0.12 * um, k.size), sy])
    cx = np.concatenate([clx[k] + rng.normal(0, 0.12 * um, k.size), sx])
    # Each caveola is a ring of 8 points, 60-100 nm across.
    r = rng.uniform(0.030, 0.050, cy.size) * um
    ang = rng.uniform(0, 2 * math.pi, cy.size)[:, None] + np.arange(8)[None, :] * (2 * math.pi / 8)
    y = cy[:, None] + r[:, None] * np.sin(ang)
    x = cx[:, None] + r[:, None] * np.cos(ang)
    w = np.broadcast_to(_lognormal(rng, 0.35, cy.size)[:, None], y.shape)
    keep = _inside(cell, y, x, 0.99)
    return y[keep], x[keep], w[keep]


def _prims_membrane(rng, cell, nucleus, um, ds, p):
    y, x, seg = cell.outline(0.985, ds)
    ys, xs, ws = [y], [x], [seg]
    # Ruffles / microvilli: short radial folds of the membrane pointing into the cell.
    n = int(rng.integers(20, 50))
    phi = rng.uniform(0, 2 * math.pi, n)
    t = np.arange(0, 1.5 * um, ds)
    y, x = _to_xy(cell, 0.985 - t[None, :] / max(cell.a, cell.b), phi[:, None])
    keep = t[None, :] < rng.uniform(0.3, 1.5, n)[:, None] * um
    ys.append(y[keep]); xs.append(x[keep]); ws.append(np.full(int(keep.sum()), 0.5 * ds))
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(ws)


def _line_step(spec) -> float:
    """Point spacing along lines: up to the smallest PSF sigma (max 2 px), the ripple is then < 1e-8."""
    return float(min(2.0, max(0.5, min(spec.psf_sigma_px()))))


@functools.lru_cache(maxsize=32)
def _make_tile(spec: StructureSpec, seed: int, ty: int, tx: int) -> _Tile | None:
    """Cell and primitives of one tile, or None for an empty tile. Deterministic in (spec, seed, ty, tx).

    Cached: neighbouring chunks rendered by the same worker share tiles (a few MB each).
    """
    rng = _rng(seed, spec.name, 1, ty, tx)
    p = spec.params
    pitch = spec.cell_pitch_um / spec.pixel_size_um
    um = 1.0 / spec.pixel_size_um  # px per micrometre
    ds = _line_step(spec)
    if rng.random() >= p["fill"] and (ty, tx) != (0, 0):  # the cell at the image origin always exists
        return None
    cell, nucleus = _draw_cell(rng, ty, tx, pitch, _grid_phase(spec), _cell_radius_px(spec))
    bg_waves = _Waves.draw(rng, 3, (8 * um, 25 * um))
    nuc_waves = _Waves.draw(rng, 8, (0.8 * um, 3 * um))
    make = {"actin": _prims_actin, "tubulin": _prims_tubulin, "adhesions": _prims_adhesions,
            "caveolae": _prims_caveolae, "nuclei-membrane": _prims_membrane}[spec.name]
    sy, sx, sw = make(rng, cell, nucleus, um, ds, p)
    sw = np.ascontiguousarray(sw, dtype=np.float64)
    if "in_mod" in p:
        # Label-specific intensity along the structure: a smooth random field (2-6 um) per label.
        w_in = _Waves.draw(rng, 4, (2 * um, 6 * um))
        w_tg = _Waves.draw(rng, 4, (2 * um, 6 * um))
        sm_in = np.exp(p["in_mod"] * w_in.at(sy, sx) - 0.5 * p["in_mod"] ** 2)
        sm_tg = np.exp(p["tg_mod"] * w_tg.at(sy, sx) - 0.5 * p["tg_mod"] ** 2)
        # Unspecific binding of the input antibody: small bright puncta in the cytoplasm.
        n = int(rng.poisson(p["punct_density"] * math.pi * cell.a * cell.b / um**2))
        py, px = _uniform_in(rng, cell, n, 0.97)
        pw = p["punct_peak"] * _lognormal(rng, 0.5, n)
    else:
        sm_in = sm_tg = np.ones_like(sw)
        py = px = pw = np.zeros(0)
    arrays = [sy, sx, sw, sm_in, sm_tg, py, px, pw]
    for a in arrays:
        a.flags.writeable = False  # shared through the cache
    return _Tile(cell, nucleus, bg_waves, nuc_waves, 0.04, *arrays)


# --------------------------------------------------------------------------------------------------------------
# The tiles that reach a region
# --------------------------------------------------------------------------------------------------------------


def _cell_radius_px(spec) -> tuple[float, float]:
    lo, hi = spec.params["cell_radius_um"]
    return lo / spec.pixel_size_um, hi / spec.pixel_size_um


def _grid_phase(spec) -> float:
    """Nominal centre of cell tile (0, 0), in px. Half the smallest cell radius: the cell of tile (0, 0) covers
    the image origin, so small images (a few hundred px) show structure, not empty background."""
    return 0.5 * _cell_radius_px(spec)[0]


def _reach_px(spec) -> float:
    """Largest distance from a tile's nominal centre at which its primitives can lie: jitter + largest cell."""
    pitch = spec.cell_pitch_um / spec.pixel_size_um
    return _JITTER * pitch + _cell_radius_px(spec)[1] * (1 + 4 * _WOBBLE) + 2.0  # 2 px: bilinear splat footprint


def _tiles_for(spec, seed, y0, y1, x0, x1):
    """Tiles whose cells can reach [y0, y1) x [x0, x1), in a fixed (row-major) order."""
    pitch = spec.cell_pitch_um / spec.pixel_size_um
    reach, phase = _reach_px(spec), _grid_phase(spec)
    ty0, ty1 = math.ceil((y0 - reach - phase) / pitch), math.floor((y1 + reach - phase) / pitch)
    tx0, tx1 = math.ceil((x0 - reach - phase) / pitch), math.floor((x1 + reach - phase) / pitch)
    out = []
    for ty in range(ty0, ty1 + 1):
        for tx in range(tx0, tx1 + 1):
            t = _make_tile(spec, seed, ty, tx)
            if t is not None:
                out.append(t)
    return out
