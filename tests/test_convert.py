"""TIFF / OME-TIFF ingest (l2l_scale.io.convert): round trips, metadata, laziness, layouts and errors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import tifffile.zarr

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.io import tiff as conv
from l2l_scale.io.convert import convert, expand_inputs
from l2l_scale.io.read import list_fields, list_images, open_image, read_info
from l2l_scale.io.tiff import read_tiff


def _ramp(shape, dtype=np.uint16, seed=0):
    """Non-constant, reproducible test data (a constant image would hide transposes and offsets)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(dtype)


def _validate(path: Path, kind: str = "image") -> None:
    """The output passes the NGFF models and opens in ome-zarr-py."""
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    model = ome_zarr_models.open_ome_zarr(str(path))
    assert type(model).__name__ == ("Image" if kind == "image" else "HCS"), type(model)
    assert type(model).__module__.startswith("ome_zarr_models.v05")
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes and nodes[0].data


def _no_leftovers(folder: Path) -> None:
    """Nothing but the inputs: no image, folder output, ``.partial`` or ``.replaced`` left behind."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if ".zarr" in n or n.startswith("out") or n.endswith((".partial", ".replaced"))], names


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- round trips


def test_single_page_2d_round_trip(tmp_path, capsys):
    data = _ramp((70, 90))
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, data)
    out = convert([src], tmp_path / "plain.zarr")
    assert out == [tmp_path / "plain.zarr"]
    img = open_image(out[0])
    assert img.dims == ("c", "y", "x")
    assert list(img.coords["c"].values) == ["0"]
    np.testing.assert_array_equal(img.values[0], data)
    # No pixel size anywhere: 1.0 and a warning that names the fix, not an error.
    assert img.attrs["pixel_size"] == {"y": 1.0, "x": 1.0}
    assert "--pixel-size" in capsys.readouterr().err
    assert img.attrs["l2l_scale"]["input"] == [str(src)]
    _validate(out[0])


def test_imagej_hyperstack_round_trip(tmp_path):
    data = _ramp((2, 64, 48))
    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, data, imagej=True, resolution=(1 / 0.13, 1 / 0.13),
                     metadata={"axes": "CYX", "Labels": ["AC-15", "phalloidin"], "unit": "micron"})
    out = convert([src], tmp_path / "ij.zarr")[0]
    img = open_image(out)
    assert img.dims == ("c", "y", "x")
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    assert img.attrs["pixel_size"]["x"] == pytest.approx(0.13)
    assert img.attrs["pixel_size"]["y"] == pytest.approx(0.13)
    assert float(img.coords["x"][1] - img.coords["x"][0]) == pytest.approx(0.13)
    np.testing.assert_array_equal(img.values, data)
    _validate(out)


def test_imagej_tzcyx_reordered_with_z_spacing_and_per_plane_labels(tmp_path):
    t, z, c = 2, 3, 2
    data = _ramp((t, z, c, 20, 24))
    src = tmp_path / "stack.tif"
    # ImageJ labels every plane, channels fastest.
    labels = ["DM1A", "YOL1/34"] * (t * z)
    tifffile.imwrite(src, data, imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "TZCYX", "Labels": labels, "unit": "um", "spacing": 0.5})
    img = read_tiff(src)
    assert img.dims == ("t", "c", "z", "y", "x")
    assert list(img.coords["c"].values) == ["DM1A", "YOL1/34"]
    assert img.attrs["pixel_size"] == pytest.approx({"z": 0.5, "y": 0.1, "x": 0.1})
    np.testing.assert_array_equal(img.values, data.transpose(0, 2, 1, 3, 4))


def test_ome_tiff_round_trip(tmp_path):
    data = _ramp((2, 50, 40))
    src = tmp_path / "cells.ome.tif"
    tifffile.imwrite(src, data, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.05, "PhysicalSizeY": 0.05,
                                                     "Channel": {"Name": ["D1P6W", "4H312"]}})
    out = convert([src], tmp_path / "cells.zarr")[0]
    img = open_image(out)
    assert list(img.coords["c"].values) == ["D1P6W", "4H312"]
    assert img.attrs["pixel_size"] == pytest.approx({"y": 0.05, "x": 0.05})
    np.testing.assert_array_equal(img.values, data)
    assert read_info(out)["channels"] == ["D1P6W", "4H312"]
    _validate(out)


def test_ome_units_converted_to_micrometres(tmp_path):
    src = tmp_path / "nm.ome.tif"
    tifffile.imwrite(src, _ramp((3, 8, 8)), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 50, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 40,
                               "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.3})
    img = read_tiff(src)
    assert img.dims == ("c", "z", "y", "x")
    assert img.attrs["pixel_size"] == pytest.approx({"z": 0.3, "y": 0.04, "x": 0.05})


def test_rgb_samples_become_channels(tmp_path):
    data = _ramp((30, 20, 3), np.uint8)
    src = tmp_path / "rgb.tif"
    tifffile.imwrite(src, data, photometric="rgb")
    img = read_tiff(src, pixel_size=1.0)
    assert img.dims == ("c", "y", "x")
    np.testing.assert_array_equal(img.values, data.transpose(2, 0, 1))


def test_big_endian_file_read_in_native_byte_order(tmp_path):
    data = _ramp((16, 12))
    src = tmp_path / "be.tif"
    tifffile.imwrite(src, data, byteorder=">")
    img = read_tiff(src, pixel_size=1.0)
    assert img.dtype.isnative
    np.testing.assert_array_equal(img.values[0], data)


# ------------------------------------------------------------------------------------------------ laziness


@pytest.fixture
def count_reads(monkeypatch):
    """Count pixel reads through tifffile's zarr store and memory maps; refuse any whole-file read."""
    counts = {"chunks": 0, "memmap": 0}
    get = tifffile.zarr.ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if not key.endswith(("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")):
            counts["chunks"] += 1
        return await get(self, key, *args, **kwargs)

    memmap = tifffile.memmap

    def counting_memmap(*args, **kwargs):
        counts["memmap"] += 1
        return memmap(*args, **kwargs)

    def whole_read(*args, **kwargs):
        raise AssertionError("the whole TIFF was read into memory")

    monkeypatch.setattr(tifffile.zarr.ZarrTiffStore, "get", counting_get)
    monkeypatch.setattr(tifffile, "memmap", counting_memmap)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", whole_read)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole_read)
    conv._open_cache.clear()  # a cached handle would hide the first open from the counters
    yield counts
    conv._open_cache.clear()


