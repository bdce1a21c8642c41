"""l2l-scale evaluate: Table 1 rows, values equal to the metrics module, difference maps, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from l2l_scale.cli import main
from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.evaluate import metrics as M
from l2l_scale.evaluate.evaluate import CSV_COLUMNS, evaluate
from l2l_scale.evaluate.images import ImageSpec, parse_method
from l2l_scale.evaluate.maps import rms_map, ssim_map
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image
from l2l_scale.preprocess.normalize import normalize, percentiles

pytestmark = pytest.mark.timeout(300)

N_PATCHES = 8
METHODS = ["fake", "gauss", "identity"]
_CACHE: dict[str, Path] = {}


def build_results(tmp_path_factory) -> Path:
    """Simulated actin (a 384 px crop through one cell), two restorations, and one CLI evaluation of them.

    Cached per test session, so that tests/test_report.py reuses the same results folder.
    """
    if "root" in _CACHE:
        return _CACHE["root"]
    from l2l_scale.synthetic import simulate

    root = tmp_path_factory.mktemp("evaluate")
    # Cells sit on a ~1150 px grid: crop a 384 px window through one (only its chunks are simulated).
    sim = simulate("actin", 1152, seed=0, chunks=128)[:, 320:704, 192:576]
    write_image(sim, root / "sim.zarr", chunks=128)
    img = open_image(root / "sim.zarr")
    ps = img.attrs["pixel_size"]
    truth = img.sel(c="truth").values.astype(np.float32)
    lo, hi = np.percentile(truth, [1, 99.9])
    # "Restoration": the normalised truth plus a little noise (a float32 image in normalised units, as predict).
    fake = (truth - lo) / (hi - lo) + np.random.default_rng(0).normal(0, 0.02, truth.shape)
    write_image(fake.astype(np.float32)[None], root / "fake.zarr", dims="cyx", channel_names=["AC-15-restored"],
                pixel_size=ps, chunks=128)
    gauss = ndimage.gaussian_filter(img.sel(c="AC-15").values.astype(np.float32), 2)
    write_image(gauss[None], root / "gauss.zarr", dims="cyx", channel_names=["AC-15"], pixel_size=ps, chunks=128)
    out = root / "results"
    rc = main(["evaluate", "--target", f"{root}/sim.zarr:phalloidin", "--input", f"{root}/sim.zarr:AC-15",
               "--truth", f"{root}/sim.zarr:truth", "--method", f"fake={root}/fake.zarr",
               "--method", f"{root}/gauss.zarr", "--method", f"identity={root}/sim.zarr:AC-15",
               "--patches", str(N_PATCHES), "--seed", "3", str(out), "--scheduler", "threads"])
    assert rc == 0
    _CACHE["root"] = root
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_results(tmp_path_factory)


@pytest.fixture(scope="module")
def result(root):
    return json.loads((root / "results" / "evaluation.json").read_text())


def _rows(result):
    return {(r["method"], r["reference"], r["region"]): r for r in result["metrics"]}


def _norm(path, channel):
    data = open_image(path).sel(c=channel).data
    lo, hi = percentiles(data, [1, 99.9], channel_axis=None)
    return normalize(data, lo, hi, dtype=np.float32, channel_axis=None)


# ------------------------------------------------------------------------------------------- what is written


def test_csv_and_json_have_the_table1_rows(root, result):
    with open(root / "results" / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        csv_rows = list(reader)
    names = ["input", *METHODS, "target"]
    expected = [(n, ref, reg) for reg in ("patches", "image") for ref in ("target", "truth") for n in names]
    assert [(r["method"], r["reference"], r["region"]) for r in csv_rows] == expected
    assert result["order"] == names
    assert [(r["method"], r["reference"], r["region"]) for r in result["metrics"]] == expected
    for c, j in zip(csv_rows, result["metrics"]):
        for col in ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1", "pcc", "tolerance_level", "michelson",
                    "rms"):
            if j[col] is None:
                assert c[col] in ("", "inf", "nan")
            else:
                assert float(c[col]) == j[col]
    # The target has no comparison with itself, only its contrast; against the truth it has everything.
    t = _rows(result)[("target", "target", "image")]
    assert t["psnr"] is None and t["michelson"] is not None
    assert _rows(result)[("target", "truth", "image")]["psnr"] is not None
    assert {im["name"]: im["channel"] for im in result["images"]} == {
        "target": "phalloidin", "input": "AC-15", "fake": "AC-15-restored", "gauss": "AC-15", "identity": "AC-15",
        "truth": "truth"}
    assert len(result["patches"]["corners"]) == N_PATCHES


def test_values_equal_the_metrics_module(root, result):
    sim = root / "sim.zarr"
    tn, inp, tru = _norm(sim, "phalloidin"), _norm(sim, "AC-15"), _norm(sim, "truth")
    fake = _norm(root / "fake.zarr", "AC-15-restored")
    rows = _rows(result)
    for name, pred in (("input", inp), ("fake", fake)):
        for ref_name, ref in (("target", tn), ("truth", tru)):
            row = rows[(name, ref_name, "image")]
            want = M.table1_metrics(ref, pred, data_range=1.0)
            want["pcc"] = M.pcc(ref, pred)
            want["tolerance_level"] = M.tolerance_level(ref, pred, data_range=1.0).value
            for k, v in want.items():
                assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, ref_name, k)
    # Patches: CSBDeep's foreground rule on the raw target decides the positions, for every row.
    raw = open_image(sim).sel(c="phalloidin").data
    ps = M.foreground_patches(raw, tn, fake, n=N_PATCHES, seed=3)  # patches of raw, normalised target, fake
    assert ps.corners.tolist() == result["patches"]["corners"]
    want = M.table1_metrics(ps.pred, ps.input, data_range=1.0)
    row = rows[("fake", "target", "patches")]
    for k, v in want.items():
        assert row[k] == pytest.approx(v, rel=1e-9), k
    assert row["pcc"] == pytest.approx(np.nanmean(M.pcc(ps.pred, ps.input)), rel=1e-9)
    mi, rm = M.contrast(ps.input)
    assert (row["michelson"], row["rms"]) == pytest.approx((np.mean(mi), np.mean(rm)), rel=1e-9)
    mi, rm = M.contrast(fake.compute())
    img_row = rows[("fake", "target", "image")]
    assert (img_row["michelson"], img_row["rms"]) == pytest.approx((mi, rm), rel=1e-5)


def test_affine_fitted_columns_equal_csbdeep_normalize_minmse(root, result):
    from csbdeep.utils import normalize_minmse

    sim = root / "sim.zarr"
    tn, tru = _norm(sim, "phalloidin").compute(), _norm(sim, "truth").compute()
    rows = _rows(result)
    coefs = {(c["reference"], c["method"]): (c["alpha"], c["beta"])
             for c in result["parameters"]["affine_fit"]["coefficients"]}
    for name, path, channel in (("input", sim, "AC-15"), ("fake", root / "fake.zarr", "AC-15-restored")):
        pred = _norm(path, channel).compute()
        for ref_name, ref in (("target", tn), ("truth", tru)):
            row = rows[(name, ref_name, "image")]
            want = M.table1_metrics(ref, normalize_minmse(pred, ref).astype(np.float32), data_range=1.0)
            for k, v in want.items():
                assert row[f"{k}_fit"] == pytest.approx(v, rel=1e-5), (name, ref_name, k)
            # The least-squares fit minimises the whole-image MSE: its PSNR can only be higher.
            assert row["psnr_fit"] >= row["psnr"] - 1e-9
    # Patch rows use the whole-image fit of the same pair (one fit per image, never per patch).
    ps = M.foreground_patches(open_image(sim).sel(c="phalloidin").data, tn, _norm(root / "fake.zarr",
                              "AC-15-restored"), n=N_PATCHES, seed=3)
    alpha, beta = coefs[("target", "fake")]
    want = M.table1_metrics(ps.pred, (ps.input.astype(np.float64) * alpha + beta).astype(np.float32),
                            data_range=1.0)
    for k, v in want.items():
        assert rows[("fake", "target", "patches")][f"{k}_fit"] == pytest.approx(v, rel=1e-6), k


def test_restoration_beats_the_input_against_truth(result):
    rows = _rows(result)
    for region in ("patches", "image"):
        fake, inp = rows[("fake", "truth", region)], rows[("input", "truth", region)]
        assert fake["psnr"] > inp["psnr"] + 3
        assert fake["nrmse"] < inp["nrmse"]
        assert fake["ms_ssim_5"] > inp["ms_ssim_5"]
        # The input compared with itself (the 'identity' method) gives the input's numbers.
        assert rows[("identity", "truth", region)]["psnr"] == pytest.approx(inp["psnr"], rel=1e-12)


def test_difference_maps_are_valid_ome_zarr(root, result):
    from ome_zarr_models import open_ome_zarr

    res = root / "results"
    assert sorted(result["maps"]) == sorted(METHODS)
    for name, entry in result["maps"].items():
        assert type(open_ome_zarr(str(res / entry["path"]))).__name__ == "Image"
        img = open_image(res / entry["path"])
        assert list(img.coords["c"].values) == ["rms", "ssim"]
        assert img.attrs["pixel_size"]["x"] == pytest.approx(0.045)
        assert img.attrs["l2l_scale"]["maps"]["method"] == name
        assert img.attrs["l2l_scale"]["parameters"]["rms"]["halo"] == 8
    ident = open_image(res / "maps/identity.zarr")
    assert np.abs(ident.sel(c="rms").values).max() < 1e-6  # input == restoration: no difference anywhere
    assert np.allclose(ident.sel(c="ssim").values, 1.0, atol=1e-6)
    # The blurred input differs from the input locally: exactly the whole-image filters of the normalised pair.
    inp, gauss = _norm(root / "sim.zarr", "AC-15").compute(), _norm(root / "gauss.zarr", "AC-15").compute()
    g = open_image(res / "maps/gauss.zarr")
    d = inp.astype(np.float64) - gauss
    want = np.sqrt(ndimage.gaussian_filter(d * d, 2.0, truncate=4.0, mode="reflect"))
    assert np.allclose(g.sel(c="rms").values, want, atol=1e-6) and want.mean() > 0.01
    from skimage.metrics import structural_similarity

    _, s = structural_similarity(inp.astype(np.float64), gauss.astype(np.float64), data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    assert np.allclose(g.sel(c="ssim").values, s, atol=1e-5)


def test_rms_map_is_local_and_tiled_equals_whole():
    rng = np.random.default_rng(1)
    a = rng.random((96, 80))
    b = a.copy()
    b[40:50, 30:40] += 1.0
    import dask.array as da

    r = rms_map(da.from_array(a, chunks=(17, 23)), da.from_array(b, chunks=(17, 23)), sigma=2.0).compute()
    halo = int(4.0 * 2.0 + 0.5)
    far = np.ones_like(a, dtype=bool)
    far[40 - halo:50 + halo, 30 - halo:40 + halo] = False
    assert np.all(r[far] == 0) and r[45, 35] > 0.5
    whole = np.sqrt(ndimage.gaussian_filter((a - b) ** 2, 2.0, truncate=4.0, mode="reflect"))
    assert np.allclose(r, whole, atol=1e-6)
    s = ssim_map(da.from_array(a, chunks=(17, 23)), da.from_array(a, chunks=(17, 23))).compute()
    assert np.allclose(s, 1.0)


# ------------------------------------------------------------------------------------------------- errors


def test_shape_and_pixel_size_mismatch_name_both_images(root, tmp_path):
    sim = root / "sim.zarr"
    img = open_image(sim).sel(c=["AC-15"])
    write_image(img[:, :256, :256], tmp_path / "small.zarr")
    write_image(img.data, tmp_path / "coarse.zarr", dims="cyx", channel_names=["AC-15"], pixel_size=0.09)
    with pytest.raises(InputError, match=r"small\.zarr is 256x256 px but the target .*sim\.zarr:phalloidin is 384x384"):
        evaluate(f"{sim}:phalloidin", {"small": tmp_path / "small.zarr"}, tmp_path / "out")
    with pytest.raises(InputError, match=r"coarse\.zarr has pixel size 0\.09x0\.09 but the target .*sim\.zarr"):
        evaluate(f"{sim}:phalloidin", {"coarse": tmp_path / "coarse.zarr"}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_channel_and_type_errors(root, tmp_path):
    sim = root / "sim.zarr"
    with pytest.raises(ChannelError, match=r"unknown channel 'nope'.*phalloidin"):
        evaluate(f"{sim}:phalloidin", {"x": f"{sim}:nope"}, tmp_path / "out")
    with pytest.raises(ChannelError, match=r"has channels \['AC-15', 'phalloidin', 'truth'\]; name one"):
        evaluate(str(sim), {"x": f"{sim}:AC-15"}, tmp_path / "out")
    # Without normalisation a float restoration and a uint16 target cannot be compared (metrics module's error).
    with pytest.raises(InputError, match=r"float restoration with a uint16 target without normalisation"):
        evaluate(f"{sim}:phalloidin", {"fake": root / "fake.zarr"}, tmp_path / "out", normalize="none", patches=0)
    with pytest.raises(ConfigError, match="reserved"):
        parse_method(f"input={sim}:AC-15")
    with pytest.raises(OutputError, match="exists"):
        evaluate(f"{sim}:phalloidin", {"fake": root / "fake.zarr"}, root / "results")
    assert ImageSpec.parse("a/b.zarr/A/1/0:DAPI") == ImageSpec(Path("a/b.zarr/A/1/0"), "DAPI")


def test_cli_errors_are_one_line_exit_2(root, tmp_path, capsys):
    rc = main(["evaluate", "--target", f"{root}/sim.zarr:phalloidin", "--method", f"x={root}/sim.zarr:nope",
               str(tmp_path / "out"), "--scheduler", "threads"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "unknown channel 'nope'" in err
