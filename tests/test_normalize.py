"""Tests of l2l_scale.preprocess.normalize: exact whole-image percentiles (DESIGN invariant 2), the stats JSON,
and CSBDeep-compatible normalisation.

"Exact" means ``==`` against ``np.percentile`` on the same values, not a tolerance.
"""

from __future__ import annotations

import json

import dask
import dask.array as da
import dask.core
import numpy as np
import pytest
import xarray as xr

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.io import write_image, write_plate
from l2l_scale.preprocess import percentile_engine as norm
from l2l_scale.preprocess.normalize import (
    dataset_stats,
    load_stats,
    normalize,
    parse_percentiles,
    percentiles,
    stats_for,
    write_stats,
)

Q = (0, 0.1, 1, 2, 50, 99.5, 99.8, 99.9, 100)


def _expected(arr: np.ndarray, q=Q, axis: int = 0) -> np.ndarray:
    arr = np.moveaxis(arr, axis, 0)
    return np.stack([np.percentile(ch, q) for ch in arr])


def _microscopy_like(rng: np.random.Generator, shape, dtype, lo, hi) -> np.ndarray:
    """Background with many ties, a dim and a saturated population: percentiles land on ties and in gaps."""
    background = rng.poisson(100, shape)
    mask = rng.random(shape)
    img = np.where(mask > 0.97, rng.integers(lo, hi, shape), background)
    img = np.where(mask > 0.999, hi - 1, img)  # a saturated spike: the top percentiles tie
    return np.clip(img, lo, hi - 1).astype(dtype)


# ------------------------------------------------------------------------------------------ integer: exact


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float16", "float32", "float64"])
def test_percentiles_in_memory_equal_numpy(dtype):
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 1000, 65536):
        x = _microscopy_like(rng, (n,), np.int64, 0, 200 if dtype == "uint8" else 3000).astype(dtype)
        if dtype.startswith("float"):
            x = x / 7 - 100  # negative values and fractions
        for q in ((0.1, 99.9), (0, 100), (50,), (2.0, 99.8, 33.3), (0.7, 0.6, 99.9, 0.1)):  # shared ranks too
            np.testing.assert_array_equal(norm.percentiles_in_memory(x, q), np.percentile(x, q))


def test_uint16_multichunk_equals_numpy_exactly():
    rng = np.random.default_rng(1)
    arr = _microscopy_like(rng, (2, 1000, 1300), np.uint16, 0, 65536)
    img = xr.DataArray(da.from_array(arr, chunks=(1, 256, 256)), dims=("c", "y", "x"),
                       coords={"c": ["AC-15", "phalloidin"]})
    got = percentiles(img, Q)
    assert got.shape == (2, len(Q)) and got.dtype == np.float64
    np.testing.assert_array_equal(got, _expected(arr))


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint8, 0, 256), (np.int16, -30000, 30000), (np.int8, -128, 128)])
def test_small_ints_exact_including_negatives(dtype, lo, hi):
    rng = np.random.default_rng(2)
    arr = _microscopy_like(rng, (3, 301, 257), dtype, lo, hi)
    arr[1] = (arr[1].astype(np.int64) - (hi - lo) // 2).clip(lo, hi - 1).astype(dtype)  # negatives
    got = percentiles(da.from_array(arr, chunks=(2, 64, 100)), Q, channel_axis=0)  # two channels per chunk
    np.testing.assert_array_equal(got, _expected(arr))


@pytest.mark.parametrize("dtype,lo,hi", [(np.int32, -2**31, 2**31 - 1), (np.uint32, 0, 4096),
                                         (np.int64, -2**62, 2**62), (np.uint64, 0, 2**63)])
def test_wide_ints_exact(dtype, lo, hi):
    rng = np.random.default_rng(3)
    arr = rng.integers(lo, hi, (2, 200, 230), dtype=np.int64 if dtype != np.uint64 else np.uint64).astype(dtype)
    arr[:, :50] = arr[0, 0, 0]  # heavy ties
    got = percentiles(da.from_array(arr, chunks=(1, 64, 64)), Q, channel_axis=0)
    np.testing.assert_array_equal(got, _expected(arr))


def test_signed_gap_wider_than_the_dtype_is_not_wrapped():
    # numpy computes b - a in int16 here and wraps (it returns 32768); we return the true median.
    arr = np.array([-30000, 30000, -30000, 30000], dtype=np.int16)
    got = percentiles(arr, (25, 50), channel_axis=None)
    np.testing.assert_array_equal(got, np.percentile(arr.astype(np.int64), (25, 50)))
    assert got[1] == 0.0


def test_channel_axis_variants_and_pooled():
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 4000, (123, 77, 3)).astype(np.uint16)  # channels last
    d = da.from_array(arr, chunks=(50, 40, 2))
    np.testing.assert_array_equal(percentiles(d, Q, channel_axis=-1), _expected(arr, axis=2))
    pooled = percentiles(d, Q, channel_axis=None)
    assert pooled.shape == (len(Q),)
    np.testing.assert_array_equal(pooled, np.percentile(arr, Q))
    # A DataArray without a c dim is one channel; numpy input works too.
    one = xr.DataArray(arr[..., 0], dims=("y", "x"))
    np.testing.assert_array_equal(percentiles(one, Q), [np.percentile(arr[..., 0], Q)])
    with pytest.raises(ConfigError, match="plain array"):
        percentiles(d, Q)  # "c" names a dimension, a dask array has none
    with pytest.raises(ConfigError, match="does not exist"):
        percentiles(d, Q, channel_axis=5)
    with pytest.raises(ConfigError):
        percentiles(d, (1, 101), channel_axis=0)


