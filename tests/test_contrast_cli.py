"""Label contrast at dataset scale (``l2l-scale contrast``): same numbers as the in-memory recipe, the choice."""

from __future__ import annotations

import json
import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.io.write import write_image, write_plate
from l2l_scale.preprocess.contrast import dataset_contrast, image_contrast, label_contrast
from l2l_scale.synthetic import simulate


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="module")
def field():
    return simulate("actin", (300, 270), chunks=64, seed=6).values


@pytest.mark.parametrize("kwargs", [
    {},
    {"clip": False},
    {"top_fraction": 0.01, "percentiles": (2, 99.5)},
    {"sigma": 0},
    {"top_fraction": 1.0},
])
def test_image_contrast_equals_label_contrast(field, kwargs):
    for x in field[:2]:
        want = label_contrast(x, **kwargs)
        # Chunked: Gaussian with a halo, exact percentiles, one moment pass; never the whole image at once.
        got = image_contrast(da.from_array(x, chunks=(64, 96)), **kwargs)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_image_contrast_constant_channel():
    with pytest.raises(InputError, match="constant"):
        image_contrast(np.full((64, 64), 5, np.uint16), label="empty")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args), "--scheduler", "threads"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrast")
    fields = {f"A/1/{i}": simulate("actin", 384, chunks=128, seed=10 + i).sel(c=["AC-15", "phalloidin"])
              for i in range(3)}
    plate = write_plate(fields, root / "plate.zarr", chunks=128)
    one = fields["A/1/0"]
    empty = xr.concat([one, (one.sel(c=["AC-15"]) * 0 + 200).astype(np.uint16).assign_coords(c=["empty"])], dim="c")
    empty.attrs = one.attrs
    image = write_image(empty, root / "image.zarr", chunks=128)
    return {"plate": plate, "image": image, "fields": {k: v.values for k, v in fields.items()}}


def test_cli_picks_phalloidin_as_target_and_averages_fields(data, tmp_path):
    out = tmp_path / "contrast.json"
    res = _cli("contrast", data["plate"], "--channels", "AC-15,phalloidin", "--json", out)
    assert res.returncode == 0, res.stderr
    assert "recommendation: input AC-15 -> target phalloidin" in res.stdout
    result = json.loads(out.read_text())
    assert result["recommendation"]["input"] == "AC-15" and result["recommendation"]["target"] == "phalloidin"
    assert set(result["images"]) == set(data["fields"])
    for i, ch in enumerate(("AC-15", "phalloidin")):
        per_field = np.array([label_contrast(v[i]) for v in data["fields"].values()])
        summary = result["channels"][ch]
        assert summary["n"] == 3
        for j, metric in enumerate(("michelson", "rms")):
            assert summary[metric]["mean"] == pytest.approx(per_field[:, j].mean(), abs=1e-5)
            assert summary[metric]["sd"] == pytest.approx(per_field[:, j].std(ddof=1), abs=1e-5)
    assert result["parameters"] == {"sigma": 2.0, "percentiles": [1.0, 99.0], "top_fraction": 0.1, "clip": True}


def test_cli_options_reach_the_recipe(data):
    res = _cli("contrast", data["image"], "--channels", "phalloidin,AC-15", "--top-fraction", "0.05", "--sigma", "1",
               "--percentiles", "2,99.5", "--no-clip")
    assert res.returncode == 0, res.stderr
    m, r = label_contrast(data["fields"]["A/1/0"][1], sigma=1, percentiles=(2, 99.5), top_fraction=0.05, clip=False)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("phalloidin"))
    assert f"{m:.3f} +- 0.000" in line and f"{r:.3f} +- 0.000" in line


@pytest.mark.parametrize("args, match", [
    (["--channels", "AC-15,empty"], "channel 'empty': channel is constant"),
    (["--channels", "AC-15"], "at least two different channels"),
    (["--channels", "AC-15,nope"], "unknown channel 'nope'"),
    (["--channels", "AC-15,phalloidin", "--top-fraction", "1.5"], "top_fraction=1.5 is outside (0, 1]"),
])
def test_cli_errors(data, tmp_path, args, match):
    out = tmp_path / "c.json"
    res = _cli("contrast", data["image"], *args, "--json", out)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_existing_json(data, tmp_path):
    out = tmp_path / "c.json"
    out.write_text("{}")
    res = _cli("contrast", data["image"], "--channels", "AC-15,phalloidin", "--json", out)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert out.read_text() == "{}"


def test_dataset_contrast_needs_two_channels(data):
    with pytest.raises(ConfigError):
        dataset_contrast(data["image"], ["AC-15", "AC-15"])
