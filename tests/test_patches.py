"""Patch stores: counts, foreground sampling, augmentation recipe, splits, resume determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from scipy import ndimage

from l2l_scale import patches as patches_mod
from l2l_scale.cli import main
from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.io.output import PROGRESS_DIR, partial_path
from l2l_scale.io.write import write_plate
from l2l_scale.patches import create_patches, open_patches, read_table

SIZE = 256
P = 32
CHANNELS = ["in", "tg", "tg2", "rep"]


def _field(seed: int, size: int = SIZE) -> np.ndarray:
    """A dual-label-like field: bright blobs in the lower-right quadrant only (the target's foreground), the
    input with extra background; uint16 like real data."""
    rng = np.random.default_rng(seed)
    tg = np.zeros((size, size))
    for _ in range(25):
        y, x = rng.integers(size // 2 + 8, size - 8, 2)
        tg[y, x] = 1.0
    tg = ndimage.gaussian_filter(tg, 2.0)
    tg = 3000 * tg / tg.max()
    yy, xx = np.mgrid[:size, :size]
    bg = 300 * (1 + np.sin(yy / 13.0) * np.cos(xx / 17.0))
    inp = 0.5 * tg + bg
    out = [inp + rng.poisson(50, tg.shape), tg + rng.poisson(20, tg.shape), tg[::-1, ::-1] + 10,
           inp + rng.poisson(50, tg.shape)]
    return np.stack(out).astype(np.uint16)


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """A 5-field plate with 64 px chunks, so patch regions cross chunk borders."""
    path = tmp_path_factory.mktemp("data") / "plate.zarr"
    data = {f"A/1/{i}": _field(i) for i in range(5)}
    fields = {k: xr.DataArray(v, dims=("c", "y", "x"), coords={"c": CHANNELS}, attrs={"pixel_size": 0.05})
              for k, v in data.items()}
    write_plate(fields, path, chunks=64)
    return path, data


@pytest.fixture(scope="module")
def store(plate, tmp_path_factory):
    path, _ = plate
    out = tmp_path_factory.mktemp("p") / "patches.zarr"
    create_patches(path, out, input_channels=["in"], target_channels=["tg"], patch_size=P, patches_per_image=40,
                   augment=True, zooms=(0.5, 0.75, 1.25, 1.5), percentiles=(1, 99.9), chunk_patches=48)
    return out


def test_counts_layout_and_metadata(store, plate):
    s = open_patches(store)
    assert s.X.shape == (200, P, P, 1) and s.Y.shape == (200, P, P, 1)
    assert s.X.dtype == np.float32 and s.chunk == 48
    meta = s.meta
    assert meta["channels"] == {"input": ["in"], "output": ["tg"]}
    assert meta["normalization"]["percentiles"] == [1.0, 99.9]
    assert set(meta["normalization"]["values"]) == {f"A/1/{i}" for i in range(5)}
    # 5 pairs, 10 % by pair -> one validation image with all its 40 patches
    assert (s.n_train, s.n_validation) == (160, 40)
    t = read_table(store)
    assert all(len(v) == 200 for v in t.values())
    assert np.array_equal(t["split"], np.r_[np.zeros(160), np.ones(40)])
    for key in set(t["key"]):
        mine = t["key"] == key
        assert mine.sum() == 40
        assert (~t["augmented"][mine]).sum() == 20  # half raw, half augmented
        assert sorted(set(t["zoom"][mine & t["augmented"]])) == [0.5, 0.75, 1.25, 1.5]
        assert set(t["local"][mine]) == set(range(40))
    # Training rows are shuffled across images: every chunk mixes several images.
    assert len(set(t["image"][:48])) > 1
    # Normalisation values are the exact per-image percentiles.
    _, data = plate
    lo, hi = np.percentile(data["A/1/0"][1], [1, 99.9])
    assert np.allclose(meta["normalization"]["values"]["A/1/0"]["tg"], [lo, hi])


def test_pair_split_leaks_nothing(store):
    t = read_table(store)
    train_keys = set(t["key"][t["split"] == 0])
    val_keys = set(t["key"][t["split"] == 1])
    assert val_keys and train_keys and not train_keys & val_keys
    info = {im["key"]: im["split"] for im in open_patches(store).meta["images"]}
    assert {k for k, v in info.items() if v == "validation"} == val_keys


def test_patches_are_zooms_and_rotations_of_their_source(store, plate):
    """Every patch equals the documented recipe applied to its recorded source region."""
    _, data = plate
    s = open_patches(store)
    t = read_table(store)
    X, Y = s.X[...], s.Y[...]
    values = s.meta["normalization"]["values"]
    n_aug = 0
    for r in range(len(t["image"])):
        key = t["key"][r]
        y, x, size, k = int(t["y"][r]), int(t["x"][r]), int(t["size"][r]), int(t["rotation"][r])
        assert size == round(P / t["zoom"][r])
        for arr, ch, c in ((X, "in", 0), (Y, "tg", 1)):
            region = data[key][c, y:y + size, x:x + size].astype(np.float32)
            if size != P:
                region = ndimage.zoom(region, P / size, order=1, mode="nearest", grid_mode=True)
            region = np.rot90(region, k)
            lo, hi = (np.float32(v) for v in values[key][ch])
            expect = (region - lo) / (hi - lo + np.float32(1e-20))
            np.testing.assert_allclose(arr[r, ..., 0], expect, rtol=1e-6, atol=1e-6)
        n_aug += bool(t["augmented"][r])
        if not t["augmented"][r]:
            assert k == 0 and size == P
    assert n_aug == 100
    assert len(set(t["rotation"][t["augmented"]].tolist())) > 1


def test_foreground_sampling(store, plate):
    """Raw patches come from where the target has signal (the lower-right quadrant), per CSBDeep's rule."""
    t = read_table(store)
    raw = ~t["augmented"]
    cy = t["y"][raw] + P // 2
    cx = t["x"][raw] + P // 2
    # the eligibility window is P // 2 around the centre; the coarse grid may add a few pixels
    assert np.all(cy >= SIZE // 2 + 8 - P // 4 - 8) and np.all(cx >= SIZE // 2 + 8 - P // 4 - 8)
    _, data = plate
    for r in np.flatnonzero(raw)[:30]:
        key, y, x = t["key"][r], int(t["y"][r]), int(t["x"][r])
        tg = data[key][1].astype(np.float32)
        assert tg[y:y + P, x:x + P].max() > 0.4 * np.percentile(tg, 99.9)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_deciding_targets_are_csbdeeps(n):
    """CSBDeep's no_background_patches on a (C, Y, X) target, at its only valid C centre, is our rule: the
    deciding channels' max filter above threshold x the percentile of all channels pooled."""
    from csbdeep.data import no_background_patches

    rng = np.random.default_rng(n)
    y = np.zeros((n, 128, 128), np.float32)
    for c in range(n):  # a few spots per channel, channels of different brightness
        for yy, xx in rng.integers(0, 128, (3, 2)):
            y[c, yy, xx] = rng.uniform(0.3, 3.0)
    y = ndimage.gaussian_filter(y, (0, 2, 2)) + 0.01 * rng.random(y.shape).astype(np.float32)
    ref = no_background_patches(0.4, 99.9)((y,), (n, 32, 32))[n // 2]
    deciding = patches_mod._deciding_targets(n)
    ours = np.max([ndimage.maximum_filter(y[c], 16, mode="constant") for c in deciding], axis=0) > (
        0.4 * np.percentile(y, 99.9))
    np.testing.assert_array_equal(ours, ref)
    assert 0.01 < ref.mean() < 0.5


def test_several_targets_foreground_rules(plate, tmp_path):
    """tg has its foreground in the lower-right quadrant, tg2 in the upper-left. CSBDeep's rule lets the middle
    target decide (index 1), against the 99.9th percentile of both pooled; ``any`` samples both quadrants."""
    from l2l_scale.io.read import list_images
    from l2l_scale.preprocess.normalize import pooled_percentiles

    path, data = plate
    refs = list_images(path)
    pooled = pooled_percentiles([(r.key, r.path, ["tg", "tg2"]) for r in refs], 99.9)
    assert pooled == {r.key: float(np.percentile(data[r.key][[1, 2]], 99.9)) for r in refs}
    quads = {}
    for rule, targets in (("csbdeep", ["tg", "tg2"]), ("csbdeep", ["tg2", "tg"]), ("any", ["tg", "tg2"])):
        out = create_patches(path, tmp_path / f"{rule}-{targets[0]}.zarr", mode="separate", input_channels=["in"],
                             target_channels=targets, patch_size=P, patches_per_image=40, foreground=rule)
        t = read_table(out)
        assert open_patches(out).meta["sampling"]["foreground"] == rule
        lower_right = (t["y"] + P // 2 > SIZE // 2) & (t["x"] + P // 2 > SIZE // 2)
        upper_left = (t["y"] + P // 2 < SIZE // 2) & (t["x"] + P // 2 < SIZE // 2)
        quads[rule, targets[0]] = (lower_right.mean(), upper_left.mean())
        if rule == "csbdeep":
            decider = CHANNELS.index(targets[1])
            for r in range(len(t["image"])):
                img = data[t["key"][r]]
                y, x = int(t["y"][r]), int(t["x"][r])
                assert img[decider, y:y + P, x:x + P].max() > 0.4 * pooled[t["key"][r]]
    # (a centre may lie a little past the middle: the window reaches P // 2 beyond a blob)
    assert quads["csbdeep", "tg"][0] == 0 and quads["csbdeep", "tg"][1] > 0.95   # tg2 decides
    assert quads["csbdeep", "tg2"][0] > 0.95 and quads["csbdeep", "tg2"][1] == 0  # tg decides
    assert min(quads["any", "tg"]) > 0.25                                         # both


def test_patch_split_modes_and_channels(plate, tmp_path):
    path, _ = plate
    out = create_patches(path, tmp_path / "sep.zarr", mode="separate", input_channels=["in"],
                         target_channels=["tg", "tg2"], patch_size=P, patches_per_image=10, split_by="patch",
                         validation_fraction=0.2)
    s = open_patches(out)
    assert s.X.shape == (50, P, P, 1) and s.Y.shape == (50, P, P, 2)
    assert (s.n_train, s.n_validation) == (40, 10)
    t = read_table(out)
    assert set(t["key"][t["split"] == 1]) & set(t["key"][t["split"] == 0])  # by patch: images on both sides
    # n2n: the target defaults to "<input>-repeat"; here we name it.
    out = create_patches(path, tmp_path / "n2n.zarr", mode="n2n", input_channels=["in"], target_channels=["rep"],
                         patch_size=P, patches_per_image=4)
    assert open_patches(out).channels == {"input": ["in"], "output": ["rep"]}


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode="separate", input_channels=["in"], target_channels=["tg"]), ChannelError, "at least two target"),
    (dict(mode="l2l", input_channels=["in", "rep"], target_channels=["tg"]), ChannelError, "as many target"),
    (dict(mode="n2n", input_channels=["in"], target_channels=["in"]), ChannelError, "second noise"),
    (dict(input_channels=["nope"], target_channels=["tg"]), ChannelError, "unknown channel 'nope'"),
    (dict(input_channels=["in"], target_channels=["tg"], patch_size=512), InputError, "smaller than the patch"),
    (dict(input_channels=["in"], target_channels=["tg"], augment=True, patch_size=160), InputError, "zoom"),
    (dict(input_channels=["in"], target_channels=["tg"], split_by="pears"), ConfigError, "split_by"),
    (dict(preset="muscle"), ConfigError, "unknown preset"),
])
def test_errors(plate, tmp_path, kwargs, exc, match):
    path, _ = plate
    with pytest.raises(exc, match=match):
        create_patches(path, tmp_path / "x.zarr", patches_per_image=2, **kwargs)
    assert not (tmp_path / "x.zarr").exists()


def test_presets_and_mode_defaults():
    from l2l_scale.config import patch_config

    cfg = patch_config(preset="actin")
    assert (cfg.input_channels, cfg.target_channels, cfg.percentiles, cfg.augment) == (
        ["AC-15"], ["phalloidin"], (1.0, 99.9), True)
    assert patch_config(preset="actin", mode="n2n").target_channels == ["AC-15-repeat"]
    cav = patch_config(preset="caveolae")
    assert cav.zooms == (0.8, 0.9, 1.1, 1.2) and cav.poisson and cav.percentiles == (2.0, 99.5)
    sep = patch_config(preset="separation")
    assert sep.mode == "separate" and sep.target_channels == ["SYTOX", "CD44"] and sep.percentiles == (2.0, 99.8)
    assert patch_config(preset="tubulin", augment=False).augment is False
    with pytest.raises(ConfigError, match="unknown key 'patch_sise'"):
        patch_config(input_channels=["a"], target_channels=["b"], patch_sise=3)


def test_no_foreground_is_an_error(tmp_path):
    flat = np.full((2, 64, 64), 100, np.uint16)
    flat[:, 0, 0] = 101  # not constant, so the percentiles exist
    img = xr.DataArray(flat, dims=("c", "y", "x"), coords={"c": ["in", "tg"]})
    write_plate({"A/1/0": img, "A/1/1": img}, tmp_path / "flat.zarr")
    with pytest.raises(InputError, match=r"no image has foreground .*target 'tg' exceeds 1 x the 99.9th") as exc:
        create_patches(tmp_path / "flat.zarr", tmp_path / "p.zarr", input_channels=["in"], target_channels=["tg"],
                       patch_size=16, patches_per_image=4, threshold=1.0)
    assert "\n" not in str(exc.value) and not (tmp_path / "p.zarr").exists()


def test_resume_is_bit_identical_and_recomputes_only_missing(plate, store, tmp_path, monkeypatch):
    """An interrupted run (one image task fails) resumed later gives the same bytes as an uninterrupted run."""
    path, _ = plate
    calls = []
    real = patches_mod._image_task

    def flaky(job):
        calls.append(job["key"])
        if job["key"] == "A/1/3" and calls.count("A/1/3") == 1:  # the first attempt crashes
            raise RuntimeError("simulated crash")
        return real(job)

    monkeypatch.setattr(patches_mod, "_image_task", flaky)
    out = tmp_path / "again.zarr"
    kw = dict(input_channels=["in"], target_channels=["tg"], patch_size=P, patches_per_image=40, augment=True,
              zooms=(0.5, 0.75, 1.25, 1.5), percentiles=(1, 99.9), chunk_patches=48)
    import dask

    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="simulated crash"):
        create_patches(path, out, resume=True, **kw)
    assert not out.exists() and partial_path(out).exists()
    staged = list((partial_path(out) / PROGRESS_DIR / "staging").glob("*.json"))
    assert len(staged) < 5
    with pytest.raises(OutputError, match="--resume"):
        create_patches(path, out, **kw)
    first = len(calls)
    create_patches(path, out, resume=True, **kw)
    # Exactly the unfinished images ran again (the failed one among them), not all five.
    assert len(calls) - first == 5 - len(staged) and "A/1/3" in calls[first:]
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("X", "Y"):
        assert np.array_equal(a[name][...], b[name][...])
    for name in patches_mod.TABLE_COLUMNS:
        assert np.array_equal(a["table"][name][...], b["table"][name][...])