def test_tiled_bigtiff_is_read_lazily(tmp_path, count_reads):
    data = _ramp((3000, 2000), seed=3)
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, data, bigtiff=True, tile=(256, 256), compression="zlib")
    img = read_tiff(src, pixel_size=0.1)
    assert isinstance(img.data, da.Array)
    assert img.shape == (1, 3000, 2000)
    assert max(img.data.chunks[1]) < 3000 and max(img.data.chunks[2]) < 2000
    assert count_reads["chunks"] == 0, "read_tiff read pixel data"
    # A corner reads at most the tiles of one 1024 x 1024 dask chunk (16), never the 96 tiles of the image.
    np.testing.assert_array_equal(img[0, :256, :256].values, data[:256, :256])
    assert 1 <= count_reads["chunks"] <= 16
    assert count_reads["memmap"] == 0
    out = convert([src], tmp_path / "big.zarr", pixel_size=0.1)[0]
    assert count_reads["chunks"] >= 96  # every tile read once more when writing, still without a whole read
    np.testing.assert_array_equal(open_image(out).values[0], data)
    assert read_info(out)["chunks"] == [1, 1024, 1024]
    _validate(out)


def test_contiguous_tiff_is_memory_mapped_not_read_whole(tmp_path, count_reads):
    data = _ramp((2, 1500, 1300), seed=4)
    src = tmp_path / "strip.tif"
    tifffile.imwrite(src, data, metadata={"axes": "ZYX"})
    img = read_tiff(src, pixel_size=0.1, chunks=512)
    assert img.dims == ("c", "z", "y", "x")
    assert img.data.chunksize == (1, 1, 512, 512)
    assert count_reads == {"chunks": 0, "memmap": 0}
    np.testing.assert_array_equal(img[0, 1, 600:700, 1000:1100].values, data[1, 600:700, 1000:1100])
    assert count_reads["memmap"] == 1 and count_reads["chunks"] == 0


