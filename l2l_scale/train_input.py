"""The training input pipeline: ``tf.data`` over a patch store, read chunk by chunk, and its distribution.

:func:`patch_dataset` reads the zarr store chunk by chunk (each chunk holds a few hundred patches): the list of
chunks is shuffled every pass, each chunk's patches are permuted, ``interleave`` reads several chunks in parallel
and alternates their patches, windows of a few chunks' patches are permuted again, then batches are formed and
prefetched. Every shuffle is stateless, keyed by the seed (so a seed can be a tensor). The store is written in a
globally shuffled order (:mod:`l2l_scale.patches`), so every chunk already mixes many images. Decoded chunks are
kept in a bounded per-process cache (1 GiB, least recently used out first): a store that fits is decoded once, a
larger one streams with bounded memory. For several workers the chunk list is sharded by worker. Training reads all
its epochs through one iterator (epoch ``e`` seeded by ``seed + 1000 e``): a new iterator per epoch cost ~0.8 s per
epoch on 2 CPU cores, a third of a step's time at 25 steps per epoch. Each epoch's validation pass covers every
validation patch once on one device (whole batches per replica under a strategy), and the validation loss is the
mean over those patches, as Keras' ``fit`` computes it for CSBDeep.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from l2l_scale.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from l2l_scale.patches import PatchStore

__all__ = ["patch_dataset"]


def _chunk_ranges(start: int, stop: int, chunk: int) -> np.ndarray:
    """``[(a, b), ...]`` row ranges of the store chunks that intersect ``[start, stop)``, clipped to it."""
    if stop <= start:
        return np.zeros((0, 2), np.int64)
    first = (start // chunk) * chunk
    edges = list(range(first, stop, chunk))
    return np.array([(max(a, start), min(a + chunk, stop)) for a in edges], dtype=np.int64)


# Decoded patch rows kept per process. Every pass over the store reads each chunk again: decoding it again cost
# 2.7 ms of a 55 ms step on 2 CPU cores (5 %, where CSBDeep indexes arrays in memory). A store up to this size
# stays decoded; a larger one keeps its most recently read chunks and memory stays bounded.
_CACHE_BYTES = 1 << 30


class _ChunkReader:
    """Reads row ranges of X and Y; opened lazily once per process (tf.data calls it from its threads).

    Decoded ranges are kept in a least-recently-used cache of at most ``cache_bytes``, as read-only arrays:
    ``tf.numpy_function`` hands them to TensorFlow without a copy and nothing downstream writes to them.
    """

    def __init__(self, path: str, cache_bytes: int = _CACHE_BYTES):
        self.path = path
        self.cache_bytes = cache_bytes
        self._arrays = None
        self._cache: OrderedDict = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray):
        a, b = int(rows[0]), int(rows[1])
        with self._lock:
            hit = self._cache.get((a, b))
            if hit is not None:
                self._cache.move_to_end((a, b))
                return hit
            if self._arrays is None:
                import zarr

                root = zarr.open_group(self.path, mode="r")
                self._arrays = (root["X"], root["Y"])
            X, Y = self._arrays
        xy = (np.asarray(X[a:b], np.float32), np.asarray(Y[a:b], np.float32))
        size = xy[0].nbytes + xy[1].nbytes
        if size > self.cache_bytes:
            return xy
        for v in xy:
            v.flags.writeable = False
        with self._lock:
            if (a, b) not in self._cache:
                self._cache[(a, b)] = xy
                self._held += size
            while self._held > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._held -= old[0].nbytes + old[1].nbytes
        return xy


def patch_dataset(store: "PatchStore | str | Path", split: str = "train", *, batch_size: int = 16,
                  shuffle: bool = True, repeat: bool = True, seed: int = 0, num_shards: int = 1, shard_index: int = 0,
                  shuffle_buffer: int | None = None, cycle_length: int | None = None,
                  deterministic: bool = True, drop_remainder: bool = True) -> "tf.data.Dataset":
    """A ``tf.data`` pipeline over one split of a patch store, read chunk by chunk.

    Parameters
    ----------
    store : PatchStore or path
    split : {"train", "validation"}
        Training rows ``[0, n_train)`` or validation rows ``[n_train, N)``.
    batch_size : int
        Batch size of the yielded batches (``drop_remainder=True``).
    shuffle : bool
        Shuffle the chunk order every pass and mix patches in a shuffle buffer.
    repeat : bool
        Repeat forever (training uses a fixed number of steps per epoch).
    seed : int
        Seed of both shuffles.
    num_shards, shard_index : int
        This worker's share: the chunk list is sharded (or, with fewer chunks than shards, the patches).
    shuffle_buffer : int, optional
        Patches in the shuffle buffer (default: two chunks).
    cycle_length : int, optional
        Chunks read concurrently (default: 4).
    deterministic : bool
        Keep the element order independent of thread timing (reproducible runs).
    drop_remainder : bool
        Drop a last batch smaller than ``batch_size`` (``False`` to see every patch of a single pass).

    Returns
    -------
    tf.data.Dataset
        Elements ``(x, y)`` of shapes ``[batch, P, P, C_in]`` and ``[batch, P, P, C_out]``, float32.

    Raises
    ------
    InputError
        The split holds no patches.
    """
    ds = _pipeline(_open_split(store, split), split, batch_size=batch_size, shuffle=shuffle, repeat=repeat,
                   seed=seed, num_shards=num_shards, shard_index=shard_index, shuffle_buffer=shuffle_buffer,
                   cycle_length=cycle_length, deterministic=deterministic, drop_remainder=drop_remainder)
    return _finish(ds, deterministic)


def _open_split(store, split: str):
    from l2l_scale.patches import PatchStore, open_patches

    if not isinstance(store, PatchStore):
        store = open_patches(store)
    if split not in ("train", "validation"):
        raise ConfigError(f"split {split!r} is not 'train' or 'validation'")
    start, stop = (0, store.n_train) if split == "train" else (store.n_train, store.n_patches)
    if stop <= start:
        raise InputError(f"patch store {store.path} holds no {split} patches; recreate it with 'l2l-scale patches'")
    return store


def _pipeline(store, split: str, *, batch_size: int, shuffle: bool, repeat: bool, seed: Any, num_shards: int,
              shard_index: int, shuffle_buffer: int | None, cycle_length: int | None, deterministic: bool,
              drop_remainder: bool) -> "tf.data.Dataset":
    """:func:`patch_dataset` without prefetch and options.

    Every random choice is a stateless shuffle keyed by ``seed`` (an int, or a tensor inside ``flat_map``: tf.data's
    own ``shuffle`` only takes Python seeds): the chunk order of each pass by ``(seed, pass)``, the patches of
    each chunk read by ``(seed + 1, pass, first row)``, and each window of ``shuffle_buffer`` patches (default two
    chunks) by ``(seed + 2, window)``.
    """
    import tensorflow as tf

    start, stop = (0, store.n_train) if split == "train" else (store.n_train, store.n_patches)
    ranges = _chunk_ranges(start, stop, store.chunk)
    p = store.patch_size
    cin, cout = store.X.shape[-1], store.Y.shape[-1]
    reader = _ChunkReader(str(store.path))
    by_chunk = num_shards > 1 and len(ranges) >= num_shards
    if by_chunk:
        ranges = ranges[shard_index::num_shards]
    chunk_rows = tf.constant(ranges, tf.int64)
    seed = tf.cast(seed, tf.int64)
    shuffle_of = tf.random.experimental.stateless_shuffle

    def one_pass(k):
        order = shuffle_of(chunk_rows, seed=tf.stack([seed, k])) if shuffle else chunk_rows
        return tf.data.Dataset.from_tensor_slices((tf.fill([tf.shape(order)[0]], k), order))

    # Shuffled passes may overlap in the interleave; unshuffled ones repeat whole (below), so every pass of the
    # validation rows is the same sequence.
    passes = tf.data.Dataset.counter() if repeat and shuffle else tf.data.Dataset.range(1)
    ds = passes.flat_map(one_pass)

    def load(k, rows):
        x, y = tf.numpy_function(reader, [rows], (tf.float32, tf.float32), stateful=False)
        x.set_shape([None, p, p, cin])
        y.set_shape([None, p, p, cout])
        if shuffle:
            perm = shuffle_of(tf.range(tf.shape(x)[0]), seed=tf.stack([seed + 1, k * (1 << 32) + rows[0]]))
            x, y = tf.gather(x, perm), tf.gather(y, perm)
        return tf.data.Dataset.from_tensor_slices((x, y))

    cycle = int(cycle_length or min(4, len(ranges)))
    ds = ds.interleave(load, cycle_length=max(1, cycle), block_length=1, num_parallel_calls=max(1, cycle),
                       deterministic=deterministic)
    if repeat and not shuffle:
        ds = ds.repeat()
    if num_shards > 1 and not by_chunk:
        ds = ds.shard(num_shards, shard_index)
    if shuffle:
        def mix(i, xy):
            perm = shuffle_of(tf.range(tf.shape(xy[0])[0]), seed=tf.stack([seed + 2, i]))
            return tf.data.Dataset.from_tensor_slices((tf.gather(xy[0], perm), tf.gather(xy[1], perm)))

        ds = ds.batch(int(shuffle_buffer or 2 * store.chunk)).enumerate().flat_map(mix)
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def _finish(ds, deterministic: bool) -> "tf.data.Dataset":
    import tensorflow as tf

    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    # We shard ourselves (by chunk); tf.distribute's auto-sharding would shard the chunk list a second time.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def _epoch_stream(store, split: str, *, batch_size: int, first_epoch: int, epochs: int, steps: int | None,
                  seed: int, num_shards: int = 1, shard_index: int = 0, shuffle_buffer: int | None = None,
                  drop_remainder: bool = True) -> "tf.data.Dataset":
    """The batches of epochs ``[first_epoch, epochs)`` as one pipeline, iterated once for the whole run.

    Training: epoch ``e`` is ``steps`` batches of a shuffled, repeated pass seeded by ``seed + 1000 * e``, so a run
    resumed at ``first_epoch`` sees the batches an uninterrupted run would have. Validation: epoch ``e`` is one
    unshuffled pass (``steps`` batches at most), the same patches every epoch. Building and tearing down a
    ``tf.data`` iterator per epoch, as before, cost about 0.8 s per epoch on a 2-core CPU (a third of the step
    time at 25 steps per epoch); one iterator for the whole run removes it.
    """
    import tensorflow as tf

    train = split == "train"

    def one(epoch):
        # Whole batches of a short validation split need its patches repeated (the first batches, every epoch).
        ds = _pipeline(store, split, batch_size=batch_size, shuffle=train, repeat=train or drop_remainder,
                       seed=seed + 1000 * epoch, num_shards=num_shards,
                       shard_index=shard_index, shuffle_buffer=shuffle_buffer, cycle_length=None,
                       deterministic=True, drop_remainder=drop_remainder)
        return ds.take(steps) if steps else ds

    return _finish(tf.data.Dataset.range(first_epoch, epochs).flat_map(one), True)


def _distributed(strategy, info: dict, store, split: str, global_batch: int, **kw):
    """Per-replica batches of :func:`_epoch_stream` distributed by ``strategy``, sharded by input pipeline.

    One device sees every validation patch (a last, smaller batch included: the validation loss is the mean over
    all of them, as Keras' ``fit`` computes CSBDeep's); replicas get whole batches only.
    """
    if _one_device(strategy, info):
        return _epoch_stream(store, split, batch_size=global_batch, drop_remainder=split == "train", **kw)

    def fn(ctx):
        # One pipeline feeds all replicas of its worker, a batch each per step.
        per_step = max(1, ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        opts = dict(kw, steps=kw["steps"] * per_step) if kw.get("steps") else kw
        return _epoch_stream(store, split, batch_size=ctx.get_per_replica_batch_size(global_batch),
                             num_shards=ctx.num_input_pipelines, shard_index=ctx.input_pipeline_id, **opts)

    return strategy.distribute_datasets_from_function(fn)


def _one_device(strategy, info: dict) -> bool:
    """No distribution: batches go to the model as they are (no per-replica split)."""
    import tensorflow as tf

    return info["replicas"] == 1 and info["workers"] == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy)
