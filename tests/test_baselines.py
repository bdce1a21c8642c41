"""Classical baselines (paper Table S1): tiled output equals the whole-image output of scipy / scikit-image."""

from __future__ import annotations

import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.restoration import rolling_ball as sk_rolling_ball

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image
from l2l_scale.preprocess import baselines as bl
from l2l_scale.synthetic import simulate


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="module")
def actin():
    """A 200 x 233 simulated actin channel (uint16): neither side a multiple of the chunks or CLAHE regions."""
    return simulate("actin", (200, 233), chunks=64, seed=5).sel(c="AC-15").values


def _tiled_and_whole(fn, x, chunks=(32, 64)):
    """The result with small chunks and with one chunk; asserts they are identical."""
    tiled = fn(da.from_array(x, chunks=chunks)).compute()
    whole = fn(da.from_array(x, chunks=x.shape)).compute()
    assert tiled.dtype == whole.dtype == np.float32
    np.testing.assert_array_equal(tiled, whole)
    return tiled


@pytest.mark.parametrize("sigma", [2, 3])
def test_gaussian_equals_scipy(actin, sigma):
    out = _tiled_and_whole(lambda a: bl.gaussian(a, sigma), actin)
    np.testing.assert_array_equal(out, ndimage.gaussian_filter(actin.astype(np.float32), sigma))


@pytest.mark.parametrize("radius", [5, 20])
def test_rolling_ball_equals_skimage(actin, radius):
    out = _tiled_and_whole(lambda a: bl.rolling_ball(a, radius), actin)
    x = actin.astype(np.float32)
    np.testing.assert_array_equal(out, x - sk_rolling_ball(x, radius=radius))
    assert bl.rolling_ball_halo(radius) == radius