def test_graph_is_picklable_for_distributed_workers(tmp_path):
    data = _ramp((2, 300, 260))
    src = tmp_path / "tiles.tif"
    tifffile.imwrite(src, data, tile=(128, 128), compression="zlib", metadata={"axes": "CYX"})
    arr = read_tiff(src, pixel_size=0.1, chunks=128).data
    clone = pickle.loads(pickle.dumps(arr))
    conv._open_cache.clear()  # as on a fresh worker process
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(clone.compute(), data)


# ------------------------------------------------------------------------------------------- pixel size


@pytest.mark.parametrize(
    "resolution, unit, expected",
    [
        ((25400 / 0.5, 25400 / 0.25), "INCH", {"x": 0.5, "y": 0.25}),
        ((1e4 / 0.2, 1e4 / 0.2), "CENTIMETER", {"x": 0.2, "y": 0.2}),
    ],
)
def test_resolution_tags_converted_to_micrometres(tmp_path, resolution, unit, expected):
    src = tmp_path / "res.tif"
    tifffile.imwrite(src, _ramp((10, 12)), resolution=resolution, resolutionunit=unit)
    assert read_tiff(src).attrs["pixel_size"] == pytest.approx(expected)


def test_default_72_dpi_is_not_a_pixel_size(tmp_path, capsys):
    src = tmp_path / "screen.tif"
    tifffile.imwrite(src, _ramp((10, 12)), resolution=(72, 72), resolutionunit="INCH")
    assert read_tiff(src).attrs["pixel_size"] == {"y": 1.0, "x": 1.0}
    assert "--pixel-size" in capsys.readouterr().err


def test_pixel_size_option_overrides_metadata(tmp_path):
    src = tmp_path / "o.ome.tif"
    tifffile.imwrite(src, _ramp((3, 8, 8)), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.05, "PhysicalSizeY": 0.05, "PhysicalSizeZ": 0.4})
    # A number sets y and x; z stays from the metadata.
    assert read_tiff(src, pixel_size=0.3).attrs["pixel_size"] == pytest.approx({"z": 0.4, "y": 0.3, "x": 0.3})
    assert read_tiff(src, pixel_size=(1.0, 0.2, 0.1)).attrs["pixel_size"] == pytest.approx(
        {"z": 1.0, "y": 0.2, "x": 0.1})
    out = convert([src], tmp_path / "o.zarr", pixel_size=0.3)[0]
    assert open_image(out).attrs["pixel_size"] == pytest.approx({"z": 0.4, "y": 0.3, "x": 0.3})
    with pytest.raises(ConfigError, match="--pixel-size"):
        read_tiff(src, pixel_size=-1)


# ------------------------------------------------------------------------------------- channels and axes


def test_channel_names_option_and_mismatch(tmp_path):
    src = tmp_path / "two.tif"
    tifffile.imwrite(src, _ramp((2, 8, 8)), imagej=True, metadata={"axes": "CYX", "Labels": ["a", "b"]})
    img = read_tiff(src, channel_names=["AC-15", "phalloidin"], pixel_size=1)
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    with pytest.raises(ChannelError, match="3 channel names given"):
        read_tiff(src, channel_names=["a", "b", "c"], pixel_size=1)


def test_ambiguous_axes_need_axes_option(tmp_path):
    data = _ramp((5, 16, 20))
    src = tmp_path / "pages.tif"
    tifffile.imwrite(src, data)  # tifffile calls these pages 'Q': channels? z? time?
    with pytest.raises(InputError, match=r"ambiguous; pass --axes, e\.g\. --axes CYX or ZYX"):
        read_tiff(src)
    with pytest.raises(InputError, match="ambiguous"):
        convert([src], tmp_path / "pages.zarr")
    assert not (tmp_path / "pages.zarr").exists()
    as_z = read_tiff(src, axes="ZYX", pixel_size=1)
    assert as_z.dims == ("c", "z", "y", "x") and as_z.sizes["c"] == 1
    np.testing.assert_array_equal(as_z.values[0], data)
    as_c = read_tiff(src, axes="cyx", pixel_size=1)
    assert as_c.dims == ("c", "y", "x") and as_c.sizes["c"] == 5
    with pytest.raises(ConfigError, match="has 2 letters"):
        read_tiff(src, axes="YX")


