"""Tests of l2l_scale.io.chunks: the direct chunk path must read what zarr reads and write the bytes zarr writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from l2l_scale.errors import InputError
from l2l_scale.io.chunks import LocalArray, cached_array, open_local
from l2l_scale.io.read import read_region
from l2l_scale.io.write import _compressor

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
          "float64"]
CODECS = {"blosc-zstd": lambda: [_compressor()], "blosc-lz4-bitshuffle": lambda: [BloscCodec(
    cname="lz4", clevel=3, shuffle="bitshuffle")], "zstd": lambda: [ZstdCodec()], "gzip": lambda: [GzipCodec()],
          "none": lambda: None}
KEYS = [(slice(None),), (1, slice(3, 30), slice(None)), (Ellipsis, 5), (slice(0, 3), slice(16, 32), slice(32, 50)),
        (-1,), (slice(2, 2),), (slice(0, 2), slice(16, 32), slice(0, 32)),  # exactly one stored chunk
        (slice(0, 2), slice(0, 16), slice(0, 32))]  # exactly the chunk zarr does not store (fill value)


def _data(dtype, shape, fill, seed=0):
    x = np.random.default_rng(seed).normal(0, 50, shape).astype(dtype)
    x[:, :16, :32] = fill  # one chunk holds only the fill value: zarr stores no file for it
    return x


def _chunk_files(root):
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file() and f.name != "zarr.json"}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_and_writes_equal_zarrs_for_every_codec_and_dtype(tmp_path, codec, dtype):
    fill = True if dtype == "bool" else 3
    kw = dict(shape=(3, 37, 50), chunks=(2, 16, 32), dtype=dtype, compressors=CODECS[codec](), fill_value=fill)
    ref = zarr.create_array(str(tmp_path / "ref.zarr"), **kw)
    x = _data(dtype, ref.shape, ref.fill_value)
    ref[:] = x
    fast = open_local(str(tmp_path / "ref.zarr"), "", "r")
    assert isinstance(fast, LocalArray)
    for key in KEYS:
        got, want = fast[key], ref[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    whole = fast[0:2, 16:32, 0:32]  # handed over without a copy: the caller's to change
    whole[...] = fill
    np.testing.assert_array_equal(fast[0:2, 16:32, 0:32], ref[0:2, 16:32, 0:32])

    zarr.create_array(str(tmp_path / "out.zarr"), **kw)
    out = open_local(str(tmp_path / "out.zarr"), "", "r+")
    out[:] = x
    for region, src in (((1, slice(5, 20), slice(7, 40)), (0, slice(0, 15), slice(0, 33))),  # partial chunks
                        ((0, slice(16, 32), slice(32, 50)), (2, slice(16, 32), slice(32, 50)))):  # an edge chunk
        out[region] = x[src]
        ref[region] = x[src]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:], ref[:])
    written, expected = _chunk_files(tmp_path / "out.zarr"), _chunk_files(tmp_path / "ref.zarr")
    assert sorted(written) == sorted(expected)
    if codec != "gzip":  # gzip arrays are written by zarr itself (the gzip header holds the time)
        assert written == expected


def test_empty_chunks_are_deleted_as_zarr_does(tmp_path):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="float32",
                            compressors=[_compressor()], fill_value=0.0)
    fast = open_local(str(tmp_path / "a.zarr"), "", "r+")
    fast[:] = 1.0
    assert len(_chunk_files(tmp_path / "a.zarr")) == 4
    fast[:4, :4] = 0.0
    fast[4:, 4:] = -0.0  # -0.0 is not the fill value 0.0 bit for bit: zarr keeps that chunk
    assert sorted(_chunk_files(tmp_path / "a.zarr")) == ["c/0/1", "c/1/0", "c/1/1"]
    np.testing.assert_array_equal(arr[:], fast[:])


@pytest.mark.parametrize("make", ["sharded", "v2", "big-endian", "remote"])
def test_layouts_outside_the_fast_path_use_zarr(tmp_path, make):
    path = str(tmp_path / "a.zarr")
    if make == "sharded":
        zarr.create_array(path, shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="uint16")
    elif make == "v2":
        zarr.create_array(path, shape=(8, 8), chunks=(4, 4), dtype="uint16", zarr_format=2)
    elif make == "big-endian":
        zarr.create_array(path, shape=(8, 8), chunks=(4, 4), dtype="uint16",
                          serializer=zarr.codecs.BytesCodec(endian="big"))
    else:
        path = "memory://a.zarr"
    assert open_local(path, "", "r") is None
    if make != "remote":
        arr = cached_array(path, "", "r+")
        assert isinstance(arr, zarr.Array)
        arr[:] = np.arange(64, dtype="uint16").reshape(8, 8)
        np.testing.assert_array_equal(cached_array(path, "", "r")[2:5, 3], [19, 27, 35])


def test_fancy_keys_fall_back_and_damaged_chunks_are_named(tmp_path):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(64, 64), chunks=(32, 32), dtype="uint16",
                            compressors=[_compressor()])
    arr[:] = np.arange(64 * 64, dtype="uint16").reshape(64, 64)
    fast = open_local(str(tmp_path / "a.zarr"), "", "r")
    np.testing.assert_array_equal(fast[::3, [1, 5]], arr[::3, [1, 5]])  # steps and lists: zarr's own indexing
    with pytest.raises(PermissionError):
        fast[0, 0] = 1
    chunk = tmp_path / "a.zarr" / "c" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"cannot read region \[0:32, 32:64\].*damaged"):
        read_region(fast, (slice(0, 32), slice(32, 64)), tmp_path)
    np.testing.assert_array_equal(read_region(fast, (slice(0, 32), slice(0, 32)), tmp_path), arr[:32, :32])
    # A valid blosc stream of another size (a chunk copied from an array chunked otherwise) is damage too,
    # whether it would overrun the chunk or leave part of it undecoded.
    for shape in ((16, 32), (64, 32)):
        other = zarr.create_array(str(tmp_path / f"{shape[0]}.zarr"), shape=shape, chunks=shape, dtype="uint16",
                                  compressors=[_compressor()])
        other[:] = 7
        chunk.write_bytes((tmp_path / f"{shape[0]}.zarr" / "c" / "0" / "0").read_bytes())
        with pytest.raises(InputError, match=r"cannot read region \[0:32, 32:64\].*damaged"):
            read_region(fast, (slice(0, 32), slice(32, 64)), tmp_path)


def test_kept_decoded_chunks_are_read_once_within_their_budget(tmp_path, monkeypatch):
    """Overlapping reads (blocks with halos) decode each chunk once; the LRU stays within its byte budget, an
    array recreated in place is read afresh, and a caller cannot write into a shared chunk."""
    from l2l_scale.io import chunks

    monkeypatch.setattr(chunks, "_DECODED", chunks._DecodedChunks())
    x = _data("uint16", (1, 64, 96), 0)
    zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, chunks=(1, 32, 32), dtype="uint16",
                      compressors=[ZstdCodec()])[...] = x
    arr = open_local(str(tmp_path), "a.zarr")
    decoded = []
    read = arr.read_chunk
    monkeypatch.setattr(arr, "read_chunk", lambda index: decoded.append(index) or read(index))
    arr.keep_decoded(6 * 32 * 32 * 2)  # all six chunks
    for y0, x0 in [(0, 0), (0, 24), (20, 40), (8, 8)]:  # overlapping windows, as halos overlap
        got = arr[:, y0:y0 + 40, x0:x0 + 50]
        np.testing.assert_array_equal(got, x[:, y0:y0 + 40, x0:x0 + 50])
        got[...] = 0  # the caller's copy, not the kept chunk
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 6
    np.testing.assert_array_equal(arr[...], x)
    assert chunks._DECODED._bytes <= chunks._DECODED.budget == 6 * 32 * 32 * 2
    with pytest.raises(ValueError):
        chunks._DECODED.get(next(iter(chunks._DECODED._items)))[0, 0, 0] = 1

    chunks._DECODED.budget = 2 * 32 * 32 * 2  # room for two: the least recently used go first
    chunks._DECODED.put(("other", (0,)), np.zeros((1, 32, 32), np.uint16))
    assert len(chunks._DECODED._items) == 2 and chunks._DECODED._bytes <= chunks._DECODED.budget

    y = x + 1  # recreated in place: a new array object, nothing stale
    zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, chunks=(1, 32, 32), dtype="uint16",
                      compressors=[ZstdCodec()], overwrite=True)[...] = y
    again = open_local(str(tmp_path), "a.zarr")
    again.keep_decoded(1)
    np.testing.assert_array_equal(again[...], y)
    writable = open_local(str(tmp_path), "a.zarr", "r+")
    writable.keep_decoded(1 << 20)  # never for arrays open for writing
    assert not writable._keep