def test_resume_refuses_changed_options(plate, tmp_path, monkeypatch):
    path, _ = plate
    monkeypatch.setattr(patches_mod, "_assemble_task", lambda job: (_ for _ in ()).throw(RuntimeError("stop")))
    kw = dict(input_channels=["in"], target_channels=["tg"], patch_size=P, patches_per_image=4)
    with pytest.raises(RuntimeError):
        create_patches(path, tmp_path / "c.zarr", resume=True, **kw)
    monkeypatch.undo()
    with pytest.raises(OutputError, match="different config"):
        create_patches(path, tmp_path / "c.zarr", resume=True, **dict(kw, patches_per_image=5))
    create_patches(path, tmp_path / "c.zarr", resume=True, **kw)
    assert open_patches(tmp_path / "c.zarr").n_patches == 20


def test_sampled_percentiles_follow_csbdeep(plate, tmp_path):
    """Every patch is its raw region mapped by percentiles drawn in CSBDeep's ranges, shared by input and target."""
    path, data = plate
    store = create_patches(path, tmp_path / "s.zarr", input_channels=["in"], target_channels=["tg"], patch_size=P,
                           patches_per_image=12, sample_percentiles=True, split_by="patch")
    s, t = open_patches(store), read_table(store)
    assert s.meta["normalization"]["sampled"]["low"] == [1.0, 3.0]
    levels = []
    for i in range(s.n_patches):
        img = data[t["key"][i]]
        y, x = int(t["y"][i]), int(t["x"][i])
        lohi = []
        for arr, c in ((s.X, 0), (s.Y, 1)):
            raw = img[c, y:y + P, x:x + P].astype(np.float64).ravel()
            a, b = np.polyfit(raw, np.asarray(arr[i]).astype(np.float64).ravel(), 1)  # patch = a * raw + b
            lohi.append((-b / a, -b / a + 1 / a))
        # lo/hi interpolate each image's numpy percentiles at the module's grid of levels: invert the input's.
        gl, gh = np.array(patches_mod._GRID_LOW), np.array(patches_mod._GRID_HIGH)
        ql = np.interp(lohi[0][0], np.percentile(img[0], gl), gl)
        qh = np.interp(lohi[0][1], np.percentile(img[0], gh), gh)
        assert 1.0 <= ql <= 3.0 and 99.5 <= qh <= 99.9
        # One draw for input and target: the target's values are its percentiles at the same levels.
        want = np.interp(ql, gl, np.percentile(img[1], gl)), np.interp(qh, gh, np.percentile(img[1], gh))
        assert lohi[1][0] == pytest.approx(want[0], abs=1.0)  # the target's low end steps by whole grey levels
        assert lohi[1][1] == pytest.approx(want[1], rel=1e-3)
        levels.append(ql)
    assert np.std(levels) > 0.3  # drawn per patch, not one value