# -------------------------------------------------------------------------------------------- float: exact


def _float_cases(rng):
    n = (2, 300, 410)
    ties = np.round(rng.normal(0.0, 1.0, n), 1).astype(np.float32)  # ~60 distinct values
    bimodal = np.where(rng.random(n) < 0.7, rng.normal(-5, 0.5, n), rng.normal(1e4, 3.0, n)).astype(np.float32)
    zeros = np.where(rng.random(n) < 0.5, 0.0, rng.random(n)).astype(np.float32)  # half exactly 0
    zeros[1] *= -1  # negative values and -0.0 do not confuse the order
    return {"ties": ties, "bimodal": bimodal, "zeros": zeros}


@pytest.mark.parametrize("case", ["ties", "bimodal", "zeros"])
def test_float32_equals_numpy(case):
    arr = _float_cases(np.random.default_rng(5))[case]
    got, bound = percentiles(da.from_array(arr, chunks=(1, 128, 128)), Q, channel_axis=0, return_bound=True)
    want = _expected(arr)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got, want)  # in fact exact
    assert bound == 0.0


def test_float_refinement_and_gather_paths_are_exact(monkeypatch):
    rng = np.random.default_rng(6)
    f32 = _float_cases(rng)["bimodal"]
    # Values that share their top 32 bits: float64 needs the 3rd and 4th 16-bit pass.
    f64 = np.where(rng.random((1, 200, 300)) < 0.5, 1000.0, 1000.0 + rng.random((1, 200, 300)) * 1e-9)
    f16 = rng.normal(0, 100, (2, 100, 90)).astype(np.float16)
    for limit in (norm._GATHER_LIMIT, 10):  # default: gather the rank's bin; 10: refine it by histograms
        monkeypatch.setattr(norm, "_GATHER_LIMIT", limit)
        for arr in (f32, f64, f16):
            got = percentiles(da.from_array(arr, chunks=(1, 64, 128)), Q, channel_axis=0)
            np.testing.assert_array_equal(got, _expected(arr))