# ------------------------------------------------------------------------------------ folders, globs, plates


def _write_set(folder: Path, names, shape=(2, 40, 30)) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(names):
        data = _ramp(shape, seed=10 + i)
        tifffile.imwrite(folder / name, data, imagej=True, resolution=(10, 10),
                         metadata={"axes": "CYX", "unit": "micron", "Labels": ["in", "target"]})
        written[name] = data
    return written


def test_folder_input_gives_folder_of_images(tmp_path):
    data = _write_set(tmp_path / "raw", ["b.tif", "a.tiff", "c.ome.tif"])
    (tmp_path / "raw" / "notes.txt").write_text("not an image")
    (tmp_path / "raw" / "._a.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS litter: skipped
    out = convert([tmp_path / "raw"], tmp_path / "out")
    assert out == [tmp_path / "out" / f"{s}.zarr" for s in ("a", "b", "c")]
    refs = list_images(tmp_path / "out")
    assert [r.key for r in refs] == ["a", "b", "c"]
    for ref, name in zip(refs, ["a.tiff", "b.tif", "c.ome.tif"]):
        img = open_image(ref.path)
        np.testing.assert_array_equal(img.values, data[name])
        assert list(img.coords["c"].values) == ["in", "target"]
        assert img.attrs["pixel_size"] == pytest.approx({"y": 0.1, "x": 0.1})
        _validate(ref.path)
    assert not (tmp_path / "out.partial").exists()


def test_glob_input(tmp_path):
    data = _write_set(tmp_path / "raw", ["x1.tif", "x2.tif", "y1.tif"])
    out = convert([str(tmp_path / "raw" / "x*.tif")], tmp_path / "xs")
    assert [p.name for p in out] == ["x1.zarr", "x2.zarr"]
    assert [r.key for r in list_images(tmp_path / "xs")] == ["x1", "x2"]
    np.testing.assert_array_equal(open_image(out[1]).values, data["x2.tif"])
    assert expand_inputs([str(tmp_path / "raw" / "*.tif")]) == sorted((tmp_path / "raw").glob("*.tif"))
    with pytest.raises(InputError, match="no files match"):
        expand_inputs([str(tmp_path / "raw" / "z*.tif")])


PLATE = r"(?P<row>[A-H])(?P<col>\d+)_f(?P<field>\d+)"


def test_plate_pattern_writes_hcs_plate(tmp_path):
    data = _write_set(tmp_path / "scan", ["A1_f0.tif", "A1_f1.tif", "A02_f0.tif", "B1_f0.tif"])
    out = convert([tmp_path / "scan"], tmp_path / "plate.zarr", plate=PLATE)
    assert out == [tmp_path / "plate.zarr"]
    assert list_fields(out[0]) == ["A/1/0", "A/1/1", "A/2/0", "B/1/0"]
    for key, name in [("A/1/0", "A1_f0.tif"), ("A/1/1", "A1_f1.tif"), ("A/2/0", "A02_f0.tif"), ("B/1/0", "B1_f0.tif")]:
        img = open_image(out[0], field=key)
        np.testing.assert_array_equal(img.values, data[name])
        assert list(img.coords["c"].values) == ["in", "target"]
    _validate(out[0], kind="plate")


def test_plate_well_group_and_numeric_rows(tmp_path):
    _write_set(tmp_path / "scan", ["r02c03f1.tif", "r01c03f1.tif"], shape=(2, 8, 8))
    out = convert([tmp_path / "scan"], tmp_path / "p.zarr", plate=r"r(?P<row>\d+)c(?P<col>\d+)f(?P<field>\d+)")[0]
    assert list_fields(out) == ["A/3/1", "B/3/1"]
    _write_set(tmp_path / "scan2", ["B03-1.tif"], shape=(2, 8, 8))
    out2 = convert([tmp_path / "scan2"], tmp_path / "p2.zarr", plate=r"(?P<well>[A-P]\d+)-(?P<field>\d+)")[0]
    assert list_fields(out2) == ["B/3/1"]


def test_plate_errors(tmp_path):
    _write_set(tmp_path / "scan", ["A1_f0.tif", "stray.tif"], shape=(2, 8, 8))
    with pytest.raises(InputError, match=r"stray\.tif: file name does not match the plate pattern"):
        convert([tmp_path / "scan"], tmp_path / "p.zarr", plate=PLATE)
    _write_set(tmp_path / "dup", ["A1_f0.tif", "A01_f00.tif"], shape=(2, 8, 8))
    with pytest.raises(InputError, match="well A/1 field 0 is also given by"):
        convert([tmp_path / "dup"], tmp_path / "p.zarr", plate=PLATE)
    with pytest.raises(ConfigError, match="needs named groups"):
        convert([tmp_path / "dup"], tmp_path / "p.zarr", plate=r"(?P<row>[A-H])(?P<col>\d+)")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        convert([tmp_path / "dup"], tmp_path / "p.zarr", plate=r"(?P<row>[A-H")
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        convert([tmp_path / "nope.tif"], tmp_path / "o.zarr")
    with pytest.raises(InputError, match="does not exist"):
        read_tiff(tmp_path / "nope.tif")


def test_not_a_tiff(tmp_path):
    src = tmp_path / "fake.tif"
    src.write_text("this is a text file\n")
    with pytest.raises(InputError, match="not a TIFF file"):
        convert([src], tmp_path / "o.zarr")
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("layout", [{}, {"tile": (64, 64), "compression": "zlib"}], ids=["contiguous", "tiled"])
def test_truncated_tiff_among_several_leaves_nothing(tmp_path, layout):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        tifffile.imwrite(raw / f"im{i}.tif", _ramp((2, 200, 160), seed=i), metadata={"axes": "CYX"}, **layout)
    bad = raw / "im1.tif"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) - 5000])
    before = {p.name: _digest(p) for p in raw.iterdir()}
    with pytest.raises(InputError, match=r"im1\.tif: .*truncated"):
        convert([raw], tmp_path / "out", pixel_size=0.1)
    with pytest.raises(InputError, match="truncated"):
        convert([bad], tmp_path / "one.zarr", pixel_size=0.1)
    _no_leftovers(tmp_path)
    assert {p.name: _digest(p) for p in raw.iterdir()} == before


