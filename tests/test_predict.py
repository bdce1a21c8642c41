"""Tiled distributed prediction: exactness against CSBDeep, GPU placement, external scheduler, resume, errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from l2l_scale.errors import ChannelError, ConfigError, InputError, ModelError, OutputError
from l2l_scale.io import blockwrite as bw
from l2l_scale.io.output import PROGRESS_DIR, partial_path
from l2l_scale.io.read import list_fields, open_image
from l2l_scale.io.write import write_image, write_plate
from l2l_scale.predict import _pad_split, _reflect_index, predict

pytestmark = pytest.mark.timeout(600)


def _care(basedir: Path, name: str, *, depth: int, n_in: int, n_out: int, kern: int = 3, residual: bool = False):
    """Train a tiny CARE model with csbdeep's own CARE.train (the reference implementation)."""
    from csbdeep.models import CARE, Config

    rng = np.random.default_rng(depth * 10 + n_in)
    X = rng.random((16, 32, 32, n_in), dtype=np.float32)
    Y = X[..., :n_out] * 0.5 + 0.1 * rng.random((16, 32, 32, n_out), dtype=np.float32)
    cfg = Config("YXC", n_channel_in=n_in, n_channel_out=n_out, unet_n_depth=depth, unet_n_first=8,
                 unet_kern_size=kern, unet_residual=residual and n_in == n_out, train_epochs=1,
                 train_steps_per_epoch=2, train_batch_size=4, train_tensorboard=False)
    care = CARE(cfg, name, basedir=str(basedir))
    care.train(X[:12], Y[:12], validation_data=(X[12:], Y[12:]))
    return care


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {
        "d1": _care(base, "d1", depth=1, n_in=1, n_out=1, residual=True),
        "d3": _care(base, "d3", depth=3, n_in=2, n_out=1, kern=3),
        "d2c2": _care(base, "d2c2", depth=2, n_in=2, n_out=2, kern=5),
    }