def test_max_passes_reports_an_error_bound_that_holds():
    arr = np.random.default_rng(7).normal(50, 10, (1, 300, 300)).astype(np.float32)
    got, bound = percentiles(da.from_array(arr, chunks=(1, 100, 100)), Q, channel_axis=0, max_passes=1,
                             return_bound=True)
    want = _expected(arr)
    assert 0 < bound < 1.0  # one 16-bit pass pins a float32 to ~2**-7 relative
    assert np.all(np.abs(got - want) <= bound)
    assert not np.array_equal(got, want)  # the bound is not vacuous: one pass really is inexact here


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_an_input_error(bad):
    arr = np.ones((2, 64, 64), np.float32)
    arr[1, 5, 7] = bad
    with pytest.raises(InputError, match="NaN or Inf.*fix or mask"):
        percentiles(da.from_array(arr, chunks=(1, 32, 32)), (1, 99), channel_axis=0)


def test_unsupported_dtype_is_an_input_error():
    with pytest.raises(InputError, match="not supported"):
        percentiles(np.ones((4, 4), np.complex64), (1, 99), channel_axis=None)


# ------------------------------------------------------------------------------------- graph structure


def test_histograms_are_tree_reduced():
    cells = da.zeros((2, 10, 10), chunks=1, dtype=object)  # one cell per block: 200 blocks
    root = norm._reduce_blocks(cells, split_every=8)
    graph = dict(root.__dask_graph__())
    fan_in = [len(dask.core.get_dependencies(graph, k)) for k in graph]
    assert max(fan_in) <= 8  # a tree: no task waits on all 200 blocks
    assert len(graph) > 200 + 200 // 8


def test_one_pass_for_16_bit_data(monkeypatch):
    calls = []
    real = norm._compute_batch
    monkeypatch.setattr(norm, "_compute_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    arr = np.random.default_rng(8).integers(0, 65536, (3, 100, 100)).astype(np.uint16)
    percentiles(da.from_array(arr, chunks=(1, 50, 50)), Q, channel_axis=0)
    assert len(calls) == 1  # all channels in one pass over the data


def test_distributed_client_gives_the_same_result():
    distributed = pytest.importorskip("distributed")
    arr = np.random.default_rng(9).normal(0, 1, (2, 200, 200)).astype(np.float32)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster):
        got = percentiles(da.from_array(arr, chunks=(1, 64, 64)), Q, channel_axis=0)
    np.testing.assert_array_equal(got, _expected(arr))


# -------------------------------------------------------------------------------------- datasets + JSON


@pytest.fixture
def plate(tmp_path):
    rng = np.random.default_rng(10)
    fields = {
        "A/1/0": _microscopy_like(rng, (2, 150, 170), np.uint16, 0, 65536),
        "A/1/1": _microscopy_like(rng, (2, 90, 130), np.uint16, 0, 65536),
        "B/2/0": _microscopy_like(rng, (2, 120, 64), np.uint16, 0, 65536),
    }
    imgs = {k: xr.DataArray(v, dims=("c", "y", "x"), coords={"c": ["AC-15", "phalloidin"]})
            for k, v in fields.items()}
    path = write_plate(imgs, tmp_path / "plate.zarr", chunks=64)
    return path, fields


def test_dataset_scope_equals_percentile_of_concatenation(plate):
    path, fields = plate
    stats = dataset_stats(path, q="1,99.9", scope="dataset")
    assert stats["l2l_scale_stats"] == 1 and stats["scope"] == "dataset" and stats["method"] == "histogram-exact"
    assert stats["error_bound"] == 0.0 and stats["percentiles"] == [1.0, 99.9]
    assert set(stats["images"]) == set(fields)
    for c, name in enumerate(["AC-15", "phalloidin"]):
        pooled = np.concatenate([f[c].ravel() for f in fields.values()])
        lo, hi = np.percentile(pooled, (1, 99.9))
        entry = stats["dataset"][name]
        assert (entry["lo"], entry["hi"]) == (lo, hi)
        assert (entry["min"], entry["max"], entry["count"]) == (pooled.min(), pooled.max(), pooled.size)
        assert entry["dtype"] == "uint16"
        for key, f in fields.items():
            e = stats["images"][key][name]
            assert (e["lo"], e["hi"]) == tuple(np.percentile(f[c], (1, 99.9)))
    json.dumps(stats)  # JSON-able as it is


