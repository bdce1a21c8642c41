"""Direct chunk reads and writes of local zarr v3 arrays, with zarr-python as the fallback for everything else.

Why this exists (measured, ``benchmarks/bench_plate.py``, plate of 256 fields of 256^2 uint16 on the 2-core
bench machine): every ``zarr.Array`` read or write hands its work to zarr's one asyncio I/O thread and waits
for it. With two worker threads that also hold the GIL (counting, the model), each hand-over waits for a GIL
switch, so one 256^2 chunk cost ~1.5 ms to read through zarr (~7 ms of thread time under load) against
~0.4 ms for reading its file and decoding it here, and ``zarr.open_array`` added ~0.7 ms per array. Sampled on
the worker, zarr's hand-over was 60% of a plate's ``predict`` and 95% of its ``stats``, the model 28%.

The fast path covers exactly what NGFF writers produce on a local filesystem: zarr v3, a regular chunk grid,
the default (or v2) chunk key encoding, plain numeric dtypes, the ``bytes`` codec in little endian (or none
for 1-byte types) followed by at most one of blosc, zstd or gzip, no sharding, no transpose or checksum codecs,
no storage transformers. Codecs are the numcodecs objects zarr itself builds from the same configuration, so
the bytes written are zarr's (``tests/test_io.py`` compares them file for file) and reads equal zarr's reads
for every codec and dtype (gzip arrays are written by zarr: a gzip header holds the time, so bytes would differ
by the second). Anything else (zarr v2 / NGFF 0.4, remote stores, sharded arrays, fancy indexing)
goes through zarr-python unchanged. Writes follow zarr: a temporary file renamed over the chunk, and a chunk
equal to the fill value everywhere is deleted instead of written (zarr's ``write_empty_chunks=False``).
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from itertools import product
from typing import Any

import numpy as np
import zarr

_PLAIN_TYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64"}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class _Unsupported(Exception):
    """The array needs zarr-python (a layout the fast path does not cover)."""


class _DecodedChunks:
    """Decoded chunks of read-only arrays, least recently used first out, shared by a process's threads.

    Overlapped reads decode every chunk several times: a 1024^2 block whose halo reaches into its 8 neighbours'
    1024^2 chunks decoded 137 chunks for a 4096^2 image's 16 blocks, 0.29 s of the 0.89 s a bf16 predict spent
    outside the model on 2 cores. One budget for all arrays, so a plate of thousands of fields cannot pile up.
    """

    CAP = 1 << 29  # at most this many bytes whatever the callers ask for

    def __init__(self):
        self._items: dict[tuple, np.ndarray] = {}  # insertion order is recency order
        self._lock = threading.Lock()
        self._bytes = 0
        self.budget = 0

    def want(self, nbytes: int) -> None:
        with self._lock:
            self.budget = min(self.CAP, max(self.budget, int(nbytes)))

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            chunk = self._items.pop(key, None)
            if chunk is not None:
                self._items[key] = chunk
            return chunk

    def put(self, key: tuple, chunk: np.ndarray) -> None:
        chunk.flags.writeable = False  # shared: a caller that wrote into it would corrupt later reads
        with self._lock:
            if key in self._items or chunk.nbytes > self.budget:
                return
            self._items[key] = chunk
            self._bytes += chunk.nbytes
            while self._bytes > self.budget:
                self._bytes -= self._items.pop(next(iter(self._items))).nbytes


_DECODED = _DecodedChunks()


def _codec(spec: dict, itemsize: int) -> Any:
    """The numcodecs object zarr builds for one bytes-to-bytes codec of an array's ``codecs`` list."""
    name, cfg = spec.get("name"), spec.get("configuration") or {}
    if name == "blosc":
        from numcodecs import Blosc

        # As zarr.codecs.BloscCodec._blosc_codec (numcodecs >= 0.16 takes the typesize from the config).
        return Blosc.from_config({"cname": cfg["cname"], "clevel": cfg["clevel"],
                                  "shuffle": _BLOSC_SHUFFLE[cfg["shuffle"]], "blocksize": cfg.get("blocksize", 0),
                                  "typesize": cfg.get("typesize", itemsize)})
    if name == "zstd":
        from numcodecs import Zstd

        return Zstd.from_config({"level": cfg.get("level", 0), "checksum": cfg.get("checksum", False)})
    if name == "gzip":
        from numcodecs import GZip

        return GZip(cfg.get("level", 5))
    raise _Unsupported(f"codec {name!r}")