def test_corrupt_pixel_data_fails_during_writing_with_clean_error(tmp_path):
    """Damage that only shows when tiles are decoded (file size intact) surfaces as InputError mid-write."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        tifffile.imwrite(raw / f"im{i}.tif", _ramp((200, 160), seed=i), tile=(64, 64), compression="zlib")
    bad = raw / "im1.tif"
    with tifffile.TiffFile(bad) as tif:
        off, cnt = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    blob = bytearray(bad.read_bytes())
    blob[off:off + cnt] = b"\xff" * cnt
    bad.write_bytes(bytes(blob))
    before = {p.name: _digest(p) for p in raw.iterdir()}
    read_tiff(bad, pixel_size=0.1)  # metadata is fine: the damage is only found when writing
    with pytest.raises(InputError, match=r"im1\.tif: reading pixel data failed .*truncated or corrupt"):
        convert([raw], tmp_path / "out", pixel_size=0.1)
    _no_leftovers(tmp_path)
    assert {p.name: _digest(p) for p in raw.iterdir()} == before


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "a.tif"
    tifffile.imwrite(src, _ramp((8, 8)))
    convert([src], tmp_path / "a.zarr", pixel_size=1)
    with pytest.raises(OutputError, match="--overwrite"):
        convert([src], tmp_path / "a.zarr", pixel_size=1)
    tifffile.imwrite(src, _ramp((8, 8), seed=5))
    convert([src], tmp_path / "a.zarr", pixel_size=1, overwrite=True)
    np.testing.assert_array_equal(open_image(tmp_path / "a.zarr").values[0], _ramp((8, 8), seed=5))


def test_duplicate_stems_refused(tmp_path):
    _write_set(tmp_path / "d1", ["same.tif"], shape=(2, 8, 8))
    _write_set(tmp_path / "d2", ["same.tiff"], shape=(2, 8, 8))
    with pytest.raises(InputError, match="would both be written as same.zarr"):
        convert([tmp_path / "d1", tmp_path / "d2"], tmp_path / "out")