def test_dataset_scope_float_and_channel_selection(tmp_path, capsys):
    rng = np.random.default_rng(11)
    a = rng.normal(0, 1, (2, 100, 120)).astype(np.float32)
    b = np.round(rng.normal(3, 2, (2, 80, 60)), 2).astype(np.float32)
    root = tmp_path / "folder"
    root.mkdir()
    for name, arr in (("a", a), ("b", b)):
        write_image(xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": ["x1", "x2"]}), root / f"{name}.zarr",
                    chunks=32)
    capsys.readouterr()
    stats = dataset_stats(root, q=(2, 99.5), scope="dataset", channels=["x2"], progress=True)
    assert "stats (pass 2)" in capsys.readouterr().out
    assert stats["method"] == "two-pass" and stats["passes"] == 2 and stats["error_bound"] == 0.0
    assert set(stats["images"]) == {"a", "b"} and set(stats["dataset"]) == {"x2"}
    pooled = np.concatenate([a[1].ravel(), b[1].ravel()])
    assert (stats["dataset"]["x2"]["lo"], stats["dataset"]["x2"]["hi"]) == tuple(np.percentile(pooled, (2, 99.5)))
    with pytest.raises(ChannelError):
        dataset_stats(root, channels=["nope"])


def test_dataset_scope_needs_shared_channels_and_dtype(tmp_path):
    def write(name, arr, channels):
        write_image(xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": channels}), tmp_path / name, chunks=32)

    write("a.zarr", np.ones((2, 40, 40), np.uint16), ["x1", "x2"])
    write("b.zarr", np.ones((2, 40, 40), np.uint8), ["x1", "y"])
    with pytest.raises(ChannelError, match="pools channels by name"):
        dataset_stats(tmp_path, scope="dataset")
    with pytest.raises(InputError, match="needs one dtype"):
        dataset_stats(tmp_path, scope="dataset", channels=["x1"])
    per_image = dataset_stats(tmp_path, scope="image")  # fine per image
    assert per_image["images"]["b"]["y"]["dtype"] == "uint8"


def test_image_scope_over_many_images_runs_whole_images_per_task(tmp_path, monkeypatch):
    """From 2 images per thread each task reads and finishes whole images; the figures are numpy's exactly and
    the same as the engine's chunk-spread path, for every dtype and pass count, and errors stay as clear."""
    from l2l_scale.preprocess import normalize as nmod
    from l2l_scale.preprocess import stats_sources

    rng = np.random.default_rng(13)
    arrays = {
        "u16": _microscopy_like(rng, (2, 150, 170), np.uint16, 0, 65536),
        "f32": rng.normal(5, 3, (2, 90, 70)).astype(np.float32),  # 32-bit keys: two passes
        "i8": rng.integers(-128, 128, (2, 40, 50)).astype(np.int8),
        "f64": rng.normal(0, 1, (2, 64, 64)),
        "u16b": _microscopy_like(rng, (2, 33, 200), np.uint16, 100, 4096),
    }
    root = tmp_path / "folder"
    root.mkdir()
    for name, arr in arrays.items():
        write_image(xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": ["in", "tgt"]}), root / f"{name}.zarr",
                    chunks=64)
    calls = []
    task = nmod._images_task
    monkeypatch.setattr(nmod, "_images_task", lambda *a: calls.append(len(a[0].value)) or task(*a))
    with dask.config.set(scheduler="threads", num_workers=2):
        stats = dataset_stats(root, q=(2, 99.5))
        assert calls == [len(arrays)]  # one process, 0.3 MB of pixels: one task
        calls.clear()
        monkeypatch.setattr(stats_sources, "_TASK_BYTES", 1)  # a task per image
        assert dataset_stats(root, q=(2, 99.5)) == stats and calls == [1] * len(arrays)
        assert list(stats["images"]) == sorted(arrays) and stats["passes"] == 2
        assert stats["method"] == "two-pass" and stats["error_bound"] == 0.0
        for name, arr in arrays.items():
            for c, ch in enumerate(["in", "tgt"]):
                e = stats["images"][name][ch]
                assert (e["lo"], e["hi"]) == tuple(np.percentile(arr[c], (2, 99.5))), (name, ch)
                assert (e["min"], e["max"], e["count"], e["dtype"]) == (arr[c].min(), arr[c].max(), arr[c].size,
                                                                        str(arr.dtype))
        only = dataset_stats(root, q=(2, 99.5), channels=["tgt"])
        assert all(list(v) == ["tgt"] for v in only["images"].values())
        with pytest.raises(ChannelError, match="nope"):
            dataset_stats(root, channels=["nope"])
        monkeypatch.setattr(nmod, "_PER_IMAGE_TASKS_FROM", 10**9)  # the engine's chunk-spread path
        calls.clear()
        engine = dataset_stats(root, q=(2, 99.5))
        assert not calls and engine["images"] == stats["images"] and engine["passes"] == stats["passes"]


def test_image_scope_single_image_and_json_round_trip(tmp_path):
    arr = _microscopy_like(np.random.default_rng(12), (2, 100, 90), np.uint16, 0, 4096)
    img = write_image(xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": ["in", "target"]}),
                      tmp_path / "img.zarr", chunks=40)
    stats = dataset_stats(img)
    assert list(stats["images"]) == [""] and "dataset" not in stats
    out = write_stats(stats, tmp_path / "stats.json")
    loaded = load_stats(out)
    with pytest.raises(OutputError, match="exists"):
        write_stats(stats, out)
    write_stats(stats, out, overwrite=True)
    assert loaded == json.loads(json.dumps(stats))
    lo, hi = stats_for(loaded, "", "target")
    assert (lo, hi) == tuple(np.percentile(arr[1], (1, 99.9)))
    assert stats_for(out, "", "in") == tuple(np.percentile(arr[0], (1, 99.9)))  # a path works too
    with pytest.raises(ChannelError, match="not in the statistics"):
        stats_for(loaded, "", "DAPI")
    with pytest.raises(InputError, match="not in the statistics"):
        stats_for(loaded, "A/1/0", "in")


def test_dataset_stats_apply_to_every_image(plate):
    path, _ = plate
    stats = dataset_stats(path, scope="dataset")
    assert stats_for(stats, "B/2/0", "AC-15") == (stats["dataset"]["AC-15"]["lo"], stats["dataset"]["AC-15"]["hi"])
    with pytest.raises(ChannelError):
        stats_for(stats, "B/2/0", "DAPI")


def test_bad_scope_is_a_config_error(plate):
    with pytest.raises(ConfigError, match="scope"):
        dataset_stats(plate[0], scope="tile")


@pytest.mark.parametrize("content,match", [
    ("not json", "not valid JSON"),
    ('{"foo": 1}', "not an l2l-scale stats file"),
    ('{"l2l_scale_stats": 99, "percentiles": [1, 99], "scope": "image", "images": {}}', "upgrade"),
    ('{"l2l_scale_stats": 1, "percentiles": [99, 1], "scope": "image", "images": {}}', "percentiles"),
    ('{"l2l_scale_stats": 1, "percentiles": [1, 99], "scope": "dataset", "images": {}}', "'dataset'"),
    ('{"l2l_scale_stats": 1, "percentiles": [1, 99], "scope": "image", "images": {"": {"c": {"lo": "x"}}}}',
     "lo"),
])
def test_load_stats_rejects_wrong_files(tmp_path, content, match):
    p = tmp_path / "s.json"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        load_stats(p)


def test_load_stats_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_stats(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------- percentiles parsing


@pytest.mark.parametrize("text,expected", [("1,99.9", (1.0, 99.9)), (" 2 , 99.5 ", (2.0, 99.5)),
                                           ("0 100", (0.0, 100.0)), ((1, 99.8), (1.0, 99.8)),
                                           ([2.0, 99.5], (2.0, 99.5))])
def test_parse_percentiles(text, expected):
    assert parse_percentiles(text) == expected


@pytest.mark.parametrize("bad", ["1,101", "-1,50", "50,50", "99.9,1", "abc", "1,2,3", "1", "", "nan,5", None,
                                 (1,), ("a", 2), 5])
def test_parse_percentiles_errors(bad):
    with pytest.raises(ConfigError):
        parse_percentiles(bad)


# ------------------------------------------------------------------------------------------- normalize


def test_normalize_matches_csbdeep():
    csb = pytest.importorskip("csbdeep.utils")
    arr = np.random.default_rng(13).integers(0, 4096, (64, 64)).astype(np.uint16)
    lo, hi = np.percentile(arr, (1, 99.9))
    for clip in (False, True):
        want = csb.normalize_mi_ma(arr, lo, hi, clip=clip)
        got = normalize(arr, lo, hi, clip=clip)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_normalize_per_channel_dataarray_stays_lazy():
    arr = np.random.default_rng(14).integers(0, 1000, (2, 32, 32)).astype(np.uint16)
    img = xr.DataArray(da.from_array(arr, chunks=(1, 16, 16)), dims=("c", "y", "x"), coords={"c": ["a", "b"]})
    lo, hi = [10.0, 20.0], [900.0, 800.0]
    out = normalize(img, lo, hi, clip=True)
    assert isinstance(out.data, da.Array)
    want = np.stack([np.clip((arr[c].astype(np.float32) - np.float32(lo[c]))
                             / (np.float32(hi[c]) - np.float32(lo[c]) + np.float32(1e-20)), 0, 1) for c in range(2)])
    np.testing.assert_array_equal(out.values, want)
    np.testing.assert_array_equal(normalize(arr, lo, hi, channel_axis=0, clip=True), want)
    with pytest.raises(ConfigError):
        normalize(img, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])


def test_constant_channel_is_an_input_error():
    img = xr.DataArray(np.zeros((2, 8, 8), np.uint16), dims=("c", "y", "x"), coords={"c": ["AC-15", "DAPI"]})
    with pytest.raises(InputError, match="channel DAPI is constant.*check the channel selection"):
        normalize(img, [0.0, 5.0], [3.0, 5.0])
    with pytest.raises(InputError, match="is constant"):
        normalize(np.zeros((4, 4)), 7.0, 7.0)
    with pytest.raises(InputError, match="not below hi"):
        normalize(np.zeros((4, 4)), 9.0, 7.0)
    # End to end: a constant channel's percentiles are equal, and normalising it fails clearly.
    lo, hi = percentiles(img, (1, 99.9))[1]
    with pytest.raises(InputError, match="constant"):
        normalize(img.sel(c=["DAPI"]), [lo], [hi])


def _untrimmed(trimmed, m):
    """A trimmed ``(first digit, counts)`` histogram as all 2^m counts."""
    out = np.zeros(1 << m, dtype=np.int64)
    if trimmed is not None:
        first, counts = trimmed
        assert counts[0] and counts[-1]  # trimmed to the first and last non-empty digit
        out[first: first + counts.size] = counts
    return out


# 5000 keys: the span from min/max (few keys per digit); 300,000: the full 2^m counts, then trimmed.
@pytest.mark.parametrize("n", [5000, 300_000])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_counting_kernel_equals_bincount_of_the_selected_digits(dtype, n):
    bits = np.dtype(dtype).itemsize * 8
    rng = np.random.default_rng(11)
    keys = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    keys[:1000] = keys[0]  # one prefix with many members, so a selection is not empty
    for known in sorted({0, min(8, bits - 1), max(0, bits - 16)}):
        m = min(16, bits - known)
        prefix = int(keys[0]) >> (bits - known) if known else 0
        sel = keys if not known else keys[(keys >> np.uint64(bits - known)).astype(np.uint64) == prefix]
        digits = (sel.astype(np.uint64) >> np.uint64(bits - known - m)) & np.uint64((1 << m) - 1)
        want = np.bincount(digits.astype(np.intp), minlength=1 << m)
        np.testing.assert_array_equal(_untrimmed(norm._histogram(keys, bits, known, prefix), m), want)


def test_histogram_of_an_empty_selection_is_none():
    keys = np.full(10, 5, dtype=np.uint16)  # top 8 bits 0: prefix 1 selects nothing
    assert norm._histogram(keys, 16, 8, 1) is None
    assert norm._histogram(keys[:0], 16, 0, 0) is None
    np.testing.assert_array_equal(norm._histogram(keys, 16, 8, 0)[1], [10])


def test_counting_kernel_compiles_without_a_writable_cache(monkeypatch):
    """A read-only install with an unwritable home (e.g. a container with a random user) has no numba cache
    location; the kernel must still compile, just without caching."""
    from numba.core import caching

    class _Nowhere(caching._CacheLocator):
        @classmethod
        def from_function(cls, py_func, py_file):
            return None

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [_Nowhere])
    monkeypatch.setattr(norm, "_kernel", None)
    keys = np.array([3, 3, 7, 65535], dtype=np.uint16)
    np.testing.assert_array_equal(_untrimmed(norm._histogram(keys, 16, 0, 0), 16), np.bincount(keys, minlength=65536))


