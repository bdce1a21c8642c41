"""Scene geometry of one cell tile: seeded random generators, analytic cell and nucleus outlines, smooth random
fields, and the tile record that carries a cell's primitives."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

_JITTER = 0.1  # cell centre jitter, fraction of the pitch
_WOBBLE = 0.05  # amplitude of each of the 4 outline harmonics


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
        wob = (1.0 + h2c * (c * c - s * s) + h2s * (2.0 * c * s)
               + h3c * (4.0 * c**3 - 3.0 * c) + h3s * (3.0 * s - 4.0 * s**3))
        return r / wob

    def outline(self, rho: float, step: float):
        """Points on the level set ``rho``, about ``step`` px apart, and the arc length each point stands for."""
        n = max(16, int(2 * math.pi * max(self.a, self.b) * rho * 1.25 / step))
        phi = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        c, s = np.cos(phi), np.sin(phi)
        h2c, h2s, h3c, h3s = self.harm
        wob = 1.0 + h2c * np.cos(2 * phi) + h2s * np.sin(2 * phi) + h3c * np.cos(3 * phi) + h3s * np.sin(3 * phi)
        u = rho * wob * c * self.a
        v = rho * wob * s * self.b
        x = self.cx + u * self.cos - v * self.sin
        y = self.cy + u * self.sin + v * self.cos
        # uniform in phi is not uniform in arc length: weight each point by its share of the outline
        seg = 0.5 * np.hypot(np.roll(y, -1) - np.roll(y, 1), np.roll(x, -1) - np.roll(x, 1))
        return y, x, seg


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


@dataclass(frozen=True, eq=False)
class _Tile:
    """One cell tile: the cell, its nucleus and the primitives drawn for it (global pixel coordinates).

    Structure points carry ``sw`` = linear (or areal) density x the length (area) each point stands for, so a
    typical element peaks at about 1 after the target PSF once scaled by ``_expected``.
    """

    cell: _Ellipse
    nucleus: _Ellipse
    bg_waves: _Waves  # cytosolic background texture
    nuc_waves: _Waves  # chromatin texture
    edge: float  # soft-edge width of the cell mask in rho units
    sy: np.ndarray  # structure points
    sx: np.ndarray
    sw: np.ndarray
    sm_in: np.ndarray  # multiplicative intensity of the input label at each point
    sm_tg: np.ndarray  # ... and of the target label
    py: np.ndarray  # unspecific puncta of the input label
    px: np.ndarray
    pw: np.ndarray  # peak photons of each punctum


def _draw_cell(rng, ty: int, tx: int, pitch: float, phase: float, radius: tuple[float, float]):
    cy = ty * pitch + phase + rng.uniform(-_JITTER, _JITTER) * pitch
    cx = tx * pitch + phase + rng.uniform(-_JITTER, _JITTER) * pitch
    a = rng.uniform(*radius)
    b = a * rng.uniform(0.6, 0.95)
    th = rng.uniform(0, math.pi)
    harm = tuple(rng.uniform(-_WOBBLE, _WOBBLE, 4))
    cell = _Ellipse(cy, cx, a, b, math.cos(th), math.sin(th), harm)
    # nucleus: an ellipse near the centre, roughly aligned with the cell
    off = rng.uniform(-0.15, 0.15, 2) * np.array([b, a])
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


def _to_xy(cell: _Ellipse, rho, phi):
    """Global (y, x) of the point at normalised radius ``rho`` and angle ``phi`` in the cell's frame."""
    u = rho * np.cos(phi) * cell.a
    v = rho * np.sin(phi) * cell.b
    return cell.cy + u * cell.sin + v * cell.cos, cell.cx + u * cell.cos - v * cell.sin


def _uniform_in(rng, cell, n, rho_max):
    """``n`` points uniform in the cell (rejection sampling)."""
    ys, xs, got = [np.zeros(0)], [np.zeros(0)], 0
    R = cell.radius
    while got < n:
        m = max(64, 2 * (n - got))
        y = cell.cy + rng.uniform(-R, R, m)
        x = cell.cx + rng.uniform(-R, R, m)
        ok = _inside(cell, y, x, rho_max)
        ys.append(y[ok]); xs.append(x[ok]); got += int(ok.sum())
    return np.concatenate(ys)[:n], np.concatenate(xs)[:n]
