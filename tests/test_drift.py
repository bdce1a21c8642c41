"""Drift correction (``l2l-scale register``): estimation accuracy, lazy tiled shift, crop, plates, errors."""

from __future__ import annotations

import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.registration import phase_cross_correlation

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image, write_plate
from l2l_scale.preprocess import drift
from l2l_scale.synthetic import simulate

DRIFTS = {"subpixel": (2.3, -1.7), "large": (-7.6, 12.2)}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    """1536^2 simulated actin with a drifted Noise2Noise repeat, 6 x 6 chunks of 256, pyramid 1536/768."""
    root = tmp_path_factory.mktemp("drift")
    paths = {}
    for name, d in DRIFTS.items():
        paths[name] = write_image(simulate("actin", 1536, n2n=True, drift=d, chunks=256, seed=1),
                                  root / f"{name}.zarr", chunks=256)
    return paths


def _residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sub-pixel shift between two (registered) channels, measured independently of the estimator."""
    a, b = (ndimage.gaussian_filter(x.astype(np.float64), 2) for x in (a, b))
    return phase_cross_correlation(a - a.mean(), b - b.mean(), upsample_factor=100, normalization=None)[0]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("name", list(DRIFTS))
def test_phase_recovers_drift_and_output_aligns(mosaics, tmp_path, name):
    out = tmp_path / "reg.zarr"
    result = drift.register(mosaics[name], out, reference="AC-15", moving=["AC-15-repeat"])
    shift = np.array(result[""]["shifts"]["AC-15-repeat"])
    truth = -np.array(DRIFTS[name])
    assert np.all(np.abs(shift - truth) < 0.2), (shift, truth)
    img = open_image(out)
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin", "AC-15-repeat", "truth"]
    reg = img.attrs["l2l_scale"]["registration"]
    assert reg["shifts"]["AC-15-repeat"] == pytest.approx(list(shift))
    assert reg["reference"] == "AC-15" and reg["method"] == "phase"
    # Cropped to the common region: the drift costs ceil(|d|) rows/columns at most.
    assert 1536 - img.sizes["y"] <= np.ceil(abs(truth[0])) and 1536 - img.sizes["x"] <= np.ceil(abs(truth[1]))
    v = img.sel(c=["AC-15", "AC-15-repeat"]).values
    assert np.all(np.abs(_residual(v[0], v[1])) < 0.2)
    # The untouched channels are a pure crop of the input.
    src = open_image(mosaics[name]).sel(c="phalloidin").values
    crop = reg["crop"]
    np.testing.assert_array_equal(img.sel(c="phalloidin").values, src[slice(*crop["y"]), slice(*crop["x"])])


@pytest.mark.parametrize("name", list(DRIFTS))
def test_ssim_search_within_one_pixel(mosaics, name):
    ref0, ref1 = open_image(mosaics[name]), open_image(mosaics[name], 1)
    est = drift.estimate_shift(ref0.sel(c="AC-15"), ref0.sel(c="AC-15-repeat"), method="ssim",
                               reference_coarse=ref1.sel(c="AC-15"), moving_coarse=ref1.sel(c="AC-15-repeat"))
    assert est.n_patches == 100 and est.method == "ssim"
    assert all(float(v).is_integer() for v in est.shift)  # the paper's search is in whole pixels
    assert np.all(np.abs(np.array(est.shift) + np.array(DRIFTS[name])) < 1.0), est


def test_ssim_search_equals_skimage():
    rng = np.random.default_rng(3)
    base = ndimage.gaussian_filter(rng.random((80, 80)), 2)
    ref, mov = base[10:70, 10:70], base[12:72, 7:67] + 0.01 * rng.random((60, 60))
    table = drift.ssim_search(ref, mov, 5)
    for i, j in [(-5, -5), (0, 0), (-2, 3), (4, -1)]:
        want = structural_similarity(ref[5:55, 5:55], mov[5 + i:55 + i, 5 + j:55 + j], win_size=11,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        assert table[i + 5, j + 5] == pytest.approx(want, abs=1e-12)
    # mov[q] = ref[q + (-2, 3)]: the reference content at p sits at p + (-2, 3) in the moving patch.
    assert np.unravel_index(np.argmax(table), table.shape) == (-2 + 5, 3 + 5)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shift", [(2.3, -1.7), (-7.6, 12.2), (3.0, 0.0)])
def test_shift_image_tiled_equals_whole(order, shift):
    x = np.random.default_rng(0).random((150, 170)).astype(np.float32) * 1000
    tiled = drift.shift_image(da.from_array(x, chunks=32), shift, order=order).compute()
    whole = ndimage.shift(x.astype(np.float64), shift, order=order, mode="nearest").astype(np.float32)
    # Block-local coordinates round differently from global ones in the last bit of the weights.
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6 * 1000)
    assert drift.shift_halo(shift, order)[0] >= np.ceil(abs(shift[0])) + 1


def test_shift_image_keeps_integer_dtype():
    x = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    out = drift.shift_image(da.from_array(x, chunks=16), (0.5, 0.0)).compute()
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[1:], np.rint((x[1:].astype(float) + x[:-1]) / 2).astype(np.uint16))


def test_common_region():
    ys, xs = drift.common_region((100, 80), [(2.3, -1.7), (-0.5, 0.0)])
    # y in [ceil(2.3), floor(99 - 0.5)], x in [0, floor(79 - 1.7)]
    assert (ys.start, ys.stop, xs.start, xs.stop) == (3, 99, 0, 78)
    with pytest.raises(InputError, match="no common region"):
        drift.common_region((100, 80), [(120.0, 0.0)])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """512^2 images: a plate with two fields of different drift, and two single acquisitions."""
    root = tmp_path_factory.mktemp("small")
    f0 = simulate("actin", 512, n2n=True, drift=(1.6, -2.4), chunks=128, seed=2)
    f1 = simulate("actin", 512, n2n=True, drift=(-3.2, 0.7), chunks=128, seed=3)
    plate = write_plate({"A/1/0": f0, "B/2/0": f1}, root / "plate.zarr", chunks=128)
    first = write_image(f0.sel(c=["AC-15", "phalloidin"]), root / "first.zarr", chunks=128)
    second = write_image(f0.sel(c=["AC-15-repeat"]).assign_coords(c=["AC-15"]), root / "second.zarr", chunks=128)
    smaller = write_image(f0.isel(y=slice(0, 256), x=slice(0, 256)).sel(c=["AC-15"]), root / "smaller.zarr")
    coarser = f0.sel(c=["AC-15"]).copy()
    coarser.attrs = dict(coarser.attrs, pixel_size=(0.09, 0.09))
    coarser = write_image(coarser, root / "coarser.zarr")
    return {"plate": plate, "first": first, "second": second, "smaller": smaller, "coarser": coarser,
            "drifts": {"A/1/0": (1.6, -2.4), "B/2/0": (-3.2, 0.7)}}


def test_plate_each_field_its_own_shift_on_local_cluster(small, tmp_path):
    """The one test on the default LocalCluster: a plate keeps its layout and each field gets its own shift."""
    out = tmp_path / "reg.zarr"
    res = _cli("register", small["plate"], out, "--reference", "AC-15", "--moving", "AC-15-repeat",
               "--workers", "2", "--memory-limit", "2GB")
    assert res.returncode == 0, res.stderr
    assert "Dask dashboard" in res.stderr
    for key, d in small["drifts"].items():
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(key))
        img = open_image(out, field=key)
        shift = img.attrs["l2l_scale"]["registration"]["shifts"]["AC-15-repeat"]
        assert np.all(np.abs(np.array(shift) + np.array(d)) < 0.2), (key, shift)
        assert f"dy={shift[0]:+.2f}" in line
    root = zarr.open_group(str(out), mode="r")
    assert [w["path"] for w in root.attrs["ome"]["plate"]["wells"]] == ["A/1", "B/2"]
    fields = root.attrs["l2l_scale"]["registration"]["fields"]
    assert set(fields) == {"A/1/0", "B/2/0"}


def test_register_second_acquisition(small, tmp_path):
    out = tmp_path / "two.zarr"
    res = _cli("register", small["first"], out, "--reference", "AC-15", "--moving", "AC-15",
               "--moving-image", small["second"], "--scheduler", "threads")
    assert res.returncode == 0, res.stderr
    img = open_image(out)
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin", "AC-15-moving"]
    reg = img.attrs["l2l_scale"]["registration"]
    assert np.all(np.abs(np.array(reg["shifts"]["AC-15-moving"]) - (-1.6, 2.4)) < 0.2), reg["shifts"]
    assert reg["moving_image"].endswith("second.zarr")
    v = img.sel(c=["AC-15", "AC-15-moving"]).values
    assert np.all(np.abs(_residual(v[0], v[1])) < 0.2)


def test_reference_cannot_move(small, tmp_path):
    with pytest.raises(ConfigError, match="both the reference and a moving channel"):
        drift.register(small["first"], tmp_path / "out.zarr", reference="AC-15", moving=["AC-15"])


@pytest.mark.parametrize("case, match", [
    ("shape", "register acquisitions of the same field at the same size"),
    ("pixel", "pixel size"),
    ("max-shift", "exceeds the maximum shift of 1 px"),
    ("channel", "unknown channel 'nope'"),
])
def test_cli_errors(small, tmp_path, case, match):
    out = tmp_path / "out.zarr"
    args = {
        "shape": [small["first"], out, "--reference", "AC-15", "--moving", "AC-15", "--moving-image",
                  small["smaller"]],
        "pixel": [small["first"], out, "--reference", "AC-15", "--moving", "AC-15", "--moving-image",
                  small["coarser"]],
        "max-shift": [small["first"], out, "--reference", "AC-15", "--moving", "AC-15", "--moving-image",
                      small["second"], "--max-shift", "1"],
        "channel": [small["first"], out, "--reference", "AC-15", "--moving", "nope"],
    }[case]
    res = _cli("register", *args, "--scheduler", "threads")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_estimation_reads_only_patches(mosaics):
    """Estimation never computes the whole full-resolution image: count the level-0 blocks it touches."""
    img0, img1 = open_image(mosaics["subpixel"]), open_image(mosaics["subpixel"], 1)
    full = img0.data.rechunk((1, 128, 128))  # 12 x 12 blocks per channel
    touched = []

    def record(block, block_info=None):
        touched.append(block.size)
        return block

    counted = full.map_blocks(record, dtype=full.dtype)
    est = drift.estimate_shift(counted[0], counted[2], reference_coarse=img1.data[0], moving_coarse=img1.data[2],
                               n_patches=10)
    assert np.all(np.abs(np.array(est.shift) + np.array(DRIFTS["subpixel"])) < 0.2), est
    assert 0 < sum(touched) < 0.35 * 2 * full[0].size  # 10 patches of 144 px touch at most 40 of 144 blocks