@pytest.mark.parametrize("dtype", [">u2", ">i2", ">i4", ">f4", ">f8"])
def test_big_endian_data_is_exact(dtype):
    """Keys reinterpret bits, so data in non-native byte order must be converted first, not viewed."""
    rng = np.random.default_rng(12)
    arr = rng.normal(100, 300, (2, 60, 70)).clip(0 if dtype == ">u2" else None).astype(dtype)
    got = percentiles(da.from_array(arr, chunks=(1, 32, 32)), Q, channel_axis=0)
    np.testing.assert_array_equal(got, _expected(arr.astype(arr.dtype.newbyteorder("="))))


def test_big_endian_ngff_04_image_as_bioformats2raw_writes_it(tmp_path):
    import zarr

    data = np.random.default_rng(13).integers(0, 4000, (2, 64, 80)).astype(">u2")
    path = tmp_path / "be.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1, 32, 32))
    assert root["0"].dtype == np.dtype(">u2")
    root.attrs.update({"multiscales": [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.1, 0.1]}]}]}],
        "omero": {"channels": [{"label": "a"}, {"label": "b"}]}})
    stats = dataset_stats(path, q=(1, 99.9))
    for c, name in enumerate(("a", "b")):
        lo, hi = np.percentile(data[c].astype(np.uint16), (1, 99.9))
        assert (stats["images"][""][name]["lo"], stats["images"][""][name]["hi"]) == (lo, hi)


def test_stats_writes_nothing_into_the_installed_package(tmp_path):
    """numba's default cache lives next to the source file: after `pip install .` that is site-packages."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from l2l_scale.io.write import write_image

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "l2l_scale", src / "l2l_scale", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          "--target", str(site), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    package = site / "l2l_scale"
    before = sorted(p.relative_to(package) for p in package.rglob("*"))
    image = write_image(xr.DataArray(np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64), dims=("c", "y", "x"),
                                     coords={"c": ["a"]}), tmp_path / "img.zarr")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    # Python's own bytecode is not what this test is about (pip compiles it at install time anyway).
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path),
               PYTHONDONTWRITEBYTECODE="1")
    code = ("import sys, l2l_scale; from l2l_scale.cli import main; print(l2l_scale.__file__); "
            f"sys.exit(main(['stats', {str(image)!r}, '--scheduler', 'threads']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(package / "__init__.py")
    assert sorted(p.relative_to(package) for p in package.rglob("*")) == before
    assert list((tmp_path / "cache" / "l2l-scale" / "numba").rglob("*.nbi")), "the kernel cache goes to the user cache"