def _fill(value: Any, dtype: np.dtype) -> Any:
    if isinstance(value, str):
        if dtype.kind != "f" or value not in _SPECIAL_FLOATS:
            raise _Unsupported(f"fill value {value!r}")
        value = _SPECIAL_FLOATS[value]
    if not isinstance(value, (bool, int, float)):
        raise _Unsupported(f"fill value {value!r}")
    return np.array(value, dtype=dtype)[()]


class LocalArray:
    """A local zarr v3 array read and written chunk by chunk without zarr-python (see the module notes).

    Indexing takes integers, slices with step 1 and ``...``; anything else is passed to ``zarr.open_array``.
    """

    def __init__(self, store: str, path: str, meta: dict, mode: str):
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise _Unsupported("not a plain zarr v3 array")
        grid, keys = meta.get("chunk_grid") or {}, meta.get("chunk_key_encoding") or {}
        if grid.get("name") != "regular" or meta.get("data_type") not in _PLAIN_TYPES:
            raise _Unsupported("irregular grid or non-numeric dtype")
        self.store, self.path, self.read_only = store, path, mode == "r"
        self.folder = os.path.join(store, path)
        self.shape = tuple(int(n) for n in meta["shape"])
        self.chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        self.ndim = len(self.shape)
        if len(self.chunks) != self.ndim or 0 in self.chunks:
            raise _Unsupported("chunk shape")
        self.dtype = np.dtype(meta["data_type"])
        codecs = list(meta.get("codecs") or [])
        if not codecs or codecs[0].get("name") != "bytes":
            raise _Unsupported("first codec is not 'bytes' (e.g. sharding or transpose)")
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        if self.dtype.itemsize > 1 and endian != "little":
            raise _Unsupported("big-endian bytes")
        self._stored = self.dtype.newbyteorder("<")
        if len(codecs) > 2:
            raise _Unsupported("more than one compressor")
        self._codec = _codec(codecs[1], self.dtype.itemsize) if len(codecs) == 2 else None
        self._gzip = len(codecs) == 2 and codecs[1].get("name") == "gzip"  # its header holds the time: zarr writes
        self._blosc = len(codecs) == 2 and codecs[1].get("name") == "blosc"
        self.fill_value = _fill(meta.get("fill_value", 0), self.dtype)
        kname = keys.get("name", "default")
        sep = (keys.get("configuration") or {}).get("separator", "/" if kname == "default" else ".")
        if kname not in ("default", "v2") or sep not in ("/", "."):
            raise _Unsupported(f"chunk key encoding {keys!r}")
        self._key_prefix, self._sep = ("c",) if kname == "default" else (), sep
        self.write_empty_chunks = bool(zarr.config.get("array.write_empty_chunks"))
        self._zarr: Any = None
        self._keep = False  # reads go through _DECODED (see keep_decoded)
        self._token = uuid.uuid4().hex  # an array recreated in place is another array for _DECODED

    def keep_decoded(self, nbytes: int) -> None:
        """Keep decoded chunks of this read-only array for later reads, within a process-wide LRU budget of at
        least ``nbytes`` (capped at 512 MiB): for reads that overlap, such as blocks with halos."""
        if self.read_only:
            self._keep = True
            _DECODED.want(nbytes)

    def _chunk_for_read(self, index: tuple[int, ...]) -> np.ndarray | None:
        if not self._keep:
            return self.read_chunk(index)
        key = (self._token, index)
        chunk = _DECODED.get(key)
        if chunk is None:
            chunk = self.read_chunk(index)
            if chunk is not None:
                _DECODED.put(key, chunk)
        return chunk

    def _fallback(self) -> Any:
        if self._zarr is None:
            self._zarr = zarr.open_array(store=self.store, path=self.path, mode="r" if self.read_only else "r+")
        return self._zarr

    def chunk_path(self, index: tuple[int, ...]) -> str:
        """The file holding chunk ``index`` (zarr's key encoding for this array)."""
        parts = (*self._key_prefix, *map(str, index))
        return os.path.join(self.folder, self._sep.join(parts) if parts else "0")

    def _selection(self, key: Any) -> tuple[list[tuple[int, int]], tuple[int, ...]] | None:
        """Per dim ``(start, stop)`` and the dims indexed by an integer, or None for keys zarr must handle."""
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            return None
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            return None
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges, squeeze = [], []
        for d, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = int(k) + (n if k < 0 else 0)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} is out of bounds for axis {d} with size {n}")
                ranges.append((k, k + 1))
                squeeze.append(d)
            elif isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(n)
                ranges.append((start, max(start, stop)))
            else:
                return None
        return ranges, tuple(squeeze)

    def _chunk_indices(self, ranges: list[tuple[int, int]]):
        return product(*[range(a // c, -(-b // c)) for (a, b), c in zip(ranges, self.chunks)])

    def _overlap(self, index: tuple[int, ...], ranges: list[tuple[int, int]]) -> tuple[tuple, tuple, bool]:
        """(slices into the chunk, slices into the selection, whether the selection covers the chunk)."""
        inner, outer, whole = [], [], True
        for i, (a, b), c, n in zip(index, ranges, self.chunks, self.shape):
            c0 = i * c
            lo, hi = max(a, c0), min(b, c0 + c)
            inner.append(slice(lo - c0, hi - c0))
            outer.append(slice(lo - a, hi - a))
            whole = whole and lo == c0 and hi == min(c0 + c, n)
        return tuple(inner), tuple(outer), whole

    def read_chunk(self, index: tuple[int, ...]) -> np.ndarray | None:
        """Chunk ``index`` decoded to its full chunk shape, or None where no chunk is stored (fill value)."""
        try:
            with open(self.chunk_path(index), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        out = np.empty(self.chunks, self._stored)
        if self._codec is None:
            if len(data) != out.nbytes:
                raise ValueError(f"chunk holds {len(data)} bytes, not {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
        elif self._blosc:
            # Decoded in place: the copy from numcodecs' bytes cost a third as much as decoding a 256^2 chunk.
            # numcodecs accepts a larger buffer without a word, so the size comes from blosc's header first.
            nbytes = int.from_bytes(data[4:8], "little") if len(data) >= 16 else -1
            if nbytes != out.nbytes:
                raise ValueError(f"chunk decodes to {nbytes} bytes, not {out.nbytes}")
            self._codec.decode(data, out=out)
        else:
            decoded = self._codec.decode(data)
            if len(memoryview(decoded).cast("B")) != out.nbytes:
                raise ValueError(f"chunk decodes to {len(memoryview(decoded).cast('B'))} bytes, not {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(decoded, np.uint8)
        return out if self._stored == self.dtype else out.astype(self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        sel = self._selection(key)
        if sel is None:
            return self._fallback()[key]
        ranges, squeeze = sel
        if not self._keep and all(a % c == 0 and b - a == c for (a, b), c in zip(ranges, self.chunks)):
            # Exactly one whole chunk (a small field, a block of the chunk grid): freshly decoded and ours to give.
            chunk = self.read_chunk(tuple(a // c for (a, _), c in zip(ranges, self.chunks)))
            if chunk is not None:
                return chunk.reshape([n for d, n in enumerate(chunk.shape) if d not in squeeze]) if squeeze else chunk
        out = np.empty([b - a for a, b in ranges], self.dtype)
        if out.size:
            for index in self._chunk_indices(ranges):
                inner, outer, _ = self._overlap(index, ranges)
                chunk = self._chunk_for_read(index)
                out[outer] = self.fill_value if chunk is None else chunk[inner]
        return out.reshape([n for d, n in enumerate(out.shape) if d not in squeeze]) if squeeze else out

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.read_only:
            raise PermissionError(f"{self.folder}: array opened read-only")
        sel = None if self._gzip else self._selection(key)
        if sel is None:
            self._fallback()[key] = value
            return
        ranges, squeeze = sel
        shape = [b - a for a, b in ranges]
        value = np.asarray(value, dtype=self.dtype)
        if squeeze and value.ndim == len(shape) - len(squeeze):
            value = np.expand_dims(value, squeeze)
        value = np.broadcast_to(value, shape)
        if not value.size:
            return
        for index in self._chunk_indices(ranges):
            inner, outer, whole = self._overlap(index, ranges)
            if whole and value[outer].shape == self.chunks:  # a whole interior chunk: its bytes as given
                self._write_chunk(index, value[outer])
                continue
            chunk = None if whole else self.read_chunk(index)
            if chunk is None:
                chunk = np.full(self.chunks, self.fill_value, self.dtype)
            chunk[inner] = value[outer]
            self._write_chunk(index, chunk)

    def _is_fill(self, chunk: np.ndarray) -> bool:
        """zarr's ``NDBuffer.all_equal`` against the fill value: NaN equals NaN, and 0.0 is not -0.0."""
        fill = self.fill_value
        if self.dtype.kind == "f" and fill == 0:  # compare bit patterns (void views compare slowly)
            bits = np.dtype(f"u{self.dtype.itemsize}")
            return not np.any(chunk.view(bits) != np.array(fill, self.dtype).view(bits))
        if self.dtype.kind == "f" and np.isnan(fill):
            return bool(np.isnan(chunk).all())
        return not np.any(chunk != fill)

    def _write_chunk(self, index: tuple[int, ...], chunk: np.ndarray) -> None:
        path = self.chunk_path(index)
        if not self.write_empty_chunks and self._is_fill(chunk):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        raw = np.ascontiguousarray(chunk, self._stored).reshape(-1).view(np.uint8)
        data = raw if self._codec is None else self._codec.encode(raw)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # as zarr's LocalStore: readers never see half a chunk
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                f.write(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise


def open_local(store: str, path: str, mode: str = "r") -> LocalArray | None:
    """The array ``path`` of a local store as a :class:`LocalArray`, or None where zarr-python is needed."""
    if "://" in str(store):
        return None
    try:
        with open(os.path.join(store, path, "zarr.json"), "rb") as f:
            meta = json.loads(f.read())
        return LocalArray(str(store), str(path), meta, mode)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, _Unsupported):
        return None


_ARRAYS: dict[tuple, Any] = {}
_ARRAYS_LOCK = threading.Lock()


def cached_array(store: str, path: str, mode: str) -> Any:
    """The array ``path`` of ``store``, opened once per process: a :class:`LocalArray` where the fast path
    applies, else ``zarr.open_array``. Every block of a field needs the same few arrays.

    Keyed by the array document's mtime and size too, so an array recreated by a later run (the same worker
    serves many runs) is opened afresh.
    """
    try:
        st = os.stat(os.path.join(store, path, "zarr.json"))
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        return zarr.open_array(store=store, path=path, mode=mode)
    key = (store, path, mode, stamp)
    with _ARRAYS_LOCK:
        arr = _ARRAYS.get(key)
    if arr is None:
        arr = open_local(store, path, mode) or zarr.open_array(store=store, path=path, mode=mode)
        with _ARRAYS_LOCK:
            if len(_ARRAYS) > 4096:
                _ARRAYS.clear()
            _ARRAYS[key] = arr
    return arr
