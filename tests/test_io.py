"""The OME-Zarr data layer: NGFF 0.4/0.5 reading, 0.5 pyramid and plate writing, atomicity, laziness."""

from __future__ import annotations

import threading
import time
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from l2l_scale.errors import ChannelError, InputError, OutputError
from l2l_scale.io import blockwrite as bw
from l2l_scale.io.output import PROGRESS_DIR, partial_path
from l2l_scale.io.prov import provenance
from l2l_scale.io.read import list_fields, list_images, open_image, read_info, read_region, select_channels
from l2l_scale.io.write import pyramid_shapes, write_image, write_plate


def _image(shape=(2, 300, 260), chunks=(1, 128, 128), names=("AC-15", "phalloidin"), px=0.05, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 4000, size=shape, dtype=np.uint16)
    arr = xr.DataArray(da.from_array(data, chunks=chunks), dims=("c", "y", "x"), coords={"c": list(names)},
                       attrs={"pixel_size": {"y": px, "x": px}})
    return arr, data


def _validate(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    model = open_ome_zarr(str(path))
    nodes = list(Reader(parse_url(str(path)))())
    return model, nodes


def test_roundtrip_keeps_data_and_metadata(tmp_path):
    arr, data = _image()
    out = write_image(arr, tmp_path / "img.zarr", chunks=128, provenance=provenance({"k": 1}, "src.tif"))
    img = open_image(out)
    assert img.dims == ("c", "y", "x")
    assert isinstance(img.data, da.Array)
    np.testing.assert_array_equal(img.values, data)
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    assert img.attrs["pixel_size"] == {"y": 0.05, "x": 0.05}
    np.testing.assert_allclose(img.coords["x"].values[:3], [0.0, 0.05, 0.10])
    prov = img.attrs["l2l_scale"]
    assert prov["parameters"] == {"k": 1} and prov["input"] == "src.tif" and prov["version"]
    group = zarr.open_group(str(out), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    assert group["0"].metadata.dimension_names == ("c", "y", "x")
    assert group["0"].chunks == (1, 128, 128)
    codec = group["0"].compressors[0]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"
    windows = [ch["window"] for ch in ome["omero"]["channels"]]
    assert all(w["end"] > w["start"] for w in windows)
    model, nodes = _validate(out)
    assert type(model).__name__ == "Image"
    assert nodes[0].metadata["channel_names"] == ["AC-15", "phalloidin"]


def test_metadata_equals_what_ome_zarr_writer_writes(tmp_path):
    """write.py builds the multiscales and plate blocks itself (see its comments); they must stay ome-zarr-py's."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata, write_plate_metadata, write_well_metadata

    arr, _ = _image()
    out = write_image(arr, tmp_path / "img.zarr", chunks=64, top_max=100)
    ours = dict(zarr.open_group(str(out), mode="r").attrs["ome"])
    px = 0.05
    datasets = []
    for i in range(3):  # 300x260 halved until <= 100; a 2^i mean is centred (2^i - 1)/2 fine pixels in
        transforms = [{"type": "scale", "scale": [1.0, px * 2**i, px * 2**i]}]
        if i:
            transforms.append({"type": "translation", "translation": [0.0, px * (2**i - 1) / 2, px * (2**i - 1) / 2]})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    write_multiscales_metadata(ref, datasets, fmt=FormatV05(), axes=["c", "y", "x"],
                               axes_units={"y": "micrometer", "x": "micrometer"}, name="img",
                               metadata={"omero": ours["omero"]})
    assert ours == dict(ref.attrs["ome"])

    plate = write_plate({"A/1/0": arr, "A/1/1": arr, "B/3/0": arr}, tmp_path / "plate.zarr", chunks=128)
    ours = dict(zarr.open_group(str(plate), mode="r").attrs["ome"])
    ref = zarr.open_group(str(tmp_path / "refplate.zarr"), mode="w", zarr_format=3)
    write_plate_metadata(ref, ["A", "B"], ["1", "3"], ["A/1", "B/3"], fmt=FormatV05(), field_count=2, name="plate")
    theirs = dict(ref.attrs["ome"])
    assert theirs["plate"].pop("version") == "0.5"  # the one difference, see write_plate_layout
    assert ours == theirs
    for well, fields in (("A/1", ["0", "1"]), ("B/3", ["0"])):  # wells are written as files, see write_plate_layout
        write_well_metadata(ref.require_group(well), [{"path": f} for f in fields], fmt=FormatV05())
        assert dict(zarr.open_group(str(plate / well), mode="r").attrs) == dict(ref[well].attrs)


def test_pyramid_is_2x_mean_until_1024(tmp_path):
    data = np.arange(2200 * 1100, dtype=np.float32).reshape(1, 2200, 1100) % 997
    out = write_image(xr.DataArray(data, dims=("c", "y", "x"), attrs={"pixel_size": 0.1}), tmp_path / "p.zarr",
                      chunks=512)
    info = read_info(out)
    assert info["levels"] == [[1, 2200, 1100], [1, 1100, 550], [1, 550, 275]]
    lvl1 = open_image(out, level=1)
    ref = data[:, :2200, :1100].reshape(1, 1100, 2, 550, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(lvl1.values, ref, rtol=1e-6)
    # Level k pixel centres sit at the mean of the 2^k level-0 centres they average.
    assert lvl1.attrs["pixel_size"]["x"] == pytest.approx(0.2)
    assert lvl1.coords["x"].values[0] == pytest.approx(0.05)
    assert open_image(out, level=-1).shape == (1, 550, 275)


def test_opening_reads_no_pixel_data(tmp_path):
    arr, _ = _image()
    out = write_image(arr, tmp_path / "img.zarr", chunks=128)
    for chunk_file in (out / "0").rglob("*"):
        if chunk_file.is_file() and chunk_file.name != "zarr.json":
            chunk_file.unlink()
    img = open_image(out)  # metadata only: works without any chunk on disk
    assert img.shape == (2, 300, 260)
    assert int(img.isel(c=0, y=0, x=0).values) == 0  # missing chunks read as the fill value, proving laziness


def test_ngff_04_is_read(tmp_path):
    # An NGFF 0.4 image as the spec lays it out: zarr v2 arrays, metadata at the top level of .zattrs.
    data = np.random.default_rng(1).integers(0, 255, (2, 64, 80), dtype=np.uint8)
    path = tmp_path / "v04.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("s0", data=data, chunks=(1, 32, 32))
    root.create_array("s1", data=data[:, ::2, ::2], chunks=(1, 32, 32))
    root.attrs.update({
        "multiscales": [{"version": "0.4", "name": "v04",
                         "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                                  {"name": "x", "type": "space", "unit": "micrometer"}],
                         "datasets": [{"path": "s0", "coordinateTransformations": [
                                          {"type": "scale", "scale": [1.0, 0.2, 0.3]}]},
                                      {"path": "s1", "coordinateTransformations": [
                                          {"type": "scale", "scale": [1.0, 0.4, 0.6]}]}]}],
        "omero": {"channels": [{"label": "DM1A"}, {"label": "YOL1/34"}]},
    })
    img = open_image(path)
    assert img.attrs["ngff_version"] == "0.4"
    np.testing.assert_array_equal(img.values, data)
    assert list(img.coords["c"].values) == ["DM1A", "YOL1/34"]
    assert img.attrs["pixel_size"] == {"y": 0.2, "x": 0.3}
    assert open_image(path, level=1).attrs["pixel_size"] == {"y": 0.4, "x": 0.6}


def test_plate_roundtrip(tmp_path):
    a, da_ = _image(seed=1)
    b, db = _image(seed=2)
    c, dc = _image(seed=3)
    out = write_plate({"A/1/0": a, "A/1/1": b, ("B03", 0): c}, tmp_path / "plate.zarr", chunks=128)
    assert list_fields(out) == ["A/1/0", "A/1/1", "B/3/0"]
    np.testing.assert_array_equal(open_image(out, field="A/1/1").values, db)
    np.testing.assert_array_equal(open_image(out / "B/3/0").values, dc)
    refs = list_images(out)
    assert [r.key for r in refs] == ["A/1/0", "A/1/1", "B/3/0"]
    info = read_info(out)
    assert info["plate"]["rows"] == ["A", "B"] and info["plate"]["columns"] == ["1", "3"]
    model, nodes = _validate(out)
    assert type(model).__name__ == "HCS"
    assert not (out / PROGRESS_DIR).exists()


def test_write_streams_with_bounded_memory(tmp_path):
    # 64 MB of float32 written in 256^2 chunks: peak traced memory stays a small multiple of one chunk.
    big = da.random.random((4096, 4096), chunks=(256, 256)).astype(np.float32)
    tracemalloc.start()
    with dask.config.set(scheduler="threads", num_workers=2):
        write_image(big, tmp_path / "big.zarr", dims=("y", "x"), chunks=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16e6, f"peak {peak / 1e6:.1f} MB for a 64 MB image"


def test_failed_write_leaves_nothing(tmp_path):
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise RuntimeError("disk on fire")
        return block

    arr = da.ones((256, 256), chunks=(128, 128), dtype=np.uint16).map_blocks(boom, dtype=np.uint16)
    with pytest.raises(RuntimeError):
        write_image(arr, tmp_path / "x.zarr", dims=("y", "x"), chunks=128)
    assert list(tmp_path.iterdir()) == []


_WRITE_RUNNING = threading.Event()


def _fail_once_a_write_runs(block, block_info=None):
    if block_info[0]["chunk-location"] == (1, 1):
        _WRITE_RUNNING.wait(10)
        raise RuntimeError("disk on fire")
    return block


def _slow_first_write(block, target, region, marker, _write=bw.write_block):
    if all(r.start == 0 for r in region):
        _WRITE_RUNNING.set()
        time.sleep(1.0)  # still writing when block (1, 1) fails
    return _write(block, target, region, marker)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_failed_write_waits_for_running_writes_before_cleaning_up(tmp_path, monkeypatch, scheduler):
    """A chunk write still running when another block fails must not recreate the removed output afterwards."""
    import contextlib

    monkeypatch.setattr(bw, "write_block", _slow_first_write)
    _WRITE_RUNNING.clear()
    arr = da.ones((256, 256), chunks=(128, 128), dtype=np.uint16).map_blocks(_fail_once_a_write_runs, dtype=np.uint16)
    if scheduler == "threads":
        ctx = dask.config.set(scheduler="threads", num_workers=2)
    else:
        import distributed

        ctx = contextlib.ExitStack()
        cluster = ctx.enter_context(distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                                             dashboard_address=None))
        ctx.enter_context(distributed.Client(cluster))
    with ctx:
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_image(arr, tmp_path / "x.zarr", dims=("y", "x"), chunks=128)
        time.sleep(1.5)  # long enough for a late write to land if nothing waited for it
    assert list(tmp_path.iterdir()) == []


def test_resume_writes_only_missing_blocks(tmp_path):
    calls, fail = [], [True]

    def flaky(block, block_info=None):
        loc = block_info[0]["chunk-location"]
        calls.append(loc)
        if loc == (1, 1) and fail[0]:
            fail[0] = False
            raise RuntimeError("killed")
        return block + 1

    base = da.zeros((256, 256), chunks=(128, 128), dtype=np.uint16)
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(RuntimeError):
            write_image(base.map_blocks(flaky, dtype=np.uint16), tmp_path / "r.zarr", dims=("y", "x"),
                        chunks=128, resume=True)
        assert partial_path(tmp_path / "r.zarr").exists() and not (tmp_path / "r.zarr").exists()
        done_before = len(calls) - 1
        calls.clear()
        write_image(base.map_blocks(flaky, dtype=np.uint16), tmp_path / "r.zarr", dims=("y", "x"),
                    chunks=128, resume=True)
    assert len(calls) == 4 - done_before
    np.testing.assert_array_equal(open_image(tmp_path / "r.zarr").values, 1)


def test_output_exists_and_overwrite(tmp_path):
    arr, data = _image()
    out = write_image(arr, tmp_path / "o.zarr")
    with pytest.raises(OutputError, match="--overwrite"):
        write_image(arr * 0, out)
    write_image(arr * 0, out, overwrite=True)
    assert int(open_image(out).max()) == 0
    with pytest.raises(OutputError, match="overlaps the input"):
        write_image(arr, out / "inside.zarr", inputs=[out], overwrite=True)


def test_reader_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_image(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(InputError, match="not an OME-Zarr"):
        open_image(tmp_path / "plain.zarr")
    (tmp_path / "text.zarr").write_text("hello")
    with pytest.raises(InputError, match="not an OME-Zarr"):
        open_image(tmp_path / "text.zarr")
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    g.attrs["multiscales"] = [{"version": "0.3", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(InputError, match="unsupported NGFF version '0.3'"):
        open_image(tmp_path / "old.zarr")
    arr, _ = _image()
    plate = write_plate({"A/1/0": arr}, tmp_path / "pl.zarr")
    with pytest.raises(InputError, match="HCS plate"):
        open_image(plate)
    img = open_image(plate, field="A/1/0")
    with pytest.raises(ChannelError, match="unknown channel 'DAPI'"):
        select_channels(img, ["DAPI"])
    assert list(select_channels(img, ["phalloidin", 0]).coords["c"].values) == ["phalloidin", "AC-15"]


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
def test_damaged_chunks_are_named_and_other_errors_surface(tmp_path, codec):
    compressors = {"zstd": zarr.codecs.ZstdCodec(), "gzip": zarr.codecs.GzipCodec(), "none": None}[codec]
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(64, 64), chunks=(32, 32), dtype="uint16",
                            compressors=compressors)
    arr[:] = np.arange(64 * 64, dtype="uint16").reshape(64, 64)
    chunk = tmp_path / "a.zarr" / "c" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"cannot read region \[0:32, 32:64\].*damaged"):
        read_region(zarr.open_array(tmp_path / "a.zarr"), (slice(0, 32), slice(32, 64)), tmp_path)
    np.testing.assert_array_equal(read_region(arr, (slice(0, 32), slice(0, 32)), tmp_path),
                                  np.asarray(arr[:32, :32]))

    class Failing:
        shape, dtype, ndim = arr.shape, arr.dtype, arr.ndim

        def __init__(self, exc):
            self.exc = exc

        def __getitem__(self, key):
            raise self.exc

    # Not about the stored bytes: a MemoryError, an object-store timeout or a permission error is not "damage".
    for exc in (MemoryError(), TimeoutError("read timed out"), PermissionError("denied"), NotImplementedError()):
        with pytest.raises(type(exc)):
            read_region(Failing(exc), (slice(0, 8),), tmp_path)


def test_plate_pyramids_in_one_graph_are_2x_means_for_mixed_sizes_and_dtypes(tmp_path):
    """Every field's levels, computed in one graph with level 0, equal the 2x mean of the level below."""
    rng = np.random.default_rng(7)
    fields = {"A/1/0": rng.integers(0, 60000, (1, 300, 260), dtype=np.uint16),
              "A/1/1": rng.normal(0, 1, (2, 257, 515)).astype(np.float32),
              "B/4/0": rng.integers(-30000, 30000, (1, 140, 129), dtype=np.int16)}
    arrays = {k: xr.DataArray(v, dims=("c", "y", "x")) for k, v in fields.items()}
    out = write_plate(arrays, tmp_path / "p.zarr", chunks=64, top_max=64)
    for key, data in fields.items():
        group = zarr.open_group(str(out / key), mode="r")
        levels = [group[d["path"]][...] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
        assert len(levels) == len(pyramid_shapes(data.shape, ("c", "y", "x"), 64)) >= 2
        np.testing.assert_array_equal(levels[0], data)
        for fine, coarse in zip(levels[:-1], levels[1:]):
            c, h, w = coarse.shape
            mean = fine[:, :2 * h, :2 * w].astype(np.float64).reshape(c, h, 2, w, 2).mean(axis=(2, 4))
            if fine.dtype.kind in "iu":
                info = np.iinfo(fine.dtype)
                np.testing.assert_array_equal(coarse, np.clip(np.round(mean), info.min, info.max).astype(fine.dtype))
            else:
                np.testing.assert_allclose(coarse, mean, rtol=1e-6, atol=1e-6)
            assert coarse.dtype == fine.dtype