def _structured(shape, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    base = 800 + 600 * np.sin(yy / 7.0) * np.cos(xx / 11.0)
    return (base[None] + rng.poisson(200, size=shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    data = _structured((3, 301, 517), 0)  # odd sizes: padding to the grid on both axes
    path = tmp_path_factory.mktemp("img") / "img.zarr"
    arr = xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["AC-15", "phalloidin", "truth"]},
                       attrs={"pixel_size": 0.05})
    write_image(arr, path, chunks=128)
    return path, data


def _reference(care, data, channels, q=(2.0, 99.8)):
    """CARE.predict on the whole image (no tiling) after the same percentile normalisation."""
    x = np.moveaxis(data[channels], 0, -1).astype(np.float32)
    lo = np.percentile(x, q[0], axis=(0, 1), keepdims=True).astype(np.float32)
    hi = np.percentile(x, q[1], axis=(0, 1), keepdims=True).astype(np.float32)
    xn = (x - lo) / (hi - lo + np.float32(1e-20))
    return np.moveaxis(care.predict(xn, "YXC", normalizer=None), -1, 0)


@pytest.mark.parametrize("key,channels,tile,chunks,align", [
    ("d1", [0], 64, 96, None),        # chunks not aligned to the grid, several tiles per chunk
    ("d3", [0, 1], 48, 128, None),    # depth 3: grid 8, big halo relative to the tile
    ("d2c2", [1, 0], 1024, None, None),  # one tile larger than the image
    ("d1", [0], 64, 96, 32),          # tile inputs widened to a multiple of 32 px, as at bf16
    ("d3", [0, 1], 24, 128, 64),      # widened by more than the tile: inputs reach past their neighbours'
])
def test_tiled_equals_whole_csbdeep(models, image, tmp_path, monkeypatch, key, channels, tile, chunks, align):
    import l2l_scale.predict as pr

    if align:
        monkeypatch.setitem(pr._ALIGN, "fp32", align)
    care = models[key]
    path, data = image
    names = [["AC-15", "phalloidin"][c] for c in channels]
    out = predict(Path(care.basedir) / care.name, path, tmp_path / "out.zarr", channels=names, tile=tile,
                  batch=3, chunks=chunks)
    got = open_image(out).values
    ref = _reference(care, data, channels)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    prov = open_image(out).attrs["l2l_scale"]
    lo = np.percentile(data[channels[0]], 2.0)
    assert prov["normalization"]["values"][names[0]][0] == pytest.approx(lo)
    assert prov["model"]["sha256"]


def test_widened_spans_cover_the_halo_on_the_grid():
    from l2l_scale.predict import _spans

    rng = np.random.default_rng(0)
    for _ in range(2000):
        grid = int(rng.choice([1, 2, 4, 8]))
        align = grid * int(rng.choice([1, 4, 8, 16]))
        tile, halo = grid * int(rng.integers(1, 40)), grid * int(rng.integers(0, 12))
        padded = grid * int(rng.integers(1, 200))
        p0 = grid * int(rng.integers(0, padded // grid))
        p1 = int(rng.integers(p0 + 1, padded + 1))
        plain = _spans(p0, p1, tile, halo, grid, padded)
        for (o0, o1, i0, i1), (_, _, j0, j1) in zip(_spans(p0, p1, tile, halo, grid, padded, align), plain):
            assert 0 <= i0 <= j0 and j1 <= i1 <= padded and i0 % grid == 0  # the plain input, and more
            assert (i1 - i0) % align == 0 or (i0, i1) == (0, padded)  # aligned, or the whole image
            assert i1 - i0 < j1 - j0 + align


def test_uint16_output_and_pyramid(models, image, tmp_path):
    care = models["d1"]
    path, data = image
    f32 = open_image(predict(Path(care.basedir) / "d1", path, tmp_path / "f.zarr", channels=["AC-15"],
                             tile=128)).values
    out = predict(Path(care.basedir) / "d1", path, tmp_path / "u.zarr", channels=["AC-15"], tile=128,
                  dtype="uint16")
    img = open_image(out)
    assert img.dtype == np.uint16
    u = img.attrs["l2l_scale"]["uint16"]
    np.testing.assert_allclose(img.values * u["scale"] + u["offset"], np.clip(f32, -0.5, 2.5), atol=u["scale"])
    assert list(img.coords["c"].values) == ["AC-15-restored"]
    from ome_zarr_models import open_ome_zarr

    assert type(open_ome_zarr(str(out))).__name__ == "Image"


def test_plate_layout_kept_and_dataset_norm(models, tmp_path):
    care = models["d1"]
    fields = {f"A/1/{i}": xr.DataArray(_structured((1, 100, 120), i) * (i + 1), dims=("c", "y", "x"),
                                       coords={"c": ["AC-15"]}) for i in range(2)}
    fields["B/2/0"] = fields.pop("A/1/1")
    plate = write_plate(fields, tmp_path / "plate.zarr", chunks=64)
    out = predict(Path(care.basedir) / "d1", plate, tmp_path / "pout.zarr", channels=["AC-15"], tile=64,
                  norm_scope="dataset")
    assert list_fields(out) == ["A/1/0", "B/2/0"]
    both = np.concatenate([fields[k].values.ravel() for k in ("A/1/0", "B/2/0")])
    for key in ("A/1/0", "B/2/0"):
        vals = open_image(out, field=key).attrs["l2l_scale"]["normalization"]["values"]["AC-15"]
        assert vals == pytest.approx([np.percentile(both, 2.0), np.percentile(both, 99.8)])


def test_geometry_helpers():
    assert _pad_split(301, 8) == (1, 2)
    assert _pad_split(512, 8) == (0, 0)
    x = np.arange(7)
    np.testing.assert_array_equal(x[_reflect_index(np.arange(-3, 12), 7)], np.pad(x, (3, 5), mode="reflect"))
    np.testing.assert_array_equal(x[:2][_reflect_index(np.arange(-5, 8), 2)], np.pad(x[:2], (5, 6), mode="reflect"))


def test_errors(models, image, tmp_path):
    care = models["d3"]
    path, data = image
    mdir = Path(care.basedir) / "d3"
    with pytest.raises(ChannelError, match="takes 2 input channel"):
        predict(mdir, path, tmp_path / "o.zarr", channels=["AC-15"])
    with pytest.raises(ChannelError, match="unknown channel 'DAPI'"):
        predict(mdir, path, tmp_path / "o.zarr", channels=["AC-15", "DAPI"])
    with pytest.raises(ConfigError, match="multiple of the U-Net grid 8; use --tile 96"):
        predict(mdir, path, tmp_path / "o.zarr", channels=["AC-15", "phalloidin"], tile=100)
    with pytest.raises(ConfigError, match="too large"):
        predict(mdir, path, tmp_path / "o.zarr", channels=["AC-15", "phalloidin"], tile=1 << 20)
    const = write_image(xr.DataArray(np.full((2, 64, 64), 7, np.uint16), dims=("c", "y", "x"),
                                     coords={"c": ["a", "b"]}), tmp_path / "const.zarr")
    with pytest.raises(InputError, match="constant"):
        predict(mdir, const, tmp_path / "o.zarr", channels=["a", "b"])
    nan = np.ones((2, 64, 64), np.float32)
    nan[0, 3, 3] = np.nan
    nanp = write_image(xr.DataArray(nan, dims=("c", "y", "x"), coords={"c": ["a", "b"]}), tmp_path / "nan.zarr")
    with pytest.raises(InputError, match="NaN or Inf"):
        predict(mdir, nanp, tmp_path / "o.zarr", channels=["a", "b"])
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()
    (tmp_path / "exists.zarr").mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        predict(mdir, path, tmp_path / "exists.zarr", channels=["AC-15", "phalloidin"])
    with pytest.raises(ModelError):
        predict(tmp_path, path, tmp_path / "o.zarr", channels=["AC-15", "phalloidin"])


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args)], capture_output=True, text=True,
                          **kw)