@pytest.mark.parametrize("size", [11, 12, 25])
def test_tophat_equals_scipy(actin, size):
    out = _tiled_and_whole(lambda a: bl.white_tophat(a, size), actin)
    np.testing.assert_array_equal(out, ndimage.white_tophat(actin.astype(np.float32), size=size))
    assert bl.tophat_halo(size) == 2 * (size // 2)


def _skimage_clahe(x, kernel_size, clip_limit=0.01, nbins=256):
    if x.dtype.kind == "f":  # our documented normalisation of float images, in float64
        lo, hi = float(x.min()), float(x.max())
        x = (x.astype(np.float64) - lo) / (hi - lo)
    return equalize_adapthist(x, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins).astype(np.float32)


@pytest.mark.parametrize("kwargs", [
    {"grid": 11},  # the actin preset: regions of ceil(200/11) x ceil(233/11) px
    {"grid": 7},
    {"kernel_size": 37},
    {"kernel_size": (50, 16)},  # the last region mostly reflected padding
    {"kernel_size": 64, "clip_limit": 0.0, "nbins": 100},
])
def test_clahe_tiled_equals_skimage_whole_image(actin, kwargs):
    out = _tiled_and_whole(lambda a: bl.clahe(a, **kwargs), actin, chunks=(16, 48))
    ks = bl.clahe_kernel_size(actin.shape, kwargs.get("grid"), kwargs.get("kernel_size"))
    want = _skimage_clahe(actin, ks, kwargs.get("clip_limit", 0.01), kwargs.get("nbins", 256))
    np.testing.assert_array_equal(out, want)  # exact, not just close


@pytest.mark.parametrize("dtype", ["float32", "uint8", "tiny"])
def test_clahe_other_inputs(actin, dtype):
    if dtype == "float32":
        x = actin.astype(np.float32) * 0.37 - 5.0  # outside [-1, 1]: rescaled by the global min/max
    elif dtype == "uint8":
        x = (actin // 16).astype(np.uint8)
    else:
        x = actin[:7, :9]  # pad wider than the image: numpy reflects more than once
    ks = bl.clahe_kernel_size(x.shape, None, 6 if dtype == "tiny" else 40)
    out = _tiled_and_whole(lambda a: bl.clahe(a, kernel_size=ks), x, chunks=(3, 4) if dtype == "tiny" else (32, 64))
    np.testing.assert_array_equal(out, _skimage_clahe(x, ks))


def test_clahe_constant_channel_is_an_error():
    with pytest.raises(InputError, match="constant"):
        bl.clahe(da.full((64, 64), 7, dtype=np.uint16, chunks=32), grid=4)


def test_presets_are_table_s1():
    table = {"gaussian": ("sigma", (2, 2, 3, 2)), "rolling-ball": ("radius", (20, 10, 5, 5)),
             "tophat": ("size", (11, 25, 13, 17)), "clahe": ("grid", (11, 7, 7, 7))}
    for method, (param, values) in table.items():
        for preset, value in zip(("actin", "tubulin", "caveolae", "pxn"), values):
            assert bl.resolve_parameters(method, preset)[param] == value
    assert bl.resolve_parameters("gaussian", "actin", sigma=1.5) == {"sigma": 1.5}
    assert bl.resolve_parameters("clahe", "pxn", kernel_size=64)["kernel_size"] == 64
    assert "grid" not in bl.resolve_parameters("clahe", "pxn", kernel_size=64)
    with pytest.raises(ConfigError, match="needs --sigma"):
        bl.resolve_parameters("gaussian")
    with pytest.raises(ConfigError, match="--radius does not apply to gaussian"):
        bl.resolve_parameters("gaussian", "actin", radius=3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args), "--scheduler", "threads"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    img = simulate("actin", (200, 233), chunks=64, seed=5).sel(c=["AC-15", "phalloidin"])
    flat = xr.zeros_like(img.sel(c=["AC-15"])).assign_coords(c=["empty"]) + 300
    data = xr.concat([img, flat.astype(np.uint16)], dim="c")
    data.attrs = img.attrs
    return write_image(data, root / "img.zarr", chunks=64)


@pytest.mark.parametrize("method", ["clahe", "tophat"])
def test_cli_writes_float32_pyramid_with_provenance(image, tmp_path, method):
    out = tmp_path / "out.zarr"
    res = _cli("baseline", method, image, out, "--channel", "AC-15,phalloidin", "--preset", "actin")
    assert res.returncode == 0, res.stderr
    img = open_image(out)
    assert img.dtype == np.float32 and list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    assert img.attrs["n_levels"] >= 1 and img.shape == (2, 200, 233)
    record = img.attrs["l2l_scale"]["baseline"]
    assert record["method"] == method and record["preset"] == "actin"
    src = open_image(image).sel(c="phalloidin").values
    if method == "clahe":
        assert record["grid"] == 11
        want = _skimage_clahe(src, bl.clahe_kernel_size(src.shape, 11))
    else:
        assert record["size"] == 11 and record["halo"] == 10
        want = ndimage.white_tophat(src.astype(np.float32), size=11)
    np.testing.assert_array_equal(img.sel(c="phalloidin").values, want)


@pytest.mark.parametrize("args, match", [
    (["clahe", "--channel", "empty", "--grid", "7"], "constant"),
    (["gaussian", "--channel", "AC-15"], "needs --sigma"),
    (["gaussian", "--channel", "AC-15", "--sigma", "2", "--radius", "3"], "does not apply to gaussian"),
    (["tophat", "--channel", "nope", "--size", "11"], "unknown channel 'nope'"),
    (["gaussian", "--channel", "AC-15", "--sigma", "-1"], "must be positive"),
])
def test_cli_errors(image, tmp_path, args, match):
    out = tmp_path / "out.zarr"
    res = _cli("baseline", args[0], image, out, *args[1:])
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_cli_refuses_existing_output(image, tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    res = _cli("baseline", "gaussian", image, out, "--channel", "AC-15", "--sigma", "2")
    assert res.returncode == 2 and "--overwrite" in res.stderr


def test_interrupted_plate_baseline_resumes_only_missing_blocks(tmp_path, monkeypatch):
    """A write that dies part-way leaves records in one journal; --resume writes only the rest, bit-identically."""
    import dask
    import xarray as xr

    from l2l_scale.io import blockwrite as bw
    from l2l_scale.io.output import PROGRESS_DIR, partial_path
    from l2l_scale.io.read import open_image
    from l2l_scale.io.write import write_plate
    from l2l_scale.preprocess.baselines import run_baseline

    rng = np.random.default_rng(3)
    fields = {f"A/{i + 1}/0": xr.DataArray(rng.integers(0, 4000, (1, 96, 96), dtype=np.uint16), dims=("c", "y", "x"),
                                           coords={"c": ["AC-15"]}) for i in range(3)}
    plate = write_plate(fields, tmp_path / "in.zarr", chunks=32)
    with dask.config.set(scheduler="synchronous"):
        ref = run_baseline("gaussian", plate, tmp_path / "ref.zarr", channels=["AC-15"], sigma=2.0)
        calls, write, dead = [], bw.write_block, []

        def dying(*args):
            calls.append(args[2])
            if len(calls) == 10 and not dead:
                dead.append(True)
                raise RuntimeError("killed")
            return write(*args)

        monkeypatch.setattr(bw, "write_block", dying)
        out = tmp_path / "out.zarr"
        with pytest.raises(RuntimeError, match="killed"):
            run_baseline("gaussian", plate, out, channels=["AC-15"], sigma=2.0, resume=True)
        progress = partial_path(out) / PROGRESS_DIR
        assert len(bw.recorded(progress, "0")) == 9
        assert len([f for f in progress.rglob("*") if f.is_file()]) == 2  # run.json + one journal
        calls.clear()
        run_baseline("gaussian", plate, out, channels=["AC-15"], sigma=2.0, resume=True)
    assert len(calls) == 3 * 9 - 9
    for key in fields:
        np.testing.assert_array_equal(open_image(out, field=key).values, open_image(ref, field=key).values)
