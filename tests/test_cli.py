"""The foundation subcommands through a real subprocess: simulate, info, convert, stats, and their errors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

from l2l_scale.io.read import open_image, read_info

pytestmark = pytest.mark.timeout(300)


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_user_error(res, *words):
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, res.stderr  # one line; only the dashboard URL may precede it
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "sim.zarr"
    # The default LocalCluster, once: the dashboard URL is printed and the plate is written.
    res = run("simulate", "--structure", "actin", "--size", "300", "--fields", "2", "--n2n", "--drift", "1.5,-0.5",
              "--chunks", "128", path)
    assert res.returncode == 0, res.stderr
    assert "Dask dashboard: http://127.0.0.1:" in res.stderr
    return path


def test_simulate_plate_then_info(plate):
    res = run("info", plate)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "(plate)" in out and "fields:       2 (A/1/0, A/1/1)" in out
    assert "channels:     AC-15, phalloidin, AC-15-repeat, truth" in out
    assert "l2l-scale simulate" in out  # provenance: the command line
    recorded = zarr.open_group(str(plate), mode="r").attrs["l2l_scale"]["command"]
    assert recorded == ("l2l-scale simulate --structure actin --size 300 --fields 2 --n2n --drift 1.5,-0.5 "
                        f"--chunks 128 {plate}")
    info = json.loads(run("info", "--json", plate).stdout)
    assert info["plate"]["fields"] == ["A/1/0", "A/1/1"]
    assert info["field"]["shape"] == [4, 300, 300] and info["field"]["chunks"] == [1, 128, 128]
    from ome_zarr_models import open_ome_zarr

    assert type(open_ome_zarr(str(plate))).__name__ == "HCS"
    # Fields are different scenes from consecutive seeds; the data equal the simulator's.
    from l2l_scale.synthetic import simulate

    a = open_image(plate, field="A/1/1").values
    np.testing.assert_array_equal(a, simulate("actin", 300, seed=1, n2n=True, drift=(1.5, -0.5), chunks=128).values)


def test_simulate_single_image_and_errors(tmp_path):
    out = tmp_path / "one.zarr"
    res = run("simulate", "--structure", "tubulin", "--size", "200", out, "--scheduler", "threads")
    assert res.returncode == 0, res.stderr
    assert read_info(out)["channels"] == ["DM1A", "YOL1/34", "truth"]
    assert_user_error(run("simulate", out, "--size", "200", "--scheduler", "threads"), "exists", "--overwrite")
    assert_user_error(run("simulate", tmp_path / "x.zarr", "--structure", "myosin", "--scheduler", "threads"),
                      "unknown structure 'myosin'")
    assert_user_error(run("simulate", tmp_path / "x.zarr", "--drift", "1,2", "--scheduler", "threads"), "--n2n")
    assert_user_error(run("simulate", tmp_path / "x.zarr", "--drift", "1", "--n2n"), "--drift")
    assert_user_error(run("simulate", tmp_path / "x.zarr", "--size", "8", "--scheduler", "threads"), "16")
    assert not (tmp_path / "x.zarr").exists()


def test_library_calls_record_the_command_they_are_given(tmp_path):
    from l2l_scale.io.prov import command_line
    from l2l_scale.synthetic import write_simulation

    given = write_simulation(tmp_path / "given.zarr", size=64, chunks=64, command="my-pipeline step 3")
    own = write_simulation(tmp_path / "own.zarr", size=64, chunks=64)
    assert zarr.open_group(str(given), mode="r").attrs["l2l_scale"]["command"] == "my-pipeline step 3"
    assert zarr.open_group(str(own), mode="r").attrs["l2l_scale"]["command"] == command_line() == \
        " ".join(["python", *map(shlex.quote, sys.argv)])


def test_info_errors(tmp_path):
    assert_user_error(run("info", tmp_path / "missing.zarr"), "does not exist")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    assert_user_error(run("info", tmp_path / "plain.zarr"), "not an OME-Zarr")
    g = zarr.open_group(str(tmp_path / "v03.zarr"), mode="w")
    g.attrs["multiscales"] = [{"version": "0.3", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]
    assert_user_error(run("info", tmp_path / "v03.zarr"), "unsupported NGFF version '0.3'")
    res = run("--debug", "info", tmp_path / "missing.zarr")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_convert_tiff_roundtrip_and_errors(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, (2, 130, 170), dtype=np.uint16)
    tif = tmp_path / "pair.tif"
    tifffile.imwrite(tif, data, imagej=True, resolution=(1 / 0.05, 1 / 0.05),
                     metadata={"axes": "CYX", "unit": "um", "Labels": ["AC-15", "phalloidin"]})
    out = tmp_path / "pair.zarr"
    res = run("convert", tif, out, "--scheduler", "threads")
    assert res.returncode == 0, res.stderr
    img = open_image(out)
    np.testing.assert_array_equal(img.values, data)
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    assert img.attrs["pixel_size"]["x"] == pytest.approx(0.05)
    assert_user_error(run("convert", tif, out, "--scheduler", "threads"), "exists")
    assert_user_error(run("convert", tmp_path / "nope.tif", tmp_path / "n.zarr"), "does not exist")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, data)  # 3 pages of unknown meaning
    assert_user_error(run("convert", stack, tmp_path / "s.zarr", "--scheduler", "threads"), "ambiguous", "--axes")
    res = run("convert", stack, tmp_path / "s.zarr", "--axes", "CYX", "--scheduler", "threads")
    assert res.returncode == 0, res.stderr


def test_stats_json_and_errors(plate, tmp_path):
    out = tmp_path / "stats.json"
    res = run("stats", plate, "--percentiles", "1,99.9", "--channels", "AC-15", "--json", out, "--scheduler",
              "threads")
    assert res.returncode == 0, res.stderr
    stats = json.loads(out.read_text())
    field = open_image(plate, field="A/1/0").sel(c="AC-15").values
    entry = stats["images"]["A/1/0"]["AC-15"]
    assert (entry["lo"], entry["hi"]) == (np.percentile(field, 1), np.percentile(field, 99.9))
    assert_user_error(run("stats", plate, "--percentiles", "99,1", "--scheduler", "threads"), "percentiles")
    assert_user_error(run("stats", plate, "--percentiles", "1,101", "--scheduler", "threads"), "percentiles")
    assert_user_error(run("stats", plate, "--channels", "DAPI", "--scheduler", "threads"), "DAPI")
    assert_user_error(run("stats", plate, "--json", out, "--scheduler", "threads"), "exists")


def test_help_lists_every_command():
    res = run("--help")
    for cmd in ("demo", "simulate", "info", "convert", "register", "stats", "contrast", "baseline", "patches",
                "train", "predict", "evaluate", "report"):
        assert f"    {cmd}" in res.stdout, cmd
    assert_user_error(run("predict"), "required")