def _chunk_mtimes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_mtime_ns for f in path.rglob("*") if "c" in f.parts and f.is_file()}


def test_resume_after_kill_on_a_plate_is_bit_identical(models, tmp_path):
    """12 fields, SIGKILL part-way, --resume: bit-identical, finished blocks untouched, no per-block files."""
    care = models["d1"]
    mdir = Path(care.basedir) / "d1"
    fields = {f"{'AB'[i // 6]}/{i % 6 + 1}/0": xr.DataArray(_structured((1, 128, 128), 20 + i), dims=("c", "y", "x"),
                                                              coords={"c": ["AC-15"]}) for i in range(12)}
    src = write_plate(fields, tmp_path / "in.zarr", chunks=64)
    # 32^2 blocks are small next to 64^2 tiles: they are predicted four at a time, pooled across fields.
    common = ["--channel", "AC-15", "--tile", "64", "--chunks", "32", "--scheduler", "threads"]
    total = 12 * 16
    predict(mdir, src, tmp_path / "full.zarr", channels=["AC-15"], tile=64, chunks=32)  # uninterrupted reference
    out = tmp_path / "resumed.zarr"
    partial = partial_path(out)
    proc = subprocess.Popen([sys.executable, "-m", "l2l_scale.cli", "predict", str(mdir), str(src), str(out),
                             *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = partial / PROGRESS_DIR
    deadline = time.time() + 300
    while time.time() < deadline and len(bw.recorded(progress, "0")) < 40:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = bw.recorded(progress, "0")
    assert 40 <= len(finished) < total, "the run must be interrupted part-way"
    records = [f for f in progress.rglob("*") if f.is_file()]
    assert len(records) <= 3, f"completion records must not be one file per block: {records}"  # run.json + journal
    assert not out.exists()
    before = _chunk_mtimes(partial)
    again = _cli("predict", mdir, src, out, *common)
    assert again.returncode == 2 and "interrupted run; pass --resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    resumed = _cli("predict", mdir, src, out, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    n = len(finished)
    assert f"computed {total - n} of {total} blocks ({n} were already finished)" in resumed.stdout
    # Only unfinished blocks were recomputed: the chunks of every recorded block were not written again.
    after = _chunk_mtimes(out)
    for key in finished:
        field, _, index = key.rsplit(":", 2)
        by, bx = index.split(".")[-2:]
        chunk = f"{field}/0/c/0/{by}/{bx}"
        assert after[chunk] == before[chunk], f"finished block {key} was recomputed"
    a = zarr.open_group(str(tmp_path / "full.zarr"), mode="r")
    b = zarr.open_group(str(out), mode="r")
    for key in fields:
        np.testing.assert_array_equal(a[key]["0"][...], b[key]["0"][...])
    assert not (out / PROGRESS_DIR).exists()


def test_plate_of_mixed_fields_and_pyramid_in_one_graph(models, tmp_path, capsys):
    """Fields of different sizes and dtypes, an empty well, and a field tall enough for a two-level pyramid."""
    care = models["d1"]
    data = {"A/1/0": _structured((1, 96, 120), 1),
            "A/1/1": (_structured((1, 130, 77), 2) / 7.0).astype(np.float32),
            "B/2/0": _structured((1, 1100, 40), 3).astype(np.int16),
            "B/2/1": _structured((1, 48, 40), 4)}  # one chunk, one level: written and finished in one task
    plate = write_plate({k: xr.DataArray(v, dims=("c", "y", "x"), coords={"c": ["AC-15"]})
                         for k, v in data.items()}, tmp_path / "plate.zarr", chunks=64)
    root = zarr.open_group(str(plate), mode="r+")
    ome = dict(root.attrs["ome"])
    ome["plate"] = {**ome["plate"], "columns": ome["plate"]["columns"] + [{"name": "3"}],
                    "wells": ome["plate"]["wells"] + [{"path": "B/3", "rowIndex": 1, "columnIndex": 2}]}
    root.attrs["ome"] = ome  # B/3 is listed but was never acquired
    out = predict(Path(care.basedir) / "d1", plate, tmp_path / "out.zarr", channels=["AC-15"], tile=128, chunks=64)
    assert "1 well(s) without fields are skipped: B/3" in capsys.readouterr().err
    assert list_fields(out) == ["A/1/0", "A/1/1", "B/2/0", "B/2/1"]
    for key, x in data.items():
        np.testing.assert_allclose(open_image(out, field=key).values, _reference(care, x, [0]), atol=1e-4, rtol=0)
        field = zarr.open_group(str(out / key), mode="r")
        top = field[field.attrs["ome"]["multiscales"][0]["datasets"][-1]["path"]][...]
        window = field.attrs["ome"]["omero"]["channels"][0]["window"]  # from the data as stored on disk
        assert [window["start"], window["end"]] == [float(v) for v in np.percentile(top, (0.1, 99.9))]
        assert [window["min"], window["max"]] == [float(top.min()), float(top.max())]
    group = zarr.open_group(str(out / "B/2/0"), mode="r")
    level0, level1 = group["0"][...], group["1"][...]
    assert level1.shape == (1, 550, 20)
    np.testing.assert_allclose(level1, level0.reshape(1, 550, 2, 20, 2).mean(axis=(2, 4)), rtol=1e-6, atol=0)
    ome["plate"] = {**ome["plate"], "wells": [{"path": "B/3", "rowIndex": 1, "columnIndex": 2}]}
    root.attrs["ome"] = ome
    with pytest.raises(InputError, match="the plate has no fields"):
        predict(Path(care.basedir) / "d1", plate, tmp_path / "none.zarr", channels=["AC-15"])