def test_poisson_noise_is_deterministic(plate, tmp_path):
    path, _ = plate
    kw = dict(input_channels=["in"], target_channels=["tg"], patch_size=P, patches_per_image=6, poisson=True, seed=3)
    a = create_patches(path, tmp_path / "a.zarr", **kw)
    b = create_patches(path, tmp_path / "b.zarr", **kw)
    c = create_patches(path, tmp_path / "c.zarr", **dict(kw, poisson=False))
    xa, xb, xc = (open_patches(p).X[...] for p in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    assert np.array_equal(read_table(a)["y"], read_table(c)["y"])  # same positions, only the noise differs


def test_cli(plate, tmp_path, capsys):
    path, _ = plate
    out = tmp_path / "cli.zarr"
    code = main(["patches", str(path), str(out), "--input-channel", "in", "--target-channel", "tg", "--patch-size",
                 "32", "--patches-per-image", "8", "--augment", "--scheduler", "threads"])
    assert code == 0 and open_patches(out).n_patches == 40
    code = main(["patches", str(path), str(tmp_path / "bad.zarr"), "--mode", "separate", "--input-channel", "in",
                 "--target-channel", "tg", "--scheduler", "threads"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "at least two target channels" in err[-1] and len(err[-1].splitlines()) == 1
    code = main(["patches", str(path), str(out), "--input-channel", "in", "--target-channel", "tg",
                 "--scheduler", "threads"])
    assert code == 2 and "output exists" in capsys.readouterr().err
    sep = tmp_path / "any.zarr"
    code = main(["patches", str(path), str(sep), "--mode", "separate", "--input-channel", "in", "--target-channel",
                 "tg,tg2", "--patch-size", "32", "--patches-per-image", "8", "--foreground", "any",
                 "--scheduler", "threads"])
    assert code == 0 and open_patches(sep).meta["sampling"]["foreground"] == "any"
    with pytest.raises(SystemExit) as exc:
        main(["patches", str(path), str(tmp_path / "x.zarr"), "--input-channel", "in", "--target-channel", "tg",
              "--foreground", "middle"])
    assert exc.value.code == 2 and "invalid choice: 'middle'" in capsys.readouterr().err
