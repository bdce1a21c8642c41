"""Every row of the README's "What l2l-scale refuses" table: the user's one-line error, exit code 2, nothing left.

Each test names the row it proves. Commands run as real subprocesses with the in-process threaded scheduler, so
no cluster start-up is paid per case.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

from l2l_scale.io.output import partial_path
from l2l_scale.io.read import read_info
from l2l_scale.io.write import write_image

pytestmark = pytest.mark.timeout(300)
THREADS = ("--scheduler", "threads")


def run(*args):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args)], capture_output=True, text=True)


def refused(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def nothing_written(*paths):
    for p in paths:
        assert not Path(p).exists() and not partial_path(Path(p)).exists()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from l2l_scale.model import ModelSpec, build_unet, export_model

    tmp = tmp_path_factory.mktemp("bad")
    data = np.random.default_rng(0).poisson(500, (2, 96, 128)).astype(np.uint16)
    img = write_image(xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["AC-15", "phalloidin"]}),
                      tmp / "img.zarr", chunks=64)
    spec = ModelSpec(n_dim=2, n_channel_in=1, n_channel_out=1, unet_n_depth=1, unet_kern_size=3, unet_n_first=8,
                     unet_last_activation="linear", unet_residual=True, probabilistic=False, axes="YXC")
    model = export_model(build_unet(spec), spec, tmp / "model", metadata={"channels": {"input": ["AC-15"]}})
    return tmp, img, model


def test_corrupt_chunks(env):
    tmp, img, _ = env
    bad = tmp / "corrupt.zarr"
    shutil.copytree(img, bad)
    chunk = next(p for p in (bad / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage" * 10)
    refused(run("stats", bad, *THREADS), "cannot read region", "damaged")


def test_truncated_tiff(env):
    tmp, _, _ = env
    tif = tmp / "cut.tif"
    tifffile.imwrite(tif, np.ones((2, 256, 256), np.uint16), imagej=True, metadata={"axes": "CYX"})
    tif.write_bytes(tif.read_bytes()[:20000])
    refused(run("convert", tif, tmp / "cut.zarr", *THREADS), "cut.tif")
    nothing_written(tmp / "cut.zarr")


def test_wrong_ngff_metadata(env):
    tmp, img, _ = env
    bad = tmp / "badmeta.zarr"
    shutil.copytree(img, bad)
    g = zarr.open_group(str(bad), mode="r+")
    ome = dict(g.attrs["ome"])
    ms = dict(ome["multiscales"][0])
    ms["axes"] = ms["axes"][1:]  # two axes for a 3-D array
    ome["multiscales"] = [ms]
    g.attrs["ome"] = ome
    refused(run("info", bad), "axes", "broken")
    ome["multiscales"] = [{"axes": ms["axes"]}]
    g.attrs["ome"] = ome
    refused(run("info", bad), "lacks axes or datasets")


def test_nan_or_inf(env):
    tmp, _, model = env
    data = np.ones((1, 64, 64), np.float32)
    data[0, 5, 5] = np.inf
    img = write_image(xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["AC-15"]}), tmp / "inf.zarr")
    refused(run("stats", img, *THREADS), "NaN or Inf")
    refused(run("predict", model, img, tmp / "o.zarr", "--percentiles", "1,99", *THREADS), "NaN or Inf")
    nothing_written(tmp / "o.zarr")


def test_empty_images(env):
    tmp, _, model = env
    empty = tmp / "empty.zarr"
    g = zarr.open_group(str(empty), mode="w")
    g.create_array("0", shape=(1, 0, 64), dtype="uint16", chunks=(1, 1, 64))
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "c", "type": "channel"},
                                                                   {"name": "y", "type": "space"},
                                                                   {"name": "x", "type": "space"}],
                                                          "datasets": [{"path": "0", "coordinateTransformations": [
                                                              {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    refused(run("predict", model, empty, tmp / "o.zarr", *THREADS), "empty")
    zeros = np.zeros((2, 64, 64), np.uint16)
    zeros[1] = np.random.default_rng(1).poisson(100, (64, 64))
    blank = write_image(xr.DataArray(zeros, dims=("c", "y", "x"), coords={"c": ["AC-15", "phalloidin"]}),
                        tmp / "blank.zarr")
    refused(run("predict", model, blank, tmp / "o.zarr", *THREADS), "constant")
    refused(run("contrast", blank, "--channels", "AC-15,phalloidin", *THREADS), "constant")
    nothing_written(tmp / "o.zarr")


def test_huge_tile_and_negative_or_small_halo(env):
    tmp, img, model = env
    refused(run("predict", model, img, tmp / "o.zarr", "--tile", "1000000", *THREADS), "too large")
    refused(run("predict", model, img, tmp / "o.zarr", "--halo", "-4", *THREADS), "negative")
    refused(run("predict", model, img, tmp / "o.zarr", "--halo", "2", *THREADS), "receptive field")
    nothing_written(tmp / "o.zarr")


def test_unknown_preset(env):
    tmp, img, _ = env
    refused(run("baseline", "gaussian", img, tmp / "g.zarr", "--channel", "AC-15", "--preset", "myosin", *THREADS),
            "myosin")
    refused(run("patches", img, tmp / "p.zarr", "--preset", "myosin", "--input-channel", "AC-15",
                "--target-channel", "phalloidin", *THREADS), "myosin")
    nothing_written(tmp / "g.zarr", tmp / "p.zarr")


def test_yaml_with_unknown_keys(env):
    tmp, img, _ = env
    cfg = tmp / "cluster.yaml"
    cfg.write_text("kind: local\nworkerz: 2\n")
    refused(run("stats", img, "--cluster", cfg), "workerz")
    train_cfg = tmp / "train.yaml"
    train_cfg.write_text("epochs: 2\nlearning_rat: 0.001\n")
    from l2l_scale.config import train_config
    from l2l_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="learning_rat"):
        train_config(train_cfg)


def test_model_folder_with_extra_files(env):
    tmp, img, model = env
    extra = tmp / "model_extra"
    shutil.copytree(model, extra)
    (extra / "README.txt").write_text("notes")
    (extra / "logs").mkdir()
    res = run("predict", extra, img, tmp / "ok.zarr", *THREADS)
    assert res.returncode == 0, res.stderr  # harmless extras are tolerated
    evil = tmp / "model_pickle"
    shutil.copytree(model, evil)
    (evil / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    refused(run("predict", evil, img, tmp / "o.zarr", *THREADS), "extra.pkl")
    nothing_written(tmp / "o.zarr")


def test_paths_with_spaces_and_unicode(env):
    tmp, _, model = env
    folder = tmp / "my data ünïcödé"
    folder.mkdir()
    sim = folder / "zellen 1.zarr"
    assert run("simulate", sim, "--size", "128", *THREADS).returncode == 0
    out = folder / "wiederhergestellt ß.zarr"
    res = run("predict", model, sim, out, "--channel", "AC-15", *THREADS)
    assert res.returncode == 0, res.stderr
    assert read_info(out)["channels"] == ["AC-15-restored"]
    assert json.loads(run("info", "--json", out).stdout)["path"] == str(out)
